"""configs/sd3_adrpo.py:cpu end to end through launch.py (slow): tiny random MMDiT + VAE + text encoders + CLIP
reward (built once in $ADRPO_JAX_CACHE), ADRPO-W2 with LoRA; the reward and the W2 terms are logged, checkpoints
are written, the final (merged) MMDiT is saved in the diffusers layout, and a run stopped at step 2 and extended
to step 4 ends with exactly the parameters and metrics of an uninterrupted run. Every method runs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from adrpo_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ)
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
                "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    return env


def _run(workdir, *overrides, steps=4):
    cmd = [sys.executable, "launch.py", "--config=configs/sd3_adrpo.py:cpu", f"--workdir={workdir}",
           f"--config.total_steps={steps}", "--config.checkpoint.every_steps=2", "--config.eval_every=2",
           "--config.logging.tensorboard=False", *overrides]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _weights(workdir):
    files = sorted((Path(workdir) / "final_model").glob("*.safetensors"))
    assert files, list((Path(workdir) / "final_model").iterdir())
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sd3_ref")
    _run(workdir, "--config.model.save_final=True")
    return workdir


def test_cpu_variant_logs_reward_checkpoints_and_saves(reference_run):
    records = read_jsonl(reference_run / "metrics.jsonl")
    train = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for key in ("reward_mean", "reward/clip_cosine_mean", "w2_mean", "beta_eff_mean", "cfm_term", "loss"):
            assert np.isfinite(r[key]), (key, r)
        assert r["skipped_updates"] == 0
    assert train[-1]["w2_mean"] > 0  # the adapters moved the policy away from the reference
    evals = [r for r in records if "eval/reward_mean" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[0]["eval/w2_bound"] == pytest.approx(0.0, abs=1e-10)  # LoRA B = 0: policy == reference
    assert sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert (reference_run / "final_model" / "config.json").exists()


def test_extended_run_resumes_exactly(tmp_path, reference_run):
    _run(tmp_path, steps=2)
    _run(tmp_path, "--config.model.save_final=True", steps=4)
    ref, got = _weights(reference_run), _weights(tmp_path)
    assert sorted(ref) == sorted(got)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    a = {r["step"]: r for r in read_jsonl(reference_run / "metrics.jsonl") if "reward_mean" in r}
    b = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward_mean" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("reward_mean", "loss", "w2_mean", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)


@pytest.mark.parametrize("method", ["fixed_beta", "orw_cfm_w2", "none"])
def test_other_methods_run(tmp_path, method):
    _run(tmp_path, f"--config.rl.method={method}", "--config.eval_every=0", steps=2)
    train = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward_mean" in r]
    assert len(train) == 2 and all(np.isfinite(r["loss"]) for r in train)
