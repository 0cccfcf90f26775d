"""run_training in-process with a scalar state: logging means, eval merge, checkpoints, skips, preemption."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.train.config import common_config
from adrpo_jax.train.loop import NonFiniteUpdatesError, run_training
from adrpo_jax.train.metrics import read_jsonl

SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])
ABSTRACT = {"w": jax.ShapeDtypeStruct((), jnp.float32, sharding=SHARDING)}


def make_config(**overrides):
    config = common_config()
    config.trainer = "flow"
    config.total_steps, config.log_every, config.eval_every = 6, 3, 3
    config.checkpoint.every_steps, config.checkpoint.async_save = 2, False
    config.logging.tensorboard = False
    config.logging.progress_bar = False
    for key, value in overrides.items():
        section, _, leaf = key.rpartition("__")
        (config[section] if section else config)[leaf] = value
    return config


class Host:
    """Host-side state (like a data iterator position)."""

    def __init__(self):
        self.position, self.restored = 0, None

    def get(self):
        return {"position": self.position}

    def set(self, state):
        self.restored = dict(state)
        self.position = state["position"]


def make_step(host, skip_from=None, signal_at=None):
    def train_step(step, state):
        host.position += 1
        if signal_at is not None and step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        skipped = skip_from is not None and step >= skip_from
        new = state if skipped else {"w": state["w"] + 1.0}
        return new, {"loss": jnp.float32(step), "n": 2, "skipped": jnp.bool_(skipped), "hist": np.ones(3)}
    return train_step


def init():
    return {"w": jax.device_put(jnp.float32(0.0), SHARDING)}


def test_logs_means_eval_checkpoints_and_resume(tmp_path):
    host = Host()
    evals = []

    def eval_step(step, state):
        evals.append(step)
        return {"eval/w": state["w"]}

    result = run_training(config=make_config(total_steps=3), workdir=tmp_path, init_state=init, abstract_state=ABSTRACT,
                          train_step=make_step(host), get_host_state=host.get, set_host_state=host.set,
                          eval_step=eval_step, learning_rate_fn=lambda s: 0.5 * s, throughput_keys=("n",))
    assert result.step == 3 and not result.preempted and result.resumed_from is None
    assert float(result.state["w"]) == 3.0 and result.metrics["loss"] == 1.0
    host2 = Host()
    result = run_training(config=make_config(), workdir=tmp_path, init_state=init, abstract_state=ABSTRACT,
                          train_step=make_step(host2), get_host_state=host2.get, set_host_state=host2.set,
                          eval_step=eval_step, learning_rate_fn=lambda s: 0.5 * s, throughput_keys=("n",))
    assert result.resumed_from == 3 and host2.restored == {"position": 3} and float(result.state["w"]) == 6.0
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6]
    assert records[0]["loss"] == 1.0 and records[1]["loss"] == 4.0  # means over the 3 steps of each interval
    assert records[1]["eval/w"] == 6.0 and records[1]["learning_rate"] == 3.0
    assert records[1]["n"] == 2.0 and records[1]["n_per_sec"] > 0 and "hist" not in records[1]
    assert records[1]["skipped_steps"] == 0 and evals == [3, 6]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4, 6]


def test_consecutive_skips_stop_after_saving(tmp_path):
    host = Host()
    config = make_config(numerics__max_consecutive_skips=2)
    with pytest.raises(NonFiniteUpdatesError, match=r"2 consecutive steps \(steps 3-4\).*max_consecutive_skips=2"):
        run_training(config=config, workdir=tmp_path, init_state=init, abstract_state=ABSTRACT,
                     train_step=make_step(host, skip_from=2), get_host_state=host.get, set_host_state=host.set)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == 4 and records[-1]["total_skipped_steps"] == 2
    from adrpo_jax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
    with Checkpointer(tmp_path / "checkpoints") as ck:
        step, state, meta = ck.restore_latest(ABSTRACT)
    assert step == 4 and float(state["w"]) == 2.0  # the two skipped steps left the state untouched
    assert meta["loop"] == {"consecutive_skips": 2, "total_skips": 2} and meta["host_state"] == {"position": 4}


def test_sigterm_saves_and_returns_preempted(tmp_path):
    host = Host()
    handler_before = signal.getsignal(signal.SIGTERM)
    result = run_training(config=make_config(), workdir=tmp_path, init_state=init, abstract_state=ABSTRACT,
                          train_step=make_step(host, signal_at=1), get_host_state=host.get, set_host_state=host.set)
    assert result.preempted and result.step == 2 and float(result.state["w"]) == 2.0
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the guard restored the previous handler
    host2 = Host()
    result = run_training(config=make_config(), workdir=tmp_path, init_state=init, abstract_state=ABSTRACT,
                          train_step=make_step(host2), get_host_state=host2.get, set_host_state=host2.set)
    assert result.resumed_from == 2 and host2.restored == {"position": 2} and float(result.state["w"]) == 6.0
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [2, 3, 6]
