r"""SD3 prompt embeddings computed once on the host, and cached on disk, for the flow trainer.

The SD3 / SD3.5 transformer is conditioned on text states ``[L, D]`` and a pooled vector ``[P]`` from three
text encoders. They never run in the train step: :func:`encode_prompts` computes them for a whole prompt set
with ``transformers`` (PyTorch on the CPU is enough) and :func:`cached_prompt_embeddings` stores them on disk
for later runs, which read them without importing torch. The trainer keeps conditions as integer prompt ids and
looks the rows up from a device table (:class:`adrpo_jax.flow.sd3.MMDiTVelocity`).

**Host memory.** A large prompt set is big: flow_grpo's ~25k prompts at SD3's ``[333, 4096]`` are 136 GB in
float32. The cache is a directory of ``.npy`` files (``embeddings.npy`` ``[N, L, D]``, ``pooled.npy`` ``[N, P]``,
``meta.json``) that a hit opens **memory-mapped** (``np.load(..., mmap_mode="r")``): nothing is read until rows
are indexed, so a process that places only its own rows on its devices
(:func:`adrpo_jax.flow.sd3.shard_prompt_table`) reads only those pages. A miss writes the encoders' outputs batch
by batch into the memory-mapped files (no ``[N, L, D]`` array in memory either). Caches of earlier releases (one
uncompressed ``.npz`` per key) are still read, memory-mapped in place inside the zip (no copy, no migration).

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
Outputs are float32 numpy arrays (read-only ``np.memmap`` s from the cache).

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
import shutil
import struct
import zipfile
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

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
CACHE_FORMAT_VERSION = 1   # in the cache key: the embeddings' definition (unchanged by the on-disk layout)
CACHE_LAYOUT = 2           # on disk: 2 = a directory of .npy files (memory-mapped); 1 = one .npz (still read)
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


def _encode_clip(model_dir: str, tokenizer, rows: list[str], put: Callable[[slice, np.ndarray, np.ndarray], None],
                 *, max_length: int, clip_skip: int | None, null_id: int | None, batch_size: int,
                 torch_dtype) -> None:
    """diffusers ``_get_clip_prompt_embeds``: per batch of rows ``sl``, ``put(sl, hidden_states[-2 or
    -(clip_skip + 2)] [b, max_length, H], text_embeds [b, proj])`` float32; the ``null_id`` row uses
    ``hidden_states[-2]`` (negative prompt)."""
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import CLIPTextModelWithProjection  # pylint: disable=import-outside-toplevel

    model = CLIPTextModelWithProjection.from_pretrained(model_dir, dtype=torch_dtype).eval()
    _warn_truncated(tokenizer, rows, max_length, f"CLIP ({model_dir})")
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
            put(sl, h.float().numpy(), out.text_embeds.float().numpy())
    del model
    gc.collect()


def _encode_t5(model_dir: str, tokenizer, rows: list[str], put: Callable[[slice, np.ndarray], None], *,
               max_length: int, batch_size: int, torch_dtype) -> None:
    """diffusers ``_get_t5_prompt_embeds``: per batch of rows ``sl``, ``put(sl, last_hidden_state [b,
    max_length, d_model])`` float32."""
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import T5EncoderModel  # pylint: disable=import-outside-toplevel

    model = T5EncoderModel.from_pretrained(model_dir, dtype=torch_dtype).eval()
    _warn_truncated(tokenizer, rows, max_length, f"T5 ({model_dir})")
    with torch.no_grad():
        for sl in _batches(len(rows), batch_size):
            ids = tokenizer(rows[sl], padding="max_length", max_length=max_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
            put(sl, model(ids)[0].float().numpy())
    del model
    gc.collect()


def _table_widths(paths: TextEncoderPaths, joint_attention_dim: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """``((CLIP-L width, CLIP-G width), (CLIP-L projection, CLIP-G projection), D)`` from the encoders'
    configurations (no weights read; ``D`` = T5's ``d_model``, or ``joint_attention_dim`` without T5). Fails
    before any weight is loaded when the CLIP states cannot be zero-padded to ``D``."""
    from transformers import CLIPTextConfig, T5Config  # pylint: disable=import-outside-toplevel

    cfg_l, cfg_g = CLIPTextConfig.from_pretrained(paths.clip_l), CLIPTextConfig.from_pretrained(paths.clip_g)
    widths = (int(cfg_l.hidden_size), int(cfg_g.hidden_size))
    width = joint_attention_dim if paths.t5 is None else int(T5Config.from_pretrained(paths.t5).d_model)
    if sum(widths) > width:
        raise ValueError(f"the CLIP states are {widths[0]} + {widths[1]} wide (CLIP-L + CLIP-G hidden sizes), more "
                         f"than the T5 width {width} (T5 d_model or `joint_attention_dim`): cannot zero-pad.")
    return widths, (int(cfg_l.projection_dim), int(cfg_g.projection_dim)), width


def _zeros(states_shape: tuple[int, ...], pooled_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(states_shape, np.float32), np.zeros(pooled_shape, np.float32)


def _check_part(what: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(f"{what} gave shape {tuple(got)}, expected {tuple(expected)} from its config.json")


def encode_prompt_rows(rows: Sequence[str], paths: TextEncoderPaths, *, null_id: int | None = None,
                       max_sequence_length: int = 256, clip_skip: int | None = None,
                       joint_attention_dim: int = 4096, batch_size: int = 8, torch_dtype: str = "float32",
                       allocate: Callable[[tuple[int, ...], tuple[int, ...]], tuple[Any, Any]] | None = None
                       ) -> tuple[Any, Any]:
    """Embeddings of exactly ``rows`` (no null row added): ``(states [N, Lc + max_sequence_length, D], pooled
    [N, P])`` float32, ``Lc`` = the CLIP-L tokenizer's ``model_max_length``. ``null_id``: the row computed
    as diffusers' negative prompt (``clip_skip`` ignored). See :func:`encode_prompts`.

    ``allocate(states_shape, pooled_shape) -> (states, pooled)``: where the rows are written, zero-filled
    float32 arrays of those shapes (default: in-memory numpy; the cache passes memory-mapped ``.npy`` files, so
    an ``[N, L, D]`` table never sits in memory). Each encoder writes its columns batch by batch: CLIP-L states
    into ``[:, :Lc, :H_L]``, CLIP-G into ``[:, :Lc, H_L:H_L + H_G]``, T5 into ``[:, Lc:, :]`` (zeros without
    T5), pooled ``[CLIP-L | CLIP-G]``."""
    rows = list(rows)
    if not rows:
        raise ValueError("`rows` must not be empty.")
    _check_options(max_sequence_length, clip_skip, joint_attention_dim, batch_size, torch_dtype)
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

    (w_l, w_g), (p_l, p_g), width = _table_widths(paths, joint_attention_dim)
    dtype = getattr(torch, torch_dtype)
    tok_l = AutoTokenizer.from_pretrained(paths.tokenizer_l)
    tok_g = AutoTokenizer.from_pretrained(paths.tokenizer_g)
    clip_len = int(tok_l.model_max_length)
    if not 0 < clip_len <= 4096:
        raise ValueError(f"the CLIP-L tokenizer in {paths.tokenizer_l!r} has model_max_length={clip_len}; set it to "
                         "the CLIP context length (77) in its tokenizer_config.json.")
    n = len(rows)
    states, pooled = (allocate or _zeros)((n, clip_len + max_sequence_length, width), (n, p_l + p_g))

    def clip_put(lo: int, w: int, plo: int, pw: int, what: str):
        def put(sl: slice, h: np.ndarray, p: np.ndarray) -> None:
            b = sl.stop - sl.start
            _check_part(f"{what} states", h.shape, (b, clip_len, w))
            _check_part(f"{what} pooled", p.shape, (b, pw))
            states[sl, :clip_len, lo:lo + w] = h
            pooled[sl, plo:plo + pw] = p
        return put

    def t5_put(sl: slice, h: np.ndarray) -> None:
        _check_part("T5 states", h.shape, (sl.stop - sl.start, max_sequence_length, width))
        states[sl, clip_len:] = h

    kw = dict(max_length=clip_len, clip_skip=clip_skip, null_id=null_id, batch_size=batch_size, torch_dtype=dtype)
    _encode_clip(paths.clip_l, tok_l, rows, clip_put(0, w_l, 0, p_l, f"CLIP-L ({paths.clip_l})"), **kw)
    _encode_clip(paths.clip_g, tok_g, rows, clip_put(w_l, w_g, p_l, p_g, f"CLIP-G ({paths.clip_g})"), **kw)
    if paths.t5 is not None:
        tok_t5 = AutoTokenizer.from_pretrained(paths.tokenizer_t5)
        _encode_t5(paths.t5, tok_t5, rows, t5_put, max_length=max_sequence_length, batch_size=batch_size,
                   torch_dtype=dtype)
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
    ``null_id`` the row of ``""`` (CFG's unconditional branch); ``key`` the cache key it was stored under.

    From the cache, ``embeddings`` / ``pooled`` are read-only ``np.memmap`` s: index the rows you need
    (``table.embeddings[a:b]`` reads only those) rather than ``np.asarray`` the whole table."""
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


def _npz_member_memmap(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray | None:
    """The array ``name`` (``"embeddings.npy"``) of an uncompressed ``.npz`` memory-mapped in place (read-only),
    or None when the member is compressed (``np.savez_compressed``: then it has to be read)."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        sig, *_, name_len, extra_len = struct.unpack("<4s5H3L2H", f.read(30))  # the zip local file header
        if sig != b"PK\x03\x04":
            raise ValueError(f"bad zip local header for {name}")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{name} holds Python objects")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


class PromptEmbeddingCache:
    """An on-disk store of prompt tables, one per (prompt set, encoders, options) key.

    Layout: a directory ``sd3_prompts_<key[:32]>/`` with ``embeddings.npy`` ``[N, L, D]`` and ``pooled.npy``
    ``[N, P]`` (float32) and ``meta.json`` (``key``, ``prompts``, ``null_id``, ``layout``), written under a
    temporary name and renamed into place (readers never see a partial table). A hit opens the arrays
    memory-mapped (read-only): host memory follows the rows a reader indexes, not the table. The single-file
    ``sd3_prompts_<key[:32]>.npz`` of earlier releases is still read, memory-mapped inside the (uncompressed)
    zip.

    ``get(prompts, paths, **options)`` returns the stored table when the key matches (numpy only), else encodes
    with torch (:func:`encode_prompt_rows`, straight into the memory-mapped files) and returns the stored table.
    ``hits`` / ``misses`` count the lookups of this object.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "prompt_embeddings"
        self.hits = 0
        self.misses = 0

    def dir_for(self, key: str) -> Path:
        """The table directory of ``key`` (the current layout)."""
        return self.cache_dir / f"sd3_prompts_{key[:32]}"

    def path_for(self, key: str) -> Path:
        """The single ``.npz`` of ``key`` written by earlier releases (read, never written)."""
        return self.cache_dir / f"sd3_prompts_{key[:32]}.npz"

    def load(self, key: str, rows: Sequence[str]) -> PromptEmbeddings | None:
        """The stored table of ``key``, memory-mapped (None when absent, unreadable or for other rows)."""
        directory, legacy = self.dir_for(key), self.path_for(key)
        try:
            if (directory / "meta.json").is_file():
                where = directory
                meta = json.loads((directory / "meta.json").read_text())
                stored_key, prompts, null_id = str(meta["key"]), tuple(meta["prompts"]), int(meta["null_id"])
                embeddings = np.load(directory / "embeddings.npy", mmap_mode="r", allow_pickle=False)
                pooled = np.load(directory / "pooled.npy", mmap_mode="r", allow_pickle=False)
            elif legacy.is_file():
                where = legacy
                with np.load(legacy, allow_pickle=False) as f:
                    stored_key = str(f["key"])
                    prompts = tuple(json.loads(str(f["prompts_json"])))
                    null_id = int(f["null_id"])
                    with zipfile.ZipFile(legacy) as zf:
                        embeddings = _npz_member_memmap(legacy, zf, "embeddings.npy")
                        pooled = _npz_member_memmap(legacy, zf, "pooled.npy")
                    if embeddings is None or pooled is None:  # a compressed .npz (not ours): read it whole
                        logger.warning("%s is compressed: reading the whole prompt table into memory", legacy)
                        embeddings, pooled = np.asarray(f["embeddings"]), np.asarray(f["pooled"])
            else:
                return None
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, struct.error) as e:
            logger.warning("ignoring unreadable prompt-embedding cache %s (%s)", directory, e)
            return None
        if stored_key != key or list(prompts) != list(rows):
            return None
        n = len(prompts)
        if (embeddings.ndim != 3 or pooled.ndim != 2 or embeddings.shape[0] != n or pooled.shape[0] != n
                or embeddings.dtype != np.float32 or pooled.dtype != np.float32):
            logger.warning("ignoring prompt-embedding cache %s: arrays %s %s / %s %s for %d prompts", where,
                           embeddings.shape, embeddings.dtype, pooled.shape, pooled.dtype, n)
            return None
        return PromptEmbeddings(prompts=prompts, embeddings=embeddings, pooled=pooled, null_id=null_id,
                                key=stored_key)

    def _write(self, key: str, rows: Sequence[str], null_id: int,
               fill: Callable[[Callable[..., tuple[Any, Any]]], None]) -> Path:
        """Writes the table of ``key``: ``fill(allocate)`` writes the rows into the arrays ``allocate(states_shape,
        pooled_shape)`` returns (zero-filled float32 ``.npy`` memory maps in a temporary directory), then the
        directory is renamed into place."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        final = self.dir_for(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        opened: list[np.memmap] = []

        def allocate(states_shape, pooled_shape):
            for name, shape in (("embeddings", states_shape), ("pooled", pooled_shape)):
                opened.append(np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float32,
                                                        shape=tuple(shape)))
            return opened[0], opened[1]

        try:
            fill(allocate)
            if len(opened) != 2:
                raise RuntimeError("the prompt table was never allocated")
            for a in opened:
                a.flush()
            opened.clear()
            (tmp / "meta.json").write_text(json.dumps({"layout": CACHE_LAYOUT, "key": key, "prompts": list(rows),
                                                       "null_id": int(null_id)}))
            try:
                os.rename(tmp, final)
            except OSError:  # another process wrote the same key first: keep theirs
                if not (final / "meta.json").is_file():
                    raise
        finally:
            opened.clear()
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def save(self, table: PromptEmbeddings) -> Path:
        """Write ``table`` under its key (rows copied in blocks; temporary directory + rename)."""
        def fill(allocate):
            states, pooled = allocate(table.embeddings.shape, table.pooled.shape)
            step = max(1, (256 << 20) // max(1, int(np.prod(table.embeddings.shape[1:])) * 4))
            for a in range(0, table.num_prompts, step):
                states[a:a + step] = table.embeddings[a:a + step]
            pooled[:] = table.pooled
        return self._write(table.key, table.prompts, table.null_id, fill)

    def get(self, prompts: Sequence[str], paths: TextEncoderPaths, *, max_sequence_length: int = 256,
            clip_skip: int | None = None, joint_attention_dim: int = 4096, batch_size: int = 8,
            torch_dtype: str = "float32") -> PromptEmbeddings:
        """The table of ``prompts + [""]`` (see :func:`prompt_rows`), from disk when cached (memory-mapped)."""
        rows, null_id = prompt_rows(prompts)
        _check_options(max_sequence_length, clip_skip, joint_attention_dim, batch_size, torch_dtype)
        key = embedding_cache_key(rows, paths, max_sequence_length=max_sequence_length, clip_skip=clip_skip,
                                  joint_attention_dim=joint_attention_dim, torch_dtype=torch_dtype, null_id=null_id)
        table = self.load(key, rows)
        if table is not None:
            self.hits += 1
            return table
        self.misses += 1
        stale = self.dir_for(key)
        if stale.exists():  # there but unreadable (logged by load): replaced
            aside = stale.with_name(f".{stale.name}.{os.getpid()}.stale")
            os.replace(stale, aside)
            shutil.rmtree(aside, ignore_errors=True)

        def fill(allocate):
            encode_prompt_rows(rows, paths, null_id=null_id, max_sequence_length=max_sequence_length,
                               clip_skip=clip_skip, joint_attention_dim=joint_attention_dim, batch_size=batch_size,
                               torch_dtype=torch_dtype, allocate=allocate)

        path = self._write(key, rows, null_id, fill)
        table = self.load(key, rows)
        if table is None:
            raise RuntimeError(f"the prompt table just written to {path} cannot be read back")
        logger.info("cached %d prompt embeddings %s in %s", len(rows), table.embeddings.shape, path)
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
    reads the stored table without importing torch (memory-mapped: nothing is read until rows are indexed);
    anything changed recomputes. Returns a :class:`PromptEmbeddings` (row ``i`` = ``prompts[i]``, ``null_id`` =
    the row of ``""``)."""
    paths = resolve_text_paths(text_path, clip_l_path=clip_l_path, clip_g_path=clip_g_path, t5_path=t5_path,
                               tokenizer_l_path=tokenizer_l_path, tokenizer_g_path=tokenizer_g_path,
                               tokenizer_t5_path=tokenizer_t5_path, use_t5=use_t5)
    return PromptEmbeddingCache(cache_dir).get(prompts, paths, max_sequence_length=max_sequence_length,
                                               clip_skip=clip_skip, joint_attention_dim=joint_attention_dim,
                                               batch_size=batch_size, torch_dtype=torch_dtype)
