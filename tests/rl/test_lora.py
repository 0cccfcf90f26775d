"""LoRA in the GRPO / ADRPO step and trainer: the reference pass with adapters off == the base model's log-probs
exactly; a LoRA update on 8 forced CPU devices == one device (1e-5); steps change only the adapters and the
optimizer state covers only them; config errors; the trainer end to end (adapters-only checkpoints, merged
HF export that transformers loads with equal logits)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adrpo_jax import train
from adrpo_jax.models import lora
from adrpo_jax.models.llm import CausalLM, load_pretrained, token_logprobs
from adrpo_jax.rl.step import StepOptions, make_logprob_fn, make_rl_update
from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.config import ConfigError
from tests.rl.conftest import rollout_batch, tiny_model
from tests.rl.test_trainer import tiny_config

P, N, B = 3, 4, 16
LORA = lora.LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj", "o_proj", "down_proj", "lm_head"))


def _tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-2))


def _lora_model(cfg, base_params, base_graphdef):
    model = lora.apply_lora(nnx.clone(nnx.merge(base_graphdef, base_params)), LORA, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)  # non-zero B, so both factors get gradients
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), state))
    return model


@pytest.fixture(scope="module")
def setup():
    cfg, base_graphdef, base_params = tiny_model(seed=0)
    model = _lora_model(cfg, base_params, base_graphdef)
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    ref_graphdef = nnx.split(lora.set_lora_enabled(nnx.clone(model), False), nnx.LoRAParam, ...)[0]
    batch = rollout_batch(B, P, N, seed=3, group_size=4)
    batch["rewards"][5] = np.nan
    opts = StepOptions(group_size=4, prompt_length=P, max_new_tokens=N, beta=0.1, logprob_chunk_size=16)
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"])
    batch["old_logp"] = np.asarray(jax.jit(make_logprob_fn(graphdef, opts))(params, frozen, tokens, mask)[0])
    batch["ref_logp"] = np.asarray(jax.jit(make_logprob_fn(ref_graphdef, opts))(params, frozen, tokens, mask)[0])
    single = jax.jit(make_rl_update(graphdef, _tx(), opts, None, return_grads=True))
    return dict(cfg=cfg, base_graphdef=base_graphdef, base_params=base_params, graphdef=graphdef, params=params,
                frozen=frozen, ref_graphdef=ref_graphdef, batch=batch, opts=opts, single=single)


def test_reference_with_adapters_off_is_the_base_model_exactly(setup):
    s = setup
    tokens, mask = jnp.asarray(s["batch"]["tokens"]), jnp.asarray(s["batch"]["attention_mask"])
    base = jax.jit(lambda p, t, m: token_logprobs(nnx.merge(s["base_graphdef"], p), t, m))(s["base_params"], tokens,
                                                                                            mask)
    # Two different programs (the LoRA model with adapters off vs the plain base model) fuse and order their float32
    # sums differently: on an AVX2-capped or Intel CPU they differ by ~1 ulp (4.8e-7 on log-probs ~ -5), so a few-ulp
    # tolerance, far below the adapters' effect (> 1e-3, checked next).
    np.testing.assert_allclose(s["batch"]["ref_logp"], np.asarray(base)[:, P:], rtol=1e-5, atol=1e-6)
    assert np.abs(s["batch"]["old_logp"] - s["batch"]["ref_logp"]).max() > 1e-3  # the adapters do act


def test_lora_steps_train_only_adapters(setup):
    s = setup
    params, frozen, tx = s["params"], s["frozen"], _tx()
    opt_state = tx.init(params)
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(params))
    moment_shapes = sorted(x.shape for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert moment_shapes == sorted(adapter_shapes * 2)  # adam mu, nu: adapters only
    assert not any(x.shape == (32, 16) for x in jax.tree.leaves(opt_state))  # no embedding-sized state
    batch = {k: jnp.asarray(v) for k, v in s["batch"].items()}
    frozen_before = jax.tree.map(np.array, frozen)
    new = params
    for i in range(2):
        new, opt_state, metrics, grads = s["single"](new, opt_state, frozen, batch, jax.random.key(i))
        assert not bool(metrics["skipped"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), frozen_before)  # bit-identical
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    assert sorted(x.shape for x in jax.tree.leaves(grads)) == adapter_shapes


@pytest.mark.parametrize("mesh_shape", [pytest.param(dict(data=8), marks=pytest.mark.slow),
                                        dict(data=2, fsdp=2, tensor=2)], ids=["data8", "data2_fsdp2_tensor2"])
def test_lora_update_sharded_matches_single_device(setup, mesh_shape):
    assert jax.device_count() == 8
    s, tx = setup, _tx()
    batch = {k: jnp.asarray(v) for k, v in s["batch"].items()}
    p1, _, m1, g1 = jax.device_get(s["single"](s["params"], tx.init(s["params"]), s["frozen"], batch,
                                               jax.random.key(0)))
    mesh = train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **mesh_shape})
    cfg = s["cfg"]

    def plan():
        params = nnx.state(lora.apply_lora(CausalLM(cfg, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(1)), nnx.LoRAParam)
        return {"params": params, "opt_state": tx.init(params)}

    shardings = train.shardings_of(train.plan_sharded(plan, mesh))
    params = jax.device_put(jax.tree.map(jnp.copy, s["params"]), shardings["params"])
    frozen = jax.device_put(s["frozen"], train.logical_to_named_sharding(s["frozen"], mesh))
    if mesh_shape.get("tensor", 1) > 1:  # adapters really are split like their kernels
        specs = {str(x.sharding.spec) for x in jax.tree.leaves(params)}
        assert any("fsdp" in sp for sp in specs) and any("tensor" in sp for sp in specs)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    out_sh = (shardings["params"], shardings["opt_state"], train.replicated_sharding(mesh), shardings["params"])
    fn = jax.jit(make_rl_update(s["graphdef"], tx, s["opts"], mesh, return_grads=True), out_shardings=out_sh,
                 donate_argnums=(0, 1))
    p2, _, m2, g2 = jax.device_get(fn(params, opt_state, frozen, train.host_local_to_global(s["batch"], mesh),
                                      jax.random.key(0)))
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert m1["kl_mean"] > 0 and m1["num_missing_rewards"] == 1
    for what, a, b in (("grad", g1, g2), ("param", p1, p2)):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("overrides, key", [
    ({"lora.dropout": 0.05}, "lora.dropout"),
    ({"rl.ref_sync_steps": 2, "rl.ref_mixup_alpha": 0.5}, "rl.ref_mixup_alpha"),
    ({"lora.rank": 0}, "lora.rank"),
    ({"lora.target_modules": ("q_proj", "(")}, "lora.target_modules"),
    ({"lora.init": "xavier"}, "lora.init"),
])
def test_lora_config_errors(tiny_model_dir, tmp_path, overrides, key):
    with pytest.raises(ConfigError) as err:
        RLTrainer(tiny_config(tiny_model_dir, **{"lora.enabled": True, **overrides}), tmp_path)
    assert err.value.key == key


def test_trainer_lora_wiring_and_merged_export(tiny_model_dir, tmp_path):
    """Without running a step: the trainable set, the reference GraphDef, the fresh state and the merged export."""
    config = tiny_config(tiny_model_dir, eval_every=0, **{"lora.enabled": True, "rl.ref_sync_steps": 0})
    trainer = RLTrainer(config, tmp_path)
    assert trainer.trainable is nnx.LoRAParam and trainer.policy.lora_reference and trainer.policy.ref_params is None
    assert trainer.ref_graphdef != trainer.graphdef and trainer.fns["ref_logprobs"] is not trainer.fns["logprobs"]
    abstract = trainer.abstract_state
    assert len(jax.tree.leaves(abstract["params"])) == 7 * 2  # 1 layer x 7 projections (tied: no lm_head), A, B
    assert sorted(x.shape for x in jax.tree.leaves(abstract["opt_state"]) if x.ndim > 0) == sorted(
        [x.shape for x in jax.tree.leaves(abstract["params"])] * 2)
    state = trainer.init_state()
    base = load_pretrained(tiny_model_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.frozen)),
                 jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base, nnx.Param))))
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state["params"])):
        assert x.sharding == jax.tree.leaves(trainer.state_shardings["params"])[0].__class__(
            x.sharding.mesh, x.sharding.spec)  # born sharded on the trainer's mesh
        if path[-1].key == "lora_b":
            assert float(jnp.abs(x).max()) == 0.0  # B = 0: the policy starts as the pretrained model
    # save_model merges: a plain HF directory whose weights are W + s A B (s = 16 / 8), the rest the base's
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.1 * rng.standard_normal(x.shape), x.dtype),
                          state["params"])
    trainer.save_model(params, tmp_path / "merged")
    merged = nnx.to_pure_dict(nnx.state(load_pretrained(tmp_path / "merged"), nnx.Param))
    adapters, base_pure = nnx.to_pure_dict(params), nnx.to_pure_dict(nnx.state(base, nnx.Param))
    for (path, w), (_, w0) in zip(jax.tree_util.tree_leaves_with_path(merged),
                                  jax.tree_util.tree_leaves_with_path(base_pure)):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        node = adapters
        for k in keys[:-1]:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        if keys[-1] == "kernel" and "lora" in node:
            a, b = (np.asarray(node["lora"][n], np.float64) for n in ("lora_a", "lora_b"))
            n_in = a.ndim - 1
            if np.ndim(w) == a.ndim + b.ndim - 3:  # stacked layers (scan_layers): one A, B per layer
                delta = 2.0 * np.stack([np.tensordot(ai, bi, axes=([n_in - 1], [0])) for ai, bi in zip(a, b)])
            else:
                delta = 2.0 * np.tensordot(a, b, axes=([n_in], [0]))
            np.testing.assert_allclose(np.asarray(w), np.asarray(w0, np.float64) + delta, rtol=1e-6, atol=1e-6,
                                       err_msg=str(keys))
        else:
            np.testing.assert_array_equal(np.asarray(w), np.asarray(w0), err_msg=str(keys))


@pytest.mark.slow
def test_trainer_with_lora_end_to_end(tiny_model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = tiny_config(tiny_model_dir, eval_every=0, **{
        "lora.enabled": True, "rl.ref_sync_steps": 0, "model.save_final": True, "optim.learning_rate": 5e-2})
    trainer = RLTrainer(config, tmp_path)
    assert trainer.trainable is nnx.LoRAParam and trainer.policy.lora_reference and trainer.policy.ref_params is None
    assert trainer.ref_graphdef != trainer.graphdef
    abstract = trainer.abstract_state
    n_adapters = 7 * 2  # one layer, 7 projections (tied embeddings: no lm_head), A and B
    assert len(jax.tree.leaves(abstract["params"])) == n_adapters
    assert sorted(x.shape for x in jax.tree.leaves(abstract["opt_state"]) if x.ndim > 0) == sorted(
        [x.shape for x in jax.tree.leaves(abstract["params"])] * 2)
    result = trainer.run()
    assert result["step"] == 2 and np.isfinite(result["loss"]) and result["kl_mean"] >= 0
    # the base weights are untouched; the checkpoints hold only adapters + optimizer state (+ a few scalars)
    base = load_pretrained(tiny_model_dir)
    base_state = nnx.state(base, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.frozen)),
                 jax.tree.map(np.asarray, nnx.to_pure_dict(base_state)))
    params = trainer.result.state["params"]
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(params)) > 0
    saved = b"".join(open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(tmp_path / "checkpoints" / "2")
                     for f in fs)
    assert b"lora_b" in saved and b"embed_tokens" not in saved and b"kernel" not in saved
    # the merged export: transformers loads it and computes the JAX LoRA policy's logits
    model = nnx.merge(trainer.graphdef, params, trainer.frozen)
    batch = rollout_batch(4, P, N, seed=1, vocab=base.config.vocab_size)
    tokens, mask = batch["tokens"], batch["attention_mask"]
    want = np.asarray(jax.jit(lambda m: m(tokens, attention_mask=mask))(model))
    with lora.lora_disabled(model):
        base_logits = np.asarray(jax.jit(lambda m: m(tokens, attention_mask=mask))(model))
    assert np.abs(want - base_logits).max() > 1e-4  # the adapters were trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["final_model"], dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-4, atol=1e-4)
