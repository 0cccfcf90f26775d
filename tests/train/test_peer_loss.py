"""A lost process of a multi-process run: distributed.PeerWatchdog reports it in one line and exits 75.

Fast: two watchdogs on an in-memory key-value store (the coordination service's API). Slow: two launch.py
processes on 127.0.0.1 (toy trainer), SIGKILL of process 1, the survivor exits within the bound.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adrpo_jax.train import distributed
from adrpo_jax.train.config import ConfigError, common_config, validate_common_config

REPO = Path(__file__).resolve().parents[2]


class FakeStore:
    """The subset of jax's DistributedRuntimeClient the watchdog uses; ``fail`` makes every call raise."""

    def __init__(self):
        self.data, self.lock, self.fail = {}, threading.Lock(), False

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            if self.fail:
                raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.data[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            if self.fail:
                raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
            return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))


def _watchdog(store, index, lost, **kw):
    return distributed.PeerWatchdog(2.0, client=store, process_index=index, process_count=2, interval_s=0.1,
                                    on_lost=lost.append, **kw)


def _wait_for(cond, timeout):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def test_a_silent_peer_is_reported_with_step_and_command(tmp_path):
    (tmp_path / "ckpt" / "5").mkdir(parents=True)
    (tmp_path / "ckpt" / "10").mkdir()
    (tmp_path / "ckpt" / "15.orbax-checkpoint-tmp-1").mkdir()  # an uncommitted save does not count
    store, lost0, lost1 = FakeStore(), [], []
    w0 = _watchdog(store, 0, lost0, checkpoint_dir=tmp_path / "ckpt", command=["python", "launch.py", "--x=a b"])
    w1 = _watchdog(store, 1, lost1)
    w0.start(), w1.start()
    time.sleep(1.0)
    assert not lost0 and not lost1  # both beating
    w1._stop.set()  # process 1 dies: its heartbeat stops without a "done" mark
    start = time.monotonic()
    assert _wait_for(lambda: lost0, 6.0), "process 0 did not report the lost peer"
    assert 1.5 < time.monotonic() - start < 4.0  # timeout_s=2 plus at most a few polling intervals
    assert lost0 == [w0.lost]
    line = lost0[0]
    assert "\n" not in line
    assert line.startswith("ERROR process 1 of 2 was lost (no heartbeat for ")
    assert "distributed.heartbeat_timeout_s=2" in line and "exit code 75" in line
    assert f"Last checkpoint: step 10 in {tmp_path / 'ckpt'}" in line
    assert line.endswith("re-run every process's command, e.g. this one: python launch.py '--x=a b'")
    w0.stop()


def test_a_finished_peer_is_not_reported():
    store, lost0, lost1 = FakeStore(), [], []
    w0, w1 = _watchdog(store, 0, lost0).start(), _watchdog(store, 1, lost1).start()
    time.sleep(0.5)
    w1.stop()  # process 1 finished normally: marked done
    time.sleep(3.0)
    assert not lost0
    w0.stop()


def test_an_unreachable_coordinator_is_reported():
    store, lost1 = FakeStore(), []
    _watchdog(store, 1, lost1).start()  # its daemon thread keeps it alive
    time.sleep(0.3)
    store.fail = True
    assert _wait_for(lambda: lost1, 6.0)
    assert lost1[0].startswith("ERROR process 0 (the coordinator) of 2 was lost (the coordination service has been "
                               "unreachable for ")
    assert "No checkpoint directory" in lost1[0]


def test_single_process_runs_no_watchdog_and_bad_timeouts_fail():
    w = distributed.PeerWatchdog(5, client=FakeStore(), process_index=0, process_count=1).start()
    assert w._thread is None
    with pytest.raises(ValueError, match="`timeout_s` must be > 0, got 0"):
        distributed.PeerWatchdog(0, client=FakeStore(), process_index=0, process_count=2)
    config = common_config()
    config.distributed.heartbeat_timeout_s = 1
    with pytest.raises(ConfigError, match="distributed.heartbeat_timeout_s"):
        validate_common_config(config)


# ----------------------------------------------------------------------------------------------------------
# Two real processes
# ----------------------------------------------------------------------------------------------------------


def _env():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", CI="true",
               PYTHONUNBUFFERED="1")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


@pytest.mark.slow  # two JAX processes compiling the toy trainer on 2 cores: ~40-60 s
def test_sigkill_of_process_1_stops_process_0_with_one_line(tmp_path):
    from tests.train.test_launch import _free_port

    timeout_s = 10
    port = _free_port()
    workdir = tmp_path / "run"
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "launch.py", "--config=tests/train/toy_config.py", f"--workdir={workdir}",
               "--config.total_steps=100000", "--config.toy.step_sleep_s=0.05", "--config.eval_every=0",
               "--config.toy.save_final_params=False", "--config.mesh.data=2", "--config.mesh.fsdp=2",
               f"--config.compilation_cache_dir={tmp_path / f'cache{pid}'}", "--config.logging.tensorboard=False",
               "--config.distributed.mode=on", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
               f"--config.distributed.heartbeat_timeout_s={timeout_s}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        ckpt = workdir / "checkpoints"
        deadline = time.time() + 300
        while not (ckpt.is_dir() and distributed.last_checkpoint_step(ckpt)):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == distributed.PEER_LOST_EXIT_CODE, err[-4000:]
    assert elapsed < timeout_s + 15, elapsed  # the bound: the timeout, a polling interval, the start of exit
    lines = [line for line in err.splitlines() if line.startswith("ERROR process 1 of 2 was lost")]
    assert len(lines) == 1, err[-4000:]
    step = distributed.last_checkpoint_step(ckpt)
    assert f"Last checkpoint: step {step} in {ckpt}" in lines[0]
    assert "launch.py --config=tests/train/toy_config.py" in lines[0] and "process_id=0" in lines[0]
    assert "Terminating process because the JAX distributed service" not in err  # no C++ abort
    print(f"survivor exited {elapsed:.1f} s after SIGKILL (heartbeat_timeout_s={timeout_s})")
