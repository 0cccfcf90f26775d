r"""Importance correction between the behaviour policy (the stale policy that sampled) and the proximal policy.

With asynchronous rollouts (``rl.max_lag = k >= 1``) the completions of step t were sampled by the policy of an
earlier step, the *behaviour* policy :math:`\mu`, while the clipped surrogate is taken against the *proximal*
policy :math:`\pi_{prox}` (the policy at the start of step t's update: "old_logp"). Decoupled PPO (Hilton et al.
2021; AReaL) reweights each token's loss by the importance ratio of the proximal to the behaviour policy, with
the ratio bounded so a few very stale tokens cannot dominate:

.. math::

    \log\rho_{i,t} = \mathrm{clip}\big(\log\pi_{prox}(y_{i,t}) - \log\mu(y_{i,t}),\ \pm M\big)

    \text{token level:}\quad \rho_{i,t} = \exp(\log\rho_{i,t}) \qquad
    \text{sequence level:}\quad \rho_{i,t} = \rho_i = \exp\big(\mathrm{clip}(\textstyle\sum_{t'} m_{i,t'}
    \log\rho_{i,t'},\ \pm M)\big)

    \text{truncate:}\quad w = \min(\rho, c) \qquad\qquad \text{mask:}\quad w = \rho\cdot
    \mathbb{1}[1/c \le \rho \le c]

and the loss is the usual aggregate of :math:`w_{i,t}\,\ell_{i,t}` (``grpo_loss(..., weights=w)``): truncated
importance sampling (TIS; V-trace's :math:`\bar\rho`) keeps every token with its weight capped at ``c``; masked
importance sampling drops the tokens (sequences) whose ratio leaves :math:`[1/c, c]`. Weights are 0 on padding
and carry no gradient (both policies are fixed during the update).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adrpo_jax.losses import _stats
from adrpo_jax.losses import _validation as V

__all__ = ["IMPORTANCE_MODES", "IMPORTANCE_LEVELS", "importance_weights"]

IMPORTANCE_MODES = ("truncate", "mask")
IMPORTANCE_LEVELS = ("token", "sequence")


def importance_weights(proximal_logp: jax.Array, behaviour_logp: jax.Array, mask: jax.Array | None, *,
                       mode: str = "truncate", level: str = "token", cap: float | jax.Array = 2.0,
                       max_log_ratio: float = 20.0,
                       axis_name=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Bounded importance weights ``w [B, T]`` (float32, stop-gradient) of the proximal over the behaviour policy
    (module docstring for the equations) and their statistics.

    Args:
      proximal_logp: ``[B, T]`` log-probs of the sampled tokens under the proximal policy (``old_logp``).
      behaviour_logp: ``[B, T]`` under the policy that sampled them (the rollout's own log-probs).
      mask: ``[B, T]`` completion mask (bool / 0-1) or None (all valid).
      mode: ``"truncate"`` (``w = min(rho, cap)``) or ``"mask"`` (``w = rho`` inside ``[1/cap, cap]``, else 0).
      level: ``"token"`` (one ratio per token) or ``"sequence"`` (the product over the sequence's tokens,
        broadcast to its tokens).
      cap: ``c > 1``.
      max_log_ratio: clamp ``M`` of the log-ratios (token and sequence) before ``exp``.
      axis_name: mesh axis name(s): the statistics are global (package docstring).

    Returns:
      ``(w, metrics)``; metrics (global, stop-gradient): ``is_ratio_mean`` / ``_min`` / ``_max`` (of the unbounded
      ratio ``rho``, over valid tokens, or valid sequences at sequence level), ``is_weight_mean``,
      ``is_clipped_fraction`` (truncate: ``rho > cap``), ``is_masked_fraction`` (mask: outside ``[1/c, c]``).

    >>> w, m = importance_weights(jnp.log(jnp.array([[0.5, 0.9]])), jnp.log(jnp.array([[0.1, 0.9]])), None, cap=2.0)
    >>> w.round(3).tolist(), float(m["is_clipped_fraction"])
    ([[2.0, 1.0]], 0.5)
    >>> w, _ = importance_weights(jnp.log(jnp.array([[0.5, 0.9]])), jnp.log(jnp.array([[0.1, 0.9]])), None,
    ...                           mode="mask", cap=2.0)
    >>> w.round(3).tolist()
    [[0.0, 1.0]]
    """
    proximal_logp = V.check_array(proximal_logp, "proximal_logp")
    V.check_floating(proximal_logp, "proximal_logp")
    if proximal_logp.ndim != 2:
        raise ValueError(f"`proximal_logp` must be [batch, time], got shape {tuple(proximal_logp.shape)}.")
    shape = proximal_logp.shape
    behaviour_logp = V.check_array(behaviour_logp, "behaviour_logp")
    V.check_floating(behaviour_logp, "behaviour_logp")
    V.check_shape(behaviour_logp, shape, "behaviour_logp", expected_from="proximal_logp")
    mask = V.check_mask(mask, shape, "mask", expected_from="proximal_logp")
    V.check_option(mode, IMPORTANCE_MODES, "mode")
    V.check_option(level, IMPORTANCE_LEVELS, "level")
    if not float(cap) > 1.0:
        raise ValueError(f"`cap` must be > 1, got {cap!r}.")
    if not float(max_log_ratio) > 0:
        raise ValueError(f"`max_log_ratio` must be > 0, got {max_log_ratio!r}.")
    V.check_axis_name(axis_name)
    valid = jnp.ones(shape, bool) if mask is None else mask.astype(bool)
    prox = _stats.sg(V.to_float(proximal_logp))
    beh = _stats.sg(V.to_float(behaviour_logp))
    log_rho = jnp.where(valid, prox - beh, 0.0)
    if level == "sequence":
        seq_valid = jnp.any(valid, axis=-1)
        rho_seq = jnp.exp(jnp.clip(jnp.sum(log_rho, axis=-1), -max_log_ratio, max_log_ratio))
        rho = jnp.broadcast_to(rho_seq[:, None], shape)
        stat_rho, stat_mask = rho_seq, seq_valid
    else:
        rho = jnp.exp(jnp.clip(log_rho, -max_log_ratio, max_log_ratio))
        stat_rho, stat_mask = rho, valid
    cap = jnp.asarray(cap, rho.dtype)
    if mode == "truncate":
        w = jnp.minimum(rho, cap)
        out_stat = stat_rho > cap
    else:
        inside = (rho >= 1.0 / cap) & (rho <= cap)
        w = jnp.where(inside, rho, 0.0)
        out_stat = (stat_rho < 1.0 / cap) | (stat_rho > cap)
    w = _stats.sg(jnp.where(valid, w, 0.0))
    gm = lambda x, m: _stats.global_mean(x, m, axis_name)  # noqa: E731
    # sequence level: the sequence's weight (equal on its valid tokens, 0 on padding)
    stat_w = w if level == "token" else jnp.max(w, axis=-1)
    metrics = {
        "is_ratio_mean": gm(stat_rho, stat_mask),
        "is_ratio_min": _stats.global_min(stat_rho, stat_mask, axis_name),
        "is_ratio_max": _stats.global_max(stat_rho, stat_mask, axis_name),
        "is_weight_mean": gm(stat_w, stat_mask),
        "is_clipped_fraction": gm(out_stat.astype(rho.dtype), stat_mask) if mode == "truncate"
        else jnp.zeros((), rho.dtype),
        "is_masked_fraction": gm(out_stat.astype(rho.dtype), stat_mask) if mode == "mask"
        else jnp.zeros((), rho.dtype),
    }
    return w, {k: _stats.sg(v) for k, v in metrics.items()}
