#!/usr/bin/env bash
# Lint and type checks (CONTRIBUTING.md; .ci/run runs it before the tests): ruff lint and ruff format check over
# adrpo_jax/, launch.py, configs/ and scripts/ (the format check skips the folders pyproject.toml's
# [tool.ruff.format] exclude names), a relaxed ruff lint over tests/ (TESTS_RULES below), mypy over adrpo_jax/
# (less the TODO module of its last override). Settings: pyproject.toml. About 1 s warm (mypy's cache), ~20 s
# cold on 2 busy cores (2026-12-06: 17 s at a load of ~6, mypy 16 s of it).
#   bash scripts/lint.sh            all four (each runs even when an earlier one fails; exit 1 if any failed)
#   bash scripts/lint.sh ruff|tests|format|mypy    one of them (the pre-commit hooks call these)
#   bash scripts/lint.sh --fix      apply ruff's safe fixes and the formatter (rewrites files), then check all four
# Installs the pinned tools of the `lint` extra into ./.venv when they are missing (PYTHON=... to use another).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PATHS=(adrpo_jax launch.py configs scripts)
# tests/: pyflakes (F: unused / undefined names, redefinitions), syntax errors (E9), pylint's errors (PLE) and
# bugbear (B) less B023 (closures over a loop variable: the tests' per-case lambdas are called in the same
# iteration) and B905 (zip without strict=, ignored in adrpo_jax/ too; the ~74 tree-leaf comparisons in tests/
# would gain from strict=True, a change of their own); style rules are not applied to tests/.
TESTS_RULES=(--select F,E9,PLE,B --ignore B023,B905)

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
ruff_tests() { run "ruff check tests" "$PY" -m ruff check "${TESTS_RULES[@]}" tests; }
ruff_format() { run "ruff format --check" "$PY" -m ruff format --check "${PATHS[@]}"; }
mypy_check() { run "mypy" "$PY" -m mypy; }  # files and options: [tool.mypy] in pyproject.toml

need_tools
case "${1:-all}" in
  ruff) ruff_lint ;;
  tests) ruff_tests ;;
  format) ruff_format ;;
  mypy) mypy_check ;;
  --fix)
    "$PY" -m ruff check --fix "${PATHS[@]}"
    "$PY" -m ruff check --fix "${TESTS_RULES[@]}" tests
    "$PY" -m ruff format "${PATHS[@]}"
    failed=0
    ruff_lint || failed=1; ruff_tests || failed=1; ruff_format || failed=1; mypy_check || failed=1
    exit $failed ;;
  all)
    failed=0
    ruff_lint || failed=1; ruff_tests || failed=1; ruff_format || failed=1; mypy_check || failed=1
    exit $failed ;;
  *) echo "usage: bash scripts/lint.sh [all|ruff|tests|format|mypy|--fix]" >&2; exit 2 ;;
esac
