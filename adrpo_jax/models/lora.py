"""LoRA: low-rank adapters on chosen projections of an NNX model (the decoder, the DiT, any ``nnx.Linear``).

A targeted projection ``y = einsum(eq, x, W)`` becomes (Hu et al., 2021, "LoRA")::

    y = einsum(eq, x, W) + s * einsum(einsum(dropout(x), A), B),     s = alpha / rank  (alpha / sqrt(rank): rsLoRA)

with ``A`` of shape ``[*in_dims, r]`` (the kernel's contracted dimensions) and ``B`` ``[r, *out_dims]`` (its
output dimensions), so it works for plain ``[in, out]`` matrices and for the decoder's 3-D attention kernels
(``q_proj [D, H, hd]``: ``A [D, r]``, ``B [r, H, hd]``; ``o_proj [H, hd, D]``: ``A [H, hd, r]``, ``B [r, D]``).
``B`` starts at 0, so a freshly adapted model computes exactly what the base model computes.

Adapters are ``nnx.LoRAParam`` variables (a subclass of ``nnx.Param``) stored next to their kernel; base
parameters keep their paths, so base-only states are interchangeable with those of the plain model:

==========================================  ===============================================================
filter                                      selects
==========================================  ===============================================================
``LORA_PARAMS`` (= ``nnx.LoRAParam``)       the adapters (the trainable set of a LoRA run)
``BASE_PARAMS``                             ``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))``: the base weights
==========================================  ===============================================================

Adapters carry logical axis names derived from their kernel (``A``: the kernel's input names + ``None``,
``B``: ``None`` + its output names), so the project's sharding rules shard them like their base layer.

Where adapters go (``LoRAConfig.target_modules``) is matched against *site paths*: the module path of an
``nnx.Linear`` or of a decoder ``Dense`` (``'layers.3.self_attn.q_proj'``, ``'blocks.0.fc1'``), and
``<module path>.<kernel>`` for modules with several raw kernels (the DiT attention: ``'blocks.0.attn.wq'``).
A module opts in by defining ``lora_kernels() -> {kernel attribute: einsum equation}`` and adding
``add_lora(self, kernel, x, y)`` to its forward; plain ``nnx.Linear`` layers are supported as they are
(their class is switched to :class:`LoRALinear`, an ``nnx.Linear`` subclass, while adapted).

The reference policy of a LoRA run is the *same* model with its adapters switched off: ``enabled`` is a
static attribute of every adapter (part of the ``GraphDef``), so ``set_lora_enabled(model, False)`` /
``with lora_disabled(model):`` give the base model's forward pass with no second copy of the weights, also
inside a jitted function (merge, switch off, call); :func:`split_lora` returns both ``GraphDef`` s with the
``(adapters, base)`` states for a functional train step.

Dropout on the adapter input is functional: it is active only inside ``with lora_dropout_rng(key):`` (enter it
inside the jitted function, with the key as an argument), and never otherwise (evaluation, sampling,
reference passes are deterministic).

>>> import jax.numpy as jnp
>>> class Tiny(nnx.Module):
...     def __init__(self, rngs):
...         self.up = nnx.Linear(4, 8, rngs=rngs)
...         self.down = nnx.Linear(8, 4, rngs=rngs)
...     def __call__(self, x):
...         return self.down(jax.nn.relu(self.up(x)))
>>> model = Tiny(nnx.Rngs(0))
>>> x = jnp.ones((2, 4))
>>> y_base = model(x)
>>> model = apply_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=("up",)), rngs=nnx.Rngs(1))
>>> [site.path for site in lora_sites(model) if site.adapted]
['up']
>>> bool(jnp.allclose(model(x), y_base, rtol=1e-5, atol=1e-6))  # B = 0: starts equal to the base (to float32 ulps)
True
>>> lora_param_count(model)                 # A [4, 2] + B [2, 8]
24
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "LoRAConfig",
    "LoRAAdapter",
    "LoRALinear",
    "LoRASite",
    "LORA_PARAMS",
    "BASE_PARAMS",
    "ALL_LINEAR",
    "add_lora",
    "apply_lora",
    "add_lora_matrix",
    "effective_kernel",
    "has_lora",
    "lora_disabled",
    "lora_dropout_fold_in",
    "lora_dropout_rng",
    "lora_param_count",
    "lora_sites",
    "lora_state_dict",
    "load_lora_state_dict",
    "merge_lora",
    "set_lora_enabled",
    "split_lora",
]

Array = jax.Array

LORA_PARAMS = nnx.LoRAParam
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
ALL_LINEAR = "all-linear"
INITS = ("kaiming_uniform", "gaussian")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_OUTPUT_LAYER_NAMES = ("lm_head",)  # excluded from 'all-linear' (peft convention: never the output layer)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters and how (hashable; field names follow peft's ``LoraConfig``).

    Attributes:
      rank: r, the adapters' inner dimension (>= 1).
      alpha: the scaling numerator: the update is ``alpha / rank * x A B`` (``alpha / sqrt(rank)`` with
        ``use_rslora``), so the effective learning rate does not change with ``rank`` at fixed ``alpha``.
      dropout: dropout probability on the adapter input in ``[0, 1)`` (active only inside
        :func:`lora_dropout_rng`).
      target_modules: ``'all-linear'`` (every supported projection except the output layer ``lm_head``), a
        regex string (full match against the site path, peft's rule for a string), or a tuple of entries, each
        either a name (matches a path equal to it or ending in ``'.' + name``: ``'q_proj'``,
        ``'self_attn.q_proj'``, ``'attn.wq'``) or a regex full-matching the path (``r'layers\\.[0-3]\\..*'``).
      init: ``'kaiming_uniform'`` (peft's default: ``A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) or
        ``'gaussian'`` (``A ~ N(0, 1/r^2)``); ``B = 0`` always.
      use_rslora: rank-stabilized scaling ``alpha / sqrt(rank)``.
      param_dtype: storage dtype of ``A`` and ``B`` (``'float32'``; the adapter matmuls run in the dtype of
        the base projection's output).

    >>> LoRAConfig(rank=8, alpha=16.0).scale
    2.0
    >>> LoRAConfig(rank=0, alpha=1.0)
    Traceback (most recent call last):
    ...
    ValueError: LoRAConfig.rank must be a positive int, got 0
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    init: str = "kaiming_uniform"
    use_rslora: bool = False
    param_dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.number)) or \
                not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a positive finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float, np.number)) or \
                not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, (list, tuple)):
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"LoRAConfig.target_modules must be 'all-linear', a regex string or a non-empty "
                                 f"tuple of non-empty strings, got {self.target_modules!r}")
        elif not isinstance(targets, str) or not targets:
            raise ValueError(f"LoRAConfig.target_modules must be 'all-linear', a regex string or a non-empty tuple "
                             f"of strings, got {self.target_modules!r}")
        for pattern in ((targets,) if isinstance(targets, str) else targets):
            if pattern != ALL_LINEAR:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"LoRAConfig.target_modules entry {pattern!r} is not a valid regex: {err}") \
                        from None
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoRAConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        if self.param_dtype not in _DTYPES:
            raise ValueError(f"LoRAConfig.param_dtype must be one of {sorted(_DTYPES)}, got {self.param_dtype!r}")

    @property
    def scale(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules) if isinstance(self.target_modules, tuple) \
            else self.target_modules
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoRAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown LoRAConfig keys {unknown}; valid keys are {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("target_modules"), list):
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)

    def matches(self, path: str) -> bool:
        """Whether a site path is targeted (``'all-linear'`` excludes the output layer ``lm_head``)."""
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        single_regex = isinstance(self.target_modules, str)
        return any(_entry_matches(t, path, regex_only=single_regex) for t in targets)


def _entry_matches(entry: str, path: str, *, regex_only: bool = False) -> bool:
    if entry == ALL_LINEAR:
        return path.split(".")[-1] not in _OUTPUT_LAYER_NAMES
    if not regex_only and (path == entry or path.endswith("." + entry)):
        return True
    return re.fullmatch(entry, path) is not None


# ----------------------------------------------------------------------------------------------------------
# Einsum bookkeeping: x A B for an arbitrary "x,kernel->y" projection
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _EinsumSplit:
    in_axes: tuple[int, ...]   # kernel axes contracted with x
    out_axes: tuple[int, ...]  # kernel axes that appear in y
    eq_a: str                  # x, A -> h  (h = x's uncontracted axes + r)
    eq_b: str                  # h, B -> y
    eq_merge: str              # A, B -> kernel layout
    batch_axes: tuple[int, ...] = ()  # kernel axes shared by x, kernel and y (e.g. the experts of an MoE layer)


@functools.cache
def _split_equation(equation: str, kernel_ndim: int) -> _EinsumSplit:
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise ValueError(f"LoRA needs an explicit two-operand einsum 'x,kernel->y', got {equation!r}")
    lhs, y_sub = eq.split("->")
    x_sub, k_sub = lhs.split(",")
    if "." in k_sub or len(k_sub) != kernel_ndim or not k_sub.isalpha():
        raise ValueError(f"einsum {equation!r}: the kernel subscripts {k_sub!r} must be {kernel_ndim} letters "
                         "(no ellipsis)")
    x_letters, y_letters = set(x_sub.replace(".", "")), set(y_sub.replace(".", ""))
    in_axes, out_axes, batch_axes = [], [], []
    for i, c in enumerate(k_sub):
        if c in x_letters and c not in y_letters:
            in_axes.append(i)
        elif c in y_letters and c not in x_letters:
            out_axes.append(i)
        elif c in x_letters and c in y_letters:  # a batch axis (experts): one independent adapter per entry
            batch_axes.append(i)
        else:
            raise ValueError(f"einsum {equation!r}: kernel axis {c!r} must be contracted with the input, an output "
                             "axis or a batch axis of input and output (summed-out kernel axes are not supported "
                             "by LoRA)")
    if not in_axes or not out_axes:
        raise ValueError(f"einsum {equation!r}: the kernel needs at least one input and one output axis")
    r = next(c for c in "rzyxwvutsqponmlkjihgfedcba" + string.ascii_uppercase if c not in eq)
    ins = "".join(k_sub[i] for i in in_axes)
    outs = "".join(k_sub[i] for i in out_axes)
    bat = "".join(k_sub[i] for i in batch_axes)  # A [batch..., in..., r], B [batch..., r, out...]
    h_sub = "".join(c for c in x_sub if c not in ins) + r
    return _EinsumSplit(tuple(in_axes), tuple(out_axes), eq_a=f"{x_sub},{bat}{ins}{r}->{h_sub}",
                        eq_b=f"{h_sub},{bat}{r}{outs}->{y_sub}", eq_merge=f"{bat}{ins}{r},{bat}{r}{outs}->{k_sub}",
                        batch_axes=tuple(batch_axes))


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "init", "fan_in", "rank"))
def _init_a(key, *, shape, dtype, init, fan_in, rank):
    # One compilation per (shape, dtype, init): cheap on CPU, and runs under an outer jit / eval_shape too.
    if init == "kaiming_uniform":  # torch kaiming_uniform_(a=sqrt(5)) on a [r, fan_in] weight (peft)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    else:
        a = jax.random.normal(key, shape, jnp.float32) / rank
    return a.astype(dtype)


# ----------------------------------------------------------------------------------------------------------
# Dropout key (functional): a context entered inside the traced function
# ----------------------------------------------------------------------------------------------------------

_DROPOUT_KEY: contextvars.ContextVar[Array | None] = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def lora_dropout_rng(key: Array | None) -> Iterator[None]:
    """Turns LoRA dropout on for the forward passes inside the block, drawn from ``key``.

    Each adapter uses ``fold_in(key, adapter.index)``. Enter it *inside* the jitted / differentiated function
    with ``key`` an argument of that function (a concrete key captured by a jit trace would be baked into the
    compiled program; that case raises ``ValueError``). ``key=None``: no dropout.

    >>> model = apply_lora(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), LoRAConfig(2, 2.0, dropout=0.5), rngs=nnx.Rngs(1))
    >>> @jax.jit
    ... def train_forward(model, x, key):
    ...     with lora_dropout_rng(key):
    ...         return model(x)
    >>> train_forward(model, jnp.ones((1, 4)), jax.random.key(0)).shape
    (1, 4)
    """
    if key is not None and not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                                                or key.shape == (2,))):
        raise ValueError(f"`key` must be a jax.random key (or None), got {key!r}")
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


@contextlib.contextmanager
def lora_dropout_fold_in(data: Any) -> Iterator[None]:
    """Inside the block, the active LoRA dropout key (if any) is ``fold_in(key, data)``: the decoder's layer scan
    enters it with the layer index, so the adapters of a stacked site draw a different mask in every layer."""
    key = _DROPOUT_KEY.get()
    if key is None:
        yield
        return
    token = _DROPOUT_KEY.set(jax.random.fold_in(key, data))
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


# ----------------------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------------------


class LoRAAdapter(nnx.Module):
    """The low-rank pair of one kernel: ``delta(x) = s * einsum(einsum(dropout(x), A), B)``.

    Attributes:
      lora_a: ``nnx.LoRAParam [*in_dims, r]``; lora_b: ``nnx.LoRAParam [r, *out_dims]`` (zeros at init). A kernel
      with batch axes (axes of input, kernel and output alike, e.g. the experts ``e`` of ``'etd,edf->etf'``) gets
      one adapter per entry: ``A [*batch_dims, *in_dims, r]``, ``B [*batch_dims, r, *out_dims]``.
      scale: ``s`` (static); rank: ``r``; dropout: input dropout probability; enabled: static on/off switch;
      equation: the base projection's einsum; index: the adapter's ordinal in its model, unique across
      :func:`apply_lora` calls (dropout key fold-in);
      layers: L for the adapter of a stacked site (a kernel with a leading 'layers' axis: ``A [L, *in_dims, r]``,
      ``B [L, r, *out_dims]``, one independent adapter per layer; ``kernel_shape`` is one layer's), else None.
    """

    def __init__(self, equation: str, kernel_shape: Sequence[int], kernel_names: Sequence[str | None] | None, *,
                 rank: int, scale: float, dropout: float = 0.0, init: str = "kaiming_uniform",
                 param_dtype: Any = jnp.float32, key: Array, index: int = 0, layers: int | None = None):
        kernel_shape = tuple(int(s) for s in kernel_shape)
        lead: tuple[int, ...] = () if layers is None else (int(layers),)
        lead_names: tuple[str | None, ...] = () if layers is None else ("layers",)
        split = _split_equation(equation, len(kernel_shape))
        names = tuple(kernel_names) if kernel_names is not None else (None,) * len(kernel_shape)
        in_shape = tuple(kernel_shape[i] for i in split.in_axes)
        out_shape = tuple(kernel_shape[i] for i in split.out_axes)
        lead = lead + tuple(kernel_shape[i] for i in split.batch_axes)  # batch axes (experts) lead A and B
        lead_names = lead_names + tuple(names[i] for i in split.batch_axes)
        param_dtype = jnp.dtype(param_dtype)
        a = _init_a(key, shape=lead + in_shape + (rank,), dtype=param_dtype, init=init,
                    fan_in=int(np.prod(in_shape)), rank=rank)
        with nnx.use_eager_sharding(False):  # logical names are metadata; no mesh needed
            self.lora_a = nnx.LoRAParam(a, out_sharding=lead_names + tuple(names[i] for i in split.in_axes) + (None,))
            self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank,) + out_shape, param_dtype),
                                        out_sharding=lead_names + (None,) + tuple(names[i] for i in split.out_axes))
        self.equation = equation
        self.kernel_shape = kernel_shape
        self.rank = int(rank)
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.enabled = True
        self.index = int(index)
        self.layers = None if layers is None else int(layers)

    def _dropout(self, x: Array) -> Array:
        key = _DROPOUT_KEY.get()
        if self.dropout == 0.0 or key is None:
            return x
        if isinstance(x, jax.core.Tracer) and not isinstance(key, jax.core.Tracer):
            raise ValueError("lora_dropout_rng(key) got a concrete key while the model runs under a JAX "
                             "transformation: enter `with lora_dropout_rng(key):` inside the jitted function and "
                             "pass the key as its argument (a captured key would repeat every step)")
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        keep = jax.random.bernoulli(jax.random.fold_in(key, self.index), 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros((), x.dtype)).astype(x.dtype)

    def __call__(self, x: Array, dtype: Any = None) -> Array:
        """The update ``s * (dropout(x) A) B`` in the layout of the base projection's output, computed in
        ``dtype`` (default: ``x``'s)."""
        split = _split_equation(self.equation, len(self.kernel_shape))
        dtype = jnp.dtype(dtype or x.dtype)
        x = self._dropout(x.astype(dtype))
        h = jnp.einsum(split.eq_a, x, self.lora_a[...].astype(dtype)) * jnp.asarray(self.scale, dtype)
        return jnp.einsum(split.eq_b, h, self.lora_b[...].astype(dtype))

    def delta_kernel(self) -> Array:
        """``s * A B`` in the kernel's layout (with the leading [L] axis of a stacked adapter), float32."""
        a = self.lora_a[...]
        return _merged_delta(a, self.lora_b[...], eq=_merge_equation(self, a.ndim), scale=self.scale)


def _merge_equation(adapter: "LoRAAdapter", a_ndim: int) -> str:
    """``A, B -> kernel`` einsum of ``adapter``; with one extra leading axis on ``A`` (a stacked adapter, outside
    the layer scan) every operand gets a leading batch letter."""
    split = _split_equation(adapter.equation, len(adapter.kernel_shape))
    if a_ndim == len(split.batch_axes) + len(split.in_axes) + 1:
        return split.eq_merge
    if a_ndim != len(split.batch_axes) + len(split.in_axes) + 2:
        raise ValueError(f"LoRA A of rank {a_ndim} does not fit the kernel {adapter.kernel_shape} of "
                         f"{adapter.equation!r}")
    lhs, out = split.eq_merge.split("->")
    ops = lhs.split(",")
    c = next(c for c in string.ascii_letters if c not in split.eq_merge)
    return f"{c}{ops[0]},{c}{ops[1]}->{c}{out}"


@functools.partial(jax.jit, static_argnames=("eq", "scale"))
def _merged_delta(a, b, *, eq, scale):
    return scale * jnp.einsum(eq, a.astype(jnp.float32), b.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("eq", "scale"))
def _merge_kernel(w, a, b, *, eq, scale):
    delta = scale * jnp.einsum(eq, a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


def _adapter_attr(kernel_name: str) -> str:
    return "lora" if kernel_name == "kernel" else f"{kernel_name}_lora"


def add_lora(module: nnx.Module, kernel_name: str, x: Array, y: Array) -> Array:
    """The forward hook of a LoRA-capable module: ``y + adapter(x)`` if ``kernel_name`` has an enabled adapter,
    else ``y`` unchanged (same program as without LoRA). ``x`` is the projection's input, ``y`` its output."""
    adapter = getattr(module, _adapter_attr(kernel_name), None)
    if adapter is None or not adapter.enabled:
        return y
    return y + adapter(x, y.dtype).astype(y.dtype)


def add_lora_matrix(module: nnx.Module, x: Array, y: Array, kernel_name: str = "kernel") -> Array:
    """``y + s * (dropout(x) A) B`` (PEFT's definition, in ``y``'s dtype) for a ``[D, V]`` kernel that a caller uses
    as a matrix, ``y = x @ W`` with ``x [..., D]`` of any leading shape (the decoder's ``lm_head`` in logits,
    log-probs and sampling); ``y`` unchanged without an enabled adapter. The adapter is never folded into ``W``
    (a bf16 ``W + s A B`` would round the update away)."""
    adapter = getattr(module, _adapter_attr(kernel_name), None)
    if adapter is None or not adapter.enabled:
        return y
    a, b = adapter.lora_a[...], adapter.lora_b[...]
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"add_lora_matrix needs a [D, V] kernel's adapter; got A {a.shape}, B {b.shape}")
    dtype = y.dtype
    h = jnp.einsum("...d,dr->...r", adapter._dropout(x.astype(dtype)), a.astype(dtype))  # pylint: disable=protected-access
    return y + jnp.einsum("...r,rv->...v", h * jnp.asarray(adapter.scale, dtype), b.astype(dtype))


def effective_kernel(module: nnx.Module, kernel_name: str = "kernel") -> Array:
    """The kernel with its enabled adapter folded in (``W + s A B``, float32 math, cast to ``W``'s dtype), or
    the kernel itself: a weight-space view (forward passes add the update to the output instead, see
    :func:`add_lora_matrix`; folding into a bf16 kernel rounds small updates away)."""
    w = getattr(module, kernel_name)[...]
    adapter = getattr(module, _adapter_attr(kernel_name), None)
    if adapter is None or not adapter.enabled:
        return w
    a = adapter.lora_a[...]
    return _merge_kernel(w, a, adapter.lora_b[...], eq=_merge_equation(adapter, a.ndim), scale=adapter.scale)


class LoRALinear(nnx.Linear):
    """``nnx.Linear`` plus the LoRA hook. :func:`apply_lora` switches the class of targeted ``nnx.Linear``
    layers to this one (attributes and parameters untouched) and :func:`merge_lora` switches it back."""

    def lora_kernels(self) -> dict[str, str]:
        return {"kernel": "...i,io->...o"}

    def __call__(self, inputs: Array, *args, **kwargs) -> Array:
        y = super().__call__(inputs, *args, **kwargs)
        return add_lora(self, "kernel", inputs, y)


# ----------------------------------------------------------------------------------------------------------
# Sites
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRASite:
    """One projection that can carry an adapter: ``path`` (what ``target_modules`` matches), the owning
    ``module``, the kernel attribute ``kernel_name``, the einsum ``equation`` and whether it is ``adapted``.

    A *stacked* site (a projection inside a layer stack such as the decoder's ``StackedDecoderLayers``: its
    kernel has a leading ``'layers'`` axis) has ``layers = L`` and stands for the L per-layer projections
    ``layer_paths`` (``'layers.{i}.self_attn.q_proj'``, the names of the list layout); ``path`` is the module
    path (``'layers.self_attn.q_proj'``). It is adapted in every layer or in none."""

    path: str
    module: nnx.Module
    kernel_name: str
    equation: str
    layers: int | None = None
    stack_path: str | None = None  # path of the layer stack that contains a stacked site

    @property
    def layer_paths(self) -> list[str]:
        """The per-layer site paths of a stacked site (``[path]`` otherwise)."""
        if self.layers is None or self.stack_path is None:
            return [self.path]
        rest = self.path[len(self.stack_path):]
        return [f"{self.stack_path}.{i}{rest}" for i in range(self.layers)]

    @property
    def adapter(self) -> LoRAAdapter | None:
        return getattr(self.module, _adapter_attr(self.kernel_name), None)

    @property
    def adapted(self) -> bool:
        return self.adapter is not None

    @property
    def kernel(self) -> nnx.Variable:
        return getattr(self.module, self.kernel_name)


def _module_kernels(module: nnx.Module) -> dict[str, str] | None:
    if hasattr(type(module), "lora_kernels"):
        return dict(cast(Any, module).lora_kernels())
    if type(module) is nnx.Linear:  # exact type: a subclass may override __call__ (it must opt in instead)
        return {"kernel": "...i,io->...o"}
    return None


def _path_str(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def lora_sites(model: nnx.Module) -> list[LoRASite]:
    """Every projection of ``model`` that can carry an adapter, in ``nnx.iter_modules`` order (deterministic)."""
    modules = list(nnx.iter_modules(model))
    stacks = [tuple(p) for p, m in modules if getattr(type(m), "lora_layer_stack", False)]
    sites = []
    for path, module in modules:
        kernels = _module_kernels(module)
        if not kernels:
            continue
        base = _path_str(path)
        stack = next((s for s in stacks if tuple(path[:len(s)]) == s and len(path) > len(s)), None)
        for name, equation in kernels.items():
            site_path = base if name == "kernel" else (f"{base}.{name}" if base else name)
            layers = None
            if stack is not None:
                names = getattr(module, name).get_metadata().get("out_sharding") or ()
                if names and names[0] == "layers":
                    layers = int(getattr(module, name).shape[0])
            sites.append(LoRASite(site_path, module, name, equation, layers,
                                  _path_str(stack) if layers is not None and stack is not None else None))
    return sites


def _site_matches(config: LoRAConfig, site: LoRASite) -> bool:
    """Whether ``config`` targets ``site``; a stacked site must be targeted in all of its layers or none."""
    if site.layers is None or config.matches(site.path):
        return config.matches(site.path)
    per_layer = [config.matches(p) for p in site.layer_paths]
    if any(per_layer) and not all(per_layer):
        picked = [i for i, m in enumerate(per_layer) if m]
        raise ValueError(f"LoRAConfig.target_modules={config.target_modules!r} selects layers {picked} of the "
                         f"stacked site {site.path!r} ({site.layers} layers) but not all: with stacked layers "
                         "(DecoderConfig.scan_layers=True) a projection gets an adapter in every layer or none; "
                         "target all layers or build the model with scan_layers=False")
    return all(per_layer)


def has_lora(model: nnx.Module) -> bool:
    """Whether any projection of ``model`` has an adapter."""
    return any(site.adapted for site in lora_sites(model))


# ----------------------------------------------------------------------------------------------------------
# apply / switch / merge / state
# ----------------------------------------------------------------------------------------------------------


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs | int | Array) -> nnx.Module:
    """Adds adapters (in place) to every projection of ``model`` matched by ``config.target_modules``.

    Args:
      model: an NNX module (the decoder ``CausalLM``, the ``DiT``, or any model of ``nnx.Linear`` layers).
      config: a :class:`LoRAConfig`.
      rngs: ``nnx.Rngs`` (its ``params`` stream draws ``A``), or a seed / key for one.

    Returns:
      ``model`` itself, adapted. Base parameters keep their paths; the adapter of site ``p`` lives at ``p.lora``
      (``p`` = a module) or ``<module>.<kernel>_lora`` (multi-kernel modules).

    Raises:
      ValueError: nothing matched (lists the available site paths), a pattern matches a module that cannot
        carry an adapter (e.g. an embedding), or a matched site already has an adapter.
    """
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"`config` must be a LoRAConfig, got {type(config).__name__}")
    if not isinstance(model, nnx.Module):
        raise ValueError(f"`model` must be an nnx.Module, got {type(model).__name__}")
    if not isinstance(rngs, nnx.Rngs):
        rngs = nnx.Rngs(params=rngs)
    sites = lora_sites(model)
    chosen = [s for s in sites if _site_matches(config, s)]
    if not chosen:
        site_paths = sorted({s.path for s in sites})
        module_paths = [_path_str(p) for p, _ in nnx.iter_modules(model) if p]
        unsupported = [p for p in module_paths if config.matches(p) and p not in site_paths]
        if unsupported:
            raise ValueError(f"LoRAConfig.target_modules={config.target_modules!r} matched only modules that cannot "
                             f"carry an adapter: {unsupported[:6]} (supported: nnx.Linear, the decoder's Dense, "
                             f"the DiT attention kernels). Available sites: {_short_list(site_paths)}")
        raise ValueError(f"LoRAConfig.target_modules={config.target_modules!r} matched no projection of this "
                         f"{type(model).__name__}. Available sites: {_short_list(site_paths)}")
    if not isinstance(config.target_modules, str):
        unmatched = [t for t in config.target_modules
                     if not any(_entry_matches(t, p) for s in chosen for p in {s.path, *s.layer_paths})]
        if unmatched:
            raise ValueError(f"LoRAConfig.target_modules entries {unmatched} match no projection of this "
                             f"{type(model).__name__} (a typo?). Available sites: "
                             f"{_short_list(sorted({s.path for s in sites}))}")
    already = [s.path for s in chosen if s.adapted]
    if already:
        raise ValueError(f"sites {already[:6]} already have LoRA adapters (merge_lora first, or choose other "
                         "target_modules)")
    param_dtype = _DTYPES[config.param_dtype]
    # Dropout fold-in indices continue after the adapters already in the model (an earlier apply_lora call), so
    # no two adapters of one model draw the same mask.
    first_index = 1 + max((a.index for s in sites if (a := s.adapter) is not None), default=-1)
    for index, site in enumerate(chosen, start=first_index):
        kernel = site.kernel
        value = kernel.get_value() if hasattr(kernel, "get_value") else kernel.value
        names = kernel.get_metadata().get("out_sharding")
        shape = tuple(value.shape)
        if site.layers is not None:  # one adapter per layer, stacked like the kernel
            shape, names = shape[1:], (tuple(names[1:]) if names else None)
        adapter = LoRAAdapter(site.equation, shape, names, rank=config.rank, scale=config.scale,
                              dropout=config.dropout, init=config.init, param_dtype=param_dtype,
                              key=rngs.params(), index=index, layers=site.layers)
        if type(site.module) is nnx.Linear:
            object.__setattr__(site.module, "__class__", LoRALinear)
        setattr(site.module, _adapter_attr(site.kernel_name), adapter)
    return model


def _short_list(items: Sequence[str], n: int = 12) -> str:
    items = list(items)
    return str(items[:n])[:-1] + (f", ... ({len(items)} in all)]" if len(items) > n else "]")


def set_lora_enabled(model: nnx.Module, enabled: bool) -> nnx.Module:
    """Switches every adapter of ``model`` on or off (in place; returns ``model``). Off = the base model's
    forward pass exactly (the adapter code is not traced at all). The switch is static: it is part of
    ``nnx.graphdef(model)``, so a ``GraphDef`` taken while off always builds the reference model."""
    if not isinstance(enabled, bool):
        raise ValueError(f"`enabled` must be a bool, got {enabled!r}")
    for site in lora_sites(model):
        adapter = site.adapter
        if adapter is not None:
            adapter.enabled = enabled
    return model


@contextlib.contextmanager
def lora_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """``with lora_disabled(model):`` runs the base model (adapters off), then restores each adapter's switch.

    Inside a jitted function over a split model: ``m = nnx.merge(graphdef, params, frozen)`` then
    ``with lora_disabled(m): ref_logits = m(tokens)`` — the reference forward with the same weights.
    """
    adapters = [a for s in lora_sites(model) if (a := s.adapter) is not None]
    previous = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = False
    try:
        yield model
    finally:
        for a, p in zip(adapters, previous):
            a.enabled = p


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.GraphDef, nnx.State, nnx.State]:
    """The functional split of an adapted model for a train step:
    ``(graphdef, ref_graphdef, adapters, base)``.

    ``adapters`` (``nnx.LoRAParam``) is the trainable state, ``base`` everything else (frozen);
    ``nnx.merge(graphdef, adapters, base)`` is the policy and ``nnx.merge(ref_graphdef, adapters, base)`` the same
    weights with every adapter off (the reference: the base model exactly). ``model`` is not modified.

    >>> model = apply_lora(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), LoRAConfig(1, 1.0), rngs=nnx.Rngs(1))
    >>> graphdef, ref_graphdef, adapters, base = split_lora(model)
    >>> sorted(nnx.to_pure_dict(adapters)["lora"]), sorted(nnx.to_pure_dict(base))
    (['lora_a', 'lora_b'], ['bias', 'kernel'])
    """
    parts: tuple[Any, ...] = nnx.split(model, LORA_PARAMS, ...)  # nnx types it as a variadic tuple
    graphdef, adapters, base = parts
    ref_graphdef = nnx.split(set_lora_enabled(nnx.clone(model), False), LORA_PARAMS, ...)[0]
    return graphdef, ref_graphdef, adapters, base


def lora_param_count(model: nnx.Module) -> int:
    """Number of scalar adapter parameters."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, LORA_PARAMS))))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A plain copy of ``model`` with every adapter folded into its kernel: ``W + s * A B`` computed in float32
    and cast to ``W``'s dtype (sharded kernels stay sharded). ``model`` itself is not modified.

    The copy has no adapters (targeted ``nnx.Linear`` layers are ``nnx.Linear`` again), so its state matches the
    base model's exactly: e.g. ``save_pretrained(merge_lora(model), path)`` writes an HF directory. Adapters
    that are switched off are merged all the same (merging is about weights).
    """
    merged = nnx.clone(model)
    for site in lora_sites(merged):
        adapter = site.adapter
        if adapter is None:
            continue
        kernel = site.kernel
        w = kernel[...]
        a = adapter.lora_a[...]
        new = _merge_kernel(w, a, adapter.lora_b[...], eq=_merge_equation(adapter, a.ndim), scale=adapter.scale)
        sharding = getattr(w, "sharding", None)
        if sharding is not None and getattr(new, "sharding", None) != sharding:
            new = jax.device_put(new, sharding)
        kernel.set_value(new)  # replace, never write into the buffer (a NumPy kernel is shared with `model`)
        delattr(site.module, _adapter_attr(site.kernel_name))
        if type(site.module) is LoRALinear:
            object.__setattr__(site.module, "__class__", nnx.Linear)
    return merged


def lora_state_dict(model: nnx.Module) -> dict[str, Array]:
    """The adapters as a flat ``{'<site>.lora_a' / '<site>.lora_b': array}`` dict (site paths as in
    :func:`lora_sites`), e.g. for saving with safetensors; :func:`load_lora_state_dict` reads it back.

    Stacked sites are written per layer under their ``layer_paths`` (``'layers.3.self_attn.q_proj.lora_a'``), so
    the dict is the same for the stacked and the list layout of a decoder and loads into either."""
    out = {}
    for site in lora_sites(model):
        if not site.adapted:
            continue
        for name in ("lora_a", "lora_b"):
            value = getattr(site.adapter, name)[...]
            if site.layers is None:
                out[f"{site.path}.{name}"] = value
            else:
                for i, p in enumerate(site.layer_paths):
                    out[f"{p}.{name}"] = value[i]
    return out


def load_lora_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
    """Sets the adapters of an adapted ``model`` (in place) from :func:`lora_state_dict` output.

    Keys and shapes must match exactly (``ValueError`` listing the differences); values are cast to each
    adapter's dtype and placed like the current value (same sharding).
    """
    current = lora_state_dict(model)
    missing, unexpected = sorted(set(current) - set(state_dict)), sorted(set(state_dict) - set(current))
    if missing or unexpected:
        raise ValueError(f"LoRA state dict does not match the model's adapters: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    bad = [f"{k}: {tuple(np.shape(state_dict[k]))} vs {tuple(v.shape)}" for k, v in current.items()
           if tuple(np.shape(state_dict[k])) != tuple(v.shape)]
    if bad:
        raise ValueError(f"LoRA state dict has wrong shapes: {bad[:6]}")
    for site in lora_sites(model):
        if not site.adapted:
            continue
        for name in ("lora_a", "lora_b"):
            var = getattr(site.adapter, name)
            old = var[...]
            if site.layers is None:
                new = jnp.asarray(state_dict[f"{site.path}.{name}"], old.dtype)
            else:
                new = jnp.stack([jnp.asarray(state_dict[f"{p}.{name}"], old.dtype) for p in site.layer_paths])
            sharding = getattr(old, "sharding", None)
            var[...] = jax.device_put(new, sharding) if sharding is not None else new
    return model
