"""`decode` attention (the KV-cache step reading only the filled key blocks) against the `xla` reference.

Different compiled computations (summation orders), so a float32 tolerance of 1e-5 on the query rows that
attend at least one key (fully masked rows are implementation-specific finite values callers mask out).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig
from adrpo_jax.models.llm.attention import AttentionMask, attention, decode_attention, select_impl
from adrpo_jax.models.llm.sampler import generate

TOL = 1e-5
B, H, K, HD, S = 3, 4, 2, 8, 37  # GQA (2 query heads per kv head); S not a multiple of the blocks below


def _inputs(t, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (B, t, H, HD)), jax.random.normal(ks[1], (B, S, K, HD)),
          jax.random.normal(ks[2], (B, S, K, HD)))


def _key_valid(index, t):
  """Row 0 left-padded by 5, row 1 by 0, row 2 by 9 (so short caches leave it with no valid key); slots at
  or past index + t unwritten (False)."""
  slots = np.arange(S)[None, :]
  pad = np.array([5, 0, 9])[:, None]
  return jnp.asarray((slots >= pad) & (slots < index + t))


@jax.jit
def _both(q, k, v, mask, window_array):
  if window_array is not None:
    mask = mask.with_window_array(window_array)
  ref = attention(q, k, v, mask, impl="xla")
  return ref, [decode_attention(q, k, v, mask, scale=HD ** -0.5, block_size=c) for c in (4, 16, 64)]


@pytest.mark.parametrize("t,window", [
    (1, None), (3, 6), (1, "array6"), pytest.param(3, None, marks=pytest.mark.slow),
    pytest.param(1, 6, marks=pytest.mark.slow), pytest.param(3, "array0", marks=pytest.mark.slow)])
def test_decode_equals_xla_padded_gqa_windows_fill_levels(t, window):
  q, k, v = _inputs(t)
  window_array = None if not isinstance(window, str) else jnp.int32(int(window[5:]))
  static = window if isinstance(window, int) else None
  for index in (0, 3, 8, 17, S - t):  # fill levels: first block, block edges, a clamped last block, full
    mask = AttentionMask(key_valid=_key_valid(index, t), q_offset=jnp.int32(index), window=static)
    ref, outs = _both(q, k, v, mask, window_array)
    rows = np.asarray(mask.with_window_array(window_array).dense(t).any(-1) if window_array is not None
                      else mask.dense(t).any(-1))
    for out in outs:  # block sizes 4 (several), 16 (clamped last block), 64 (> S: one block)
      assert np.isfinite(np.asarray(out)).all()
      np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=TOL, rtol=0,
                                 err_msg=f"index={index}")


def test_decode_reads_only_filled_blocks():
  """Slots past the last query's slot never enter: NaN there changes nothing."""
  q, k, v = _inputs(1)
  index = 9
  k = k.at[:, 12:].set(jnp.nan)
  v = v.at[:, 12:].set(jnp.nan)
  mask = AttentionMask(key_valid=_key_valid(index, 1), q_offset=jnp.int32(index))
  out = jax.jit(lambda q, k, v, m: decode_attention(q, k, v, m, scale=HD ** -0.5, block_size=4))(q, k, v, mask)
  assert np.isfinite(np.asarray(out)).all()


def test_auto_selects_decode_for_the_cached_step():
  cached = AttentionMask(key_valid=jnp.ones((1, 4096), bool), q_offset=jnp.int32(5))

  def sel(impl="auto", platform="cpu", t=1, s=4096, mask=cached, **kw):
    return select_impl(impl, platform=platform, q_shape=(1, t, 8, 64), k_shape=(1, s, 2, 64),
                       dtype=jnp.bfloat16, mask=mask, **kw)

  assert sel() == "decode" and sel(platform="gpu") == "decode" and sel(platform="tpu") == "xla"
  assert sel(t=16) == "decode" and sel(t=17) == "xla"  # DECODE_MAX_T queries at most
  assert sel(s=511) == "xla" and sel(s=64, auto_decode_min_len=64) == "decode"  # the cache length threshold
  assert sel(mask=cached.replace(causal=False)) == "xla"  # decode is causal only
  assert sel(t=4096, mask=AttentionMask(key_valid=jnp.ones((1, 4096), bool))) == "chunked"  # no cache
  assert sel("cudnn", platform="gpu") == "decode" and sel("decode", s=8) == "decode"
  assert sel("decode", t=4096, mask=AttentionMask(key_valid=jnp.ones((1, 4096), bool))) == "chunked"
  with pytest.raises(ValueError, match="needs a KV cache"):
    decode_attention(*_inputs(1), AttentionMask(key_valid=jnp.ones((B, S), bool)), scale=1.0)
  with pytest.raises(ValueError, match="block_size=0"):
    decode_attention(*_inputs(1), AttentionMask(key_valid=jnp.ones((B, S), bool), q_offset=jnp.int32(0)),
                     scale=1.0, block_size=0)


CFG = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, qk_norm=True, model_type="qwen3",
                    sliding_window=5, layer_types=("full_attention", "sliding_attention"), attention_chunk_size=4)


@pytest.mark.slow  # ~25 s loaded; the kernel and the scanned decode path have default tests
@pytest.mark.parametrize("greedy", [True, False])
def test_sampler_with_decode_equals_xla(greedy):
  """Generation (left-padded prompts, GQA, a sliding-window layer) gives the same tokens and close log-probs
  with `decode` as with `xla`: greedy, and top-p sampling with the same key."""
  prompts = jnp.asarray(np.random.default_rng(0).integers(1, 61, (2, 6)), jnp.int32)
  prompt_mask = jnp.asarray([[False, False, True, True, True, True], [True] * 6])
  outs = {}
  for impl in ("xla", "decode"):
    model = CausalLM(CFG.replace(attention_impl=impl), rngs=nnx.Rngs(0))
    kw = dict(greedy=True) if greedy else dict(rng=jax.random.key(3), top_p=0.9)
    outs[impl] = generate(model, prompts, prompt_mask, max_new_tokens=10, **kw)
  a, b = outs["xla"], outs["decode"]
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=TOL, rtol=0)


@pytest.mark.parametrize("impl", ["xla", "decode", "chunked"])
def test_kv_heads_first_layout_equals_the_slots_first_call(impl):
  """`attention(..., kv_heads_first=True)` on [B, K, S, hd] keys/values (the KV cache's layout) equals the call on
  [B, S, K, hd]: xla and decode read the layout in place, chunked gets it transposed; also through `layer_index`
  on a stacked [L, B, K, S, hd] cache (one compiled call per layout: equal to 1e-5)."""
  q, k, v = _inputs(2)
  mask = AttentionMask(key_valid=_key_valid(20, 2), q_offset=jnp.int32(20))
  kf, vf = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

  @jax.jit
  def three(q, k, v, kf, vf, mask):
    kw = dict(impl=impl, chunk_size=8, decode_block=16)
    return (attention(q, k, v, mask, **kw), attention(q, kf, vf, mask, kv_heads_first=True, **kw),
            attention(q, jnp.stack([kf * 0, kf]), jnp.stack([vf * 0, vf]), mask, kv_heads_first=True,
                      layer_index=jnp.int32(1), **kw))

  ref, got, stacked = three(q, k, v, kf, vf, mask)
  rows = np.asarray(_key_valid(20, 2).any(axis=1))  # row 2 attends no key: implementation-specific values
  np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(ref)[rows], atol=TOL, rtol=TOL)
  np.testing.assert_allclose(np.asarray(stacked)[rows], np.asarray(ref)[rows], atol=TOL, rtol=TOL)
  with pytest.raises(ValueError, match=r"\[B, K, S, hd\] \(kv_heads_first\)"):
    attention(q, kf[..., :4], vf, mask, impl=impl, kv_heads_first=True)
