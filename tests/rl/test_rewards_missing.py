"""Issue 28 item 19: missing rewards are visible (a console warning with the fraction and the function) and a
step where every reward is missing stops the run (configurable)."""

import logging

import numpy as np
import pytest

from adrpo_jax.rl.rewards import AllRewardsMissingError, RewardComputer, check_rewards_present


def none_reward(prompts, completions, **_):
  return [None] * len(completions)


def half_reward(prompts, completions, **_):
  return [1.0 if i % 2 else float("nan") for i in range(len(completions))]


def test_partial_missing_warns_with_fraction_and_function(caplog):
  computer = RewardComputer([half_reward])
  with caplog.at_level(logging.WARNING, logger="adrpo_jax.rl.rewards"):
    out = computer(["p"] * 4, ["a", "b", "c", "d"])
  assert out.num_missing == 2 and out.missing_per_function == {"half_reward": 2}
  assert "rewards missing for 2 of 4 samples (50%" in caplog.text and "'half_reward' gave no value for 2" in caplog.text
  computer.check(out)  # not all missing: no error
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="adrpo_jax.rl.rewards"):
    full = RewardComputer(["exact_match"])(["p"], ["1"], answer=["1"])
  assert full.num_missing == 0 and full.missing_per_function == {} and caplog.text == ""


def test_every_reward_missing_stops_the_step(caplog):
  computer = RewardComputer([none_reward, half_reward], weights=[1.0, 0.0])
  out = computer(["p"] * 2, ["a", "b"])
  assert out.num_missing == 1
  out = computer(["p"], ["a"])
  assert out.num_missing == 1 and np.isnan(out.rewards).all()
  with pytest.raises(AllRewardsMissingError, match=r"step 7: all 1 samples miss their reward: 'none_reward', "
                                                  r"'half_reward'.*rewards.stop_when_all_missing=False"):
    computer.check(out, step=7)
  quiet = RewardComputer([none_reward], stop_when_all_missing=False, warn_missing=False)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="adrpo_jax.rl.rewards"):
    out = quiet(["p"] * 3, ["a", "b", "c"])
    quiet.check(out, step=1)
  assert "rewards missing" not in caplog.text and "all 3 samples miss their reward" in caplog.text
  # the global form the trainer calls with every process's counts
  check_rewards_present(3, 4, ["f"])
  check_rewards_present(0, 0, ["f"])
  with pytest.raises(AllRewardsMissingError, match="all 4 samples"):
    check_rewards_present(4, 4, ["f"])
