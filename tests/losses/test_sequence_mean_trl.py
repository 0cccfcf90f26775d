"""``loss_aggregation='sequence_mean'`` == TRL's ``loss_type='grpo'`` (issue 18, item 1).

TRL (``GRPOTrainer._compute_loss``, loss_type "grpo")::

    per_token_loss = -min(coef_1 * A, coef_2 * A) + beta * per_token_kl
    loss = ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()

``.mean()`` is over *all* B rows: a fully masked row (a truncated completion with
``mask_truncated_completions=True``) adds 0 but counts. The old ``sequence_mean`` divided by the non-empty rows
only (now ``nonempty_sequence_mean``): with 3 of 8 rows masked it was 8/5 = 1.6x TRL's loss and gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from adrpo_jax import losses
from tests.losses import _helpers

B, T, BETA, EPS = 8, 6, 0.04, 0.2


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    logp = (-rng.uniform(0.05, 3.0, size=(B, T))).astype(np.float32)
    old = (logp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    ref = (logp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    mask = np.zeros((B, T), bool)
    for i in range(B):
        mask[i, : rng.integers(1, T + 1)] = True
    mask[[1, 4, 6]] = False  # 3 of 8 rows truncated and masked (mask_truncated_completions)
    return logp, old, ref, adv, mask


def _trl_grpo_loss(logp, old, ref, adv, mask):
    """TRL's formula, written independently in jnp (token-level ratio, k3 KL, fixed beta)."""
    m = mask.astype(jnp.float32)
    coef_1 = jnp.exp(logp - old)
    coef_2 = jnp.clip(coef_1, 1 - EPS, 1 + EPS)
    per_token = -jnp.minimum(coef_1 * adv[:, None], coef_2 * adv[:, None])
    kl = jnp.exp(ref - logp) - (ref - logp) - 1
    per_token = per_token + BETA * kl
    return ((per_token * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)).mean()


def _ours(logp, old, ref, adv, mask, agg="sequence_mean", axis_name=None):
    return losses.grpo_loss(logp, old, ref, adv, mask, beta=BETA, adaptive=False, eps_low=EPS,
                            loss_aggregation=agg, axis_name=axis_name)[0]


def test_sequence_mean_equals_trl_grpo_value_and_gradient():
    logp, old, ref, adv, mask = _inputs()
    l_trl, g_trl = jax.jit(jax.value_and_grad(_trl_grpo_loss))(logp, old, ref, adv, mask)
    l_ours, g_ours = jax.jit(jax.value_and_grad(_ours))(logp, old, ref, adv, mask)
    # two different float32 programs of the same formula
    np.testing.assert_allclose(l_ours, l_trl, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_ours, g_trl, rtol=1e-5, atol=1e-7)
    # the mean over non-empty rows keeps its own name and is 8/5 of TRL's here
    l_ne, g_ne = jax.jit(jax.value_and_grad(lambda *a: _ours(*a, agg="nonempty_sequence_mean")))(
        logp, old, ref, adv, mask)
    np.testing.assert_allclose(l_ne, l_trl * B / 5, rtol=1e-5)
    np.testing.assert_allclose(g_ne, g_trl * B / 5, rtol=1e-5, atol=1e-7)


def test_aggregate_loss_sequence_mean_counts_empty_rows():
    per = np.arange(B * T, dtype=np.float32).reshape(B, T)
    _, _, _, _, mask = _inputs()
    rows = [per[i][mask[i]].mean() if mask[i].any() else 0.0 for i in range(B)]
    np.testing.assert_allclose(losses.aggregate_loss(per, mask, loss_aggregation="sequence_mean"), np.sum(rows) / B,
                               rtol=1e-6)
    np.testing.assert_allclose(losses.aggregate_loss(per, mask, loss_aggregation="nonempty_sequence_mean"),
                               np.sum(rows) / 5, rtol=1e-6)


def test_sequence_mean_sharded_counts_every_row():
    """Under shard_map (one row per device, 3 devices with an empty row) the global row count is B."""
    logp, old, ref, adv, mask = _inputs()
    l_trl = _trl_grpo_loss(logp, old, ref, adv, mask)
    f = jax.jit(jax.shard_map(lambda *a: jax.lax.psum(_ours(*a, axis_name="data"), "data"),
                              mesh=_helpers.mesh_1d(), in_specs=(P("data"),) * 5, out_specs=P()))
    np.testing.assert_allclose(f(logp, old, ref, adv, mask), l_trl, rtol=1e-5, atol=1e-7)


def test_unknown_aggregation_names_the_value():
    logp, old, ref, adv, mask = _inputs()
    with pytest.raises(ValueError, match="seq_mean"):
        losses.aggregate_loss(logp, mask, loss_aggregation="seq_mean")
