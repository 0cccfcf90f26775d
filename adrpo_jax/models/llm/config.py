"""`DecoderConfig`: one frozen, hashable configuration for the Llama / Qwen2 / Qwen3 decoder families.

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
=========  ===================  ==============  =======  ==========================
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

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
LAYER_TYPES = ("full_attention", "sliding_attention")
QWEN_DEFAULT_SLIDING_WINDOW = 4096  # transformers 5.23 Qwen2Config / Qwen3Config `sliding_window` default

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


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
  """Architecture + numerics of a decoder-only causal LM (Llama, Qwen2, Qwen3 families).

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
    scan_layers: stack the decoder layers along a leading 'layers' axis and run them with one
      `jax.lax.scan` (compile time independent of depth; KV cache [L, B, S, K, hd]). False: a Python list
      of layers (`model.layers[i]` is the live layer). HF checkpoints are the same either way.
    attention_impl: 'auto' (default), 'xla', 'chunked', 'cudnn' or 'splash' (see
      `adrpo_jax.models.llm.attention`; 'auto' = splash on TPU, cudnn on GPU where the shapes allow, chunked
      when T * S >= attention_auto_min_len**2, xla below). Not written to config.json.
    attention_chunk_size: key slots per block of the 'chunked' implementation.
    attention_auto_min_len: 'auto' switches from xla to chunked at T * S >= this**2.

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
  scan_layers: bool = True
  attention_impl: str = "auto"
  attention_chunk_size: int = 512
  attention_auto_min_len: int = 1024

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
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"scan_layers={self.scan_layers!r} must be a bool")
    from adrpo_jax.models.llm.attention import IMPLEMENTATIONS  # local: attention imports nothing from here
    if self.attention_impl not in IMPLEMENTATIONS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is not supported; use one of {IMPLEMENTATIONS}")
    for name in ("attention_chunk_size", "attention_auto_min_len"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")

  # --------------------------------------------------------------------------------------------------
  @property
  def num_query_groups(self) -> int:
    """G = num_attention_heads // num_key_value_heads (query heads per kv head)."""
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
                      self.num_key_value_heads, self.head_dim)
    attn = d * h * hd * 2 + d * k * hd * 2
    attn += (h + 2 * k) * hd * self.attention_bias + d * self.attention_out_bias + 2 * hd * self.qk_norm
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    per_layer = attn + mlp + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_hidden_layers * per_layer + emb + d

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
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type={model_type!r} in {source}; supported: {SUPPORTED_MODEL_TYPES}")

    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if head_dim is None:
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
        layer_types = ["sliding_attention" if i >= mwl else "full_attention"
                       for i in range(raw["num_hidden_layers"])]
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
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        layer_types=tuple(layer_types) if layer_types is not None else None,
        max_window_layers=max_window_layers,
        initializer_range=raw.get("initializer_range", 0.02),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )
    del dtype_name  # the checkpoint's storage dtype does not choose ours: dtype/param_dtype are explicit.
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_config(self) -> dict[str, Any]:
    """The `config.json` dict that transformers (5.x; 4.x reads `rope_theta`/`rope_scaling`) loads back.

    Raises:
      ValueError: a field the target family cannot express (llama: sliding-window layers, q/k norm, different
        q/k/v and o_proj biases; qwen2: q/k norm, MLP bias, other than q/k/v-only bias; qwen3: no q/k norm,
        MLP bias), named in the message (transformers would otherwise compute other logits).
    """
    rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope_parameters.update(self.rope_scaling_dict)
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
      if self.model_type == "qwen2" and self.qk_norm:
        raise ValueError("qwen2 has no q/k norm; qk_norm=True cannot be saved as a qwen2 config (use qwen3)")
      if self.model_type == "qwen3":
        if self.attention_bias != self.attention_out_bias or not self.qk_norm:
          raise ValueError("qwen3 has one attention_bias for q/k/v/o and always q/k norm")
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
def rope_inv_freq(config: DecoderConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim // 2] (float32) and the cos/sin scale ('attention_factor').

  Implements transformers' `default`, `linear`, `llama3` and `yarn` rope types.

  >>> cfg = DecoderConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
  ...                     num_attention_heads=2)
  >>> inv_freq, scale = rope_inv_freq(cfg)
  >>> inv_freq.shape, float(inv_freq[0]), scale
  ((2,), 1.0, 1.0)
  """
  dim = config.head_dim
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
