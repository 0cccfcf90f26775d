"""The independent judge: another split, another architecture, another seed -- and its gold metrics."""

import jax
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.flow.data import load_digits_splits
from adrpo_jax.flow.judge import JUDGE_DEFAULTS, JudgeScorer, judge_config_from, train_judge
from adrpo_jax.models.judge import JudgeConfig, JudgeMLP, load_judge, save_judge

TINY = {"judge": {"steps": 60, "hidden": (32,)}}


@pytest.fixture(scope="module")
def tiny_judge():
    return train_judge(TINY, use_cache=False, log_fn=None)


def test_judge_trains_on_the_reward_classifiers_held_out_split(tiny_judge):
    _, info = tiny_judge
    reward_train, reward_held_out = load_digits_splits(8)
    assert info["num_train_images"] == len(reward_held_out) and info["num_test_images"] == len(reward_train)
    assert info["test_digit_accuracy"] > 0.3  # 60 steps: far above chance (0.1), a smoke check only
    assert not info["cached"]


def test_scorer_matches_numpy_and_reads_real_digits(tiny_judge):
    judge, _ = tiny_judge
    _, held_out = load_digits_splits(8)
    images, cond = held_out.images[:64], held_out.conditions("digit_thickness")[:64]
    scorer = JudgeScorer(judge, "digit_thickness", thickness_weight=0.5, reference_images=images)
    out = scorer(images, cond)
    logits = judge(images)
    lp_d = np.asarray(jax.nn.log_softmax(logits["digit"].astype(np.float64)))
    lp_t = np.asarray(jax.nn.log_softmax(logits["thickness"].astype(np.float64)))
    idx = np.arange(64)
    want = np.mean(lp_d[idx, held_out.labels[:64]] + 0.5 * lp_t[idx, held_out.thickness[:64]])
    np.testing.assert_allclose(out["judge_reward"], want, rtol=1e-5)
    np.testing.assert_allclose(out["judge_digit_accuracy"], np.mean(lp_d.argmax(-1) == held_out.labels[:64]))
    np.testing.assert_allclose(out["judge_thickness_accuracy"], np.mean(lp_t.argmax(-1) == held_out.thickness[:64]))
    assert abs(out["judge_fd_pretrained"]) < 1e-6  # same images as the reference: distance 0
    assert out["judge_fd_data"] > 0
    digit_only = JudgeScorer(judge, "digit")(images, held_out.labels[:64])
    assert "judge_thickness_accuracy" not in digit_only and "judge_fd_pretrained" not in digit_only


def test_save_load_round_trip_and_errors(tmp_path, tiny_judge):
    judge, _ = tiny_judge
    save_judge(judge, tmp_path / "j")
    again = load_judge(tmp_path / "j")
    x = np.zeros((2, 8, 8, 1), np.float32)
    np.testing.assert_array_equal(judge(x)["digit"], again(x)["digit"])
    with pytest.raises(ValueError, match=r"config\.judge"):
        judge_config_from({"judge": {"channels": (8,)}})
    with pytest.raises(ValueError, match="hidden"):
        JudgeConfig(hidden=())
    with pytest.raises(ValueError, match="JudgeMLP"):
        JudgeScorer(object())
    with pytest.raises(ValueError, match="condition_mode"):
        JudgeScorer(JudgeMLP(JudgeConfig(hidden=(4,)), rngs=nnx.Rngs(0)), "colour")
    with pytest.raises(ValueError, match="shape"):
        judge(np.zeros((2, 4, 4, 1), np.float32))


@pytest.mark.slow
def test_default_judge_is_a_competent_independent_classifier(tmp_path):
    judge, info = train_judge(None, workdir=str(tmp_path), log_fn=None)
    assert judge.config.hidden == tuple(JUDGE_DEFAULTS["hidden"])
    assert info["test_digit_accuracy"] > 0.93 and info["test_thickness_accuracy"] > 0.88
    _, cached = train_judge(None, workdir=str(tmp_path), log_fn=None)
    assert cached["cached"]
