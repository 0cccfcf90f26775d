r"""Issue 15, item 5: ablation of the choices the paper leaves open, one knob at a time from the default ADRPO run,
on the LLM task and on flow; one table, mean +- std over seeds.

    python experiments/ablations.py --side llm --workdir /tmp/abl_llm [--seeds 0 1 2] [--steps 300] [--beta 0.3]
    python experiments/ablations.py --side flow --workdir /tmp/abl_flow [--seeds 0 1 2] [--steps 120] [--beta 1]

Knobs (all existing config keys; ``default`` = the configs' choice):

============ ======================================= ====================================================
ablation     LLM (``configs/llm_arith.py:cpu``)       flow (``configs/flow_digits.py:cpu``)
============ ======================================= ====================================================
clip_m0.5/2  ``rl.adv_clip_multiple`` 0.5 / 2         the same
clip_none    ``rl.adv_clip=none``                     the same
adv_scale    ``rl.scale_rewards=none`` (default: std) ``rl.scale_advantages_by_std=True`` (default: none)
pg_clip_on   ``rl.clip_pg_advantages=True``           ``rl.clip_cfm_advantages=True``
kl_k1        ``rl.kl_estimator=k1`` (default k3)      -- (W2 has no estimator choice)
============ ======================================= ====================================================

Outputs: ``WORKDIR/results.json`` and the markdown table on stdout (LLM: final held-out accuracy, train
exact-match, KL, beta_eff; flow: final reward, diversity, W2 bound, FD).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sweep  # noqa: E402  pylint: disable=wrong-import-position

LLM_ABLATIONS = {"default": {}, "clip_m0.5": {"rl.adv_clip_multiple": 0.5}, "clip_m2": {"rl.adv_clip_multiple": 2.0},
                 "clip_none": {"rl.adv_clip": "none"}, "adv_scale_none": {"rl.scale_rewards": "none"},
                 "pg_clip_on": {"rl.clip_pg_advantages": True}, "kl_k1": {"rl.kl_estimator": "k1"}}
FLOW_ABLATIONS = {"default": {}, "clip_m0.5": {"rl.adv_clip_multiple": 0.5}, "clip_m2": {"rl.adv_clip_multiple": 2.0},
                  "clip_none": {"rl.adv_clip": "none"}, "adv_scale_std": {"rl.scale_advantages_by_std": True},
                  "cfm_clip_on": {"rl.clip_cfm_advantages": True}}
LLM_KEYS = (("eval/accuracy", "held-out acc"), ("reward/exact_match_mean", "train exact-match"), ("kl_mean", "KL"),
            ("beta_eff_mean", "beta_eff"))
FLOW_KEYS = (("eval/reward_mean", "reward"), ("eval/diversity", "diversity"), ("eval/w2_bound", "W2 bound"),
             ("eval/frechet_distance", "FD"), ("eval/thickness_accuracy", "thick acc"))


def build_specs(args) -> list[_sweep.RunSpec]:
  flow = args.side == "flow"
  table = FLOW_ABLATIONS if flow else LLM_ABLATIONS
  names = args.only or list(table)
  specs = []
  for seed in args.seeds:
    for name in names:
      over = {"rl.beta": float(args.beta), **table[name]}
      specs.append(_sweep.RunSpec(name, "flow_digits" if flow else "llm_arith", "cpu", over, seed, args.steps,
                                  args.eval_every, family="adrpo", beta=float(args.beta)))
  return specs


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _sweep.add_common_args(parser)
  parser.add_argument("--side", choices=("flow", "llm"), required=True)
  parser.add_argument("--steps", type=int, default=None, help="default 120 (flow) / 300 (llm)")
  parser.add_argument("--eval-every", type=int, default=None, help="default = steps (start and end only)")
  parser.add_argument("--beta", type=float, default=None, help="beta_0; default 1 (flow) / 0.3 (llm)")
  parser.add_argument("--only", nargs="*", default=None, help="a subset of the ablation names")
  args = parser.parse_args(argv)
  flow = args.side == "flow"
  args.steps = args.steps or (120 if flow else 300)
  args.eval_every = args.eval_every or args.steps
  args.beta = args.beta if args.beta is not None else (1.0 if flow else 0.3)
  specs = build_specs(args)
  specs = _sweep.with_overrides(specs, args.set)
  if args.dry_run:
    for s in specs:
      print(s.key, dict(s.overrides))
    return {}
  keys = FLOW_KEYS if flow else LLM_KEYS
  results = _sweep.run_sweep(specs, args.workdir, jobs=args.jobs, nice=args.nice)
  per_run = {k: _sweep.final_eval(recs, [key for key, _ in keys]) for k, recs in results.items()}
  summary = _sweep.summarize(per_run)
  print(_sweep.markdown_table(summary, keys))
  _sweep.write_results(args.workdir / "results.json", args=vars(args), per_run=per_run, summary=summary)
  return {"summary": summary}


if __name__ == "__main__":
  main()
