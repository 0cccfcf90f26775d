"""A checkpoint save that fails (disk full, simulated by making orbax's array writer raise ENOSPC) leaves the
previous checkpoint intact and stops the run with a clear CheckpointSaveError (launch.py: exit 1, one line).

Root ignores permission bits and orbax replaces a file that sits where the step directory goes, so the failure
is simulated by monkeypatching ``StandardCheckpointHandler.async_save`` (the write of the ``state`` item).
"""

import errno

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adrpo_jax.train.checkpoint import Checkpointer, CheckpointSaveError
from adrpo_jax.train.config import common_config
from adrpo_jax.train.loop import run_training
from adrpo_jax.train.metrics import read_jsonl

SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])
ABSTRACT = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=SHARDING)}


def _disk_full(monkeypatch):
    def fail(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", fail)


def _steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    state = {"w": jax.device_put(jnp.arange(4.0), SHARDING)}
    ck = Checkpointer(directory, max_to_keep=1)  # max_to_keep=1: a successful save of 2 would delete 1
    assert ck.save(1, state, {"note": "one"})
    _disk_full(monkeypatch)
    with pytest.raises(CheckpointSaveError) as info:
        ck.save(2, {"w": state["w"] + 1.0})
    message = str(info.value)
    assert f"Saving checkpoint step 2 in {directory} failed (OSError: [Errno 28] No space left on device)" in message
    assert "the previous checkpoint (step 1) is intact" in message and "resume from step 1" in message
    ck.close()
    monkeypatch.undo()
    assert _steps(directory) == [1]
    step, restored, meta = Checkpointer(directory).restore_latest(ABSTRACT)
    assert step == 1 and meta["note"] == "one"
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))  # the same bytes read back


def test_failed_first_save_says_there_is_no_previous_checkpoint(tmp_path, monkeypatch):
    _disk_full(monkeypatch)
    ck = Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(CheckpointSaveError, match=r"step 3 .* there is no previous checkpoint\. Stopping"):
        ck.save(3, {"w": jax.device_put(jnp.zeros(4), SHARDING)})
    ck.close()


def test_run_training_stops_at_the_failed_save(tmp_path, monkeypatch):
    config = common_config()
    config.trainer = "flow"
    config.total_steps, config.log_every, config.eval_every = 6, 2, 0
    config.checkpoint.every_steps, config.checkpoint.async_save = 2, False
    config.logging.tensorboard = False
    config.logging.progress_bar = False
    calls = []

    def train_step(step, state):
        calls.append(step)
        if step == 2:  # the save of step 2 succeeded; the disk is full from now on
            _disk_full(monkeypatch)
        return {"w": state["w"] + 1.0}, {"loss": jnp.float32(step)}

    with pytest.raises(CheckpointSaveError, match=r"step 4 .*the previous checkpoint \(step 2\) is intact"):
        run_training(config=config, workdir=tmp_path, init_state=lambda: {"w": jax.device_put(jnp.zeros(4), SHARDING)},
                     abstract_state=ABSTRACT, train_step=train_step)
    monkeypatch.undo()
    assert calls == [0, 1, 2, 3]  # stopped right at the failed save of step 4
    assert _steps(tmp_path / "checkpoints") == [2]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [2, 4]
    step, restored, _ = Checkpointer(tmp_path / "checkpoints").restore_latest(ABSTRACT)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(4, 2.0))
