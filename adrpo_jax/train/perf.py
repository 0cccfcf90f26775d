"""Chips, rooflines and utilization: what a program's FLOPs and bytes mean on the hardware it runs on.

* :data:`CHIPS`: published per-chip peaks (dense bf16 matmul FLOP/s, HBM bandwidth, HBM capacity) of the TPU and
  GPU generations our users train on; :func:`chip_for` finds the entry of a device or a target name.
* :func:`roofline_seconds`: ``max(flops / peak_flops, bytes / bandwidth)``, the time below which a program cannot
  run on that chip (compute- or memory-bound).
* :func:`utilization`: MFU (model FLOPs utilization = achieved FLOP/s / peak) and MBU (memory-bandwidth utilization
  = achieved bytes/s / peak bandwidth) of a measured time.
* :func:`cpu_chip`: this machine's own figures, measured once (a float32 matmul and a large copy) and cached, so a
  CPU run reports MFU / MBU against what this CPU can do, not against a made-up number.

FLOPs and bytes come from XLA's cost analysis of the compiled or lowered program (``Compiled.cost_analysis()``:
per device for an SPMD program). Roofline figures exclude what a compile-only analysis cannot see: kernel launch
and host overheads, collective latency, and loops whose trip count the compiler does not know (a while loop's
body is counted once).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

__all__ = ["Chip", "CHIPS", "chip_for", "roofline_seconds", "utilization", "cpu_chip", "GIB", "mesh_chips",
           "tree_bytes", "per_device_bytes"]

log = logging.getLogger(__name__)

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: ``peak_flops`` (dense bf16 FLOP/s), ``bandwidth`` (HBM bytes/s), ``hbm_bytes``."""

    name: str
    peak_flops: float
    bandwidth: float
    hbm_bytes: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "peak_tflops": self.peak_flops / 1e12, "bandwidth_gbps": self.bandwidth / 1e9,
                "hbm_gib": self.hbm_bytes / GIB}


# Published figures per chip (vendor spec sheets): bf16 dense matmul peak, HBM bandwidth, HBM capacity.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 1228e9, 32 * GIB),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GIB),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GIB),
    "v6e": Chip("TPU v6e (Trillium)", 918e12, 1640e9, 32 * GIB),
    "h100": Chip("NVIDIA H100 SXM (80 GB)", 989e12, 3350e9, 80 * 1e9),
    "h200": Chip("NVIDIA H200 (141 GB)", 989e12, 4800e9, 141 * 1e9),
}

_DEVICE_KINDS = (("v6", "v6e"), ("v5p", "v5p"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5", "v5p"), ("v4", "v4"),
                 ("h200", "h200"), ("h100", "h100"))


def chip_for(what: Any) -> Chip:
    """The :data:`CHIPS` entry of a target name (``'v5e:2x4'``, ``'v5p'``, ``'h100'``), a ``jax.Device`` (its
    ``device_kind``) or ``'cpu'`` (this machine, :func:`cpu_chip`). ``KeyError`` naming the choices otherwise."""
    if isinstance(what, str):
        name = what.split(":", 1)[0].lower()
        if name == "cpu":
            return cpu_chip()
        if name in CHIPS:
            return CHIPS[name]
        raise KeyError(f"unknown chip {what!r}: one of {sorted(CHIPS)} or 'cpu'")
    kind = str(getattr(what, "device_kind", "")).lower()
    platform = str(getattr(what, "platform", "")).lower()
    if platform == "cpu":
        return cpu_chip()
    for needle, name in _DEVICE_KINDS:
        if needle in kind:
            return CHIPS[name]
    raise KeyError(f"no chip table entry for device kind {kind!r} ({platform}); known: {sorted(CHIPS)}")


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> float:
    """``max(flops / peak_flops, bytes / bandwidth)``: the fastest the work can run on ``chip``."""
    return max(float(flops) / chip.peak_flops, float(bytes_accessed) / chip.bandwidth)


def utilization(flops: float, bytes_accessed: float, seconds: float, chip: Chip, num_chips: int = 1
                ) -> dict[str, float]:
    """``{"mfu", "mbu"}`` of work that took ``seconds`` on ``num_chips`` chips (``flops`` / ``bytes`` in total)."""
    seconds = max(float(seconds), 1e-12)
    return {"mfu": float(flops) / seconds / (chip.peak_flops * num_chips),
            "mbu": float(bytes_accessed) / seconds / (chip.bandwidth * num_chips)}


_CPU_CHIP: Chip | None = None


def _measure_cpu(n: int = 1024, copy_mb: int = 256, repeats: int = 5) -> tuple[float, float]:
    """(float32 matmul FLOP/s, copy bytes/s) of this process's default CPU device: best of ``repeats``."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    flops = 2.0 * n ** 3 / best
    x = jax.device_put(jnp.ones((copy_mb * 2 ** 20 // 4,), jnp.float32), cpu)
    cp = jax.jit(lambda v: v + 1.0)
    cp(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        cp(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return flops, 2.0 * x.size * 4 / best  # read + write


def cpu_chip(refresh: bool = False) -> Chip:
    """This CPU as a :class:`Chip`: its float32 matmul FLOP/s and copy bandwidth, measured once per machine and
    cached in ``$ADRPO_JAX_CACHE/cpu_peaks.json`` (``refresh`` measures again); capacity = physical memory."""
    global _CPU_CHIP  # pylint: disable=global-statement
    if _CPU_CHIP is not None and not refresh:
        return _CPU_CHIP
    from adrpo_jax.cache import cache_root  # pylint: disable=import-outside-toplevel

    path = os.path.join(cache_root(), "cpu_peaks.json")
    host = os.uname().nodename if hasattr(os, "uname") else ""
    data = None
    if not refresh and os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("host") != host or data.get("cpus") != os.cpu_count():
                data = None
        except (OSError, ValueError):
            data = None
    if data is None:
        flops, bandwidth = _measure_cpu()
        data = {"host": host, "cpus": os.cpu_count(), "peak_flops": flops, "bandwidth": bandwidth,
                "time": time.time()}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f)
        except OSError as err:  # a read-only cache never stops a run
            log.warning("could not cache the CPU peaks in %s: %s", path, err)
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 0
    _CPU_CHIP = Chip(f"CPU ({os.cpu_count()} cores, measured)", float(data["peak_flops"]), float(data["bandwidth"]),
                     float(mem))
    return _CPU_CHIP


def mesh_chips(mesh: Any) -> tuple[Chip, int]:
    """``(chip, number of chips)`` a mesh runs on: its devices' chip and count; host devices share one CPU
    (count 1). A device kind without a table entry falls back to this CPU's figures (with a warning)."""
    device = mesh.devices.flat[0]
    if str(getattr(device, "platform", "")) == "cpu":
        return cpu_chip(), 1
    try:
        return chip_for(device), int(mesh.size)
    except KeyError as err:
        log.warning("%s: MFU / MBU are reported against this CPU's peaks", err)
        return cpu_chip(), int(mesh.size)


def tree_bytes(tree: Any, *, per_device: bool = False) -> int:
    """Total bytes of the arrays (or ShapeDtypeStructs) of ``tree`` (typed PRNG keys excluded); ``per_device``:
    the bytes one device holds (each leaf's shard shape under its sharding; unsharded leaves whole)."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    total = 0
    for x in jax.tree.leaves(tree):
        shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
        if shape is None or dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            continue
        sharding = getattr(x, "sharding", None) if per_device else None
        local = sharding.shard_shape(tuple(shape)) if sharding is not None else tuple(shape)
        total += int(np.prod(local, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree``: :func:`tree_bytes` with ``per_device=True``."""
    return tree_bytes(tree, per_device=True)
