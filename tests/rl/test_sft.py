"""The built-in tiny arithmetic model: cache keying, SFT that learns, HF round trip."""

import dataclasses
import json

import jax
import pytest
from flax import nnx

from adrpo_jax.rl import sft


def test_cache_dir_is_keyed_by_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ADRPO_JAX_CACHE", str(tmp_path))
    a = sft.tiny_arith_dir()
    b = sft.tiny_arith_dir(dataclasses.replace(sft.TINY_ARITH_SFT, seed=1))
    assert a.parent == tmp_path and a != b and a == sft.tiny_arith_dir()
    assert sft._max_answer_len(sft.TINY_ARITH_SFT) == 3 and sft._max_prompt_len(sft.TINY_ARITH_SFT) == 6


@pytest.mark.slow
def test_sft_learns_and_round_trips(tmp_path):
    from adrpo_jax.models.llm import load_pretrained, load_tokenizer
    cfg = dataclasses.replace(sft.TINY_ARITH_SFT, hidden_size=32, intermediate_size=64, max_steps=400, min_steps=50,
                              eval_every=50, eval_examples=64, target_accuracy=0.15)
    path = sft.ensure_tiny_arith_model(cfg, cache_dir=tmp_path)
    metrics = json.loads((path / "sft_metrics.json").read_text())
    assert metrics["sampled_accuracy"] >= 0.15 or metrics["steps"] == 400
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    assert sft.ensure_tiny_arith_model(cfg, cache_dir=tmp_path) == path  # cached: not retrained
    model, tok = load_pretrained(path), load_tokenizer(path)
    assert model.config.vocab_size == len(tok) and model.config.tie_word_embeddings
    examples = [{"prompt": "12+30=", "answer": "42"}] * 4
    graphdef, state = nnx.split(model)
    acc = sft.sampled_accuracy(graphdef, state, tok, examples, max_prompt_length=6, max_new_tokens=5,
                               key=jax.random.key(0), greedy=True)
    assert acc in (0.0, 1.0)
