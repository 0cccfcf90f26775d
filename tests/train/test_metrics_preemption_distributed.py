"""MetricWriter, PreemptionGuard, distributed-environment detection and the compilation cache switch."""

import json
import math
import os
import signal

import jax
import numpy as np
import pytest

from adrpo_jax.train import distributed
from adrpo_jax.train.config import ConfigError
from adrpo_jax.train.metrics import MetricWriter, ProgressBar, read_jsonl, to_python_scalar
from adrpo_jax.train.preemption import PreemptionGuard

LOGGING = {"jsonl": True, "tensorboard": True, "wandb": False}


def test_jsonl_lines_values_and_tensorboard(tmp_path):
    with MetricWriter(tmp_path, LOGGING, is_primary=True) as writer:
        writer.write(1, {"loss": jax.numpy.float32(0.25), "count": np.int32(3), "ok": np.bool_(True)})
        writer.write(2, {"loss": float("nan"), "g": float("inf"), "h": -float("inf")})
        writer.write_images(2, {"sample": np.zeros((4, 4, 3), np.float32)})
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 0.25, "count": 3, "ok": True},
        {"step": 2, "loss": "NaN", "g": "Infinity", "h": "-Infinity"}]
    assert math.isnan(float(json.loads(lines[1])["loss"]))
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    with pytest.raises(ValueError, match="must be a scalar"):
        to_python_scalar(np.ones(3))


def test_truncate_after_drops_later_lines_and_torn_tail(tmp_path):
    writer = MetricWriter(tmp_path, {"jsonl": True}, is_primary=True)
    for step in (5, 10, 15, 20):
        writer.write(step, {"loss": step / 10})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "lo')  # a line torn by a kill
    writer = MetricWriter(tmp_path, {"jsonl": True}, is_primary=True)
    writer.truncate_after(10)
    writer.write(15, {"loss": 9.0})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(5, 0.5), (10, 1.0),
                                                                                           (15, 9.0)]


def test_non_primary_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricWriter(workdir, LOGGING, is_primary=False)
    writer.write(1, {"loss": 1.0})
    writer.truncate_after(0)
    writer.close()
    assert not workdir.exists()
    assert not ProgressBar(10, is_primary=False).active


def test_wandb_missing_is_a_warning(tmp_path):
    try:
        import wandb  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    with pytest.warns(RuntimeWarning, match="wandb"):
        MetricWriter(tmp_path, {"jsonl": True, "wandb": True}, is_primary=True).close()


def test_preemption_guard_flags_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.should_stop(2) and guard.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERM: still just the flag
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # SIGINT after a request: abort at once
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "8"}, "SLURM_NTASKS=8"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "TPU_WORKER_HOSTNAMES (4 hosts)"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE=2"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234"),
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES=2"),
])
def test_detect_multiprocess_environment(env, expected):
    assert distributed.detect_multiprocess_environment(env) == expected


def test_maybe_initialize_modes_without_multiprocess_env():
    assert distributed.maybe_initialize_distributed("off", env={"SLURM_NTASKS": "4"}) is False
    assert distributed.maybe_initialize_distributed("auto", env={}) is False
    with pytest.raises(ConfigError, match=r"`distributed.mode` must be one of"):
        distributed.maybe_initialize_distributed("sometimes")


def test_setup_compilation_cache(tmp_path):
    old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        assert distributed.setup_compilation_cache("") is False
        assert distributed.setup_compilation_cache(tmp_path / "cache") is True
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
