"""Common config sections shared by every trainer, and config validation.

An experiment config (``configs/<name>.py``) builds its own sections (model, data, ADRPO coefficients) on
top of the common ones::

    def get_config(variant=""):
        config = add_common_config(ml_collections.ConfigDict())
        config.trainer = "llm"
        config.rl = ml_collections.ConfigDict({"batch_size": 64, "group_size": 8})
        return config

``launch.py`` validates the common sections with :func:`validate_common_config`, locks the config and hands
it to the trainer, which validates its own sections with the ``require_*`` helpers. Every failure raises
:class:`ConfigError` (a ``ValueError``) naming the dotted key and the bad value.

Common keys (defaults in :func:`common_config`; "unset" sentinels are ``''`` / ``-1`` so that every key keeps a
fixed type and can be overridden from the command line):

==============================  ===============================================================================
key                             meaning
==============================  ===============================================================================
``trainer``                     ``'llm'`` | ``'flow'`` | ``'some.module:function'`` (see ``registry.py``)
``seed``                        master seed: parameter init, sampling and data order derive from it
``total_steps``                 number of optimizer steps of the run; re-running with a larger value resumes
``log_every``                   write a metrics line every N steps (values are means over those N steps)
``eval_every``                  run the trainer's evaluation every N steps and at the end (0 = never)
``checkpoint.every_steps``      save a checkpoint every N steps (and always at the end / on preemption)
``checkpoint.max_to_keep``      keep the N most recent checkpoints (0 = keep all)
``checkpoint.keep_period``      additionally keep every checkpoint whose step is a multiple of N (0 = off)
``checkpoint.async_save``       write checkpoints in a background thread (the device->host copy is blocking)
``mesh.data``                   size of the pure data-parallel mesh axis (-1 = all remaining devices)
``mesh.fsdp``                   size of the fully-sharded data-parallel axis (params sharded on ``'embed'``)
``mesh.tensor``                 size of the tensor-parallel axis (``'mlp'``, ``'heads'``, ``'vocab'``)
``mesh.expert``                 size of the expert-parallel axis (MoE expert kernels' ``'expert'``; also a batch axis)
``mesh.rollout_devices``        N > 0 (``trainer='llm'`` with ``rl.max_lag >= 1``): the first N devices sample the
                                rollouts on their own mesh, the others (``mesh.data/fsdp/...``) train; 0 = one mesh
``mesh.rollout_tensor``         tensor-parallel size of that rollout mesh (divides N; its data axis is N / it)
``plan.target``                 ``--mode=plan``: a TPU topology (``v5e:2x4``, ``v5p:2x2x2``, ``v6e:2x4``, ...) or
                                ``cpu:N`` / ``cpu:N@h100``: every program compiled for it, no weights
``plan.check``                  on a TPU / GPU, plan the run on its own devices at start, before loading weights
``plan.margin``                 a program fits when its peak is below (1 - margin) of the chip's HBM
``plan.output``                 where the plan's JSON goes ('' = ``workdir/plan.json``)
``optim.name``                  ``adamw`` | ``adam`` | ``sgd`` | ``lion`` | ``adafactor``
``optim.learning_rate``         peak learning rate (after warm-up)
``optim.schedule``              ``constant`` | ``cosine`` | ``linear`` decay after the warm-up
``optim.warmup_steps``          linear warm-up from 0 to the peak over this many steps
``optim.end_lr_factor``         final learning rate = factor * peak (cosine / linear)
``optim.weight_decay``          decoupled (adamw, lion, adafactor) or L2 (adam, sgd: added to the gradient)
``optim.weight_decay_1d``       also decay 1-D parameters (biases, norm scales); off by default
``optim.b1`` / ``optim.b2``     first / second moment decay (adam-family, lion)
``optim.eps``                   numerical epsilon of adam-family optimizers
``optim.mu_dtype``              first-moment dtype of adam / adamw: ``''`` (the parameters'), ``float32``,
                                ``bfloat16`` (half the moment's memory; the second moment stays float32)
``optim.momentum``              SGD momentum (0 = plain SGD)
``optim.grad_clip_norm``        clip the gradient to this global norm before the optimizer (0 = off)
``optim.grad_accum_steps``      micro-batches per step (see ``step_utils.accumulate_gradients``)
``numerics.max_consecutive_skips``  stop (after saving a checkpoint) after N consecutive non-finite steps
``logging.jsonl``               append one JSON object per logged step to ``workdir/metrics.jsonl``
``logging.tensorboard``         TensorBoard event files under ``workdir/tb`` (needs tensorboardX)
``logging.wandb``               log to Weights & Biases when ``wandb`` is importable (warning otherwise)
``logging.wandb_project``       W&B project name
``logging.wandb_entity``        W&B entity ('' = your default entity)
``logging.progress_bar``        tqdm progress bar on stderr (plain log lines when not a TTY or ``CI=true``)
``logging.console_keys``        the metrics of the per-record console line, comma-separated ('default' = reward,
                                KL / W2, beta_eff, eval accuracy / reward / diversity, tokens/s or images/s,
                                step time, the per-phase times; 'all' = every key); the files get every metric
``logging.phase_timing``        block on the device at each phase boundary of a step, so that ``time/<phase>``
                                is each phase's full wall time (costs the host/device overlap); off: phases
                                are timed at the points where the host waits anyway (see the trainers)
``compilation_cache_dir``       persistent XLA compilation cache directory ('' = off)
``import_path``                 directories (``os.pathsep``-separated) appended to ``sys.path`` before a run, so that
                                ``'module:function'`` reward functions and trainers import without ``PYTHONPATH``;
                                ``launch.py`` adds the config file's directory and the current directory
``distributed.mode``            ``auto`` (initialize when the environment shows a multi-process launch) |
                                ``on`` | ``off``; see ``distributed.py`` and docs/distributed.md
``distributed.coordinator_address``  ``host:port`` of process 0 ('' = from the environment / auto-detect)
``distributed.num_processes``   number of processes (-1 = from the environment / auto-detect)
``distributed.process_id``      this process's index (-1 = from the environment / auto-detect)
``distributed.heartbeat_timeout_s``  a lost process (killed, host down) is reported within about this many
                                seconds: one line naming it, the last checkpoint step and the command to
                                resume, exit code 75 (``distributed.PeerWatchdog``)
==============================  ===============================================================================

>>> config = common_config()
>>> config.optim.name, config.mesh.data
('adamw', -1)
>>> config.optim.learning_rate = -1.0
>>> validate_common_config(config)
Traceback (most recent call last):
...
adrpo_jax.train.config.ConfigError: `optim.learning_rate` must be > 0.0, got -1.0.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

__all__ = [
    "ConfigError",
    "common_config",
    "add_common_config",
    "validate_common_config",
    "finalize_config",
    "get_by_path",
    "require_type",
    "merge_defaults",
    "require_range",
    "require_int",
    "require_float",
    "require_float_or_inf",
    "validate_advantage_clip",
    "validate_lora_section",
    "validate_ref_refresh",
    "require_sections",
    "require_choice",
    "require_divisible",
    "find_unknown_override",
    "suggest_keys",
    "TRL_ALIASES",
    "apply_override_followers",
    "config_from_dict",
    "config_to_dict",
    "config_diff",
    "config_fingerprint",
    "RUNTIME_KEY_PREFIXES",
    "OPTIMIZERS",
    "SCHEDULES",
    "DISTRIBUTED_MODES",
    "DEFAULT_CONSOLE_KEYS",
    "parse_console_keys",
    "shapes_only",
    "checking_files",
]

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")
SCHEDULES = ("constant", "cosine", "linear")
DISTRIBUTED_MODES = ("auto", "on", "off")

# Keys that only change how a run is executed / logged, never the model, data or optimization: they are left
# out of the config fingerprint and of the "config changed since the previous run" warning.
RUNTIME_KEY_PREFIXES = (
    "total_steps",
    "log_every",
    "eval_every",
    "checkpoint.",
    "logging.",
    "compilation_cache_dir",
    "import_path",
    "distributed.",
    "mesh.",
)


# What a user watches first (``logging.console_keys``; keys a trainer does not log are skipped): the reward, the
# KL (LLM) / W2 (flow) and the adaptive coefficient, the eval numbers, the speed, and where the step's time goes.
DEFAULT_CONSOLE_KEYS = ("reward_mean", "kl_mean", "w2_mean", "beta_eff_mean", "eval/accuracy", "eval/reward_mean",
                        "eval/diversity", "tokens_per_sec", "images_per_sec", "step_time_s", "time/rollout",
                        "time/sample", "time/reward", "time/logprobs", "time/update", "time/eval",
                        "time/checkpoint")

_CONSOLE_KEY_RE = re.compile(r"^[A-Za-z0-9_./-]+$")


def parse_console_keys(value: Any) -> tuple[str, ...] | None:
    """``logging.console_keys`` as a tuple of record keys: a comma-separated string (or a sequence of strings);
    ``'default'`` / None = :data:`DEFAULT_CONSOLE_KEYS`; ``'all'`` = None (every key of the record).

    >>> parse_console_keys("reward_mean, step_time_s")
    ('reward_mean', 'step_time_s')
    """
    if value is None or (isinstance(value, str) and value.strip() == "default"):
        return DEFAULT_CONSOLE_KEYS
    if isinstance(value, str) and value.strip() == "all":
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    keys = tuple(str(k).strip() for k in items if str(k).strip())
    bad = [k for k in keys if not _CONSOLE_KEY_RE.match(k)]
    if bad or not keys:
        raise ValueError(f"`logging.console_keys`={value!r}: expected 'default', 'all' or comma-separated metric "
                         f"names (letters, digits, _ . / -){'; bad: ' + str(bad) if bad else ''}.")
    return keys


class ConfigError(ValueError):
    """A config value is missing, has the wrong type, is out of range or contradicts another key.

    ``key`` is the dotted config key (e.g. ``'optim.learning_rate'``) and ``value`` the offending value.
    """

    def __init__(self, message: str, *, key: str | None = None, value: Any = None):
        super().__init__(message)
        self.key = key
        self.value = value


# ----------------------------------------------------------------------------------------------------------
# Common sections
# ----------------------------------------------------------------------------------------------------------


def common_config() -> ml_collections.ConfigDict:
    """Returns a fresh ConfigDict holding only the common sections, with their defaults."""
    return add_common_config(ml_collections.ConfigDict())


def add_common_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the common sections (see the module docstring) to ``config`` in place and returns it.

    Keys already present in ``config`` are kept (so an experiment may set them before or after the call).
    """
    defaults = {
        "trainer": "llm",
        "seed": 0,
        "total_steps": 1000,
        "log_every": 10,
        "eval_every": 0,
        "checkpoint": {"every_steps": 100, "max_to_keep": 3, "keep_period": 0, "async_save": True},
        "mesh": {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1, "rollout_devices": 0, "rollout_tensor": 1},
        "optim": {
            "name": "adamw",
            "learning_rate": 1e-4,
            "schedule": "cosine",
            "warmup_steps": 0,
            "end_lr_factor": 0.0,
            "weight_decay": 0.0,
            "weight_decay_1d": False,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "mu_dtype": "",
            "momentum": 0.0,
            "grad_clip_norm": 1.0,
            "grad_accum_steps": 1,
        },
        "numerics": {"max_consecutive_skips": 10},
        "logging": {
            "jsonl": True,
            "tensorboard": True,
            "wandb": False,
            "wandb_project": "adrpo_jax",
            "wandb_entity": "",
            "progress_bar": True,
            "console_keys": "default",
            "phase_timing": False,
        },
        "compilation_cache_dir": "",
        "import_path": "",  # extra import directories (launch.py: the config file's and the current directory)
        "distributed": {"mode": "auto", "coordinator_address": "", "num_processes": -1, "process_id": -1,
                        "heartbeat_timeout_s": 60},
        "plan": {"target": "", "check": True, "margin": 0.1, "output": ""},
    }
    merge_defaults(config, defaults)
    return config


_SHAPES_ONLY = contextvars.ContextVar("adrpo_jax_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
    """Within it, validation checks shapes and values but not that model / data files exist (the plan mode builds
    recipes from ``config.json`` files or presets only)."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def checking_files() -> bool:
    """False inside :func:`shapes_only` (validators skip their file-existence checks)."""
    return not _SHAPES_ONLY.get()


def merge_defaults(config: ml_collections.ConfigDict, defaults: Mapping[str, Any]) -> None:
    """Adds the keys of the nested mapping ``defaults`` that ``config`` lacks (existing values are kept)."""
    for key, value in defaults.items():
        if isinstance(value, Mapping):
            if key not in config:
                config[key] = ml_collections.ConfigDict()
            merge_defaults(config[key], value)
        elif key not in config:
            config[key] = value


# ----------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------

_MISSING = object()


def get_by_path(config: Any, key: str, default: Any = _MISSING) -> Any:
    """Returns ``config[a][b]...`` for the dotted ``key`` ``'a.b...'``; ConfigError if a part is missing.

    >>> get_by_path(common_config(), "optim.name")
    'adamw'
    """
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, (Mapping, ml_collections.ConfigDict)) and part in node:
            node = node[part]
            continue
        if default is not _MISSING:
            return default
        parent = ".".join(parts[:i]) or "<root>"
        raise ConfigError(f"Config key `{key}` is missing (no `{part}` in `{parent}`).", key=key)
    return node


def require_type(config: Any, key: str, types: type | tuple[type, ...]) -> Any:
    """Returns ``config.<key>``; ConfigError unless it is an instance of ``types``.

    ``bool`` is never accepted where ``int``/``float`` is asked for, and ``int`` is accepted for ``float``.
    """
    value = get_by_path(config, key)
    wanted = types if isinstance(types, tuple) else (types,)
    names = " or ".join(t.__name__ for t in wanted)
    if float in wanted:
        wanted = wanted + (int,)
    ok = isinstance(value, wanted)
    if isinstance(value, bool) and bool not in wanted:
        ok = False
    if not ok:
        raise ConfigError(
            f"`{key}` must be of type {names}, got {value!r} ({type(value).__name__}).",
            key=key, value=value)
    return value


def require_range(config: Any, key: str, *, min: float | None = None, max: float | None = None,
                  min_inclusive: bool = True, max_inclusive: bool = True,
                  allow: Iterable[Any] = ()) -> Any:  # pylint: disable=redefined-builtin
    """Returns ``config.<key>``; ConfigError unless it is a real number within [min, max].

    Values in ``allow`` (sentinels such as ``-1`` = "fill") are accepted as they are.
    """
    value = get_by_path(config, key)
    if value in tuple(allow) and not isinstance(value, bool):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"`{key}` must be a number, got {value!r} ({type(value).__name__}).", key=key,
                          value=value)
    extra = f" (or one of {sorted(allow)})" if allow else ""
    if value != value:  # NaN
        raise ConfigError(f"`{key}` must be a finite number, got {value!r}.", key=key, value=value)
    number = float(value)  # a Real: compared as a float (mypy cannot order Real against float)
    if min is not None and (number < min or (not min_inclusive and number == min)):
        op = ">=" if min_inclusive else ">"
        raise ConfigError(f"`{key}` must be {op} {min}{extra}, got {value!r}.", key=key, value=value)
    if max is not None and (number > max or (not max_inclusive and number == max)):
        op = "<=" if max_inclusive else "<"
        raise ConfigError(f"`{key}` must be {op} {max}{extra}, got {value!r}.", key=key, value=value)
    return value


def require_int(config: Any, key: str, *, min: int | None = None, max: int | None = None,  # pylint: disable=redefined-builtin
                allow: Iterable[int] = ()) -> int:
    """Returns ``config.<key>``; ConfigError unless it is an ``int`` within [min, max] (or one of ``allow``)."""
    require_type(config, key, int)
    return int(require_range(config, key, min=min, max=max, allow=allow))


def require_float(config: Any, key: str, *, min: float | None = None, max: float | None = None,  # pylint: disable=redefined-builtin
                  min_inclusive: bool = True, max_inclusive: bool = True) -> float:
    """Returns ``config.<key>`` as a float; ConfigError unless it is a finite number within the bounds."""
    require_type(config, key, float)
    value = float(require_range(config, key, min=min, max=max, min_inclusive=min_inclusive,
                                max_inclusive=max_inclusive))
    if math.isinf(value):
        raise ConfigError(f"`{key}` must be finite, got {value!r}.", key=key, value=value)
    return value


def require_float_or_inf(config: Any, key: str) -> float:
    """Returns ``config.<key>`` as a float; +-inf allowed (e.g. an open bound), NaN refused."""
    value = require_type(config, key, float)
    if value != value:  # NaN
        raise ConfigError(f"`{key}` must be a number or +-inf, got {value!r}.", key=key, value=value)
    return float(value)


def validate_advantage_clip(config: Any, prefix: str = "rl") -> str:
    """Checks ``<prefix>.adv_clip`` (``multiple`` | ``absolute`` | ``none``), ``adv_clip_multiple`` and the
    ``adv_clip_min`` / ``adv_clip_max`` bounds of ADRPO's coefficient ``beta_0 - clip(A)``; returns the mode."""
    clip = require_choice(config, f"{prefix}.adv_clip", ("multiple", "absolute", "none"))
    require_float(config, f"{prefix}.adv_clip_multiple", min=0.0, min_inclusive=False)
    kmin, kmax = f"{prefix}.adv_clip_min", f"{prefix}.adv_clip_max"
    lo, hi = require_float_or_inf(config, kmin), require_float_or_inf(config, kmax)
    if clip == "absolute":
        if math.isinf(lo) and math.isinf(hi):
            raise ConfigError(f"{prefix}.adv_clip='absolute' needs a finite `{kmin}` and/or `{kmax}` "
                              f"(use {prefix}.adv_clip='none' for no clipping).", key=kmin, value=lo)
        if lo > hi:
            raise ConfigError(f"`{kmin}`={lo} must be <= `{kmax}`={hi}.", key=kmin, value=lo)
    elif not (lo == -math.inf and hi == math.inf):
        raise ConfigError(f"`{kmin}`/`{kmax}` only apply to {prefix}.adv_clip='absolute' (got "
                          f"{prefix}.adv_clip={clip!r}, min={lo}, max={hi}).", key=kmin, value=lo)
    return clip


def validate_lora_section(config: Any, what: str = "module") -> dict[str, Any] | None:
    """Checks the ``lora.*`` keys that every trainer shares (``enabled``, ``rank``, ``alpha``, ``dropout``,
    ``target_modules``, ``init``, ``use_rslora``); returns their values as ``LoRAConfig`` keyword arguments when
    ``lora.enabled`` is on, else None (also when the config has no ``lora`` section). Errors name the key; ``what``
    names the sites in the ``target_modules`` message (e.g. "DiT site"). The remaining checks (init name, regex
    syntax) are ``LoRAConfig``'s own: :func:`adrpo_jax.recipe.policy.lora_config` builds it."""
    if "lora" not in config:
        return None
    enabled = require_type(config, "lora.enabled", bool)
    require_int(config, "lora.rank", min=1)
    require_float(config, "lora.alpha", min=0.0, min_inclusive=False)
    require_float(config, "lora.dropout", min=0.0, max=1.0, max_inclusive=False)
    targets = get_by_path(config, "lora.target_modules")
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, (tuple, list)) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"`lora.target_modules` must be a non-empty tuple of {what} names / regexes (or "
                          f"('all-linear',)), got {targets!r}.", key="lora.target_modules", value=targets)
    require_type(config, "lora.use_rslora", bool)
    lc = config.lora
    if not enabled:
        return None
    return {"rank": int(lc.rank), "alpha": float(lc.alpha), "dropout": float(lc.dropout),
            "target_modules": tuple(targets), "init": lc.init, "use_rslora": bool(lc.use_rslora)}


def validate_ref_refresh(config: Any, steps_key: str, alpha_key: str, *, lora: bool = False) -> int:
    """Checks a reference refreshed every ``steps_key`` steps (0 = frozen) to ref = alpha * policy + (1 - alpha) * ref
    (``alpha_key`` in (0, 1]: alpha != 1 needs refreshes, and ``lora`` refuses it); returns the steps."""
    sync = require_int(config, steps_key, min=0)
    alpha = require_float(config, alpha_key, min=0.0, max=1.0, min_inclusive=False)
    if sync == 0 and alpha != 1.0:
        raise ConfigError(f"`{alpha_key}`={alpha} has no effect with `{steps_key}`=0 (the reference is never "
                          "refreshed).", key=alpha_key, value=alpha)
    if lora and sync > 0 and alpha != 1.0:
        raise ConfigError(f"`{alpha_key}`={alpha} cannot be used with LoRA: the refreshed reference is base + a copy "
                          "of the adapters, and mixing the factors A and B does not mix the weights W + s A B. Use "
                          f"{alpha_key}=1.0 (copy) or lora.enabled=False.", key=alpha_key, value=alpha)
    return sync


def require_sections(config: Any, sections: Iterable[str], builder: str) -> None:
    """ConfigError naming the first of ``sections`` that ``config`` lacks (``builder`` adds them)."""
    for section in sections:
        if section not in config:
            raise ConfigError(f"Config section `{section}` is missing (build the config with {builder}).", key=section)


def require_choice(config: Any, key: str, choices: Sequence[Any]) -> Any:
    """Returns ``config.<key>``; ConfigError unless it is one of ``choices``."""
    value = get_by_path(config, key)
    if value not in tuple(choices):
        raise ConfigError(f"`{key}` must be one of {list(choices)}, got {value!r}.", key=key, value=value)
    return value


def require_divisible(config: Any, key: str, divisor: str | int, *, what: str | None = None) -> None:
    """ConfigError unless the integer ``config.<key>`` is divisible by ``divisor``.

    ``divisor`` is another dotted key (``require_divisible(c, 'rl.batch_size', 'rl.group_size')``) or a
    number computed at run time (then ``what`` describes it, e.g. ``'the data-parallel size 8'``).

    >>> c = ml_collections.ConfigDict({"rl": {"batch_size": 10, "group_size": 4}})
    >>> require_divisible(c, "rl.batch_size", "rl.group_size")
    Traceback (most recent call last):
    ...
    adrpo_jax.train.config.ConfigError: `rl.batch_size`=10 must be divisible by `rl.group_size`=4.
    """
    value = require_type(config, key, int)
    if isinstance(divisor, str):
        div = require_type(config, divisor, int)
        desc = f"`{divisor}`={div}"
    else:
        div = int(divisor)
        desc = what or str(div)
    if div <= 0:
        raise ConfigError(f"`{key}`: divisor {desc} must be positive.", key=key, value=value)
    if value % div:
        raise ConfigError(f"`{key}`={value} must be divisible by {desc}.", key=key, value=value)


def validate_common_config(config: Any) -> None:
    """Checks types, ranges and consistency of every common key; raises :class:`ConfigError`.

    Device-dependent checks (the mesh product equals the device count) happen in ``sharding.make_mesh``.
    """
    require_type(config, "trainer", str)  # which recipe: resolved (and checked) by the runner
    for key, low in (("seed", 0), ("total_steps", 1), ("log_every", 1), ("eval_every", 0),
                     ("checkpoint.every_steps", 1), ("checkpoint.max_to_keep", 0), ("checkpoint.keep_period", 0)):
        require_int(config, key, min=low)
    require_type(config, "checkpoint.async_save", bool)

    fills = []
    for axis in ("data", "fsdp", "expert", "tensor"):
        size = require_int(config, f"mesh.{axis}", min=1, allow=(-1,))
        if size == -1:
            fills.append(f"mesh.{axis}")
    if len(fills) > 1:
        raise ConfigError(f"At most one mesh axis may be -1 (fill), got {fills}.", key=fills[1], value=-1)
    if "rollout_devices" in get_by_path(config, "mesh"):  # disaggregated rollout mesh (adrpo_jax.recipe.schedule)
        rollout = require_int(config, "mesh.rollout_devices", min=0)
        tensor = require_int(config, "mesh.rollout_tensor", min=1) if \
            "rollout_tensor" in get_by_path(config, "mesh") else 1
        if rollout and rollout % tensor:
            raise ConfigError(f"`mesh.rollout_tensor`={tensor} must divide `mesh.rollout_devices`={rollout}.",
                              key="mesh.rollout_tensor", value=tensor)
        trainer = get_by_path(config, "trainer", "llm")
        if rollout and trainer not in ("llm", "adrpo_jax.rl.trainer:train_and_evaluate"):
            raise ConfigError(f"`mesh.rollout_devices`={rollout}: a separate rollout mesh exists for the text LLM "
                              f"recipe (trainer='llm') only, got trainer={trainer!r}; use 0.",
                              key="mesh.rollout_devices", value=rollout)

    name = require_choice(config, "optim.name", OPTIMIZERS)
    require_type(config, "optim.learning_rate", float)
    require_range(config, "optim.learning_rate", min=0.0, min_inclusive=False)
    require_choice(config, "optim.schedule", SCHEDULES)
    warmup = require_int(config, "optim.warmup_steps", min=0)
    total_steps = get_by_path(config, "total_steps")
    if warmup > total_steps:
        raise ConfigError(f"`optim.warmup_steps`={warmup} must be <= `total_steps`={total_steps}.",
                          key="optim.warmup_steps", value=warmup)
    require_range(config, "optim.end_lr_factor", min=0.0, max=1.0)
    require_range(config, "optim.weight_decay", min=0.0)
    require_type(config, "optim.weight_decay_1d", bool)
    require_range(config, "optim.b1", min=0.0, max=1.0, max_inclusive=False)
    require_range(config, "optim.b2", min=0.0, max=1.0, max_inclusive=False)
    require_range(config, "optim.eps", min=0.0, min_inclusive=False)
    mu_dtype = get_by_path(config, "optim.mu_dtype", "")
    if mu_dtype not in ("", "float32", "bfloat16"):
        raise ConfigError(f"`optim.mu_dtype` must be one of ['', 'bfloat16', 'float32'], got {mu_dtype!r}.",
                          key="optim.mu_dtype", value=mu_dtype)
    if mu_dtype and name not in ("adam", "adamw"):
        raise ConfigError(f"`optim.mu_dtype`={mu_dtype!r} applies to adam and adamw (got optim.name={name!r}); "
                          "use ''.", key="optim.mu_dtype", value=mu_dtype)
    require_range(config, "optim.momentum", min=0.0, max=1.0, max_inclusive=False)
    if name != "sgd" and get_by_path(config, "optim.momentum") != 0:
        raise ConfigError(f"`optim.momentum` only applies to optim.name='sgd' (got name={name!r}); "
                          "use optim.b1 for adam-family optimizers.", key="optim.momentum")
    require_range(config, "optim.grad_clip_norm", min=0.0)
    require_int(config, "optim.grad_accum_steps", min=1)

    require_int(config, "numerics.max_consecutive_skips", min=1)

    for key in ("jsonl", "tensorboard", "wandb", "progress_bar", "phase_timing"):
        require_type(config, f"logging.{key}", bool)
    console_keys = require_type(config, "logging.console_keys", str)
    try:
        parse_console_keys(console_keys)
    except ValueError as err:
        raise ConfigError(str(err), key="logging.console_keys", value=console_keys) from None
    for key in ("wandb_project", "wandb_entity"):
        require_type(config, f"logging.{key}", str)
    require_type(config, "compilation_cache_dir", str)
    if "import_path" in config:
        require_type(config, "import_path", str)

    require_choice(config, "distributed.mode", DISTRIBUTED_MODES)
    address = require_type(config, "distributed.coordinator_address", str)
    if address and ":" not in address:
        raise ConfigError(f"`distributed.coordinator_address` must be 'host:port', got {address!r}.",
                          key="distributed.coordinator_address", value=address)
    nproc = require_int(config, "distributed.num_processes", min=1, allow=(-1,))
    pid = require_int(config, "distributed.process_id", min=0, allow=(-1,))
    if nproc != -1 and pid != -1 and pid >= nproc:
        raise ConfigError(f"`distributed.process_id`={pid} must be < `distributed.num_processes`={nproc}.",
                          key="distributed.process_id", value=pid)
    require_int(config, "distributed.heartbeat_timeout_s", min=2)
    if "plan" in config:
        require_type(config, "plan.target", str)
        require_type(config, "plan.check", bool)
        require_float(config, "plan.margin", min=0.0, max=1.0, max_inclusive=False)
        require_type(config, "plan.output", str)


def finalize_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates the common sections and locks ``config`` (adding a new key then raises); returns it."""
    validate_common_config(config)
    config.lock()
    return config


# ----------------------------------------------------------------------------------------------------------
# Command-line overrides, fingerprints, diffs
# ----------------------------------------------------------------------------------------------------------


# TRL ``GRPOConfig`` / ``GRPOTrainer`` names -> our dotted keys (docs/porting_trl.md's table; a test keeps the two
# equal). A value starting with ``--`` is a launch.py flag, not a config key.
TRL_ALIASES: dict[str, str] = {
    "num_generations": "rl.group_size",
    "max_completion_length": "sampling.max_new_tokens",
    "max_prompt_length": "sampling.max_prompt_length",
    "beta": "rl.beta",
    "epsilon": "rl.eps_low",
    "epsilon_high": "rl.eps_high",
    "num_iterations": "rl.num_iterations",
    "per_device_train_batch_size": "rl.num_prompts_per_step",
    "steps_per_generation": "rl.num_minibatches",
    "gradient_accumulation_steps": "optim.grad_accum_steps",
    "loss_type": "rl.loss_aggregation",
    "scale_rewards": "rl.scale_rewards",
    "importance_sampling_level": "rl.ratio_level",
    "mask_truncated_completions": "rl.mask_truncated_completions",
    "sync_ref_model": "rl.ref_sync_steps",
    "ref_model_sync_steps": "rl.ref_sync_steps",
    "ref_model_mixup_alpha": "rl.ref_mixup_alpha",
    "reward_funcs": "rewards.functions",
    "reward_weights": "rewards.weights",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "top_k": "sampling.top_k",
    "learning_rate": "optim.learning_rate",
    "lr_scheduler_type": "optim.schedule",
    "warmup_steps": "optim.warmup_steps",
    "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.b1",
    "adam_beta2": "optim.b2",
    "adam_epsilon": "optim.eps",
    "max_grad_norm": "optim.grad_clip_norm",
    "max_steps": "total_steps",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.max_to_keep",
    "seed": "seed",
    "gradient_checkpointing": "model.remat",
    "bf16": "model.dtype",
    "model_name_or_path": "model.path",
    "r": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "use_rslora": "lora.use_rslora",
    "target_modules": "lora.target_modules",
    "report_to": "logging.tensorboard",
    "output_dir": "--workdir",
}


def _flatten(d: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of the leaves of a nested mapping / ConfigDict."""
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def suggest_keys(config: Any, key: str, n: int = 3) -> list[str]:
    """The "did you mean" candidates of the unknown dotted ``key`` (each a backquoted key, with a note for TRL's
    names): the :data:`TRL_ALIASES` entry of its last part and keys with the same last part in another section;
    when there are none, close spellings (``difflib``) of the whole key and of its last part.

    >>> config = ml_collections.ConfigDict({"rl": {"group_size": 8, "beta": 0.04}, "optim": {"learning_rate": 1e-4}})
    >>> suggest_keys(config, "rl.num_generations")
    ["`rl.group_size` (TRL's `num_generations`)"]
    >>> suggest_keys(config, "rl.learning_rate"), suggest_keys(config, "rl.grup_size")
    (['`optim.learning_rate`'], ['`rl.group_size`'])
    """
    import difflib  # pylint: disable=import-outside-toplevel

    keys = list(_flatten(config))
    leaf = key.split(".")[-1]
    out: list[str] = []
    seen: set[str] = set()

    def add(candidate: str, note: str = "") -> None:
        if candidate not in seen and candidate != key:
            seen.add(candidate)
            out.append(f"`{candidate}`{note}")

    alias = TRL_ALIASES.get(leaf)
    if alias is not None and (alias.startswith("--") or alias in keys):
        add(alias, f" (TRL's `{leaf}`)" if alias.split(".")[-1] != leaf else "")
    for candidate in keys:
        if candidate.split(".")[-1] == leaf:
            add(candidate)
    if out:  # a TRL name or the same name in another section: the likely meaning, without spelling guesses
        return out[:n]
    for candidate in difflib.get_close_matches(key, keys, n=n, cutoff=0.75):
        add(candidate)
    leaves = sorted({k.split(".")[-1] for k in keys})
    for close in difflib.get_close_matches(leaf, leaves, n=n, cutoff=0.8):
        for candidate in keys:
            if candidate.split(".")[-1] == close:
                add(candidate)
    return out[:n]


def find_unknown_override(config: Any, keys: Iterable[str]) -> str | None:
    """Returns an error message for the first dotted key in ``keys`` that ``config`` lacks, else None.

    Used by ``launch.py`` to turn ml_collections' bare ``AttributeError: 'x'`` into a message naming the
    full key, the keys it may have meant (:func:`suggest_keys`: TRL's names, the same name in another section,
    close spellings) and its valid siblings.
    """
    for key in keys:
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, (Mapping, ml_collections.ConfigDict)) and part in node:
                node = node[part]
                continue
            parent = ".".join(parts[:i])
            suggestions = suggest_keys(config, key)
            hint = f" Did you mean {' or '.join(suggestions)}?" if suggestions else ""
            if isinstance(node, (Mapping, ml_collections.ConfigDict)):
                valid = ", ".join(sorted(str(k) for k in node))
                where = f"`config.{parent}`" if parent else "the config"
                return (f"Unknown config key `config.{key}`: {where} has no field `{part}`.{hint} "
                        f"(valid fields: {valid}).")
            return (f"Unknown config key `config.{key}`: `config.{parent}` is a {type(node).__name__}, not a "
                    f"section.{hint}")
    return None


def apply_override_followers(config: Any, overridden: Iterable[str]) -> list[str]:
    """Sets the keys that follow an overridden key unless they were overridden too; returns one message per changed
    key (``launch.py`` logs them). A user who swaps in their own reward functions gets TRL's default weights and an
    eval that scores with their reward, instead of a length-mismatch error or an eval by a built-in reward. Rules for
    ``rewards.functions``:

    * ``rewards.weights`` -> ``(1.0,) * len(functions)`` (TRL's ``reward_weights=None``);
    * ``eval.accuracy_reward`` -> the first function, unless its current value is one of the functions.

    >>> c = ml_collections.ConfigDict({"rewards": {"functions": ("mine:f",), "weights": (1.0, 0.1)},
    ...                                "eval": {"accuracy_reward": "exact_match"}})
    >>> msgs = apply_override_followers(c, ["rewards.functions"])
    >>> c.rewards.weights, c.eval.accuracy_reward
    ((1.0,), 'mine:f')
    """
    overridden = set(overridden)
    messages: list[str] = []
    if "rewards.functions" in overridden and "rewards" in config:
        functions = get_by_path(config, "rewards.functions", None)
        if isinstance(functions, str):
            functions = (functions,)
        if isinstance(functions, (tuple, list)) and functions:
            if "rewards.weights" not in overridden and "weights" in config.rewards:
                weights = (1.0,) * len(functions)
                if tuple(config.rewards.weights or ()) != weights:
                    old = config.rewards.weights
                    config.rewards.weights = weights
                    messages.append(f"rewards.weights = {weights} (was {tuple(old)}): one weight 1.0 per function of "
                                    "the overridden rewards.functions; pass --config.rewards.weights=\"(...)\" to "
                                    "weight them.")
            if ("eval.accuracy_reward" not in overridden and "eval" in config
                    and "accuracy_reward" in config.eval and isinstance(functions[0], str)):
                old = config.eval.accuracy_reward
                if old not in functions:
                    config.eval.accuracy_reward = functions[0]
                    messages.append(f"eval.accuracy_reward = {functions[0]!r} (was {old!r}): eval/accuracy is the "
                                    "mean of the first function of the overridden rewards.functions; pass "
                                    "--config.eval.accuracy_reward=... to choose another.")
    return messages


def config_from_dict(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The ConfigDict of a :func:`config_to_dict` dict (a run's ``config.json``): JSON lists become tuples again
    (the configs hold sequences as tuples, as command-line overrides parse them).

    >>> c = config_from_dict({"rewards": {"functions": ["exact_match"]}, "seed": 0})
    >>> c.rewards.functions, c.seed
    (('exact_match',), 0)
    """
    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(convert(v) for v in value)
        return value

    return ml_collections.ConfigDict(convert(dict(data)))


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (JSON-able where possible) of a ConfigDict."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=repr, sort_keys=True))


def _flat_model_keys(config: Any, prefixes: Sequence[str]) -> dict[str, Any]:
    """The flat :func:`config_to_dict` of ``config`` without the runtime-only keys that ``prefixes`` name."""
    return {k: v for k, v in _flatten(config_to_dict(config)).items()
            if not any(k == p.rstrip(".") or (p.endswith(".") and k.startswith(p)) for p in prefixes)}


def config_diff(old: Mapping[str, Any] | ml_collections.ConfigDict, new: Mapping[str, Any] | ml_collections.ConfigDict,
                *, ignore_prefixes: Sequence[str] = RUNTIME_KEY_PREFIXES) -> list[tuple[str, Any, Any]]:
    """Lists ``(dotted_key, old_value, new_value)`` for keys that differ, skipping runtime-only keys.

    A key present on one side only appears with ``'<missing>'`` on the other.

    >>> config_diff({"a": 1, "optim": {"b1": 0.9}, "total_steps": 5}, {"a": 2, "optim": {"b1": 0.9}})
    [('a', 1, 2)]
    """
    flat_old, flat_new = _flat_model_keys(old, ignore_prefixes), _flat_model_keys(new, ignore_prefixes)
    diffs = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, "<missing>"), flat_new.get(key, "<missing>")
        if a != b:
            diffs.append((key, a, b))
    return diffs


def config_fingerprint(config: Any, *, ignore_prefixes: Sequence[str] = RUNTIME_KEY_PREFIXES) -> str:
    """Short sha256 of the config without runtime-only keys (stored in checkpoints' ``meta``)."""
    flat = _flat_model_keys(config, ignore_prefixes)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=repr).encode()).hexdigest()[:16]
