"""Behaviour every recipe has by construction (issue 23), checked through launch.py on the two recipes that lacked
it before the runner: --mode=eval and logging.phase_timing for the audio and SD3 cpu variants (slow: each builds or
loads its tiny models and compiles its programs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adrpo_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

CASES = {
    "audio": ("configs/audio_arith.py:cpu", ("time/rollout", "time/reward", "time/logprobs", "time/update"),
              "eval/accuracy"),
    "sd3": ("configs/sd3_adrpo.py:cpu", ("time/sample", "time/reward", "time/update"), "eval/reward_mean"),
}


def _launch(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_phase_timing_and_eval_mode(recipe, tmp_path):
    config, phases, eval_key = CASES[recipe]
    common = [f"--config={config}", f"--workdir={tmp_path}", "--config.eval_every=0", "--config.log_every=1",
              "--config.logging.tensorboard=False", "--config.logging.progress_bar=False"]
    _launch(*common, "--config.total_steps=2", "--config.logging.phase_timing=True")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for key in phases:
        assert records[-1][key] > 0, (key, records[-1])
    _launch(*common, "--config.total_steps=2", "--mode=eval")
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["source"] == "checkpoint"
    assert evals[0]["trainer"] == recipe and eval_key in evals[0]
