"""The jitted ADRPO-W2 flow step (adrpo_jax/flow/step.py) against independent NumPy references.

* every method's loss on a hand-built batch == the ADRPO.md formula in NumPy (per-prompt advantages, clip,
  ORW's raw exp(tau r) weights);
* the update's loss == the formula evaluated on the model's own forwards (the (t, x0) draws of
  ``draw_path_inputs``); the W2 term and its gradient vanish when the policy equals the reference;
* non-finite rewards / images are masked out of every statistic (the prompt's baseline included) and the loss;
  a batch without a valid sample skips the update;
* the whole step on 8 forced CPU devices == the single-device step (metrics, gradients, parameters, refreshed
  reference and sampling copy; 1e-5), on a data x FSDP x tensor mesh (default), and (slow) a data-parallel mesh,
  an FSDP mesh (data=2, fsdp=4) and a tensor-parallel mesh (data=4, tensor=2);
  with gradient accumulation, CFG dropout and a reward model that returns NaN for some samples;
* the reference refresh sets ref = alpha * policy + (1 - alpha) * ref, and the next loss uses exactly it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adrpo_jax import train
from adrpo_jax.flow.rewards import ImageStatReward
from adrpo_jax.flow.step import (FlowStepOptions, draw_path_inputs, inner_update_key, make_flow_update,
                                 make_loss_fn, make_train_step, mix_params, prepare_batch)
from adrpo_jax.models.dit import DiT, DiTConfig

K_COND = 4          # prompt ids of the tiny model
B = 32              # 4 prompts x 8 samples (micro-batches of 16: see test_dit_gspmd_miscompile_at_batch_8)
TINY = DiTConfig(image_size=8, patch_size=4, hidden=16, depth=1, heads=2, num_classes=K_COND, frequency_dim=16,
                 mlp_ratio=2.0)


def tiny_options(**kw) -> FlowStepOptions:
    base = dict(num_conditions=K_COND, null_class=K_COND, image_shape=(8, 8, 1), sampling_method="euler",
                sampling_steps=2, beta=0.5)
    base.update(kw)
    return FlowStepOptions(**base)


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0, scale: float = 0.3):
    """(graphdef, params) of the tiny DiT with every parameter perturbed (adaLN-Zero starts at v = 0)."""
    graphdef, params = nnx.split(DiT(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32),
                          params)
    return graphdef, params


def prompts(b: int = B) -> np.ndarray:
    return np.repeat(np.arange(K_COND, dtype=np.int32), b // K_COND)


def np_prompt_advantages(r, cond, valid):
    """A = r - mean of the valid rewards of the same prompt; 0 for invalid samples / < 2 valid / all equal."""
    adv = np.zeros_like(r, dtype=np.float64)
    for c in np.unique(cond):
        idx = np.flatnonzero((cond == c) & valid)
        if len(idx) < 2 or np.ptp(r[idx]) == 0:
            continue
        adv[idx] = r[idx] - r[idx].mean()
    return adv


def np_method_loss(method, err, w2, adv, r, valid, *, beta, tau=0.5, alpha=1.0, clip=None):
    """ADRPO.md's flow losses, mean over the valid samples."""
    if method == "adrpo":
        a_c = adv if clip is None else np.clip(adv, -clip, clip)
        per = adv * err + (beta - a_c) * w2
    elif method == "fixed_beta":
        per = adv * err + beta * w2
    elif method == "orw_cfm_w2":
        per = np.exp(tau * r) * err + alpha * w2
    else:
        per = adv * err
    return per[valid].sum() / max(valid.sum(), 1)


# ----------------------------------------------------------------------------------------------------------
# Loss / advantages on hand-built velocity arrays (no model)
# ----------------------------------------------------------------------------------------------------------


def _hand_batch(seed=0, bad=()):
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((B, 2, 2, 1)).astype(np.float32)
    r = rng.standard_normal(B).astype(np.float32)
    for i, kind in bad:
        if kind == "nan_reward":
            r[i] = np.nan
        elif kind == "inf_reward":
            r[i] = np.inf
        else:
            x1[i, 0, 0, 0] = np.nan
    v, v_ref, u = (rng.standard_normal((B, 2, 2, 1)).astype(np.float32) for _ in range(3))
    return x1, r, v, v_ref, u


@pytest.mark.parametrize("method", ["adrpo", "fixed_beta", "orw_cfm_w2", "none"])
def test_method_losses_match_numpy(method):
    x1, r, v, v_ref, u = _hand_batch()
    cond = prompts()
    opts = tiny_options(method=method, beta=0.3, tau=0.7, alpha=0.4, image_shape=(2, 2, 1))
    prep = prepare_batch(opts, jnp.asarray(x1), jnp.asarray(cond), jnp.asarray(r))
    valid = np.ones(B, bool)
    adv = np_prompt_advantages(r.astype(np.float64), cond, valid)
    np.testing.assert_allclose(prep.advantages, adv, atol=1e-6)
    loss, m = make_loss_fn(opts, None)({"v": v, "v_ref": v_ref, "u": u, "advantages": prep.advantages,
                                        "rewards": prep.rewards, "mask": prep.valid}, jnp.float32(B))
    err = np.mean((v - u).astype(np.float64) ** 2, axis=(1, 2, 3))
    w2 = np.mean((v - v_ref).astype(np.float64) ** 2, axis=(1, 2, 3))
    expected = np_method_loss(method, err, w2, adv, r.astype(np.float64), valid, beta=0.3, tau=0.7, alpha=0.4,
                              clip=0.3)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["cfm_term"]) + float(m["w2_term"]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["w2_mean"]), w2.mean(), rtol=1e-5)
    # the logged W2 coefficient of the method
    coef = {"adrpo": 0.3 - np.clip(adv, -0.3, 0.3), "fixed_beta": np.full(B, 0.3), "orw_cfm_w2": np.full(B, 0.4),
            "none": np.zeros(B)}[method]
    np.testing.assert_allclose(float(prep.metrics["beta_eff_mean"]), coef.mean(), atol=1e-6)
    np.testing.assert_allclose(float(prep.metrics["beta_eff_min"]), coef.min(), atol=1e-6)
    np.testing.assert_allclose(float(prep.metrics["beta_eff_max"]), coef.max(), atol=1e-6)
    # the two terms separately (issue 9.6): weighted CFM and coefficient-weighted W2, means over the batch
    cfm_weight = np.exp(0.7 * r.astype(np.float64)) if method == "orw_cfm_w2" else adv
    np.testing.assert_allclose(float(m["cfm_term"]), np.mean(cfm_weight * err), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["w2_term"]), np.mean(coef * w2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(prep.metrics["adv_clip_fraction"]),
                               np.mean(np.abs(adv) > 0.3) if method == "adrpo" else 0.0, atol=1e-6)


def test_nonfinite_rewards_are_masked_everywhere():
    g = B // K_COND
    last = list(range(3 * g, 4 * g - 1))  # prompt 3 keeps a single valid sample: advantage 0
    bad = [(1, "nan_reward"), (6, "inf_reward"), (g + 1, "nan_image")] + [(i, "nan_reward") for i in last]
    x1, r, v, v_ref, u = _hand_batch(1, bad)
    cond = prompts()
    opts = tiny_options(method="adrpo", beta=0.3, image_shape=(2, 2, 1))
    prep = jax.jit(lambda x, c, rr: prepare_batch(opts, x, c, rr))(jnp.asarray(x1), jnp.asarray(cond),
                                                                   jnp.asarray(r))
    valid = np.ones(B, bool)
    valid[[i for i, _ in bad]] = False
    np.testing.assert_array_equal(np.asarray(prep.valid), valid)
    r64 = np.where(valid, r, 0.0).astype(np.float64)
    adv = np_prompt_advantages(r64, cond, valid)
    np.testing.assert_allclose(np.asarray(prep.advantages), adv, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(prep.x1))) and np.all(np.asarray(prep.x1)[~valid] == 0)
    m = {k: float(v_) for k, v_ in prep.metrics.items()}
    assert m["num_nonfinite_rewards"] == len(bad)
    np.testing.assert_allclose(m["reward_mean"], r64[valid].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["reward_std"], r64[valid].std(), rtol=1e-5)
    np.testing.assert_allclose(m["zero_std_prompt_fraction"], 0.25)  # prompt 3: one valid sample
    # NaN velocities at invalid rows (e.g. from a NaN image) never reach the loss or its gradient
    v = v.copy()
    v[g + 1] = np.nan
    loss_fn = make_loss_fn(opts, None)
    def f(vv):
        return loss_fn({"v": vv, "v_ref": v_ref, "u": u, "advantages": prep.advantages, "rewards": prep.rewards,
                        "mask": prep.valid}, jnp.float32(valid.sum()))[0]
    loss, grad = jax.value_and_grad(f)(jnp.asarray(v))
    err = np.mean((v - u).astype(np.float64) ** 2, axis=(1, 2, 3))
    w2 = np.mean((v - v_ref).astype(np.float64) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(float(loss), np_method_loss("adrpo", err, w2, adv, r64, valid, beta=0.3, clip=0.3),
                               rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[~valid] == 0)


# ----------------------------------------------------------------------------------------------------------
# The update on the tiny DiT
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def jitted_update(method: str = "adrpo"):
    opts = tiny_options(method=method)
    tx = optax.sgd(0.1)
    return opts, tx, jax.jit(make_flow_update(tiny_model()[0], tx, opts, None, return_grads=True))


def _forward(graphdef, params, x, t, c):
    return np.asarray(jax.jit(lambda p, x_, t_, c_: nnx.merge(graphdef, p)(x_, t_, c_))(params, x, t, c),
                      np.float64)


def _run_update(ref_params, rewards, x1=None, key=3):
    graphdef, params = tiny_model(0)
    opts, tx, update = jitted_update()
    rng = np.random.default_rng(5)
    x1 = rng.standard_normal((B, 8, 8, 1)).astype(np.float32) if x1 is None else x1
    batch = {"x1": jnp.asarray(x1), "cond": jnp.asarray(prompts()), "rewards": jnp.asarray(rewards)}
    out = update(params, tx.init(params), ref_params, None, batch, jax.random.key(key))
    return opts, x1, jax.device_get(out)


def _expected_loss(opts, params_ref, x1, rewards, key=3):
    """The ADRPO loss evaluated in NumPy on the model's forwards at the step's own (t, x0) draws."""
    graphdef, params = tiny_model(0)
    t, x0, _ = draw_path_inputs(opts, inner_update_key(jax.random.key(key), 0), jnp.asarray(x1))
    t, x0 = np.asarray(t, np.float64), np.asarray(x0, np.float64)
    valid = np.isfinite(rewards) & np.all(np.isfinite(x1.reshape(B, -1)), axis=1)
    x1_ = np.where(valid[:, None, None, None], x1, 0.0)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * x1_
    u = x1_ - x0
    c = prompts()
    v = _forward(graphdef, params, x_t.astype(np.float32), t.astype(np.float32), c)
    v_ref = _forward(graphdef, params_ref, x_t.astype(np.float32), t.astype(np.float32), c)
    r = np.where(valid, rewards, 0.0).astype(np.float64)
    adv = np_prompt_advantages(r, c, valid)
    err = np.mean((v - u) ** 2, axis=(1, 2, 3))
    w2 = np.mean((v - v_ref) ** 2, axis=(1, 2, 3))
    return np_method_loss("adrpo", err, w2, adv, r, valid, beta=opts.beta, clip=opts.beta), w2


def test_update_loss_matches_formula_on_model_forwards():
    _, ref = tiny_model(1, 0.3)
    rewards = np.random.default_rng(2).standard_normal(B).astype(np.float32)
    opts, x1, (new_params, _, m, grads) = _run_update(ref, rewards)
    expected, w2 = _expected_loss(opts, ref, x1, rewards)
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["w2_mean"], w2.mean(), rtol=1e-4)
    assert m["skipped"] == 0 and m["num_nonfinite_rewards"] == 0 and w2.mean() > 1e-3
    params = tiny_model(0)[1]
    for p, q, g in zip(jax.tree.leaves(params), jax.tree.leaves(new_params), jax.tree.leaves(grads)):
        np.testing.assert_allclose(q, p - 0.1 * g, rtol=1e-5, atol=1e-6)  # SGD(0.1) applied


def test_w2_term_and_its_gradient_vanish_when_policy_equals_reference():
    graphdef, params = tiny_model(0)
    rewards = np.random.default_rng(2).standard_normal(B).astype(np.float32)
    opts, x1, (_, _, m, grads) = _run_update(params, rewards)
    assert m["w2_mean"] == 0.0 and m["w2_term"] == 0.0
    np.testing.assert_allclose(m["loss"], m["cfm_term"], rtol=0, atol=0)
    # The gradient is exactly that of the advantage-weighted CFM term alone (computed here directly).
    t, x0, _ = draw_path_inputs(opts, inner_update_key(jax.random.key(3), 0), jnp.asarray(x1))
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * x1
    adv = jnp.asarray(np_prompt_advantages(rewards.astype(np.float64), prompts(), np.ones(B, bool)), jnp.float32)
    def cfm_only(p):
        v = nnx.merge(graphdef, p)(x_t, t, jnp.asarray(prompts()))
        return jnp.mean(adv * jnp.mean(jnp.square(v - (x1 - x0)), axis=(1, 2, 3)))
    direct = jax.jit(jax.grad(cfm_only))(params)
    for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direct)):
        np.testing.assert_allclose(g, d, rtol=1e-4, atol=1e-6)


def test_update_masks_nonfinite_rewards_and_skips_an_all_invalid_batch():
    _, ref = tiny_model(1, 0.3)
    rewards = np.random.default_rng(2).standard_normal(B).astype(np.float32)
    rewards[[2, 9]] = np.nan
    x1 = np.random.default_rng(5).standard_normal((B, 8, 8, 1)).astype(np.float32)
    x1[4, 3, 3, 0] = np.inf
    opts, _, (new_params, _, m, grads) = _run_update(ref, rewards, x1)
    expected, _ = _expected_loss(opts, ref, x1, rewards)
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-4, atol=1e-6)
    assert m["num_nonfinite_rewards"] == 3 and m["num_samples"] == B - 3 and m["skipped"] == 0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # nothing valid: the update is skipped (parameters untouched), not applied with zero gradients
    _, _, (new_params, _, m, _) = _run_update(ref, np.full(B, np.nan, np.float32))
    assert m["skipped"] == 1 and m["num_nonfinite_rewards"] == B
    for p, q in zip(jax.tree.leaves(tiny_model(0)[1]), jax.tree.leaves(new_params)):
        np.testing.assert_array_equal(p, q)


# ----------------------------------------------------------------------------------------------------------
# The whole step: 8 devices == 1 device; reference refresh
# ----------------------------------------------------------------------------------------------------------

ALPHA = 0.25


def _step_options():
    return tiny_options(grad_accum_steps=2, ref_refresh_alpha=ALPHA, cond_dropout_prob=0.25, num_inner_updates=1)


def _step_tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))


def _step_state(tx):
    _, params = tiny_model(0)
    _, ref = tiny_model(1, 0.3)
    _, sampler = tiny_model(2, 0.3)
    return {"params": params, "opt_state": tx.init(params), "ref_params": ref, "sampler_params": sampler}


def _nan_reward(images, cond):
    """mean ink, NaN for the images of prompt 1's first sample (a reward model that fails on some inputs)."""
    r = ImageStatReward("mean_ink")(images, cond)
    first_of_prompt = jnp.arange(images.shape[0]) % (B // K_COND) == 0
    return jnp.where((cond == 1) & first_of_prompt, jnp.nan, r)


@functools.lru_cache(maxsize=None)
def single_device_step():
    graphdef, _ = tiny_model(0)
    tx = _step_tx()
    step = jax.jit(make_train_step(graphdef, tx, _nan_reward, _step_options(), None, return_grads=True))
    state = _step_state(tx)
    out = step(jax.tree.map(jnp.asarray, state), None, None, jnp.asarray(prompts()), jax.random.key(7), True, True)
    return jax.device_get(out)


def _compare(a, b, what):
    leaves_b = jax.tree.leaves(b)
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("mesh_shape", [pytest.param(dict(data=8), marks=pytest.mark.slow),
                                        dict(data=2, fsdp=2, tensor=2),
                                        pytest.param(dict(data=2, fsdp=4), marks=pytest.mark.slow),
                                        pytest.param(dict(data=4, tensor=2), marks=pytest.mark.slow)],
                         ids=["data8", "data2_fsdp2_tensor2", "data2_fsdp4", "data4_tensor2"])
def test_sharded_step_matches_single_device(mesh_shape):
    assert jax.device_count() == 8
    graphdef, _ = tiny_model(0)
    tx = _step_tx()
    mesh = train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **mesh_shape})

    def plan():
        p = nnx.state(DiT(TINY, rngs=nnx.Rngs(0)), nnx.Param)
        return {"params": p, "opt_state": tx.init(p), "ref_params": p, "sampler_params": p}

    shardings = train.shardings_of(train.plan_sharded(plan, mesh))
    specs = [str(x.spec) for x in jax.tree.leaves(shardings["params"])]
    for axis in ("fsdp", "tensor"):  # parameters really are split over the model axes of the mesh
        assert any(axis in s for s in specs) == (mesh_shape.get(axis, 1) > 1), (axis, specs)
    state = jax.device_put(_step_state(tx), shardings)
    step = jax.jit(make_train_step(graphdef, tx, _nan_reward, _step_options(), mesh, return_grads=True),
                   out_shardings=(shardings, train.replicated_sharding(mesh), shardings["params"]),
                   donate_argnums=0)
    cond = train.host_local_to_global(prompts(), mesh)
    s2, m2, g2 = jax.device_get(step(state, None, None, cond, jax.random.key(7), True, True))
    s1, m1, g1 = single_device_step()
    assert sorted(m1) == sorted(m2)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert m1["num_nonfinite_rewards"] == 1 and m1["skipped"] == 0 and m1["w2_mean"] > 0
    assert m1["ref_refreshed"] == 1 and m1["sampler_refreshed"] == 1
    _compare(g1, g2, "grad")
    _compare(s1, s2, "state")


def test_reference_refresh_mixes_and_the_next_loss_uses_it():
    s1, _, _ = single_device_step()
    _, old_ref = tiny_model(1, 0.3)
    for new, p, r in zip(jax.tree.leaves(s1["ref_params"]), jax.tree.leaves(s1["params"]), jax.tree.leaves(old_ref)):
        # XLA may fuse a*p + (1-a)*r into an FMA, NumPy does not: an ulp of the terms, so atol 1e-6 (not 1e-7)
        np.testing.assert_allclose(new, ALPHA * p + (1 - ALPHA) * r, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1["sampler_params"]), jax.tree.leaves(s1["params"])):
        np.testing.assert_array_equal(a, b)  # the sampling copy is the updated policy
    np.testing.assert_allclose(jax.tree.leaves(mix_params(old_ref, s1["params"], 1.0))[0],
                               jax.tree.leaves(s1["params"])[0])
    # The loss of an update against the refreshed reference is the formula with v_ref of the mixed weights,
    # and differs from the loss against the old reference.
    rewards = np.random.default_rng(2).standard_normal(B).astype(np.float32)
    opts, x1, (_, _, m_new, _) = _run_update(s1["ref_params"], rewards)
    expected, _ = _expected_loss(opts, s1["ref_params"], x1, rewards)
    np.testing.assert_allclose(m_new["loss"], expected, rtol=1e-4, atol=1e-6)
    _, _, (_, _, m_old, _) = _run_update(old_ref, rewards)
    assert abs(m_new["w2_term"] - m_old["w2_term"]) > 1e-4


@pytest.mark.xfail(reason="XLA SPMD miscompile (jax 0.10.2, CPU): the DiT forward on a data=2 x fsdp=2 x tensor=2 "
                          "mesh is wrong for a batch of 8 (correct for 16 and 32, and on other meshes). Kept as a "
                          "canary: it XPASSes once XLA is fixed.", strict=False)
def test_dit_gspmd_miscompile_at_batch_8():
    graphdef, params = tiny_model(0)
    mesh = train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = train.shardings_of(train.plan_sharded(lambda: nnx.state(DiT(TINY, rngs=nnx.Rngs(0)), nnx.Param),
                                                      mesh))
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((8, 8, 8, 1)).astype(np.float32), rng.random(8).astype(np.float32), prompts(8))
    fwd = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c))
    expected = fwd(params, *rows)
    got = fwd(jax.device_put(params, shardings), *train.host_local_to_global(rows, mesh))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-4)
