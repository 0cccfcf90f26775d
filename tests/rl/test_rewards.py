"""Reward functions: registry, weights, None / NaN handling, exceptions and time-outs located per sample."""

import time

import numpy as np
import pytest

from adrpo_jax.rl.rewards import (RewardComputer, RewardFunctionError, register_reward_function,
                                  resolve_reward_function)

PROMPTS = ["1+1=", "2+2=", "3+3=", "4+4="]
COMPLETIONS = ["2", "5", "6", "eight"]
ANSWERS = ["2", "4", "6", "8"]


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def picky_reward(prompts, completions, **kw):  # raises on one sample only
    out = []
    for c in completions:
        if c == "eight":
            raise ValueError("cannot parse 'eight'")
        out.append(1.0)
    return out


def slow_on_five(prompts, completions, **kw):
    if "5" in completions:
        time.sleep(3.0)
    return [0.5] * len(completions)


def test_registry_and_module_paths():
    assert resolve_reward_function("exact_match")[0] == "exact_match"
    name, fn = resolve_reward_function("tests.rl.test_rewards:length_reward")
    assert name == "length_reward" and fn(["a"], ["abc"]) == [3.0]
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        resolve_reward_function("nope")
    with pytest.raises(AttributeError):
        resolve_reward_function("tests.rl.test_rewards:missing_fn")
    register_reward_function("my_len", length_reward)
    assert resolve_reward_function("my_len")[1] is length_reward


def test_weighted_sum_per_function_values_and_columns():
    computer = RewardComputer(["exact_match", "format", length_reward], weights=[1.0, 0.5, 0.1])
    out = computer(PROMPTS, COMPLETIONS, answer=ANSWERS)
    exact = np.array([1, 0, 1, 0.0])
    fmt = np.array([1, 1, 1, 0.0])
    lens = np.array([1, 1, 1, 5.0])
    np.testing.assert_allclose(out.rewards, exact + 0.5 * fmt + 0.1 * lens, rtol=1e-6)
    np.testing.assert_allclose(out.per_function, np.stack([exact, fmt, lens], 1))
    assert out.names == ("exact_match", "format", "length_reward") and out.valid.all() and out.num_missing == 0


def test_none_is_not_applicable_and_all_none_is_missing_and_nonfinite_is_masked():
    def partial(prompts, completions, **kw):
        return [None, 1.0, None, float("nan")]

    def other(prompts, completions, **kw):
        return [2.0, 3.0, None, 1.0]

    out = RewardComputer([partial, other], weights=[10.0, 1.0])(PROMPTS, COMPLETIONS)
    assert out.valid.tolist() == [True, True, False, False]  # all-None row 2, NaN row 3
    np.testing.assert_allclose(out.rewards[:2], [2.0, 13.0])
    assert np.isnan(out.rewards[2:]).all() and out.num_missing == 2
    assert np.isnan(out.per_function[0, 0]) and out.per_function[0, 1] == 2.0


def test_exception_names_the_failing_sample_or_scores_it_missing():
    with pytest.raises(RewardFunctionError, match=r"'picky_reward' raised ValueError: cannot parse 'eight' on sample "
                                                  r"3 of 4: prompt '4\+4=', completion 'eight'"):
        RewardComputer([picky_reward])(PROMPTS, COMPLETIONS)
    out = RewardComputer(["exact_match", picky_reward], on_error="missing")(PROMPTS, COMPLETIONS, answer=ANSWERS)
    assert out.valid.tolist() == [True, True, True, False] and out.num_errors == 1 and out.num_missing == 1
    np.testing.assert_allclose(out.rewards[:3], [2.0, 1.0, 2.0])


def test_timeout_is_reported_with_the_sample_or_scored_missing():
    with pytest.raises(RewardFunctionError, match=r"timed out after 0.5 s on sample 1 of 4: prompt '2\+2=', "
                                                  r"completion '5'"):
        RewardComputer([slow_on_five], timeout_s=0.5)(PROMPTS, COMPLETIONS)
    start = time.time()
    out = RewardComputer([slow_on_five], timeout_s=0.5, on_error="missing")(PROMPTS, COMPLETIONS)
    assert time.time() - start < 2.5
    assert out.valid.tolist() == [True, False, True, True] and out.num_errors == 1


def test_contract_violations_always_raise():
    with pytest.raises(RewardFunctionError, match="returned 3 values for 4 completions"):
        RewardComputer([lambda prompts, completions, **kw: [1.0] * 3], on_error="missing")(PROMPTS, COMPLETIONS)
    with pytest.raises(RewardFunctionError, match=r"returned 'high' \(str\) for sample 0"):
        RewardComputer([lambda prompts, completions, **kw: ["high"] * 4])(PROMPTS, COMPLETIONS)
    with pytest.raises(RewardFunctionError, match=r"shape \(4, 1\)"):
        RewardComputer([lambda prompts, completions, **kw: np.ones((4, 1))])(PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="weights"):
        RewardComputer(["exact_match"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="on_error"):
        RewardComputer(["exact_match"], on_error="ignore")


def test_batch_only_failure_is_reported():
    def batch_fails(prompts, completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("batch too large")
        return [1.0]

    with pytest.raises(RewardFunctionError, match="no single completion fails alone"):
        RewardComputer([batch_fails])(PROMPTS, COMPLETIONS)
    out = RewardComputer([batch_fails], on_error="missing")(PROMPTS, COMPLETIONS)
    assert out.valid.all() and out.rewards.tolist() == [1.0] * 4
