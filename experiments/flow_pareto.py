r"""ADRPO-W2 vs fixed-beta W2 vs ORW-CFM-W2 vs no regularization on digits: the reward / diversity / distance
Pareto plot (several seeds, the same compute for every run).

    python experiments/flow_pareto.py --workdir /tmp/flow_pareto [--seeds 0 1 2] [--steps 60] \
        [--fixed-betas 0.1 0.3 1 3 10] [--adrpo-betas 1 3] [--out experiments/flow_pareto.png]

Every run is ``configs/flow_digits.py:cpu`` (composite digit+thickness prompts, classifier log-prob reward, the
cached pre-trained DiT) with only ``rl.method`` / ``rl.beta`` and ``seed`` changed: 10 prompts x 8 samples per
step, one update per step, the same number of steps, the same evaluation (every prompt x 32 samples from fixed
noise). Per run the final evaluation gives the reward, the diversity (mean per-prompt pairwise L2 distance) and
two distances to the pre-trained model: the Frechet distance of classifier features (to its samples from the
same prompts and noise) and the W2 velocity bound. Outputs: ``WORKDIR/<method>_beta<b>/seed<s>/`` (the runs),
``WORKDIR/results.json``, the plot (``--out``; reward vs diversity, vs Frechet distance, vs W2 bound; means
over seeds with +-1 std bars; the fixed-beta runs joined as the baseline frontier) and a markdown table on
stdout. Finished runs are reused. All runs share one process and a persistent XLA compilation cache.
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

METRICS = (("eval/reward_mean", "reward"), ("eval/diversity", "diversity"), ("eval/frechet_distance", "FD"),
           ("eval/w2_bound", "W2 bound"), ("eval/digit_accuracy", "digit acc"),
           ("eval/thickness_accuracy", "thick acc"))


def load_config(variant: str = "cpu"):
    """``get_config(variant)`` of ``configs/flow_digits.py``."""
    import importlib.util  # pylint: disable=import-outside-toplevel

    spec = importlib.util.spec_from_file_location("_flow_digits_config", REPO / "configs" / "flow_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def run_name(method: str, beta: float | None) -> str:
    return method if beta is None else f"{method}_beta{beta:g}"


def run_one(workdir: Path, method: str, beta: float | None, seed: int, steps: int, images: bool) -> list[dict]:
    from adrpo_jax.flow.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train.metrics import read_jsonl  # pylint: disable=import-outside-toplevel

    path = workdir / "metrics.jsonl"
    if path.exists():
        records = read_jsonl(path)
        if any(r.get("step") == steps and "eval/reward_mean" in r for r in records):
            return records
    config = load_config("cpu")
    config.rl.method = method
    if beta is not None:
        config.rl.beta = float(beta)
    config.seed = seed
    config.total_steps = steps
    config.eval_every = steps  # the step-0 and final evaluations only (same compute for every run)
    config.log_every = max(steps // 6, 1)
    config.checkpoint.every_steps = steps
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    config.model.save_final = False
    config.eval.write_images = images
    config.lock()
    train_and_evaluate(config, str(workdir))
    return read_jsonl(path)


def final_eval(records: list[dict], steps: int) -> dict[str, float]:
    rec = [r for r in records if r.get("step") == steps and "eval/reward_mean" in r][-1]
    return {k: float(rec[k]) for k, _ in METRICS if k in rec}


def initial_eval(records: list[dict]) -> dict[str, float]:
    rec = [r for r in records if r.get("step") == 0 and "eval/reward_mean" in r][0]
    return {k: float(rec[k]) for k, _ in METRICS if k in rec}


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    out = {}
    for name, runs in results.items():
        out[name] = {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
                     for k, _ in METRICS}
    return out


def frontier_reward(fixed: list[tuple[float, float]], x: float) -> float:
    """Reward of the fixed-beta frontier at abscissa ``x`` (piecewise-linear through the fixed-beta means,
    sorted by ``x``); NaN outside their range."""
    pts = sorted(fixed)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if not xs or x < xs[0] or x > xs[-1]:
        return float("nan")
    return float(np.interp(x, xs, ys))


def plot(summary, initial, out: Path, fixed_names, title: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    panels = (("eval/diversity", "diversity (mean per-prompt pairwise L2) \u2192 better"),
              ("eval/frechet_distance", "\u2190 Frechet distance to the pre-trained model"),
              ("eval/w2_bound", "\u2190 W2 velocity bound to the pre-trained model"))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    styles = {"adrpo": ("*", "C3", 16), "fixed_beta": ("o", "C0", 8), "orw_cfm_w2": ("s", "C2", 9),
              "none": ("X", "C1", 10)}
    for ax, (xkey, xlabel) in zip(axes, panels):
        pts = [(summary[n][xkey][0], summary[n]["eval/reward_mean"][0]) for n in fixed_names]
        order = np.argsort([p[0] for p in pts])
        ax.plot([pts[i][0] for i in order], [pts[i][1] for i in order], "-", color="C0", alpha=0.5,
                label="fixed-beta frontier")
        for name, s in summary.items():
            method, _, beta = name.partition("_beta")
            if method == "fixed":  # "fixed_beta_beta0.3"
                method, beta = "fixed_beta", name.rpartition("_beta")[2]
            marker, color, size = styles.get(method, ("D", "k", 8))
            ax.errorbar(s[xkey][0], s["eval/reward_mean"][0], xerr=s[xkey][1], yerr=s["eval/reward_mean"][1],
                        fmt=marker, color=color, ms=size, capsize=2, lw=1)
            label = {"adrpo": "ADRPO \u03b2\u2080=", "fixed_beta": "fixed \u03b2="}.get(method, "") + beta if beta \
                else {"orw_cfm_w2": "ORW-CFM-W2", "none": "no reg."}.get(method, name)
            ax.annotate(label, (s[xkey][0], s["eval/reward_mean"][0]), textcoords="offset points", xytext=(5, 4),
                        fontsize=7)
        ax.plot([initial[xkey]], [initial["eval/reward_mean"]], "k^", ms=9, label="pre-trained")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval reward (log p(digit) + log p(thickness)) \u2192")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    handles = [plt.Line2D([], [], ls="", marker=styles[m][0], color=styles[m][1], label=lab)
               for m, lab in (("adrpo", "ADRPO-W2"), ("fixed_beta", "fixed-\u03b2 W2"), ("orw_cfm_w2", "ORW-CFM-W2"),
                              ("none", "no regularization")) if any(n.startswith(m) for n in summary)]
    axes[0].legend(handles=handles + axes[0].get_legend_handles_labels()[0], fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--fixed-betas", type=float, nargs="*", default=[0.1, 0.3, 1.0, 3.0, 10.0])
    parser.add_argument("--adrpo-betas", type=float, nargs="*", default=[1.0, 3.0])
    parser.add_argument("--no-orw", action="store_true")
    parser.add_argument("--no-none", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "flow_pareto.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", str(args.workdir / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    runs: list[tuple[str, float | None]] = [("adrpo", b) for b in args.adrpo_betas]
    runs += [("fixed_beta", b) for b in args.fixed_betas]
    if not args.no_orw:
        runs.append(("orw_cfm_w2", None))
    if not args.no_none:
        runs.append(("none", None))
    results: dict[str, list[dict[str, float]]] = {}
    initial = None
    t0 = time.time()
    for seed in args.seeds:  # seed-major: a partial sweep still covers every method
        for method, beta in runs:
            name = run_name(method, beta)
            start = time.time()
            records = run_one(args.workdir / name / f"seed{seed}", method, beta, seed, args.steps,
                              images=seed == args.seeds[0])
            results.setdefault(name, []).append(final_eval(records, args.steps))
            initial = initial or initial_eval(records)
            print(f"[{time.time() - t0:7.0f}s] {name} seed {seed}: "
                  + ", ".join(f"{label} {results[name][-1].get(k, float('nan')):.4g}" for k, label in METRICS)
                  + f" ({time.time() - start:.0f}s)", flush=True)

    summary = summarize(results)
    fixed_names = [run_name("fixed_beta", b) for b in args.fixed_betas]
    (args.workdir / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "initial": initial, "runs": results,
         "summary": summary, "wall_time_s": time.time() - t0}, indent=2))
    plot(summary, initial, args.out, fixed_names,
         f"ADRPO-W2 vs fixed-beta W2{'' if args.no_orw else ' / ORW-CFM-W2'}"
         f"{'' if args.no_none else ' / no regularization'}; digits, composite prompts; {args.steps} RL "
         f"steps x 80 images; mean +- std over seeds {args.seeds}")

    header = "| run | " + " | ".join(label for _, label in METRICS) + " | frontier reward at same diversity | " \
             "frontier reward at same W2 |"
    print(header)
    print("|" + "---|" * (len(METRICS) + 3))
    print("| pre-trained (step 0) | " + " | ".join(f"{initial.get(k, float('nan')):.3f}" for k, _ in METRICS)
          + " | | |")
    fixed_div = [(summary[n]["eval/diversity"][0], summary[n]["eval/reward_mean"][0]) for n in fixed_names]
    fixed_w2 = [(summary[n]["eval/w2_bound"][0], summary[n]["eval/reward_mean"][0]) for n in fixed_names]
    for name, s in summary.items():
        cells = " | ".join(f"{s[k][0]:.3f} \u00b1 {s[k][1]:.3f}" for k, _ in METRICS)
        fd = frontier_reward(fixed_div, s["eval/diversity"][0])
        fw = frontier_reward(fixed_w2, s["eval/w2_bound"][0])
        print(f"| {name} | {cells} | {fd:.3f} | {fw:.3f} |")
    print(f"plot: {args.out}; total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
