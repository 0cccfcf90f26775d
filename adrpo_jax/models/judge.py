"""An MLP classifier of digit images (Flax NNX): the *independent judge* of the flow experiments.

It differs from the reward classifier (:mod:`adrpo_jax.models.classifier`) in everything that can differ on the
same task, so that images which fool the reward classifier are unlikely to fool the judge in the same way:

* architecture: a plain MLP on the flattened pixels (no convolutions, no explicit mean/std "ink" inputs);
* data: trained on the *other* side of the digits split (:mod:`adrpo_jax.flow.judge`), never on the reward
  classifier's training images;
* initialization and training seed.

Architecture: ``[B, H, W, C]`` images in ``[-1, 1]`` -> flatten -> for each entry of ``hidden``: Linear + GELU
(the last one is the **feature layer** ``[B, hidden[-1]]``, used for a judge Frechet distance) -> one linear
head per attribute (``digit``: 10 logits, ``thickness``: 2 logits). Same call signature as
:class:`~adrpo_jax.models.classifier.DigitClassifier`.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> judge = JudgeMLP(JudgeConfig(image_size=8, hidden=(32, 16)), rngs=nnx.Rngs(0))
  >>> logits, feats = judge(jnp.zeros((2, 8, 8, 1)), return_features=True)
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

__all__ = ["JudgeConfig", "JudgeMLP", "save_judge", "load_judge"]

_KIND = "JudgeMLP"


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Configuration of :class:`JudgeMLP` (JSON-serialisable).

    Attributes:
      image_size: side of the square input images.
      in_channels: image channels (1 for digits).
      hidden: widths of the hidden layers; the last one is the feature width.
      heads: ``((name, num_classes), ...)`` output heads, default digit (10) and thickness (2).
    """

    image_size: int = 8
    in_channels: int = 1
    hidden: tuple[int, ...] = (128,)
    heads: tuple[tuple[str, int], ...] = (("digit", 10), ("thickness", 2))

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(c) for c in self.hidden))
        object.__setattr__(self, "heads", tuple((str(n), int(k)) for n, k in self.heads))
        if self.image_size < 1 or self.in_channels < 1:
            raise ValueError(f"`image_size` and `in_channels` must be positive, got {self}.")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"`hidden` must be a non-empty tuple of positive ints, got {self.hidden}.")
        if not self.heads or any(k < 2 for _, k in self.heads) or len({n for n, _ in self.heads}) != len(self.heads):
            raise ValueError(f"`heads` must be non-empty ((unique name, num_classes >= 2), ...), got {self.heads}.")

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "in_channels": self.in_channels, "hidden": list(self.hidden),
                "heads": [list(h) for h in self.heads]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JudgeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown JudgeConfig keys {unknown}; valid keys are {sorted(names)}.")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        if "heads" in d:
            d["heads"] = tuple(tuple(h) for h in d["heads"])
        return cls(**d)

    @property
    def head_sizes(self) -> dict[str, int]:
        return dict(self.heads)


class JudgeMLP(nnx.Module):
    """MLP judge (see the module docstring). ``__call__(x [B, H, W, C], *, return_features=False)`` returns
    ``{head: logits [B, K]}`` (float32), with ``return_features=True`` the pair ``(logits, features)``."""

    def __init__(self, config: JudgeConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, JudgeConfig):
            raise ValueError(f"`config` must be a JudgeConfig, got {type(config).__name__}.")
        self.config = config
        lecun, zeros = host_initializer("lecun_normal"), host_initializer("zeros")
        with nnx.use_eager_sharding(False):
            layers = []
            d_in = config.image_size * config.image_size * config.in_channels
            for width in config.hidden:
                layers.append(nnx.Linear(d_in, width, kernel_init=nnx.with_partitioning(lecun, ("embed", "mlp")),
                                         bias_init=nnx.with_partitioning(zeros, ("mlp",)), rngs=rngs))
                d_in = width
            self.layers = nnx.List(layers)
            self.heads = nnx.Dict({
                name: nnx.Linear(d_in, k, kernel_init=nnx.with_partitioning(lecun, ("mlp", None)),
                                 bias_init=nnx.with_partitioning(zeros, (None,)), rngs=rngs)
                for name, k in config.heads})

    def features(self, x: jax.Array) -> jax.Array:
        """Feature layer ``[B, hidden[-1]]`` (float32) of images ``[B, H, W, C]`` in ``[-1, 1]``."""
        cfg = self.config
        x = jnp.asarray(x)
        expected = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"`x` must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] (NHWC, "
                             f"from JudgeConfig), got {tuple(x.shape)}.")
        h = x.astype(jnp.float32).reshape(x.shape[0], -1)
        for layer in self.layers:
            h = jax.nn.gelu(layer(h))
        return h

    def __call__(self, x: jax.Array, *, return_features: bool = False):
        feats = self.features(x)
        logits = {name: self.heads[name](feats) for name, _ in self.config.heads}
        return (logits, feats) if return_features else logits


def save_judge(model: JudgeMLP, directory: str | os.PathLike) -> str:
    """Save a :class:`JudgeMLP` (``config.json`` + ``params.safetensors``) into ``directory``."""
    return save_nnx_params(model, directory, model.config.to_dict(), kind=_KIND)


def load_judge(directory: str | os.PathLike) -> JudgeMLP:
    """Load a :class:`JudgeMLP` saved by :func:`save_judge`."""
    config = JudgeConfig.from_dict(read_saved_config(directory, _KIND))
    return restore_nnx_params(JudgeMLP(config, rngs=nnx.Rngs(0)), directory)
