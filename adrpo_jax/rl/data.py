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
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from adrpo_jax.rl.tasks.arithmetic import ArithmeticTask

__all__ = [
    "JsonlPromptSource",
    "PromptIterator",
    "PromptSource",
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


class JsonlPromptSource:
    """Prompts from a jsonl file (one JSON object per line; blank lines skipped).

    Args:
      path: the file.
      prompt_key: field holding the question.
      answer_key: field holding the reference answer (or solution text).
      answer_format: ``'gsm8k'`` (answer after ``####``) or ``'raw'`` (the field as a string).

    Items are ``{"prompt", "answer", "index", "solution", **other scalar fields}``: ``solution`` is the raw
    ``answer_key`` field unless the file has a ``solution`` field of its own (kept as it is). Raises
    ``ValueError`` naming the line for invalid JSON, a missing field, an unparsable answer or a field named
    like an argument the trainer passes to reward functions (:data:`RESERVED_COLUMNS`).
    """

    def __init__(self, path: str | os.PathLike, *, prompt_key: str = "question", answer_key: str = "answer",
                 answer_format: str = "gsm8k"):
        if answer_format not in ("gsm8k", "raw"):
            raise ValueError(f"`answer_format` must be 'gsm8k' or 'raw', got {answer_format!r}")
        self.path = os.fspath(path)
        self.examples: list[dict[str, Any]] = []
        with open(self.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}:{line_no}: invalid JSON ({err})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{self.path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
                for key in (prompt_key, answer_key):
                    if key not in obj:
                        raise ValueError(f"{self.path}:{line_no}: missing field {key!r} (fields: {sorted(obj)})")
                reserved = sorted(k for k in obj if k in RESERVED_COLUMNS and k not in (prompt_key, answer_key))
                if reserved:
                    raise ValueError(f"{self.path}:{line_no}: field(s) {reserved} are reserved: reward functions "
                                     f"receive {list(RESERVED_COLUMNS)} from the trainer; rename the field(s)")
                raw_answer = obj[answer_key]
                try:
                    answer = parse_gsm8k_answer(str(raw_answer)) if answer_format == "gsm8k" else str(raw_answer)
                except ValueError as err:
                    raise ValueError(f"{self.path}:{line_no}: {err} (data.answer_format='gsm8k')") from None
                extra = {k: v for k, v in obj.items() if k not in (prompt_key, answer_key)
                         and isinstance(v, (str, int, float, bool)) and k not in ("prompt", "answer", "index")}
                item = {**extra, "prompt": str(obj[prompt_key]), "answer": answer, "index": len(self.examples)}
                if "solution" not in obj or answer_key == "solution":  # never replace the file's own `solution`
                    item["solution"] = str(raw_answer)
                self.examples.append(item)
        if not self.examples:
            raise ValueError(f"{self.path} holds no examples")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self.examples[index])


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
                             answer_key=config.data.answer_key, answer_format=config.data.answer_format)


def make_eval_examples(config: Any) -> list[dict[str, Any]]:
    """The ``eval.num_examples`` held-out examples: distinct arithmetic problems from :data:`EVAL_ARITHMETIC_SEED`
    (excluded from the training stream, :func:`make_prompt_source`), or the first examples of ``eval.path``
    (jsonl, same fields as the training data)."""
    n = int(config.eval.num_examples)
    if config.eval.path:
        source = JsonlPromptSource(os.path.expanduser(config.eval.path), prompt_key=config.data.prompt_key,
                                   answer_key=config.data.answer_key, answer_format=config.data.answer_format)
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
