"""launch.py end to end with the toy trainer, in subprocesses (4 forced CPU devices each).

Covers: config errors naming the key, a full run (metrics.jsonl, checkpoints/, config.json, tb/), resume with
a larger total_steps (bit-identical to an uninterrupted run), SIGTERM -> checkpoint + exit 0 -> bit-identical
resume, consecutive non-finite steps -> error + checkpoint, and (slow) a 2-process run on 127.0.0.1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from adrpo_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
CONFIG = "tests/train/toy_config.py"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A compilation cache shared by this module's runs: only the first run compiles."""
    return tmp_path_factory.mktemp("xla_cache")


def _env(devices: int = 4) -> dict:
    env = dict(os.environ)
    env.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
                "CI": "true", "PYTHONUNBUFFERED": "1"})
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _cmd(workdir, cache_dir, *overrides, config=CONFIG):
    return [sys.executable, "launch.py", f"--config={config}", f"--workdir={workdir}",
            f"--config.compilation_cache_dir={cache_dir}", *overrides]


def launch(workdir, cache_dir, *overrides, devices=4, timeout=300):
    return subprocess.run(_cmd(workdir, cache_dir, *overrides), cwd=REPO, env=_env(devices), capture_output=True,
                          text=True, timeout=timeout)


def final_params(workdir):
    with np.load(Path(workdir) / "final_params.npz") as data:
        return {k: data[k] for k in data.files}


def assert_same_bits(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs"


def steps(workdir):
    return [r["step"] for r in read_jsonl(Path(workdir) / "metrics.jsonl")]


def test_unknown_config_keys_fail_naming_the_key(tmp_path, cache_dir):
    r = launch(tmp_path, cache_dir, "--config.nope=1")
    assert r.returncode != 0 and "Unknown config key `config.nope`" in r.stderr, r.stderr[-2000:]
    r = launch(tmp_path, cache_dir, "--config.optim.beta1=0.5")
    assert r.returncode != 0 and "`config.optim.beta1`" in r.stderr and "b1" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "config.json").exists()


def test_invalid_values_fail_naming_the_key(tmp_path, cache_dir):
    r = launch(tmp_path, cache_dir, "--config.optim.learning_rate=-0.1")
    assert r.returncode == 1 and "ConfigError: `optim.learning_rate` must be > 0.0, got -0.1" in r.stderr, \
        r.stderr[-2000:]
    r = launch(tmp_path, cache_dir, "--config.mesh.data=3")
    assert r.returncode == 1 and "`mesh`: mesh.data=3" in r.stderr and "number of devices (4)" in r.stderr, \
        r.stderr[-2000:]
    r = launch(tmp_path, cache_dir, "--config.toy.batch_size=10")  # trainer-side divisibility check
    assert r.returncode == 1 and "`toy.batch_size`=10 must be divisible by the data-parallel size 4" in r.stderr, \
        r.stderr[-2000:]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir):
    """An uninterrupted 20-step run."""
    workdir = tmp_path_factory.mktemp("reference")
    r = launch(workdir, cache_dir)
    assert r.returncode == 0, r.stderr[-4000:]
    return workdir, r


def test_full_run_outputs(reference_run):
    workdir, r = reference_run
    records = read_jsonl(workdir / "metrics.jsonl")
    assert [rec["step"] for rec in records] == [5, 10, 15, 20]
    assert all(np.isfinite(rec["loss"]) and rec["skipped_steps"] == 0 for rec in records)
    assert "eval/loss" in records[1] and "eval/loss" in records[3] and "eval/loss" not in records[0]
    assert records[-1]["loss"] < records[0]["loss"]
    assert {"step_time_s", "steps_per_sec", "num_samples_per_sec", "learning_rate", "grad_norm"} <= set(records[0])
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [10, 15, 20]
    assert json.loads((workdir / "config.json").read_text())["toy"]["batch_size"] == 16
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert "Training finished at step 20" in r.stderr


def test_resume_with_larger_total_steps_is_bit_identical(tmp_path, cache_dir, reference_run):
    r = launch(tmp_path, cache_dir, "--config.total_steps=10")
    assert r.returncode == 0, r.stderr[-4000:]
    assert steps(tmp_path) == [5, 10]
    r = launch(tmp_path, cache_dir, "--config.total_steps=20")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Resumed from checkpoint step 10" in r.stderr
    assert steps(tmp_path) == [5, 10, 15, 20]
    assert_same_bits(final_params(tmp_path), final_params(reference_run[0]))
    # the same command once more: nothing left to do
    r = launch(tmp_path, cache_dir, "--config.total_steps=20")
    assert r.returncode == 0 and "already finished at step 20" in r.stderr
    # a different model config in the same workdir: warning about config.json, then a clear mismatch error
    r = launch(tmp_path, cache_dir, "--config.total_steps=30", "--config.toy.hidden=32")
    assert r.returncode == 1, r.stderr[-4000:]
    assert "differs from the previous run" in r.stderr and "toy.hidden: 16 -> 32" in r.stderr
    assert ("CheckpointMismatchError: Checkpoint step 20 in " in r.stderr and "parameter `params/hidden/bias` has "
            "shape (16,) float32 in the checkpoint but (32,) float32 now" in r.stderr), r.stderr[-3000:]


def test_sigterm_checkpoints_exits_zero_and_resumes_bit_identically(tmp_path, cache_dir, reference_run):
    proc = subprocess.Popen(_cmd(tmp_path, cache_dir, "--config.toy.step_sleep_s=0.15"), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.time() < deadline, "no metrics line in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert "Preempted (SIGTERM) at step" in err
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 5 <= saved[-1] < 20, saved
    assert not (tmp_path / "final_params.npz").exists()
    r = launch(tmp_path, cache_dir)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"Resumed from checkpoint step {saved[-1]}" in r.stderr
    assert steps(tmp_path) == [5, 10, 15, 20]  # one line per logged step despite the interruption
    assert_same_bits(final_params(tmp_path), final_params(reference_run[0]))


def test_consecutive_non_finite_steps_stop_with_error_and_checkpoint(tmp_path, cache_dir):
    r = launch(tmp_path, cache_dir, "--config.toy.nan_from_step=3", "--config.numerics.max_consecutive_skips=4",
               "--config.optim.grad_accum_steps=2")  # also runs the micro-batch path end to end
    assert r.returncode == 1, r.stderr[-4000:]
    assert "NonFiniteUpdatesError: 4 consecutive steps (steps 4-7) had a non-finite loss or gradient" in r.stderr
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == 7
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 7 and last["total_skipped_steps"] == 4 and last["loss"] == "NaN"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path, cache_dir):
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2"]
    single = tmp_path / "single"
    r = launch(single, cache_dir, *mesh)
    assert r.returncode == 0, r.stderr[-4000:]

    multi = tmp_path / "multi"
    port = _free_port()
    procs = []
    for pid in range(2):
        dist = ["--config.distributed.mode=on", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
        procs.append(subprocess.Popen(_cmd(multi, tmp_path / f"cache{pid}", *mesh, *dist), cwd=REPO,
                                      env=_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=400)[1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, err in zip(procs, outs):
        assert proc.returncode == 0, err[-4000:]
    assert "process 0/2, 2 local / 4 global devices" in outs[0]
    assert "process 1/2, 2 local / 4 global devices" in outs[1]
    assert "step 20/20" in outs[0] and "step 20/20" not in outs[1]  # logging on process 0 only
    assert steps(multi) == [5, 10, 15, 20]  # one writer
    saved = sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [10, 15, 20]
    a, b = final_params(multi), final_params(single)
    assert sorted(a) == sorted(b)
    for key in a:
        # not bit-identical: gloo and in-process all-reduces sum in different orders (measured max |diff| 1.8e-7)
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
