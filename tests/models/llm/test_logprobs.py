"""Chunked token log-probs: equal to the naive full-logits computation (values, entropies, gradients),
usable inside jax.jit on (graphdef, state), and much less temp memory than naive for a big vocabulary."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig, logprobs_from_hidden, token_logprobs
from tests.models.llm.conftest import numpy_model

CFG = DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def setup():
  model = numpy_model(CFG)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (3, 11)).astype(np.int32)
  mask = np.ones((3, 11), bool)
  mask[0, :3] = False
  mask[2, :1] = False
  return model, jnp.asarray(tokens), jnp.asarray(mask)


def _numpy_reference(logits, tokens, mask, temperature):
  """float64 numpy: log_softmax(logits[:, t-1] / T)[tokens[:, t]] and entropies, 0 at t=0 / padding."""
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  logz = z - np.log(np.exp(z).sum(-1, keepdims=True))
  tokens = np.asarray(tokens)
  lp = np.zeros(tokens.shape)
  lp[:, 1:] = np.take_along_axis(logz[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  ent = np.zeros(tokens.shape)
  ent[:, 1:] = -(np.exp(logz[:, :-1]) * logz[:, :-1]).sum(-1)
  mask = np.asarray(mask)
  return np.where(mask, lp, 0), np.where(mask, ent, 0)


@pytest.mark.parametrize("chunk_size,temperature", [(7, 1.0), (4096, 0.7)])
def test_equals_naive(setup, chunk_size, temperature):
  model, tokens, mask = setup
  fn = jax.jit(lambda m, t, a: token_logprobs(m, t, a, chunk_size=chunk_size, temperature=temperature,
                                              return_entropy=True))
  logp, ent = fn(model, tokens, mask)
  assert logp.dtype == jnp.float32 and logp.shape == tokens.shape
  logits = jax.jit(lambda m, t, a: m(t, attention_mask=a))(model, tokens, mask)
  ref_lp, ref_ent = _numpy_reference(logits, tokens, mask, temperature)
  np.testing.assert_allclose(np.asarray(logp), ref_lp, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), ref_ent, atol=1e-5)
  assert (np.asarray(logp)[:, 0] == 0).all() and (np.asarray(logp)[~np.asarray(mask)] == 0).all()


def test_gradients_equal_naive_and_jit_on_graphdef_state(setup):
  _, tokens, mask = setup
  model = numpy_model(CFG.replace(num_hidden_layers=1))
  graphdef, state = nnx.split(model)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=tokens.shape), jnp.float32)

  def chunked(state):
    return jnp.sum(weights * token_logprobs((graphdef, state), tokens, mask, chunk_size=5, temperature=0.9))

  def naive(state):
    logits = nnx.merge(graphdef, state)(tokens, attention_mask=mask).astype(jnp.float32) / 0.9
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum((weights * mask)[:, 1:] * lp)

  v1, g1 = jax.jit(jax.value_and_grad(chunked))(state)
  v2, g2 = jax.jit(jax.value_and_grad(naive))(state)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
  assert len(flat1) == len(flat2) > 10
  for a, b in zip(flat1, flat2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * max(1.0, float(jnp.abs(b).max())))
  assert any(float(jnp.abs(a).max()) > 0 for a in flat1)


def test_bf16_model_logprobs_are_float32(setup):
  model, tokens, mask = setup
  graphdef, state = nnx.split(model)
  cfg16 = CFG.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model16 = nnx.merge(nnx.split(nnx.eval_shape(lambda: CausalLM(cfg16, rngs=nnx.Rngs(0))))[0],
                      jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))
  lp16 = jax.jit(token_logprobs)(model16, tokens, mask)
  lp32 = jax.jit(token_logprobs)(model, tokens, mask)
  assert lp16.dtype == jnp.float32
  assert float(jnp.abs(lp16 - lp32).mean()) < 0.1


def test_chunked_grad_uses_far_less_temp_memory():
  """Compiled memory analysis: grad through chunked log-probs never holds [B, T, V] float32 logits."""
  b, t, d, v = 2, 256, 64, 32768
  hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)

  def loss(chunk):
    return lambda h, y, w: jnp.sum(logprobs_from_hidden(h, y, w, chunk_size=chunk))

  def naive(h, y, w):
    lp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h[:, :-1], w), axis=-1)
    return jnp.sum(jnp.take_along_axis(lp, y[:, 1:, None], -1))

  def temp_bytes(f):
    compiled = jax.jit(jax.grad(f, argnums=(0, 2))).lower(hidden, tokens, w).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full_logits = b * (t - 1) * v * 4  # 67 MB
  naive_bytes, chunked_bytes = temp_bytes(naive), temp_bytes(loss(64))
  assert naive_bytes >= full_logits
  # chunked: one [64, V] f32 chunk of logits + the [D, V] gradient accumulator (8.4 MB each).
  assert chunked_bytes < full_logits / 2 and chunked_bytes < naive_bytes / 8, (naive_bytes, chunked_bytes)


def test_validation():
  h, y, w = jnp.zeros((1, 3, 2)), jnp.zeros((1, 3), jnp.int32), jnp.zeros((2, 5))
  with pytest.raises(ValueError, match="lm_head"):
    logprobs_from_hidden(h, y, jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match="chunk_size"):
    logprobs_from_hidden(h, y, w, chunk_size=0)
  with pytest.raises(ValueError, match="temperature"):
    logprobs_from_hidden(h, y, w, temperature=0.0)
  with pytest.raises(ValueError, match="mask shape"):
    logprobs_from_hidden(h, y, w, jnp.ones((1, 4), bool))
