"""The built-in tiny audio LM of the spoken task (``model.path = 'builtin:tiny_audio_arith'``).

A tiny random ``Qwen2AudioForConditionalGeneration`` (transformers config + weights written offline, Whisper-like
encoder over ``seconds`` of 80-bin log-mels, a 2-layer Qwen2 LM over the character vocabulary of
:func:`~adrpo_jax.rl.tasks.build_char_tokenizer` plus ``'@'`` as the audio token) is briefly supervised end to
end (encoder, projector, LM; in torch, on the transformers model, so the trainer's JAX loader
:func:`adrpo_jax.models.audio_llm.load_pretrained` reads a plain transformers directory)
on the spoken task (:func:`adrpo_jax.rl.audio_data.make_audio_task`, ``'auto'``: spoken arithmetic with
espeak-ng, else beep counting): next-token cross-entropy on ``answer<eos>`` after ``'@' * n + '='``. Training
stops at the first evaluation whose *sampled* accuracy (temperature 1) reaches ``target_accuracy`` (weak, so RL
has room) or at ``max_steps``. The directory (the transformers files and ``sft_metrics.json``) is cached under
``cache_root() / 'tiny_audio_arith-<hash>'``.
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

import jax.numpy as jnp
import numpy as np
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
    max_value: int = 4
    operations: str = "+"
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_steps: int = 600
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
    arrays: dict[str, Any] = {"/".join(map(str, k)): np.asarray(v)
                              for k, v in _flat(nnx.state(model, nnx.Param)).items()}
    np.savez(path, **arrays)


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
                          d_model=cfg.encoder_dim, max_source_positions=round(cfg.seconds * 50)),
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


def _audio_token_counts(feature_mask: np.ndarray) -> np.ndarray:
    """Qwen2-Audio's encoder outputs per clip: ``n = ((L - 1) // 2 + 1 - 2) // 2 + 1`` for ``L`` valid frames."""
    lengths = np.asarray(feature_mask).sum(axis=1)
    return ((lengths - 1) // 2 + 1 - 2) // 2 + 1


def train_tiny_audio(cfg: TinyAudioSFTConfig, out: Path) -> dict[str, Any]:
    """Writes the tiny model to ``out`` and supervises it (see the module docstring; the supervision runs in
    torch on the transformers model, whose directory the JAX loader then reads); returns the metrics."""
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import Qwen2AudioForConditionalGeneration  # pylint: disable=import-outside-toplevel
    t0 = time.time()
    tok = _write_hf_model(cfg, out)
    torch.manual_seed(cfg.seed)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(out)
    task_kw = dict(min_value=cfg.min_value, max_value=cfg.max_value, operations=tuple(cfg.operations),
                   seconds=min(2.0, cfg.seconds))
    task = audio_data.make_audio_task(cfg.task, seed=cfg.seed, **task_kw)
    eval_task = audio_data.make_audio_task(cfg.task, seed=audio_data_eval_seed(), **task_kw)
    feats = audio_data.LogMelFeatures(n_mels=cfg.n_mels, seconds=cfg.seconds)
    eos, pad, eq = tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("=")
    audio_id = tok.convert_tokens_to_ids(AUDIO_CHAR)
    ans_len = len(str(max(cfg.max_value * cfg.max_value, 2 * cfg.max_value, 10))) + 1
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def features(rows):
        for r in rows:
            if r["audio"] not in cache:
                f, m = feats.from_paths([r["audio"]])
                cache[r["audio"]] = (f[0], m[0])
        return np.stack([cache[r["audio"]][0] for r in rows]), np.stack([cache[r["audio"]][1] for r in rows])

    def prompts(counts, p_len):
        t = np.full((len(counts), p_len), pad, np.int64)
        mask = np.zeros((len(counts), p_len), np.int64)
        for i, c in enumerate(counts):
            ids = [audio_id] * int(c) + [eq]
            t[i, p_len - len(ids):], mask[i, p_len - len(ids):] = ids, 1
        return t, mask

    p_len = int(_audio_token_counts(np.ones((1, round(cfg.seconds * 100)), np.int32))[0]) + 1
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    e_rows = [eval_task[i] for i in range(cfg.eval_examples)]
    e_f, e_m = features(e_rows)
    e_t, e_mask = prompts(_audio_token_counts(e_m), p_len)

    def accuracy() -> float:
        model.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            g = model.generate(input_ids=torch.tensor(e_t), attention_mask=torch.tensor(e_mask),
                               input_features=torch.tensor(e_f), feature_attention_mask=torch.tensor(e_m),
                               do_sample=True, temperature=1.0, top_k=0, max_new_tokens=ans_len, pad_token_id=pad,
                               eos_token_id=eos)
        texts = tok.batch_decode(g[:, p_len:].tolist(), skip_special_tokens=True)
        model.train()
        return float(np.mean([t.strip() == r["answer"] for t, r in zip(texts, e_rows)]))

    history, acc, loss_value, s = [], accuracy(), float("nan"), 0
    history.append({"step": 0, "sampled_accuracy": acc})
    while acc < cfg.target_accuracy and s < cfg.max_steps:
        rows = [task[i] for i in range(s * cfg.batch_size, (s + 1) * cfg.batch_size)]
        f, m = features(rows)
        t, mask = prompts(_audio_token_counts(m), p_len)
        ans = np.full((len(rows), ans_len), pad, np.int64)
        amask = np.zeros((len(rows), ans_len), np.int64)
        for i, r in enumerate(rows):
            ids = [tok.convert_tokens_to_ids(ch) for ch in r["answer"]] + [eos]
            ans[i, : len(ids)], amask[i, : len(ids)] = ids, 1
        tokens = torch.tensor(np.concatenate([t, ans], 1))
        attn = torch.tensor(np.concatenate([mask, amask], 1))
        logits = model(input_ids=tokens, attention_mask=attn, input_features=torch.tensor(f),
                       feature_attention_mask=torch.tensor(m)).logits[:, p_len - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, p_len:].reshape(-1),
                                                reduction="none").reshape(len(rows), ans_len)
        am = torch.tensor(amask, dtype=torch.float32)
        loss = (nll * am).sum() / am.sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
        loss_value, s = float(loss.detach()), s + 1
        if s % cfg.eval_every == 0:
            acc = accuracy()
            history.append({"step": s, "loss": loss_value, "sampled_accuracy": acc})
            log.info("tiny audio SFT step %d: loss %.3f, sampled accuracy %.3f", s, loss_value, acc)
    model.save_pretrained(out)
    metrics = {"steps": s, "sampled_accuracy": acc, "loss": loss_value, "seconds": time.time() - t0,
               "history": history, "config": dataclasses.asdict(cfg), "task": type(task).__name__}
    (out / _MARKER).write_text(json.dumps(metrics, indent=2))
    return metrics


def audio_data_eval_seed() -> int:
    from adrpo_jax.rl.data import EVAL_ARITHMETIC_SEED  # pylint: disable=import-outside-toplevel
    return EVAL_ARITHMETIC_SEED


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
