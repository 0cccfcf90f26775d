"""Mixture-of-experts feed-forward layers (Qwen2-MoE, Qwen3-MoE): a top-k softmax router, dropless experts by
grouped matrix multiplication, expert parallelism over an `expert` mesh axis, router replay and routing statistics.

Shapes: N tokens (B * T), D hidden, E experts, k experts per token, F expert width (`moe_intermediate_size`),
A = N * k token-expert assignments.

**Routing** (transformers 5.23 `Qwen3MoeTopKRouter`): logits `x W_r` [N, E] in the compute dtype, `p = softmax`
in float32, the k largest `p` and their experts `idx` [N, k] (`jax.lax.top_k`; ties to the lower expert id),
gates `g = p[idx]` (divided by their sum with `norm_topk_prob`) cast to the compute dtype. With **router replay**
the experts `idx` are given (recorded during the rollout) and only the gates are read from the current router:
`g = p[idx]`, so the router still receives a gradient through `p` while the sub-network is the rollout's.

**Experts**: `y_n = sum_j g_nj * FFN_{idx_nj}(x_n)`, `FFN_e(x) = (act(x G_e) * (x U_e)) D_e` (SwiGLU; G_e, U_e [D, F],
D_e [F, D]), plus for Qwen2-MoE `sigmoid(x . w_s) * FFN_shared(x)`. Dropless: the A assignments are sorted by
expert and every expert multiplies exactly its rows (no capacity factor, no token dropped), one grouped matmul per
projection with the per-expert row counts as group sizes (`moe_impl`):

===========  ======================================================================================================
`ragged`     `jax.lax.ragged_dot` (XLA's grouped matmul: a native kernel on TPU; on CPU XLA expands it to a dense
             masked product costing every expert on every row, so it is not the CPU choice).
`megablox`   the Pallas TPU grouped-matmul kernel (`jax.experimental.pallas.ops.tpu.megablox.gmm`, with its
             transposed kernel for the weight gradient); rows padded to the row tile. TPU only (Mosaic): under a
             multi-device mesh it runs inside the layer's `shard_map` (with `check_vma=False`: Pallas outputs
             declare no varying mesh axes); `Experts.interpret = True` runs it on CPU (tests).
`blocked`    pure JAX: each expert's rows padded to tiles of `moe_block_size` rows, one `[tile, D] x [D, F]` matmul
             per tile with that tile's expert weights (`lax.map`; tiles past the last one are skipped), so the cost is
             the assigned rows plus at most one partial tile per expert. The CPU default.
`dense`      every expert on every token, combined with the gates (the reference: E / k times the work).
`auto`       `ragged` on TPU and GPU, `blocked` on CPU.
===========  ======================================================================================================

**Expert parallelism**: the expert weights carry the logical axis `expert` (`[E, D, F]`: `('expert', 'embed', 'mlp')`),
which the sharding rules map to the `expert` mesh axis. Under a mesh (the abstract mesh the trainer / sampler set
while tracing) the expert computation runs in `jax.shard_map`: tokens stay sharded over the batch axes (`data`,
`fsdp`, `expert`: the expert axis shards the batch outside the MoE layers), every device routes its own tokens, sends
each assignment row to the device holding its expert with one `all_to_all` over `expert` (a fixed buffer of A rows
per destination, so nothing is dropped whatever the routing), multiplies the rows it received with its E / ep local
experts, and sends the results back with a second `all_to_all`. Weights sharded over `fsdp` are all-gathered inside
(ZeRO-3); the expert width F sharded over `tensor` gives partial outputs that are summed over `tensor`. If the batch
does not divide over the expert axis (a small decode batch), the tokens are replicated over it instead and every
expert shard adds its experts' part (one `psum` over `expert`). The routing (router matmul, softmax, top-k) runs
outside the `shard_map` under GSPMD, so its statistics need no collectives of ours.

**Routing record** (`MoEAux`, one per sparse layer, stacked over layers by the decoder): the chosen experts
`[B, T, k]` (int32), and per layer the expert loads, router-probability sums and squared log-sum-exps over the valid
tokens, from which `routing_metrics`, `load_balancing_loss` (Switch / transformers' `load_balancing_loss_func`) and
`router_z_loss` (ST-MoE) are computed.
"""
from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from adrpo_jax.models.llm.config import MOE_IMPLS, DecoderConfig

Array = jax.Array

EXPERT_AXIS = "expert"  # the mesh axis the logical 'expert' axis maps to (adrpo_jax.train.sharding rules)
_TOKEN_AXES = ("data", "fsdp", EXPERT_AXIS)  # mesh axes a batch is sharded over (activation_sharding's, + expert)
_KERNELS = ("gate_proj", "up_proj", "down_proj")


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """The implementation `impl` runs: itself, or for 'auto' `ragged` on TPU / GPU and `blocked` on CPU.

  >>> resolve_impl("auto", "cpu"), resolve_impl("auto", "tpu"), resolve_impl("dense", "tpu")
  ('blocked', 'ragged', 'dense')
  """
  if impl not in MOE_IMPLS:
    raise ValueError(f"moe_impl={impl!r} is not supported; use one of {MOE_IMPLS}")
  if impl != "auto":
    return impl
  from adrpo_jax.models.llm.activation_sharding import target_platform  # pylint: disable=import-outside-toplevel
  platform = (platform or target_platform()).lower()
  return "blocked" if platform == "cpu" else "ragged"


# ------------------------------------------------------------------------------------------------------
# Routing
# ------------------------------------------------------------------------------------------------------
def route(logits: Array, k: int, *, norm_topk_prob: bool, expert_indices: Array | None = None):
  """Top-k softmax routing of float32 router logits [..., E].

  Returns (gates [..., k] float32, experts [..., k] int32, probs [..., E] float32). With `expert_indices` (router
  replay) the experts are those given and the gates are the current probabilities there (differentiable).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if expert_indices is None:
    gates, experts = jax.lax.top_k(probs, k)
  else:
    experts = jnp.asarray(expert_indices).astype(jnp.int32)
    if experts.shape != probs.shape[:-1] + (k,):
      raise ValueError(f"expert_indices must be {probs.shape[:-1] + (k,)} (tokens x k), got {experts.shape}")
    gates = jnp.take_along_axis(probs, experts, axis=-1)
  if norm_topk_prob:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return gates, experts.astype(jnp.int32), probs


@flax.struct.dataclass
class MoEAux:
  """What one sparse layer reports about its routing (leading [L] axis when stacked over the sparse layers).

  Attributes:
    expert_indices: [B, T, k] int32, the experts each token used.
    load: [E] float32, assignments per expert over the valid tokens (sums to k * tokens).
    prob_sum: [E] float32, router probabilities summed over the valid tokens.
    z_sum: [] float32, sum over the valid tokens of logsumexp(router logits)^2.
    tokens: [] float32, number of valid tokens.
  """

  expert_indices: Array
  load: Array
  prob_sum: Array
  z_sum: Array
  tokens: Array


def routing_aux(logits: Array, probs: Array, experts: Array, valid: Array | None) -> MoEAux:
  """`MoEAux` of one layer from logits / probs [B, T, E], experts [B, T, k] and token validity [B, T] (None: all)."""
  b, t, e = probs.shape
  w = jnp.ones((b, t), jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
  load = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32) * w[..., None, None], axis=(0, 1, 2))
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return MoEAux(expert_indices=experts, load=load, prob_sum=jnp.einsum("bte,bt->e", probs, w),
                z_sum=jnp.sum(lse * lse * w), tokens=jnp.sum(w))


# ------------------------------------------------------------------------------------------------------
# Metrics and auxiliary losses over the stacked per-layer records
# ------------------------------------------------------------------------------------------------------
def load_balancing_loss(aux: MoEAux) -> Array:
  """Switch-Transformer load balancing over all sparse layers, as transformers' `load_balancing_loss_func`:
  `E * sum_e f_e P_e` with f_e = assignments to e / tokens and P_e = mean router probability of e, both pooled over
  the layers (aux fields with a leading [L] axis). Minimum k (uniform routing); differentiable through P."""
  tokens = jnp.maximum(jnp.sum(aux.tokens), 1.0)
  f = jnp.sum(jnp.atleast_2d(aux.load), axis=0) / tokens
  p = jnp.sum(jnp.atleast_2d(aux.prob_sum), axis=0) / tokens
  return f.shape[-1] * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(aux: MoEAux) -> Array:
  """ST-MoE router z-loss: mean over valid tokens and sparse layers of logsumexp(router logits)^2."""
  return jnp.sum(aux.z_sum) / jnp.maximum(jnp.sum(aux.tokens), 1.0)


def routing_mismatch(recorded: Array, current: Array, mask: Array | None = None) -> Array:
  """Fraction of (token, sparse layer) pairs whose set of k experts differs between two routings.

  recorded, current: [B, T, L, k] expert ids (e.g. the rollout's and the training pass's); mask: [B, T] (None: all
  tokens). 0 means every token used the same sub-network in both passes (router replay gives 0 by construction).
  """
  recorded = jnp.sort(jnp.asarray(recorded).astype(jnp.int32), axis=-1)
  current = jnp.sort(jnp.asarray(current).astype(jnp.int32), axis=-1)
  if recorded.shape != current.shape:
    raise ValueError(f"routings of different shapes {recorded.shape} and {current.shape}")
  differs = jnp.any(recorded != current, axis=-1).astype(jnp.float32)  # [B, T, L]
  if mask is None:
    return jnp.mean(differs)
  w = jnp.broadcast_to(jnp.asarray(mask, jnp.float32)[..., None], differs.shape)
  return jnp.sum(differs * w) / jnp.maximum(jnp.sum(w), 1.0)


def routing_metrics(aux: MoEAux, prefix: str = "moe/") -> dict[str, Array]:
  """Per-step scalars from stacked per-layer records (leading [L] axis): the expert-load entropy normalized by
  log E (1 = uniform load) averaged over layers and its minimum, the largest expert's share of a layer's
  assignments times E (1 = uniform, E = one expert takes all) averaged over layers and its maximum, the
  load-balancing loss and the router z-loss."""
  load = jnp.atleast_2d(aux.load)  # [L, E]
  e = load.shape[-1]
  share = load / jnp.maximum(jnp.sum(load, axis=-1, keepdims=True), 1.0)
  entropy = -jnp.sum(jnp.where(share > 0, share * jnp.log(jnp.where(share > 0, share, 1.0)), 0.0), axis=-1)
  entropy = entropy / math.log(e) if e > 1 else entropy
  max_load = jnp.max(share, axis=-1) * e
  return {f"{prefix}load_entropy": jnp.mean(entropy), f"{prefix}load_entropy_min": jnp.min(entropy),
          f"{prefix}max_load": jnp.mean(max_load), f"{prefix}max_load_max": jnp.max(max_load),
          f"{prefix}load_balancing_loss": load_balancing_loss(aux), f"{prefix}router_z_loss": router_z_loss(aux)}


# ------------------------------------------------------------------------------------------------------
# Grouped matmuls over rows sorted by expert
# ------------------------------------------------------------------------------------------------------
def _argsort(keys: Array) -> Array:
  """Stable argsort of int keys [n]. The iota sorted along is derived from the keys (`+ 0 * keys`) so that inside
  `shard_map` it carries the keys' varying mesh axes: `jnp.argsort` of device-varying keys returns indices typed
  as invariant in jax 0.10.2, and a gather through them then gets a wrong gradient (measured: d/dx of the
  replicated-token expert path)."""
  iota = jnp.arange(keys.shape[0], dtype=jnp.int32) + 0 * keys.astype(jnp.int32)
  return jax.lax.sort((keys, iota), num_keys=1, is_stable=True)[1]


def _tile(dim: int, preferred: tuple[int, ...] = (512, 256, 128)) -> int:
  return next((t for t in preferred if dim % t == 0), dim)


def megablox_gmm(x: Array, w: Array, sizes: Array, *, block: int = 128, interpret: bool = False) -> Array:
  """`megablox.gmm(x [M, K], w [G, K, N], sizes [G])` with M padded to a multiple of the row tile (the padding rows
  join the last group; their outputs are dropped) and the K / N tiles the largest of 512 / 256 / 128 dividing them
  (else the whole dimension). Output in x's dtype."""
  from jax.experimental.pallas.ops.tpu.megablox import gmm  # local: TPU kernel

  m, k = x.shape
  n = w.shape[-1]
  tm = max(8, min(int(block), 8 * -(-m // 8)))
  mp = tm * -(-m // tm)
  if mp != m:
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    sizes = sizes.at[-1].add(mp - jnp.sum(sizes))
  out = gmm(x, w.astype(x.dtype), sizes.astype(jnp.int32), preferred_element_type=x.dtype,
            tiling=(tm, _tile(k), _tile(n)), interpret=interpret)
  return out[:m]


@flax.struct.dataclass
class _Tiles:
  """Row tiles of `blocked`: each sorted row's slot in a [n_tiles * tm] padded layout, each tile's expert."""

  dest: Array  # [M] int32 slot of each sorted row (n_tiles * tm for rows in no group: dropped)
  tile_expert: Array  # [n_tiles] int32
  tile_used: Array  # [n_tiles] bool
  tm: int = flax.struct.field(pytree_node=False)


def _make_tiles(sizes: Array, m: int, tm: int) -> _Tiles:
  g = sizes.shape[0]
  n_tiles = -(-m // tm) + g  # sum_g ceil(s_g / tm) <= M / tm + G
  padded = -(-sizes // tm) * tm
  starts = jnp.cumsum(sizes) - sizes
  pstarts = jnp.cumsum(padded) - padded
  rows = jnp.arange(m, dtype=jnp.int32)
  group = jnp.clip(jnp.searchsorted(jnp.cumsum(sizes), rows, side="right"), 0, g - 1).astype(jnp.int32)
  in_group = rows < jnp.sum(sizes)
  dest = jnp.where(in_group, pstarts[group] + rows - starts[group], n_tiles * tm).astype(jnp.int32)
  tile_start = jnp.arange(n_tiles, dtype=jnp.int32) * tm
  pends = jnp.cumsum(padded)
  tile_expert = jnp.clip(jnp.searchsorted(pends, tile_start, side="right"), 0, g - 1).astype(jnp.int32)
  return _Tiles(dest=dest, tile_expert=tile_expert, tile_used=tile_start < pends[-1], tm=tm)


def _to_tiles(x: Array, tiles: _Tiles) -> Array:
  n = tiles.tile_expert.shape[0]
  out = jnp.zeros((n * tiles.tm + 1,) + x.shape[1:], x.dtype)
  return out.at[tiles.dest].set(x)[:-1].reshape((n, tiles.tm) + x.shape[1:])


def _from_tiles(y: Array, tiles: _Tiles) -> Array:
  flat = y.reshape((-1,) + y.shape[2:])
  flat = jnp.concatenate([flat, jnp.zeros((1,) + flat.shape[1:], flat.dtype)])
  return flat[tiles.dest]


def _blocked_mm(xt: Array, w: Array, tiles: _Tiles) -> Array:
  """Tiles [n, tm, K] times each tile's expert matrix w[e] [K, N] -> [n, tm, N]; unused tiles give zeros."""
  def one(args):
    x_t, e, used = args
    w_e = w[e].astype(x_t.dtype)
    # the skip branch's zeros take the type (incl. shard_map's varying axes) of what the matmul would give
    return jax.lax.cond(used, lambda: x_t @ w_e, lambda: jnp.zeros_like(x_t[:, :1] * w_e[:1]))

  return jax.lax.map(one, (xt, tiles.tile_expert, tiles.tile_used))


# ------------------------------------------------------------------------------------------------------
# The expert weights and their computation
# ------------------------------------------------------------------------------------------------------
_ACTS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _expert_ffn(xs: Array, sizes: Array, params: dict[str, Array], lora: dict[str, Any], *, act: str, impl: str,
                block: int, interpret: bool = False) -> Array:
  """SwiGLU of rows xs [M, D] sorted by expert (group sizes [G]; rows past sum(sizes) belong to no expert) with
  expert weights params = {gate_proj, up_proj: [G, D, F], down_proj: [G, F, D]} (+ LoRA A [G, in, r] / B [G, r,
  out] per adapted kernel in `lora`) -> [M, D] in xs' dtype (rows in no group: zeros or finite values the caller
  drops)."""
  dtype = xs.dtype
  if impl == "blocked":
    tiles = _make_tiles(sizes, xs.shape[0], min(int(block), 8 * -(-xs.shape[0] // 8)))  # small M: small tiles
    mm = lambda x, w: _blocked_mm(x, w, tiles)  # noqa: E731  (x: [n, tm, in] tiles)
    x_in = _to_tiles(xs, tiles)
  elif impl == "ragged":
    mm = lambda x, w: jax.lax.ragged_dot(x, w.astype(x.dtype), sizes)  # noqa: E731
    x_in = xs
  elif impl == "megablox":
    mm = lambda x, w: megablox_gmm(x, w, sizes, block=block, interpret=interpret)  # noqa: E731
    x_in = xs
  else:
    raise ValueError(f"grouped expert implementation {impl!r}")

  def proj(name, x):
    y = mm(x, jnp.asarray(params[name]).astype(dtype))
    if name in lora:
      a, b, scale, dropout = lora[name]
      h = mm(dropout(x), a.astype(dtype)) * jnp.asarray(scale, dtype)
      y = y + mm(h, b.astype(dtype))
    return y

  h = _ACTS[act](proj("gate_proj", x_in)) * proj("up_proj", x_in)
  y = proj("down_proj", h)
  return _from_tiles(y, tiles) if impl == "blocked" else y


def _dense_ffn(x: Array, gates: Array, experts: Array, params, lora, *, act: str) -> Array:
  """Every expert on every token, combined with the gates: x [N, D] -> [N, D] (the reference)."""
  e = params["gate_proj"].shape[0]
  dtype = x.dtype

  def proj(name, x, eq, eq_a, eq_b):
    y = jnp.einsum(eq, x, params[name].astype(dtype))
    if name in lora:
      a, b, scale, dropout = lora[name]
      h = jnp.einsum(eq_a, dropout(x), a.astype(dtype)) * jnp.asarray(scale, dtype)
      y = y + jnp.einsum(eq_b, h, b.astype(dtype))
    return y

  g = proj("gate_proj", x, "nd,edf->nef", "nd,edr->ner", "ner,erf->nef")
  u = proj("up_proj", x, "nd,edf->nef", "nd,edr->ner", "ner,erf->nef")
  y_all = proj("down_proj", _ACTS[act](g) * u, "nef,efd->ned", "nef,efr->ner", "ner,erd->ned")  # [N, E, D]
  combine = jnp.sum(jax.nn.one_hot(experts, e, dtype=dtype) * gates[..., None].astype(dtype), axis=1)  # [N, E]
  return jnp.einsum("ned,ne->nd", y_all, combine)


def _sorted_local(x: Array, gates: Array, experts: Array, params, lora, *, num_experts: int, act: str, impl: str,
                  block: int, interpret: bool) -> Array:
  """Dropless experts on one device: x [N, D], gates / experts [N, k] -> [N, D]."""
  n, k = experts.shape
  flat = experts.reshape(-1)
  order = _argsort(flat)
  sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
  xs = x[order // k]
  ys = _expert_ffn(xs, sizes, params, lora, act=act, impl=impl, block=block, interpret=interpret)
  y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y, gates.astype(y.dtype))


def _expert_parallel(x: Array, gates: Array, experts: Array, params, lora, *, num_experts: int, act: str,
                     impl: str, block: int, interpret: bool, ep: int) -> Array:
  """Inside shard_map over the expert axis (size ep), tokens sharded over it: x [N, D] this device's tokens,
  experts global ids; params hold this device's E / ep experts. Two all_to_alls (see the module doc)."""
  n, k = experts.shape
  e_loc = num_experts // ep
  a = n * k
  flat = experts.reshape(-1)
  order = _argsort(flat)  # grouped by destination shard (experts are contiguous per shard)
  sorted_e = flat[order]
  dest = sorted_e // e_loc
  counts = jnp.zeros((ep,), jnp.int32).at[dest].add(1)
  starts = jnp.cumsum(counts) - counts
  slot = jnp.arange(a, dtype=jnp.int32) - starts[dest]  # position within the destination's chunk
  send_x = jnp.zeros((ep, a) + x.shape[1:], x.dtype).at[dest, slot].set(x[order // k])
  send_e = jnp.full((ep, a), e_loc, jnp.int32).at[dest, slot].set(sorted_e % e_loc)  # e_loc: an empty slot
  recv_x = jax.lax.all_to_all(send_x, EXPERT_AXIS, 0, 0, tiled=True)  # [ep (source), a, D]
  recv_e = jax.lax.all_to_all(send_e, EXPERT_AXIS, 0, 0, tiled=True)
  rows = recv_x.reshape((ep * a,) + x.shape[1:])
  ids = recv_e.reshape(-1)
  order2 = _argsort(ids)  # empty slots (id e_loc) sort last and belong to no group
  sizes = jnp.zeros((e_loc + 1,), jnp.int32).at[ids].add(1)[:e_loc]
  ys = _expert_ffn(rows[order2], sizes, params, lora, act=act, impl=impl, block=block, interpret=interpret)
  ys = jnp.where((ids[order2] < e_loc)[:, None], ys, 0)
  back = jnp.zeros_like(ys).at[order2].set(ys).reshape((ep, a) + x.shape[1:])
  back = jax.lax.all_to_all(back, EXPERT_AXIS, 0, 0, tiled=True)  # [ep (destination), a, D]: my rows' results
  ys_sorted = back[dest, slot]
  y = jnp.zeros_like(ys_sorted).at[order].set(ys_sorted).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y, gates.astype(y.dtype))


def _replicated_tokens(x: Array, gates: Array, experts: Array, params, lora, *, num_experts: int, act: str,
                       impl: str, block: int, interpret: bool, ep: int) -> Array:
  """Inside shard_map, tokens replicated over the expert axis: this device's E / ep experts on the assignments
  routed to them (others are given the empty group), summed over the expert axis by the caller."""
  e_loc = num_experts // ep
  lo = jax.lax.axis_index(EXPERT_AXIS) * e_loc
  mine = (experts >= lo) & (experts < lo + e_loc)
  local_ids = jnp.where(mine, experts - lo, e_loc)
  n, k = experts.shape
  flat = local_ids.reshape(-1)
  order = _argsort(flat)
  sizes = jnp.zeros((e_loc + 1,), jnp.int32).at[flat].add(1)[:e_loc]
  ys = _expert_ffn(x[order // k], sizes, params, lora, act=act, impl=impl, block=block, interpret=interpret)
  ys = jnp.where((flat[order] < e_loc)[:, None], ys, 0)
  y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y, gates.astype(y.dtype))


class Experts(nnx.Module):
  """E SwiGLU experts as three stacked kernels: `gate_proj`, `up_proj` [E, D, F] ('expert', 'embed', 'mlp') and
  `down_proj` [E, F, D] ('expert', 'mlp', 'embed'). Each kernel is a LoRA site (`<path>.gate_proj`, ...: matched by
  'gate_proj' / 'up_proj' / 'down_proj' and 'all-linear') with one adapter per expert (A [E, in, r], B [E, r, out])."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    from adrpo_jax.models.llm.modeling import _param  # local: modeling imports this module lazily

    e, d, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
    std, pdt = config.initializer_range, config.param_dtype
    self.gate_proj = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), pdt, init="normal", std=std)
    self.up_proj = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), pdt, init="normal", std=std)
    self.down_proj = _param(rngs, (e, f, d), ("expert", "mlp", "embed"), pdt, init="normal", std=std)
    self.num_experts = e
    self.act = config.hidden_act
    self.dtype = config.dtype
    self.impl = config.moe_impl
    self.block_size = config.moe_block_size
    self.interpret = False  # megablox in Pallas interpret mode (CPU tests)

  def lora_kernels(self) -> dict[str, str]:
    """LoRA protocol: the kernels and einsums with their expert batch axis `e` (A [E, in, r], B [E, r, out])."""
    return {"gate_proj": "etd,edf->etf", "up_proj": "etd,edf->etf", "down_proj": "etf,efd->etd"}

  def _arrays(self):
    params = {name: getattr(self, name)[...] for name in _KERNELS}
    lora_arrays, lora_static = {}, {}
    for name in _KERNELS:
      adapter = getattr(self, f"{name}_lora", None)
      if adapter is not None and adapter.enabled:
        lora_arrays[name] = (adapter.lora_a[...], adapter.lora_b[...])
        lora_static[name] = (adapter.scale, adapter._dropout)  # pylint: disable=protected-access
    return params, lora_arrays, lora_static

  def __call__(self, x: Array, gates: Array, experts: Array) -> Array:
    """x [B, T, D], gates [B, T, k], experts [B, T, k] -> [B, T, D] in the compute dtype (see the module doc)."""
    b, t, d = x.shape
    k = experts.shape[-1]
    x = x.astype(self.dtype)
    impl = resolve_impl(self.impl)
    params, lora_arrays, lora_static = self._arrays()

    def lora_of(arrays):
      return {n: (*arrays[n], *lora_static[n]) for n in arrays}

    kw: dict[str, Any] = dict(act=self.act, impl=impl, block=self.block_size, interpret=self.interpret)
    if impl == "dense":
      return _dense_ffn(x.reshape(b * t, d), gates.reshape(b * t, k), experts.reshape(b * t, k), params,
                        lora_of(lora_arrays), act=self.act).reshape(b, t, d)
    mesh = _moe_mesh(x)
    if mesh is None:
      return _sorted_local(x.reshape(b * t, d), gates.reshape(b * t, k), experts.reshape(b * t, k), params,
                           lora_of(lora_arrays), num_experts=self.num_experts, **kw).reshape(b, t, d)
    return _sharded_experts(mesh, x, gates, experts, params, lora_arrays, lora_static,
                            num_experts=self.num_experts, **kw)


def _moe_mesh(x: Array | None = None):
  """The abstract mesh the MoE layer distributes over: the context mesh (the trainer / sampler set it while tracing)
  or, without one, the mesh in the type of the traced input `x` (`activation_sharding.current_mesh`), if it has more
  than one device and Auto axes; else None (one device, or already inside a shard_map)."""
  from adrpo_jax.models.llm.activation_sharding import current_mesh  # pylint: disable=import-outside-toplevel

  mesh = current_mesh(x)
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return None
  if any(t != AxisType.Auto for t in mesh.axis_types):
    return None
  return mesh


def _spec(names, shape, mesh) -> P:
  from adrpo_jax.train.sharding import DEFAULT_LOGICAL_RULES, logical_to_partition_spec  # local: trainer module

  rules = tuple(r for r in DEFAULT_LOGICAL_RULES if all(a in mesh.shape for a in
                                                       ((r[1],) if isinstance(r[1], str) else (r[1] or ()))))
  return logical_to_partition_spec(names, shape, mesh, rules)


def _axes_of(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _gather_fsdp(arr: Array, spec: P) -> Array:
  """All-gathers every dimension of a shard_map-local array that is sharded over a batch (non-expert,
  non-tensor) axis: the expert computation needs whole D / r dimensions (FSDP weights, ZeRO-3 style)."""
  for dim, entry in enumerate(spec):
    for axis in _axes_of(entry):
      if axis not in (EXPERT_AXIS, "tensor"):
        arr = jax.lax.all_gather(arr, axis, axis=dim, tiled=True)
  return arr


def _sharded_experts(mesh, x, gates, experts, params, lora_arrays, lora_static, *, num_experts, act, impl,
                     block, interpret):
  b = x.shape[0]
  ep = mesh.shape.get(EXPERT_AXIS, 1)
  if num_experts % ep:
    raise ValueError(f"num_experts={num_experts} is not divisible by the '{EXPERT_AXIS}' mesh axis ({ep})")
  token_axes = [a for a in _TOKEN_AXES if mesh.shape.get(a, 1) > 1]
  while token_axes and b % math.prod(mesh.shape[a] for a in token_axes):
    token_axes.pop()  # drop the expert axis first, then fsdp: the tokens are replicated over the dropped axes
  token_spec = P(tuple(token_axes) or None)
  specs = {n: _spec(("expert", "embed", "mlp") if n != "down_proj" else ("expert", "mlp", "embed"), params[n].shape,
                    mesh) for n in _KERNELS}
  lora_specs = {}
  for n, (a_, b_) in lora_arrays.items():
    in_name, out_name = ("embed", "mlp") if n != "down_proj" else ("mlp", "embed")
    lora_specs[n] = (_spec(("expert", in_name, None), a_.shape, mesh), _spec(("expert", None, out_name), b_.shape,
                                                                              mesh))
  for n, s in specs.items():
    if _axes_of(s[0] if len(s) else None) not in ((EXPERT_AXIS,), ()):
      raise ValueError(f"expert kernel {n} would be sharded {s} on its expert axis; expected '{EXPERT_AXIS}'")
  experts_sharded = ep > 1 and all(len(s) and _axes_of(s[0]) == (EXPERT_AXIS,) for s in specs.values())
  ep_eff = ep if experts_sharded else 1
  tensor_partial = "tensor" in _axes_of(specs["down_proj"][1] if len(specs["down_proj"]) > 1 else None)
  all_to_all = experts_sharded and EXPERT_AXIS in token_axes
  kw = dict(num_experts=num_experts, act=act, impl=impl, block=block, interpret=interpret)

  def body(x, gates, experts, params, lora_arrays):
    params = {n: _gather_fsdp(v, specs[n]) for n, v in params.items()}
    lora = {n: (_gather_fsdp(a_, lora_specs[n][0]), _gather_fsdp(b_, lora_specs[n][1]), *lora_static[n])
            for n, (a_, b_) in lora_arrays.items()}
    bl, t, d = x.shape
    k = experts.shape[-1]
    args = (x.reshape(bl * t, d), gates.reshape(bl * t, k), experts.reshape(bl * t, k), params, lora)
    if all_to_all:
      y = _expert_parallel(*args, ep=ep_eff, **kw)
    elif experts_sharded:
      y = jax.lax.psum(_replicated_tokens(*args, ep=ep_eff, **kw), EXPERT_AXIS)
    else:
      y = _sorted_local(*args, **kw)
    if tensor_partial:
      y = jax.lax.psum(y, "tensor")
    return y.reshape(bl, t, d)

  in_specs = (P(*token_spec, None, None), P(*token_spec, None, None), P(*token_spec, None, None), specs,
              lora_specs)
  # Pallas kernels (megablox) declare no varying mesh axes on their outputs, which check_vma=True refuses; the body
  # is the same either way (the gradient tests cover both modes).
  fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(*token_spec, None, None),
                     check_vma=impl != "megablox")
  return fn(x, gates, experts, params, lora_arrays)


class Router(nnx.Module):
  """`gate.kernel` [D, E] ('embed', None): float32 logits of x [..., D] (the matmul in the compute dtype, as HF)."""

  def __init__(self, dim: int, num_experts: int, *, dtype, param_dtype, std: float, rngs: nnx.Rngs):
    from adrpo_jax.models.llm.modeling import _param

    self.kernel = _param(rngs, (dim, num_experts), ("embed", None), param_dtype, init="normal", std=std)
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    return jnp.einsum("...d,de->...e", x.astype(self.dtype), self.kernel[...].astype(self.dtype)).astype(jnp.float32)


class SparseMoeBlock(nnx.Module):
  """The feed-forward block of a sparse layer: router `gate`, `experts`, and for qwen2_moe `shared_expert` (a SwiGLU
  MLP of width `shared_expert_intermediate_size`) with its `shared_expert_gate` [D, 1] (HF names)."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    from adrpo_jax.models.llm.modeling import MLP, Dense

    common = dict(dtype=config.dtype, param_dtype=config.param_dtype, std=config.initializer_range, rngs=rngs)
    self.gate = Router(config.hidden_size, config.num_experts, **common)
    self.experts = Experts(config, rngs=rngs)
    self.shared_expert: MLP | None
    self.shared_expert_gate: Dense | None
    if config.shared_expert_intermediate_size:
      shared = config.replace(intermediate_size=config.shared_expert_intermediate_size, mlp_bias=False,
                              num_experts=0, mlp_only_layers=())
      self.shared_expert = MLP(shared, rngs=rngs)
      self.shared_expert_gate = Dense("btd,do->bto", (config.hidden_size, 1), ("embed", None), **common)
    else:
      self.shared_expert = self.shared_expert_gate = None
    self.top_k = config.num_experts_per_tok
    self.norm_topk_prob = config.norm_topk_prob
    self.dtype = config.dtype

  def forward(self, x: Array, *, token_valid: Array | None = None, expert_indices: Array | None = None
              ) -> tuple[Array, MoEAux]:
    """x [B, T, D] -> (y [B, T, D], `MoEAux`); `expert_indices` [B, T, k]: route with these experts (replay)."""
    x = x.astype(self.dtype)
    logits = self.gate(x)
    gates, experts, probs = route(logits, self.top_k, norm_topk_prob=self.norm_topk_prob,
                                  expert_indices=expert_indices)
    y = self.experts(x, gates.astype(self.dtype), experts)
    if self.shared_expert is not None and self.shared_expert_gate is not None:
      y = y + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
    return y, routing_aux(logits, probs, experts, token_valid)

  def __call__(self, x: Array) -> Array:
    return self.forward(x)[0]


def stack_aux(auxes: list[MoEAux]) -> MoEAux | None:
  """[L] stacked records of the sparse layers (None for a dense model)."""
  if not auxes:
    return None
  return jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)


def expert_indices_layout(aux: MoEAux | None) -> Array | None:
  """The routing record [B, T, L, k] (int32) of stacked per-layer records ([L, B, T, k])."""
  return None if aux is None else jnp.moveaxis(aux.expert_indices, 0, 2)


def np_dtype_for(num_experts: int):
  """The smallest integer dtype holding expert ids < num_experts (recording buffers)."""
  return np.uint8 if num_experts <= 256 else (np.int16 if num_experts <= 32767 else np.int32)
