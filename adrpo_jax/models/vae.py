"""The SD3 VAE (diffusers' ``AutoencoderKL``) in Flax NNX, NHWC, with diffusers checkpoint I/O.

Architecture (diffusers 0.42.1 ``autoencoder_kl.py`` / ``vae.py`` ``Encoder`` / ``Decoder``; numerically the same
as diffusers, tested to 1e-4 in float32):

* **encoder**: ``conv_in`` (3x3) -> one ``DownEncoderBlock2D`` per entry of ``block_out_channels``
  (``layers_per_block`` ``ResnetBlock2D`` + a stride-2 3x3 conv after zero padding right/bottom by 1, except the
  last block) -> mid block (resnet, single-head self-attention over all positions with GroupNorm and a residual,
  resnet; the attention only with ``mid_block_add_attention``) -> GroupNorm, SiLU, ``conv_out`` to
  ``2 * latent_channels`` (mean and log-variance) -> optional 1x1 ``quant_conv``;
* **decoder**: optional 1x1 ``post_quant_conv`` -> ``conv_in`` -> mid block -> one ``UpDecoderBlock2D`` per entry
  of the reversed ``block_out_channels`` (``layers_per_block + 1`` resnets + nearest x2 upsampling and a 3x3
  conv, except the last block) -> GroupNorm, SiLU, ``conv_out`` to ``out_channels``.

``ResnetBlock2D``: ``x + conv2(act(norm2(conv1(act(norm1(x))))))`` (a 1x1 ``conv_shortcut`` on ``x`` when the
channels change). Every GroupNorm is torch's (``norm_num_groups`` groups, eps 1e-6, biased variance, affine),
computed in float32.

SD3's VAE (``stabilityai/stable-diffusion-3-medium-diffusers/vae``): ``block_out_channels=(128, 256, 512, 512)``,
``layers_per_block=2``, ``latent_channels=16``, ``norm_num_groups=32``, ``use_quant_conv=False``,
``use_post_quant_conv=False``, ``scaling_factor=1.5305``, ``shift_factor=0.0609``: an image ``[B, 8h, 8w, 3]``
<-> latents ``[B, h, w, 16]``.

**Latent scaling (the diffusers pipeline convention).** :meth:`AutoencoderKL.decode` takes RAW latents (what the
encoder produces) and :meth:`AutoencoderKL.encode` returns raw latents. The diffusion model works on SCALED
latents: ``StableDiffusion3Pipeline`` encodes with ``(z - shift_factor) * scaling_factor`` and decodes with
``vae.decode(latents / scaling_factor + shift_factor)``. Here: ``scaled = vae.scale_latents(raw)`` and
``raw = vae.unscale_latents(scaled)``, so a sampler's output goes through
``vae.decode(vae.unscale_latents(latents))``.

Images are NHWC in ``[-1, 1]`` (diffusers' ``decode(...).sample`` transposed, not clipped); every method returns
float32. Parameters carry logical axis names (``'conv_in'``, ``'conv_out'``, ``'norm'``: replicated under
:data:`adrpo_jax.train.sharding.DEFAULT_LOGICAL_RULES`; the VAE is small, ~84M parameters for SD3).

Parameter paths mirror diffusers' names (``decoder.up_blocks.0.resnets.1.conv1.kernel`` <->
``decoder.up_blocks.0.resnets.1.conv1.weight``), so :func:`load_pretrained` / :func:`save_pretrained` only
transpose layouts (conv ``[O, I, kh, kw]`` <-> ``[kh, kw, I, O]``, linear ``[O, I]`` <-> ``[I, O]``).

Inside jit: ``graphdef, state = nnx.split(vae)`` then ``nnx.merge(graphdef, state).decode(z)`` in the traced
function (or :func:`make_decode_fn`), so the weights are an argument of the program, not constants.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> vae = AutoencoderKL(tiny_config(), rngs=nnx.Rngs(0))
  >>> jax.eval_shape(vae.decode, jnp.zeros((2, 4, 6, 4))).shape  # (eager / jitted calls return the same)
  (2, 8, 12, 3)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax.models.dit import host_initializer
from adrpo_jax.models.llm.checkpoint import CheckpointError, _to_host, write_sharded_weights
from adrpo_jax.models.mmdit import _Reader, config_from_diffusers

log = logging.getLogger(__name__)

__all__ = [
    "VAEConfig",
    "AutoencoderKL",
    "CheckpointError",
    "tiny_config",
    "sd3_config",
    "read_config",
    "load_pretrained",
    "save_pretrained",
    "make_decode_fn",
    "make_encode_fn",
    "param_names",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_EPS = 1e-6
_ACTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}
# diffusers' deprecated attention names (old checkpoints), read when the new ones are absent
_DEPRECATED_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _dtype_name(value: Any, field: str) -> str:
  try:
    name = jnp.dtype(value).name if not isinstance(value, str) else value
  except TypeError:
    name = None
  if name not in _DTYPES:
    raise ValueError(f"`{field}` must be one of {sorted(_DTYPES)} (or the matching dtype), got {value!r}.")
  return name


def _pos_int(value: Any, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"VAEConfig.{field} must be a positive int, got {value!r}.")
  return int(value)


# ------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Configuration of :class:`AutoencoderKL`: diffusers' ``AutoencoderKL`` config fields (same names, same
  defaults) plus how the model computes.

  Attributes (diffusers):
    in_channels / out_channels: image channels in / out (3).
    down_block_types / up_block_types: only ``"DownEncoderBlock2D"`` / ``"UpDecoderBlock2D"``, one per entry of
      ``block_out_channels``.
    block_out_channels: channels of each resolution level (SD3: ``(128, 256, 512, 512)``); the spatial factor
      is ``2 ** (len(block_out_channels) - 1)``.
    layers_per_block: resnets per encoder block (decoder blocks have one more).
    act_fn: ``"silu"`` (also ``"swish"``, ``"gelu"``, ``"relu"``, ``"mish"``).
    latent_channels: ``c`` of the latents (SD3: 16).
    norm_num_groups: groups of every GroupNorm (must divide every entry of ``block_out_channels``).
    sample_size: image side the model was trained at (unused by the forward pass; kept for diffusers).
    scaling_factor, shift_factor: the latent scaling (see the module doc; ``shift_factor`` None = 0).
    latents_mean, latents_std: kept for the config round trip (unused by SD3).
    force_upcast: kept for the config round trip.
    use_quant_conv, use_post_quant_conv: the 1x1 convs after the encoder / before the decoder (SD3: False).
    mid_block_add_attention: the mid blocks' self-attention.
  Attributes (ours):
    dtype: compute dtype of the convs and projections and of the activations between blocks; GroupNorm
      statistics, softmax and the returned images / latents are float32.
    param_dtype: storage dtype of the parameters.
    remat: rematerialise every resnet / attention block in the backward pass (``remat_policy``: a
      ``jax.checkpoint_policies`` name, None = save nothing).
    attention_query_chunk: the mid-block attention runs over query chunks of this many positions when the
      latent grid has more (same numbers; the float32 scores are ``[B, chunk, h * w]`` instead of
      ``[B, h * w, h * w]``: 4 GiB -> 1 GiB for 4 images at 1024 px); None = never chunk.
  """

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Any = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  remat_policy: str | None = None
  attention_query_chunk: int | None = 4096

  DIFFUSERS_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                      "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
                      "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
                      "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
      set_(name, _pos_int(getattr(self, name), name))
    boc = self.block_out_channels
    if isinstance(boc, (str, bytes)) or not isinstance(boc, Sequence) or not boc:
      raise ValueError(f"VAEConfig.block_out_channels must be a non-empty sequence of ints, got {boc!r}.")
    set_("block_out_channels", tuple(_pos_int(c, "block_out_channels") for c in boc))
    n = len(self.block_out_channels)
    for name, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      value = getattr(self, name)
      if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"VAEConfig.{name} must be a sequence of block type names, got {value!r}.")
      value = tuple(value)
      if len(value) != n or any(v != kind for v in value):
        raise ValueError(f"VAEConfig.{name}={value!r}: only {kind!r} blocks are supported, one per entry of "
                         f"block_out_channels ({n}).")
      set_(name, value)
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAEConfig.norm_num_groups={self.norm_num_groups} must divide every entry of "
                       f"block_out_channels={self.block_out_channels} (GroupNorm); {bad} are not divisible.")
    if self.act_fn not in _ACTS:
      raise ValueError(f"VAEConfig.act_fn must be one of {sorted(_ACTS)}, got {self.act_fn!r}.")
    for name in ("scaling_factor", "shift_factor"):
      value = getattr(self, name)
      if value is None and name == "shift_factor":
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
          or not np.isfinite(value):
        raise ValueError(f"VAEConfig.{name} must be a finite number, got {value!r}.")
      set_(name, float(value))
    if self.scaling_factor == 0.0:
      raise ValueError("VAEConfig.scaling_factor must be non-zero (latents are divided by it).")
    for name in ("latents_mean", "latents_std"):
      value = getattr(self, name)
      if value is not None:
        set_(name, tuple(float(v) for v in value))
    if isinstance(self.sample_size, list):
      set_("sample_size", tuple(self.sample_size))
    for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "remat"):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"VAEConfig.{name} must be a bool, got {value!r}.")
      set_(name, bool(value))
    if self.attention_query_chunk is not None:
      set_("attention_query_chunk", _pos_int(self.attention_query_chunk, "attention_query_chunk"))
    set_("dtype", _dtype_name(self.dtype, "VAEConfig.dtype"))
    set_("param_dtype", _dtype_name(self.param_dtype, "VAEConfig.param_dtype"))
    if self.remat_policy is not None:
      policy = getattr(jax.checkpoint_policies, str(self.remat_policy), None)
      if not isinstance(self.remat_policy, str) or self.remat_policy.startswith("_") or not callable(policy):
        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
        raise ValueError(f"VAEConfig.remat_policy={self.remat_policy!r} is not a jax.checkpoint_policies "
                         f"policy; choose one of {names} or None.")

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side: ``2 ** (len(block_out_channels) - 1)`` (8 for SD3)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def replace(self, **changes) -> "VAEConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_diffusers_config(cls, d: dict[str, Any], **overrides: Any) -> "VAEConfig":
    """From a diffusers ``config.json`` dict (``_``-keys skipped; unknown keys ignored with a warning) plus
    ``overrides`` (any field, e.g. ``dtype="bfloat16"``)."""
    return config_from_diffusers(cls, d, overrides, "an AutoencoderKL")

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers ``config.json`` dict (``_class_name`` = AutoencoderKL)."""
    out: dict[str, Any] = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1"}
    for k in self.DIFFUSERS_FIELDS:
      v = getattr(self, k)
      out[k] = list(v) if isinstance(v, tuple) else v
    return out

  def to_dict(self) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def tiny_config(**kw: Any) -> VAEConfig:
  """A tiny config (channels (8, 16), 2 groups, 4 latent channels, x2 spatial factor) for tests; ``kw`` replaces
  any field."""
  base: dict[str, Any]
  base = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
              sample_size=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
              use_post_quant_conv=False)
  base.update(kw)
  return VAEConfig(**base)


def sd3_config(**kw: Any) -> VAEConfig:
  """The config of SD3 / SD3.5's VAE (``<sd3 snapshot>/vae/config.json``); ``kw`` replaces any field."""
  base: dict[str, Any]
  base = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16,
              norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
              force_upcast=True, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
  base.update(kw)
  return VAEConfig(**base)


# ------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------
# host-side (NumPy) draws: eager random init on CPU would compile one XLA program per shape (see dit.py)
_lecun = host_initializer("lecun_normal")
_zeros_init = host_initializer("zeros")


def _conv(n_in: int, n_out: int, k: int, kw: dict, *, stride: int = 1, padding: Any = "SAME") -> nnx.Conv:
  """A conv ``k x k`` on NHWC (kernel ``[k, k, in, out]``); LeCun-normal init, zero bias (real use loads
  weights)."""
  return nnx.Conv(n_in, n_out, (k, k), strides=(stride, stride), padding=padding, dtype=kw["dtype"],
                  param_dtype=kw["param_dtype"],
                  kernel_init=nnx.with_partitioning(_lecun, (None, None, "conv_in", "conv_out")),
                  bias_init=nnx.with_partitioning(_zeros_init, ("conv_out",)), rngs=kw["rngs"])


def _linear(n: int, kw: dict) -> nnx.Linear:
  return nnx.Linear(n, n, dtype=kw["dtype"], param_dtype=kw["param_dtype"],
                    kernel_init=nnx.with_partitioning(_lecun, ("conv_in", "conv_out")),
                    bias_init=nnx.with_partitioning(_zeros_init, ("conv_out",)), rngs=kw["rngs"])


class GroupNorm(nnx.Module):
  """torch's ``nn.GroupNorm(groups, channels, eps, affine=True)`` on NHWC, in float32: per sample and group,
  ``(x - mean) / sqrt(var + eps)`` over ``(H, W, channels of the group)`` (biased variance), then
  ``* weight + bias``. Returns ``[B, H, W, C]`` in ``x``'s dtype (statistics and affine in float32)."""

  def __init__(self, channels: int, groups: int, *, param_dtype, eps: float = _EPS):
    if channels % groups:
      raise ValueError(f"GroupNorm: {groups} groups do not divide {channels} channels.")
    self.groups, self.eps = groups, eps
    self.weight = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    g = self.groups
    xg = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    y = y * self.weight.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
    return y.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else y


class ResnetBlock2D(nnx.Module):
  """diffusers' ``ResnetBlock2D`` without a time embedding (the VAE's): NHWC ``[B, H, W, in]`` ->
  ``[B, H, W, out]`` float32."""

  def __init__(self, n_in: int, n_out: int, config: VAEConfig, kw: dict):
    self.act = _ACTS[config.act_fn]
    self.dtype = kw["dtype"]
    groups = config.norm_num_groups
    self.norm1 = GroupNorm(n_in, groups, param_dtype=kw["param_dtype"])
    self.conv1 = _conv(n_in, n_out, 3, kw, padding=((1, 1), (1, 1)))
    self.norm2 = GroupNorm(n_out, groups, param_dtype=kw["param_dtype"])
    self.conv2 = _conv(n_out, n_out, 3, kw, padding=((1, 1), (1, 1)))
    self.conv_shortcut = _conv(n_in, n_out, 1, kw, padding="VALID") if n_in != n_out else None

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    h = self.conv1(self.act(self.norm1(x)).astype(dt))
    h = self.conv2(self.act(self.norm2(h)).astype(dt))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x.astype(dt))
    return x.astype(dt) + h.astype(dt)


class Downsample2D(nnx.Module):
  """diffusers' ``Downsample2D(use_conv=True, padding=0)``: zero-pad right / bottom by 1, 3x3 conv, stride 2
  (``H -> floor(H / 2)`` for even and odd ``H`` alike)."""

  def __init__(self, channels: int, kw: dict):
    self.dtype = kw["dtype"]
    self.conv = _conv(channels, channels, 3, kw, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x.astype(self.dtype))


class Upsample2D(nnx.Module):
  """diffusers' ``Upsample2D(use_conv=True)``: nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int, kw: dict):
    self.dtype = kw["dtype"]
    self.conv = _conv(channels, channels, 3, kw, padding=((1, 1), (1, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x.astype(self.dtype), 2, axis=1), 2, axis=2)
    return self.conv(x)


class Attention(nnx.Module):
  """The mid block's self-attention (diffusers' ``Attention(channels, heads=1, dim_head=channels,
  norm_num_groups, residual_connection=True, bias=True, upcast_softmax=True)``): GroupNorm, q / k / v over the
  ``H * W`` positions, softmax in float32 with scale ``channels ** -0.5``, ``to_out``, plus the input."""

  def __init__(self, channels: int, config: VAEConfig, kw: dict):
    self.dtype = kw["dtype"]
    self.chunk = config.attention_query_chunk
    self.group_norm = GroupNorm(channels, config.norm_num_groups, param_dtype=kw["param_dtype"])
    self.to_q = _linear(channels, kw)
    self.to_k = _linear(channels, kw)
    self.to_v = _linear(channels, kw)
    self.to_out = _linear(channels, kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    dt = self.dtype
    t = self.group_norm(x).reshape(b, h * w, c).astype(dt)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)

    def attend(q_chunk):  # [B, n, C] queries against all keys; softmax rows are independent -> exact chunking
      scores = jnp.einsum("bqc,bkc->bqk", q_chunk, k, preferred_element_type=jnp.float32) * (c ** -0.5)
      probs = jax.nn.softmax(scores, axis=-1)
      return jnp.einsum("bqk,bkc->bqc", probs.astype(dt), v, preferred_element_type=jnp.float32).astype(dt)

    n, chunk = h * w, self.chunk
    if chunk is None or n <= chunk:
      out = attend(q)
    else:  # lax.map over query chunks: scores [B, chunk, H*W] instead of [B, H*W, H*W]
      pad = -n % chunk
      qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0))).reshape(b, (n + pad) // chunk, chunk, c)
      out = jax.lax.map(attend, jnp.moveaxis(qc, 1, 0))
      out = jnp.moveaxis(out, 0, 1).reshape(b, n + pad, c)[:, :n]
    out = self.to_out(out)
    return out.reshape(b, h, w, c).astype(dt) + x.astype(dt)


def _apply(config: VAEConfig, block: nnx.Module, x: jax.Array) -> jax.Array:
  if config.remat:  # blocks hold only parameters (no mutable state): a pure function of their state
    policy = getattr(jax.checkpoint_policies, config.remat_policy) if config.remat_policy else None
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda s, y: nnx.merge(graphdef, s)(y), policy=policy, prevent_cse=False)(state, x)
  return block(x)


class MidBlock2D(nnx.Module):
  """diffusers' ``UNetMidBlock2D`` of the VAE: resnet, (attention), resnet."""

  def __init__(self, channels: int, config: VAEConfig, kw: dict):
    self.config = config
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, config, kw) for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, config, kw)] if config.mid_block_add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _apply(self.config, self.resnets[0], x)
    for attn in self.attentions:
      x = _apply(self.config, attn, x)
    return _apply(self.config, self.resnets[1], x)


class DownEncoderBlock2D(nnx.Module):
  def __init__(self, n_in: int, n_out: int, num_layers: int, add_downsample: bool, config: VAEConfig, kw: dict):
    self.config = config
    self.resnets = nnx.List([ResnetBlock2D(n_in if i == 0 else n_out, n_out, config, kw) for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample2D(n_out, kw)] if add_downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = _apply(self.config, r, x)
    for d in self.downsamplers:
      x = d(x)
    return x


class UpDecoderBlock2D(nnx.Module):
  def __init__(self, n_in: int, n_out: int, num_layers: int, add_upsample: bool, config: VAEConfig, kw: dict):
    self.config = config
    self.resnets = nnx.List([ResnetBlock2D(n_in if i == 0 else n_out, n_out, config, kw) for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(n_out, kw)] if add_upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = _apply(self.config, r, x)
    for u in self.upsamplers:
      x = _apply(self.config, u, x)
    return x


class Encoder(nnx.Module):
  """diffusers' ``Encoder(double_z=True)``: images ``[B, H, W, in_channels]`` -> moments
  ``[B, H/f, W/f, 2 * latent_channels]`` float32 (before ``quant_conv``)."""

  def __init__(self, config: VAEConfig, kw: dict):
    c, boc = config, config.block_out_channels
    self.act = _ACTS[c.act_fn]
    self.dtype = kw["dtype"]
    self.conv_in = _conv(c.in_channels, boc[0], 3, kw, padding=((1, 1), (1, 1)))
    blocks, prev = [], boc[0]
    for i, ch in enumerate(boc):
      blocks.append(DownEncoderBlock2D(prev, ch, c.layers_per_block, i < len(boc) - 1, c, kw))
      prev = ch
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock2D(boc[-1], c, kw)
    self.conv_norm_out = GroupNorm(boc[-1], c.norm_num_groups, param_dtype=kw["param_dtype"])
    self.conv_out = _conv(boc[-1], 2 * c.latent_channels, 3, kw, padding=((1, 1), (1, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x.astype(self.dtype))
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(self.act(self.conv_norm_out(x)).astype(self.dtype)).astype(jnp.float32)


class Decoder(nnx.Module):
  """diffusers' ``Decoder`` (group norm): latents ``[B, h, w, latent_channels]`` -> images
  ``[B, f h, f w, out_channels]`` float32 (after ``post_quant_conv``)."""

  def __init__(self, config: VAEConfig, kw: dict):
    c = config
    rev = tuple(reversed(c.block_out_channels))
    self.act = _ACTS[c.act_fn]
    self.dtype = kw["dtype"]
    self.conv_in = _conv(c.latent_channels, rev[0], 3, kw, padding=((1, 1), (1, 1)))
    self.mid_block = MidBlock2D(rev[0], c, kw)
    blocks, prev = [], rev[0]
    for i, ch in enumerate(rev):
      blocks.append(UpDecoderBlock2D(prev, ch, c.layers_per_block + 1, i < len(rev) - 1, c, kw))
      prev = ch
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = GroupNorm(rev[-1], c.norm_num_groups, param_dtype=kw["param_dtype"])
    self.conv_out = _conv(rev[-1], c.out_channels, 3, kw, padding=((1, 1), (1, 1)))

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.conv_in(z.astype(self.dtype))
    x = self.mid_block(x)
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(self.act(self.conv_norm_out(x)).astype(self.dtype)).astype(jnp.float32)


class AutoencoderKL(nnx.Module):
  """diffusers' ``AutoencoderKL`` in NHWC (see the module doc): :meth:`decode`, :meth:`encode`,
  :meth:`encode_moments`, :meth:`scale_latents` / :meth:`unscale_latents`.

  Args:
    config: a :class:`VAEConfig`.
    rngs: initialisation keys (LeCun-normal kernels drawn on the host, zero biases; real use loads weights).
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, VAEConfig):
      raise ValueError(f"config must be a VAEConfig, got {type(config).__name__}")
    self.config = config
    kw = dict(dtype=_DTYPES[config.dtype], param_dtype=_DTYPES[config.param_dtype], rngs=rngs)
    self.dtype = kw["dtype"]
    lc = config.latent_channels
    with nnx.use_eager_sharding(False):  # logical names are metadata; builds without a mesh
      self.encoder = Encoder(config, kw)
      self.decoder = Decoder(config, kw)
      self.quant_conv = _conv(2 * lc, 2 * lc, 1, kw, padding="VALID") if config.use_quant_conv else None
      self.post_quant_conv = _conv(lc, lc, 1, kw, padding="VALID") if config.use_post_quant_conv else None

  # -- latent scaling ---------------------------------------------------------------------------------
  @property
  def scaling_factor(self) -> float:
    return self.config.scaling_factor

  @property
  def shift_factor(self) -> float:
    """``config.shift_factor`` (None -> 0.0)."""
    return self.config.shift_factor or 0.0

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """Raw VAE latents -> the diffusion model's latents: ``(z - shift_factor) * scaling_factor``."""
    return (jnp.asarray(z, jnp.float32) - self.shift_factor) * self.scaling_factor

  def unscale_latents(self, z: jax.Array) -> jax.Array:
    """The diffusion model's latents -> raw VAE latents: ``z / scaling_factor + shift_factor`` (what the SD3
    pipeline does before ``vae.decode``)."""
    return jnp.asarray(z, jnp.float32) / self.scaling_factor + self.shift_factor

  # -- encode / decode --------------------------------------------------------------------------------
  def _check(self, x: jax.Array, channels: int, what: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f"{what} must be NHWC [B, H, W, {channels}], got shape {tuple(x.shape)}.")
    return x

  def decode(self, latents: jax.Array) -> jax.Array:
    """RAW latents ``[B, h, w, latent_channels]`` -> images ``[B, f h, f w, out_channels]`` float32 (about
    ``[-1, 1]``, not clipped; ``f = config.downsample_factor``) = diffusers' ``vae.decode(z).sample`` in NHWC.
    Scaled latents (a sampler's output) go through :meth:`unscale_latents` first."""
    z = self._check(latents, self.config.latent_channels, "latents")
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z)

  def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images ``[B, H, W, in_channels]`` in ``[-1, 1]`` -> the latent distribution's ``(mean, logvar)``, each
    ``[B, ~H/f, ~W/f, latent_channels]`` float32 (logvar clamped to [-30, 20] as in diffusers'
    ``DiagonalGaussianDistribution``); raw latents."""
    x = self._check(images, self.config.in_channels, "images")
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments.astype(self.dtype)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Images ``[B, H, W, in_channels]`` -> RAW latents ``[B, h, w, latent_channels]``: the distribution's mean
    (diffusers' ``latent_dist.mode()``), or with ``key`` a sample ``mean + exp(logvar / 2) * N(0, 1)``.
    Apply :meth:`scale_latents` for the diffusion model's latents."""
    mean, logvar = self.encode_moments(images)
    if key is None:
      return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)

  def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Reconstruction ``decode(encode(images, key))`` ``[B, H', W', out_channels]``."""
    return self.decode(self.encode(images, key))


def make_decode_fn(graphdef: nnx.GraphDef, *, scaled: bool = False,
                   batch_chunk: int | None = None) -> Callable[[nnx.State, jax.Array], jax.Array]:
  """``fn(state, latents [B, h, w, c]) -> images [B, H, W, 3]`` for ``graphdef, state = nnx.split(vae)``: a pure
  function to call inside a jitted program (the VAE's arrays are an argument, not constants) or to ``jax.jit``
  directly. ``scaled``: the latents are the diffusion model's (scaled) ones and are unscaled first.
  ``batch_chunk``: decode ``batch_chunk`` images at a time (``jax.lax.map``; the activation memory scales with
  the chunk, not ``B``). When it divides ``B`` the chunks take strided rows ``i, i + B / chunk, ...``, so a batch
  sharded on its leading axis keeps every chunk spread over all devices; otherwise contiguous chunks (a remainder
  runs as a smaller chunk)."""
  if batch_chunk is not None and (isinstance(batch_chunk, bool) or not isinstance(batch_chunk, int)
                                  or batch_chunk < 1):
    raise ValueError(f"batch_chunk must be None or a positive int, got {batch_chunk!r}.")

  def fn(state: nnx.State, latents: jax.Array) -> jax.Array:
    vae = nnx.merge(graphdef, state)
    z = vae.unscale_latents(latents) if scaled else jnp.asarray(latents)
    b = z.shape[0]
    if batch_chunk is None or b <= batch_chunk:
      return vae.decode(z)
    if b % batch_chunk == 0:  # [chunk, n] -> [n, chunk]: chunk j = rows j, j + n, ... (strided)
      n = b // batch_chunk
      chunks = jnp.swapaxes(z.reshape((batch_chunk, n) + z.shape[1:]), 0, 1)
      out = jax.lax.map(vae.decode, chunks)
      return jnp.swapaxes(out, 0, 1).reshape((b,) + out.shape[2:])
    return jax.lax.map(lambda one: vae.decode(one[None])[0], z, batch_size=batch_chunk)

  return fn


def make_encode_fn(graphdef: nnx.GraphDef, *, scaled: bool = False) -> Callable[..., jax.Array]:
  """``fn(state, images, key=None) -> latents`` (the mean, or a sample with ``key``); ``scaled``: returns the
  diffusion model's (scaled) latents."""

  def fn(state: nnx.State, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    vae = nnx.merge(graphdef, state)
    z = vae.encode(images, key)
    return vae.scale_latents(z) if scaled else z

  return fn


# ------------------------------------------------------------------------------------------------------
# diffusers names
# ------------------------------------------------------------------------------------------------------
def _flat(state) -> dict[tuple, nnx.Variable]:
  return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def _diffusers_name(path: tuple) -> str:
  """Our variable path -> diffusers' tensor name (``kernel`` -> ``weight``, ``to_out`` -> ``to_out.0``)."""
  parts = [str(p) for p in path]
  if parts[-1] == "kernel":
    parts[-1] = "weight"
  parts = [("to_out.0" if p == "to_out" else p) for p in parts]
  return ".".join(parts)


def param_names(model_or_config: AutoencoderKL | VAEConfig) -> dict[tuple, str]:
  """Every parameter path of the model -> its diffusers tensor name."""
  if isinstance(model_or_config, VAEConfig):
    model = nnx.eval_shape(lambda: AutoencoderKL(model_or_config, rngs=nnx.Rngs(0)))
  else:
    model = model_or_config
  return {p: _diffusers_name(p) for p in _flat(nnx.state(model, nnx.Param))}


def _to_ours(a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:  # torch conv [O, I, kh, kw] -> [kh, kw, I, O]
    return a.transpose(2, 3, 1, 0)
  if a.ndim == 2:  # linear [O, I] -> [I, O]
    return a.T
  return a


def _to_diffusers(a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:
    return a.transpose(3, 2, 0, 1)
  if a.ndim == 2:
    return a.T
  return a


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


# ------------------------------------------------------------------------------------------------------
# load / save
# ------------------------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike, **overrides: Any) -> VAEConfig:
  """The :class:`VAEConfig` of a diffusers ``AutoencoderKL`` directory (``overrides`` replace fields)."""
  cfg_path = Path(path) / CONFIG_NAME
  if not cfg_path.exists():
    raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(path)!r}: not a diffusers model directory")
  with open(cfg_path) as f:
    raw = json.load(f)
  cls = raw.get("_class_name") if isinstance(raw, dict) else None
  if cls is not None and cls != "AutoencoderKL":
    raise ValueError(f"{cfg_path} describes a {cls!r}, not an AutoencoderKL.")
  return VAEConfig.from_diffusers_config(raw, **overrides)


def load_pretrained(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                    **overrides: Any) -> AutoencoderKL:
  """Loads a local diffusers ``AutoencoderKL`` directory (e.g. ``<sd3 snapshot>/vae``) into an
  :class:`AutoencoderKL`.

  Reads ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or the sharded index + shards) without
  torch, tensor by tensor from memory maps into an abstract model (the weights never exist twice in host
  memory). Old checkpoints' attention names (``query`` / ``key`` / ``value`` / ``proj_attn``) are accepted.

  Args:
    path: the directory.
    mesh: place every parameter replicated on ``mesh`` (default: the default device, uncommitted).
    overrides: :class:`VAEConfig` fields, typically ``dtype``, ``param_dtype`` (the checkpoint is cast to it),
      ``remat``.
  Raises:
    FileNotFoundError: no config.json / no weights file. ValueError: a bad config or override;
    ``CheckpointError`` (a ValueError): a missing tensor or a wrong shape (names the tensor and shapes).
  """
  path = Path(path)
  config = read_config(path, **overrides)
  reader = _Reader(path)
  abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat = _flat(abstract_state)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
  used: set[str] = set()
  nested: dict = {}
  for ours, var in flat.items():
    shape, dtype = tuple(var.get_value().shape), np.dtype(var.get_value().dtype)
    name = _diffusers_name(ours)
    src = name
    if src not in reader:
      for new, old in _DEPRECATED_ATTN.items():
        if f".{new}." in src and src.replace(f".{new}.", f".{old}.") in reader:
          src = src.replace(f".{new}.", f".{old}.")
          break
    if src not in reader:
      raise CheckpointError(f"tensor {name!r} (for {'.'.join(map(str, ours))}) not found in {reader.source}")
    a = reader.get(src)
    expected = _torch_shape(shape)
    if tuple(a.shape) != expected:
      # old checkpoints store the attention projections as 1x1 convs [O, I, 1, 1]
      if a.ndim == 4 and len(shape) == 2 and tuple(a.shape) == expected + (1, 1):
        a = a[:, :, 0, 0]
      else:
        raise CheckpointError(f"tensor {src!r} in {reader.source} has shape {tuple(a.shape)}, expected {expected} "
                              "for this config")
    used.add(src)
    host = np.ascontiguousarray(_to_ours(a), dtype=dtype)
    value = jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)
    del host, a
    node = nested
    for key in ours[:-1]:
      node = node.setdefault(key, {})
    node[ours[-1]] = value
  for name in reader.names():
    if name not in used:
      log.warning("unexpected tensor %r in %s was not loaded", name, reader.source)
  nnx.replace_by_pure_dict(abstract_state, nested)
  return nnx.merge(graphdef, abstract_state)


def save_pretrained(model: AutoencoderKL, path: str | os.PathLike, *, max_shard_size: int | str = "10GB",
                    dtype: Any = None) -> Path:
  """Writes ``model`` as a diffusers ``AutoencoderKL`` directory (``config.json`` +
  ``diffusion_pytorch_model.safetensors``, or shards + index above ``max_shard_size``) that
  ``diffusers.AutoencoderKL.from_pretrained`` loads; one tensor at a time on the host; only process 0 writes.

  Args:
    model: an :class:`AutoencoderKL`.
    max_shard_size: bytes (int) or '5GB' / '500MB' / '2GiB'.
    dtype: storage dtype (default: each parameter's dtype).
  """
  if not isinstance(model, AutoencoderKL):
    raise ValueError(f"model must be an AutoencoderKL, got {type(model).__name__}")
  path = Path(path)
  flat = _flat(nnx.state(model, nnx.Param))
  save_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
  entries = []
  for ours, var in flat.items():
    arr = var.get_value()
    entries.append((_diffusers_name(ours), _torch_shape(tuple(arr.shape)), save_dtype or np.dtype(arr.dtype), ours))
  by_name = {e[0]: e for e in entries}

  def fetch(name):
    _, _, dt, ours = by_name[name]
    return _to_diffusers(_to_host(flat[ours].get_value())).astype(dt)

  if not write_sharded_weights(path, [e[:3] for e in entries], fetch, max_shard_size=max_shard_size,
                               prefix="diffusion_pytorch_model", index_name=WEIGHTS_INDEX_NAME):
    return path
  with open(path / CONFIG_NAME, "w") as f:
    json.dump(model.config.to_diffusers_config(), f, indent=2, sort_keys=True)
  return path
