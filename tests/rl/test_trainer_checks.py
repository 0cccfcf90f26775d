"""Issue 28, the trainer side: data files checked before the model loads (item 20), a step whose every reward is
missing stops (item 19), config.json only after a first successful step (item 22). Each test fails on the code
before these were wired (the checks existed but nothing called them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from adrpo_jax.recipe import runner
from adrpo_jax.rl import rewards as rewards_lib
from adrpo_jax.rl.rewards import AllRewardsMissingError, RewardComputer
from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.config import ConfigError
from tests.rl.conftest import write_jsonl
from tests.rl.test_trainer import tiny_config

REPO = Path(__file__).resolve().parents[2]


def none_reward(prompts, completions, **columns):
    """A reward that never applies (returns None for every sample)."""
    return [None] * len(completions)


def test_text_data_errors_surface_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    """A jsonl whose prompt field is not data.prompt_key: one ConfigError naming the setting, before any weight."""
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "#### 2"}] * 4)
    config = tiny_config(tiny_model_dir, **{"data.source": "jsonl", "data.path": path, "eval_every": 0})

    def heavy(self):
        raise AssertionError("the model was loaded before the data files were checked")

    monkeypatch.setattr(RLTrainer, "_setup_model", heavy)
    with pytest.raises(ConfigError, match=r"data\.prompt_key=prompt") as err:
        RLTrainer(config, tmp_path)
    assert err.value.key == "data.prompt_key"


def test_checked_sources_are_reused(tiny_model_dir, tmp_path, monkeypatch):
    """The sources read by the start-of-run check are the trainer's (the files are not read twice)."""
    from adrpo_jax.rl import data as data_lib
    rows = [{"question": f"{i}+1=", "answer": f"#### {i + 1}"} for i in range(8)]
    config = tiny_config(tiny_model_dir, **{"data.source": "jsonl", "eval.num_examples": 3,
                                            "data.path": write_jsonl(tmp_path / "train.jsonl", rows),
                                            "eval.path": write_jsonl(tmp_path / "eval.jsonl", rows)})
    made = []
    real = data_lib.JsonlPromptSource

    def counting(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(data_lib, "JsonlPromptSource", counting)
    monkeypatch.setattr(RLTrainer, "_set_programs", lambda self, programs: None)  # no jit needed here
    trainer = RLTrainer(config, tmp_path)
    assert sorted(made) == sorted([str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")])
    assert trainer.iterator.source is trainer.data_sources["data.path"] and trainer.evaluator.n == 3


@pytest.mark.slow  # a rollout: the sampler and log-prob passes compile
def test_every_reward_missing_stops_the_run(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, eval_every=0)
    config.rewards.functions, config.rewards.weights = ("tests.rl.test_trainer_checks:none_reward",), ()
    with pytest.raises(AllRewardsMissingError, match=r"step 1: all 8 samples miss their reward: 'none_reward'"):
        RLTrainer(config, tmp_path).run()


def test_missing_rewards_are_summed_over_processes(monkeypatch):
    """Several processes: the step stops only when the rows of every process miss their rewards."""
    from jax.experimental import multihost_utils
    trainer = object.__new__(RLTrainer)
    trainer.rewards = RewardComputer(("tests.rl.test_trainer_checks:none_reward",), warn_missing=False)
    scored = trainer.rewards(["p"] * 4, ["c"] * 4)
    assert scored.num_missing == 4
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    others = {"counts": [0, 4]}
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.stack([np.asarray(x), np.asarray(others["counts"])]))
    trainer.check_rewards(scored, 3)  # the other process has all its rewards: go on
    others["counts"] = [4, 4]
    with pytest.raises(AllRewardsMissingError, match="step 3: all 8 samples"):
        trainer.check_rewards(scored, 3)
    trainer.rewards = RewardComputer(("tests.rl.test_trainer_checks:none_reward",), warn_missing=False,
                                     stop_when_all_missing=False)
    trainer.check_rewards(scored, 3)  # rewards.stop_when_all_missing=False: logged, not raised


def test_reward_computer_follows_the_config_key(tiny_model_dir, tmp_path, monkeypatch):
    config = tiny_config(tiny_model_dir, eval_every=0, **{"rewards.stop_when_all_missing": False})
    seen = {}
    real = rewards_lib.RewardComputer.__init__

    def init(self, *args, **kwargs):
        seen.update(kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(rewards_lib.RewardComputer, "__init__", init)
    monkeypatch.setattr(RLTrainer, "_set_programs", lambda self, programs: None)  # no jit needed here
    trainer = RLTrainer(config, tmp_path)
    assert seen["stop_when_all_missing"] is False and trainer.rewards.stop_when_all_missing is False


# ---- config.json (item 22) ----------------------------------------------------------------------------------


class _FakeRecipe:
    """A recipe whose run calls train_step twice (the loop's contract), failing at the first step on demand."""

    name = "fake"
    fail = False

    def __init__(self, config, workdir):
        self.workdir = workdir

    def train_step(self, step, state):
        if self.fail:
            raise RuntimeError("out of memory at the first step")
        return state, {}

    def run(self):
        state = {}
        for step in range(2):
            state, _ = self.train_step(step, state)
            assert os.path.exists(os.path.join(self.workdir, "config.json"))  # written after step 1
        return {"step": 2}


def test_config_json_is_written_after_the_first_step(tmp_path, monkeypatch):
    import ml_collections

    from adrpo_jax.train.config import add_common_config
    monkeypatch.setattr(runner, "resolve_recipe", lambda trainer: _FakeRecipe)
    config = add_common_config(ml_collections.ConfigDict())
    config.trainer = "llm"
    _FakeRecipe.fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.train(config, tmp_path)
    assert not (tmp_path / "config.json").exists()  # a failed start leaves nothing behind
    _FakeRecipe.fail = False
    assert runner.train(config, tmp_path) == {"step": 2}
    assert json.loads((tmp_path / "config.json").read_text())["trainer"] == "llm"
    assert runner.warn_config_changes(config, tmp_path) == []
    config.seed = 7
    assert [d[0] for d in runner.warn_config_changes(config, tmp_path)] == ["seed"]


@pytest.mark.slow
def test_launch_retry_after_a_failed_start_does_not_warn(tiny_model_dir, tmp_path):
    """The new user's 1.4 -> 1.5: a start that fails on its data leaves no config.json; the corrected retry runs
    without the "config differs from the previous run" warning."""
    rows = [{"prompt": f"{i}+1=", "answer": f"#### {i + 1}"} for i in range(16)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    workdir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", CI="true")
    base = [sys.executable, "launch.py", "--config=configs/llm_arith.py:cpu", f"--workdir={workdir}",
            f"--config.model.path={tiny_model_dir}", "--config.data.source=jsonl", f"--config.data.path={path}",
            f"--config.eval.path={path}", "--config.eval.num_examples=4", "--config.total_steps=1",
            "--config.eval_every=0", "--config.rl.num_prompts_per_step=2", "--config.rl.group_size=2",
            "--config.logging.tensorboard=False", "--config.sampling.max_new_tokens=2"]
    r = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "data.prompt_key" in r.stderr, r.stderr[-3000:]
    assert not (workdir / "config.json").exists()
    r = subprocess.run([*base, "--config.data.prompt_key=prompt"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "differs from the previous run" not in r.stderr
    assert json.loads((workdir / "config.json").read_text())["data"]["prompt_key"] == "prompt"
