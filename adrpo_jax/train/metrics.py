"""Metric writing (JSONL, TensorBoard, W&B) and the terminal progress bar. Process 0 only.

``workdir/metrics.jsonl`` gets one JSON object per logged step, ``{"step": s, "name": value, ...}``, in step
order. Values are Python ``int``/``float``/``bool``; non-finite floats are written as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (strict JSON has no NaN; ``float(v)`` turns them back into
floats, and ``json.loads`` of the line never fails). On resume from step ``s`` the loop calls
:meth:`MetricWriter.truncate_after` so a preempted-and-resumed run has exactly one line per logged step.

TensorBoard events go to ``workdir/tb`` (tensorboardX; on resume the writer is opened with
``purge_step=s + 1`` so TensorBoard hides the events a preempted run wrote after its last checkpoint).
W&B is used when ``logging.wandb`` is set and ``wandb`` imports (else a warning); the run id is kept in
``workdir/wandb_run_id`` so a resumed run continues the same W&B run.

>>> import tempfile, json, os
>>> d = tempfile.mkdtemp()
>>> w = MetricWriter(d, {"jsonl": True, "tensorboard": False, "wandb": False}, is_primary=True)
>>> w.write(1, {"loss": 0.5, "bad": float("nan")})
>>> w.close()
>>> json.loads(open(os.path.join(d, "metrics.jsonl")).read())
{'step': 1, 'loss': 0.5, 'bad': 'NaN'}
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np

from adrpo_jax.train.config import DEFAULT_CONSOLE_KEYS, parse_console_keys

__all__ = ["MetricWriter", "ProgressBar", "to_python_scalar", "read_jsonl", "format_console", "parse_console_keys",
           "DEFAULT_CONSOLE_KEYS"]

log = logging.getLogger(__name__)


def to_python_scalar(value: Any) -> int | float | bool | str | None:
    """A JSON-safe Python scalar for a Python/numpy/jax scalar (non-finite floats -> 'NaN'/'Infinity'/...)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(jax.device_get(value))
        if arr.size != 1:
            raise ValueError(f"Metric value must be a scalar, got an array of shape {arr.shape}.")
        value = arr.reshape(()).item()
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    try:
        return to_python_scalar(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"Metric value {value!r} ({type(value).__name__}) is not a scalar.") from None


def _format_value(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key.startswith("time/") or key.endswith("_time_s"):
        return f"{value:.3g}s"
    if key.endswith("_per_sec"):
        return f"{value:.4g}"
    return f"{value:.4g}"


def format_console(record: Mapping[str, Any], keys: tuple[str, ...] | None = DEFAULT_CONSOLE_KEYS) -> str:
    """The console line of a record: ``key=value`` for the ``keys`` present in it, in that order (None: every key);
    times as seconds (``time/rollout=1.23s``).

    >>> format_console({"loss": 1.0, "reward_mean": 0.25, "step_time_s": 1.234}, ("reward_mean", "step_time_s"))
    'reward_mean=0.25 step_time_s=1.23s'
    """
    keys = tuple(record) if keys is None else keys
    return " ".join(f"{k}={_format_value(k, record[k])}" for k in keys if k in record)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All objects of a metrics.jsonl file (skips a torn last line)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _import_summary_writer():
    """``tensorboardX.SummaryWriter`` without paying for ``import torch`` (3-4 s) when torch isn't loaded yet.

    tensorboardX's writer module does ``try: import torch`` at import time only to accept torch tensors; we
    pass numpy/Python values, so torch is hidden for the duration of that import when nobody imported it.
    """
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def _cfg(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    try:
        return config[key] if key in config else default  # noqa: SIM401 (a ConfigDict; TypeError: not a mapping)
    except TypeError:
        return getattr(config, key, default)


class MetricWriter:
    """Writes scalars (and optionally images) to JSONL / TensorBoard / W&B on the primary process.

    Args:
      workdir: run directory.
      logging_config: ``config.logging`` (keys ``jsonl``, ``tensorboard``, ``wandb``, ``wandb_project``,
        ``wandb_entity``); None = JSONL only.
      is_primary: defaults to ``jax.process_index() == 0``; a non-primary writer writes nothing at all.
      run_config: optional full config (dict/ConfigDict) recorded as W&B config and TensorBoard text.
    """

    def __init__(self, workdir: str | os.PathLike, logging_config: Any = None, *, is_primary: bool | None = None,
                 run_config: Any = None):
        self.workdir = os.fspath(workdir)
        self.is_primary = (jax.process_index() == 0) if is_primary is None else bool(is_primary)
        self._jsonl = bool(_cfg(logging_config, "jsonl", True))
        self._tensorboard = bool(_cfg(logging_config, "tensorboard", False))
        self._wandb_enabled = bool(_cfg(logging_config, "wandb", False))
        self._wandb_project = _cfg(logging_config, "wandb_project", "adrpo_jax")
        self._wandb_entity = _cfg(logging_config, "wandb_entity", "") or None
        self._run_config = run_config
        self._tb = None
        self._tb_purge_step: int | None = None
        self._wandb = None
        self._jsonl_file: TextIO | None = None
        if not self.is_primary:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if self._wandb_enabled:
            self._init_wandb()

    @property
    def jsonl_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    # -- backends --------------------------------------------------------------------------------------------

    def _init_wandb(self) -> None:
        try:
            import wandb  # pylint: disable=import-outside-toplevel
        except ImportError:
            warnings.warn("logging.wandb=True but `wandb` is not installed; W&B logging is off "
                          "(pip install wandb).", RuntimeWarning, stacklevel=3)
            return
        id_file = os.path.join(self.workdir, "wandb_run_id")
        if os.path.exists(id_file):
            with open(id_file, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w", encoding="utf-8") as f:
                f.write(run_id)
        config = self._run_config.to_dict() if hasattr(self._run_config, "to_dict") else self._run_config
        self._wandb = wandb.init(project=self._wandb_project, entity=self._wandb_entity, id=run_id, resume="allow",
                                 dir=self.workdir, config=config)

    def _tb_writer(self):
        if self._tb is None and self._tensorboard:
            try:
                SummaryWriter = _import_summary_writer()  # pylint: disable=invalid-name
            except ImportError:
                warnings.warn("logging.tensorboard=True but tensorboardX is not installed; TensorBoard is off.",
                              RuntimeWarning, stacklevel=3)
                self._tensorboard = False
                return None
            self._tb = SummaryWriter(os.path.join(self.workdir, "tb"), purge_step=self._tb_purge_step,
                                     flush_secs=30)
            if self._run_config is not None:
                text = self._run_config.to_json_best_effort(indent=2) if hasattr(
                    self._run_config, "to_json_best_effort") else json.dumps(self._run_config, indent=2, default=repr)
                self._tb.add_text("config", "```\n" + text + "\n```", 0)
        return self._tb

    # -- API -------------------------------------------------------------------------------------------------

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends ``{"step": step, **scalars}`` (scalars: Python/numpy/jax scalars) to every backend."""
        if not self.is_primary:
            return
        step = int(step)
        clean = {str(k): to_python_scalar(v) for k, v in scalars.items() if k != "step"}
        if self._jsonl:
            if self._jsonl_file is None:
                self._jsonl_file = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (kept open, closed by close())
            self._jsonl_file.write(json.dumps({"step": step, **clean}) + "\n")
            self._jsonl_file.flush()
        tb = self._tb_writer()
        if tb is not None:
            for key, value in clean.items():
                if isinstance(value, (bool, int, float)) or value in ("NaN", "Infinity", "-Infinity"):
                    tb.add_scalar(key, float(value), step)
        if self._wandb is not None:
            self._wandb.log({k: (float(v) if v in ("NaN", "Infinity", "-Infinity") else v)
                             for k, v in clean.items()}, step=step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Logs images (``[H, W]``, ``[H, W, C]`` uint8 or float in [0, 1]) to TensorBoard / W&B."""
        if not self.is_primary:
            return
        tb = self._tb_writer()
        for key, image in images.items():
            arr = np.asarray(jax.device_get(image))
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3:
                raise ValueError(f"Image `{key}` must be [H, W] or [H, W, C], got shape {arr.shape}.")
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
            if tb is not None:
                tb.add_image(key, arr, int(step), dataformats="HWC")
            if self._wandb is not None:
                import wandb  # pylint: disable=import-outside-toplevel
                self._wandb.log({key: wandb.Image(arr)}, step=int(step))

    def truncate_after(self, step: int) -> None:
        """Drops JSONL lines with ``step`` > ``step`` (and hides later TensorBoard events) before resuming."""
        if not self.is_primary:
            return
        step = int(step)
        self._tb_purge_step = step + 1
        if self._tb is not None:  # reopen so that the purge marker is written
            self._tb.close()
            self._tb = None
        if self._jsonl_file is not None:
            self._jsonl_file.close()
            self._jsonl_file = None
        if not os.path.exists(self.jsonl_path):
            return
        kept, dropped = [], 0
        with open(self.jsonl_path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a torn line from a killed writer
                    dropped += 1
                    continue
                if int(record.get("step", 0)) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        if dropped:
            tmp = self.jsonl_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.jsonl_path)
            log.info("metrics.jsonl: dropped %d line(s) after step %d (resume).", dropped, step)

    def flush(self) -> None:
        if self._jsonl_file is not None:
            self._jsonl_file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes every backend (idempotent)."""
        if self._jsonl_file is not None:
            self._jsonl_file.close()
            self._jsonl_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ProgressBar:
    """A tqdm bar on stderr for the primary process; silent elsewhere.

    Disabled (no output; the loop's periodic log lines remain) when ``enabled`` is False, stderr is not a
    TTY, or ``CI=true``.
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, is_primary: bool | None = None,
                 desc: str = "train"):
        primary = (jax.process_index() == 0) if is_primary is None else is_primary
        ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
        self._bar = None
        self._redirected: list[tuple[logging.StreamHandler, Any]] = []
        if enabled and primary and not ci and sys.stderr.isatty():
            from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
            self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                             unit="step")
            self._redirect_logging()

    def _redirect_logging(self) -> None:
        """While the bar is shown, log records written to the terminal (the root logger's stream handlers, absl's
        included) go through ``tqdm.write``: above the bar, not glued to it."""
        handlers = []
        for handler in logging.getLogger().handlers:
            handlers.append(getattr(handler, "python_handler", handler))  # absl's ABSLHandler wraps a StreamHandler
        for handler in handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
                try:
                    previous = handler.setStream(_TqdmStream(handler.stream))
                except Exception:  # pylint: disable=broad-except  # a handler that does not allow it: leave it
                    continue
                self._redirected.append((handler, previous))

    def _restore_logging(self) -> None:
        for handler, previous in reversed(self._redirected):
            try:
                handler.setStream(previous)
            except Exception:  # pylint: disable=broad-except
                pass
        self._redirected = []

    @property
    def active(self) -> bool:
        return self._bar is not None

    def update(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
        """Moves the bar to ``step`` (completed steps) and shows ``postfix`` (a few scalars)."""
        if self._bar is None:
            return
        self._bar.update(int(step) - self._bar.n)
        if postfix:
            shown = {}
            for k, v in postfix.items():
                v = to_python_scalar(v)
                shown[k] = f"{v:.4g}" if isinstance(v, float) else v
            self._bar.set_postfix(shown, refresh=False)

    def write(self, line: str) -> None:
        """Prints ``line`` above the bar (the bar is redrawn below it; ``tqdm.write``)."""
        if self._bar is None:
            sys.stderr.write(line + "\n")
            return
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
        tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._restore_logging()
            self._bar.close()
            self._bar = None


class _TqdmStream:
    """A text stream that writes whole lines with ``tqdm.write`` (the bar is cleared and redrawn around them)."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            tqdm.write(line, file=self._stream)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
            tqdm.write(self._pending, file=self._stream)
            self._pending = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()
