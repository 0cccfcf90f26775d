"""Hugging Face checkpoint I/O for `CausalLM`, without torch.

Families: Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Gemma 2, Gemma 3 text (also the language model of a multimodal
`gemma3` checkpoint: its `text_config` and `language_model` tensors). Expert tensors are stored per expert in HF
checkpoints (`model.layers.{i}.mlp.experts.{j}.gate_proj.weight` [F, D], ...; transformers 5 fuses them in memory
and writes them back per expert) and are stacked on the leading `expert` axis of our kernels at load
(`experts.gate_proj [E, D, F]`); the fused layout (`mlp.experts.gate_up_proj [E, 2F, D]`, `down_proj [E, D, F]`)
loads too. `save_pretrained` writes the per-expert names.

* `load_pretrained(path)` reads `config.json` and one or many `*.safetensors` files (with
  `model.safetensors.index.json` when sharded) straight into an abstract (`nnx.eval_shape`) model, one
  tensor at a time from a memory map, placing every array directly with its sharding when a mesh or a
  sharding function is given (so a checkpoint never exists twice in host memory).
* `save_pretrained(model, path)` writes `config.json`, `generation_config.json` and safetensors in HF
  names/layout (sharded with an index above `max_shard_size`) that `transformers` loads back (a model with
  unmerged LoRA adapters is refused: save `merge_lora(model)`).
* `load_tokenizer(path)`: `transformers.AutoTokenizer` from the same local directory (never the hub).

The safetensors format is parsed here (8-byte little-endian header length, JSON header, raw data), which
handles bfloat16 through `ml_dtypes` (numpy has no bf16) and lets us memory-map instead of copying.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from adrpo_jax.models.llm.config import DecoderConfig
from adrpo_jax.models.llm.modeling import CausalLM
from adrpo_jax.models.lora import lora_sites
from adrpo_jax.train.sharding import DEFAULT_LOGICAL_RULES, LogicalRules, logical_to_partition_spec

log = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_ST_TO_NP = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NP_TO_ST = {v.name if v.name != "bool" else "bool": k for k, v in _ST_TO_NP.items()}

# Checkpoint tensors that are derived buffers, not parameters: skipped silently (debug log).
_IGNORED_TENSORS = (re.compile(r".*\.rotary_emb\.inv_freq$"),)

# Default logical-axis -> mesh-axis rules (the project contract; adrpo_jax/train/sharding.py owns the
# authoritative copy, pass its function as `shardings=` to use it).


class CheckpointError(ValueError):
  """A checkpoint does not match the model (missing / mis-shaped tensor, bad index, ...)."""


# ------------------------------------------------------------------------------------------------------
# Name / layout mapping between our parameters and HF tensors
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorMapping:
  """How one of our parameters is stored in an HF checkpoint.

  `to_ours(hf_array)` and `to_hf(our_array)` convert layouts (numpy, lazy views where possible). With stacked
  layers (`DecoderConfig.scan_layers`) the L per-layer tensors of one parameter share `ours` (e.g.
  `('layers', 'mlp', 'up_proj', 'kernel')`) and `layer` is the index along its leading axis (None otherwise); the
  E per-expert tensors of an expert kernel likewise share it with their `expert` index (after the layer axis).
  `fallback`: (another HF name, fn(that array) -> this tensor) read when `hf_name` is absent (fused experts).
  """

  ours: tuple[Any, ...]
  hf_name: str
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  layer: int | None = None
  expert: int | None = None
  fallback: tuple[str, Callable[[np.ndarray], np.ndarray]] | None = None

  @property
  def index(self) -> tuple[int, ...]:
    """This tensor's index in the leading (layer, expert) axes of its parameter (() for a whole parameter)."""
    return tuple(i for i in (self.layer, self.expert) if i is not None)


def _identity(x):
  return x


def param_mappings(config: DecoderConfig) -> list[TensorMapping]:
  """All parameters of `CausalLM(config)` with their HF names, shapes and layout conversions (HF order)."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  h, k, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  assert hd is not None  # resolved by DecoderConfig.__post_init__
  out: list[TensorMapping] = []
  layer: int | None = None  # set while adding the tensors of a stacked layer

  def add(ours, hf_name, hf_shape, to_ours=_identity, to_hf=_identity, expert=None, fallback=None):
    out.append(TensorMapping(tuple(ours), hf_name, tuple(hf_shape), to_ours, to_hf, layer, expert, fallback))

  def linear(ours, hf_name, n_in, n_out):  # HF Linear weight [out, in]; ours [in, out]
    add(ours, hf_name, (n_out, n_in), lambda w: w.T, lambda w: w.T)

  def heads_in(ours, hf_name, n_heads):  # HF [n*hd, D]; ours [D, n, hd]
    add(ours, hf_name, (n_heads * hd, d), lambda w: w.T.reshape(d, n_heads, hd),
        lambda w: w.reshape(d, n_heads * hd).T)

  def heads_bias(ours, hf_name, n_heads):  # HF [n*hd]; ours [n, hd]
    add(ours, hf_name, (n_heads * hd,), lambda b: b.reshape(n_heads, hd), lambda b: b.reshape(n_heads * hd))

  add(("embed_tokens", "embedding"), "model.embed_tokens.weight", (v, d))
  for i in range(config.num_hidden_layers):
    p: tuple[Any, ...] = ("layers", i)
    q = f"model.layers.{i}"
    if config.scan_layers:  # one stacked parameter per tensor kind; this layer is index i of its leading axis
      p, layer = ("layers",), i
    attn, aq = p + ("self_attn",), f"{q}.self_attn"
    heads_in(attn + ("q_proj", "kernel"), f"{aq}.q_proj.weight", h)
    if config.attention_bias:
      heads_bias(attn + ("q_proj", "bias"), f"{aq}.q_proj.bias", h)
    heads_in(attn + ("k_proj", "kernel"), f"{aq}.k_proj.weight", k)
    if config.attention_bias:
      heads_bias(attn + ("k_proj", "bias"), f"{aq}.k_proj.bias", k)
    heads_in(attn + ("v_proj", "kernel"), f"{aq}.v_proj.weight", k)
    if config.attention_bias:
      heads_bias(attn + ("v_proj", "bias"), f"{aq}.v_proj.bias", k)
    add(attn + ("o_proj", "kernel"), f"{aq}.o_proj.weight", (d, h * hd),
        lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T)
    if config.attention_out_bias:
      add(attn + ("o_proj", "bias"), f"{aq}.o_proj.bias", (d,))
    if config.qk_norm:
      add(attn + ("q_norm", "weight"), f"{aq}.q_norm.weight", (hd,))
      add(attn + ("k_norm", "weight"), f"{aq}.k_norm.weight", (hd,))
    mlp, mq = p + ("mlp",), f"{q}.mlp"
    if config.moe_layers[i]:
      _moe_mappings(config, mlp, mq, add, linear)
    else:
      for name, n_in, n_out in (("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)):
        linear(mlp + (name, "kernel"), f"{mq}.{name}.weight", n_in, n_out)
        if config.mlp_bias:
          add(mlp + (name, "bias"), f"{mq}.{name}.bias", (n_out,))
    add(p + ("input_layernorm", "weight"), f"{q}.input_layernorm.weight", (d,))
    add(p + ("post_attention_layernorm", "weight"), f"{q}.post_attention_layernorm.weight", (d,))
    if config.sandwich_norm:
      add(p + ("pre_feedforward_layernorm", "weight"), f"{q}.pre_feedforward_layernorm.weight", (d,))
      add(p + ("post_feedforward_layernorm", "weight"), f"{q}.post_feedforward_layernorm.weight", (d,))
  layer = None
  add(("norm", "weight"), "model.norm.weight", (d,))
  if not config.tie_word_embeddings:
    linear(("lm_head", "kernel"), "lm_head.weight", d, v)
  return out


def _moe_mappings(config: DecoderConfig, mlp: tuple, mq: str, add, linear) -> None:
  """The tensors of a sparse layer's `mlp` (router, per-expert SwiGLU kernels, Qwen2-MoE's shared expert)."""
  d, e, fe = config.hidden_size, config.num_experts, config.moe_intermediate_size
  linear(mlp + ("gate", "kernel"), f"{mq}.gate.weight", d, e)  # HF router weight [E, D]
  fused_gu, fused_down = f"{mq}.experts.gate_up_proj", f"{mq}.experts.down_proj"
  for j in range(e):
    for name, n_in, n_out in (("gate_proj", d, fe), ("up_proj", d, fe), ("down_proj", fe, d)):
      fallback: tuple[Any, Callable[..., Any]]
      if name == "down_proj":  # fused [E, D, F] is already HF's per-expert [D, F]
        fallback = (fused_down, lambda w, j=j: w[j])
      else:  # fused [E, 2F, D]: gate rows then up rows
        lo = 0 if name == "gate_proj" else fe
        fallback = (fused_gu, lambda w, j=j, lo=lo: w[j, lo:lo + fe])
      add(mlp + ("experts", name), f"{mq}.experts.{j}.{name}.weight", (n_out, n_in), lambda w: w.T, lambda w: w.T,
          expert=j, fallback=fallback)
  if config.shared_expert_intermediate_size:
    fs = config.shared_expert_intermediate_size
    for name, n_in, n_out in (("gate_proj", d, fs), ("up_proj", d, fs), ("down_proj", fs, d)):
      linear(mlp + ("shared_expert", name, "kernel"), f"{mq}.shared_expert.{name}.weight", n_in, n_out)
    linear(mlp + ("shared_expert_gate", "kernel"), f"{mq}.shared_expert_gate.weight", d, 1)


# Prefixes of the language model's tensors in multimodal Gemma 3 checkpoints (hub layout, transformers 5 layout) and
# the tensors of the other towers, which the text model skips.
_LM_PREFIXES = ("language_model.model.", "model.language_model.")
_OTHER_TOWERS = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector|vision_model|audio_tower)\.")


def _language_model_prefix(reader: "CheckpointReader") -> str | None:
  """The prefix replacing `model.` when the checkpoint is a multimodal one (Gemma 3), else None."""
  if "model.embed_tokens.weight" in reader:
    return None
  for prefix in _LM_PREFIXES:
    if f"{prefix}embed_tokens.weight" in reader:
      return prefix
  return None


def _with_prefix(m: TensorMapping, prefix: str | None) -> TensorMapping:
  if prefix is None:
    return m
  name = m.hf_name
  if name.startswith("model."):
    name = prefix + name[len("model."):]
  elif name == "lm_head.weight" and prefix == "language_model.model.":
    name = "language_model.lm_head.weight"
  return dataclasses.replace(m, hf_name=name)


# ------------------------------------------------------------------------------------------------------
# safetensors reading / writing (memory-mapped, bf16-aware)
# ------------------------------------------------------------------------------------------------------
class SafetensorsFile:
  """Memory-mapped read access to one `.safetensors` file: `names()`, `shape(name)`, `get(name)`."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    with open(self.path, "rb") as f:
      raw_len = f.read(8)
      if len(raw_len) != 8:
        raise CheckpointError(f"{self.path} is not a safetensors file (too short)")
      header_len = int.from_bytes(raw_len, "little")
      try:
        header = json.loads(f.read(header_len))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{self.path} has a corrupt safetensors header: {e}") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self._entries = header
    self._data_start = 8 + header_len
    self._buffer: np.memmap | None = None

  def names(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """A read-only numpy view (memory map) of tensor `name`."""
    entry = self._entries[name]
    st_dtype = entry["dtype"]
    if st_dtype not in _ST_TO_NP:
      raise CheckpointError(f"tensor {name!r} in {self.path} has unsupported dtype {st_dtype}")
    dtype, shape = _ST_TO_NP[st_dtype], tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise CheckpointError(f"tensor {name!r} in {self.path}: data_offsets do not match shape {shape}")
    if end == begin:
      return np.zeros(shape, dtype)
    if self._buffer is None:
      self._buffer = np.memmap(self.path, dtype=np.uint8, mode="r")
    start = self._data_start + begin
    return self._buffer[start:self._data_start + end].view(dtype).reshape(shape)


def _st_dtype(dtype: np.dtype) -> str:
  dtype = np.dtype(dtype)
  for st, npd in _ST_TO_NP.items():
    if npd == dtype:
      return st
  raise CheckpointError(f"dtype {dtype} cannot be written to safetensors")


def write_safetensors(path: str | os.PathLike, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                      fetch: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes a safetensors file tensor by tensor: `tensors` lists (name, shape, dtype) in file order and
  `fetch(name)` returns the array when its turn comes (so only one tensor is on the host at a time)."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape, dtype in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _st_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)
  tmp = Path(str(path) + ".tmp")
  with open(tmp, "wb") as f:
    f.write(len(header_bytes).to_bytes(8, "little"))
    f.write(header_bytes)
    for name, shape, dtype in tensors:
      arr = np.ascontiguousarray(fetch(name), dtype=dtype)
      if arr.shape != tuple(shape):
        raise CheckpointError(f"tensor {name!r}: fetched shape {arr.shape} != declared {tuple(shape)}")
      f.write(arr.tobytes())
  os.replace(tmp, path)


def read_weight_map(index_path: Path) -> dict[str, str]:
  """The `weight_map` (tensor name -> shard file) of a sharded checkpoint's `*.index.json`."""
  with open(index_path) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index_path} has no 'weight_map'")
  return dict(weight_map)


class CheckpointReader:
  """All tensors of an HF directory, chosen as transformers does: `model.safetensors` if present (a stale
  `model.safetensors.index.json` next to it is ignored, with a warning), else the index, else every
  `*.safetensors`."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = Path(directory)
    index_path = self.directory / SAFE_WEIGHTS_INDEX_NAME
    single_path = self.directory / SAFE_WEIGHTS_NAME
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    if single_path.exists():
      if index_path.exists():
        log.warning("%s and %s both exist: loading %s (as transformers does) and ignoring the index (stale, e.g. "
                    "left by an earlier sharded save)", single_path, index_path.name, single_path.name)
      self.source = str(single_path)
      for name in self._file(SAFE_WEIGHTS_NAME).names():
        self._where[name] = SAFE_WEIGHTS_NAME
    elif index_path.exists():
      self.source, self._where = str(index_path), read_weight_map(index_path)
    else:
      files = sorted(self.directory.glob("*.safetensors"))
      if not files:
        others = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
            p.name for p in self.directory.glob("*.gguf"))
        hint = f" (found {others}: convert them to safetensors first)" if others else ""
        raise FileNotFoundError(f"no *.safetensors files in {self.directory}{hint}")
      self.source = ", ".join(str(p) for p in files)
      for p in files:
        for name in self._file(p.name).names():
          self._where[name] = p.name

  def _file(self, filename: str) -> SafetensorsFile:
    if filename not in self._files:
      path = self.directory / filename
      if not path.exists():
        raise CheckpointError(f"{self.source} refers to missing file {path}")
      self._files[filename] = SafetensorsFile(path)
    return self._files[filename]

  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def location(self, name: str) -> str:
    return str(self.directory / self._where[name]) if name in self._where else self.source

  def dtype(self, name: str) -> np.dtype | None:
    """The stored dtype of tensor `name` (None if absent), read from the header only."""
    if name not in self._where:
      return None
    entry = self._file(self._where[name])._entries.get(name)  # pylint: disable=protected-access
    return None if entry is None else _ST_TO_NP.get(entry["dtype"])

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise CheckpointError(f"tensor {name!r} not found in {self.source}")
    file = self._file(self._where[name])
    if name not in file.names():
      raise CheckpointError(f"tensor {name!r} listed for {file.path} by {self.source} but absent from that file")
    return file.get(name)


# ------------------------------------------------------------------------------------------------------
# Sharding helpers
# ------------------------------------------------------------------------------------------------------
def logical_to_sharding(mesh: jax.sharding.Mesh, names: Sequence[str | None], shape: Sequence[int],
                        rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> jax.sharding.NamedSharding:
  """NamedSharding of a parameter from its logical axis names, by the project's one rule set
  (`adrpo_jax.train.sharding.logical_to_partition_spec`: a dimension not divisible by its mesh axis size, or
  whose mesh axis is already used, is replicated).

  >>> mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
  ...                      devices=jax.devices()[:4])
  >>> tuple(logical_to_sharding(mesh, ("embed", "mlp"), (4, 3)).spec)   # 3 % 2 != 0 -> replicated
  ('fsdp',)
  """
  return jax.sharding.NamedSharding(mesh, logical_to_partition_spec(names, shape, mesh, rules))


# ------------------------------------------------------------------------------------------------------
# load / save
# ------------------------------------------------------------------------------------------------------
def _flat_params(state) -> dict[tuple, Any]:
  return {tuple(path): var for path, var in nnx.to_flat_state(state)}


def load_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    remat: bool = False, remat_policy: str | None = None, mesh: jax.sharding.Mesh | None = None,
                    rules: Iterable[tuple[str, Any]] | None = None,
                    shardings: Callable[[tuple[str | None, ...], tuple[int, ...]], jax.sharding.Sharding]
                    | None = None, config_overrides: dict[str, Any] | None = None) -> CausalLM:
  """Loads a local Hugging Face Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE / Gemma 2 / Gemma 3 directory into a
  `CausalLM` (for a multimodal Gemma 3 checkpoint: its language model).

  Args:
    path: directory with config.json and `*.safetensors` (+ `model.safetensors.index.json` if sharded).
    dtype: computation dtype; param_dtype: dtype the parameters are stored in (converted on load).
    remat, remat_policy: gradient checkpointing per layer (see `DecoderConfig`).
    mesh: place every parameter with `logical_to_sharding(mesh, names, shape, rules)` (default rules:
      'embed'->'fsdp'; 'mlp', 'heads', 'kv_heads', 'vocab'->'tensor'; others replicated).
    shardings: alternatively, a function (logical_names, shape) -> jax.sharding.Sharding.
    config_overrides: extra `DecoderConfig` fields to replace.
  Returns:
    the model; without mesh/shardings the parameters live on the default device. As in transformers, a
    config with `tie_word_embeddings=True` whose checkpoint holds an `lm_head.weight` different from the
    embedding loads untied, with that head (a warning says so; `config_overrides` naming
    tie_word_embeddings are followed as given).
  Raises:
    ValueError: unsupported model_type (lists the supported ones); `CheckpointError` (a ValueError) for a
      missing tensor (names the tensor and file) or a wrong shape (names the tensor, expected and found).
    FileNotFoundError: no config.json / no safetensors.
  """
  path = Path(path)
  overrides = dict(config_overrides or {})
  config = DecoderConfig.from_hf_config(path, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                        remat_policy=remat_policy, **overrides)
  if mesh is not None and shardings is not None:
    raise ValueError("pass either mesh (with rules) or shardings, not both")
  if mesh is not None:
    rule_list = tuple(rules) if rules is not None else DEFAULT_LOGICAL_RULES
    shardings = lambda names, shape: logical_to_sharding(mesh, names, shape, rule_list)  # noqa: E731
  reader = CheckpointReader(path)
  prefix = _language_model_prefix(reader)
  head_name = _with_prefix(TensorMapping((), "lm_head.weight", (), _identity, _identity), prefix).hf_name
  embed_name = _with_prefix(TensorMapping((), "model.embed_tokens.weight", (), _identity, _identity), prefix).hf_name
  if config.tie_word_embeddings and "tie_word_embeddings" not in overrides and head_name in reader \
      and embed_name in reader:
    head, embed = reader.get(head_name), reader.get(embed_name)
    if head.shape != embed.shape or not np.array_equal(head, embed):  # as transformers 5.23: untie, use the file's
      log.warning("%s says tie_word_embeddings=True but %s holds an lm_head.weight different from "
                  "model.embed_tokens.weight: NOT tying them (as transformers does); the model gets its own "
                  "lm_head. Set tie_word_embeddings=False in config.json to silence this.", path / "config.json",
                  reader.location(head_name))
      config = config.replace(tie_word_embeddings=False)
  abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat = _flat_params(abstract_state)
  mappings: dict[tuple, list[TensorMapping]] = {}
  for m in param_mappings(config):
    mappings.setdefault(m.ours, []).append(_with_prefix(m, prefix))
  if set(mappings) != set(flat):  # internal consistency, not a user error
    raise AssertionError(f"mapping/model mismatch: {sorted(set(mappings) ^ set(flat), key=str)[:5]}")
  target_dtype = np.dtype(config.param_dtype)
  pure: dict[tuple, Any] = {}
  used = set()

  def read(m: TensorMapping) -> np.ndarray:
    if m.hf_name not in reader and m.fallback is not None and m.fallback[0] in reader:
      used.add(m.fallback[0])
      hf = m.fallback[1](reader.get(m.fallback[0]))  # e.g. one expert of a fused [E, 2F, D] tensor
      if tuple(hf.shape) != m.hf_shape:
        raise CheckpointError(f"tensor {m.fallback[0]!r} in {reader.location(m.fallback[0])} gives shape "
                              f"{tuple(hf.shape)} for {m.hf_name!r}, expected {m.hf_shape} for this config")
      return m.to_ours(hf)
    if m.hf_name not in reader:
      where = "".join(f" {k} {v}" for k, v in (("layer", m.layer), ("expert", m.expert)) if v is not None)
      raise CheckpointError(f"tensor {m.hf_name!r} (for parameter {'.'.join(map(str, m.ours))}{where}) not found in "
                            f"{reader.source}")
    hf = reader.get(m.hf_name)
    if tuple(hf.shape) != m.hf_shape:
      raise CheckpointError(f"tensor {m.hf_name!r} in {reader.location(m.hf_name)} has shape {tuple(hf.shape)}, "
                            f"expected {m.hf_shape} for this config")
    used.add(m.hf_name)
    return m.to_ours(hf)  # a (lazy) view of the memory map

  for ours, var in flat.items():
    shape = tuple(var.get_value().shape)
    group = mappings[ours]
    if not group[0].index:
      host = read(group[0])
      block = lambda idx, host=host: np.ascontiguousarray(host[idx], dtype=target_dtype)  # noqa: E731
    else:  # stacked layers / experts: each block is assembled from the tensors it covers only (streamed)
      block = _grouped_block(group, shape, target_dtype, read)
    if shardings is None:
      value = jax.device_put(block(tuple(slice(None) for _ in shape)))
    else:
      names = tuple(var.get_metadata().get("out_sharding") or (None,) * len(shape))
      value = jax.make_array_from_callback(shape, shardings(names, shape), block)
    pure[ours] = value
  other_towers = [name for name in reader.names() if prefix is not None and _OTHER_TOWERS.match(name)]
  if other_towers:
    log.info("loading the language model of a multimodal checkpoint: %d tensors of other towers (%s, ...) skipped",
             len(other_towers), other_towers[0])
  for name in reader.names():
    if name in used or name in other_towers:
      continue
    if any(p.match(name) for p in _IGNORED_TENSORS):
      log.debug("ignoring derived tensor %s", name)
    elif name == head_name and config.tie_word_embeddings:  # equal to the embedding (checked above)
      log.debug("ignoring lm_head.weight: tie_word_embeddings=True uses model.embed_tokens.weight")
    else:
      log.warning("unexpected tensor %r in %s was not loaded", name, reader.location(name))
  nested: dict = {}
  for ours, value in pure.items():
    node = nested
    for key in ours[:-1]:
      node = node.setdefault(key, {})
    node[ours[-1]] = value
  nnx.replace_by_pure_dict(abstract_state, nested)
  return nnx.merge(graphdef, abstract_state)


def _grouped_block(group: list[TensorMapping], shape: tuple[int, ...], dtype: np.dtype, read) -> Callable:
  """`block(idx)`: the part `idx` (a tuple of slices) of a parameter whose leading (layer[, expert]) axes gather one
  HF tensor per entry, read from the memory-mapped checkpoint for the entries in `idx` only, so a sharded load never
  assembles a whole [L, E, ...] parameter on the host."""
  lead = len(group[0].index)
  by_index = {m.index: m for m in group}
  if len(by_index) != int(np.prod(shape[:lead])):  # internal consistency, not a user error
    raise AssertionError(f"{group[0].ours}: {len(by_index)} tensors for leading shape {shape[:lead]}")

  def block(idx):
    idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
    ranges = [range(*sl.indices(n)) for sl, n in zip(idx[:lead], shape[:lead])]
    rest = idx[lead:]
    inner = tuple(len(range(*sl.indices(n))) for sl, n in zip(rest, shape[lead:]))
    out = np.empty(tuple(len(r) for r in ranges) + inner, dtype)
    for pos in itertools.product(*(list(enumerate(r)) for r in ranges)):
      out[tuple(p for p, _ in pos)] = read(by_index[tuple(i for _, i in pos)])[rest]
    return out

  return block


def _parse_size(size: int | str) -> int:
  if isinstance(size, (int, np.integer)):
    if size <= 0:
      raise ValueError(f"max_shard_size={size} must be positive")
    return int(size)
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
  if not match:
    raise ValueError(f"max_shard_size={size!r}: use an int (bytes) or a string like '5GB', '500MB', '2GiB'")
  value, unit = float(match.group(1)), match.group(2)
  base = 1024 if "I" in unit else 1000
  power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
  return int(value * base ** power)

def write_sharded_weights(path: Path, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]], fetch,
                          *, max_shard_size: int | str, prefix: str, index_name: str) -> bool:
  """Writes `tensors` ([(name, shape, dtype)], in order) as `{prefix}.safetensors`, or as
  `{prefix}-0000i-of-0000n.safetensors` shards of at most `max_shard_size` bytes plus the `index_name` index
  (Hugging Face / diffusers layout), pulling each tensor from `fetch(name)` one at a time (never a second full
  copy on the host). Stale weight files of an earlier save into `path` are removed first. Every process must
  call it (the fetches of sharded arrays are collective); only process 0 writes. Returns whether this process
  wrote (the caller writes config files only then)."""
  limit = _parse_size(max_shard_size)
  shards: list[list] = [[]]
  size = 0
  for t in tensors:
    nbytes = int(np.prod(t[1], dtype=np.int64)) * t[2].itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  writer = jax.process_index() == 0
  if writer:
    path.mkdir(parents=True, exist_ok=True)
    for old in list(path.glob(f"{prefix}*.safetensors")) + [path / index_name]:
      if old.exists():
        old.unlink()
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    filename = f"{prefix}.safetensors" if len(shards) == 1 else f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    if writer:
      write_safetensors(path / filename, shard, fetch, metadata={"format": "pt"})
    else:  # every process takes part in the gathers of sharded arrays
      for name, *_ in shard:
        fetch(name)
    for name, shape, dt in shard:
      weight_map[name] = filename
      total += int(np.prod(shape, dtype=np.int64)) * dt.itemsize
  if writer and len(shards) > 1:
    with open(path / index_name, "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return writer



def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_pretrained(model: CausalLM, path: str | os.PathLike, *, tokenizer: Any = None,
                    max_shard_size: int | str = "5GB", dtype: Any = None,
                    generation_config: dict[str, Any] | None = None) -> Path:
  """Writes `model` as a Hugging Face directory that `transformers.AutoModelForCausalLM` loads.

  Args:
    model: a `CausalLM` (parameters may be sharded; with several processes only process 0 writes).
    path: output directory (created).
    tokenizer: optional HF tokenizer, saved into the same directory.
    max_shard_size: bytes (int) or '5GB' / '500MB' / '2GiB'; above it the weights are split into
      `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
    dtype: storage dtype of the tensors (default: the parameter dtype).
    generation_config: extra fields for generation_config.json (bos/eos/pad come from the config).
  Returns:
    the directory.
  Raises:
    ValueError: `model` has LoRA adapters (an HF directory has no place for them and writing the base weights
      would silently drop them): save `adrpo_jax.models.lora.merge_lora(model)` (W + s A B) instead.
  """
  if not isinstance(model, CausalLM):
    raise ValueError(f"model must be a CausalLM, got {type(model).__name__}")
  adapted = [site.path for site in lora_sites(model) if site.adapted]
  if adapted:
    raise ValueError(f"model has unmerged LoRA adapters on {adapted[:6]}{' ...' if len(adapted) > 6 else ''}: "
                     "save_pretrained writes the base weights only; save merge_lora(model) instead "
                     "(adrpo_jax.models.lora.merge_lora folds W + s A B into plain weights)")
  path = Path(path)
  config = model.config
  flat = _flat_params(nnx.state(model, nnx.Param))
  mappings = param_mappings(config)
  save_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
  by_name = {}
  for m in mappings:
    arr = flat[m.ours].get_value()
    by_name[m.hf_name] = (m.hf_name, m.hf_shape, save_dtype or np.dtype(arr.dtype), m)  # (stacked: one layer)

  last: dict[tuple, np.ndarray] = {}  # host copies of one layer's expert kernels, reused for their E experts

  def fetch(name):
    _, _, dt, m = by_name[name]
    value = flat[m.ours].get_value()
    if m.expert is not None:  # per-expert tensors: one layer's [E, ...] kernels on the host at a time
      key = (m.ours, m.layer)
      if key not in last:
        for k in [k for k in last if k[1] != m.layer or k[0][:-1] != m.ours[:-1]]:
          del last[k]
        last[key] = _to_host(value if m.layer is None else value[m.layer])
      return m.to_hf(last[key][m.expert]).astype(dt)
    if m.layer is not None:  # one layer of a stacked parameter (sliced on device: one layer on the host)
      value = value[m.layer]
    return m.to_hf(_to_host(value)).astype(dt)

  if not write_sharded_weights(path, [e[:3] for e in by_name.values()], fetch, max_shard_size=max_shard_size,
                               prefix="model", index_name=SAFE_WEIGHTS_INDEX_NAME):
    return path
  hf_config = config.to_hf_config()
  if save_dtype is not None:
    hf_config["dtype"] = save_dtype.name
  with open(path / "config.json", "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  gen = {k: v for k, v in (("bos_token_id", config.bos_token_id),
                           ("eos_token_id", hf_config["eos_token_id"]),
                           ("pad_token_id", config.pad_token_id)) if v is not None}
  gen.update(generation_config or {})
  if gen:
    with open(path / "generation_config.json", "w") as f:
      json.dump(gen, f, indent=2, sort_keys=True)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(path))
  return path


def chat_template_from_directory(path: str | os.PathLike) -> str | None:
  """The chat template a model directory keeps outside its tokenizer files, or None: `chat_template.jinja`,
  the processor's legacy `chat_template.json` (`{"chat_template": str}`, as Qwen2.5-Omni / Qwen2-Audio
  checkpoints ship it; only transformers' processor reads it) or a `chat_template` entry of
  `processor_config.json`. A list of named templates gives the one named 'default' (else the first)."""
  path = Path(path)

  def pick(value):
    if isinstance(value, str) and value.strip():
      return value
    if isinstance(value, list):
      named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
      return pick(named.get("default", next(iter(named.values()), None)))
    if isinstance(value, dict):
      return pick(value.get("default", next(iter(value.values()), None)))
    return None

  jinja = path / "chat_template.jinja"
  if jinja.is_file():
    return pick(jinja.read_text(encoding="utf-8"))
  for name in ("chat_template.json", "processor_config.json"):
    file = path / name
    if file.is_file():
      try:
        value = pick(json.loads(file.read_text(encoding="utf-8")).get("chat_template"))
      except (json.JSONDecodeError, AttributeError):
        value = None
      if value:
        return value
  return None


def load_tokenizer(path: str | os.PathLike, *, padding_side: str = "left"):
  """`transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)` with `padding_side`
  (left by default: prompts for generation are left-padded). A missing pad token falls back to EOS. A
  tokenizer without a chat template gets the directory's `chat_template.jinja` / processor
  `chat_template.json` (`chat_template_from_directory`), which `AutoTokenizer` does not read."""
  from transformers import AutoTokenizer  # optional dependency: imported on use only

  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'")
  tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
  tokenizer.padding_side = padding_side
  if not getattr(tokenizer, "chat_template", None):
    template = chat_template_from_directory(path)
    if template:
      log.info("tokenizer in %s has no chat template; using the directory's processor chat template", path)
      tokenizer.chat_template = template
  if tokenizer.pad_token is None and tokenizer.eos_token is not None:
    log.info("tokenizer in %s has no pad token; using the EOS token %r", path, tokenizer.eos_token)
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer
