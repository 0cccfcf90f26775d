r"""Issue 15, item 3: a task where a fixed beta can stall -- GRPO (beta in {0.01, 0.04, 0.1, 0.3, 1}) vs ADRPO (the
same beta_0 grid) on arithmetic harder than the tiny model's 1-2 digit SFT task, 3 seeds; reward-KL frontier
and the beta-sensitivity spread.

    python experiments/llm_hard_task.py --workdir /tmp/llm_hard [--seeds 0 1 2] [--steps 300] [--betas ...] \
        [--min-digits 2 --max-digits 3 --operations +] [--jobs 2] [--nice 19] [--probe]

Every run is ``configs/llm_arith.py:cpu`` (ADRPO) or ``:cpu_grpo`` (GRPO) on the cached ``builtin:tiny_arith``
with the task changed to operands of ``--min-digits``..``--max-digits`` digits and ``--operations`` (prompt and
completion lengths sized to fit), ``rl.beta`` = beta_0 and ``seed``; nothing else differs. ``--probe`` runs one
RL step per method (seed 0) and prints the fraction of groups with zero reward variance at the start
(``zero_std_group_fraction``) and the held-out accuracy of the start model: the check that the task is hard.
Outputs: ``WORKDIR/results.json``, ``--out-prefix``\ ``_frontier.png`` (final reward and held-out accuracy
against KL; per-method Pareto frontiers), ``_curves.png`` and markdown tables (final metrics; sensitivity:
final held-out accuracy against beta and its spread per method) on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sweep  # noqa: E402  pylint: disable=wrong-import-position

METHODS = (("grpo", "cpu_grpo"), ("adrpo", "cpu"))
KEYS = (("eval/accuracy", "held-out acc"), ("reward/exact_match_mean", "train exact-match"), ("kl_mean", "KL"),
        ("zero_std_group_fraction", "zero-var groups"), ("beta_eff_mean", "beta_eff"))


def task_overrides(min_digits: int, max_digits: int, operations: str) -> dict:
  answer_len = 2 * max_digits if "*" in operations else max_digits + 1
  return {"data.arithmetic.min_digits": min_digits, "data.arithmetic.max_digits": max_digits,
          "data.arithmetic.operations": operations, "sampling.max_prompt_length": 2 * max_digits + 2,
          "sampling.max_new_tokens": answer_len + 2}


def build_specs(args, seeds, steps, eval_every, log_every=0, extra=None) -> list[_sweep.RunSpec]:
  task = task_overrides(args.min_digits, args.max_digits, args.operations)
  specs = []
  for beta in args.betas:
    for method, variant in METHODS:
      for seed in seeds:
        specs.append(_sweep.RunSpec(f"{method}_beta{beta:g}", "llm_arith", variant,
                                    {**task, "rl.beta": float(beta), **(extra or {})}, seed, steps, eval_every,
                                    family=method, beta=float(beta), log_every=log_every))
  return specs


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _sweep.add_common_args(parser)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--eval-every", type=int, default=50)
  parser.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.04, 0.1, 0.3, 1.0])
  parser.add_argument("--min-digits", type=int, default=2)
  parser.add_argument("--max-digits", type=int, default=3)
  parser.add_argument("--operations", default="+")
  parser.add_argument("--probe", action="store_true", help="one RL step per method: zero-variance fraction")
  parser.add_argument("--out-prefix", type=Path, default=None, help="plots prefix (default WORKDIR/llm_hard)")
  args = parser.parse_args(argv)
  prefix = args.out_prefix or args.workdir / "llm_hard"
  if args.probe:
    args.betas = args.betas[:1]
    specs = build_specs(args, args.seeds[:1], 1, 1, log_every=1)
  else:
    specs = build_specs(args, args.seeds, args.steps, args.eval_every)
  specs = _sweep.with_overrides(specs, args.set)
  if args.dry_run:
    for s in specs:
      print(s.key, dict(s.overrides))
    return {}
  results = _sweep.run_sweep(specs, args.workdir, jobs=args.jobs, nice=args.nice)
  per_run = {k: _sweep.final_eval(recs, [k2 for k2, _ in KEYS]) for k, recs in results.items()}
  # the start: step-0 eval and the first logged training step
  start = {k: {"acc_start": _sweep.eval_curve(recs, "eval/accuracy")[1][0] if _sweep.eval_curve(
      recs, "eval/accuracy")[0] else float("nan"),
               "zero_var_start": _sweep.eval_curve(recs, "zero_std_group_fraction")[1][0] if _sweep.eval_curve(
                   recs, "zero_std_group_fraction")[0] else float("nan")} for k, recs in results.items()}
  for k in per_run:
    per_run[k].update(start[k])
  summary = _sweep.summarize(per_run)
  cols = [("acc_start", "held-out acc @0"), ("zero_var_start", "zero-var groups, first log")] + list(KEYS)
  print(_sweep.markdown_table(summary, cols))
  labels = {s.label: (s.family, f"{s.family} {s.beta:g}") for s in specs}
  sens = _sweep.sensitivity(summary, {s.label: s.family for s in specs}, {s.label: s.beta for s in specs},
                            "eval/accuracy")
  if not args.probe:
    print()
    print(_sweep.sensitivity_markdown(sens, "final held-out acc"))
    _sweep.plot_frontiers(summary, labels, ("reward/exact_match_mean", "train exact-match (last log) \u2192"),
                          [("kl_mean", "KL to the reference", False)], Path(f"{prefix}_frontier.png"),
                          f"GRPO vs ADRPO, {args.min_digits}-{args.max_digits} digit '{args.operations}', "
                          f"{args.steps} steps, seeds {args.seeds}")
    curves = {lab: {k: [_sweep.eval_curve(results[s.key], k) for s in specs if s.label == lab and s.key in results]
                    for k, _ in KEYS[:3]} for lab in labels}
    _sweep.plot_curves(curves, KEYS[:3], Path(f"{prefix}_curves.png"), "curves over RL steps (thin: seeds)")
  _sweep.write_results(args.workdir / "results.json", args=vars(args), per_run=per_run, summary=summary,
                       sensitivity=sens)
  return {"summary": summary, "sensitivity": sens}


if __name__ == "__main__":
  main()
