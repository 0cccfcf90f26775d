"""The behaviour -> proximal importance correction (issue 26 item 3) vs a float64 NumPy loop reference: the bounded
weights (truncate / mask, token / sequence level), their statistics, and grpo_loss with the weights (values and
gradients), also under shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from adrpo_jax import losses
from tests.losses import _helpers
from tests.losses.test_policy_gradient import make_inputs


def np_weights(prox, beh, mask, mode, level, cap, m=20.0):
    prox, beh = np.asarray(prox, np.float64), np.asarray(beh, np.float64)
    b, t = prox.shape
    w = np.zeros((b, t))
    rhos, outs = [], []
    for i in range(b):
        valid = [j for j in range(t) if mask[i, j]]
        if level == "sequence":
            if not valid:
                continue
            rho_i = np.exp(np.clip(sum(prox[i, j] - beh[i, j] for j in valid), -m, m))
        for j in valid:
            rho = np.exp(np.clip(prox[i, j] - beh[i, j], -m, m)) if level == "token" else rho_i
            if mode == "truncate":
                w[i, j] = min(rho, cap)
                out = rho > cap
            else:
                out = not (1 / cap <= rho <= cap)
                w[i, j] = 0.0 if out else rho
            if level == "token":
                rhos.append(rho)
                outs.append(out)
        if level == "sequence":
            rhos.append(rho_i)
            outs.append(not (1 / cap <= rho_i <= cap) if mode == "mask" else rho_i > cap)
    return w, np.array(rhos), np.array(outs, float)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_weights_match_numpy(mode, level):
    prox, beh, _, _, mask = make_inputs(3, b=5, t=7, noise=0.6)
    cap = 1.5 if level == "token" else 3.0
    w, m = jax.jit(lambda a, b: losses.importance_weights(a, b, mask, mode=mode, level=level, cap=cap))(prox, beh)
    want, rhos, outs = np_weights(prox, beh, mask, mode, level, cap)
    np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5, atol=1e-7)
    assert 0 < outs.mean() < 1  # the cap binds somewhere, not everywhere
    np.testing.assert_allclose(float(m["is_ratio_mean"]), rhos.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["is_ratio_min"]), rhos.min(), rtol=1e-5)
    np.testing.assert_allclose(float(m["is_ratio_max"]), rhos.max(), rtol=1e-5)
    frac = "is_clipped_fraction" if mode == "truncate" else "is_masked_fraction"
    np.testing.assert_allclose(float(m[frac]), outs.mean(), rtol=1e-6)
    # no gradient flows through the weights (both policies are fixed)
    g = jax.grad(lambda a: jnp.sum(losses.importance_weights(a, beh, mask, mode=mode, level=level, cap=cap)[0]))(prox)
    assert not np.asarray(g).any()


def np_weighted_grpo(logp, old, ref, adv, mask, w, agg, beta=0.04, eps=0.2):
    """ADRPO (clip multiple 1) with per-token weights: aggregate(w * (pg + beta_i kl))."""
    logp, old, ref, adv = (np.asarray(x, np.float64) for x in (logp, old, ref, adv))
    b, t = logp.shape
    x = np.zeros((b, t))
    for i in range(b):
        coef = beta - min(max(adv[i], -beta), beta)
        for j in range(t):
            if not mask[i, j]:
                continue
            rho = np.exp(logp[i, j] - old[i, j])
            pg = max(-adv[i] * rho, -adv[i] * min(max(rho, 1 - eps), 1 + eps))
            d = ref[i, j] - logp[i, j]
            x[i, j] = w[i, j] * (pg + coef * (np.exp(d) - d - 1))
    if agg == "token_mean":
        return x.sum() / mask.sum()
    return sum(x[i].sum() / mask[i].sum() for i in range(b) if mask[i].sum() > 0) / b


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean"])
def test_grpo_loss_with_importance_weights_matches_numpy(agg):
    logp, old, ref, adv, mask = make_inputs(7, noise=0.4)
    beh = old + np.random.default_rng(1).normal(size=old.shape).astype(np.float32) * 0.5
    w, _ = losses.importance_weights(old, beh, mask, cap=1.5)
    w = np.asarray(w)
    f = jax.jit(jax.value_and_grad(
        lambda lp: losses.grpo_loss(lp, old, ref, adv, mask, loss_aggregation=agg, weights=w), has_aux=True))
    (loss, m), g = f(logp)
    want = np_weighted_grpo(logp, old, ref, adv, mask, w, agg)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-7)
    g_ref = _helpers.central_diff_grad(lambda lp: np_weighted_grpo(lp, old, ref, adv, mask, w, agg),
                                       logp.astype(np.float64))
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-4, atol=1e-6)
    # weights of one are the unweighted loss
    ones = losses.grpo_loss(logp, old, ref, adv, mask, loss_aggregation=agg, weights=np.ones_like(w))[0]
    np.testing.assert_allclose(float(ones), float(losses.grpo_loss(logp, old, ref, adv, mask,
                                                                    loss_aggregation=agg)[0]), rtol=1e-6)


def test_importance_weights_sharded_statistics_are_global():
    mesh = _helpers.mesh_1d(8)
    prox, beh, _, _, mask = make_inputs(11, b=8, t=5, noise=0.7)

    def body(a, b, m):
        return losses.importance_weights(a, b, m, cap=1.5, axis_name="data")

    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=(P("data"), P())))
    w, m = sharded(prox, beh, mask)
    w1, m1 = losses.importance_weights(prox, beh, mask, cap=1.5)
    np.testing.assert_allclose(np.asarray(w), np.asarray(w1), rtol=1e-6)
    for k in m1:
        np.testing.assert_allclose(float(m[k]), float(m1[k]), rtol=1e-5, atol=1e-7, err_msg=k)


def test_importance_weights_reject_bad_arguments():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="`mode`"):
        losses.importance_weights(x, x, None, mode="clip")
    with pytest.raises(ValueError, match="`level`"):
        losses.importance_weights(x, x, None, level="batch")
    with pytest.raises(ValueError, match="`cap` must be > 1"):
        losses.importance_weights(x, x, None, cap=1.0)
    with pytest.raises(ValueError, match="behaviour_logp"):
        losses.importance_weights(x, jnp.zeros((2, 4)), None)
