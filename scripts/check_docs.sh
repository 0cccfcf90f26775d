#!/usr/bin/env bash
# The documentation check (CONTRIBUTING.md; .ci/run runs it): builds the site with warnings as errors, runs the
# pages' doctests, then checks the built site as a reader meets it (scripts/check_docs.py): internal links, and
# the index, an API page and the math page opened in headless Chromium (DOM and screenshot checks).
#   bash scripts/check_docs.sh                  everything (about 2 minutes on 2 cores)
#   bash scripts/check_docs.sh --no-browser     without Chromium
# Installs the `docs` extra into ./.venv when it is missing, and Debian's chromium when apt is there and we are
# root (as setup.sh does for espeak-ng). Output: docs/_build/html, screenshots in docs/_build/screenshots.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
BROWSER=1
[ "${1:-}" = "--no-browser" ] && BROWSER=0
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import sphinx, myst_parser, furo, sphinx_copybutton, mathjax" >/dev/null 2>&1; then
  pins=$("$PY" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]))')
  echo "check_docs.sh: installing $pins" >&2
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet --disable-pip-version-check $pins
fi
if [ $BROWSER = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
      || echo "check_docs.sh: could not install chromium" >&2
  fi
fi

start=$SECONDS
# -W: every warning fails the build (docstring issues listed in docs/known_docstring_issues.txt excepted)
"$PY" -m sphinx -E -W --keep-going -q -b html -d docs/_build/doctrees docs docs/_build/html  # -E: autodoc cannot tell when a docstring changed
echo "check_docs.sh: html built ($((SECONDS - start)) s)"
t=$SECONDS
"$PY" -m sphinx -W --keep-going -q -b doctest -d docs/_build/doctrees docs docs/_build/doctest
echo "check_docs.sh: doctests passed ($((SECONDS - t)) s): $(sed -n '/Doctest summary/,$p' docs/_build/doctest/output.txt | grep -E 'tests$' | head -1 | xargs)"
t=$SECONDS
if [ $BROWSER = 1 ]; then
  "$PY" scripts/check_docs.py docs/_build/html --out docs/_build/screenshots
else
  "$PY" scripts/check_docs.py docs/_build/html --no-browser
fi
echo "check_docs.sh: site checked ($((SECONDS - t)) s); all docs checks passed in $((SECONDS - start)) s"
