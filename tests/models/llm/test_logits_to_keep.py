"""``logits_to_keep`` (issue 13 item 4): only the last K positions are projected onto the vocabulary.

Equal to the full projection sliced ``[:, T - K:]`` (values, entropies, gradients; 1e-5), and the compiled
``value_and_grad`` does fewer FLOPs (XLA cost analysis) when the prompt is long.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig, logprobs_from_hidden, token_logprobs

CFG = DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def setup():
  model = CausalLM(CFG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (3, 11)), jnp.int32)
  mask = np.ones((3, 11), bool)
  mask[0, :3] = False  # left padding
  mask[2, 9:] = False  # right padding inside the kept part
  return nnx.split(model), tokens, jnp.asarray(mask)


@pytest.mark.parametrize("keep,chunk_size", [(4, 512), (4, 3), (10, 7), (11, 5), (1, 512)])
def test_values_and_entropies_equal_the_full_projection_sliced(setup, keep, chunk_size):
  (graphdef, state), tokens, mask = setup

  @jax.jit
  def both(state):
    kw = dict(chunk_size=chunk_size, return_entropy=True, temperature=0.8)
    full = token_logprobs((graphdef, state), tokens, mask, **kw)
    kept = token_logprobs((graphdef, state), tokens, mask, logits_to_keep=keep, **kw)
    return full, kept

  (lp, ent), (lp_k, ent_k) = both(state)
  assert lp_k.shape == ent_k.shape == (3, keep)
  # the same formula in two chunkings: float32 tolerance
  np.testing.assert_allclose(lp_k, lp[:, 11 - keep:], atol=1e-5)
  np.testing.assert_allclose(ent_k, ent[:, 11 - keep:], atol=1e-5)
  assert float(jnp.abs(lp_k).max()) > 0.1


def test_gradients_equal_the_full_projection_sliced(setup):
  _, tokens, mask = setup
  graphdef, state = nnx.split(CausalLM(CFG.replace(num_hidden_layers=1), rngs=nnx.Rngs(1)))
  keep = 5
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, keep)), jnp.float32)

  def kept(s):
    lp, ent = token_logprobs((graphdef, s), tokens, mask, chunk_size=4, return_entropy=True, logits_to_keep=keep)
    return jnp.sum(w * lp) + 0.1 * jnp.sum(w * ent)

  def full(s):
    lp, ent = token_logprobs((graphdef, s), tokens, mask, chunk_size=4, return_entropy=True)
    return jnp.sum(w * lp[:, -keep:]) + 0.1 * jnp.sum(w * ent[:, -keep:])

  v1, g1 = jax.jit(jax.value_and_grad(kept))(state)
  v2, g2 = jax.jit(jax.value_and_grad(full))(state)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  leaves1, leaves2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
  assert len(leaves1) == len(leaves2) > 10
  for a, b in zip(leaves1, leaves2):  # two different programs: float32 tolerance scaled by the gradient
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))
  assert all(float(jnp.abs(a).max()) > 0 for a in leaves1)  # the prompt still reaches every parameter


def _flops(f, *args):
  cost = jax.jit(jax.value_and_grad(f)).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_compiled_flops_drop_with_a_long_prompt():
  """Prompt 96 + completion 32 tokens, vocabulary 4096 >> hidden 64: the projection dominates the FLOPs."""
  cfg = CFG.replace(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32)
  mask = jax.ShapeDtypeStruct((4, 128), jnp.bool_)

  def loss(keep):
    return lambda s, t, m: jnp.sum(token_logprobs((graphdef, s), t, m, chunk_size=512, logits_to_keep=keep))

  full, kept = _flops(loss(None), state, tokens, mask), _flops(loss(32), state, tokens, mask)
  # projection (+ its gradient) ~ 6 * B * T * D * V: 127 -> 32 positions; the decoder's FLOPs are unchanged
  assert kept < 0.45 * full, (full, kept)


def test_logits_to_keep_validation():
  h, y, w = jnp.zeros((1, 3, 2)), jnp.zeros((1, 3), jnp.int32), jnp.zeros((2, 5))
  for bad in (0, 4, -1, 2.0, True):
    with pytest.raises(ValueError, match=f"logits_to_keep={bad!r}"):
      logprobs_from_hidden(h, y, w, logits_to_keep=bad)
