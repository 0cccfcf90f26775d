"""Packed sequences (segment ids, issue 26 item 2): attention restricted to a token's own segment in every
implementation that takes them (values and gradients), and a packed model forward equals separate forwards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig
from adrpo_jax.models.llm.attention import (AttentionMask, attend, attention, cudnn_supported, decode_supported,
                                            dense_mask)


def _segments(b=2, t=13, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.full((b, t), -1, np.int32)
    valid = np.zeros((b, t), bool)
    for i in range(b):
        o, s = 0, 0
        while o < t - 2:
            n = int(rng.integers(1, 6))
            seg[i, o:o + n], valid[i, o:o + n] = s, True
            o, s = o + n, s + 1
    return jnp.asarray(seg), jnp.asarray(valid)


def test_dense_mask_with_segments_is_block_causal():
    seg, valid = _segments()
    m = np.asarray(dense_mask(valid, seg.shape[1], segment_ids=seg))
    s, v = np.asarray(seg), np.asarray(valid)
    t = s.shape[1]
    want = (np.tril(np.ones((t, t), bool))[None] & v[:, None, :] & (s[:, :, None] == s[:, None, :]))
    np.testing.assert_array_equal(m, want)


@pytest.mark.parametrize("window", [None, 3])
def test_chunked_with_segments_matches_reference_values_and_grads(window):
    b, t, h, kh, hd = 2, 13, 4, 2, 8
    seg, valid = _segments(b, t)
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, t, h, hd))
    k = jax.random.normal(kk, (b, t, kh, hd))
    v = jax.random.normal(kv, (b, t, kh, hd))
    d = jax.random.normal(kd, (b, t, h, hd)) * valid[:, :, None, None]  # padded queries: no cotangent
    mask = AttentionMask(key_valid=valid, segment_ids=seg, window=window)

    def loss(impl):
        def f(q, k, v):
            out = attention(q, k, v, mask, impl=impl, chunk_size=4)
            return jnp.sum(out * d)
        return f

    ref = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.value_and_grad(loss("chunked"), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5, atol=1e-4)
    for a, g in zip(ref[1], got[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(a), atol=2e-5)
    # the reference itself: attend with the dense block-causal mask
    out = attend(q, k, v, mask.dense(t), scale=hd ** -0.5)
    np.testing.assert_allclose(np.asarray(attention(q, k, v, mask, impl="xla")), np.asarray(out), atol=1e-6)


@pytest.mark.slow
def test_splash_with_segments_interpret():
    b, t, h, hd = 1, 256, 2, 128
    seg, valid = _segments(b, t)
    q, k, v = (jax.random.normal(kk, (b, t, h, hd)) for kk in jax.random.split(jax.random.key(1), 3))
    mask = AttentionMask(key_valid=valid, segment_ids=seg)
    ref = attention(q, k, v, mask, impl="xla")
    got = attention(q, k, v, mask, impl="splash", interpret=True)
    keep = np.asarray(valid)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(got) * keep, np.asarray(ref) * keep, atol=2e-3)


def test_segment_ids_are_refused_where_they_cannot_apply():
    seg, valid = _segments(1, 8)
    mask = AttentionMask(key_valid=valid, segment_ids=seg)
    assert "segment" in cudnn_supported((1, 8, 2, 8), (1, 8, 2, 8), jnp.bfloat16, mask)
    assert "segment" in decode_supported((1, 1, 2, 8), (1, 8, 2, 8), mask.replace(q_offset=jnp.int32(3)))
    q = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, q, q, mask.replace(segment_ids=seg[:, :4]), impl="xla")
    cfg = DecoderConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, tie_word_embeddings=True)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="KV cache"):
        jax.jit(lambda m: m.hidden_states(jnp.zeros((1, 8), jnp.int32), segment_ids=seg,
                                          cache=m.init_cache(1, 8)))(model)


@pytest.mark.parametrize("impl,scan_layers", [("xla", True), pytest.param("chunked", False, marks=pytest.mark.slow)])
def test_packed_forward_equals_separate_forwards(impl, scan_layers):
    cfg = DecoderConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attention_impl=impl, attention_chunk_size=4,
                        scan_layers=scan_layers, sliding_window=4, model_type="qwen2",
                        layer_types=("sliding_attention", "full_attention"))
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 40, n).astype(np.int32) for n in (5, 3, 6)]
    t = 16
    tok, seg, pos, valid = (np.zeros((1, t), np.int32), np.full((1, t), -1, np.int32), np.zeros((1, t), np.int32),
                            np.zeros((1, t), bool))
    o = 0
    for i, s in enumerate(seqs):
        tok[0, o:o + len(s)], seg[0, o:o + len(s)] = s, i
        pos[0, o:o + len(s)], valid[0, o:o + len(s)] = np.arange(len(s)), True
        o += len(s)
    packed = jax.jit(lambda m, *a: m.hidden_states(a[0], positions=a[1], attention_mask=a[2], segment_ids=a[3]))(
        model, tok, pos, valid, seg)
    one = jax.jit(lambda m, x: m.hidden_states(x))
    o = 0
    for s in seqs:
        np.testing.assert_allclose(np.asarray(packed[0, o:o + len(s)]), np.asarray(one(model, s[None])[0]), atol=2e-6)
        o += len(s)
