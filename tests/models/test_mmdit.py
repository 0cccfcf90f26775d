"""adrpo_jax.models.mmdit vs diffusers 0.42.1 ``SD3Transformer2DModel`` on tiny random models (PyTorch on the CPU,
float32, every weight perturbed so the adaLN-Zero paths are not zero): outputs within 1e-4 on non-square
latents at diffusers-scale timesteps (SD3; SD3.5 with qk rms-norm and dual attention), the scan and list
layouts equal, the sharded-index load, save -> diffusers load round trip, LoRA with B = 0, clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models import mmdit
from adrpo_jax.models.lora import LoRAConfig, apply_lora, lora_sites, merge_lora

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=8, patch_size=2, in_channels=4, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=6)
VARIANTS = {
    "sd3": dict(num_layers=3),
    # SD3.5-shaped: stacks [0, 1] (dual) and [2] (plain), a dual context_pre_only last block
    "sd35": dict(num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1, 3)),
}
B, H, W, L = 2, 8, 6, 5  # H != W (a 4 x 3 patch grid, center-cropped from the 6 x 6 table)


def _torch_model(seed: int, **kw):
  torch.manual_seed(seed)
  model = diffusers.SD3Transformer2DModel(**TINY, **kw)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    model.pos_embed.pos_embed.add_(0.01 * torch.randn_like(model.pos_embed.pos_embed))  # loaded, not recomputed
  return model.eval()


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((B, H, W, 4)).astype(np.float32)
  timestep = np.array([3.0, 750.5], np.float32)
  states = rng.standard_normal((B, L, 12)).astype(np.float32)
  pooled = rng.standard_normal((B, 10)).astype(np.float32)
  return latents, timestep, states, pooled


def _torch_out(model, latents, timestep, states, pooled) -> np.ndarray:
  with torch.no_grad():
    out = model(hidden_states=torch.tensor(latents.transpose(0, 3, 1, 2)), encoder_hidden_states=torch.tensor(states),
                pooled_projections=torch.tensor(pooled), timestep=torch.tensor(timestep)).sample
  return out.numpy().transpose(0, 2, 3, 1)


@jax.jit
def _apply(model, latents, timestep, states, pooled):
  return model(latents, timestep, states, pooled)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{variant: (directory, torch model, reference output)}; sd35 also saved sharded."""
  out = {}
  for i, (name, kw) in enumerate(VARIANTS.items()):
    model = _torch_model(i, **kw)
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    out[name] = (d, model, _torch_out(model, *_inputs()))
  model, d = out["sd35"][1], tmp_path_factory.mktemp("sd35_sharded")
  model.save_pretrained(d, max_shard_size="8KB")
  out["sd35_sharded"] = (d, model, out["sd35"][2])
  return out


@pytest.fixture(scope="module")
def loaded(saved):
  """sd3 in the list layout, sd35 in the (default) scan layout: the default suite runs both against diffusers
  with one compilation each (test_list_layout_is_equal, slow, runs sd35 in the list layout too)."""
  return {"sd3": mmdit.load_pretrained(saved["sd3"][0], scan_layers=False),
          "sd35": mmdit.load_pretrained(saved["sd35"][0])}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_diffusers(saved, loaded, name):
  model = loaded[name]
  assert model.config.scan_layers == (name == "sd35")
  out = np.asarray(_apply(model, *_inputs()))
  ref = saved[name][2]
  assert out.shape == ref.shape == (B, H, W, 4)
  assert np.abs(ref).max() > 0.5  # not a degenerate (zero-gated) output
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_scan_layout_structure(loaded):
  model = loaded["sd35"]
  assert [len(s) for s in model.block_stacks] == [2, 1]
  assert model.config.block_runs() == [(0, 2, True), (2, 1, False)]
  assert model.last_block.use_dual_attention and model.last_block.context_pre_only
  assert model.block_stacks[0].ff.fc1.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  assert model.block_stacks[0].attn.to_q.kernel.shape == (2, 16, 16)
  assert model.pos_table.get_metadata()["out_sharding"] == (None, "embed")
  for layout in (model, nnx.eval_shape(lambda: mmdit.MMDiT(model.config.replace(scan_layers=False), rngs=nnx.Rngs(0)))):
    for path, var in nnx.to_flat_state(nnx.state(layout)):  # every variable has one logical name per axis
      assert len(var.get_metadata().get("out_sharding") or ()) == len(var.shape), path


@pytest.mark.slow
def test_list_layout_is_equal(saved, loaded):
  model = loaded["sd35"]
  listed = mmdit.load_pretrained(saved["sd35"][0], scan_layers=False)
  assert len(listed.transformer_blocks) == 4
  for a, b in zip(model.blocks(), listed.blocks()):  # the same weights block by block
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(a, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(b, nnx.Param)))
  np.testing.assert_allclose(np.asarray(_apply(listed, *_inputs())), saved["sd35"][2], atol=1e-4, rtol=0)


def test_sharded_index_loads_the_same(saved, loaded):
  d = saved["sd35_sharded"][0]
  assert (d / mmdit.WEIGHTS_INDEX_NAME).exists() and not (d / mmdit.WEIGHTS_NAME).exists()
  model = mmdit.load_pretrained(d)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)),
               nnx.to_pure_dict(nnx.state(loaded["sd35"])))


@pytest.mark.parametrize("shard", [False, True])
def test_save_then_diffusers_loads_it(saved, loaded, tmp_path, shard):
  ref_model = saved["sd35"][1]
  mmdit.save_pretrained(loaded["sd35"], tmp_path, max_shard_size="8KB" if shard else "10GB")
  assert (tmp_path / (mmdit.WEIGHTS_INDEX_NAME if shard else mmdit.WEIGHTS_NAME)).exists()
  back = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path)
  norm = lambda c: {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in dict(c).items()  # noqa: E731
                    if not k.startswith("_")}
  assert norm(back.config) == norm(ref_model.config)
  ref_sd, back_sd = ref_model.state_dict(), back.state_dict()
  assert set(ref_sd) == set(back_sd)
  for k, v in ref_sd.items():
    np.testing.assert_array_equal(back_sd[k].numpy(), v.numpy(), err_msg=k)
  # and ours reads its own output back
  again = mmdit.load_pretrained(tmp_path, scan_layers=False)
  assert again.config.dual_attention_layers == (0, 1, 3) and again.config.qk_norm == "rms_norm"


def test_lora_sites(loaded):
  """The LoRA sites of the stacked runs (one adapter per block of a run) and of the last block (no to_add_out /
  ff_context there); cheap: no adapters drawn, no forward pass (test_lora_zero_b_is_identity, slow, does both)."""
  sites = {s.path: s.layers for s in lora_sites(loaded["sd35"])}
  assert {k: v for k, v in sites.items() if k.endswith(".to_q")} == {
      "block_stacks.0.attn.to_q": 2, "block_stacks.0.attn2.to_q": 2, "block_stacks.1.attn.to_q": 1,
      "last_block.attn.to_q": None, "last_block.attn2.to_q": None}
  paths = set(sites)
  assert {"block_stacks.1.ff_context.fc2", "block_stacks.0.attn.to_add_out", "last_block.ff.fc1",
          "context_embedder", "norm_out.linear"} <= paths
  assert "last_block.attn.to_add_out" not in paths and "last_block.ff_context.fc1" not in paths


@pytest.mark.slow
def test_lora_zero_b_is_identity(loaded):
  model = nnx.clone(loaded["sd35"])
  base = np.asarray(_apply(model, *_inputs()))
  targets = ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "fc1", "fc2")
  apply_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=targets), rngs=nnx.Rngs(1))
  np.testing.assert_allclose(np.asarray(_apply(model, *_inputs())), base, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_lora_merge_and_save(loaded, saved, tmp_path):
  """A non-zero B changes the output; merge_lora folds it into plain weights (same output), which
  save_pretrained writes and diffusers runs to the same output; unmerged adapters are refused."""
  model = nnx.clone(loaded["sd35"])
  base = np.asarray(_apply(model, *_inputs()))
  apply_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules="all-linear"), rngs=nnx.Rngs(1))
  for s in lora_sites(model):
    if s.adapted:
      s.adapter.lora_b[...] = 0.05 * jnp.ones_like(s.adapter.lora_b[...])
  out = np.asarray(_apply(model, *_inputs()))
  assert np.abs(out - base).max() > 1e-3
  merged = merge_lora(model)
  np.testing.assert_allclose(np.asarray(_apply(merged, *_inputs())), out, atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="merge_lora"):
    mmdit.save_pretrained(model, tmp_path)
  mmdit.save_pretrained(merged, tmp_path)
  back = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path)
  np.testing.assert_allclose(_torch_out(back, *_inputs()), out, atol=1e-4, rtol=0)


def test_config_round_trip_and_validation():
  cfg = mmdit.tiny_config(qk_norm="rms_norm", dual_attention_layers=[1, 0])
  assert cfg.dual_attention_layers == (0, 1)
  d = cfg.to_diffusers_config()
  assert d["_class_name"] == "SD3Transformer2DModel" and d["dual_attention_layers"] == [0, 1]
  assert mmdit.MMDiTConfig.from_diffusers_config(d) == cfg
  assert mmdit.MMDiTConfig.from_diffusers_config(d, dtype=jnp.bfloat16).dtype == "bfloat16"
  with pytest.raises(ValueError, match="caption_projection_dim"):
    mmdit.tiny_config(caption_projection_dim=20)
  with pytest.raises(ValueError, match="qk_norm"):
    mmdit.tiny_config(qk_norm="layer_norm")
  with pytest.raises(ValueError, match="dual_attention_layers"):
    mmdit.tiny_config(dual_attention_layers=(3,))
  with pytest.raises(ValueError, match="remat_policy"):
    mmdit.tiny_config(remat_policy="no_such_policy")
  with pytest.raises(ValueError, match="dtype"):
    mmdit.tiny_config(dtype="int8")
  with pytest.raises(ValueError, match="attention_impl"):
    mmdit.tiny_config(attention_impl="cudnn")  # float32
  with pytest.raises(ValueError, match="num_layers"):
    mmdit.tiny_config(num_layers=0)
  with pytest.raises(ValueError, match="unknown MMDiTConfig fields"):
    mmdit.MMDiTConfig.from_diffusers_config(d, scan=True)


def test_missing_files_and_tensors_are_clear(saved, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    mmdit.load_pretrained(tmp_path / "nowhere")
  src = saved["sd3"][0]
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copy(src / "config.json", no_weights / "config.json")
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    mmdit.load_pretrained(no_weights)
  # a config that does not match the weights: names the tensor and both shapes
  bad = tmp_path / "bad"
  shutil.copytree(src, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["pooled_projection_dim"] = 11
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(mmdit.CheckpointError, match=r"text_embedder.linear_1.weight.*\(16, 10\).*\(16, 11\)"):
    mmdit.load_pretrained(bad)
  cfg["pooled_projection_dim"], cfg["qk_norm"] = 10, "rms_norm"  # SD3.5 config on SD3 weights: missing tensors
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(mmdit.CheckpointError, match=r"norm_\w+\.weight.*not found"):
    mmdit.load_pretrained(bad)


def test_bad_inputs_are_clear(loaded):
  model = loaded["sd3"]
  latents, timestep, states, pooled = _inputs()
  with pytest.raises(ValueError, match="pos_embed_max_size"):
    model(np.zeros((1, 14, 4, 4), np.float32), timestep[:1], states[:1], pooled[:1])
  with pytest.raises(ValueError, match="divisible by patch_size"):
    model(np.zeros((1, 7, 4, 4), np.float32), timestep[:1], states[:1], pooled[:1])
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    model(latents, timestep, states[..., :5], pooled)
  with pytest.raises(ValueError, match="timestep"):
    model(latents, timestep[:1], states, pooled)


@pytest.mark.slow
def test_remat_gradients_equal():
  """remat (with a named policy) changes memory, not gradients (scan layout: one stack of 2 + the last block)."""
  args = _inputs()

  def grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def g(params, rest):
      return jax.grad(lambda p: jnp.sum(jnp.square(nnx.merge(graphdef, p, rest)(*args))))(params)

    return nnx.to_pure_dict(g(params, rest))

  base = mmdit.MMDiT(mmdit.tiny_config(num_layers=3, qk_norm="rms_norm"), rngs=nnx.Rngs(0))
  ref = grads(base)
  for overrides in (dict(remat=True, remat_policy="dots_with_no_batch_dims_saveable"),):
    model = nnx.merge(*nnx.split(base))  # same weights, other config
    model.config = base.config.replace(**overrides)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grads(model), ref)


@pytest.mark.slow
def test_load_onto_a_mesh(saved, loaded):
  from adrpo_jax.train.sharding import make_mesh
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = mmdit.load_pretrained(saved["sd35"][0], mesh=mesh)
  spec = model.block_stacks[0].attn.to_q.kernel[...].sharding.spec
  assert tuple(spec) == (None, "fsdp", "tensor")
  np.testing.assert_allclose(np.asarray(_apply(model, *_inputs())), saved["sd35"][2], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_no_pos_embed_max_size_and_bf16(tmp_path):
  """pos_embed_max_size=None (diffusers' uncropped table, recomputed for the grid) matches too; bfloat16
  compute stays close to float32."""
  torch.manual_seed(5)
  kw = dict(TINY, pos_embed_max_size=None, num_layers=2)
  model = diffusers.SD3Transformer2DModel(**kw)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(tmp_path)
  ref = _torch_out(model, *_inputs())
  ours = mmdit.load_pretrained(tmp_path)
  assert ours.pos_table is None
  np.testing.assert_allclose(np.asarray(_apply(ours, *_inputs())), ref, atol=1e-4, rtol=0)
  bf16 = mmdit.load_pretrained(tmp_path, dtype="bfloat16", param_dtype=jnp.bfloat16)
  assert bf16.patch_proj.kernel[...].dtype == jnp.bfloat16
  out = np.asarray(_apply(bf16, *_inputs()))
  assert out.dtype == np.float32
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("preset", [pytest.param("sd3-medium", marks=pytest.mark.slow), "sd3.5-medium",
                                    pytest.param("sd3.5-large", marks=pytest.mark.slow)])
def test_released_shapes_match_diffusers(preset):
  """For SD3-medium / SD3.5-medium / SD3.5-large shapes (no weights: diffusers on the meta device, ours abstract),
  the checkpoint names and shapes we read / write are exactly diffusers' state dict, and the parameter counts
  agree (SD3-medium: 2.03B)."""
  cfg = mmdit.preset_config(preset)
  with torch.device("meta"):
    ref = diffusers.SD3Transformer2DModel(**mmdit.PRESETS[preset])
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  ours = {m.name: m.shape for m in mmdit.param_mappings(cfg)}
  assert ours == ref_shapes
  model = nnx.eval_shape(lambda: mmdit.MMDiT(cfg, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert n == sum(p.numel() for p in ref.parameters())
  if preset == "sd3-medium":
    assert round(n / 1e9, 2) == 2.03


def test_bfloat16_checkpoint_loads_as_float32(saved, loaded, tmp_path):
  """A bf16 diffusers save (how SD3.5 ships) loads into float32 parameters: the float32 weights rounded to bf16."""
  import ml_dtypes
  model = _torch_model(1, **VARIANTS["sd35"]).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  ours = mmdit.load_pretrained(tmp_path, param_dtype="float32")
  assert ours.block_stacks[0].attn.to_q.kernel[...].dtype == jnp.float32
  rounded = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32),
                         nnx.to_pure_dict(nnx.state(loaded["sd35"])))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(ours)), rounded)
