"""Divergences: per-token KL estimators (k1, k2, k3) and the W2 velocity bound of flow matching.

KL estimators of ``KL(pi || pi_ref)`` from the log-probabilities of the sampled tokens (Schulman, "Approximating
KL divergence"), with ``d = log pi_ref - log pi``:

* ``k1 = -d = log pi - log pi_ref`` (unbiased, high variance, can be negative);
* ``k2 = d^2 / 2`` (biased, low variance, >= 0);
* ``k3 = exp(d) - d - 1`` (unbiased, low variance, >= 0; TRL's GRPO default and docs/math.md's LLM divergence).

k3's ``exp`` is guarded: for ``d > max_log_ratio`` it continues *linearly* (first-order extension of ``exp`` at
the bound), so value and gradient stay finite, continuous and of the right sign for any finite log-ratio
(``exp(20) ~ 4.9e8``; float32 overflows only beyond ``|d| ~ 1e30``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from adrpo_jax.losses import _stats
from adrpo_jax.losses import _validation as V

__all__ = [
    "KL_ESTIMATORS",
    "kl_divergence",
    "w2_velocity_penalty",
    "guarded_exp",
]

KL_ESTIMATORS = ("k1", "k2", "k3")


def check_exp_bound(value, name: str) -> None:
    """A static bound in ``(0, 80]`` for :func:`guarded_exp` (``exp`` overflows float32 near 88.7)."""
    V.check_scalar(value, name, positive=True, allow_traced=False)
    if float(value) > 80.0:
        raise ValueError(f"`{name}` must be <= 80 (exp overflows float32 near 88.7), got {value!r}.")


def guarded_exp(x: jax.Array, max_value: float = 20.0) -> jax.Array:
    """``exp(x)`` for ``x <= max_value``, ``exp(max_value) (1 + x - max_value)`` above (C^1, never inf).

    ``max_value`` is a Python number in ``(0, 80]``.

    Example:
      >>> import jax.numpy as jnp
      >>> guarded_exp(jnp.array([0.0, 1e3]), 20.0)
      Array([1.0000000e+00, 4.7594704e+11], dtype=float32)
    """
    check_exp_bound(max_value, "max_value")
    e_max = math.exp(max_value)
    below = x <= max_value
    return jnp.where(below, jnp.exp(jnp.minimum(x, max_value)), e_max * (1.0 + (jnp.maximum(x, max_value) - max_value)))


def kl_divergence(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3", *, max_log_ratio: float = 20.0,
                  mask: jax.Array | None = None) -> jax.Array:
    r"""Per-token KL estimate of ``KL(pi_theta || pi_ref)`` from sampled-token log-probs (k1, k2 or k3).

    docs/math.md, "LLMs": the per-token k3 estimate ``exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1`` is the
    divergence ``L_D`` weighted by each sequence's ``beta_eff`` in GRPO.

    Args:
      logp: ``[...]`` (usually ``[B, T]``) log-probs of the sampled tokens under the policy, floating.
      ref_logp: same shape, under the reference policy.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
      max_log_ratio: bound above which k3's ``exp(log pi_ref - log pi)`` is continued linearly (> 0).
      mask: optional, same shape; invalid tokens give 0 (and a zero gradient, even if their log-probs are
        -inf or NaN padding).

    Returns:
      Same shape as ``logp``, float32; differentiable w.r.t. both inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> kl_divergence(jnp.log(jnp.array([0.5, 0.25])), jnp.log(jnp.array([0.25, 0.25])))
      Array([0.19314718, 0.        ], dtype=float32)
      >>> kl_divergence(jnp.array([-1.0]), jnp.array([-2.0]), "k1")
      Array([1.], dtype=float32)
    """
    logp = V.check_array(logp, "logp")
    ref_logp = V.check_array(ref_logp, "ref_logp")
    V.check_floating(logp, "logp")
    V.check_floating(ref_logp, "ref_logp")
    V.check_same_shape(ref_logp, "ref_logp", logp, "logp")
    V.check_option(estimator, KL_ESTIMATORS, "estimator")
    check_exp_bound(max_log_ratio, "max_log_ratio")
    mask = V.check_mask(mask, logp.shape, "mask", expected_from="logp")
    return _kl(V.to_float(logp), V.to_float(ref_logp), estimator, max_log_ratio, mask)


def _kl(logp, ref_logp, estimator, max_log_ratio, mask):
    d = ref_logp - logp
    if mask is not None:
        d = jnp.where(mask, d, 0.0)
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d * d
    else:
        kl = guarded_exp(d, max_log_ratio) - d - 1.0
    return kl if mask is None else jnp.where(mask, kl, 0.0)


def w2_velocity_penalty(v: jax.Array, v_ref: jax.Array, *, stop_gradient_ref: bool = True) -> jax.Array:
    r"""Per-sample W2 upper bound ``||v_i - sg(v_ref_i)||^2`` (mean over data dims) of ORW-CFM-W2 / ADRPO-W2.

    docs/math.md, "Flow matching": the tractable upper bound of ``W2^2(policy, reference)`` is the squared difference
    of the velocity fields along the path; the reference is frozen (stop-gradient) by default.

    Args:
      v: ``[N, D...]`` policy velocity ``v_theta(x_t, t, c)``.
      v_ref: same shape, reference velocity ``v_ref(x_t, t, c)`` at the same ``(x_t, t, c)``.
      stop_gradient_ref: stop the gradient into ``v_ref`` (default True).

    Returns:
      ``[N]`` float32.

    Example:
      >>> import jax.numpy as jnp
      >>> w2_velocity_penalty(jnp.array([[1.0, 1.0], [0.0, 2.0]]), jnp.zeros((2, 2)))
      Array([1., 2.], dtype=float32)
    """
    v = V.check_array(v, "v")
    v_ref = V.check_array(v_ref, "v_ref")
    V.check_floating(v, "v")
    V.check_floating(v_ref, "v_ref")
    V.check_rank(v, None, "v", min_rank=1)
    V.check_same_shape(v_ref, "v_ref", v, "v")
    if not isinstance(stop_gradient_ref, bool):
        raise ValueError(f"`stop_gradient_ref` must be a bool, got {stop_gradient_ref!r}.")
    v_ref = V.to_float(v_ref)
    if stop_gradient_ref:
        v_ref = _stats.sg(v_ref)
    diff = V.to_float(v) - v_ref
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
