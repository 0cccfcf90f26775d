"""Rewards: ClassifierReward = log-softmax of the classifier at the prompted attributes; image statistics;
weighted combination; shapes, jit and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.flow import rewards
from adrpo_jax.models.classifier import ClassifierConfig, DigitClassifier

SMALL = ClassifierConfig(image_size=8, channels=(8, 16), features=16)


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier(SMALL, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 1)), jnp.float32)


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_classifier_reward_digit_prompt(classifier, images):
    cond = jnp.array([0, 1, 2, 3, 9, 9])
    logits = classifier(images)
    expected = _log_softmax(logits["digit"])[np.arange(6), np.asarray(cond)]
    reward = rewards.ClassifierReward(classifier, "digit")
    r = reward(images, cond)
    assert r.shape == (6,) and r.dtype == jnp.float32
    np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-5)
    parts = reward.components(images, cond)
    np.testing.assert_array_equal(parts["digit_correct"],
                                  (np.argmax(logits["digit"], -1) == np.asarray(cond)).astype(np.float32))
    prob = rewards.ClassifierReward(classifier, "digit", kind="prob")(images, cond)
    np.testing.assert_allclose(prob, np.exp(expected), rtol=1e-5)
    # usable inside another jitted function
    r_jit = jax.jit(lambda x, c: reward(x, c) * 2.0)(images, cond)
    np.testing.assert_allclose(r_jit, 2 * expected, rtol=1e-5, atol=1e-5)
    assert isinstance(reward, rewards.RewardModel)


def test_classifier_reward_composite_prompt(classifier, images):
    cond = jnp.array([0, 1, 6, 7, 18, 19])  # (digit, thick) = (0,0) (0,1) (3,0) (3,1) (9,0) (9,1)
    logits = classifier(images)
    digit, thick = np.asarray(cond) // 2, np.asarray(cond) % 2
    lp_d = _log_softmax(logits["digit"])[np.arange(6), digit]
    lp_t = _log_softmax(logits["thickness"])[np.arange(6), thick]
    r = rewards.ClassifierReward(classifier, "digit_thickness", thickness_weight=0.5)(images, cond)
    np.testing.assert_allclose(r, lp_d + 0.5 * lp_t, rtol=1e-5, atol=1e-5)
    parts = rewards.ClassifierReward(classifier, "digit_thickness").components(images, cond)
    np.testing.assert_allclose(parts["log_p_thickness"], lp_t, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in \\[0, 20\\)"):
        rewards.ClassifierReward(classifier, "digit_thickness")(images, cond + 2)


def test_image_stat_rewards(images):
    x = np.asarray(images)
    ink = (x + 1) / 2
    np.testing.assert_allclose(rewards.ImageStatReward("mean_ink")(images, jnp.zeros(6, jnp.int32)),
                               ink.mean(axis=(1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(rewards.ImageStatReward("contrast", scale=2.0)(images, jnp.zeros(6, jnp.int32)),
                               2 * ink.std(axis=(1, 2, 3)), rtol=1e-5)
    target = rewards.ImageStatReward("mean_ink", target=0.3)(images, jnp.zeros(6, jnp.int32))
    np.testing.assert_allclose(target, -(ink.mean(axis=(1, 2, 3)) - 0.3) ** 2, rtol=1e-5, atol=1e-7)
    sharp = rewards.ImageStatReward("sharpness")(images, jnp.zeros(6, jnp.int32))
    ref = 0.5 * (np.abs(np.diff(ink, axis=1)).mean(axis=(1, 2, 3)) + np.abs(np.diff(ink, axis=2)).mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(sharp, ref, rtol=1e-5)


def test_combined_reward(classifier, images):
    cond = jnp.array([0, 1, 2, 3, 4, 5])
    clf = rewards.ClassifierReward(classifier, "digit")
    ink = rewards.ImageStatReward("mean_ink")
    combo = rewards.CombinedReward({"clf": clf, "ink": ink}, weights={"ink": -2.0})
    parts = combo.components(images, cond)
    np.testing.assert_allclose(parts["reward"], clf(images, cond) - 2.0 * ink(images, cond), rtol=1e-5, atol=1e-6)
    assert {"clf", "ink", "clf/log_p_digit", "clf/digit_correct", "ink/mean_ink"} <= set(parts)
    with pytest.raises(ValueError, match="weights"):
        rewards.CombinedReward({"clf": clf}, weights={"other": 1.0})


@pytest.mark.parametrize("make, match", [
    (lambda c: rewards.ClassifierReward(c, "colour"), "condition_mode"),
    (lambda c: rewards.ClassifierReward(c, kind="logit"), "kind"),
    (lambda c: rewards.ClassifierReward("not a model"), "DigitClassifier"),
    (lambda c: rewards.ImageStatReward("brightness"), "stat"),
    (lambda c: rewards.CombinedReward({}), "empty"),
])
def test_bad_construction(classifier, make, match):
    with pytest.raises(ValueError, match=match):
        make(classifier)


def test_bad_batches(classifier, images):
    reward = rewards.ClassifierReward(classifier, "digit")
    with pytest.raises(ValueError, match="cond"):
        reward(images, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="images"):
        reward(images[..., 0], jnp.zeros((6,), jnp.int32))
    with pytest.raises(ValueError, match="\\[0, 10\\)"):
        reward(images, jnp.full((6,), 10))
