"""grpo_loss and its parts vs an independent float64 NumPy loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from adrpo_jax import losses
from tests.losses import _helpers


def np_grpo(logp, old, ref, adv, mask, *, beta=0.04, adaptive=True, lo=None, hi=None, clip_pg=False,
            eps_low=0.2, eps_high=None, dual=None, level="token", agg="token_mean", max_tokens=None, est="k3"):
    """Loops over sequences and tokens; returns (loss, pg_loss, kl_term)."""
    logp, old, ref, adv = (np.asarray(x, np.float64) for x in (logp, old, ref, adv))
    eps_high = eps_low if eps_high is None else eps_high
    b, t = logp.shape
    pg = np.zeros((b, t))
    klw = np.zeros((b, t))
    for i in range(b):
        a_clip = adv[i] if lo is None else min(max(adv[i], lo), hi)
        coef = beta - a_clip if adaptive else beta
        a = a_clip if clip_pg else adv[i]
        valid = [j for j in range(t) if mask[i, j]]
        if not valid:
            continue
        seq_ratio = np.exp(np.mean([logp[i, j] - old[i, j] for j in valid]))
        for j in valid:
            rho = np.exp(logp[i, j] - old[i, j]) if level == "token" else seq_ratio
            l = max(-a * rho, -a * min(max(rho, 1 - eps_low), 1 + eps_high))
            if dual is not None and a < 0:
                l = min(l, -a * dual)
            d = ref[i, j] - logp[i, j]
            kl = {"k1": -d, "k2": 0.5 * d * d, "k3": np.exp(d) - d - 1}[est]
            pg[i, j] = l
            klw[i, j] = coef * kl

    def aggregate(x):
        if agg == "token_mean":
            return x.sum() / mask.sum()
        if agg == "sequence_mean":
            rows = [x[i].sum() / mask[i].sum() for i in range(b) if mask[i].sum() > 0]
            return sum(rows) / b  # every row counts, an empty one adds 0 (TRL grpo)
        return x.sum() / (b * (t if max_tokens is None else max_tokens))

    return aggregate(pg + klw), aggregate(pg), aggregate(klw)


def make_inputs(seed, b=4, t=6, noise=0.3, full_row_masked=True):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3.0, size=(b, t))
    old = logp + rng.normal(size=(b, t)) * noise
    ref = logp + rng.normal(size=(b, t)) * noise
    adv = rng.normal(size=b) * 0.1
    mask = np.zeros((b, t), bool)
    for i in range(b):
        mask[i, : rng.integers(1, t + 1)] = True
    if full_row_masked:
        mask[-1] = False
    return [x.astype(np.float32) if x.dtype != bool else x for x in (logp, old, ref, adv, mask)]


CASES = [
    dict(kw=dict(eps_high=0.28), ref=dict(lo=-0.04, hi=0.04, eps_high=0.28)),
    dict(kw=dict(ratio_level="sequence", loss_aggregation="sequence_mean", kl_estimator="k2", clip="absolute",
                 clip_min=-0.05, clip_max=0.02, dual_clip=3.0),
         ref=dict(level="sequence", agg="sequence_mean", est="k2", lo=-0.05, hi=0.02, dual=3.0)),
    dict(kw=dict(loss_aggregation="constant_normalizer", max_tokens=8, kl_estimator="k1", adaptive=False,
                 dual_clip=1.5, beta=0.1),
         ref=dict(agg="constant_normalizer", max_tokens=8, est="k1", adaptive=False, dual=1.5, beta=0.1)),
    dict(kw=dict(loss_aggregation="sequence_mean", clip="none", clip_pg_advantages=True, eps_low=0.1),
         ref=dict(agg="sequence_mean", clip_pg=True, eps_low=0.1)),
    dict(kw=dict(clip_multiple=0.5, clip_pg_advantages=True), ref=dict(lo=-0.02, hi=0.02, clip_pg=True)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_grpo_loss_values_and_grads_match_numpy(case):
    kw, rkw = CASES[case]["kw"], CASES[case]["ref"]
    logp, old, ref, adv, mask = make_inputs(case)
    f = jax.jit(jax.value_and_grad(lambda lp: losses.grpo_loss(lp, old, ref, adv, mask, **kw), has_aux=True))
    (loss, m), g = f(logp)
    want, want_pg, want_kl = np_grpo(logp, old, ref, adv, mask, **rkw)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["pg_loss"], want_pg, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["kl_term"], want_kl, rtol=1e-5, atol=1e-7)
    g_ref = _helpers.central_diff_grad(lambda lp: np_grpo(lp, old, ref, adv, mask, **rkw)[0],
                                       logp.astype(np.float64))
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g)[~mask] == 0)


def test_grpo_metrics_match_numpy():
    logp, old, ref, adv, mask = make_inputs(11, b=6, t=5, noise=0.4)
    adv = np.array([0.5, -0.5, 0.02, -0.03, 1.0, -1.0], np.float32)
    loss, m = jax.jit(lambda lp: losses.grpo_loss(lp, old, ref, adv, mask, eps_high=0.3, dual_clip=1.3))(logp)
    rho = np.exp(logp.astype(np.float64) - old)
    a = np.broadcast_to(adv[:, None], rho.shape)
    low = (rho < 0.8) & (a < 0)
    high = (rho > 1.3) & (a > 0)
    d = ref.astype(np.float64) - logp
    np.testing.assert_allclose(m["clip_fraction_low"], low[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["clip_fraction_high"], high[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["clip_fraction"], (low | high)[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["clip_ratio/low_mean"], low[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["dual_clip_fraction"], ((rho > 1.3) & (a < 0))[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], rho[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["ratio_min"], rho[mask].min(), rtol=1e-5)
    np.testing.assert_allclose(m["ratio_max"], rho[mask].max(), rtol=1e-5)
    np.testing.assert_allclose(m["kl_mean"], (np.exp(d) - d - 1)[mask].mean(), rtol=1e-5)
    assert m["kl"] == m["kl_mean"]
    seq = mask.any(1)
    coef = 0.04 - np.clip(adv, -0.04, 0.04)
    np.testing.assert_allclose(m["beta_eff_mean"], coef[seq].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["beta_eff_min"], coef[seq].min(), rtol=1e-6)
    np.testing.assert_allclose(m["beta_eff_max"], coef[seq].max(), rtol=1e-6)
    np.testing.assert_allclose(m["adv_clip_fraction"], (np.abs(adv) > 0.04)[seq].mean(), rtol=1e-6)
    assert m["num_tokens"] == mask.sum() and m["num_sequences"] == seq.sum()
    np.testing.assert_allclose(m["loss"], m["pg_loss"] + m["kl_term"], rtol=1e-6)


def test_sequence_level_metrics_with_left_padding():
    logp, old, ref, adv, mask = make_inputs(15, b=5, t=6, noise=0.4, full_row_masked=False)
    mask = mask[:, ::-1].copy()  # left padding: valid tokens at the end of each row
    adv = np.array([0.5, -0.5, 0.3, -0.2, 0.1], np.float32)
    f = jax.jit(lambda lp: losses.grpo_loss(lp, old, ref, adv, mask, ratio_level="sequence", eps_low=0.05))
    loss, m = f(logp)
    s = np.array([np.exp(np.mean((logp[i].astype(np.float64) - old[i])[mask[i]])) for i in range(5)])
    np.testing.assert_allclose(m["ratio_mean"], s.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["ratio_min"], s.min(), rtol=1e-5)
    np.testing.assert_allclose(m["ratio_max"], s.max(), rtol=1e-5)
    low, high = (s < 0.95) & (adv < 0), (s > 1.05) & (adv > 0)
    np.testing.assert_allclose(m["clip_fraction_low"], low.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["clip_fraction_high"], high.mean(), rtol=1e-6)
    np.testing.assert_allclose(loss, np_grpo(logp, old, ref, adv, mask, lo=-0.04, hi=0.04, level="sequence",
                                             eps_low=0.05)[0], rtol=1e-5)


def test_adaptive_vs_fixed_and_beta_zero():
    logp, old, ref, adv, mask = make_inputs(3)

    @jax.jit
    def run(lp, o, r, a, m):
        return (losses.grpo_loss(lp, o, r, a, m, adaptive=False)[0],
                losses.grpo_loss(lp, o, r, jnp.zeros_like(a), m)[0],
                losses.grpo_loss(lp, o, None, a, m, beta=0.0))

    l_fixed, l_zero_adv, (l0, m0) = run(logp, old, ref, adv, mask)
    want_fixed = np_grpo(logp, old, ref, adv, mask, adaptive=False)[0]
    np.testing.assert_allclose(l_fixed, want_fixed, rtol=1e-5)
    # A = 0 gives back fixed beta (ADRPO.md: "A = 0 gives back the fixed-beta method")
    np.testing.assert_allclose(l_zero_adv, np_grpo(logp, old, ref, 0 * adv, mask, adaptive=False)[0], rtol=1e-5)
    # beta = 0: reference may be omitted; equals the pure PG loss
    np.testing.assert_allclose(l0, np_grpo(logp, old, ref, adv, mask, beta=0.0, lo=0.0, hi=0.0)[0], rtol=1e-5)
    assert m0["kl_term"] == 0 and m0["kl_mean"] == 0
    with pytest.raises(ValueError, match="`ref_logp`"):
        losses.grpo_loss(logp, old, None, adv, mask, beta=0.0, clip="none")


def test_on_policy_old_none_and_sequence_ratio_grad():
    logp, _, ref, adv, mask = make_inputs(4)

    @jax.jit
    def grads(lp):
        out = []
        for level in ("token", "sequence"):
            f = lambda x, o: losses.grpo_loss(x, o, ref, adv, mask, ratio_level=level, beta=0.0)[0]
            out.append((jax.grad(lambda x: f(x, None))(lp), jax.grad(lambda x: f(x, jax.lax.stop_gradient(x)))(lp)))
        return out

    (g_tok, g_tok_sg), (g_seq, g_seq_sg) = grads(logp)
    np.testing.assert_allclose(g_tok, g_tok_sg, rtol=1e-6)
    np.testing.assert_allclose(g_seq, g_seq_sg, rtol=1e-6)
    # on-policy, token level, token_mean: d loss / d logp_{i,t} = -A_i / num_tokens
    np.testing.assert_allclose(g_tok, np.where(mask, -adv[:, None] / mask.sum(), 0.0), rtol=1e-6, atol=1e-9)
    # on-policy, sequence level: each of the n_i tokens carries -A_i s_i with d s_i / d logp_{i,t} = 1 / n_i,
    # so with token_mean the per-token gradient is again -A_i / num_tokens
    np.testing.assert_allclose(g_seq, np.where(mask, -adv[:, None] / mask.sum(), 0.0), rtol=1e-6, atol=1e-9)


def test_degenerate_inputs_finite():
    logp, old, ref, adv, mask = make_inputs(5)
    # extreme log-ratios in all three pairs, NaN / -inf in padding
    logp = logp.copy(); old = old.copy(); ref = ref.copy()
    logp[0, 0], old[0, 0], ref[0, 0] = 0.0, -1e3, -1e3
    logp[1, 0], old[1, 0], ref[1, 0] = -1e3, 0.0, 0.0
    logp[~mask] = -np.inf
    old[~mask] = np.nan
    ref[~mask] = np.nan
    variants = (dict(dual_clip=3.0),
                dict(ratio_level="sequence", loss_aggregation="sequence_mean", kl_estimator="k2"))

    @jax.jit
    def run(lp, m):
        out = [jax.value_and_grad(lambda x: losses.grpo_loss(x, old, ref, adv, m, **kw), has_aux=True)(lp)
               for kw in variants]
        empty = jax.value_and_grad(lambda x: losses.grpo_loss(x, old, ref, adv, jnp.zeros_like(m)),
                                   has_aux=True)(lp)
        return out, empty

    out, ((loss0, m0), g0) = run(logp, mask)
    for kw, ((loss, m), g) in zip(variants, out):
        assert np.isfinite(loss) and np.all(np.isfinite(g)), kw
        assert all(np.all(np.isfinite(v)) for v in m.values()), kw
    # fully masked batch: loss 0, zero grads
    assert loss0 == 0 and np.all(np.asarray(g0) == 0) and m0["num_tokens"] == 0
    # a fully masked row does not change the loss (excluded from every count; sequence_mean counts it, as TRL)
    logp2, old2, ref2, adv2, mask2 = make_inputs(6, full_row_masked=False)
    pad = lambda x, fill: np.concatenate([x, np.full_like(x[:1], fill)])

    @jax.jit
    def padded_vs_plain(args, padded):
        return [(losses.grpo_loss(*padded, loss_aggregation=agg)[0], losses.grpo_loss(*args, loss_aggregation=agg)[0])
                for agg in ("token_mean", "nonempty_sequence_mean")]

    args = (logp2, old2, ref2, adv2, mask2)
    padded = (pad(logp2, -1.0), pad(old2, -1.0), pad(ref2, -1.0), pad(adv2, 1.0), pad(mask2, False))
    for with_pad, plain in padded_vs_plain(args, padded):
        np.testing.assert_allclose(with_pad, plain, rtol=1e-6)


def test_bfloat16_inputs_computed_in_float32():
    logp, old, ref, adv, mask = make_inputs(7)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (logp, old, ref, adv)]
    loss, m = jax.jit(losses.grpo_loss)(*bf, mask)
    assert loss.dtype == jnp.float32 and m["kl_mean"].dtype == jnp.float32
    up = [np.asarray(x.astype(jnp.float32)) for x in bf]
    np.testing.assert_allclose(loss, np_grpo(*up, mask, lo=-0.04, hi=0.04)[0], rtol=1e-5, atol=1e-7)


def test_vmap_over_micro_batches():
    logp, old, ref, adv, mask = make_inputs(8, b=6)
    stack = lambda x: x.reshape((2, 3) + x.shape[1:])
    f = jax.jit(jax.vmap(lambda lp, o, r, a, m: losses.grpo_loss(lp, o, r, a, m)[0]))
    got = f(*map(stack, (logp, old, ref, adv, mask)))
    for k in range(2):
        s = slice(3 * k, 3 * k + 3)
        np.testing.assert_allclose(got[k], np_grpo(logp[s], old[s], ref[s], adv[s], mask[s], lo=-0.04, hi=0.04)[0],
                                   rtol=1e-5)


def test_gradient_accumulation_with_normalizer_equals_full_batch():
    logp, old, ref, adv, mask = make_inputs(9, b=6, full_row_masked=True)
    aggs = ("token_mean", "sequence_mean", "constant_normalizer")

    @jax.jit
    def all_aggs(lp, o, r, a, m, normalizers):
        return [jax.value_and_grad(lambda x: losses.grpo_loss(x, o, r, a, m, loss_aggregation=agg,
                                                              normalizer=nz)[0])(lp)
                for agg, nz in zip(aggs, normalizers)]

    full = all_aggs(logp, old, ref, adv, mask, (None, None, None))
    dens = (float(mask.sum()), 6.0, 6.0 * 6)  # whole-batch denominators (sequence_mean: all 6 rows, as TRL)
    micro = [all_aggs(logp[s], old[s], ref[s], adv[s], mask[s], dens) for s in (slice(0, 3), slice(3, 6))]
    for k, agg in enumerate(aggs):
        l_full, g_full = full[k]
        np.testing.assert_allclose(micro[0][k][0] + micro[1][k][0], l_full, rtol=1e-6, err_msg=agg)
        np.testing.assert_allclose(np.concatenate([micro[0][k][1], micro[1][k][1]]), g_full, rtol=1e-6, atol=1e-9,
                                   err_msg=agg)
        np.testing.assert_allclose(l_full, np_grpo(logp, old, ref, adv, mask, lo=-0.04, hi=0.04, agg=agg)[0],
                                   rtol=1e-5, err_msg=agg)


@pytest.mark.parametrize("mesh_fn,axis,kw", [
    (_helpers.mesh_1d, "data", dict(eps_high=0.28, dual_clip=3.0)),
    (_helpers.mesh_1d, "data", dict(loss_aggregation="sequence_mean", ratio_level="sequence")),
    (_helpers.mesh_2d, ("data", "fsdp"), dict(loss_aggregation="constant_normalizer", max_tokens=10)),
])
def test_grpo_shard_map_equals_single_device(mesh_fn, axis, kw):
    logp, old, ref, adv, mask = make_inputs(10, b=16, t=8)
    mask[5] = False  # a fully masked row on one device
    feat = np.random.default_rng(0).normal(size=logp.shape).astype(np.float32) * 0.1
    theta = np.float32(0.3)  # replicated parameter feeding logp: exercises check_vma's psum of grads

    def loss_fn(th, lp, ft, o, r, a, m, ax):
        return losses.grpo_loss(lp + th * ft, o, r, a, m, axis_name=ax, **kw)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (l1, m1), (gt1, gl1) = jax.jit(grad_fn, static_argnums=7)(theta, logp, feat, old, ref, adv, mask, None)

    def local(th, lp, ft, o, r, a, m):
        (l, mm), g = grad_fn(th, lp, ft, o, r, a, m, axis)
        return jax.lax.psum(l, axis), mm, g

    spec = P(axis)
    f = jax.jit(jax.shard_map(local, mesh=mesh_fn(), in_specs=(P(),) + (spec,) * 6,
                              out_specs=(P(), P(), (P(), spec))))
    l2, m2, (gt2, gl2) = f(theta, logp, feat, old, ref, adv, mask)
    np.testing.assert_allclose(l2, l1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gt2, gt1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gl2, gl1, rtol=1e-6, atol=1e-6)
    assert set(m1) == set(m2)
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_aggregate_loss_and_surrogate_helpers():
    rng = np.random.default_rng(12)
    per = rng.normal(size=(3, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    agg = jax.jit(losses.aggregate_loss, static_argnames="loss_aggregation")
    np.testing.assert_allclose(agg(per, mask), per[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(agg(per, mask, loss_aggregation="sequence_mean"),
                               (per[0, :2].mean() + per[2].mean()) / 3, rtol=1e-6)
    np.testing.assert_allclose(agg(per, mask, loss_aggregation="constant_normalizer"), per[mask].sum() / 12,
                               rtol=1e-6)
    ratio = np.array([0.5, 0.9, 1.1, 1.5, 0.5, 1.5, 4.0], np.float32)
    a = np.array([1, 1, 1, 1, -1, -1, -1], np.float32)
    got = losses.clipped_surrogate(ratio, a, eps_low=0.2, eps_high=0.3, dual_clip=3.0)
    np.testing.assert_allclose(got, [-0.5, -0.9, -1.1, -1.3, 0.8, 1.5, 3.0], rtol=1e-6)
    lr = losses.importance_log_ratio(np.log([[2.0, 8.0, 5.0]]), np.zeros((1, 3)), [[1, 1, 0]], level="sequence")
    np.testing.assert_allclose(lr, [[np.log(4.0), np.log(4.0), 0.0]], rtol=1e-6)


def test_grpo_pmap_equals_single_device():
    logp, old, ref, adv, mask = make_inputs(14, b=16, t=5)
    (l1, m1), g1 = jax.jit(jax.value_and_grad(lambda lp: losses.grpo_loss(lp, old, ref, adv, mask), has_aux=True))(
        logp)

    def per_device(lp, o, r, a, m):
        (l, mm), g = jax.value_and_grad(lambda x: losses.grpo_loss(x, o, r, a, m, axis_name="i"), has_aux=True)(lp)
        return jax.lax.psum(l, "i"), mm, g

    split = lambda x: x.reshape((8, 2) + x.shape[1:])
    l2, m2, g2 = jax.pmap(per_device, axis_name="i")(*map(split, (logp, old, ref, adv, mask)))
    np.testing.assert_allclose(l2[0], l1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m2["kl_mean"][3], m1["kl_mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g2.reshape(logp.shape), g1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda a: losses.grpo_loss(a["lp"][0], None, a["lp"], a["adv"], a["m"]), "`logp`"),
    (lambda a: losses.grpo_loss(a["lp"], a["lp"][:, :3], a["lp"], a["adv"], a["m"]), "`old_logp`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"][:1], a["adv"], a["m"]), "`ref_logp`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"][:1], a["m"]), "`advantages`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"][:, :2]), "`mask`"),
    (lambda a: losses.grpo_loss(a["lp"].astype(int), None, a["lp"], a["adv"], a["m"]), "`logp`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], eps_low=1.0), "`eps_low`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], eps_high=-0.1), "`eps_high`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], dual_clip=1.0), "`dual_clip`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], ratio_level="seq"), "`ratio_level`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], loss_aggregation="mean"),
     "`loss_aggregation`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], max_tokens=8), "`max_tokens`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], loss_aggregation="constant_normalizer",
                                max_tokens=0), "`max_tokens`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], kl_estimator="k5"), "`kl_estimator`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], max_log_ratio=100.0), "`max_log_ratio`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], beta=-1.0), "`beta`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], normalizer=0), "`normalizer`"),
    (lambda a: losses.grpo_loss(a["lp"], None, None, a["adv"], a["m"]), "`ref_logp`"),
    (lambda a: losses.grpo_loss(a["lp"], None, a["lp"], a["adv"], a["m"], clip="relative"), "`clip`"),
    (lambda a: losses.aggregate_loss(a["lp"][0]), "`per_token_loss`"),
    (lambda a: losses.importance_log_ratio(a["lp"], a["lp"], level="seq"), "`level`"),
    (lambda a: losses.importance_log_ratio(a["lp"], a["lp"][0]), "`old_logp`"),
    (lambda a: losses.clipped_surrogate(a["lp"], a["adv"]), "`advantages`"),
])
def test_errors_name_argument(call, match):
    args = dict(lp=jnp.zeros((2, 4)), adv=jnp.zeros(2), m=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match=match):
        call(args)
