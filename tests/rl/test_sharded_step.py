"""The sharded RL update on 8 forced CPU devices == the single-device update (loss, metrics, gradients, updated
parameters; tolerance 1e-5 float32), on a data-parallel mesh and on FSDP / tensor-parallel meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adrpo_jax import train
from adrpo_jax.models.llm import CausalLM, token_logprobs
from adrpo_jax.rl.step import StepOptions, make_rl_update
from tests.rl.conftest import rollout_batch, tiny_model

P, N, B = 3, 4, 16


def _setup(**opt_kw):
    cfg, graphdef, params = tiny_model(seed=0)
    _, _, ref_params = tiny_model(seed=1)
    batch = rollout_batch(B, P, N, seed=3, group_size=4)
    batch["rewards"][5] = np.nan  # a missing reward: masking must agree across devices
    mask = jnp.asarray(batch["attention_mask"])
    for name, p in (("old_logp", params), ("ref_logp", ref_params)):
        batch[name] = np.asarray(token_logprobs(nnx.merge(graphdef, p), jnp.asarray(batch["tokens"]), mask))[:, P:]
    opts = StepOptions(group_size=4, prompt_length=P, max_new_tokens=N, beta=0.1,
                       **{"grad_accum_steps": 2, "logprob_chunk_size": 16, **opt_kw})
    return cfg, graphdef, params, batch, opts


def _tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))


def _single(graphdef, params, batch, opts, return_grads):
    tx = _tx()
    fn = jax.jit(make_rl_update(graphdef, tx, opts, None, return_grads=return_grads))
    return jax.device_get(fn(params, tx.init(params), None, {k: jnp.asarray(v) for k, v in batch.items()},
                             jax.random.key(0)))


def _sharded(cfg, graphdef, params, batch, opts, mesh_shape, return_grads):
    mesh = train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **mesh_shape})
    tx = _tx()
    abstract = train.plan_sharded(lambda: {"params": (p := nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)),
                                           "opt_state": tx.init(p)}, mesh)
    shardings = train.shardings_of(abstract)
    sharded_params = jax.device_put(jax.tree.map(jnp.copy, params), shardings["params"])  # donated below
    for axis in ("fsdp", "tensor"):  # parameters really are split over that axis
        if mesh_shape.get(axis, 1) > 1:
            assert any(axis in str(x.sharding.spec) for x in jax.tree.leaves(sharded_params)), axis
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(sharded_params)
    gbatch = train.host_local_to_global(batch, mesh)
    out_sh = (shardings["params"], shardings["opt_state"], train.replicated_sharding(mesh))
    if return_grads:
        out_sh = out_sh + (shardings["params"],)
    fn = jax.jit(make_rl_update(graphdef, tx, opts, mesh, return_grads=return_grads), out_shardings=out_sh,
                 donate_argnums=(0, 1))
    return jax.device_get(fn(sharded_params, opt_state, None, gbatch, jax.random.key(0)))


def _compare(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("mesh_shape", [pytest.param(dict(data=8), marks=pytest.mark.slow), dict(data=2, fsdp=4),
                                        pytest.param(dict(data=4, tensor=2), marks=pytest.mark.slow),
                                        pytest.param(dict(data=2, fsdp=2, tensor=2), marks=pytest.mark.slow)],
                         ids=["data8", "data2_fsdp4", "data4_tensor2", "data2_fsdp2_tensor2"])
def test_sharded_update_matches_single_device(mesh_shape):
    assert jax.device_count() == 8
    cfg, graphdef, params, batch, opts = _setup()
    p1, _, m1, g1 = _single(graphdef, params, batch, opts, True)
    p2, _, m2, g2 = _sharded(cfg, graphdef, params, batch, opts, mesh_shape, True)
    assert sorted(m1) == sorted(m2)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert m1["num_missing_rewards"] == 1 and np.isfinite(m1["loss"]) and m1["kl_mean"] > 0
    _compare(g1, g2, "grad")
    _compare(p1, p2, "param")
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p1))) > 1e-3


@pytest.mark.slow
def test_sharded_minibatches_match_single_device():
    cfg, graphdef, params, batch, opts = _setup(num_minibatches=2, num_iterations=2, grad_accum_steps=1)
    p1, _, m1 = _single(graphdef, params, batch, opts, False)
    p2, _, m2 = _sharded(cfg, graphdef, params, batch, opts, dict(data=2, fsdp=4), False)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    _compare(p1, p2, "param")
