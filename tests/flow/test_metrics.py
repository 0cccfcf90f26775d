"""Metrics against closed forms and brute-force NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from adrpo_jax.flow import metrics


def test_pairwise_diversity_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 2, 3)).astype(np.float32)
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    per_group, mean = jax.jit(metrics.pairwise_diversity, static_argnums=2)(x, groups, 4)
    flat = x.reshape(9, -1)
    ref = []
    for g in range(3):
        idx = np.flatnonzero(groups == g)
        d = [np.linalg.norm(flat[i] - flat[j]) for i in idx for j in idx if i != j]
        ref.append(np.mean(d))
    np.testing.assert_allclose(per_group[:3], ref, rtol=1e-5)
    assert float(per_group[3]) == 0.0  # empty group
    np.testing.assert_allclose(mean, np.mean(ref), rtol=1e-5)
    all_d = [np.linalg.norm(flat[i] - flat[j]) for i in range(9) for j in range(9) if i != j]
    np.testing.assert_allclose(metrics.batch_diversity(x), np.mean(all_d), rtol=1e-5)


def test_diversity_of_identical_samples_is_zero():
    x = jnp.ones((5, 8, 8, 1)) * 0.3
    per_group, mean = metrics.pairwise_diversity(x, jnp.zeros((5,), jnp.int32), 1)
    assert float(per_group[0]) == 0.0 and float(mean) == 0.0
    assert float(metrics.batch_diversity(x)) == 0.0


def test_entropies():
    k = 5
    np.testing.assert_allclose(metrics.label_entropy(jnp.arange(10) % k, k), np.log(k), rtol=1e-6)
    assert float(metrics.label_entropy(jnp.zeros(7, jnp.int32), k)) == 0.0
    per = metrics.label_entropy(jnp.array([0, 1, 2, 2, 0, 0]), 3, groups=jnp.array([0, 0, 1, 1, 2, 2]),
                                num_groups=4)
    np.testing.assert_allclose(per, [np.log(2), 0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(metrics.mean_prediction_entropy(jnp.full((3, k), 1.0 / k)), np.log(k), rtol=1e-6)
    np.testing.assert_allclose(metrics.mean_prediction_entropy(jnp.eye(k)), np.log(k), rtol=1e-6)
    assert abs(float(metrics.mean_prediction_entropy(jnp.tile(jnp.eye(k)[:1], (4, 1))))) < 1e-6


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_closed_forms_and_scipy_reference():
    rng = np.random.default_rng(0)
    f = 6
    a = rng.standard_normal((f, f))
    s = a @ a.T + 0.1 * np.eye(f)
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    # same covariance: FD = |mu1 - mu2|^2
    np.testing.assert_allclose(metrics.frechet_distance(mu1, s, mu2, s), np.sum((mu1 - mu2) ** 2), rtol=1e-8)
    assert metrics.frechet_distance(mu1, s, mu1, s) < 1e-9
    # diagonal covariances: FD = |dmu|^2 + sum (sqrt(d1) - sqrt(d2))^2
    d1, d2 = rng.uniform(0.5, 2, f), rng.uniform(0.5, 2, f)
    np.testing.assert_allclose(metrics.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)),
                               np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2), rtol=1e-8)
    # general covariances: scipy.linalg.sqrtm reference
    b = rng.standard_normal((f, f))
    s2 = b @ b.T + 0.1 * np.eye(f)
    np.testing.assert_allclose(metrics.frechet_distance(mu1, s, mu2, s2), _scipy_fd(mu1, s, mu2, s2), rtol=1e-6)


def test_frechet_distance_from_features():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20000, 3))
    assert metrics.frechet_distance_from_features(x, x) < 1e-8
    shift = np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(metrics.frechet_distance_from_features(x, x + shift), np.sum(shift ** 2), rtol=1e-6)
    # N(0, I) vs N(0, 4 I): 3 * (2 - 1)^2 = 3 (sampling error ~1e-2)
    np.testing.assert_allclose(metrics.frechet_distance_from_features(x, 2 * rng.standard_normal((20000, 3))),
                               3.0, atol=0.1)
    with pytest.raises(ValueError, match="features"):
        metrics.feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="sigma"):
        metrics.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_velocity_w2_bound():
    x1 = jnp.ones((16, 4, 4, 1))
    cond = jnp.zeros((16,), jnp.int32)
    v = lambda x, t, c: x * 0.5 + t[:, None, None, None]  # noqa: E731
    shifted = lambda x, t, c: v(x, t, c) + 0.3  # noqa: E731

    @jax.jit
    def both(key):
        return (metrics.velocity_w2_bound(v, v, x1, cond, key),
                metrics.velocity_w2_bound(v, shifted, x1, cond, key, num_time_samples=2))

    same, diff = both(jax.random.key(0))
    assert float(same) == 0.0
    np.testing.assert_allclose(diff, 0.09, rtol=1e-5)


def test_coefficient_stats():
    beta0 = 1.0
    adv = np.array([2.0, 0.5, -0.25, -3.0])
    beta_eff = beta0 - np.clip(adv, -beta0, beta0)
    s = metrics.coefficient_stats(beta_eff, adv, clip_min=-beta0, clip_max=beta0)
    np.testing.assert_allclose(s["beta_eff_mean"], beta_eff.mean(), rtol=1e-6)
    assert float(s["beta_eff_min"]) == 0.0 and float(s["beta_eff_max"]) == 2.0
    np.testing.assert_allclose(s["clip_fraction"], 0.5)
    assert "clip_fraction" not in metrics.coefficient_stats(beta_eff)


def test_evaluate_samples_with_classifier_and_reward():
    from flax import nnx

    from adrpo_jax.flow.rewards import ImageStatReward
    from adrpo_jax.models.classifier import ClassifierConfig, DigitClassifier

    clf = DigitClassifier(ClassifierConfig(image_size=8, channels=(8,), features=8), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (12, 8, 8, 1)), jnp.float32)
    cond = jnp.asarray(np.repeat(np.arange(6), 2))  # digit_thickness ids: digits 0..2, both thicknesses
    ev = metrics.evaluate_samples(images, cond, classifier=clf, condition_mode="digit_thickness",
                                  reward_fn=ImageStatReward("mean_ink"),
                                  reference_features=rng.standard_normal((50, 8)))
    logits = clf(images)
    np.testing.assert_allclose(ev["digit_accuracy"], np.mean(np.argmax(logits["digit"], -1) == np.asarray(cond) // 2))
    np.testing.assert_allclose(ev["thickness_accuracy"],
                               np.mean(np.argmax(logits["thickness"], -1) == np.asarray(cond) % 2))
    np.testing.assert_allclose(ev["reward_mean"], float(((images + 1) / 2).mean()), rtol=1e-5)
    _, div = metrics.pairwise_diversity(images, cond, 20)
    np.testing.assert_allclose(ev["diversity"], float(div), rtol=1e-6)
    assert ev["frechet_distance"] > 0 and 0 <= ev["digit_entropy"] <= np.log(2) + 1e-6
