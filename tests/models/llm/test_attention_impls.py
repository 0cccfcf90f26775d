"""Attention implementations (`adrpo_jax.models.llm.attention`) against the `xla` reference.

Every comparison is between two different compiled computations (different summation orders), so it uses a
float32 tolerance of 1e-5 (measured differences are ~1e-6), and only on query rows that attend at least one
key: fully masked (padding) rows hold implementation-specific finite garbage that callers mask out.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig
from adrpo_jax.models.llm import attention as attn
from adrpo_jax.models.llm.attention import AttentionMask, attention, select_impl
from adrpo_jax.models.llm.logprobs import token_logprobs

TOL = 1e-5  # float32, different computations (see module doc)
B, H, K, HD = 2, 4, 2, 8  # GQA: 2 query heads per kv head


def _qkv(t, s, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, t, H, HD), dtype)
  k = jax.random.normal(ks[1], (B, s, K, HD), dtype)
  v = jax.random.normal(ks[2], (B, s, K, HD), dtype)
  return q, k, v, jax.random.normal(ks[3], (B, t, H, HD), jnp.float32)


def _rows_with_keys(mask: AttentionMask, t):
  return np.asarray(mask.dense(t).any(-1))  # [B, T]: rows that attend at least one key


def _compare(mask, q, k, v, w, impl, **kw):
  rows = _rows_with_keys(mask, q.shape[1])
  w = w * rows[:, :, None, None]

  @functools.partial(jax.jit, static_argnums=5)  # one compilation per implementation (eager is slow)
  def run(q, k, v, mask, w, use_impl: bool):
    call = lambda q, k, v: attention(q, k, v, mask, **(dict(impl=impl, **kw) if use_impl else dict(impl="xla")))  # noqa: E731
    loss = lambda q, k, v: jnp.sum(call(q, k, v).astype(jnp.float32) * w)  # noqa: E731
    return call(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  ref, g_ref = run(q, k, v, mask, w, False)
  out, g_out = run(q, k, v, mask, w, True)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=TOL, rtol=0)
  for name, a, b in zip("qkv", g_out, g_ref):
    assert np.isfinite(np.asarray(a)).all(), name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0, err_msg=name)


LEFT_PAD = np.array([[False] * 3 + [True] * 8, [True] * 11])  # row 0 left-padded by 3, T = 11


@pytest.mark.parametrize("window,chunk_size", [  # several blocks, a padded last block, one block
    (None, 4), (3, 5), ("array3", 4), pytest.param("array0", 5, marks=pytest.mark.slow),
    pytest.param(None, 64, marks=pytest.mark.slow), pytest.param(3, 64, marks=pytest.mark.slow)])
def test_chunked_equals_xla_prefill(window, chunk_size):
  q, k, v, w = _qkv(11, 11)
  mask = AttentionMask(key_valid=jnp.asarray(LEFT_PAD), window=window if isinstance(window, int) else None)
  if isinstance(window, str):  # a traced per-layer window (as inside the scan over layers); 0 = none
    mask = mask.with_window_array(int(window[-1]))
  _compare(mask, q, k, v, w, "chunked", chunk_size=chunk_size)


@pytest.mark.parametrize("window", [3, pytest.param(None, marks=pytest.mark.slow)])
def test_chunked_equals_xla_with_cache(window):
  # 3 new queries at cache slots 6..8 of a 13-slot cache: row 0 left-padded by 2, slots >= 9 unwritten
  q, k, v, w = _qkv(3, 13, seed=1)
  valid = np.arange(13)[None, :] < 9
  valid = valid & (np.arange(13)[None, :] >= np.array([[2], [0]]))
  mask = AttentionMask(key_valid=jnp.asarray(valid), q_offset=jnp.int32(6), window=window)
  _compare(mask, q, k, v, w, "chunked", chunk_size=4)
  # the decode step: one query at slot 8
  mask1 = AttentionMask(key_valid=jnp.asarray(valid), q_offset=jnp.int32(8), window=window)
  _compare(mask1, q[:, :1], k, v, w[:, :1], "chunked", chunk_size=4)


def test_fully_masked_rows_are_finite():
  q, k, v, w = _qkv(6, 6)
  valid = jnp.asarray([[False] * 6, [False, False, True, True, True, True]])  # row 0: no key at all
  mask = AttentionMask(key_valid=valid)
  for impl in ("chunked",):  # (xla: uniform weights over all keys, finite too)
    out, grads = jax.value_and_grad(
        lambda q, k, v: jnp.sum(attention(q, k, v, mask, impl=impl, chunk_size=4) * w), argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(float(out)), impl
    assert all(np.isfinite(np.asarray(g)).all() for g in grads), impl


@pytest.mark.parametrize("window", [None, pytest.param(4, marks=pytest.mark.slow)])
def test_splash_interpret_equals_xla_causal_prefill(window):
  q, k, v, w = _qkv(20, 20, seed=2, dtype=jnp.float32)
  valid = np.arange(20)[None, :] >= np.array([[5], [0]])
  mask = AttentionMask(key_valid=jnp.asarray(valid), window=window)
  _compare(mask, q, k, v, w, "splash", interpret=True)


def test_select_impl_per_platform():
  prefill = AttentionMask(key_valid=jnp.ones((1, 4096), bool))
  cached = AttentionMask(key_valid=jnp.ones((1, 4096), bool), q_offset=jnp.int32(0))
  layered = prefill.with_window_array(4)
  shape = (1, 4096, 8, 64)

  def sel(impl="auto", platform="cpu", t=4096, s=4096, dtype=jnp.bfloat16, mask=prefill, hd=64, min_len=1024):
    return select_impl(impl, platform=platform, q_shape=(1, t, 8, hd), k_shape=(1, s, 2, hd), dtype=dtype,
                       mask=mask, auto_min_len=min_len)

  assert [sel(platform=p) for p in ("cpu", "gpu", "cuda", "tpu")] == ["chunked", "cudnn", "cudnn", "splash"]
  # CPU: xla below the threshold (T * S < min_len**2), chunked above; the decode step over a long cache:
  # `decode` (tests/models/llm/test_decode_attention.py)
  assert sel(t=512, s=512) == "xla" and sel(t=1024, s=1024) == "chunked" and sel(t=1, mask=cached) == "decode"
  assert sel(t=1000, s=8192, mask=cached) == "chunked"  # a long prompt into a long cache
  # GPU: cudnn only for half precision, head_dim % 8 == 0 and <= 128, no cache, even T, static window
  assert sel(platform="gpu", dtype=jnp.float32) == "chunked"
  assert sel(platform="gpu", hd=12) == "chunked" and sel(platform="gpu", hd=256) == "chunked"
  assert sel(platform="gpu", t=1, mask=cached) == "decode"
  assert sel(platform="gpu", t=4095, s=4095) == "chunked"
  assert sel(platform="gpu", mask=layered) == "chunked"
  assert sel(platform="gpu", t=64, s=64) == "cudnn"
  # TPU: splash for a causal prefill without a cache and with a static window, else the fallback
  assert sel(platform="tpu", t=1, mask=cached) == "xla" and sel(platform="tpu", mask=layered) == "chunked"
  assert sel(platform="tpu", mask=prefill.replace(causal=False)) == "chunked"
  # explicit choices: xla / chunked always; cudnn / splash where they can run, else the auto fallback
  assert sel("xla", platform="tpu") == "xla" and sel("chunked", platform="gpu", t=8, s=8) == "chunked"
  assert sel("cudnn", platform="cpu") == "cudnn" and sel("cudnn", t=1, mask=cached) == "decode"
  assert sel("splash", platform="cpu") == "splash" and sel("splash", mask=cached) == "chunked"
  with pytest.raises(ValueError, match="'flash'"):
    sel("flash")
  del shape


def test_cudnn_arguments_describe_the_same_attention():
  """The arguments built for cuDNN (mask, causal flag, window, GQA heads) give the reference result when
  `jax.nn.dot_product_attention` runs them with its XLA implementation (cuDNN itself needs a GPU)."""
  q, k, v, _ = _qkv(10, 10, seed=3)
  valid = np.arange(10)[None, :] >= np.array([[3], [0]])
  for window in (None, 3):
    mask = AttentionMask(key_valid=jnp.asarray(valid), window=window)
    args = attn.cudnn_arguments(q, k, v, mask, scale=HD ** -0.5)
    assert args["implementation"] == "cudnn" and args["is_causal"] and args["key"].shape[2] == K
    assert args["mask"].shape == (B, 1, 10, 10) and args.get("local_window_size") == (
        None if window is None else (window - 1, 0))
    out = jax.nn.dot_product_attention(**{**args, "implementation": "xla"})
    rows = _rows_with_keys(mask, 10)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(attention(q, k, v, mask, impl="xla"))[rows],
                               atol=TOL, rtol=0)
  assert "float16/bfloat16" in attn.cudnn_supported(q.shape, k.shape, jnp.float32, mask)
  with pytest.raises(ValueError, match="float16/bfloat16"):
    attn.cudnn_attention(q, k, v, mask, scale=1.0)


def test_bad_arguments_raise_clear_errors():
  q, k, v, _ = _qkv(4, 4)
  mask = AttentionMask(key_valid=jnp.ones((B, 4), bool))
  with pytest.raises(ValueError, match="'fast'"):
    attention(q, k, v, mask, impl="fast")
  with pytest.raises(ValueError, match="window=0"):
    attention(q, k, v, mask.replace(window=0))
  with pytest.raises(ValueError, match=r"key_valid shape \(2, 5\)"):
    attention(q, k, v, AttentionMask(key_valid=jnp.ones((B, 5), bool)))
  with pytest.raises(ValueError, match="chunk_size=0"):
    attention(q, k, v, mask, impl="chunked", chunk_size=0)
  base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    DecoderConfig(**base, attention_impl="flash")
  with pytest.raises(ValueError, match="attention_chunk_size=0"):
    DecoderConfig(**base, attention_chunk_size=0)
  with pytest.raises(ValueError, match="attention_auto_min_len=-1"):
    DecoderConfig(**base, attention_auto_min_len=-1)
  hf = DecoderConfig(**base, attention_impl="chunked").to_hf_config()
  assert not any("attention_impl" in key or "chunk" in key for key in hf)


# ------------------------------------------------------------------------------------------------------
# Through the model: log-probs and their gradients, KV-cached decoding
# ------------------------------------------------------------------------------------------------------
CFG = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, qk_norm=True, model_type="qwen3",
                    sliding_window=3, layer_types=("full_attention", "sliding_attention"), attention_chunk_size=4)
TOKENS = np.random.default_rng(0).integers(1, 61, (2, 11)).astype(np.int32)


def _model(impl, **kw):
  return CausalLM(CFG.replace(attention_impl=impl, **kw), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan_layers,impl,min_len", [  # auto: chunked above T * S >= min_len**2 = 16
    (True, "chunked", 1024), pytest.param(False, "chunked", 1024, marks=pytest.mark.slow),
    pytest.param(True, "auto", 4, marks=pytest.mark.slow), pytest.param(False, "auto", 4, marks=pytest.mark.slow)])
def test_model_logprobs_and_grads_equal_xla(scan_layers, impl, min_len):
  mask = jnp.asarray(LEFT_PAD)
  # a token whose predecessor is padding is predicted from a padding row's (implementation-specific) hidden
  # state: RL only scores completion tokens, so the comparison leaves the first real token of a row out
  counted = LEFT_PAD & np.concatenate([np.zeros((2, 1), bool), LEFT_PAD[:, :-1]], axis=1)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=LEFT_PAD.shape) * counted, jnp.float32)
  results = {}
  for name, kw in (("xla", {}), (impl, dict(attention_auto_min_len=min_len))):
    graphdef, params, rest = nnx.split(_model(name, scan_layers=scan_layers, **kw), nnx.Param, ...)

    def loss(p):
      return jnp.sum(token_logprobs(nnx.merge(graphdef, p, rest), jnp.asarray(TOKENS), mask) * weights)

    results[name] = jax.jit(jax.value_and_grad(loss))(params)
  (v_ref, g_ref), (v_out, g_out) = results["xla"], results[impl]
  np.testing.assert_allclose(float(v_out), float(v_ref), atol=TOL, rtol=1e-6)
  flat_ref, flat_out = jax.tree.leaves(g_ref), jax.tree.leaves(g_out)
  assert len(flat_ref) == len(flat_out) > 0
  for a, b in zip(flat_out, flat_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)


def test_model_cached_decoding_equals_xla():
  prompt_mask = jnp.asarray(LEFT_PAD[:, :8])
  outs = {}
  for impl in ("xla", "chunked"):
    model = _model(impl)
    step = jax.jit(lambda m, t, a, c: m(t, attention_mask=a, cache=c))
    cache = model.init_cache(2, 13)
    logits, cache = step(model, jnp.asarray(TOKENS[:, :8]), prompt_mask, cache)  # prefill at slots 0..7
    seq = [logits[:, -1]]
    for i in range(8, 11):  # three decode steps (T = 1, query slot = cache index)
      logits, cache = step(model, jnp.asarray(TOKENS[:, i:i + 1]), jnp.ones((2, 1), bool), cache)
      seq.append(logits[:, 0])
    outs[impl] = np.stack([np.asarray(x) for x in seq], 1)
  assert np.isfinite(outs["chunked"]).all()
  np.testing.assert_allclose(outs["chunked"], outs["xla"], atol=TOL, rtol=0)


def _update_temp_mib(impl, t):
  cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_impl=impl)
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)

  def loss(p, tokens, mask):
    return jnp.sum(token_logprobs(nnx.merge(graphdef, p, rest), tokens, mask))

  compiled = jax.jit(jax.value_and_grad(loss)).lower(
      params, jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), bool)).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20


def test_update_memory_is_linear_in_length_on_default_settings():
  # Default settings ('auto' -> chunked on CPU at these lengths). Measured: 23.1 -> 43.1 MiB (1.9x); the
  # xla reference: 122.4 -> 1881.5 MiB (15.4x, see the slow test below).
  small, large = _update_temp_mib("auto", 1024), _update_temp_mib("auto", 4096)
  assert large <= 5 * small, (small, large)


@pytest.mark.slow
def test_update_memory_of_the_xla_reference_is_quadratic():
  small, large = _update_temp_mib("xla", 1024), _update_temp_mib("xla", 4096)
  assert large > 10 * small, (small, large)
