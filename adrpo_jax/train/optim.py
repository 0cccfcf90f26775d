"""The one optimizer constructor the trainers use: :func:`make_optimizer` from ``config.optim``.

The transformation is ``clip_by_global_norm(grad_clip_norm)`` (when > 0) followed by the optimizer driven by
a learning-rate schedule: linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then
``constant``, ``cosine`` or ``linear`` decay to ``end_lr_factor * learning_rate`` at ``total_steps``. The
schedule counts *applied* updates (a skipped non-finite step does not advance it).

Weight decay is decoupled for ``adamw``, ``lion`` and ``adafactor`` and coupled (L2 added to the gradient,
as in ``torch.optim.Adam/SGD``) for ``adam`` and ``sgd``; by default it is applied only to parameters with
more than one dimension (not to biases and norm scales; ``weight_decay_1d=True`` decays them too).

>>> import jax.numpy as jnp, ml_collections
>>> from adrpo_jax.train.config import common_config
>>> cfg = common_config().optim
>>> cfg.learning_rate, cfg.warmup_steps, cfg.schedule = 1e-2, 10, "linear"
>>> tx, schedule = make_optimizer(cfg, total_steps=110)
>>> [round(float(schedule(s)), 6) for s in (0, 5, 10, 60, 110)]
[0.0, 0.005, 0.01, 0.005, 0.0]
>>> params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
>>> updates, state = tx.update({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, tx.init(params), params)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from adrpo_jax.train.config import (
    OPTIMIZERS,
    SCHEDULES,
    ConfigError,
    get_by_path,
    require_choice,
    require_range,
    require_type,
)

__all__ = ["make_optimizer", "make_schedule", "weight_decay_mask"]

_DEFAULTS = {
    "schedule": "constant",
    "warmup_steps": 0,
    "end_lr_factor": 0.0,
    "weight_decay": 0.0,
    "weight_decay_1d": False,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "momentum": 0.0,
    "grad_clip_norm": 0.0,
    "mu_dtype": "",
}
# optim.mu_dtype: the dtype of adam's / adamw's first moment ('' = the parameters' dtype; lion would
# return bfloat16 updates, so it keeps its moment in the parameters' dtype)
MU_DTYPES = {"": None, "float32": "float32", "bfloat16": "bfloat16"}


def _get(cfg: Any, key: str) -> Any:
    value = get_by_path(cfg, key, default=None)
    return _DEFAULTS[key] if value is None and key in _DEFAULTS else value


def weight_decay_mask(params: Any, *, include_1d: bool = False) -> Any:
    """Tree of bools over ``params``: True where weight decay applies (``ndim > 1``, or all if ``include_1d``)."""
    return jax.tree.map(lambda p: bool(include_1d or getattr(p, "ndim", 0) > 1), params)


def make_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule of ``optim_config`` (see module docstring); a function of the update count."""
    wrapped = {"optim": optim_config, "total_steps": total_steps}
    require_type(wrapped, "optim.learning_rate", float)
    lr = float(require_range(wrapped, "optim.learning_rate", min=0.0, min_inclusive=False))
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"`total_steps` must be a positive int, got {total_steps!r}.", key="total_steps",
                          value=total_steps)
    name = _get(optim_config, "schedule")
    if name not in SCHEDULES:
        raise ConfigError(f"`optim.schedule` must be one of {list(SCHEDULES)}, got {name!r}.",
                          key="optim.schedule", value=name)
    warmup = _get(optim_config, "warmup_steps")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= total_steps:
        raise ConfigError(f"`optim.warmup_steps` must be an int in [0, total_steps={total_steps}], got {warmup!r}.",
                          key="optim.warmup_steps", value=warmup)
    end_factor = float(_get(optim_config, "end_lr_factor"))
    if not 0.0 <= end_factor <= 1.0:
        raise ConfigError(f"`optim.end_lr_factor` must be in [0, 1], got {end_factor!r}.",
                          key="optim.end_lr_factor", value=end_factor)
    decay_steps = max(total_steps - warmup, 1)
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=decay_steps, alpha=end_factor)
    else:
        main = optax.linear_schedule(lr, lr * end_factor, transition_steps=decay_steps)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(optim_config: Any, total_steps: int,
                   *, mask: Callable[[Any], Any] | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds ``(tx, schedule)`` from ``config.optim``.

    Args:
      optim_config: ``config.optim`` (ConfigDict or mapping; keys in ``config.py``'s docstring; missing
        optional keys take their defaults).
      total_steps: ``config.total_steps`` (end of the decay).
      mask: optional override of the weight-decay mask: ``params -> tree of bools``.

    Returns:
      ``tx``: an ``optax.GradientTransformation`` (apply it with ``step_utils.apply_updates_if_finite``), and
      ``schedule``: ``update_count -> learning rate`` (for logging).

    Raises:
      ConfigError: naming ``optim.<key>`` for an unknown name/schedule or an out-of-range value.
    """
    wrapped = {"optim": optim_config}
    name = require_choice(wrapped, "optim.name", OPTIMIZERS)
    schedule = make_schedule(optim_config, total_steps)
    wd = float(_get(optim_config, "weight_decay"))
    if wd < 0:
        raise ConfigError(f"`optim.weight_decay` must be >= 0, got {wd!r}.", key="optim.weight_decay", value=wd)
    include_1d = bool(_get(optim_config, "weight_decay_1d"))
    decay_mask = mask if mask is not None else (lambda p: weight_decay_mask(p, include_1d=include_1d))
    b1, b2, eps = float(_get(optim_config, "b1")), float(_get(optim_config, "b2")), float(_get(optim_config, "eps"))
    for key, value in (("b1", b1), ("b2", b2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"`optim.{key}` must be in [0, 1), got {value!r}.", key=f"optim.{key}", value=value)
    if eps <= 0:
        raise ConfigError(f"`optim.eps` must be > 0, got {eps!r}.", key="optim.eps", value=eps)
    mu_key = str(_get(optim_config, "mu_dtype") or "")
    if mu_key not in MU_DTYPES:
        raise ConfigError(f"`optim.mu_dtype` must be one of {sorted(MU_DTYPES)}, got {mu_key!r}.", key="optim.mu_dtype",
                          value=mu_key)
    if mu_key and name not in ("adam", "adamw"):
        raise ConfigError(f"`optim.mu_dtype`={mu_key!r} applies to adam and adamw (got optim.name={name!r}); "
                          "use ''.", key="optim.mu_dtype", value=mu_key)
    mu_dtype = MU_DTYPES[mu_key]
    clip = float(_get(optim_config, "grad_clip_norm"))
    if clip < 0:
        raise ConfigError(f"`optim.grad_clip_norm` must be >= 0, got {clip!r}.", key="optim.grad_clip_norm",
                          value=clip)

    if name == "adamw":
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, weight_decay=wd, mask=decay_mask)
    elif name == "lion":
        opt = optax.lion(schedule, b1=b1, b2=b2, weight_decay=wd, mask=decay_mask)
    elif name == "adafactor":
        opt = optax.adafactor(learning_rate=schedule, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
    else:
        if name == "adam":
            opt = optax.adam(schedule, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
        else:
            momentum = float(_get(optim_config, "momentum"))
            if not 0.0 <= momentum < 1.0:
                raise ConfigError(f"`optim.momentum` must be in [0, 1), got {momentum!r}.", key="optim.momentum",
                                  value=momentum)
            opt = optax.sgd(schedule, momentum=momentum or None)
        if wd > 0:
            opt = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), opt)
    if clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(clip), opt)
    return opt, schedule
