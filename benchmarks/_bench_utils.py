"""Shared helpers of the benchmark scripts (not a public API): machine header, random model, rollout batch,
XLA memory accounting and a measured host peak (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``)."""
from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig


def machine() -> str:
    import flax
    import optax
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return (f"{dev.platform.upper()} {kind} x{jax.device_count()} ({cpu or platform.processor()}), "
            f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, jax {jax.__version__}, "
            f"flax {flax.__version__}, optax {optax.__version__}")


def build_model(cfg: DecoderConfig, seed: int = 0) -> CausalLM:
    """Random weights drawn with NumPy on the host (no per-shape XLA compilations), N(0, 0.02); norms 1."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = str(path[-1].key)
        if name == "weight":
            return jnp.ones(x.shape, x.dtype)
        if name == "bias":
            return jnp.zeros(x.shape, x.dtype)
        return jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32) * np.float32(0.02), x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def make_batch(b: int, p: int, n: int, vocab: int, seed: int = 0) -> dict[str, jax.Array]:
    """A rollout batch as the trainer builds it: ``tokens [b, p + n]``, completion lengths in ``[n/2, n]``,
    random rewards (groups of any size get non-zero advantages), random reference log-probs."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (b, p + n)).astype(np.int32)
    lengths = rng.integers(n // 2, n + 1, b).astype(np.int32)
    cmask = np.arange(n)[None, :] < lengths[:, None]
    return {k: jnp.asarray(v) for k, v in {
        "tokens": tokens, "attention_mask": np.concatenate([np.ones((b, p), bool), cmask], 1),
        "completion_mask": cmask, "lengths": lengths, "done": lengths < n,
        "rewards": rng.standard_normal(b).astype(np.float32), "reward_valid": np.ones(b, bool),
        "ref_logp": (-3.0 * rng.random((b, n))).astype(np.float32)}.items()}


def memory_row(compiled) -> dict[str, int]:
    """XLA's compiled memory analysis; ``peak_bytes`` = arguments + temporaries + outputs - donated aliases."""
    ma = compiled.memory_analysis()
    row = dict(arg_bytes=int(ma.argument_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes),
               out_bytes=int(ma.output_size_in_bytes), alias_bytes=int(ma.alias_size_in_bytes))
    row["peak_bytes"] = row["arg_bytes"] + row["temp_bytes"] + row["out_bytes"] - row["alias_bytes"]
    return row


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def measured_step_peak(fn, *args) -> tuple[float, int | None]:
    """Runs ``fn(*args)`` once (blocking) and returns ``(seconds, bytes)``: the growth of the process's peak
    resident set over the resident set just before the call (Linux: ``VmHWM`` reset by writing 5 to
    ``/proc/self/clear_refs``), i.e. the host memory the call allocated on top of what was resident (its
    temporaries and outputs; the arguments were already resident). None where the reset is not available.
    A lower bound: memory the allocator kept resident from earlier calls (freed, not returned to the OS) is
    reused without growing the RSS (tiny steps read ~0; steps of 100+ MiB match XLA's temporaries)."""
    import gc
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except OSError:
        before = None
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    del out
    if before is None or peak is None:
        return seconds, None
    return seconds, max(peak - before, 0) * 1024


def mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f}"
