"""Attention implementations behind one function, `attention(q, k, v, mask, impl=...)`.

The mask is *structured* (`AttentionMask`), never a dense [B, T, S] tensor unless an implementation needs
one: query i of the call sits at slot `q_offset + i`, key j at slot j, and query slot a may attend key slot
b iff `key_valid[:, b]` and (causal) `b <= a` and (window) `a - b < window`. Rotary positions never enter
here (they are applied to q/k before), so per-row positions and left padding need nothing more; the
KV-cache decode step is `q_offset = cache.index` with `key_valid = cache.mask`. Query rows that may attend
no key at all (padding) give finite values (never NaN) that callers mask out; what they hold differs
between implementations.

Logit soft-capping (Gemma 2, `softcap=c`): the scaled scores become `c * tanh(scores / c)` before the mask and
the softmax, in every implementation (splash through its `attn_logits_soft_cap`; cuDNN has none, so a soft-capped
call never picks it).

Implementations (`DecoderConfig.attention_impl`):

=========  ==============================================================================================
`xla`      the reference: [B, K, G, T, S] float32 scores, softmax, weighted sum (quadratic memory).
`chunked`  flash-style online softmax over blocks of `chunk_size` queries x keys (`lax.map` over query
           blocks, `lax.scan` over key blocks), float32 accumulators, and a custom VJP that recomputes each
           block's probabilities from the saved log-sum-exp (FlashAttention-2 backward), so forward *and*
           backward memory are linear in T. Block pairs the slot rules rule out entirely (above the causal
           diagonal, outside the window) are skipped with `lax.cond` (a scalar test, no communication). Pure JAX.
`cudnn`    `jax.nn.dot_product_attention(implementation="cudnn")` (GPU; float16/bfloat16; GQA native;
           left padding as a boolean mask). Used for the calls it supports (a prefill without a cache);
           cached calls (decode) take the `auto` choice among decode / xla / chunked.
`splash`   Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) with segment
           ids for padding; same scope as `cudnn` (prefill without a cache). `interpret=True` runs it on CPU.
`decode`   the KV-cache step (a cached causal call, few queries): a `fori_loop` with a traced trip count
           over key blocks up to the last query's slot (`q_offset + T - 1`; from the window's first block
           with a window), online softmax, so a step reads the filled part of the static cache only.
           Forward only. Calls it cannot run (no cache) take the `auto` fallback.
`auto`     on CPU/GPU, `decode` for cached causal calls with T <= DECODE_MAX_T over S >= `auto_decode_min_len`
           slots; splash on TPU, cudnn on GPU where the shapes/dtypes allow, otherwise chunked when
           T * S >= `auto_min_len`**2 or when xla's float32 scores of one device, b * H * T * S * 4 bytes
           (b = the rows per device), reach `auto_max_score_bytes` (AUTO_MAX_SCORE_BYTES, 256 MiB); xla below
           (on TPU the decode step stays on xla).
=========  ==============================================================================================
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash", "decode")
# `auto` leaves xla for chunked when one device's [b, H, T, S] float32 scores reach this many bytes (xla also holds
# the softmax of the same size): e.g. a cached prefill of 64 rows x 32 heads x 512 x 1,536 slots is 6 GiB.
AUTO_MAX_SCORE_BYTES = 256 * 2 ** 20
_NEG = float(np.finfo(np.float32).min)


@flax.struct.dataclass
class AttentionMask:
  """Structured attention mask (a pytree; `causal` and `window` are static).

  Attributes:
    key_valid: [B, S] bool, False on padding / unwritten cache slots.
    q_offset: None (the queries are slots 0..T-1, a prefill without a cache) or an int32 scalar (may be
      traced: the cache index) giving the slot of the first query.
    causal: key slot <= query slot.
    window: None or a positive int: query slot - key slot < window (sliding-window attention).
    window_array: None or an int32 scalar (may be traced, e.g. per layer inside a scan over layers): a
      window like `window` where the value is > 0, no window where it is <= 0. Implementations that need
      a static mask (cudnn, splash) are not used when it is set.
    segment_ids: None or [B, S] int (calls without a cache: query slot i is key slot i): packed sequences, a
      query attends only keys of its own segment (`segment_ids[:, a] == segment_ids[:, b]`), on top of the
      rules above (xla, chunked, splash; not cudnn / decode).
  """

  key_valid: Array
  q_offset: Array | None = None
  window_array: Array | None = None
  segment_ids: Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=True)
  window: int | None = flax.struct.field(pytree_node=False, default=None)

  def with_window_array(self, window_array) -> "AttentionMask":
    """This mask with a (traced) per-layer window (<= 0: none)."""
    return dataclasses.replace(self, window_array=jnp.asarray(window_array, jnp.int32))

  def dense(self, q_len: int) -> Array:
    """The equivalent dense boolean mask [B, T, S] (what `xla` uses)."""
    return dense_mask(self.key_valid, q_len, q_offset=self.q_offset, causal=self.causal, window=self.window,
                      window_array=self.window_array, segment_ids=self.segment_ids)


def _slot_rules(q_slots, k_slots, causal, window, window_array):
  """[T, C] bool from the slot rules (None when nothing restricts)."""
  dist = q_slots[:, None] - k_slots[None, :]
  rules = []
  if causal:
    rules.append(dist >= 0)
  if window is not None:
    rules.append(dist < window)
  if window_array is not None:
    rules.append((window_array <= 0) | (dist < window_array))
  return functools.reduce(jnp.logical_and, rules) if rules else None


def dense_mask(key_valid: Array, q_len: int, *, q_offset=None, causal: bool = True, window=None,
               window_array=None, segment_ids=None) -> Array:
  """[B, T, S] bool: query slot `q_offset + i` may attend key slot j (see the module doc)."""
  s = key_valid.shape[1]
  q_slots = jnp.arange(q_len) + (0 if q_offset is None else q_offset)
  allowed = _slot_rules(q_slots, jnp.arange(s), causal, window, window_array)
  if allowed is None:
    allowed = jnp.ones((q_len, s), bool)
  allowed = allowed[None, :, :] & key_valid[:, None, :]
  if segment_ids is not None:
    seg_q = jax.lax.dynamic_slice_in_dim(segment_ids, 0 if q_offset is None else q_offset, q_len, axis=1)
    allowed = allowed & (seg_q[:, :, None] == segment_ids[:, None, :])
  return allowed


def _soft_cap(scores: Array, softcap: float | None) -> Array:
  """`softcap * tanh(scores / softcap)` (Gemma 2's attention logit soft-capping); `scores` itself for None."""
  return scores if softcap is None else jnp.tanh(scores / softcap) * softcap


def validate_impl(impl: str, name: str = "attention_impl") -> str:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"{name}={impl!r} is not an attention implementation; use one of {IMPLEMENTATIONS}")
  return impl


# ------------------------------------------------------------------------------------------------------
# xla: the reference
# ------------------------------------------------------------------------------------------------------
def attend(q: Array, k: Array, v: Array, allowed: Array, *, scale: float, softcap: float | None = None,
           kv_heads_first: bool = False) -> Array:
  """Grouped-query attention with a dense boolean mask; scores and softmax in float32 (the reference).

  Args:
    q: [B, T, H, hd]; k, v: [B, S, K, hd] with K dividing H (query head h uses kv head h // G), or
      [B, K, S, hd] with `kv_heads_first` (the KV cache's layout: both products then read k and v in place).
    allowed: [B, T, S] bool.
    softcap: None or c > 0: scores -> c * tanh(scores / c) before the mask (Gemma 2).
  Returns:
    [B, T, H, hd] in v's dtype.
  """
  b, t, h, hd = q.shape
  kv = k.shape[1 if kv_heads_first else 2]
  kv_spec = "bksd" if kv_heads_first else "bskd"
  q = q.reshape(b, t, kv, h // kv, hd)
  scores = _soft_cap(jnp.einsum(f"btkgd,{kv_spec}->bkgts", q, k, preferred_element_type=jnp.float32) * scale,
                     softcap)
  scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkgts,{kv_spec}->btkgd", probs, v)
  return out.reshape(b, t, h, hd)


# ------------------------------------------------------------------------------------------------------
# chunked: online softmax over key blocks, custom VJP (FlashAttention-2 style), memory linear in T
# ------------------------------------------------------------------------------------------------------
def _key_blocks(k, v, key_valid, c):
  """[n, B, c, K, hd] key/value blocks and [n, B, c] validity (S padded to n * c with invalid slots)."""
  b, s, kh, hd = k.shape
  n = -(-s // c)
  pad = n * c - s
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    key_valid = jnp.pad(key_valid, ((0, 0), (0, pad)))
  split = lambda x: jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)  # noqa: E731
  return split(k), split(v), split(key_valid), n


def _block_allowed(valid_j, j, c, q_slots, causal, window, window_array, seg_q=None, seg_j=None):
  """[B, 1, 1, T, c] bool for key block j (`seg_q` [B, T], `seg_j` [B, c]: packed segments, or None)."""
  rules = _slot_rules(q_slots, j * c + jnp.arange(c), causal, window, window_array)
  allowed = valid_j[:, None, :]  # [B, 1, c]
  if rules is not None:
    allowed = allowed & rules[None]
  if seg_q is not None:
    allowed = allowed & (seg_q[:, :, None] == seg_j[:, None, :])
  return allowed[:, None, None, :, :]


def _segment_blocks(segment_ids, t, cq, c):
  """Query blocks [nq, B, cq] and key blocks [n, B, c] of [B, S] segment ids (padded with -1: nothing attends
  a padded key), or (None, None)."""
  if segment_ids is None:
    return None, None
  b, s = segment_ids.shape
  n = -(-s // c)
  keys = jnp.pad(segment_ids, ((0, 0), (0, n * c - s)), constant_values=-1)
  return _query_blocks(segment_ids[:, :t], t, cq), jnp.moveaxis(keys.reshape(b, n, c), 1, 0)


def _block_needed(q_lo, q_hi, k_lo, k_hi, valid_j, causal, window, window_array):
  """Scalar bool: may any query slot in [q_lo, q_hi] attend a key of the block [k_lo, k_hi]? From the slot rules
  only (scalars: causal, window). Key validity is [B, c] with B sharded over the mesh's batch axes: reducing it to
  one predicate would be a cross-device all-reduce per block pair (and would skip a block only when no row of
  the global batch had a valid key in it); invalid keys are masked inside the block instead."""
  del valid_j
  needed = jnp.bool_(True)
  if causal:
    needed = needed & (k_lo <= q_hi)
  if window is not None:
    needed = needed & (q_lo - k_hi < window)
  if window_array is not None:
    needed = needed & ((window_array <= 0) | (q_lo - k_hi < window_array))
  return needed


def _query_blocks(x, t, cq):
  """[B, T, ...] -> [nq, B, cq, ...] (T padded to nq * cq with zeros)."""
  nq = -(-t // cq)
  if nq * cq != t:
    x = jnp.pad(x, ((0, 0), (0, nq * cq - t)) + ((0, 0),) * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], nq, cq, *x.shape[2:]), 1, 0)


def _chunked_fwd_core(q, k, v, key_valid, q_offset, window_array, scale, causal, window, chunk_size,
                      softcap=None, segment_ids=None):
  """Output [B, T, H, hd] and log-sum-exp [nq, B, K, G, cq] (float32), blocks of `chunk_size` queries and
  keys; (query block, key block) pairs that the mask rules out entirely are skipped (`lax.cond`)."""
  b, t, h, hd = q.shape
  kh = k.shape[2]
  g = h // kh
  c, cq = min(chunk_size, k.shape[1]), min(chunk_size, t)
  qb = _query_blocks(q.reshape(b, t, kh, g, hd), t, cq)  # [nq, B, cq, K, G, hd]
  kb, vb, validb, n = _key_blocks(k, v, key_valid, c)
  segqb, segkb = _segment_blocks(segment_ids, t, cq, c)

  def q_block(args):
    q_i, i, seg_q = args
    q_lo = q_offset + i * cq
    q_slots = q_lo + jnp.arange(cq)

    def body(carry, xs):
      # The barrier ties the block's mask to this block's keys: without it XLA hoists the (layer-invariant)
      # masks of all blocks out of an enclosing scan over layers, a [blocks, B, K, G, T, c] = O(T * S) tensor.
      kj, vj, valid_j, j, seg_j = jax.lax.optimization_barrier(xs)

      def compute(carry):
        m, l, acc = carry
        s = _soft_cap(jnp.einsum("bqkgd,bckd->bkgqc", q_i, kj, preferred_element_type=jnp.float32) * scale,
                      softcap)
        allowed = _block_allowed(valid_j, j, c, q_slots, causal, window, window_array, seg_q, seg_j)
        s = jnp.where(allowed, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgqc,bckd->bkgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

      needed = _block_needed(q_lo, q_lo + cq - 1, j * c, j * c + c - 1, valid_j, causal, window, window_array)
      return jax.lax.cond(needed, compute, lambda carry: carry, carry), None

    init = (jnp.full((b, kh, g, cq), _NEG, jnp.float32), jnp.zeros((b, kh, g, cq), jnp.float32),
            jnp.zeros((b, kh, g, cq, hd), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, (kb, vb, validb, jnp.arange(n), segkb))
    has = l > 0
    out = acc / jnp.where(has, l, 1.0)[..., None]  # fully masked rows: 0
    return out, jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), 0.0)

  nq = qb.shape[0]
  out, lse = jax.lax.map(q_block, (qb, jnp.arange(nq), segqb))  # [nq, B, K, G, cq, hd], [nq, B, K, G, cq]
  out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, nq * cq, h, hd)[:, :t].astype(v.dtype)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _chunked(q, k, v, key_valid, q_offset, window_array, scale, causal, window, chunk_size, softcap=None,
             segment_ids=None):
  return _chunked_fwd_core(q, k, v, key_valid, q_offset, window_array, scale, causal, window, chunk_size,
                           softcap, segment_ids)[0]


def _chunked_fwd(q, k, v, key_valid, q_offset, window_array, scale, causal, window, chunk_size, softcap=None,
                 segment_ids=None):
  out, lse = _chunked_fwd_core(q, k, v, key_valid, q_offset, window_array, scale, causal, window, chunk_size,
                               softcap, segment_ids)
  return out, (q, k, v, key_valid, q_offset, window_array, out, lse, segment_ids)


def _chunked_bwd(scale, causal, window, chunk_size, softcap, res, d_out):
  """FlashAttention-2 backward: per key block (outer scan) and query block (inner scan), the probabilities
  are recomputed from the saved log-sum-exp; dK, dV accumulate in the inner carry, dQ over key blocks."""
  q, k, v, key_valid, q_offset, window_array, out, lse, segment_ids = res
  b, t, h, hd = q.shape
  s_len, kh = k.shape[1], k.shape[2]
  g = h // kh
  c, cq = min(chunk_size, s_len), min(chunk_size, t)
  cdt = v.dtype
  blocks = lambda x: _query_blocks(x.reshape(b, t, kh, g, hd), t, cq)  # noqa: E731  [nq, B, cq, K, G, hd]
  qb, dob = blocks(q), blocks(d_out.astype(jnp.float32))
  delta = jnp.einsum("nbqkgd,nbqkgd->nbkgq", dob, blocks(out).astype(jnp.float32))  # [nq, B, K, G, cq]
  dob = dob.astype(cdt)
  kb, vb, validb, n = _key_blocks(k, v, key_valid, c)
  segqb, segkb = _segment_blocks(segment_ids, t, cq, c)
  nq = qb.shape[0]

  def k_block(dq_all, kxs):
    def body(dkv, xs):
      # barrier: see _chunked_fwd_core (keeps the masks per block, inside the loops)
      (kj, vj, valid_j, j, seg_j), (q_i, do_i, lse_i, delta_i, i, seg_q) = jax.lax.optimization_barrier((kxs, xs))
      q_lo = q_offset + i * cq

      def compute(dkv):
        dk_j, dv_j = dkv
        s = jnp.einsum("bqkgd,bckd->bkgqc", q_i, kj, preferred_element_type=jnp.float32) * scale
        if softcap is not None:  # d(c tanh(s / c)) / ds = 1 - tanh(s / c)^2
          tanh = jnp.tanh(s / softcap)
          s, cap_grad = tanh * softcap, 1.0 - tanh * tanh
        allowed = _block_allowed(valid_j, j, c, q_lo + jnp.arange(cq), causal, window, window_array, seg_q, seg_j)
        p = jnp.where(allowed, jnp.exp(jnp.where(allowed, s, _NEG) - lse_i[..., None]), 0.0)
        dv_j = dv_j + jnp.einsum("bkgqc,bqkgd->bckd", p.astype(cdt), do_i, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgd,bckd->bkgqc", do_i, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_i[..., None]) * scale
        if softcap is not None:
          ds = ds * cap_grad
        ds = ds.astype(cdt)
        dk_j = dk_j + jnp.einsum("bkgqc,bqkgd->bckd", ds, q_i, preferred_element_type=jnp.float32)
        dq_i = jnp.einsum("bkgqc,bckd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
        return (dk_j, dv_j), dq_i

      def skip(dkv):
        return dkv, jnp.zeros((b, cq, kh, g, hd), jnp.float32)

      needed = _block_needed(q_lo, q_lo + cq - 1, j * c, j * c + c - 1, valid_j, causal, window, window_array)
      return jax.lax.cond(needed, compute, skip, dkv)

    zeros = jnp.zeros((b, c, kh, hd), jnp.float32)
    (dk_j, dv_j), dq_parts = jax.lax.scan(body, (zeros, zeros), (qb, dob, lse, delta, jnp.arange(nq), segqb))
    return dq_all + dq_parts, (dk_j, dv_j)

  dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(qb.shape, jnp.float32), (kb, vb, validb, jnp.arange(n), segkb))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * c, kh, hd)[:, :s_len]  # noqa: E731
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, nq * cq, h, hd)[:, :t].astype(q.dtype)
  return dq, unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None, None, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q: Array, k: Array, v: Array, mask: AttentionMask, *, scale: float,
                      chunk_size: int = 512, softcap: float | None = None) -> Array:
  """Memory-efficient attention (see the module doc): same contract as `attend(q, k, v, mask.dense(T))`."""
  if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
  q_offset = jnp.zeros((), jnp.int32) if mask.q_offset is None else jnp.asarray(mask.q_offset, jnp.int32)
  window_array = None if mask.window_array is None else jnp.asarray(mask.window_array, jnp.int32)
  segment_ids = None if mask.segment_ids is None else jnp.asarray(mask.segment_ids, jnp.int32)
  return _chunked(q, k, v, jnp.asarray(mask.key_valid, bool), q_offset, window_array, float(scale),
                  bool(mask.causal), mask.window, int(chunk_size), None if softcap is None else float(softcap),
                  segment_ids)


# ------------------------------------------------------------------------------------------------------
# decode: the KV-cache step, reading only the key blocks that hold written slots
# ------------------------------------------------------------------------------------------------------
DECODE_BLOCK = 256  # key slots per block of `decode`
DECODE_MAX_T = 16  # `auto` uses `decode` for cached causal calls with at most this many queries


def decode_supported(q_shape, k_shape, mask: AttentionMask) -> str | None:
  """None when `decode` can run this call (a causal call with a KV cache), else the reason it cannot."""
  if mask.q_offset is None:
    return "decode attention needs a KV cache (mask.q_offset, the cache index)"
  if mask.segment_ids is not None:
    return "decode attention has no packed segments (segment_ids)"
  if not mask.causal:
    return "decode attention is causal only (it reads key slots up to the last query's slot)"
  return None


def decode_attention(q: Array, k: Array, v: Array, mask: AttentionMask, *, scale: float,
                     block_size: int = DECODE_BLOCK, layer_index: Array | None = None,
                     softcap: float | None = None, kv_heads_first: bool = False) -> Array:
  """Attention of T queries at cache slots `q_offset .. q_offset + T - 1` over a static KV cache [B, S],
  reading only the key blocks that the causal rule (and a window) can reach: a `lax.fori_loop` with a
  traced trip count over blocks `lo .. ceil((q_offset + T) / block) - 1` (online softmax, float32
  accumulators, GQA, per-row key validity, static or traced sliding window). So a decode step costs
  O(filled slots), not O(S), in compute and memory traffic. Forward only (the loop's trip count is dynamic,
  so it has no reverse-mode derivative; the update's log-probs run without a cache and never come here).

  Same contract as `attend(q, k, v, mask.dense(T))`; rows with no allowed key give zeros. With `layer_index`,
  k and v are the stacked caches of all layers [L, B, S, K, hd] and layer `layer_index` is read block by block
  (no copy of the layer's cache: the scanned decoder's decode step). With `kv_heads_first`, k and v are
  [(L,) B, K, S, hd] (the KV cache's layout) and the blocks are read in that layout.
  """
  seq = 2 if kv_heads_first else 1  # the slot axis of one layer's [B, S, K, hd] / [B, K, S, hd]
  if layer_index is not None:
    def take(x, start, size):  # one layer's block of `size` slots from the stack
      starts = [layer_index, 0, 0, 0, 0]
      starts[1 + seq] = start
      sizes = list(x.shape)
      sizes[0], sizes[1 + seq] = 1, size
      return jax.lax.dynamic_slice(x, starts, sizes)[0]
    k_shape = k.shape[1:]
  else:
    def take(x, start, size):
      return jax.lax.dynamic_slice_in_dim(x, start, size, axis=seq)
    k_shape = k.shape
  if kv_heads_first:
    k_shape = (k_shape[0], k_shape[2], k_shape[1], k_shape[3])  # the [B, S, K, hd] shape of the checks below
  reason = decode_supported(q.shape, k_shape, mask)
  if reason is not None:
    raise ValueError(f"attention_impl='decode' cannot run this call: {reason}")
  if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 1:
    raise ValueError(f"block_size={block_size!r} must be a positive int")
  b, t, h, hd = q.shape
  s, kh = k_shape[1], k_shape[2]
  g = h // kh
  c = min(int(block_size), s)
  n = -(-s // c)
  q_offset = jnp.asarray(mask.q_offset, jnp.int32)
  key_valid = jnp.asarray(mask.key_valid, bool)
  window_array = None if mask.window_array is None else jnp.asarray(mask.window_array, jnp.int32)
  q_slots = q_offset + jnp.arange(t)
  qg = q.reshape(b, t, kh, g, hd)
  kv_spec = "bkcd" if kv_heads_first else "bckd"

  hi = jnp.clip((q_offset + t + c - 1) // c, 0, n)  # blocks past the last query's slot hold no allowed key
  lo = jnp.zeros((), jnp.int32)
  if mask.window is not None:
    lo = jnp.maximum(lo, (q_offset - int(mask.window) + 1) // c)
  if window_array is not None:
    lo = jnp.maximum(lo, jnp.where(window_array > 0, (q_offset - window_array + 1) // c, 0))
  lo = jnp.clip(lo, 0, hi)

  def body(j, carry):
    m, l, acc = carry
    start = jnp.minimum(j * c, s - c)  # the last block may overlap the one before: slots < j * c are masked
    kj = take(k, start, c).astype(q.dtype)  # [B, c, K, hd] ([B, K, c, hd] with kv_heads_first)
    vj = take(v, start, c).astype(q.dtype)
    valid_j = jax.lax.dynamic_slice_in_dim(key_valid, start, c, axis=1)  # [B, c]
    k_slots = start + jnp.arange(c)
    rules = _slot_rules(q_slots, k_slots, True, mask.window, window_array) & (k_slots >= j * c)[None, :]
    allowed = (valid_j[:, None, :] & rules[None])[:, None, None]  # [B, 1, 1, T, c]
    sc = _soft_cap(jnp.einsum(f"btkgd,{kv_spec}->bkgtc", qg, kj, preferred_element_type=jnp.float32) * scale,
                   softcap)
    sc = jnp.where(allowed, sc, _NEG)
    m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
    p = jnp.where(allowed, jnp.exp(sc - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum(f"bkgtc,{kv_spec}->bkgtd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
    return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

  init = (jnp.full((b, kh, g, t), _NEG, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
          jnp.zeros((b, kh, g, t, hd), jnp.float32))
  _, l, acc = jax.lax.fori_loop(lo, hi, body, init)
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, K, G, T, hd]; fully masked rows: 0
  out_dtype = q.dtype if layer_index is not None else v.dtype
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, hd).astype(out_dtype)


# ------------------------------------------------------------------------------------------------------
# cudnn (GPU) and splash (TPU)
# ------------------------------------------------------------------------------------------------------
def cudnn_supported(q_shape, k_shape, dtype, mask: AttentionMask, softcap: float | None = None) -> str | None:
  """None when `cudnn` can run this call, else the reason (a sentence) it cannot."""
  if softcap is not None:
    return "cuDNN attention has no logit soft-capping"
  if mask.segment_ids is not None:
    return "cuDNN attention is not wired for packed segments (segment_ids)"
  t, hd, s = q_shape[1], q_shape[3], k_shape[1]
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"cuDNN flash attention needs float16/bfloat16 inputs, got {jnp.dtype(dtype).name}"
  if hd % 8 or hd > 128:
    return f"cuDNN flash attention needs head_dim <= 128 and a multiple of 8, got {hd}"
  if mask.q_offset is not None or t != s:
    return "cuDNN attention is used for a prefill without a KV cache only"
  if mask.window_array is not None:
    return "cuDNN attention needs a static window (window_array is set)"
  if t % 2:
    return f"cuDNN flash attention with a mask needs an even sequence length, got {t}"
  return None


def cudnn_arguments(q: Array, k: Array, v: Array, mask: AttentionMask, *, scale: float) -> dict[str, Any]:
  """Keyword arguments of `jax.nn.dot_product_attention` for `mask` (GQA is native: k/v keep K heads).

  Left padding is a boolean key mask [B, 1, T, S] (cuDNN's sequence lengths only describe right padding);
  causality and the window are cuDNN's own (`is_causal`, `local_window_size=(window - 1, 0)`).
  """
  t = q.shape[1]
  key_mask = jnp.broadcast_to(jnp.asarray(mask.key_valid, bool)[:, None, None, :],
                              (q.shape[0], 1, t, k.shape[1]))
  args = dict(query=q, key=k, value=v, mask=key_mask, scale=float(scale), is_causal=bool(mask.causal),
              implementation="cudnn")
  if mask.window is not None:
    args["local_window_size"] = (int(mask.window) - 1, 0)
  return args


def cudnn_attention(q, k, v, mask: AttentionMask, *, scale: float, softcap: float | None = None) -> Array:
  reason = cudnn_supported(q.shape, k.shape, q.dtype, mask, softcap)
  if reason is not None:
    raise ValueError(f"attention_impl='cudnn' cannot run this call: {reason}")
  return jax.nn.dot_product_attention(**cudnn_arguments(q, k, v, mask, scale=scale))


def _target_platform() -> str:
  from adrpo_jax.models.llm.activation_sharding import target_platform  # local: no import cycle at load
  return target_platform()


def splash_supported(q_shape, k_shape, mask: AttentionMask) -> str | None:
  if mask.q_offset is not None or q_shape[1] != k_shape[1]:
    return "splash attention is used for a prefill without a KV cache only"
  if not mask.causal:
    return "splash attention is wired for causal masks only"
  if mask.window_array is not None:
    return "splash attention needs a static window (window_array is set)"
  return None


def splash_attention(q: Array, k: Array, v: Array, mask: AttentionMask, *, scale: float,
                     block_size: int = 512, interpret: bool = False, softcap: float | None = None) -> Array:
  """Pallas TPU splash attention (vmapped over the batch; GQA native). Padding: segment ids (1 real, 0
  padding, so a padding query attends padding keys and no row is empty); T is padded to a multiple of the
  block (a multiple of 128) with padding slots.

  On a mesh (the caller's abstract mesh or the one in q's type) the kernel runs inside ``jax.shard_map``: rows
  over the mesh's batch axes, heads over ``tensor`` when both head counts divide (a Mosaic kernel cannot be
  partitioned by GSPMD: without it the TPU compiler refuses the call)."""
  from adrpo_jax.models.llm import activation_sharding  # local: no import cycle at load

  reason = splash_supported(q.shape, k.shape, mask)
  if reason is not None:
    raise ValueError(f"attention_impl='splash' cannot run this call: {reason}")
  seg = jnp.asarray(mask.key_valid, jnp.int32)
  if mask.segment_ids is not None:  # packed: segment s -> s + 2 on valid slots (1 is never a real segment here)
    seg = jnp.where(seg > 0, jnp.asarray(mask.segment_ids, jnp.int32) + 2, 0)
  kw: dict[str, Any] = dict(window=mask.window, scale=scale, block_size=block_size, interpret=interpret,
                            softcap=softcap)
  mesh = activation_sharding.current_mesh(q)
  rows = activation_sharding.batch_axes(q.shape[0], q)
  types = dict(zip(mesh.axis_names, mesh.axis_types)) if mesh is not None else {}
  heads = ("tensor" if types.get("tensor") == jax.sharding.AxisType.Auto and mesh.shape["tensor"] > 1
           and q.shape[2] % mesh.shape["tensor"] == 0 and k.shape[2] % mesh.shape["tensor"] == 0 else None)
  if not rows and heads is None:
    return _splash_local(q, k, v, seg, **kw)
  qkv = P(rows or None, None, heads, None)

  def local(q_: Array, k_: Array, v_: Array, seg_: Array) -> Array:
    return _splash_local(q_, k_, v_, seg_, **kw)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows or None)), out_specs=qkv, check_vma=False)
  return fn(q, k, v, seg)


def _splash_local(q: Array, k: Array, v: Array, seg: Array, *, window, scale: float, block_size: int,
                  interpret: bool, softcap: float | None) -> Array:
  """:func:`splash_attention` on one device's rows and heads (``seg``: [b, T] segment ids, 0 = padding)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # local: TPU-only kernel

  b, t, h, hd = q.shape
  block = min(int(block_size), 128 * -(-t // 128))
  block = max(128, block - block % 128)
  tp = block * -(-t // block)
  if tp != t:
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    seg = jnp.pad(seg, ((0, 0), (0, tp - t)))
  one: Any  # a splash-attention mask
  if window is None:
    one = sa.CausalMask((tp, tp))
  else:
    one = sa.LocalMask((tp, tp), window_size=(int(window) - 1, 0), offset=0)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = sa.make_splash_mha_single_device(sa.MultiHeadMask([one] * h), block_sizes=sizes,
                                            interpret=interpret,
                                            attn_logits_soft_cap=None if softcap is None else float(softcap))
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, heads, hd] -> [B, heads, T, hd]
  qs = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype))

  def one_row(q_, k_, v_, seg_):
    return kernel(q_, k_, v_, sa.SegmentIds(q=seg_, kv=seg_))

  out = jax.vmap(one_row)(qs, heads_first(k), heads_first(v), seg)
  return heads_first(out)[:, :t].astype(v.dtype)


# ------------------------------------------------------------------------------------------------------
# Selection and the one entry point
# ------------------------------------------------------------------------------------------------------
def xla_score_bytes(q_shape, k_shape, mask: AttentionMask | None = None) -> int:
  """Bytes of xla's float32 scores [b, H, T, S] on one device: b = the rows per device of the current mesh
  (`activation_sharding.rows_per_device`, read from `mask.key_valid`'s mesh), all B rows without a mesh."""
  from adrpo_jax.models.llm.activation_sharding import rows_per_device  # local: no import cycle at load
  b, t, h = q_shape[0], q_shape[1], q_shape[2]
  rows = rows_per_device(b, None if mask is None else mask.key_valid)
  return int(rows) * int(h) * int(t) * int(k_shape[1]) * 4


def select_impl(impl: str, *, platform: str, q_shape, k_shape, dtype, mask: AttentionMask,
                auto_min_len: int = 1024, auto_decode_min_len: int = 512,
                softcap: float | None = None, auto_max_score_bytes: int = AUTO_MAX_SCORE_BYTES) -> str:
  """The implementation that runs a call: `impl` itself for xla / chunked, cudnn / splash / decode where
  they can run this call (else the auto fallback), and for `auto` (and cudnn's fallback): on CPU/GPU a
  cached causal call with
  T <= DECODE_MAX_T queries over a cache of S >= auto_decode_min_len slots takes `decode` (reads only the
  filled key blocks); splash on TPU, cudnn on GPU where allowed, then chunked when T * S >= auto_min_len**2 or
  when xla's scores on one device (`xla_score_bytes`: rows per device x H x T x S x 4) reach
  `auto_max_score_bytes`, else xla. (TPU decode stays on xla/chunked: a dynamic-trip-count loop of small blocks
  is slow there.)

  >>> m = AttentionMask(key_valid=jnp.ones((1, 4096), bool))
  >>> [select_impl("auto", platform=p, q_shape=(1, 4096, 8, 64), k_shape=(1, 4096, 8, 64),
  ...              dtype=jnp.bfloat16, mask=m) for p in ("cpu", "gpu", "tpu")]
  ['chunked', 'cudnn', 'splash']
  >>> d = AttentionMask(key_valid=jnp.ones((1, 4096), bool), q_offset=jnp.int32(7))
  >>> [select_impl("auto", platform=p, q_shape=(1, 1, 8, 64), k_shape=(1, 4096, 8, 64),
  ...              dtype=jnp.bfloat16, mask=d) for p in ("cpu", "gpu", "tpu")]
  ['decode', 'decode', 'xla']
  """
  validate_impl(impl)
  if impl in ("xla", "chunked"):
    return impl
  platform = platform.lower()
  if impl == "decode" and decode_supported(q_shape, k_shape, mask) is None:
    return "decode"
  if (impl in ("auto", "cudnn") and platform != "tpu" and q_shape[1] <= DECODE_MAX_T
      and k_shape[1] >= auto_decode_min_len and decode_supported(q_shape, k_shape, mask) is None):
    return "decode"
  if impl in ("auto", "splash") and (impl == "splash" or platform == "tpu"):
    if splash_supported(q_shape, k_shape, mask) is None:
      return "splash"
  if impl in ("auto", "cudnn") and (impl == "cudnn" or platform in ("gpu", "cuda")):
    if cudnn_supported(q_shape, k_shape, dtype, mask, softcap) is None:
      return "cudnn"
  if q_shape[1] * k_shape[1] >= auto_min_len ** 2:
    return "chunked"
  return "chunked" if xla_score_bytes(q_shape, k_shape, mask) >= auto_max_score_bytes else "xla"


def attention(q: Array, k: Array, v: Array, mask: AttentionMask, *, scale: float | None = None,
              impl: str = "auto", chunk_size: int = 512, auto_min_len: int = 1024,
              platform: str | None = None, interpret: bool = False, auto_decode_min_len: int = 512,
              decode_block: int = DECODE_BLOCK, layer_index: Array | None = None,
              softcap: float | None = None, kv_heads_first: bool = False) -> Array:
  """Grouped-query attention [B, T, H, hd] x [B, S, K, hd] -> [B, T, H, hd] (v's dtype) under `mask`.

  Args:
    q, k, v: queries [B, T, H, hd]; keys/values [B, S, K, hd], K dividing H.
    mask: the structured `AttentionMask`.
    scale: logit scale (default hd ** -0.5).
    impl: one of `IMPLEMENTATIONS` (see the module doc and `select_impl`).
    chunk_size: key slots per block of `chunked`. auto_min_len: `auto` uses chunked when T*S >= this**2.
    auto_decode_min_len: `auto` uses `decode` for cached calls (T <= DECODE_MAX_T) when S >= this (not TPU).
    decode_block: key slots per block of `decode`.
    platform: 'cpu' / 'gpu' / 'tpu' (default `activation_sharding.target_platform()`: the default backend, or
      the target of a plan compiling for another platform), for `auto`.
    interpret: run `splash` in Pallas interpret mode (CPU tests).
    softcap: None or c > 0: logit soft-capping `c * tanh(scores / c)` (Gemma 2), in every implementation.
    layer_index: k and v are the stacked caches of all layers [L, B, S, K, hd] and this (traced) layer attends;
      `decode` reads its blocks from the stack, the others slice the layer first. The output is in q's dtype.
    kv_heads_first: k and v are [B, K, S, hd] ([L, B, K, S, hd] with `layer_index`): the `KVCache` layout. `xla`
      and `decode` read it in place (a decode step's two products then need no transposed copy of the cache:
      on CPU such copies cost a third of the step); the other implementations get [B, S, K, hd] (one transpose).
  """
  def bskd(shape):  # the [B, S, K, hd] shape of a key/value shape in the given layout
    return tuple(shape) if not kv_heads_first or len(shape) != 4 else (shape[0], shape[2], shape[1], shape[3])

  if layer_index is not None:
    if k.ndim != 5 or k.shape != v.shape:
      layout = "[L, B, K, S, hd]" if kv_heads_first else "[L, B, S, K, hd]"
      raise ValueError(f"with layer_index, k and v must be stacked {layout}; got {k.shape}, {v.shape}")
    k_shape = bskd(k.shape[1:])
    chosen = select_impl(impl, platform=platform or _target_platform(), q_shape=q.shape, k_shape=k_shape,
                         dtype=q.dtype, mask=mask, auto_min_len=auto_min_len,
                         auto_decode_min_len=auto_decode_min_len, softcap=softcap)
    if chosen == "decode" and q.shape[-1] == k_shape[-1] and q.shape[2] % k_shape[2] == 0 \
        and mask.key_valid.shape == k_shape[:2]:
      scale = q.shape[-1] ** -0.5 if scale is None else scale
      return decode_attention(q, k, v, mask, scale=scale, block_size=decode_block, layer_index=layer_index,
                              softcap=softcap, kv_heads_first=kv_heads_first)
    k = jax.lax.dynamic_index_in_dim(k, layer_index, 0, keepdims=False).astype(q.dtype)
    v = jax.lax.dynamic_index_in_dim(v, layer_index, 0, keepdims=False).astype(q.dtype)
  k_shape, v_shape = bskd(k.shape), bskd(v.shape)
  if q.ndim != 4 or len(k_shape) != 4 or k_shape != v_shape or q.shape[-1] != k_shape[-1]:
    layout = "[B, K, S, hd] (kv_heads_first)" if kv_heads_first else "[B, S, K, hd]"
    raise ValueError(f"q must be [B, T, H, hd] and k, v {layout}; got {q.shape}, {k.shape}, {v.shape}")
  if q.shape[2] % k_shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k_shape[2]} kv heads")
  if mask.key_valid.shape != (k_shape[0], k_shape[1]):
    raise ValueError(f"mask.key_valid shape {mask.key_valid.shape} must be [B, S] = {k_shape[:2]}")
  if mask.window is not None and not (isinstance(mask.window, (int, np.integer)) and mask.window > 0):
    raise ValueError(f"window={mask.window!r} must be None or a positive int")
  if mask.segment_ids is not None and (mask.q_offset is not None or mask.segment_ids.shape != mask.key_valid.shape
                                       or q.shape[1] != k_shape[1]):
    raise ValueError(f"segment_ids (packed sequences) need a call without a KV cache and shape [B, S] = "
                     f"{tuple(mask.key_valid.shape)}; got shape {tuple(mask.segment_ids.shape)}, q_offset="
                     f"{mask.q_offset!r}, {q.shape[1]} queries over {k_shape[1]} keys")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  chosen = select_impl(impl, platform=platform or _target_platform(), q_shape=q.shape, k_shape=k_shape,
                       dtype=q.dtype, mask=mask, auto_min_len=auto_min_len,
                       auto_decode_min_len=auto_decode_min_len, softcap=softcap)
  if chosen == "decode":
    return decode_attention(q, k, v, mask, scale=scale, block_size=decode_block, softcap=softcap,
                            kv_heads_first=kv_heads_first)
  if chosen == "xla":
    return attend(q, k, v, mask.dense(q.shape[1]), scale=scale, softcap=softcap, kv_heads_first=kv_heads_first)
  if kv_heads_first:
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  if chosen == "chunked":
    return chunked_attention(q, k, v, mask, scale=scale, chunk_size=chunk_size, softcap=softcap)
  if chosen == "cudnn":
    return cudnn_attention(q, k, v, mask, scale=scale, softcap=softcap)
  return splash_attention(q, k, v, mask, scale=scale, interpret=interpret, softcap=softcap)
