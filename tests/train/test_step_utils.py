"""apply_updates_if_finite (bit-identical skips) and accumulate_gradients (== full-batch gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adrpo_jax.train import step_utils


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,))}


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "nan_loss"])
def test_non_finite_step_is_skipped_bit_identically(bad):
    tx = optax.adamw(1e-2, weight_decay=0.1)
    params = _params()
    opt_state = tx.init(params)
    # take one real step first so that the optimizer state is non-trivial
    params, opt_state, _ = step_utils.apply_updates_if_finite(tx, jax.tree.map(jnp.ones_like, params), opt_state,
                                                              params)
    grads = jax.tree.map(jnp.ones_like, params)
    loss = jnp.float32(1.0)
    if bad == "nan_grad":
        grads["w"] = grads["w"].at[1, 2].set(jnp.nan)
    elif bad == "inf_grad":
        grads["b"] = grads["b"].at[0].set(-jnp.inf)
    else:
        loss = jnp.float32(jnp.nan)
    fn = jax.jit(lambda g, s, p, l: step_utils.apply_updates_if_finite(tx, g, s, p, loss=l))
    new_params, new_state, info = fn(grads, opt_state, params, loss)
    assert bool(info["skipped"])
    assert float(info["update_norm"]) == 0.0
    assert _bits(new_params) == _bits(params)
    assert _bits(new_state) == _bits(opt_state)


def test_finite_step_matches_plain_optax_update():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    params = _params()
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: 2.0 * p, params)
    new_params, new_state, info = step_utils.apply_updates_if_finite(tx, grads, opt_state, params,
                                                                      loss=jnp.float32(0.3))
    updates, ref_state = tx.update(grads, opt_state, params)
    ref_params = optax.apply_updates(params, updates)
    assert not bool(info["skipped"])
    assert _bits(new_params) == _bits(ref_params)
    assert _bits(new_state) == _bits(ref_state)
    ref_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(float(info["grad_norm"]), ref_norm, rtol=1e-6)
    upd_norm = np.sqrt(sum(np.sum(np.asarray(u, np.float64) ** 2) for u in jax.tree.leaves(updates)))
    np.testing.assert_allclose(float(info["update_norm"]), upd_norm, rtol=1e-5)


def test_works_on_nnx_param_state():
    with nnx.use_eager_sharding(False):
        model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = optax.sgd(0.1)
    grads = jax.tree.map(jnp.ones_like, params)
    new_params, _, info = jax.jit(lambda g, s, p: step_utils.apply_updates_if_finite(tx, g, s, p))(
        grads, tx.init(params), params)
    assert not bool(info["skipped"])
    np.testing.assert_allclose(new_params["kernel"][...], params["kernel"][...] - 0.1, rtol=1e-6)


def _loss(params, batch, normalizer):
    pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    per_row = jnp.sum(jnp.square(pred - batch["y"]), axis=-1) * batch["mask"]
    return jnp.sum(per_row) / normalizer, {"sq_sum": jnp.sum(per_row), "count": jnp.sum(batch["mask"])}


def test_accumulate_gradients_equals_full_batch():
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(12, 4)).astype(np.float32), "y": rng.normal(size=(12, 3)).astype(np.float32),
             "mask": (rng.random(12) > 0.3).astype(np.float32)}
    params = _params()
    normalizer = float(batch["mask"].sum())  # the global normalizer
    grad_fn = jax.value_and_grad(lambda p, b: _loss(p, b, normalizer), has_aux=True)
    (full_loss, full_aux), full_grads = grad_fn(params, batch)
    micro = step_utils.split_micro_batches(batch, 3)
    assert micro["x"].shape == (3, 4, 4)
    np.testing.assert_array_equal(micro["x"][1], batch["x"][1::3])
    (loss, aux), grads = jax.jit(lambda p, m: step_utils.accumulate_gradients(grad_fn, p, m))(params, micro)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(aux["count"], full_aux["count"], rtol=1e-6)
    for g, fg in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        # a sum of 3 micro-batch gradients vs one 12-row sum: other float32 summation order (atol 1e-7 failed on an
        # Intel CPU); 1e-6 is ~10 ulps of the O(1) gradient entries
        np.testing.assert_allclose(g, fg, rtol=1e-5, atol=1e-6)
    # k = 1 is a plain call
    (loss1, _), _ = step_utils.accumulate_gradients(grad_fn, params, step_utils.split_micro_batches(batch, 1))
    np.testing.assert_allclose(loss1, full_loss, rtol=1e-6)


def test_accumulate_gradients_bad_inputs():
    grad_fn = jax.value_and_grad(lambda p, b: jnp.sum(p * b["x"]))
    with pytest.raises(ValueError, match="same leading"):
        step_utils.accumulate_gradients(grad_fn, jnp.ones(2), {"x": np.ones((2, 2)), "y": np.ones((3, 2))})
    with pytest.raises(ValueError, match=r"`num_micro_batches`=4"):
        step_utils.split_micro_batches({"x": np.ones((6, 2))}, 4)


def test_repeat_updates_one_direct_or_a_scan_with_the_extra_outputs_kept_only_for_one():
    tx = optax.sgd(0.1)
    params = _params()

    def update(p, o, x):
        grads = jax.tree.map(lambda v: v * (1.0 if x is None else x), p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, {"loss": sum(jnp.sum(v) for v in jax.tree.leaves(p))}, grads

    p1, _, m1, extra1 = step_utils.repeat_updates(update, params, tx.init(params), None)
    assert m1["loss"].shape == (1,) and len(extra1) == 1
    np.testing.assert_array_equal(extra1[0]["w"], params["w"])
    p3, _, m3, extra3 = step_utils.repeat_updates(update, params, tx.init(params), jnp.array([1.0, 2.0, 3.0]))
    assert m3["loss"].shape == (3,) and extra3 == [None]  # one None per extra output after several updates
    want = params
    for x in (1.0, 2.0, 3.0):
        want = jax.tree.map(lambda v: v - 0.1 * x * v, want)
    np.testing.assert_allclose(p3["w"], want["w"], rtol=1e-6)
    np.testing.assert_allclose(p1["w"], params["w"] * 0.9, rtol=1e-6)
