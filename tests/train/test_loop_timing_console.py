"""run_training: train-step timing without evaluation / checkpoint time (issue 18 item 8), the final async commit
inside the preemption guard (item 9), the configurable console line and the progress bar's postfix (issue 16)."""

import io
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from adrpo_jax.train.checkpoint import Checkpointer
from adrpo_jax.train.config import ConfigError, validate_common_config
from adrpo_jax.train.loop import run_training
from adrpo_jax.train.metrics import format_console, read_jsonl

from tests.train.test_loop import ABSTRACT, SHARDING
from tests.train.test_loop import make_config as _loop_config


def make_config(**overrides):
    """test_loop's toy config, shorter: 4 steps, a record and an eval every 2, a checkpoint every step."""
    return _loop_config(**{"total_steps": 4, "log_every": 2, "eval_every": 2, "checkpoint__every_steps": 1,
                           **overrides})


def init():
    return {"w": jax.device_put(jnp.float32(0.0), SHARDING)}


def make_step(sleep=0.0):
    def train_step(step, state):
        time.sleep(sleep)
        return {"w": state["w"] + 1.0}, {"adv_clip_fraction": 0.5, "loss": jnp.float32(step), "n": 2,
                                         "reward_mean": 0.25, "kl_mean": 0.125}
    return train_step


class SlowCheckpointer(Checkpointer):
    def save(self, step, state, meta=None, *, force=False):
        time.sleep(0.5)
        return super().save(step, state, meta, force=force)


def test_step_time_and_throughput_exclude_eval_and_checkpoint_time(tmp_path):
    """Steps of 0.05 s, an eval of 1 s every 2 steps and a 0.5 s save after every step: step_time_s is the step's
    ~0.05 s (the pre-fix loop logged ~0.8 s: (2 x 0.05 + 1 + 0.5) / 2), eval and save times are logged on their
    own. Sleeps, so that the bounds hold on a loaded machine."""
    def eval_step(step, state):
        time.sleep(1.0)
        return {"eval/w": state["w"]}

    config = make_config()
    with SlowCheckpointer(tmp_path / "checkpoints", save_every=1) as ck:
        run_training(config=config, workdir=tmp_path, init_state=init, abstract_state=ABSTRACT,
                     train_step=make_step(0.05), eval_step=eval_step, throughput_keys=("n",), checkpointer=ck)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert 0.04 < r["step_time_s"] < 0.4, r  # the train step alone (pre-fix >= 0.8)
        assert r["steps_per_sec"] > 2.5 and r["n_per_sec"] > 5.0, r  # ~20 and ~40 (pre-fix <= 1.25 and 2.5)
        assert 1.0 <= r["time/eval"] < 1.5, r
    assert 0.5 <= records[0]["time/checkpoint"] < 1.0  # the save after step 1 (that of step 2 follows the record)
    assert 1.0 <= records[1]["time/checkpoint"] < 1.5  # the saves after steps 2 and 3


def test_no_checkpoint_or_eval_time_key_without_a_save_or_an_eval(tmp_path):
    config = make_config(eval_every=0, checkpoint__every_steps=100)
    run_training(config=config, workdir=tmp_path, init_state=init, abstract_state=ABSTRACT, train_step=make_step())
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert "time/eval" not in records[0] and "time/checkpoint" not in records[0]


class SignalOnFinalCommit(Checkpointer):
    """Sends SIGTERM to this process when the commit of the final (async) checkpoint starts."""

    def __init__(self, *args, final_step, **kwargs):
        super().__init__(*args, **kwargs)
        self.final_step, self.sent, self.saved_steps = final_step, False, []

    def save(self, step, state, meta=None, *, force=False):
        saved = super().save(step, state, meta, force=force)
        if saved:
            self.saved_steps.append(step)
        return saved

    def wait(self):
        if not self.sent and self.final_step in self.saved_steps:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        super().wait()


def test_sigterm_during_the_final_async_commit_is_held_by_the_guard(tmp_path):
    """A SIGTERM while the last async checkpoint is committed: the pre-fix loop waited after the guard was gone,
    so the signal reached the default action (exit 143, N.orbax-checkpoint-tmp left). Here a stand-in handler
    raises if the signal gets past the guard."""
    def outside_guard(signum, frame):
        raise RuntimeError("SIGTERM reached the handler outside the preemption guard")

    previous = signal.signal(signal.SIGTERM, outside_guard)
    try:
        config = make_config(eval_every=0, checkpoint__every_steps=2, checkpoint__async_save=True)
        ck = SignalOnFinalCommit(tmp_path / "checkpoints", save_every=2, async_save=True, final_step=4)
        with ck:
            result = run_training(config=config, workdir=tmp_path, init_state=init, abstract_state=ABSTRACT,
                                  train_step=make_step(), checkpointer=ck)
        assert ck.sent and result.step == 4 and not result.preempted
    finally:
        signal.signal(signal.SIGTERM, previous)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert not [n for n in names if "tmp" in n], names
    with Checkpointer(tmp_path / "checkpoints") as ck2:
        assert ck2.latest_step() == 4


# -- console ---------------------------------------------------------------------------------------------------


def test_console_line_shows_the_watched_metrics_and_the_files_get_all(tmp_path, caplog):
    """The default console line starts with reward_mean, kl_mean (not the alphabetically first keys such as
    adv_clip_fraction); logging.console_keys picks others; metrics.jsonl keeps every key."""
    caplog.set_level(logging.INFO, logger="adrpo_jax.train.loop")
    run_training(config=make_config(eval_every=0), workdir=tmp_path / "a", init_state=init, abstract_state=ABSTRACT,
                 train_step=make_step(), throughput_keys=("n",))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2, lines  # one line per record
    assert lines[0].startswith("step 2/4: reward_mean=0.25 kl_mean=0.125 step_time_s="), lines[0]
    assert "adv_clip_fraction" not in lines[0] and "loss" not in lines[0]
    record = read_jsonl(tmp_path / "a" / "metrics.jsonl")[0]
    assert record["adv_clip_fraction"] == 0.5 and record["loss"] == 0.5 and record["n_per_sec"] > 0

    caplog.clear()
    run_training(config=make_config(eval_every=0, logging__console_keys="loss, n_per_sec"), workdir=tmp_path / "b",
                 init_state=init, abstract_state=ABSTRACT, train_step=make_step(), throughput_keys=("n",))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[0].startswith("step 2/4: loss=0.5 n_per_sec=") and "reward_mean" not in lines[0], lines[0]


def test_console_keys_are_validated():
    config = make_config(logging__console_keys="reward_mean;kl mean")
    with pytest.raises(ConfigError, match="console_keys") as err:
        validate_common_config(config)
    assert err.value.key == "logging.console_keys"
    assert format_console({"time/reward": 0.01234, "reward_mean": 1.0}, None) == "time/reward=0.0123s reward_mean=1"


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_carries_the_reward_and_the_line_goes_above_it(tmp_path, monkeypatch, caplog):
    """With the tqdm bar on, the record's line is written above the bar (not as a log line next to it) and the
    bar's postfix carries reward_mean."""
    monkeypatch.delenv("CI", raising=False)
    fake = _TTY()
    monkeypatch.setattr(sys, "stderr", fake)
    caplog.set_level(logging.INFO, logger="adrpo_jax.train.loop")
    run_training(config=make_config(eval_every=0, logging__progress_bar=True), workdir=tmp_path,
                 init_state=init, abstract_state=ABSTRACT, train_step=make_step())
    out = fake.getvalue()
    assert "step 2/4: reward_mean=0.25" in out and "reward_mean=0.25" in out.split("step 4/4")[-1]
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]  # one line per record, not two


# -- per-phase times of the LLM trainer ------------------------------------------------------------------------

from tests.rl.conftest import tiny_model_dir  # noqa: E402,F401  # pylint: disable=unused-import,wrong-import-position


def slow_reward(prompts, completions, **columns):
    """A reward function that takes 0.3 s (a stand-in for a verifier)."""
    time.sleep(0.3)
    return [float(len(c) % 2) for c in completions]


@pytest.mark.slow  # two tiny RL runs: ~1 min of compilation on 2 cores
@pytest.mark.parametrize("phase_timing", [False, True])
def test_llm_trainer_logs_where_the_step_time_goes(tiny_model_dir, tmp_path, caplog, phase_timing):  # noqa: F811 (the fixture imported above)
    from adrpo_jax.rl.trainer import RLTrainer
    from tests.rl.test_trainer import tiny_config

    caplog.set_level(logging.INFO, logger="adrpo_jax.train.loop")
    config = tiny_config(tiny_model_dir, eval_every=0, **{
        "rl.ref_sync_steps": 0, "rewards.functions": ("tests.train.test_loop_timing_console:slow_reward",),
        "rewards.weights": (1.0,), "logging.phase_timing": phase_timing})
    RLTrainer(config, tmp_path).run()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    phases = ("time/rollout", "time/reward", "time/logprobs", "time/update")
    for r in records:
        assert all(r[k] >= 0 for k in phases), r
        assert r["time/reward"] >= 0.3  # the slow reward function, timed on the host
        assert r["time/rollout"] > 0 and r["time/update"] > 0
        assert sum(r[k] for k in phases) <= r["step_time_s"] + 1e-3, r  # parts of the step, not more
    if phase_timing:
        assert all(r["time/logprobs"] > 0 for r in records)  # the passes' full time
    lines = [m.getMessage() for m in caplog.records if m.getMessage().startswith("step ")]
    assert len(lines) == len(records) and all("time/reward=" in line and "reward_mean=" in line for line in lines)


def test_log_records_go_above_the_bar_while_it_is_shown(tmp_path, monkeypatch):
    """A terminal log handler (absl's in launch.py) writes through tqdm.write while the bar is shown (its lines are
    not glued to the bar), and gets its stream back afterwards."""
    monkeypatch.delenv("CI", raising=False)
    fake = _TTY()
    monkeypatch.setattr(sys, "stderr", fake)
    handler = logging.StreamHandler(fake)
    logging.getLogger().addHandler(handler)
    seen = []
    step = make_step()

    def train_step(i, state):
        seen.append(type(handler.stream).__name__)
        logging.getLogger("some.module").warning("a log line at step %d", i)
        return step(i, state)

    try:
        run_training(config=make_config(eval_every=0, logging__progress_bar=True), workdir=tmp_path,
                     init_state=init, abstract_state=ABSTRACT, train_step=train_step)
    finally:
        logging.getLogger().removeHandler(handler)
    assert seen == ["_TqdmStream"] * 4 and handler.stream is fake
    out = fake.getvalue()
    assert "\ra log line at step 1\n" in out  # tqdm.write: the bar's line cleared (\r), then the log line
