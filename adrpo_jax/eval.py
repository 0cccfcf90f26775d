r"""Evaluate a run's newest checkpoint (or its ``final_model``) on the config's eval set; append to ``eval.jsonl``.

    python launch.py --config=configs/<experiment>.py[:variant] --workdir=DIR --mode=eval [--config.key=value ...]

The trainer's own evaluator runs (LLM: :class:`adrpo_jax.rl.trainer.Evaluator`, held-out accuracy of
``eval.*``; flow: :class:`adrpo_jax.flow.trainer.FlowEvaluator`, eval reward / diversity / Frechet distance /
W2 bound on the fixed eval batch), so the numbers equal the ``eval/*`` record that training logged at that step.
What is evaluated: the newest restorable checkpoint in ``DIR/checkpoints`` (the final step of a finished run is
always checkpointed); when there is none, ``DIR/final_model`` (``model.save_final``; with LoRA the merged
model). One JSON record per evaluation is appended to ``DIR/eval.jsonl`` (process 0 writes)::

    {"step": 20, "source": "checkpoint", "checkpoint": "DIR/checkpoints/20", "trainer": "llm",
     "time": 1764300000.0, "eval_seconds": 3.2, "eval/accuracy": 0.41, ...}

``step`` is the checkpoint step (for ``final_model``: ``total_steps`` of the config, or the newest step of
``metrics.jsonl``). Multi-process runs evaluate collectively, like training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax

__all__ = ["evaluate_run", "build_trainer", "EVAL_FILE", "EVAL_TRAINERS"]

log = logging.getLogger(__name__)

EVAL_FILE = "eval.jsonl"
EVAL_TRAINERS = ("llm", "flow")


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


def _trainer_kind(config: Any) -> str:
    from adrpo_jax.train.config import ConfigError  # pylint: disable=import-outside-toplevel

    kind = config.trainer
    if kind not in EVAL_TRAINERS:
        raise ConfigError(f"--mode=eval supports the trainers {list(EVAL_TRAINERS)} (their evaluators); "
                          f"`trainer` is {kind!r}.", key="trainer", value=kind)
    return kind


def build_trainer(config: Any, workdir: str | os.PathLike, **kwargs: Any) -> Any:
    """The ``RLTrainer`` / ``FlowTrainer`` of ``config`` with its evaluator built (``eval_every`` >= 1)."""
    kind = _trainer_kind(config)
    if int(config.eval_every) <= 0:
        config = _config_copy(config, eval_every=max(int(config.total_steps), 1))
    if kind == "llm":
        from adrpo_jax.rl.trainer import RLTrainer  # pylint: disable=import-outside-toplevel
        return RLTrainer(config, workdir, **kwargs)
    from adrpo_jax.flow.trainer import FlowTrainer  # pylint: disable=import-outside-toplevel
    return FlowTrainer(config, workdir, **kwargs)


def _final_model_params(trainer: Any, kind: str, path: Path) -> Any:
    """The trainable parameters of ``path`` (a plain model: the trainer must be built without LoRA), sharded."""
    from flax import nnx  # pylint: disable=import-outside-toplevel

    if kind == "llm":
        from adrpo_jax.models.llm import load_pretrained  # pylint: disable=import-outside-toplevel
        from adrpo_jax.rl.trainer import _DTYPES  # pylint: disable=import-outside-toplevel
        m = trainer.config.model
        model = load_pretrained(path, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype])
    else:
        from adrpo_jax.models.dit import load_dit  # pylint: disable=import-outside-toplevel
        model = load_dit(path)
    params = nnx.state(model, trainer.trainable)
    return jax.device_put(params, trainer.state_shardings["params"])


def _final_step(config: Any, workdir: Path) -> int:
    from adrpo_jax.train.metrics import read_jsonl  # pylint: disable=import-outside-toplevel

    path = workdir / "metrics.jsonl"
    steps = [int(r["step"]) for r in read_jsonl(path) if "step" in r] if path.exists() else []
    return max(steps) if steps else int(config.total_steps)


def evaluate_run(config: Any, workdir: str | os.PathLike, *, trainer: Any = None,
                 write: bool = True) -> dict[str, Any]:
    """Evaluates the newest checkpoint (else ``final_model``) of the run in ``workdir``; returns the record
    (and appends it to ``workdir/eval.jsonl`` on process 0 when ``write``).

    Args:
      config: the run's config (validated by the trainer).
      workdir: the run directory.
      trainer: an already built ``RLTrainer`` / ``FlowTrainer`` of ``config`` with an evaluator (tests pass one
        built on tiny models; its class decides the kind); default: :func:`build_trainer` of ``config.trainer``.

    Raises:
      FileNotFoundError: neither a checkpoint nor ``final_model`` in ``workdir``.
      checkpoint.CheckpointMismatchError: the checkpoint does not fit the config's model.
    """
    from adrpo_jax.train.loop import checkpointer_from_config  # pylint: disable=import-outside-toplevel

    if trainer is not None:
        from adrpo_jax.flow.trainer import FlowTrainer  # pylint: disable=import-outside-toplevel
        kind = "flow" if isinstance(trainer, FlowTrainer) else "llm"
    else:
        kind = _trainer_kind(config)
    workdir = Path(os.path.abspath(os.fspath(workdir)))
    final_model = workdir / "final_model"
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
            step, state, _ = checkpointer.restore_latest(trainer.abstract_state)
            source, where = "checkpoint", str(checkpointer.directory / str(step))
        else:
            if trainer is None:  # final_model holds a plain (merged) model: build the trainer without LoRA
                plain = _config_copy(config, **{"lora.enabled": False}) if "lora" in config else config
                trainer = build_trainer(plain, workdir)
            elif getattr(trainer, "lora_config", None) is not None:
                raise ValueError("final_model holds the merged model: pass a trainer built without LoRA.")
            step = _final_step(config, workdir)
            state = {"params": _final_model_params(trainer, kind, final_model)}
            source, where = "final_model", str(final_model)
    finally:
        checkpointer.close()
    if trainer.evaluator is None:
        raise ValueError("the trainer has no evaluator (build it with eval_every > 0, see build_trainer).")
    log.info("Evaluating %s (step %d) on the eval set of %s ...", where, step, kind)
    start = time.perf_counter()
    metrics = jax.device_get(dict(trainer.eval_step(step, state)))
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
