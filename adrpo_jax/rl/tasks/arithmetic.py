"""A verifiable arithmetic task: deterministic problems, a character tokenizer and exact rewards.

Problems are a pure function of ``(seed, index)``, so a data iterator's whole state is one integer and every
process of a multi-host run can materialize exactly its own slice of a batch without coordination.

Two prompt styles:

* ``"symbolic"``: ``"47+8="`` with the bare answer ``"55"`` as the expected completion. Used with the tiny
  character-level model that the project pre-trains itself (:func:`build_char_tokenizer`).
* ``"word"``: a short word problem (``"Tom has 47 apples and buys 8 more. How many apples ..."``) for
  instruction-tuned chat models such as SmolLM2-135M-Instruct; graded on the last number of the completion.

Reward functions follow TRL's convention: ``fn(prompts, completions, **columns) -> list[float]`` where the
dataset's columns (here ``answer``) arrive as keyword lists aligned with ``completions``.

>>> task = ArithmeticTask(min_digits=1, max_digits=2, seed=0)
>>> ex = task[3]
>>> ex["prompt"].endswith("="), ex["answer"] == str(eval(ex["prompt"][:-1]))
(True, True)
>>> exact_match_reward(["2+2="], ["4"], answer=["4"]), format_reward(["2+2="], ["4 apples"])
([1.0], [0.0])
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ArithmeticTask",
    "build_char_tokenizer",
    "exact_match_reward",
    "final_number_reward",
    "format_reward",
    "parse_final_number",
    "CHAR_VOCAB",
]

_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

_WORD_TEMPLATES = {
    "+": "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
    "-": "{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
    "*": "{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy in total?",
}
_NAMES = ("Tom", "Ana", "Li", "Sara", "Omar", "Maya", "Ivan", "Zoe")
_ITEMS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "cards", "shells")
_WORD_SUFFIX = " Answer with just the number."


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """An infinite, indexable source of arithmetic problems.

    Attributes:
      min_digits, max_digits: operands have a number of digits drawn uniformly from this range.
      operations: subset of ``("+", "-", "*")``; one is drawn uniformly per problem.
      style: ``"symbolic"`` (``"12+7="``) or ``"word"`` (a word problem).
      seed: problems are a pure function of ``(seed, index)``.
      non_negative: for ``"-"``, order the operands so that the answer is >= 0.
      exclude: prompts never produced (e.g. the held-out evaluation problems): a draw that hits one is redrawn
        from the same ``(seed, index)`` stream, so the source stays a pure function of ``(seed, index)`` and an
        empty set gives exactly the problems of a task without it.
    """

    min_digits: int = 1
    max_digits: int = 2
    operations: tuple[str, ...] = ("+",)
    style: str = "symbolic"
    seed: int = 0
    non_negative: bool = True
    exclude: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)

    def __post_init__(self):
        if not (isinstance(self.min_digits, int) and self.min_digits >= 1):
            raise ValueError(f"min_digits must be an int >= 1, got {self.min_digits!r}")
        if not (isinstance(self.max_digits, int) and self.max_digits >= self.min_digits):
            raise ValueError(f"max_digits must be an int >= min_digits={self.min_digits}, got {self.max_digits!r}")
        if isinstance(self.operations, str):
            object.__setattr__(self, "operations", tuple(self.operations))
        bad = [op for op in self.operations if op not in _OPERATIONS]
        if not self.operations or bad:
            raise ValueError(f"operations must be a non-empty subset of {tuple(_OPERATIONS)}, got {self.operations!r}")
        if self.style not in ("symbolic", "word"):
            raise ValueError(f"style must be 'symbolic' or 'word', got {self.style!r}")
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError("exclude must be a collection of prompt strings")
        object.__setattr__(self, "exclude", frozenset(self.exclude))

    def __len__(self) -> int:  # an "infinite" source; iterators wrap with modulo on this
        return 2**62

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        for _ in range(_MAX_REDRAWS):
            example = self._draw(rng, index)
            if example["prompt"] not in self.exclude:
                return example
        raise ValueError(f"{_MAX_REDRAWS} draws in a row hit `exclude` ({len(self.exclude)} prompts) at index "
                         f"{index}: the excluded prompts cover (nearly) the whole task")

    def _draw(self, rng: np.random.Generator, index: int) -> dict[str, Any]:
        op = self.operations[int(rng.integers(len(self.operations)))]
        operands = []
        for _ in range(2):
            digits = int(rng.integers(self.min_digits, self.max_digits + 1))
            low = 0 if digits == 1 else 10 ** (digits - 1)
            operands.append(int(rng.integers(low, 10**digits)))
        a, b = operands
        if op == "-" and self.non_negative and b > a:
            a, b = b, a
        answer = _OPERATIONS[op](a, b)
        if self.style == "symbolic":
            prompt = f"{a}{op}{b}="
        else:
            name = _NAMES[int(rng.integers(len(_NAMES)))]
            item = _ITEMS[int(rng.integers(len(_ITEMS)))]
            prompt = _WORD_TEMPLATES[op].format(name=name, item=item, a=a, b=b) + _WORD_SUFFIX
        return {"prompt": prompt, "answer": str(answer), "index": int(index)}


_MAX_REDRAWS = 1000
_NUMBER = re.compile(r"-?\d+")
_STRICT_NUMBER = re.compile(r"-?\d+")


def parse_final_number(text: str) -> str | None:
    """The last integer in ``text`` (commas inside numbers removed), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def _aligned_answers(completions: Sequence[str], answer: Sequence[Any] | None) -> list[str]:
    if answer is None:
        raise ValueError("this reward needs the dataset column 'answer' (passed as keyword answer=[...])")
    if len(answer) != len(completions):
        raise ValueError(f"answer has {len(answer)} entries but there are {len(completions)} completions")
    return [str(a).strip() for a in answer]


def exact_match_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None,
                       **unused_columns) -> list[float]:
    """1.0 where the stripped completion is exactly the answer, else 0.0 (symbolic style)."""
    del prompts, unused_columns
    answers = _aligned_answers(completions, answer)
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answers)]


def final_number_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None,
                        **unused_columns) -> list[float]:
    """1.0 where the completion's last integer equals the answer, else 0.0 (word style, GSM8K style)."""
    del prompts, unused_columns
    answers = _aligned_answers(completions, answer)
    return [1.0 if parse_final_number(c) == a else 0.0 for c, a in zip(completions, answers)]


def format_reward(prompts: Sequence[str], completions: Sequence[str], **unused_columns) -> list[float]:
    """1.0 where the stripped completion is a single integer and nothing else, else 0.0."""
    del prompts, unused_columns
    return [1.0 if _STRICT_NUMBER.fullmatch(c.strip()) else 0.0 for c in completions]


CHAR_VOCAB = list("0123456789+-*=() ?.,:")
_CHAR_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_char_tokenizer(save_dir: str | os.PathLike | None = None, extra_chars: Sequence[str] = ()):
    """A character-level Hugging Face tokenizer for the symbolic task, built offline.

    Every character is one token; ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3. Saved with
    ``save_pretrained`` when ``save_dir`` is given, so ``transformers.AutoTokenizer.from_pretrained(save_dir)``
    loads it back with no network access.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(list(CHAR_VOCAB) + list(extra_chars)))
    vocab = {tok: i for i, tok in enumerate(_CHAR_SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>")
    if save_dir is not None:
        hf.save_pretrained(os.fspath(save_dir))
    return hf
