"""Attention logit soft-capping (Gemma 2): every implementation equals the dense reference, gradients included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.models.llm.attention import AttentionMask, attention, select_impl


def _reference(q, k, v, allowed, scale, cap):
  b, t, h, hd = q.shape
  kh = k.shape[2]
  kk = jnp.repeat(k, h // kh, axis=2)
  vv = jnp.repeat(v, h // kh, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, kk, precision="highest") * scale
  s = cap * jnp.tanh(s / cap)
  s = jnp.where(allowed[:, None], s, -1e30)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", p, vv, precision="highest")


def _inputs(t=12, s=12):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, t, 4, 8)) * 3, jnp.float32)  # large scores: the cap is active
  k = jnp.asarray(rng.standard_normal((2, s, 2, 8)) * 3, jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, s, 2, 8)), jnp.float32)
  valid = np.ones((2, s), bool)
  valid[0, :3] = False
  return q, k, v, jnp.asarray(valid)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_softcap_prefill_and_gradients(impl):
  q, k, v, valid = _inputs()
  mask = AttentionMask(key_valid=valid, window=5)
  allowed = mask.dense(q.shape[1])

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(valid[:, :, None, None], fn(q, k, v), 0.0) ** 2)

  ours = lambda q, k, v: attention(q, k, v, mask, scale=0.3, impl=impl, chunk_size=4, softcap=5.0)  # noqa: E731
  ref = lambda q, k, v: _reference(q, k, v, allowed, 0.3, 5.0)  # noqa: E731
  rows = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(ours(q, k, v))[rows], np.asarray(ref(q, k, v))[rows], atol=2e-5)
  for a, b in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
  # the cap changes the result (the test would not see a missing cap otherwise)
  uncapped = attention(q, k, v, mask, scale=0.3, impl=impl, chunk_size=4)
  assert float(jnp.max(jnp.abs(uncapped - ours(q, k, v))[rows])) > 1e-2


def test_softcap_decode_and_splash():
  q, k, v, valid = _inputs(t=1, s=16)
  mask = AttentionMask(key_valid=valid, q_offset=jnp.int32(11))
  ref = _reference(q, k, v, mask.dense(1), 0.3, 5.0)
  out = attention(q, k, v, mask, scale=0.3, impl="decode", softcap=5.0, decode_block=4)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
  q, k, v, valid = _inputs(t=16, s=16)
  valid = jnp.ones_like(valid).at[0, :3].set(False)
  mask = AttentionMask(key_valid=valid)
  ref = _reference(q, k, v, mask.dense(16), 0.3, 5.0)
  out = attention(q, k, v, mask, scale=0.3, impl="splash", interpret=True, softcap=5.0)
  rows = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=2e-4)


def test_softcap_never_picks_cudnn():
  m = AttentionMask(key_valid=jnp.ones((1, 4096), bool))
  args = dict(platform="gpu", q_shape=(1, 4096, 8, 64), k_shape=(1, 4096, 8, 64), dtype=jnp.bfloat16, mask=m)
  assert select_impl("auto", **args) == "cudnn"
  assert select_impl("auto", softcap=50.0, **args) == "chunked"
