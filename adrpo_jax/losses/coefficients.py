"""The adaptive divergence coefficient of ADRPO: ``beta_i = beta_0 - clip(A_i)``.

docs/math.md, "The general form": ``L = L_RL + (beta_0 - A) L_D`` per sample, with the advantage clipped inside the
coefficient so that it cannot run away.

The sign of the adaptive term is a switch, ``coefficient_sign``::

    beta_i = beta_0 - s * clip(A_i),    s = +1 for "adrpo" (the paper), s = -1 for "crd"

* ``"adrpo"`` (default): samples better than their peers are regularized *less* (``A > 0`` -> ``beta_i <
  beta_0``), worse ones more -- ADRPO's direction.
* ``"crd"``: ``beta_i = beta_0 + clip(A_i)``, the opposite direction: high-advantage samples are regularized
  *more*. This is the direction of the only other per-sample KL weighting shipped by a peer, Flow-Factory's
  CRD ``reward_adaptive_kl`` (its KL weight grows linearly with the sample's normalized reward). Here it is the
  mirror image of ADRPO's coefficient with the same clip, so the two differ only in the sign.

Clip modes:

* ``clip="multiple"`` (default): ``A`` clipped to ``[-m beta_0, +m beta_0]`` with ``m = clip_multiple``
  (default 1, the authors' recommendation), so ``beta_i`` lies in ``[(1 - m) beta_0, (1 + m) beta_0]``;
* ``clip="absolute"``: ``A`` clipped to ``[clip_min, clip_max]`` (either bound may be None = unbounded);
* ``clip="none"`` (or None): no clip; ``beta_i`` may go negative and then pushes the sample *away* from the
  reference.

``adaptive=False`` returns ``beta_0`` broadcast to the advantages' shape: the fixed-coefficient baseline goes
through the same code path. The coefficient is stop-gradient by default (advantages come from black-box
rewards; docs/math.md: "beta_eff is a constant weight for the gradient").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adrpo_jax.losses import _stats
from adrpo_jax.losses import _validation as V

__all__ = [
    "CLIP_MODES",
    "COEFFICIENT_SIGNS",
    "check_coefficient_sign",
    "advantage_clip_bounds",
    "clip_advantages",
    "adaptive_coefficient",
    "coefficient_metrics",
]

CLIP_MODES = ("multiple", "absolute", "none")
# beta_i = beta_0 - s * clip(A_i): s = +1 ("adrpo"), s = -1 ("crd"); see the module docstring.
COEFFICIENT_SIGNS = ("adrpo", "crd")
_SIGN_FACTOR = {"adrpo": 1.0, "crd": -1.0}


def check_coefficient_sign(coefficient_sign: Any) -> str:
    """``coefficient_sign`` validated: ``"adrpo"`` (``beta_0 - clip(A)``) or ``"crd"`` (``beta_0 + clip(A)``).

    Example:
      >>> check_coefficient_sign("crd")
      'crd'
    """
    if not isinstance(coefficient_sign, str) or coefficient_sign not in COEFFICIENT_SIGNS:
        raise ValueError(f"`coefficient_sign` must be one of {COEFFICIENT_SIGNS} ('adrpo': beta_0 - clip(A), the "
                         f"paper; 'crd': beta_0 + clip(A), the opposite direction), got {coefficient_sign!r}.")
    return coefficient_sign


def _check_beta(beta: Any) -> None:
    V.check_scalar(beta, "beta", nonnegative=True)


def advantage_clip_bounds(beta: float | jax.Array, *, clip: str | None = "multiple", clip_multiple: float = 1.0,
                          clip_min: float | None = None, clip_max: float | None = None
                          ) -> tuple[Any, Any] | None:
    """The ``(low, high)`` bounds applied to advantages inside the coefficient, or None for ``clip="none"``.

    A bound may be None (unbounded on that side, ``clip="absolute"`` only).

    Example:
      >>> advantage_clip_bounds(0.04)
      (-0.04, 0.04)
      >>> advantage_clip_bounds(0.04, clip="absolute", clip_min=-1.0, clip_max=0.5)
      (-1.0, 0.5)
    """
    clip = "none" if clip is None else clip
    V.check_option(clip, CLIP_MODES, "clip")
    _check_beta(beta)
    if clip == "multiple":
        V.check_scalar(clip_multiple, "clip_multiple", positive=True)
        if clip_min is not None or clip_max is not None:
            raise ValueError(f"`clip_min`/`clip_max` are only used with clip='absolute'; got clip_min={clip_min!r}, "
                             f"clip_max={clip_max!r} with clip='multiple'.")
        bound = clip_multiple * beta
        return -bound, bound
    if clip == "absolute":
        V.check_scalar(clip_min, "clip_min", allow_none=True)
        V.check_scalar(clip_max, "clip_max", allow_none=True)
        if clip_min is None and clip_max is None:
            raise ValueError("clip='absolute' needs `clip_min` and/or `clip_max`; got both None (use clip='none' "
                             "for no clipping).")
        if (clip_min is not None and clip_max is not None and not isinstance(clip_min, jax.core.Tracer)
                and not isinstance(clip_max, jax.core.Tracer) and float(clip_min) > float(clip_max)):
            raise ValueError(f"`clip_min` must be <= `clip_max`, got clip_min={clip_min!r} > clip_max={clip_max!r}.")
        return clip_min, clip_max
    return None


def _clip(a: jax.Array, bounds) -> jax.Array:
    if bounds is None:
        return a
    lo, hi = bounds
    if lo is not None:
        a = jnp.maximum(a, jnp.asarray(lo, a.dtype))
    if hi is not None:
        a = jnp.minimum(a, jnp.asarray(hi, a.dtype))
    return a


def _outside(a: jax.Array, bounds) -> jax.Array:
    if bounds is None:
        return jnp.zeros(a.shape, bool)
    lo, hi = bounds
    out = jnp.zeros(a.shape, bool)
    if lo is not None:
        out = out | (a < lo)
    if hi is not None:
        out = out | (a > hi)
    return out


def _check_advantages(advantages: Any) -> jax.Array:
    advantages = V.check_array(advantages, "advantages")
    V.check_floating(advantages, "advantages")
    return V.to_float(advantages)


def clip_advantages(advantages: jax.Array, beta: float | jax.Array, *, clip: str | None = "multiple",
                    clip_multiple: float = 1.0, clip_min: float | None = None,
                    clip_max: float | None = None) -> jax.Array:
    """Advantages clipped as inside the ADRPO coefficient (see the module docstring for the modes).

    Args:
      advantages: any shape, floating.
      beta: base coefficient ``beta_0 >= 0`` (scales the ``"multiple"`` bounds).
      clip, clip_multiple, clip_min, clip_max: the clip mode and its parameters.

    Returns:
      Same shape, float32. Differentiable (gradient 1 inside the bounds, 0 outside).

    Example:
      >>> import jax.numpy as jnp
      >>> clip_advantages(jnp.array([-1.0, 0.01, 2.0]), 0.04)
      Array([-0.04,  0.01,  0.04], dtype=float32)
    """
    advantages = _check_advantages(advantages)
    bounds = advantage_clip_bounds(beta, clip=clip, clip_multiple=clip_multiple, clip_min=clip_min,
                                   clip_max=clip_max)
    return _clip(advantages, bounds)


def adaptive_coefficient(advantages: jax.Array, beta: float | jax.Array, *, adaptive: bool = True,
                         coefficient_sign: str = "adrpo", clip: str | None = "multiple", clip_multiple: float = 1.0,
                         clip_min: float | None = None, clip_max: float | None = None,
                         stop_gradient: bool = True) -> jax.Array:
    r"""Per-sample divergence coefficient ``beta_i = beta_0 - s clip(A_i)`` (docs/math.md, "The general form").

    ``s = +1`` (``coefficient_sign="adrpo"``, the paper): samples better than their peers (``A > 0``) are
    regularized less, worse ones more. ``s = -1`` (``"crd"``): ``beta_i = beta_0 + clip(A_i)``, the opposite
    direction (module docstring). With the default clip (``+-1 x beta_0``) ``beta_i`` lies in ``[0, 2 beta_0]``
    for either sign. ``adaptive=False`` gives the fixed coefficient ``beta_0`` for every sample (the GRPO /
    ORW-CFM-W2 baselines; the sign is then irrelevant).

    Args:
      advantages: any shape (usually ``[N]``), floating.
      beta: ``beta_0 >= 0``, Python number or scalar array (e.g. a schedule under ``jit``).
      adaptive: if False, return ``beta_0`` broadcast to ``advantages.shape``.
      coefficient_sign: ``"adrpo"`` (``beta_0 - clip(A)``, default) or ``"crd"`` (``beta_0 + clip(A)``).
      clip, clip_multiple, clip_min, clip_max: the advantage clip inside the coefficient (module docstring).
      stop_gradient: if True (default) the result carries no gradient (to advantages or beta).

    Returns:
      ``beta_i`` with the shape of ``advantages``, float32.

    Example:
      >>> import jax.numpy as jnp
      >>> adaptive_coefficient(jnp.array([-1.0, 0.0, 0.01, 1.0]), 0.04)
      Array([0.08, 0.04, 0.03, 0.  ], dtype=float32)
      >>> adaptive_coefficient(jnp.array([-1.0, 0.0, 0.01, 1.0]), 0.04, coefficient_sign="crd")
      Array([0.  , 0.04, 0.05, 0.08], dtype=float32)
      >>> adaptive_coefficient(jnp.array([-1.0, 1.0]), 0.04, adaptive=False)
      Array([0.04, 0.04], dtype=float32)
    """
    advantages = _check_advantages(advantages)
    if not isinstance(adaptive, bool):
        raise ValueError(f"`adaptive` must be a bool, got {adaptive!r}.")
    sign = _SIGN_FACTOR[check_coefficient_sign(coefficient_sign)]
    bounds = advantage_clip_bounds(beta, clip=clip, clip_multiple=clip_multiple, clip_min=clip_min,
                                   clip_max=clip_max)
    b = jnp.asarray(beta, advantages.dtype)
    if adaptive:
        clipped = _clip(advantages, bounds)
        coef = b - clipped if sign > 0 else b + clipped
    else:
        coef = jnp.broadcast_to(b, advantages.shape)
    return _stats.sg(coef) if stop_gradient else coef


def coefficient_metrics(advantages: jax.Array, beta: float | jax.Array, *, mask: jax.Array | None = None,
                        axis_name: Any = None, adaptive: bool = True, coefficient_sign: str = "adrpo",
                        clip: str | None = "multiple",
                        clip_multiple: float = 1.0, clip_min: float | None = None,
                        clip_max: float | None = None) -> dict[str, jax.Array]:
    """Log statistics of the coefficient over valid samples (global over ``axis_name``; stop-gradient).

    Returns a dict with ``beta_eff_mean``, ``beta_eff_min``, ``beta_eff_max`` (0 when no sample is valid) and
    ``adv_clip_fraction``: the fraction of valid advantages outside the clip bounds (0 when
    ``adaptive=False`` or ``clip="none"``). ``coefficient_sign`` as in :func:`adaptive_coefficient`.

    Example:
      >>> import jax.numpy as jnp
      >>> m = coefficient_metrics(jnp.array([-1.0, 0.0, 0.02, 1.0]), 0.04)
      >>> float(m["beta_eff_mean"]), float(m["adv_clip_fraction"])
      (0.035, 0.5)
    """
    advantages = _check_advantages(advantages)
    V.check_axis_name(axis_name)
    mask = V.check_mask(mask, advantages.shape, "mask", expected_from="advantages")
    coef = adaptive_coefficient(advantages, beta, adaptive=adaptive, coefficient_sign=coefficient_sign, clip=clip,
                                clip_multiple=clip_multiple, clip_min=clip_min, clip_max=clip_max)
    return _metrics(coef, advantages, mask, axis_name, adaptive,
                    advantage_clip_bounds(beta, clip=clip, clip_multiple=clip_multiple, clip_min=clip_min,
                                          clip_max=clip_max))


def _metrics(coef, advantages, mask, axis_name, adaptive, bounds) -> dict[str, jax.Array]:
    coef = _stats.sg(coef)
    outside = _outside(_stats.sg(advantages), bounds if adaptive else None).astype(coef.dtype)
    return {
        "beta_eff_mean": _stats.global_mean(coef, mask, axis_name),
        "beta_eff_min": _stats.global_min(coef, mask, axis_name),
        "beta_eff_max": _stats.global_max(coef, mask, axis_name),
        "adv_clip_fraction": _stats.global_mean(outside, mask, axis_name),
    }
