"""Trainer registry: maps ``config.trainer`` to a ``train_and_evaluate(config, workdir) -> dict`` function.

Built-in names are imported lazily (only the chosen trainer's module is imported)::

    'llm'   -> adrpo_jax.rl.trainer:train_and_evaluate     (GRPO / ADRPO for language models)
    'flow'  -> adrpo_jax.flow.trainer:train_and_evaluate   (ADRPO-W2 for flow-matching models)

Any other value must be a ``'package.module:function'`` path (used e.g. by the tests' toy trainer).

>>> validate_trainer_name("flow")
>>> validate_trainer_name("my_pkg.trainer:train_and_evaluate")
>>> validate_trainer_name("gan")
Traceback (most recent call last):
...
adrpo_jax.train.config.ConfigError: `trainer` must be one of ['flow', 'llm'] or a 'package.module:function' path, got 'gan'.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

__all__ = ["TRAINERS", "register_trainer", "validate_trainer_name", "resolve_trainer", "TrainerFn"]

TrainerFn = Callable[[Any, str], dict]

TRAINERS: dict[str, str] = {
    "llm": "adrpo_jax.rl.trainer:train_and_evaluate",
    "flow": "adrpo_jax.flow.trainer:train_and_evaluate",
}

_PATH_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def register_trainer(name: str, target: str) -> None:
    """Registers ``name`` -> ``'package.module:function'`` (overwrites an existing name)."""
    if not _PATH_RE.match(target):
        raise ValueError(f"`target` must be a 'package.module:function' path, got {target!r}.")
    TRAINERS[name] = target


def validate_trainer_name(name: Any) -> None:
    """ConfigError (key ``trainer``) unless ``name`` is a registered name or a well-formed dotted path."""
    from adrpo_jax.train.config import ConfigError

    if isinstance(name, str) and (name in TRAINERS or _PATH_RE.match(name)):
        return
    raise ConfigError(
        f"`trainer` must be one of {sorted(TRAINERS)} or a 'package.module:function' path, got {name!r}.",
        key="trainer", value=name)


def resolve_trainer(name: str) -> TrainerFn:
    """Imports and returns the trainer entry point for ``name``; ConfigError naming ``trainer`` on failure."""
    from adrpo_jax.train.config import ConfigError

    validate_trainer_name(name)
    target = TRAINERS.get(name, name)
    module_name, _, attr_path = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):  # the trainer module itself (or a parent) is missing
            raise ConfigError(f"`trainer`={name!r}: cannot import module {module_name!r} ({err}).", key="trainer",
                              value=name) from err
        raise  # a dependency of the trainer module is missing: show the real traceback
    fn: Any = module
    for attr in attr_path.split("."):
        if not hasattr(fn, attr):
            raise ConfigError(f"`trainer`={name!r}: module {module_name!r} has no attribute {attr_path!r}.",
                              key="trainer", value=name)
        fn = getattr(fn, attr)
    if not callable(fn):
        raise ConfigError(f"`trainer`={name!r}: {target!r} is not callable.", key="trainer", value=name)
    return fn
