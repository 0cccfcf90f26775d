r"""SD3 prompt embeddings computed once on the host, and cached on disk, for the flow trainer.

The SD3 / SD3.5 transformer is conditioned on text states ``[L, D]`` and a pooled vector ``[P]`` from three
text encoders. They never run in the train step: :func:`encode_prompts` computes them for a whole prompt set
with ``transformers`` (PyTorch on the CPU is enough) and :func:`cached_prompt_embeddings` stores them in an
``.npz`` that later runs read without importing torch. The trainer keeps conditions as integer prompt ids and
looks the rows up from a device table (:class:`adrpo_jax.flow.sd3.MMDiTVelocity`).

**What is computed** -- exactly diffusers 0.42.1 ``StableDiffusion3Pipeline.encode_prompt`` (same prompt for
all three encoders, one image per prompt; ``tests/flow/test_text_embeddings.py`` compares the two):

* CLIP-L (``text_encoder``) and CLIP-G (``text_encoder_2``), both ``CLIPTextModelWithProjection``: tokens padded /
  truncated to ``tokenizer.model_max_length`` (77; the CLIP-L tokenizer's length is used for both, as diffusers
  does); text states = ``hidden_states[-2]`` (the penultimate layer, no final layer norm) or
  ``hidden_states[-(clip_skip + 2)]``; pooled = ``text_embeds`` (projected EOS state).
* the two CLIP state sequences concatenated on features (``768 + 1280 = 2048`` in SD3) and zero-padded to the
  T5 width (``4096``); pooled = ``[pooled_L, pooled_G]`` (``P = 2048``).
* T5 (``text_encoder_3``, ``T5EncoderModel``): tokens with EOS, padded / truncated to ``max_sequence_length``,
  no attention mask (as diffusers), ``last_hidden_state``. Without T5 (SD3 can drop it), zeros of width
  ``joint_attention_dim`` (the transformer's ``config.joint_attention_dim``, 4096 for SD3), as diffusers does when
  ``text_encoder_3`` is None.
* text states = ``[CLIP states (77 tokens); T5 states (max_sequence_length tokens)]`` along the sequence:
  ``L = 77 + max_sequence_length``, ``D = 4096`` in SD3.

**The null row.** The empty prompt ``""`` is always a row of the table (appended after ``prompts`` when absent):
the unconditional branch of classifier-free guidance (diffusers' default ``negative_prompt=""``) and the CFG
dropout rows. ``null_id`` is its row. Following diffusers, the negative prompt ignores ``clip_skip``, so the null
row uses the penultimate CLIP layer whatever ``clip_skip`` is. Row ``i < len(prompts)`` is ``prompts[i]`` (the
prompt id of the trainer).

**Inputs.** Either the diffusers pipeline layout, ``text_path`` = a root with ``text_encoder/``,
``text_encoder_2/``, ``text_encoder_3/`` (optional), ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/`` (the
layout of ``stabilityai/stable-diffusion-3-medium-diffusers``), or explicit directories ``clip_l_path``,
``clip_g_path``, ``t5_path`` with ``tokenizer_*_path`` (default: the encoder's own directory). Nothing is
downloaded. Encoders are loaded one at a time and freed before the next, in ``torch_dtype`` (``"float32"``
default; T5-XXL is about 19 GB in float32 on the host, ``"bfloat16"`` halves it at a small cost in accuracy).
Outputs are float32 numpy arrays.

Example (paths are local directories)::

    table = cached_prompt_embeddings(["a photo of a cat", "a red cube"], "/ckpt/sd3-medium-diffusers")
    table.embeddings.shape, table.pooled.shape, table.null_id   # (3, 333, 4096), (3, 2048), 2
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adrpo_jax.cache import cache_root

__all__ = [
    "TextEncoderPaths",
    "PromptEmbeddings",
    "resolve_text_paths",
    "prompt_rows",
    "encode_prompts",
    "encode_prompt_rows",
    "embedding_cache_key",
    "PromptEmbeddingCache",
    "cached_prompt_embeddings",
    "NULL_PROMPT",
]

logger = logging.getLogger(__name__)

NULL_PROMPT = ""
CACHE_FORMAT_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_HASH_CONTENT_MAX_BYTES = 64 << 20
_TORCH_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextEncoderPaths:
    """Local directories of SD3's text encoders and tokenizers (``t5`` / ``tokenizer_t5`` None: no T5)."""
    clip_l: str
    clip_g: str
    tokenizer_l: str
    tokenizer_g: str
    t5: str | None = None
    tokenizer_t5: str | None = None

    def items(self) -> list[tuple[str, str]]:
        """``[(role, directory), ...]`` of the directories that exist in this set (the cache key's inputs)."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


def _check_dir(path: Any, name: str) -> str:
    p = Path(os.fspath(path)).expanduser()
    if not p.is_dir():
        raise ValueError(f"`{name}` must be a local directory, got {os.fspath(path)!r} (not found).")
    return str(p.resolve())


def resolve_text_paths(text_path: str | os.PathLike | None = None, *, clip_l_path: Any = None,
                       clip_g_path: Any = None, t5_path: Any = None, tokenizer_l_path: Any = None,
                       tokenizer_g_path: Any = None, tokenizer_t5_path: Any = None,
                       use_t5: bool | None = None) -> TextEncoderPaths:
    """The encoder / tokenizer directories from a diffusers pipeline root and/or explicit paths.

    Explicit paths win over the root's subfolders. A tokenizer path defaults to ``<root>/tokenizer*`` with a
    root, else to its encoder's directory. ``use_t5``: ``None`` = T5 when its directory exists (a root without
    ``text_encoder_3/`` means no T5, logged), ``False`` = never (zeros, as diffusers without ``text_encoder_3``),
    ``True`` = required.
    """
    root = None if text_path is None else Path(_check_dir(text_path, "text_path"))

    def pick(explicit, sub, name, required=True):
        if explicit is not None:
            return _check_dir(explicit, name)
        if root is not None and (root / sub).is_dir():
            return str(root / sub)
        if required:
            where = f"`{name}` or {sub}/ under `text_path`={str(root)!r}" if root else f"`{name}` (or `text_path`)"
            raise ValueError(f"missing the {sub} directory: pass {where}.")
        return None

    clip_l = pick(clip_l_path, "text_encoder", "clip_l_path")
    clip_g = pick(clip_g_path, "text_encoder_2", "clip_g_path")
    tok_l = pick(tokenizer_l_path, "tokenizer", "tokenizer_l_path", required=False) or clip_l
    tok_g = pick(tokenizer_g_path, "tokenizer_2", "tokenizer_g_path", required=False) or clip_g
    if use_t5 is False:
        t5 = tok_t5 = None
    else:
        t5 = pick(t5_path, "text_encoder_3", "t5_path", required=bool(use_t5))
        tok_t5 = None
        if t5 is not None:
            tok_t5 = pick(tokenizer_t5_path, "tokenizer_3", "tokenizer_t5_path", required=False) or t5
        elif use_t5 is None:
            logger.warning("no T5 encoder (text_encoder_3) given: its states are zeros, as diffusers does without it.")
    return TextEncoderPaths(clip_l=clip_l, clip_g=clip_g, tokenizer_l=tok_l, tokenizer_g=tok_g, t5=t5,
                            tokenizer_t5=tok_t5)


# ----------------------------------------------------------------------------------------------------------
# Encoding (torch + transformers, imported lazily)
# ----------------------------------------------------------------------------------------------------------


def prompt_rows(prompts: Sequence[str]) -> tuple[list[str], int]:
    """The table rows ``prompts + [""]`` (``""`` appended only when absent) and ``null_id``, the row of ``""``.

    >>> prompt_rows(["a cat", "a dog"])
    (['a cat', 'a dog', ''], 2)
    >>> prompt_rows(["", "a cat"])
    (['', 'a cat'], 0)
    """
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"`prompts` must be a sequence of str, got {type(prompts).__name__} {prompts!r:.200}.")
    rows = list(prompts)
    if NULL_PROMPT not in rows:
        rows.append(NULL_PROMPT)
    return rows, rows.index(NULL_PROMPT)


def _check_options(max_sequence_length: Any, clip_skip: Any, joint_attention_dim: Any, batch_size: Any,
                   torch_dtype: Any) -> None:
    if not isinstance(max_sequence_length, int) or isinstance(max_sequence_length, bool) or max_sequence_length < 1:
        raise ValueError(f"`max_sequence_length` must be a positive int, got {max_sequence_length!r}.")
    if max_sequence_length > 512:
        raise ValueError(f"`max_sequence_length` must be <= 512 (diffusers' limit for SD3), got {max_sequence_length}.")
    if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 0):
        raise ValueError(f"`clip_skip` must be None or an int >= 0, got {clip_skip!r}.")
    if not isinstance(joint_attention_dim, int) or joint_attention_dim < 1:
        raise ValueError(f"`joint_attention_dim` must be a positive int, got {joint_attention_dim!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if torch_dtype not in _TORCH_DTYPES:
        raise ValueError(f"`torch_dtype` must be one of {_TORCH_DTYPES}, got {torch_dtype!r}.")


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _warn_truncated(tokenizer, rows: list[str], max_length: int, what: str) -> None:
    lengths = [len(ids) for ids in tokenizer(rows, add_special_tokens=True).input_ids]
    over = sum(n > max_length for n in lengths)
    if over:
        logger.warning("%d of %d prompts are longer than %s's %d tokens and were truncated (longest: %d).",
                       over, len(rows), what, max_length, max(lengths))


def _encode_clip(model_dir: str, tokenizer, rows: list[str], *, max_length: int, clip_skip: int | None,
                 null_id: int | None, batch_size: int, torch_dtype) -> tuple[np.ndarray, np.ndarray]:
    """diffusers ``_get_clip_prompt_embeds``: (``hidden_states[-2 or -(clip_skip + 2)]`` [N, max_length, H],
    ``text_embeds`` [N, proj]) float32; the ``null_id`` row uses ``hidden_states[-2]`` (negative prompt)."""
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import CLIPTextModelWithProjection  # pylint: disable=import-outside-toplevel

    model = CLIPTextModelWithProjection.from_pretrained(model_dir, dtype=torch_dtype).eval()
    _warn_truncated(tokenizer, rows, max_length, f"CLIP ({model_dir})")
    states, pooled = [], []
    with torch.no_grad():
        for sl in _batches(len(rows), batch_size):
            ids = tokenizer(rows[sl], padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = model(ids, output_hidden_states=True)
            layer = -2 if clip_skip is None else -(clip_skip + 2)
            h = out.hidden_states[layer]
            if layer != -2 and null_id is not None and sl.start <= null_id < sl.stop:
                h = h.clone()
                h[null_id - sl.start] = out.hidden_states[-2][null_id - sl.start]
            states.append(h.float().numpy())
            pooled.append(out.text_embeds.float().numpy())
    del model
    gc.collect()
    return np.concatenate(states, 0), np.concatenate(pooled, 0)


def _encode_t5(model_dir: str, tokenizer, rows: list[str], *, max_length: int, batch_size: int,
               torch_dtype) -> np.ndarray:
    """diffusers ``_get_t5_prompt_embeds``: ``last_hidden_state`` [N, max_length, d_model] float32."""
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import T5EncoderModel  # pylint: disable=import-outside-toplevel

    model = T5EncoderModel.from_pretrained(model_dir, dtype=torch_dtype).eval()
    _warn_truncated(tokenizer, rows, max_length, f"T5 ({model_dir})")
    states = []
    with torch.no_grad():
        for sl in _batches(len(rows), batch_size):
            ids = tokenizer(rows[sl], padding="max_length", max_length=max_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
            states.append(model(ids)[0].float().numpy())
    del model
    gc.collect()
    return np.concatenate(states, 0)


def _config_value(directory: str, key: str) -> int | None:
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get(key, cfg.get("text_config", {}).get(key))
    return int(value) if isinstance(value, int) else None


def _check_widths(paths: TextEncoderPaths, joint_attention_dim: int) -> None:
    """Fail before loading anything when the CLIP states cannot be zero-padded to the T5 width (from the
    config.json files; skipped when a value is not there)."""
    widths = [_config_value(paths.clip_l, "hidden_size"), _config_value(paths.clip_g, "hidden_size")]
    t5_width = joint_attention_dim if paths.t5 is None else _config_value(paths.t5, "d_model")
    if None not in widths and t5_width is not None and sum(widths) > t5_width:
        raise ValueError(f"the CLIP states are {widths[0]} + {widths[1]} wide (CLIP-L + CLIP-G hidden sizes), more "
                         f"than the T5 width {t5_width} (T5 d_model or `joint_attention_dim`): cannot zero-pad.")


def encode_prompt_rows(rows: Sequence[str], paths: TextEncoderPaths, *, null_id: int | None = None,
                       max_sequence_length: int = 256, clip_skip: int | None = None,
                       joint_attention_dim: int = 4096, batch_size: int = 8,
                       torch_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of exactly ``rows`` (no null row added): ``(states [N, Lc + max_sequence_length, D], pooled
    [N, P])`` float32 numpy, ``Lc`` = the CLIP-L tokenizer's ``model_max_length``. ``null_id``: the row computed
    as diffusers' negative prompt (``clip_skip`` ignored). See :func:`encode_prompts`."""
    rows = list(rows)
    if not rows:
        raise ValueError("`rows` must not be empty.")
    _check_options(max_sequence_length, clip_skip, joint_attention_dim, batch_size, torch_dtype)
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

    _check_widths(paths, joint_attention_dim)
    dtype = getattr(torch, torch_dtype)
    tok_l = AutoTokenizer.from_pretrained(paths.tokenizer_l)
    tok_g = AutoTokenizer.from_pretrained(paths.tokenizer_g)
    clip_len = int(tok_l.model_max_length)
    if not 0 < clip_len <= 4096:
        raise ValueError(f"the CLIP-L tokenizer in {paths.tokenizer_l!r} has model_max_length={clip_len}; set it to "
                         "the CLIP context length (77) in its tokenizer_config.json.")
    kw = dict(max_length=clip_len, clip_skip=clip_skip, null_id=null_id, batch_size=batch_size, torch_dtype=dtype)
    states_l, pooled_l = _encode_clip(paths.clip_l, tok_l, rows, **kw)
    states_g, pooled_g = _encode_clip(paths.clip_g, tok_g, rows, **kw)
    clip_states = np.concatenate([states_l, states_g], axis=-1)
    if paths.t5 is not None:
        tok_t5 = AutoTokenizer.from_pretrained(paths.tokenizer_t5)
        t5_states = _encode_t5(paths.t5, tok_t5, rows, max_length=max_sequence_length, batch_size=batch_size,
                               torch_dtype=dtype)
    else:
        t5_states = np.zeros((len(rows), max_sequence_length, joint_attention_dim), np.float32)
    width = t5_states.shape[-1]
    if clip_states.shape[-1] > width:
        raise ValueError(f"the CLIP states are {clip_states.shape[-1]} wide (CLIP-L + CLIP-G hidden sizes), "
                         f"more than the T5 width {width} (T5 d_model or `joint_attention_dim`): cannot zero-pad.")
    clip_states = np.pad(clip_states, ((0, 0), (0, 0), (0, width - clip_states.shape[-1])))
    states = np.concatenate([clip_states, t5_states], axis=1).astype(np.float32)
    pooled = np.concatenate([pooled_l, pooled_g], axis=-1).astype(np.float32)
    return states, pooled


def encode_prompts(prompts: Sequence[str], text_path: str | os.PathLike | None = None, *,
                   clip_l_path: Any = None, clip_g_path: Any = None, t5_path: Any = None,
                   tokenizer_l_path: Any = None, tokenizer_g_path: Any = None, tokenizer_t5_path: Any = None,
                   use_t5: bool | None = None, max_sequence_length: int = 256, clip_skip: int | None = None,
                   joint_attention_dim: int = 4096, batch_size: int = 8,
                   torch_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """SD3 prompt embeddings of the rows ``prompts + [""]`` (see :func:`prompt_rows`), computed now with torch.

    Args:
      prompts: the prompt set; prompt id ``i`` is row ``i``. ``""`` is appended when absent (the null row).
      text_path / clip_l_path / ...: the encoder directories (:func:`resolve_text_paths`).
      use_t5: ``None`` = T5 if present, ``False`` = zeros in its place, ``True`` = required.
      max_sequence_length: T5 tokens (diffusers' default 256; at most 512).
      clip_skip: CLIP layers skipped (``None`` = the penultimate layer, diffusers' default).
      joint_attention_dim: the zero T5 width without T5 (the transformer's ``config.joint_attention_dim``).
      batch_size: prompts per encoder forward.
      torch_dtype: ``"float32"`` (exact), ``"bfloat16"`` or ``"float16"`` for the encoders' weights.

    Returns:
      ``(states [N, 77 + max_sequence_length, D] float32, pooled [N, P] float32)``, ``N = len(rows)``, ``D`` = T5's
      ``d_model`` (4096), ``P`` = the two CLIP projection widths (768 + 1280). The null row is
      ``prompt_rows(prompts)[1]``.
    """
    rows, null_id = prompt_rows(prompts)
    paths = resolve_text_paths(text_path, clip_l_path=clip_l_path, clip_g_path=clip_g_path, t5_path=t5_path,
                               tokenizer_l_path=tokenizer_l_path, tokenizer_g_path=tokenizer_g_path,
                               tokenizer_t5_path=tokenizer_t5_path, use_t5=use_t5)
    return encode_prompt_rows(rows, paths, null_id=null_id, max_sequence_length=max_sequence_length,
                              clip_skip=clip_skip, joint_attention_dim=joint_attention_dim, batch_size=batch_size,
                              torch_dtype=torch_dtype)


# ----------------------------------------------------------------------------------------------------------
# The on-disk cache (no torch on a hit)
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptEmbeddings:
    """A prompt table: ``embeddings [N, L, D]``, ``pooled [N, P]`` float32 numpy; row ``i`` is ``prompts[i]``,
    ``null_id`` the row of ``""`` (CFG's unconditional branch); ``key`` the cache key it was stored under."""
    prompts: tuple[str, ...]
    embeddings: np.ndarray
    pooled: np.ndarray
    null_id: int
    key: str

    @property
    def num_prompts(self) -> int:
        """Rows of the table, the null row included."""
        return len(self.prompts)

    def ids(self, prompts: Sequence[str]) -> np.ndarray:
        """``[len(prompts)]`` int32 row ids of ``prompts`` (the first row with that text); ValueError if absent."""
        index: dict[str, int] = {}
        for i, p in enumerate(self.prompts):
            index.setdefault(p, i)
        missing = [p for p in prompts if p not in index]
        if missing:
            raise ValueError(f"prompts not in the table: {missing[:5]!r}{' ...' if len(missing) > 5 else ''}")
        return np.asarray([index[p] for p in prompts], np.int32)


def _dir_fingerprint(directory: str) -> list[list[Any]]:
    """Per file (sorted, recursive): ``[relpath, sha256]`` for configs / tokenizer files, ``[relpath, size,
    mtime_ns]`` for weights (and any file over 64 MiB): a new checkpoint or tokenizer changes the key."""
    out: list[list[Any]] = []
    root = Path(directory)
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        rel = p.relative_to(root).as_posix()
        st = p.stat()
        if p.name.endswith(_WEIGHT_SUFFIXES) or st.st_size > _HASH_CONTENT_MAX_BYTES:
            out.append([rel, st.st_size, st.st_mtime_ns])
        else:
            out.append([rel, hashlib.sha256(p.read_bytes()).hexdigest()])
    return out


def embedding_cache_key(rows: Sequence[str], paths: TextEncoderPaths, *, max_sequence_length: int,
                        clip_skip: int | None, joint_attention_dim: int, torch_dtype: str,
                        null_id: int | None) -> str:
    """sha256 hex of everything the embeddings depend on: the rows, the options, and each encoder / tokenizer
    directory's fingerprint (content hashes of small files, size + mtime of weights). No torch."""
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "rows": list(rows),
        "null_id": null_id,
        "max_sequence_length": max_sequence_length,
        "clip_skip": clip_skip,
        "joint_attention_dim": joint_attention_dim if paths.t5 is None else None,
        "torch_dtype": torch_dtype,
        "dirs": {role: _dir_fingerprint(d) for role, d in paths.items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class PromptEmbeddingCache:
    """An on-disk store of prompt tables, one ``<key>.npz`` per (prompt set, encoders, options).

    ``get(prompts, paths, **options)`` returns the stored table when the key matches (numpy only), else encodes
    with torch (:func:`encode_prompt_rows`), writes the file atomically and returns it. ``hits`` / ``misses``
    count the lookups of this object.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "prompt_embeddings"
        self.hits = 0
        self.misses = 0

    def path_for(self, key: str) -> Path:
        return self.cache_dir / f"sd3_prompts_{key[:32]}.npz"

    def load(self, key: str, rows: Sequence[str]) -> PromptEmbeddings | None:
        """The stored table of ``key`` (None when absent, unreadable or for other rows)."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                stored_key = str(f["key"])
                prompts = tuple(json.loads(str(f["prompts_json"])))
                table = PromptEmbeddings(prompts=prompts, embeddings=np.asarray(f["embeddings"], np.float32),
                                         pooled=np.asarray(f["pooled"], np.float32), null_id=int(f["null_id"]),
                                         key=stored_key)
        except (OSError, ValueError, KeyError) as e:  # a truncated / foreign file: recompute
            logger.warning("ignoring unreadable prompt-embedding cache %s (%s)", path, e)
            return None
        if stored_key != key or list(prompts) != list(rows):
            return None
        return table

    def save(self, table: PromptEmbeddings) -> Path:
        """Write ``table`` under its key (temporary file + rename: readers never see a partial file)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.path_for(table.key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=table.embeddings, pooled=table.pooled, null_id=np.int64(table.null_id),
                     key=np.str_(table.key), prompts_json=np.str_(json.dumps(list(table.prompts))))
        os.replace(tmp, path)
        return path

    def get(self, prompts: Sequence[str], paths: TextEncoderPaths, *, max_sequence_length: int = 256,
            clip_skip: int | None = None, joint_attention_dim: int = 4096, batch_size: int = 8,
            torch_dtype: str = "float32") -> PromptEmbeddings:
        """The table of ``prompts + [""]`` (see :func:`prompt_rows`), from disk when cached."""
        rows, null_id = prompt_rows(prompts)
        _check_options(max_sequence_length, clip_skip, joint_attention_dim, batch_size, torch_dtype)
        key = embedding_cache_key(rows, paths, max_sequence_length=max_sequence_length, clip_skip=clip_skip,
                                  joint_attention_dim=joint_attention_dim, torch_dtype=torch_dtype, null_id=null_id)
        table = self.load(key, rows)
        if table is not None:
            self.hits += 1
            return table
        self.misses += 1
        states, pooled = encode_prompt_rows(rows, paths, null_id=null_id, max_sequence_length=max_sequence_length,
                                            clip_skip=clip_skip, joint_attention_dim=joint_attention_dim,
                                            batch_size=batch_size, torch_dtype=torch_dtype)
        table = PromptEmbeddings(prompts=tuple(rows), embeddings=states, pooled=pooled, null_id=null_id, key=key)
        path = self.save(table)
        logger.info("cached %d prompt embeddings %s in %s", len(rows), states.shape, path)
        return table


def cached_prompt_embeddings(prompts: Sequence[str], text_path: str | os.PathLike | None = None,
                             cache_dir: str | os.PathLike | None = None, *, clip_l_path: Any = None,
                             clip_g_path: Any = None, t5_path: Any = None, tokenizer_l_path: Any = None,
                             tokenizer_g_path: Any = None, tokenizer_t5_path: Any = None,
                             use_t5: bool | None = None, max_sequence_length: int = 256,
                             clip_skip: int | None = None, joint_attention_dim: int = 4096, batch_size: int = 8,
                             torch_dtype: str = "float32") -> PromptEmbeddings:
    """:func:`encode_prompts` through the on-disk cache (``cache_dir``, default
    ``$ADRPO_JAX_CACHE/prompt_embeddings``): a second call with the same prompts, encoder files and options
    reads the ``.npz`` without importing torch; anything changed recomputes. Returns a :class:`PromptEmbeddings`
    (row ``i`` = ``prompts[i]``, ``null_id`` = the row of ``""``)."""
    paths = resolve_text_paths(text_path, clip_l_path=clip_l_path, clip_g_path=clip_g_path, t5_path=t5_path,
                               tokenizer_l_path=tokenizer_l_path, tokenizer_g_path=tokenizer_g_path,
                               tokenizer_t5_path=tokenizer_t5_path, use_t5=use_t5)
    return PromptEmbeddingCache(cache_dir).get(prompts, paths, max_sequence_length=max_sequence_length,
                                               clip_skip=clip_skip, joint_attention_dim=joint_attention_dim,
                                               batch_size=batch_size, torch_dtype=torch_dtype)
