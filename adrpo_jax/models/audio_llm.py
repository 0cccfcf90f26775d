"""Audio LLMs in Flax NNX: Qwen2-Audio and the Qwen2.5-Omni thinker (audio + text only), on our `CausalLM`.

    model = load_pretrained("/path/to/Qwen2.5-Omni-7B", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    logits = model(input_ids, attention_mask, input_features, feature_attention_mask)   # == transformers

Structure (transformers 5.23 `modeling_qwen2_audio.py`, `modeling_qwen2_5_omni.py`):

* `WhisperAudioEncoder` (model_type 'qwen2_audio'): conv1 (k3, p1) -> GELU -> conv2 (k3, s2, p1) -> GELU ->
  + learned positions; pre-LN layers (q/v/out bias, *no* k bias, exact GELU MLP); AvgPool(2); LayerNorm; then
  the `multi_modal_projector` linear. It always runs the fixed window of `2 * max_source_positions` mel frames,
  with a key-padding mask over the conv outputs from the clip lengths `L = feature_attention_mask.sum(-1)`
  (`(L - 1) // 2 + 1` valid keys; the mel values beyond L are *not* zeroed, as in transformers).
* `OmniAudioEncoder` ('qwen2_5_omni_thinker' / the thinker of 'qwen2_5_omni'): the valid frames of each clip
  are cut in independent chunks of `2 * n_window` frames (zero-padded, conv1 output masked), sinusoidal positions
  restart per chunk, attention is block diagonal (one chunk = one attention row here, with key padding),
  the chunk outputs are concatenated per clip, AvgPool(2), `ln_post`, `proj` (inside the encoder).
* Both give `n = ((L - 1) // 2 + 1 - 2) // 2 + 1` audio embeddings per clip of L mel frames (25 per second);
  `encode_audio` returns them left-aligned, `[B, A, D]` with `valid [B, A]` (`arange(A) < n`).
* The splice (`embed_inputs`, `splice_audio`): with one clip per row, per row the k-th `<|AUDIO|>` token gets
  the row's k-th valid audio embedding (extra audio tokens, e.g. sampled in a completion, keep their token
  embedding and never shift another row; `prompt_length` limits the splice to the prompt); with N clips for
  B != N rows, transformers' `masked_scatter` over the flattened batch. Eagerly, a count mismatch is a
  ValueError; inside `jax.jit` it cannot be checked: check the tokenized prompts on the host with
  `check_audio_token_counts`.
* The LM: our `CausalLM` (Qwen2 family). For audio-only inputs the Omni thinker's 3-D mrope positions are the
  plain 1-D positions, so the LM is numerically Qwen2 with the thinker's rope_theta. The output head: the
  *thinker-level* `tie_word_embeddings` (False for Omni; its `text_config.tie_word_embeddings` defaults to True
  and is not what transformers uses) and, as transformers, a checkpoint `lm_head` different from the embedding
  is never tied.

Parameters carry logical axis names (encoder: 'embed' on d_model, 'heads' on the attention projections' head
dimension, 'mlp' on the FFN dimension, 'vocab'/'embed' on the LM as in `CausalLM`); LoRA applies to `model.lm`
(`adrpo_jax.models.lora.apply_lora(model.lm, ...)`). `freeze_encoder=True` (default) stops gradients at the
encoder output (`encode_audio`); `lm_param_filter` selects the LM's parameters for an optimizer.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax.models.llm.checkpoint import CheckpointError, CheckpointReader, logical_to_sharding, param_mappings
from adrpo_jax.models.llm.config import DecoderConfig
from adrpo_jax.models.llm.modeling import CausalLM

log = logging.getLogger(__name__)

Array = jax.Array

AUDIO_MODEL_TYPES = ("qwen2_audio", "qwen2_5_omni_thinker", "qwen2_5_omni")

__all__ = ["AUDIO_MODEL_TYPES", "AudioEncoderConfig", "AudioLM", "OmniAudioEncoder", "WhisperAudioEncoder",
           "audio_output_lengths", "check_audio_token_counts", "load_pretrained", "lm_param_filter",
           "resolve_configs", "splice_audio"]


def audio_output_lengths(lengths):
  """Audio embeddings per clip of `lengths` mel frames: `((L - 1) // 2 + 1 - 2) // 2 + 1` (numpy or jax ints).

  >>> audio_output_lengths(np.array([3000, 100, 7])).tolist()
  [750, 25, 2]
  """
  after_conv = (lengths - 1) // 2 + 1
  return (after_conv - 2) // 2 + 1


# ------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
  """Audio encoder sizes (HF `audio_config` names).

  kind: 'whisper' (Qwen2-Audio: learned positions, fixed window, separate projector) or 'omni' (Qwen2.5-Omni:
  chunked, sinusoidal positions, ln_post + proj to `output_dim`). `max_source_positions`: positions table length
  (whisper: half the fixed mel window). `n_window`: half the chunk size in mel frames (omni).
  """

  kind: str
  num_mel_bins: int
  d_model: int
  encoder_layers: int
  encoder_attention_heads: int
  encoder_ffn_dim: int
  max_source_positions: int
  n_window: int | None = None
  output_dim: int | None = None
  activation_function: str = "gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.kind not in ("whisper", "omni"):
      raise ValueError(f"kind={self.kind!r} must be 'whisper' or 'omni'")
    if self.activation_function != "gelu":
      raise ValueError(f"audio activation_function={self.activation_function!r} is not supported (only 'gelu')")
    if self.d_model % self.encoder_attention_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by encoder_attention_heads="
                       f"{self.encoder_attention_heads}")
    if self.kind == "omni":
      if not self.n_window or self.n_window <= 0 or self.output_dim is None:
        raise ValueError(f"an omni audio encoder needs n_window > 0 and output_dim (got {self.n_window}, "
                         f"{self.output_dim})")
      if self.n_window > self.max_source_positions:
        raise ValueError(f"n_window={self.n_window} exceeds max_source_positions={self.max_source_positions}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.encoder_attention_heads

  @classmethod
  def from_hf(cls, raw: dict, kind: str, **overrides) -> "AudioEncoderConfig":
    kw = dict(kind=kind, num_mel_bins=raw["num_mel_bins"], d_model=raw["d_model"],
              encoder_layers=raw["encoder_layers"], encoder_attention_heads=raw["encoder_attention_heads"],
              encoder_ffn_dim=raw["encoder_ffn_dim"], max_source_positions=raw["max_source_positions"],
              activation_function=raw.get("activation_function", "gelu"))
    if kind == "omni":
      kw.update(n_window=raw["n_window"], output_dim=raw["output_dim"])
    kw.update(overrides)
    return cls(**kw)


# ------------------------------------------------------------------------------------------------------
# Encoder modules
# ------------------------------------------------------------------------------------------------------
def _gelu(x):
  return jax.nn.gelu(x, approximate=False)


def _p(value, names):
  return nnx.Param(value, out_sharding=tuple(names))


def _init(rngs, shape, dtype, std=0.02):
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class LayerNorm(nnx.Module):
  """torch `nn.LayerNorm` (weight and bias, statistics in float32)."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.scale = _p(jnp.ones((dim,), param_dtype), ("norm",))
    self.bias = _p(jnp.zeros((dim,), param_dtype), ("norm",))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Linear(nnx.Module):
  """y = x @ kernel [in, out] (+ bias), in the compute dtype, with named axes."""

  def __init__(self, n_in: int, n_out: int, names, *, bias: bool, dtype, param_dtype, rngs):
    self.kernel = _p(_init(rngs, (n_in, n_out), param_dtype), names)
    self.bias = _p(jnp.zeros((n_out,), param_dtype), names[1:]) if bias else None
    self.dtype = dtype

  def __call__(self, x):
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Conv1d(nnx.Module):
  """torch `nn.Conv1d(k=3, padding=1, stride)` on [B, T, C_in] (channels last); kernel [3, C_in, C_out]."""

  def __init__(self, c_in: int, c_out: int, names, *, stride: int, dtype, param_dtype, rngs):
    self.kernel = _p(_init(rngs, (3, c_in, c_out), param_dtype), (None,) + tuple(names))
    self.bias = _p(jnp.zeros((c_out,), param_dtype), names[1:])
    self.stride, self.dtype = stride, dtype

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride,),
                                     [(1, 1)], dimension_numbers=("NWC", "WIO", "NWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return y + self.bias[...].astype(self.dtype)


class EncoderAttention(nnx.Module):
  """Whisper self-attention: q/v/out biases, no k bias; bidirectional with a key-padding mask."""

  def __init__(self, cfg: AudioEncoderConfig, rngs):
    d, kw = cfg.d_model, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q_proj = Linear(d, d, ("embed", "heads"), bias=True, **kw)
    self.k_proj = Linear(d, d, ("embed", "heads"), bias=False, **kw)
    self.v_proj = Linear(d, d, ("embed", "heads"), bias=True, **kw)
    self.out_proj = Linear(d, d, ("heads", "embed"), bias=True, **kw)
    self.num_heads, self.head_dim = cfg.encoder_attention_heads, cfg.head_dim

  def __call__(self, x, key_valid):
    b, t, d = x.shape
    h, hd = self.num_heads, self.head_dim
    q = (self.q_proj(x) * (hd ** -0.5)).reshape(b, t, h, hd)
    k = self.k_proj(x).reshape(b, t, h, hd)
    v = self.v_proj(x).reshape(b, t, h, hd)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    s = jnp.where(key_valid[:, None, None, :], s, jnp.finfo(jnp.float32).min)  # HF: additive dtype-min mask
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, d)
    return self.out_proj(o)


class EncoderLayer(nnx.Module):
  def __init__(self, cfg: AudioEncoderConfig, rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.self_attn = EncoderAttention(cfg, rngs)
    self.self_attn_layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, **kw)
    self.fc1 = Linear(cfg.d_model, cfg.encoder_ffn_dim, ("embed", "mlp"), bias=True, rngs=rngs, **kw)
    self.fc2 = Linear(cfg.encoder_ffn_dim, cfg.d_model, ("mlp", "embed"), bias=True, rngs=rngs, **kw)
    self.final_layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, **kw)

  def __call__(self, x, key_valid):
    x = x + self.self_attn(self.self_attn_layer_norm(x), key_valid)
    return x + self.fc2(_gelu(self.fc1(self.final_layer_norm(x))))


def _check_features(features, feature_mask, n_mels):
  features, feature_mask = jnp.asarray(features), jnp.asarray(feature_mask)
  if features.ndim != 3 or features.shape[1] != n_mels:
    raise ValueError(f"input_features must be [clips, num_mel_bins={n_mels}, frames], got shape {features.shape}")
  if tuple(feature_mask.shape) != (features.shape[0], features.shape[2]):
    raise ValueError(f"feature_attention_mask must be [clips, frames] = {(features.shape[0], features.shape[2])}, "
                     f"got shape {tuple(feature_mask.shape)}")
  return features, feature_mask.astype(bool)


class WhisperAudioEncoder(nnx.Module):
  """Qwen2-Audio's `audio_tower` + `multi_modal_projector` (to the LM width `out_dim`)."""

  def __init__(self, cfg: AudioEncoderConfig, out_dim: int, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.config = cfg
    self.conv1 = Conv1d(cfg.num_mel_bins, cfg.d_model, (None, "embed"), stride=1, rngs=rngs, **kw)
    self.conv2 = Conv1d(cfg.d_model, cfg.d_model, (None, "embed"), stride=2, rngs=rngs, **kw)
    self.embed_positions = _p(_init(rngs, (cfg.max_source_positions, cfg.d_model), cfg.param_dtype),
                              (None, "embed"))
    self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.encoder_layers)])
    self.layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, **kw)
    self.projector = Linear(cfg.d_model, out_dim, (None, "embed"), bias=True, rngs=rngs, **kw)

  def __call__(self, features, feature_mask):
    """features [B, num_mel_bins, 2 * max_source_positions], feature_mask [B, same] (1 on the clip's frames)
    -> (embeddings [B, max_source_positions // 2, out_dim], valid [B, max_source_positions // 2])."""
    cfg = self.config
    features, feature_mask = _check_features(features, feature_mask, cfg.num_mel_bins)
    window = 2 * cfg.max_source_positions
    if features.shape[2] != window:
      raise ValueError(f"Qwen2-Audio runs a fixed window of 2 * max_source_positions = {window} mel frames; got "
                       f"{features.shape[2]} (pad the features to {window}, with feature_attention_mask 0 there)")
    lengths = jnp.sum(feature_mask, axis=-1, dtype=jnp.int32)
    x = _gelu(self.conv1(jnp.swapaxes(features, 1, 2)))
    x = _gelu(self.conv2(x))  # [B, P, D]
    x = x + self.embed_positions[...].astype(x.dtype)[None]
    p = x.shape[1]
    key_valid = jnp.arange(p)[None, :] < ((lengths - 1) // 2 + 1)[:, None]
    for layer in self.layers:
      x = layer(x, key_valid)
    x = 0.5 * (x[:, 0:2 * (p // 2):2] + x[:, 1:2 * (p // 2):2])  # AvgPool1d(2, 2)
    x = self.projector(self.layer_norm(x))
    valid = jnp.arange(p // 2)[None, :] < audio_output_lengths(lengths)[:, None]
    return x, valid


def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  inc = np.float32(np.log(max_timescale) / (channels // 2 - 1))
  inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
  t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
  return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class OmniAudioEncoder(nnx.Module):
  """Qwen2.5-Omni's `audio_tower` (chunked; ln_post and proj to `output_dim` inside)."""

  def __init__(self, cfg: AudioEncoderConfig, *, rngs: nnx.Rngs):
    if cfg.output_dim is None:
      raise ValueError(f"OmniAudioEncoder needs an omni AudioEncoderConfig with output_dim (got kind={cfg.kind!r}, "
                       "output_dim=None)")
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.config = cfg
    self.conv1 = Conv1d(cfg.num_mel_bins, cfg.d_model, (None, "embed"), stride=1, rngs=rngs, **kw)
    self.conv2 = Conv1d(cfg.d_model, cfg.d_model, (None, "embed"), stride=2, rngs=rngs, **kw)
    self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.encoder_layers)])
    self.ln_post = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, **kw)
    self.proj = Linear(cfg.d_model, cfg.output_dim, (None, "embed"), bias=True, rngs=rngs, **kw)

  def __call__(self, features, feature_mask):
    """features [B, num_mel_bins, F], feature_mask [B, F] (1 on the clip's frames, any F) ->
    (embeddings [B, A, output_dim], valid [B, A]) with A = (ceil(F / C) * C // 2) // 2, C = 2 * n_window."""
    cfg = self.config
    features, feature_mask = _check_features(features, feature_mask, cfg.num_mel_bins)
    b, m, f = features.shape
    lengths = jnp.sum(feature_mask, axis=-1, dtype=jnp.int32)
    # transformers keeps the masked frames in order (features[mask]): compact them to a prefix.
    order = jnp.argsort(~feature_mask, axis=-1, stable=True)
    x = jnp.take_along_axis(jnp.swapaxes(features, 1, 2), order[:, :, None], axis=1)  # [B, F, M]
    c = 2 * cfg.n_window
    nc = -(-f // c)
    x = jnp.pad(x, ((0, 0), (0, nc * c - f), (0, 0)))
    frame_valid = jnp.arange(nc * c)[None, :] < lengths[:, None]
    x = jnp.where(frame_valid[..., None], x, 0).reshape(b * nc, c, m)
    chunk_len = jnp.clip(lengths[:, None] - c * jnp.arange(nc)[None, :], 0, c).reshape(b * nc)
    h = _gelu(self.conv1(x)) * (jnp.arange(c)[None, :] < chunk_len[:, None])[..., None].astype(cfg.dtype)
    h = _gelu(self.conv2(h))  # [B*nc, w, D], w = n_window
    w = h.shape[1]
    h = h + jnp.asarray(_sinusoids(cfg.max_source_positions, cfg.d_model)[:w], h.dtype)[None]
    key_valid = jnp.arange(w)[None, :] < ((chunk_len - 1) // 2 + 1)[:, None]
    for layer in self.layers:
      h = layer(h, key_valid)
    h = h.reshape(b, nc * w, cfg.d_model)  # full chunks are fully valid: each clip's outputs are a prefix
    a = (nc * w) // 2
    h = (h[:, 0:2 * a:2] + h[:, 1:2 * a:2]) / 2
    h = self.proj(self.ln_post(h))
    valid = jnp.arange(a)[None, :] < audio_output_lengths(lengths)[:, None]
    return h, valid


# ------------------------------------------------------------------------------------------------------
# The splice and the model
# ------------------------------------------------------------------------------------------------------
def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def splice_audio(token_embeds: Array, is_audio: Array, audio_embeds: Array, audio_valid: Array, *,
                 prompt_length: int | None = None) -> Array:
  """Input embeddings [B, T, D] (dtype of `token_embeds`) with the audio embeddings at the audio tokens.

  `is_audio` [B, T]: the audio-token positions; `audio_embeds` [N, A, D] with `audio_valid` [N, A] (each row's
  valid embeddings, any order along A). `prompt_length` (static): only positions `< prompt_length` are
  spliced (the prompt of a prompt + completion sequence); an audio token sampled in a completion keeps its
  token embedding, as in the sampler, which embeds generated tokens as text.

  * One clip per row (N == B, the trainers' layout): per row, `out[b, t] = audio_embeds[b, k]` for the k-th
    audio token of row b, k < n_b = sum(audio_valid[b]); audio tokens past the row's n_b keep their token
    embedding. Nothing moves across rows, so an extra audio token in one row (e.g. sampled in its
    completion) cannot shift the audio of the rows after it, and under data parallelism each device gathers
    from its own rows only.
  * Otherwise (N clips != B rows): transformers' `masked_scatter`, the k-th audio token of the flattened
    batch gets the k-th valid embedding in (clip, position) order.

  Eager inputs: a ValueError when the audio tokens (in the prompt part) do not match the embeddings, per row
  (N == B) or in total. Under `jax.jit` the counts cannot be checked: check the tokenized prompts on the host
  with `check_audio_token_counts`.
  """
  b, t, d = token_embeds.shape
  if audio_embeds.ndim != 3 or audio_embeds.shape[-1] != d or tuple(audio_valid.shape) != audio_embeds.shape[:2]:
    raise ValueError(f"audio_embeds must be [clips, A, {d}] with audio_valid [clips, A]; got "
                     f"{tuple(audio_embeds.shape)} and {tuple(audio_valid.shape)}")
  if tuple(is_audio.shape) != (b, t):
    raise ValueError(f"is_audio must be [{b}, {t}], got {tuple(is_audio.shape)}")
  audio_valid = audio_valid.astype(bool)
  if prompt_length is not None:
    is_audio = is_audio & (jnp.arange(t) < int(prompt_length))[None, :]
  per_row = audio_embeds.shape[0] == b
  if _is_concrete(is_audio, audio_valid):
    tok = np.asarray(jnp.sum(is_audio, -1)).tolist()
    emb = np.asarray(jnp.sum(audio_valid, -1)).tolist()
    if (tok != emb) if per_row else (sum(tok) != sum(emb)):
      where = "per row" if per_row else "in total"
      raise ValueError(f"the inputs hold audio tokens that do not match the audio embeddings {where} (per row: "
                       f"tokens {tok}, embeddings {emb}): put one audio token per embedding in each prompt")
  if per_row:
    order = jnp.argsort(~audio_valid, axis=1, stable=True)  # each row's valid embeddings first, in order
    feats = jnp.take_along_axis(audio_embeds, order[:, :, None], axis=1)
    k = jnp.cumsum(is_audio, axis=1) - 1
    use = is_audio & (k < jnp.sum(audio_valid, axis=1, keepdims=True))
    spliced = jnp.take_along_axis(feats, jnp.clip(k, 0, feats.shape[1] - 1)[:, :, None], axis=1)
    return jnp.where(use[..., None], spliced.astype(token_embeds.dtype), token_embeds)
  flat_valid = audio_valid.reshape(-1)
  order = jnp.argsort(~flat_valid, stable=True)
  feats = audio_embeds.reshape(-1, d)[order]
  flat_audio = is_audio.reshape(-1)
  k = jnp.cumsum(flat_audio) - 1
  use = (flat_audio & (k < jnp.sum(flat_valid))).reshape(b, t)
  spliced = feats[jnp.clip(k, 0, feats.shape[0] - 1)].astype(token_embeds.dtype).reshape(b, t, d)
  return jnp.where(use[..., None], spliced, token_embeds)


def check_audio_token_counts(tokens: Any, audio_token_id: int, counts: Any, *, texts: Any = None) -> None:
  """Host-side check of tokenized prompts (numpy, before anything is jitted): row i of `tokens` [B, P] must
  hold exactly `counts[i]` audio tokens (its number of valid audio embeddings). Raises a ValueError naming the
  first bad row, e.g. when a question, an option or the system prompt contains the audio token's text (added
  special tokens are matched inside user text) or a chat template adds audio tokens. `texts`: the rendered
  prompts, quoted in the error."""
  tokens = np.asarray(tokens)
  counts = np.asarray(counts).reshape(-1)
  have = (tokens == int(audio_token_id)).sum(axis=-1)
  if have.shape != counts.shape:
    raise ValueError(f"{have.shape[0]} tokenized prompts but {counts.shape[0]} audio token counts")
  bad = np.flatnonzero(have != counts)
  if bad.size:
    i = int(bad[0])
    text = "" if texts is None else f"; prompt text {str(texts[i])[:300]!r}"
    raise ValueError(f"prompt row {i} holds {int(have[i])} audio tokens (id {int(audio_token_id)}) but its audio "
                     f"gives {int(counts[i])} embeddings ({bad.size} bad row(s) of {len(counts)}): does the "
                     f"question, an option or the system prompt contain the audio token's text?{text}")


class AudioLM(nnx.Module):
  """`encoder` (audio -> LM-width embeddings) + `lm` (`CausalLM`), spliced at `audio_token_id`.

  Attributes: lm, encoder, audio_token_id, model_type, freeze_encoder (stop gradients at the encoder output).
  """

  def __init__(self, lm_config: DecoderConfig, audio_config: AudioEncoderConfig, *, audio_token_id: int,
               model_type: str = "qwen2_audio", freeze_encoder: bool = True, rngs: nnx.Rngs):
    if model_type not in AUDIO_MODEL_TYPES:
      raise ValueError(f"model_type={model_type!r} is not supported; use one of {AUDIO_MODEL_TYPES}")
    if audio_config.kind == "omni" and audio_config.output_dim != lm_config.hidden_size:
      raise ValueError(f"audio output_dim={audio_config.output_dim} != LM hidden_size={lm_config.hidden_size}")
    self.lm = CausalLM(lm_config, rngs=rngs)
    with nnx.use_eager_sharding(False):  # logical names stay metadata: the model builds without a mesh
      self.encoder = (WhisperAudioEncoder(audio_config, lm_config.hidden_size, rngs=rngs)
                      if audio_config.kind == "whisper" else OmniAudioEncoder(audio_config, rngs=rngs))
    self.audio_config = audio_config
    self.audio_token_id = int(audio_token_id)
    self.model_type = model_type
    self.freeze_encoder = bool(freeze_encoder)

  @property
  def config(self) -> DecoderConfig:
    return self.lm.config

  def encode_audio(self, features: Array, feature_mask: Array) -> tuple[Array, Array]:
    """log-mel `features` [B, num_mel_bins, F] + `feature_mask` [B, F] -> (audio_embeds [B, A, D_lm] in the
    compute dtype, audio_valid [B, A] bool: the first `audio_output_lengths(mask.sum(-1))` per row)."""
    emb, valid = self.encoder(features, feature_mask)
    if self.freeze_encoder:
      emb = jax.lax.stop_gradient(emb)
    return emb, valid

  def embed_inputs(self, tokens: Array, audio_embeds: Array | None = None, audio_valid: Array | None = None, *,
                   prompt_length: int | None = None) -> Array:
    """Input embeddings [B, T, D] of `tokens` [B, T] with the audio embeddings spliced at the audio tokens
    (see `splice_audio`; `prompt_length`: splice only the first `prompt_length` positions, the prompt of a
    prompt + completion sequence); feed them as `embeds=` to `self.lm`, `token_logprobs` or
    `generate(prompt_embeds=)`."""
    tokens = jnp.asarray(tokens)
    base = self.lm.embed_tokens(tokens)
    if audio_embeds is None:
      return base
    audio_embeds = jnp.asarray(audio_embeds)
    audio_valid = (jnp.ones(audio_embeds.shape[:2], bool) if audio_valid is None else jnp.asarray(audio_valid))
    return splice_audio(base, tokens == self.audio_token_id, audio_embeds, audio_valid,
                        prompt_length=prompt_length)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None, input_features: Array | None = None,
               feature_attention_mask: Array | None = None, *, positions: Array | None = None,
               **visual_inputs) -> Array:
    """Logits [B, T, V] (compute dtype) as transformers' `...ForConditionalGeneration(...)`.logits (on the
    attended positions): `input_features` [N, num_mel_bins, F] + `feature_attention_mask` [N, F] for the N
    clips, whose embeddings fill the audio tokens of `input_ids` in order. Image / video inputs
    (`pixel_values`, ...) are refused with a ValueError."""
    check_audio_only(**visual_inputs)
    if any(v is not None for v in visual_inputs.values()):
      raise TypeError(f"unexpected inputs {sorted(visual_inputs)}")
    input_ids = jnp.asarray(input_ids)
    if input_features is None:
      embeds = None
    else:
      if feature_attention_mask is None:
        feature_attention_mask = jnp.ones((input_features.shape[0], input_features.shape[2]), bool)
      emb, valid = self.encode_audio(input_features, feature_attention_mask)
      embeds = self.embed_inputs(input_ids, emb, valid)
    return self.lm(input_ids, positions=positions, attention_mask=attention_mask, embeds=embeds)


def lm_param_filter(path, value) -> bool:
  """`nnx` filter of the LM's parameters (a frozen encoder): `nnx.split(model, lm_param_filter, ...)`."""
  return isinstance(value, nnx.Param) and len(path) > 0 and str(path[0]) == "lm"


# ------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------
def _full_config(path: Path) -> dict:
  """config.json with transformers' defaults filled in (offline; no weights)."""
  from transformers import AutoConfig  # pylint: disable=import-outside-toplevel
  with open(path / "config.json") as f:
    raw = json.load(f)
  model_type = raw.get("model_type")
  if model_type not in AUDIO_MODEL_TYPES:
    raise ValueError(f"unsupported model_type={model_type!r} in {path / 'config.json'}; supported audio LLMs: "
                     f"{AUDIO_MODEL_TYPES}")
  full = AutoConfig.from_pretrained(os.fspath(path), local_files_only=True).to_dict()
  return full


def resolve_configs(full: dict, **overrides,
                    ) -> tuple[str, DecoderConfig, AudioEncoderConfig, int, tuple[str, str, str, str | None]]:
  """(model_type, LM config, audio config, audio_token_id, tensor-name prefixes [lm 'model.' part, head, audio])
  from a transformers config dict (`AutoConfig(...).to_dict()`). `overrides`: dtype, param_dtype and other
  `DecoderConfig` fields. The head is tied by the *thinker*-level `tie_word_embeddings` (Omni) or the text
  config's (Qwen2-Audio)."""
  model_type = full.get("model_type")
  dtype_kw = {k: overrides[k] for k in ("dtype", "param_dtype") if k in overrides}
  if model_type == "qwen2_audio":
    text, audio, kind = dict(full["text_config"]), dict(full["audio_config"]), "whisper"
    tie = bool(text.get("tie_word_embeddings", False))
    token = full.get("audio_token_id", full.get("audio_token_index"))
    prefixes: tuple[str, str, str, str | None] = (
        "language_model.model.", "language_model.lm_head.", "audio_tower.", "multi_modal_projector.")
  elif model_type in ("qwen2_5_omni_thinker", "qwen2_5_omni"):
    thinker = dict(full["thinker_config"]) if model_type == "qwen2_5_omni" else full
    text, audio, kind = dict(thinker["text_config"]), dict(thinker["audio_config"]), "omni"
    tie = bool(thinker.get("tie_word_embeddings", False))  # NOT text_config's (defaults True)
    token = thinker.get("audio_token_id", thinker.get("audio_token_index"))
    pre = "thinker." if model_type == "qwen2_5_omni" else ""
    prefixes = (pre + "model.", pre + "lm_head.", pre + "audio_tower.", None)  # no separate projector
  else:
    raise ValueError(f"unsupported model_type={model_type!r}; supported audio LLMs: {AUDIO_MODEL_TYPES}")
  if token is None:
    raise ValueError(f"the {model_type} config has no audio_token_id / audio_token_index")
  text["model_type"] = "qwen2"
  text["tie_word_embeddings"] = tie
  lm_config = DecoderConfig.from_hf_config(text, **overrides)
  audio_config = AudioEncoderConfig.from_hf(audio, kind, **dtype_kw)
  return model_type, lm_config, audio_config, int(token), prefixes


def _encoder_mappings(cfg: AudioEncoderConfig, audio_prefix: str, projector_prefix: str | None):
  """{our path: (hf name, hf shape, to_ours)} of the encoder (+ projector)."""
  d, f, m = cfg.d_model, cfg.encoder_ffn_dim, cfg.num_mel_bins
  out: dict[tuple, tuple[str, tuple, Any]] = {}
  tr = lambda w: w.T  # noqa: E731
  ident = lambda w: w  # noqa: E731
  conv = lambda w: np.transpose(w, (2, 1, 0))  # noqa: E731  torch [out, in, k] -> [k, in, out]

  def lin(ours, name, n_in, n_out, bias=True):
    out[ours + ("kernel",)] = (name + ".weight", (n_out, n_in), tr)
    if bias:
      out[ours + ("bias",)] = (name + ".bias", (n_out,), ident)

  def ln(ours, name, dim):
    out[ours + ("scale",)] = (name + ".weight", (dim,), ident)
    out[ours + ("bias",)] = (name + ".bias", (dim,), ident)

  e, a = ("encoder",), audio_prefix
  out[e + ("conv1", "kernel")] = (a + "conv1.weight", (d, m, 3), conv)
  out[e + ("conv1", "bias")] = (a + "conv1.bias", (d,), ident)
  out[e + ("conv2", "kernel")] = (a + "conv2.weight", (d, d, 3), conv)
  out[e + ("conv2", "bias")] = (a + "conv2.bias", (d,), ident)
  for i in range(cfg.encoder_layers):
    p, q = e + ("layers", i), f"{a}layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      lin(p + ("self_attn", name), q + "self_attn." + name, d, d, bias=name != "k_proj")
    ln(p + ("self_attn_layer_norm",), q + "self_attn_layer_norm", d)
    lin(p + ("fc1",), q + "fc1", d, f)
    lin(p + ("fc2",), q + "fc2", f, d)
    ln(p + ("final_layer_norm",), q + "final_layer_norm", d)
  if cfg.kind == "whisper":
    out[e + ("embed_positions",)] = (a + "embed_positions.weight", (cfg.max_source_positions, d), ident)
    ln(e + ("layer_norm",), a + "layer_norm", d)
    return out, projector_prefix
  ln(e + ("ln_post",), a + "ln_post", d)
  lin(e + ("proj",), a + "proj", d, cfg.output_dim)
  return out, None


def load_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    freeze_encoder: bool = True, config_overrides: dict[str, Any] | None = None,
                    mesh: jax.sharding.Mesh | None = None, rules: Any = None) -> AudioLM:
  """Reads a local transformers directory of `qwen2_audio`, `qwen2_5_omni_thinker` or `qwen2_5_omni` (the
  thinker: talker / token2wav / visual tensors are ignored, with a log note) into an `AudioLM`, one tensor at
  a time from the memory-mapped safetensors (numpy; no torch).

  Args:
    path: directory with config.json and *.safetensors (+ index when sharded).
    dtype, param_dtype: compute / storage dtypes (LM and encoder).
    freeze_encoder: stop gradients at the encoder output.
    config_overrides: extra `DecoderConfig` fields (e.g. scan_layers, remat, attention_impl).
    mesh, rules: place every parameter directly with its sharding from its logical axis names (the project's
      rules, `adrpo_jax.train.sharding`; default rules when None), so a large checkpoint never sits whole on
      one device. Without a mesh: the default device.
  Raises:
    ValueError: unsupported model_type; `CheckpointError` (a ValueError) for a missing / mis-shaped tensor.
    FileNotFoundError: no config.json / safetensors.
  """
  path = Path(path)
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"no config.json in {path}")
  full = _full_config(path)
  model_type, lm_config, audio_config, token, (lm_pre, head_pre, audio_pre, proj_pre) = resolve_configs(
      full, dtype=dtype, param_dtype=param_dtype, **dict(config_overrides or {}))
  reader = CheckpointReader(path)
  embed_name, head_name = lm_pre + "embed_tokens.weight", head_pre + "weight"
  if lm_config.tie_word_embeddings and head_name in reader and embed_name in reader:
    head, emb = reader.get(head_name), reader.get(embed_name)
    if head.shape != emb.shape or not np.array_equal(head, emb):
      # transformers 5.23 never ties Qwen2-Audio's head (whatever the flags say): expected there, odd elsewhere.
      (log.info if model_type == "qwen2_audio" else log.warning)(
          "%s: tie_word_embeddings=True but %s differs from %s: NOT tying (as transformers)", path, head_name,
          embed_name)
      lm_config = lm_config.replace(tie_word_embeddings=False)
  elif not lm_config.tie_word_embeddings and head_name not in reader:
    log.warning("%s: tie_word_embeddings=False but %s is absent: tying the head to the embedding", path, head_name)
    lm_config = lm_config.replace(tie_word_embeddings=True)
  abstract = nnx.eval_shape(lambda: AudioLM(lm_config, audio_config, audio_token_id=token, model_type=model_type,
                                            freeze_encoder=freeze_encoder, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
  target = np.dtype(jnp.dtype(param_dtype))
  # name -> (hf name, hf shape, to_ours, layer index or None)
  groups: dict[tuple, list] = {}
  for mp in param_mappings(lm_config):
    name = mp.hf_name
    name = (lm_pre + name[len("model."):]) if name.startswith("model.") else head_pre + name[len("lm_head."):]
    groups.setdefault(("lm",) + mp.ours, []).append((name, mp.hf_shape, mp.to_ours, mp.layer))
  enc, proj_prefix = _encoder_mappings(audio_config, audio_pre, proj_pre)
  for ours, (name, shape, fn) in enc.items():
    groups[ours] = [(name, shape, fn, None)]
  if proj_prefix is not None:
    groups[("encoder", "projector", "kernel")] = [(proj_prefix + "linear.weight",
                                                    (lm_config.hidden_size, audio_config.d_model), lambda w: w.T,
                                                    None)]
    groups[("encoder", "projector", "bias")] = [(proj_prefix + "linear.bias", (lm_config.hidden_size,),
                                                  lambda w: w, None)]
  params = {k for k, v in flat.items() if isinstance(v, nnx.Param)}
  if set(groups) != params:  # internal consistency
    raise AssertionError(f"mapping/model mismatch: {sorted(set(groups) ^ params, key=str)[:6]}")
  used = set()

  def read(name, shape, fn):
    if name not in reader:
      raise CheckpointError(f"tensor {name!r} not found in {reader.source}")
    arr = reader.get(name)
    if tuple(arr.shape) != tuple(shape):
      raise CheckpointError(f"tensor {name!r} in {reader.location(name)} has shape {tuple(arr.shape)}, expected "
                            f"{tuple(shape)} for this config")
    used.add(name)
    return fn(arr)

  values = {}
  for ours in params:
    var = flat[ours]
    shape = tuple(var.get_value().shape)
    group = groups[ours]
    if group[0][3] is None:
      host = read(*group[0][:3])
    else:
      host = np.empty(shape, target)
      for name, s, fn, layer in group:
        host[layer] = read(name, s, fn)
    if mesh is None:
      values[ours] = jax.device_put(np.ascontiguousarray(host, dtype=target))
    else:
      names = tuple(var.get_metadata().get("out_sharding") or (None,) * len(shape))
      sharding = (logical_to_sharding(mesh, names, shape) if rules is None
                  else logical_to_sharding(mesh, names, shape, rules))
      def shard(idx, host=host):
        return np.ascontiguousarray(host[idx], dtype=target)

      values[ours] = jax.make_array_from_callback(shape, sharding, shard)
  skipped: dict[str, int] = {}
  for name in reader.names():
    if name in used or name.endswith("rotary_emb.inv_freq"):
      continue
    if name == head_name and lm_config.tie_word_embeddings:
      continue
    top = name.split(".")[0] if not name.startswith("thinker.") else ".".join(name.split(".")[:2])
    if name.endswith("audio_bos_eos_token.weight"):  # defined by transformers, unused in its forward
      top = "audio_bos_eos_token (unused)"
    if top in ("talker", "token2wav", "visual", "thinker.visual", "audio_bos_eos_token (unused)"):
      skipped[top] = skipped.get(top, 0) + 1
    else:
      log.warning("unexpected tensor %r in %s was not loaded", name, reader.location(name))
  if skipped:
    log.info("%s: audio + text thinker only; not loaded: %s", path,
             ", ".join(f"{k} ({n} tensors)" for k, n in sorted(skipped.items())))
  nested: dict = {}
  for ours, value in values.items():
    node = nested
    for key in ours[:-1]:
      node = node.setdefault(key, {})
    node[ours[-1]] = value
  nnx.replace_by_pure_dict(state, nested)
  return nnx.merge(graphdef, state)


def check_audio_only(**inputs) -> None:
  """Raises ValueError for image / video inputs (pixel_values*, image_grid_thw, video_grid_thw, ...): the
  visual tower is not built."""
  bad = sorted(k for k, v in inputs.items() if v is not None and any(s in k for s in ("pixel", "image", "video")))
  if bad:
    raise ValueError(f"image / video inputs {bad} are not supported: this port covers audio + text only")
