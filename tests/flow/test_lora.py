"""LoRA in the flow trainer (``lora.*`` keys): config validation; the LoRA step trains only the adapters, its W2
reference is the base model (adapters off, no second copy), its loss is the ADRPO-FM formula evaluated in NumPy on
the merged (W + s A B) policy and the plain base model, the base weights stay bit-identical, LoRA dropout acts only
in the loss's policy forward, and the step on 8 forced CPU devices equals the single-device step (1e-5); (slow) a
tiny FlowTrainer run with LoRA: adapters-only state and checkpoints, merged final DiT."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adrpo_jax import train
from adrpo_jax.flow import config as config_lib
from adrpo_jax.flow.trainer import FlowTrainer
from adrpo_jax.flow.step import draw_path_inputs, inner_update_key, make_flow_update, make_train_step
from adrpo_jax.models.dit import DiT
from adrpo_jax.models.lora import LoRAConfig, apply_lora, merge_lora, split_lora
from adrpo_jax.train.config import ConfigError
from tests.flow.test_trainer import _tiny_models, base, tiny_trainer_config
from tests.flow.test_trainer_step import (B, TINY, _compare, _forward, _nan_reward, np_method_loss,
                                          np_prompt_advantages, prompts, tiny_model, tiny_options)

TARGETS = ("attn.wq", "attn.wv", "attn.wo", "fc1", "fc2")


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


def test_lora_keys_default_off_and_build_the_lora_config():
    config = base()
    config_lib.validate_flow_config(config)
    assert config.lora.enabled is False and config_lib.lora_config(config) is None
    config.lora.enabled = True
    config.lora.rank, config.lora.alpha, config.lora.use_rslora = 4, 8.0, True
    config.lora.target_modules = ("wq", r"blocks\.[0-9]+\.fc1")
    config_lib.validate_flow_config(config)
    lc = config_lib.lora_config(config)
    assert lc == LoRAConfig(rank=4, alpha=8.0, target_modules=("wq", r"blocks\.[0-9]+\.fc1"), use_rslora=True)


@pytest.mark.parametrize("key,value,match", [
    ("lora.rank", 0, "lora.rank"),
    ("lora.alpha", -1.0, "lora.alpha"),
    ("lora.dropout", 1.0, "lora.dropout"),
    ("lora.init", "xavier", "lora.init"),
    ("lora.target_modules", (), "lora.target_modules"),
    ("lora.target_modules", ("attn.wq", "fc1[",), "not a valid regex"),
    ("lora.use_rslora", 1, "lora.use_rslora"),
])
def test_bad_lora_values_raise_config_error_naming_the_key(key, value, match):
    config = base()
    config.lora.enabled = True
    section, name = key.split(".")
    del config[section][name]
    config[section][name] = value
    with pytest.raises(ConfigError, match=match.replace(".", r"\.") if "regex" not in match else match) as info:
        config_lib.validate_flow_config(config)
    assert info.value.key == key


def test_lora_with_a_mixed_reference_refresh_is_rejected():
    config = base()
    config.lora.enabled = True
    config.rl.ref_refresh_steps, config.rl.ref_refresh_alpha = 5, 0.5
    with pytest.raises(ConfigError, match="mixing the factors") as info:
        config_lib.validate_flow_config(config)
    assert info.value.key == "rl.ref_refresh_alpha"
    config.rl.ref_refresh_alpha = 1.0  # a copy of the adapters is fine
    config_lib.validate_flow_config(config)


# ----------------------------------------------------------------------------------------------------------
# The LoRA step on the tiny DiT
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def lora_model(dropout: float = 0.0):
    """``(graphdef, ref_graphdef, adapters, base)`` of the tiny DiT (perturbed base = ``tiny_model(0)``) with
    adapters whose B is nonzero (so that the policy differs from the reference)."""
    graphdef, params = tiny_model(0)
    model = nnx.merge(graphdef, params)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=TARGETS, dropout=dropout), rngs=nnx.Rngs(3))
    g, ref_g, adapters, base_state = split_lora(model)
    rng = np.random.default_rng(11)
    adapters = jax.tree.map(lambda x: np.asarray(x) + 0.2 * rng.standard_normal(x.shape).astype(np.float32),
                            adapters)
    return g, ref_g, adapters, jax.tree.map(np.asarray, base_state)


def _hand_inputs():
    rng = np.random.default_rng(5)
    x1 = rng.standard_normal((B, 8, 8, 1)).astype(np.float32)
    rewards = rng.standard_normal(B).astype(np.float32)
    return x1, rewards


@functools.lru_cache(maxsize=None)
def lora_update(lora_dropout: bool = False, dropout: float = 0.0):
    g, ref_g, _, _ = lora_model(dropout)
    opts = tiny_options(method="adrpo")
    tx = optax.sgd(0.1)
    return opts, tx, jax.jit(make_flow_update(g, tx, opts, None, return_grads=True, ref_graphdef=ref_g,
                                              lora_dropout=lora_dropout))


def test_lora_update_trains_only_adapters_against_the_base_model():
    g, _, adapters, base_state = lora_model()
    opts, tx, update = lora_update()
    x1, rewards = _hand_inputs()
    batch = {"x1": jnp.asarray(x1), "cond": jnp.asarray(prompts()), "rewards": jnp.asarray(rewards)}
    base_before = jax.tree.map(np.copy, base_state)
    # ref_params = the policy's own adapters: the adapters-off graph ignores them.
    new, opt_state, m, grads = jax.device_get(update(adapters, tx.init(adapters), adapters, base_state, batch,
                                                     jax.random.key(3)))
    # Only adapters are trainable, have gradients and optimizer state.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(new)]
    assert paths and all("lora_a" in p or "lora_b" in p for p in paths)
    assert jax.tree.structure(grads) == jax.tree.structure(new)
    # The loss is ADRPO-FM in NumPy with v of the merged policy (W + s A B) and v_ref of the plain base DiT.
    merged = merge_lora(nnx.merge(g, adapters, base_state))
    mg, mp = nnx.split(merged, nnx.Param)
    t, x0, _ = draw_path_inputs(opts, inner_update_key(jax.random.key(3), 0), jnp.asarray(x1))
    t, x0 = np.asarray(t, np.float64), np.asarray(x0, np.float64)
    x_t = ((1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * x1).astype(np.float32)
    c = prompts()
    v = _forward(mg, mp, x_t, t.astype(np.float32), c)
    v_ref = _forward(*tiny_model(0), x_t, t.astype(np.float32), c)
    adv = np_prompt_advantages(rewards.astype(np.float64), c, np.ones(B, bool))
    err = np.mean((v - (x1 - x0)) ** 2, axis=(1, 2, 3))
    w2 = np.mean((v - v_ref) ** 2, axis=(1, 2, 3))
    expected = np_method_loss("adrpo", err, w2, adv, rewards.astype(np.float64), np.ones(B, bool), beta=opts.beta,
                              clip=opts.beta)
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["w2_mean"], w2.mean(), rtol=1e-4)
    assert w2.mean() > 1e-4 and m["skipped"] == 0
    for p, q, gr in zip(jax.tree.leaves(adapters), jax.tree.leaves(new), jax.tree.leaves(grads)):
        np.testing.assert_allclose(q, p - 0.1 * gr, rtol=1e-5, atol=1e-6)
        assert np.any(gr != 0)
    # The base weights (frozen, passed in) are bit-identical after the update.
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # three more compilations of the update (~40 s on 2 cores)
def test_lora_dropout_acts_only_in_the_loss_forward_and_is_keyed():
    _, _, adapters, base_state = lora_model(0.5)
    x1, rewards = _hand_inputs()
    batch = {"x1": jnp.asarray(x1), "cond": jnp.asarray(prompts()), "rewards": jnp.asarray(rewards)}
    outs = {}
    for on in (False, True):
        _, tx, update = lora_update(on, 0.5)
        for key in (3, 4):
            outs[on, key] = jax.device_get(update(adapters, tx.init(adapters), adapters, base_state, batch,
                                                  jax.random.key(key)))[2]
    _, tx, update = lora_update(True, 0.5)
    again = jax.device_get(update(adapters, tx.init(adapters), adapters, base_state, batch, jax.random.key(3)))[2]
    assert again["loss"] == outs[True, 3]["loss"]  # deterministic in the key
    assert abs(outs[True, 3]["loss"] - outs[False, 3]["loss"]) > 1e-6  # dropout changes the policy forward
    # Without the switch, dropout > 0 adapters are deterministic (the same as a dropout-0 model).
    _, tx0, update0 = lora_update(False, 0.0)
    plain = jax.device_get(update0(adapters, tx0.init(adapters), adapters, base_state, batch, jax.random.key(3)))[2]
    np.testing.assert_allclose(outs[False, 3]["loss"], plain["loss"], rtol=1e-6)


def _lora_step_options():
    return tiny_options(grad_accum_steps=2, cond_dropout_prob=0.25, sampling_steps=1)


@functools.lru_cache(maxsize=None)
def single_device_lora_step():
    g, ref_g, adapters, base_state = lora_model()
    tx = optax.adam(1e-2)
    step = jax.jit(make_train_step(g, tx, _nan_reward, _lora_step_options(), None, return_grads=True,
                                   ref_graphdef=ref_g))
    state = {"params": adapters, "opt_state": tx.init(adapters)}
    out = step(jax.tree.map(jnp.asarray, state), None, base_state, jnp.asarray(prompts()), jax.random.key(7), False,
               False)
    return jax.device_get(out)


@pytest.mark.parametrize("mesh_shape", [pytest.param(dict(data=4, tensor=2), marks=pytest.mark.slow),
                                        pytest.param(dict(data=2, fsdp=4), marks=pytest.mark.slow)],
                         ids=["data4_tensor2", "data2_fsdp4"])
def test_sharded_lora_step_matches_single_device(mesh_shape):
    assert jax.device_count() == 8
    g, ref_g, adapters, base_state = lora_model()
    tx = optax.adam(1e-2)
    mesh = train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **mesh_shape})
    lcfg = LoRAConfig(rank=2, alpha=4.0, target_modules=TARGETS)

    def plan():
        p = nnx.state(apply_lora(DiT(TINY, rngs=nnx.Rngs(0)), lcfg, rngs=nnx.Rngs(3)), nnx.LoRAParam)
        return {"params": p, "opt_state": tx.init(p)}

    shardings = train.shardings_of(train.plan_sharded(plan, mesh))
    specs = [str(x.spec) for x in jax.tree.leaves(shardings["params"])]
    axis = "tensor" if "tensor" in mesh_shape else "fsdp"
    assert any(axis in s for s in specs)  # the adapters really are split over the model axis
    state = jax.device_put({"params": adapters, "opt_state": tx.init(adapters)}, shardings)
    frozen = jax.device_put(base_state, train.logical_to_named_sharding(base_state, mesh))
    step = jax.jit(make_train_step(g, tx, _nan_reward, _lora_step_options(), mesh, return_grads=True,
                                   ref_graphdef=ref_g),
                   out_shardings=(shardings, train.replicated_sharding(mesh), shardings["params"]),
                   donate_argnums=0)
    cond = train.host_local_to_global(prompts(), mesh)
    s2, m2, g2 = jax.device_get(step(state, None, frozen, cond, jax.random.key(7), False, False))
    s1, m1, g1 = single_device_lora_step()
    assert sorted(m1) == sorted(m2)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert m1["num_nonfinite_rewards"] == 1 and m1["skipped"] == 0 and m1["w2_mean"] > 0
    _compare(g1, g2, "grad")
    _compare(s1, s2, "state")
    for a, b in zip(jax.tree.leaves(base_state), jax.tree.leaves(jax.device_get(frozen))):
        np.testing.assert_array_equal(a, b)  # base weights untouched


# ----------------------------------------------------------------------------------------------------------
# A tiny FlowTrainer run with LoRA
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~40 s of XLA compilation on 2 cores
def test_tiny_lora_trainer_run(tmp_path):
    from adrpo_jax.models.dit import load_dit

    config = tiny_trainer_config()
    config.rl.ref_refresh_steps = 0
    config.rl.ref_refresh_alpha = 1.0
    config.rl.sampler_refresh_steps = 1
    config.lora.enabled = True
    config.lora.rank = 2
    config.lora.alpha = 4.0
    config.lora.dropout = 0.1
    config.optim.learning_rate = 1e-2
    dit, clf = _tiny_models()
    pretrained = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(dit, nnx.Param)))
    trainer = FlowTrainer(config, tmp_path, models=(dit, clf))
    assert trainer.trainable is nnx.LoRAParam and trainer.ref_graphdef is trainer.base_graphdef
    assert set(trainer.abstract_state) == {"params", "opt_state"}
    leaves = jax.tree_util.tree_leaves_with_path(trainer.abstract_state)
    assert all("lora_a" in jax.tree_util.keystr(p) or "lora_b" in jax.tree_util.keystr(p)
               or x.size <= 1 for p, x in leaves)  # adapters and their optimizer moments (+ counters) only
    out = trainer.run()
    assert out["step"] == 4 and not out["preempted"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["eval/w2_bound"] == 0.0 and records[0]["eval/frechet_distance"] < 1e-6  # B = 0 at start
    assert records[-1]["eval/w2_bound"] > 0 and np.isfinite(records[-1]["loss"])
    # The base weights are bit-identical after training; only the adapters moved.
    frozen = jax.tree.map(np.asarray, nnx.to_pure_dict(jax.device_get(trainer.frozen)))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(pretrained), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    adapters = jax.device_get(trainer.result.state["params"])
    assert any(np.any(np.asarray(x) != 0) for p, x in jax.tree_util.tree_leaves_with_path(adapters)
               if "lora_b" in jax.tree_util.keystr(p))
    # The final model is the merged DiT (no adapters), equal to the LoRA policy's forward.
    final = load_dit(tmp_path / "final_model")
    policy = nnx.merge(trainer.graphdef, adapters, jax.device_get(trainer.frozen))
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t, c = jnp.linspace(0.1, 0.9, 4), jnp.arange(4)
    np.testing.assert_allclose(np.asarray(final(x, t, c)), np.asarray(policy(x, t, c)), rtol=1e-5, atol=1e-5)
    assert sorted(nnx.to_pure_dict(nnx.state(final, nnx.Param))) == sorted(pretrained)
    # Checkpoints hold the adapters and their optimizer state, not the base weights (orbax's tree metadata).
    meta = json.loads((tmp_path / "checkpoints" / "4" / "state" / "_METADATA").read_text())["tree_metadata"]
    arrays = [k for k, v in meta.items() if v["value_metadata"].get("value_type") == "jax.Array"]
    assert any("lora_a" in k for k in arrays) and any("lora_b" in k for k in arrays)
    assert all("lora_a" in k or "lora_b" in k or "count" in k for k in arrays), arrays


def _trainer_without_eval(tmp_path, lora: bool):
    config = tiny_trainer_config()
    config.eval_every = 0
    config.eval.write_images = False
    config.rl.ref_refresh_steps, config.rl.ref_refresh_alpha, config.rl.sampler_refresh_steps = 0, 1.0, 1
    config.lora.enabled = lora
    config.lora.rank, config.lora.alpha = 2, 4.0
    return FlowTrainer(config, tmp_path, models=_tiny_models())


def test_lora_off_builds_the_plain_trainer(tmp_path):
    trainer = _trainer_without_eval(tmp_path, lora=False)
    assert trainer.lora_config is None and trainer.trainable is nnx.Param
    assert trainer.ref_graphdef is trainer.graphdef is trainer.base_graphdef and not jax.tree.leaves(trainer.frozen)
    dit = _tiny_models()[0]
    assert jax.tree.structure(nnx.to_pure_dict(trainer.abstract_state["params"])) == \
        jax.tree.structure(nnx.to_pure_dict(nnx.state(dit, nnx.Param)))
    for a, b in zip(jax.tree.leaves(trainer.ref_params), jax.tree.leaves(nnx.state(dit, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the reference: the pre-trained weights


@pytest.mark.slow  # two train-step compilations
def test_fresh_lora_step_computes_what_the_plain_step_computes(tmp_path):
    """B = 0 at init: the LoRA policy is the base model, so the first step samples the same images and has the
    same loss and statistics as the full-parameter trainer (only the trained parameters differ)."""
    out = {}
    for lora in (False, True):
        trainer = _trainer_without_eval(tmp_path / str(lora), lora)
        _, metrics = trainer.train_step(0, trainer.init_state())
        out[lora] = jax.device_get(metrics)
    for key in ("reward_mean", "reward_std", "advantage_std", "loss", "cfm_term", "w2_term", "w2_mean",
                "beta_eff_mean", "sample_diversity"):
        np.testing.assert_allclose(out[True][key], out[False][key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert out[True]["w2_mean"] == 0.0  # policy == reference at the first update
