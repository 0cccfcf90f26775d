#!/usr/bin/env bash
# The package as a user installs it: builds the wheel, installs it into a fresh virtualenv with the core
# dependencies only, and runs the README's loss example there from a directory outside the repository (torch and
# transformers must not be installed). When the wheel has the `adrpo-jax` console script, it then installs the
# `llm` extra and trains 2 steps of the packaged `llm_arith:cpu` config, also from outside the repository.
#   bash scripts/check_wheel.sh [WORKDIR]      (default: a new temporary directory; downloads from the package index)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY="${PYTHON:-.venv/bin/python}"
WORK="${1:-$(mktemp -d -t adrpo-wheel-XXXXXX)}"
mkdir -p "$WORK"
BASE=$("$PY" -c 'import sys; print(sys._base_executable)')  # the interpreter the project's venv was made from
start=$SECONDS

rm -rf "$WORK/dist" && "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$WORK/dist" "$REPO"
WHEEL=$(ls "$WORK"/dist/adrpo_jax-*.whl)
echo "check_wheel.sh: built $(basename "$WHEEL") ($((SECONDS - start)) s)"

rm -rf "$WORK/venv" && "$BASE" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check "$WHEEL"
echo "check_wheel.sh: core install done ($((SECONDS - start)) s)"

mkdir -p "$WORK/outside" && cd "$WORK/outside"
"$VPY" - "$REPO/README.md" <<'PYEOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
for heavy in ("torch", "transformers", "diffusers"):
    try:
        raise SystemExit(f"the core install pulled {heavy} {version(heavy)}")
    except PackageNotFoundError:
        pass
example = re.findall(r"```python\n(.*?)```", open(sys.argv[1], encoding="utf-8").read(), flags=re.S)[0]
namespace = {}
exec(compile(example, "README.md", "exec"), namespace)
import adrpo_jax
assert namespace["grad"].shape == (8, 16), namespace["grad"].shape
assert "site-packages" in adrpo_jax.__file__, adrpo_jax.__file__
print(f"check_wheel.sh: README loss example ran with the core install (adrpo_jax {adrpo_jax.__version__}, "
      f"loss {float(namespace['loss']):.4f})")
PYEOF

if unzip -p "$WHEEL" '*.dist-info/entry_points.txt' 2>/dev/null | grep -q '^adrpo-jax'; then
  "$VPY" -m pip install --quiet --disable-pip-version-check "$WHEEL[llm]"
  echo "check_wheel.sh: [llm] installed ($((SECONDS - start)) s)"
  JAX_PLATFORMS=cpu "$WORK/venv/bin/adrpo-jax" train --config=llm_arith:cpu --workdir="$WORK/run" \
    --config.total_steps=2
  test -f "$WORK/run/metrics.jsonl"
  echo "check_wheel.sh: adrpo-jax train ran 2 steps from outside the repository"
else
  echo "check_wheel.sh: the wheel has no adrpo-jax console script yet: the [llm] training stage is skipped"
fi
echo "check_wheel.sh: ok ($((SECONDS - start)) s; $WORK)"
