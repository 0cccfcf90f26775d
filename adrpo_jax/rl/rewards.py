"""Reward functions: a registry of built-ins, user functions by ``'module:function'`` or
``'path/to/file.py:function'`` (:func:`resolve_reward_function`), weighted combination, missing / non-finite
rewards, and exception / time-out handling.

A reward function is a plain Python callable in TRL's convention::

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]

called with keyword arguments: ``prompts``, ``completions`` (decoded text, special tokens removed),
``completion_ids`` (list of token-id lists) and every column of the prompt source aligned with the
completions (e.g. ``answer``, ``index``). It returns one value per completion.

Combination (:class:`RewardComputer`), per sample ``i`` over the functions ``f`` with weights ``w_f``:

* ``None`` means "this function does not apply to this sample" (TRL): it is left out of the weighted sum
  ``r_i = sum_f w_f v_{i,f}``; if *every* function returns ``None`` the sample is *missing*.
* a NaN / +-Inf value makes the sample *missing* (issue 8: a non-finite reward masks the sample out of every
  statistic, its group's advantage included).
* an exception or a time-out (``timeout_s``) in a function: with ``on_error='raise'`` a
  :class:`RewardFunctionError` names the function, the failing sample's index, its prompt and completion
  (the batched call is repeated per sample to find it); with ``on_error='missing'`` the failing samples are
  scored as missing and counted.
* a contract violation (wrong number of values, a value that is not a number or ``None``) always raises.

Missing samples are counted (``num_missing``) and masked by the trainer (``valid`` False): they enter no
mean, std, advantage or loss. Every call with missing samples logs a warning with their fraction and, per
function, how many samples it gave no value for (``warn_missing``); :func:`check_rewards_present` (the
trainer calls it once per step with the step's global counts) stops the run with
:class:`AllRewardsMissingError` when *every* sample of a step is missing (``rewards.stop_when_all_missing``):
nothing can be learned from such a step, and its ``reward_mean`` would read 0.

>>> computer = RewardComputer(["exact_match", "format"], weights=[1.0, 0.5])
>>> out = computer(["2+2=", "3+3="], ["4", "six"], answer=["4", "6"])
>>> out.rewards.tolist(), out.valid.tolist(), out.names
([1.5, 0.0], [True, True], ('exact_match', 'format'))
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import logging
import math
import numbers
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adrpo_jax.rl.tasks.arithmetic import exact_match_reward, final_number_reward, format_reward

__all__ = [
    "BUILTIN_REWARDS",
    "AllRewardsMissingError",
    "RewardComputer",
    "RewardFunctionError",
    "RewardOutput",
    "check_rewards_present",
    "register_reward_function",
    "resolve_reward_function",
]

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[Any]]

BUILTIN_REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match_reward,
    "final_number": final_number_reward,
    "format": format_reward,
}

_PATH_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class RewardFunctionError(RuntimeError):
    """A reward function raised, timed out, or broke the contract (wrong count / type of values)."""


class AllRewardsMissingError(RewardFunctionError):
    """Every sample of a step is missing its reward (:func:`check_rewards_present`)."""


def check_rewards_present(num_missing: int, num_samples: int, names: Sequence[str] = (), *, stop: bool = True,
                          step: int | None = None) -> None:
    """The end-of-scoring check of a step: when all ``num_samples > 0`` samples miss their reward, raises
    :class:`AllRewardsMissingError` (``stop=True``, ``rewards.stop_when_all_missing``) or logs an error
    (``stop=False``). Pass the step's *global* counts (all processes), e.g. the summed ``num_missing`` of the
    :class:`RewardOutput` of every process. ``names``: the reward functions, quoted in the message."""
    num_missing, num_samples = int(num_missing), int(num_samples)
    if num_samples <= 0 or num_missing < num_samples:
        return
    where = "" if step is None else f"step {step}: "
    fns = ", ".join(repr(n) for n in names) or "the reward functions"
    message = (f"{where}all {num_samples} samples miss their reward: {fns} returned no finite number for any of them "
               "(None, NaN / inf, or a failure with rewards.on_error='missing'), so nothing can be learned and "
               "reward_mean is not a measurement. Check that the function returns one float per completion (it "
               "receives prompts, completions, completion_ids and the data columns as keyword arguments)")
    if stop:
        raise AllRewardsMissingError(message + "; set --config.rewards.stop_when_all_missing=False to go on anyway.")
    log.error("%s (rewards.stop_when_all_missing=False: going on).", message)


def register_reward_function(name: str, fn: RewardFn) -> None:
    """Adds ``fn`` to the built-in registry under ``name`` (usable in ``rewards.functions``)."""
    if not callable(fn):
        raise ValueError(f"`fn` for reward {name!r} must be callable, got {type(fn).__name__}.")
    BUILTIN_REWARDS[name] = fn


_FILE_SPEC_RE = re.compile(r"^(?P<path>.+\.py):(?P<fn>[A-Za-z_]\w*)$")


def _search_dirs() -> list[str]:
    """The current directory, then the directories on ``sys.path`` (``import_path`` adds the config file's)."""
    out: list[str] = []
    for d in [os.getcwd(), *sys.path]:
        d = os.path.abspath(d or os.getcwd())
        if d not in out and os.path.isdir(d):
            out.append(d)
    return out


def _missing_function(fn_name: str, module: Any, where: str) -> AttributeError:
    names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
    close = difflib.get_close_matches(fn_name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f" (its functions: {names[:20]})"
    return AttributeError(f"{where} has no function {fn_name!r}{hint}")


def _load_reward_file(spec: str, path: str, fn_name: str) -> Any:
    """The module of the file ``path`` (absolute, or relative to the current directory / a ``sys.path`` entry),
    loaded once under a name derived from its absolute path; its folder joins ``sys.path`` (its own imports)."""
    path = os.path.expanduser(path)
    candidates = [path] if os.path.isabs(path) else [os.path.join(d, path) for d in _search_dirs()]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        where = (f"looked in the current directory ({os.getcwd()}) and the {len(candidates) - 1} other directories of "
                 "sys.path" if not os.path.isabs(path) else "no such file")
        raise ImportError(f"reward file {path!r} of {spec!r} not found ({where}). Give the file's path relative to "
                          "the current directory, or an absolute path.", path=path)
    found = os.path.realpath(found)
    digest = hashlib.sha1(found.encode()).hexdigest()[:10]
    name = f"_adrpo_reward_{re.sub(r'[^0-9A-Za-z_]', '_', Path(found).stem)}_{digest}"
    module = sys.modules.get(name)
    if module is None:
        folder = os.path.dirname(found)
        if folder not in sys.path:
            sys.path.append(folder)
        module_spec = importlib.util.spec_from_file_location(name, found)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"reward file {found!r} of {spec!r} cannot be imported as a Python module (give a "
                              "`.py` file).", path=found)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def _import_reward_module(spec: str, module_name: str, fn_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if not err.name or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise  # a module that the reward module itself imports is missing: the real error
        top = module_name.split(".")[0]
        as_file = module_name.replace(".", "/") + ".py"
        raise ModuleNotFoundError(
            f"cannot import {module_name!r} for the reward {spec!r} ({err}). A 'module:function' path is imported "
            f"like any Python module: from the current directory ({os.getcwd()}), the config file's directory "
            f"(launch.py adds both to `import_path`) or sys.path. Either run from the folder that contains "
            f"{top}/ (or {top}.py), give the file instead ('path/to/{as_file}:{fn_name}', relative to the current "
            "directory), add its folder with --config.import_path=/path/to/folder, or pip install your package.",
            name=err.name) from None


def resolve_reward_function(spec: str | RewardFn) -> tuple[str, RewardFn]:
    """``(name, fn)`` for a registry name, a ``'package.module:function'`` path, a ``'path/to/file.py:function'``
    path or a callable.

    A module path is imported from ``sys.path`` (which ``import_path`` extends: ``launch.py`` puts the config
    file's directory and the current directory there); a file path is relative to the current directory (else to a
    ``sys.path`` entry) or absolute, and the file is loaded once per process.

    Raises ``ValueError`` for an unknown name or a malformed path, ``ImportError`` when the module or file cannot
    be found (the message says where it looked and how to make it found), ``AttributeError`` when the function
    is not in it.
    """
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a reward function must be a registry name, a 'module:function' path or a callable, "
                         f"got {spec!r}")
    if spec in BUILTIN_REWARDS:
        return spec, BUILTIN_REWARDS[spec]
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(BUILTIN_REWARDS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown reward function {spec!r}{hint}: use one of {sorted(BUILTIN_REWARDS)}, a "
                         "'package.module:function' path or a 'path/to/file.py:function' path")
    file_match = _FILE_SPEC_RE.match(spec)
    if file_match is not None:
        path, fn_name = file_match.group("path"), file_match.group("fn")
        module = _load_reward_file(spec, path, fn_name)
        where = f"reward file {path!r}"
    elif _PATH_RE.match(spec):
        module_name, fn_name = spec.split(":")
        module = _import_reward_module(spec, module_name, fn_name)
        where = f"module {module_name!r} ({getattr(module, '__file__', '?')})"
    else:
        raise ValueError(f"reward function path {spec!r} is not of the form 'package.module:function' or "
                         "'path/to/file.py:function'")
    if not hasattr(module, fn_name):
        raise _missing_function(fn_name, module, where)
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn_name, fn


@dataclasses.dataclass
class RewardOutput:
    """Rewards of one batch of ``N`` completions from ``F`` functions.

    Attributes:
      rewards: ``[N]`` float32 weighted sum; NaN where the sample is missing.
      valid: ``[N]`` bool, False for missing samples (every function None, a non-finite value, or an error
        scored as missing).
      per_function: ``[N, F]`` float32 unweighted values; NaN where the function gave None, a non-finite value
        or failed.
      names: the ``F`` function names (metric keys ``reward/<name>_mean``).
      num_missing: number of samples with ``valid`` False.
      num_errors: number of (function, sample) pairs that raised or timed out (``on_error='missing'``).
      missing_per_function: ``{name: samples the function gave no finite value for}`` (None, non-finite or
        failed), only for functions with at least one.
    """

    rewards: np.ndarray
    valid: np.ndarray
    per_function: np.ndarray
    names: tuple[str, ...]
    num_missing: int
    num_errors: int
    missing_per_function: dict[str, int] = dataclasses.field(default_factory=dict)


class _TimedOut(Exception):
    pass


def _call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()`` in a daemon worker thread, waiting at most ``timeout_s`` (``future.result(timeout)``).

    A function that overruns keeps running in its (daemon) thread -- Python cannot kill a thread -- but its
    result is ignored and it never blocks the interpreter's exit.
    """
    if not timeout_s or timeout_s <= 0:
        return fn()
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as err:  # pylint: disable=broad-except
            future.set_exception(err)

    threading.Thread(target=run, daemon=True, name="reward-fn").start()
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise _TimedOut(f"timed out after {timeout_s:g} s") from None


def _short(text: Any, limit: int = 200) -> str:
    s = repr(text)
    return s if len(s) <= limit else s[:limit] + "...'"


def _describe_failure(err: BaseException) -> str:
    return str(err) if isinstance(err, _TimedOut) else f"raised {type(err).__name__}: {err}"


def _is_real(value: object) -> bool:
    """A real number that is not a bool (``numbers.Real``: int, float, numpy's real scalars). A function, not an
    inline ``isinstance``: mypy would narrow an argument annotated ``float`` with it to "cannot exist" and skip
    the rest of the caller as unreachable."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class RewardComputer:
    """Calls the reward functions on a batch and combines them (see the module docstring).

    Args:
      functions: registry names, ``'module:function'`` paths or callables.
      weights: one finite float per function (default all 1).
      on_error: ``'raise'`` (fail fast, naming the failing sample) or ``'missing'`` (score it as missing).
      timeout_s: per-call time limit (0 = none). On a time-out of the batched call each sample is re-scored
        alone (each call again limited to ``timeout_s``) to find the failing one(s).
      warn_missing: log a warning for every call with missing samples (their fraction, the functions that
        gave no value and for how many samples).
      stop_when_all_missing: what :meth:`check` does when every sample of a step is missing (raise
        :class:`AllRewardsMissingError`, or log an error).
    """

    def __init__(self, functions: Sequence[str | RewardFn], weights: Sequence[float] | None = None, *,
                 on_error: str = "raise", timeout_s: float = 0.0, warn_missing: bool = True,
                 stop_when_all_missing: bool = True) -> None:
        if isinstance(functions, (str, bytes)) or callable(functions):
            functions = [functions]
        functions = list(functions)
        if not functions:
            raise ValueError("`functions` must name at least one reward function.")
        resolved = [resolve_reward_function(f) for f in functions]
        names: list[str] = []
        seen: dict[str, int] = {}
        for name, _ in resolved:
            seen[name] = seen.get(name, 0) + 1
            names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
        self.names = tuple(names)
        self.functions = tuple(fn for _, fn in resolved)
        if weights is None or len(weights) == 0:
            weights = [1.0] * len(functions)
        weights = list(weights)
        if len(weights) != len(functions):
            raise ValueError(f"`weights` has {len(weights)} entries for {len(functions)} reward functions.")
        for w in weights:
            if not _is_real(w) or not math.isfinite(w):
                raise ValueError(f"`weights` must be finite numbers, got {weights!r}.")
        self.weights = np.asarray(weights, np.float64)
        if on_error not in ("raise", "missing"):
            raise ValueError(f"`on_error` must be 'raise' or 'missing', got {on_error!r}.")
        self.on_error = on_error
        if not _is_real(timeout_s) or timeout_s < 0:
            raise ValueError(f"`timeout_s` must be a number >= 0, got {timeout_s!r}.")
        self.timeout_s = float(timeout_s)
        self.warn_missing = bool(warn_missing)
        self.stop_when_all_missing = bool(stop_when_all_missing)

    def check(self, output: "RewardOutput", *, step: int | None = None) -> None:
        """:func:`check_rewards_present` on one (single-process) output with this computer's setting."""
        check_rewards_present(output.num_missing, len(output.valid), self.names, stop=self.stop_when_all_missing,
                              step=step)

    # ------------------------------------------------------------------------------------------------------

    def _invoke(self, fn: RewardFn, prompts, completions, columns) -> Any:
        return _call_with_timeout(lambda: fn(prompts=list(prompts), completions=list(completions), **columns),
                                  self.timeout_s)

    @staticmethod
    def _check_values(name: str, values: Any, n: int, offset: int = 0) -> list[float | None]:
        """Validates one function's output: ``n`` values, each a real number or None; None -> None."""
        if isinstance(values, np.ndarray):
            if values.ndim != 1:
                raise RewardFunctionError(f"reward function {name!r} returned an array of shape {values.shape}; "
                                          f"expected {n} values (shape ({n},)).")
            values = values.tolist()
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise RewardFunctionError(f"reward function {name!r} returned {type(values).__name__}; expected a list "
                                      f"of {n} numbers (or None).")
        if len(values) != n:
            raise RewardFunctionError(f"reward function {name!r} returned {len(values)} values for {n} completions "
                                      "(one value per completion expected).")
        out: list[float | None] = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
            elif isinstance(v, (numbers.Real, np.number, np.bool_)) and not isinstance(v, complex):
                out.append(float(v))
            else:
                raise RewardFunctionError(f"reward function {name!r} returned {v!r} ({type(v).__name__}) for sample "
                                          f"{offset + i}; expected a number or None.")
        return out

    def _per_sample(self, name: str, fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
                    columns: dict[str, Sequence[Any]], batch_error: BaseException,
                    ) -> tuple[list[float | None], list[tuple[int, BaseException]]]:
        """Re-scores every sample alone after the batched call failed; returns (values, failures)."""
        n = len(completions)
        values: list[float | None] = [None] * n
        failures: list[tuple[int, BaseException]] = []
        for i in range(n):
            cols = {k: [v[i]] for k, v in columns.items()}
            try:
                out = self._invoke(fn, [prompts[i]], [completions[i]], cols)
            except RewardFunctionError:
                raise
            except BaseException as err:  # pylint: disable=broad-except
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                failures.append((i, err))
                if self.on_error == "raise":
                    raise RewardFunctionError(
                        f"reward function {name!r} {_describe_failure(err)} on sample {i} of {n}: prompt "
                        f"{_short(prompts[i])}, completion {_short(completions[i])}. Set rewards.on_error='missing' "
                        "to score failing samples as missing instead.") from err
                continue
            values[i] = self._check_values(name, out, 1, offset=i)[0]
        if not failures and self.on_error == "raise":
            raise RewardFunctionError(
                f"reward function {name!r} {_describe_failure(batch_error)} on the batch of {n} completions, but "
                "no single completion fails alone (the failure depends on the batch).") from batch_error
        return values, failures

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> RewardOutput:
        """Scores ``completions`` (aligned with ``prompts`` and every column) with every function."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"`prompts` has {len(prompts)} entries but `completions` has {n}.")
        for key, column in columns.items():
            if len(column) != n:
                raise ValueError(f"column `{key}` has {len(column)} entries but there are {n} completions.")
        f = len(self.functions)
        per_function = np.full((n, f), np.nan, np.float64)
        applicable = np.zeros((n, f), bool)
        bad = np.zeros(n, bool)
        num_errors = 0
        for j, (name, fn) in enumerate(zip(self.names, self.functions)):
            try:
                values = self._check_values(name, self._invoke(fn, prompts, completions, columns), n)
            except RewardFunctionError:
                raise
            except BaseException as err:  # pylint: disable=broad-except
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                values, failures = self._per_sample(name, fn, prompts, completions, columns, err)
                for i, _ in failures:
                    bad[i] = True
                    num_errors += 1
                if failures:
                    i, e = failures[0]
                    log.warning("reward function %r %s on %d of %d samples (first: sample %d, completion %s); "
                                "scored as missing.", name, _describe_failure(e), len(failures), n, i,
                                _short(completions[i]))
            for i, v in enumerate(values):
                if v is None:
                    continue
                if not math.isfinite(v):
                    bad[i] = True
                    continue
                per_function[i, j] = v
                applicable[i, j] = True
        weighted = np.where(applicable, per_function * self.weights[None, :], 0.0).sum(axis=1)
        valid = applicable.any(axis=1) & ~bad
        rewards = np.where(valid, weighted, np.nan).astype(np.float32)
        no_value = (~applicable).sum(axis=0)
        missing_per_function = {name: int(k) for name, k in zip(self.names, no_value) if k}
        num_missing = int(n - valid.sum())
        if num_missing and self.warn_missing:
            log.warning("rewards missing for %d of %d samples (%.0f%%; masked out of the step): %s", num_missing, n,
                        100.0 * num_missing / n, ", ".join(f"{name!r} gave no value for {k}"
                                                           for name, k in missing_per_function.items()))
        return RewardOutput(rewards=rewards, valid=valid, per_function=per_function.astype(np.float32),
                            names=self.names, num_missing=num_missing, num_errors=num_errors,
                            missing_per_function=missing_per_function)
