#!/usr/bin/env bash
# The main job on built-in defaults (README): installs what it needs, then on CPU and with nothing downloaded
#   1. LLM: SFT a tiny LM on arithmetic (cached), RL fine-tune it with GRPO and with ADRPO, plot reward/KL;
#   2. flow matching: pre-train a small DiT on sklearn digits + a reward classifier (cached), fine-tune it
#      with ADRPO-W2 through launch.py, write the before/after sample grid.
# Usage: bash scripts/demo.sh [WORKDIR]   (default runs/demo; re-running resumes / skips finished runs)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
WORKDIR="${1:-runs/demo}"
CACHE="$WORKDIR/xla_cache"
mkdir -p "$WORKDIR"
.venv/bin/python -m adrpo_jax.rl.demo --workdir "$WORKDIR/llm"
.venv/bin/python launch.py --config=configs/flow_digits.py:cpu --workdir="$WORKDIR/flow" \
  --config.compilation_cache_dir="$CACHE"
cat <<MSG

[demo] done. Outputs:
  LLM  (GRPO vs ADRPO): $WORKDIR/llm/reward_kl.png, $WORKDIR/llm/{grpo,adrpo}/metrics.jsonl, TensorBoard: $WORKDIR/llm
  flow (ADRPO-W2):      $WORKDIR/flow/metrics.jsonl, sample grid: $(ls "$WORKDIR"/flow/*.png 2>/dev/null | tr '\n' ' ')
  checkpoints:          $WORKDIR/{llm/grpo,llm/adrpo,flow}/checkpoints/   (tensorboard --logdir $WORKDIR)
MSG
