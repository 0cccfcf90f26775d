"""End to end through launch.py on the CPU config (slow): the built-in tiny model learns the arithmetic task with
ADRPO; a run killed with SIGKILL after a checkpoint, and a run stopped by SIGTERM whose newest checkpoint is then
truncated, each resume to exactly the parameters of an uninterrupted one.

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
# 300 steps: the held-out eval problems are distinct and never trained on (issue 28), so the gain is smaller than on
# the older overlapping set; at 300 steps measured eval 0.262 -> 0.324 / 0.328 / 0.410 / 0.379 (steps 0-300, every
# 75) and the exact-match reward 0.18 -> 0.32 (last three logs). 150 steps gave +0.066 eval, too close to noise.
STEPS = 300


def _env():
    env = dict(os.environ)
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu", "CI": "true",
                "PYTHONUNBUFFERED": "1"})
    return env


def _cmd(workdir, cache, *extra):
    return [sys.executable, "launch.py", "--config=configs/llm_arith.py:cpu", f"--workdir={workdir}",
            f"--config.total_steps={STEPS}", "--config.checkpoint.every_steps=25", "--config.eval_every=75",
            "--config.logging.tensorboard=False", f"--config.compilation_cache_dir={cache}", *extra]


def _final_weights(workdir):
    return load_file(str(workdir / "final_model" / "model.safetensors"))


def _assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted reference run: ``(workdir, xla cache dir)``."""
    from adrpo_jax.rl.sft import ensure_tiny_arith_model
    ensure_tiny_arith_model()
    root = tmp_path_factory.mktemp("e2e")
    cache, full = root / "xla_cache", root / "full"
    r = subprocess.run(_cmd(full, cache), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return full, cache


def _start_and_signal(cmd, workdir, min_checkpoint, sig):
    """Starts ``cmd``, sends ``sig`` once a checkpoint of step >= ``min_checkpoint`` is committed; returns
    (exit code, stderr)."""
    log = workdir.parent / f"{workdir.name}.{sig.name}.log"  # a file, not a pipe: a full pipe would block the run
    with open(log, "w", encoding="utf-8") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpt = workdir / "checkpoints"
            if ckpt.exists() and any(p.name.isdigit() and int(p.name) >= min_checkpoint for p in ckpt.iterdir()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be stopped; lower the checkpoint interval"
        proc.send_signal(sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, log.read_text(encoding="utf-8")


@pytest.mark.slow
def test_cpu_config_learns_and_sigkill_resume_is_exact(uninterrupted, tmp_path):
    full, cache = uninterrupted
    killed = tmp_path / "killed"
    records = read_jsonl(full / "metrics.jsonl")
    train = [x for x in records if "reward/exact_match_mean" in x]
    first = train[0]["reward/exact_match_mean"]  # steps 1-10
    last = np.mean([x["reward/exact_match_mean"] for x in train[-3:]])
    evals = [x["eval/accuracy"] for x in records if "eval/accuracy" in x]
    print(f"exact-match reward {first:.3f} -> {last:.3f}; eval accuracy {evals}")
    assert last > first + 0.08, (first, last)
    assert np.mean(evals[-2:]) > evals[0] + 0.08, evals  # greedy held-out accuracy: step 0 vs the last two evals
    assert (full / "final_model" / "model.safetensors").exists()

    # The same command, SIGKILLed once a checkpoint (step >= 50) is committed, then run again to completion.
    code, _ = _start_and_signal(_cmd(killed, cache), killed, 50, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (killed / "final_model").exists()
    r = subprocess.run(_cmd(killed, cache), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from checkpoint step" in r.stderr
    _assert_bit_identical(_final_weights(full), _final_weights(killed))
    steps = [x["step"] for x in read_jsonl(killed / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


@pytest.mark.slow
def test_sigterm_then_truncated_checkpoint_resume_is_exact(uninterrupted, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint of that step is written, exit 0. Then the newest
    checkpoint's files are truncated (a half-written save): the re-run warns, falls back to the previous
    checkpoint and still ends bit-identical to the uninterrupted run, with one metrics line per step."""
    full, cache = uninterrupted
    run = tmp_path / "sigterm"
    code, err = _start_and_signal(_cmd(run, cache), run, 25, signal.SIGTERM)
    assert code == 0, err[-3000:]
    assert "Preempted (SIGTERM) at step" in err
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < STEPS and not (run / "final_model").exists()
    newest = run / "checkpoints" / str(saved[-1])
    damaged = 0
    for f in sorted(newest.rglob("*")):
        if f.is_file() and f.stat().st_size > 64:
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
            damaged += 1
    assert damaged
    r = subprocess.run(_cmd(run, cache), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "corrupted or incomplete" in r.stderr
    if len(saved) > 1:
        assert f"Resumed from checkpoint step {saved[-2]}" in r.stderr
    _assert_bit_identical(_final_weights(full), _final_weights(run))
    steps = [x["step"] for x in read_jsonl(run / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
