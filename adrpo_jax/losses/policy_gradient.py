"""Policy-gradient losses: clipped surrogate, loss aggregation, and the GRPO loss with ADRPO's adaptive KL.

Shapes: ``B`` sequences (completions) of ``T`` (padded) tokens. ``logp``, ``old_logp``, ``ref_logp`` and
``mask`` are ``[B, T]`` (log-probs of the sampled tokens under the current, behaviour and reference policies;
``mask`` marks completion tokens), ``advantages`` is ``[B]``.

Loss aggregation modes (how the per-token loss ``l_{i,t}`` becomes a scalar; TRL ``loss_type`` / verl
``loss_agg_mode`` in brackets):

* ``"token_mean"``: ``sum_{i,t} m l / sum_{i,t} m`` over the (global) batch [TRL bnpo/dapo, verl token-mean];
* ``"sequence_mean"``: ``sum_i (sum_t m l / sum_t m) / B_global``: each sequence's token mean, averaged over
  *all* ``B`` rows; a row without any valid token adds 0 but still counts [TRL grpo];
* ``"nonempty_sequence_mean"``: the same per-sequence token means averaged over the rows that have at least
  one valid token only (differs from ``"sequence_mean"`` when whole rows are masked, e.g. truncated
  completions with ``mask_truncated_completions``);
* ``"constant_normalizer"``: ``sum_{i,t} m l / (B_global * max_tokens)`` (Dr. GRPO) [TRL dr_grpo,
  verl seq-mean-token-sum-norm].

``normalizer=`` replaces the denominator (token count, row count, non-empty row count or ``B * max_tokens``) by a
given global value, e.g. the whole batch's when accumulating gradients over micro-batches.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

from adrpo_jax.losses import _stats
from adrpo_jax.losses import _validation as V
from adrpo_jax.losses import coefficients as C
from adrpo_jax.losses import divergences as D

__all__ = [
    "LOSS_AGGREGATIONS",
    "RATIO_LEVELS",
    "importance_log_ratio",
    "clipped_surrogate",
    "aggregate_loss",
    "grpo_loss",
]

LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "nonempty_sequence_mean", "constant_normalizer")
RATIO_LEVELS = ("token", "sequence")
Metrics = dict[str, jax.Array]


def _check_tokens(x: Any, name: str, shape=None, ref_name: str = "logp") -> jax.Array:
    x = V.check_array(x, name)
    V.check_floating(x, name)
    if shape is None:
        V.check_rank(x, 2, name)
    else:
        V.check_shape(x, shape, name, expected_from=ref_name)
    return V.to_float(x)


def _zero_invalid(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return x if mask is None else jnp.where(mask, x, jnp.zeros_like(x))


def _seq_log_ratio(log_ratio: jax.Array, mask: jax.Array | None) -> jax.Array:
    """[B, T] -> [B]: mean over valid tokens (0 for a sequence without valid tokens)."""
    n = _stats.masked_count(mask, log_ratio.shape, log_ratio.dtype, axis=-1)
    return _stats.safe_div(_stats.masked_sum(log_ratio, mask, axis=-1), n)


def importance_log_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array | None = None, *,
                         level: str = "token") -> jax.Array:
    r"""Log importance ratio ``log rho`` at token or sequence level.

    * ``"token"``: ``log rho_{i,t} = log pi(o_t) - log pi_old(o_t)`` (PPO/GRPO);
    * ``"sequence"``: ``log s_i = mean_{valid t} (log pi - log pi_old)`` broadcast over the tokens of sequence
      ``i`` (GSPO's length-normalized sequence ratio).

    Args:
      logp, old_logp: ``[B, T]``.
      mask: optional ``[B, T]``; invalid tokens are excluded from the sequence mean and get 0.
      level: ``"token"`` or ``"sequence"``.

    Returns:
      ``[B, T]`` float32.

    Example:
      >>> import jax.numpy as jnp
      >>> importance_log_ratio(jnp.array([[-1.0, -2.0, -9.0]]), jnp.array([[-1.5, -1.5, 0.0]]),
      ...                      jnp.array([[1, 1, 0]]), level="sequence")
      Array([[0., 0., 0.]], dtype=float32)
    """
    logp = _check_tokens(logp, "logp")
    old_logp = _check_tokens(old_logp, "old_logp", logp.shape)
    V.check_option(level, RATIO_LEVELS, "level")
    mask = V.check_mask(mask, logp.shape, "mask", expected_from="logp")
    return _log_ratio(_zero_invalid(logp, mask), _zero_invalid(old_logp, mask), mask, level)


def _log_ratio(logp, old_logp, mask, level):
    lr = _zero_invalid(logp - old_logp, mask)
    if level == "sequence":
        lr = jnp.broadcast_to(_seq_log_ratio(lr, mask)[:, None], lr.shape)
        lr = _zero_invalid(lr, mask)
    return lr


def _check_eps(eps_low, eps_high, dual_clip):
    V.check_scalar(eps_low, "eps_low", nonnegative=True)
    if not isinstance(eps_low, jax.core.Tracer) and float(eps_low) >= 1.0:
        raise ValueError(f"`eps_low` must be in [0, 1) (the lower clip bound is 1 - eps_low), got {eps_low!r}.")
    eps_high = eps_low if eps_high is None else eps_high
    V.check_scalar(eps_high, "eps_high", nonnegative=True)
    V.check_scalar(dual_clip, "dual_clip", greater_than=1.0, allow_none=True)
    return eps_low, eps_high


def _surrogate(ratio, adv, eps_low, eps_high, dual_clip):
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip), loss)
    return loss


def clipped_surrogate(ratio: jax.Array, advantages: jax.Array, *, eps_low: float = 0.2,
                      eps_high: float | None = None, dual_clip: float | None = None) -> jax.Array:
    r"""Per-element PPO clipped surrogate loss with asymmetric bounds and optional dual clip.

    ``l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))`` (docs/math.md's ``-min(rho A, clip(rho) A)``);
    with ``dual_clip = c > 1`` (Ye et al. 2020, verl's ``clip_ratio_c``) the loss of negative-advantage elements
    is further capped at ``-A c``: ``l = min(l, -A c)`` where ``A < 0``.

    Args:
      ratio: importance ratios ``rho``, any shape.
      advantages: broadcastable to ``ratio`` (e.g. ``[B, 1]`` against ``[B, T]``).
      eps_low: lower clip ``1 - eps_low``, in ``[0, 1)``.
      eps_high: upper clip ``1 + eps_high`` (default ``eps_low``; DAPO's clip-higher uses e.g. 0.28).
      dual_clip: optional ``c > 1``.

    Returns:
      Per-element loss, shape of ``ratio`` (broadcast), float32.

    Example:
      >>> import jax.numpy as jnp
      >>> clipped_surrogate(jnp.array([0.5, 1.0, 2.0, 5.0]), jnp.array([1.0, 1.0, 1.0, -1.0]), dual_clip=3.0)
      Array([-0.5, -1. , -1.2,  3. ], dtype=float32)
    """
    ratio = V.check_array(ratio, "ratio")
    advantages = V.check_array(advantages, "advantages")
    V.check_floating(ratio, "ratio")
    V.check_floating(advantages, "advantages")
    try:
        jnp.broadcast_shapes(ratio.shape, advantages.shape)
    except ValueError:
        raise ValueError(f"`advantages` of shape {advantages.shape} does not broadcast against `ratio` of shape "
                         f"{ratio.shape}.") from None
    eps_low, eps_high = _check_eps(eps_low, eps_high, dual_clip)
    return _surrogate(V.to_float(ratio), V.to_float(advantages), eps_low, eps_high, dual_clip)


def _check_aggregation(loss_aggregation, max_tokens, normalizer):
    V.check_option(loss_aggregation, LOSS_AGGREGATIONS, "loss_aggregation")
    if max_tokens is not None:
        if loss_aggregation != "constant_normalizer":
            raise ValueError(f"`max_tokens` is only used with loss_aggregation='constant_normalizer', got "
                             f"max_tokens={max_tokens!r} with loss_aggregation={loss_aggregation!r}.")
        V.check_static_int(max_tokens, "max_tokens")
    V.check_scalar(normalizer, "normalizer", positive=True, allow_none=True)


def _aggregate(per_token, mask, loss_aggregation, max_tokens, normalizer, axis_name):
    """Returns (this device's share, the global denominator)."""
    b, t = per_token.shape
    dtype = per_token.dtype
    if loss_aggregation in ("sequence_mean", "nonempty_sequence_mean"):
        n_tok = _stats.masked_count(mask, per_token.shape, dtype, axis=-1)
        seq_mean = _stats.safe_div(_stats.masked_sum(per_token, mask, axis=-1), n_tok)
        local_sum = jnp.sum(seq_mean)  # sequences without tokens contribute 0
        if normalizer is not None:
            den = normalizer
        elif loss_aggregation == "sequence_mean":  # every row counts (TRL grpo)
            den = _stats.psum(jnp.asarray(b, dtype), axis_name)
        else:
            den = _stats.psum(jnp.sum(n_tok > 0, dtype=dtype), axis_name)
    else:
        local_sum = _stats.masked_sum(per_token, mask)
        if normalizer is not None:
            den = normalizer
        elif loss_aggregation == "token_mean":
            den = _stats.psum(_stats.masked_count(mask, per_token.shape, dtype), axis_name)
        else:
            den = _stats.psum(jnp.asarray(b, dtype), axis_name) * (t if max_tokens is None else max_tokens)
    den = _stats.sg(jnp.asarray(den, dtype))
    return _stats.safe_div(local_sum, den), den


def aggregate_loss(per_token_loss: jax.Array, mask: jax.Array | None = None, *,
                   loss_aggregation: str = "token_mean", max_tokens: int | None = None,
                   normalizer: float | jax.Array | None = None, axis_name: Any = None) -> jax.Array:
    r"""Reduces a ``[B, T]`` per-token loss to a scalar (module docstring lists the modes).

    Args:
      per_token_loss: ``[B, T]``.
      mask: optional ``[B, T]``; invalid tokens are ignored (replaced by 0, so padding may hold inf/NaN).
      loss_aggregation: ``"token_mean"``, ``"sequence_mean"``, ``"nonempty_sequence_mean"`` or
        ``"constant_normalizer"``.
      max_tokens: the constant of ``"constant_normalizer"`` (default ``T``); only valid with that mode.
      normalizer: optional global denominator override.
      axis_name: mesh/pmap axis name(s); then the result is this device's share of the global loss
        (``psum`` it for the global value; see the package docstring).

    Returns:
      Scalar float32.

    Example:
      >>> import jax.numpy as jnp
      >>> l = jnp.array([[1.0, 3.0, 9.0], [4.0, 9.0, 9.0]]); m = jnp.array([[1, 1, 0], [1, 0, 0]])
      >>> aggregate_loss(l, m), aggregate_loss(l, m, loss_aggregation="sequence_mean")
      (Array(2.6666667, dtype=float32), Array(3., dtype=float32))
      >>> m0 = jnp.array([[1, 1, 0], [0, 0, 0]])  # row 1 fully masked: counts in sequence_mean only
      >>> aggregate_loss(l, m0, loss_aggregation="sequence_mean"), aggregate_loss(
      ...     l, m0, loss_aggregation="nonempty_sequence_mean")
      (Array(1., dtype=float32), Array(2., dtype=float32))
      >>> aggregate_loss(l, m, loss_aggregation="constant_normalizer", max_tokens=4)
      Array(1., dtype=float32)
    """
    per_token_loss = _check_tokens(per_token_loss, "per_token_loss")
    mask = V.check_mask(mask, per_token_loss.shape, "mask", expected_from="per_token_loss")
    _check_aggregation(loss_aggregation, max_tokens, normalizer)
    V.check_axis_name(axis_name)
    return _aggregate(_zero_invalid(per_token_loss, mask), mask, loss_aggregation, max_tokens, normalizer,
                      axis_name)[0]


def grpo_loss(logp: jax.Array, old_logp: jax.Array | None, ref_logp: jax.Array | None, advantages: jax.Array,
              mask: jax.Array | None, *, beta: float | jax.Array = 0.04, adaptive: bool = True,
              coefficient_sign: str = "adrpo", clip: str | None = "multiple", clip_multiple: float = 1.0,
              clip_min: float | None = None, clip_max: float | None = None, clip_pg_advantages: bool = False,
              eps_low: float = 0.2,
              eps_high: float | None = None, dual_clip: float | None = None, ratio_level: str = "token",
              loss_aggregation: str = "token_mean", max_tokens: int | None = None, kl_estimator: str = "k3",
              max_log_ratio: float = 20.0, normalizer: float | jax.Array | None = None,
              axis_name: Any = None, weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    r"""GRPO clipped-surrogate loss with ADRPO's per-sequence adaptive KL coefficient.

    docs/math.md, "LLMs: ADRPO on top of GRPO"::

        l_{i,t} = max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps_low, 1 + eps_high))
                  + beta_i * KL_{i,t},          beta_i = beta_0 - s clip(A_i)   (stop-gradient)
        loss    = aggregate(l, mask)            (token_mean | sequence_mean | ... ; see aggregate_loss)

    with ``s = +1`` for ``coefficient_sign="adrpo"`` (the paper) and ``s = -1`` for ``"crd"`` (``beta_0 +
    clip(A)``: high-advantage completions are held closer to the reference, the opposite direction).

    with ``rho = exp(logp - old_logp)`` per token (or GSPO's sequence ratio, ``ratio_level="sequence"``), the
    per-token KL estimate ``KL_{i,t}`` (k3 by default) against the reference policy, and the KL entering per
    token as in TRL (``per_token_loss = pg + beta * kl``). ``adaptive=False`` is plain GRPO with fixed
    ``beta_0`` through the same code. The log-ratio inside ``exp`` is clamped to ``+-max_log_ratio``
    (gradient 0 beyond, as verl).

    Args:
      logp: ``[B, T]`` sampled-token log-probs under the policy being optimized (the differentiated input).
      old_logp: ``[B, T]`` under the behaviour policy, or None for on-policy (``old = stop_gradient(logp)``:
        ratio 1, gradient of the plain policy gradient).
      ref_logp: ``[B, T]`` under the frozen reference; may be None only when the coefficient is identically 0
        (Python ``beta == 0`` and either ``adaptive=False`` or ``clip="multiple"``).
      advantages: ``[B]`` per-sequence advantages (stop-gradient), e.g. :func:`group_advantages`.
      mask: ``[B, T]`` completion mask (bool or 0/1), or None (all valid). Padding may hold any value.
      beta: ``beta_0 >= 0`` (TRL's default 0.04).
      adaptive, coefficient_sign, clip, clip_multiple, clip_min, clip_max: the coefficient
        (:func:`adaptive_coefficient`).
      clip_pg_advantages: also use the clipped advantage in the policy-gradient term (docs/math.md: a
        (reading), default False).
      eps_low, eps_high, dual_clip: the surrogate's clip (:func:`clipped_surrogate`).
      ratio_level: ``"token"`` or ``"sequence"`` (GSPO).
      loss_aggregation, max_tokens, normalizer: see :func:`aggregate_loss`; the KL term is aggregated with the
        same mode as the PG term.
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
      max_log_ratio: clamp of the importance log-ratio and guard of k3's ``exp`` (see :func:`kl_divergence`).
      axis_name: mesh/pmap axis name(s); the loss is then this device's share (package docstring).
      weights: None or ``[B, T]`` non-negative per-token weights (stop-gradient) multiplying the per-token loss
        (PG and KL terms) before the aggregation, e.g. the bounded importance weights of a stale behaviour policy
        (:func:`adrpo_jax.losses.importance_weights`): ``loss = aggregate(w * l, mask)`` with the unweighted
        normalizer.

    Returns:
      ``(loss, metrics)``. ``metrics`` (global, stop-gradient): ``loss``, ``pg_loss``, ``kl_term``
      (coefficient-weighted KL part of the loss; ``loss = pg_loss + kl_term``), ``kl_mean`` (token mean of the
      KL estimate; alias ``kl`` as TRL), ``clip_fraction``, ``clip_fraction_low``, ``clip_fraction_high``
      (aliases ``clip_ratio/region_mean``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean`` as TRL: low = ratio
      below ``1 - eps_low`` with ``A < 0``, high = above ``1 + eps_high`` with ``A > 0``), ``dual_clip_fraction``,
      ``ratio_mean``, ``ratio_min``, ``ratio_max``, ``beta_eff_mean``, ``beta_eff_min``, ``beta_eff_max``,
      ``adv_clip_fraction``, ``num_tokens``, ``num_sequences``. Ratio and clip statistics are token means at
      token level and sequence means at sequence level; coefficient statistics are over sequences with at
      least one valid token.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> logp = jnp.log(jnp.array([[0.5, 0.5], [0.2, 0.9]]))
      >>> ref = jnp.log(jnp.array([[0.5, 0.5], [0.4, 0.9]]))
      >>> adv = jnp.array([1.0, -1.0])
      >>> mask = jnp.array([[1, 1], [1, 0]])
      >>> loss_and_grad = jax.jit(jax.value_and_grad(
      ...     lambda lp: grpo_loss(lp, None, ref, adv, mask, beta=0.04), has_aux=True))
      >>> (loss, m), grad = loss_and_grad(logp)
      >>> loss, m["beta_eff_min"], m["beta_eff_max"]
      (Array(-0.3251506, dtype=float32), Array(0., dtype=float32), Array(0.08, dtype=float32))
    """
    logp = _check_tokens(logp, "logp")
    shape = logp.shape
    if old_logp is not None:
        old_logp = _check_tokens(old_logp, "old_logp", shape)
    if ref_logp is not None:
        ref_logp = _check_tokens(ref_logp, "ref_logp", shape)
    advantages = V.check_array(advantages, "advantages")
    V.check_floating(advantages, "advantages")
    V.check_shape(advantages, shape[:1], "advantages", expected_from="leading axis of `logp`")
    advantages = _stats.sg(V.to_float(advantages))
    mask = V.check_mask(mask, shape, "mask", expected_from="logp")
    V.check_option(ratio_level, RATIO_LEVELS, "ratio_level")
    V.check_option(kl_estimator, D.KL_ESTIMATORS, "kl_estimator")
    D.check_exp_bound(max_log_ratio, "max_log_ratio")
    eps_low, eps_high = _check_eps(eps_low, eps_high, dual_clip)
    _check_aggregation(loss_aggregation, max_tokens, normalizer)
    V.check_axis_name(axis_name)
    if not isinstance(clip_pg_advantages, bool):
        raise ValueError(f"`clip_pg_advantages` must be a bool, got {clip_pg_advantages!r}.")
    coef_kw: dict[str, Any] = dict(adaptive=adaptive, coefficient_sign=coefficient_sign, clip=clip,
                                   clip_multiple=clip_multiple, clip_min=clip_min, clip_max=clip_max)
    coef = C.adaptive_coefficient(advantages, beta, **coef_kw)  # [B], stop-gradient; validates beta/clip
    bounds = C.advantage_clip_bounds(beta, clip=clip, clip_multiple=clip_multiple, clip_min=clip_min,
                                     clip_max=clip_max)
    if ref_logp is None:
        zero_coef = (isinstance(beta, numbers.Real) and not isinstance(beta, bool) and beta == 0
                     and (not adaptive or clip == "multiple"))
        if not zero_coef:
            raise ValueError(f"`ref_logp` is None but the KL coefficient is not identically zero (beta={beta!r}, "
                             f"adaptive={adaptive!r}, clip={clip!r}); pass the reference log-probs or beta=0.")

    # Sanitize padding before any arithmetic: garbage (-inf/NaN) there never reaches values or gradients.
    logp = _zero_invalid(logp, mask)
    old_logp = _stats.sg(logp) if old_logp is None else _zero_invalid(old_logp, mask)
    token_log_ratio = _zero_invalid(logp - old_logp, mask)
    if ratio_level == "sequence":  # GSPO: one ratio per sequence, [B, 1] against the tokens
        seq_ratio = jnp.exp(jnp.clip(_seq_log_ratio(token_log_ratio, mask), -max_log_ratio, max_log_ratio))
        ratio = seq_ratio[:, None]
    else:
        ratio = jnp.exp(jnp.clip(token_log_ratio, -max_log_ratio, max_log_ratio))

    adv_pg = C._clip(advantages, bounds) if clip_pg_advantages else advantages
    adv_tok = adv_pg[:, None]
    per_token_pg = _zero_invalid(_surrogate(ratio, adv_tok, eps_low, eps_high, dual_clip), mask)
    if weights is not None:
        weights = V.check_array(weights, "weights")
        V.check_shape(weights, shape, "weights", expected_from="logp")
        weights = _zero_invalid(_stats.sg(V.to_float(weights)), mask)
        per_token_pg = per_token_pg * weights
    pg_share, den = _aggregate(per_token_pg, mask, loss_aggregation, max_tokens, normalizer, axis_name)
    if ref_logp is None:
        kl = jnp.zeros(shape, logp.dtype)
        kl_share = jnp.zeros((), logp.dtype)
    else:
        kl = D._kl(logp, _zero_invalid(ref_logp, mask), kl_estimator, max_log_ratio, mask)
        kl_tok = coef[:, None] * kl if weights is None else coef[:, None] * kl * weights
        kl_share, _ = _aggregate(kl_tok, mask, loss_aggregation, max_tokens, normalizer, axis_name)
    loss = pg_share + kl_share

    # ---- metrics: global, stop-gradient ----
    n_tok = _stats.masked_count(mask, shape, logp.dtype, axis=-1)
    seq_valid = n_tok > 0
    if ratio_level == "sequence":  # one value per sequence, as TRL
        stat_ratio, stat_mask, stat_adv = _stats.sg(seq_ratio), seq_valid, adv_pg
    else:
        stat_ratio, stat_mask, stat_adv = _stats.sg(ratio), (jnp.ones(shape, bool) if mask is None else mask), adv_tok
    low = ((stat_ratio < 1.0 - eps_low) & (stat_adv < 0)).astype(logp.dtype)
    high = ((stat_ratio > 1.0 + eps_high) & (stat_adv > 0)).astype(logp.dtype)
    dual = jnp.zeros_like(low) if dual_clip is None else ((stat_ratio > dual_clip) & (stat_adv < 0)).astype(
        logp.dtype)
    gm = lambda x, m: _stats.sg(_stats.global_mean(x, m, axis_name))  # noqa: E731
    kl_mean = gm(_stats.sg(kl), mask)
    clip_low, clip_high = gm(low, stat_mask), gm(high, stat_mask)
    clip_frac = gm(jnp.maximum(low, high), stat_mask)
    metrics = {
        "loss": _stats.psum(_stats.sg(loss), axis_name),
        "pg_loss": _stats.psum(_stats.sg(pg_share), axis_name),
        "kl_term": _stats.psum(_stats.sg(kl_share), axis_name),
        "kl_mean": kl_mean,
        "kl": kl_mean,
        "clip_fraction": clip_frac,
        "clip_fraction_low": clip_low,
        "clip_fraction_high": clip_high,
        "clip_ratio/region_mean": clip_frac,
        "clip_ratio/low_mean": clip_low,
        "clip_ratio/high_mean": clip_high,
        "dual_clip_fraction": gm(dual, stat_mask),
        "ratio_mean": gm(stat_ratio, stat_mask),
        "ratio_min": _stats.global_min(stat_ratio, stat_mask, axis_name),
        "ratio_max": _stats.global_max(stat_ratio, stat_mask, axis_name),
        "num_tokens": _stats.psum(jnp.sum(n_tok), axis_name),
        "num_sequences": _stats.psum(jnp.sum(seq_valid, dtype=logp.dtype), axis_name),
    }
    metrics.update(C._metrics(coef, advantages, seq_valid, axis_name, adaptive, bounds))
    return loss, metrics
