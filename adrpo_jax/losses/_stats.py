"""Masked, optionally cross-device statistics used by the losses.

``axis_name`` everywhere is ``None`` (no collective; the plain local statistic) or a mesh/pmap axis name or
tuple of names bound by an enclosing ``shard_map``/``pmap``; the statistic is then global over that axis.
Divisions by an empty count return 0 (never NaN), in value and in gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

AxisName = Any  # None, a hashable name, or a tuple of names

__all__ = [
    "psum",
    "pmax",
    "pmin",
    "safe_div",
    "masked_sum",
    "masked_count",
    "global_mean",
    "global_min",
    "global_max",
    "gather_apply_slice",
    "sg",
]


def sg(x):
    return jax.lax.stop_gradient(x)


def psum(x, axis_name: AxisName):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def pmax(x, axis_name: AxisName):
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def pmin(x, axis_name: AxisName):
    return x if axis_name is None else jax.lax.pmin(x, axis_name)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den != 0``, else 0; the unused branch never produces NaN gradients."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), jnp.zeros_like(num))


def masked_sum(x: jax.Array, mask: jax.Array | None, axis=None) -> jax.Array:
    """Sum of ``x`` over valid entries; masked entries are replaced by 0 (never multiplied, so inf/NaN in
    padding never leaks)."""
    if mask is None:
        return jnp.sum(x, axis=axis)
    return jnp.sum(jnp.where(mask, x, jnp.zeros_like(x)), axis=axis)


def masked_count(mask: jax.Array | None, shape, dtype=jnp.float32, axis=None) -> jax.Array:
    """Number of valid entries (all entries when ``mask`` is None), as ``dtype``."""
    if mask is None:
        return jnp.sum(jnp.ones(shape, dtype), axis=axis)
    return jnp.sum(mask, axis=axis, dtype=dtype)


def global_mean(x: jax.Array, mask: jax.Array | None = None, axis_name: AxisName = None) -> jax.Array:
    """Mean over all valid entries of ``x`` (over devices too when ``axis_name`` is set); 0 if none."""
    total = psum(masked_sum(x, mask), axis_name)
    count = psum(masked_count(mask, x.shape, x.dtype), axis_name)
    return safe_div(total, count)


def global_max(x: jax.Array, mask: jax.Array | None = None, axis_name: AxisName = None) -> jax.Array:
    """Max over valid entries (global with ``axis_name``); 0 when there is no valid entry. Stop-gradient."""
    x = sg(x)
    neg_inf = jnp.asarray(-jnp.inf, x.dtype)
    local = jnp.max(jnp.where(mask, x, neg_inf) if mask is not None else x, initial=neg_inf)
    out = pmax(local, axis_name)
    return jnp.where(jnp.isneginf(out), jnp.zeros_like(out), out)


def global_min(x: jax.Array, mask: jax.Array | None = None, axis_name: AxisName = None) -> jax.Array:
    """Min over valid entries (global with ``axis_name``); 0 when there is no valid entry. Stop-gradient."""
    x = sg(x)
    pos_inf = jnp.asarray(jnp.inf, x.dtype)
    local = jnp.min(jnp.where(mask, x, pos_inf) if mask is not None else x, initial=pos_inf)
    out = pmin(local, axis_name)
    return jnp.where(jnp.isposinf(out), jnp.zeros_like(out), out)


def gather_apply_slice(fn: Callable[..., jax.Array], arrays: tuple, axis_name: AxisName) -> jax.Array:
    """Applies ``fn`` to the *global* leading-axis concatenation of ``arrays`` and returns this device's rows.

    Without ``axis_name`` this is ``fn(*arrays)``. With it, each array (leading axis = this device's shard,
    equal size on every device) is all-gathered (tiled) over ``axis_name``, ``fn`` runs on the full arrays
    (identically on every device) and the rows of this device, ``axis_index * n_local : + n_local``, are
    returned. Correct however the data's groups fall across shards; gradients flow back through the gather.
    """
    if axis_name is None:
        return fn(*arrays)
    n_local = arrays[0].shape[0]
    full = [None if a is None else jax.lax.all_gather(a, axis_name, axis=0, tiled=True) for a in arrays]
    out = fn(*full)
    start = jax.lax.axis_index(axis_name) * n_local
    return jax.lax.dynamic_slice_in_dim(out, start, n_local, axis=0)


def global_share(per_item: jax.Array, mask: jax.Array | None, normalizer, axis_name: AxisName
                 ) -> tuple[jax.Array, jax.Array]:
    """This device's share of a global mean: ``(local masked sum / denominator, denominator)``.

    The denominator is ``normalizer`` when given (taken as already global), else the psum over
    ``axis_name`` of the number of valid items. ``psum(share, axis_name)`` is the global mean.
    """
    local_sum = masked_sum(per_item, mask)
    if normalizer is None:
        den = psum(masked_count(mask, per_item.shape, local_sum.dtype), axis_name)
    else:
        den = jnp.asarray(normalizer, local_sum.dtype)
    den = sg(den)
    return safe_div(local_sum, den), den
