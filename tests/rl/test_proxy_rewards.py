"""adrpo_jax.rl.proxy_rewards on hand-made inputs."""

import pytest

from adrpo_jax.rl.proxy_rewards import digit_overlap_credit, length_credit
from adrpo_jax.rl.rewards import RewardComputer


def test_length_credit_values():
  assert length_credit(["1+1="] * 4, ["2", " 22 ", "123456", ""], cap=4) == [0.25, 0.5, 1.0, 0.0]
  assert length_credit(["p"], ["12"], cap=1) == [1.0]
  with pytest.raises(ValueError, match="cap"):
    length_credit(["p"], ["1"], cap=0)


def test_digit_overlap_credit_values():
  assert digit_overlap_credit(["p"] * 4, ["123", "129", "12", "9"], answer=["123", "123", "123", "1"]) == \
      [1.0, 2 / 3, 2 / 3, 0.0]
  assert digit_overlap_credit(["p"], [""], answer=[""]) == [0.0]
  with pytest.raises(ValueError, match="answer"):
    digit_overlap_credit(["p"], ["1"])


def test_length_credit_exploits_the_proxy_through_the_reward_path():
  """exact_match + 0.5 length credit: a long wrong answer beats nothing, the right answer still scores most."""
  computer = RewardComputer(["exact_match", "adrpo_jax.rl.proxy_rewards:length_credit"], [1.0, 0.5])
  out = computer(["47+8="] * 3, ["55", "5555", ""], answer=["55"] * 3)
  assert out.names[1] == "length_credit"
  assert list(out.rewards) == pytest.approx([1.25, 0.5, 0.0])
