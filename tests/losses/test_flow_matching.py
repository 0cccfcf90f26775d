"""Flow-matching losses vs independent NumPy references (values, grads, jit, vmap, masks, shard_map)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from adrpo_jax import losses
from tests.losses import _helpers


def np_err(v, u):
    v = np.asarray(v, np.float64)
    u = np.asarray(u, np.float64)
    out = np.zeros(v.shape[0])
    for i in range(v.shape[0]):
        d = (v[i] - u[i]).reshape(-1)
        out[i] = np.sum(d * d) / d.size
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_rectified_flow_path_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(5, 3, 2)).astype(np.float32)
    x1 = rng.normal(size=(5, 3, 2)).astype(np.float32)
    t = rng.uniform(size=(5,)).astype(np.float32)
    path = jax.jit(losses.rectified_flow_path)
    x_t, u_t = path(x0, x1, t)
    for i in range(5):
        np.testing.assert_allclose(x_t[i], (1 - t[i]) * x0[i] + t[i] * x1[i], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(u_t[i], x1[i] - x0[i], rtol=1e-6, atol=1e-6)
    # endpoints: t=0 is noise, t=1 is data
    x_t0, _ = path(x0, x1, jnp.zeros(5))
    x_t1, _ = path(x0, x1, jnp.ones(5))
    np.testing.assert_array_equal(x_t0, x0)
    np.testing.assert_allclose(x_t1, x1, atol=1e-7)
    # scalar t and bfloat16 inputs upcast to float32
    x_ts, _ = path(x0.astype(jnp.bfloat16), x1, 0.5)
    assert x_ts.dtype == jnp.float32
    # d x_t / d t = u_t
    jvp = jax.jit(lambda tt: jax.jvp(lambda s: losses.rectified_flow_path(x0, x1, s)[0], (tt,), (jnp.ones(5),))[1])(t)
    np.testing.assert_allclose(jvp, x1 - x0, rtol=1e-6, atol=1e-6)


def test_flow_matching_error_values_grads_vmap():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(4, 3, 5)).astype(np.float32)
    u = rng.normal(size=(4, 3, 5)).astype(np.float32)
    np.testing.assert_allclose(jax.jit(losses.flow_matching_error)(v, u), np_err(v, u), rtol=1e-6)
    g = jax.jit(jax.grad(lambda a: losses.flow_matching_error(a, u).sum()))(v)
    ref = _helpers.central_diff_grad(lambda a: np_err(a, u).sum(), v)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
    # vmap over an extra leading axis
    vv = jax.jit(jax.vmap(losses.flow_matching_error))(v[None].repeat(2, 0), u[None].repeat(2, 0))
    np.testing.assert_allclose(vv[1], np_err(v, u), rtol=1e-6)
    # rank-1 data: per-sample scalars
    np.testing.assert_allclose(losses.flow_matching_error(jnp.array([1.0, 2.0]), jnp.zeros(2)), [1.0, 4.0])


@pytest.mark.parametrize("use_weights", [False, True])
def test_cfm_loss_matches_numpy(use_weights):
    rng = np.random.default_rng(7)
    v = rng.normal(size=(6, 4)).astype(np.float32)
    u = rng.normal(size=(6, 4)).astype(np.float32)
    w = rng.normal(size=(6,)).astype(np.float32) if use_weights else None
    mask = np.array([1, 1, 0, 1, 0, 1], bool)

    def ref(vv):
        e = np_err(vv, u)
        ww = np.ones(6) if w is None else w.astype(np.float64)
        return sum(ww[i] * e[i] for i in range(6) if mask[i]) / mask.sum()

    loss, m = jax.jit(lambda a: losses.cfm_loss(a, u, weights=w, mask=mask))(v)
    np.testing.assert_allclose(loss, ref(v), rtol=1e-6)
    np.testing.assert_allclose(m["loss"], ref(v), rtol=1e-6)
    np.testing.assert_allclose(m["cfm_error_mean"], np_err(v, u)[mask].mean(), rtol=1e-6)
    assert m["num_samples"] == 4
    g = jax.jit(jax.grad(lambda a: losses.cfm_loss(a, u, weights=w, mask=mask)[0]))(v)
    np.testing.assert_allclose(g, _helpers.central_diff_grad(ref, v), rtol=1e-5, atol=1e-6)
    assert np.all(g[~mask] == 0)


def test_cfm_loss_fully_masked_and_nan_padding():
    @jax.jit
    def run(v):
        empty = losses.cfm_loss(v, jnp.zeros((3, 2)), mask=jnp.zeros(3, bool))
        g = jax.grad(lambda a: losses.cfm_loss(a, jnp.zeros((3, 2)), mask=jnp.array([True, False, True]))[0])(v)
        return empty, g

    (loss, m), g = run(jnp.ones((3, 2)).at[1].set(jnp.nan))  # padding may hold garbage
    assert loss == 0 and m["num_samples"] == 0
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[1] == 0)


@pytest.mark.parametrize("mesh_fn,axis", [(_helpers.mesh_1d, "data"), (_helpers.mesh_2d, ("data", "fsdp"))])
def test_cfm_loss_shard_map_equals_single_device(mesh_fn, axis):
    rng = np.random.default_rng(11)
    n = 16
    v = rng.normal(size=(n, 3)).astype(np.float32)
    u = rng.normal(size=(n, 3)).astype(np.float32)
    w = rng.normal(size=(n,)).astype(np.float32)
    mask = rng.uniform(size=n) > 0.3
    theta = np.float32(0.7)  # a replicated "parameter" scaling v: exercises the check_vma psum of grads

    def single(th, vv):
        return losses.cfm_loss(th * vv, u, weights=w, mask=mask)

    (l1, m1), (gt1, gv1) = jax.value_and_grad(single, argnums=(0, 1), has_aux=True)(theta, v)
    mesh = mesh_fn()

    def local(th, vv, uu, ww, mm):
        fn = lambda th_, vv_: losses.cfm_loss(th_ * vv_, uu, weights=ww, mask=mm, axis_name=axis)
        (l, m), g = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(th, vv)
        return jax.lax.psum(l, axis), m, g

    spec = P(axis)
    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), spec, spec, spec, spec),
                              out_specs=(P(), P(), (P(), spec))))
    l2, m2, (gt2, gv2) = f(theta, v, u, w, mask)
    np.testing.assert_allclose(l2, l1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m2["cfm_error_mean"], m1["cfm_error_mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gt2, gt1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gv2, gv1, rtol=1e-6, atol=1e-6)


def test_cfm_loss_normalizer_gradient_accumulation():
    rng = np.random.default_rng(5)
    v = rng.normal(size=(8, 3)).astype(np.float32)
    u = rng.normal(size=(8, 3)).astype(np.float32)
    mask = rng.uniform(size=8) > 0.3
    fn = jax.jit(jax.value_and_grad(lambda vv, uu, mm, nz: losses.cfm_loss(vv, uu, mask=mm, normalizer=nz)[0]))
    full, gfull = fn(v, u, mask, None)
    total = float(mask.sum())
    parts = [fn(v[s], u[s], mask[s], total) for s in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(sum(p[0] for p in parts), full, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), gfull, rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.rectified_flow_path(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros(2)), "`x1`"),
    (lambda: losses.rectified_flow_path(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3)), "`t`"),
    (lambda: losses.rectified_flow_path(jnp.zeros((2, 3), int), jnp.zeros((2, 3)), jnp.zeros(2)), "`x0`"),
    (lambda: losses.rectified_flow_path(jnp.zeros(()), jnp.zeros(()), 0.5), "`x0`"),
    (lambda: losses.flow_matching_error(jnp.zeros((2, 3)), jnp.zeros((3, 3))), "`target`"),
    (lambda: losses.cfm_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), weights=jnp.zeros(3)), "`weights`"),
    (lambda: losses.cfm_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4))), "`u`"),
    (lambda: losses.cfm_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), mask=jnp.zeros((2, 3))), "`mask`"),
    (lambda: losses.cfm_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), normalizer=0.0), "`normalizer`"),
])
def test_flow_matching_errors_name_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def np_adrpo_flow(v, v_ref, u, adv, mask, beta, adaptive=True, lo=None, hi=None, clip_cfm=False):
    e, w2 = np_err(v, u), np_err(v, v_ref)
    total, n = 0.0, 0
    for i in range(len(adv)):
        if not mask[i]:
            continue
        a_c = adv[i] if lo is None else min(max(adv[i], lo), hi)
        coef = beta - a_c if adaptive else beta
        total += (a_c if clip_cfm else adv[i]) * e[i] + coef * w2[i]
        n += 1
    return total / n


def np_orw(v, v_ref, u, r, mask, tau, alpha):
    e, w2 = np_err(v, u), np_err(v, v_ref)
    idx = [i for i in range(len(r)) if mask[i]]
    return sum(np.exp(tau * np.float64(r[i])) * e[i] + alpha * w2[i] for i in idx) / len(idx)


def flow_inputs(seed, n=6, shape=(3, 2)):
    rng = np.random.default_rng(seed)
    v, v_ref, u = (rng.normal(size=(n,) + shape).astype(np.float32) for _ in range(3))
    adv = (rng.normal(size=n) * 0.5).astype(np.float32)
    mask = rng.uniform(size=n) > 0.25
    mask[0] = True
    return v, v_ref, u, adv, mask


@pytest.mark.parametrize("kw,ref", [
    (dict(beta=0.5), dict(beta=0.5, lo=-0.5, hi=0.5)),
    (dict(beta=0.5, adaptive=False), dict(beta=0.5, adaptive=False)),
    (dict(beta=0.3, clip="absolute", clip_min=-0.2, clip_max=0.6, clip_cfm_advantages=True),
     dict(beta=0.3, lo=-0.2, hi=0.6, clip_cfm=True)),
])
def test_adrpo_flow_loss_matches_numpy(kw, ref):
    v, v_ref, u, adv, mask = flow_inputs(1)
    f = jax.jit(jax.value_and_grad(lambda a, b: losses.adrpo_flow_loss(a, b, u, adv, mask=mask, **kw),
                                   argnums=(0, 1), has_aux=True))
    (loss, m), (gv, gref) = f(v, v_ref)
    want = np_adrpo_flow(v, v_ref, u, adv, mask, **ref)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["cfm_term"] + m["w2_term"], want, rtol=1e-5)
    np.testing.assert_allclose(m["w2_mean"], np_err(v, v_ref)[mask].mean(), rtol=1e-5)
    g_ref = _helpers.central_diff_grad(lambda a: np_adrpo_flow(a, v_ref, u, adv, mask, **ref), v)
    np.testing.assert_allclose(gv, g_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(gref, np.zeros_like(v_ref))  # frozen reference
    np.testing.assert_allclose(m["advantage_mean"], adv[mask].mean(), rtol=1e-5)
    beta = kw["beta"]
    coef = np.full(6, beta) if ref.get("adaptive") is False else beta - np.clip(adv, ref["lo"], ref["hi"])
    np.testing.assert_allclose(m["beta_eff_min"], coef[mask].min(), rtol=1e-5)
    np.testing.assert_allclose(m["beta_eff_max"], coef[mask].max(), rtol=1e-5)


def test_adrpo_flow_zero_advantage_is_fixed_beta_w2_and_sign_of_cfm_gradient():
    v, v_ref, u, adv, mask = flow_inputs(2)

    @jax.jit
    def run(a):
        zero_adv = losses.adrpo_flow_loss(a, v_ref, u, jnp.zeros(6), beta=0.7, mask=mask)
        # negative advantage reverses the CFM gradient (pushes away from the sample), beta = 0 isolates it
        g = jax.grad(lambda x: losses.adrpo_flow_loss(x, v_ref, u, -jnp.ones(6), beta=0.0)[0])(a)
        return zero_adv, g

    (l0, m0), g = run(v)
    np.testing.assert_allclose(l0, 0.7 * np_err(v, v_ref)[mask].mean(), rtol=1e-5)
    assert m0["cfm_term"] == 0
    np.testing.assert_allclose(g, -2 * (v - u) / (6 * 6), rtol=1e-5, atol=1e-7)


def test_orw_cfm_w2_loss_matches_numpy():
    v, v_ref, u, r, mask = flow_inputs(3)
    f = jax.jit(jax.value_and_grad(lambda a: losses.orw_cfm_w2_loss(a, v_ref, u, r, tau=0.5, alpha=1.5,
                                                                     mask=mask), has_aux=True))
    (loss, m), g = f(v)
    np.testing.assert_allclose(loss, np_orw(v, v_ref, u, r, mask, 0.5, 1.5), rtol=1e-5)
    g_ref = _helpers.central_diff_grad(lambda a: np_orw(a, v_ref, u, r, mask, 0.5, 1.5), v)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["weight_max"], np.exp(0.5 * r[mask].astype(np.float64)).max(), rtol=1e-6)
    np.testing.assert_allclose(m["cfm_term"] + m["w2_term"], loss, rtol=1e-6)


@pytest.mark.parametrize("which", ["adrpo", "orw"])
def test_flow_losses_shard_map_equals_single_device(which):
    v, v_ref, u, adv, mask = flow_inputs(4, n=16, shape=(2, 2, 1))
    mask[3] = False
    theta = np.float32(1.3)

    def loss_fn(th, a, b, c, d, m, ax):
        if which == "adrpo":
            return losses.adrpo_flow_loss(th * a, b, c, d, beta=0.4, mask=m, axis_name=ax)
        return losses.orw_cfm_w2_loss(th * a, b, c, d, mask=m, axis_name=ax)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (l1, m1), (gt1, gv1) = jax.jit(grad_fn, static_argnums=6)(theta, v, v_ref, u, adv, mask, None)

    def local(th, a, b, c, d, m):
        (l, mm), g = grad_fn(th, a, b, c, d, m, "data")
        return jax.lax.psum(l, "data"), mm, g

    spec = P("data")
    f = jax.jit(jax.shard_map(local, mesh=_helpers.mesh_1d(), in_specs=(P(),) + (spec,) * 5,
                              out_specs=(P(), P(), (P(), spec))))
    l2, m2, (gt2, gv2) = f(theta, v, v_ref, u, adv, mask)
    np.testing.assert_allclose(l2, l1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gt2, gt1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gv2, gv1, rtol=1e-6, atol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.adrpo_flow_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3),
                                    beta=0.1), "`advantages`"),
    (lambda: losses.adrpo_flow_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros((2, 3)), jnp.zeros(2),
                                    beta=0.1), "`v_ref`"),
    (lambda: losses.adrpo_flow_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2),
                                    beta=-0.1), "`beta`"),
    (lambda: losses.orw_cfm_w2_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3)),
     "`rewards`"),
    (lambda: losses.orw_cfm_w2_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2),
                                    alpha=-1.0), "`alpha`"),
])
def test_flow_loss_errors_name_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
