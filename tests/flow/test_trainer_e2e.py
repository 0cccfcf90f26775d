"""End to end through launch.py on the CPU config (slow): ADRPO-W2 raises the reward on digits, writes the
before/after sample grid and the final model; a run extended with a larger total_steps, stopped by SIGTERM and
killed by SIGKILL resumes each time to exactly the parameters of an uninterrupted run.

The pre-trained DiT and the classifier are built once in ``$ADRPO_JAX_CACHE`` (or ~/.cache/adrpo_jax) if absent
(~4 min on 2 cores).
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
STEPS = 40


def _env():
    env = dict(os.environ)
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu", "CI": "true",
                "PYTHONUNBUFFERED": "1"})
    return env


def _cmd(workdir, cache, steps=STEPS):
    return [sys.executable, "launch.py", "--config=configs/flow_digits.py:cpu", f"--workdir={workdir}",
            f"--config.total_steps={steps}", "--config.checkpoint.every_steps=5", "--config.eval_every=20",
            "--config.log_every=5", "--config.model.save_final=True", "--config.logging.tensorboard=False",
            "--config.eval.samples_per_prompt=16",  # 320 eval images: cheaper than the demo's 640
            f"--config.compilation_cache_dir={cache}"]


def _run(cmd):
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _start_and_signal(cmd, workdir, min_checkpoint, sig):
    """Starts ``cmd`` and sends ``sig`` once a checkpoint of step >= ``min_checkpoint`` is committed."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpt = workdir / "checkpoints"
            if ckpt.exists() and any(p.name.isdigit() and int(p.name) >= min_checkpoint for p in ckpt.iterdir()):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be stopped; lower the checkpoint interval"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.slow
def test_cpu_config_learns_and_resumes_exactly(tmp_path):
    from adrpo_jax.flow import pretrain
    from adrpo_jax.flow.config import pretrain_config
    from tests.flow.test_trainer import load_config

    cfg = pretrain_config(load_config("cpu"))
    pretrain.pretrain_flow_model(cfg, log_fn=None)  # build the caches outside the timed runs
    pretrain.train_classifier(cfg, log_fn=None)
    cache = tmp_path / "xla_cache"
    full, stopped = tmp_path / "full", tmp_path / "stopped"

    r = _run(_cmd(full, cache))
    records = read_jsonl(full / "metrics.jsonl")
    train = [x for x in records if "reward_mean" in x]
    first, last = train[0]["reward_mean"], np.mean([x["reward_mean"] for x in train[-2:]])
    evals = [(x["step"], x["eval/reward_mean"]) for x in records if "eval/reward_mean" in x]
    print(f"train reward {first:.3f} -> {last:.3f}; eval reward {evals}")
    assert last > first + 0.2, (first, last)
    assert [s for s, _ in evals] == [0, 20, 40] and evals[-1][1] > evals[0][1] + 0.1, evals
    assert records[-1]["eval/w2_bound"] > 0 and records[-1]["eval/frechet_distance"] > 0
    grid = full / "samples_before_after.png"
    assert grid.exists() and grid.stat().st_size > 10_000 and (full / "samples_before.png").exists()
    assert f"Sample grid (before / after fine-tuning): {grid}" in r.stdout
    assert (full / "final_model" / "params.safetensors").exists()

    # The same command with a smaller total_steps, then extended; stopped by SIGTERM (graceful: exit 0, checkpoint)
    # and killed by SIGKILL, re-run each time: the final parameters are bit-identical to the uninterrupted run.
    _run(_cmd(stopped, cache, steps=STEPS // 2))
    assert max(x["step"] for x in read_jsonl(stopped / "metrics.jsonl")) == STEPS // 2
    code, err = _start_and_signal(_cmd(stopped, cache), stopped, STEPS // 2 + 5, signal.SIGTERM)
    assert code == 0, err[-3000:]
    assert "Resumed from checkpoint step 20" in err and "Preempted" in err
    code, err = _start_and_signal(_cmd(stopped, cache), stopped, STEPS - 10, signal.SIGKILL)
    assert code == -signal.SIGKILL
    r = _run(_cmd(stopped, cache))
    assert "Resumed from checkpoint step" in r.stderr
    a = load_file(str(full / "final_model" / "params.safetensors"))
    b = load_file(str(stopped / "final_model" / "params.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    steps = [x["step"] for x in read_jsonl(stopped / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    full_last = [x for x in records if x["step"] == STEPS][0]
    stopped_last = [x for x in read_jsonl(stopped / "metrics.jsonl") if x["step"] == STEPS][0]
    assert full_last["reward_mean"] == stopped_last["reward_mean"]
    assert full_last["eval/reward_mean"] == stopped_last["eval/reward_mean"]
