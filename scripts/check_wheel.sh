#!/usr/bin/env bash
# The package as a user installs it: builds the wheel, installs it into a fresh virtualenv with the core
# dependencies only, and runs the README's loss example there from a directory outside the repository (torch and
# transformers must not be installed); then installs the `llm` extra (still no torch) and trains 2 steps of the
# packaged config with the console script, `adrpo-jax train --config=llm_arith:cpu`, also from outside the
# repository. tests/test_wheel.py (slow) runs it.
#   bash scripts/check_wheel.sh [WORKDIR]   (default: a new temporary directory; installs from the package index
#                                            pip is configured with: ~1 min on 2 cores with a warm pip cache)
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

"$VPY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
assert entry_points and "adrpo-jax = adrpo_jax.launch:main" in zipfile.ZipFile(sys.argv[1]).read(
    entry_points[0]).decode(), "the wheel has no adrpo-jax console script"
missing = [f"adrpo_jax/configs/{n}.py" for n in ("__init__", "llm_arith", "flow_digits", "sd3_adrpo", "audio_arith")
           if f"adrpo_jax/configs/{n}.py" not in names]
assert not missing and "adrpo_jax/py.typed" in names, f"the wheel lacks {missing or 'py.typed'}"
PYEOF
"$VPY" -m pip install --quiet --disable-pip-version-check "$WHEEL[llm]"
"$VPY" - <<'PYEOF'
from importlib.metadata import PackageNotFoundError, version
try:
    raise SystemExit(f"the llm extra pulled torch {version('torch')}")
except PackageNotFoundError:
    pass
print(f"check_wheel.sh: [llm] installed (transformers {version('transformers')}, no torch)")
PYEOF
echo "check_wheel.sh: [llm] install done ($((SECONDS - start)) s)"
JAX_PLATFORMS=cpu "$WORK/venv/bin/adrpo-jax" train --config=llm_arith:cpu --workdir="$WORK/run" \
  --config.total_steps=2
"$VPY" - "$WORK/run" <<'PYEOF'
import json, os, sys
run = sys.argv[1]
steps = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))]
assert steps and steps[-1] == 2, steps
assert os.path.isdir(os.path.join(run, "checkpoints", "2")), os.listdir(os.path.join(run, "checkpoints"))
config = json.load(open(os.path.join(run, "config.json")))
assert config["trainer"] == "llm" and config["total_steps"] == 2, (config["trainer"], config["total_steps"])
print(f"check_wheel.sh: adrpo-jax train ran {steps[-1]} steps of the packaged llm_arith:cpu outside the repository")
PYEOF
echo "check_wheel.sh: ok ($((SECONDS - start)) s; $WORK)"
