"""The built-in tiny audio LM of the spoken task (``model.path = 'builtin:tiny_audio_arith'``).

A tiny random ``Qwen2AudioForConditionalGeneration`` (transformers config + weights written offline, Whisper-like
encoder over ``seconds`` of 80-bin log-mels, a 2-layer Qwen2 LM over the character vocabulary of
:func:`~adrpo_jax.rl.tasks.build_char_tokenizer` plus ``'@'`` as the audio token) is loaded into JAX
(:func:`adrpo_jax.models.audio_llm.load_pretrained`) and briefly supervised end to end (encoder, projector, LM)
on the spoken task (:func:`adrpo_jax.rl.audio_data.make_audio_task`, ``'auto'``: spoken arithmetic with
espeak-ng, else beep counting): next-token cross-entropy on ``answer<eos>`` after ``'@' * n + '='``. Training
stops at the first evaluation whose *sampled* accuracy (temperature 1) reaches ``target_accuracy`` (weak, so RL
has room) or at ``max_steps``. The directory (the transformers files, ``sft_params.npz`` with the supervised
parameters, ``sft_metrics.json``) is cached under ``cache_root() / 'tiny_audio_arith-<hash>'``.
"""

from __future__ import annotations

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
from flax import nnx, traverse_util

from adrpo_jax.cache import cache_root
from adrpo_jax.rl import audio_data
from adrpo_jax.rl.tasks.arithmetic import build_char_tokenizer

__all__ = ["TinyAudioSFTConfig", "ensure_tiny_audio_model", "load_params_npz", "save_params_npz"]

log = logging.getLogger(__name__)
_MARKER = "sft_metrics.json"
AUDIO_CHAR = "@"


@dataclasses.dataclass(frozen=True)
class TinyAudioSFTConfig:
    """Everything that determines the supervised tiny audio model (its hash names the cache directory)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    encoder_dim: int = 64
    encoder_layers: int = 2
    encoder_heads: int = 4
    encoder_ffn: int = 128
    n_mels: int = 80
    seconds: float = 2.5
    task: str = "auto"
    min_value: int = 0
    max_value: int = 9
    operations: str = "+"
    batch_size: int = 32
    learning_rate: float = 2e-3
    max_steps: int = 800
    eval_every: int = 25
    eval_examples: int = 128
    target_accuracy: float = 0.3
    seed: int = 0

    def fingerprint(self) -> str:
        task = self.task if self.task != "auto" else ("spoken_arithmetic" if audio_data.spoken_task_available()
                                                      else "beeps")
        d = dict(dataclasses.asdict(self), task=task, version=1)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _flat(model_state) -> dict[tuple, Any]:
    return traverse_util.flatten_dict(nnx.to_pure_dict(model_state))


def save_params_npz(model: nnx.Module, path: str | os.PathLike) -> None:
    """All ``nnx.Param`` values of ``model`` as an npz with ``'a/b/0/c'`` keys."""
    np.savez(path, **{"/".join(map(str, k)): np.asarray(v) for k, v in _flat(nnx.state(model, nnx.Param)).items()})


def load_params_npz(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Updates ``model``'s ``nnx.Param`` values in place from :func:`save_params_npz`'s file (every key must match)."""
    data = np.load(path)
    state = nnx.state(model, nnx.Param)
    flat = _flat(state)
    missing = [k for k in flat if "/".join(map(str, k)) not in data.files]
    if missing or len(flat) != len(data.files):
        raise ValueError(f"{path}: parameters do not match the model (missing {missing[:3]}, file has "
                         f"{len(data.files)} arrays, model {len(flat)})")
    new = {k: jnp.asarray(data["/".join(map(str, k))], v.dtype) for k, v in flat.items()}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new))
    nnx.update(model, state)
    return model


def _write_hf_model(cfg: TinyAudioSFTConfig, out: Path):
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration  # pylint: disable=import-outside-toplevel
    tok = build_char_tokenizer(extra_chars=(AUDIO_CHAR,))
    hf_cfg = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=cfg.n_mels, encoder_layers=cfg.encoder_layers,
                          encoder_attention_heads=cfg.encoder_heads, encoder_ffn_dim=cfg.encoder_ffn,
                          d_model=cfg.encoder_dim, max_source_positions=int(round(cfg.seconds * 50))),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, max_position_embeddings=512),
        audio_token_index=tok.convert_tokens_to_ids(AUDIO_CHAR))
    torch.manual_seed(cfg.seed)
    Qwen2AudioForConditionalGeneration(hf_cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return tok


def train_tiny_audio(cfg: TinyAudioSFTConfig, out: Path) -> dict[str, Any]:
    """Writes the tiny model to ``out`` and supervises it (see the module docstring); returns the metrics."""
    from adrpo_jax.models import audio_llm  # pylint: disable=import-outside-toplevel
    from adrpo_jax.models.llm.sampler import SamplingConfig, make_generate_fn  # pylint: disable=import-outside-toplevel
    t0 = time.time()
    tok = _write_hf_model(cfg, out)
    model = audio_llm.load_pretrained(out)
    task = audio_data.make_audio_task(cfg.task, seed=cfg.seed, min_value=cfg.min_value, max_value=cfg.max_value,
                                      operations=tuple(cfg.operations), seconds=min(2.0, cfg.seconds))
    eval_task = audio_data.make_audio_task(cfg.task, seed=cfg.seed + 7919, min_value=cfg.min_value,
                                           max_value=cfg.max_value, operations=tuple(cfg.operations),
                                           seconds=min(2.0, cfg.seconds))
    feats = audio_data.LogMelFeatures(n_mels=cfg.n_mels, seconds=cfg.seconds)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lm_graphdef = nnx.graphdef(model.lm)
    encode = jax.jit(lambda p, f, m: nnx.merge(graphdef, p, rest).encode_audio(f, m))
    eos, pad, eq = tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("=")
    audio_id = tok.convert_tokens_to_ids(AUDIO_CHAR)
    ans_len = len(str(max(cfg.max_value * cfg.max_value, 2 * cfg.max_value, 10))) + 1

    def examples(source, start, n):
        rows = [source[i] for i in range(start, start + n)]
        f, m = feats.from_paths([r["audio"] for r in rows])
        _, valid = encode(params, f, m)
        counts = np.asarray(valid).sum(1)
        return rows, f, m, counts

    n_max = int(np.asarray(encode(params, *feats([np.zeros(int(cfg.seconds * 16000), np.float32)]))[1]).shape[1])
    p_len = n_max + 1

    def prompt_tokens(counts):
        t = np.full((len(counts), p_len), pad, np.int32)
        mask = np.zeros((len(counts), p_len), bool)
        for i, c in enumerate(counts):
            ids = [audio_id] * int(c) + [eq]
            t[i, p_len - len(ids):], mask[i, p_len - len(ids):] = ids, True
        return t, mask

    def sft_batch(rows, counts):
        t, mask = prompt_tokens(counts)
        ans = np.full((len(rows), ans_len), pad, np.int32)
        amask = np.zeros((len(rows), ans_len), bool)
        for i, r in enumerate(rows):
            ids = [tok.convert_tokens_to_ids(ch) for ch in r["answer"]] + [eos]
            ans[i, : len(ids)], amask[i, : len(ids)] = ids, True
        return np.concatenate([t, ans], 1), np.concatenate([mask, amask], 1), amask

    tx = optax.adamw(cfg.learning_rate, weight_decay=0.0)
    opt_state = tx.init(params)

    def loss_fn(p, tokens, mask, amask, f, fm):
        logits = nnx.merge(graphdef, p, rest)(tokens, mask, f, fm)  # [B, T, V] (tiny vocabulary)
        logits = logits[:, p_len - 1:-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, tokens[:, p_len:, None], -1)[..., 0]
        return jnp.sum(nll * amask) / jnp.maximum(jnp.sum(amask), 1)

    @jax.jit
    def step(p, o, tokens, mask, amask, f, fm):
        loss, g = jax.value_and_grad(loss_fn)(p, tokens, mask, amask, f, fm)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    gen = make_generate_fn(lm_graphdef, SamplingConfig(max_new_tokens=ans_len, temperature=1.0, eos_token_ids=(eos,),
                                                       pad_token_id=pad))

    @jax.jit
    def sample(p, t, m, f, fm, key):
        mdl = nnx.merge(graphdef, p, rest)
        emb, valid = mdl.encode_audio(f, fm)
        return gen(nnx.state(mdl.lm), t, m, key, prompt_embeds=mdl.embed_inputs(t, emb, valid))

    e_rows, e_f, e_m, e_counts = examples(eval_task, 0, cfg.eval_examples)
    e_t, e_mask = prompt_tokens(e_counts)

    def accuracy(p):
        out = sample(p, e_t, e_mask, e_f, e_m, jax.random.key(123))
        comp, lens = np.asarray(out.completions), np.asarray(out.lengths)
        texts = tok.batch_decode([c[:n].tolist() for c, n in zip(comp, lens)], skip_special_tokens=True)
        return float(np.mean([t.strip() == r["answer"] for t, r in zip(texts, e_rows)]))

    history, acc, loss = [], accuracy(params), float("nan")
    history.append({"step": 0, "sampled_accuracy": acc})
    s = 0
    while acc < cfg.target_accuracy and s < cfg.max_steps:
        rows, f, m, counts = examples(task, s * cfg.batch_size, cfg.batch_size)
        tokens, mask, amask = sft_batch(rows, counts)
        params, opt_state, loss = step(params, opt_state, tokens, mask, amask, f, m)
        s += 1
        if s % cfg.eval_every == 0:
            acc = accuracy(params)
            history.append({"step": s, "loss": float(loss), "sampled_accuracy": acc})
            log.info("tiny audio SFT step %d: loss %.3f, sampled accuracy %.3f", s, float(loss), acc)
    nnx.update(model, params)
    save_params_npz(model, out / "sft_params.npz")
    metrics = {"steps": s, "sampled_accuracy": acc, "loss": float(loss), "seconds": time.time() - t0,
               "history": history, "config": dataclasses.asdict(cfg), "task": type(task).__name__}
    (out / _MARKER).write_text(json.dumps(metrics, indent=2))
    return metrics


def tiny_audio_dir(cfg: TinyAudioSFTConfig = TinyAudioSFTConfig(), cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / f"tiny_audio_arith-{cfg.fingerprint()}"


def sft_config_of(config: Any) -> TinyAudioSFTConfig:
    """The SFT config matching a trainer config's ``audio`` section (task, operands, window)."""
    a = config.audio
    return TinyAudioSFTConfig(task=a.task if a.task != "jsonl" else "auto", min_value=int(a.min_value),
                              max_value=int(a.max_value), operations=str(a.operations), seconds=float(a.seconds),
                              n_mels=int(a.n_mels))


def ensure_tiny_audio_model(config: Any = None, *, cfg: TinyAudioSFTConfig | None = None,
                            cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached supervised tiny audio model's directory (trained on first use, ~a minute on CPU)."""
    cfg = cfg or (sft_config_of(config) if config is not None else TinyAudioSFTConfig())
    out = tiny_audio_dir(cfg, cache_dir)
    if (out / _MARKER).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        metrics = train_tiny_audio(cfg, tmp)
        log.info("tiny audio model: %d SFT steps, sampled accuracy %.3f (%.0f s)", metrics["steps"],
                 metrics["sampled_accuracy"], metrics["seconds"])
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race
            if not (out / _MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
