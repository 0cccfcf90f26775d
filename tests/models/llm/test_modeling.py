"""Model-level properties: logical axis names, KV-cached decoding == full forward, remat, validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig, positions_from_mask
from tests.models.llm.conftest import numpy_model

CFG = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, attention_bias=True, qk_norm=True,
                    model_type="qwen3", sliding_window=3, layer_types=("full_attention", "sliding_attention"))
ALLOWED = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm"}


def test_parameters_carry_logical_axis_names():
  # list layout (the stacked one: tests/models/llm/test_scan_layers.py)
  model = nnx.eval_shape(lambda: CausalLM(CFG.replace(tie_word_embeddings=False, scan_layers=False),
                                          rngs=nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  flat = {".".join(map(str, p)): tuple(v.get_value()) for p, v in nnx.to_flat_state(specs)}
  assert flat["embed_tokens.embedding"] == ("vocab", "embed")
  assert flat["lm_head.kernel"] == ("embed", "vocab")
  assert flat["layers.0.self_attn.q_proj.kernel"] == ("embed", "heads", "head_dim")
  assert flat["layers.0.self_attn.k_proj.bias"] == ("kv_heads", "head_dim")
  assert flat["layers.1.mlp.down_proj.kernel"] == ("mlp", "embed")
  assert flat["layers.1.self_attn.q_norm.weight"] == ("norm",)
  for name, spec in flat.items():
    assert spec and set(spec) <= ALLOWED, (name, spec)
  assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param))) == \
      CFG.replace(tie_word_embeddings=False).num_params()


def test_cached_decoding_equals_full_forward():
  model = numpy_model(CFG)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 61, (2, 9)), jnp.int32)
  mask = jnp.asarray(np.arange(9)[None, :] >= np.array([[2], [0]]))  # row 0 left-padded by 2
  full = jax.jit(lambda m, t, a: m(t, attention_mask=a))(model, tokens, mask)

  @jax.jit
  def step(m, t, a, cache):
    return m(t, attention_mask=a, cache=cache)

  cache = model.init_cache(2, 12)
  outs = []
  for lo, hi in [(0, 7), (7, 9)]:  # a 7-token prefill then a 2-token chunk (single steps: test_sampler)
    logits, cache = step(model, tokens[:, lo:hi], mask[:, lo:hi], cache)
    outs.append(logits)
  cached = jnp.concatenate(outs, axis=1)
  valid = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(cached)[valid], np.asarray(full)[valid], atol=1e-5)
  assert int(cache.index) == 9
  np.testing.assert_array_equal(np.asarray(cache.next_position), [7, 9])
  np.testing.assert_array_equal(np.asarray(positions_from_mask(mask))[:, -1], [6, 8])


def test_remat_gives_same_gradients():
  cfg = CFG.replace(num_hidden_layers=1, layer_types=None, sliding_window=None)
  plain = numpy_model(cfg)
  graphdef, state = nnx.split(plain)
  remat_graphdef = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg.replace(remat=True), rngs=nnx.Rngs(0))))[0]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 6)), jnp.int32)

  def loss(gd):
    return lambda st: jnp.sum(jax.nn.log_softmax(nnx.merge(gd, st)(tokens))[..., 3])

  assert "remat" in str(jax.make_jaxpr(jax.grad(loss(remat_graphdef)))(state))
  g1 = jax.jit(jax.grad(loss(graphdef)))(state)
  g2 = jax.jit(jax.grad(loss(remat_graphdef)))(state)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_input_validation():
  model = nnx.eval_shape(lambda: CausalLM(CFG, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="tokens must be"):
    model.hidden_states(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="integers"):
    model.hidden_states(jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="attention_mask"):
    model.hidden_states(jnp.zeros((1, 4), jnp.int32), attention_mask=jnp.ones((1, 3), bool))
  with pytest.raises(ValueError, match="do not fit"):
    model.hidden_states(jnp.zeros((1, 4), jnp.int32), cache=model.init_cache(1, 3))
