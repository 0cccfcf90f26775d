"""Disaggregated asynchronous RL (issue 26 item 3): ``rl.max_lag = 1`` on one 8-device mesh vs a 4 + 4 split
(``mesh.rollout_devices = 4``: the sampler on devices 0-3, the log-prob passes and the update on 4-7), the LLM recipe
on a tiny random model, side by side in one process; one JSON document.

    JAX_PLATFORMS=cpu python benchmarks/bench_async.py --json /tmp/bench_async.json [--steps 12 --warmup 3]

Per layout (runs interleaved ``--repeats`` times, one trainer each, means over the steps after ``--warmup``):
steps/s (1 / the loop's ``step_time_s``), the phase times the schedule logs (``time/rollout_dispatch``,
``time/update``, ``time/update_idle`` = the training side waiting for a rollout, ``time/rollout_idle`` = the rollout
side waiting for weights / the host, ``time/reward``, ``time/logprobs``) and on the split ``time/weight_sync``
(the resharding ``device_put`` of the behaviour weights onto the rollout mesh), ``async/weight_sync_bytes`` and
``time/rollout_transfer`` (the outputs' copy back).

The devices are forced host devices (``--xla_force_host_platform_device_count=8``, set here before jax is imported):
on a machine with fewer cores than devices the 8 "devices" share the cores, so the overlap a split buys on real
accelerators (the update and the next rollout on disjoint chips at the same time) cannot show as wall time here;
what this measures is the schedule's cost and the handover's (sync, transfer) on this machine. The JSON records
the load average before and after: compare the two layouts of one run, never numbers across runs.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_utils import machine
from bench_rollout import _load, _tiny_model_dir, finish

KEYS = ("time/rollout_dispatch", "time/update", "time/update_idle", "time/rollout_idle", "time/reward",
        "time/logprobs", "time/weight_sync", "async/weight_sync_bytes", "time/rollout_transfer", "async/lag")


def _config(model_dir: str, args, rollout_devices: int):
    import ml_collections

    from adrpo_jax.rl.config import add_llm_config
    from adrpo_jax.train.config import add_common_config
    config = add_llm_config(add_common_config(ml_collections.ConfigDict()))
    config.model.path = model_dir
    config.total_steps, config.log_every, config.eval_every = args.steps, 1, 0
    config.checkpoint.every_steps = 10 ** 6
    config.logging.progress_bar, config.logging.tensorboard = False, False
    config.sampling.max_new_tokens, config.sampling.max_prompt_length = args.max_new, 16
    config.rl.num_prompts_per_step, config.rl.group_size = args.prompts, args.group_size
    config.rl.max_lag, config.rl.importance_correction = 1, "truncate"
    config.mesh.rollout_devices = rollout_devices
    return config


def run_layout(model_dir: str, root: str, args, rollout_devices: int, tag: str) -> dict:
    from adrpo_jax.rl.trainer import RLTrainer
    from adrpo_jax.train.metrics import read_jsonl
    workdir = os.path.join(root, tag)
    t0 = time.perf_counter()
    trainer = RLTrainer(_config(model_dir, args, rollout_devices), workdir)
    trainer.run()
    wall = time.perf_counter() - t0
    recs = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[args.warmup:]
    row = {"total_wall_s": wall, "step_time_s": float(np.mean([r["step_time_s"] for r in recs]))}
    row["steps_per_s"] = 1.0 / row["step_time_s"]
    for k in KEYS:
        vals = [r[k] for r in recs if k in r]
        if vals:
            row[k] = float(np.mean(vals))
    row["training_devices"] = sorted(d.id for d in trainer.mesh.devices.flat)
    if trainer.rollout_mesh is not None:
        row["rollout_devices"] = sorted(d.id for d in trainer.rollout_mesh.devices.flat)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the means (compilation)")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--rollout-devices", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs per layout")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if jax.device_count() != 8:
        raise SystemExit(f"bench_async needs 8 (forced) devices, got {jax.device_count()}: import nothing jax first")
    result = {"machine": machine(), "load_before": _load(), "argv": sys.argv[1:] if argv is None else list(argv),
              "note": "8 forced CPU devices sharing this machine's cores: the split's overlap cannot show as wall "
                      "time here; loaded machine, compare the two layouts of this run only"}
    root = tempfile.mkdtemp(prefix="bench_async_")
    model_dir = _tiny_model_dir(os.path.join(root, "model"))
    runs: dict[str, list[dict]] = {"one_mesh_8": [], f"split_{args.rollout_devices}+{8 - args.rollout_devices}": []}
    for i in range(args.repeats):
        for name, n in zip(runs, (0, args.rollout_devices)):
            runs[name].append(run_layout(model_dir, root, args, n, f"{name}_{i}"))
    for name, rows in runs.items():
        merged = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if isinstance(rows[0][k], float)}
        merged.update({k: v for k, v in rows[0].items() if not isinstance(v, float)}, runs=len(rows))
        result[name] = merged
    one, split = (result[n] for n in runs)
    result["split_over_one_mesh_steps_per_s"] = split["steps_per_s"] / one["steps_per_s"]
    return finish(result, args.json)


if __name__ == "__main__":
    main()
