"""The LLM trainer in-process on a tiny random model (8 forced CPU devices), and launch.py's config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from adrpo_jax.rl.config import add_llm_config
from adrpo_jax.rl.rewards import RewardFunctionError
from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.config import add_common_config
from adrpo_jax.train.metrics import read_jsonl

import ml_collections

REPO = Path(__file__).resolve().parents[2]

REQUIRED_METRICS = ("reward_mean", "reward_std", "reward/exact_match_mean", "reward/sometimes_none_mean",
                    "advantage_mean", "advantage_std", "advantage_min", "advantage_max", "kl_mean", "beta_eff_mean",
                    "beta_eff_min", "beta_eff_max", "adv_clip_fraction", "clip_fraction", "entropy_mean",
                    "completion_length_mean", "completion_length_min", "completion_length_max",
                    "truncated_fraction", "zero_std_group_fraction", "num_missing_rewards", "pg_loss", "kl_term",
                    "loss", "tokens_per_sec", "step_time_s", "learning_rate", "ref_synced", "grad_norm")


def sometimes_none(prompts, completions, **columns):
    """A TRL-style reward that does not apply to every sample (None) -- and NaN for one."""
    out = [None if i % 4 == 0 else float(len(c) % 2) for i, c in enumerate(completions)]
    out[1] = float("nan")
    return out


def always_raises(prompts, completions, **columns):
    raise KeyError("boom")


def tiny_config(model_dir, **overrides):
    config = add_llm_config(add_common_config(ml_collections.ConfigDict()))
    config.model.path = model_dir
    config.total_steps = 2
    config.log_every = 1
    config.eval_every = 2
    config.checkpoint.every_steps = 1
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    config.optim.learning_rate = 1e-2
    config.sampling.max_prompt_length = 6
    config.sampling.max_new_tokens = 4
    config.rl.num_prompts_per_step = 4
    config.rl.group_size = 2
    config.rl.ref_sync_steps = 2
    config.rewards.functions = ("exact_match", "tests.rl.test_trainer:sometimes_none")
    config.rewards.weights = (1.0, 0.5)
    config.eval.num_examples = 10
    for key, value in overrides.items():
        node = config
        *parts, last = key.split(".")
        for part in parts:
            node = node[part]
        node[last] = value
    return config


def test_trainer_end_to_end_tiny(tiny_model_dir, tmp_path):
    assert jax.device_count() == 8
    trainer = RLTrainer(tiny_config(tiny_model_dir), tmp_path)
    assert trainer.ref_in_state and trainer.layout["batch_size"] == 8
    result = trainer.run()
    assert result["step"] == 2 and not result["preempted"]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2] and "eval/accuracy" in records[0]
    for key in REQUIRED_METRICS:
        assert key in records[-1], key
    assert records[-1]["ref_synced"] == 1.0 and records[1]["ref_synced"] == 0.0
    assert records[1]["num_missing_rewards"] >= 1  # the NaN sample (and rows where every function gave None)
    assert all(np.isfinite(records[-1][k]) for k in ("loss", "kl_mean", "entropy_mean"))
    assert 0 < records[-1]["perf/update_mfu"] < 1 and 0 < records[-1]["perf/rollout_mbu"] < 1  # of this CPU's peaks
    state = trainer.result.state  # a hard reference refresh at the last step: the reference *is* the policy
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state["ref_params"])):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert {s["step"] for s in samples} == {1, 2} and all("completion" in s for s in samples)


@pytest.mark.slow
def test_larger_total_steps_resumes(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, eval_every=0, **{"rl.ref_sync_steps": 0})
    RLTrainer(config, tmp_path).run()
    resumed = RLTrainer(tiny_config(tiny_model_dir, total_steps=3, eval_every=0, **{"rl.ref_sync_steps": 0}),
                        tmp_path).run()
    assert resumed["resumed_from"] == 2 and resumed["step"] == 3
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_reward_function_errors_fail_fast_naming_the_sample(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, eval_every=0)
    config.rewards.functions = ("tests.rl.test_trainer:always_raises",)
    config.rewards.weights = ()
    with pytest.raises(RewardFunctionError, match=r"'always_raises' raised KeyError: 'boom' on sample 0 of 8"):
        RLTrainer(config, tmp_path).run()


def test_launch_rejects_bad_configs_naming_the_key(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", CI="true")
    base = [sys.executable, "launch.py", "--config=configs/llm_arith.py:cpu", f"--workdir={tmp_path}"]
    r = subprocess.run(base + ["--config.rl.kl_placement=reward"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "`rl.adaptive`=True cannot be combined with `rl.kl_placement`='reward'" in r.stderr
    r = subprocess.run(base + ["--config.rl.num_prompts_per_step=3", "--config.rl.group_size=3"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "must be divisible by the data-parallel size 2" in r.stderr, r.stderr[-800:]
    r = subprocess.run(base + ["--config.rl.betaa=0.1"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "`config.rl.betaa`" in r.stderr
