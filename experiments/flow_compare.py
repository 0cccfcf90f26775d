r"""Issue 15, item 1: the paper's flow comparison on digits -- ADRPO-W2 (beta_0 in {0.1, 0.3, 1, 3}) vs ORW-CFM-W2
(the paper's baseline: exp(tau r) weights, tau = 0.5 as ``configs/flow_digits.py:cpu_orw``, alpha in
{0.1, 0.3, 1, 3}) vs fixed-beta W2 (beta in {0.1, 0.3, 1, 3}) vs no regularization, several seeds, evaluated
every ``--eval-every`` steps.

    python experiments/flow_compare.py --workdir /tmp/flow_compare [--seeds 0 1 2] [--steps 120] \
        [--eval-every 40] [--adrpo-betas 0.1 0.3 1 3] [--fixed-betas 0.1 0.3 1 3] [--orw-alphas 0.1 0.3 1 3] \
        [--no-none] [--jobs 2] [--nice 19] [--out-prefix experiments/flow_compare]

Every run is ``configs/flow_digits.py:cpu`` (``:cpu_orw`` for ORW-CFM-W2) with only ``rl.method``,
``rl.beta`` / ``rl.alpha`` and ``seed`` changed. Outputs: ``WORKDIR/results.json``; ``PREFIX.png``: final
reward vs diversity, vs W2 bound, vs FD (mean +- std over seeds; per-method Pareto frontiers, dashed: overall);
``PREFIX_steps.png``: the same panels at every evaluation step (frontier per step); markdown tables on stdout
(final metrics per run; sensitivity: final reward against beta/alpha and its spread per method).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sweep  # noqa: E402  pylint: disable=wrong-import-position

KEYS = (("eval/reward_mean", "reward"), ("eval/diversity", "diversity"), ("eval/frechet_distance", "FD"),
        ("eval/w2_bound", "W2 bound"), ("eval/digit_accuracy", "digit acc"), ("eval/thickness_accuracy", "thick acc"))
PANELS = (("eval/diversity", "diversity", True), ("eval/w2_bound", "W2 bound to the pre-trained model", False),
          ("eval/frechet_distance", "FD to the pre-trained model", False))


def build_specs(args) -> list[_sweep.RunSpec]:
  grid = [("adrpo", "cpu", "rl.beta", b) for b in args.adrpo_betas]
  grid += [("orw_cfm_w2", "cpu_orw", "rl.alpha", a) for a in args.orw_alphas]
  grid += [("fixed_beta", "cpu", "rl.beta", b) for b in args.fixed_betas]
  if not args.no_none:
    grid.append(("none", "cpu", None, None))
  specs = []
  for seed in args.seeds:  # seed-major: a partial sweep covers every method
    for method, variant, key, value in grid:
      over = {"rl.method": method}
      if key:
        over[key] = float(value)
      label = method if value is None else f"{method}_{'alpha' if key == 'rl.alpha' else 'beta'}{value:g}"
      specs.append(_sweep.RunSpec(label, "flow_digits", variant, over, seed, args.steps, args.eval_every,
                                  family=method, beta=None if value is None else float(value)))
  return specs


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _sweep.add_common_args(parser)
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--eval-every", type=int, default=40)
  parser.add_argument("--adrpo-betas", type=float, nargs="*", default=[0.1, 0.3, 1.0, 3.0])
  parser.add_argument("--fixed-betas", type=float, nargs="*", default=[0.1, 0.3, 1.0, 3.0])
  parser.add_argument("--orw-alphas", type=float, nargs="*", default=[0.1, 0.3, 1.0, 3.0])
  parser.add_argument("--no-none", action="store_true")
  parser.add_argument("--out-prefix", type=Path, default=None, help="plots prefix (default WORKDIR/flow_compare)")
  args = parser.parse_args(argv)
  prefix = args.out_prefix or args.workdir / "flow_compare"
  specs = build_specs(args)
  specs = _sweep.with_overrides(specs, args.set)
  if args.dry_run:
    for s in specs:
      print(s.key, dict(s.overrides))
    return {}
  results = _sweep.run_sweep(specs, args.workdir, jobs=args.jobs, nice=args.nice)
  keys = [k for k, _ in KEYS]
  labels = {s.label: (s.family, s.label.replace("fixed_beta_beta", "fixed ").replace("adrpo_beta", "ADRPO ")
                      .replace("orw_cfm_w2_alpha", "ORW a=")) for s in specs}
  eval_steps = sorted({st for recs in results.values() for st in _sweep.eval_curve(recs, "eval/reward_mean")[0]})
  per_step = {}
  for st in eval_steps:
    per_step[st] = _sweep.summarize({k: _sweep.final_eval(recs, keys, st) for k, recs in results.items()})
  final = _sweep.summarize({k: _sweep.final_eval(recs, keys, args.steps) for k, recs in results.items()})
  initial = per_step[0][next(iter(per_step[0]))] if 0 in per_step and per_step[0] else {}
  initial = {k: v[0] for k, v in initial.items()}
  print(_sweep.markdown_table(final, KEYS))
  sens = _sweep.sensitivity(final, {s.label: s.family for s in specs}, {s.label: s.beta for s in specs},
                            "eval/reward_mean")
  print()
  print(_sweep.sensitivity_markdown(sens, "final reward"))
  if final:
    _sweep.plot_frontiers(final, labels, ("eval/reward_mean", "eval reward \u2192"), PANELS, Path(f"{prefix}.png"),
                          f"flow digits: ADRPO-W2 / ORW-CFM-W2 / fixed-beta W2 / none; {args.steps} steps; "
                          f"seeds {args.seeds}", initial=initial)
    for st in eval_steps[1:]:
      _sweep.plot_frontiers(per_step[st], labels, ("eval/reward_mean", "eval reward \u2192"), PANELS,
                            Path(f"{prefix}_step{st}.png"), f"the same at step {st}", initial=initial)
  _sweep.write_results(args.workdir / "results.json", args=vars(args), final=final,
                       per_step={str(k): v for k, v in per_step.items()}, sensitivity=sens)
  return {"final": final, "sensitivity": sens, "per_step": per_step}


if __name__ == "__main__":
  main()
