"""`DecoderConfig`: one frozen, hashable configuration for the Llama / Qwen2 / Qwen3 (dense and mixture-of-experts)
and Gemma 2 / Gemma 3 (text) decoder families.

It is built from (and written back to) a Hugging Face `config.json` with `DecoderConfig.from_hf_config` /
`DecoderConfig.to_hf_config`. Both the transformers-5 layout (`rope_parameters`) and the older one
(`rope_theta` + `rope_scaling`) are read.

Family differences this config captures (transformers 5.23 `modeling_{llama,qwen2,qwen3}.py`):

=========  ===================  ==============  =======  ==========================
family     q/k/v bias           o_proj bias     q/k norm head_dim default
=========  ===================  ==============  =======  ==========================
llama      `attention_bias`     `attention_bias` no      hidden_size // heads
qwen2      always               never           no       hidden_size // heads
qwen3      `attention_bias`     `attention_bias` yes     128
qwen2_moe  `qkv_bias` (True)    never           no       hidden_size // heads
qwen3_moe  `attention_bias`     `attention_bias` yes     hidden_size // heads
gemma2     `attention_bias`     `attention_bias` no      256
gemma3_text `attention_bias`    `attention_bias` yes     256
=========  ===================  ==============  =======  ==========================

Mixture of experts (`qwen2_moe`, `qwen3_moe`; `num_experts > 0`): layer i is sparse iff `i not in mlp_only_layers`
and `(i + 1) % decoder_sparse_step == 0` (transformers' rule); a sparse layer routes each token to the top
`num_experts_per_tok` of `num_experts` SwiGLU experts of width `moe_intermediate_size` (softmax router in float32,
`norm_topk_prob` renormalizes the k gates), plus for qwen2_moe a shared expert of width
`shared_expert_intermediate_size` scaled by `sigmoid(x . w_gate)`. `adrpo_jax.models.llm.moe` computes it dropless.

Gemma (`gemma2`, `gemma3_text`; `gemma3` multimodal configs load their `text_config`): `(1 + w)` RMSNorm
(`norm_unit_offset`), embeddings times sqrt(hidden_size) in the compute dtype (`scale_embeddings`), norms before and
after attention and MLP (`sandwich_norm`), GeGLU with tanh GELU, attention scale `query_pre_attn_scalar ** -0.5`,
Gemma 2's attention / final-logit soft-capping, Gemma 3's q/k norm and its sliding layers' own rope base
(`rope_local_theta`, default rope there; the global layers use `rope_theta` and `rope_scaling`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma2", "gemma3_text")
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")
MOE_IMPLS = ("auto", "ragged", "megablox", "blocked", "dense")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
LAYER_TYPES = ("full_attention", "sliding_attention")
QWEN_DEFAULT_SLIDING_WINDOW = 4096  # transformers 5.23 Qwen2Config / Qwen3Config `sliding_window` default

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# transformers 5.23 config defaults of the Gemma families where config.json files omit the field
_GEMMA_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, rope_theta=10000.0, tie_word_embeddings=True, vocab_size=256000,
                   max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=None,
                        final_logit_softcapping=None, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        tie_word_embeddings=True, vocab_size=262_208, max_position_embeddings=131_072,
                        hidden_activation="gelu_pytorch_tanh", sliding_window_pattern=6, hidden_size=2304,
                        intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0),
}


def _canonical_dtype(value: Any, name: str) -> jnp.dtype:
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"{name}={value!r} is not a dtype; use one of {SUPPORTED_DTYPES}") from e
  if dtype.name not in SUPPORTED_DTYPES:
    raise ValueError(f"{name}={dtype.name!r} is not supported; use one of {SUPPORTED_DTYPES}")
  return dtype


def _freeze(value: Any) -> Any:
  """Dicts -> sorted tuples of items, lists -> tuples (recursively), so the config stays hashable."""
  if isinstance(value, Mapping):
    return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture + numerics of a decoder-only causal LM (Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Gemma 2,
  Gemma 3 text).

  Field names follow the Hugging Face config where one exists. The dataclass is frozen and hashable,
  so it can be a static argument of `jax.jit`.

  Attributes:
    model_type: 'llama', 'qwen2' or 'qwen3' (decides the defaults of `from_hf_config`).
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: sizes.
    num_key_value_heads: K, must divide `num_attention_heads` (grouped-query attention).
    head_dim: per-head size; None -> hidden_size // num_attention_heads.
    hidden_act: MLP gate activation (SwiGLU with 'silu').
    rms_norm_eps: epsilon of every RMSNorm.
    rope_theta: rotary base.
    rope_scaling: None or the HF rope dict (given as a dict, stored frozen as sorted items) with
      'rope_type' in ('default', 'linear', 'llama3', 'yarn') and its parameters.
    max_position_embeddings: the HF value (used by rope scaling defaults; never a hard limit here).
    attention_bias: bias on q/k/v projections. attention_out_bias: bias on o_proj.
    mlp_bias: bias on gate/up/down projections.
    qk_norm: RMSNorm over head_dim on q and k before rotary (Qwen3).
    tie_word_embeddings: logits use the input embedding matrix.
    sliding_window, layer_types: Qwen2/3 sliding-window attention; `layer_types[i]` is
      'full_attention' or 'sliding_attention' (None -> all full).
    max_window_layers: kept only to round-trip Qwen configs.
    initializer_range: stddev of the normal init of fresh weights.
    bos_token_id, eos_token_id (tuple), pad_token_id: special ids from the checkpoint (informational).
    dtype: computation dtype (activations, matmul inputs). param_dtype: storage dtype of parameters.
    remat: wrap every decoder layer in `nnx.remat` (gradient checkpointing) when not decoding with a cache.
    remat_policy: None (save nothing) or the name of a `jax.checkpoint_policies` attribute
      ('nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable', ...).
    scan_layers: True: stack the decoder layers along a leading 'layers' axis and run them with one
      `jax.lax.scan` (compile time independent of depth; KV cache [L, B, K, S, hd]). False: a Python list
      of layers (`model.layers[i]` is the live layer). 'auto' (default): the stacked layout of True, whose
      layers run unrolled when the model is small (`modeling.unroll_fits`: <= 16 layers and 1 GiB of layer
      weights; faster on CPU, where the scan's body copies each layer's weights out of the stack) and by the
      scan otherwise. HF checkpoints, parameter paths and results are the same in every case.
    attention_impl: 'auto' (default), 'xla', 'chunked', 'cudnn' or 'splash' (see
      `adrpo_jax.models.llm.attention`; 'auto' = splash on TPU, cudnn on GPU where the shapes allow, chunked
      when T * S >= attention_auto_min_len**2, xla below). Not written to config.json.
    attention_chunk_size: key slots per block of the 'chunked' implementation.
    attention_auto_min_len: 'auto' switches from xla to chunked at T * S >= this**2.
    num_experts: E, experts per sparse layer (0: a dense model). num_experts_per_tok: k, experts per token.
    moe_intermediate_size: F_e, each expert's SwiGLU width. norm_topk_prob: renormalize the k gates to sum 1.
    decoder_sparse_step, mlp_only_layers: which layers are sparse (see the module doc; dense ones use
      `intermediate_size`). shared_expert_intermediate_size: qwen2_moe's shared expert width (0: none).
    router_aux_loss_coef: kept only to round-trip the HF config (the RL losses have their own keys).
    moe_impl: how the experts run (`adrpo_jax.models.llm.moe`): 'auto', 'ragged' (`jax.lax.ragged_dot`),
      'megablox' (Pallas TPU grouped matmul), 'blocked' (row tiles of one expert each, pure JAX), 'dense' (every
      expert on every token: the reference). Not written to config.json. moe_block_size: rows per tile of
      'blocked' / 'megablox'.
    norm_unit_offset: RMSNorm computes `(1 + w) * normed` in float32 (Gemma). scale_embeddings: token embeddings
      times sqrt(hidden_size) in the compute dtype (Gemma). sandwich_norm: post-attention and pre/post-feedforward
      norms (Gemma: `post_attention_layernorm` then normalizes the attention output).
    query_pre_attn_scalar: attention scale `query_pre_attn_scalar ** -0.5` (None: head_dim).
    attn_logit_softcapping, final_logit_softcapping: None or c: `c * tanh(x / c)` on the attention scores /
      the output logits (Gemma 2).
    rope_local_theta: None, or the rope base of the sliding-window layers (Gemma 3: default rope there).

  >>> cfg = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
  ...                     num_attention_heads=4, num_key_value_heads=2)
  >>> cfg.head_dim, cfg.dtype.name, cfg.to_hf_config()["architectures"]
  (4, 'float32', ['LlamaForCausalLM'])
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  model_type: str = "llama"
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  max_position_embeddings: int = 2048
  attention_bias: bool = False
  attention_out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  max_window_layers: int | None = None
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str | None = None
  scan_layers: bool | str = "auto"
  attention_impl: str = "auto"
  attention_chunk_size: int = 512
  attention_auto_min_len: int = 1024
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  shared_expert_intermediate_size: int = 0
  router_aux_loss_coef: float = 0.001
  moe_impl: str = "auto"
  moe_block_size: int = 128
  norm_unit_offset: bool = False
  scale_embeddings: bool = False
  sandwich_norm: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  rope_local_theta: float | None = None

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_key_value_heads={self.num_key_value_heads} must be positive and divide "
          f"num_attention_heads={self.num_attention_heads}")
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                         f"{self.num_attention_heads}; set head_dim explicitly")
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be a positive even number (rotary embeddings)")
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTIVATIONS}")
    if not self.rms_norm_eps > 0:
      raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
    set_("dtype", _canonical_dtype(self.dtype, "dtype"))
    set_("param_dtype", _canonical_dtype(self.param_dtype, "param_dtype"))
    # rope scaling: dict -> frozen items; validated here so that a bad config fails at construction.
    scaling = self.rope_scaling
    if isinstance(scaling, Mapping):
      scaling = dict(scaling)
    elif scaling is not None:
      scaling = dict(scaling)  # already-frozen tuple of items
    if scaling is not None:
      rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
      scaling.pop("rope_theta", None)
      if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling rope_type={rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}")
      if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_scaling partial_rotary_factor={scaling['partial_rotary_factor']} is not supported")
      scaling.pop("partial_rotary_factor", None)
      if rope_type == "default":
        scaling = None
      else:
        needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                  "yarn": ()}[rope_type]
        missing = [k for k in needed if k not in scaling]
        if missing:
          raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
        scaling["rope_type"] = rope_type
        if rope_type in ("llama3", "yarn"):
          scaling.setdefault("original_max_position_embeddings", self.max_position_embeddings)
    set_("rope_scaling", _freeze(scaling) if scaling is not None else None)
    eos = self.eos_token_id
    if eos is None:
      eos = ()
    elif isinstance(eos, (int, np.integer)):
      eos = (int(eos),)
    set_("eos_token_id", tuple(int(e) for e in eos))
    if self.layer_types is not None:
      layer_types = tuple(self.layer_types)
      if len(layer_types) != self.num_hidden_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries; num_hidden_layers={self.num_hidden_layers}")
      bad = sorted(set(layer_types) - set(LAYER_TYPES))
      if bad:
        raise ValueError(f"layer_types contains unsupported {bad}; supported: {LAYER_TYPES}")
      set_("layer_types", layer_types)
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f"sliding_window={self.sliding_window} must be positive or None")
    if self.remat_policy is not None:
      import jax  # local: only to validate the name
      policy = getattr(jax.checkpoint_policies, str(self.remat_policy), None)
      if not isinstance(self.remat_policy, str) or self.remat_policy.startswith("_") or not callable(policy):
        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
        raise ValueError(f"remat_policy={self.remat_policy!r} is not a jax.checkpoint_policies policy; "
                         f"use None (save nothing) or one of {names}")
    if not (isinstance(self.scan_layers, bool) or self.scan_layers == "auto"):
      raise ValueError(f"scan_layers={self.scan_layers!r} must be a bool (True: the scan, False: the list layout) "
                       "or 'auto'")
    from adrpo_jax.models.llm.attention import IMPLEMENTATIONS  # local: attention imports nothing from here
    if self.attention_impl not in IMPLEMENTATIONS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is not supported; use one of {IMPLEMENTATIONS}")
    for name in ("attention_chunk_size", "attention_auto_min_len"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    self._validate_moe()
    for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "rope_local_theta"):
      value = getattr(self, name)
      if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0:
          raise ValueError(f"{name}={value!r} must be None or a positive number")
        set_(name, float(value))

  def _validate_moe(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} must be an int >= 0")
    if self.moe_impl not in MOE_IMPLS:
      raise ValueError(f"moe_impl={self.moe_impl!r} is not supported; use one of {MOE_IMPLS}")
    if not isinstance(self.moe_block_size, (int, np.integer)) or isinstance(self.moe_block_size, bool) \
        or self.moe_block_size < 1:
      raise ValueError(f"moe_block_size={self.moe_block_size!r} must be a positive int")
    step = self.decoder_sparse_step
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 1:
      raise ValueError(f"decoder_sparse_step={step!r} must be an int >= 1")
    only = tuple(int(i) for i in (self.mlp_only_layers or ()))
    bad = [i for i in only if not 0 <= i < self.num_hidden_layers]
    if bad:
      raise ValueError(f"mlp_only_layers={list(only)} has indices {bad} outside [0, num_hidden_layers="
                       f"{self.num_hidden_layers})")
    set_("mlp_only_layers", tuple(sorted(set(only))))
    if self.num_experts == 0:
      return
    if not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                       f"{self.num_experts}]")
    if self.moe_intermediate_size <= 0:
      raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive with num_experts="
                       f"{self.num_experts}")
    sparse = self.moe_layers
    if any(sparse) and not all(sparse) and self.scan_layers == "auto":
      set_("scan_layers", False)  # a layout mixing sparse and dense layers runs as a list
    if self.scan_layers and any(sparse) and not all(sparse):
      raise ValueError(
          f"scan_layers=True needs every layer alike, but mlp_only_layers={list(self.mlp_only_layers)} / "
          f"decoder_sparse_step={self.decoder_sparse_step} mix sparse layers {[i for i, s in enumerate(sparse) if s]}"
          " with dense ones: build it with scan_layers=False (the list layout; from_hf_config picks it for such "
          "checkpoints)")

  # --------------------------------------------------------------------------------------------------
  @property
  def moe_layers(self) -> tuple[bool, ...]:
    """Per layer: True for a sparse (mixture-of-experts) layer (transformers' rule, see the module doc)."""
    return tuple(self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                 for i in range(self.num_hidden_layers))

  @property
  def num_moe_layers(self) -> int:
    return sum(self.moe_layers)

  @property
  def _head_dim(self) -> int:
    """`head_dim` as an int (resolved by `__post_init__`: `hidden_size // num_attention_heads` when not given)."""
    assert self.head_dim is not None
    return self.head_dim

  @property
  def attention_scale(self) -> float:
    """The attention logit scale: `query_pre_attn_scalar ** -0.5` (Gemma) or `head_dim ** -0.5`."""
    return (self.query_pre_attn_scalar or self._head_dim) ** -0.5

  @property
  def layer_local_rope(self) -> tuple[bool, ...]:
    """Per layer: True where the layer uses the local rope (`rope_local_theta`; Gemma 3's sliding layers)."""
    return tuple(self.rope_local_theta is not None and w is not None for w in self.layer_sliding_windows)

  @property
  def num_query_groups(self) -> int:
    """G = num_attention_heads // num_key_value_heads (query heads per kv head)."""
    assert self.num_key_value_heads is not None  # resolved by __post_init__
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def layer_sliding_windows(self) -> tuple[int | None, ...]:
    """Per layer: the sliding window (a query sees keys with slot distance < window) or None."""
    types = self.layer_types or ("full_attention",) * self.num_hidden_layers
    return tuple(self.sliding_window if t == "sliding_attention" and self.sliding_window else None for t in types)

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embeddings counted once when tied)."""
    d, f, h, k, hd = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                      self.num_key_value_heads or self.num_attention_heads, self._head_dim)
    attn = d * h * hd * 2 + d * k * hd * 2
    attn += (h + 2 * k) * hd * self.attention_bias + d * self.attention_out_bias + 2 * hd * self.qk_norm
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    moe = d * self.num_experts + self.num_experts * 3 * d * self.moe_intermediate_size
    if self.shared_expert_intermediate_size:
      moe += 3 * d * self.shared_expert_intermediate_size + d
    norms = (4 if self.sandwich_norm else 2) * d
    n_moe = self.num_moe_layers
    layers = self.num_hidden_layers * (attn + norms) + (self.num_hidden_layers - n_moe) * mlp + n_moe * moe
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return layers + emb + d

  def num_active_params(self) -> int:
    """Parameters one token uses: `num_params()` with each sparse layer's E experts counted as k."""
    if not self.num_experts:
      return self.num_params()
    idle = (self.num_experts - self.num_experts_per_tok) * 3 * self.hidden_size * self.moe_intermediate_size
    return self.num_params() - self.num_moe_layers * idle

  # --------------------------------------------------------------------------------------------------
  @classmethod
  def from_hf_config(cls, hf_config: Any, **overrides) -> "DecoderConfig":
    """Builds the config from a HF `config.json` (path to the file or its directory), a dict, or a
    `transformers.PretrainedConfig`. `overrides` replace fields afterwards (e.g. dtype, param_dtype, remat).

    Raises:
      ValueError: unknown `model_type` (the message lists the supported ones), or inconsistent sizes.
      FileNotFoundError: a path without config.json.
    """
    source = "config"
    if isinstance(hf_config, (str, os.PathLike)):
      path = os.fspath(hf_config)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      if not os.path.exists(path):
        raise FileNotFoundError(f"no Hugging Face config.json at {path}")
      with open(path) as f:
        raw = json.load(f)
      source = path
    elif isinstance(hf_config, Mapping):
      raw = dict(hf_config)
    elif hasattr(hf_config, "to_dict"):
      raw = hf_config.to_dict()
    else:
      raise ValueError(f"hf_config must be a path, a dict or a transformers config, got {type(hf_config)}")
    model_type = raw.get("model_type")
    if model_type == "gemma3":  # the multimodal Gemma 3 config: its language model is the text_config
      text = raw.get("text_config")
      if not isinstance(text, Mapping):
        raise ValueError(f"model_type='gemma3' in {source} has no text_config")
      top = raw
      raw = dict(text)
      raw.setdefault("model_type", "gemma3_text")
      for key in ("eos_token_id", "bos_token_id", "pad_token_id"):  # the instruct checkpoints' [1, 106] lives on top
        if raw.get(key) is None and top.get(key) is not None:
          raw[key] = top[key]
      model_type = raw["model_type"]
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type={model_type!r} in {source}; supported: {SUPPORTED_MODEL_TYPES}")
    if model_type in GEMMA_MODEL_TYPES:
      return cls._from_gemma_config(raw, source, overrides)

    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if head_dim is None:  # transformers' Qwen3Config defaults to 128; Qwen3MoeConfig has no head_dim field
      head_dim = 128 if model_type == "qwen3" else hidden // heads
    # rope: transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`. As transformers 5.23
    # (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`): a non-empty `rope_scaling` replaces
    # `rope_parameters` whole (no merge; e.g. YaRN added to a saved config as the Qwen model cards say), and
    # rope_theta comes from the chosen dict, else the top-level `rope_theta`, else 10000.
    rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    if rope and any(isinstance(v, Mapping) for v in rope.values()):
      raise ValueError(f"per-layer-type rope_parameters in {source} are not supported")
    rope_theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_scaling = rope if rope_type != "default" else None
    if raw.get("partial_rotary_factor", 1.0) not in (None, 1.0):
      raise ValueError(f"partial_rotary_factor={raw['partial_rotary_factor']} in {source} is not supported")

    attention_bias = bool(raw.get("attention_bias", False))
    if model_type == "qwen2":
      qkv_bias, out_bias = True, False
    elif model_type == "qwen2_moe":
      qkv_bias, out_bias = bool(raw.get("qkv_bias", True)), False
    else:
      qkv_bias = out_bias = attention_bias
    if raw.get("pretraining_tp", 1) not in (None, 1):
      raise ValueError(f"pretraining_tp={raw['pretraining_tp']} in {source} is not supported (only 1)")

    sliding_window = raw.get("sliding_window")
    max_window_layers = raw.get("max_window_layers")
    layer_types = raw.get("layer_types")
    if model_type == "llama":
      sliding_window, layer_types = None, None
    else:
      if not raw.get("use_sliding_window", False):
        sliding_window = None
      elif "sliding_window" not in raw:  # transformers' Qwen2Config / Qwen3Config default
        sliding_window = QWEN_DEFAULT_SLIDING_WINDOW
      if layer_types is None and sliding_window is not None:
        mwl = 28 if max_window_layers is None else max_window_layers
        n = raw["num_hidden_layers"]
        if model_type == "qwen3_moe":  # every layer gets the window (Qwen3Moe attention reads config.sliding_window)
          layer_types = ["sliding_attention"] * n
        elif model_type == "qwen2_moe":  # transformers 5.23 Qwen2MoeConfig.__post_init__
          layer_types = ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention" for i in range(n)]
        else:
          layer_types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n)]
      if sliding_window is None:
        layer_types = None  # a window of None means full attention in every layer (as HF does)
    dtype_name = raw.get("dtype") or raw.get("torch_dtype")
    kwargs = dict(
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        hidden_act=raw.get("hidden_act", "silu"),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        layer_types=tuple(layer_types) if layer_types is not None else None,
        max_window_layers=max_window_layers,
        initializer_range=raw.get("initializer_range", 0.02),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )
    if model_type in MOE_MODEL_TYPES:
      kwargs.update(cls._moe_kwargs(raw, model_type))
      sparse = cls._sparse_layers(kwargs["num_hidden_layers"], kwargs["num_experts"], kwargs["mlp_only_layers"],
                                  kwargs["decoder_sparse_step"])
      if "scan_layers" not in overrides and any(sparse) and not all(sparse):
        kwargs["scan_layers"] = False  # a layout that mixes sparse and dense layers runs as a list
    del dtype_name  # the checkpoint's storage dtype does not choose ours: dtype/param_dtype are explicit.
    kwargs.update(overrides)
    return cls(**kwargs)

  @staticmethod
  def _sparse_layers(n, num_experts, mlp_only_layers, step):
    return [num_experts > 0 and i not in mlp_only_layers and (i + 1) % step == 0 for i in range(n)]

  @staticmethod
  def _moe_kwargs(raw: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a qwen2_moe / qwen3_moe config.json (transformers 5.23 defaults)."""
    defaults = {"qwen2_moe": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                                  shared_expert_intermediate_size=5632),
                "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                  shared_expert_intermediate_size=0)}[model_type]
    num_experts = raw.get("num_experts", raw.get("num_local_experts", defaults["num_experts"]))
    return dict(
        num_experts=int(num_experts),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", defaults["num_experts_per_tok"])),
        moe_intermediate_size=int(raw.get("moe_intermediate_size", defaults["moe_intermediate_size"])),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        decoder_sparse_step=int(raw.get("decoder_sparse_step", 1) or 1),
        mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
        shared_expert_intermediate_size=(int(raw.get("shared_expert_intermediate_size",
                                                     defaults["shared_expert_intermediate_size"]) or 0)
                                         if model_type == "qwen2_moe" else 0),
        router_aux_loss_coef=float(raw.get("router_aux_loss_coef", 0.001)),
    )

  @classmethod
  def _from_gemma_config(cls, raw: dict[str, Any], source: str, overrides: dict[str, Any]) -> "DecoderConfig":
    """gemma2 / gemma3_text config.json -> DecoderConfig (transformers 5.23 defaults for absent fields)."""
    model_type = raw["model_type"]
    defaults = _GEMMA_DEFAULTS[model_type]

    def get(key: str) -> Any:
      return raw[key] if raw.get(key) is not None else defaults.get(key)

    if raw.get("use_bidirectional_attention"):
      raise ValueError(f"use_bidirectional_attention=True in {source} (an encoder / embedding model) is not "
                       "supported: this decoder is causal")
    n = get("num_hidden_layers")
    layer_types = raw.get("layer_types")
    if layer_types is None:
      if model_type == "gemma2":
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
      else:
        pattern = get("sliding_window_pattern")
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    rope = raw.get("rope_parameters")
    rope_theta, rope_scaling, local_theta = get("rope_theta"), None, None
    if isinstance(rope, Mapping) and any(isinstance(v, Mapping) for v in rope.values()):  # per layer type
      full = dict(rope.get("full_attention") or {})
      local = dict(rope.get("sliding_attention") or {})
      rope_theta = full.pop("rope_theta", rope_theta)
      if local.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.sliding_attention of type {local['rope_type']!r} in {source} is not "
                         "supported (only default rope on the sliding layers)")
      local_theta = local.get("rope_theta", defaults.get("rope_local_base_freq"))
      rope_scaling = full if full.get("rope_type", "default") != "default" else None
    else:
      rope = dict(raw.get("rope_scaling") or rope or {})
      rope_theta = rope.pop("rope_theta", rope_theta)
      rope_scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
      local_theta = raw.get("rope_local_base_freq", defaults.get("rope_local_base_freq"))
    if model_type == "gemma2":
      local_theta = None  # one rope for every layer
    bias = bool(raw.get("attention_bias", False))
    kwargs = dict(
        model_type=model_type,
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_hidden_layers=n,
        num_attention_heads=get("num_attention_heads"),
        num_key_value_heads=get("num_key_value_heads") or get("num_attention_heads"),
        head_dim=get("head_dim"),
        hidden_act=raw.get("hidden_activation") or raw.get("hidden_act") or defaults["hidden_activation"],
        rms_norm_eps=get("rms_norm_eps") or 1e-6,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=get("max_position_embeddings"),
        attention_bias=bias,
        attention_out_bias=bias,
        qk_norm=model_type == "gemma3_text",
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        sliding_window=get("sliding_window"),
        layer_types=tuple(layer_types),
        initializer_range=raw.get("initializer_range", 0.02),
        bos_token_id=get("bos_token_id"),
        eos_token_id=get("eos_token_id"),
        pad_token_id=get("pad_token_id"),
        norm_unit_offset=True,
        scale_embeddings=True,
        sandwich_norm=True,
        query_pre_attn_scalar=get("query_pre_attn_scalar"),
        attn_logit_softcapping=raw.get("attn_logit_softcapping", defaults["attn_logit_softcapping"]),
        final_logit_softcapping=raw.get("final_logit_softcapping", defaults["final_logit_softcapping"]),
        rope_local_theta=None if local_theta is None else float(local_theta),
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def _gemma_hf_config(self, out: dict[str, Any]) -> None:
    """The gemma2 / gemma3_text fields of `to_hf_config` (in place)."""
    if not (self.norm_unit_offset and self.scale_embeddings and self.sandwich_norm):
      raise ValueError(f"{self.model_type} always has (1 + w) norms, scaled embeddings and sandwich norms; got "
                       f"norm_unit_offset={self.norm_unit_offset}, scale_embeddings={self.scale_embeddings}, "
                       f"sandwich_norm={self.sandwich_norm}")
    if self.attention_bias != self.attention_out_bias or self.mlp_bias or self.num_experts:
      raise ValueError(f"{self.model_type} has one attention_bias for q/k/v/o, no MLP bias and no experts")
    if self.qk_norm != (self.model_type == "gemma3_text"):
      raise ValueError(f"{self.model_type}: qk_norm={self.qk_norm} (gemma3_text always has q/k norm, gemma2 never)")
    if self.model_type == "gemma2" and self.rope_local_theta is not None:
      raise ValueError("gemma2 has one rope for every layer; rope_local_theta must be None")
    types = list(self.layer_types or ("full_attention",) * self.num_hidden_layers)
    out.pop("hidden_act")
    scalar = self.query_pre_attn_scalar or self._head_dim
    out.update(hidden_activation=self.hidden_act, attention_bias=self.attention_bias,
               query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,  # transformers: an int
               attn_logit_softcapping=self.attn_logit_softcapping,
               final_logit_softcapping=self.final_logit_softcapping,
               sliding_window=self.sliding_window if self.sliding_window is not None else 4096,
               layer_types=types)
    if self.model_type == "gemma3_text":
      full = dict(out["rope_parameters"])
      local = {"rope_type": "default", "rope_theta": self.rope_local_theta if self.rope_local_theta is not None
               else self.rope_theta}
      out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
      out["rope_local_base_freq"] = local["rope_theta"]
      out["use_bidirectional_attention"] = False
      out.pop("rope_scaling", None)

  def to_hf_config(self) -> dict[str, Any]:
    """The `config.json` dict that transformers (5.x; 4.x reads `rope_theta`/`rope_scaling`) loads back.

    Raises:
      ValueError: a field the target family cannot express (llama: sliding-window layers, q/k norm, different
        q/k/v and o_proj biases; qwen2: q/k norm, MLP bias, other than q/k/v-only bias; qwen3: no q/k norm,
        MLP bias), named in the message (transformers would otherwise compute other logits).
    """
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope_parameters.update(self.rope_scaling_dict or {})
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": self.hidden_act,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "initializer_range": self.initializer_range,
        "attention_dropout": 0.0,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (self.eos_token_id[0] if len(self.eos_token_id) == 1
                         else list(self.eos_token_id) or None),
        "pad_token_id": self.pad_token_id,
        "dtype": self.param_dtype.name,
        "use_cache": True,
    }
    if self.rope_scaling is not None:
      out["rope_scaling"] = dict(rope_parameters)
    gemma = self.model_type in GEMMA_MODEL_TYPES
    if not gemma and (self.norm_unit_offset or self.scale_embeddings or self.sandwich_norm
                      or self.query_pre_attn_scalar is not None or self.attn_logit_softcapping is not None
                      or self.final_logit_softcapping is not None or self.rope_local_theta is not None):
      raise ValueError(f"{self.model_type} cannot express the Gemma fields (norm_unit_offset, scale_embeddings, "
                       "sandwich_norm, query_pre_attn_scalar, soft-capping, rope_local_theta): "
                       "use gemma2 / gemma3_text")
    if self.num_experts and self.model_type not in MOE_MODEL_TYPES:
      raise ValueError(f"{self.model_type} has no experts; num_experts={self.num_experts} needs qwen2_moe / qwen3_moe")
    if gemma:
      self._gemma_hf_config(out)
      return out
    if self.model_type in MOE_MODEL_TYPES:
      if not self.num_experts:
        raise ValueError(f"{self.model_type} needs num_experts > 0")
      if self.model_type == "qwen3_moe" and self.shared_expert_intermediate_size:
        raise ValueError("qwen3_moe has no shared expert; shared_expert_intermediate_size must be 0 (use qwen2_moe)")
      if self.model_type == "qwen2_moe" and not self.shared_expert_intermediate_size:
        raise ValueError("qwen2_moe always has a shared expert; shared_expert_intermediate_size must be > 0")
      out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                 moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                 decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                 router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False)
      if self.model_type == "qwen2_moe":
        out["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
    if self.model_type == "llama":
      if any(w is not None for w in self.layer_sliding_windows):
        raise ValueError(f"llama has no sliding-window attention; sliding_window={self.sliding_window} with "
                         f"sliding layers in layer_types cannot be saved as a llama config (use qwen2 / qwen3)")
      if self.qk_norm:
        raise ValueError("llama has no q/k norm; qk_norm=True cannot be saved as a llama config (use qwen3)")
      if self.attention_bias != self.attention_out_bias:
        raise ValueError("llama configs have one attention_bias for q/k/v/o; "
                         f"got attention_bias={self.attention_bias}, attention_out_bias={self.attention_out_bias}")
      out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, pretraining_tp=1)
    else:
      if self.mlp_bias:
        raise ValueError(f"{self.model_type} has no MLP bias; mlp_bias=True cannot be saved")
      if self.model_type == "qwen2" and not (self.attention_bias and not self.attention_out_bias):
        raise ValueError("qwen2 always has q/k/v bias and no o_proj bias; got attention_bias="
                         f"{self.attention_bias}, attention_out_bias={self.attention_out_bias}")
      if self.model_type in ("qwen2", "qwen2_moe") and self.qk_norm:
        raise ValueError(f"{self.model_type} has no q/k norm; qk_norm=True cannot be saved as a {self.model_type} "
                         "config (use qwen3 / qwen3_moe)")
      if self.model_type == "qwen2_moe":
        if self.attention_out_bias:
          raise ValueError("qwen2_moe has no o_proj bias; attention_out_bias must be False")
        out["qkv_bias"] = self.attention_bias
      if self.model_type in ("qwen3", "qwen3_moe"):
        if self.attention_bias != self.attention_out_bias or not self.qk_norm:
          raise ValueError(f"{self.model_type} has one attention_bias for q/k/v/o and always q/k norm")
        out["attention_bias"] = self.attention_bias
      out.update(
          use_sliding_window=self.sliding_window is not None,
          sliding_window=self.sliding_window,
          max_window_layers=(self.max_window_layers if self.max_window_layers is not None
                             else self.num_hidden_layers),
          layer_types=list(self.layer_types or ("full_attention",) * self.num_hidden_layers),
      )
    return out


# ------------------------------------------------------------------------------------------------------
# Rotary frequencies (float32, numpy, computed once from the config; mirrors transformers' rope utils).
# ------------------------------------------------------------------------------------------------------
def rope_inv_freq_local(config: DecoderConfig) -> tuple[np.ndarray, float]:
  """The sliding-window layers' inverse frequencies when `config.rope_local_theta` is set (default rope with that
  base, Gemma 3), else `rope_inv_freq(config)`."""
  if config.rope_local_theta is None:
    return rope_inv_freq(config)
  return rope_inv_freq(config.replace(rope_theta=config.rope_local_theta, rope_scaling=None))


def rope_inv_freq(config: DecoderConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim // 2] (float32) and the cos/sin scale ('attention_factor').

  Implements transformers' `default`, `linear`, `llama3` and `yarn` rope types.

  >>> cfg = DecoderConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
  ...                     num_attention_heads=2)
  >>> inv_freq, scale = rope_inv_freq(cfg)
  >>> inv_freq.shape, float(inv_freq[0]), scale
  ((2,), 1.0, 1.0)
  """
  dim = config._head_dim
  base = np.float32(config.rope_theta)
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / (base ** exponents)).astype(np.float32)
  scaling = config.rope_scaling_dict
  if scaling is None:
    return inv_freq, 1.0
  rope_type = scaling["rope_type"]
  if rope_type == "linear":
    return (inv_freq / np.float32(scaling["factor"])).astype(np.float32), 1.0
  if rope_type == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    llama = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * llama / factor + smooth * llama).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, llama).astype(np.float32), 1.0
  if rope_type == "yarn":
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
      factor = config.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
      if mscale and mscale_all_dim:
        attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
      else:
        attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    theta = config.rope_theta

    def correction_dim(rotations):
      return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = (base ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv.astype(np.float32), float(attention_factor)
  raise ValueError(f"unsupported rope_type {rope_type!r}")  # unreachable: validated in DecoderConfig
