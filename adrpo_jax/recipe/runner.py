r"""The runner: one entry for every recipe and mode (``launch.py`` parses flags, then calls :func:`run`).

    python launch.py --config=configs/<experiment>.py[:variant] --workdir=DIR [--mode=train|eval|plan]

* ``train`` (:func:`train`): builds the recipe of ``config.trainer`` on the config's mesh and runs it
  (:meth:`~adrpo_jax.recipe.base.Recipe.run`: step-0 evaluation, the loop, checkpoints, resume, the final export).
* ``eval`` (:func:`evaluate_run`): the newest checkpoint of ``DIR`` (or its ``final_model``) through the recipe's
  own evaluator, so the numbers equal the ``eval/*`` record that training logged at that step; one JSON record per
  evaluation is appended to ``DIR/eval.jsonl`` (process 0)::

    {"step": 20, "source": "checkpoint", "checkpoint": "DIR/checkpoints/20", "trainer": "llm",
     "time": 1764300000.0, "eval_seconds": 3.2, "eval/accuracy": 0.41, ...}

  ``step`` is the checkpoint step (for ``final_model``: the newest step of ``metrics.jsonl``, else
  ``total_steps``). Multi-process runs evaluate collectively, like training.
* ``plan``: :mod:`adrpo_jax.recipe.plan` (every program of the recipe compiled for a target, no weights).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax

from adrpo_jax.recipe.base import (EVAL_IMAGES_DIR, FINAL_MODEL, RECIPES, Recipe, recipe_name, resolve_recipe,
                                   resolve_trainer)
from adrpo_jax.train.config import ConfigError, get_by_path

__all__ = ["train", "evaluate_run", "build_trainer", "warn_config_changes", "write_run_config", "apply_import_path",
           "describe_model", "run_summary", "eval_command", "EVAL_FILE", "CONFIG_FILE", "MODES"]

log = logging.getLogger(__name__)

EVAL_FILE = "eval.jsonl"
CONFIG_FILE = "config.json"  # the run's config, written once its first step succeeded (see train)
MODES = ("train", "eval", "plan")


def train(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
    """Runs (or resumes) the training run of ``config`` in ``workdir``; returns the last logged metrics plus
    ``step``, ``preempted``, ``resumed_from``.

    ``workdir/config.json`` (:func:`write_run_config`) is written once the run's first step has succeeded (a
    plain ``train_and_evaluate`` function: once it returns), so a start that fails (a bad data file, a config
    error found by the recipe, an out-of-memory at the first step) leaves none behind, and the retry does not
    warn about a "previous run" that never trained."""
    from adrpo_jax.recipe.plan import check_before_run  # pylint: disable=import-outside-toplevel
    apply_import_path(config)
    check_before_run(config, workdir)  # TPU / GPU: every program fits, before any weight is loaded
    workdir = os.fspath(workdir)
    cls = resolve_recipe(config.trainer)
    if cls is None:  # a plain train_and_evaluate(config, workdir) function
        result = resolve_trainer(config.trainer)(config, workdir)
        write_run_config(config, workdir)
        return result
    t0 = time.perf_counter()
    log.info("Setting up the %s recipe: %s ...", cls.name or config.trainer, describe_model(config))
    recipe = cls(config, workdir)
    log.info("Set up in %.1f s (%d programs, compiled at their first call).", time.perf_counter() - t0,
             len(getattr(recipe, "programs", ()) or ()))
    step_fn = recipe.train_step
    pending = [True]

    def train_step(step: int, state: Any) -> Any:
        if pending:
            log.info("Step %d/%d: the first step of this process compiles the step's programs (the slowest step; "
                     "the next ones are faster) ...", step + 1, int(config.total_steps))
            start = time.perf_counter()
        out = step_fn(step, state)
        if pending:  # the first step of this run went through: record its config
            jax.block_until_ready(out)
            log.info("Step %d done in %.1f s (compilation included).", step + 1, time.perf_counter() - start)
            write_run_config(config, workdir)
            pending.clear()
        return out

    recipe.train_step = train_step  # type: ignore[method-assign]  # Recipe.run hands self.train_step to the loop
    return recipe.run()


def apply_import_path(config: Any) -> list[str]:
    """Appends the directories of ``config.import_path`` (``os.pathsep``-separated) that are not on ``sys.path``
    yet, so that ``'module:function'`` paths (reward functions, a trainer) import from them; returns those
    added."""
    added = []
    for d in str(get_by_path(config, "import_path", "") or "").split(os.pathsep):
        d = os.path.abspath(os.path.expanduser(d)) if d else ""
        if d and d not in sys.path:
            sys.path.append(d)
            added.append(d)
    return added


def describe_model(config: Any) -> str:
    """What the run loads, for the startup line: ``model.path`` (a ``builtin:`` model: built once and cached under
    ``$ADRPO_JAX_CACHE``; '' for the flow recipes: the pre-trained model of the cache) and the mesh."""
    from adrpo_jax.cache import cache_root  # pylint: disable=import-outside-toplevel
    path = get_by_path(config, "model.path", None)
    if path is None:
        what = "no model.path"
    elif str(path).startswith("builtin:"):
        what = f"model.path={path!r} (built in: made once, then loaded from {cache_root()})"
    elif not path:
        tiny = " (tiny random models)" if get_by_path(config, "model.tiny", False) else ""
        what = f"model.path='' (the recipe's own pre-trained model{tiny}, made once and cached under {cache_root()})"
    else:
        what = f"model.path={os.path.abspath(os.path.expanduser(str(path)))!r}"
    mesh = get_by_path(config, "mesh", None)
    shape = ", ".join(f"{k}={mesh[k]}" for k in ("data", "fsdp", "expert", "tensor") if mesh is not None and k in mesh)
    return f"{what}; mesh {shape}; {jax.device_count()} {jax.devices()[0].platform} device(s)"


def run_summary(result: dict[str, Any], workdir: str | os.PathLike, config: Any = None) -> str:
    """The end-of-run lines ``launch.py`` prints: the final numbers and the paths of the run's outputs (those that
    exist): ``metrics.jsonl``, ``tb/`` with its ``tensorboard`` command, ``samples.jsonl``, the checkpoints, the
    exported model, the sample grids; the monitor's message when it stopped the run (``result["stopped"]``)."""
    from adrpo_jax.train.metrics import format_console  # pylint: disable=import-outside-toplevel
    workdir = Path(os.path.abspath(os.fspath(workdir)))
    total = get_by_path(config, "total_steps", None) if config is not None else None
    step = result.get("step")
    keys = ("reward_mean", "kl_mean", "w2_mean", "beta_eff_mean", "eval/accuracy", "eval/reward_mean",
            "eval/diversity", "eval/clip_diversity")
    numbers = format_console(result, keys) if any(k in result for k in keys) else ""
    head = f"step {step}/{total}" if total is not None else f"step {step}"
    lines = []
    if result.get("stopped"):
        lines.append(f"Stopped early at {head}: {result['stopped']}")
    else:
        lines.append(f"Finished at {head}" + (f": {numbers}" if numbers else "."))
    rows = []
    if (workdir / "metrics.jsonl").exists():
        rows.append(("metrics", str(workdir / "metrics.jsonl")))
    if (workdir / "tb").is_dir():
        try:
            import tensorboard  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
            note = ""
        except ImportError:
            note = "   (pip install 'adrpo_jax[logging]' for the tensorboard command)"
        rows.append(("TensorBoard", f"tensorboard --logdir {workdir / 'tb'}{note}"))
    if (workdir / "samples.jsonl").exists():
        rows.append(("samples", str(workdir / "samples.jsonl")))
    grids = sorted((workdir / EVAL_IMAGES_DIR).glob("*.png")) if (workdir / EVAL_IMAGES_DIR).is_dir() else []
    if grids:
        rows.append(("eval images", f"{workdir / EVAL_IMAGES_DIR} ({len(grids)} PNG, newest {grids[-1].name})"))
    for key in ("samples_grid",):
        if result.get(key):
            rows.append(("sample grid", str(result[key])))
    ckpt = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
    if steps:
        rows.append(("checkpoints", f"{ckpt} (steps {', '.join(map(str, steps))})"))
    if result.get("final_model"):
        rows.append(("model", f"{result['final_model']} (the trained policy, Hugging Face / diffusers layout)"))
    elif not result.get("stopped") and config is not None and get_by_path(config, "model.save_final", None) \
            is False:
        rows.append(("model", "not exported (pass --config.model.save_final=True to write WORKDIR/final_model)"))
    rows.append(("config", str(workdir / CONFIG_FILE)))
    width = max(len(name) for name, _ in rows)
    lines.extend(f"  {name + ':':<{width + 1}} {value}" for name, value in rows)
    lines.append(f"  evaluate again: {eval_command(workdir)}")
    return "\n".join(lines)


def eval_command(workdir: str | os.PathLike, argv0: str | None = None) -> str:
    """The command that evaluates ``workdir`` again, in the form the run was started with (``argv0``: the
    program, default ``sys.argv[0]``): the console script, ``python -m adrpo_jax.launch`` or a checkout's
    ``launch.py``.

    >>> eval_command("/tmp/run", "/venv/bin/adrpo-jax")
    'adrpo-jax eval --workdir=/tmp/run'
    >>> eval_command("/tmp/run", "/site-packages/adrpo_jax/launch.py")
    'python -m adrpo_jax.launch eval --workdir=/tmp/run'
    >>> eval_command("/tmp/run", "launch.py")
    'launch.py --workdir=/tmp/run --mode=eval'
    """
    argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    if os.path.basename(argv0) == "adrpo-jax":
        return f"adrpo-jax eval --workdir={workdir}"
    if os.path.basename(argv0) == "launch.py" and os.path.basename(os.path.dirname(argv0)) == "adrpo_jax":
        return f"python -m adrpo_jax.launch eval --workdir={workdir}"
    return f"launch.py --workdir={workdir} --mode=eval"


def warn_config_changes(config: Any, workdir: str | os.PathLike) -> list[tuple[str, Any, Any]]:
    """Logs a warning listing the keys where ``config`` differs from ``workdir/config.json`` (the config of the
    last run there that got through a step); returns the differences ``[(key, old, new)]`` (none without the
    file)."""
    from adrpo_jax.train.config import config_diff, config_to_dict  # pylint: disable=import-outside-toplevel
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError):
        return []
    diffs = config_diff(old, config_to_dict(config))
    if diffs:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:20])
        more = f" (+{len(diffs) - 20} more)" if len(diffs) > 20 else ""
        log.warning("The config differs from the previous run in %s: %s%s. Resuming anyway; a checkpoint whose "
                    "shapes do not fit fails with CheckpointMismatchError.", workdir, shown, more)
    return diffs


def write_run_config(config: Any, workdir: str | os.PathLike) -> str | None:
    """Writes ``config`` as ``workdir/config.json`` (process 0; atomically: a temporary file renamed); returns
    the path (None on other processes)."""
    if jax.process_index() != 0:
        return None
    from adrpo_jax.train.config import config_to_dict  # pylint: disable=import-outside-toplevel
    os.makedirs(os.fspath(workdir), exist_ok=True)
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def _config_copy(config: Any, **values: Any) -> Any:
    """A copy of ``config`` with dotted ``values`` set (existing keys only)."""
    copy = config.copy_and_resolve_references()
    for dotted, value in values.items():
        node = copy
        *parts, last = dotted.split(".")
        for part in parts:
            node = node[part]
        node[last] = value
    return copy


def _recipe_class(config: Any) -> type[Recipe]:
    cls = resolve_recipe(config.trainer)
    if cls is None:
        raise ConfigError(f"--mode=eval supports the trainers {sorted(RECIPES)} (the recipes, with their evaluators); "
                          f"`trainer` is the plain function {config.trainer!r}.", key="trainer", value=config.trainer)
    return cls


def build_trainer(config: Any, workdir: str | os.PathLike, **kwargs: Any) -> Recipe:
    """The recipe of ``config`` with its evaluator built (``eval_every`` >= 1)."""
    cls = _recipe_class(config)
    if int(config.eval_every) <= 0:
        config = _config_copy(config, eval_every=max(int(config.total_steps), 1))
    return cls(config, workdir, **kwargs)


def _final_step(config: Any, workdir: Path) -> int:
    from adrpo_jax.train.metrics import read_jsonl  # pylint: disable=import-outside-toplevel

    path = workdir / "metrics.jsonl"
    steps = [int(r["step"]) for r in read_jsonl(path) if "step" in r] if path.exists() else []
    return max(steps) if steps else int(config.total_steps)


def evaluate_run(config: Any, workdir: str | os.PathLike, *, trainer: Recipe | None = None,
                 write: bool = True) -> dict[str, Any]:
    """Evaluates the newest checkpoint (else ``final_model``) of the run in ``workdir``; returns the record (and
    appends it to ``workdir/eval.jsonl`` on process 0 when ``write``).

    Args:
      config: the run's config.
      workdir: the run directory.
      trainer: an already built recipe of ``config`` with an evaluator (tests pass one built on tiny models);
        default: :func:`build_trainer`.

    Raises:
      FileNotFoundError: neither a checkpoint nor ``final_model`` in ``workdir``.
      checkpoint.CheckpointMismatchError: the checkpoint does not fit the config's model.
    """
    from adrpo_jax.train.loop import checkpointer_from_config  # pylint: disable=import-outside-toplevel

    apply_import_path(config)
    kind = trainer.name if trainer is not None else recipe_name(config.trainer) or _recipe_class(config).name
    workdir = Path(os.path.abspath(os.fspath(workdir)))
    final_model = workdir / FINAL_MODEL
    if not (workdir / "checkpoints").is_dir() and not final_model.is_dir():
        raise FileNotFoundError(f"nothing to evaluate in {workdir}: no checkpoint in {workdir / 'checkpoints'} "
                                f"and no {final_model} (model.save_final).")
    checkpointer = checkpointer_from_config(config, workdir)
    try:
        has_checkpoint = checkpointer.latest_step() is not None
        if not has_checkpoint and not final_model.is_dir():
            raise FileNotFoundError(f"nothing to evaluate in {workdir}: no checkpoint in {checkpointer.directory} "
                                    f"and no {final_model} (model.save_final).")
        if has_checkpoint:
            trainer = trainer if trainer is not None else build_trainer(config, workdir)
            restored = checkpointer.restore_latest(trainer.abstract_state)
            if restored is None:  # every step unreadable (warned about by restore_latest)
                raise FileNotFoundError(f"no restorable checkpoint in {checkpointer.directory}")
            step, state, _ = restored
            source, where = "checkpoint", str(checkpointer.directory / str(step))
        else:
            if trainer is None:  # final_model holds a plain (merged) model: build the recipe without LoRA
                plain = _config_copy(config, **{"lora.enabled": False}) if "lora" in config else config
                trainer = build_trainer(plain, workdir)
            elif trainer.lora_config is not None:
                raise ValueError("final_model holds the merged model: pass a trainer built without LoRA.")
            step = _final_step(config, workdir)
            state = {"params": trainer.load_final(final_model)}
            source, where = "final_model", str(final_model)
    finally:
        checkpointer.close()
    if not trainer.has_evaluator:
        raise ValueError("the trainer has no evaluator (build it with eval_every > 0, see build_trainer).")
    log.info("Evaluating %s (step %d) on the eval set of %s ...", where, step, kind)
    start = time.perf_counter()
    metrics = jax.device_get(dict(trainer.evaluate(step, state)))
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {"step": int(step), "source": source, "checkpoint": where, "trainer": kind,
                              "time": time.time(), "eval_seconds": seconds}
    record.update({k: float(v) for k, v in metrics.items()})
    if write and jax.process_index() == 0:
        with open(workdir / EVAL_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
    shown = ", ".join(f"{k}={v:.5g}" for k, v in record.items() if k.startswith("eval/"))
    log.info("Evaluation of step %d (%s): %s", step, source, shown)
    return record
