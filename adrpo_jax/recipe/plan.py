r"""The plan mode: every program of a recipe compiled for a target, without weights and without the hardware.

    python launch.py --config=configs/llm_arith.py:tpu --workdir=DIR --mode=plan --config.plan.target=v5e:2x4

The recipe is built abstractly (:class:`~adrpo_jax.recipe.base.Recipe` with ``abstract=True``: shapes from the
checkpoint's ``config.json`` or a named preset, no weights, no data) on the target's mesh, and each of its
programs (:class:`~adrpo_jax.train.programs.Program`: the sampler's prefill and decode, the log-prob passes, the
update per micro-batch, the evaluation, ...) is lowered and compiled at the run's real shapes by the target's own
compiler:

* ``v5e:2x4``, ``v5e:4x4``, ``v5p:2x2x2``, ``v6e:2x4``, ``v4:2x2x2``, ... (any topology libtpu knows): the TPU
  compiler, on this machine (``jax.experimental.topologies``; ``pip install "jax[tpu]"``). Its
  ``memory_analysis()`` is the chip's HBM buffer assignment, ``cost_analysis()`` its FLOPs and bytes.
* ``h100:N``, ``h100:HxN``, ``h200:N`` (N GPUs per host, H hosts): XLA's GPU compiler without a GPU (the CUDA
  plugin, ``jax-cuda12-plugin`` + ``jax-cuda12-pjrt``, compiling for the chip's device description: a deviceless
  compile). Its ``memory_analysis()`` is the GPU's buffer assignment; it has no cost analysis, so FLOPs come from
  the jaxpr's matmuls and bytes are the arguments and outputs read once (a floor). Matmul autotuning needs the
  device: a real run may pick other kernels (cuBLAS workspaces of tens of MiB).
* ``cpu:N``: N host devices of this machine (the XLA CPU compiler), against this CPU's measured peaks;
  ``cpu:N@h100`` / ``cpu:N@h200``: the same compilation compared with an H100 / H200 (the CPU compiler's buffer
  assignment: an estimate, up to ~2x the GPU compiler's temporaries).

Per program and chip it reports: memory (arguments, outputs, temporaries, aliases), the **peak** of the step
while the program runs (the program's own buffers plus what stays resident the whole step: parameters,
optimizer state, frozen weights, reference, minus what the program already counts among its arguments), FLOPs,
bytes accessed, the roofline time ``max(FLOPs / peak, bytes / bandwidth)`` from :data:`adrpo_jax.train.perf.CHIPS`
and the predicted step time and MFU. A program whose peak exceeds ``(1 - plan.margin)`` of the chip's HBM fails
the plan (exit code 1) with its name, its ``shrink_key`` (the config key that shrinks it) and, where the plan can
find it, the largest value of that key that fits. The report goes to ``DIR/plan.json`` (``plan.output``).

What a compile-only figure does not include: runtime overheads (host work, kernel launches), collective latency
(the bytes of collectives count, their latency does not), loops the compiler cannot count (the sampler's decode
loop: planned as one ``plan/decode`` step times ``sampling.max_new_tokens``), and allocator fragmentation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from typing import Any

import jax

from adrpo_jax import train
from adrpo_jax.models.llm.activation_sharding import compiling_for
import adrpo_jax.train.config  # noqa: F401  (train.config.shapes_only)
from adrpo_jax.train import perf
from adrpo_jax.train.config import ConfigError

__all__ = ["plan", "target_mesh", "PlanError", "per_device_bytes", "format_report", "check_before_run"]

log = logging.getLogger(__name__)

_TPU_RE = re.compile(r"^(v\d+[a-z]*)(?:-\d+)?:(\d+(?:x\d+)*)$")
_CPU_RE = re.compile(r"^cpu:(\d+)(?:@(\w+))?$")
_GPU_RE = re.compile(r"^(h100|h200):(?:(\d+)x)?(\d+)$")

# XLA:GPU's device description for a deviceless compile (the fields of stream_executor.GpuTargetConfigProto that
# its compiler reads; values from NVIDIA's spec sheets, as openxla/xla's gpu_specs/h100_sxm.txtpb).
_GPU_SPECS = {
    "h100": dict(memory=84942979072, bandwidth=3352320000000, l2=52428800, name="NVIDIA H100 80GB HBM3"),
    "h200": dict(memory=150754820096, bandwidth=4800000000000, l2=62914560, name="NVIDIA H200"),
}


def gpu_target_config(kind: str) -> str:
    """The ``GpuTargetConfigProto`` text of an H100 / H200 (Hopper, compute capability 9.0, 132 SMs)."""
    spec = _GPU_SPECS[kind]
    return (
        "gpu_device_info {\n"
        "  threads_per_block_limit: 1024 threads_per_warp: 32\n"
        "  shared_memory_per_block: 49152 shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448\n"
        "  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128\n"
        "  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535\n"
        "  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64\n"
        f"  memory_bandwidth: {spec['bandwidth']} l2_cache_size: {spec['l2']} clock_rate_ghz: 1.98\n"
        f"  device_memory_size: {spec['memory']} registers_per_core_limit: 65536 registers_per_block_limit: 65536\n"
        "  cuda_compute_capability { major: 9 minor: 0 }\n"
        "}\n"
        'platform_name: "CUDA"\n'
        "dnn_version_info { major: 9 minor: 8 }\n"
        f'device_description_str: "{spec["name"]}"\n')


class PlanError(RuntimeError):
    """A program does not fit its chip (the message names it, the config key and the largest value that fits)."""


per_device_bytes = perf.per_device_bytes


def target_mesh(config: Any, target: str) -> tuple[jax.sharding.Mesh, perf.Chip, str]:
    """``(mesh, chip, compiler)`` of a plan target (module docstring); the mesh has ``config.mesh``'s axes.
    ``'devices'``: this process's own devices (the start-up check of a TPU / GPU run)."""
    if target == "devices":
        mesh = train.make_mesh(config.mesh)
        chip, _ = perf.mesh_chips(mesh)
        return mesh, chip, f"{jax.default_backend().upper()} compiler ({chip.name})"
    m = _TPU_RE.match(target)
    if m:
        try:
            from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
            topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{m.group(1)}:{m.group(2)}")
        except Exception as err:  # pylint: disable=broad-except
            raise ConfigError(f"`plan.target`={target!r}: the TPU compiler is not available here ({err}); install "
                              "it with `pip install \"jax[tpu]==<the jax version>\"` (libtpu; no TPU needed).",
                              key="plan.target", value=target) from None
        chip = perf.chip_for(m.group(1))
        return train.make_mesh(config.mesh, devices=list(topo.devices)), chip, f"TPU compiler ({chip.name})"
    m = _GPU_RE.match(target)
    if m:
        kind, hosts, per_host = m.group(1), int(m.group(2) or 1), int(m.group(3))
        try:
            from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
            topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(kind),
                                                topology=f"1x{hosts}x{per_host}")
        except Exception as err:  # pylint: disable=broad-except
            raise ConfigError(
                f"`plan.target`={target!r}: XLA's GPU compiler is not available here ({str(err).splitlines()[0]}); "
                "install the CUDA plugin (`pip install jax-cuda12-plugin==<the jax version> "
                "jax-cuda12-pjrt==<the jax version>`; no GPU needed) and start with JAX_PLATFORMS=cpu, or plan "
                f"with the CPU compiler's estimate: 'cpu:{per_host}@{kind}'.", key="plan.target",
                value=target) from None
        chip = perf.chip_for(kind)
        return (train.make_mesh(config.mesh, devices=list(topo.devices)), chip,
                f"XLA GPU compiler, deviceless ({chip.name})")
    m = _CPU_RE.match(target)
    if m:
        n = int(m.group(1))
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ConfigError(f"`plan.target`={target!r} needs {n} host devices, this process has {len(devices)}: "
                              f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={n} (launch.py sets "
                              "it for --mode=plan).", key="plan.target", value=target)
        chip = perf.chip_for(m.group(2)) if m.group(2) else perf.cpu_chip()
        return train.make_mesh(config.mesh, devices=devices[:n]), chip, "XLA CPU compiler"
    raise ConfigError(f"`plan.target`={target!r} must be a TPU topology ('v5e:2x4', 'v5p:2x2x2', 'v6e:2x4', ...), "
                      "a GPU ('h100:8' = one host of 8 H100s, 'h100:2x8' = two hosts, 'h200:8'), or 'cpu:N' "
                      "(optionally 'cpu:N@h100').", key="plan.target", value=target)


def _resident(recipe: Any) -> tuple[dict[int, int], int]:
    """``({id(leaf): per-device bytes}, total)`` of what stays in device memory for the whole step."""
    trees = [recipe.abstract_state, recipe.policy.abstract_frozen]
    if recipe.policy.ref_params is not None and not recipe.policy.ref_in_state:
        trees.append(recipe.policy.ref_params)
    ids: dict[int, int] = {}
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            ids.setdefault(id(leaf), per_device_bytes(leaf))
    return ids, sum(ids.values())


def _program_report(recipe: Any, program: Any, resident_ids: dict[int, int], resident_total: int,
                    chip: perf.Chip, per_step: float) -> dict[str, Any]:
    args = program.abstract_args()
    in_args = {id(x) for x in jax.tree.leaves(args)}
    resident_in_args = sum(b for i, b in resident_ids.items() if i in in_args)
    try:
        compiled = program.compile_args(args)
    except Exception as err:  # pylint: disable=broad-except
        out_of_memory = _compile_oom_bytes(err)
        if out_of_memory is None:
            raise
        # The TPU compiler refuses a program whose temporaries alone exceed the chip: a failing program, not a crash.
        args_bytes = sum(per_device_bytes(x) for x in jax.tree.leaves(args) if hasattr(x, "shape"))
        peak = resident_total - resident_in_args + args_bytes + out_of_memory
        return {"name": program.name, "phase": program.phase, "per_step": per_step,
                "shrink_key": program.shrink_key or None,
                "memory": {"temp": out_of_memory, "argument": args_bytes, "compile_error": str(err).splitlines()[0]},
                "peak_bytes": peak, "peak_gib": peak / perf.GIB, "flops": 0.0, "bytes_accessed": 0.0,
                "cost_source": "none (the compiler ran out of memory)", "roofline_s": 0.0, "compile_s": None}
    mem, cost = compiled.memory, compiled.cost
    # The step's peak while this program runs: what stays resident + the program's own buffers, counting the
    # resident arrays among its arguments once.
    step_peak = resident_total + mem.get("peak", 0) - resident_in_args if mem else None
    roof = perf.roofline_seconds(cost["flops"], cost["bytes_accessed"], chip)
    return {"name": program.name, "phase": program.phase, "per_step": per_step,
            "shrink_key": program.shrink_key or None, "memory": mem, "peak_bytes": step_peak,
            "peak_gib": None if step_peak is None else step_peak / perf.GIB, "flops": cost["flops"],
            "bytes_accessed": cost["bytes_accessed"], "cost_source": cost.get("cost_source", "compiler"),
            "roofline_s": roof, "compile_s": compiled.compile_s}


_OOM_RE = re.compile(r"RESOURCE_EXHAUSTED.*?temporaries \((\d+(?:\.\d+)?)([KMGT]?)\)", re.S)


def _compile_oom_bytes(err: BaseException) -> int | None:
    """The temporaries (bytes) of a compile that ran out of device memory (the TPU compiler's ``RESOURCE_EXHAUSTED:
    Ran out of memory ... HLO temporaries (17.45G) exceeds ...``), else None."""
    m = _OOM_RE.search(str(err))
    if not m:
        return None
    return int(float(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2)])


def _per_step(recipe: Any, program: Any) -> float:
    """How many times one RL step runs ``program`` (eval programs: once per ``eval_every`` steps)."""
    if program.phase == "eval":
        every = int(recipe.config.eval_every)
        return float(program.per_step) / every if every > 0 else 0.0
    return float(program.per_step)


def plan(config: Any, target: str | None = None, *, workdir: str | os.PathLike | None = None,
         write: bool = True, search: bool = True) -> dict[str, Any]:
    """Plans ``config`` on ``target`` (default ``config.plan.target``); returns the report (module docstring) and
    writes it to ``workdir/plan.json`` (or ``plan.output``). Raises :class:`PlanError` when a program does not
    fit (after writing the report).

    Kernel choices follow the target, not this host: for a TPU topology the programs are traced as on a TPU
    (``attention_impl='auto'`` -> Pallas splash for a prefill, ``moe_impl='auto'`` -> ``ragged_dot``)."""
    target = target or str(train.get_by_path(config, "plan.target", "") or "")
    platform = "tpu" if _TPU_RE.match(target) else "gpu" if _GPU_RE.match(target) else None
    with compiling_for(platform):
        return _plan(config, target, workdir=workdir, write=write, search=search)


def _plan(config: Any, target: str, *, workdir: str | os.PathLike | None, write: bool,
          search: bool) -> dict[str, Any]:
    from adrpo_jax.recipe.runner import _recipe_class  # pylint: disable=import-outside-toplevel

    if not target:
        raise ConfigError("`plan.target` is empty: name a TPU topology (e.g. --config.plan.target=v5e:2x4) or "
                          "cpu:N.", key="plan.target", value=target)
    margin = float(train.get_by_path(config, "plan.margin", 0.1))
    cls = _recipe_class(config)
    t0 = time.perf_counter()
    mesh, chip, compiler = target_mesh(config, target)
    with tempfile.TemporaryDirectory() as tmp, train.config.shapes_only():
        recipe = cls(config, workdir or tmp, mesh=mesh, abstract=True)
    resident_ids, resident_total = _resident(recipe)
    capacity = chip.hbm_bytes
    programs = []
    for name, program in recipe.programs.items():
        if program.args is None or program.phase == "init" or program.planned_by:
            continue
        log.info("plan: compiling %s for %s ...", name, target)
        programs.append(_program_report(recipe, program, resident_ids, resident_total, chip,
                                        _per_step(recipe, program)))
    step_s = sum(p["roofline_s"] * p["per_step"] for p in programs)
    step_flops = sum(p["flops"] * p["per_step"] for p in programs)
    limit = (1.0 - margin) * capacity
    failing = [p for p in programs if p["peak_bytes"] is not None and p["peak_bytes"] > limit]
    largest = max((p for p in programs if p["peak_bytes"] is not None), key=lambda p: p["peak_bytes"], default=None)
    report = {
        "config": str(train.get_by_path(config, "plan.config_name", "") or ""), "trainer": config.trainer,
        "target": target, "compiler": compiler, "chip": chip.to_dict(), "num_devices": mesh.size,
        "mesh": dict(mesh.shape), "margin": margin,
        "resident_gib": resident_total / perf.GIB, "capacity_gib": capacity / perf.GIB,
        "largest_program": None if largest is None else largest["name"],
        "largest_peak_gib": None if largest is None else largest["peak_gib"],
        "predicted_step_s": step_s,
        "predicted_mfu": step_flops / (step_s * chip.peak_flops) if step_s > 0 else None,
        "fits": not failing, "programs": programs, "plan_seconds": None,
        "not_included": "runtime overheads (host work, launches), collective latency, allocator fragmentation; "
                        "the decode loop is planned as plan/decode x sampling.max_new_tokens",
    }
    if failing and search:
        report["fixes"] = [_search_fix(config, target, p, limit) for p in failing]
    report["plan_seconds"] = time.perf_counter() - t0
    if write:
        out = str(train.get_by_path(config, "plan.output", "") or "") or (
            os.path.join(os.fspath(workdir), "plan.json") if workdir is not None else "")
        if out and jax.process_index() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2, default=float)
            report["output"] = out
    if failing:
        raise PlanError(_failure_message(report, failing, capacity, margin))
    return report


def _failure_message(report: dict[str, Any], failing: list[dict[str, Any]], capacity: float, margin: float) -> str:
    fixes = {f["program"]: f for f in report.get("fixes", [])}
    lines = []
    for p in failing:
        line = (f"program {p['name']!r} needs {p['peak_gib']:.2f} GiB per chip at its peak, above "
                f"{(1 - margin) * capacity / perf.GIB:.2f} GiB ({1 - margin:.0%} of {capacity / perf.GIB:.1f} GiB, "
                f"{report['chip']['name']})")
        fix = fixes.get(p["name"])
        if fix and fix.get("value") is not None:
            line += (f": set --config.{fix['key']}={fix['value']} (the largest value that fits, "
                     f"{fix['peak_gib']:.2f} GiB)")
        elif p.get("shrink_key"):
            line += f": lower `{p['shrink_key']}`" + (f" ({fix['note']})" if fix and fix.get("note") else "")
        lines.append(line)
    return f"the plan for {report['target']} does not fit: " + "; ".join(lines)


def _search_fix(config: Any, target: str, program: dict[str, Any], limit: float) -> dict[str, Any]:
    """The largest value of the program's ``shrink_key`` that fits (re-planning only that program)."""
    key = program.get("shrink_key")
    out: dict[str, Any] = {"program": program["name"], "key": key, "value": None, "peak_gib": None}
    if not key:
        out["note"] = "no config key shrinks it"
        return out
    current = train.get_by_path(config, key, None)
    if not isinstance(current, int) or isinstance(current, bool):
        out["note"] = f"`{key}` is not an integer"
        return out
    if key.endswith(("grad_accum_steps", "_chunks")):  # more steps = smaller micro-batches
        candidates = [current * 2 ** k for k in range(1, 7)]
    else:  # a batch / chunk size (0 = "all": start from the eval set)
        base = current or int(train.get_by_path(config, "eval.num_examples", 0) or 0)
        candidates = sorted({base // 2 ** k for k in range(1, 12) if base // 2 ** k >= 1}, reverse=True)
    from adrpo_jax.recipe.runner import _config_copy, _recipe_class  # pylint: disable=import-outside-toplevel
    for value in candidates:
        trial = _config_copy(config, **{key: value})
        try:
            mesh, chip, _ = target_mesh(trial, target)
            with tempfile.TemporaryDirectory() as tmp, train.config.shapes_only():
                recipe = _recipe_class(trial)(trial, tmp, mesh=mesh, abstract=True)
        except (ConfigError, ValueError):
            continue  # e.g. not a divisor of the batch
        ids, total = _resident(recipe)
        p = recipe.programs[program["name"]]
        rep = _program_report(recipe, p, ids, total, chip, 1.0)
        if rep["peak_bytes"] is not None and rep["peak_bytes"] <= limit:
            out.update(value=value, peak_gib=rep["peak_gib"])
            return out
    out["note"] = f"no value of `{key}` among {candidates} fits"
    return out


def format_report(report: dict[str, Any]) -> str:
    """A short table of a plan report (one line per program)."""
    head = (f"plan {report['trainer']} on {report['target']} ({report['compiler']}, {report['num_devices']} devices, "
            f"mesh {report['mesh']}): resident {report['resident_gib']:.2f} GiB / {report['capacity_gib']:.1f} GiB "
            f"per chip; predicted step {report['predicted_step_s']:.3g} s, MFU "
            f"{(report['predicted_mfu'] or 0.0):.1%}")
    rows = [head, f"{'program':<22} {'phase':<8} {'peak GiB':>9} {'temp GiB':>9} {'GFLOP':>10} {'GB':>9} "
                  f"{'roofline ms':>12} {'x/step':>7}"]
    for p in report["programs"]:
        temp = p["memory"].get("temp", 0) / perf.GIB if p["memory"] else float("nan")
        rows.append(f"{p['name']:<22} {p['phase']:<8} {p['peak_gib'] or float('nan'):>9.3f} {temp:>9.3f} "
                    f"{p['flops'] / 1e9:>10.2f} {p['bytes_accessed'] / 1e9:>9.3f} {p['roofline_s'] * 1e3:>12.3f} "
                    f"{p['per_step']:>7.3g}")
    rows.append("fits" if report["fits"] else "DOES NOT FIT")
    return "\n".join(rows)


def check_before_run(config: Any, workdir: str | os.PathLike) -> dict[str, Any] | None:
    """``plan.check`` (default on): on a TPU or GPU, plan the run on its own devices before any weight is loaded,
    so a program that cannot fit fails in seconds with the key to change instead of an out-of-memory error after
    the model load (report: ``workdir/plan_check.json``). On CPU (and with ``plan.check=False``) nothing runs."""
    if jax.default_backend() not in ("tpu", "gpu") or not bool(train.get_by_path(config, "plan.check", True)):
        return None
    from adrpo_jax.recipe.base import recipe_name  # pylint: disable=import-outside-toplevel
    if recipe_name(config.trainer) is None:
        return None  # a plain train_and_evaluate function declares no programs
    out = os.path.join(os.fspath(workdir), "plan_check.json")
    from adrpo_jax.recipe.runner import _config_copy  # pylint: disable=import-outside-toplevel
    checked = _config_copy(config, **{"plan.output": out})
    report = plan(checked, "devices", workdir=workdir, search=False)
    log.info("plan.check: every program fits (%s); largest %s at %.2f GiB per chip", report["target"],
             report["largest_program"], report["largest_peak_gib"] or 0.0)
    return report
