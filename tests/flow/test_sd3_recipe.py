"""The SD3 recipe's porting fixes (issue 28 items 1-6 of the SD3 part, issue 24's SD3 memory keys).

Default suite: config keys and their validation (resolution, prompt files, held-out eval prompts, micro-batch
layouts, ORW-CFM-W2's exponent), the shifted training times, the ORW weights on a 0-100 CLIP score, the strided
micro-batching of the rollout and of the VAE decode (which rows each chunk holds, on stand-ins). Slow: the same
numbers micro-batched on the tiny MMDiT sampler and the tiny VAE, the recipe end to end in process on the tiny
models (refreshes, prompt files, the eval metrics, the bf16 merged export), the peak memory of the rollout
following the micro-batch (XLA's buffer assignment on 8 CPU devices).
"""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax import train
from adrpo_jax.flow.config import read_prompts_file, sd3_prompt_sets, validate_sd3_batch_layout, validate_sd3_config
from adrpo_jax.flow.sd3 import MMDiTVelocity
from adrpo_jax.flow.step import (FlowStepOptions, draw_path_inputs, make_rollout_fn, map_micro_batches,
                                  orw_exponent_rewards, prepare_batch)
from adrpo_jax.models import mmdit
from adrpo_jax.models import vae as vae_lib
from adrpo_jax.train.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _config(variant="cpu", **overrides):
    spec = importlib.util.spec_from_file_location("sd3_adrpo", REPO / "configs" / "sd3_adrpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


# ---- config keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,match", [
    ("data.width", -16, "data.width"),
    ("model.attention_impl", "flash", "model.attention_impl"),
    ("model.remat_policy", "nothing_saveable_typo", "remat_policy"),
    ("model.preset", "sd4", "model.preset"),
    ("model.save_dtype", "int8", "model.save_dtype"),
    ("vae.decode_batch", -1, "vae.decode_batch"),
    ("rl.rollout_micro_batch", -2, "rl.rollout_micro_batch"),
    ("rl.orw_reward_scaling", "softmax", "rl.orw_reward_scaling"),
    ("eval.batch_size", -1, "eval.batch_size"),
    ("eval.clip_paths", ("",), "eval.clip_paths"),
    ("reward.dtype", "int8", "reward.dtype"),
])
def test_new_keys_are_validated(key, value, match):
    with pytest.raises(ConfigError, match=match) as err:
        validate_sd3_config(_config(**{key: value}))
    assert err.value.key == key


def test_remat_policy_needs_remat_and_cudnn_needs_half_precision():
    with pytest.raises(ConfigError, match=r"no effect with model\.remat=False"):
        validate_sd3_config(_config(**{"model.remat_policy": "dots_saveable"}))
    validate_sd3_config(_config(**{"model.remat_policy": "dots_saveable", "model.remat": True}))
    with pytest.raises(ConfigError, match="cudnn"):
        validate_sd3_config(_config(**{"model.attention_impl": "cudnn"}))  # the cpu variant computes in float32


def test_prompt_files_and_held_out_eval_prompts(tmp_path):
    (tmp_path / "train.txt").write_text("a red cube\n\n  a blue ball  \na cat\n")
    (tmp_path / "eval.txt").write_text("a green apple\na black backpack\n")
    config = _config(**{"data.prompts_file": str(tmp_path / "train.txt"),
                        "eval.prompts_file": str(tmp_path / "eval.txt")})
    validate_sd3_config(config)
    assert sd3_prompt_sets(config) == (("a red cube", "a blue ball", "a cat"), ("a green apple", "a black backpack"))
    # an eval prompt that is also a training prompt is not held out
    (tmp_path / "eval.txt").write_text("a green apple\na cat\n")
    with pytest.raises(ConfigError, match="also training prompts") as err:
        validate_sd3_config(config)
    assert err.value.key == "eval.prompts_file"
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(ConfigError, match="line 3 repeats the prompt of line 1"):
        read_prompts_file(str(tmp_path / "dup.txt"), "data.prompts_file")
    with pytest.raises(ConfigError, match="is not a file"):
        validate_sd3_config(_config(**{"data.prompts_file": str(tmp_path / "missing.txt")}))
    with pytest.raises(ConfigError, match="not both"):
        validate_sd3_config(_config(**{"eval.prompts": ("x",), "eval.prompts_file": str(tmp_path / "eval.txt")}))
    config = _config(**{"eval.prompts": ("a red cube", "x")})  # a training prompt of the cpu variant
    with pytest.raises(ConfigError, match=r"eval\.prompts"):
        validate_sd3_config(config)



def test_eval_only_scorer_is_not_the_training_one(tmp_path):
    """Issue 28 item 6: an eval.clip_paths scorer is never trained on; reward.clip_path itself (any spelling of
    the path) would only repeat the training reward, so it is refused naming the key."""
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip_b").mkdir()
    config = _config(**{"reward.clip_path": str(tmp_path / "clip"), "eval.clip_paths": (str(tmp_path / "clip_b"),)})
    validate_sd3_config(config)
    config.eval.clip_paths = (str(tmp_path / "clip_b"), str(tmp_path / "clip_b" / ".." / "clip") + "/")
    with pytest.raises(ConfigError, match="is reward.clip_path, the scorer the policy is trained on") as err:
        validate_sd3_config(config)
    assert err.value.key == "eval.clip_paths"
    config.reward.kind = "image_mean"  # no CLIP in training: any CLIP is eval-only
    validate_sd3_config(config)

def test_micro_batch_layouts_name_their_keys():
    config = _config(**{"rl.rollout_micro_batch": 4, "vae.decode_batch": 2, "eval.batch_size": 4})
    layout = validate_sd3_batch_layout(config, 2, num_eval_prompts=3)  # 3 prompts x 2 = 6 eval images
    assert layout["rollout_micro_batch"] == 4 and layout["decode_batch"] == 2
    assert layout["eval_call_size"] == 4 and layout["eval_calls"] == 2  # the last call padded (masked)
    for key, value in (("rl.rollout_micro_batch", 3), ("rl.rollout_micro_batch", 1), ("vae.decode_batch", 3)):
        with pytest.raises(ConfigError) as err:
            validate_sd3_batch_layout(_config(**{key: value}), 2)
        assert err.value.key == key
    with pytest.raises(ConfigError, match=r"multiple of eval\.samples_per_prompt"):
        validate_sd3_batch_layout(_config(**{"eval.batch_size": 3}), 1)


@pytest.mark.parametrize("variant", ["gpu", "tpu", "tpu_1024"])
def test_accelerator_variants_micro_batch(variant):
    """The accelerator variants bound every program by a micro-batch (issue 24: the whole batch in one program
    did not fit) and set gradient accumulation."""
    config = _config(variant)
    devices = 1 if variant == "gpu" else 8
    layout = validate_sd3_batch_layout(config, devices)
    per_device = {k: layout[k] // devices for k in ("micro_batch_size", "rollout_micro_batch", "decode_batch")}
    assert config.optim.grad_accum_steps > 1 and config.eval.batch_size > 0
    assert max(per_device.values()) <= (4 if variant == "gpu" else 1), per_device
    assert config.data.height == {"gpu": 0, "tpu": 512, "tpu_1024": 1024}[variant]


# ---- training times, ORW weights --------------------------------------------------------------------------------


def test_training_times_are_shifted_like_the_sampler():
    """Issue 28 item 2: rl.time_shift (0 = sampling.time_shift, 3) shifts sigma = 1 - t of the logit-normal draw:
    median sigma 0.75 and 39 % above 0.8 (diffusers' SD3 fine-tuning), not 0.50 / 8 %."""
    config = _config()
    opts = FlowStepOptions.from_config(config, num_conditions=4, null_class=4, image_shape=(8, 8, 4))
    assert opts.train_time_shift == 3.0
    draw = jax.jit(lambda o, k: draw_path_inputs(o, k, jnp.zeros((100_000, 1, 1, 1)))[0], static_argnums=0)
    sigma = 1.0 - np.asarray(draw(opts, jax.random.key(0)))
    assert abs(np.median(sigma) - 0.75) < 0.01 and abs(np.mean(sigma > 0.8) - 0.39) < 0.02
    config.rl.time_shift = 1.0  # explicitly unshifted
    opts = FlowStepOptions.from_config(config, num_conditions=4, null_class=4, image_shape=(8, 8, 4))
    assert abs(np.median(1.0 - np.asarray(draw(opts, jax.random.key(0)))) - 0.5) < 0.01


def test_orw_weights_on_a_clip_score_keep_the_w2_term():
    """Issue 28 item 3: with rewards 100 * cos (cos ~ 0.31 +- 0.02) the raw exp(0.5 r) weights were ~1e7 (the W2
    term ~1e-7 of the loss); the SD3 default (standardized exponent) keeps them O(1), and the raw form is refused
    where it would drown the W2 term."""
    config = _config(**{"rl.method": "orw_cfm_w2"})
    validate_sd3_config(config)
    assert config.rl.orw_reward_scaling == "standardize"
    opts = FlowStepOptions.from_config(config, num_conditions=2, null_class=2, image_shape=(2, 2, 1))
    r = 100.0 * (0.31 + 0.02 * np.random.default_rng(0).normal(size=8)).astype(np.float32)
    cond = np.repeat(np.arange(2), 4)
    prep = jax.jit(lambda o, r_: prepare_batch(o, jnp.zeros((8, 2, 2, 1)), cond, r_).metrics, static_argnums=0)
    m = prep(opts, r)
    assert float(m["orw_weight_min"]) > 0.1 and float(m["orw_weight_max"]) < 10.0
    raw = prep(FlowStepOptions(num_conditions=2, null_class=2, image_shape=(2, 2, 1), method="orw_cfm_w2",
                               orw_reward_scaling="raw"), r)
    assert float(raw["orw_weight_mean"]) > 1e5  # the published form at this scale
    with pytest.raises(ConfigError, match="drown the fixed W2 term") as err:
        validate_sd3_config(_config(**{"rl.method": "orw_cfm_w2", "rl.orw_reward_scaling": "raw"}))
    assert err.value.key == "rl.orw_reward_scaling"
    validate_sd3_config(_config(**{"rl.method": "orw_cfm_w2", "rl.orw_reward_scaling": "raw", "rl.tau": 0.1}))
    with pytest.raises(ConfigError, match="overflow"):
        validate_sd3_config(_config(**{"rl.method": "orw_cfm_w2", "rl.orw_reward_scaling": "center", "rl.tau": 1.0}))
    # standardize: over n samples |z| <= sqrt(n - 1) (one outlier reaches it), so tau * sqrt(n - 1) > 88 overflows
    config = _config(**{"rl.method": "orw_cfm_w2", "rl.tau": 34.0})
    n = config.rl.prompts_per_step * config.rl.samples_per_prompt
    assert n == 8 and 34.0 * np.sqrt(n - 1) > 88.8 > 33.0 * np.sqrt(n - 1)  # the cpu variant's 2 x 4
    outlier = np.zeros(n, np.float32)
    outlier[0] = 50.0
    opts = FlowStepOptions(num_conditions=2, null_class=2, image_shape=(2, 2, 1), method="orw_cfm_w2",
                           orw_reward_scaling="standardize")
    z = np.asarray(orw_exponent_rewards(opts, jnp.asarray(outlier), jnp.ones(n, bool)))
    assert abs(z.max() - np.sqrt(n - 1)) < 1e-3  # the bound is reached
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(np.float32(34.0) * z.max())) and np.isfinite(np.exp(np.float32(33.0) * z.max()))
    with pytest.raises(ConfigError, match="float32 exp overflow") as err:
        validate_sd3_config(config)
    assert err.value.key == "rl.tau"
    config.rl.tau = 33.0
    validate_sd3_config(config)
    validate_sd3_config(_config(**{"rl.method": "orw_cfm_w2", "rl.tau": 34.0, "rl.orw_max_exponent": 80.0}))


# ---- micro-batching -------------------------------------------------------------------------------------------


def _tiny_velocity(**cfg):
    rng = np.random.default_rng(0)
    model = MMDiTVelocity(mmdit.MMDiT(mmdit.tiny_config(**cfg), rngs=nnx.Rngs(0)),
                          rng.normal(size=(3, 7, 12)).astype(np.float32), rng.normal(size=(3, 10)).astype(np.float32),
                          null_id=2)
    return nnx.split(model, nnx.Param, ...)


@pytest.mark.slow  # 4-8 s (compiles the sampler twice); the default suite checks the striding below
def test_rollout_micro_batches_equal_the_whole_batch():
    """rl.rollout_micro_batch: the same samples (ODE) m images at a time; also with remat + scanned blocks, whose
    nnx.remat inside the sampler's scan needs the model merged in that trace."""
    graphdef, params, frozen = _tiny_velocity(remat=True, scan_layers=True, num_layers=2)
    cond = jnp.array([0, 1, 0, 1, 1, 0, 1, 0])
    out = {}
    for m in (0, 2):
        opts = FlowStepOptions(num_conditions=2, null_class=2, image_shape=(8, 8, 4), sampling_method="euler",
                               sampling_steps=2, cfg_scale=2.0, time_shift=3.0, rollout_micro_batch=m)
        rollout = make_rollout_fn(graphdef, lambda x, c: jnp.mean(x, axis=(1, 2, 3)), opts, None)
        out[m] = jax.jit(rollout)(params, frozen, cond, jax.random.key(3))
    np.testing.assert_allclose(out[2][0], out[0][0], rtol=1e-5, atol=1e-5)  # another compiled program: rounding
    np.testing.assert_allclose(out[2][1]["reward"], out[0][1]["reward"], rtol=1e-5, atol=1e-6)


def test_map_micro_batches_is_strided_and_inverts():
    x = jnp.arange(12.0).reshape(12, 1)
    seen = []
    out = map_micro_batches(lambda a: (jax.debug.callback(lambda v: seen.append(np.asarray(v).ravel()), a), a * 2)[1],
                            3, x)
    np.testing.assert_array_equal(out, x * 2)
    assert [s.tolist() for s in seen] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


class _EchoVAE(nnx.Module):
    """A stand-in VAE: ``decode`` records the chunk's rows (their first latent value) and doubles them."""

    def __init__(self, seen):
        self.seen = seen

    def unscale_latents(self, z):
        return z

    def decode(self, z):
        jax.debug.callback(lambda v: self.seen.append(np.asarray(v).tolist()), z[:, 0, 0, 0])
        return z * 2


def test_vae_decode_chunks_are_strided_and_invert():
    """vae.decode_batch through make_decode_fn (cheap: a stand-in VAE): chunk j holds rows j, j + n, ... and
    the output rows are back in order; a chunk that does not divide the batch runs contiguous chunks."""
    seen = []
    graphdef, state = nnx.split(_EchoVAE(seen))
    z = jnp.arange(6.0).reshape(6, 1, 1, 1) * jnp.ones((6, 2, 2, 1))
    out = vae_lib.make_decode_fn(graphdef, scaled=True, batch_chunk=2)(state, z)
    np.testing.assert_array_equal(out, z * 2)
    assert seen == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]], seen
    seen.clear()
    out = vae_lib.make_decode_fn(graphdef, batch_chunk=4)(state, z)
    np.testing.assert_array_equal(out, z * 2)
    assert sorted(v for chunk in seen for v in chunk) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.slow  # 4-6 s (compiles the tiny VAE decode twice); the default suite checks the chunking above
def test_vae_decode_chunks_are_strided_and_exact():
    vae = vae_lib.AutoencoderKL(vae_lib.tiny_config(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(vae)
    z = jax.random.normal(jax.random.key(0), (6, 4, 4, 4))
    whole, chunked = jax.jit(lambda s_, z_: (vae_lib.make_decode_fn(graphdef, scaled=True)(s_, z_),
                                             vae_lib.make_decode_fn(graphdef, scaled=True, batch_chunk=2)(s_, z_)))(
        state, z)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_rollout_memory_follows_the_micro_batch():
    """Issue 24: the rollout's temporaries follow rl.rollout_micro_batch, not the batch (XLA CPU buffer assignment
    of the sampler on 8 devices, data parallel: 4 images per device in one program vs 1 per micro-batch)."""
    assert jax.device_count() == 8
    graphdef, params, frozen = _tiny_velocity(sample_size=16, pos_embed_max_size=8, attention_head_dim=16,
                                              num_attention_heads=4, caption_projection_dim=64)
    mesh = train.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    repl = train.replicated_sharding(mesh)
    p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), (params, frozen))
    cond = jax.ShapeDtypeStruct((32,), jnp.int32, sharding=train.batch_sharding(mesh))
    temp = {}
    for m in (0, 8):
        opts = FlowStepOptions(num_conditions=2, null_class=2, image_shape=(16, 16, 4), sampling_method="euler",
                               sampling_steps=2, cfg_scale=2.0, rollout_micro_batch=m)
        rollout = make_rollout_fn(graphdef, lambda x, c: jnp.mean(x, axis=(1, 2, 3)), opts, mesh)
        compiled = jax.jit(rollout).lower(*p, cond, jax.random.key(0)).compile()
        temp[m] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[8] < 0.5 * temp[0], temp


# ---- the recipe end to end (slow) -------------------------------------------------------------------------------


@pytest.mark.slow
def test_recipe_refreshes_prompt_files_eval_metrics_and_export(tmp_path):
    """In process on the tiny models: rl.ref_refresh_steps / rl.sampler_refresh_steps take effect (issue 28 item
    1: ref_refreshed was 0 at every step), prompts from files with a held-out eval set (item 5: their own rows of
    the table, stored in the compute dtype), the paper's eval metrics (item 6: ClipDiversity, W2 at the training
    times, an eval-only CLIP scorer), a non-square resolution, and the export (merged in bfloat16 + the diffusers
    LoRA file)."""
    from adrpo_jax.flow.sd3_tiny import build_tiny_sd3
    from adrpo_jax.flow.sd3_trainer import SD3Trainer
    (tmp_path / "train.txt").write_text("a red cube\na cat on a sofa\n")
    (tmp_path / "eval.txt").write_text("a yellow bird\na snowy mountain\na blue car\n")
    tiny = build_tiny_sd3()
    config = _config(**{"data.prompts_file": str(tmp_path / "train.txt"),
                        "eval.prompts_file": str(tmp_path / "eval.txt"), "rl.ref_refresh_steps": 1,
                        "rl.sampler_refresh_steps": 2, "rl.rollout_micro_batch": 4,
                        "data.height": 16, "data.width": 8, "eval.batch_size": 4, "eval.clip_paths": (tiny["clip"],),
                        "vae.decode_batch": 2, "model.save_dtype": "bfloat16"})
    config.mesh.data = 2  # 2 of the 8 test devices: micro-batches of 4 (rollout) / 2 (decode) spread over both
    trainer = SD3Trainer(config, str(tmp_path / "run"), mesh=train.make_mesh(config.mesh, devices=jax.devices()[:2]))
    assert trainer.shapes.latent_shape == (8, 4, 4) and trainer.shapes.null_id == 5
    table = trainer.frozen["embeddings"][...]
    assert table.dtype == jnp.float32 and table.shape[0] == trainer.shapes.rows  # the cpu variant computes in f32
    assert trainer.layout["eval_calls"] == 2  # 3 eval prompts x 2 = 6 images in calls of 4 (the last padded)
    state = trainer.init_state()
    refreshed = []
    for step in range(2):
        state, m = trainer.train_step(step, state)
        m = jax.device_get(m)
        refreshed.append((float(m["ref_refreshed"]), float(m["sampler_refreshed"])))
        assert np.isfinite(float(m["loss"]))
    assert refreshed == [(1.0, 0.0), (1.0, 1.0)]
    ev = trainer.evaluate(2, state)
    for key in ("eval/reward_mean", "eval/clip_diversity", "eval/latent_diversity", "eval/w2_bound",
                "eval/w2_bound_train_t", "eval/clip_score_0"):
        assert np.isfinite(ev[key]), (key, ev)
    assert ev["eval/w2_bound_train_t"] > 0 and ev["eval/clip_diversity"] > 0
    out = trainer.export(state["params"], tmp_path / "final")
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["_class_name"] == "SD3Transformer2DModel"
    from safetensors import safe_open
    with safe_open(str(next(Path(out).glob("*.safetensors"))), framework="numpy") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k != "pos_embed.pos_embed"}  # noqa: SIM118
    assert dtypes == {"BF16"}, dtypes
    lora = Path(out) / "lora" / "pytorch_lora_weights.safetensors"  # the adapters as diffusers loads them
    with safe_open(str(lora), framework="numpy") as f:
        keys = list(f.keys())
    assert any(k.endswith("attn.to_out.0.lora_A.weight") for k in keys), keys[:4]
