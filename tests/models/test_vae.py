"""adrpo_jax.models.vae vs diffusers 0.42.1 ``AutoencoderKL`` (PyTorch, CPU, float32) on tiny random configs with
perturbed weights: decode / encode parity on non-square shapes, save -> diffusers load round trip, sharded and
old-name checkpoints, jit / remat, config and file errors."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from adrpo_jax.models import vae as V  # noqa: E402

TOL = 1e-4
SD3_LIKE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False)


def _torch_vae(seed, **kw):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**kw).eval()
  with torch.no_grad():  # nothing stays at its init value (GroupNorm 1 / 0, biases): every path is exercised
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("vae")
  ref = _torch_vae(0, **SD3_LIKE)
  ref.save_pretrained(root / "vae")
  ours = V.load_pretrained(root / "vae")
  return ref, ours, root


@pytest.fixture(scope="module")
def jitted(tiny):
  _, ours, _ = tiny
  graphdef, state = nnx.split(ours)

  def moments(state, x):
    return nnx.merge(graphdef, state).encode_moments(x)

  return state, jax.jit(V.make_decode_fn(graphdef)), jax.jit(moments)


Z = np.random.default_rng(0).normal(size=(2, 5, 7, 16)).astype(np.float32)  # non-square latents
X = np.random.default_rng(1).uniform(-1, 1, size=(2, 9, 7, 3)).astype(np.float32)  # odd: asymmetric-pad path


def test_config_read(tiny):
  _, ours, _ = tiny
  c = ours.config
  assert c.latent_channels == 16 and c.block_out_channels == (32, 64) and c.norm_num_groups == 8
  assert not c.use_quant_conv and ours.quant_conv is None and ours.post_quant_conv is None
  assert c.scaling_factor == 1.5305 and c.shift_factor == 0.0609 and c.downsample_factor == 2


def test_decode_matches_diffusers(tiny, jitted):
  ref, ours, _ = tiny
  state, decode, _ = jitted
  with torch.no_grad():
    want = _nhwc(ref.decode(_nchw(Z)).sample)
  got = np.asarray(decode(state, Z))
  assert got.shape == (2, 10, 14, 3) and got.dtype == np.float32
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_encode_matches_diffusers(tiny, jitted):
  ref, ours, _ = tiny
  state, _, encode = jitted
  with torch.no_grad():
    dist = ref.encode(_nchw(X)).latent_dist
  mean, logvar = map(np.asarray, encode(state, X))
  assert mean.shape == logvar.shape == (2, 4, 3, 16)  # 9 x 7 -> 4 x 3 as in torch
  np.testing.assert_allclose(mean, _nhwc(dist.mean), atol=TOL, rtol=0)
  np.testing.assert_allclose(logvar, _nhwc(dist.logvar), atol=TOL, rtol=0)


def test_latent_scaling_is_the_pipeline_convention(tiny):
  _, ours, _ = tiny
  z = np.random.default_rng(3).normal(size=(1, 2, 3, 16)).astype(np.float32)
  # StableDiffusion3Pipeline: latents = (z - shift) * scaling; decode(latents / scaling + shift)
  np.testing.assert_allclose(np.asarray(ours.scale_latents(z)), (z - 0.0609) * 1.5305, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ours.unscale_latents(ours.scale_latents(z))), z, atol=1e-6)


def test_save_then_diffusers_load(tiny, jitted, tmp_path):
  ref, ours, _ = tiny
  state, decode, _ = jitted
  V.save_pretrained(ours, tmp_path / "out")
  back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
  assert back.config.latent_channels == 16 and back.config.shift_factor == 0.0609
  for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), back.state_dict().items()):
    assert n1 == n2
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)
  # sharded: diffusers and ours read the index
  V.save_pretrained(ours, tmp_path / "sharded", max_shard_size=200_000)
  assert (tmp_path / "sharded" / V.WEIGHTS_INDEX_NAME).exists()
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
  back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "sharded").eval()
  for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), back.state_dict().items()):
    assert n1 == n2
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)
  again = V.load_pretrained(tmp_path / "sharded")
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(again)), nnx.to_pure_dict(state))


@pytest.mark.slow
def test_quant_convs_no_attention_deeper(tmp_path):
  """use_quant_conv / use_post_quant_conv, mid_block_add_attention=False, 3 levels, 2 layers per block."""
  kw = dict(SD3_LIKE, block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, latent_channels=4, norm_num_groups=4,
            use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False, shift_factor=None)
  ref = _torch_vae(1, **kw)
  ref.save_pretrained(tmp_path)
  ours = V.load_pretrained(tmp_path)
  assert ours.quant_conv is not None and len(ours.decoder.mid_block.attentions) == 0 and ours.shift_factor == 0.0
  z = np.random.default_rng(5).normal(size=(1, 3, 2, 4)).astype(np.float32)
  x = np.random.default_rng(6).uniform(-1, 1, size=(1, 8, 12, 3)).astype(np.float32)
  with torch.no_grad():
    want_img = _nhwc(ref.decode(_nchw(z)).sample)
    want_mean = _nhwc(ref.encode(_nchw(x)).latent_dist.mean)
  f = jax.jit(lambda m, z, x: (m.decode(z), m.encode(x)))
  img, mean = f(ours, z, x)
  np.testing.assert_allclose(np.asarray(img), want_img, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(mean), want_mean, atol=TOL, rtol=0)
  # batch_chunk: lax.map over images (3 = 2 + remainder 1), the same images
  graphdef, state = nnx.split(ours)
  zs = np.random.default_rng(8).normal(size=(3, 3, 2, 4)).astype(np.float32)
  whole = jax.jit(V.make_decode_fn(graphdef, scaled=True))(state, zs)
  chunked = jax.jit(V.make_decode_fn(graphdef, scaled=True, batch_chunk=2))(state, zs)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="batch_chunk"):
    V.make_decode_fn(graphdef, batch_chunk=0)


def test_old_attention_names_load_and_chunked_attention(tiny, jitted, tmp_path):
  """Checkpoints with diffusers' deprecated attention names (query / key / value / proj_attn) load."""
  _, _, root = tiny
  state, decode, _ = jitted
  tensors = load_file(str(root / "vae" / V.WEIGHTS_NAME))
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for name, a in tensors.items():
    for new, dep in old.items():
      name = name.replace(f".{new}.", f".{dep}.")
    renamed[name] = a
  assert any(".query." in n for n in renamed)
  save_file(renamed, str(tmp_path / V.WEIGHTS_NAME))
  (tmp_path / V.CONFIG_NAME).write_text((root / "vae" / V.CONFIG_NAME).read_text())
  # and the chunked mid-block attention (35 positions in chunks of 8: the padded path) gives the same images
  loaded = V.load_pretrained(tmp_path, attention_query_chunk=8)
  graphdef, loaded_state = nnx.split(loaded)
  got = jax.jit(V.make_decode_fn(graphdef))(loaded_state, Z)
  np.testing.assert_allclose(np.asarray(got), np.asarray(decode(state, Z)), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_remat_bf16_and_sampling():
  cfg = V.tiny_config()
  base = V.AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  rem = V.AutoencoderKL(cfg.replace(remat=True, remat_policy="nothing_saveable"), rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.key(0), (1, 4, 2, 4))
  loss = lambda m, z: jnp.sum(jnp.square(m.decode(z)))  # noqa: E731
  g1 = jax.jit(jax.grad(loss, argnums=1))(base, z)
  g2 = jax.jit(jax.grad(loss, argnums=1))(rem, z)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-5)
  half = V.AutoencoderKL(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  out = jax.jit(lambda m, z: m.decode(z))(half, z)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(lambda m, z: m.decode(z))(base, z)), atol=0.1)
  x = jax.random.uniform(jax.random.key(1), (2, 6, 4, 3), minval=-1, maxval=1)
  key = jax.random.key(3)
  mean, logvar, sample = jax.jit(lambda m, x, k: (*m.encode_moments(x), m.encode(x, k)))(base, x, key)
  assert sample.shape == mean.shape == (2, 3, 2, 4)
  noise = jax.random.normal(key, mean.shape)  # a sample: mean + std * N(0, 1) with the key's noise
  np.testing.assert_allclose(np.asarray(sample), np.asarray(mean + jnp.exp(0.5 * logvar) * noise), atol=1e-5,
                             rtol=1e-5)


def test_param_logical_names():
  vae = V.AutoencoderKL(V.tiny_config(), rngs=nnx.Rngs(0))
  names = {tuple(p): v.get_metadata().get("out_sharding") for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}
  assert names[("decoder", "conv_in", "kernel")] == (None, None, "conv_in", "conv_out")
  assert names[("decoder", "mid_block", "attentions", 0, "to_q", "kernel")] == ("conv_in", "conv_out")
  assert names[("encoder", "conv_norm_out", "weight")] == ("norm",)
  assert all(n is not None for n in names.values())


def test_bad_configs():
  with pytest.raises(ValueError, match="norm_num_groups"):
    V.tiny_config(norm_num_groups=3)
  with pytest.raises(ValueError, match="down_block_types"):
    V.tiny_config(down_block_types=("DownEncoderBlock2D",))
  with pytest.raises(ValueError, match="up_block_types"):
    V.tiny_config(up_block_types=("AttnUpDecoderBlock2D",) * 2)
  with pytest.raises(ValueError, match="act_fn"):
    V.tiny_config(act_fn="tanh")
  with pytest.raises(ValueError, match="latent_channels"):
    V.tiny_config(latent_channels=0)
  with pytest.raises(ValueError, match="scaling_factor"):
    V.tiny_config(scaling_factor=0.0)
  with pytest.raises(ValueError, match="dtype"):
    V.tiny_config(dtype="int8")
  with pytest.raises(ValueError, match="attention_query_chunk"):
    V.tiny_config(attention_query_chunk=0)
  with pytest.raises(ValueError, match="remat_policy"):
    V.tiny_config(remat_policy="bogus")
  with pytest.raises(ValueError, match="unknown VAEConfig fields"):
    V.VAEConfig.from_diffusers_config({}, bogus=1)
  vae = V.AutoencoderKL(V.tiny_config(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="latents must be NHWC"):
    vae.decode(jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="images must be NHWC"):
    vae.encode(jnp.zeros((1, 3, 8, 8)))
  with pytest.raises(ValueError, match="must be an AutoencoderKL"):
    V.save_pretrained(object(), "/nonexistent")


def test_file_errors(tiny, tmp_path):
  _, _, root = tiny
  with pytest.raises(FileNotFoundError, match="config.json"):
    V.load_pretrained(tmp_path)
  cfg = json.loads((root / "vae" / V.CONFIG_NAME).read_text())
  (tmp_path / V.CONFIG_NAME).write_text(json.dumps(cfg))
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
    V.load_pretrained(tmp_path)
  tensors = load_file(str(root / "vae" / V.WEIGHTS_NAME))
  missing = dict(tensors)
  missing.pop("decoder.conv_out.weight")
  save_file(missing, str(tmp_path / V.WEIGHTS_NAME))
  with pytest.raises(V.CheckpointError, match="decoder.conv_out.weight"):
    V.load_pretrained(tmp_path)
  wrong = dict(tensors)
  wrong["decoder.conv_out.bias"] = np.zeros((4,), np.float32)
  save_file(wrong, str(tmp_path / V.WEIGHTS_NAME))
  with pytest.raises(V.CheckpointError, match="decoder.conv_out.bias.*shape"):
    V.load_pretrained(tmp_path)
  with pytest.raises(ValueError, match="not an AutoencoderKL"):
    (tmp_path / V.CONFIG_NAME).write_text(json.dumps(dict(cfg, _class_name="SD3Transformer2DModel")))
    V.load_pretrained(tmp_path)
  (tmp_path / V.CONFIG_NAME).write_text(json.dumps(dict(cfg, norm_num_groups=5)))
  with pytest.raises(ValueError, match="norm_num_groups"):
    V.load_pretrained(tmp_path)
