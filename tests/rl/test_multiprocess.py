"""Two processes on 127.0.0.1 (2 CPU devices each, ``jax.distributed.initialize``) running 3 RL steps on a
(data=2, fsdp=2) mesh == one process with 4 devices on the same mesh (slow)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from adrpo_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               CI="true", PYTHONUNBUFFERED="1")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _cmd(workdir, cache, *extra):
    return [sys.executable, "launch.py", "--config=configs/llm_arith.py:cpu", f"--workdir={workdir}",
            "--config.total_steps=3", "--config.log_every=1", "--config.eval_every=3",
            "--config.checkpoint.every_steps=2", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.logging.tensorboard=False",
            "--config.eval.num_examples=30", f"--config.compilation_cache_dir={cache}", *extra]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    from adrpo_jax.rl.sft import ensure_tiny_arith_model
    ensure_tiny_arith_model()
    single = tmp_path / "single"
    r = subprocess.run(_cmd(single, tmp_path / "cache"), cwd=REPO, env=_env(4), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    multi, port = tmp_path / "multi", _free_port()
    procs = []
    for pid in range(2):
        dist = ["--config.distributed.mode=on", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
        procs.append(subprocess.Popen(_cmd(multi, tmp_path / f"cache{pid}", *dist), cwd=REPO, env=_env(2),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = []
    try:
        for proc in procs:
            errs.append(proc.communicate(timeout=600)[1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, err in zip(procs, errs):
        assert proc.returncode == 0, err[-4000:]
    assert "process 1/2, 2 local / 4 global devices" in errs[1]
    rec_s, rec_m = read_jsonl(single / "metrics.jsonl"), read_jsonl(multi / "metrics.jsonl")
    assert [r["step"] for r in rec_m] == [r["step"] for r in rec_s] == [0, 1, 2, 3]
    for a, b in zip(rec_s, rec_m):  # the same prompts, samples and rewards on both layouts
        for key in ("reward_mean", "eval/accuracy", "completion_length_mean", "num_missing_rewards"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (a["step"], key)
    wa = load_file(str(single / "final_model" / "model.safetensors"))
    wb = load_file(str(multi / "final_model" / "model.safetensors"))
    for key in wa:  # gloo and in-process all-reduces sum in different orders: not bit-identical
        np.testing.assert_allclose(wb[key], wa[key], rtol=1e-4, atol=1e-5, err_msg=key)
