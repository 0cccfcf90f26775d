"""Evaluation metrics of the flow-matching experiments: reward, diversity, distance to the reference.

All functions take plain arrays. The jittable ones (JAX) are marked; the Frechet distance is computed on the
host in float64 (a symmetric eigen-decomposition based matrix square root: stable, no complex parts).

* :func:`pairwise_diversity` -- mean pairwise L2 distance between samples of the same prompt (per prompt and
  averaged over prompts), and over the whole batch. Jittable.
* :func:`label_entropy` / :func:`mean_prediction_entropy` -- entropy (nats) of the distribution of a
  classifier's predicted attribute among a set of samples (``log K`` = uniform, 0 = collapsed). Jittable.
* :func:`frechet_distance` / :func:`feature_statistics` / :func:`frechet_distance_from_features` -- the
  FID-style distance ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` between Gaussians fitted to
  classifier features of two sample sets (policy vs reference model, or vs data).
* :func:`velocity_w2_bound` -- the W2 velocity bound ``E_{t, x0} ||v_theta(x_t, t, c) - v_ref(x_t, t, c)||^2`` on
  the rectified-flow path through given samples ``x1`` (docs/math.md, "Flow matching", second term). Jittable.
* :func:`coefficient_stats` -- mean/min/max of the adaptive coefficient ``beta_eff = beta0 - clip(A)`` and the
  fraction of clipped advantages. Jittable.
* :func:`evaluate_samples` -- all of the above that need a classifier, for a batch of generated images.

Example:
  >>> import jax.numpy as jnp
  >>> x = jnp.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
  >>> per_prompt, mean = pairwise_diversity(x, jnp.array([0, 0, 1, 1]), num_groups=2)
  >>> per_prompt, mean
  (Array([5., 0.], dtype=float32), Array(2.5, dtype=float32))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adrpo_jax.flow.data import ConditionMode
from adrpo_jax.losses import flow_matching_error, rectified_flow_path

__all__ = [
    "pairwise_distances",
    "pairwise_diversity",
    "batch_diversity",
    "label_entropy",
    "mean_prediction_entropy",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "velocity_w2_bound",
    "coefficient_stats",
    "evaluate_samples",
]


def pairwise_distances(x: jax.Array) -> jax.Array:
    """``[N, N]`` Euclidean distances between the flattened samples ``x [N, ...]`` (float32, jittable).

    Computed from differences (not the ``|a|^2 + |b|^2 - 2ab`` expansion), so identical samples give exactly 0.
    """
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    return jnp.sqrt(jnp.sum(jnp.square(x[:, None, :] - x[None, :, :]), axis=-1))


def pairwise_diversity(samples: jax.Array, groups: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """Per-prompt mean pairwise L2 distance among samples of the same prompt (jittable).

    Args:
      samples: ``[N, ...]`` samples (flattened per sample).
      groups: ``[N]`` int prompt id in ``[0, num_groups)``.
      num_groups: number of prompts ``G`` (static).

    Returns:
      ``(per_group [G], mean)``: ``per_group[g]`` = mean over ordered pairs ``i != j`` with both in ``g``
      (0 for groups with fewer than 2 samples); ``mean`` = average of ``per_group`` over the groups with at
      least 2 samples.
    """
    samples = jnp.asarray(samples)
    groups = jnp.asarray(groups)
    n = samples.shape[0]
    if groups.shape != (n,):
        raise ValueError(f"`groups` must have shape ({n},) (leading axis of `samples`), got {groups.shape}.")
    d = pairwise_distances(samples)
    onehot = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)  # [N, G]
    off_diag = 1.0 - jnp.eye(n, dtype=jnp.float32)
    pair_sum = jnp.einsum("ig,ij,jg->g", onehot, d * off_diag, onehot)
    counts = onehot.sum(0)
    num_pairs = counts * (counts - 1.0)
    valid = num_pairs > 0
    per_group = jnp.where(valid, pair_sum / jnp.maximum(num_pairs, 1.0), 0.0)
    mean = jnp.sum(per_group) / jnp.maximum(jnp.sum(valid), 1)
    return per_group, mean


def batch_diversity(samples: jax.Array) -> jax.Array:
    """Mean pairwise L2 distance over all ordered pairs ``i != j`` of the batch (jittable; 0 for ``N < 2``)."""
    n = samples.shape[0]
    d = pairwise_distances(samples)
    return jnp.sum(d) / max(n * (n - 1), 1)


def _entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def label_entropy(labels: jax.Array, num_classes: int, groups: jax.Array | None = None,
                  num_groups: int | None = None) -> jax.Array:
    """Entropy (nats) of the empirical distribution of integer ``labels [N]`` in ``[0, num_classes)``.

    With ``groups [N]`` / ``num_groups`` returns one entropy per group ``[G]`` (0 for empty groups). Jittable.

    >>> label_entropy(jnp.array([0, 1, 2, 3]), 4)  # uniform over 4 classes: log 4
    Array(1.3862944, dtype=float32)
    """
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if groups is None:
        return _entropy(onehot.mean(0))
    if num_groups is None:
        raise ValueError("`num_groups` is required with `groups`.")
    g = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)  # [N, G]
    counts = jnp.einsum("ng,nk->gk", g, onehot)
    p = counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
    return _entropy(p)


def mean_prediction_entropy(probs: jax.Array) -> jax.Array:
    """Entropy (nats) of the mean predicted distribution ``mean_i probs[i]`` of ``probs [N, K]`` (jittable).

    The "soft" version of :func:`label_entropy`: ``log K`` when the predictions are spread uniformly.
    """
    return _entropy(jnp.mean(jnp.asarray(probs, jnp.float32), axis=0))


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` (float64, host) of ``features [N, F]`` (``N >= 2``)."""
    f = np.asarray(jax.device_get(features), dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"`features` must be [N >= 2, F], got shape {f.shape}.")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (host, float64).

    ``d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2)``; the trace term is computed from
    the eigenvalues of the symmetric PSD matrix ``S1^1/2 S2 S1^1/2`` (equal to ``Tr((S1 S2)^1/2)``), which
    avoids the complex/unstable general ``sqrtm``. Returns the squared distance (as FID does), clipped at 0.

    >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))  # |1,1|^2 + 2 * (2 - 1)^2
    4.0
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"`mu1` and `mu2` must be [F] of equal shape, got {mu1.shape} and {mu2.shape}.")
    f = mu1.shape[0]
    if s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"`sigma1`, `sigma2` must be [{f}, {f}], got {s1.shape} and {s2.shape}.")
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sum(np.sqrt(np.clip(w, 0.0, None))))
    d2 = float(np.sum(np.square(mu1 - mu2)) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(d2, 0.0)


def frechet_distance_from_features(features1: Any, features2: Any) -> float:
    """:func:`frechet_distance` of Gaussians fitted to two feature sets ``[N1, F]`` and ``[N2, F]``."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def velocity_w2_bound(velocity_fn: Callable, reference_fn: Callable, x1: jax.Array, cond: Any,
                      key: jax.Array, num_time_samples: int = 1) -> jax.Array:
    """Monte-Carlo value of the W2 velocity bound ``E_{t~U(0,1), x0~N(0,I)} ||v(x_t,t,c) - v_ref(x_t,t,c)||^2``.

    ``x_t = (1 - t) x0 + t x1`` through the given endpoint samples ``x1 [N, ...]`` (policy samples, or data);
    ``||.||^2`` is the per-sample mean of squares (as in the loss). Averages ``num_time_samples`` draws of
    ``(t, x0)`` per sample. Jittable (``num_time_samples`` static). Returns a float32 scalar.
    """
    x1 = jnp.asarray(x1, jnp.float32)
    n = x1.shape[0]

    from adrpo_jax.flow.sampling import sample_noise

    kt, kx = jax.random.split(key)
    ts = jax.random.uniform(kt, (num_time_samples * n,)).reshape(num_time_samples, n)
    x0s = sample_noise(kx, (num_time_samples,) + x1.shape)
    total = jnp.float32(0.0)
    for i in range(num_time_samples):  # static and small: a Python loop keeps the forward batch at N
        x_t, _ = rectified_flow_path(x0s[i], x1, ts[i])
        total = total + jnp.mean(flow_matching_error(velocity_fn(x_t, ts[i], cond),
                                                     reference_fn(x_t, ts[i], cond)))
    return total / num_time_samples


def coefficient_stats(beta_eff: jax.Array, advantages: jax.Array | None = None, *, clip_min: float | None = None,
                      clip_max: float | None = None, prefix: str = "beta_eff") -> dict[str, jax.Array]:
    """Summary of the adaptive coefficient ``beta_eff [N]`` (docs/math.md: log mean, min, max, clipped fraction).

    With raw ``advantages [N]`` and the clip bounds, also ``clip_fraction`` = fraction of advantages outside
    ``[clip_min, clip_max]``. Jittable.

    >>> s = coefficient_stats(jnp.array([0.5, 1.0, 1.5]), jnp.array([0.5, 0.0, -2.0]), clip_min=-0.5, clip_max=0.5)
    >>> float(s["beta_eff_mean"]), float(s["clip_fraction"])
    (1.0, 0.3333333432674408)
    """
    b = jnp.asarray(beta_eff, jnp.float32)
    out = {f"{prefix}_mean": jnp.mean(b), f"{prefix}_min": jnp.min(b), f"{prefix}_max": jnp.max(b),
           f"{prefix}_std": jnp.std(b)}
    if advantages is not None:
        a = jnp.asarray(advantages, jnp.float32)
        clipped = jnp.zeros(a.shape, bool)
        if clip_min is not None:
            clipped = clipped | (a < clip_min)
        if clip_max is not None:
            clipped = clipped | (a > clip_max)
        out["clip_fraction"] = jnp.mean(clipped.astype(jnp.float32))
        out["advantage_mean"] = jnp.mean(a)
        out["advantage_std"] = jnp.std(a)
    return out


@functools.lru_cache(maxsize=8)
def _classifier_fn(graphdef) -> Callable:
    from flax import nnx

    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, return_features=True))


def evaluate_samples(images: jax.Array, cond: jax.Array, *, classifier: Any = None,
                     condition_mode: ConditionMode = "digit", num_conditions: int | None = None,
                     reward_fn: Callable | None = None,
                     reference_features: Any = None) -> dict[str, float]:
    """Standard evaluation of generated images ``[N, H, W, C]`` for prompts ``cond [N]``.

    Returns floats: ``diversity`` (mean per-prompt pairwise L2), ``batch_diversity``; with ``reward_fn``:
    ``reward_mean``, ``reward_std``; with a ``classifier`` (:class:`~adrpo_jax.models.classifier.DigitClassifier`):
    ``digit_accuracy`` (argmax = prompted digit), ``digit_entropy`` (per-prompt entropy of predicted digits,
    averaged: 0 when every sample of a prompt gets the same label), ``thickness_entropy`` (per-prompt entropy
    of predicted thickness: for digit-only prompts it measures attribute diversity, max ``log 2``),
    ``thickness_accuracy`` (``digit_thickness`` mode), and, given ``reference_features [M, F]`` (classifier
    features of reference-model samples or data), ``frechet_distance``.
    """
    from flax import nnx  # local: keep this module importable without building models

    from adrpo_jax.flow.data import num_conditions as _num_conditions
    from adrpo_jax.flow.data import split_condition

    images = jnp.asarray(images)
    cond = jnp.asarray(cond)
    k = num_conditions if num_conditions is not None else _num_conditions(condition_mode)
    per_prompt, div = pairwise_diversity(images, cond, k)
    out = {"diversity": float(div), "batch_diversity": float(batch_diversity(images))}
    if reward_fn is not None:
        r = jnp.asarray(reward_fn(images, cond), jnp.float32)
        out["reward_mean"], out["reward_std"] = float(r.mean()), float(r.std())
    if classifier is not None:
        graphdef, state = nnx.split(classifier)
        logits, feats = _classifier_fn(graphdef)(state, images)
        digit, thick = split_condition(cond, condition_mode)
        pred_digit = jnp.argmax(logits["digit"], -1)
        out["digit_accuracy"] = float(jnp.mean(pred_digit == digit))
        out["digit_entropy"] = float(jnp.mean(label_entropy(pred_digit, 10, cond, k)))
        if "thickness" in logits:
            pred_thick = jnp.argmax(logits["thickness"], -1)
            out["thickness_entropy"] = float(jnp.mean(label_entropy(pred_thick, 2, cond, k)))
            if thick is not None:
                out["thickness_accuracy"] = float(jnp.mean(pred_thick == thick))
        if reference_features is not None:
            out["frechet_distance"] = frechet_distance_from_features(feats, reference_features)
    return out
