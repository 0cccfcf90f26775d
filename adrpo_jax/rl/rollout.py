"""Host side of a rollout: prompt rendering and tokenization (left-padded to a fixed length), completion
decoding, stop tokens.

Shapes are fixed per run (``sampling.max_prompt_length`` prompt slots, ``sampling.max_new_tokens`` completion
slots), so the jitted sampler and train step compile once. Prompts longer than the budget keep their *last*
``max_prompt_length`` tokens (left truncation, as TRL) and are counted.

>>> from adrpo_jax.rl.tasks import build_char_tokenizer
>>> tok = build_char_tokenizer()
>>> enc = PromptEncoder(tok, max_prompt_length=5)
>>> tokens, mask, truncated = enc.encode(["1+2=", "10+20="])
>>> mask.astype(int).tolist(), truncated.tolist()
([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], [False, True])
>>> enc.decode([[6, 2, 0], [5, 5, 2]], [2, 3])
['2', '11']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["PromptEncoder", "stop_token_ids"]

log = logging.getLogger(__name__)


def stop_token_ids(tokenizer: Any, model_config: Any = None) -> tuple[int, ...]:
    """EOS ids that end a completion: the tokenizer's ``eos_token_id`` plus the model config's ``eos_token_id``
    (instruct models often end turns with a token other than the tokenizer's EOS, e.g. ``<|im_end|>``)."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    if model_config is not None:
        ids.extend(int(e) for e in (getattr(model_config, "eos_token_id", ()) or ()))
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):  # <end_of_turn>: Gemma
        try:
            tid = tokenizer.convert_tokens_to_ids(special)
        except Exception:  # pylint: disable=broad-except
            continue
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(tid, int) and tid >= 0 and tid != unk and special in getattr(tokenizer, "all_special_tokens", ()):
            ids.append(tid)
    out = tuple(dict.fromkeys(ids))
    if not out:
        raise ValueError("the tokenizer has no EOS token and the model config names none: completions could never "
                         "end; give the tokenizer an eos_token.")
    return out


class PromptEncoder:
    """Renders, tokenizes and left-pads prompts; decodes completions.

    Args:
      tokenizer: a Hugging Face tokenizer (``transformers``), e.g. from ``models.llm.load_tokenizer``.
      max_prompt_length: P, the fixed number of prompt slots.
      chat_template: wrap each prompt as a user message with the tokenizer's chat template (with the
        generation prompt), for instruct models.
      system_prompt: optional system message (chat template only).
      prompt_template: ``str.format`` template applied to the raw prompt first (``'{prompt}'`` = unchanged).

    Tokenization never adds special tokens itself (``add_special_tokens=False``, as TRL): a chat template
    writes its own, and the built-in char-level model is trained without BOS.
    """

    def __init__(self, tokenizer: Any, max_prompt_length: int, *, chat_template: bool = False,
                 system_prompt: str = "", prompt_template: str = "{prompt}"):
        if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
            raise ValueError(f"`max_prompt_length` must be a positive int, got {max_prompt_length!r}")
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.chat_template=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else int(stop_token_ids(tokenizer)[0])
        self._warned = False

    def render(self, prompt: str) -> str:
        """The text the model sees for a raw prompt (template, then chat template)."""
        text = self.prompt_template.format(prompt=prompt)
        if not self.chat_template:
            return text
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": text}]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # pylint: disable=broad-except
            if not self.system_prompt or "system" not in str(err).lower():
                raise
            # a template without a system role (Gemma 2): the system prompt opens the user turn, as Gemma 3's does
            merged = [{"role": "user", "content": f"{self.system_prompt}\n\n{text}"}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens [n, P] int32, mask [n, P] bool, truncated [n] bool)``, left-padded with the pad id."""
        n, p = len(prompts), self.max_prompt_length
        tokens = np.full((n, p), self.pad_token_id, np.int32)
        mask = np.zeros((n, p), bool)
        truncated = np.zeros(n, bool)
        cache: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            if prompt not in cache:
                cache[prompt] = list(self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"])
            ids = cache[prompt]
            if not ids:
                raise ValueError(f"prompt {i} ({prompt!r}) tokenizes to no tokens")
            if len(ids) > p:
                truncated[i] = True
                ids = ids[-p:]
            tokens[i, p - len(ids):] = ids
            mask[i, p - len(ids):] = True
        if truncated.any() and not self._warned:
            self._warned = True
            log.warning("%d of %d prompts are longer than sampling.max_prompt_length=%d tokens and were truncated "
                        "from the left (counted in the metric prompts_truncated).", int(truncated.sum()), n, p)
        return tokens, mask, truncated

    def decode(self, completions: Any, lengths: Any) -> list[str]:
        """Completion texts: the first ``lengths[i]`` tokens of each row, special tokens (EOS) removed."""
        completions = np.asarray(completions)
        lengths = np.asarray(lengths)
        ids = [row[: int(n)].tolist() for row, n in zip(completions, lengths)]
        return list(self.tokenizer.batch_decode(ids, skip_special_tokens=True))
