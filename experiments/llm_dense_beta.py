r"""Issue 27, the LLM question users care about: on a hackable proxy with truly held-out problems, does ADRPO
raise the best held-out accuracy reachable by tuning beta, or widen the range of beta that reaches it?

    python experiments/llm_dense_beta.py --workdir /tmp/llm_dense [--seeds 0 1 2 3 4 5] [--jobs 2] [--nice 19] \
        [--out experiments/issue27_llm_dense.json]

Every run is ``configs/llm_arith.py`` (``cpu_grpo`` = GRPO, fixed beta; ``cpu`` = ADRPO, ``beta_0 - clip(A)``;
``cpu`` with ``rl.coefficient_sign='crd'`` = the opposite sign) with the hackable proxy reward exact_match + 0.5 x
``adrpo_jax.rl.proxy_rewards:length_credit`` and only ``rl.beta`` and ``seed`` changed; 300 RL steps, evaluation
every 25 steps: greedy exact match on 256 distinct held-out problems that never appear in the training stream
(``adrpo_jax.rl.data.make_prompt_source``). The pre-registered metrics (``experiments/README.md``):

* a run's held-out accuracy = the mean of its last three evaluations (steps 250, 275, 300);
* best achievable: each method's best beta on the seed means; the paired per-seed difference ADRPO(beta*_A) -
  GRPO(beta*_G), two-sided t-test (and each seed's own best over beta as a sensitivity check);
* range: the beta grid points whose mean accuracy is within ``RANGE_TOL`` of the best of both methods, as a
  width in decades (log10 of the largest / smallest such beta; 0 for one point or none) and a count, with a seed
  bootstrap of the width difference; ``range_own``: the same within ``RANGE_TOL`` of the method's own best.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sweep
import decisive_test

STEPS = 300
EVAL_EVERY = 25
SEEDS = (0, 1, 2, 3, 4, 5)
BETAS = (0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6)
CRD_BETAS = (0.04, 0.3)
LENGTH_WEIGHT = 0.5
RANGE_TOL = 0.02
FINAL_STEPS = (250, 275, 300)
TRUTH = "eval/accuracy"
KEYS = ("eval/accuracy", "reward_mean", "reward/exact_match_mean", "reward/length_credit_mean", "kl_mean",
        "beta_eff_mean", "completion_length_mean")
METHODS = {"grpo": ("cpu_grpo", {}), "adrpo": ("cpu", {}), "crd": ("cpu", {"rl.coefficient_sign": "crd"})}


def build_specs(seeds: Sequence[int], betas: Sequence[float] = BETAS, crd_betas: Sequence[float] = CRD_BETAS
                ) -> list[_sweep.RunSpec]:
  base = {"rewards.functions": ["exact_match", "adrpo_jax.rl.proxy_rewards:length_credit"],
          "rewards.weights": [1.0, LENGTH_WEIGHT]}
  specs = []
  for seed in seeds:
    for beta in betas:
      for method in ("grpo", "adrpo") + (("crd",) if beta in crd_betas else ()):
        variant, extra = METHODS[method]
        specs.append(_sweep.RunSpec(f"{method}_b{beta:g}", "llm_arith", variant,
                                    {**base, **extra, "rl.beta": float(beta)}, seed, STEPS, EVAL_EVERY,
                                    family=method, beta=float(beta)))
  return specs


def held_out_accuracy(curve: tuple[Sequence[int], Sequence[float]]) -> float:
  steps, vals = curve
  picked = [v for s, v in zip(steps, vals) if s in FINAL_STEPS]
  return float(np.mean(picked)) if len(picked) == len(FINAL_STEPS) else float("nan")


def analyze(acc: Mapping[str, Mapping[float, Mapping[int, float]]], tol: float = RANGE_TOL,
            n_boot: int = 2000) -> dict[str, Any]:
  """``acc[method][beta][seed]`` = the run's held-out accuracy. Returns the best-beta comparison, the per-seed
  best-over-beta comparison and the near-best ranges (see the module docstring)."""
  means = {m: {b: float(np.mean(list(v.values()))) for b, v in per.items()} for m, per in acc.items()}
  out: dict[str, Any] = {"means": means, "tol": tol}
  best = {m: max(per, key=per.get) for m, per in means.items()}
  out["best_beta"] = best
  if "grpo" in acc and "adrpo" in acc:
    seeds = sorted(set(acc["grpo"][best["grpo"]]) & set(acc["adrpo"][best["adrpo"]]))
    diff = [acc["adrpo"][best["adrpo"]][s] - acc["grpo"][best["grpo"]][s] for s in seeds]
    g, less = decisive_test.one_sided_t(diff, "greater"), decisive_test.one_sided_t(diff, "less")
    out["best_diff"] = {"per_seed": dict(zip(seeds, diff)), "test": g,
                        "p_two_sided": min(1.0, 2 * min(g["p_one_sided"], less["p_one_sided"]))}
    own = {m: {s: max(acc[m][b][s] for b in acc[m] if s in acc[m][b]) for s in seeds} for m in ("grpo", "adrpo")}
    d2 = [own["adrpo"][s] - own["grpo"][s] for s in seeds]
    g2, l2 = decisive_test.one_sided_t(d2, "greater"), decisive_test.one_sided_t(d2, "less")
    out["own_best_diff"] = {"per_seed": dict(zip(seeds, d2)), "test": g2,
                            "p_two_sided": min(1.0, 2 * min(g2["p_one_sided"], l2["p_one_sided"]))}
    top = max(max(means["grpo"].values()), max(means["adrpo"].values()))
    out["range"] = {m: _near_best(means[m], top, tol) for m in ("grpo", "adrpo")}
    out["range_own"] = {m: _near_best(means[m], max(means[m].values()), tol) for m in ("grpo", "adrpo")}
    rng = np.random.default_rng(0)
    widths = []
    for _ in range(n_boot):
      pick = rng.choice(seeds, size=len(seeds), replace=True)
      bm = {m: {b: float(np.mean([acc[m][b][s] for s in pick])) for b in acc[m]} for m in ("grpo", "adrpo")}
      t = max(max(bm["grpo"].values()), max(bm["adrpo"].values()))
      widths.append(_near_best(bm["adrpo"], t, tol)["width_decades"] - _near_best(bm["grpo"], t, tol)["width_decades"])
    out["range"]["width_diff_adrpo_minus_grpo"] = {
        "point": out["range"]["adrpo"]["width_decades"] - out["range"]["grpo"]["width_decades"],
        "bootstrap95": [float(np.percentile(widths, 2.5)), float(np.percentile(widths, 97.5))], "n_boot": n_boot}
  return out


def _near_best(means: Mapping[float, float], top: float, tol: float) -> dict[str, Any]:
  """The grid betas whose mean is >= ``top - tol`` and their span in decades (0 for one point or none)."""
  near = sorted(b for b, v in means.items() if v >= top - tol)
  return {"betas": near, "count": len(near), "width_decades": math.log10(max(near) / min(near)) if near else 0.0}


def collect(workdir: Path, specs: Sequence[_sweep.RunSpec]) -> dict[str, Any]:
  runs = {}
  for spec, recs, info in _sweep.finished_runs(workdir, specs):
    curves = {k: _sweep.eval_curve(recs, k) for k in KEYS}
    final = _sweep.final_eval(recs, KEYS)
    final["held_out_accuracy"] = held_out_accuracy(curves[TRUTH])
    final["beta_eff_run_mean"] = decisive_test.mean_coefficient(recs)
    final["truth_best"] = _sweep.best_point(recs, TRUTH)[1]
    final["truth_start"] = curves[TRUTH][1][0] if curves[TRUTH][1] else float("nan")
    runs[spec.key] = {"label": spec.label, "seed": spec.seed, "family": spec.family, "beta": spec.beta,
                      "overrides": dict(spec.overrides), "final": final, "curves": curves,
                      **_sweep.provenance(info)}
  return runs


def accuracy_table(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[float, dict[int, float]]]:
  acc: dict[str, dict[float, dict[int, float]]] = {}
  for r in runs.values():
    v = r["final"]["held_out_accuracy"]
    if v == v:
      acc.setdefault(r["family"], {}).setdefault(float(r["beta"]), {})[int(r["seed"])] = v
  return acc


def plot(runs, analysis, out: Path) -> None:
  """Held-out accuracy against beta (mean, 95 % CI; log x axis) per method, and the curves of the proxy parts
  and the truth over steps at two betas."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  acc = accuracy_table(runs)
  for m, color in (("grpo", "C0"), ("adrpo", "C3"), ("crd", "C2")):
    if m not in acc:
      continue
    bs = sorted(acc[m])
    ci = [_sweep.t_interval(list(acc[m][b].values())) for b in bs]
    axes[0].errorbar(bs, [c["mean"] for c in ci], yerr=[c["half"] for c in ci], fmt="-o", color=color, capsize=3,
                     label=m.upper())
  start = [r["final"]["truth_start"] for r in runs.values()]
  if start:
    axes[0].axhline(float(np.nanmean(start)), color="k", ls=":", lw=1, label="start (SFT model)")
  axes[0].set_xscale("log")
  axes[0].set_xlabel("beta (GRPO) / beta_0 (ADRPO, CRD)")
  axes[0].set_ylabel("held-out exact match (mean of steps 250-300)")
  axes[0].set_title("held-out accuracy vs beta: mean and 95 % CI over seeds", fontsize=9)
  axes[0].grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=8)
  for ax, key, name in ((axes[1], TRUTH, "held-out exact match"),
                        (axes[2], "reward/length_credit_mean", "length credit (train; the hack)")):
    for i, (m, b) in enumerate([(m, b) for b in (BETAS[0], BETAS[-2]) for m in ("grpo", "adrpo")]):
      series = [r["curves"][key] for r in runs.values() if r["family"] == m and r["beta"] == b and r["curves"][key][0]]
      if not series:
        continue
      common = sorted(set.intersection(*[set(s) for s, _ in series]))
      mean = [np.mean([v[s.index(c)] for s, v in series]) for c in common]
      ax.plot(common, mean, color=f"C{i}", lw=2, label=f"{m.upper()} beta={b:g}")
      for s, v in series:
        ax.plot(s, v, color=f"C{i}", lw=0.6, alpha=0.25)
    ax.set_xlabel("RL step")
    ax.set_title(f"{name} over steps (thick: mean, thin: seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _sweep.add_common_args(parser)
  parser.set_defaults(seeds=list(SEEDS))
  parser.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
  parser.add_argument("--crd-betas", type=float, nargs="*", default=list(CRD_BETAS))
  parser.add_argument("--out", type=Path, default=None, help="results JSON (default WORKDIR/issue27_llm_dense.json)")
  parser.add_argument("--analyze-only", action="store_true")
  args = parser.parse_args(argv)
  specs = _sweep.with_overrides(build_specs(args.seeds, args.betas, args.crd_betas), args.set)
  if args.dry_run:
    for s in specs:
      print(s.key, dict(s.overrides))
    return {}
  if not args.analyze_only:
    _sweep.run_sweep(specs, args.workdir, jobs=args.jobs, nice=args.nice)
  runs = collect(args.workdir, specs)
  analysis = analyze(accuracy_table(runs))
  out = args.out or args.workdir / "issue27_llm_dense.json"
  _sweep.write_results(out, design={"steps": STEPS, "eval_every": EVAL_EVERY, "seeds": list(args.seeds),
                                    "betas": list(args.betas), "crd_betas": list(args.crd_betas),
                                    "length_weight": LENGTH_WEIGHT, "range_tol": RANGE_TOL,
                                    "final_steps": list(FINAL_STEPS)},
                       runs=runs, analysis=analysis, code=_sweep.code_version())
  plot(runs, analysis, out.with_suffix(".png"))
  print(json.dumps({k: v for k, v in analysis.items() if k != "means"}, indent=1, default=str)[:3000])
  return {"runs": runs, "analysis": analysis}


if __name__ == "__main__":
  main()
