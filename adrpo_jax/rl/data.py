"""Prompt sources and the deterministic, resumable prompt iterator of the LLM trainer.

Sources are indexable (``source[i] -> {"prompt": str, "answer": str, ...extra columns}``):

* :class:`~adrpo_jax.rl.tasks.ArithmeticTask` (built in, infinite, a pure function of ``(seed, index)``);
* :class:`JsonlPromptSource`: one JSON object per line, e.g. GSM8K (``{"question": ..., "answer": "... #### 72"}``),
  with the reference answer parsed from after ``####`` (:func:`parse_gsm8k_answer`).

:class:`PromptIterator` yields, per RL step, the rows of the rollout batch that *this process* feeds: the
global batch is ``num_prompts`` prompts each repeated ``group_size`` times (a group's rows are contiguous),
and a process materializes only the rows of its :func:`~adrpo_jax.train.process_batch_slice`. Its whole state
is one integer (prompts consumed); the order is a pure function of ``(seed, position)`` (jsonl: reshuffled
every epoch from ``(seed, epoch)``), so a resumed run sees exactly the prompts an uninterrupted one would.

>>> from adrpo_jax.rl.tasks import ArithmeticTask
>>> it = PromptIterator(ArithmeticTask(seed=0), num_prompts=2, group_size=3)
>>> rows = it.next_rows()
>>> [r["prompt"] for r in rows] == [rows[0]["prompt"]] * 3 + [rows[3]["prompt"]] * 3, it.get_state()
(True, {'position': 2})
"""

from __future__ import annotations

import json
import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from adrpo_jax.rl.tasks.arithmetic import ArithmeticTask

log = logging.getLogger(__name__)

__all__ = [
    "JsonlPromptSource",
    "PromptIterator",
    "PromptSource",
    "check_data",
    "columns_of",
    "make_prompt_source",
    "make_eval_examples",
    "parse_gsm8k_answer",
    "EVAL_ARITHMETIC_SEED",
    "distinct_examples",
]

# Keyword arguments the trainer itself passes to reward functions; a data column of that name cannot be passed.
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")

# The held-out arithmetic problems come from a fixed seed, independent of the run's seed, so evaluations of
# different seeds / methods are on the same problems.
EVAL_ARITHMETIC_SEED = 999_983


class PromptSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


_GSM8K_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def parse_gsm8k_answer(text: str) -> str:
    """The reference answer of a GSM8K-style solution: the text after the last ``####``, commas removed.

    >>> parse_gsm8k_answer("She has 3 + 4 = 7 apples.\\n#### 1,007")
    '1007'
    """
    if "####" not in text:
        raise ValueError(f"no '####' in answer {text[:120]!r}")
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    if answer.endswith(".") and answer[:-1].replace("-", "").isdigit():
        answer = answer[:-1]
    return answer


ON_BAD_ROW = ("raise", "skip")
_SHOWN = 5
_PROMPT_FIELDS = ("question", "prompt", "problem", "query", "input", "instruction", "text")
_ANSWER_FIELDS = ("answer", "solution", "final_answer", "target", "output", "label", "ground_truth", "response")


def _suggest(fields: Sequence[str], preferred: Sequence[str], exclude: str = "") -> str | None:
    """The field of ``fields`` a user most likely meant (a well-known name first, else the only other one)."""
    for name in preferred:
        if name in fields and name != exclude:
            return name
    rest = [f for f in fields if f != exclude]
    return rest[0] if len(rest) == 1 else None


def _missing_field(key: str, setting: str, fields: Iterable[str], preferred: Sequence[str], other: str) -> str:
    guess = _suggest(list(fields), preferred, exclude=other)
    hint = f": set --config.{setting}={guess}" if guess else f" (set --config.{setting} to the right field)"
    return f"missing field {key!r} (fields: {sorted(fields)}){hint}"


class JsonlPromptSource:
    """Prompts from a jsonl file (one JSON object per line; blank lines skipped).

    Args:
      path: the file.
      prompt_key: field holding the question (a non-empty string).
      answer_key: field holding the reference answer (or solution text): a string, or a JSON integer (taken as
        its decimal text); null, true/false, a float, a list or an object is a bad row (a null answer would
        otherwise become the reference answer ``'None'``).
      answer_format: ``'gsm8k'`` (answer after ``####``) or ``'raw'`` (the field as a string).
      on_bad_row: ``'raise'`` (one ``ValueError`` naming the file, each bad line, its reason and the setting to
        change) or ``'skip'`` (drop bad rows; counted in ``num_skipped``, listed in ``skipped``, logged).

    Items are ``{"prompt", "answer", "index", "solution", **other scalar fields}``: ``solution`` is the raw
    ``answer_key`` field unless the file has a ``solution`` field of its own (kept as it is). Bad rows: invalid
    JSON, a missing field, a null / non-string field, an unparsable answer or a field named like an argument
    the trainer passes to reward functions (:data:`RESERVED_COLUMNS`).
    """

    def __init__(self, path: str | os.PathLike, *, prompt_key: str = "question", answer_key: str = "answer",
                 answer_format: str = "gsm8k", on_bad_row: str = "raise"):
        if answer_format not in ("gsm8k", "raw"):
            raise ValueError(f"`answer_format` must be 'gsm8k' or 'raw', got {answer_format!r}")
        if on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"`on_bad_row` must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
        self.path = os.fspath(path)
        self.prompt_key, self.answer_key, self.answer_format = prompt_key, answer_key, answer_format
        self.examples: list[dict[str, Any]] = []
        self.skipped: list[tuple[int, str]] = []
        total = 0
        with open(self.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                total += 1
                try:
                    item = self.parse_line(line)
                except ValueError as err:
                    self.skipped.append((line_no, str(err)))
                    continue
                item["index"] = len(self.examples)
                self.examples.append(item)
        if self.skipped and on_bad_row == "raise":
            if len(self.skipped) == 1:
                line_no, reason = self.skipped[0]
                raise ValueError(f"{self.path}:{line_no}: {reason}")
            shown = "; ".join(f"{self.path}:{n}: {r}" for n, r in self.skipped[:_SHOWN])
            more = f" (and {len(self.skipped) - _SHOWN} more)" if len(self.skipped) > _SHOWN else ""
            raise ValueError(f"{len(self.skipped)} bad rows of {total} in {self.path}: {shown}{more}. Fix the file "
                             "or set --config.data.on_bad_row=skip to skip bad rows (counted and logged).")
        if self.skipped:
            log.warning("%s: skipped %d bad row(s) of %d (data.on_bad_row='skip'): %s%s", self.path,
                        len(self.skipped), total, "; ".join(f"line {n}: {r}" for n, r in self.skipped[:_SHOWN]),
                        " ..." if len(self.skipped) > _SHOWN else "")
        if not self.examples:
            raise ValueError(f"{self.path} holds no examples")

    def parse_line(self, line: str) -> dict[str, Any]:
        """One line -> an item (without ``index``); ``ValueError`` with the reason (and the setting to change)."""
        prompt_key, answer_key = self.prompt_key, self.answer_key
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid JSON ({err})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        if prompt_key not in obj:
            raise ValueError(_missing_field(prompt_key, "data.prompt_key", obj, _PROMPT_FIELDS, answer_key))
        if answer_key not in obj:
            raise ValueError(_missing_field(answer_key, "data.answer_key", obj, _ANSWER_FIELDS, prompt_key))
        reserved = sorted(k for k in obj if k in RESERVED_COLUMNS and k not in (prompt_key, answer_key))
        if reserved:
            raise ValueError(f"field(s) {reserved} are reserved: reward functions receive {list(RESERVED_COLUMNS)} "
                             "from the trainer; rename the field(s)")
        prompt = obj[prompt_key]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"field {prompt_key!r} (data.prompt_key) must be a non-empty string, got {prompt!r}")
        raw_answer = obj[answer_key]
        if isinstance(raw_answer, int) and not isinstance(raw_answer, bool):
            raw_answer = str(raw_answer)
        if not isinstance(raw_answer, str):
            raise ValueError(f"field {answer_key!r} (data.answer_key) must be a string (or an integer), got "
                             f"{raw_answer!r} ({'null' if raw_answer is None else type(raw_answer).__name__}); "
                             "write the reference answer as a JSON string")
        if self.answer_format == "gsm8k":
            try:
                answer = parse_gsm8k_answer(raw_answer)
            except ValueError as err:
                raise ValueError(f"{err} (data.answer_format='gsm8k' takes the answer after '####'; set "
                                 "--config.data.answer_format=raw to use the field as it is)") from None
        else:
            answer = raw_answer
        extra = {k: v for k, v in obj.items() if k not in (prompt_key, answer_key)
                 and isinstance(v, (str, int, float, bool)) and k not in ("prompt", "answer", "index")}
        item = {**extra, "prompt": prompt, "answer": answer}
        if "solution" not in obj or answer_key == "solution":  # never replace the file's own `solution`
            item["solution"] = raw_answer
        return item

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self.examples[index])


def check_data(config: Any) -> dict[str, "JsonlPromptSource"]:
    """Checks the LLM trainer's data files before anything heavy is loaded (call it first thing).

    For ``data.source='jsonl'``: reads ``data.path`` and ``eval.path`` (when set) with the configured
    ``data.prompt_key`` / ``data.answer_key`` / ``data.answer_format`` / ``data.on_bad_row`` (a jsonl parse:
    milliseconds for GSM8K's 7.5k rows). A mistake that affects the whole file (the first row lacks the prompt
    or answer field, or its answer has no ``####``) is reported as one line naming the setting to change
    (``--config.data.prompt_key=prompt``, ``--config.data.answer_format=raw``); other bad rows as the source
    reports them (file:line, reason). Returns ``{key: source}`` (reusable by the trainer); the built-in
    arithmetic task needs no check (``{}``).

    Raises :class:`~adrpo_jax.train.config.ConfigError` whose ``key`` is the setting to change (or the path key).
    """
    from adrpo_jax.train.config import ConfigError  # pylint: disable=import-outside-toplevel
    d = config.data
    if d.source != "jsonl":
        return {}
    on_bad_row = str(d.get("on_bad_row", "raise"))
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"`data.on_bad_row`={on_bad_row!r} must be one of {ON_BAD_ROW}.", key="data.on_bad_row",
                          value=on_bad_row)
    out = {}
    for key in ("data.path", "eval.path"):
        section, name = key.split(".")
        path = str(config[section].get(name, "") or "")
        if not path:
            continue
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise ConfigError(f"`{key}`={path!r} does not exist.", key=key, value=path)
        _check_first_row(path, d, key)
        try:
            out[key] = JsonlPromptSource(path, prompt_key=d.prompt_key, answer_key=d.answer_key,
                                         answer_format=d.answer_format, on_bad_row=on_bad_row)
        except ValueError as err:
            raise ConfigError(f"`{key}`: {err}", key=key, value=path) from None
    return out


def _check_first_row(path: str, d: Any, key: str) -> None:
    from adrpo_jax.train.config import ConfigError  # pylint: disable=import-outside-toplevel
    with open(path, encoding="utf-8") as f:
        first = next(((n, text) for n, text in enumerate(f, start=1) if text.strip()), None)
    if first is None:
        raise ConfigError(f"`{key}`={path!r} is empty.", key=key, value=path)
    line_no, line = first
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return  # reported with the line by the source
    if not isinstance(obj, dict):
        return
    where = f"{path}:{line_no}"
    for field, setting, preferred, other in ((d.prompt_key, "data.prompt_key", _PROMPT_FIELDS, d.answer_key),
                                             (d.answer_key, "data.answer_key", _ANSWER_FIELDS, d.prompt_key)):
        if field not in obj:
            raise ConfigError(f"{where}: {_missing_field(field, setting, obj, preferred, other)}.", key=setting,
                              value=field)
    answer = obj[d.answer_key]
    if d.answer_format == "gsm8k" and isinstance(answer, str) and "####" not in answer:
        raise ConfigError(f"{where}: no '####' in the answer {answer[:80]!r} (data.answer_format='gsm8k' takes the "
                          "answer after '####'): set --config.data.answer_format=raw to use the field as it is.",
                          key="data.answer_format", value=d.answer_format)


def _arithmetic_task(config: Any, seed: int) -> ArithmeticTask:
    a = config.data.arithmetic
    return ArithmeticTask(min_digits=int(a.min_digits), max_digits=int(a.max_digits),
                          operations=tuple(a.operations), style=a.style, seed=int(seed))


def make_prompt_source(config: Any) -> PromptSource:
    """The training prompt source of ``config.data`` (arithmetic problems seeded with ``config.seed``).

    Arithmetic: the held-out evaluation problems (:func:`make_eval_examples`) never appear in the stream
    (``ArithmeticTask.exclude``), so ``eval/accuracy`` is measured on problems the policy was never trained on."""
    if config.data.source == "arithmetic":
        held_out = frozenset(ex["prompt"] for ex in make_eval_examples(config))
        return dataclasses.replace(_arithmetic_task(config, config.seed), exclude=held_out)
    return JsonlPromptSource(os.path.expanduser(config.data.path), prompt_key=config.data.prompt_key,
                             answer_key=config.data.answer_key, answer_format=config.data.answer_format,
                             on_bad_row=str(config.data.get("on_bad_row", "raise")))


def make_eval_examples(config: Any) -> list[dict[str, Any]]:
    """The ``eval.num_examples`` held-out examples: distinct arithmetic problems from :data:`EVAL_ARITHMETIC_SEED`
    (excluded from the training stream, :func:`make_prompt_source`), or the first examples of ``eval.path``
    (jsonl, same fields as the training data)."""
    n = int(config.eval.num_examples)
    if config.eval.path:
        source = JsonlPromptSource(os.path.expanduser(config.eval.path), prompt_key=config.data.prompt_key,
                                   answer_key=config.data.answer_key, answer_format=config.data.answer_format,
                                   on_bad_row=str(config.data.get("on_bad_row", "raise")))
        return [source[i] for i in range(min(n, len(source)))]
    if config.data.source != "arithmetic":
        raise ValueError("eval.path is required for a jsonl data source")
    return distinct_examples(_arithmetic_task(config, EVAL_ARITHMETIC_SEED), n)


def distinct_examples(task: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` examples of ``task`` with distinct prompts (later repeats of a prompt are skipped), so a
    held-out set weighs every problem once. Raises if the task has fewer than ``n`` distinct prompts in its
    first ``100 n`` indices."""
    out, seen = [], set()
    for i in range(100 * n):
        ex = task[i]
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
            if len(out) == n:
                return out
    raise ValueError(f"eval.num_examples={n}: the task has only {len(out)} distinct problems in its first "
                     f"{100 * n} draws; lower eval.num_examples or widen data.arithmetic")


class PromptIterator:
    """Deterministic, resumable iterator over a prompt source (see the module docstring).

    Args:
      source: indexable prompt source (``len`` may be huge for an infinite task).
      num_prompts: prompts per step (global, all processes).
      group_size: rows per prompt.
      rows: the rows of the global batch ``[0, num_prompts * group_size)`` this process feeds (default all).
      seed: order seed (jsonl reshuffles every epoch from ``(seed, epoch)``).
      shuffle: shuffle finite sources (an infinite task is used in index order: it is random already).
    """

    _INFINITE = 2**40

    def __init__(self, source: PromptSource, num_prompts: int, group_size: int = 1, *, rows: slice | None = None,
                 seed: int = 0, shuffle: bool = True):
        if num_prompts < 1 or group_size < 1:
            raise ValueError(f"`num_prompts`={num_prompts} and `group_size`={group_size} must be >= 1")
        self.source = source
        self.num_prompts, self.group_size = int(num_prompts), int(group_size)
        batch = self.num_prompts * self.group_size
        self.rows = slice(0, batch) if rows is None else rows
        start, stop, step = self.rows.indices(batch)
        if step != 1 or start >= stop:
            raise ValueError(f"`rows`={rows} must be a non-empty contiguous slice of [0, {batch})")
        self._row_range = range(start, stop)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.size = len(source)
        self.infinite = self.size >= self._INFINITE
        self.position = 0
        self._perm_cache: dict[int, np.ndarray] = {}

    def _source_index(self, k: int) -> int:
        if self.infinite:
            return k
        epoch, offset = divmod(k, self.size)
        if not self.shuffle:
            return offset
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.size)}
        return int(self._perm_cache[epoch][offset])

    def prompt_indices(self, position: int | None = None) -> list[int]:
        """Source indices of the ``num_prompts`` prompts of the step starting at ``position`` (default: now)."""
        position = self.position if position is None else position
        return [self._source_index(position + j) for j in range(self.num_prompts)]

    def next_rows(self) -> list[dict[str, Any]]:
        """This process's rows (dicts of the source's columns) of the next step's batch; advances the state."""
        cache: dict[int, dict[str, Any]] = {}
        out = []
        for r in self._row_range:
            j = r // self.group_size
            if j not in cache:
                cache[j] = dict(self.source[self._source_index(self.position + j)])
            out.append(cache[j])
        self.position += self.num_prompts
        return out

    def get_state(self) -> dict[str, int]:
        return {"position": int(self.position)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "position" not in state:
            raise ValueError(f"prompt iterator state {dict(state)!r} has no 'position'")
        self.position = int(state["position"])


def columns_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows -> TRL-style columns ``{key: [value per row]}`` of the keys every row has, except ``prompt``."""
    if not rows:
        return {}
    reserved = sorted(k for k in rows[0] if k in RESERVED_COLUMNS)
    if reserved:
        raise ValueError(f"prompt source column(s) {reserved} are reserved: reward functions receive "
                         f"{list(RESERVED_COLUMNS)} from the trainer; rename the column(s)")
    keys = [k for k in rows[0] if k != "prompt" and all(k in r for r in rows)]
    return {k: [r[k] for r in rows] for k in keys}
