"""Flax NNX causal LM for the Llama / Qwen2 / Qwen3 (dense and MoE) and Gemma 2 / 3 families (numerics of
transformers 5.23).

Shapes: B batch, T new tokens, S key slots (T without a cache, the cache length with one), D hidden,
H query heads, K kv heads, G = H // K, hd head_dim, F intermediate, V vocab.

Parameter layout (logical axis names in the `out_sharding` metadata of every `nnx.Param`):

==============================  =================  ===================================
parameter                       shape              logical axes
==============================  =================  ===================================
embed_tokens.embedding          [V, D]             ('vocab', 'embed')
layers[i].self_attn.q_proj      kernel [D, H, hd]  ('embed', 'heads', 'head_dim')
layers[i].self_attn.k/v_proj    kernel [D, K, hd]  ('embed', 'kv_heads', 'head_dim')
layers[i].self_attn.o_proj      kernel [H, hd, D]  ('heads', 'head_dim', 'embed')
layers[i].mlp.gate/up_proj      kernel [D, F]      ('embed', 'mlp')
layers[i].mlp.down_proj         kernel [F, D]      ('mlp', 'embed')
*norm*.weight                   [D] or [hd]        ('norm',)
lm_head.kernel (untied only)    [D, V]             ('embed', 'vocab')
layers[i].mlp.gate.kernel       [D, E]             ('embed', None)         (sparse layers: the router)
layers[i].mlp.experts.gate/up_proj  [E, D, F_e]    ('expert', 'embed', 'mlp')
layers[i].mlp.experts.down_proj [E, F_e, D]        ('expert', 'mlp', 'embed')
==============================  =================  ===================================

Mixture-of-experts layers (`DecoderConfig.num_experts`, see `adrpo_jax.models.llm.moe`): the `mlp` of a sparse layer
is a `SparseMoeBlock` (router, dropless experts, Qwen2-MoE's shared expert). `CausalLM.forward_with_routing` returns
the hidden states with each sparse layer's routing record (`moe.MoEAux`, stacked [L_moe, ...]) and routes with given
experts (`expert_indices` [B, T, L_moe, k], router replay); `hidden_states` / `__call__` are the same computation
without the record. Layouts that mix sparse and dense layers use the list layout (`scan_layers=False`).

Gemma (`norm_unit_offset`, `scale_embeddings`, `sandwich_norm`): `(1 + w)` norms, embeddings times sqrt(D), the
attention output and the MLP output normalized before their residual add (`post_attention_layernorm`,
`post_feedforward_layernorm`) and the MLP input by `pre_feedforward_layernorm`; attention soft-capping and scale
from the config; the final-logit soft-capping lives in `lm_head_lora` (the one hook every path from hidden states
to logits goes through: `logits`, the sampler, the chunked log-probs); Gemma 3's sliding layers rotate with their
own rope base (per layer inside the scan).

Layer layout (`DecoderConfig.scan_layers`, default True): the L decoder layers are one
`StackedDecoderLayers` module whose parameters have a leading [L] axis named 'layers' (left unsharded by
the sharding rules), e.g. `layers.self_attn.q_proj.kernel [L, D, H, hd] ('layers', 'embed', 'heads',
'head_dim')`, run by one `jax.lax.scan` (per-layer remat inside it), so compile time does not grow with depth;
the KV cache is stacked the same way (keys/values [L, B, K, S, hd]). `model.layers[i]` is then a detached copy of
layer i (for inspection). With `scan_layers=False` the layers are an `nnx.List` (paths `layers.{i}.…`).
Both layouts draw identical weights from the same `rngs` and read/write the same HF checkpoints.

LoRA (`adrpo_jax.models.lora.apply_lora`): every `Dense` is a site (`layers.{i}.self_attn.{q,k,v,o}_proj`,
`layers.{i}.mlp.{gate,up,down}_proj`, `lm_head` when untied); its adapter lives at `<site>.lora` and the
3-D attention kernels get `A [in dims..., r]`, `B [r, out dims...]`. With stacked layers a site such as
`layers.self_attn.q_proj` stands for its L per-layer paths (`LoRASite.layer_paths`, what `target_modules`
matches, all layers or none) and its adapter is stacked too (`A [L, in dims..., r]`, `B [L, r, out dims...]`);
`lora_state_dict` writes per-layer names, so adapters move between the layouts.

Attention masks are structured (`adrpo_jax.models.llm.attention.AttentionMask`: per-key validity, the slot
of the first query, causal, window), never a dense [B, T, S] tensor unless the chosen implementation needs
one. Causality is over *slots* (token index in the sequence / cache), padding is a per-key mask, and
rotary positions are separate per-row integers (HF convention for left padding: `positions_from_mask`).
Padded query rows produce finite garbage (never NaN) that callers mask out.

Numerics: float32 logits match transformers to ~1e-6 on CPU. On GPU, XLA's default precision for float32
matmuls is reduced (TF32-like): measured on an H100, max |diff| 2e-2 on the tiny test models; with
`jax.config.update("jax_default_matmul_precision", "highest")` the 1e-4 parity tests pass there too.
Attention runs the implementation `config.attention_impl` picks (`adrpo_jax.models.llm.attention`; 'auto'
by default: memory linear in T from `chunked` on CPU for long sequences, cuDNN / splash kernels on GPU / TPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, cast

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax.models.llm.activation_sharding import constrain_batch, embedding_lookup
from adrpo_jax.models.llm.attention import AttentionMask, attend, attention  # noqa: F401  (attend: re-export)
from adrpo_jax.models.llm.config import DecoderConfig, rope_inv_freq, rope_inv_freq_local
from adrpo_jax.models.llm.moe import SparseMoeBlock, stack_aux
from adrpo_jax.models.lora import add_lora, add_lora_matrix
from adrpo_jax.models.stacking import stack_variables, unstacked_copy

Array = jax.Array

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def positions_from_mask(mask: Array) -> Array:
  """Rotary positions for a (left-)padded batch: `clip(cumsum(mask) - 1, 0)` (HF convention), int32 [B, T].

  >>> positions_from_mask(jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)).tolist()
  [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
  """
  mask = jnp.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"mask must be [batch, time], got shape {mask.shape}")
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------------
# KV cache: a plain pytree of arrays (functional; returned updated by every cached call).
# ------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class KVCache:
  """Key/value cache of all layers.

  Attributes:
    keys, values: [L, B, K, S, hd] arrays for a `scan_layers=True` model (the batch axis is 1), or tuples of L
      per-layer [B, K, S, hd] arrays for the list layout (rotary already applied to keys). Heads before slots:
      a decode step's two attention products read the cache in place (`attention(..., kv_heads_first=True)`);
      with slots first, XLA copies the whole cache into that order at every step.
    mask: [B, S] bool, True where a slot holds a real (non-padding) token.
    index: [] int32, number of slots written so far (the next call writes at `index`).
    next_position: [B] int32, rotary position of the next real token of each row.
  """

  keys: Array | tuple[Array, ...]
  values: Array | tuple[Array, ...]
  mask: Array
  index: Array
  next_position: Array

  @classmethod
  def create(cls, config: DecoderConfig, batch_size: int, max_length: int, dtype: Any = None) -> "KVCache":
    """An empty cache of `max_length` slots; `dtype` defaults to the config's compute dtype."""
    if batch_size <= 0 or max_length <= 0:
      raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be positive")
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
    keys: Array | tuple[Array, ...]
    values: Array | tuple[Array, ...]
    if config.scan_layers:
      keys = jnp.zeros((config.num_hidden_layers,) + shape, dtype)
      values = jnp.zeros((config.num_hidden_layers,) + shape, dtype)
    else:
      keys = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
      values = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    return cls(keys=keys, values=values,
               mask=jnp.zeros((batch_size, max_length), bool), index=jnp.zeros((), jnp.int32),
               next_position=jnp.zeros((batch_size,), jnp.int32))

  @property
  def max_length(self) -> int:
    return self.mask.shape[1]

  @property
  def stacked(self) -> bool:
    """True for the stacked layout (keys/values [L, B, K, S, hd]), False for per-layer tuples."""
    return not isinstance(self.keys, (tuple, list))


# ------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("shape", "dtype", "std"))
def _normal_init(key, *, shape, dtype, std):
  # One fused compilation per (shape, dtype, std) instead of eager normal / scale / cast ops.
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _param(rngs: nnx.Rngs | None, shape, names, dtype, *, init: str, std: float = 0.02) -> nnx.Param:
  shape, dtype = tuple(int(s) for s in shape), jnp.dtype(dtype)
  if init == "normal":
    if rngs is None:
      raise ValueError("init='normal' needs rngs")
    value = _normal_init(rngs.params(), shape=shape, dtype=dtype, std=float(std))
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    raise ValueError(init)
  return nnx.Param(value, out_sharding=tuple(names))


class RMSNorm(nnx.Module):
  """y = weight * x / sqrt(mean(x^2) + eps), statistics in float32 (HF `LlamaRMSNorm`); with `unit_offset`
  (Gemma) y = (1 + weight) * normed computed in float32 then cast (weight initialized to 0)."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, unit_offset: bool = False):
    self.weight = _param(None, (dim,), ("norm",), param_dtype, init="zeros" if unit_offset else "ones")
    self.eps = eps
    self.dtype = dtype
    self.unit_offset = bool(unit_offset)

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.unit_offset:
      return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(self.dtype)
    return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def projection(equation: str, x: Array, kernel: Array, preferred_element_type: Any = None) -> Array:
  """`jnp.einsum(equation, x, kernel)` for a projection `x [batch dims..., in dims...] @ kernel [in dims...,
  out dims...]` (e.g. 'btd,df->btf', 'btd,dhk->bthk', 'bthk,hkd->btd'), with the kernel's gradient computed as
  `einsum('<x>,<y>->kernel', x, dy)`: one contraction over the batch dims of two operands in their natural layout.
  (Autodiff's transpose of the einsum computes it as a dot against dy transposed; XLA:CPU materializes that
  transposed dy inside the fusion that produces it -- the SiLU backward of the MLP -- with strided writes, ~35% of
  a backward pass: the custom rule makes the update of a 4-layer, 256-wide model 1.5x faster on CPU.) Same
  values: x's gradient is autodiff's own, the kernel's the same sum (equal to the last bit in float32 on CPU).
  `preferred_element_type` as in `jnp.einsum` (e.g. float32 logits of bfloat16 inputs).
  """
  return jnp.einsum(equation, x, kernel, preferred_element_type=preferred_element_type)


def _projection_fwd(equation, x, kernel, preferred_element_type):
  return projection(equation, x, kernel, preferred_element_type), (x, kernel)


def _projection_bwd(equation, preferred_element_type, res, dy):
  x, kernel = res
  dx = jax.vjp(lambda x_: jnp.einsum(equation, x_, kernel, preferred_element_type=preferred_element_type),
               x)[1](dy)[0]
  inputs, out = equation.split("->")
  x_sub, k_sub = inputs.split(",")
  dk = jnp.einsum(f"{x_sub},{out}->{k_sub}", x, dy, preferred_element_type=kernel.dtype)
  return dx, dk.astype(kernel.dtype)


projection.defvjp(_projection_fwd, _projection_bwd)


class Dense(nnx.Module):
  """`y = einsum(equation, x, kernel) (+ bias)` in the compute dtype, with named parameter axes (the einsum is
  `projection`, whose kernel gradient contracts the batch dims directly)."""

  def __init__(self, equation: str, kernel_shape, kernel_axes, *, bias_shape=None, bias_axes=None,
               dtype, param_dtype, std: float, rngs: nnx.Rngs):
    self.equation = equation
    self.dtype = dtype
    self.kernel = _param(rngs, kernel_shape, kernel_axes, param_dtype, init="normal", std=std)
    self.bias = (_param(None, bias_shape, bias_axes, param_dtype, init="zeros")
                 if bias_shape is not None else None)

  def lora_kernels(self) -> dict[str, str]:
    """LoRA protocol (`adrpo_jax.models.lora`): the kernel and the einsum it is applied with."""
    return {"kernel": self.equation}

  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    y = add_lora(self, "kernel", x, projection(self.equation, x, self.kernel[...].astype(self.dtype)))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  def __init__(self, vocab_size: int, dim: int, *, dtype, param_dtype, std: float, rngs: nnx.Rngs):
    self.embedding = _param(rngs, (vocab_size, dim), ("vocab", "embed"), param_dtype, init="normal", std=std)
    self.dtype = dtype

  def __call__(self, tokens: Array) -> Array:
    # on a mesh: looked up on the table's fsdp shards, then batch-sharded (activation_sharding.embedding_lookup)
    return embedding_lookup(self.embedding[...], tokens).astype(self.dtype)


def _rotate_half(x: Array) -> Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def rotary_cos_sin(positions: Array, inv_freq: np.ndarray, scale: float, dtype) -> tuple[Array, Array]:
  """cos, sin [B, T, hd] for integer positions [B, T] (HF half-rotation layout, computed in float32)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, T, heads, hd] rotated by cos/sin [B, T, hd]."""
  return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


class Attention(nnx.Module):
  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    d, h, k, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config._head_dim
    common = dict(dtype=config.dtype, param_dtype=config.param_dtype, std=config.initializer_range, rngs=rngs)
    qkv_bias = config.attention_bias
    self.q_norm: RMSNorm | None
    self.k_norm: RMSNorm | None
    self.q_proj = Dense("btd,dhk->bthk", (d, h, hd), ("embed", "heads", "head_dim"),
                        bias_shape=(h, hd) if qkv_bias else None, bias_axes=("heads", "head_dim"), **common)
    self.k_proj = Dense("btd,dhk->bthk", (d, k, hd), ("embed", "kv_heads", "head_dim"),
                        bias_shape=(k, hd) if qkv_bias else None, bias_axes=("kv_heads", "head_dim"), **common)
    self.v_proj = Dense("btd,dhk->bthk", (d, k, hd), ("embed", "kv_heads", "head_dim"),
                        bias_shape=(k, hd) if qkv_bias else None, bias_axes=("kv_heads", "head_dim"), **common)
    self.o_proj = Dense("bthk,hkd->btd", (h, hd, d), ("heads", "head_dim", "embed"),
                        bias_shape=(d,) if config.attention_out_bias else None, bias_axes=("embed",), **common)
    if config.qk_norm:
      norm = dict(eps=config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                  unit_offset=config.norm_unit_offset)
      self.q_norm = RMSNorm(hd, **norm)
      self.k_norm = RMSNorm(hd, **norm)
    else:
      self.q_norm = self.k_norm = None
    self.scale = config.attention_scale  # hd ** -0.5, or query_pre_attn_scalar ** -0.5 (Gemma)
    self.softcap = config.attn_logit_softcapping
    self.attention_impl = config.attention_impl
    self.attention_chunk_size = config.attention_chunk_size
    self.attention_auto_min_len = config.attention_auto_min_len

  def __call__(self, x, cos, sin, allowed, kv_cache=None, index=None):
    """x [B, T, D] -> [B, T, D] under the `AttentionMask` `allowed`; with `kv_cache=(k [B,K,S,hd], v)` the
    new keys/values are written at slot `index` and the updated pair is returned as well. In the layer scan
    `kv_cache=(k [L,B,K,S,hd], v, layer)`: the stacked caches of all layers, written in place at (layer, index)
    and returned as the same 3-tuple."""
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if self.q_norm is not None and self.k_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if kv_cache is not None and len(kv_cache) == 3:
      # the stacked cache of all layers (k [L,B,S,K,hd], v, this layer's index), carried through the layer scan:
      # write only the new slots in place and read this layer's keys/values (no copy of the whole cache per step)
      cache_k, cache_v, layer_index = kv_cache
      start = (layer_index, 0, 0, index, 0)
      cache_k = jax.lax.dynamic_update_slice(cache_k, jnp.swapaxes(k, 1, 2)[None].astype(cache_k.dtype), start)
      cache_v = jax.lax.dynamic_update_slice(cache_v, jnp.swapaxes(v, 1, 2)[None].astype(cache_v.dtype), start)
      out = attention(q, cache_k, cache_v, allowed, scale=self.scale, impl=self.attention_impl,
                      chunk_size=self.attention_chunk_size, auto_min_len=self.attention_auto_min_len,
                      layer_index=layer_index, softcap=self.softcap, kv_heads_first=True)
      return self.o_proj(out), (cache_k, cache_v, layer_index)  # out is in q's dtype
    if kv_cache is not None:  # [B, K, S, hd]: the new [B, T, K, hd] keys/values go in at slots index .. + T - 1
      cache_k, cache_v = kv_cache
      start = (0, 0, index, 0)
      k = jax.lax.dynamic_update_slice(cache_k, jnp.swapaxes(k, 1, 2).astype(cache_k.dtype), start)
      v = jax.lax.dynamic_update_slice(cache_v, jnp.swapaxes(v, 1, 2).astype(cache_v.dtype), start)
      kv_cache = (k, v)
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), allowed, scale=self.scale, impl=self.attention_impl,
                    chunk_size=self.attention_chunk_size, auto_min_len=self.attention_auto_min_len,
                    softcap=self.softcap, kv_heads_first=kv_cache is not None)
    return self.o_proj(out), kv_cache


class MLP(nnx.Module):
  """SwiGLU: down(act(gate(x)) * up(x))."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    common = dict(dtype=config.dtype, param_dtype=config.param_dtype, std=config.initializer_range, rngs=rngs)
    bias = config.mlp_bias
    self.gate_proj = Dense("btd,df->btf", (d, f), ("embed", "mlp"), bias_shape=(f,) if bias else None,
                           bias_axes=("mlp",), **common)
    self.up_proj = Dense("btd,df->btf", (d, f), ("embed", "mlp"), bias_shape=(f,) if bias else None,
                         bias_axes=("mlp",), **common)
    self.down_proj = Dense("btf,fd->btd", (f, d), ("mlp", "embed"), bias_shape=(d,) if bias else None,
                           bias_axes=("embed",), **common)
    self.act = config.hidden_act

  def __call__(self, x: Array) -> Array:
    return self.down_proj(_ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, layer_idx: int = 0):
    norm = dict(eps=config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                unit_offset=config.norm_unit_offset)
    self.input_layernorm = RMSNorm(config.hidden_size, **norm)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
    self.mlp: SparseMoeBlock | MLP
    self.pre_feedforward_layernorm: RMSNorm | None
    self.post_feedforward_layernorm: RMSNorm | None
    if config.moe_layers[layer_idx]:  # a sparse layer (router + experts)
      self.mlp = SparseMoeBlock(config, rngs=rngs)
    else:
      self.mlp = MLP(config, rngs=rngs)
    if config.sandwich_norm:  # Gemma: post_attention_layernorm normalizes the attention output instead
      self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)
      self.post_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)
    else:
      self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None

  def forward(self, x, cos, sin, allowed, kv_cache=None, index=None, *, token_valid=None, expert_indices=None):
    """(x, kv_cache, `MoEAux` of a sparse layer or None); token_valid [B, T] counts the routing statistics,
    expert_indices [B, T, k] routes a sparse layer with these experts (router replay)."""
    attn, kv_cache = self.self_attn(self.input_layernorm(x), cos, sin, allowed, kv_cache, index)
    if self.pre_feedforward_layernorm is not None:
      x = x + self.post_attention_layernorm(attn)
      h = self.pre_feedforward_layernorm(x)
    else:
      x = x + attn
      h = self.post_attention_layernorm(x)
    aux = None
    if isinstance(self.mlp, SparseMoeBlock):
      h, aux = self.mlp.forward(h, token_valid=token_valid, expert_indices=expert_indices)
    else:
      h = self.mlp(h)
    if self.post_feedforward_layernorm is not None:
      h = self.post_feedforward_layernorm(h)
    return x + h, kv_cache, aux

  def __call__(self, x, cos, sin, allowed, kv_cache=None, index=None):
    return self.forward(x, cos, sin, allowed, kv_cache, index)[:2]


# scan_layers='auto' (and the sampler's `unroll_layers=None`) run the layers of a stacked model unrolled up to
# this depth and size of its layer weights: the unrolled program compiles in time that grows with depth (deep
# models keep the scan's flat compile time) and slices one transient copy of the layer weights.
AUTO_UNROLL_MAX_LAYERS = 16
AUTO_UNROLL_MAX_BYTES = 1 << 30


def unroll_fits(model: CausalLM) -> bool:
  """The size rule of the automatic choice: a stacked model of at most AUTO_UNROLL_MAX_LAYERS layers and
  AUTO_UNROLL_MAX_BYTES of layer weights (shapes only: works on traced and abstract models)."""
  layer_bytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(nnx.state(model.layers)))
  return len(model.layers) <= AUTO_UNROLL_MAX_LAYERS and layer_bytes <= AUTO_UNROLL_MAX_BYTES


def runs_unrolled(model: CausalLM) -> bool:
  """True when a forward without a KV cache of this stacked model runs its layers unrolled (`CausalLM.unstacked`)
  instead of the layer scan: `scan_layers='auto'` and `unroll_fits`. (On CPU the update of a 4-layer, 256-wide
  model: 0.88 s scanned, 0.75 s unrolled.)"""
  return (model.config.scan_layers == "auto" and isinstance(model.layers, StackedDecoderLayers)
          and unroll_fits(model))


def _remat_layer_call(layer: DecoderLayer, x, cos, sin, allowed, token_valid=None, expert_indices=None):
  x, _, aux = layer.forward(x, cos, sin, allowed, token_valid=token_valid, expert_indices=expert_indices)
  return x, aux


def _remat_policy(config: DecoderConfig):
  return getattr(jax.checkpoint_policies, config.remat_policy) if config.remat_policy else None


class StackedDecoderLayers(DecoderLayer):
  """All L decoder layers as one module: the attributes of a `DecoderLayer`, every parameter with a leading
  [L] axis (logical name 'layers'); `scan` runs them with one `jax.lax.scan`.

  Built by drawing L `DecoderLayer`s in order (the same random draws as the list layout) and stacking their
  parameters. `len(stack)` is L; `stack[i]` is a detached copy of layer i as a `DecoderLayer` (for inspection:
  writes to it do not reach the stack).
  """

  lora_layer_stack = True  # LoRA: the projections inside are stacked sites (`adrpo_jax.models.lora.LoRASite`)

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    stack_variables(self, [DecoderLayer(config, rngs=rngs, layer_idx=i) for i in range(1, config.num_hidden_layers)])

  def __len__(self) -> int:
    return int(self.input_layernorm.weight.shape[0])

  def __getitem__(self, i: int) -> DecoderLayer:
    return cast(DecoderLayer, unstacked_copy(self, i, len(self), DecoderLayer, "layer"))

  def scan(self, x, cos, sin, allowed, *, windows, kv_cache=None, index=None, remat: bool = False, policy=None,
           local_rope=None, token_valid=None, expert_indices=None):
    """Runs the L layers over x [B, T, D] with one `jax.lax.scan`.

    Args:
      allowed: the `AttentionMask` without sliding windows (each layer's window is added inside the scan).
      windows: per layer, the sliding window or None (static); one window shared by every layer stays static
        (any attention implementation), different ones become a traced per-layer `window_array`.
      kv_cache: None or (keys, values) [L, B, K, S, hd]; index: the cache slot of the first new token.
      remat, policy: `jax.checkpoint` each layer (inside the scan) with this `jax.checkpoint_policies` policy.
      local_rope: None, or (per-layer bools, cos_local, sin_local): the layers marked True rotate with the local
        rope (Gemma 3's sliding layers), the others with `cos` / `sin`.
      token_valid: [B, T] bool for the routing statistics of sparse layers.
      expert_indices: None or [L, B, T, k]: route the (sparse) layers with these experts (router replay).
    Returns:
      (x, updated (keys, values) or None, stacked `MoEAux` [L, ...] of sparse layers or None).
    """
    from adrpo_jax.models.lora import lora_dropout_fold_in  # the per-layer dropout key of stacked adapters

    graphdef, state = nnx.split(self)
    n = len(self)
    has_window = len(set(windows)) > 1  # else one static window (or none) for all layers
    if not has_window and windows[0] is not None:
      allowed = allowed.replace(window=int(windows[0]))
    window_arr = jnp.asarray([0 if w is None else int(w) for w in windows], jnp.int32)
    flags, cos_l, sin_l = local_rope if local_rope is not None else ((False,) * n, None, None)
    if all(flags):  # every layer rotates with the local rope
      cos, sin = cos_l, sin_l
    mixed_rope = any(flags) and not all(flags)
    flag_arr = jnp.asarray(flags, bool)

    def body(carry, xs):
      x, kv = carry
      layer_state, window, layer_index, local, replay = xs
      x = constrain_batch(x)  # layer boundary: the carry stays batch-sharded under a mesh (no-op without)
      layer = nnx.merge(graphdef, layer_state)
      mask = allowed
      if has_window:  # window 0 = full attention in this layer
        mask = allowed.with_window_array(window)
      c, s = (jnp.where(local, cos_l, cos), jnp.where(local, sin_l, sin)) if mixed_rope else (cos, sin)
      with lora_dropout_fold_in(layer_index):
        x, kv, aux = DecoderLayer.forward(layer, x, c, s, mask, None if kv is None else (*kv, layer_index), index,
                                          token_valid=token_valid, expert_indices=replay)
      return (x, None if kv is None else kv[:2]), aux

    if remat:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    # The KV cache rides in the carry (not as scan xs -> ys, which copies the whole [L, B, K, S, hd] cache at
    # every decode step): each layer writes its new slots in place (`Attention`, the 3-tuple cache).
    kv = None if kv_cache is None else tuple(kv_cache)
    (x, kv), aux = jax.lax.scan(body, (x, kv), (state, window_arr, jnp.arange(n, dtype=jnp.int32), flag_arr,
                                                expert_indices))
    return x, kv, aux


# ------------------------------------------------------------------------------------------------------
# The causal LM
# ------------------------------------------------------------------------------------------------------
class CausalLM(nnx.Module):
  """Decoder-only causal LM (Llama / Qwen2 / Qwen3, their MoE variants, Gemma 2 / 3) in Flax NNX.

  Build fresh with `CausalLM(config, rngs=nnx.Rngs(0))` (no mesh needed; logical axis names are metadata)
  or from a Hugging Face directory with `adrpo_jax.models.llm.load_pretrained`.

  Entry points (all take int tokens [B, T]; `positions` [B, T] int32 and `attention_mask` [B, T] bool are
  optional, see `hidden_states`):
    * `model(tokens, ...)` -> logits [B, T, V] in the compute dtype; with `cache=` -> (logits, new_cache).
    * `model.hidden_states(tokens, ...)` -> [B, T, D] after the final norm (same cache convention).
    * `model.lm_head_matrix()` -> [D, V] (the embedding transposed when tied), so `logits = h @ W`.
    * `model.init_cache(batch_size, max_length)` -> empty `KVCache`.

  >>> cfg = DecoderConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
  ...                     num_attention_heads=2, tie_word_embeddings=True)
  >>> model = CausalLM(cfg, rngs=nnx.Rngs(0))
  >>> tokens = jnp.array([[0, 0, 5, 6], [1, 2, 3, 4]])
  >>> mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
  >>> forward = jax.jit(lambda m, t, a: m(t, attention_mask=a))  # jit it: eager op-by-op is slow
  >>> forward(model, tokens, mask).shape
  (2, 4, 16)
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    with nnx.use_eager_sharding(False):  # logical names stay metadata: the model builds without a mesh
      common = dict(dtype=config.dtype, param_dtype=config.param_dtype, std=config.initializer_range, rngs=rngs)
      self.embed_tokens = Embed(config.vocab_size, config.hidden_size, **common)
      self.layers: StackedDecoderLayers | nnx.List
      if config.scan_layers:
        self.layers = StackedDecoderLayers(config, rngs=rngs)
      else:
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs, layer_idx=i)
                                for i in range(config.num_hidden_layers)])
      self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=config.dtype,
                          param_dtype=config.param_dtype, unit_offset=config.norm_unit_offset)
      if config.tie_word_embeddings:
        self.lm_head = None
      else:
        self.lm_head = Dense("btd,dv->btv", (config.hidden_size, config.vocab_size), ("embed", "vocab"),
                             **common)
    inv_freq, rope_scale = rope_inv_freq(config)
    self._inv_freq = tuple(float(f) for f in inv_freq)  # static (hashable) metadata, not a parameter
    self._rope_scale = rope_scale
    local_freq, local_scale = rope_inv_freq_local(config)  # Gemma 3's sliding layers (else equal to the global)
    self._inv_freq_local = tuple(float(f) for f in local_freq)
    self._rope_scale_local = local_scale

  # -- helpers ------------------------------------------------------------------------------------------
  def unstacked(self) -> CausalLM:
    """This model in the list layout (`scan_layers=False`) over the same weights: layer i's parameters are the
    slices [i] of the stacked ones (a list-layout model is returned as is). Traceable: inside `jit` the slices are
    computed where this is called, once. The sampler decodes with it (`SamplingConfig.unroll_layers`): the body of
    a `lax.scan` over layers slices every layer's weights out of the stack into a fresh buffer, so each decode step
    of the scanned model copies all layer weights (on CPU a 4-layer, 256-wide model's step takes 1.4x the list
    layout's); sliced once before the decode loop, every step reads the weights in place. `scan_layers='auto'`
    runs the forward of a small model through it too (`runs_unrolled`). Same outputs as the stacked model (both
    layouts compute the same layers; LoRA dropout draws the scan's per-layer keys). Costs one transient copy of
    the layer weights.

    >>> cfg = DecoderConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
    ...                     num_attention_heads=2)
    >>> view = CausalLM(cfg, rngs=nnx.Rngs(0)).unstacked()
    >>> view.config.scan_layers, len(view.layers), view.layers[1].mlp.up_proj.kernel.shape
    (False, 2, (16, 16))
    """
    if not isinstance(self.layers, StackedDecoderLayers):
      return self
    view = nnx.merge(*nnx.split(self))  # a new module graph over the same arrays
    view.layers = nnx.List([self.layers[i] for i in range(len(self.layers))])
    view.config = dataclasses.replace(self.config, scan_layers=False)
    setattr(view, "_stacked_view", True)  # noqa: B010 (only the view has it: per-layer LoRA dropout keys as in the scan)
    return view

  def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    """Empty KV cache (`dtype` defaults to the compute dtype)."""
    return KVCache.create(self.config, batch_size, max_length, dtype)

  def lm_head_matrix(self) -> Array:
    """[D, V] output projection in the parameter dtype (the transposed embedding when tied). A LoRA adapter on
    lm_head is not in it: logits are `lm_head_lora(h, h @ W)`."""
    if self.lm_head is None:
      return self.embed_tokens.embedding[...].T
    return self.lm_head.kernel[...]

  def lm_head_lora(self, hidden: Array, logits: Array) -> Array:
    """`logits + s * (dropout(hidden) A) B` when lm_head has an enabled LoRA adapter (PEFT's definition, in
    the logits' dtype, as at every other site), else `logits`; hidden [..., D], logits [..., V]. Then the final-logit
    soft-capping `c * tanh(logits / c)` when `config.final_logit_softcapping` is set (Gemma 2): every path from
    hidden states to logits (`logits`, the sampler, the chunked log-probs) goes through this hook."""
    if self.lm_head is not None:
      logits = add_lora_matrix(self.lm_head, hidden, logits)
    cap = self.config.final_logit_softcapping
    if cap is not None:
      logits = (jnp.tanh(logits.astype(jnp.float32) / cap) * cap).astype(logits.dtype)
    return logits

  def logits(self, hidden: Array) -> Array:
    """[..., D] hidden states -> [..., V] logits in the compute dtype."""
    w = self.lm_head_matrix().astype(self.config.dtype)
    hidden = hidden.astype(self.config.dtype)
    return self.lm_head_lora(hidden, jnp.einsum("...d,dv->...v", hidden, w))

  def _check_inputs(self, tokens, positions, attention_mask, cache):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    for name, x in (("positions", positions), ("attention_mask", attention_mask)):
      if x is not None and tuple(x.shape) != tuple(tokens.shape):
        raise ValueError(f"{name} must have the shape of tokens {tokens.shape}, got {x.shape}")
    if cache is not None:
      if cache.mask.shape[0] != tokens.shape[0]:
        raise ValueError(f"cache batch {cache.mask.shape[0]} != tokens batch {tokens.shape[0]}")
      if tokens.shape[1] > cache.max_length:
        raise ValueError(f"{tokens.shape[1]} tokens do not fit a cache of {cache.max_length} slots")
      if not isinstance(cache.index, jax.core.Tracer):  # concrete: check the write (traced: see hidden_states)
        start = int(cache.index)
        if start + tokens.shape[1] > cache.max_length:
          raise ValueError(f"the cache has {start} of its {cache.max_length} slots written: {tokens.shape[1]} more "
                           f"tokens would write past its end (the write would be clamped onto the last slots, "
                           f"misaligning keys and queries); build a cache of at least {start + tokens.shape[1]} "
                           "slots (model.init_cache(batch, max_length))")
      if cache.stacked != bool(self.config.scan_layers):
        layout = lambda stacked: "stacked [L, B, K, S, hd]" if stacked else "per-layer list"  # noqa: E731
        raise ValueError(f"the cache has the {layout(cache.stacked)} layout but the model has scan_layers="
                         f"{self.config.scan_layers} ({layout(self.config.scan_layers)}): build it with "
                         "model.init_cache")
      if len(cache.keys) != len(self.layers):
        raise ValueError(f"cache has {len(cache.keys)} layers, the model {len(self.layers)}")

  # -- forward ------------------------------------------------------------------------------------------
  def hidden_states(self, tokens: Array, *, positions: Array | None = None,
                    attention_mask: Array | None = None, cache: KVCache | None = None,
                    embeds: Array | None = None, expert_indices: Array | None = None,
                    segment_ids: Array | None = None):
    """Final-norm hidden states [B, T, D] (compute dtype); with `cache`: (hidden, updated cache). See
    `forward_with_routing` (the same computation, which also returns the sparse layers' routing).

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] rotary positions. Default without a cache: `positions_from_mask(attention_mask)`
        (or 0..T-1 without a mask); with a cache: continue each row from `cache.next_position`.
      attention_mask: [B, T] bool, False on padding tokens (never attended to). Default all True.
      cache: a `KVCache`; the T new tokens are written at slots [cache.index, cache.index + T) and
        attend to every valid earlier slot. `cache.index + T > cache.max_length` raises a ValueError when
        `cache.index` is concrete (eager calls). Inside `jax.jit` the index is traced and cannot be checked:
        the write's start is then clamped by `dynamic_update_slice` (the new keys land in the last T slots while
        the queries still sit at `cache.index`: wrong logits, no error), so a jitted caller must size the cache
        itself, as `generate` does (P + N slots, at most P + N - 1 written).
      embeds: optional [B, T, hidden_size] input embeddings used instead of `embed_tokens(tokens)` (multimodal
        inputs, e.g. audio features spliced into the prompt; `tokens` still give the shapes). Cast to the
        compute dtype (not scaled by sqrt(D) for Gemma, as transformers' `inputs_embeds`).
      expert_indices: MoE models only: [B, T, L_moe, k] experts to route each token with in each sparse layer
        (router replay; the gates still come from the current router), e.g. `GenerationOutput.expert_indices`.
    """
    return self.forward_with_routing(tokens, positions=positions, attention_mask=attention_mask, cache=cache,
                                     embeds=embeds, expert_indices=expert_indices, segment_ids=segment_ids)[0]

  def forward_with_routing(self, tokens: Array, *, positions: Array | None = None,
                           attention_mask: Array | None = None, cache: KVCache | None = None,
                           embeds: Array | None = None, expert_indices: Array | None = None,
                           segment_ids: Array | None = None):
    """`(hidden_states(...), routing)`: routing is None for a dense model, else the sparse layers' `moe.MoEAux`
    stacked over them ([L_moe, ...]; `moe.expert_indices_layout(routing)` is the [B, T, L_moe, k] record that
    `expert_indices` takes back). Arguments as `hidden_states`; `segment_ids` [B, T] int (no cache): packed
    sequences, each token attends only tokens of its own segment (pass each segment's `positions`, restarting
    at 0: `adrpo_jax.rl.packing`)."""
    args = {k: v for k, v in locals().items() if k not in ("self", "tokens")}  # (first statement: the arguments)
    tokens = jnp.asarray(tokens)
    positions = None if positions is None else jnp.asarray(positions)
    attention_mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    self._check_inputs(tokens, positions, attention_mask, cache)
    if cache is None and runs_unrolled(self):  # scan_layers='auto', a small model: the layers unrolled
      return self.unstacked().forward_with_routing(tokens, **args)
    cfg = self.config
    sparse = [i for i, s in enumerate(cfg.moe_layers) if s]
    if expert_indices is not None:
      expert_indices = jnp.asarray(expert_indices)
      want = tokens.shape + (len(sparse), cfg.num_experts_per_tok)
      if not sparse:
        raise ValueError("expert_indices given to a model without sparse (MoE) layers")
      if tuple(expert_indices.shape) != want:
        raise ValueError(f"expert_indices must be [batch, time, moe_layers, k] = {want}, got shape "
                         f"{tuple(expert_indices.shape)}")
      if not jnp.issubdtype(expert_indices.dtype, jnp.integer):
        raise ValueError(f"expert_indices must be integers, got dtype {expert_indices.dtype}")
      expert_indices = jnp.moveaxis(expert_indices.astype(jnp.int32), 2, 0)  # [L_moe, B, T, k]
    b, t = tokens.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
    if cache is None:
      if positions is None:
        positions = (positions_from_mask(valid) if attention_mask is not None
                     else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
      key_valid, index = valid, None
    else:
      if positions is None:
        positions = cache.next_position[:, None] + positions_from_mask(valid)
      index = cache.index
      key_valid = jax.lax.dynamic_update_slice(cache.mask, valid, (0, index))
    stacked = isinstance(self.layers, StackedDecoderLayers)
    if segment_ids is not None:
      if cache is not None:
        raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
      segment_ids = jnp.asarray(segment_ids, jnp.int32)
      if tuple(segment_ids.shape) != (b, t):
        raise ValueError(f"segment_ids must have the shape of tokens {(b, t)}, got {tuple(segment_ids.shape)}")
    attn_mask = AttentionMask(key_valid=key_valid, q_offset=index,  # structured: no [B, T, S] tensor here
                              segment_ids=segment_ids)
    masks = {w: dataclasses.replace(attn_mask, window=w)
             for w in (set() if stacked else set(cfg.layer_sliding_windows))}
    cos, sin = rotary_cos_sin(positions, np.asarray(self._inv_freq, np.float32), self._rope_scale, cfg.dtype)
    local_flags = cfg.layer_local_rope
    if any(local_flags):
      cos_l, sin_l = rotary_cos_sin(positions, np.asarray(self._inv_freq_local, np.float32), self._rope_scale_local,
                                    cfg.dtype)

    if embeds is None:
      x = self.embed_tokens(tokens)
    else:
      embeds = jnp.asarray(embeds)
      if tuple(embeds.shape) != (b, t, cfg.hidden_size):
        raise ValueError(f"embeds must be [batch, time, hidden_size] = {(b, t, cfg.hidden_size)}, got shape "
                         f"{tuple(embeds.shape)}")
      if not jnp.issubdtype(embeds.dtype, jnp.floating):
        raise ValueError(f"embeds must be floating point, got dtype {embeds.dtype}")
      x = embeds.astype(cfg.dtype)
    if cfg.scale_embeddings and embeds is None:  # Gemma: sqrt(D) in the compute dtype (not on given embeds, as HF)
      x = x * jnp.asarray(cfg.hidden_size ** 0.5, cfg.dtype)
    x = constrain_batch(x)  # batch-sharded activations under a mesh (activation_sharding)
    new_keys: Any = []  # per-layer lists, then tuples (or the scan's stacked arrays)
    new_values: Any = []
    use_remat = cfg.remat and cache is None
    routing = None
    # stacked: one lax.scan over the stacked layers (sliding windows applied per layer inside it)
    if isinstance(self.layers, StackedDecoderLayers):
      kv = None if cache is None else (cache.keys, cache.values)
      x, kv, routing = self.layers.scan(
          x, cos, sin, attn_mask, windows=cfg.layer_sliding_windows, kv_cache=kv, index=index, remat=use_remat,
          policy=_remat_policy(cfg), local_rope=(local_flags, cos_l, sin_l) if any(local_flags) else None,
          token_valid=valid if sparse else None, expert_indices=expert_indices)
      if cache is not None:
        new_keys, new_values = kv
    if use_remat and not stacked:
      layer_fn = nnx.remat(_remat_layer_call, policy=_remat_policy(cfg))
    auxes = []
    # the unrolled view of a stacked model (`unstacked`) keeps the scan's per-layer LoRA dropout keys
    from adrpo_jax.models.lora import lora_dropout_fold_in  # pylint: disable=import-outside-toplevel
    fold = lora_dropout_fold_in if getattr(self, "_stacked_view", False) else (lambda i: contextlib.nullcontext())
    unrolled: Sequence[DecoderLayer] = () if isinstance(self.layers, StackedDecoderLayers) else self.layers
    for i, layer in enumerate(unrolled):
      allowed = masks[cfg.layer_sliding_windows[i]]
      x = constrain_batch(x) if i else x  # layer boundary (after the embedding's constraint): batch-sharded
      c, s = (cos_l, sin_l) if local_flags[i] else (cos, sin)
      moe_kw = {}
      if cfg.moe_layers[i]:
        moe_kw = dict(token_valid=valid, expert_indices=None if expert_indices is None
                      else expert_indices[sparse.index(i)])
      if cache is not None:
        x, (k, v), aux = layer.forward(x, c, s, allowed, (cache.keys[i], cache.values[i]), index, **moe_kw)
        new_keys.append(k)
        new_values.append(v)
      elif use_remat:
        with fold(i):
          x, aux = layer_fn(layer, x, c, s, allowed, **moe_kw)
      else:
        with fold(i):
          x, _, aux = layer.forward(x, c, s, allowed, **moe_kw)
      if aux is not None:
        auxes.append(aux)
    if not stacked:
      routing = stack_aux(auxes)
    x = self.norm(x)
    if cache is None:
      return x, routing
    if not stacked:
      new_keys, new_values = tuple(new_keys), tuple(new_values)
    assert index is not None  # = cache.index
    new_cache = KVCache(keys=new_keys, values=new_values, mask=key_valid, index=index + t,
                        next_position=cache.next_position + jnp.sum(valid, axis=1, dtype=jnp.int32))
    return (x, new_cache), routing

  def __call__(self, tokens: Array, *, positions: Array | None = None, attention_mask: Array | None = None,
               cache: KVCache | None = None, embeds: Array | None = None):
    """Logits [B, T, V] in the compute dtype; with `cache`: (logits, updated cache). See `hidden_states`."""
    out = self.hidden_states(tokens, positions=positions, attention_mask=attention_mask, cache=cache,
                             embeds=embeds)
    if cache is None:
      return self.logits(out)
    hidden, cache = out
    return self.logits(hidden), cache
