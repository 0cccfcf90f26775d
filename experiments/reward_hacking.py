r"""Issue 15, item 2: reward hacking on both sides -- optimize a proxy reward with an exploitable part and track
the truth over steps, per method and beta.

    python experiments/reward_hacking.py --side flow --workdir /tmp/hack_flow [--seeds 0 1 2] [--steps 120] \
        [--eval-every 20] [--betas 0.1 1] [--ink-weight 2] [--jobs 2] [--nice 19]
    python experiments/reward_hacking.py --side llm --workdir /tmp/hack_llm [--seeds 0 1 2] [--steps 300] \
        [--eval-every 25] [--betas 0.04 0.3] [--length-weight 0.5]

Flow: ``configs/flow_digits.py:cpu`` with ``reward.kind=combined`` = classifier log-prob + ``--ink-weight`` x
mean ink (the hackable image statistic: bolder, filled images score more whatever the digit); ADRPO-W2 and
fixed-beta W2 at each beta, and no regularization. The truth: classifier digit and thickness accuracy,
diversity and FD to the pre-trained model (every evaluation). LLM: ``configs/llm_arith.py`` (``cpu`` = ADRPO,
``cpu_grpo`` = GRPO) with the reward exact_match + ``--length-weight`` x
``adrpo_jax.rl.proxy_rewards:length_credit`` (credit for longer completions, whatever the answer); the truth:
greedy exact-match accuracy on 256 held-out problems. Outputs: ``WORKDIR/results.json``, ``WORKDIR/<side>_hacking
.png`` (proxy and true curves over steps; thin: seeds) and a markdown table (final proxy and truth, best truth
and the step where it is reached).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sweep  # noqa: E402  pylint: disable=wrong-import-position

FLOW_KEYS = (("eval/reward_mean", "proxy reward (eval)"), ("eval/digit_accuracy", "digit acc (true)"),
             ("eval/thickness_accuracy", "thickness acc (true)"), ("eval/diversity", "diversity (true)"),
             ("eval/frechet_distance", "FD to pre-trained"))
LLM_KEYS = (("reward_mean", "proxy reward (train)"), ("reward/length_credit_mean", "length credit (train)"),
            ("eval/accuracy", "held-out exact match (true)"), ("kl_mean", "KL"))


def build_specs(args) -> tuple[list[_sweep.RunSpec], str]:
  specs = []
  if args.side == "flow":
    base = {"reward.kind": "combined", "reward.image_stat": "mean_ink", "reward.image_stat_weight": args.ink_weight}
    grid = [(m, b) for b in args.betas for m in ("adrpo", "fixed_beta")]
    if not args.no_none:
      grid.append(("none", None))
    for seed in args.seeds:
      for method, beta in grid:
        over = dict(base, **{"rl.method": method})
        if beta is not None:
          over["rl.beta"] = float(beta)
        specs.append(_sweep.RunSpec(method if beta is None else f"{method}_beta{beta:g}", "flow_digits", "cpu", over,
                                    seed, args.steps, args.eval_every, family=method, beta=beta))
    return specs, "eval/thickness_accuracy"
  base = {"rewards.functions": ["exact_match", "adrpo_jax.rl.proxy_rewards:length_credit"],
          "rewards.weights": [1.0, float(args.length_weight)]}
  for seed in args.seeds:
    for beta in args.betas:
      for method, variant in (("grpo", "cpu_grpo"), ("adrpo", "cpu")):
        specs.append(_sweep.RunSpec(f"{method}_beta{beta:g}", "llm_arith", variant, dict(base, **{"rl.beta": float(beta)}),
                                    seed, args.steps, args.eval_every, family=method, beta=float(beta)))
  return specs, "eval/accuracy"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _sweep.add_common_args(parser)
  parser.add_argument("--side", choices=("flow", "llm"), required=True)
  parser.add_argument("--steps", type=int, default=None, help="default 120 (flow) / 300 (llm)")
  parser.add_argument("--eval-every", type=int, default=None, help="default 20 (flow) / 25 (llm)")
  parser.add_argument("--betas", type=float, nargs="+", default=None, help="default 0.1 1 (flow) / 0.04 0.3 (llm)")
  parser.add_argument("--no-none", action="store_true", help="flow: leave out the unregularized run")
  parser.add_argument("--ink-weight", type=float, default=2.0)
  parser.add_argument("--length-weight", type=float, default=0.5)
  args = parser.parse_args(argv)
  flow = args.side == "flow"
  args.steps = args.steps or (120 if flow else 300)
  args.eval_every = args.eval_every or (20 if flow else 25)
  args.betas = args.betas or ([0.1, 1.0] if flow else [0.04, 0.3])
  specs, truth = build_specs(args)
  specs = _sweep.with_overrides(specs, args.set)
  keys = FLOW_KEYS if flow else LLM_KEYS
  if args.dry_run:
    for s in specs:
      print(s.key, dict(s.overrides))
    return {}
  results = _sweep.run_sweep(specs, args.workdir, jobs=args.jobs, nice=args.nice)
  per_run = {}
  for k, recs in results.items():
    row = _sweep.final_eval(recs, [key for key, _ in keys])
    best_step, best = _sweep.best_point(recs, truth)
    steps, vals = _sweep.eval_curve(recs, truth)
    row.update({"truth_start": vals[0] if vals else float("nan"), "truth_best": best, "truth_best_step": best_step})
    per_run[k] = row
  summary = _sweep.summarize(per_run)
  cols = list(keys) + [("truth_start", "truth @0"), ("truth_best", "best truth"), ("truth_best_step", "best @ step")]
  print(_sweep.markdown_table(summary, cols))
  labels = sorted({s.label for s in specs})
  curves = {lab: {k: [_sweep.eval_curve(results[s.key], k) for s in specs if s.label == lab and s.key in results]
                  for k, _ in keys} for lab in labels}
  if results:
    _sweep.plot_curves(curves, keys, args.workdir / f"{args.side}_hacking.png",
                       f"reward hacking ({args.side}): proxy vs truth over steps; seeds {args.seeds}")
  _sweep.write_results(args.workdir / "results.json", args=vars(args), per_run=per_run, summary=summary)
  return {"summary": summary}


if __name__ == "__main__":
  main()
