r"""Issue 26: what bounded staleness costs -- the training reward and the held-out accuracy of GRPO/ADRPO on the
built-in arithmetic task with ``rl.max_lag`` = 0 (the synchronous loop), 1 and 2, three seeds.

    python experiments/lag_staleness.py --workdir /tmp/lag [--seeds 0 1 2] [--lags 0 1 2] [--steps 300] \
        [--jobs 2] [--nice 5] [--out experiments/issue26_lag_staleness.json]
    python experiments/lag_staleness.py --report [--out experiments/issue26_lag_staleness.json]   # tables only

Every run is ``configs/llm_arith.py:cpu`` (ADRPO, beta_0 = 0.04, the cached ``builtin:tiny_arith`` model, 1-2
digit additions, 16 prompts x 8 completions per step, one update per rollout) with only ``rl.max_lag`` and
``seed`` changed. With k >= 1 the rollout of step t is sampled by the parameters of step t - k (after the first k
steps; ``adrpo_jax.recipe.schedule``) and the loss uses the config's default correction,
``rl.importance_correction='none'``: PPO's clipped ratio against the *behaviour* policy's log-probs (no extra
proximal / behaviour weights). Evaluation every ``--eval-every`` steps: greedy exact match on 256 distinct
held-out problems that never appear in the training stream.

Per run: the training exact-match reward curve (``reward/exact_match_mean``, an interval mean per ``log_every``
= 10 steps), ``reward_end`` = the mean of its last three logged values (steps 271-300), the held-out accuracy at
the last step (``eval/accuracy``), the mean logged lag (``async/lag``) and the wall time of the run process
(compile included; measured on a shared, loaded machine: a label, not a benchmark). Per lag: mean and sd over
seeds, and the seed-paired difference lag k - lag 0 with its 95 % t interval (3 seeds: t(0.975, 2) = 4.30, the
half-width is 2.5 x the sd of the differences; descriptive, not a test). ``--report`` renders these tables from
the results JSON (``experiments/README.md``'s ``lag_staleness`` block, via ``_sweep.py --report``).
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
import _sweep  # pylint: disable=wrong-import-position

STEPS = 300
EVAL_EVERY = 75
LOG_EVERY = 10
SEEDS = (0, 1, 2)
LAGS = (0, 1, 2)
REWARD = "reward/exact_match_mean"
TRUTH = "eval/accuracy"
KEYS = (REWARD, "reward_mean", TRUTH, "kl_mean", "beta_eff_mean", "async/lag", "clip_fraction", "ratio_mean",
        "ratio_max", "step_time_s")
RESULTS = Path(__file__).resolve().parent / "issue26_lag_staleness.json"


def build_specs(seeds: Sequence[int] = SEEDS, lags: Sequence[int] = LAGS, steps: int = STEPS,
                eval_every: int = EVAL_EVERY, log_every: int = LOG_EVERY) -> list[_sweep.RunSpec]:
  return [_sweep.RunSpec(f"lag{k}", "llm_arith", "cpu", {"rl.max_lag": int(k)}, seed, steps, eval_every,
                         family="adrpo", beta=0.04, log_every=log_every)
          for k in lags for seed in seeds]


def reward_end(curve: tuple[list[int], list[float]], last: int = 3) -> float:
  """The mean of the last ``last`` logged values of a ``(steps, values)`` curve (nan when it is empty)."""
  vals = curve[1][-last:]
  return float(np.mean(vals)) if vals else float("nan")


def collect(workdir: Path, specs: Sequence[_sweep.RunSpec]) -> dict[str, Any]:
  """``{"lagK/seedS": {"lag", "seed", "final", "curves", "wall_time_s", "commit", "dirty", "config"}}`` of the
  finished runs in ``workdir``."""
  runs = {}
  for spec, recs, info in _sweep.finished_runs(workdir, specs):
    curves = {k: _sweep.eval_curve(recs, k) for k in KEYS}
    final = _sweep.final_eval(recs, KEYS)
    final["reward_end"] = reward_end(curves[REWARD])
    final["eval_start"] = curves[TRUTH][1][0] if curves[TRUTH][1] else float("nan")
    final["lag_mean"] = float(np.mean(curves["async/lag"][1])) if curves["async/lag"][1] else 0.0
    final["clip_fraction_run_mean"] = float(np.mean(curves["clip_fraction"][1])) if curves["clip_fraction"][1] \
        else float("nan")
    runs[spec.key] = {"lag": int(spec.overrides["rl.max_lag"]), "seed": spec.seed, "final": final,
                      "curves": curves, **_sweep.provenance(info)}
  return runs


METRICS = (("reward_end", "train exact match, last 3 logs"), (TRUTH, "held-out acc, last step"),
           ("eval_start", "held-out acc @0"), ("lag_mean", "mean lag"),
           ("clip_fraction_run_mean", "PPO clip fraction, run mean"), ("wall_time_s", "wall s (loaded)"))


def _value(run: Mapping[str, Any], key: str) -> float:
  v = run["wall_time_s"] if key == "wall_time_s" else run["final"].get(key)
  return float("nan") if v is None else float(v)


def analyze(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """Per lag and metric: ``{"values": {seed: v}, "mean", "sd"}``; per lag k > 0 and metric: the seed-paired
  ``lag k - lag 0`` differences with their 95 % t interval (:func:`_sweep.t_interval`)."""
  by_lag: dict[int, dict[int, Mapping[str, Any]]] = {}
  for r in runs.values():
    by_lag.setdefault(int(r["lag"]), {})[int(r["seed"])] = r
  out: dict[str, Any] = {"per_lag": {}, "paired": {}}
  for k in sorted(by_lag):
    out["per_lag"][str(k)] = {}
    for key, _ in METRICS:
      vals = {s: _value(r, key) for s, r in sorted(by_lag[k].items())}
      ci = _sweep.t_interval([v for v in vals.values() if math.isfinite(v)])
      out["per_lag"][str(k)][key] = {"values": vals, "mean": ci["mean"], "sd": ci["sd"], "n": ci["n"]}
  for k in sorted(by_lag):
    if k == 0 or 0 not in by_lag:
      continue
    out["paired"][str(k)] = {}
    for key in ("reward_end", TRUTH):
      seeds = sorted(set(by_lag[k]) & set(by_lag[0]))
      d = {s: _value(by_lag[k][s], key) - _value(by_lag[0][s], key) for s in seeds}
      ci = _sweep.t_interval(list(d.values()))
      out["paired"][str(k)][key] = {"deltas": d, **ci}
  return out


def _f(x: float, digits: int = 3, sign: bool = False) -> str:
  if x is None or not math.isfinite(float(x)):
    return "n/a"
  return f"{float(x):+.{digits}f}" if sign else f"{float(x):.{digits}f}"


def report(results: Mapping[str, Any]) -> str:
  """The markdown tables of a results JSON: per lag the mean over seeds, the sample sd (ddof 1) and the per-seed
  values (written ``mean (sd ...; seeds)``, not ``±``: the ``±`` of ``experiments/README.md`` is a 95 % half-width);
  the seed-paired differences lag k - lag 0 with their 95 % t interval and its width."""
  a, design = results["analysis"], results["design"]
  n_seeds = len(design["seeds"])
  lines = ["| max_lag | " + " | ".join(f"{h}: mean (sd; per seed)" for _, h in METRICS[:2]) + " | "
           + " | ".join(f"{h}: mean" for _, h in METRICS[2:]) + " | n |",
           "|---|" + "---|" * (len(METRICS) + 1)]
  for k, per in a["per_lag"].items():
    cells = []
    for key, _ in METRICS[:2]:
      m = per[key]
      seeds = " / ".join(_f(v) for v in m["values"].values())
      cells.append(f"{_f(m['mean'])} (sd {_f(m['sd'])}; {seeds})")
    for key, _ in METRICS[2:]:
      cells.append(_f(per[key]["mean"], 0 if key == "wall_time_s" else 3))
    lines.append(f"| {k} | " + " | ".join(cells) + f" | {per['reward_end']['n']} |")
  lines += ["", f"Seed-paired lag k - lag 0 (95 % t interval over {n_seeds} seeds, "
            f"t(0.975, {n_seeds - 1}); descriptive):", "",
            "| pair | metric | per seed | mean [95 % CI] | CI width |", "|---|---|---|---|---|"]
  for k, per in a["paired"].items():
    for key, name in METRICS[:2]:
      p = per[key]
      seeds = " / ".join(_f(v, sign=True) for v in p["deltas"].values())
      lines.append(f"| lag {k} - lag 0 | {name} | {seeds} | {_f(p['mean'], sign=True)} "
                   f"[{_f(p['lo'], sign=True)}, {_f(p['hi'], sign=True)}] | {_f(p['hi'] - p['lo'])} |")
  return "\n".join(lines)


def plot(runs: Mapping[str, Mapping[str, Any]], out: Path, title: str) -> None:
  """Training exact-match reward and held-out accuracy against the RL step per lag (thick: mean over seeds,
  thin: seeds)."""
  curves = {f"max_lag={k}": {key: [r["curves"][key] for r in runs.values() if r["lag"] == k]
                             for key in (REWARD, TRUTH)}
            for k in sorted({int(r["lag"]) for r in runs.values()})}
  _sweep.plot_curves(curves, [(REWARD, "train exact match (interval mean of 10 steps)"),
                              (TRUTH, "held-out exact match (greedy, 256 problems)")], out, title)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  if argv is None:
    argv = sys.argv[1:]
  if "--report" in argv:
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    print(report(json.loads(args.out.read_text())))
    return {}
  _sweep.add_common_args(parser)
  parser.add_argument("--lags", type=int, nargs="+", default=list(LAGS))
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--eval-every", type=int, default=EVAL_EVERY)
  parser.add_argument("--log-every", type=int, default=LOG_EVERY)
  parser.add_argument("--out", type=Path, default=None, help="results JSON (default WORKDIR/issue26_lag_staleness"
                      ".json); its plot is written next to it (.png)")
  parser.add_argument("--analyze-only", action="store_true", help="collect the finished runs, run nothing")
  args = parser.parse_args(argv)
  specs = _sweep.with_overrides(build_specs(args.seeds, args.lags, args.steps, args.eval_every, args.log_every),
                                args.set)
  if args.dry_run:
    for s in specs:
      print(s.key, dict(s.overrides))
    return {}
  if not args.analyze_only:
    _sweep.run_sweep(specs, args.workdir, jobs=args.jobs, nice=args.nice)
  runs = collect(args.workdir, specs)
  analysis = analyze(runs)
  out = args.out or args.workdir / "issue26_lag_staleness.json"
  results = {"design": {"config": "configs/llm_arith.py:cpu", "steps": args.steps, "eval_every": args.eval_every,
                        "log_every": args.log_every, "seeds": list(args.seeds), "lags": list(args.lags),
                        "importance_correction": "none (the config's default)", "set": list(args.set),
                        "jobs": args.jobs, "nice": args.nice},
             "runs": runs, "analysis": analysis, "code": _sweep.code_version()}
  _sweep.write_results(out, **results)
  plot(runs, out.with_suffix(".png"), f"llm_arith:cpu, rl.max_lag in {args.lags}, {args.steps} steps, "
                                      f"seeds {args.seeds} (thick: mean, thin: seeds)")
  print(report(json.loads(out.read_text())))
  return {"runs": runs, "analysis": analysis, "out": out}


if __name__ == "__main__":
  main()
