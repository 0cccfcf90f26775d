"""Continuous batching: R requests decoded through S < R slots of a slot KV cache, refilled as rows finish.

A static batch (`adrpo_jax.models.llm.sampler`) decodes all its rows until the longest one stops: with
heavy-tailed completion lengths most of its row-steps are spent on rows that are already done (lengths
log-normal around 1/8 of the budget: ~21 % useful row-steps at 64 rows). Here a fixed number of *decode slots*
run the requests: when a slot's request stops (a stop token or its own `max_new_tokens`), the slot takes the next
pending request inside the same jitted `lax.while_loop`, so the decode steps follow the real tokens:
about `sum(lengths) / S` steps plus the drain of the last requests, instead of `ceil(R / B) x max length`.

One call (`make_continuous_generate_fn`):

1. **Prefill once per distinct prompt** (with `prompt_group_size=G`, GRPO's G completions of one prompt share
   it): one batched forward over the U = R / G prompts, exactly the static sampler's prefill. Its keys/values
   (the prompt store, [U, P] per layer) and the next-token logits are kept; the first token of every request is
   drawn from them up front.
2. **Slots**: a KV cache of S rows x (P + N) slots with a *per-slot* write index (the slot's own length); a
   slot's row has the static sampler's layout (prompt in [0, P), completion token i at P + i), so a request sees
   the keys it would see in a static batch.
3. **The loop**: one decode step of every slot (the model's cached forward vmapped over the slots, so each slot
   writes at its own index and attends its own filled blocks), then each slot draws its next token with its
   request's key; a slot whose request stopped is refilled with the next pending request: its prompt keys/values
   are copied from the store (no forward pass inside the loop), its first token was drawn in step 1. The loop
   ends when every request is done.

Refill inside the loop rather than in jitted chunks of k steps with a host-side refill: the refill is a copy of
stored prompt keys/values (no prefill compute), so a host round trip could only add a device -> host sync per
chunk and idle slots between chunks; the in-loop refill keeps every slot busy and the whole rollout one program
(what a plan compiles).

**Per-request keys** (`request_keys`): request r draws token i with `fold_in(fold_in(rng, r), i)`; nothing of
its slot or its neighbours enters, so the tokens equal the static sampler's with the same per-row keys
(`make_generate_fn(...)(state, tokens, mask, request_keys(rng, R))`): the same prefill, the same per-row cache
layout and positions; the decode arithmetic is that of a batch-of-one row (float rounding of a vmapped row can
differ from a batched row in the last bit, so log-probs agree to ~1e-6 and tokens are equal unless two
candidates are that close).

Results come back per request in submission order, as a `GenerationOutput` ([R, P + N] tokens ...), the
static sampler's contract. Memory: the slot cache S x (P + N) and the prompt store U x P (instead of R x (P + N)).

    fn = make_continuous_generate_fn(graphdef, SamplingConfig(max_new_tokens=4096, eos_token_ids=(2,),
                                                              prompt_group_size=8), num_slots=16)
    out = jax.jit(fn)(state, prompt_tokens, prompt_mask, key)          # R = 128 requests, 16 slots
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from adrpo_jax.models.llm.modeling import CausalLM, KVCache
from adrpo_jax.models.llm.sampler import (GenerationOutput, SamplingConfig, _check_groups, _check_prompts,
                                          _last_logits, _prefill, _select, is_key_batch)

Array = jax.Array

__all__ = ["make_continuous_generate_fn", "generate_continuous", "request_keys", "ContinuousStats"]


def request_keys(rng: Array, num_requests: int) -> Array:
  """[R] keys, `fold_in(rng, r)` for request r: the per-request keys of a continuous call with one key (pass
  them to the static sampler to reproduce it).

  >>> request_keys(jax.random.key(0), 3).shape
  (3,)
  """
  return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(num_requests, dtype=jnp.uint32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContinuousStats:
  """What one continuous call did: `decode_steps` [] int32 (iterations of the slot loop), `slot_steps_used`
  [] int32 (slot-steps that produced a token; the utilization is `slot_steps_used / (decode_steps * S)`)."""

  decode_steps: Array
  slot_steps_used: Array


def _batch_axis(x: Array) -> int:
  """The batch axis of a model-layout cache leaf: keys/values [L, B, K, S, hd] -> 1, [B, K, S, hd] -> 0; the
  [B, S] mask and the [B] positions -> 0."""
  return x.ndim - 4 if x.ndim >= 4 else 0


def _slots_first(x: Array) -> Array:
  """A model-layout keys/values leaf with its batch axis moved to the front and kept as a batch of one row
  ([L, B, K, S, hd] -> [B, L, 1, K, S, hd]; [B, K, S, hd] -> [B, 1, K, S, hd]): the slot cache's layout, so the
  vmap over the slots hands the model each slot's cache as is (no per-step transpose or reshape copy of the
  whole cache around the layer scan)."""
  return jnp.expand_dims(jnp.moveaxis(x, _batch_axis(x), 0), _batch_axis(x) + 1)


def _refill(cache: KVCache, store_k, store_v, prompt_mask: Array, which: Array, prompt_ids: Array,
            total_len: int) -> KVCache:
  """The slot cache (slots-first leaves) with the slots `which` [S] reset to the stored prompts `prompt_ids` [S]
  (store: slots-first [U, ..., K, P, hd]): keys/values of [0, P) copied from the store, the mask = the prompt's
  mask then nothing written, index = P, next position = the prompt's length. Other slots are untouched."""
  p = prompt_mask.shape[1]

  def kv(leaf, store):  # leaf [S, (L,) 1, K, total, hd], store [U, (L,) 1, K, P, hd]
    seq = leaf.ndim - 2
    region = jax.lax.slice_in_dim(leaf, 0, p, axis=seq)
    new = jnp.take(store, prompt_ids, axis=0).astype(leaf.dtype)
    sel = which.reshape((-1,) + (1,) * (leaf.ndim - 1))
    return jax.lax.dynamic_update_slice_in_dim(leaf, jnp.where(sel, new, region), 0, seq)

  keys = jax.tree.map(kv, cache.keys, store_k)
  values = jax.tree.map(kv, cache.values, store_v)
  pm = jnp.take(prompt_mask, prompt_ids, axis=0)
  full = jnp.concatenate([pm, jnp.zeros((pm.shape[0], total_len - p), bool)], axis=1)
  return KVCache(keys=keys, values=values, mask=jnp.where(which[:, None], full, cache.mask),
                 index=jnp.where(which, jnp.int32(p), cache.index),
                 next_position=jnp.where(which, jnp.sum(pm, axis=1, dtype=jnp.int32), cache.next_position))


def _slot_hidden(graphdef: nnx.GraphDef, state: Any, tokens: Array, active: Array, cache: KVCache
                 ) -> tuple[Array, KVCache]:
  """One cached decode step of every slot, each at its own index: hidden [S, D] and the updated slot cache.

  The model's cached forward is vmapped over the slots (a batch of one row per slot, with the slot's own scalar
  write index), so the writes are per-slot and each slot's attention reads its own filled key blocks. Inactive
  slots feed a masked token (nothing attends it) and keep their index. Every leaf of `cache` is slots-first."""

  def one(tok, act, c):
    # c: one slot, keys/values already a batch of one row ([L, 1, K, S, hd]); mask/positions get theirs back, the
    # index stays a scalar.
    c1 = c.replace(mask=c.mask[None], next_position=c.next_position[None])
    model = nnx.merge(graphdef, state)
    hidden, c1 = model.hidden_states(tok[None, None], attention_mask=act[None, None], cache=c1)
    out = c1.replace(mask=c1.mask[0], index=jnp.where(act, c1.index, c.index), next_position=c1.next_position[0])
    return hidden[0, 0], out

  return jax.vmap(one)(tokens, active, cache)


def _continuous(graphdef: nnx.GraphDef, state: Any, prompt_tokens: Array, prompt_mask: Array, rng: Array,
                config: SamplingConfig, num_slots: int, prompt_embeds: Array | None = None,
                max_lengths: Array | None = None) -> tuple[GenerationOutput, ContinuousStats]:
  model: CausalLM = nnx.merge(graphdef, state)
  r, p = prompt_tokens.shape
  n = config.max_new_tokens
  g = config.prompt_group_size
  if r % g:
    raise ValueError(f"{r} requests are not a multiple of prompt_group_size={g}")
  s = int(min(num_slots, r))
  u = r // g
  prompt_tokens = prompt_tokens.astype(jnp.int32)
  prompt_mask = prompt_mask.astype(bool)
  keys = rng if is_key_batch(rng, r) else request_keys(rng, r)
  eos = jnp.asarray(config.eos_token_ids or (-1,), jnp.int32)
  pad = jnp.int32(config.pad_token_id)
  total = p + n
  limit = jnp.full((r,), n, jnp.int32) if max_lengths is None else jnp.clip(jnp.asarray(max_lengths, jnp.int32), 1, n)

  # 1. One prefill per distinct prompt (the static sampler's, on the U group prompts), kept as the prompt store.
  u_tokens = prompt_tokens.reshape(u, g, p)[:, 0]
  u_mask = prompt_mask.reshape(u, g, p)[:, 0]
  u_embeds = None if prompt_embeds is None else prompt_embeds.reshape(u, g, *prompt_embeds.shape[1:])[:, 0]
  logits_u, pcache = _prefill(model, u_tokens, u_mask, total, dataclasses.replace(config, prompt_group_size=1),
                              u_embeds)
  store_k = jax.tree.map(lambda x: _slots_first(x)[..., :p, :], pcache.keys)  # [U, (L,) 1, K, P, hd]
  store_v = jax.tree.map(lambda x: _slots_first(x)[..., :p, :], pcache.values)
  del pcache
  logits_r = jnp.repeat(logits_u, g, axis=0) if g > 1 else logits_u
  step0 = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
  tok0, logp0 = _select(logits_r, step0, config)
  stop0 = jnp.isin(tok0, eos)
  live0 = ~stop0 & (limit > 1)
  completions = jnp.full((r, n), pad, jnp.int32).at[:, 0].set(tok0)
  logprobs = jnp.zeros((r, n), jnp.float32).at[:, 0].set(logp0)
  valid = jnp.zeros((r, n), bool).at[:, 0].set(True)
  # The pending queue: the live requests in submission order (a request done at its first token takes no slot).
  order = jnp.argsort(~live0, stable=True).astype(jnp.int32)
  n_live = jnp.sum(live0, dtype=jnp.int32)

  # 2. The slots, filled with the first S live requests.
  slot_ids = jnp.arange(s, dtype=jnp.int32)
  first = slot_ids < n_live
  slot_req = jnp.where(first, order[jnp.minimum(slot_ids, r - 1)], r)
  cache = model.init_cache(s, total, config.cache_dtype)
  cache = dataclasses.replace(cache, keys=jax.tree.map(_slots_first, cache.keys),
                              values=jax.tree.map(_slots_first, cache.values), index=jnp.zeros((s,), jnp.int32))
  cache = _refill(cache, store_k, store_v, u_mask, first, jnp.minimum(slot_req, r - 1) // g, total)
  cur = jnp.where(first, tok0[jnp.minimum(slot_req, r - 1)], pad)
  slot_t = jnp.ones((s,), jnp.int32)
  next_ptr = jnp.minimum(jnp.int32(s), n_live)

  def cond(carry):
    return jnp.any(carry[0] < r)

  def body(carry):
    slot_req, slot_t, cur, cache, completions, logprobs, valid, stopped, next_ptr, steps, used = carry
    active = slot_req < r
    hidden, cache = _slot_hidden(graphdef, state, cur, active, cache)
    step_model = nnx.merge(graphdef, state)
    req = jnp.minimum(slot_req, r - 1)
    step_rng = jax.vmap(jax.random.fold_in)(keys[req], slot_t)
    tok, logp = _select(_last_logits(step_model, hidden), step_rng, config)
    tok = jnp.where(active, tok, pad)
    logp = jnp.where(active, logp, 0.0)
    rows = jnp.where(active, slot_req, r)  # inactive slots write nowhere (out of bounds, dropped)
    col = jnp.minimum(slot_t, n - 1)
    completions = completions.at[rows, col].set(tok, mode="drop")
    logprobs = logprobs.at[rows, col].set(logp, mode="drop")
    valid = valid.at[rows, col].set(True, mode="drop")
    is_stop = jnp.isin(tok, eos)
    stopped = stopped.at[jnp.where(active & is_stop, slot_req, r)].set(True, mode="drop")
    slot_t = slot_t + 1
    finished = active & (is_stop | (slot_t >= limit[req]))
    # Refill: the finished slots, in slot order, take the next pending requests.
    ptr = next_ptr + jnp.cumsum(finished, dtype=jnp.int32) - 1
    refill = finished & (ptr < n_live)
    new_req = jnp.where(refill, order[jnp.clip(ptr, 0, r - 1)], r)
    slot_req = jnp.where(finished, new_req, slot_req)
    next_ptr = next_ptr + jnp.sum(refill, dtype=jnp.int32)
    cache = jax.lax.cond(jnp.any(refill),
                         lambda c: _refill(c, store_k, store_v, u_mask, refill, jnp.minimum(new_req, r - 1) // g,
                                           total),
                         lambda c: c, cache)
    cur = jnp.where(refill, tok0[jnp.minimum(new_req, r - 1)], tok)
    slot_t = jnp.where(refill, 1, slot_t)
    used = used + jnp.sum(active, dtype=jnp.int32)
    return (slot_req, slot_t, cur, cache, completions, logprobs, valid, stopped, next_ptr, steps + 1, used)

  carry = (slot_req, slot_t, cur, cache, completions, logprobs, valid, stop0, next_ptr, jnp.zeros((), jnp.int32),
           jnp.zeros((), jnp.int32))
  carry = jax.lax.while_loop(cond, body, carry)
  completions, logprobs, valid, stopped, steps, used = carry[4], carry[5], carry[6], carry[7], carry[9], carry[10]
  out = GenerationOutput(
      tokens=jnp.concatenate([prompt_tokens, completions], axis=1),
      attention_mask=jnp.concatenate([prompt_mask, valid], axis=1),
      completions=completions, completion_mask=valid, logprobs=logprobs,
      lengths=jnp.sum(valid, axis=1, dtype=jnp.int32), done=stopped)
  return out, ContinuousStats(decode_steps=steps, slot_steps_used=used)


def make_continuous_generate_fn(graphdef: nnx.GraphDef, config: SamplingConfig, num_slots: int,
                                mesh: Mesh | AbstractMesh | None = None, *, return_stats: bool = False):
  """Pure `fn(state, prompt_tokens [R, P], prompt_mask [R, P], rng, prompt_embeds=None) -> GenerationOutput`
  (with `return_stats`: `(GenerationOutput, ContinuousStats)`), decoding the R requests through `num_slots`
  slots (see the module doc). Not jitted.

  Args:
    graphdef: `nnx.split(model)[0]` of a `CausalLM`.
    config: the `SamplingConfig` (with `prompt_group_size=G` the R rows come in groups of G rows of one prompt,
      prefilled once).
    num_slots: S >= 1 decode slots (S >= R: every request has a slot from the start, no refill).
    mesh: trace under this mesh as the abstract mesh (as `make_generate_fn`).
  `rng`: one key (request r uses `request_keys(rng, R)[r]`) or [R] per-request keys. `max_lengths`: optional
  [R] int per-request completion budgets (clipped to [1, max_new_tokens]; a request stops at its own budget).
  """
  if not isinstance(config, SamplingConfig):
    raise ValueError(f"config must be a SamplingConfig, got {type(config).__name__}")
  if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
    raise ValueError(f"num_slots={num_slots!r} must be an int >= 1")
  if mesh is not None and not isinstance(mesh, (Mesh, AbstractMesh)):
    raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
  abstract = None if mesh is None else (mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh)

  def generate_fn(state, prompt_tokens, prompt_mask, rng, prompt_embeds=None, max_lengths=None):
    with contextlib.nullcontext() if abstract is None else jax.sharding.use_abstract_mesh(abstract):
      out, stats = _continuous(graphdef, state, prompt_tokens, prompt_mask, rng, config, num_slots,
                               prompt_embeds, max_lengths)
    return (out, stats) if return_stats else out

  return generate_fn


@functools.lru_cache(maxsize=32)
def _jitted(graphdef: nnx.GraphDef, config: SamplingConfig, num_slots: int):
  return jax.jit(make_continuous_generate_fn(graphdef, config, num_slots, return_stats=True))


def generate_continuous(model: CausalLM, prompt_tokens: Array, prompt_mask: Array | None = None, *,
                        rng: Array | None = None, num_slots: int, max_new_tokens: int, return_stats: bool = False,
                        max_lengths: Array | None = None, **sampling: Any):
  """`adrpo_jax.models.llm.generate` through `num_slots` continuous-batching slots (jitted, cached per
  (model structure, options, shapes)); `sampling`: the other `SamplingConfig` fields. The tokens equal
  `generate(model, ..., rng=request_keys(rng, R))` (per-request keys; see the module doc)."""
  if not isinstance(model, CausalLM):
    raise ValueError(f"model must be a CausalLM, got {type(model).__name__}")
  prompt_tokens = jnp.asarray(prompt_tokens)
  prompt_mask = jnp.ones(prompt_tokens.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
  _check_prompts(prompt_tokens, prompt_mask)
  if rng is None:
    if not sampling.get("greedy", False):
      raise ValueError("rng is required for sampling (greedy=False)")
    rng = jax.random.key(0)
  config = SamplingConfig(max_new_tokens=max_new_tokens, **sampling)
  _check_groups(prompt_tokens, prompt_mask, config.prompt_group_size)
  graphdef, state = nnx.split(model)
  fn = _jitted(graphdef, config, int(num_slots))
  if max_lengths is None:
    out, stats = fn(state, prompt_tokens, prompt_mask, rng)
  else:
    out, stats = fn(state, prompt_tokens, prompt_mask, rng, None, jnp.asarray(max_lengths, jnp.int32))
  return (out, stats) if return_stats else out
