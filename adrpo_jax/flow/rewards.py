"""Reward models of the flow-matching experiments: ``reward(images [B, H, W, C], cond [B]) -> [B] float32``.

A reward model is any callable with that signature (:class:`RewardModel` protocol) that is pure and
jittable: the built-in ones hold their parameters as arrays and call a ``jax.jit``-ed function of
``(params, images, cond)``, so they can be called eagerly (one compiled program) or inside another jitted
function (the inner jit is inlined). ``components(images, cond)`` returns the named parts for logging.

Built in:

* :class:`ClassifierReward` -- log-probability of the prompted attributes under the project's classifier
  (:class:`adrpo_jax.models.classifier.DigitClassifier`): ``log p(digit = d | x)`` for ``"digit"`` prompts,
  ``log p(digit = d | x) + w_thick * log p(thickness = k | x)`` for composite ``"digit_thickness"`` prompts
  (the attribute-binding reward).
* :class:`ImageStatReward` -- an image statistic (mean ink, contrast, ...) that a policy can "hack" (e.g. by
  filling the canvas with ink): useful to study reward hacking and the effect of the divergence regularizer.
* :class:`CombinedReward` -- a weighted sum of reward models.

Images are in ``[-1, 1]`` (ink = ``(x + 1) / 2`` in ``[0, 1]``). Rewards are float32 and never NaN for finite
images (log-probabilities come from ``log_softmax``).

Example:
  >>> import jax.numpy as jnp
  >>> ink = ImageStatReward("mean_ink")
  >>> ink(jnp.stack([-jnp.ones((8, 8, 1)), jnp.ones((8, 8, 1))]), jnp.array([0, 0]))
  Array([0., 1.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from adrpo_jax.flow.data import CONDITION_MODES, NUM_DIGITS
from adrpo_jax.models.classifier import DigitClassifier
from adrpo_jax.models.dit import concrete_value

__all__ = [
    "RewardModel",
    "ClassifierReward",
    "ImageStatReward",
    "CombinedReward",
    "IMAGE_STATS",
]


@runtime_checkable
class RewardModel(Protocol):
    """``reward(images [B, H, W, C] float, cond [B] int) -> [B] float32``, pure and jittable."""

    def __call__(self, images: jax.Array, cond: jax.Array) -> jax.Array:
        ...


def _check_batch(images: Any, cond: Any) -> tuple[jax.Array, jax.Array]:
    images = jnp.asarray(images)
    cond = jnp.asarray(cond)
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"`images` must be floating [B, H, W, C], got shape {images.shape} dtype {images.dtype}.")
    if cond.ndim < 1 or cond.shape[0] != images.shape[0]:
        raise ValueError(f"`cond` must have leading axis {images.shape[0]} (the batch of `images`), "
                         f"got shape {cond.shape}.")
    return images, cond


class ClassifierReward:
    """``r(x, c) = log p(digit(c) | x) [+ thickness_weight * log p(thickness(c) | x)]`` under a classifier.

    Args:
      classifier: a trained :class:`DigitClassifier` with a ``"digit"`` head (and ``"thickness"`` for
        composite prompts). Its parameters are copied out (``nnx.split``); later changes to the module are not
        seen.
      condition_mode: ``"digit"`` (cond = digit in ``[0, 10)``) or ``"digit_thickness"`` (cond = ``2 digit +
        thickness`` in ``[0, 20)``), see :mod:`adrpo_jax.flow.data`.
      thickness_weight: weight of the thickness log-probability in composite prompts.
      kind: ``"log_prob"`` (default, in ``(-inf, 0]``) or ``"prob"`` (``exp`` of the log-probability sum, in
        ``[0, 1]``: a bounded alternative).

    ``components`` returns ``log_p_digit``, ``log_p_thickness`` (composite mode), ``digit_correct`` and
    ``thickness_correct`` (argmax matches the prompt; float 0/1).
    """

    def __init__(self, classifier: DigitClassifier, condition_mode: Literal["digit", "digit_thickness"] = "digit",
                 *, thickness_weight: float = 1.0, kind: Literal["log_prob", "prob"] = "log_prob"):
        if not isinstance(classifier, DigitClassifier):
            raise ValueError(f"`classifier` must be a DigitClassifier, got {type(classifier).__name__}.")
        if condition_mode not in CONDITION_MODES:
            raise ValueError(f"`condition_mode` must be one of {CONDITION_MODES}, got {condition_mode!r}.")
        heads = classifier.config.head_sizes
        if heads.get("digit") != NUM_DIGITS:
            raise ValueError(f"`classifier` needs a 'digit' head with {NUM_DIGITS} classes, has heads {heads}.")
        if condition_mode == "digit_thickness" and heads.get("thickness") != 2:
            raise ValueError(f"condition_mode='digit_thickness' needs a 'thickness' head with 2 classes; "
                             f"`classifier` has heads {heads}.")
        if kind not in ("log_prob", "prob"):
            raise ValueError(f"`kind` must be 'log_prob' or 'prob', got {kind!r}.")
        self.condition_mode = condition_mode
        self.thickness_weight = float(thickness_weight)
        self.kind = kind
        self.graphdef, self.params = nnx.split(classifier)
        self._components = jax.jit(self._components_fn)

    @property
    def num_conditions(self) -> int:
        return NUM_DIGITS if self.condition_mode == "digit" else 2 * NUM_DIGITS

    def _components_fn(self, params, images, cond):
        model = nnx.merge(self.graphdef, params)
        logits = model(images)
        cond = cond.astype(jnp.int32)
        digit = cond if self.condition_mode == "digit" else cond // 2
        log_p_digit = jax.nn.log_softmax(logits["digit"], axis=-1)
        out = {
            "log_p_digit": jnp.take_along_axis(log_p_digit, digit[:, None], axis=-1)[:, 0],
            "digit_correct": (jnp.argmax(logits["digit"], axis=-1) == digit).astype(jnp.float32),
        }
        total = out["log_p_digit"]
        if self.condition_mode == "digit_thickness":
            thick = cond % 2
            log_p_thick = jax.nn.log_softmax(logits["thickness"], axis=-1)
            out["log_p_thickness"] = jnp.take_along_axis(log_p_thick, thick[:, None], axis=-1)[:, 0]
            out["thickness_correct"] = (jnp.argmax(logits["thickness"], axis=-1) == thick).astype(jnp.float32)
            total = total + self.thickness_weight * out["log_p_thickness"]
        out["reward"] = total if self.kind == "log_prob" else jnp.exp(total)
        return out

    def components(self, images: jax.Array, cond: jax.Array) -> dict[str, jax.Array]:
        """All named parts ``{name: [B] float32}`` including ``"reward"``."""
        images, cond = _check_batch(images, cond)
        if cond.ndim != 1 or not jnp.issubdtype(cond.dtype, jnp.integer):
            raise ValueError(f"`cond` must be [B] integer condition ids, got shape {cond.shape} dtype {cond.dtype}.")
        values = concrete_value(cond)
        if values is not None and values.size:
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= self.num_conditions:
                raise ValueError(f"`cond` must be in [0, {self.num_conditions}) for condition_mode="
                                 f"{self.condition_mode!r}, got values in [{lo}, {hi}].")
        return self._components(self.params, images, cond)

    def __call__(self, images: jax.Array, cond: jax.Array) -> jax.Array:
        return self.components(images, cond)["reward"]


def _ink(images: jax.Array) -> jax.Array:
    return (images.astype(jnp.float32) + 1.0) * 0.5


IMAGE_STATS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # mean ink in [0, 1]: rewards bold / filled images (the classic hackable reward)
    "mean_ink": lambda x: jnp.mean(_ink(x), axis=(1, 2, 3)),
    # negative mean ink: rewards faint images
    "neg_mean_ink": lambda x: -jnp.mean(_ink(x), axis=(1, 2, 3)),
    # pixel standard deviation: rewards high contrast
    "contrast": lambda x: jnp.std(_ink(x), axis=(1, 2, 3)),
    # mean absolute difference of neighbouring pixels: rewards sharp edges / high-frequency texture
    "sharpness": lambda x: 0.5 * (jnp.mean(jnp.abs(jnp.diff(_ink(x), axis=1)), axis=(1, 2, 3))
                                  + jnp.mean(jnp.abs(jnp.diff(_ink(x), axis=2)), axis=(1, 2, 3))),
}


class ImageStatReward:
    """A condition-independent image statistic as reward (see :data:`IMAGE_STATS`), optionally as the
    negative squared distance to a target value: ``r = -(stat(x) - target)^2`` when ``target`` is set.

    Args:
      stat: a key of :data:`IMAGE_STATS` (``"mean_ink"``, ``"neg_mean_ink"``, ``"contrast"``, ``"sharpness"``)
        or a callable ``images [B, H, W, C] -> [B]``.
      target: optional target value of the statistic.
      scale: multiplies the reward.
    """

    def __init__(self, stat: str | Callable[[jax.Array], jax.Array] = "mean_ink", *, target: float | None = None,
                 scale: float = 1.0):
        if isinstance(stat, str):
            if stat not in IMAGE_STATS:
                raise ValueError(f"`stat` must be one of {sorted(IMAGE_STATS)} or a callable, got {stat!r}.")
            self.name, self._stat = stat, IMAGE_STATS[stat]
        elif callable(stat):
            self.name, self._stat = getattr(stat, "__name__", "custom"), stat
        else:
            raise ValueError(f"`stat` must be a name or a callable, got {type(stat).__name__}.")
        self.target = None if target is None else float(target)
        self.scale = float(scale)
        self._fn = jax.jit(self._components_fn)

    def _components_fn(self, images):
        value = self._stat(images).astype(jnp.float32)
        reward = value if self.target is None else -jnp.square(value - self.target)
        return {self.name: value, "reward": self.scale * reward}

    def components(self, images: jax.Array, cond: jax.Array) -> dict[str, jax.Array]:
        images, _ = _check_batch(images, cond)
        return self._fn(images)

    def __call__(self, images: jax.Array, cond: jax.Array) -> jax.Array:
        return self.components(images, cond)["reward"]


class CombinedReward:
    """Weighted sum ``r = sum_k w_k r_k(x, c)`` of reward models.

    Args:
      rewards: ``{name: reward_model}`` or a sequence of ``(name, reward_model)``.
      weights: ``{name: weight}`` (default 1 for every model).

    ``components`` returns each model's reward as ``"<name>"``, its other components as ``"<name>/<part>"``
    (when the model has ``components``), and the total as ``"reward"``.
    """

    def __init__(self, rewards: dict[str, RewardModel] | Sequence[tuple[str, RewardModel]],
                 weights: dict[str, float] | None = None):
        items = list(rewards.items()) if isinstance(rewards, dict) else list(rewards)
        if not items:
            raise ValueError("`rewards` must not be empty.")
        names = [n for n, _ in items]
        if len(set(names)) != len(names) or "reward" in names:
            raise ValueError(f"`rewards` names must be unique and not 'reward', got {names}.")
        for name, model in items:
            if not callable(model):
                raise ValueError(f"`rewards[{name!r}]` is not callable.")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"`weights` has names {unknown} that are not in `rewards` {names}.")
        self.items = items
        self.weights = {n: float(weights.get(n, 1.0)) for n in names}

    def components(self, images: jax.Array, cond: jax.Array) -> dict[str, jax.Array]:
        images, cond = _check_batch(images, cond)
        out: dict[str, jax.Array] = {}
        total = jnp.zeros((images.shape[0],), jnp.float32)
        for name, model in self.items:
            if hasattr(model, "components"):
                parts = model.components(images, cond)
                r = parts["reward"]
                out.update({f"{name}/{k}": v for k, v in parts.items() if k != "reward"})
            else:
                r = model(images, cond)
            r = jnp.asarray(r, jnp.float32)
            if r.shape != (images.shape[0],):
                raise ValueError(f"reward model {name!r} returned shape {r.shape}, expected ({images.shape[0]},).")
            out[name] = r
            total = total + self.weights[name] * r
        out["reward"] = total
        return out

    def __call__(self, images: jax.Array, cond: jax.Array) -> jax.Array:
        return self.components(images, cond)["reward"]
