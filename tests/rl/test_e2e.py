"""End to end through launch.py on the CPU config (slow): the built-in tiny model learns the arithmetic task with
ADRPO, and a run killed with SIGKILL after a checkpoint resumes to exactly the parameters of an uninterrupted one.

The SFT model is built once in ``$ADRPO_JAX_CACHE`` (or ~/.cache/adrpo_jax) if absent (~1 min).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from adrpo_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
STEPS = 150


def _env():
    env = dict(os.environ)
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu", "CI": "true",
                "PYTHONUNBUFFERED": "1"})
    return env


def _cmd(workdir, cache, *extra):
    return [sys.executable, "launch.py", "--config=configs/llm_arith.py:cpu", f"--workdir={workdir}",
            f"--config.total_steps={STEPS}", "--config.checkpoint.every_steps=25", "--config.eval_every=75",
            "--config.logging.tensorboard=False", f"--config.compilation_cache_dir={cache}", *extra]


@pytest.mark.slow
def test_cpu_config_learns_and_sigkill_resume_is_exact(tmp_path):
    from adrpo_jax.rl.sft import ensure_tiny_arith_model
    ensure_tiny_arith_model()
    cache = tmp_path / "xla_cache"
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = subprocess.run(_cmd(full, cache), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_jsonl(full / "metrics.jsonl")
    train = [x for x in records if "reward/exact_match_mean" in x]
    first = train[0]["reward/exact_match_mean"]  # steps 1-10
    last = np.mean([x["reward/exact_match_mean"] for x in train[-3:]])
    evals = [x["eval/accuracy"] for x in records if "eval/accuracy" in x]
    print(f"exact-match reward {first:.3f} -> {last:.3f}; eval accuracy {evals}")
    assert last > first + 0.06, (first, last)
    assert evals[-1] > evals[0] + 0.1, evals  # greedy held-out accuracy, step 0 vs the end
    assert (full / "final_model" / "model.safetensors").exists()

    # The same command, SIGKILLed once a checkpoint (step >= 50) is committed, then run again to completion.
    proc = subprocess.Popen(_cmd(killed, cache), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpt = killed / "checkpoints"
            if ckpt.exists() and any(p.name.isdigit() and int(p.name) >= 50 for p in ckpt.iterdir()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed; lower the checkpoint interval"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "final_model").exists()
    r = subprocess.run(_cmd(killed, cache), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from checkpoint step" in r.stderr
    a = load_file(str(full / "final_model" / "model.safetensors"))
    b = load_file(str(killed / "final_model" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    steps = [x["step"] for x in read_jsonl(killed / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
