"""The sign switch of the adaptive coefficient: beta_i = beta_0 - s clip(A_i), s = +1 ("adrpo") / -1 ("crd").

Every check is against an independent NumPy loop (float64); the step options and configs carry the switch to
the loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax import losses
from tests.losses import _helpers
from tests.losses.test_flow_matching import flow_inputs, np_err
from tests.losses.test_policy_gradient import make_inputs


def np_signed_coef(a, beta, sign, lo, hi):
    """beta_0 - s * clip(A) in float64, one element at a time."""
    s = {"adrpo": 1.0, "crd": -1.0}[sign]
    out = np.empty(np.shape(a))
    for i, x in enumerate(np.asarray(a, np.float64).reshape(-1)):
        x = x if lo is None else max(x, lo)
        x = x if hi is None else min(x, hi)
        out.reshape(-1)[i] = beta - s * x
    return out


@pytest.mark.parametrize("sign", ["adrpo", "crd"])
@pytest.mark.parametrize("kw,lo,hi", [
    (dict(), -0.04, 0.04),
    (dict(clip_multiple=2.0), -0.08, 0.08),
    (dict(clip="absolute", clip_min=-0.1, clip_max=0.03), -0.1, 0.03),
    (dict(clip="none"), None, None),
])
def test_signed_coefficient_matches_numpy(sign, kw, lo, hi):
    a = (np.random.default_rng(0).normal(size=(5, 3)) * 0.08).astype(np.float32)
    got = jax.jit(lambda x: losses.adaptive_coefficient(x, 0.04, coefficient_sign=sign, **kw))(a)
    np.testing.assert_allclose(got, np_signed_coef(a, 0.04, sign, lo, hi), rtol=1e-6, atol=1e-8)
    # the fixed coefficient ignores the sign
    fixed = losses.adaptive_coefficient(a, 0.04, adaptive=False, coefficient_sign=sign, **kw)
    np.testing.assert_array_equal(fixed, np.full(a.shape, np.float32(0.04)))


def test_crd_direction_and_symmetric_clip_mirror():
    a = jnp.array([-1.0, -0.02, 0.0, 0.02, 1.0])
    adrpo = losses.adaptive_coefficient(a, 0.04)
    crd = losses.adaptive_coefficient(a, 0.04, coefficient_sign="crd")
    # better samples (A > 0): regularized less by ADRPO, more by the CRD direction
    assert float(adrpo[-1]) < 0.04 < float(crd[-1])
    assert float(adrpo[0]) > 0.04 > float(crd[0])
    # with a symmetric clip, crd(A) = adrpo(-A) and both stay in [0, 2 beta_0]
    np.testing.assert_array_equal(crd, losses.adaptive_coefficient(-a, 0.04))
    assert float(crd.min()) >= 0.0 and float(crd.max()) <= 0.08
    # gradient (stop_gradient=False): +1 inside the bounds for crd, -1 for adrpo
    g = jax.grad(lambda x: losses.adaptive_coefficient(x, 0.04, coefficient_sign="crd",
                                                       stop_gradient=False).sum())(a)
    np.testing.assert_array_equal(g, [0.0, 1.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("bad", ["CRD", "+1", 1, -1, None, "reverse"])
def test_bad_sign_names_the_argument(bad):
    with pytest.raises(ValueError, match="coefficient_sign"):
        losses.adaptive_coefficient(jnp.zeros(3), 0.04, coefficient_sign=bad)
    with pytest.raises(ValueError, match="coefficient_sign"):
        logp, old, ref, adv, mask = make_inputs(0)
        losses.grpo_loss(logp, old, ref, adv, mask, coefficient_sign=bad)


def test_coefficient_metrics_follow_the_sign():
    a = (np.random.default_rng(3).normal(size=16) * 0.06).astype(np.float32)
    c = np_signed_coef(a, 0.04, "crd", -0.04, 0.04)
    m = losses.coefficient_metrics(a, 0.04, coefficient_sign="crd")
    np.testing.assert_allclose(m["beta_eff_mean"], c.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["beta_eff_min"], c.min(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(m["beta_eff_max"], c.max(), rtol=1e-6)
    np.testing.assert_allclose(m["adv_clip_fraction"], np.mean(np.abs(a) > 0.04), rtol=1e-6)


def np_grpo_signed(logp, old, ref, adv, mask, beta, sign):
    """On-policy-free token-level GRPO with k3 KL and token_mean aggregation, coefficient beta - s clip(A)."""
    logp, old, ref, adv = (np.asarray(x, np.float64) for x in (logp, old, ref, adv))
    coef = np_signed_coef(adv, beta, sign, -beta, beta)
    total = 0.0
    for i in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            if not mask[i, j]:
                continue
            rho = np.exp(logp[i, j] - old[i, j])
            pg = max(-adv[i] * rho, -adv[i] * min(max(rho, 0.8), 1.2))
            d = ref[i, j] - logp[i, j]
            total += pg + coef[i] * (np.exp(d) - d - 1)
    return total / mask.sum()


@pytest.mark.parametrize("sign", ["adrpo", "crd"])
def test_grpo_loss_with_sign_matches_numpy(sign):
    logp, old, ref, adv, mask = make_inputs(4)
    adv = adv * 2.0  # some advantages beyond the +-beta_0 clip
    f = jax.jit(jax.value_and_grad(lambda lp: losses.grpo_loss(lp, old, ref, adv, mask, beta=0.1,
                                                                coefficient_sign=sign), has_aux=True))
    (loss, m), g = f(logp)
    want = np_grpo_signed(logp, old, ref, adv, mask, 0.1, sign)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    coef = np_signed_coef(adv, 0.1, sign, -0.1, 0.1)[mask.any(-1)]
    np.testing.assert_allclose(m["beta_eff_mean"], coef.mean(), rtol=1e-5)
    g_ref = _helpers.central_diff_grad(lambda lp: np_grpo_signed(lp, old, ref, adv, mask, 0.1, sign),
                                       logp.astype(np.float64))
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sign", ["adrpo", "crd"])
def test_adrpo_flow_loss_with_sign_matches_numpy(sign):
    v, v_ref, u, adv, mask = flow_inputs(2)
    e, w2 = np_err(v, u), np_err(v, v_ref)
    coef = np_signed_coef(adv, 0.5, sign, -0.5, 0.5)
    want = sum(adv[i] * e[i] + coef[i] * w2[i] for i in range(len(adv)) if mask[i]) / mask.sum()
    loss, m = jax.jit(lambda a: losses.adrpo_flow_loss(a, v_ref, u, adv, beta=0.5, mask=mask,
                                                       coefficient_sign=sign))(v)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["beta_eff_mean"], coef[mask].mean(), rtol=1e-5)
