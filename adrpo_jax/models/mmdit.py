"""The SD3 / SD3.5 MMDiT (diffusers' ``SD3Transformer2DModel``) in Flax NNX, with diffusers checkpoint I/O.

Architecture (Esser et al., 2024, "Scaling Rectified Flow Transformers"; diffusers 0.42.1
``transformer_sd3.py``), numerically the same as diffusers (tested to 1e-4 in float32):

* latents ``[B, H, W, C]`` (NHWC) are cut into ``p x p`` patches and embedded (``pos_embed.proj``, a strided
  conv in diffusers, a linear layer on ``(p, q, c)``-ordered patches here), plus the fixed 2-D sin-cos position
  table of ``pos_embed_max_size**2`` entries, center-cropped to the ``(H/p) x (W/p)`` grid (SD3's cropping;
  ``H != W`` works);
* the conditioning vector ``temb = timestep_embedder(sincos_256(timestep)) + text_embedder(pooled)`` (timesteps
  on diffusers' 0..1000 scale), the text states go through ``context_embedder`` (``joint_attention_dim`` ->
  width);
* ``num_layers`` joint blocks: adaLN-Zero modulation of both streams (``norm1`` / ``norm1_context``), one joint
  attention over the concatenation ``[image tokens, text tokens]`` with separate projections per stream
  (``to_q/k/v`` + ``to_out``; ``add_q/k/v_proj`` + ``to_add_out``), optional per-head RMS q/k-norm
  (``qk_norm="rms_norm"``, SD3.5), a GELU(tanh) MLP per stream; SD3.5's dual-attention blocks
  (``dual_attention_layers``) add a second, image-only self-attention ``attn2`` with its own modulation (9
  chunks in ``norm1``). The last block is ``context_pre_only``: it updates only the image stream (its text
  modulation is an ``AdaLayerNormContinuous``; it has no ``to_add_out`` / ``ff_context``);
* ``norm_out`` (adaLN continuous: ``scale, shift``) and ``proj_out`` back to ``p * p * out_channels``, unpatchified
  to ``[B, H, W, out_channels]``.

Layout of the blocks (``MMDiTConfig.scan_layers``):

* ``scan_layers=False``: ``model.transformer_blocks`` is an ``nnx.List`` of the ``num_layers`` blocks (block
  paths as in diffusers: ``transformer_blocks.3.attn.to_q``).
* ``scan_layers=True`` (default): the first ``num_layers - 1`` blocks are split into maximal runs of the same
  structure (dual attention or not; SD3.5-medium: blocks 0-12 dual, 13-22 plain) and each run is stacked
  (``model.block_stacks[k]``, a :class:`StackedJointBlocks`: every parameter has a leading ``'layers'`` axis) and
  run with one ``jax.lax.scan``; the last (``context_pre_only``) block, whose structure differs, is
  ``model.last_block``. Same numbers as the list layout; checkpoints are always written in diffusers' per-block
  names. With ``remat`` every block (inside the scans too) is rematerialised with ``remat_policy``
  (a ``jax.checkpoint_policies`` name; None = save nothing).

Parameters carry the project's logical axis names ('embed', 'mlp', 'heads', 'norm', 'layers'; None =
replicated) for :mod:`adrpo_jax.train.sharding`. Every projection is an ``nnx.Linear`` (kernel ``[in, out]``), so
:func:`adrpo_jax.models.lora.apply_lora` finds them: ``attn.to_q / to_k / to_v / to_out``, ``attn.add_q_proj /
add_k_proj / add_v_proj / to_add_out``, ``attn2.*``, ``ff.fc1 / fc2``, ``ff_context.fc1 / fc2``, ``norm1.linear``,
... (stacked sites inside the scans: an adapter goes to every block of a stack or to none).

Our names that differ from diffusers' (:func:`param_mappings` has the full table): ``patch_proj`` =
``pos_embed.proj`` (conv ``[D, C, p, p]`` <-> kernel ``[(p, q, C), D]``), ``pos_table`` = ``pos_embed.pos_embed``
(a :class:`PositionTable`, not a parameter), ``timestep_linear_1/2`` and ``text_linear_1/2`` =
``time_text_embed.{timestep,text}_embedder.linear_1/2``, ``attn.to_out`` = ``attn.to_out.0``, ``ff.fc1 / fc2`` =
``ff.net.0.proj / ff.net.2``; Linear kernels are the transposed torch weights.

Checkpoints: :func:`load_pretrained` reads a local diffusers directory (``config.json`` and
``diffusion_pytorch_model.safetensors`` or the sharded index) without torch, tensor by tensor from memory maps
into an abstract model (never two copies of the weights in host memory); :func:`save_pretrained` writes one that
``diffusers.SD3Transformer2DModel.from_pretrained`` loads. :func:`save_diffusers_lora` writes the LoRA adapters
alone in the peft / diffusers format (``pipe.load_lora_weights(dir)``,
``SD3Transformer2DModel.load_lora_adapter(dir)``).

The last block's text query projection (``context_pre_only``: its output is discarded, here and in diffusers) is
kept for checkpoint compatibility but is no LoRA site: an adapter there would never get a gradient.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> # MMDiT(tiny_config(), rngs=nnx.Rngs(0)) for random weights, load_pretrained("<sd3>/transformer") for real
  >>> model = nnx.eval_shape(lambda: MMDiT(tiny_config(), rngs=nnx.Rngs(0)))  # abstract: shapes only
  >>> latents, t = jnp.zeros((2, 8, 6, 4)), jnp.array([0.0, 500.0])  # NHWC (H != W is fine), diffusers' timesteps
  >>> text, pooled = jnp.zeros((2, 5, 12)), jnp.zeros((2, 10))
  >>> jax.eval_shape(lambda m: m(latents, t, text, pooled), model)  # jax.jit(...) to run a concrete model
  ShapeDtypeStruct(shape=(2, 8, 6, 4), dtype=float32)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax.models.dit import host_initializer, timestep_embedding
from adrpo_jax.models.llm.activation_sharding import constrain_batch
from adrpo_jax.models.llm.checkpoint import (CheckpointError, CheckpointReader, SafetensorsFile, _to_host,
                                             read_weight_map, write_sharded_weights)
from adrpo_jax.models.lora import lora_dropout_fold_in, lora_sites
from adrpo_jax.models.stacking import stack_variables, unstacked_copy

log = logging.getLogger(__name__)

__all__ = [
    "MMDiTConfig",
    "MMDiT",
    "JointBlock",
    "StackedJointBlocks",
    "PositionTable",
    "CheckpointError",
    "tiny_config",
    "preset_config",
    "PRESETS",
    "param_mappings",
    "read_config",
    "sd3_pos_embed_table",
    "load_pretrained",
    "save_pretrained",
    "diffusers_lora_state_dict",
    "save_diffusers_lora",
    "export_lora_diffusers",
    "velocity_fn_from_state",
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
CONFIG_NAME = "config.json"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_QK_NORMS = (None, "rms_norm")
_TIME_CHANNELS = 256  # diffusers' Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
_EPS = 1e-6
_TRANSPOSE_BLOCK = 64  # rows per block when transposing a checkpoint's Linear weight on load


def _dtype_name(value: Any, field: str) -> str:
  """A dtype given as a string or a dtype-like, as one of the names of :data:`_DTYPES`."""
  try:
    name = jnp.dtype(value).name if not isinstance(value, str) else value
  except TypeError:
    name = None
  if name not in _DTYPES:
    raise ValueError(f"`{field}` must be one of {sorted(_DTYPES)} (or the matching dtype), got {value!r}.")
  return name


# ------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Configuration of :class:`MMDiT`: diffusers' ``SD3Transformer2DModel`` config fields (same names, same
  defaults) plus how the model computes and is laid out.

  Attributes (diffusers):
    sample_size: latent side the model was trained at (sets the position table's ``base_size``).
    patch_size: patch side ``p``; latents must have ``H, W`` divisible by it.
    in_channels: latent channels ``C`` in; out_channels: channels out (None = ``in_channels``).
    num_layers: joint blocks (the last one is ``context_pre_only``).
    attention_head_dim, num_attention_heads: width = ``heads * head_dim``.
    joint_attention_dim: text-state width ``D`` in; caption_projection_dim: its projection (= the width).
    pooled_projection_dim: pooled text width ``P``.
    pos_embed_max_size: side of the sin-cos position table (latent grids up to it, center-cropped); None = a
      table for exactly the ``(H/p) x (W/p)`` grid (diffusers' non-cropping path).
    dual_attention_layers: blocks with SD3.5's second (image-only) attention ``attn2``.
    qk_norm: None or ``"rms_norm"`` (per-head RMSNorm of q and k, SD3.5).
  Attributes (ours):
    dtype: compute dtype of the matmuls ("float32", "bfloat16", "float16"); norms, softmax, the modulation
      and the residual streams are float32.
    param_dtype: storage dtype of the parameters.
    remat: rematerialise every block in the backward pass; remat_policy: a ``jax.checkpoint_policies`` name
      (e.g. ``"dots_with_no_batch_dims_saveable"``) or None (save nothing).
    scan_layers: stack homogeneous runs of blocks and run them with ``jax.lax.scan`` (see the module doc).
    attention_impl: ``implementation`` of ``jax.nn.dot_product_attention``: None / ``"xla"`` (materialises the
      ``[B, heads, T, T]`` scores, ``T`` = image + text tokens) or ``"cudnn"`` (fused flash attention on NVIDIA
      GPUs; needs ``dtype`` bfloat16 / float16).
  """

  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int | None = 16
  pos_embed_max_size: int | None = 96
  dual_attention_layers: tuple[int, ...] = ()
  qk_norm: str | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  remat_policy: str | None = None
  scan_layers: bool = True
  attention_impl: str | None = None

  DIFFUSERS_FIELDS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                      "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                      "pooled_projection_dim", "out_channels", "pos_embed_max_size", "dual_attention_layers",
                      "qk_norm")

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    for name in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                 "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"MMDiTConfig.{name} must be a positive int, got {value!r}.")
      set_(name, int(value))
    for name in ("out_channels", "pos_embed_max_size"):
      value = getattr(self, name)
      if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
          raise ValueError(f"MMDiTConfig.{name} must be None or a positive int, got {value!r}.")
        set_(name, int(value))
    if self.out_channels is None:
      set_("out_channels", self.in_channels)
    if self.caption_projection_dim != self.inner_dim:
      raise ValueError(f"MMDiTConfig.caption_projection_dim ({self.caption_projection_dim}) must equal "
                       f"num_attention_heads * attention_head_dim ({self.inner_dim}): the projected text states "
                       "enter the joint blocks of that width.")
    if self.inner_dim % 4:
      raise ValueError(f"the width num_attention_heads * attention_head_dim = {self.inner_dim} must be divisible "
                       "by 4 (2-D sin-cos position table).")
    dual = self.dual_attention_layers
    if isinstance(dual, (str, bytes)) or not isinstance(dual, Iterable):
      raise ValueError(f"MMDiTConfig.dual_attention_layers must be a sequence of block indices, got {dual!r}.")
    dual = tuple(dual)
    bad = [i for i in dual if isinstance(i, bool) or not isinstance(i, (int, np.integer))
           or not 0 <= i < self.num_layers]
    if bad or len(set(dual)) != len(dual):
      raise ValueError(f"MMDiTConfig.dual_attention_layers={dual!r} must be distinct block indices in "
                       f"[0, {self.num_layers}) (num_layers={self.num_layers}).")
    set_("dual_attention_layers", tuple(sorted(int(i) for i in dual)))
    if self.qk_norm not in _QK_NORMS:
      raise ValueError(f"MMDiTConfig.qk_norm must be one of {_QK_NORMS} (SD3: None, SD3.5: 'rms_norm'), "
                       f"got {self.qk_norm!r}.")
    set_("dtype", _dtype_name(self.dtype, "MMDiTConfig.dtype"))
    set_("param_dtype", _dtype_name(self.param_dtype, "MMDiTConfig.param_dtype"))
    for name in ("remat", "scan_layers"):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"MMDiTConfig.{name} must be a bool, got {value!r}.")
      set_(name, bool(value))
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(f"MMDiTConfig.attention_impl must be None, 'xla' or 'cudnn', got {self.attention_impl!r}.")
    if self.attention_impl == "cudnn" and self.dtype == "float32":
      raise ValueError("MMDiTConfig.attention_impl='cudnn' needs dtype 'bfloat16' or 'float16' (cuDNN's fused "
                       "attention has no float32 path); use None / 'xla' for float32.")
    if self.remat_policy is not None:
      policy = getattr(jax.checkpoint_policies, str(self.remat_policy), None)
      if not isinstance(self.remat_policy, str) or self.remat_policy.startswith("_") or not callable(policy):
        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
        raise ValueError(f"MMDiTConfig.remat_policy={self.remat_policy!r} is not a jax.checkpoint_policies "
                         f"policy; choose one of {names} or None.")

  @property
  def channels_out(self) -> int:
    """``out_channels`` as an int (resolved to ``in_channels`` by ``__post_init__`` when None)."""
    assert self.out_channels is not None
    return self.out_channels

  @property
  def inner_dim(self) -> int:
    """The width ``num_attention_heads * attention_head_dim``."""
    return self.num_attention_heads * self.attention_head_dim

  def block_kinds(self) -> list[tuple[bool, bool]]:
    """Per block: ``(use_dual_attention, context_pre_only)``."""
    return [(i in self.dual_attention_layers, i == self.num_layers - 1) for i in range(self.num_layers)]

  def block_runs(self) -> list[tuple[int, int, bool]]:
    """The stacked runs of the scan layout: ``(start, length, use_dual_attention)`` over blocks
    ``0 .. num_layers - 2`` (maximal runs of the same structure); the last block stays separate."""
    runs: list[list] = []
    for i, (dual, _) in enumerate(self.block_kinds()[:-1]):
      if runs and runs[-1][2] == dual:
        runs[-1][1] += 1
      else:
        runs.append([i, 1, dual])
    return [tuple(r) for r in runs]

  def replace(self, **changes) -> "MMDiTConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_diffusers_config(cls, d: dict[str, Any], **overrides: Any) -> "MMDiTConfig":
    """From a diffusers ``config.json`` dict (keys starting with ``_`` are metadata and skipped; other unknown
    keys are ignored with a warning) plus ``overrides`` (any field, e.g. ``dtype="bfloat16"``)."""
    return config_from_diffusers(cls, d, overrides, "an SD3Transformer2DModel")

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers ``config.json`` dict (``_class_name`` = SD3Transformer2DModel)."""
    out: dict[str, Any] = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.42.1"}
    for k in self.DIFFUSERS_FIELDS:
      v = getattr(self, k)
      out[k] = list(v) if isinstance(v, tuple) else v
    return out

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["dual_attention_layers"] = list(self.dual_attention_layers)
    return d


def config_from_diffusers(cls, d: dict[str, Any], overrides: dict[str, Any], what: str):
  """``cls(**fields)`` from a diffusers ``config.json`` dict: ``_``-keys (metadata) skipped, keys outside
  ``cls.DIFFUSERS_FIELDS`` ignored with a warning naming ``what`` (the diffusers class), JSON lists made tuples,
  then ``overrides`` (any dataclass field; an unknown one is an error naming the valid fields)."""
  if not isinstance(d, dict):
    raise ValueError(f"a diffusers config must be a dict, got {type(d).__name__}.")
  names = {f.name for f in dataclasses.fields(cls)}
  bad = sorted(set(overrides) - names)
  if bad:
    raise ValueError(f"unknown {cls.__name__} fields {bad}; valid fields are {sorted(names)}.")
  kwargs = {}
  for k, v in d.items():
    if k.startswith("_"):
      continue
    if k not in cls.DIFFUSERS_FIELDS:
      log.warning("ignoring config key %r (not %s field this module knows)", k, what)
      continue
    kwargs[k] = tuple(v) if isinstance(v, list) else v
  kwargs.update(overrides)
  return cls(**kwargs)


_SD3_BASE = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, joint_attention_dim=4096,
                 pooled_projection_dim=2048, out_channels=16)
#: The diffusers ``transformer/config.json`` fields of the released SD3-family models (for shapes, memory plans
#: and tests without the weights; a real directory's config.json is what :func:`load_pretrained` uses).
PRESETS: dict[str, dict[str, Any]] = {
    "sd3-medium": dict(_SD3_BASE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192),
    "sd3.5-medium": dict(_SD3_BASE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(_SD3_BASE, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, qk_norm="rms_norm"),
}


def preset_config(name: str, **kw: Any) -> MMDiTConfig:
  """The :class:`MMDiTConfig` of a released model (:data:`PRESETS`: ``"sd3-medium"``, ``"sd3.5-medium"``,
  ``"sd3.5-large"``); ``kw`` replaces fields (``dtype``, ``remat``, ...)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
  return MMDiTConfig(**{**PRESETS[name], **kw})


def tiny_config(**kw: Any) -> MMDiTConfig:
  """A tiny SD3-shaped config (2 heads of 8, width 16, 3 blocks, latents up to 12 x 12 x 4 with patch 2) for
  tests and CPU configs; ``kw`` replaces any field (e.g. ``qk_norm="rms_norm", dual_attention_layers=(0, 1)``
  for an SD3.5-shaped one)."""
  base: dict[str, Any]
  base = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
              num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
              out_channels=4, pos_embed_max_size=6)
  base.update(kw)
  return MMDiTConfig(**base)


# ------------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------------
def sd3_pos_embed_table(embed_dim: int, grid_h: int, grid_w: int, base_size: int) -> np.ndarray:
  """diffusers' ``get_2d_sincos_pos_embed(embed_dim, (grid_h, grid_w), base_size=base_size)`` as a float32
  ``[grid_h * grid_w, embed_dim]`` NumPy array (row-major grid; the first half of the channels encodes the column,
  the second half the row; positions ``arange(n) / (n / base_size)`` in float32, the sin / cos in float64 as in
  diffusers, then rounded to float32). Built from the two 1-D tables: no float64 copy of the whole table."""
  if embed_dim % 4:
    raise ValueError(f"sin-cos position table needs embed_dim divisible by 4, got {embed_dim}.")
  half = embed_dim // 2

  def one(n: int) -> np.ndarray:  # [n, half] float32
    pos = (np.arange(n, dtype=np.float32) / np.float32(n / base_size)).astype(np.float32)
    omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)

  table = np.empty((grid_h, grid_w, embed_dim), np.float32)
  table[:, :, :half] = one(grid_w)[None, :, :]
  table[:, :, half:] = one(grid_h)[:, None, :]
  return table.reshape(grid_h * grid_w, embed_dim)


def _pos_table_value(embed_dim: int, size: int, base_size: int) -> jax.Array:
  """The ``[size**2, embed_dim]`` table; under a trace (``nnx.eval_shape`` in :func:`load_pretrained`) a host
  callback that an abstract evaluation never runs, so building an abstract SD3.5 model costs no table."""
  shape = jax.ShapeDtypeStruct((size * size, embed_dim), jnp.float32)
  if isinstance(jnp.zeros((), jnp.float32), jax.core.Tracer):
    return jax.pure_callback(lambda: sd3_pos_embed_table(embed_dim, size, size, base_size), shape)
  return jnp.asarray(sd3_pos_embed_table(embed_dim, size, size, base_size))


def _patchify(x: jax.Array, p: int) -> jax.Array:
  """``[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]`` (row-major patches, each flattened ``(p, q, c)``)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def _unpatchify(tokens: jax.Array, p: int, h: int, w: int, c: int) -> jax.Array:
  """``[B, (h)(w), p*p*c] -> [B, h*p, w*p, c]`` (inverse of :func:`_patchify`; diffusers' ``nhwpqc->nchpwq``)."""
  b = tokens.shape[0]
  x = tokens.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)


def _layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm without affine parameters, eps 1e-6, in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centered = x - mean
  return centered * jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + _EPS)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


# ------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------
_host_xavier = host_initializer("xavier_uniform")


def _xavier(key, shape, dtype=jnp.float32):
  """Xavier-uniform kernels: drawn on the host for a concrete key (fast eager builds on CPU), with
  ``jax.random`` under a trace (``jit`` / ``nnx.eval_shape``: no host callback, no tracer-to-NumPy attempt)."""
  if isinstance(key, jax.core.Tracer):
    return jax.nn.initializers.xavier_uniform()(key, shape, dtype)
  return _host_xavier(key, shape, dtype)


def _zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def _linear(n_in: int, n_out: int, names: tuple[str | None, str | None], kw: dict, cls: type = nnx.Linear
            ) -> nnx.Linear:
  return cls(n_in, n_out, dtype=kw["dtype"], param_dtype=kw["param_dtype"],
             kernel_init=nnx.with_partitioning(_xavier, names),
             bias_init=nnx.with_partitioning(_zeros, (names[1],)), rngs=kw["rngs"])


class UnusedLinear(nnx.Linear):
  """A projection whose output the forward never uses (the ``context_pre_only`` block's ``add_q_proj``): its
  weights are loaded and saved for checkpoint compatibility, but it is no LoRA site (``lora_kernels`` is empty),
  so no adapter without a gradient is created and carried in the optimizer state."""

  def lora_kernels(self) -> dict[str, str]:
    return {}


class _Keys:
  """A stand-in for ``nnx.Rngs`` in the layers' constructors: ``params()`` = ``fold_in(key, i)`` with a Python
  counter. (``nnx.Rngs`` updates a counter variable on every draw, and under ``nnx.eval_shape`` each update
  inspects the sharding of a tracer, which costs time proportional to the trace so far: building an abstract
  SD3-medium took ~10 s, now well under one.)"""

  def __init__(self, rngs: nnx.Rngs):
    self.key, self.count = rngs.params(), 0

  def params(self) -> jax.Array:
    self.count += 1
    return jax.random.fold_in(self.key, self.count)


class PositionTable(nnx.Variable):
  """The fixed sin-cos position table (diffusers' persistent buffer ``pos_embed.pos_embed``): not an
  ``nnx.Param``, so never trained (it sits in the frozen part of a split model)."""


class RMSNorm(nnx.Module):
  """Per-head RMSNorm of q / k (``qk_norm="rms_norm"``): ``x * rsqrt(mean(x^2) + 1e-6) * weight`` in float32."""

  def __init__(self, dim: int, *, param_dtype, **_):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _EPS)
    return x * self.weight[...].astype(jnp.float32)


class FeedForward(nnx.Module):
  """diffusers' ``FeedForward(activation_fn="gelu-approximate")``: ``fc2(gelu_tanh(fc1(x)))``, 4x width."""

  def __init__(self, dim: int, kw: dict):
    self.fc1 = _linear(dim, 4 * dim, ("embed", "mlp"), kw)
    self.fc2 = _linear(4 * dim, dim, ("mlp", "embed"), kw)
    self.dtype = kw["dtype"]

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.fc1(x.astype(self.dtype)), approximate=True)
    return self.fc2(h).astype(jnp.float32)


class JointAttention(nnx.Module):
  """diffusers' ``Attention`` with ``JointAttnProcessor2_0``: image projections ``to_q/k/v`` + ``to_out``; with
  ``joint`` also the text projections ``add_q/k/v_proj`` (+ ``to_add_out`` unless ``context_pre_only``);
  ``qk_norm`` adds ``norm_q / norm_k`` (+ ``norm_added_q / norm_added_k``)."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, joint: bool, context_pre_only: bool,
               qk_norm: str | None, kw: dict, attention_impl: str | None = None):
    inner = heads * head_dim
    self.heads, self.head_dim, self.dtype = heads, head_dim, kw["dtype"]
    self.attention_impl: Any = attention_impl  # None | 'xla' | 'cudnn' (checked by MMDiTConfig)
    self.joint, self.context_pre_only = joint, context_pre_only
    self.to_add_out: nnx.Linear | None
    self.to_q = _linear(dim, inner, ("embed", "heads"), kw)
    self.to_k = _linear(dim, inner, ("embed", "heads"), kw)
    self.to_v = _linear(dim, inner, ("embed", "heads"), kw)
    self.to_out = _linear(inner, dim, ("heads", "embed"), kw)
    norm = (lambda: RMSNorm(head_dim, **kw)) if qk_norm == "rms_norm" else (lambda: None)
    self.norm_q, self.norm_k = norm(), norm()
    if joint:
      # context_pre_only: the text queries only feed the text output, which is not computed
      self.add_q_proj = _linear(dim, inner, ("embed", "heads"), kw, UnusedLinear if context_pre_only else nnx.Linear)
      self.add_k_proj = _linear(dim, inner, ("embed", "heads"), kw)
      self.add_v_proj = _linear(dim, inner, ("embed", "heads"), kw)
      self.to_add_out = None if context_pre_only else _linear(inner, dim, ("heads", "embed"), kw)
      self.norm_added_q, self.norm_added_k = norm(), norm()

  def _heads(self, proj: nnx.Linear, norm: RMSNorm | None, x: jax.Array) -> jax.Array:
    y = proj(x)
    y = y.reshape(*y.shape[:-1], self.heads, self.head_dim)
    return y if norm is None else norm(y).astype(self.dtype)

  def __call__(self, x: jax.Array, ctx: jax.Array | None = None):
    """``x [B, N, dim]`` image tokens, ``ctx [B, M, dim]`` text tokens (joint only). Returns ``out [B, N, dim]``
    (float32) and, for a joint attention, ``ctx_out [B, M, dim]`` (None when ``context_pre_only``)."""
    dt = self.dtype
    x = x.astype(dt)
    q = self._heads(self.to_q, self.norm_q, x)
    k = self._heads(self.to_k, self.norm_k, x)
    v = self._heads(self.to_v, None, x)
    n = x.shape[1]
    if self.joint:
      assert ctx is not None, "a joint attention needs the text tokens"
      ctx = ctx.astype(dt)
      ck = self._heads(self.add_k_proj, self.norm_added_k, ctx)
      cv = self._heads(self.add_v_proj, None, ctx)
      k = jnp.concatenate([k, ck], axis=1)
      v = jnp.concatenate([v, cv], axis=1)
      if not self.context_pre_only:  # the text queries only feed the (discarded) text output otherwise
        q = jnp.concatenate([q, self._heads(self.add_q_proj, self.norm_added_q, ctx)], axis=1)
    out = _sdpa(q, k, v, scale=1.0 / math.sqrt(self.head_dim), implementation=self.attention_impl)
    out = out.reshape(*out.shape[:2], self.heads * self.head_dim).astype(dt)
    img = self.to_out(out[:, :n]).astype(jnp.float32)
    if not self.joint:
      return img
    ctx_out = None if self.to_add_out is None else self.to_add_out(out[:, n:]).astype(jnp.float32)
    return img, ctx_out


CUDNN_SEQ_MULTIPLE = 64  # cuDNN's fused attention pads the token axes to this multiple (see _sdpa)


def _sdpa(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
          implementation: Literal["xla", "cudnn"] | None) -> jax.Array:
  """``jax.nn.dot_product_attention`` over ``q [B, T, H, hd]``, ``k, v [B, S, H, hd]`` without a mask.

  cuDNN's fused kernel refuses an odd T or S in training ("Unsupported sequence length": SD3's 4,096 image + 333
  text tokens = 4,429): for ``'cudnn'`` the token axes are zero-padded to a multiple of
  :data:`CUDNN_SEQ_MULTIPLE` and the real lengths passed as ``query_seq_lengths`` / ``key_value_seq_lengths``
  (cuDNN's padding mask: padded keys get no weight), and the padded query rows are dropped."""
  t, s = q.shape[1], k.shape[1]
  if implementation != "cudnn" or (t % CUDNN_SEQ_MULTIPLE == 0 and s % CUDNN_SEQ_MULTIPLE == 0):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, -n % CUDNN_SEQ_MULTIPLE), (0, 0), (0, 0)))  # noqa: E731
  b = q.shape[0]
  out = jax.nn.dot_product_attention(pad(q, t), pad(k, s), pad(v, s), scale=scale, implementation="cudnn",
                                     query_seq_lengths=jnp.full((b,), t, jnp.int32),
                                     key_value_seq_lengths=jnp.full((b,), s, jnp.int32))
  return out[:, :t]


class AdaNorm(nnx.Module):
  """The modulation of an adaLN layer: ``linear(silu(temb))`` split into ``chunks`` (float32)."""

  def __init__(self, dim: int, chunks: int, kw: dict):
    self.linear = _linear(dim, chunks * dim, ("embed", "mlp"), kw)
    self.chunks = chunks
    self.dtype = kw["dtype"]

  def __call__(self, temb: jax.Array) -> list[jax.Array]:
    mod = self.linear(jax.nn.silu(temb).astype(self.dtype)).astype(jnp.float32)
    return jnp.split(mod, self.chunks, axis=-1)


class JointBlock(nnx.Module):
  """diffusers' ``JointTransformerBlock`` (see the module doc). ``__call__((x, ctx), temb) -> (x, ctx)`` with
  ``x [B, N, dim]``, ``ctx [B, M, dim]`` float32 streams, ``temb [B, dim]``; a ``context_pre_only`` block returns
  ``ctx`` unchanged (diffusers returns None; the model drops it)."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, use_dual_attention: bool, context_pre_only: bool,
               qk_norm: str | None, kw: dict, attention_impl: str | None = None):
    self.use_dual_attention, self.context_pre_only = use_dual_attention, context_pre_only
    self.attn2: JointAttention | None
    self.ff_context: FeedForward | None
    self.norm1 = AdaNorm(dim, 9 if use_dual_attention else 6, kw)
    self.norm1_context = AdaNorm(dim, 2 if context_pre_only else 6, kw)
    self.attn = JointAttention(dim, heads, head_dim, joint=True, context_pre_only=context_pre_only,
                               qk_norm=qk_norm, kw=kw, attention_impl=attention_impl)
    self.attn2 = JointAttention(dim, heads, head_dim, joint=False, context_pre_only=False, qk_norm=qk_norm,
                                kw=kw, attention_impl=attention_impl) if use_dual_attention else None
    self.ff = FeedForward(dim, kw)
    self.ff_context = None if context_pre_only else FeedForward(dim, kw)

  def __call__(self, streams: tuple[jax.Array, jax.Array], temb: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, ctx = streams
    mods = self.norm1(temb)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    nx = _layer_norm(x)
    h = _modulate(nx, shift_msa, scale_msa)
    nctx = _layer_norm(ctx)
    if self.context_pre_only:
      c_scale, c_shift = self.norm1_context(temb)  # AdaLayerNormContinuous: scale first
      hctx = _modulate(nctx, c_shift, c_scale)
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
      hctx = _modulate(nctx, c_shift_msa, c_scale_msa)
    attn_out, ctx_attn_out = self.attn(h, hctx)
    x = x + gate_msa[:, None, :] * attn_out
    if self.attn2 is not None:  # use_dual_attention
      shift_msa2, scale_msa2, gate_msa2 = mods[6:]
      x = x + gate_msa2[:, None, :] * self.attn2(_modulate(nx, shift_msa2, scale_msa2))
    x = x + gate_mlp[:, None, :] * self.ff(_modulate(_layer_norm(x), shift_mlp, scale_mlp))
    if self.ff_context is not None:  # not context_pre_only
      ctx = ctx + c_gate_msa[:, None, :] * ctx_attn_out
      ctx = ctx + c_gate_mlp[:, None, :] * self.ff_context(_modulate(_layer_norm(ctx), c_shift_mlp, c_scale_mlp))
    return x, ctx


class StackedJointBlocks(JointBlock):
  """A run of ``length`` :class:`JointBlock` s of one structure as one module: every parameter with a leading
  ``[length]`` axis (logical name ``'layers'``); :meth:`scan` runs them with one ``jax.lax.scan``. ``len(stack)``
  is the length; ``stack[i]`` a detached copy of block ``i`` of the run (for inspection). LoRA: the projections
  inside are stacked sites (an adapter goes to every block of the run or to none)."""

  lora_layer_stack = True

  def __init__(self, length: int, first: int, dim: int, heads: int, head_dim: int, *, use_dual_attention: bool,
               qk_norm: str | None, kw: dict, attention_impl: str | None = None):
    args: dict[str, Any] = dict(use_dual_attention=use_dual_attention, context_pre_only=False, qk_norm=qk_norm,
                                kw=kw, attention_impl=attention_impl)
    super().__init__(dim, heads, head_dim, **args)
    stack_variables(self, [JointBlock(dim, heads, head_dim, **args) for _ in range(length - 1)])
    self.first = int(first)  # index of the run's first block in the model

  def __len__(self) -> int:
    return int(self.ff.fc1.kernel.shape[0])

  def __getitem__(self, i: int) -> JointBlock:
    return cast(JointBlock, unstacked_copy(self, i, len(self), JointBlock, "block"))

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def scan(self, streams: tuple[jax.Array, jax.Array], temb: jax.Array, *, remat: bool = False,
           policy: Callable | None = None) -> tuple[jax.Array, jax.Array]:
    """The run's blocks applied in order to ``(x, ctx)`` with one ``jax.lax.scan``; ``remat``: each block is
    ``jax.checkpoint``-ed with ``policy``. The LoRA dropout key (if any) is folded with the model-wide block
    index."""
    graphdef, state = nnx.split(self)

    def body(carry: tuple[jax.Array, jax.Array], xs):
      block_state, index = xs
      block = nnx.merge(graphdef, block_state)
      carry = (constrain_batch(carry[0]), constrain_batch(carry[1]))
      with lora_dropout_fold_in(index):
        carry = JointBlock.__call__(block, carry, temb)
      return carry, None

    if remat:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    indices = self.first + jnp.arange(len(self), dtype=jnp.int32)
    streams, _ = jax.lax.scan(body, (streams[0], streams[1]), (state, indices))
    return streams


def _block_call(block: JointBlock, x, ctx, temb):
  return block((x, ctx), temb)


class MMDiT(nnx.Module):
  """The SD3 / SD3.5 transformer (see the module doc). ``model(latents, timestep, encoder_hidden_states,
  pooled_projections)`` = diffusers' ``SD3Transformer2DModel(...).sample`` in NHWC.

  Args:
    config: an :class:`MMDiTConfig`.
    rngs: ``nnx.Rngs`` for a random initialisation (``params`` stream; no RNG state is kept).
  """

  def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, MMDiTConfig):
      raise ValueError(f"`config` must be an MMDiTConfig, got {type(config).__name__}.")
    self.config = config
    self.dtype = _DTYPES[config.dtype]
    param_dtype = _DTYPES[config.param_dtype]
    kw = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=_Keys(rngs))
    c = config
    d, p = c.inner_dim, c.patch_size
    # the parts that exist depend on the config (pos_embed_max_size, scan_layers)
    self.pos_table: PositionTable | None
    self.block_stacks: nnx.List | None
    self.last_block: JointBlock | None
    self.transformer_blocks: nnx.List | None
    with nnx.use_eager_sharding(False):  # logical names are metadata; builds without a mesh
      if c.pos_embed_max_size is not None:
        table = _pos_table_value(d, c.pos_embed_max_size, c.sample_size // p)
        self.pos_table = PositionTable(table, out_sharding=(None, "embed"))
      else:
        self.pos_table = None
      self.patch_proj = _linear(p * p * c.in_channels, d, (None, "embed"), kw)
      self.timestep_linear_1 = _linear(_TIME_CHANNELS, d, (None, "mlp"), kw)
      self.timestep_linear_2 = _linear(d, d, ("mlp", "embed"), kw)
      self.text_linear_1 = _linear(c.pooled_projection_dim, d, (None, "mlp"), kw)
      self.text_linear_2 = _linear(d, d, ("mlp", "embed"), kw)
      self.context_embedder = _linear(c.joint_attention_dim, d, (None, "embed"), kw)
      block_args: dict[str, Any] = dict(qk_norm=c.qk_norm, kw=kw, attention_impl=c.attention_impl)
      if c.scan_layers:
        self.block_stacks = nnx.List([
            StackedJointBlocks(length, start, d, c.num_attention_heads, c.attention_head_dim,
                               use_dual_attention=dual, **block_args) for start, length, dual in c.block_runs()])
        dual_last, _ = c.block_kinds()[-1]
        self.last_block = JointBlock(d, c.num_attention_heads, c.attention_head_dim, use_dual_attention=dual_last,
                                     context_pre_only=True, **block_args)
        self.transformer_blocks = None
      else:
        self.transformer_blocks = nnx.List([
            JointBlock(d, c.num_attention_heads, c.attention_head_dim, use_dual_attention=dual,
                       context_pre_only=pre_only, **block_args) for dual, pre_only in c.block_kinds()])
        self.block_stacks = self.last_block = None
      self.norm_out = AdaNorm(d, 2, kw)
      self.proj_out = _linear(d, p * p * c.channels_out, ("embed", None), kw)

  # -- pieces ------------------------------------------------------------------------------------------
  def position_embedding(self, gh: int, gw: int) -> jax.Array:
    """``[gh * gw, width]`` float32 position embedding of a ``gh x gw`` patch grid (center crop of the table)."""
    c = self.config
    if c.pos_embed_max_size is None:
      return jnp.asarray(sd3_pos_embed_table(c.inner_dim, gh, gw, c.sample_size // c.patch_size))
    m = c.pos_embed_max_size
    assert self.pos_table is not None  # built when pos_embed_max_size is set
    top, left = (m - gh) // 2, (m - gw) // 2
    table = self.pos_table[...].astype(jnp.float32).reshape(m, m, -1)
    return table[top:top + gh, left:left + gw].reshape(gh * gw, -1)

  def embed_conditioning(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
    """``temb [B, width]`` (float32) = timestep MLP(sincos_256(timestep)) + text MLP(pooled)."""
    dt = self.dtype
    feats = timestep_embedding(timestep.astype(jnp.float32), _TIME_CHANNELS)
    t = self.timestep_linear_2(jax.nn.silu(self.timestep_linear_1(feats.astype(dt))))
    s = self.text_linear_2(jax.nn.silu(self.text_linear_1(pooled.astype(dt))))
    return t.astype(jnp.float32) + s.astype(jnp.float32)

  def blocks(self) -> list[JointBlock]:
    """The ``num_layers`` blocks as :class:`JointBlock` s in order (detached copies for the stacked ones)."""
    if self.transformer_blocks is not None:
      return list(self.transformer_blocks)
    assert self.block_stacks is not None and self.last_block is not None  # scan_layers
    return [blk for stack in self.block_stacks for blk in stack] + [self.last_block]

  def _check(self, latents, timestep, states, pooled):
    c = self.config
    if latents.ndim != 4 or latents.shape[-1] != c.in_channels:
      raise ValueError(f"`latents` must be [B, H, W, {c.in_channels}] (NHWC), got shape {tuple(latents.shape)}.")
    b, h, w, _ = latents.shape
    if h % c.patch_size or w % c.patch_size:
      raise ValueError(f"latent H, W ({h}, {w}) must be divisible by patch_size={c.patch_size}.")
    m = c.pos_embed_max_size
    if m is not None and (h // c.patch_size > m or w // c.patch_size > m):
      raise ValueError(f"latent grid {h // c.patch_size} x {w // c.patch_size} (patches) exceeds "
                       f"pos_embed_max_size={m}.")
    timestep = jnp.asarray(timestep)
    if timestep.ndim == 0:
      timestep = jnp.broadcast_to(timestep, (b,))
    if timestep.shape != (b,):
      raise ValueError(f"`timestep` must have shape () or ({b},) (diffusers' 0..1000 scale), got "
                       f"{timestep.shape}.")
    if states.ndim != 3 or states.shape[0] != b or states.shape[-1] != c.joint_attention_dim:
      raise ValueError(f"`encoder_hidden_states` must be [{b}, L, {c.joint_attention_dim}], got shape "
                       f"{tuple(states.shape)}.")
    if pooled.shape != (b, c.pooled_projection_dim):
      raise ValueError(f"`pooled_projections` must be [{b}, {c.pooled_projection_dim}], got shape "
                       f"{tuple(pooled.shape)}.")
    return timestep

  # -- forward -----------------------------------------------------------------------------------------
  def __call__(self, latents: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array) -> jax.Array:
    """diffusers' ``.sample`` in NHWC.

    Args:
      latents: ``[B, H, W, in_channels]`` (NHWC; ``H, W`` divisible by ``patch_size``, may differ).
      timestep: ``[B]`` (or scalar) on diffusers' scale (``1000 * sigma``).
      encoder_hidden_states: ``[B, L, joint_attention_dim]`` text states.
      pooled_projections: ``[B, pooled_projection_dim]`` pooled text embeddings.
    Returns:
      ``[B, H, W, out_channels]`` float32 (the model output, e.g. the flow velocity ``noise - x0`` for SD3).
    """
    c = self.config
    latents = jnp.asarray(latents)
    encoder_hidden_states, pooled_projections = jnp.asarray(encoder_hidden_states), jnp.asarray(pooled_projections)
    timestep = self._check(latents, timestep, encoder_hidden_states, pooled_projections)
    b, h, w, _ = latents.shape
    p, dt = c.patch_size, self.dtype
    gh, gw = h // p, w // p
    x = self.patch_proj(_patchify(latents, p).astype(dt)).astype(jnp.float32)
    x = constrain_batch(x + self.position_embedding(gh, gw)[None])
    temb = self.embed_conditioning(timestep, pooled_projections)
    ctx = constrain_batch(self.context_embedder(encoder_hidden_states.astype(dt)).astype(jnp.float32))
    policy = getattr(jax.checkpoint_policies, c.remat_policy) if c.remat_policy else None
    call = nnx.remat(_block_call, policy=policy) if c.remat else _block_call
    if self.block_stacks is not None and self.last_block is not None:  # c.scan_layers
      for stack in self.block_stacks:
        x, ctx = stack.scan((x, ctx), temb, remat=c.remat, policy=policy)
      x, ctx = constrain_batch(x), constrain_batch(ctx)
      with lora_dropout_fold_in(c.num_layers - 1):
        x, _ = call(self.last_block, x, ctx, temb)
    else:
      for block in self.transformer_blocks or ():
        x, ctx = constrain_batch(x), constrain_batch(ctx)
        x, ctx = call(block, x, ctx, temb)
    scale, shift = self.norm_out(temb)
    x = _modulate(_layer_norm(x), shift, scale)
    out = self.proj_out(x.astype(dt)).astype(jnp.float32)
    return _unpatchify(out, p, gh, gw, c.channels_out)


def velocity_fn_from_state(graphdef: nnx.GraphDef, *state: nnx.State) -> Callable[..., jax.Array]:
  """A pure ``fn(latents, timestep, encoder_hidden_states, pooled_projections)`` of a split model (``state`` may
  be traced, e.g. the params of a jitted function; pass several states for ``nnx.split(model, f1, ...)``)."""
  model = nnx.merge(graphdef, *state)

  def fn(latents, timestep, encoder_hidden_states, pooled_projections):
    return model(latents, timestep, encoder_hidden_states, pooled_projections)

  return fn


# ------------------------------------------------------------------------------------------------------
# diffusers names
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Mapping:
  """One diffusers tensor: our variable path ``ours`` (+ ``layer`` index along a stacked leading axis), its
  diffusers ``name`` and ``shape``, and the layout conversions ``kind`` ('linear_w', 'same', 'conv', 'pos')."""

  ours: tuple
  name: str
  shape: tuple[int, ...]
  kind: str
  layer: int | None = None


def _to_ours(m: _Mapping, a: np.ndarray, config: MMDiTConfig) -> np.ndarray:
  if m.kind == "linear_w":  # torch [out, in] -> ours [in, out]
    return a.T
  if m.kind == "conv":  # [D, C, p, q] -> [(p, q, C), D]
    d = a.shape[0]
    return a.transpose(2, 3, 1, 0).reshape(-1, d)
  if m.kind == "pos":  # [1, M*M, D] -> [M*M, D]
    return a[0]
  return a


def _to_diffusers(m: _Mapping, a: np.ndarray, config: MMDiTConfig) -> np.ndarray:
  if m.kind == "linear_w":
    return a.T
  if m.kind == "conv":
    p, cin = config.patch_size, config.in_channels
    return a.reshape(p, p, cin, -1).transpose(3, 2, 0, 1)
  if m.kind == "pos":
    return a[None]
  return a


def _block_mappings(prefix: str, ours: tuple, config: MMDiTConfig, dual: bool, pre_only: bool,
                    layer: int | None) -> list[_Mapping]:
  d, hd = config.inner_dim, config.attention_head_dim
  out: list[_Mapping] = []

  def linear(our_path: tuple, name: str, n_in: int, n_out: int):
    out.append(_Mapping(ours + our_path + ("kernel",), f"{prefix}.{name}.weight", (n_out, n_in), "linear_w", layer))
    out.append(_Mapping(ours + our_path + ("bias",), f"{prefix}.{name}.bias", (n_out,), "same", layer))

  def norm(our_path: tuple, name: str):
    out.append(_Mapping(ours + our_path + ("weight",), f"{prefix}.{name}.weight", (hd,), "same", layer))

  linear(("norm1", "linear"), "norm1.linear", d, (9 if dual else 6) * d)
  linear(("norm1_context", "linear"), "norm1_context.linear", d, (2 if pre_only else 6) * d)
  for attn, joint in (("attn", True),) + ((("attn2", False),) if dual else ()):
    for proj in ("to_q", "to_k", "to_v"):
      linear((attn, proj), f"{attn}.{proj}", d, d)
    linear((attn, "to_out"), f"{attn}.to_out.0", d, d)
    if config.qk_norm is not None:
      norm((attn, "norm_q"), f"{attn}.norm_q")
      norm((attn, "norm_k"), f"{attn}.norm_k")
    if joint:
      for proj in ("add_q_proj", "add_k_proj", "add_v_proj"):
        linear((attn, proj), f"{attn}.{proj}", d, d)
      if not pre_only:
        linear((attn, "to_add_out"), f"{attn}.to_add_out", d, d)
      if config.qk_norm is not None:
        norm((attn, "norm_added_q"), f"{attn}.norm_added_q")
        norm((attn, "norm_added_k"), f"{attn}.norm_added_k")
  for ff in ("ff",) + (() if pre_only else ("ff_context",)):
    linear((ff, "fc1"), f"{ff}.net.0.proj", d, 4 * d)
    linear((ff, "fc2"), f"{ff}.net.2", 4 * d, d)
  return out


def param_mappings(config: MMDiTConfig) -> list[_Mapping]:
  """Every diffusers tensor of ``config``'s ``SD3Transformer2DModel`` with our path (in diffusers' order)."""
  c = config
  d, p = c.inner_dim, c.patch_size
  out: list[_Mapping] = []

  def linear(ours: str | tuple, name: str, n_in: int, n_out: int):
    ours = (ours,) if isinstance(ours, str) else tuple(ours)
    out.append(_Mapping(ours + ("kernel",), f"{name}.weight", (n_out, n_in), "linear_w"))
    out.append(_Mapping(ours + ("bias",), f"{name}.bias", (n_out,), "same"))

  if c.pos_embed_max_size is not None:
    out.append(_Mapping(("pos_table",), "pos_embed.pos_embed", (1, c.pos_embed_max_size ** 2, d), "pos"))
  out.append(_Mapping(("patch_proj", "kernel"), "pos_embed.proj.weight", (d, c.in_channels, p, p), "conv"))
  out.append(_Mapping(("patch_proj", "bias"), "pos_embed.proj.bias", (d,), "same"))
  linear("timestep_linear_1", "time_text_embed.timestep_embedder.linear_1", _TIME_CHANNELS, d)
  linear("timestep_linear_2", "time_text_embed.timestep_embedder.linear_2", d, d)
  linear("text_linear_1", "time_text_embed.text_embedder.linear_1", c.pooled_projection_dim, d)
  linear("text_linear_2", "time_text_embed.text_embedder.linear_2", d, d)
  linear("context_embedder", "context_embedder", c.joint_attention_dim, d)
  kinds = c.block_kinds()
  if c.scan_layers:
    for k, (start, length, dual) in enumerate(c.block_runs()):
      for j in range(length):
        out += _block_mappings(f"transformer_blocks.{start + j}", ("block_stacks", k), c, dual, False, j)
    out += _block_mappings(f"transformer_blocks.{c.num_layers - 1}", ("last_block",), c, kinds[-1][0], True, None)
  else:
    for i, (dual, pre_only) in enumerate(kinds):
      out += _block_mappings(f"transformer_blocks.{i}", ("transformer_blocks", i), c, dual, pre_only, None)
  linear(("norm_out", "linear"), "norm_out.linear", d, 2 * d)
  linear("proj_out", "proj_out", d, p * p * c.channels_out)
  return out


# ------------------------------------------------------------------------------------------------------
# load / save
# ------------------------------------------------------------------------------------------------------
class _Reader(CheckpointReader):
  """The tensors of a diffusers model directory, chosen as diffusers does: ``diffusion_pytorch_model.safetensors``
  if present, else its sharded index, else a single ``diffusion_pytorch_model*.safetensors`` (e.g. a variant).
  Reading (``names``, ``get``, ``dtype``, ``in``) is the LM checkpoint reader's; only the file choice differs."""

  def __init__(self, directory: Path):  # pylint: disable=super-init-not-called
    self.directory = Path(directory)
    self._files: dict[str, SafetensorsFile] = {}
    single, index = self.directory / WEIGHTS_NAME, self.directory / WEIGHTS_INDEX_NAME
    if single.exists():
      self.source = str(single)
      self._where = dict.fromkeys(self._file(WEIGHTS_NAME).names(), WEIGHTS_NAME)
    elif index.exists():
      self.source, self._where = str(index), read_weight_map(index)
    else:
      files = sorted(p.name for p in self.directory.glob("diffusion_pytorch_model*.safetensors"))
      if len(files) != 1:
        others = (sorted(p.name for p in self.directory.glob("*.safetensors"))
                  + sorted(p.name for p in self.directory.glob("*.bin")))
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX_NAME}) in {self.directory}; found {others}")
      self.source = str(self.directory / files[0])
      self._where = dict.fromkeys(self._file(files[0]).names(), files[0])


def read_config(path: str | os.PathLike, **overrides: Any) -> MMDiTConfig:
  """The :class:`MMDiTConfig` of a diffusers ``SD3Transformer2DModel`` directory (``overrides`` replace fields)."""
  cfg_path = Path(path) / CONFIG_NAME
  if not cfg_path.exists():
    raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(path)!r}: not a diffusers model directory")
  with open(cfg_path) as f:
    raw = json.load(f)
  cls = raw.get("_class_name")
  if cls is not None and cls != "SD3Transformer2DModel":
    raise ValueError(f"{cfg_path} describes a {cls!r}, not an SD3Transformer2DModel.")
  return MMDiTConfig.from_diffusers_config(raw, **overrides)


def _flat(state) -> dict[tuple, nnx.Variable]:
  return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def load_pretrained(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                    rules: Iterable[tuple[str, Any]] | None = None,
                    shardings: Callable[[tuple, tuple[int, ...]], jax.sharding.Sharding] | None = None,
                    **overrides: Any) -> MMDiT:
  """Loads a local diffusers ``SD3Transformer2DModel`` directory (SD3 / SD3.5) into an :class:`MMDiT`.

  Reads ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or the sharded
  ``diffusion_pytorch_model.safetensors.index.json`` + shards) with no torch: each tensor is read from a memory
  map, converted to our layout and placed straight into the abstract (``nnx.eval_shape``) model, so the weights
  never exist twice in host memory (a stacked parameter is assembled in one preallocated host array).

  Args:
    path: the directory (e.g. ``<sd3 snapshot>/transformer``).
    mesh: place every parameter sharded by its logical names (``adrpo_jax.train.sharding`` rules, or ``rules``);
      shardings: alternatively a function ``(logical_names, shape) -> Sharding``. Default: the default device.
    overrides: :class:`MMDiTConfig` fields, typically ``dtype``, ``param_dtype``, ``remat``, ``remat_policy``,
      ``scan_layers`` (the checkpoint is cast to ``param_dtype``).
  Raises:
    FileNotFoundError: no config.json / no weights file. ValueError: a bad config or override;
    ``CheckpointError`` (a ValueError) for a missing tensor or a wrong shape (names the tensor, file and shapes).
  """
  path = Path(path)
  config = read_config(path, **overrides)
  if mesh is not None and shardings is not None:
    raise ValueError("pass either mesh (with rules) or shardings, not both")
  if mesh is not None:
    from adrpo_jax.train.sharding import DEFAULT_LOGICAL_RULES, logical_to_partition_spec  # pylint: disable=import-outside-toplevel
    rule_list = tuple(rules) if rules is not None else DEFAULT_LOGICAL_RULES
    shardings = lambda names, shape: jax.sharding.NamedSharding(  # noqa: E731
        mesh, logical_to_partition_spec(names, shape, mesh, rule_list))
  reader = _Reader(path)
  abstract = nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat = _flat(abstract_state)
  groups: dict[tuple, list[_Mapping]] = {}
  for m in param_mappings(config):
    groups.setdefault(m.ours, []).append(m)
  if set(groups) != set(flat):  # internal consistency, not a user error
    raise AssertionError(f"mapping/model mismatch: {sorted(set(groups) ^ set(flat), key=str)[:6]}")
  used: set[str] = set()

  def read(m: _Mapping) -> np.ndarray:
    if m.name not in reader:
      raise CheckpointError(f"tensor {m.name!r} (for {'.'.join(map(str, m.ours))}) not found in {reader.source}")
    a = reader.get(m.name)
    if tuple(a.shape) != m.shape:
      raise CheckpointError(f"tensor {m.name!r} in {reader.source} has shape {tuple(a.shape)}, expected {m.shape} "
                            "for this config")
    used.add(m.name)
    return a

  def fill(m: _Mapping, out: np.ndarray) -> None:
    """``out[...]`` = tensor ``m`` in our layout and dtype; a torch Linear weight ``[out, in]`` is transposed in
    row blocks (cache-friendly: ~2x faster than one strided copy of a large memory-mapped matrix)."""
    a = read(m)
    if m.kind == "linear_w" and a.ndim == 2:
      for i in range(0, a.shape[0], _TRANSPOSE_BLOCK):
        out[:, i:i + _TRANSPOSE_BLOCK] = a[i:i + _TRANSPOSE_BLOCK].T
    else:
      out[...] = _to_ours(m, a, config)

  pure: dict[tuple, Any] = {}
  for ours, var in flat.items():
    shape, dtype = tuple(var.get_value().shape), np.dtype(var.get_value().dtype)
    group = groups[ours]
    if group[0].name == "pos_embed.pos_embed" and group[0].name not in reader:
      assert config.pos_embed_max_size is not None  # the model has a position table
      host = sd3_pos_embed_table(config.inner_dim, config.pos_embed_max_size, config.pos_embed_max_size,
                                 config.sample_size // config.patch_size).astype(dtype)
    elif group[0].layer is None and group[0].kind != "linear_w" and reader.dtype(group[0].name) == dtype:
      host = _to_ours(group[0], read(group[0]), config)  # a view of the memory map: no host copy at all
    else:  # one parameter (all layers of a stacked one) on the host at a time
      host = np.empty(shape, dtype)
      for m in group:
        fill(m, host if m.layer is None else host[m.layer])
    if tuple(host.shape) != shape:  # internal consistency
      raise AssertionError(f"{ours}: converted {host.shape} != model {shape}")
    if shardings is None:
      value = jax.device_put(np.ascontiguousarray(host))
    else:
      names = tuple(var.get_metadata().get("out_sharding") or (None,) * len(shape))

      def shard(idx: Any, host: np.ndarray = host, dtype: np.dtype = dtype) -> np.ndarray:
        return np.ascontiguousarray(host[idx], dtype=dtype)

      value = jax.make_array_from_callback(shape, shardings(names, shape), shard)
    pure[ours] = value
    del host
  for name in reader.names():
    if name not in used and name != "pos_embed.pos_embed":
      log.warning("unexpected tensor %r in %s was not loaded", name, reader.source)
  nested: dict = {}
  for ours, value in pure.items():
    node = nested
    for key in ours[:-1]:
      node = node.setdefault(key, {})
    node[ours[-1]] = value
  nnx.replace_by_pure_dict(abstract_state, nested)
  return nnx.merge(graphdef, abstract_state)


def save_pretrained(model: MMDiT, path: str | os.PathLike, *, max_shard_size: int | str = "10GB",
                    dtype: Any = None) -> Path:
  """Writes ``model`` as a diffusers ``SD3Transformer2DModel`` directory (``config.json`` +
  ``diffusion_pytorch_model.safetensors``, or shards + index above ``max_shard_size``) that
  ``SD3Transformer2DModel.from_pretrained`` loads. One tensor at a time is on the host; with several processes
  only process 0 writes (all take part in gathering sharded arrays).

  Args:
    model: an :class:`MMDiT` without unmerged LoRA adapters (save ``adrpo_jax.models.lora.merge_lora(model)``).
    max_shard_size: bytes (int) or '5GB' / '500MB' / '2GiB'.
    dtype: storage dtype (default: each parameter's dtype).
  """
  if not isinstance(model, MMDiT):
    raise ValueError(f"model must be an MMDiT, got {type(model).__name__}")
  adapted = [s.path for s in lora_sites(model) if s.adapted]
  if adapted:
    raise ValueError(f"model has unmerged LoRA adapters on {adapted[:6]}{' ...' if len(adapted) > 6 else ''}: "
                     "save merge_lora(model) instead (adrpo_jax.models.lora.merge_lora folds W + s A B)")
  path = Path(path)
  config = model.config
  flat = _flat(nnx.state(model))
  save_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
  entries = []
  for m in param_mappings(config):
    arr = flat[m.ours].get_value()
    dt = np.dtype(jnp.float32) if m.kind == "pos" else (save_dtype or np.dtype(arr.dtype))
    entries.append((m.name, m.shape, dt, m))
  by_name = {e[0]: e for e in entries}

  def fetch(name):
    _, _, dt, m = by_name[name]
    value = flat[m.ours].get_value()
    if m.layer is not None:
      value = value[m.layer]
    return _to_diffusers(m, _to_host(value), config).astype(dt)

  if not write_sharded_weights(path, [e[:3] for e in entries], fetch, max_shard_size=max_shard_size,
                               prefix="diffusion_pytorch_model", index_name=WEIGHTS_INDEX_NAME):
    return path
  with open(path / CONFIG_NAME, "w") as f:
    json.dump(config.to_diffusers_config(), f, indent=2, sort_keys=True)
  return path


# ------------------------------------------------------------------------------------------------------
# LoRA export (peft / diffusers format)
# ------------------------------------------------------------------------------------------------------
def diffusers_lora_state_dict(model: MMDiT, *, prefix: str = "transformer", dtype: Any = jnp.float32
                              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The adapters of a LoRA'd :class:`MMDiT` as diffusers / peft name them, with their ``LoraConfig``.

  Returns ``(tensors, config)``: ``tensors`` maps ``f"{prefix}.{module}.lora_A.weight"`` to ``A^T [r, in]``
  and ``...lora_B.weight`` to ``B^T [out, r]`` (torch ``nn.Linear`` layout) for every adapted module under its
  diffusers name (``attn.to_out`` -> ``attn.to_out.0``, ``ff.fc1`` -> ``ff.net.0.proj``, ``ff.fc2`` ->
  ``ff.net.2``; a stacked site gives one entry per block); ``config`` holds peft ``LoraConfig`` fields: ``r`` and
  ``lora_alpha`` such that ``lora_alpha / r`` is each adapter's scale (the most common ones; others in
  ``rank_pattern`` / ``alpha_pattern``), ``target_modules`` (the module names), ``use_rslora=False``.
  peft computes ``W x + (lora_alpha / r) * B (A x)``: exactly our ``W x + s (x A) B``.

  Raises ValueError when the model has no adapters, or an adapter on a projection that is not a diffusers
  ``nn.Linear`` (e.g. ``patch_proj``, a conv there).
  """
  if not isinstance(model, MMDiT):
    raise ValueError(f"model must be an MMDiT, got {type(model).__name__}")
  modules: dict[tuple[str, int | None], str] = {}
  for m in param_mappings(model.config):
    if m.kind == "linear_w" and m.ours[-1] == "kernel":
      modules[(".".join(map(str, m.ours[:-1])), m.layer)] = m.name[:-len(".weight")]
  dtype = np.dtype(jnp.dtype(dtype))
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  for site in lora_sites(model):
    adapter = site.adapter
    if adapter is None:
      continue
    a, b = _to_host(adapter.lora_a[...]), _to_host(adapter.lora_b[...])
    layers = [None] if site.layers is None else list(range(site.layers))
    for layer in layers:
      name = modules.get((site.path, layer)) if site.kernel_name == "kernel" else None
      if name is None:
        raise ValueError(f"the LoRA adapter on {site.path!r} has no diffusers nn.Linear counterpart: only "
                         "Linear projections can be exported (remove that target)")
      a_l, b_l = (a, b) if layer is None else (a[layer], b[layer])
      if a_l.ndim != 2 or b_l.ndim != 2:
        raise ValueError(f"the LoRA adapter on {site.path!r} is not a [in, r] x [r, out] pair: {a_l.shape}, "
                         f"{b_l.shape}")
      tensors[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(a_l.T.astype(dtype))
      tensors[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(b_l.T.astype(dtype))
      ranks[name] = int(adapter.rank)
      alphas[name] = float(adapter.scale) * int(adapter.rank)
  if not tensors:
    raise ValueError("the model has no LoRA adapters to export (apply_lora first)")

  def common(values: Any) -> Any:
    counts: dict[Any, int] = {}
    for v in values:
      counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], v))

  r, alpha = common(ranks.values()), common(alphas.values())
  config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
            "use_rslora": False, "init_lora_weights": True,
            "rank_pattern": {k: v for k, v in ranks.items() if v != r},
            "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha}}
  return tensors, config


def save_diffusers_lora(model: MMDiT, path: str | os.PathLike, *, dtype: Any = jnp.float32,
                        weight_name: str = LORA_WEIGHT_NAME) -> Path:
  """Writes the LoRA adapters of ``model`` as diffusers saves them (``StableDiffusion3Pipeline.save_lora_weights``):
  ``path/pytorch_lora_weights.safetensors`` with the keys of :func:`diffusers_lora_state_dict` (``transformer.``
  prefix) and the peft ``LoraConfig`` (alpha, ranks, target modules) in the safetensors metadata
  (``lora_adapter_metadata``, each field prefixed ``transformer.``), so that

      pipe.load_lora_weights(path)                                     # StableDiffusion3Pipeline
      SD3Transformer2DModel.from_pretrained(...).load_lora_adapter(path)  # the transformer alone (needs peft)

  give the model's forward pass (the base weights + ``s A B``); ``pipe.fuse_lora()`` folds it in. Adapters are
  written in ``dtype`` (float32 by default: they are small). Only process 0 writes. Returns ``path``.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  tensors, config = diffusers_lora_state_dict(model, dtype=dtype)
  path = Path(path)
  if jax.process_index() != 0:
    return path
  path.mkdir(parents=True, exist_ok=True)
  metadata = {"format": "pt",
              "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()}, indent=2,
                                                  sort_keys=True)}
  tmp = path / (weight_name + ".tmp")
  save_file(tensors, str(tmp), metadata=metadata)
  os.replace(tmp, path / weight_name)
  return path


export_lora_diffusers = save_diffusers_lora  # the name the SD3 recipe's export looks up
