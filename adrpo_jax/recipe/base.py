"""Recipes: what one kind of run declares; everything else is the runner's (:mod:`adrpo_jax.recipe.runner`).

A recipe (the text LLM, the audio LLM, the digits DiT, SD3) is a class built from ``(config, workdir, mesh)``
that declares:

1. its **policy** (:class:`~adrpo_jax.recipe.policy.Policy`: trained / frozen parts, reference, optimizer),
2. its **programs** (:class:`~adrpo_jax.train.programs.ProgramSet`: every jitted program, with abstract arguments
   at the run's real shapes; the recipe calls them through ``self.fns[name]`` and jits nothing itself),
3. its **host phases**: :meth:`Recipe.rollout` (prompts, sampling, rewards: what the update consumes),
   :meth:`Recipe.update` (the optimizer step and refreshes), :meth:`Recipe.evaluate`, :meth:`Recipe.export`, and
   the host state of checkpoints.

:meth:`Recipe.run` is the one training driver of every recipe (the step-0 evaluation, ``run_training``, the final
export); :meth:`Recipe.train_step` is ``update(rollout(...))``, the seam an asynchronous schedule splits.

The registry maps ``config.trainer`` to a recipe class (imported lazily, only the chosen one)::

    'llm'   -> adrpo_jax.rl.trainer:RLTrainer            (GRPO / ADRPO for language models)
    'audio' -> adrpo_jax.rl.audio_trainer:AudioRLTrainer (the same on spoken prompts)
    'flow'  -> adrpo_jax.flow.trainer:FlowTrainer        (ADRPO-W2 on the digits DiT)
    'sd3'   -> adrpo_jax.flow.sd3_trainer:SD3Trainer     (ADRPO-W2 on an SD3 MMDiT)

The modules' ``train_and_evaluate`` paths name the same recipes; any other ``'package.module:function'`` is a plain
``train_and_evaluate(config, workdir) -> dict`` (train mode only).

>>> recipe_name("adrpo_jax.flow.sd3_trainer:train_and_evaluate")
'sd3'
>>> validate_trainer_name("gan")
Traceback (most recent call last):
...
adrpo_jax.train.config.ConfigError: `trainer` must be one of ['audio', 'flow', 'llm', 'sd3'] or a ... got 'gan'.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

import adrpo_jax.train.metrics  # noqa: F401  (train.metrics.to_python_scalar)
from adrpo_jax import train
from adrpo_jax.train.config import ConfigError
from adrpo_jax.train.programs import ProgramSet

if TYPE_CHECKING:
    from adrpo_jax.recipe.policy import Policy

__all__ = ["Recipe", "RECIPES", "recipe_name", "resolve_recipe", "resolve_trainer", "register_recipe",
           "validate_trainer_name", "write_png", "image_grid", "FINAL_MODEL", "EVAL_IMAGES_DIR"]

log = logging.getLogger(__name__)

FINAL_MODEL = "final_model"
EVAL_IMAGES_DIR = "eval_images"  # WORKDIR/eval_images/<name>_step<N>.png: Recipe.eval_images at every evaluation

RECIPES: dict[str, str] = {
    "llm": "adrpo_jax.rl.trainer:RLTrainer",
    "audio": "adrpo_jax.rl.audio_trainer:AudioRLTrainer",
    "flow": "adrpo_jax.flow.trainer:FlowTrainer",
    "sd3": "adrpo_jax.flow.sd3_trainer:SD3Trainer",
}
# Today's (and yesterday's) dotted paths of the built-in trainers name their recipes.
_ALIASES = {
    "adrpo_jax.rl.trainer:train_and_evaluate": "llm",
    "adrpo_jax.rl.audio_trainer:train_and_evaluate": "audio",
    "adrpo_jax.flow.trainer:train_and_evaluate": "flow",
    "adrpo_jax.flow.sd3_trainer:train_and_evaluate": "sd3",
}

_PATH_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def register_recipe(name: str, target: str) -> None:
    """Registers ``name`` -> ``'package.module:RecipeClass'`` (overwrites an existing name)."""
    if not _PATH_RE.match(target):
        raise ValueError(f"`target` must be a 'package.module:Class' path, got {target!r}.")
    RECIPES[name] = target


def recipe_name(trainer: str) -> str | None:
    """The registered recipe ``config.trainer`` names (a name or a built-in module path), else None."""
    if trainer in RECIPES:
        return trainer
    return _ALIASES.get(trainer)


def validate_trainer_name(trainer: Any) -> None:
    """ConfigError (key ``trainer``) unless ``trainer`` is a recipe name or a well-formed dotted path."""
    if isinstance(trainer, str) and (trainer in RECIPES or _PATH_RE.match(trainer)):
        return
    raise ConfigError(f"`trainer` must be one of {sorted(RECIPES)} or a 'package.module:function' path, got "
                      f"{trainer!r}.", key="trainer", value=trainer)


def _import(target: str, trainer: str) -> Any:
    module_name, _, attr_path = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):  # the module itself (or a parent) is missing
            raise ConfigError(f"`trainer`={trainer!r}: cannot import module {module_name!r} ({err}).", key="trainer",
                              value=trainer) from err
        raise  # a dependency of the module is missing: show the real traceback
    obj: Any = module
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"`trainer`={trainer!r}: module {module_name!r} has no attribute {attr_path!r}.",
                              key="trainer", value=trainer)
        obj = getattr(obj, attr)
    return obj


def resolve_recipe(trainer: str) -> type["Recipe"] | None:
    """The recipe class of ``config.trainer`` (imported now), or None for a plain function path."""
    validate_trainer_name(trainer)
    name = recipe_name(trainer)
    return None if name is None else _import(RECIPES[name], trainer)


def resolve_trainer(trainer: str) -> Callable[[Any, str], dict]:
    """``train_and_evaluate(config, workdir) -> dict`` of ``config.trainer`` (a recipe's :meth:`Recipe.run`)."""
    cls = resolve_recipe(trainer)
    if cls is not None:
        return lambda config, workdir: cls(config, workdir).run()
    fn = _import(trainer, trainer)
    if not callable(fn):
        raise ConfigError(f"`trainer`={trainer!r} is not callable.", key="trainer", value=trainer)
    return fn


def _to_uint8(image: Any, name: str) -> np.ndarray:
    """``[H, W]`` / ``[H, W, C]`` (C in 1, 3, 4) uint8, or float in [0, 1] (clipped) -> ``[H, W, C]`` uint8."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"eval image {name!r} must be [H, W] or [H, W, C] with C in (1, 3, 4), got {arr.shape}.")
    if arr.dtype != np.uint8:
        arr = (np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return arr


def image_grid(images: Any, ncol: int, *, pad: int = 2, value: float | int | None = None) -> np.ndarray:
    """``[N, H, W, C]`` images (uint8, or float in [0, 1]) -> one ``[rows * (H + pad) - pad, ncol * (W + pad) - pad,
    C]`` image, row-major (e.g. one row per prompt with ``ncol`` = samples per prompt); missing cells and the
    ``pad`` pixels between cells are ``value`` (default: white). For :meth:`Recipe.eval_images`.

    >>> image_grid(np.zeros((3, 2, 2, 1), np.uint8), ncol=2, pad=1).shape
    (5, 5, 1)
    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or ncol < 1:
        raise ValueError(f"image_grid: images must be [N, H, W, C] and ncol >= 1, got {arr.shape}, ncol={ncol}.")
    n, h, w, c = arr.shape
    rows = -(-n // ncol)
    fill = (255 if arr.dtype == np.uint8 else 1.0) if value is None else value
    out = np.full((rows * (h + pad) - pad, ncol * (w + pad) - pad, c), fill, arr.dtype)
    for i in range(n):
        r, k = divmod(i, ncol)
        out[r * (h + pad):r * (h + pad) + h, k * (w + pad):k * (w + pad) + w] = arr[i]
    return out


def write_png(path: str | os.PathLike, image: np.ndarray) -> str:
    """Writes ``[H, W, C]`` uint8 (C = 1 grey, 3 RGB, 4 RGBA) as a PNG (zlib, no imaging library); returns the
    path. The file is written to a temporary name and renamed (a reader never sees half a PNG)."""
    arr = _to_uint8(image, os.fspath(path))
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))  # filter type 0 per scanline

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    color = {1: 0, 3: 2, 4: 6}[c]
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)
    return os.fspath(path)


class Recipe:
    """Base of the four recipes (module docstring). Subclasses build, in ``__init__``: ``self.policy``, the
    programs (:meth:`_set_programs`), ``self.opts``, ``self.schedule``, ``self.updates_per_step``; and implement
    :meth:`rollout`, :meth:`update`, :meth:`evaluate` (with :attr:`has_evaluator`), :meth:`export`,
    :meth:`load_final`.

    Attributes every recipe has (tools and tests read them): ``config``, ``workdir``, ``mesh``, ``policy``,
    ``programs``, ``fns``, and through the policy ``graphdef``, ``base_graphdef``, ``ref_graphdef``, ``tx``,
    ``trainable``, ``lora_config``, ``abstract_state``, ``state_shardings``, ``frozen``, ``ref_params``.
    """

    name = ""
    throughput_key = ""  # the metric counted per second ('tokens', 'images')
    # built by the subclasses' __init__
    policy: Policy
    schedule: Callable[[int], Any]  # optimizer update count -> learning rate
    updates_per_step: int

    def __init__(self, config: Any, workdir: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                 abstract: bool = False):
        self.config, self.workdir, self.abstract = config, os.fspath(workdir), abstract
        self.mesh = mesh if mesh is not None else train.make_mesh(config.mesh)

    # ---- the policy's parts under the names tools and tests use -------------------------------------------

    graphdef = property(lambda self: self.policy.graphdef)
    base_graphdef = property(lambda self: self.policy.base_graphdef)
    ref_graphdef = property(lambda self: self.policy.ref_graphdef)
    tx = property(lambda self: self.policy.tx)
    trainable = property(lambda self: self.policy.trainable)
    lora_config = property(lambda self: self.policy.lora)
    abstract_state = property(lambda self: self.policy.abstract_state)
    state_shardings = property(lambda self: self.policy.state_shardings)
    frozen = property(lambda self: self.policy.frozen)
    ref_params = property(lambda self: self.policy.ref_params)
    ref_in_state = property(lambda self: self.policy.ref_in_state)

    def _set_programs(self, programs: Sequence[Any]) -> None:
        """The recipe's program set = the policy's programs + ``programs``; jitted here, once."""
        self.programs = ProgramSet([*self.policy.programs(), *programs])
        self.fns = self.programs.jit()
        self.policy.bind(self.fns)

    def phase_timing(self) -> bool:
        return bool(train.get_by_path(self.config, "logging.phase_timing", False))

    # ---- host phases --------------------------------------------------------------------------------------

    def init_state(self) -> dict[str, Any]:
        """The fresh train state (:meth:`~adrpo_jax.recipe.policy.Policy.init_state`)."""
        return self.policy.init_state()

    def rollout(self, step: int, state: Any) -> Any:
        """The rollout of ``step`` from ``state``: what :meth:`update` consumes (dispatched device work + host
        data: prompts, samples, rewards, the update's key, phase times)."""
        raise NotImplementedError

    def update(self, step: int, state: Any, rollout: Any) -> tuple[Any, dict[str, Any]]:
        """The optimizer update(s) of ``step`` on ``rollout``, then the refreshes; returns ``(state, metrics)``."""
        raise NotImplementedError

    def train_step(self, step: int, state: Any) -> tuple[Any, dict[str, Any]]:
        """One RL step (``run_training``'s contract): ``update(step, state, rollout(step, state))``."""
        return self.update(step, state, self.rollout(step, state))

    @property
    def has_evaluator(self) -> bool:
        return int(self.config.eval_every) > 0

    def evaluate(self, step: int, state: Any) -> dict[str, Any]:
        """Eval metrics (``eval/*``) of ``state`` after ``step`` steps."""
        return {}

    def export(self, params: Any, path: str | os.PathLike) -> str | os.PathLike | None:
        """Writes the policy of ``params`` to ``path`` in its family's format; returns the path (process 0)."""
        raise NotImplementedError

    def save_model(self, params: Any, path: str | os.PathLike) -> Any:
        return self.export(params, path)

    def load_final(self, path: Path) -> Any:
        """The trainable parameters (sharded as ``state_shardings["params"]``) of an exported ``final_model``;
        the recipe is built without LoRA (the export is the merged model)."""
        raise ConfigError(f"--mode=eval of the {self.name!r} recipe reads checkpoints only (no final_model loader).",
                          key="trainer", value=self.config.trainer)

    get_host_state: Callable[[], dict] | None = None
    set_host_state: Callable[[dict], None] | None = None

    monitor_kind: str | None = None  # 'llm' | 'flow': the recipe's gold rewards (eval.gold_rewards)

    def monitor(self) -> Any:
        """The reward-hacking monitor of ``eval.gold_rewards`` (:mod:`adrpo_jax.train.monitor`), or None."""
        if self.monitor_kind is None or "gold_rewards" not in self.config.get("eval", {}):
            return None
        from adrpo_jax.train.monitor import monitor_from_config  # pylint: disable=import-outside-toplevel
        return monitor_from_config(self.config, self.monitor_kind)

    def eval_images(self, step: int, state: Any) -> Mapping[str, Any] | None:
        """Images of the policy at an evaluation (e.g. a grid of the eval prompts' samples), ``{name: [H, W, 3] or
        [H, W]}`` (uint8, or float in [0, 1]), or None (the default: the recipe shows none). :meth:`run` calls it
        after every evaluation, the step-0 one included, and writes each image to
        ``WORKDIR/eval_images/<name>_step<N>.png`` and to TensorBoard / W&B as ``eval_images/<name>``
        (:func:`image_grid` lays samples out, e.g. one row per prompt)."""
        del step, state
        return None

    def _write_eval_images(self, writer: Any, step: int, state: Any) -> list[str]:
        """:meth:`eval_images` of ``state`` -> PNG files (process 0) and the writer's images; returns the paths."""
        images = self.eval_images(step, state)
        if not images:
            return []
        images = {str(k): _to_uint8(jax.device_get(v), k) for k, v in images.items()}
        paths = []
        if writer.is_primary:
            folder = os.path.join(self.workdir, EVAL_IMAGES_DIR)
            os.makedirs(folder, exist_ok=True)
            for name, image in images.items():
                paths.append(write_png(os.path.join(folder, f"{name.replace('/', '_')}_step{int(step)}.png"), image))
            writer.write_images(step, {f"{EVAL_IMAGES_DIR}/{name}": image for name, image in images.items()})
        return paths

    def on_start(self, state: Any) -> None:
        """Called once on a fresh run, after the step-0 evaluation (e.g. a "before" sample grid)."""

    def on_finish(self, result: Any, out: dict[str, Any]) -> None:
        """Called after a finished (not preempted) run with its result and the returned dict (add paths to it)."""

    # ---- the driver -----------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Runs (or resumes) training to ``total_steps``; returns the last logged metrics plus ``step``,
        ``preempted``, ``resumed_from`` (and ``final_model`` with ``model.save_final``; ``stopped`` when the
        reward-hacking monitor's stop rule ended the run: its checkpoint is kept, nothing is exported)."""
        config = self.config
        writer = train.MetricWriter(self.workdir, config.logging, run_config=config)
        evaluate = self.has_evaluator
        monitor = self.monitor()

        def evaluate_step(step: int, state: Any) -> dict[str, Any]:
            metrics = self.evaluate(step, state)
            self._write_eval_images(writer, step, state)
            return metrics

        def init_state():
            t0 = time.perf_counter()
            log.info("Initializing the train state (the pre-trained weights, the optimizer state) ...")
            state = self.init_state()
            log.info("Train state ready in %.1f s.", time.perf_counter() - t0)
            if evaluate:  # the "before" numbers of a fresh run (policy == pre-trained model), logged at step 0
                writer.truncate_after(-1)
                log.info("Step-0 evaluation (the policy before training; compiles the evaluation) ...")
                t0 = time.perf_counter()
                record = {k: train.metrics.to_python_scalar(v)
                          for k, v in jax.device_get(dict(evaluate_step(0, state))).items()}
                if monitor is not None:  # the gold rewards' starting point
                    record.update(monitor.update({"step": 0, **record}))
                writer.write(0, record)
                keys = train.metrics.parse_console_keys(train.get_by_path(config, "logging.console_keys", None))
                shown = train.metrics.format_console(record, keys) or train.metrics.format_console(record, None)
                log.info("step 0 (before training, %.1f s): %s", time.perf_counter() - t0, shown)
            self.on_start(state)
            return state

        try:
            result = train.run_training(
                config=config, workdir=self.workdir, init_state=init_state, abstract_state=self.abstract_state,
                train_step=self.train_step, get_host_state=self.get_host_state, set_host_state=self.set_host_state,
                eval_step=evaluate_step if evaluate else None,
                learning_rate_fn=lambda s: self.schedule(s * self.updates_per_step),
                throughput_keys=(self.throughput_key,) if self.throughput_key else (), writer=writer,
                monitor=monitor)
        finally:
            writer.close()
        self.result = result
        out = result.to_dict()
        if result.stopped:  # the reward-hacking monitor ended the run: no export of a hacked policy
            return out
        if not result.preempted:
            if bool(train.get_by_path(config, "model.save_final", False)):
                path = self.export(result.state["params"], os.path.join(self.workdir, FINAL_MODEL))
                out["final_model"] = None if path is None else str(path)
            self.on_finish(result, out)
        return out
