#!/usr/bin/env bash
# Lint and type checks (CONTRIBUTING.md; .ci/run runs it before the tests): ruff lint and ruff format check over
# adrpo_jax/, launch.py, configs/ and scripts/ (the format check skips the folders pyproject.toml's
# [tool.ruff.format] exclude names), mypy over adrpo_jax/ (less the TODO modules of its last override).
# Settings: pyproject.toml. About 10 s warm, under a minute cold on 2 cores.
#   bash scripts/lint.sh            all three (each runs even when an earlier one fails; exit 1 if any failed)
#   bash scripts/lint.sh ruff|format|mypy    one of them (the pre-commit hooks call these)
#   bash scripts/lint.sh --fix      apply ruff's safe fixes and the formatter (rewrites files), then check all three
# Installs the pinned tools of the `lint` extra into ./.venv when they are missing (PYTHON=... to use another).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PATHS=(adrpo_jax launch.py configs scripts)

need_tools() {
  local pins
  pins=$("$PY" - <<'PYEOF'
import tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["lint"]
print(" ".join(p for p in extra if p.split("==")[0] in ("ruff", "mypy")))
PYEOF
)
  # shellcheck disable=SC2086
  if ! "$PY" - $pins <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, _, want = pin.partition("==")
    assert version(name) == want, pin
PYEOF
  then
    echo "lint.sh: installing $pins" >&2
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --disable-pip-version-check $pins
  fi
}

run() {  # run NAME CMD...: prints the outcome and the time, returns the command's status
  local name=$1; shift
  local start=$SECONDS status
  "$@"
  status=$?
  if [ $status -eq 0 ]; then echo "lint.sh: $name ok ($((SECONDS - start)) s)"; else
    echo "lint.sh: $name FAILED ($((SECONDS - start)) s)"; fi
  return $status
}

ruff_lint() { run "ruff check" "$PY" -m ruff check "${PATHS[@]}"; }
ruff_format() { run "ruff format --check" "$PY" -m ruff format --check "${PATHS[@]}"; }
mypy_check() { run "mypy" "$PY" -m mypy; }  # files and options: [tool.mypy] in pyproject.toml

need_tools
case "${1:-all}" in
  ruff) ruff_lint ;;
  format) ruff_format ;;
  mypy) mypy_check ;;
  --fix)
    "$PY" -m ruff check --fix "${PATHS[@]}"
    "$PY" -m ruff format "${PATHS[@]}"
    failed=0
    ruff_lint || failed=1; ruff_format || failed=1; mypy_check || failed=1
    exit $failed ;;
  all)
    failed=0
    ruff_lint || failed=1; ruff_format || failed=1; mypy_check || failed=1
    exit $failed ;;
  *) echo "usage: bash scripts/lint.sh [all|ruff|format|mypy|--fix]" >&2; exit 2 ;;
esac
