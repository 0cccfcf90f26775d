r"""GRPO (fixed KL coefficient) vs ADRPO (adaptive coefficient) on the built-in spoken-arithmetic task, 3 seeds.

    python experiments/audio_grpo_vs_adrpo.py --workdir /tmp/audio_grpo_vs_adrpo [--seeds 0 1 2] [--steps 200]

Every run is ``configs/audio_arith.py:cpu`` (ADRPO) or ``:cpu_grpo`` (GRPO) on the cached supervised tiny audio
model (``builtin:tiny_audio_arith``, frozen encoder) with ``seed`` = the seed (data order and sampling); nothing
else differs. Each run checkpoints every ``--checkpoint-every`` steps, so an interrupted sweep re-run with the
same command resumes every unfinished run where it stopped (finished runs are reused). Outputs in WORKDIR:
``<method>_seed<s>/`` (metrics.jsonl, checkpoints), ``audio_reward_kl.png`` (reward, KL and held-out greedy
accuracy over steps; thin lines = seeds, thick = mean), ``results.json`` and a markdown table on stdout.
``--smoke`` runs 2 steps of one seed per method (a test of the script, not an experiment).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adrpo_jax.rl.demo import load_experiment_config, plot_runs  # noqa: E402

METHODS = (("GRPO", "cpu_grpo"), ("ADRPO", "cpu"))
REWARD = "reward/exact_match_mean"


def _mean(records, key, sl):
  values = [r[key] for r in records if key in r][sl]
  return float(np.mean(values)) if values else float("nan")


def run_one(workdir: Path, variant: str, seed: int, steps: int, checkpoint_every: int, overrides: dict) -> list[dict]:
  from adrpo_jax.rl.audio_trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel
  from adrpo_jax.train.metrics import read_jsonl  # pylint: disable=import-outside-toplevel

  config = load_experiment_config("audio_arith", variant)
  config.seed = seed
  config.total_steps = steps
  config.eval_every = max(steps // 5, 1)
  config.checkpoint.every_steps = max(1, min(checkpoint_every, steps))
  config.logging.progress_bar = False
  config.logging.tensorboard = False
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  train_and_evaluate(config, str(workdir))
  return read_jsonl(workdir / "metrics.jsonl")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--checkpoint-every", type=int, default=25)
  parser.add_argument("--smoke", action="store_true", help="2 steps, 1 seed, small batches (tests the script)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  overrides = {}
  if args.smoke:
    args.seeds, args.steps = args.seeds[:1], 2
    overrides = {"rl.num_prompts_per_step": 2, "rl.group_size": 2, "eval.num_examples": 4, "log_every": 1}
  workdir = Path(args.workdir).expanduser().resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  results, runs = {}, {}
  start = time.time()
  for method, variant in METHODS:
    runs[method] = []
    for seed in args.seeds:
      t0 = time.time()
      recs = run_one(workdir / f"{method.lower()}_seed{seed}", variant, seed, args.steps, args.checkpoint_every,
                     overrides)
      runs[method].append(recs)
      n = max(1, len([r for r in recs if REWARD in r]) // 10)
      row = {"reward_start": _mean(recs, REWARD, slice(0, n)), "reward_end": _mean(recs, REWARD, slice(-n, None)),
             "reward_auc": _mean(recs, REWARD, slice(None)), "kl_end": _mean(recs, "kl_mean", slice(-n, None)),
             "acc_start": _mean(recs, "eval/accuracy", slice(0, 1)), "acc_end": _mean(recs, "eval/accuracy", slice(-1, None)),
             "beta_eff_mean": _mean(recs, "beta_eff_mean", slice(None)), "seconds": time.time() - t0}
      results[f"{method}/seed{seed}"] = row
      print(f"{method:5s} seed={seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)
  plot_runs(runs, workdir / "audio_reward_kl.png",
            title=f"tiny audio LM, spoken 1-digit addition, seeds {args.seeds}")
  with open(workdir / "results.json", "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  keys = ("reward_start", "reward_end", "reward_auc", "kl_end", "acc_start", "acc_end", "beta_eff_mean")
  print("\n| method | " + " | ".join(keys) + " |")
  print("|---|" + "---|" * len(keys))
  for method, _ in METHODS:
    rows = [results[f"{method}/seed{s}"] for s in args.seeds]
    print(f"| {method} | " + " | ".join(f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows]):.3f}"
                                        for k in keys) + " |")
  print(f"\n{len(results)} runs, {time.time() - start:.0f} s; plot and results.json in {workdir}")
  return results


if __name__ == "__main__":
  main()
