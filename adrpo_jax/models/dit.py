"""A small conditional DiT velocity network (Flax NNX) for flow matching.

The architecture follows DiT (Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers"): the image
``[B, H, W, C]`` is cut into ``patch_size x patch_size`` patches, linearly embedded, given a fixed 2-D sin-cos
(or learned) position embedding and passed through ``depth`` transformer blocks whose LayerNorms are
modulated by the conditioning vector ``c = time_embedding(t) + condition_embedding(cond)`` ("adaLN-Zero":
shift, scale and a residual gate per block, all initialised to zero so every block starts as the identity and
the network's initial output is 0). A final adaLN-modulated linear layer maps tokens back to patches.

It predicts the velocity ``v_theta(x_t, t, c)`` of the rectified-flow path of docs/math.md ("Flow matching"):
``x_t = (1 - t) x0 + t x1``, ``t = 0`` noise, ``t = 1`` data, target ``u_t = x1 - x0``.

Conditioning:

* class ids (default): ``cond [B] int32`` in ``[0, num_classes]``; the extra id ``num_classes`` is the null
  (unconditional) class used by classifier-free guidance (CFG).
* float embeddings (``cond_dim`` set, e.g. a text encoder's pooled output): ``cond [B, cond_dim]`` float,
  projected by a 2-layer MLP; the null condition is a learned vector ``null_cond [cond_dim]``
  (:meth:`DiT.null_condition`).

CFG dropout is a pure function of an explicit key (:func:`cfg_drop_mask`, :func:`cond_dropout`) passed in as
``drop_mask``: the module holds no RNG state, so a train step over ``nnx.split`` state stays functional.

LoRA (:mod:`adrpo_jax.models.lora`): the ``nnx.Linear`` layers (``blocks.{i}.fc1`` / ``fc2`` / ``modulation``,
``patch_embed``, ...) and the attention kernels (``blocks.{i}.attn.wq`` / ``wk`` / ``wv`` / ``wo``) are LoRA sites.

Parameters carry the logical axis names of the project ('embed', 'mlp', 'heads', 'head_dim'; None =
replicated) and the module is built with eager sharding off, so it builds without a mesh.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> cfg = DiTConfig(image_size=8, patch_size=2, hidden=32, depth=1, heads=2, num_classes=10)
  >>> model = DiT(cfg, rngs=nnx.Rngs(0))
  >>> apply = jax.jit(lambda m, x, t, c: m(x, t, c))  # eager calls work too, but compile op by op
  >>> v = apply(model, jnp.zeros((3, 8, 8, 1)), jnp.array([0.0, 0.5, 1.0]), jnp.array([0, 1, 10]))
  >>> v.shape, v.dtype
  ((3, 8, 8, 1), dtype('float32'))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax.models.lora import add_lora, lora_dropout_fold_in
from adrpo_jax.models.stacking import stack_variables, unstacked_copy

__all__ = [
    "DiTConfig",
    "DiT",
    "cfg_drop_mask",
    "cond_dropout",
    "timestep_embedding",
    "sincos_pos_embed_2d",
    "patchify",
    "unpatchify",
    "count_params",
    "save_dit",
    "load_dit",
    "save_nnx_params",
    "restore_nnx_params",
    "host_initializer",
    "concrete_value",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str, field: str):
    if name not in _DTYPES:
        raise ValueError(f"`{field}` must be one of {sorted(_DTYPES)}, got {name!r}.")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Configuration of :class:`DiT` (JSON-serialisable: dtypes are strings).

    Attributes:
      image_size: side ``H = W`` of the (square) images.
      channels: image channels ``C`` (1 for digits).
      patch_size: patch side; must divide ``image_size``. Tokens: ``(image_size / patch_size)^2``.
      hidden: transformer width.
      depth: number of DiT blocks.
      heads: attention heads; must divide ``hidden``.
      mlp_ratio: MLP width / ``hidden``.
      num_classes: number of condition classes (class-id conditioning); id ``num_classes`` is the null class.
      class_dropout_prob: CFG dropout probability used by the pre-training step (the model itself only reads
        ``drop_mask``; kept here so a checkpoint records how it was trained).
      cond_dim: if set, condition on float embeddings ``[B, cond_dim]`` instead of class ids.
      frequency_dim: size of the sinusoidal time features fed to the time MLP.
      time_scale: ``t in [0, 1]`` is multiplied by this before the sinusoidal features (DiT's 1000 steps).
      pos_embed: ``"sincos"`` (fixed 2-D sin-cos) or ``"learned"``.
      dtype: compute dtype of matmuls (``"float32"``, ``"bfloat16"``, ``"float16"``); norms, softmax and the
        output are float32.
      param_dtype: storage dtype of the parameters.
      remat: rematerialise each block in the backward pass (saves activation memory).
      scan_layers: stack the blocks' parameters along a leading ``'layers'`` axis (:class:`StackedDiTBlocks`,
        ``model.blocks``) and run them with one ``jax.lax.scan`` (compile time independent of ``depth``; with
        ``remat`` each block is rematerialised inside the scan). Same numbers as the list layout (``False``):
        the same random draws build the same weights, and :func:`save_dit` / :func:`load_dit` read and write
        the per-block list layout (``blocks/<i>/...``) either way.
    """

    image_size: int = 8
    channels: int = 1
    patch_size: int = 2
    hidden: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    cond_dim: int | None = None
    frequency_dim: int = 256
    time_scale: float = 1000.0
    pos_embed: Literal["sincos", "learned"] = "sincos"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("image_size", "channels", "patch_size", "hidden", "depth", "heads", "num_classes",
                     "frequency_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"`patch_size` ({self.patch_size}) must divide `image_size` ({self.image_size}).")
        if self.hidden % self.heads:
            raise ValueError(f"`heads` ({self.heads}) must divide `hidden` ({self.hidden}).")
        if self.frequency_dim % 2:
            raise ValueError(f"`frequency_dim` must be even, got {self.frequency_dim}.")
        if not self.mlp_ratio > 0:
            raise ValueError(f"`mlp_ratio` must be > 0, got {self.mlp_ratio}.")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"`class_dropout_prob` must be in [0, 1), got {self.class_dropout_prob}.")
        if self.cond_dim is not None and (not isinstance(self.cond_dim, int) or self.cond_dim < 1):
            raise ValueError(f"`cond_dim` must be None or a positive int, got {self.cond_dim!r}.")
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"`pos_embed` must be 'sincos' or 'learned', got {self.pos_embed!r}.")
        _dtype(self.dtype, "dtype")
        _dtype(self.param_dtype, "param_dtype")
        for name in ("remat", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def null_class(self) -> int:
        """The class id of the unconditional (null) condition (class-id conditioning)."""
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        """Build from a dict (e.g. ``config.json`` or an ``ml_collections.ConfigDict.to_dict()``).

        Unknown keys raise ``ValueError``.
        """
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown DiTConfig keys {unknown}; valid keys are {sorted(names)}.")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------

def cfg_drop_mask(key: jax.Array, batch_size: int, prob: float) -> jax.Array:
    """``[batch_size]`` bool mask, True = drop the condition (use the null condition), i.i.d. ``Bernoulli(prob)``.

    >>> cfg_drop_mask(jax.random.key(0), 4, 0.0)
    Array([False, False, False, False], dtype=bool)
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"`prob` must be in [0, 1], got {prob}.")
    return jax.random.bernoulli(key, prob, (batch_size,))


def cond_dropout(cond: jax.Array, key: jax.Array, prob: float, num_classes: int) -> jax.Array:
    """Class ids ``[B]`` with each entry replaced by the null class ``num_classes`` with probability ``prob``.

    The functional CFG dropout of class-id conditioning (the same as passing
    ``drop_mask=cfg_drop_mask(key, B, prob)`` to :class:`DiT`).

    >>> cond_dropout(jnp.array([1, 2, 3]), jax.random.key(0), 1.0, 10)
    Array([10, 10, 10], dtype=int32)
    """
    cond = jnp.asarray(cond)
    if cond.ndim != 1 or not jnp.issubdtype(cond.dtype, jnp.integer):
        raise ValueError(f"`cond` must be [B] integer class ids, got shape {cond.shape} dtype {cond.dtype}.")
    drop = cfg_drop_mask(key, cond.shape[0], prob)
    return jnp.where(drop, jnp.asarray(num_classes, cond.dtype), cond)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features ``[B, dim]`` = ``[cos(t f_k), sin(t f_k)]``, ``f_k = max_period^(-k / (dim/2))``.

    >>> timestep_embedding(jnp.zeros((2,)), 4)
    Array([[1., 1., 0., 0.],
           [1., 1., 0., 0.]], dtype=float32)
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding ``[grid_size**2, dim]`` (row-major tokens), as in MAE / DiT.

    Half of the channels encode the row, half the column. ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs `dim` divisible by 4, got {dim}.")
    gh, gw = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                         indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, gh), _sincos_1d(dim // 2, gw)], axis=1)
    return emb.astype(np.float32)


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """``[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]`` (row-major patches, each flattened (p, p, C))."""
    b, h, w, c = x.shape
    p = patch_size
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, patch_size: int, image_size: int, channels: int) -> jax.Array:
    """Inverse of :func:`patchify`: ``[B, L, p*p*C] -> [B, H, W, C]``."""
    b = tokens.shape[0]
    p, g = patch_size, image_size // patch_size
    x = tokens.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, image_size, image_size, channels)


def _mean_last(x: jax.Array) -> jax.Array:
    """Mean over the last axis (keepdims) as a matmul with a constant vector: XLA:CPU runs this several times
    faster than a reduction, for the same result (up to float32 rounding)."""
    return x @ jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)


def _layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters (adaLN supplies shift/scale), computed in float32."""
    x = x.astype(jnp.float32)
    centered = x - _mean_last(x)
    return centered * jax.lax.rsqrt(_mean_last(jnp.square(centered)) + eps)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def count_params(module: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param``) of a module."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------

def concrete_value(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array when it is concrete, ``None`` when it is traced (inside ``jit``/``grad``/...).

    Used for value checks (e.g. class ids in range) that can only run on concrete inputs.
    """
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _fans(shape: tuple[int, ...], in_axis, out_axis) -> tuple[float, float]:
    in_axes = (in_axis,) if isinstance(in_axis, int) else tuple(in_axis)
    out_axes = (out_axis,) if isinstance(out_axis, int) else tuple(out_axis)
    nd = len(shape)
    in_axes = tuple(a % nd for a in in_axes)
    out_axes = tuple(a % nd for a in out_axes)
    receptive = np.prod([d for i, d in enumerate(shape) if i not in in_axes + out_axes]) if nd > 2 else 1
    fan_in = float(np.prod([shape[a] for a in in_axes])) * receptive
    fan_out = float(np.prod([shape[a] for a in out_axes])) * receptive
    return fan_in, fan_out


def host_initializer(distribution: str, *, stddev: float = 0.02, in_axis: int | tuple[int, ...] = -2,
                     out_axis: int | tuple[int, ...] = -1) -> Callable:
    """A parameter initializer that draws on the host with NumPy, seeded by the JAX key's data.

    Same distributions as ``jax.nn.initializers`` (``"xavier_uniform"``, ``"lecun_normal"`` (truncated at 2
    std, variance-corrected), ``"normal"`` (``stddev``), ``"zeros"``). Why: on CPU every eagerly executed JAX
    op of a new shape is an XLA compilation (0.1-0.5 s each here), so building a model with ``jax.random``
    initializers costs seconds; drawing with NumPy costs milliseconds. Under a trace (``jax.jit``,
    ``nnx.eval_shape``) the same NumPy draw runs through ``jax.pure_callback``, so values do not depend on
    whether the model is built eagerly or under ``jit``.
    """
    if distribution not in ("xavier_uniform", "lecun_normal", "normal", "zeros"):
        raise ValueError(f"`distribution` must be xavier_uniform, lecun_normal, normal or zeros, got {distribution!r}.")

    def draw(key_data: np.ndarray, shape: tuple[int, ...], dtype) -> np.ndarray:
        if distribution == "zeros":
            return np.zeros(shape, dtype)
        rng = np.random.default_rng(np.asarray(key_data, np.uint32).ravel().tolist())
        if distribution == "normal":
            out = stddev * rng.standard_normal(shape)
        elif distribution == "xavier_uniform":
            fan_in, fan_out = _fans(shape, in_axis, out_axis)
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            out = rng.uniform(-limit, limit, shape)
        else:  # lecun_normal: truncated standard normal in [-2, 2], rescaled to variance 1 / fan_in
            fan_in, _ = _fans(shape, in_axis, out_axis)
            out = rng.standard_normal(shape)
            bad = np.abs(out) > 2.0
            while bad.any():
                out[bad] = rng.standard_normal(int(bad.sum()))
                bad = np.abs(out) > 2.0
            out = out * math.sqrt(1.0 / fan_in) / 0.87962566103423978
        return out.astype(dtype)

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        shape = tuple(int(d) for d in shape)
        np_dtype = np.float32 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)
        if distribution == "zeros":
            return jnp.asarray(np.zeros(shape, np_dtype), dtype)
        key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        concrete = concrete_value(key_data)
        if concrete is None:
            out = jax.pure_callback(lambda kd: draw(kd, shape, np_dtype),
                                    jax.ShapeDtypeStruct(shape, np_dtype), key_data)
            return out.astype(dtype)
        return jnp.asarray(draw(concrete, shape, np_dtype), dtype)

    return init


_xavier = host_initializer("xavier_uniform")
_zeros = host_initializer("zeros")


def _dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
           dtype, param_dtype, kernel_init=_xavier, bias_init=_zeros) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.with_partitioning(kernel_init, names),
                      bias_init=nnx.with_partitioning(bias_init, (names[1],)), rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with per-head projections ``[embed, heads, head_dim]`` (bias, no mask)."""

    def __init__(self, hidden: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        head_dim = hidden // heads
        init_in = host_initializer("xavier_uniform", in_axis=0, out_axis=(1, 2))
        init_out = host_initializer("xavier_uniform", in_axis=(0, 1), out_axis=2)
        names_in = ("embed", "heads", "head_dim")

        def w(init, shape, names):
            return nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=names)

        self.wq = w(init_in, (hidden, heads, head_dim), names_in)
        self.wk = w(init_in, (hidden, heads, head_dim), names_in)
        self.wv = w(init_in, (hidden, heads, head_dim), names_in)
        self.bq = w(_zeros, (heads, head_dim), ("heads", "head_dim"))
        self.bk = w(_zeros, (heads, head_dim), ("heads", "head_dim"))
        self.bv = w(_zeros, (heads, head_dim), ("heads", "head_dim"))
        self.wo = w(init_out, (heads, head_dim, hidden), ("heads", "head_dim", "embed"))
        self.bo = w(_zeros, (hidden,), ("embed",))
        self.dtype = dtype
        self.scale = 1.0 / math.sqrt(head_dim)

    _LORA_KERNELS: ClassVar[dict[str, str]] = {"wq": "ble,ehd->blhd", "wk": "ble,ehd->blhd", "wv": "ble,ehd->blhd",
                                               "wo": "blhd,hde->ble"}

    def lora_kernels(self) -> dict[str, str]:
        """LoRA protocol (:mod:`adrpo_jax.models.lora`): sites ``<path>.wq`` / ``wk`` / ``wv`` / ``wo``."""
        return dict(self._LORA_KERNELS)

    def _project(self, name: str, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self._LORA_KERNELS[name], x, getattr(self, name)[...].astype(self.dtype))
        return add_lora(self, name, x, y)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        q = self._project("wq", x) + self.bq[...].astype(dt)
        k = self._project("wk", x) + self.bk[...].astype(dt)
        v = self._project("wv", x) + self.bv[...].astype(dt)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.scale
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return self._project("wo", out) + self.bo[...].astype(dt)


class DiTBlock(nnx.Module):
    """adaLN-Zero transformer block: ``x += g1 * attn(mod(LN(x))); x += g2 * mlp(mod(LN(x)))``."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        mlp = int(hidden * mlp_ratio)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(hidden, heads, **kw)
        self.fc1 = _dense(hidden, mlp, ("embed", "mlp"), **kw)
        self.fc2 = _dense(mlp, hidden, ("mlp", "embed"), **kw)
        # adaLN-Zero: the modulation starts at 0, so the block starts as the identity.
        self.modulation = _dense(hidden, 6 * hidden, ("embed", "mlp"), kernel_init=_zeros, **kw)
        self.dtype = dtype

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mod = self.modulation(jax.nn.silu(c)).astype(jnp.float32)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        h = self.attn(_modulate(_layer_norm(x), shift1, scale1))
        x = x + gate1[:, None, :] * h.astype(jnp.float32)
        h = self.fc2(jax.nn.gelu(self.fc1(_modulate(_layer_norm(x), shift2, scale2).astype(self.dtype)),
                                 approximate=True))
        return x + gate2[:, None, :] * h.astype(jnp.float32)


class StackedDiTBlocks(DiTBlock):
    """All ``depth`` DiT blocks as one module: the attributes of a :class:`DiTBlock`, every parameter with a
    leading ``[depth]`` axis (logical name ``'layers'``, left unsharded by the sharding rules); :meth:`scan` runs
    them with one ``jax.lax.scan``.

    Built by drawing ``depth`` :class:`DiTBlock` s in order (the same random draws as the list layout) and
    stacking their parameters. ``len(stack)`` is the depth; ``stack[i]`` is a detached copy of block ``i`` as a
    :class:`DiTBlock` (for inspection: writes to it do not reach the stack). LoRA
    (:mod:`adrpo_jax.models.lora`): the projections inside are stacked sites (``blocks.attn.wq`` stands for
    ``blocks.{i}.attn.wq`` of every block; an adapter goes to every block or none).
    """

    lora_layer_stack = True

    def __init__(self, depth: int, hidden: int, heads: int, mlp_ratio: float, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        super().__init__(hidden, heads, mlp_ratio, **kw)
        stack_variables(self, [DiTBlock(hidden, heads, mlp_ratio, **kw) for _ in range(depth - 1)])

    def __len__(self) -> int:
        return int(self.fc1.kernel.shape[0])

    def __getitem__(self, i: int) -> DiTBlock:
        return cast(DiTBlock, unstacked_copy(self, i, len(self), DiTBlock, "block"))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def scan(self, x: jax.Array, c: jax.Array, *, remat: bool = False) -> jax.Array:
        """The blocks applied in order to ``x [B, L, hidden]`` (float32) with condition ``c [B, hidden]``, as one
        ``jax.lax.scan``; ``remat``: ``jax.checkpoint`` each block inside the scan. The LoRA dropout key (if any)
        is folded with the block index, so stacked adapters draw a different mask in every block."""
        graphdef, state = nnx.split(self)

        def body(h, xs):
            block_state, index = xs
            block = nnx.merge(graphdef, block_state)
            with lora_dropout_fold_in(index):
                h = DiTBlock.__call__(block, h, c)
            return h, None

        if remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (state, jnp.arange(len(self), dtype=jnp.int32)))
        return x


__all__.append("StackedDiTBlocks")


class DiT(nnx.Module):
    """Conditional velocity network ``v_theta(x, t, cond)`` (see the module docstring).

    Args:
      config: a :class:`DiTConfig`.
      rngs: ``nnx.Rngs`` for the initialisation (only ``params`` is used; no RNG state is kept).
    """

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, DiTConfig):
            raise ValueError(f"`config` must be a DiTConfig, got {type(config).__name__}.")
        self.config = config
        dtype = _dtype(config.dtype, "dtype")
        param_dtype = _dtype(config.param_dtype, "param_dtype")
        self.dtype = dtype
        h = config.hidden
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        normal = host_initializer("normal", stddev=0.02)
        # the parts that exist depend on the config (pos_embed, cond_dim, scan_layers)
        self.pos_embed: nnx.Param | None
        self.class_embed: nnx.Embed | None
        self.cond_fc1: nnx.Linear | None
        self.cond_fc2: nnx.Linear | None
        self.null_cond: nnx.Param | None
        self.blocks: StackedDiTBlocks | nnx.List
        with nnx.use_eager_sharding(False):
            patch_dim = config.patch_size ** 2 * config.channels
            self.patch_embed = _dense(patch_dim, h, (None, "embed"), **kw)
            if config.pos_embed == "learned":
                self.pos_embed = nnx.Param(normal(rngs.params(), (config.num_patches, h), param_dtype),
                                           out_sharding=(None, "embed"))
            else:
                self.pos_embed = None
            self.time_fc1 = _dense(config.frequency_dim, h, (None, "mlp"), kernel_init=normal, **kw)
            self.time_fc2 = _dense(h, h, ("mlp", "embed"), kernel_init=normal, **kw)
            if config.cond_dim is None:
                self.class_embed = nnx.Embed(
                    config.num_classes + 1, h, dtype=dtype, param_dtype=param_dtype,
                    embedding_init=nnx.with_partitioning(normal, (None, "embed")), rngs=rngs)
                self.cond_fc1 = self.cond_fc2 = self.null_cond = None
            else:
                self.class_embed = None
                self.cond_fc1 = _dense(config.cond_dim, h, (None, "mlp"), kernel_init=normal, **kw)
                self.cond_fc2 = _dense(h, h, ("mlp", "embed"), kernel_init=normal, **kw)
                self.null_cond = nnx.Param(normal(rngs.params(), (config.cond_dim,), param_dtype),
                                           out_sharding=(None,))
            if config.scan_layers:
                self.blocks = StackedDiTBlocks(config.depth, h, config.heads, config.mlp_ratio, **kw)
            else:
                self.blocks = nnx.List([DiTBlock(h, config.heads, config.mlp_ratio, **kw)
                                        for _ in range(config.depth)])
            self.final_modulation = _dense(h, 2 * h, ("embed", "mlp"), kernel_init=_zeros, **kw)
            self.final_linear = _dense(h, patch_dim, ("embed", None), kernel_init=_zeros, **kw)

    # -- conditioning ------------------------------------------------------------------------------------
    def null_condition(self, batch_size: int) -> jax.Array:
        """The unconditional condition for ``batch_size`` samples: ``[B]`` of the null class id, or
        ``[B, cond_dim]`` copies of the learned null embedding. Pass it (or one row of it) as the sampler's
        ``null_cond``."""
        if self.config.cond_dim is None:
            return jnp.full((batch_size,), self.config.num_classes, jnp.int32)
        assert self.null_cond is not None  # cond_dim set
        return jnp.broadcast_to(self.null_cond[...], (batch_size, self.config.cond_dim))

    def embed_condition(self, cond: jax.Array, drop_mask: jax.Array | None = None) -> jax.Array:
        """Condition embedding ``[B, hidden]`` (float32); ``drop_mask`` rows use the null condition."""
        cfg = self.config
        if cfg.cond_dim is None:
            if drop_mask is not None:
                cond = jnp.where(drop_mask, jnp.asarray(cfg.num_classes, cond.dtype), cond)
            assert self.class_embed is not None  # cond_dim None: class labels
            return self.class_embed(cond).astype(jnp.float32)
        assert self.null_cond is not None and self.cond_fc1 is not None and self.cond_fc2 is not None
        cond = cond.astype(jnp.float32)
        if drop_mask is not None:
            cond = jnp.where(drop_mask[:, None], self.null_cond[...].astype(jnp.float32)[None, :], cond)
        return self.cond_fc2(jax.nn.silu(self.cond_fc1(cond))).astype(jnp.float32)

    def embed_time(self, t: jax.Array) -> jax.Array:
        """Time embedding ``[B, hidden]`` (float32) of ``t [B]`` in ``[0, 1]``."""
        cfg = self.config
        feats = timestep_embedding(t * cfg.time_scale, cfg.frequency_dim)
        return self.time_fc2(jax.nn.silu(self.time_fc1(feats.astype(self.dtype)))).astype(jnp.float32)

    def _check_inputs(self, x, t, cond, drop_mask):
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"`x` must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                             f"(NHWC, from DiTConfig), got {tuple(x.shape)}.")
        b = x.shape[0]
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (b,))
        if t.shape != (b,):
            raise ValueError(f"`t` must have shape () or ({b},), got {t.shape}.")
        cond = jnp.asarray(cond)
        if cfg.cond_dim is None:
            if cond.shape != (b,) or not jnp.issubdtype(cond.dtype, jnp.integer):
                raise ValueError(f"`cond` must be [{b}] integer class ids in [0, {cfg.num_classes}] "
                                 f"(num_classes = null class), got shape {cond.shape} dtype {cond.dtype}.")
            values = concrete_value(cond)
            if values is not None and values.size:
                lo, hi = int(values.min()), int(values.max())
                if lo < 0 or hi > cfg.num_classes:
                    raise ValueError(f"`cond` class ids must be in [0, {cfg.num_classes}] "
                                     f"(num_classes = null class), got values in [{lo}, {hi}].")
        elif cond.shape != (b, cfg.cond_dim) or not jnp.issubdtype(cond.dtype, jnp.floating):
            raise ValueError(f"`cond` must be a float embedding [{b}, {cfg.cond_dim}] (cond_dim is set), "
                             f"got shape {cond.shape} dtype {cond.dtype}.")
        if drop_mask is not None:
            drop_mask = jnp.asarray(drop_mask)
            if drop_mask.shape != (b,):
                raise ValueError(f"`drop_mask` must have shape ({b},), got {drop_mask.shape}.")
            drop_mask = drop_mask.astype(bool)
        return t, cond, drop_mask

    # -- forward -----------------------------------------------------------------------------------------
    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array, *,
                 drop_mask: jax.Array | None = None) -> jax.Array:
        """Velocity ``v_theta(x, t, cond)``.

        Args:
          x: ``[B, H, W, C]`` current point ``x_t`` (NHWC, sizes of the config).
          t: ``[B]`` (or scalar) float time in ``[0, 1]`` (0 = noise, 1 = data).
          cond: ``[B]`` int class ids in ``[0, num_classes]`` (``num_classes`` = unconditional), or
            ``[B, cond_dim]`` float embeddings when ``cond_dim`` is set.
          drop_mask: optional ``[B]`` bool; True rows use the null condition (CFG dropout, see
            :func:`cfg_drop_mask`).

        Returns:
          ``[B, H, W, C]`` float32 velocity.
        """
        cfg = self.config
        t, cond, drop_mask = self._check_inputs(x, t, cond, drop_mask)
        tokens = self.patch_embed(patchify(x, cfg.patch_size).astype(self.dtype)).astype(jnp.float32)
        if self.pos_embed is None:
            pos = jnp.asarray(sincos_pos_embed_2d(cfg.hidden, cfg.image_size // cfg.patch_size))
        else:
            pos = self.pos_embed[...].astype(jnp.float32)
        h = tokens + pos[None]
        c = self.embed_time(t) + self.embed_condition(cond, drop_mask)
        if isinstance(self.blocks, StackedDiTBlocks):  # cfg.scan_layers
            h = self.blocks.scan(h, c, remat=cfg.remat)
        for block in (() if isinstance(self.blocks, StackedDiTBlocks) else self.blocks):
            if cfg.remat:
                h = nnx.remat(lambda blk, h_, c_: blk(h_, c_))(block, h, c)
            else:
                h = block(h, c)
        shift, scale = jnp.split(self.final_modulation(jax.nn.silu(c)).astype(jnp.float32), 2, axis=-1)
        h = _modulate(_layer_norm(h), shift, scale)
        out = self.final_linear(h.astype(self.dtype)).astype(jnp.float32)
        return unpatchify(out, cfg.patch_size, cfg.image_size, cfg.channels)


def velocity_fn_from_state(graphdef: nnx.GraphDef, state: nnx.State) -> Callable[..., jax.Array]:
    """A pure ``velocity_fn(x, t, cond) -> v`` of a split model (for :func:`adrpo_jax.flow.sampling.sample`).

    ``state`` may be a traced pytree (e.g. the params argument of a jitted function).
    """
    model = nnx.merge(graphdef, state)

    def velocity_fn(x, t, cond):
        return model(x, t, cond)

    return velocity_fn


__all__.append("velocity_fn_from_state")


# ---------------------------------------------------------------------------------------------------------
# Save / load: a directory with config.json + params.safetensors (flat "a/b/0/c" keys, float32 or the dtype)
# ---------------------------------------------------------------------------------------------------------

_PARAMS_FILE = "params.safetensors"
_CONFIG_FILE = "config.json"


def _key_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _stacked_prefixes(module: nnx.Module) -> list[str]:
    """The flat-name prefixes (``'blocks/'``) of the layer stacks (:class:`StackedDiTBlocks`) in ``module``."""
    return [_key_str(path) + "/" for path, m in nnx.iter_modules(module) if isinstance(m, StackedDiTBlocks)]


def _saved_names(name: str, shape: tuple[int, ...], prefixes: list[str]) -> list[str] | None:
    """The per-block names ``'blocks/<i>/...'`` under which the stacked parameter ``name`` (``'blocks/...'``) is
    saved, or None for an unstacked one."""
    prefix = next((p for p in prefixes if name.startswith(p)), None)
    if prefix is None:
        return None
    return [f"{prefix}{i}/{name[len(prefix):]}" for i in range(shape[0])]


def _flat_params(module: nnx.Module) -> dict[str, Any]:
    """``{name: value}`` of the module's ``nnx.Param`` s in the saved (list) layout: a stacked block parameter
    ``blocks/attn/wq [L, ...]`` becomes ``blocks/<i>/attn/wq`` (NumPy slices) for each block."""
    pure = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    prefixes = _stacked_prefixes(module)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        name = _key_str(path)
        names = _saved_names(name, tuple(leaf.shape), prefixes)
        if names is None:
            flat[name] = leaf
        else:
            a = np.asarray(jax.device_get(leaf))
            flat.update({n: a[i] for i, n in enumerate(names)})
    return flat


def save_nnx_params(module: nnx.Module, directory: str | os.PathLike, config: dict[str, Any],
                    kind: str) -> str:
    """Save a module's ``nnx.Param`` values (safetensors, float32 for low-precision dtypes) and a
    ``config.json`` (``{"kind": kind, "config": config}``) into ``directory``; returns the directory."""
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    for name, value in _flat_params(module).items():
        a = np.asarray(jax.device_get(value))
        if a.dtype not in (np.float32, np.float64, np.int32, np.int64):
            a = a.astype(np.float32)
        arrays[name] = np.ascontiguousarray(a)
    tmp = os.path.join(directory, _PARAMS_FILE + ".tmp")
    save_file(arrays, tmp)
    os.replace(tmp, os.path.join(directory, _PARAMS_FILE))
    with open(os.path.join(directory, _CONFIG_FILE), "w") as f:
        json.dump({"kind": kind, "config": config}, f, indent=2, sort_keys=True)
    return directory


def read_saved_config(directory: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The ``config`` dict of a directory written by :func:`save_nnx_params`; checks ``kind``."""
    path = os.path.join(os.fspath(directory), _CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"`directory` {os.fspath(directory)!r} has no {_CONFIG_FILE}; not a saved {kind}.")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("kind") != kind:
        raise ValueError(f"`directory` {os.fspath(directory)!r} holds a {meta.get('kind')!r}, not a {kind!r}.")
    return meta["config"]


_M = TypeVar("_M", bound=nnx.Module)


def restore_nnx_params(module: _M, directory: str | os.PathLike) -> _M:
    """Load ``params.safetensors`` of ``directory`` into ``module`` (in place; also returned).

    Names and shapes must match the module's exactly (``ValueError`` listing the differences otherwise);
    values are cast to each parameter's dtype. Files hold the per-block list layout (``blocks/<i>/...``); a module
    with stacked blocks (``DiTConfig.scan_layers``) stacks them on load.
    """
    from safetensors.numpy import load_file

    path = os.path.join(os.fspath(directory), _PARAMS_FILE)
    if not os.path.exists(path):
        raise ValueError(f"`directory` {os.fspath(directory)!r} has no {_PARAMS_FILE}.")
    loaded = load_file(path)
    state = nnx.state(module, nnx.Param)
    pure = nnx.to_pure_dict(state)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    prefixes = _stacked_prefixes(module)
    # saved name -> (shape, index of the module leaf, block index or None)
    template: dict[str, tuple[tuple[int, ...], int, int | None]] = {}
    for j, (p, leaf) in enumerate(paths_leaves):
        name, shape = _key_str(p), tuple(leaf.shape)
        names = _saved_names(name, shape, prefixes)
        if names is None:
            template[name] = (shape, j, None)
        else:
            template.update({n: (shape[1:], j, i) for i, n in enumerate(names)})
    missing, unexpected = sorted(set(template) - set(loaded)), sorted(set(loaded) - set(template))
    if missing or unexpected:
        raise ValueError(f"Saved params in {os.fspath(directory)!r} do not match the module: missing {missing}, "
                         f"unexpected {unexpected}.")
    bad = [f"{k}: saved {loaded[k].shape} vs module {shape}" for k, (shape, _, _) in template.items()
           if tuple(loaded[k].shape) != shape]
    if bad:
        raise ValueError(f"Saved params in {os.fspath(directory)!r} have wrong shapes: {bad}.")
    parts: dict[int, dict] = {}  # module leaf -> {block index (None: unstacked): saved array}
    for name, (_, j, i) in template.items():
        parts.setdefault(j, {})[i] = loaded[name]
    new_leaves = []
    for j, (_, leaf) in enumerate(paths_leaves):
        part = parts[j]
        value = part[None] if None in part else np.stack([part[i] for i in range(len(part))])
        new_leaves.append(jnp.asarray(value, dtype=leaf.dtype))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new_leaves))
    nnx.update(module, state)
    return module


def save_dit(model: DiT, directory: str | os.PathLike) -> str:
    """Save a :class:`DiT` (``config.json`` + ``params.safetensors``) into ``directory``."""
    return save_nnx_params(model, directory, model.config.to_dict(), kind="DiT")


# DiTConfig fields a loaded model may take from the caller instead of the saved config: how it computes and
# stores, never its architecture (the saved parameters are cast to ``param_dtype``).
LOAD_OVERRIDES = ("dtype", "param_dtype", "remat", "scan_layers")


def load_dit(directory: str | os.PathLike, **overrides: Any) -> DiT:
    """Load a :class:`DiT` saved by :func:`save_dit` (round-trips exactly for float32 params).

    ``overrides``: any of ``dtype``, ``param_dtype``, ``remat``, ``scan_layers`` (:data:`LOAD_OVERRIDES`) replace the
    saved config's values (e.g. the run config's bfloat16 + remat for a model saved in float32 without remat); the
    saved parameters are cast to the resulting ``param_dtype``. Other keys raise ``ValueError``.
    """
    bad = sorted(set(overrides) - set(LOAD_OVERRIDES))
    if bad:
        raise ValueError(f"load_dit: cannot override {bad} of a saved DiT (its architecture); only "
                         f"{list(LOAD_OVERRIDES)} may be overridden.")
    saved = read_saved_config(directory, "DiT")
    config = DiTConfig.from_dict({**saved, **overrides})
    model = DiT(config, rngs=nnx.Rngs(0))
    return restore_nnx_params(model, directory)


__all__.append("read_saved_config")
