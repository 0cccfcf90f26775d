#!/usr/bin/env bash
# The project's test command (README; .ci/run runs exactly this): installs what it needs, then runs the
# default suite (unit tests + doctests) and the end-to-end checks behind the `slow` marker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
.venv/bin/python -m pytest -q "$@"
if [ $# -eq 0 ]; then
  .venv/bin/python -m pytest -q -m slow
fi
