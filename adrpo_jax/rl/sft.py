"""The built-in tiny arithmetic LM (``model.path = "builtin:tiny_arith"``): supervised pre-training to a weak
but non-zero success rate, saved as a Hugging Face directory and cached.

A small Llama-family :class:`~adrpo_jax.models.llm.DecoderConfig` over the character vocabulary of
:func:`~adrpo_jax.rl.tasks.build_char_tokenizer` is trained with next-token cross-entropy on the *completion*
tokens (answer + EOS) of symbolic problems ``"47+8=" -> "55<eos>"``. Training stops at the first evaluation
whose *sampled* accuracy (temperature 1, the RL sampling distribution) reaches ``target_accuracy``, leaving
the model weak enough for RL to show a clear gain, or at ``max_steps``. Everything is deterministic (fixed
seeds, fixed evaluation keys), so the same :class:`TinyArithSFTConfig` always gives the same model.

The directory (``config.json``, ``model.safetensors``, tokenizer files, ``sft_metrics.json``) lives in
``$ADRPO_JAX_CACHE/tiny_arith-<hash>`` (else ``~/.cache/adrpo_jax/...``), keyed by the config's hash;
:func:`ensure_tiny_arith_model` trains it once and reuses it afterwards.

Command line (prints the directory)::

    python -m adrpo_jax.rl.sft [--cache_dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adrpo_jax.cache import cache_root
from adrpo_jax.models.llm import CausalLM, DecoderConfig, save_pretrained
from adrpo_jax.models.llm.sampler import SamplingConfig, make_generate_fn
from adrpo_jax.rl.tasks.arithmetic import ArithmeticTask, build_char_tokenizer

__all__ = ["TinyArithSFTConfig", "TINY_ARITH_SFT", "cache_root", "tiny_arith_dir", "ensure_tiny_arith_model",
           "train_tiny_arith", "sampled_accuracy"]

log = logging.getLogger(__name__)

_MARKER = "sft_metrics.json"


@dataclasses.dataclass(frozen=True)
class TinyArithSFTConfig:
    """Everything that determines the SFT model (its hash names the cache directory).

    Attributes:
      hidden_size, num_layers, num_heads, intermediate_size: the Llama-style decoder (tied embeddings).
      min_digits, max_digits, operations: the symbolic problems (``ArithmeticTask``).
      batch_size, learning_rate, warmup_steps, weight_decay: AdamW with linear warm-up, constant after.
      max_steps: hard limit on SFT steps.
      eval_every, eval_examples: sampled-accuracy evaluation cadence and size (held-out problems).
      target_accuracy: stop at the first evaluation with sampled accuracy >= this.
      min_steps: never stop before this many steps.
      seed: parameter init, data order and evaluation keys.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 192
    min_digits: int = 1
    max_digits: int = 2
    operations: str = "+"
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_steps: int = 4000
    min_steps: int = 100
    eval_every: int = 50
    eval_examples: int = 256
    target_accuracy: float = 0.2
    seed: int = 0

    def fingerprint(self) -> str:
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True) + "|v1"
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


TINY_ARITH_SFT = TinyArithSFTConfig()

# Problem seeds of the SFT data / SFT evaluation (the RL evaluation uses data.EVAL_ARITHMETIC_SEED).
_TRAIN_SEED_OFFSET = 1_000_003
_EVAL_SEED_OFFSET = 2_000_003



def tiny_arith_dir(cfg: TinyArithSFTConfig = TINY_ARITH_SFT, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache directory of the SFT model of ``cfg``."""
    return Path(cache_dir or cache_root()) / f"tiny_arith-{cfg.fingerprint()}"


def _task(cfg: TinyArithSFTConfig, seed: int) -> ArithmeticTask:
    return ArithmeticTask(min_digits=cfg.min_digits, max_digits=cfg.max_digits, operations=tuple(cfg.operations),
                          seed=seed)


def _max_answer_len(cfg: TinyArithSFTConfig) -> int:
    biggest = 10 ** cfg.max_digits - 1
    values = [biggest + biggest] if "+" in cfg.operations else [biggest]
    if "*" in cfg.operations:
        values.append(biggest * biggest)
    return max(len(str(v)) for v in values) + (1 if "-" in cfg.operations else 0)


def _max_prompt_len(cfg: TinyArithSFTConfig) -> int:
    return 2 * cfg.max_digits + 2


def _decoder_config(cfg: TinyArithSFTConfig, vocab_size: int) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         tie_word_embeddings=True, max_position_embeddings=64, bos_token_id=1, eos_token_id=(2,),
                         pad_token_id=0, initializer_range=0.05, rms_norm_eps=1e-5)


def _encode_sft_batch(tok, examples, length: int) -> dict[str, np.ndarray]:
    """Right-padded ``prompt + answer + <eos>`` rows; the loss weight marks the answer and EOS tokens."""
    n = len(examples)
    tokens = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), bool)
    weight = np.zeros((n, length), np.float32)
    eos = tok.eos_token_id
    vocab = tok.get_vocab()  # char-level: one token per character
    for i, ex in enumerate(examples):
        p = [vocab[c] for c in ex["prompt"]]
        a = [vocab[c] for c in ex["answer"]] + [eos]
        ids = p + a
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = True
        weight[i, len(p):len(ids)] = 1.0  # targets: position t predicts ids[t] from ids[:t]
    return {"tokens": tokens, "mask": mask, "weight": weight}


def _left_pad_prompts(tok, prompts, length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, add_special_tokens=False)["input_ids"][-length:]
        tokens[i, length - len(ids):] = ids
        mask[i, length - len(ids):] = True
    return tokens, mask


def sampled_accuracy(graphdef, state, tok, examples, *, max_prompt_length: int, max_new_tokens: int,
                     key: jax.Array, greedy: bool = False, temperature: float = 1.0,
                     _cache: dict | None = None) -> float:
    """Fraction of ``examples`` whose sampled (or greedy) completion is exactly the answer."""
    prompts = [ex["prompt"] for ex in examples]
    tokens, mask = _left_pad_prompts(tok, prompts, max_prompt_length)
    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                          eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    cache = {} if _cache is None else _cache
    if scfg not in cache:
        cache[scfg] = jax.jit(make_generate_fn(graphdef, scfg))
    out = cache[scfg](state, jnp.asarray(tokens), jnp.asarray(mask), key)
    completions, lengths = jax.device_get((out.completions, out.lengths))
    texts = tok.batch_decode([row[:n].tolist() for row, n in zip(completions, lengths)], skip_special_tokens=True)
    return float(np.mean([t.strip() == ex["answer"] for t, ex in zip(texts, examples)]))


def train_tiny_arith(cfg: TinyArithSFTConfig, out_dir: str | os.PathLike, *, verbose: bool = True
                     ) -> dict[str, Any]:
    """Trains the tiny model of ``cfg`` and writes the HF directory ``out_dir``; returns the SFT metrics."""
    start = time.time()
    tok = build_char_tokenizer()
    vocab = len(tok)
    mcfg = _decoder_config(cfg, vocab)
    # One jitted init (eager init would compile every parameter initializer separately).
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(mcfg, rngs=nnx.Rngs(cfg.seed))))
    params = jax.jit(lambda: nnx.state(CausalLM(mcfg, rngs=nnx.Rngs(cfg.seed))))()
    schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                                     optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))
    opt_state = tx.init(params)
    length = _max_prompt_len(cfg) + _max_answer_len(cfg) + 1

    def loss_fn(p, batch):
        logits = nnx.merge(graphdef, p)(batch["tokens"], attention_mask=batch["mask"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        target = batch["tokens"][:, 1:]
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        w = batch["weight"][:, 1:]
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

    @jax.jit
    def train_step(p, o, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    train_task = _task(cfg, cfg.seed + _TRAIN_SEED_OFFSET)
    eval_task = _task(cfg, cfg.seed + _EVAL_SEED_OFFSET)
    eval_examples = [eval_task[i] for i in range(cfg.eval_examples)]
    eval_key = jax.random.key(cfg.seed + 7)
    gen_cache: dict = {}
    eval_kw: dict[str, Any] = dict(max_prompt_length=_max_prompt_len(cfg), max_new_tokens=_max_answer_len(cfg) + 2,
                                   _cache=gen_cache)
    history = []
    step, loss, acc = 0, float("nan"), 0.0
    while step < cfg.max_steps:
        examples = [train_task[step * cfg.batch_size + i] for i in range(cfg.batch_size)]
        params, opt_state, loss = train_step(params, opt_state, _encode_sft_batch(tok, examples, length))
        step += 1
        if step % cfg.eval_every == 0 and step >= cfg.min_steps:
            acc = sampled_accuracy(graphdef, params, tok, eval_examples, key=eval_key, **eval_kw)
            history.append({"step": step, "loss": float(loss), "sampled_accuracy": acc})
            if verbose:
                log.info("tiny_arith SFT step %d: loss %.4f, sampled accuracy %.3f", step, float(loss), acc)
            if acc >= cfg.target_accuracy:
                break
    greedy = sampled_accuracy(graphdef, params, tok, eval_examples, key=eval_key, greedy=True, **eval_kw)
    metrics = {"steps": step, "final_loss": float(loss), "sampled_accuracy": acc, "greedy_accuracy": greedy,
               "seconds": round(time.time() - start, 1),
               "num_parameters": int(sum(x.size for x in jax.tree.leaves(params))),
               "config": dataclasses.asdict(cfg), "history": history}
    out_dir = Path(out_dir)
    save_pretrained(nnx.merge(graphdef, params), out_dir, tokenizer=tok)
    with open(out_dir / _MARKER, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def ensure_tiny_arith_model(cfg: TinyArithSFTConfig = TINY_ARITH_SFT, cache_dir: str | os.PathLike | None = None,
                            *, force: bool = False) -> Path:
    """The cached SFT model directory of ``cfg``, training it first if absent (or ``force``).

    The directory appears atomically (trained into a temporary sibling, then renamed), so concurrent or
    interrupted calls never leave a half-written model.
    """
    out = tiny_arith_dir(cfg, cache_dir)
    if (out / _MARKER).exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log.info("Training the built-in tiny arithmetic model (once) into %s", out)
        metrics = train_tiny_arith(cfg, tmp)
        log.info("tiny_arith SFT: %d steps, sampled accuracy %.3f, greedy %.3f, %.1f s", metrics["steps"],
                 metrics["sampled_accuracy"], metrics["greedy_accuracy"], metrics["seconds"])
        if out.exists():
            if (out / _MARKER).exists() and not force:
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", default=None, help="cache root (default $ADRPO_JAX_CACHE or ~/.cache/adrpo_jax)")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = ensure_tiny_arith_model(cache_dir=args.cache_dir, force=args.force)
    with open(path / _MARKER, encoding="utf-8") as f:
        m = json.load(f)
    print(f"{path}\n  steps {m['steps']}, sampled accuracy {m['sampled_accuracy']:.3f}, "
          f"greedy accuracy {m['greedy_accuracy']:.3f}, {m['seconds']} s")


if __name__ == "__main__":
    main()
