"""Adaptive coefficient, KL estimators and the W2 bound vs independent NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from adrpo_jax import losses
from tests.losses import _helpers


def np_coef(a, beta, adaptive=True, lo=None, hi=None):
    a = np.asarray(a, np.float64)
    if not adaptive:
        return np.full_like(a, beta)
    out = np.empty_like(a)
    for i, x in enumerate(a.reshape(-1)):
        if lo is not None and x < lo:
            x = lo
        if hi is not None and x > hi:
            x = hi
        out.reshape(-1)[i] = beta - x
    return out


@pytest.mark.parametrize("kw,lo,hi", [
    (dict(), -0.04, 0.04),
    (dict(clip_multiple=0.5), -0.02, 0.02),
    (dict(clip="absolute", clip_min=-0.1, clip_max=0.03), -0.1, 0.03),
    (dict(clip="absolute", clip_max=0.03), None, 0.03),
    (dict(clip="none"), None, None),
    (dict(clip=None), None, None),
])
def test_adaptive_coefficient_values(kw, lo, hi):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(3, 7)) * 0.08).astype(np.float32)
    got = jax.jit(lambda x: losses.adaptive_coefficient(x, 0.04, **kw))(a)
    np.testing.assert_allclose(got, np_coef(a, 0.04, lo=lo, hi=hi), rtol=1e-6, atol=1e-8)
    if lo == -0.04 and hi == 0.04:
        assert np.all((np.asarray(got) >= 0) & (np.asarray(got) <= 0.08 + 1e-7))  # beta_eff in [0, 2 beta]
    np.testing.assert_allclose(losses.clip_advantages(a, 0.04, **kw), 0.04 - np_coef(a, 0.04, lo=lo, hi=hi),
                               rtol=1e-6, atol=1e-8)
    # fixed coefficient: same call, adaptation off
    np.testing.assert_array_equal(losses.adaptive_coefficient(a, 0.04, adaptive=False, **kw), np.full(a.shape,
                                                                                                       np.float32(0.04)))


def test_adaptive_coefficient_gradient_and_traced_beta():
    a = jnp.array([-1.0, 0.01, -0.02, 1.0])
    g = jax.jit(jax.grad(lambda x: losses.adaptive_coefficient(x, 0.04).sum()))(a)
    np.testing.assert_array_equal(g, np.zeros(4))  # stop-gradient by default
    g = jax.jit(jax.grad(lambda x: losses.adaptive_coefficient(x, 0.04, stop_gradient=False).sum()))(a)
    np.testing.assert_array_equal(g, [0.0, -1.0, -1.0, 0.0])  # d(beta - clip(A))/dA inside the bounds
    # beta as a traced scalar (a schedule under jit)
    f = jax.jit(lambda x, b: losses.adaptive_coefficient(x, b))
    np.testing.assert_allclose(f(a, jnp.float32(0.1)), np_coef(a, 0.1, lo=-0.1, hi=0.1), rtol=1e-6)
    assert losses.adaptive_coefficient(jnp.zeros(3, jnp.bfloat16), 0.04).dtype == jnp.float32


def test_coefficient_metrics_mask_and_shard_map():
    rng = np.random.default_rng(1)
    a = (rng.normal(size=16) * 0.06).astype(np.float32)
    mask = rng.uniform(size=16) > 0.3
    c = np_coef(a, 0.04, lo=-0.04, hi=0.04)[mask]
    m = jax.jit(lambda x: losses.coefficient_metrics(x, 0.04, mask=mask))(a)
    np.testing.assert_allclose(m["beta_eff_mean"], c.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["beta_eff_min"], c.min(), rtol=1e-6)
    np.testing.assert_allclose(m["beta_eff_max"], c.max(), rtol=1e-6)
    np.testing.assert_allclose(m["adv_clip_fraction"], np.mean(np.abs(a[mask]) > 0.04), rtol=1e-6)
    m0 = jax.jit(lambda x: losses.coefficient_metrics(x, 0.04, adaptive=False))(a)
    assert m0["adv_clip_fraction"] == 0 and np.isclose(m0["beta_eff_min"], 0.04)
    empty = jax.jit(lambda x: losses.coefficient_metrics(x, 0.04, mask=np.zeros(16, bool)))(a)
    assert all(float(v) == 0.0 for v in empty.values())
    mesh = _helpers.mesh_1d()
    f = jax.jit(jax.shard_map(lambda x, mm: losses.coefficient_metrics(x, 0.04, mask=mm, axis_name="data"),
                              mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))
    ms = f(a, mask)
    for k in m:  # psum of per-device partial sums: another float32 summation order than the single-device mean
        np.testing.assert_allclose(ms[k], m[k], rtol=1e-5, atol=1e-6)


def np_kl(logp, ref, est):
    d = np.asarray(ref, np.float64) - np.asarray(logp, np.float64)
    return {"k1": -d, "k2": 0.5 * d ** 2, "k3": np.exp(d) - d - 1}[est]


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators_values_grads(est):
    rng = np.random.default_rng(2)
    logp = -rng.uniform(0.1, 3.0, size=(3, 5))
    ref = logp + rng.normal(size=(3, 5)) * 0.5
    mask = rng.uniform(size=(3, 5)) > 0.2
    f = jax.jit(lambda lp, r: losses.kl_divergence(lp, r, est, mask=mask))
    got = f(logp.astype(np.float32), ref.astype(np.float32))
    np.testing.assert_allclose(got, np.where(mask, np_kl(logp, ref, est), 0.0), rtol=2e-5, atol=1e-6)
    w = rng.normal(size=(3, 5))
    gl, gr = jax.grad(lambda lp, r: jnp.sum(w * f(lp, r)), argnums=(0, 1))(logp.astype(np.float32),
                                                                          ref.astype(np.float32))
    ref_gl = _helpers.central_diff_grad(lambda lp: np.sum(w * np.where(mask, np_kl(lp, ref, est), 0)), logp)
    ref_gr = _helpers.central_diff_grad(lambda r: np.sum(w * np.where(mask, np_kl(logp, r, est), 0)), ref)
    np.testing.assert_allclose(gl, ref_gl, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gr, ref_gr, rtol=1e-4, atol=1e-5)
    if est != "k1":
        assert np.all(np.asarray(got) >= 0)
    # vmap over a leading axis = per-slice
    vm = jax.vmap(lambda lp, r: losses.kl_divergence(lp, r, est))(logp[None].repeat(2, 0), ref[None].repeat(2, 0))
    np.testing.assert_allclose(vm[1], np_kl(logp, ref, est), rtol=2e-5, atol=1e-6)


def test_kl_extreme_log_ratios_and_padding():
    logp = jnp.array([[0.0, -1e3, 0.0, -5.0]])
    ref = jnp.array([[-1e3, 0.0, 0.0, -5.0]])  # log-ratios d = ref - logp: -1e3, +1e3, 0, 0
    pad_lp = jnp.array([[-1.0, jnp.nan, -jnp.inf]])
    pad_ref = jnp.full((1, 3), -1.5)
    pad_mask = jnp.array([[1, 0, 0]])

    @jax.jit
    def run(lp, r, plp, pr):
        out = {}
        for est in ("k1", "k2", "k3"):
            f = lambda a, b, e=est: losses.kl_divergence(a, b, e).sum()
            out[est] = (losses.kl_divergence(lp, r, est), jax.grad(f, argnums=(0, 1))(lp, r))
        fp = lambda a: losses.kl_divergence(a, pr, mask=pad_mask)
        out["pad"] = (fp(plp), jax.grad(lambda a: fp(a).sum())(plp))
        out["guard"] = (losses.guarded_exp(jnp.float32(20.0)), jax.grad(losses.guarded_exp)(jnp.float32(20.5)))
        return out

    out = run(logp, ref, pad_lp, pad_ref)
    for est in ("k1", "k2", "k3"):
        val, (gl, gr) = out[est]
        assert np.all(np.isfinite(val)) and np.all(np.isfinite(gl)) and np.all(np.isfinite(gr)), est
    k3, (g, _) = out["k3"]
    k3, g = np.asarray(k3), np.asarray(g)
    np.testing.assert_allclose(k3[0, 0], 999.0, rtol=1e-6)  # exp(-1e3) - (-1e3) - 1
    assert k3[0, 1] > 1e11 and k3[0, 2] == 0 and k3[0, 3] == 0
    # d k3 / d logp = 1 - exp(d): the guarded branch keeps the right sign (push logp up towards ref)
    assert g[0, 1] < -1e8 and np.isclose(g[0, 0], 1.0)
    # the guard is C^1 at the bound: matches exp there
    at, slope = out["guard"]
    np.testing.assert_allclose(at, np.exp(20.0), rtol=1e-6)
    np.testing.assert_allclose(slope, np.exp(20.0), rtol=1e-6)
    # NaN / -inf in padding never leaks
    val, gl = out["pad"]
    assert np.all(np.isfinite(val)) and np.all(np.isfinite(gl)) and np.all(np.asarray(gl)[0, 1:] == 0)


def test_w2_velocity_penalty():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(4, 2, 3)).astype(np.float32)
    vr = rng.normal(size=(4, 2, 3)).astype(np.float32)
    ref = np.array([np.mean((v[i].astype(np.float64) - vr[i]) ** 2) for i in range(4)])
    np.testing.assert_allclose(jax.jit(losses.w2_velocity_penalty)(v, vr), ref, rtol=1e-6)
    gv, gr = jax.jit(jax.grad(lambda a, b: losses.w2_velocity_penalty(a, b).sum(), argnums=(0, 1)))(v, vr)
    np.testing.assert_allclose(gv, 2 * (v - vr) / 6, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(gr, np.zeros_like(vr))  # frozen reference
    gr2 = jax.jit(jax.grad(lambda b: losses.w2_velocity_penalty(v, b, stop_gradient_ref=False).sum()))(vr)
    np.testing.assert_allclose(gr2, -2 * (v - vr) / 6, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.adaptive_coefficient(jnp.zeros(3), -0.1), "`beta`"),
    (lambda: losses.adaptive_coefficient(jnp.zeros(3), jnp.ones(2)), "`beta`"),
    (lambda: losses.adaptive_coefficient(jnp.zeros(3, int), 0.1), "`advantages`"),
    (lambda: losses.adaptive_coefficient(jnp.zeros(3), 0.1, clip="percent"), "`clip`"),
    (lambda: losses.adaptive_coefficient(jnp.zeros(3), 0.1, clip_multiple=0.0), "`clip_multiple`"),
    (lambda: losses.adaptive_coefficient(jnp.zeros(3), 0.1, clip_min=-1.0), "`clip_min`"),
    (lambda: losses.adaptive_coefficient(jnp.zeros(3), 0.1, clip="absolute"), "`clip_min`"),
    (lambda: losses.adaptive_coefficient(jnp.zeros(3), 0.1, clip="absolute", clip_min=1.0, clip_max=0.0),
     "`clip_min`"),
    (lambda: losses.adaptive_coefficient(jnp.zeros(3), 0.1, adaptive="yes"), "`adaptive`"),
    (lambda: losses.coefficient_metrics(jnp.zeros(3), 0.1, mask=jnp.ones(4)), "`mask`"),
    (lambda: losses.clip_advantages(jnp.zeros(3), 0.1, clip="absolute", clip_max="1"), "`clip_max`"),
    (lambda: losses.advantage_clip_bounds(jnp.inf), "`beta`"),
    (lambda: losses.guarded_exp(jnp.zeros(3), max_value=-1.0), "`max_value`"),
    (lambda: losses.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 4))), "`ref_logp`"),
    (lambda: losses.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3)), "k4"), "`estimator`"),
    (lambda: losses.kl_divergence(jnp.zeros((2, 3), int), jnp.zeros((2, 3))), "`logp`"),
    (lambda: losses.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3)), max_log_ratio=0.0), "`max_log_ratio`"),
    (lambda: losses.w2_velocity_penalty(jnp.zeros((2, 3)), jnp.zeros((3, 2))), "`v_ref`"),
    (lambda: losses.w2_velocity_penalty(jnp.zeros(()), jnp.zeros(())), "`v`"),
])
def test_errors_name_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
