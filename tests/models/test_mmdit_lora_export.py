"""Issue 28 item 4: the SD3 LoRA adapters exported in the peft / diffusers format load into a tiny diffusers
SD3Transformer2DModel built here and give our LoRA model's output; item 7's dead adapter: the last block's
unused text-query projection is no LoRA site."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models import mmdit
from adrpo_jax.models.lora import LoRAConfig, apply_lora, lora_sites, merge_lora

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = dict(sample_size=8, patch_size=2, in_channels=4, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=6, num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0, 2))
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "ff.fc1", "ff.fc2", "ff_context.fc1")


def _inputs():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((2, 8, 6, 4)).astype(np.float32), np.array([3.0, 750.5], np.float32),
          rng.standard_normal((2, 5, 12)).astype(np.float32), rng.standard_normal((2, 10)).astype(np.float32))


def _torch_out(model, latents, timestep, states, pooled):
  with torch.no_grad():
    out = model(hidden_states=torch.tensor(latents.transpose(0, 3, 1, 2)), encoder_hidden_states=torch.tensor(states),
                pooled_projections=torch.tensor(pooled), timestep=torch.tensor(timestep)).sample
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
  torch.manual_seed(0)
  base = diffusers.SD3Transformer2DModel(**TINY)
  with torch.no_grad():
    for p in base.parameters():
      p.add_(0.1 * torch.randn_like(p))
  d = tmp_path_factory.mktemp("sd3")
  base.save_pretrained(d)
  model = mmdit.load_pretrained(d)
  apply_lora(model, LoRAConfig(rank=2, alpha=3.0, target_modules=TARGETS), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  for s in lora_sites(model):
    if s.adapted:  # non-zero B, different in every block of a stack
      s.adapter.lora_b[...] = jnp.asarray(0.2 * rng.standard_normal(s.adapter.lora_b.shape), jnp.float32)
  return d, model


@pytest.fixture(scope="module")
def lora_out(lora_model):
  """Our LoRA model's output (a compilation of the forward: the slow tests only)."""
  return np.asarray(jax.jit(lambda m, *a: m(*a))(lora_model[1], *_inputs()))


def test_dead_adapter_is_not_a_site(lora_model):
  _, model = lora_model
  adapted = {s.path for s in lora_sites(model) if s.adapted}
  assert "last_block.attn.add_q_proj" not in {s.path for s in lora_sites(model)}
  assert {"last_block.attn.add_k_proj", "block_stacks.0.attn.add_q_proj", "last_block.attn2.to_q"} <= adapted


def test_export_names_shapes_and_alpha(lora_model, tmp_path):
  _, model = lora_model
  tensors, config = mmdit.diffusers_lora_state_dict(model)
  assert tensors["transformer.transformer_blocks.1.attn.to_out.0.lora_A.weight"].shape == (2, 16)  # [r, in]
  assert tensors["transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight"].shape == (64, 2)  # [out, r]
  assert "transformer.transformer_blocks.2.ff.net.2.lora_A.weight" in tensors
  assert not any("transformer_blocks.2.attn.add_q_proj" in k for k in tensors)
  assert config["r"] == 2 and config["lora_alpha"] == pytest.approx(3.0) and not config["rank_pattern"]
  mmdit.save_diffusers_lora(model, tmp_path)
  from safetensors import safe_open
  with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "np") as f:
    meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert set(f.keys()) == set(tensors)
  assert meta["transformer.lora_alpha"] == pytest.approx(3.0) and meta["transformer.r"] == 2


@pytest.mark.slow
def test_merged_into_diffusers_weights_gives_our_output(lora_model, lora_out, tmp_path):
  """peft's rule W + (lora_alpha / r) B A applied by hand to the diffusers state dict (no peft needed)."""
  (d, model), out = lora_model, lora_out
  np.testing.assert_allclose(np.asarray(jax.jit(lambda m, *a: m(*a))(merge_lora(model), *_inputs())), out,
                             atol=1e-4, rtol=0)
  mmdit.save_diffusers_lora(model, tmp_path)
  from safetensors import safe_open
  with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
    meta = json.loads(f.metadata()["lora_adapter_metadata"])
    lora = {k: f.get_tensor(k) for k in f.keys()}
  scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
  target = diffusers.SD3Transformer2DModel.from_pretrained(d)
  sd = target.state_dict()
  for key in lora:
    if key.endswith("lora_A.weight"):
      module = key[len("transformer."):-len(".lora_A.weight")]
      sd[module + ".weight"] += scale * lora[key.replace("lora_A", "lora_B")] @ lora[key]
  target.load_state_dict(sd)
  np.testing.assert_allclose(_torch_out(target, *_inputs()), out, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_diffusers_load_lora_adapter_gives_our_output(lora_model, lora_out, tmp_path):
  pytest.importorskip("peft")
  (d, model), out = lora_model, lora_out
  mmdit.save_diffusers_lora(model, tmp_path)
  target = diffusers.SD3Transformer2DModel.from_pretrained(d)
  base = _torch_out(target, *_inputs())
  target.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
  np.testing.assert_allclose(_torch_out(target, *_inputs()), out, atol=1e-4, rtol=0)
  assert np.abs(base - out).max() > 1e-2  # the adapters matter
  # What the README tells users: the directory alone into a pipeline's load_lora_weights (the weight file's
  # name guessed, the transformer. prefix routed to the MMDiT); a pipeline without text encoders / VAE suffices.
  pipe = diffusers.StableDiffusion3Pipeline(
      transformer=diffusers.SD3Transformer2DModel.from_pretrained(d),
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
      text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
  pipe.load_lora_weights(str(tmp_path))
  np.testing.assert_allclose(_torch_out(pipe.transformer, *_inputs()), out, atol=1e-4, rtol=0)
