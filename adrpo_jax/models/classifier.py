"""A small multi-head CNN classifier of digit images (Flax NNX): the reward model and feature extractor.

Architecture: ``[B, H, W, C]`` images in ``[-1, 1]`` -> 3x3 conv (``channels[0]``) -> GELU -> for each further
entry of ``channels`` a stride-2 3x3 conv + GELU -> global mean-pool -> concatenated with the mean and the
std of the input image (explicit "ink" statistics, which make thickness easy to read) -> Linear(``features``)
-> GELU = the **penultimate features** ``[B, features]`` (used by the Frechet distance of
:mod:`adrpo_jax.flow.metrics`) -> one linear head per attribute (``digit``: 10 logits, ``thickness``: 2 logits).

Parameters use the project's logical axis names: convs ``(None, None, 'conv_in', 'conv_out')``, dense
``('embed', 'mlp')``-style; the model builds without a mesh.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> clf = DigitClassifier(ClassifierConfig(image_size=8, channels=(8, 16), features=16), rngs=nnx.Rngs(0))
  >>> logits, feats = clf(jnp.zeros((2, 8, 8, 1)), return_features=True)
  >>> {k: v.shape for k, v in logits.items()}, feats.shape
  ({'digit': (2, 10), 'thickness': (2, 2)}, (2, 16))
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from adrpo_jax.models.dit import host_initializer, read_saved_config, restore_nnx_params, save_nnx_params

__all__ = ["ClassifierConfig", "DigitClassifier", "save_classifier", "load_classifier"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Configuration of :class:`DigitClassifier` (JSON-serialisable).

    Attributes:
      image_size: side of the square input images.
      in_channels: image channels (1 for digits).
      channels: conv widths; the first conv keeps the resolution, each further one halves it (stride 2).
      features: width of the penultimate feature layer.
      heads: ``((name, num_classes), ...)`` output heads, default digit (10) and thickness (2).
      dtype: compute dtype (``"float32"`` or ``"bfloat16"``); logits and features are float32.
    """

    image_size: int = 8
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 64)
    features: int = 128
    heads: tuple[tuple[str, int], ...] = (("digit", 10), ("thickness", 2))
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "heads", tuple((str(n), int(k)) for n, k in self.heads))
        if self.image_size < 1 or self.in_channels < 1 or self.features < 1:
            raise ValueError(f"`image_size`, `in_channels` and `features` must be positive, got {self}.")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"`channels` must be a non-empty tuple of positive ints, got {self.channels}.")
        if not self.heads or any(k < 2 for _, k in self.heads):
            raise ValueError(f"`heads` must be non-empty ((name, num_classes >= 2), ...), got {self.heads}.")
        if len({n for n, _ in self.heads}) != len(self.heads):
            raise ValueError(f"`heads` names must be unique, got {self.heads}.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)}, got {self.dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["heads"] = [list(h) for h in self.heads]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassifierConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown ClassifierConfig keys {unknown}; valid keys are {sorted(names)}.")
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        if "heads" in d:
            d["heads"] = tuple(tuple(h) for h in d["heads"])
        return cls(**d)

    @property
    def head_sizes(self) -> dict[str, int]:
        return dict(self.heads)


class DigitClassifier(nnx.Module):
    """Multi-head CNN classifier (see the module docstring).

    ``__call__(x [B, H, W, C], *, return_features=False)`` returns ``{head: logits [B, K]}`` (float32), and
    with ``return_features=True`` the pair ``(logits, features [B, features])``.
    """

    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ClassifierConfig):
            raise ValueError(f"`config` must be a ClassifierConfig, got {type(config).__name__}.")
        self.config = config
        dtype = _DTYPES[config.dtype]
        self.dtype = dtype
        lecun, zeros = host_initializer("lecun_normal"), host_initializer("zeros")
        conv_init = nnx.with_partitioning(lecun, (None, None, "conv_in", "conv_out"))
        bias = nnx.with_partitioning(zeros, ("conv_out",))
        with nnx.use_eager_sharding(False):
            convs = []
            c_in = config.in_channels
            for i, c_out in enumerate(config.channels):
                convs.append(nnx.Conv(c_in, c_out, (3, 3), strides=1 if i == 0 else 2, padding="SAME",
                                      dtype=dtype, kernel_init=conv_init, bias_init=bias, rngs=rngs))
                c_in = c_out
            self.convs = nnx.List(convs)
            self.fc = nnx.Linear(c_in + 2, config.features, dtype=dtype,
                                 kernel_init=nnx.with_partitioning(lecun, ("embed", "mlp")),
                                 bias_init=nnx.with_partitioning(zeros, ("mlp",)),
                                 rngs=rngs)
            self.heads = nnx.Dict({
                name: nnx.Linear(config.features, k, dtype=dtype,
                                 kernel_init=nnx.with_partitioning(lecun, ("mlp", None)),
                                 bias_init=nnx.with_partitioning(zeros, (None,)),
                                 rngs=rngs)
                for name, k in config.heads})

    def features(self, x: jax.Array) -> jax.Array:
        """Penultimate features ``[B, features]`` (float32) of images ``[B, H, W, C]`` in ``[-1, 1]``."""
        cfg = self.config
        x = jnp.asarray(x)
        expected = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"`x` must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] (NHWC, "
                             f"from ClassifierConfig), got {tuple(x.shape)}.")
        x32 = x.astype(jnp.float32)
        stats = jnp.stack([jnp.mean(x32, axis=(1, 2, 3)), jnp.std(x32, axis=(1, 2, 3))], axis=-1)
        h = x.astype(self.dtype)
        for conv in self.convs:
            h = jax.nn.gelu(conv(h))
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        h = jnp.concatenate([h, stats], axis=-1)
        return jax.nn.gelu(self.fc(h.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, x: jax.Array, *, return_features: bool = False):
        feats = self.features(x)
        logits = {name: self.heads[name](feats.astype(self.dtype)).astype(jnp.float32)
                  for name, _ in self.config.heads}
        return (logits, feats) if return_features else logits


def save_classifier(model: DigitClassifier, directory: str | os.PathLike) -> str:
    """Save a :class:`DigitClassifier` (``config.json`` + ``params.safetensors``) into ``directory``."""
    return save_nnx_params(model, directory, model.config.to_dict(), kind="DigitClassifier")


def load_classifier(directory: str | os.PathLike) -> DigitClassifier:
    """Load a :class:`DigitClassifier` saved by :func:`save_classifier`."""
    config = ClassifierConfig.from_dict(read_saved_config(directory, "DigitClassifier"))
    return restore_nnx_params(DigitClassifier(config, rngs=nnx.Rngs(0)), directory)
