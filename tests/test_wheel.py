"""The wheel as a user installs it (slow): scripts/check_wheel.sh builds it, installs it into a fresh virtualenv with
the core dependencies only (from the package index pip is configured with), runs the README's loss example there
(no torch, no transformers), installs the ``llm`` extra (no torch) and trains 2 steps with
``adrpo-jax train --config=llm_arith:cpu`` from a directory outside the repository (the packaged config, resolved
by name). 1-2 minutes on 2 cores with a warm pip cache; the built-in tiny model comes from the shared cache
($ADRPO_JAX_CACHE, built once by the first run that needs it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_runs_the_loss_example_and_trains_from_outside_the_repo(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    env.pop("PYTHONPATH", None)  # the fresh virtualenv sees the installed wheel only
    env.pop("XLA_FLAGS", None)   # conftest.py's 8 host devices: the run uses the config's own mesh on one device
    r = subprocess.run(["bash", str(REPO / "scripts" / "check_wheel.sh"), str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1500)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    for line in ("check_wheel.sh: built adrpo_jax-", "README loss example ran with the core install",
                 "[llm] installed (transformers", "adrpo-jax train ran 2 steps of the packaged llm_arith:cpu",
                 "check_wheel.sh: ok"):
        assert line in out, (line, out[-6000:])
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "outside" / "adrpo_jax").exists()
