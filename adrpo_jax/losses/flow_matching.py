"""Flow-matching losses: the rectified-flow path, CFM, ADRPO-W2 and the ORW-CFM-W2 baseline.

Shapes: ``N`` samples, arbitrary data dimensions ``D...`` (e.g. ``[N, H, W, C]``). Conventions (ADRPO.md,
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

__all__ = [
    "rectified_flow_path",
    "flow_matching_error",
    "cfm_loss",
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

    Implements ADRPO.md, "Flow matching": ``x_t = (1 - t) x0 + t x1`` and ``u_t = dx_t/dt = x1 - x0``.

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

    This is the regression error of conditional flow matching (ADRPO.md, ``||v_theta - u_t||^2``); with
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
