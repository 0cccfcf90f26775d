"""Advantage estimators vs independent NumPy loop references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from adrpo_jax import losses
from tests.losses import _helpers

_STATIC_ALL = ("group_size", "num_groups", "num_prompts", "scale_by_std", "std_level", "ddof", "eps", "axis_name",
               "tau", "max_exponent")


def _jit(fn):
    """jit with every hyper-parameter the function has marked static."""
    import inspect
    names = [n for n in _STATIC_ALL if n in inspect.signature(fn).parameters]
    return jax.jit(fn, static_argnames=names)


# module-level jitted entry points: parametrizations with equal static options share one compilation
group_advantages = _jit(losses.group_advantages)
group_advantages_from_ids = _jit(losses.group_advantages_from_ids)
prompt_mean_advantages = _jit(losses.prompt_mean_advantages)
rloo_advantages = _jit(losses.rloo_advantages)
batch_normalized_advantages = _jit(losses.batch_normalized_advantages)
exponential_reward_weights = _jit(losses.exponential_reward_weights)


def np_group_reference(r, ids, valid, *, kind="mean", scale=True, ddof=1, eps=1e-4, std_level="group"):
    """Loops over groups; float64."""
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    vr = r[valid]
    bstd = np.std(vr, ddof=ddof) if vr.size > ddof else 0.0
    for g in np.unique(ids):
        idx = [i for i in range(r.size) if ids[i] == g and valid[i]]
        vals = r[idx]
        if len(idx) < 2 or np.all(vals == vals[0]):
            continue
        for i in idx:
            if kind == "rloo":
                out[i] = r[i] - (vals.sum() - r[i]) / (len(idx) - 1)
            else:
                a = r[i] - vals.mean()
                if scale:
                    std = (np.std(vals, ddof=ddof) if len(idx) > ddof else 0.0) if std_level == "group" else bstd
                    a = a / (std + eps)
                out[i] = a
    return out


def random_rewards(rng, n, discrete=False):
    if discrete:  # many ties and zero-variance groups
        return rng.integers(0, 2, size=n).astype(np.float32)
    return rng.normal(size=n).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("scale,ddof,std_level", [(True, 1, "group"), (False, 1, "group"), (True, 0, "group"),
                                                   (True, 1, "batch")])
def test_group_advantages_contiguous_and_2d(seed, scale, ddof, std_level):
    rng = np.random.default_rng(seed)
    k = 4
    r = random_rewards(rng, 24, discrete=seed == 2)
    mask = rng.uniform(size=24) > 0.25
    ids = np.arange(24) // k
    ref = np_group_reference(r, ids, mask, scale=scale, ddof=ddof, std_level=std_level)
    kw = dict(scale_by_std=scale, ddof=ddof, std_level=std_level, mask=mask)
    got = group_advantages(r, k, **kw)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    got2 = group_advantages(r.reshape(6, 4), **{**kw, "mask": mask.reshape(6, 4)})
    np.testing.assert_allclose(got2.reshape(-1), ref, rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(got)[~mask] == 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_group_advantages_from_ids_and_prompt_mean(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 5, size=20)
    ids[3] = 7  # out of range: treated as masked
    r = random_rewards(rng, 20)
    mask = rng.uniform(size=20) > 0.2
    valid = mask & (ids < 5)
    ref = np_group_reference(r, ids, valid)
    got = group_advantages_from_ids(r, ids, 5, mask=mask)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(group_advantages(r, group_ids=ids, num_groups=5, mask=mask), ref,
                               rtol=2e-5, atol=2e-5)
    ref_pm = np_group_reference(r, ids, valid, scale=False)
    np.testing.assert_allclose(prompt_mean_advantages(r, ids, 5, mask=mask), ref_pm, rtol=1e-5, atol=1e-6)
    # a prompt's advantages sum to zero (mean baseline)
    pm = np.asarray(prompt_mean_advantages(r, ids, 5, mask=mask))
    for g in range(5):
        assert abs(pm[(ids == g) & valid].sum()) < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_advantages(seed):
    rng = np.random.default_rng(seed)
    r = random_rewards(rng, 18)
    mask = rng.uniform(size=18) > 0.3
    ref = np_group_reference(r, np.arange(18) // 6, mask, kind="rloo")
    np.testing.assert_allclose(rloo_advantages(r, 6, mask=mask), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rloo_advantages(r.reshape(3, 6), mask=mask.reshape(3, 6)).reshape(-1), ref,
                               rtol=1e-5, atol=1e-6)
    # identity: RLOO = n/(n-1) * (r - mean) for a fully valid group
    full = np.asarray(rloo_advantages(r, 6))
    dr = np.asarray(group_advantages(r, 6, scale_by_std=False))
    np.testing.assert_allclose(full, dr * 6 / 5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ddof,scale", [(1, True), (0, True), (1, False)])
def test_batch_normalized_advantages(ddof, scale):
    rng = np.random.default_rng(4)
    r = rng.normal(size=(4, 5)).astype(np.float32)
    mask = rng.uniform(size=(4, 5)) > 0.3
    vals = r[mask].astype(np.float64)
    ref = np.where(mask, (r - vals.mean()) / ((np.std(vals, ddof=ddof) + 1e-4) if scale else 1.0), 0.0)
    got = batch_normalized_advantages(r, ddof=ddof, scale_by_std=scale, mask=mask)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(batch_normalized_advantages(jnp.full(6, 0.3))) == 0)


def test_exponential_reward_weights():
    r = np.array([-1.0, 0.0, 0.5, 3.0], np.float32)
    np.testing.assert_allclose(exponential_reward_weights(r, 0.5), np.exp(0.5 * r.astype(np.float64)),
                               rtol=1e-6)
    w = exponential_reward_weights(r, 2.0, mask=np.array([1, 1, 0, 1]), max_exponent=1.0)
    np.testing.assert_allclose(w, [np.exp(-2.0), 1.0, 0.0, np.e], rtol=1e-6)
    g = jax.grad(lambda x: exponential_reward_weights(x, 0.5).sum())(r)
    np.testing.assert_allclose(g, 0.5 * np.exp(0.5 * r), rtol=1e-6)
    # raw, no normalization: huge rewards overflow in float32 unless capped
    assert np.isinf(exponential_reward_weights(jnp.array([200.0]), 1.0))[0]
    assert np.isfinite(exponential_reward_weights(jnp.array([200.0]), 1.0, max_exponent=50.0))[0]


def test_degenerate_groups_give_exact_zero_and_finite_grads():
    # one-sample groups, all-equal rewards (incl. 0.1 which does not average exactly), fully masked group
    r = jnp.array([0.1, 0.1, 0.1, 0.7, 0.2, 0.5, 0.9, 0.3], jnp.float32)
    mask = jnp.array([1, 1, 1, 1, 0, 0, 1, 1], bool)
    ids = jnp.array([0, 0, 0, 1, 2, 2, 3, 3])
    fns = (lambda x: losses.group_advantages_from_ids(x, ids, 4, mask=mask),
           lambda x: losses.rloo_advantages(x, group_ids=ids, num_groups=4, mask=mask),
           lambda x: losses.prompt_mean_advantages(x, ids, 4, mask=mask, scale_by_std=True),
           lambda x: losses.group_advantages(x, 1))  # group_size 1: every group degenerate

    @jax.jit
    def values_and_jacobians(x):
        return [(f(x), jax.jacrev(f)(x)) for f in fns]

    for k, (a, g) in enumerate(values_and_jacobians(r)):
        a, g = np.asarray(a), np.asarray(g)
        n_zero = 8 if k == 3 else 6
        assert np.all(a[:n_zero] == 0.0), (k, a)  # all-equal, single sample, fully masked
        assert np.all(a[n_zero:] != 0.0), (k, a)
        assert np.all(np.isfinite(g)), k
        assert np.all(g[:n_zero] == 0) and np.all(g[:, :n_zero] == 0), k
    # all-equal over the whole batch, std scaling on
    np.testing.assert_array_equal(group_advantages(jnp.full((3, 4), 0.3)), np.zeros((3, 4)))


def np_batch_normalized(r, mask, ddof=1, eps=1e-4):
    vals = np.asarray(r, np.float64)[mask]
    return np.where(mask, (r - vals.mean()) / (np.std(vals, ddof=ddof) + eps), 0.0)


@pytest.mark.parametrize("fn_name", ["group", "rloo", "prompt", "batch"])
def test_advantage_gradients_vs_central_differences(fn_name):
    rng = np.random.default_rng(9)
    r = rng.normal(size=12)
    mask = rng.uniform(size=12) > 0.2
    w = rng.normal(size=12)
    contiguous = np.arange(12) // 4
    prompt_ids = rng.integers(0, 3, size=12)
    ref_fn, fn = {
        "group": (lambda x: np_group_reference(x, contiguous, mask),
                  lambda x: losses.group_advantages(x, 4, mask=mask)),
        "rloo": (lambda x: np_group_reference(x, contiguous, mask, kind="rloo"),
                 lambda x: losses.rloo_advantages(x, 4, mask=mask)),
        "prompt": (lambda x: np_group_reference(x, prompt_ids, mask, scale=False),
                   lambda x: losses.prompt_mean_advantages(x, prompt_ids, 3, mask=mask)),
        "batch": (lambda x: np_batch_normalized(x, mask), lambda x: losses.batch_normalized_advantages(x, mask=mask)),
    }[fn_name]
    g = jax.jit(jax.grad(lambda x: jnp.dot(w.astype(np.float32), fn(x))))(r.astype(np.float32))
    np.testing.assert_allclose(g, _helpers.central_diff_grad(lambda x: np.dot(w, ref_fn(x)), r), rtol=1e-3,
                               atol=1e-4)


def test_vmap_over_reward_functions():
    rng = np.random.default_rng(2)
    r = rng.normal(size=(3, 12)).astype(np.float32)  # 3 reward functions
    got = jax.jit(jax.vmap(lambda x: losses.group_advantages(x, 4)))(r)
    for j in range(3):
        np.testing.assert_allclose(got[j], np_group_reference(r[j], np.arange(12) // 4, np.ones(12, bool)),
                                   rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mesh_fn,axis", [(_helpers.mesh_1d, "data"), (_helpers.mesh_2d, ("data", "fsdp"))])
def test_advantages_shard_map_equals_single_device(mesh_fn, axis):
    rng = np.random.default_rng(13)
    n = 24  # 3 rows per device; groups of 4 and 5 prompt ids straddle devices
    r = rng.normal(size=n).astype(np.float32)
    mask = rng.uniform(size=n) > 0.2
    ids = rng.integers(0, 5, size=n).astype(np.int32)
    w = rng.normal(size=n).astype(np.float32)

    def all_advantages(rr, mm, ii, ax):
        out = (losses.group_advantages(rr, 4, mask=mm, axis_name=ax),
               losses.prompt_mean_advantages(rr, ii, 5, mask=mm, axis_name=ax))
        if mesh_fn is _helpers.mesh_2d:  # the tuple-axis path is the same code: keep that case small
            return out
        return out + (losses.group_advantages(rr, 4, mask=mm, std_level="batch", axis_name=ax),
                      losses.rloo_advantages(rr, 4, mask=mm, axis_name=ax),
                      losses.batch_normalized_advantages(rr, mask=mm, axis_name=ax))

    def objective(rr, mm, ii, ww, ax):  # a scalar through every estimator, for gradients
        total = sum(jnp.sum(ww * a) for a in all_advantages(rr, mm, ii, ax))
        return total if ax is None else jax.lax.psum(total, ax)

    single, g_single = jax.jit(lambda *a: (all_advantages(*a[:3], None), jax.grad(objective)(*a, None)))(
        r, mask, ids, w)
    mesh = mesh_fn()
    spec = P(axis)

    def local(rr, mm, ii, ww):
        return all_advantages(rr, mm, ii, axis), jax.grad(objective)(rr, mm, ii, ww, axis)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=((spec,) * len(single), spec)))
    sharded, g_sharded = f(r, mask, ids, w)
    for a, b in zip(sharded, single):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_sharded, g_single, rtol=1e-6, atol=1e-6)


def test_two_dim_groups_with_batch_std_under_shard_map():
    rng = np.random.default_rng(21)
    r = rng.normal(size=(16, 3)).astype(np.float32)  # 2 whole groups per device; the batch std is global
    mask = rng.uniform(size=(16, 3)) > 0.2
    single = group_advantages(r, mask=mask, std_level="batch")
    f = jax.jit(jax.shard_map(lambda a, m: losses.group_advantages(a, mask=m, std_level="batch", axis_name="data"),
                              mesh=_helpers.mesh_1d(), in_specs=(P("data"), P("data")), out_specs=P("data")))
    np.testing.assert_allclose(f(r, mask), single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.group_advantages(jnp.zeros(10), 4), "`group_size`"),
    (lambda: losses.group_advantages(jnp.zeros(8)), "`group_size`"),
    (lambda: losses.group_advantages(jnp.zeros(8), 0), "`group_size`"),
    (lambda: losses.group_advantages(jnp.zeros((2, 4)), 3), "`group_size`"),
    (lambda: losses.group_advantages(jnp.zeros((2, 2, 2)), 2), "`rewards`"),
    (lambda: losses.group_advantages(jnp.zeros(8, jnp.complex64), 2), "`rewards`"),
    (lambda: losses.group_advantages(jnp.zeros(8), 2, mask=jnp.ones(4)), "`mask`"),
    (lambda: losses.group_advantages(jnp.zeros(8), 2, std_level="global"), "`std_level`"),
    (lambda: losses.group_advantages(jnp.zeros(8), 2, eps=-1.0), "`eps`"),
    (lambda: losses.group_advantages(jnp.zeros(8), 2, ddof=-1), "`ddof`"),
    (lambda: losses.group_advantages_from_ids(jnp.zeros(8), jnp.zeros(8), 2), "`group_ids`"),
    (lambda: losses.group_advantages_from_ids(jnp.zeros(8), jnp.zeros(7, int), 2), "`group_ids`"),
    (lambda: losses.group_advantages_from_ids(jnp.zeros(8), jnp.zeros(8, int), 0), "`num_groups`"),
    (lambda: losses.prompt_mean_advantages(jnp.zeros(8), jnp.zeros(8, int), 2.5), "`num_prompts`"),
    (lambda: losses.prompt_mean_advantages(jnp.zeros(8), jnp.zeros((8, 1), int), 2), "`prompt_ids`"),
    (lambda: losses.rloo_advantages(jnp.zeros(9), 2), "`group_size`"),
    (lambda: losses.batch_normalized_advantages(jnp.zeros(3), mask=jnp.ones(2)), "`mask`"),
    (lambda: losses.exponential_reward_weights(jnp.zeros(3), tau=jnp.ones(2)), "`tau`"),
])
def test_advantage_errors_name_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
