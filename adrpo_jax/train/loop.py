"""The shared training driver: restore-or-init, step, log, evaluate, checkpoint, preempt, stop on NaN.

Both trainers only build their state and step function and call :func:`run_training`::

    abstract_state = sharding.plan_sharded(init_state, mesh)          # no allocation
    init_fn = lambda: sharding.create_sharded(init_state, abstract_state)
    step_jit = jax.jit(train_step, donate_argnums=0, ...)
    def step_fn(step, state):                                        # step = index of the step to run
        batch = sharding.host_local_to_global(data.batch_for(step), mesh)
        return step_jit(state, batch, jax.random.fold_in(base_key, step))
    result = run_training(config=config, workdir=workdir, init_state=init_fn, abstract_state=abstract_state,
                          train_step=step_fn, get_host_state=data.state_dict, set_host_state=data.load_state_dict)
    return result.to_dict()                                          # result.state: the final state

Contract:

* ``train_step(step, state) -> (state, metrics)``: ``step`` counts completed steps before this one (0 on a
  fresh run); ``metrics`` is a flat dict of scalars (device arrays are fine: they are fetched only at log
  time), with an optional boolean ``"skipped"`` (from ``step_utils.apply_updates_if_finite``). ``state`` is an
  array pytree saved as the orbax ``state`` item (no typed PRNG keys: keep ``jax.random.key_data``).
* Host-side state that is not in ``state`` (data-iterator position, numpy RNG, ...) goes through
  ``get_host_state() -> JSON-able dict`` (called at each save) and ``set_host_state(dict)`` (called once
  after a restore, before the first step). Derive per-step randomness from ``(seed, step)`` (e.g.
  ``jax.random.fold_in``) so a resumed run is bit-identical to an uninterrupted one.
* Logged records (one per logged step, JSONL/TensorBoard/W&B) hold the means of the numeric metrics over the
  steps since the previous record, plus ``step_time_s``, ``steps_per_sec``, ``<key>_per_sec`` for each
  ``throughput_keys`` entry (sum over the interval / train time), ``skipped_steps`` (in the interval),
  ``total_skipped_steps`` and ``learning_rate`` (if ``learning_rate_fn``); the evaluation's metrics (as
  returned by ``eval_step``, prefix them yourself, e.g. ``eval/``) are merged into the same record.
* Timing: the "train time" of an interval is its wall time minus the time spent in evaluation and checkpoint
  saves, so ``step_time_s``, ``steps_per_sec`` and ``<key>_per_sec`` describe the train steps alone. The
  excluded times are logged on their own: ``time/eval`` (the evaluation of this record's step, on a record
  with eval metrics) and ``time/checkpoint`` (the seconds spent in checkpoint saves since the previous
  record; a save follows the record of its step, so it shows on the next record). To attribute the device
  work exactly, the loop waits for the state (``jax.block_until_ready``) before an evaluation or a save,
  where the host would wait for it anyway (both read the state).
* One console line per record (process 0): the keys of ``logging.console_keys`` present in the record
  (``train.metrics.format_console``); with the tqdm bar on, it is written above the bar (``tqdm.write``) and
  the bar's postfix carries ``reward_mean`` (and ``kl_mean`` / ``w2_mean``, ``step_time_s``).
* Checkpoints every ``checkpoint.every_steps`` and at the end; SIGTERM/SIGINT: finish the current step,
  save, log, return normally with ``result.preempted = True`` (``launch.py`` exits 0). The final checkpoint
  is committed (``Checkpointer.wait``) while the preemption guard is still installed, so a signal during the
  commit of an async save cannot kill the process half-way (no ``*.orbax-checkpoint-tmp`` left behind).
* ``numerics.max_consecutive_skips`` consecutive skipped steps: save a checkpoint, write the record, raise
  :class:`NonFiniteUpdatesError`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from adrpo_jax.train.checkpoint import Checkpointer
from adrpo_jax.train.config import config_fingerprint, get_by_path
from adrpo_jax.train.metrics import (MetricWriter, ProgressBar, format_console, parse_console_keys,
                                     to_python_scalar)
from adrpo_jax.train.preemption import PreemptionGuard

__all__ = ["run_training", "TrainingResult", "NonFiniteUpdatesError", "checkpointer_from_config"]

log = logging.getLogger(__name__)
PyTree = Any

# Record keys the tqdm bar's postfix shows (those present).
PROGRESS_KEYS = ("reward_mean", "kl_mean", "w2_mean", "step_time_s")


class NonFiniteUpdatesError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (``numerics.max_consecutive_skips``)."""


@dataclasses.dataclass
class TrainingResult:
    """What :func:`run_training` returns.

    Attributes:
      step: completed steps (== ``total_steps`` unless preempted).
      preempted: True when a signal stopped the run (a checkpoint of ``step`` was saved).
      resumed_from: the checkpoint step the run resumed from, or None for a fresh start.
      stopped: the reward-hacking monitor's message when its stop rule ended the run early (else None).
      metrics: the last logged record (train means, timing, eval metrics), host Python scalars.
      state: the final train state (device arrays, sharded as ``abstract_state``).
    """

    step: int
    preempted: bool
    resumed_from: int | None
    metrics: dict[str, Any]
    state: PyTree = dataclasses.field(repr=False)
    stopped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"step", "preempted", "resumed_from", **metrics}`` (+ ``stopped``: why a monitor stopped the run)."""
        out = {**self.metrics, "step": self.step, "preempted": self.preempted, "resumed_from": self.resumed_from}
        if self.stopped:
            out["stopped"] = self.stopped
        return out


def checkpointer_from_config(config: Any, workdir: str | os.PathLike) -> Checkpointer:
    """The :class:`Checkpointer` for ``workdir/checkpoints`` configured by ``config.checkpoint``."""
    ck = config.checkpoint
    return Checkpointer(os.path.join(os.fspath(workdir), "checkpoints"), max_to_keep=ck.max_to_keep or None,
                        save_every=ck.every_steps, keep_period=ck.keep_period or None, async_save=ck.async_save)


_WARNED_NON_SCALAR: set[str] = set()


def _mean_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-key mean of numeric scalars over ``records`` (host values), except keys ending in ``_max`` / ``_min``: the
    maximum / minimum over the interval (a logged ``ratio_max`` is the largest ratio of the interval, not the mean of
    per-step maxima); strings: last value; arrays: dropped.

    >>> _mean_records([{"loss": 1.0, "ratio_max": 2.0, "ratio_min": 0.5}, {"loss": 3.0, "ratio_max": 1.0,
    ...                                                                  "ratio_min": 0.9}])
    {'loss': 2.0, 'ratio_max': 2.0, 'ratio_min': 0.5}
    """
    sums: dict[str, float] = {}
    extremes: dict[str, float] = {}
    counts: dict[str, int] = {}
    last: dict[str, Any] = {}
    for record in records:
        for key, value in record.items():
            try:
                value = to_python_scalar(value)
            except ValueError:
                if key not in _WARNED_NON_SCALAR:
                    _WARNED_NON_SCALAR.add(key)
                    log.warning("Metric %r is not a scalar (shape %s); it is not logged.", key, np.shape(value))
                continue
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)) or value in ("NaN", "Infinity", "-Infinity"):
                v = float(value)
                if key.endswith(("_max", "_min")):
                    prev = extremes.get(key)
                    if prev is None or np.isnan(v):  # a NaN sticks, as it does in a mean
                        extremes[key] = v
                    elif not np.isnan(prev):
                        extremes[key] = max(prev, v) if key.endswith("_max") else min(prev, v)
                    continue
                sums[key] = sums.get(key, 0.0) + v
                counts[key] = counts.get(key, 0) + 1
            else:
                last[key] = value
    out = {k: sums[k] / counts[k] for k in sums}
    out.update(extremes)
    out.update({k: v for k, v in last.items() if k not in out})
    return out


def run_training(*, config: Any, workdir: str | os.PathLike, init_state: Callable[[], PyTree],
                 abstract_state: PyTree, train_step: Callable[[int, PyTree], tuple[PyTree, Mapping[str, Any]]],
                 get_host_state: Callable[[], Mapping[str, Any]] | None = None,
                 set_host_state: Callable[[Mapping[str, Any]], None] | None = None,
                 eval_step: Callable[[int, PyTree], Mapping[str, Any]] | None = None,
                 learning_rate_fn: Callable[[int], Any] | None = None,
                 throughput_keys: Sequence[str] = (),
                 writer: MetricWriter | None = None,
                 checkpointer: Checkpointer | None = None,
                 monitor: Any = None) -> TrainingResult:
    """Runs (or resumes) training to ``config.total_steps``; see the module docstring for the contract.

    Args:
      config: the locked experiment config (common sections of ``config.py``).
      workdir: run directory (``metrics.jsonl``, ``tb/``, ``checkpoints/``).
      init_state: ``() -> state``; called only when there is no checkpoint (build it sharded, e.g.
        ``sharding.create_sharded``).
      abstract_state: ``jax.ShapeDtypeStruct`` tree (with shardings) of the state: the restore target.
      train_step: ``(step, state) -> (state, metrics)``.
      get_host_state / set_host_state: JSON-able host state saved in each checkpoint's ``meta``.
      eval_step: ``(step, state) -> metrics``, run every ``config.eval_every`` steps and at the end (if
        ``eval_every`` > 0), on the state after ``step`` completed steps.
      learning_rate_fn: ``step -> lr`` logged as ``learning_rate`` (e.g. the optimizer schedule).
      throughput_keys: metric names (e.g. ``'num_tokens'``) also logged as ``<name>_per_sec``.
      writer / checkpointer: override the defaults built from ``config.logging`` / ``config.checkpoint``.
      monitor: an optional :class:`~adrpo_jax.train.monitor.RewardHackingMonitor`: it sees every record (its
        ``monitor/*`` metrics join the evaluation records), its state is checkpointed with the host state, and
        when its stop rule fires the loop saves a checkpoint of that step and returns (``stopped`` set).

    Returns:
      a :class:`TrainingResult` (``.to_dict()`` is what a trainer's ``train_and_evaluate`` returns).

    Raises:
      NonFiniteUpdatesError: after ``numerics.max_consecutive_skips`` consecutive skipped steps (a
        checkpoint of that step is saved first).
      checkpoint.CheckpointMismatchError: the latest checkpoint does not fit ``abstract_state``.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    total_steps = int(config.total_steps)
    log_every = int(config.log_every)
    eval_every = int(get_by_path(config, "eval_every", 0) or 0)
    max_skips = int(get_by_path(config, "numerics.max_consecutive_skips", 10))
    own_writer = writer is None
    own_checkpointer = checkpointer is None
    if writer is None:
        writer = MetricWriter(workdir, get_by_path(config, "logging", None), run_config=config)
    if checkpointer is None:
        checkpointer = checkpointer_from_config(config, workdir)
    fingerprint = config_fingerprint(config)
    throughput_keys = tuple(throughput_keys)
    console_keys = parse_console_keys(get_by_path(config, "logging.console_keys", None))

    consecutive_skips = 0
    total_skips = 0
    resumed_from = None
    try:
        restored = checkpointer.restore_latest(abstract_state)
        if restored is not None:
            start, state, meta = restored
            resumed_from = start
            loop_meta = meta.get("loop", {})
            consecutive_skips = int(loop_meta.get("consecutive_skips", 0))
            total_skips = int(loop_meta.get("total_skips", 0))
            if set_host_state is not None:
                set_host_state(meta.get("host_state", {}))
            if monitor is not None and meta.get("monitor") is not None:
                monitor.load_state_dict(meta["monitor"])
            if meta.get("config_fingerprint") not in (None, fingerprint):
                log.warning("Resuming from step %d of a run with a different config (fingerprint %s, now %s).",
                            start, meta.get("config_fingerprint"), fingerprint)
            writer.truncate_after(start)
            log.info("Resumed from checkpoint step %d (%s).", start, checkpointer.directory)
        else:
            start = 0
            state = init_state()
            writer.truncate_after(0)
        if start >= total_steps:
            if start > total_steps:
                log.warning("Checkpoint step %d is beyond total_steps=%d: nothing to do.", start, total_steps)
            else:
                log.info("Training already finished at step %d.", start)
            return TrainingResult(step=start, preempted=False, resumed_from=resumed_from, metrics={}, state=state)

        def make_meta() -> dict[str, Any]:
            host = dict(get_host_state()) if get_host_state is not None else {}
            meta = {"host_state": host, "config_fingerprint": fingerprint, "wall_time": time.time(),
                    "loop": {"consecutive_skips": consecutive_skips, "total_skips": total_skips}}
            if monitor is not None:
                meta["monitor"] = monitor.state_dict()
            return meta

        progress = ProgressBar(total_steps, start, enabled=bool(get_by_path(config, "logging.progress_bar", True)),
                               is_primary=writer.is_primary)
        buffer: list[Mapping[str, Any]] = []
        interval_start = time.perf_counter()
        interval_steps = 0
        interval_skips = 0
        interval_eval_s = None  # seconds of the evaluation of this interval (None: none ran)
        interval_ckpt_s = None  # seconds of checkpoint saves since the previous record (None: none)
        last_record: dict[str, Any] = {}
        preempted = False
        stopped = None
        done = start

        def timed_save(step: int, force: bool) -> None:
            """``checkpointer.save``, its time added to ``interval_ckpt_s`` (when it writes)."""
            nonlocal interval_ckpt_s
            if not checkpointer.should_save(step, force=force):
                return
            jax.block_until_ready(state)  # the save reads the state: the host waits for it anyway
            t0 = time.perf_counter()
            checkpointer.save(step, state, make_meta(), force=force)
            interval_ckpt_s = (interval_ckpt_s or 0.0) + time.perf_counter() - t0

        def timed_wait() -> None:
            nonlocal interval_ckpt_s
            t0 = time.perf_counter()
            checkpointer.wait()
            interval_ckpt_s = (interval_ckpt_s or 0.0) + time.perf_counter() - t0

        def flush_record(done: int, eval_metrics: Mapping[str, Any] | None) -> dict[str, Any]:
            nonlocal buffer, interval_start, interval_steps, interval_skips, interval_eval_s, interval_ckpt_s
            record: dict[str, Any] = {}
            if buffer:
                host = jax.device_get(buffer)
                excluded = (interval_eval_s or 0.0) + (interval_ckpt_s or 0.0)
                elapsed = max(time.perf_counter() - interval_start - excluded, 1e-9)
                mean = _mean_records([{k: v for k, v in m.items() if k != "skipped"} for m in host])
                record.update(mean)
                record["step_time_s"] = elapsed / max(interval_steps, 1)
                record["steps_per_sec"] = interval_steps / elapsed if elapsed > 0 else float("nan")
                for key in throughput_keys:
                    values = [to_python_scalar(m[key]) for m in host if key in m]
                    total = sum((float(v) for v in values if v is not None), 0.0)
                    record[f"{key}_per_sec"] = total / elapsed if elapsed > 0 else float("nan")
                record["skipped_steps"] = interval_skips
                record["total_skipped_steps"] = total_skips
                if learning_rate_fn is not None:
                    record["learning_rate"] = to_python_scalar(learning_rate_fn(done))
                if interval_ckpt_s is not None:
                    record["time/checkpoint"] = interval_ckpt_s
                buffer = []
                interval_start = time.perf_counter()
                interval_steps = 0
                interval_skips = 0
                interval_ckpt_s = None
            if eval_metrics:
                record.update({k: to_python_scalar(v) for k, v in jax.device_get(dict(eval_metrics)).items()})
                if interval_eval_s is not None:
                    record["time/eval"] = interval_eval_s
            interval_eval_s = None
            if record and monitor is not None:
                record.update(monitor.update({"step": done, **record}))
            if record:
                writer.write(done, record)
                if writer.is_primary:
                    line = f"step {done}/{total_steps}: {format_console(record, console_keys)}"
                    if progress.active:
                        progress.write(line)  # above the bar: one line per record, the bar redrawn below
                    else:
                        log.info("%s", line)
            return record

        with PreemptionGuard() as guard:
            try:
                for step in range(start, total_steps):
                    state, metrics = train_step(step, state)
                    if not isinstance(metrics, Mapping):
                        raise TypeError(f"train_step must return (state, metrics: dict), got metrics of type "
                                        f"{type(metrics).__name__}.")
                    done = step + 1
                    interval_steps += 1
                    buffer.append(metrics)
                    if "skipped" in metrics and bool(np.asarray(jax.device_get(metrics["skipped"]))):
                        consecutive_skips += 1
                        total_skips += 1
                        interval_skips += 1
                    else:
                        consecutive_skips = 0
                    is_last = done == total_steps
                    if consecutive_skips >= max_skips:
                        timed_save(done, True)
                        timed_wait()
                        last_record = flush_record(done, None)
                        raise NonFiniteUpdatesError(
                            f"{consecutive_skips} consecutive steps (steps {done - consecutive_skips + 1}-{done}) had "
                            f"a non-finite loss or gradient; their updates were skipped. Stopping because "
                            f"numerics.max_consecutive_skips={max_skips}. A checkpoint of step {done} was saved in "
                            f"{checkpointer.directory}. Check the data and lower optim.learning_rate.")
                    eval_metrics = None
                    if eval_step is not None and eval_every > 0 and (done % eval_every == 0 or is_last):
                        jax.block_until_ready(state)  # the step's device work belongs to the train time
                        t0 = time.perf_counter()
                        eval_metrics = jax.block_until_ready(eval_step(done, state))
                        interval_eval_s = time.perf_counter() - t0
                    if done % log_every == 0 or is_last or eval_metrics:
                        last_record = flush_record(done, eval_metrics) or last_record
                    if monitor is not None and monitor.decision is not None:
                        timed_save(done, True)
                        timed_wait()
                        stopped = monitor.decision.message
                        log.warning("%s", stopped)
                        break
                    timed_save(done, is_last)
                    progress.update(done, {k: last_record[k] for k in PROGRESS_KEYS if k in last_record})
                    if not is_last and guard.should_stop(done):
                        if buffer:
                            last_record = flush_record(done, None) or last_record
                        timed_save(done, True)
                        timed_wait()
                        preempted = True
                        log.warning("Preempted (%s) at step %d/%d: checkpoint saved in %s. Re-run the same command "
                                    "to resume.", guard.signal_name or "stop requested by another process", done,
                                    total_steps, checkpointer.directory)
                        break
                else:
                    # Commit the final (async) checkpoint while the guard still holds SIGTERM/SIGINT: a signal
                    # now only sets a flag, so the commit finishes (no *.orbax-checkpoint-tmp, exit 0).
                    checkpointer.wait()
                    log.info("Training finished at step %d.", total_steps)
            finally:
                progress.close()
        return TrainingResult(step=done, preempted=preempted, resumed_from=resumed_from, metrics=dict(last_record),
                              state=state, stopped=stopped)
    finally:
        try:
            checkpointer.wait()
        finally:
            if own_checkpointer:
                checkpointer.close()
            if own_writer:
                writer.close()
            else:
                writer.flush()
