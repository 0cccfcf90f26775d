"""The memory floor of a decode step and its MBU (memory-bandwidth utilization).

One KV-cached decode step of a batch must read every weight it uses once (the layers, the final norm, the output
projection, B rows of the embedding table) and the filled part of the KV cache once, and write one new cache slot.
At a memory bandwidth of W bytes/s it cannot take less than

    floor = (weight bytes + KV bytes) / W        and        MBU = floor / measured seconds per step.

* :func:`decode_step_bytes` counts those bytes from a model's parameters (or their shapes) and the cache size;
* :func:`measure_copy_bandwidth` measures W as this machine copies memory (bytes copied per second by one thread,
  a 256 MiB buffer into another, both resident: what "this CPU streams" means in the benchmarks);
* :func:`mbu` / :func:`floor_seconds` do the arithmetic; :func:`compiled_bytes` reads XLA's own count
  (``cost_analysis()['bytes accessed']``) of a compiled program, for comparison: XLA counts every operand of every
  op, including re-reads that stay in cache and the copies a program makes, so it lies above the floor.

``adrpo_jax.train.perf`` holds the chip table (published TPU / GPU bandwidths) the same floor is divided by on an
accelerator: ``floor_seconds(decode_step_bytes(...)['total'], chip.bandwidth)``.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

__all__ = ["decode_step_bytes", "measure_copy_bandwidth", "floor_seconds", "mbu", "compiled_bytes"]


def _nbytes(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def decode_step_bytes(model: Any, batch_size: int, cache_slots: float, *, cache_dtype: Any = None) -> dict[str, int]:
  """Bytes one decode step of `batch_size` rows must move at least, with `cache_slots` filled KV-cache slots.

  Args:
    model: a `CausalLM` (arrays or abstract `nnx.eval_shape` values: only shapes and dtypes are read).
    batch_size: B, rows decoded together.
    cache_slots: filled slots each row attends over (a float: the mean over a generation's steps is fine).
    cache_dtype: KV-cache dtype (default: the model's compute dtype).
  Returns:
    {"weights", "kv", "total"} in bytes: weights = every parameter except the embedding table, plus B embedding
    rows (a tied table is read whole as the output projection); kv = L x B x cache_slots x K x hd x 2 (keys and
    values) read, plus one slot of each written. Sparse (MoE) layers count all experts (an upper bound).

  >>> from flax import nnx
  >>> from adrpo_jax.models.llm import CausalLM, DecoderConfig
  >>> cfg = DecoderConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
  ...                     num_attention_heads=2, num_key_value_heads=1)
  >>> b = decode_step_bytes(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), 4, 10)
  >>> b["kv"] == 2 * 4 * (10 + 1) * 1 * 4 * 2 * 4  # L x B x (filled + new) x K x hd x (k, v) x float32
  True
  >>> b["weights"] == (2 * 592 + 8 + 8 * 100) * 4 + 4 * 8 * 4  # layers, final norm, lm_head; 4 embedding rows
  True
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  cfg = model.config
  params = nnx.state(model, nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  total_params = 0
  table = 0
  for path, leaf in flat:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if keys and keys[0] == "embed_tokens":
      table += _nbytes(leaf)
      continue
    total_params += _nbytes(leaf)
  d = cfg.hidden_size
  if cfg.tie_word_embeddings:
    weights = total_params + table  # the table is the output projection: read whole
  else:
    weights = total_params + batch_size * d * (table // max(cfg.vocab_size * d, 1))  # B rows of the table
  itemsize = np.dtype(cache_dtype or cfg.dtype).itemsize
  per_slot = cfg.num_hidden_layers * batch_size * cfg.num_key_value_heads * cfg.head_dim * 2 * itemsize
  kv = round(per_slot * (float(cache_slots) + 1.0))  # read the filled slots, write the new one
  return {"weights": int(weights), "kv": kv, "total": int(weights) + kv}


def measure_copy_bandwidth(nbytes: int = 256 * 2 ** 20, repeats: int = 5) -> float:
  """Bytes per second this process copies with one thread: `np.copyto` of an `nbytes` buffer into another (both
  touched first, so no page faults are timed), the best of `repeats` (a loaded machine only slows it down)."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.zeros_like(src)
  best = float("inf")
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t0)
  return src.nbytes / best


def floor_seconds(nbytes: float, bandwidth: float) -> float:
  """`nbytes / bandwidth`: the least time moving those bytes takes."""
  if not bandwidth > 0:
    raise ValueError(f"bandwidth={bandwidth!r} must be > 0 bytes/s")
  return float(nbytes) / float(bandwidth)


def mbu(nbytes: float, seconds: float, bandwidth: float) -> float:
  """Memory-bandwidth utilization of a step that moved `nbytes` in `seconds`: `floor_seconds / seconds`."""
  if not seconds > 0:
    raise ValueError(f"seconds={seconds!r} must be > 0")
  return floor_seconds(nbytes, bandwidth) / float(seconds)


def compiled_bytes(compiled: Any) -> float:
  """XLA's `bytes accessed` of a compiled (or lowered) program's cost analysis (per device for SPMD programs;
  a while loop's body counted once)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return float(cost.get("bytes accessed", 0.0))
