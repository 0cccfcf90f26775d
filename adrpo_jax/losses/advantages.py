"""Advantage estimators: GRPO group-relative, per-prompt mean baseline, RLOO, batch-normalized, exp(tau r).

Shapes: rewards are ``[N]`` (one scalar reward per sample) unless stated otherwise. Groups (the samples
generated for the same prompt) are given in one of three ways:

* ``rewards`` of shape ``[num_groups, group_size]`` (one row per group);
* ``rewards`` of shape ``[N]`` with ``group_size``: contiguous groups ``[0, K), [K, 2K), ...`` (TRL's layout);
* ``rewards`` of shape ``[N]`` with integer ``group_ids`` ``[N]`` in ``[0, num_groups)`` (any order; ids out of
  range are treated as masked).

Masked samples (``mask`` False/0) get advantage 0 and never enter a mean, std or count. Groups with fewer than
two valid samples, or whose valid rewards are all equal (zero variance), give advantage exactly 0 -- in value
and without NaN in any gradient.

``axis_name``: inside ``shard_map``/``pmap`` the leading axis of ``rewards`` is this device's shard of the
global batch (equal-sized shards, concatenated in ``axis_index`` order). Group statistics are then computed on
the all-gathered global reward vector (small: one scalar per sample), so a group may be split across devices
in any way; each device gets the advantages of its own rows. Contiguous ``group_size`` groups refer to global
positions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adrpo_jax.losses import _stats
from adrpo_jax.losses import _validation as V

__all__ = [
    "group_advantages",
    "group_advantages_from_ids",
    "prompt_mean_advantages",
    "rloo_advantages",
    "batch_normalized_advantages",
    "exponential_reward_weights",
]

_STD_LEVELS = ("group", "batch")


def _safe_sqrt(x: jax.Array) -> jax.Array:
    ok = x > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, x, 1.0)), 0.0)


class _SegmentOps:
    """Per-group reductions for groups given by integer ids (``jax.ops.segment_*``; scatter-based)."""

    def __init__(self, ids: jax.Array, num_groups: int):
        self.ids, self.num_groups = ids, num_groups

    def sum(self, x):
        return jax.ops.segment_sum(x, self.ids, self.num_groups)

    def max(self, x):
        return jax.ops.segment_max(x, self.ids, self.num_groups)

    def min(self, x):
        return jax.ops.segment_min(x, self.ids, self.num_groups)

    def bcast(self, g):
        return g[self.ids]


class _DenseOps:
    """Per-group reductions for contiguous groups laid out as ``[num_groups, group_size]`` (plain reductions,
    no scatter: cheaper to compile and fast on TPU)."""

    def sum(self, x):
        return jnp.sum(x, axis=-1)

    def max(self, x):
        return jnp.max(x, axis=-1)

    def min(self, x):
        return jnp.min(x, axis=-1)

    def bcast(self, g):
        return g[..., None]


def _group_core(rewards: jax.Array, valid: jax.Array, ops, *, estimator: str, scale_by_std: bool,
                std_level: str, ddof: int, eps: float) -> jax.Array:
    """Advantages for a full (global) batch; ``ops`` reduces per group and broadcasts back."""
    r = jnp.where(valid, rewards, 0.0)
    count = ops.sum(valid.astype(r.dtype))
    total = ops.sum(r)
    gmax = ops.max(jnp.where(valid, r, -jnp.inf))
    gmin = ops.min(jnp.where(valid, r, jnp.inf))
    # A group is degenerate when it has < 2 valid samples or all its valid rewards are equal: exact 0.
    zero_out = ops.bcast(~(gmax > gmin)) | ~valid

    if estimator == "rloo":
        loo_mean = _stats.safe_div(ops.bcast(total) - r, ops.bcast(count) - 1.0)
        return jnp.where(zero_out, 0.0, r - loo_mean)

    mean = ops.bcast(_stats.safe_div(total, count))
    centered = jnp.where(zero_out, 0.0, r - mean)
    if not scale_by_std:
        return centered
    if std_level == "group":
        dev = jnp.where(valid, r - mean, 0.0)
        var = _stats.safe_div(ops.sum(dev * dev), jnp.maximum(count - ddof, 0.0))
        std = ops.bcast(_safe_sqrt(var))
    else:  # batch std of the raw rewards over all valid samples (TRL scale_rewards="batch")
        n = jnp.sum(valid, dtype=r.dtype)
        bmean = _stats.safe_div(jnp.sum(r), n)
        dev = jnp.where(valid, r - bmean, 0.0)
        std = _safe_sqrt(_stats.safe_div(jnp.sum(dev * dev), jnp.maximum(n - ddof, 0.0)))
    return jnp.where(zero_out, 0.0, _stats.safe_div(centered, std + eps))


def _grouped(rewards: Any, group_size: Any, group_ids: Any, num_groups: Any, mask: Any, axis_name: Any, *,
             estimator: str, scale_by_std: bool = False, std_level: str = "group", ddof: int = 1,
             eps: float = 1e-4) -> jax.Array:
    rewards = V.check_real(rewards, "rewards")
    V.check_rank(rewards, (1, 2), "rewards")
    V.check_axis_name(axis_name)
    if not isinstance(scale_by_std, bool):
        raise ValueError(f"`scale_by_std` must be a bool, got {scale_by_std!r}.")
    V.check_option(std_level, _STD_LEVELS, "std_level")
    ddof = V.check_static_int(ddof, "ddof", minimum=0)
    V.check_scalar(eps, "eps", nonnegative=True)
    shape = rewards.shape
    mask = V.check_mask(mask, shape, "mask", expected_from="rewards")

    if rewards.ndim == 2:
        if group_ids is not None:
            raise ValueError("`group_ids` must be None when `rewards` is [num_groups, group_size], got an array.")
        if group_size is not None and group_size != shape[1]:
            raise ValueError(f"`group_size`={group_size!r} disagrees with `rewards` of shape {shape} "
                             f"(rows are groups of size {shape[1]}).")
        group_size = shape[1]
    elif (group_size is None) == (group_ids is None):
        raise ValueError("Give exactly one of `group_size` (contiguous groups) or `group_ids` (with "
                         f"`num_groups`) for `rewards` of shape {shape}; got group_size={group_size!r} and "
                         f"group_ids={'None' if group_ids is None else 'an array'}.")

    if group_ids is not None:
        num_groups = V.check_static_int(num_groups, "num_groups")
        group_ids = V.check_array(group_ids, "group_ids")
        V.check_integer(group_ids, "group_ids")
        V.check_shape(group_ids, shape, "group_ids", expected_from="rewards")
    else:
        group_size = V.check_static_int(group_size, "group_size")
        if num_groups is not None:
            raise ValueError(f"`num_groups` is only used with `group_ids`; got num_groups={num_groups!r} "
                             "with `group_size`.")

    flat_r = V.to_float(rewards).reshape(-1)
    flat_m = jnp.ones(flat_r.shape, bool) if mask is None else mask.reshape(-1)
    flat_ids = None if group_ids is None else group_ids.reshape(-1)

    kw = dict(estimator=estimator, scale_by_std=scale_by_std, std_level=std_level, ddof=ddof, eps=eps)

    def compute(r, m, ids):
        n = r.shape[0]
        if ids is not None:
            valid = m & (ids >= 0) & (ids < num_groups)  # out-of-range ids: treated as masked
            return _group_core(r, valid, _SegmentOps(jnp.clip(ids, 0, num_groups - 1), num_groups), **kw)
        if n % group_size:
            where = " (global over `axis_name`)" if axis_name is not None else ""
            raise ValueError(f"`group_size`={group_size} does not divide the number of rewards {n}{where}.")
        dense = (n // group_size, group_size)
        return _group_core(r.reshape(dense), m.reshape(dense), _DenseOps(), **kw).reshape(n)

    out = _stats.gather_apply_slice(compute, (flat_r, flat_m, flat_ids), axis_name)
    return out.reshape(shape)


def group_advantages(rewards: jax.Array, group_size: int | None = None, *, group_ids: jax.Array | None = None,
                     num_groups: int | None = None, scale_by_std: bool = True, std_level: str = "group",
                     ddof: int = 1, eps: float = 1e-4, mask: jax.Array | None = None,
                     axis_name: Any = None) -> jax.Array:
    r"""Group-relative advantages of GRPO: ``A_i = (r_i - mean_g r) / (std_g r + eps)``.

    docs/math.md, "Advantages / LLMs (GRPO)". ``scale_by_std=False`` is Dr. GRPO's ``A_i = r_i - mean_g r``.
    ``std_level="batch"`` divides by the std of all valid rewards of the (global) batch instead of the group
    std (TRL's ``scale_rewards="batch"``). ``ddof=1`` (default) is the unbiased sample std, as TRL's
    ``torch.std``; tunix uses ``ddof=0``.

    Args:
      rewards: ``[N]`` (with ``group_size`` or ``group_ids``) or ``[num_groups, group_size]``; bool, integer
        or floating.
      group_size: size of the contiguous groups of an ``[N]`` input (must divide the global ``N``).
      group_ids: ``[N]`` integer group of each sample (alternative to ``group_size``), with ``num_groups``.
      num_groups: static number of groups for ``group_ids``.
      scale_by_std: divide by ``std + eps`` (GRPO) or not (Dr. GRPO).
      std_level: ``"group"`` or ``"batch"``.
      ddof: delta degrees of freedom of the std.
      eps: added to the std.
      mask: optional, same shape as ``rewards``; invalid samples get 0 and enter no statistic.
      axis_name: mesh/pmap axis name(s) over which the batch is sharded (see the module docstring).

    Returns:
      Advantages with the shape of ``rewards``, float32. Degenerate groups (fewer than 2 valid samples,
      all-equal rewards) give 0.

    Example:
      >>> import jax.numpy as jnp
      >>> group_advantages(jnp.array([1.0, 0.0, 1.0, 1.0]), group_size=2, eps=0.0)
      Array([ 0.7071067, -0.7071067,  0.       ,  0.       ], dtype=float32)
      >>> group_advantages(jnp.array([[1.0, 0.0], [2.0, 2.0]]), scale_by_std=False)
      Array([[ 0.5, -0.5],
             [ 0. ,  0. ]], dtype=float32)
    """
    return _grouped(rewards, group_size, group_ids, num_groups, mask, axis_name, estimator="mean",
                    scale_by_std=scale_by_std, std_level=std_level, ddof=ddof, eps=eps)


def group_advantages_from_ids(rewards: jax.Array, group_ids: jax.Array, num_groups: int, *,
                              scale_by_std: bool = True, std_level: str = "group", ddof: int = 1,
                              eps: float = 1e-4, mask: jax.Array | None = None, axis_name: Any = None
                              ) -> jax.Array:
    r""":func:`group_advantages` with groups given by integer ids (``jax.ops.segment_sum`` based).

    Args:
      rewards: ``[N]``.
      group_ids: ``[N]`` integers in ``[0, num_groups)``; samples with other ids are treated as masked.
      num_groups: static Python int.
      scale_by_std, std_level, ddof, eps, mask, axis_name: as in :func:`group_advantages`.

    Returns:
      ``[N]`` float32.

    Example:
      >>> import jax.numpy as jnp
      >>> group_advantages_from_ids(jnp.array([1.0, 5.0, 3.0, 5.0]), jnp.array([0, 1, 0, 1]), 2,
      ...                           scale_by_std=False)
      Array([-1.,  0.,  1.,  0.], dtype=float32)
    """
    V.check_rank(V.check_real(rewards, "rewards"), 1, "rewards")
    if group_ids is None:
        raise ValueError("`group_ids` must be an integer array, got None.")
    return _grouped(rewards, None, group_ids, num_groups, mask, axis_name, estimator="mean",
                    scale_by_std=scale_by_std, std_level=std_level, ddof=ddof, eps=eps)


def prompt_mean_advantages(rewards: jax.Array, prompt_ids: jax.Array, num_prompts: int, *,
                           scale_by_std: bool = False, ddof: int = 1, eps: float = 1e-4,
                           mask: jax.Array | None = None, axis_name: Any = None) -> jax.Array:
    r"""ADRPO's flow-matching advantage ``A(x1, c) = R(x1, c) - V(c)``, ``V(c)`` = mean reward of the prompt.

    docs/math.md, "Advantages / Flow matching": the baseline is the mean reward of the samples of the same prompt
    ``c`` in the (global) batch; no std normalization by default (``scale_by_std=True`` divides by the
    prompt's reward std + ``eps``). A prompt with one valid sample, or with all-equal rewards, gives 0.

    Args:
      rewards: ``[N]``.
      prompt_ids: ``[N]`` integer prompt (class/condition) ids in ``[0, num_prompts)``.
      num_prompts: static Python int, the number of distinct prompt ids.
      scale_by_std, ddof, eps, mask, axis_name: as in :func:`group_advantages`.

    Returns:
      ``[N]`` float32.

    Example:
      >>> import jax.numpy as jnp
      >>> prompt_mean_advantages(jnp.array([0.25, 1.0, 0.75, 0.0]), jnp.array([3, 0, 3, 0]), 4)
      Array([-0.25,  0.5 ,  0.25, -0.5 ], dtype=float32)
    """
    V.check_rank(V.check_real(rewards, "rewards"), 1, "rewards")
    if prompt_ids is None:
        raise ValueError("`prompt_ids` must be an integer array, got None.")
    prompt_ids = V.check_array(prompt_ids, "prompt_ids")
    V.check_integer(prompt_ids, "prompt_ids")
    V.check_shape(prompt_ids, jnp.shape(rewards), "prompt_ids", expected_from="rewards")
    num_prompts = V.check_static_int(num_prompts, "num_prompts")
    return _grouped(rewards, None, prompt_ids, num_prompts, mask, axis_name, estimator="mean",
                    scale_by_std=scale_by_std, std_level="group", ddof=ddof, eps=eps)


def rloo_advantages(rewards: jax.Array, group_size: int | None = None, *, group_ids: jax.Array | None = None,
                    num_groups: int | None = None, mask: jax.Array | None = None,
                    axis_name: Any = None) -> jax.Array:
    r"""Leave-one-out (RLOO) advantages ``A_i = r_i - mean_{j in g, j != i} r_j``.

    Equal to ``n/(n-1) (r_i - mean_g r)`` for a group of ``n`` valid samples. Groups as in
    :func:`group_advantages`; groups with fewer than 2 valid samples or all-equal rewards give 0.

    Args:
      rewards: ``[N]`` or ``[num_groups, group_size]``.
      group_size, group_ids, num_groups, mask, axis_name: as in :func:`group_advantages`.

    Returns:
      Shape of ``rewards``, float32.

    Example:
      >>> import jax.numpy as jnp
      >>> rloo_advantages(jnp.array([[1.0, 0.0, 0.0]]))
      Array([[ 1. , -0.5, -0.5]], dtype=float32)
    """
    return _grouped(rewards, group_size, group_ids, num_groups, mask, axis_name, estimator="rloo")


def batch_normalized_advantages(rewards: jax.Array, *, scale_by_std: bool = True, ddof: int = 1,
                                eps: float = 1e-4, mask: jax.Array | None = None,
                                axis_name: Any = None) -> jax.Array:
    r"""Batch-normalized advantages ``A_i = (r_i - mean_batch r) / (std_batch r + eps)``.

    Statistics over all valid entries of ``rewards`` (any shape), global over ``axis_name`` (psum of sums and
    counts; no gather needed). Also usable to re-normalize other advantages (e.g. RLOO) over the batch.
    All-equal valid entries give 0.

    Args:
      rewards: any shape; bool, integer or floating.
      scale_by_std: divide by ``std + eps``; if False only the batch mean is subtracted.
      ddof: delta degrees of freedom of the std (1 = unbiased, as ``torch.std``).
      eps: added to the std.
      mask: optional, same shape; invalid entries get 0 and enter no statistic.
      axis_name: mesh/pmap axis name(s) over which the batch is sharded.

    Returns:
      Shape of ``rewards``, float32.

    Example:
      >>> import jax.numpy as jnp
      >>> batch_normalized_advantages(jnp.array([1.0, 2.0, 3.0]), eps=0.0)
      Array([-1.,  0.,  1.], dtype=float32)
    """
    rewards = V.check_real(rewards, "rewards")
    V.check_axis_name(axis_name)
    if not isinstance(scale_by_std, bool):
        raise ValueError(f"`scale_by_std` must be a bool, got {scale_by_std!r}.")
    ddof = V.check_static_int(ddof, "ddof", minimum=0)
    V.check_scalar(eps, "eps", nonnegative=True)
    mask = V.check_mask(mask, rewards.shape, "mask", expected_from="rewards")
    valid = jnp.ones(rewards.shape, bool) if mask is None else mask
    r = jnp.where(valid, V.to_float(rewards), 0.0)
    n = _stats.psum(jnp.sum(valid, dtype=r.dtype), axis_name)
    mean = _stats.safe_div(_stats.psum(jnp.sum(r), axis_name), n)
    degenerate = ~(_stats.global_max(r, valid, axis_name) > _stats.global_min(r, valid, axis_name))
    dev = jnp.where(valid & ~degenerate, r - mean, 0.0)
    if not scale_by_std:
        return dev
    var = _stats.safe_div(_stats.psum(jnp.sum(dev * dev), axis_name), jnp.maximum(n - ddof, 0.0))
    return _stats.safe_div(dev, _safe_sqrt(var) + eps)


def exponential_reward_weights(rewards: jax.Array, tau: float | jax.Array = 0.5, *,
                               max_exponent: float | None = None, mask: jax.Array | None = None) -> jax.Array:
    r"""Raw exponential reward weights ``w_i = exp(tau * r_i)`` of ORW-CFM-W2 (no softmax, no normalization).

    docs/math.md, "Flow matching" (the fixed-beta baseline). ``exp`` overflows float32 for ``tau * r > 88.7``;
    ``max_exponent`` optionally caps ``tau * r`` (the gradient is 0 above the cap).

    Args:
      rewards: any shape.
      tau: temperature (Python number or scalar array).
      max_exponent: optional upper bound on ``tau * r``.
      mask: optional, same shape; invalid entries get weight 0.

    Returns:
      Shape of ``rewards``, float32.

    Example:
      >>> import jax.numpy as jnp
      >>> exponential_reward_weights(jnp.array([0.0, 2.0]), tau=0.5)
      Array([1.       , 2.7182817], dtype=float32)
    """
    rewards = V.check_real(rewards, "rewards")
    V.check_scalar(tau, "tau")
    V.check_scalar(max_exponent, "max_exponent", allow_none=True)
    mask = V.check_mask(mask, rewards.shape, "mask", expected_from="rewards")
    r = V.to_float(rewards)
    if mask is not None:
        r = jnp.where(mask, r, 0.0)
    z = jnp.asarray(tau, r.dtype) * r
    if max_exponent is not None:
        z = jnp.minimum(z, max_exponent)
    w = jnp.exp(z)
    return w if mask is None else jnp.where(mask, w, 0.0)
