r"""GRPO (fixed KL coefficient) vs ADRPO (adaptive coefficient) on the built-in arithmetic task, several seeds.

    python experiments/llm_adrpo_vs_grpo.py --workdir /tmp/llm_adrpo_vs_grpo [--seeds 0 1 2] \
        [--betas 0.04 0.2] [--steps 300]

Every run is ``configs/llm_arith.py:cpu`` (ADRPO) or ``:cpu_grpo`` (GRPO) on the cached tiny SFT model
(``builtin:tiny_arith``) with ``rl.beta`` = beta_0 and ``seed`` = the seed (data order and sampling); nothing
else differs. Outputs in WORKDIR: ``beta<b>/<method>_seed<s>/`` (the runs: metrics.jsonl, checkpoints, ...),
``reward_kl_beta<b>.png`` (reward, KL and held-out accuracy over steps; thin lines = seeds, thick = mean),
``results.json`` and a markdown table on stdout (pasted into experiments/llm.md). Finished runs are reused.
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


def _last(records, key, n):
    values = [r[key] for r in records if key in r]
    return float(np.mean(values[-n:])) if values else float("nan")


def _first(records, key, n):
    values = [r[key] for r in records if key in r]
    return float(np.mean(values[:n])) if values else float("nan")


def run_one(workdir: Path, variant: str, seed: int, beta: float, steps: int) -> list[dict]:
    from adrpo_jax.rl.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train.metrics import read_jsonl  # pylint: disable=import-outside-toplevel

    config = load_experiment_config("llm_arith", variant)
    config.seed = seed
    config.rl.beta = beta
    config.total_steps = steps
    config.eval_every = max(steps // 6, 1)
    config.checkpoint.every_steps = steps
    config.logging.progress_bar = False
    config.model.save_final = False
    config.lock()
    train_and_evaluate(config, str(workdir))
    return read_jsonl(workdir / "metrics.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.04, 0.2])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from adrpo_jax.train.distributed import setup_compilation_cache  # pylint: disable=import-outside-toplevel

    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    setup_compilation_cache(str(workdir / ".xla_cache"))
    results = {}
    start = time.time()
    for beta in args.betas:
        runs = {}
        for method, variant in METHODS:
            runs[method] = []
            for seed in args.seeds:
                t0 = time.time()
                recs = run_one(workdir / f"beta{beta:g}" / f"{method.lower()}_seed{seed}", variant, seed, beta,
                               args.steps)
                runs[method].append(recs)
                row = {"reward_start": _first(recs, "reward/exact_match_mean", 2),
                       "reward_end": _last(recs, "reward/exact_match_mean", 5),
                       "reward_auc": float(np.mean([r["reward/exact_match_mean"] for r in recs
                                                    if "reward/exact_match_mean" in r])),
                       "kl_end": _last(recs, "kl_mean", 5),
                       "acc_start": _first(recs, "eval/accuracy", 1), "acc_end": _last(recs, "eval/accuracy", 1),
                       "entropy_end": _last(recs, "entropy_mean", 5),
                       "beta_eff_mean": float(np.mean([r["beta_eff_mean"] for r in recs if "beta_eff_mean" in r])),
                       "seconds": time.time() - t0}
                results[f"beta{beta:g}/{method}/seed{seed}"] = row
                print(f"beta={beta:g} {method:5s} seed={seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()),
                      flush=True)
        plot_runs(runs, workdir / f"reward_kl_beta{beta:g}.png",
                  title=f"tiny LM, 1-2 digit addition, beta_0={beta:g}, seeds {args.seeds}")
    with open(workdir / "results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)

    keys = ("reward_start", "reward_end", "reward_auc", "kl_end", "acc_start", "acc_end", "beta_eff_mean")
    print(f"\n| beta_0 | method | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for beta in args.betas:
        for method, _ in METHODS:
            rows = [results[f"beta{beta:g}/{method}/seed{s}"] for s in args.seeds]
            cells = [f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows]):.3f}" for k in keys]
            print(f"| {beta:g} | {method} | " + " | ".join(cells) + " |")
    print(f"\n{len(results)} runs, {time.time() - start:.0f} s; plots and results.json in {workdir}")


if __name__ == "__main__":
    main()
