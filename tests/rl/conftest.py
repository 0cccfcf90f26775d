"""Shared fixtures of the RL tests: a tiny random decoder and hand-built rollout batches."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig, save_pretrained
from adrpo_jax.rl.tasks import build_char_tokenizer

VOCAB = 32


def tiny_decoder_config(vocab_size: int = VOCAB, **kw) -> DecoderConfig:
    base = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1,
                eos_token_id=(2,), pad_token_id=0, initializer_range=0.3)
    base.update(kw)
    return DecoderConfig(**base)


_INIT = {}


def tiny_model(seed: int = 0, **kw):
    """(config, graphdef, params) of a tiny random CausalLM; one compiled init per config."""
    cfg = tiny_decoder_config(**kw)
    if cfg not in _INIT:
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
        init = jax.jit(lambda key: nnx.state(CausalLM(cfg, rngs=nnx.Rngs(key)), nnx.Param))
        _INIT[cfg] = (graphdef, init)
    graphdef, init = _INIT[cfg]
    return cfg, graphdef, init(jax.random.key(seed))


def rollout_batch(b: int = 8, p: int = 3, n: int = 4, *, seed: int = 0, vocab: int = VOCAB, group_size: int = 2):
    """A hand-built rollout batch: left-padded prompts, completions with EOS (=2) / truncation / padding."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(4, vocab, size=(b, p)).astype(np.int32)
    pmask = np.ones((b, p), bool)
    pmask[1, 0] = False
    prompt[1, 0] = 0
    comp = rng.integers(4, vocab, size=(b, n)).astype(np.int32)
    lengths = rng.integers(1, n + 1, size=b)
    lengths[0] = n  # row 0: truncated (no EOS within the budget)
    lengths[2] = 1
    done = np.ones(b, bool)
    done[0] = False
    for i in range(b):
        if done[i]:
            comp[i, lengths[i] - 1] = 2
        comp[i, lengths[i]:] = 0
    cmask = np.arange(n)[None, :] < lengths[:, None]
    rewards = rng.integers(0, 2, size=b).astype(np.float32) + 0.25 * rng.random(b).astype(np.float32)
    return {
        "tokens": np.concatenate([prompt, comp], 1),
        "attention_mask": np.concatenate([pmask, cmask], 1),
        "completion_mask": cmask,
        "lengths": lengths.astype(np.int32),
        "done": done,
        "rewards": rewards,
        "reward_valid": np.ones(b, bool),
        "reward_components": np.stack([rewards, np.ones(b, np.float32)], 1),
        "prompt_truncated": np.zeros(b, bool),
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama HF directory with the char tokenizer (vocab 25)."""
    path = tmp_path_factory.mktemp("tiny_model")
    tok = build_char_tokenizer()
    cfg = tiny_decoder_config(vocab_size=len(tok), tie_word_embeddings=True, initializer_range=0.05)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    save_pretrained(model, path, tokenizer=tok)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return os.fspath(path)
