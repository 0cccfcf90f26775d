"""The scanned decoder's KV cache rides in the scan carry and is written in place.

Before: the stacked cache [L, B, S, K, hd] went through the layer scan as xs -> ys, so every decode step wrote
a fresh copy of the whole cache (2.5x slower decode at a 512-slot cache than the list layout). Now each layer
writes only its new slots into the carried stack and `decode` reads the layer's key blocks from the stack
(`attention(..., layer_index=)`). Outputs are the same computation up to float32 summation order: 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig
from adrpo_jax.models.llm.attention import AttentionMask, attention

L, B, S, H, K, HD, T = 3, 2, 40, 4, 2, 8, 1


@pytest.mark.parametrize("impl", ["xla", "chunked", "decode", "auto"])
def test_layer_index_reads_that_layer_of_the_stack(impl):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (B, T, H, HD))
  k = jax.random.normal(ks[1], (L, B, S, K, HD))
  v = jax.random.normal(ks[2], (L, B, S, K, HD))
  valid = jnp.asarray(np.arange(S)[None, :] >= np.array([[3], [0]])) & (jnp.arange(S) < 21)[None]
  mask = AttentionMask(key_valid=valid, q_offset=jnp.int32(20))
  run = jax.jit(lambda q, k, v, i: attention(q, k, v, mask, impl=impl, chunk_size=16, auto_decode_min_len=8,
                                             layer_index=i))  # one compilation, the layer is traced
  for layer in range(L):
    want = attention(q, k[layer], v[layer], mask, impl="xla")
    np.testing.assert_allclose(run(q, k, v, jnp.int32(layer)), want, atol=1e-5, rtol=1e-5)


def test_layer_index_needs_a_stack():
  q = jnp.zeros((B, T, H, HD))
  k = jnp.zeros((B, S, K, HD))
  with pytest.raises(ValueError, match=r"stacked \[L, B, S, K, hd\]"):
    attention(q, k, k, AttentionMask(key_valid=jnp.ones((B, S), bool), q_offset=jnp.int32(0)),
              layer_index=jnp.int32(0))


def _model(scan, impl="auto"):
  cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=K, head_dim=HD, scan_layers=scan,
                      attention_impl=impl)
  return CausalLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl", ["decode", pytest.param("auto", marks=pytest.mark.slow),
                                  pytest.param("xla", marks=pytest.mark.slow)])
def test_decode_steps_scan_equal_list(impl):
  """Prefill of a left-padded batch + 3 decode steps: stacked (scan, in-place carry) == list layout."""
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 64, (B, 6)), jnp.int32)
  mask = jnp.asarray([[False, False, True, True, True, True], [True] * 6])
  outs = {}
  for scan in (True, False):
    graphdef, state = nnx.split(_model(scan, impl))

    @jax.jit
    def run(state, tokens, mask):  # one compilation: prefill + 3 greedy decode steps
      model = nnx.merge(graphdef, state)
      logits, cache = model(tokens, attention_mask=mask, cache=model.init_cache(B, 16))
      seq = [logits[:, -1]]
      for _ in range(3):
        logits, cache = model(jnp.argmax(seq[-1], -1)[:, None].astype(jnp.int32), cache=cache)
        seq.append(logits[:, -1])
      return jnp.stack(seq)

    outs[scan] = np.asarray(run(state, tokens, mask))
  np.testing.assert_allclose(outs[True], outs[False], atol=1e-5, rtol=1e-5)


def test_compiled_decode_step_does_not_copy_the_cache():
  """One jitted decode step with a donated 4-layer, 512-slot cache: XLA's temporaries stay far below the cache
  (the xs -> ys scan needed a second whole cache per step)."""
  cfg = DecoderConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, scan_layers=True)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  cache = model.init_cache(8, 512)
  cache_bytes = 2 * cache.keys.size * cache.keys.dtype.itemsize

  def step(state, tok, cache):
    logits, cache = nnx.merge(graphdef, state)(tok, cache=cache)
    return logits, cache

  compiled = jax.jit(step, donate_argnums=2).lower(state, jnp.zeros((8, 1), jnp.int32), cache).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < cache_bytes / 4, (temp, cache_bytes)
