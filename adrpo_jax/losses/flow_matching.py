"""Flow-matching losses: the rectified-flow path, CFM, ADRPO-W2 and the ORW-CFM-W2 baseline.

Shapes: ``N`` samples, arbitrary data dimensions ``D...`` (e.g. ``[N, H, W, C]``). Conventions (docs/math.md,
"Flow matching"): ``x0`` is noise, ``x1`` data, ``t = 0`` is noise and ``t = 1`` data,
``x_t = (1 - t) x0 + t x1`` and the conditional target velocity is ``u_t = x1 - x0``.
``||a - b||^2`` of a sample is the *mean* of squares over its data dimensions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adrpo_jax.losses import _stats
from adrpo_jax.losses import _validation as V
from adrpo_jax.losses import advantages as A
from adrpo_jax.losses import coefficients as C
from adrpo_jax.losses import divergences as D

__all__ = [
    "rectified_flow_path",
    "flow_matching_error",
    "cfm_loss",
    "adrpo_flow_loss",
    "orw_cfm_w2_loss",
]

Metrics = dict[str, jax.Array]


def _check_time(t: Any, n: int, name: str = "t") -> jax.Array:
    t = V.check_array(t, name)
    V.check_floating(t, name)
    if t.ndim == 0:
        return t
    if t.shape != (n,):
        raise ValueError(f"`{name}` must have shape () or ({n},) (the leading axis of the data), got {t.shape}.")
    return t


def _broadcast_per_sample(a: jax.Array, ndim: int) -> jax.Array:
    """[N] -> [N, 1, ..., 1] with ``ndim`` axes in total (scalars stay scalars)."""
    if a.ndim == 0:
        return a
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def rectified_flow_path(x0: jax.Array, x1: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Point and target velocity on the linear (rectified-flow) conditional path.

    Implements docs/math.md, "Flow matching": ``x_t = (1 - t) x0 + t x1`` and ``u_t = dx_t/dt = x1 - x0``.

    Args:
      x0: ``[N, D...]`` noise samples (``t = 0`` end), floating.
      x1: ``[N, D...]`` data samples (``t = 1`` end), same shape as ``x0``.
      t: ``[N]`` (one time per sample, broadcast over ``D...``) or ``()``, floating, usually in ``[0, 1]``.

    Returns:
      ``(x_t, u_t)``, both ``[N, D...]`` in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> x_t, u_t = rectified_flow_path(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.array([0.25, 1.0]))
      >>> x_t
      Array([[0.25, 0.25, 0.25],
             [1.  , 1.  , 1.  ]], dtype=float32)
      >>> u_t[0]
      Array([1., 1., 1.], dtype=float32)
    """
    x0 = V.check_array(x0, "x0")
    x1 = V.check_array(x1, "x1")
    V.check_floating(x0, "x0")
    V.check_floating(x1, "x1")
    V.check_rank(x0, None, "x0", min_rank=1)
    V.check_same_shape(x1, "x1", x0, "x0")
    t = _check_time(t, x0.shape[0])
    x0, x1, t = V.to_float(x0), V.to_float(x1), V.to_float(t)
    tb = _broadcast_per_sample(t, x0.ndim)
    x_t = (1.0 - tb) * x0 + tb * x1
    u_t = x1 - x0
    return x_t, u_t


def flow_matching_error(v: jax.Array, target: jax.Array) -> jax.Array:
    r"""Per-sample squared error ``||v_i - target_i||^2`` = mean over data dims of ``(v - target)^2``.

    This is the regression error of conditional flow matching (docs/math.md, ``||v_theta - u_t||^2``); with
    ``target = v_ref`` it is the (differentiable in both arguments) W2 velocity bound, see
    :func:`adrpo_jax.losses.w2_velocity_penalty` for the stop-gradient version.

    Args:
      v: ``[N, D...]`` predicted velocity (rank >= 1; for rank 1 each sample is a scalar).
      target: same shape as ``v``.

    Returns:
      ``[N]`` float32 (float64 for float64 inputs).

    Example:
      >>> import jax.numpy as jnp
      >>> flow_matching_error(jnp.array([[1.0, 3.0], [0.0, 0.0]]), jnp.zeros((2, 2)))
      Array([5., 0.], dtype=float32)
    """
    v = V.check_array(v, "v")
    target = V.check_array(target, "target")
    V.check_floating(v, "v")
    V.check_floating(target, "target")
    V.check_rank(v, None, "v", min_rank=1)
    V.check_same_shape(target, "target", v, "v")
    diff = V.to_float(v) - V.to_float(target)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def _zero_invalid(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Replaces invalid samples by 0 *before* any arithmetic, so NaN/inf padding never reaches a value or a
    gradient (the gradient at invalid samples is exactly 0)."""
    if mask is None:
        return x
    return jnp.where(_broadcast_per_sample(mask, jnp.ndim(x)), x, jnp.zeros_like(x))


def _check_per_sample(x: Any, n: int, name: str, ref_name: str) -> jax.Array:
    x = V.check_array(x, name)
    V.check_floating(x, name)
    V.check_shape(x, (n,), name, expected_from=f"leading axis of `{ref_name}`")
    return V.to_float(x)


def _check_normalizer(normalizer: Any) -> None:
    V.check_scalar(normalizer, "normalizer", positive=True, allow_none=True)


def cfm_loss(v: jax.Array, u: jax.Array, *, weights: jax.Array | None = None, mask: jax.Array | None = None,
             normalizer: float | jax.Array | None = None, axis_name: Any = None) -> tuple[jax.Array, Metrics]:
    r"""(Weighted) conditional flow-matching loss ``sum_i m_i w_i ||v_i - u_i||^2 / n``.

    ``n`` is the number of valid samples (``sum_i m_i``, global over ``axis_name``) unless ``normalizer`` is
    given. With ``weights = None`` this is plain CFM pre-training; ``weights`` are used as given (treated as
    constants: they are stop-gradient), e.g. ``exp(tau r)`` for ORW-CFM or advantages.

    Args:
      v: ``[N, D...]`` predicted velocity ``v_theta(x_t, t)``.
      u: ``[N, D...]`` target velocity (e.g. ``u_t`` of :func:`rectified_flow_path`).
      weights: optional ``[N]`` per-sample weights (stop-gradient).
      mask: optional ``[N]`` validity (bool or 0/1); invalid samples contribute nothing and are not counted.
      normalizer: optional global denominator replacing the valid-sample count (e.g. the whole batch's count
        when accumulating gradients over micro-batches).
      axis_name: mesh/pmap axis name(s). Then the returned loss is this device's *share*
        ``local_sum / global_count``; ``psum(loss, axis_name)`` is the global loss and gradients under
        ``shard_map`` sum to the single-device gradient. ``metrics`` are global.

    Returns:
      ``(loss, metrics)``; metrics (global, stop-gradient): ``loss``, ``cfm_error_mean`` (unweighted mean error
      over valid samples), ``num_samples``.

    Example:
      >>> import jax.numpy as jnp
      >>> loss, metrics = cfm_loss(jnp.ones((2, 4)), jnp.zeros((2, 4)), weights=jnp.array([1.0, 3.0]))
      >>> loss
      Array(2., dtype=float32)
      >>> metrics["cfm_error_mean"]
      Array(1., dtype=float32)
    """
    v = V.check_array(v, "v")
    V.check_rank(v, None, "v", min_rank=1)
    n = v.shape[0]
    mask = V.check_mask(mask, (n,), "mask", expected_from="leading axis of `v`")
    u = V.check_array(u, "u")
    V.check_floating(v, "v")
    V.check_floating(u, "u")
    V.check_same_shape(u, "u", v, "v")
    err = flow_matching_error(_zero_invalid(v, mask), _zero_invalid(u, mask))
    _check_normalizer(normalizer)
    V.check_axis_name(axis_name)
    per_sample = err
    if weights is not None:
        weights = _check_per_sample(weights, n, "weights", "v")
        per_sample = _stats.sg(weights) * err
    loss, _ = _stats.global_share(per_sample, mask, normalizer, axis_name)
    metrics = {
        "loss": _stats.psum(_stats.sg(loss), axis_name),
        "cfm_error_mean": _stats.sg(_stats.global_mean(err, mask, axis_name)),
        "num_samples": _stats.psum(_stats.masked_count(mask, (n,)), axis_name),
    }
    return loss, metrics


def _flow_inputs(v, v_ref, u, mask):
    v = V.check_array(v, "v")
    V.check_floating(v, "v")
    V.check_rank(v, None, "v", min_rank=1)
    for x, name in ((v_ref, "v_ref"), (u, "u")):
        x = V.check_array(x, name)
        V.check_floating(x, name)
        V.check_same_shape(x, name, v, "v")
    n = v.shape[0]
    mask = V.check_mask(mask, (n,), "mask", expected_from="leading axis of `v`")
    v, v_ref, u = (_zero_invalid(V.to_float(jnp.asarray(x)), mask) for x in (v, v_ref, u))
    err = flow_matching_error(v, u)
    w2 = D.w2_velocity_penalty(v, v_ref)  # stop-gradient on v_ref
    return n, mask, err, w2


def adrpo_flow_loss(v: jax.Array, v_ref: jax.Array, u: jax.Array, advantages: jax.Array, *,
                    beta: float | jax.Array, adaptive: bool = True, coefficient_sign: str = "adrpo",
                    clip: str | None = "multiple", clip_multiple: float = 1.0, clip_min: float | None = None,
                    clip_max: float | None = None, clip_cfm_advantages: bool = False, mask: jax.Array | None = None,
                    normalizer: float | jax.Array | None = None, axis_name: Any = None
                    ) -> tuple[jax.Array, Metrics]:
    r"""ADRPO-W2 flow objective: advantage-weighted CFM plus the per-sample adaptive W2 penalty.

    docs/math.md, "Flow matching: ADRPO with Wasserstein-2 regularization"::

        loss = (1/n) sum_i m_i [ A_i ||v_i - u_i||^2 + beta_i ||v_i - sg(v_ref_i)||^2 ],
        beta_i = beta_0 - s clip(A_i)   (stop-gradient; A is stop-gradient too)

    with ``s = +1`` for ``coefficient_sign="adrpo"`` (the paper) and ``s = -1`` for ``"crd"`` (``beta_0 +
    clip(A)``: better samples regularized more, the direction of Flow-Factory's CRD ``reward_adaptive_kl``).

    Both terms use the same ``(x_t, t, c)``: ``v = v_theta(x_t, t, c)``, ``v_ref`` the frozen reference's
    velocity there, ``u`` the path target (:func:`rectified_flow_path`). With ``A < 0`` the first term pushes
    the model away from bad samples.

    ``adaptive=False`` gives "advantage-weighted CFM + fixed beta_0 W2", the clean fixed-coefficient ablation
    of ADRPO. Note this is *not* the paper's fixed-beta baseline: ORW-CFM-W2 weights CFM by raw
    ``exp(tau r)`` (always positive) with a fixed W2 coefficient ``alpha`` -- see :func:`orw_cfm_w2_loss`.

    Args:
      v: ``[N, D...]`` policy velocity (differentiated).
      v_ref: ``[N, D...]`` frozen reference velocity (stop-gradient inside).
      u: ``[N, D...]`` conditional target velocity.
      advantages: ``[N]`` (e.g. :func:`prompt_mean_advantages`), stop-gradient.
      beta: ``beta_0 >= 0``.
      adaptive, coefficient_sign, clip, clip_multiple, clip_min, clip_max: the coefficient
        (:func:`adaptive_coefficient`).
      clip_cfm_advantages: also clip the advantage weighting the CFM term (default False).
      mask: optional ``[N]`` sample validity.
      normalizer: optional global denominator replacing the valid-sample count.
      axis_name: mesh/pmap axis name(s); the loss is then this device's share (package docstring).

    Returns:
      ``(loss, metrics)``; metrics (global, stop-gradient): ``loss``, ``cfm_term`` and ``w2_term`` (the two
      parts of the loss, ``loss = cfm_term + w2_term``), ``w2_mean`` (unweighted mean W2 bound),
      ``cfm_error_mean``, ``advantage_mean``/``_min``/``_max``, ``beta_eff_mean``/``_min``/``_max``,
      ``adv_clip_fraction``, ``num_samples``.

    Example:
      >>> import jax.numpy as jnp
      >>> v, v_ref, u = jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.full((2, 3), 2.0)
      >>> loss, m = adrpo_flow_loss(v, v_ref, u, jnp.array([0.5, -0.5]), beta=1.0)
      >>> loss, m["cfm_term"], m["w2_term"]
      (Array(1., dtype=float32), Array(0., dtype=float32), Array(1., dtype=float32))
    """
    n, mask, err, w2 = _flow_inputs(v, v_ref, u, mask)
    advantages = _check_per_sample(advantages, n, "advantages", "v")
    advantages = _stats.sg(advantages)
    _check_normalizer(normalizer)
    V.check_axis_name(axis_name)
    if not isinstance(clip_cfm_advantages, bool):
        raise ValueError(f"`clip_cfm_advantages` must be a bool, got {clip_cfm_advantages!r}.")
    coef_kw: dict[str, Any] = dict(adaptive=adaptive, coefficient_sign=coefficient_sign, clip=clip,
                                   clip_multiple=clip_multiple, clip_min=clip_min, clip_max=clip_max)
    coef = C.adaptive_coefficient(advantages, beta, **coef_kw)
    bounds = C.advantage_clip_bounds(beta, clip=clip, clip_multiple=clip_multiple, clip_min=clip_min,
                                     clip_max=clip_max)
    adv_cfm = C._clip(advantages, bounds) if clip_cfm_advantages else advantages
    cfm_share, den = _stats.global_share(adv_cfm * err, mask, normalizer, axis_name)
    w2_share = _stats.safe_div(_stats.masked_sum(coef * w2, mask), den)
    loss = cfm_share + w2_share
    metrics = _flow_metrics(loss, cfm_share, w2_share, err, w2, mask, n, axis_name)
    metrics.update({
        "advantage_mean": _stats.global_mean(advantages, mask, axis_name),
        "advantage_min": _stats.global_min(advantages, mask, axis_name),
        "advantage_max": _stats.global_max(advantages, mask, axis_name),
    })
    metrics.update(C._metrics(coef, advantages, mask, axis_name, adaptive, bounds))
    return loss, metrics


def _flow_metrics(loss, cfm_share, w2_share, err, w2, mask, n, axis_name) -> Metrics:
    return {
        "loss": _stats.psum(_stats.sg(loss), axis_name),
        "cfm_term": _stats.psum(_stats.sg(cfm_share), axis_name),
        "w2_term": _stats.psum(_stats.sg(w2_share), axis_name),
        "w2_mean": _stats.sg(_stats.global_mean(w2, mask, axis_name)),
        "cfm_error_mean": _stats.sg(_stats.global_mean(err, mask, axis_name)),
        "num_samples": _stats.psum(_stats.masked_count(mask, (n,)), axis_name),
    }


def orw_cfm_w2_loss(v: jax.Array, v_ref: jax.Array, u: jax.Array, rewards: jax.Array, *,
                    tau: float | jax.Array = 0.5, alpha: float | jax.Array = 1.0,
                    max_exponent: float | None = None, mask: jax.Array | None = None,
                    normalizer: float | jax.Array | None = None, axis_name: Any = None
                    ) -> tuple[jax.Array, Metrics]:
    r"""ORW-CFM-W2 baseline (Fan et al., ICLR 2025), as its public code computes it.

    docs/math.md, "Flow matching" (the fixed-beta baseline)::

        loss = (1/n) sum_i m_i [ exp(tau r_i) ||v_i - u_i||^2 + alpha ||v_i - sg(v_ref_i)||^2 ]

    with raw exponential reward weights (no softmax, no normalization; stop-gradient), ``tau = 0.5`` and
    ``alpha = 1.0`` by default.

    Args:
      v, v_ref, u: ``[N, D...]`` as in :func:`adrpo_flow_loss`.
      rewards: ``[N]`` rewards of the samples ``x1``.
      tau: reward temperature.
      alpha: fixed W2 coefficient (``>= 0``).
      max_exponent: optional cap on ``tau r`` (see :func:`exponential_reward_weights`).
      mask, normalizer, axis_name: as in :func:`adrpo_flow_loss`.

    Returns:
      ``(loss, metrics)``; metrics (global, stop-gradient): ``loss``, ``cfm_term``, ``w2_term``, ``w2_mean``,
      ``cfm_error_mean``, ``weight_mean``/``_min``/``_max`` (of ``exp(tau r)``), ``num_samples``.

    Example:
      >>> import jax.numpy as jnp
      >>> loss, m = orw_cfm_w2_loss(jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2))
      >>> loss, m["cfm_term"], m["w2_term"]
      (Array(2., dtype=float32), Array(1., dtype=float32), Array(1., dtype=float32))
    """
    n, mask, err, w2 = _flow_inputs(v, v_ref, u, mask)
    rewards = V.check_real(rewards, "rewards")
    V.check_shape(rewards, (n,), "rewards", expected_from="leading axis of `v`")
    V.check_scalar(alpha, "alpha", nonnegative=True)
    _check_normalizer(normalizer)
    V.check_axis_name(axis_name)
    weights = _stats.sg(A.exponential_reward_weights(rewards, tau, max_exponent=max_exponent, mask=mask))
    cfm_share, den = _stats.global_share(weights * err, mask, normalizer, axis_name)
    w2_share = _stats.safe_div(jnp.asarray(alpha, w2.dtype) * _stats.masked_sum(w2, mask), den)
    loss = cfm_share + w2_share
    metrics = _flow_metrics(loss, cfm_share, w2_share, err, w2, mask, n, axis_name)
    metrics.update({
        "weight_mean": _stats.global_mean(weights, mask, axis_name),
        "weight_min": _stats.global_min(weights, mask, axis_name),
        "weight_max": _stats.global_max(weights, mask, axis_name),
    })
    return loss, metrics
