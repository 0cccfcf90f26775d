"""Orbax checkpointing of the train state with integrity fallback and config-mismatch errors.

Layout (``directory`` is ``workdir/checkpoints``)::

    checkpoints/<step>/state/   StandardSave of the array pytree (params, optimizer state, ...)
    checkpoints/<step>/meta/    JsonSave: {"step", data-iterator state, RNG key data, config fingerprint, ...}

Semantics:

* ``save`` writes when ``force`` or ``step % save_every == 0`` (and the step is not saved yet). Orbax writes
  into ``<step>.orbax-checkpoint-tmp-*`` and renames it on commit, so a save killed half-way leaves only a
  tmp directory: it is never taken for a checkpoint and is deleted when the next ``Checkpointer`` opens the
  directory. With ``async_save`` the device->host copy happens inside ``save`` (donating the state
  afterwards is safe) and the files are written in the background; ``wait()`` blocks until committed.
* ``restore_latest(abstract_state)`` first compares the saved tree's metadata with the target: a missing or
  extra key, or a shape/dtype difference, raises :class:`CheckpointMismatchError` naming the first bad
  parameter and both shapes (a config error: never "fixed" by falling back). A checkpoint whose metadata or
  data cannot be read (truncated/deleted files, ...) is skipped and the previous step tried; once an older
  step restores, each unreadable one is moved aside to ``<directory>/corrupted.<step>.<time>`` (never
  deleted) and reported with *one* warning line (the step, the reason, where it went, the step resumed from).
  The tracebacks a failed read leaves behind (``RuntimeError: Event loop is closed``, raised by tensorstore
  reads still completing after orbax closed its per-call event loop: harmless, three lines per array) are
  dropped and counted (:func:`closed_event_loop_errors`). If no step restores, nothing is moved and
  :class:`CheckpointRestoreError` lists every reason.
* Arrays are restored directly into the shardings of ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves
  with ``.sharding``, e.g. from ``sharding.plan_sharded``), so a checkpoint written on one mesh restores
  onto another.
* Multi-process: every process must call ``save``/``restore_latest``/``wait`` (orbax writes collectively:
  each process writes the shards it owns, process 0 commits). The directory must be on storage shared by
  all processes.

Orbax keeps no checksums of array data: a bit flip inside raw array bytes is not detectable; truncated,
missing or undecodable files are.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

__all__ = [
    "Checkpointer",
    "CheckpointMismatchError",
    "CheckpointRestoreError",
    "CheckpointSaveError",
    "rng_to_meta",
    "rng_from_meta",
    "check_tree_matches",
    "closed_event_loop_errors",
]

log = logging.getLogger(__name__)
PyTree = Any


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree (keys, shapes, dtypes) differs from the current model/config's state."""


class CheckpointRestoreError(RuntimeError):
    """No checkpoint step in the directory could be restored."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, ...); the previous checkpoints are left intact."""


# ----------------------------------------------------------------------------------------------------------
# The noise of a failed read
# ----------------------------------------------------------------------------------------------------------

_dropped = {"count": 0}


def _is_closed_loop_error(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def closed_event_loop_errors() -> int:
    """How many ``RuntimeError: Event loop is closed`` reports were dropped after failed checkpoint reads."""
    return _dropped["count"]


def _is_sibling_read_error(record: logging.LogRecord, exc: BaseException | None) -> bool:
    """asyncio's ``Task exception was never retrieved`` for another array's tensorstore read of the failed step
    (orbax awaits the first failure only; the error is already reported, by step, by :meth:`restore_latest`)."""
    return (exc is not None and "never retrieved" in str(record.msg) and "tensorstore_spec" in str(exc))


class _ClosedLoopFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if _is_closed_loop_error(exc) or _is_sibling_read_error(record, exc):
            _dropped["count"] += 1
            return False
        return True


def _drop_closed_event_loop_errors() -> None:
    """Drops the ``Event loop is closed`` reports of a failed orbax read from now on (idempotent).

    Orbax runs each read in a fresh event loop that it closes as soon as one array fails; the tensorstore
    reads of the other arrays still complete and their callbacks raise ``RuntimeError('Event loop is
    closed')``, reported as unraisable exceptions, through ``threading.excepthook`` or asyncio's logger: a
    three-line traceback per array (~190 lines for a small model), after the fact, alarming and harmless.
    The reads that fail too (every array of a deleted store) end as asyncio's ``Task exception was never
    retrieved`` with the tensorstore error: dropped as well. Only those exact errors are dropped (and counted);
    everything else reaches the previous hooks."""
    if not getattr(sys.unraisablehook, "_adrpo_closed_loop", False):
        previous = sys.unraisablehook

        def unraisable(info, previous=previous):
            if _is_closed_loop_error(info.exc_value):
                _dropped["count"] += 1
                return
            previous(info)

        unraisable.__dict__["_adrpo_closed_loop"] = True
        sys.unraisablehook = unraisable
    if not getattr(threading.excepthook, "_adrpo_closed_loop", False):
        previous_thread = threading.excepthook

        def excepthook(args, previous=previous_thread):
            if _is_closed_loop_error(args.exc_value):
                _dropped["count"] += 1
                return
            previous(args)

        excepthook.__dict__["_adrpo_closed_loop"] = True
        threading.excepthook = excepthook
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _ClosedLoopFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_ClosedLoopFilter())


def _short_reason(err: BaseException) -> str:
    """``Type: first line`` of an orbax / tensorstore error, without its multi-kilobyte ``tensorstore_spec``."""
    text = str(err).splitlines()[0] if str(err) else ""
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", text)
    text = text if len(text) <= 300 else text[:300] + " ..."
    return f"{type(err).__name__}: {text}"


# ----------------------------------------------------------------------------------------------------------
# RNG keys in meta
# ----------------------------------------------------------------------------------------------------------


def rng_to_meta(key: jax.Array) -> dict[str, Any]:
    """JSON-able form of a PRNG key (typed ``jax.random.key`` or raw ``uint32`` key data).

    >>> k = jax.random.key(3)
    >>> bool((jax.random.key_data(rng_from_meta(rng_to_meta(k))) == jax.random.key_data(k)).all())
    True
    """
    key = jax.device_get(key)
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(key) if typed else key)
    return {"typed": bool(typed), "impl": str(jax.random.key_impl(key)) if typed else None,
            "shape": list(data.shape), "data": data.astype(np.uint32).ravel().tolist()}


def rng_from_meta(meta: Mapping[str, Any]) -> jax.Array:
    """Inverse of :func:`rng_to_meta`."""
    data = np.asarray(meta["data"], np.uint32).reshape(meta["shape"])
    if meta.get("typed"):
        impl = meta.get("impl")
        key_data = jax.numpy.asarray(data)
        return jax.random.wrap_key_data(key_data, impl=impl) if impl else jax.random.wrap_key_data(key_data)
    return jax.numpy.asarray(data)


# ----------------------------------------------------------------------------------------------------------
# Tree comparison
# ----------------------------------------------------------------------------------------------------------


def _key_str(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def _display(path: tuple[str, ...]) -> str:
    if len(path) > 1 and path[-1] == "value":  # nnx.Variable leaves
        path = path[:-1]
    return "/".join(path)


def _is_array_like(x: Any) -> bool:
    # nnx.Variable exposes .shape/.dtype too, but it is a pytree node whose child is the array.
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, nnx.Variable)


def _flatten(tree: PyTree) -> dict[tuple[str, ...], Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_like)
    return {tuple(_key_str(k) for k in path): leaf for path, leaf in leaves}


def _fmt(shape: Any, dtype: Any) -> str:
    return f"{tuple(shape)} {np.dtype(dtype).name if dtype is not None else '?'}"


def _layers_layout(paths) -> set[str]:
    """'list' (``layers/<i>/...``) and/or 'stacked' (``layers/...``, a leading [L] axis) for a decoder's layers."""
    out = set()
    for p in paths:
        if "layers" in p[:-1]:
            i = p.index("layers")
            out.add("list" if p[i + 1].isdigit() else "stacked")
    return out


def _layers_layout_hint(saved_flat: dict, target_flat: dict) -> str:
    """A note naming both layer layouts when the checkpoint's differs from the current model's."""
    saved, target = _layers_layout(saved_flat), _layers_layout(target_flat)
    names = {"list": "the per-layer list layout (`layers/<i>/...`, DecoderConfig.scan_layers=False or a "
                     "checkpoint written before layer stacking)",
             "stacked": "the stacked layout (`layers/...` with a leading [L] axis, DecoderConfig.scan_layers=True)"}
    if len(saved) == 1 and len(target) == 1 and saved != target:
        (s,), (t,) = saved, target
        return (f" (its decoder layers are in {names[s]}, the current model's in {names[t]}: resume with "
                f"scan_layers={s == 'stacked'}, e.g. `model.scan_layers: {str(s == 'stacked').lower()}`)")
    return ""


def check_tree_matches(saved: PyTree, target: PyTree, *, what: str = "checkpoint") -> None:
    """Raises :class:`CheckpointMismatchError` at the first key/shape/dtype difference (target order).

    ``saved`` is orbax metadata (leaves with ``shape``/``dtype``) and ``target`` the abstract state.
    """
    saved_flat = _flatten(saved)
    target_flat = _flatten(target)
    what = what + _layers_layout_hint(saved_flat, target_flat)
    # Report model parameters before optimizer-state entries (which mirror them).
    order = sorted(target_flat, key=lambda p: (bool(p) and p[0].startswith("opt"),))
    target_flat = {p: target_flat[p] for p in order}
    for path, t in target_flat.items():
        if path not in saved_flat:
            raise CheckpointMismatchError(
                f"{what} does not match the current model/config: parameter `{_display(path)}` "
                f"{_fmt(t.shape, t.dtype)} exists now but is missing from the checkpoint.")
        s = saved_flat[path]
        s_dtype = getattr(s, "dtype", None)
        same_dtype = s_dtype is None or np.dtype(s_dtype) == np.dtype(t.dtype)
        if tuple(s.shape) != tuple(t.shape) or not same_dtype:
            raise CheckpointMismatchError(
                f"{what} does not match the current model/config: parameter `{_display(path)}` has shape "
                f"{_fmt(s.shape, s_dtype)} in the checkpoint but {_fmt(t.shape, t.dtype)} now.")
    for path, s in saved_flat.items():
        if path not in target_flat:
            raise CheckpointMismatchError(
                f"{what} does not match the current model/config: the checkpoint has parameter "
                f"`{_display(path)}` {_fmt(s.shape, getattr(s, 'dtype', None))} that the current state lacks.")


def _check_abstract(abstract_state: PyTree) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state, is_leaf=_is_array_like)[0]
    for path, leaf in leaves:
        if not _is_array_like(leaf) or getattr(leaf, "sharding", None) is None:
            name = _display(tuple(_key_str(k) for k in path))
            raise ValueError(f"`abstract_state` leaf `{name}` must be a jax.ShapeDtypeStruct with a sharding (or a "
                             f"jax.Array), got {leaf!r}; build it with `sharding.plan_sharded`.")


def _check_savable(state: PyTree) -> None:
    for path, leaf in _flatten(state).items():
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise ValueError(f"`state` leaf `{_display(path)}` is a typed PRNG key; store "
                             "`jax.random.key_data(key)` (or put it in `meta` with `rng_to_meta`).")


# ----------------------------------------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves/restores ``(step, state pytree, meta dict)`` with orbax ``CheckpointManager``.

    Args:
      directory: checkpoint root (created if needed), e.g. ``workdir/checkpoints``.
      max_to_keep: keep the newest N steps (``None``/0 = keep all).
      save_every: ``save`` without ``force`` writes only when ``step % save_every == 0``.
      keep_period: additionally keep steps that are multiples of this (``None``/0 = off).
      async_save: write in a background thread (call :meth:`wait` before exiting; :meth:`close` does).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, save_every: int = 1,
                 keep_period: int | None = None, async_save: bool = False):
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"`save_every` must be a positive int, got {save_every!r}.")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 0):
            raise ValueError(f"`max_to_keep` must be a non-negative int or None, got {max_to_keep!r}.")
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        self.save_every = save_every
        self._async = bool(async_save)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep or None,
            keep_period=keep_period or None,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=self._async,
        )
        self._options = options
        self._manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, options=self._options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    # -- queries ---------------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed checkpoint steps, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save ------------------------------------------------------------------------------------------------

    def should_save(self, step: int, *, force: bool = False) -> bool:
        """True when :meth:`save` would write ``step``."""
        return (force or step % self.save_every == 0) and step not in self._manager.all_steps()

    def save(self, step: int, state: PyTree, meta: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Saves ``state`` (array pytree) and ``meta`` (JSON-able dict; ``step`` is added) at ``step``.

        Returns True if a checkpoint was written (started, with ``async_save``). All processes must call it.
        """
        step = int(step)
        if not self.should_save(step, force=force):
            return False
        _check_savable(state)
        meta = dict(meta or {})
        meta["step"] = step
        try:
            saved = self._manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True)
        except Exception as err:  # pylint: disable=broad-except  # OSError, or orbax wrapping one
            raise self._save_error(step, err) from err
        if saved:
            log.info("Checkpoint %s at step %d%s.", self.directory, step, " (async)" if self._async else "")
        return bool(saved)

    def wait(self) -> None:
        """Blocks until pending async saves are committed; raises :class:`CheckpointSaveError` if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # pylint: disable=broad-except
            raise self._save_error(None, err) from err

    def _save_error(self, step: int | None, err: BaseException) -> CheckpointSaveError:
        """The clear message of a failed save: what failed, the intact previous step, how to go on."""
        try:
            previous = [s for s in self.all_steps() if step is None or s < step]
        except Exception:  # pylint: disable=broad-except
            previous = []
        what = f"step {step}" if step is not None else "an asynchronous save"
        kept = (f"the previous checkpoint (step {previous[-1]}) is intact" if previous else
                "there is no previous checkpoint")
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        message = (f"Saving checkpoint {what} in {self.directory} failed ({reason}); {kept}. Stopping: free disk "
                   "space or fix the directory's permissions, then re-run the same command to resume"
                   + (f" from step {previous[-1]}." if previous else "."))
        log.error("%s", message)
        return CheckpointSaveError(message)

    # -- restore ---------------------------------------------------------------------------------------------

    def _saved_tree(self, step: int) -> PyTree:
        state_md = self._manager.item_metadata(step)["state"]
        if state_md is None:
            raise ValueError("no readable metadata for item 'state'")
        tree = getattr(state_md, "tree", state_md)
        if tree is None:
            raise ValueError("empty metadata tree for item 'state'")
        return tree

    def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """Restores exactly ``step`` into ``abstract_state``'s structure/shardings; no fallback.

        Raises CheckpointMismatchError on a tree difference; other errors propagate from orbax.
        """
        self.wait()
        saved = self._saved_tree(step)
        check_tree_matches(saved, abstract_state, what=f"Checkpoint step {step} in {self.directory}")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          meta=ocp.args.JsonRestore()))
        meta = dict(restored["meta"] or {})
        if meta.get("step", step) != step:
            warnings.warn(f"Checkpoint step {step}: meta says step {meta.get('step')}.", stacklevel=2)
        return restored["state"], meta

    def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
        """``(step, state, meta)`` of the newest restorable checkpoint, or None if there is none.

        A step that cannot be read is warned about and the previous one tried; once an older step restores,
        the unreadable newer ones are moved aside (so later saves of those steps work). If no step restores,
        nothing is moved and :class:`CheckpointRestoreError` lists every reason.
        """
        _check_abstract(abstract_state)
        self.wait()
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        # Before the first read: a failing read's sibling callbacks can report "Event loop is closed" from their
        # threads before the failure reaches the except clauses below.
        _drop_closed_event_loop_errors()
        failures: list[tuple[int, str]] = []
        for step in steps:
            try:
                saved = self._saved_tree(step)
            except Exception as err:  # pylint: disable=broad-except  # unreadable metadata = corruption
                _drop_closed_event_loop_errors()
                failures.append((step, self._corrupted(step, f"unreadable metadata: {_short_reason(err)}")))
                continue
            # A tree mismatch is a config error, not corruption: raise, never fall back.
            check_tree_matches(saved, abstract_state, what=f"Checkpoint step {step} in {self.directory}")
            try:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                  meta=ocp.args.JsonRestore()))
            except Exception as err:  # pylint: disable=broad-except
                _drop_closed_event_loop_errors()
                failures.append((step, self._corrupted(step, f"restore failed: {_short_reason(err)}")))
                continue
            for bad_step, message in failures:
                moved = self._quarantine(bad_step)
                log.warning("%s; resumed from step %d%s.", message, step,
                            f" (moved it to {moved})" if moved else "")
            meta = dict(restored["meta"] or {})
            log.info("Restored checkpoint step %d from %s.", step, self.directory)
            return step, restored["state"], meta
        raise CheckpointRestoreError(f"No checkpoint in {self.directory} could be restored (nothing was moved):\n  " +
                                     "\n  ".join(reason for _, reason in failures))

    def _corrupted(self, step: int, reason: str) -> str:
        """The message of an unreadable step (logged once by :meth:`restore_latest`, when it falls back)."""
        log.info("Checkpoint step %d in %s cannot be read (%s); trying the previous one.", step, self.directory,
                 reason)
        return f"Checkpoint step {step} in {self.directory} is corrupted or incomplete ({reason})"

    def _quarantine(self, step: int) -> str | None:
        """Moves a corrupted step directory aside so that later saves/restores ignore it; returns where to."""
        src = self.directory / str(step)
        dst = self.directory / f"corrupted.{step}.{int(time.time())}"
        moved = None
        if jax.process_index() == 0 and src.exists():
            try:
                src.rename(dst)
                moved = str(dst)
            except OSError as err:
                log.warning("Could not move corrupted checkpoint %s aside: %s", src, err)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"adrpo_checkpoint_quarantine_{step}")
        self._manager.reload()
        return moved

    # -- lifecycle -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for pending saves and releases orbax resources (raises :class:`CheckpointSaveError` after
        releasing them if a pending save failed)."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as err:  # pylint: disable=broad-except  # a failed save may resurface here
                log.warning("Closing the checkpoint manager: %s: %s", type(err).__name__, err)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
