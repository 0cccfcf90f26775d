r"""Issue 27: does adaptive beta beat a matched fixed beta? The pre-registered decisive test on flow digits.

    python experiments/decisive_test.py --workdir /tmp/decisive [--seeds 0 1 2 3 4 5] [--blocks 1 0.3] \
        [--jobs 1] [--nice 19] [--out experiments/issue27_decisive.json]

The design, metric and decision rule are fixed in ``experiments/README.md`` ("Pre-registration", committed before
any run of this grid). Every run is ``configs/flow_digits.py:cpu`` (ADRPO-W2 setup, 300 RL steps, evaluations at
steps 0 / 100 / 200 / 300 on the fixed eval noise) with only ``rl.method``, ``rl.beta``, ``rl.coefficient_sign`` and
``seed`` changed. Per block beta_0 (``BLOCKS``):

* ``adrpo_b<beta_0>``: ADRPO, ``beta_i = beta_0 - clip(A_i)``;
* ``crd_b<beta_0>``: the opposite sign, ``beta_i = beta_0 + clip(A_i)`` (the sign arm);
* ``fixed_b<beta>`` for the block's dense fixed-beta grid (one point = ADRPO's mean coefficient in a pilot);

plus ``none`` (no regularization; 3 seeds, a drift reference outside the test). Evaluations carry the
independent judge (``eval/gold/judge_*``, :mod:`adrpo_jax.flow.judge`).

The metric: per seed, the reward gap of an adaptive arm to that seed's own fixed-beta frontier at the arm's
diversity (primary) and at its judge Frechet distance to the pre-trained samples (secondary). The frontier of a
seed is the least-squares quadratic through the seed's fixed-beta points (reward against x); the piecewise-
linear upper envelope of the same points is the sensitivity analysis. The test: one-sided paired t-test of the
per-seed gaps (:func:`analyze`). Outputs: ``--out`` (JSON: per-run per-seed values, curves, configs, commits,
the gaps and tests), a plot ``<out>.png`` and markdown tables on stdout.
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

STEPS = 300
EVAL_EVERY = 100
SEEDS = (0, 1, 2, 3, 4, 5)
NONE_SEEDS = (0, 1, 2)
# beta_0 -> the dense fixed-beta grid of that block (pre-registered; see the README's pre-registration).
BLOCKS: dict[float, tuple[float, ...]] = {
    1.0: (0.5, 0.65, 0.8, 0.88, 0.92, 1.0, 1.3),
    0.3: (0.15, 0.2, 0.25, 0.28, 0.3, 0.4),
}
ORW_TAUS = (0.5, 2.0, 5.0, 10.0)  # ORW-CFM-W2 in its own regime: a tau grid, alpha 1, 300 steps (descriptive)
ORW_SEEDS = (0, 1, 2)
REWARD = "eval/reward_mean"
PLANES = {  # x key, x larger is better
    "diversity": ("eval/diversity", True),
    "judge_fd": ("eval/gold/judge_fd_pretrained", False),
}
KEYS = ("eval/reward_mean", "eval/diversity", "eval/frechet_distance", "eval/frechet_distance_data", "eval/w2_bound",
        "eval/digit_accuracy", "eval/thickness_accuracy", "eval/gold/judge_reward", "eval/gold/judge_digit_accuracy",
        "eval/gold/judge_thickness_accuracy", "eval/gold/judge_fd_data", "eval/gold/judge_fd_pretrained")
TRAIN_KEYS = ("beta_eff_mean", "beta_eff_min", "beta_eff_max", "adv_clip_fraction", "reward_mean")
ALPHA = 0.05
MARGIN = 0.02  # equivalence margin of the reward gap (pre-registered)


def label(kind: str, beta: float) -> str:
  return f"{kind}_b{beta:g}"


def build_specs(seeds: Sequence[int], blocks: Sequence[float], none: bool = True,
                orw: bool = False) -> list[_sweep.RunSpec]:
  """The grid: seed-major, so that a partial sweep covers every arm of the first seeds. ``orw``: only the
  ORW-CFM-W2 tau grid (``configs/flow_digits.py:cpu_orw``: alpha 1, sampler refreshed every 10 steps) for
  ``ORW_SEEDS``; it is compared with the beta_0 = 1 block's fixed-beta frontier."""
  if orw:
    return [_sweep.RunSpec(f"orw_tau{tau:g}", "flow_digits", "cpu_orw", {"rl.tau": tau}, seed, STEPS, EVAL_EVERY,
                           family="orw_cfm_w2", beta=tau)
            for seed in seeds if seed in ORW_SEEDS for tau in ORW_TAUS]
  specs = []
  for seed in seeds:
    for b0 in blocks:
      arms = [("adrpo", b0, {"rl.method": "adrpo", "rl.beta": b0}),
              ("crd", b0, {"rl.method": "adrpo", "rl.beta": b0, "rl.coefficient_sign": "crd"})]
      arms += [("fixed", b, {"rl.method": "fixed_beta", "rl.beta": b}) for b in BLOCKS[b0]]
      for kind, beta, over in arms:
        specs.append(_sweep.RunSpec(label(kind, beta), "flow_digits", "cpu", over, seed, STEPS, EVAL_EVERY,
                                    family=kind, beta=beta))
    if none and seed in NONE_SEEDS:
      specs.append(_sweep.RunSpec("none", "flow_digits", "cpu", {"rl.method": "none"}, seed, STEPS, EVAL_EVERY,
                                  family="none"))
  return specs


# -- analysis (pure: per-seed numbers in, gaps and tests out) ------------------------------------------------


def quadratic_frontier(xs: Sequence[float], ys: Sequence[float]):
  """The least-squares quadratic ``y(x)`` through the points (x standardized for conditioning)."""
  x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  mu, sd = x.mean(), x.std() or 1.0
  coef = np.polyfit((x - mu) / sd, y, 2)
  return lambda q: float(np.polyval(coef, (q - mu) / sd))


def envelope_frontier(xs: Sequence[float], ys: Sequence[float], x_larger_better: bool):
  """The piecewise-linear upper envelope: the non-dominated points joined by lines, linearly extrapolated from
  the two end points outside their x-range."""
  front = _sweep.pareto_front(list(zip(xs, ys)), x_larger_better)
  if len(front) == 1:
    return lambda q: front[0][1]
  fx = np.asarray([p[0] for p in front])
  fy = np.asarray([p[1] for p in front])

  def f(q):
    if q <= fx[0]:
      i = 0
    elif q >= fx[-1]:
      i = len(fx) - 2
    else:
      i = int(np.searchsorted(fx, q)) - 1
    return float(fy[i] + (fy[i + 1] - fy[i]) * (q - fx[i]) / (fx[i + 1] - fx[i]))
  return f


def one_sided_t(d: Sequence[float], alternative: str = "greater") -> dict[str, Any]:
  """Paired one-sided t-test of the mean of ``d`` against 0 (``greater`` or ``less``), with the 95 % two-sided
  t interval and the 90 % interval used for equivalence (TOST at alpha 0.05)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel

  d = np.asarray(d, np.float64)
  n = d.size
  mean, sd = float(d.mean()), float(d.std(ddof=1))
  se = sd / math.sqrt(n)
  t = mean / se if se > 0 else math.copysign(math.inf, mean)
  p = float(stats.t.sf(t, n - 1)) if alternative == "greater" else float(stats.t.cdf(t, n - 1))
  ci95 = _sweep.t_interval(d, 0.95)
  ci90 = _sweep.t_interval(d, 0.90)
  return {"n": int(n), "mean": mean, "sd": sd, "t": float(t), "df": int(n - 1), "p_one_sided": p,
          "alternative": alternative, "ci95": [ci95["lo"], ci95["hi"]], "ci90": [ci90["lo"], ci90["hi"]],
          "same_sign": int(np.sum(np.sign(d) == np.sign(mean)))}


def decide(test_greater: Mapping[str, Any], test_less: Mapping[str, Any], alpha: float = ALPHA,
           margin: float = MARGIN) -> str:
  """The pre-registered decision: ``beyond`` (one-sided p < alpha for gap > 0), ``below`` (for gap < 0),
  ``equivalent`` (the 90 % interval inside +-margin), else ``inconclusive``."""
  if test_greater["p_one_sided"] < alpha:
    return "beyond"
  if test_less["p_one_sided"] < alpha:
    return "below"
  lo, hi = test_greater["ci90"]
  if -margin < lo and hi < margin:
    return "equivalent"
  return "inconclusive"


def holm(pvalues: Mapping[str, float], alpha: float = ALPHA) -> dict[str, bool]:
  """Holm-Bonferroni: which hypotheses are rejected at family-wise ``alpha``."""
  order = sorted(pvalues, key=pvalues.get)
  out, m = {}, len(order)
  still = True
  for i, k in enumerate(order):
    still = still and pvalues[k] < alpha / (m - i)
    out[k] = still
  return out


def gaps(per_seed: Mapping[str, Mapping[int, Mapping[str, float]]], arm: str, fixed_labels: Sequence[str],
         x_key: str, x_larger_better: bool, y_key: str = REWARD) -> dict[str, Any]:
  """Per-seed reward gap of ``arm`` to the seed's fixed-beta frontier at the arm's ``x``.

  ``per_seed[label][seed]`` = that run's final metrics. Returns ``{"quadratic": {seed: gap}, "envelope": {seed:
  gap}, "x": {seed: x of the arm}, "outside": [seeds where x lies outside the fixed points' x-range]}``.
  """
  out: dict[str, Any] = {"quadratic": {}, "envelope": {}, "x": {}, "outside": []}
  for seed, m in sorted(per_seed.get(arm, {}).items()):
    pts = [(per_seed[f][seed][x_key], per_seed[f][seed][y_key]) for f in fixed_labels
           if seed in per_seed.get(f, {}) and x_key in per_seed[f][seed] and y_key in per_seed[f][seed]]
    if len(pts) < 3 or x_key not in m or y_key not in m:
      continue
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x, y = m[x_key], m[y_key]
    out["quadratic"][seed] = y - quadratic_frontier(xs, ys)(x)
    out["envelope"][seed] = y - envelope_frontier(xs, ys, x_larger_better)(x)
    out["x"][seed] = x
    if not min(xs) <= x <= max(xs):
      out["outside"].append(seed)
  return out


def analyze(per_seed: Mapping[str, Mapping[int, Mapping[str, float]]], blocks: Sequence[float] = tuple(BLOCKS),
            y_key: str = REWARD) -> dict[str, Any]:
  """Gaps and tests of every adaptive arm of every block in both planes (see the README's pre-registration):
  ``{"<arm>|<plane>": {"gaps": ..., "test": ..., "test_less": ..., "decision": ..., "envelope_test": ...}}``,
  ``"crd_minus_adrpo|<block>|<plane>"`` (two-sided paired test of the gap difference) and ``"holm"``."""
  out: dict[str, Any] = {}
  secondary_p: dict[str, float] = {}
  for b0 in blocks:
    fixed = [label("fixed", b) for b in BLOCKS[b0]]
    for kind in ("adrpo", "crd"):
      arm = label(kind, b0)
      for plane, (x_key, larger) in PLANES.items():
        g = gaps(per_seed, arm, fixed, x_key, larger, y_key)
        if len(g["quadratic"]) < 2:
          continue
        d = list(g["quadratic"].values())
        greater, less = one_sided_t(d, "greater"), one_sided_t(d, "less")
        key = f"{arm}|{plane}"
        out[key] = {"gaps": g, "test": greater, "test_less": less, "decision": decide(greater, less),
                    "envelope_test": one_sided_t(list(g["envelope"].values()), "greater"),
                    "primary": b0 == 1.0 and kind == "adrpo" and plane == "diversity"}
        if not out[key]["primary"]:
          secondary_p[key] = min(greater["p_one_sided"], less["p_one_sided"]) * 2  # two-sided for the family
    for plane in PLANES:
      a, c = out.get(f"{label('adrpo', b0)}|{plane}"), out.get(f"{label('crd', b0)}|{plane}")
      if a and c:
        seeds = sorted(set(a["gaps"]["quadratic"]) & set(c["gaps"]["quadratic"]))
        diff = [c["gaps"]["quadratic"][s] - a["gaps"]["quadratic"][s] for s in seeds]
        greater, less = one_sided_t(diff, "greater"), one_sided_t(diff, "less")
        key = f"crd_minus_adrpo|{label('', b0)[1:]}|{plane}"
        out[key] = {"diff": dict(zip(seeds, diff)), "test": greater,
                    "p_two_sided": min(1.0, 2 * min(greater["p_one_sided"], less["p_one_sided"]))}
        secondary_p[key] = out[key]["p_two_sided"]
  out["holm"] = {"alpha": ALPHA, "pvalues": secondary_p, "rejected": holm(secondary_p)}
  fixed1 = [label("fixed", b) for b in BLOCKS[1.0]]
  for tau in ORW_TAUS:  # descriptive: ORW-CFM-W2 against the beta_0 = 1 block's fixed-beta frontier
    arm = f"orw_tau{tau:g}"
    if arm in per_seed:
      g = gaps(per_seed, arm, fixed1, *PLANES["diversity"], y_key)
      if g["quadratic"]:
        out[f"{arm}|diversity"] = {"gaps": g, "summary": _sweep.t_interval(list(g["quadratic"].values()))}
  return out


def mean_coefficient(records: Sequence[Mapping[str, Any]]) -> float:
  """The run's mean adaptive coefficient: the mean of the logged ``beta_eff_mean`` (every log interval)."""
  _, vals = _sweep.eval_curve(records, "beta_eff_mean")
  return float(np.mean(vals)) if vals else float("nan")


def collect(workdir: Path, specs: Sequence[_sweep.RunSpec]) -> dict[str, Any]:
  """Per run: final metrics (step ``STEPS``), curves, the mean coefficient, its spec, config and commit."""
  runs = {}
  for spec, recs, info in _sweep.finished_runs(workdir, specs):
    final = _sweep.final_eval(recs, KEYS, STEPS)
    final["beta_eff_run_mean"] = mean_coefficient(recs)
    runs[spec.key] = {
        "label": spec.label, "seed": spec.seed, "family": spec.family, "beta": spec.beta,
        "overrides": dict(spec.overrides), "final": final,
        "curves": {k: _sweep.eval_curve(recs, k) for k in KEYS + TRAIN_KEYS},
        **_sweep.provenance(info),
    }
  return runs


def per_seed_table(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
  out: dict[str, dict[int, dict[str, float]]] = {}
  for r in runs.values():
    out.setdefault(r["label"], {})[int(r["seed"])] = r["final"]
  return out


def plot(per_seed, analysis, out: Path) -> None:
  """Reward vs diversity and vs judge FD per block: fixed-beta means (line) with 95 % CI bars, the adaptive arms
  (stars: ADRPO, squares: CRD); a second row with each seed's gap (the test's data)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  blocks = [b for b in BLOCKS if any(label("adrpo", b) in per_seed for _ in [0])]
  fig, axes = plt.subplots(2, 2 * len(blocks), figsize=(5.2 * 2 * len(blocks), 8.5), squeeze=False)
  for j, b0 in enumerate(blocks):
    for k, (plane, (x_key, larger)) in enumerate(PLANES.items()):
      ax = axes[0][2 * j + k]
      fx, fy = [], []
      for i, b in enumerate(BLOCKS[b0]):
        vals = per_seed.get(label("fixed", b), {})
        xs = [m[x_key] for m in vals.values() if x_key in m]
        ys = [m[REWARD] for m in vals.values() if REWARD in m]
        if len(xs) < 2:
          continue
        cx, cy = _sweep.t_interval(xs), _sweep.t_interval(ys)
        ax.errorbar(cx["mean"], cy["mean"], xerr=cx["half"], yerr=cy["half"], fmt="o", color="C0", ms=5, capsize=2,
                    elinewidth=0.8, alpha=0.7)
        ax.annotate(f"{b:g}", (cx["mean"], cy["mean"]), textcoords="offset points",  # staggered: no overlap
                    xytext=[(6, -12), (6, 5), (-24, 5)][i % 3], fontsize=8, color="C0")
        fx.append(cx["mean"])
        fy.append(cy["mean"])
      if fx:
        order = np.argsort(fx)
        ax.plot(np.asarray(fx)[order], np.asarray(fy)[order], "-", color="C0", alpha=0.5, label="fixed beta (mean)")
      for kind, (marker, color) in {"adrpo": ("*", "C3"), "crd": ("s", "C2")}.items():
        vals = per_seed.get(label(kind, b0), {})
        xs = [m[x_key] for m in vals.values() if x_key in m]
        ys = [m[REWARD] for m in vals.values() if REWARD in m]
        if len(xs) < 2:
          continue
        cx, cy = _sweep.t_interval(xs), _sweep.t_interval(ys)
        ax.errorbar(cx["mean"], cy["mean"], xerr=cx["half"], yerr=cy["half"], fmt=marker, color=color,
                    ms=12 if marker == "*" else 8, capsize=2, label=f"{kind.upper()} beta_0={b0:g}")
      ax.set_xlabel(x_key.split("/")[-1] + (" (larger: more diverse)" if larger else " (smaller: closer)"))
      ax.set_ylabel("eval reward")
      ax.set_title(f"block beta_0 = {b0:g}: reward vs {plane}\n(mean and 95 % CI over seeds; labels: fixed beta)",
                   fontsize=9)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
      ax2 = axes[1][2 * j + k]
      for i, kind in enumerate(("adrpo", "crd")):
        a = analysis.get(f"{label(kind, b0)}|{plane}")
        if not a:
          continue
        g = a["gaps"]["quadratic"]
        ax2.plot([i] * len(g), list(g.values()), "o", color="C3" if kind == "adrpo" else "C2", alpha=0.7)
        lo, hi = a["test"]["ci95"]
        ax2.errorbar(i + 0.15, a["test"]["mean"], yerr=[[a["test"]["mean"] - lo], [hi - a["test"]["mean"]]],
                     fmt="D", color="k", capsize=3)
      pair = [analysis.get(f"{label(kind, b0)}|{plane}") for kind in ("adrpo", "crd")]
      if all(pair):
        ga, gc = pair[0]["gaps"]["quadratic"], pair[1]["gaps"]["quadratic"]
        for s in set(ga) & set(gc):
          ax2.plot([0, 1], [ga[s], gc[s]], "-", color="gray", lw=0.6, alpha=0.5)
      ax2.axhline(0, color="k", lw=0.8)
      for m in (-MARGIN, MARGIN):
        ax2.axhline(m, color="gray", lw=0.6, ls="--")
      ax2.set_xticks([0, 1], ["ADRPO", "CRD sign"])
      ax2.set_xlim(-0.5, 1.5)
      ax2.set_ylabel(f"reward gap at matched {plane}")
      ax2.set_title("the test's data: gap to each seed's own fixed-beta frontier\ndots: seeds (lines pair a seed); "
                    f"diamond: mean, 95 % CI; dashed: +-{MARGIN:g}", fontsize=8)
      ax2.grid(alpha=0.3)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)


def judge_info() -> dict[str, Any]:
  """The judge's and the reward classifier's accuracies on real digits (each on the split it never saw), from the
  cached models of ``configs/flow_digits.py:cpu``."""
  from adrpo_jax.flow import pretrain  # pylint: disable=import-outside-toplevel
  from adrpo_jax.flow.judge import JUDGE_DEFAULTS, train_judge  # pylint: disable=import-outside-toplevel

  config = _sweep.build_config(_sweep.RunSpec("x", "flow_digits", "cpu", {}, 0, 1, 1).to_json())
  _, judge = train_judge({"data": config.data}, log_fn=None)
  pre = pretrain.default_config()
  for section in ("data", "classifier"):
    for k in pre[section]:
      if k in config[section]:
        pre[section][k] = config[section][k]
  _, clf = pretrain.train_classifier(pre, log_fn=None)
  keep = ("test_digit_accuracy", "test_thickness_accuracy", "train_digit_accuracy", "train_thickness_accuracy",
          "num_params", "num_train_images", "num_test_images")
  return {"judge": {k: judge[k] for k in keep if k in judge}, "judge_settings": dict(JUDGE_DEFAULTS),
          "reward_classifier": {k: clf[k] for k in keep if k in clf}, "code": _sweep.code_version()}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _sweep.add_common_args(parser)
  parser.set_defaults(seeds=list(SEEDS), jobs=1)
  parser.add_argument("--blocks", type=float, nargs="+", default=list(BLOCKS))
  parser.add_argument("--no-none", action="store_true")
  parser.add_argument("--orw", action="store_true", help="run the ORW-CFM-W2 tau grid (ORW_SEEDS) instead")
  parser.add_argument("--out", type=Path, default=None, help="results JSON (default WORKDIR/issue27_decisive.json)")
  parser.add_argument("--analyze-only", action="store_true", help="no new runs: analyze the finished ones")
  parser.add_argument("--no-tests", action="store_true",
                      help="write the runs only, no gaps, tests or plot (a partial grid with fewer seeds than the "
                           "registered 6: descriptive)")
  parser.add_argument("--judge-info", type=Path, default=None, metavar="JSON",
                      help="only write the judge's and the reward classifier's accuracies to JSON")
  args = parser.parse_args(argv)
  if args.judge_info is not None:
    info = judge_info()
    _sweep.write_results(args.judge_info, **info)
    print(json.dumps(info, indent=1, default=str))
    return info
  specs = build_specs(args.seeds, args.blocks, none=not args.no_none)
  if args.orw or args.analyze_only:  # the analysis reads every arm present in WORKDIR
    specs += build_specs(args.seeds, args.blocks, orw=True)
  specs = _sweep.with_overrides(specs, args.set)
  if args.dry_run:
    for s in specs:
      print(s.key, dict(s.overrides))
    return {}
  if not args.analyze_only:
    todo = build_specs(args.seeds, args.blocks, orw=True) if args.orw else specs
    _sweep.run_sweep(_sweep.with_overrides(todo, args.set), args.workdir, jobs=args.jobs, nice=args.nice)
  runs = collect(args.workdir, specs)
  per_seed = per_seed_table(runs)
  analysis = {} if args.no_tests else analyze(per_seed, args.blocks)
  out = args.out or args.workdir / "issue27_decisive.json"
  _sweep.write_results(out, design={"steps": STEPS, "eval_every": EVAL_EVERY, "seeds": list(args.seeds),
                                    "blocks": {str(b): list(BLOCKS[b]) for b in args.blocks}, "alpha": ALPHA,
                                    "margin": MARGIN, "planes": {k: list(v) for k, v in PLANES.items()},
                                    "reward": REWARD, "tests": not args.no_tests},
                       runs=runs, analysis=analysis, code=_sweep.code_version())
  if not args.no_tests:
    plot(per_seed, analysis, out.with_suffix(".png"))
  for key, a in analysis.items():
    if "decision" in a:
      t = a["test"]
      print(f"{key}: gap {t['mean']:+.4f} (95% CI {t['ci95'][0]:+.4f} .. {t['ci95'][1]:+.4f}), t={t['t']:.2f}, "
            f"p(one-sided, >0)={t['p_one_sided']:.3f} -> {a['decision']}")
  return {"runs": runs, "analysis": analysis}


if __name__ == "__main__":
  main()
