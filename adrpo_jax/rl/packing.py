"""Packed log-prob passes and updates: the rollout rows' real tokens packed into fixed token budgets.

A rollout batch is ``tokens [B, P + N]``: each row a left-padded prompt and a right-padded completion. With
heavy-tailed completion lengths most of the ``B x (P + N)`` positions are padding, and the model forward (and its
backward) of the old / reference log-prob passes and of the update pays for all of them. Packing
(``rl.pack_tokens = T``) puts each row's real tokens (its prompt's, then its completion's: one contiguous run
``[P - p_r, P + c_r)`` of the row) into *packs* of ``T`` token slots, several rows per pack, with

* **segment ids**: a token attends only the tokens of its own row (``AttentionMask.segment_ids``: the causal mask
  restricted to the segment; xla, chunked and splash attention honour it),
* **positions** restarting at 0 for every row (the padded layout's ``positions_from_mask``),

so a packed forward computes exactly the rows' log-probs (float rounding aside). Rows are assigned to packs by
first-fit decreasing (:func:`pack_plan`, inside ``jit``, ``O(B^2)`` scalar work), so the packs in use are a prefix.

The cost follows the real tokens: the packs are run in groups of ``m`` packs (``[m, T]`` per forward, ``m`` such
that a group holds about an eighth of the token slots of one padded micro-batch, :func:`packs_per_group`; the memory
of a forward follows), and a group past the last used pack is skipped
(``lax.cond``): at most ``ceil(B / m)`` groups exist (one row per pack), about ``sum(lengths) / (m T)`` run.

The loss is *unchanged*: each group's log-probs are put back in the row layout ``[B, N]`` (a gather, differentiable)
and the GRPO loss runs on the rows as without packing, with the loss mask restricted to the group's rows and the
minibatch's global normalizer, so token / sequence / Dr. GRPO means are computed per original row and the group
gradients add up to the padded update's gradient (the micro-batch rule of
:func:`adrpo_jax.train.step_utils.accumulate_gradients`: a group is a micro-batch whose rows were chosen by the
packing). Requires ``T >= P + N`` (a row always fits one pack).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from adrpo_jax.models.llm.logprobs import logprobs_from_hidden
from adrpo_jax.train.sharding import BATCH_AXES

__all__ = ["PackedRows", "row_spans", "pack_plan", "pack_rows", "packs_per_group", "packed_logprob_groups",
           "unpack_completions", "packed_completion_logprobs", "packed_token_fraction"]

Array = jax.Array


@flax.struct.dataclass
class PackedRows:
    """Rows packed into ``n = G * m`` packs of ``T`` slots (``G`` groups of ``m`` packs).

    Attributes:
      tokens / positions / segment_ids / valid: ``[G, m, T]`` (int32, int32, int32 (the row index; -1 empty),
        bool); feed them to ``model.hidden_states(tokens, positions=, attention_mask=valid, segment_ids=)``.
      dest: ``[B, N]`` int32 flat index into ``n * T`` of each completion position (``n * T`` where none).
      pack_id: ``[B]`` the pack of each row; ``num_packs``: ``[]`` packs in use (a prefix of the packs).
    """

    tokens: Array
    positions: Array
    segment_ids: Array
    valid: Array
    dest: Array
    pack_id: Array
    num_packs: Array

    @property
    def groups(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def packs_per_group(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def pack_tokens(self) -> int:
        return int(self.tokens.shape[2])


def row_spans(attention_mask: Array, prompt_length: int) -> tuple[Array, Array]:
    """``(start [B], length [B])``: each row's real tokens are the columns ``[start, start + length)`` (a
    left-padded prompt followed by a right-padded completion: ``start = P - p_r``, ``length = p_r + c_r``)."""
    m = attention_mask.astype(bool)
    p_len = jnp.sum(m[:, :prompt_length], axis=1, dtype=jnp.int32)
    c_len = jnp.sum(m[:, prompt_length:], axis=1, dtype=jnp.int32)
    return prompt_length - p_len, p_len + c_len


def pack_plan(lengths: Array, pack_tokens: int, num_packs: int | None = None) -> tuple[Array, Array, Array]:
    """First-fit decreasing: ``(pack_id [B], offset [B], num_packs [])`` for rows of ``lengths`` [B] (each
    ``<= pack_tokens``) in packs of ``pack_tokens`` slots; rows in decreasing length (stable), each into the first
    pack with room. The packs in use are ``0 .. num_packs - 1``. ``num_packs`` (static) bounds the packs (default
    B: one row per pack at worst).

    >>> pid, off, n = pack_plan(jnp.array([3, 5, 2, 4]), 8)
    >>> pid.tolist(), off.tolist(), int(n)
    ([0, 0, 1, 1], [5, 0, 4, 0], 2)
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    b = lengths.shape[0]
    n = b if num_packs is None else int(num_packs)
    order = jnp.argsort(-lengths, stable=True)

    def place(fill, r):
        length = lengths[r]
        k = jnp.argmax(fill + length <= pack_tokens)  # the first pack with room (an empty one always has)
        return fill.at[k].add(length), (k.astype(jnp.int32), fill[k])

    fill, (pid_sorted, off_sorted) = jax.lax.scan(place, jnp.zeros((n,), jnp.int32), order)
    pack_id = jnp.zeros((b,), jnp.int32).at[order].set(pid_sorted)
    offset = jnp.zeros((b,), jnp.int32).at[order].set(off_sorted)
    return pack_id, offset, jnp.sum(fill > 0, dtype=jnp.int32)


GROUP_FRACTION = 8  # a group of packs holds ~1 / GROUP_FRACTION of a padded micro-batch's token slots


def packs_per_group(rows: int, row_tokens: int, pack_tokens: int, data_parallel: int = 1) -> int:
    """``m``: packs per forward, so that a group holds about ``1 / GROUP_FRACTION`` of the token slots of ``rows``
    padded rows of ``row_tokens`` (``rows * row_tokens / (GROUP_FRACTION * pack_tokens)``), a multiple of the
    data-parallel size, at least one pack per device. Smaller groups skip more of the unused packs (the padding of
    the last group run is at most ``m - 1`` packs); larger groups run fewer, larger forwards.

    >>> packs_per_group(64, 528, 1024), packs_per_group(64, 528, 1024, data_parallel=8)
    (4, 8)
    """
    dp = max(int(data_parallel), 1)
    return max(dp, (rows * row_tokens // (GROUP_FRACTION * pack_tokens)) // dp * dp)


def pack_rows(tokens: Array, attention_mask: Array, prompt_length: int, pack_tokens: int, group_packs: int
              ) -> PackedRows:
    """Packs the rows of ``tokens`` / ``attention_mask`` ``[B, P + N]`` (see the module doc) into ``G * m`` packs of
    ``pack_tokens`` slots, ``m = group_packs``, ``G = ceil(B / m)``."""
    b, width = tokens.shape
    if pack_tokens < width:
        raise ValueError(f"pack_tokens={pack_tokens} must be >= prompt + completion length {width} (a row must fit "
                         "one pack)")
    m = int(group_packs)
    g = -(-b // m)
    n = g * m
    start, length = row_spans(attention_mask, prompt_length)
    pack_id, offset, num = pack_plan(length, pack_tokens, n)
    rel = jnp.arange(width, dtype=jnp.int32)[None, :] - start[:, None]  # the token's position within its row
    real = attention_mask.astype(bool)
    dest = jnp.where(real, pack_id[:, None] * pack_tokens + offset[:, None] + rel, n * pack_tokens)
    flat = lambda fill, dtype: jnp.full((n * pack_tokens,), fill, dtype)  # noqa: E731
    put = lambda base, values: base.at[dest].set(values, mode="drop").reshape(g, m, pack_tokens)  # noqa: E731
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, width))
    return PackedRows(tokens=put(flat(0, jnp.int32), tokens.astype(jnp.int32)),
                      positions=put(flat(0, jnp.int32), jnp.maximum(rel, 0)),
                      segment_ids=put(flat(-1, jnp.int32), rows),
                      valid=put(flat(False, bool), real),
                      dest=dest[:, prompt_length:], pack_id=pack_id, num_packs=num)


def _constrain_packs(x: Array, mesh: Mesh | None) -> Array:
    """``[m, T]`` packs of one group sharded over the batch axes (when they divide ``m``)."""
    if mesh is None:
        return x
    size = 1
    for a in BATCH_AXES:
        if a in mesh.shape:
            size *= mesh.shape[a]
    if x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))


def group_logprobs(model: Any, packed: PackedRows, g: Array, *, chunk_size: int, temperature: float,
                   mesh: Mesh | None = None) -> tuple[Array, Array]:
    """``(logp, entropy)`` ``[m, T]`` float32 of group ``g``'s packs: ``logp[:, d] = log p(token_d | the tokens of
    its segment before it)`` (meaningless at a segment's first token, which is a prompt token: never read)."""
    take = lambda x: _constrain_packs(jax.lax.dynamic_index_in_dim(x, g, 0, keepdims=False), mesh)  # noqa: E731
    tokens, valid = take(packed.tokens), take(packed.valid)
    hidden = model.hidden_states(tokens, positions=take(packed.positions), attention_mask=valid,
                                 segment_ids=take(packed.segment_ids))
    return logprobs_from_hidden(hidden, tokens, model.lm_head_matrix(), valid, chunk_size=chunk_size,
                                temperature=temperature, return_entropy=True,
                                logits_lora=getattr(model, "lm_head_lora", None))


def unpack_completions(values: Array, dest: Array, completion_mask: Array, base: Array | int = 0) -> Array:
    """``[B, N]`` row-layout values from packed ``values`` (flat, or ``[..., T]`` of the packs starting at flat
    index ``base``): ``values.flat[dest - base]``, 0 outside ``completion_mask`` or the given packs."""
    flat = values.reshape(-1)
    local = dest - base
    inside = (local >= 0) & (local < flat.shape[0]) & completion_mask.astype(bool)
    return jnp.where(inside, jnp.take(flat, jnp.clip(local, 0, flat.shape[0] - 1)), 0.0)


def packed_logprob_groups(model: Any, packed: PackedRows, *, chunk_size: int, temperature: float,
                          mesh: Mesh | None = None) -> tuple[Array, Array]:
    """``(logp, entropy)`` ``[G, m, T]`` of every group (forward only); groups past the used packs are skipped
    (zeros)."""
    m, t = packed.packs_per_group, packed.pack_tokens

    def one(g):
        def compute(_):
            return group_logprobs(model, packed, g, chunk_size=chunk_size, temperature=temperature, mesh=mesh)

        zeros = jnp.zeros((m, t), jnp.float32)
        return jax.lax.cond(g * m < packed.num_packs, compute, lambda _: (zeros, zeros), None)

    return jax.lax.map(one, jnp.arange(packed.groups, dtype=jnp.int32))


def packed_completion_logprobs(model: Any, tokens: Array, attention_mask: Array, *, prompt_length: int,
                               pack_tokens: int, group_packs: int, chunk_size: int = 512, temperature: float = 1.0,
                               mesh: Mesh | None = None) -> tuple[Array, Array]:
    """``(logp [B, N], entropy [B, N])`` of the completion tokens ``tokens[:, P:]`` from packed forwards: the values
    of :func:`adrpo_jax.rl.step.completion_logprobs` (float32, 0 on padding) at a cost that follows the real tokens.
    Forward only (wrap in ``stop_gradient``; the update differentiates per group, ``make_packed_minibatch_update``)."""
    packed = pack_rows(tokens, attention_mask, prompt_length, pack_tokens, group_packs)
    logp, ent = packed_logprob_groups(model, packed, chunk_size=chunk_size, temperature=temperature, mesh=mesh)
    cmask = attention_mask[:, prompt_length:]
    return unpack_completions(logp, packed.dest, cmask), unpack_completions(ent, packed.dest, cmask)


def packed_token_fraction(attention_mask: Array, prompt_length: int, pack_tokens: int, group_packs: int) -> Array:
    """Real tokens / the token slots the packed groups that run hold (``[]`` float32): how full the packed forwards
    are (1 = no padding). Its padded counterpart is ``real / (B * (P + N))``."""
    _, length = row_spans(attention_mask, prompt_length)
    _, _, num = pack_plan(length, pack_tokens, -(-attention_mask.shape[0] // group_packs) * group_packs)
    groups = -(-num // group_packs)
    return jnp.sum(length).astype(jnp.float32) / jnp.maximum(groups * group_packs * pack_tokens, 1).astype(jnp.float32)


def make_packed_grad_fn(model_fn: Callable[[Any, Any], Any], loss_from_logp: Callable[..., tuple[Array, dict]],
                        *, prompt_length: int, chunk_size: int, temperature: float, mesh: Mesh | None = None,
                        forward_context: Callable[[], Any] = contextlib.nullcontext):
    """``fn(params, frozen, minibatch, packed, normalizer) -> ((loss, stacked metrics [G]), grads)``: the gradient
    of the minibatch loss as a sum over the pack groups (the groups past the used packs skipped: zero loss, zero
    gradient, the metrics of an empty micro-batch).

    ``model_fn(params, frozen) -> model``; ``loss_from_logp(logp [B, N], entropy [B, N], minibatch, normalizer) ->
    (loss, metrics)`` is the padded update's loss on the rows (:func:`adrpo_jax.rl.step.make_logp_loss_fn`); it
    sees the group's log-probs in the row layout and ``minibatch["loss_mask"]`` restricted to the group's rows.
    ``forward_context()`` wraps the model forward (the trainer's abstract mesh)."""

    def grad_fn(params, frozen, minibatch, packed: PackedRows, normalizer):
        m, t = packed.packs_per_group, packed.pack_tokens
        cmask = minibatch["attention_mask"][:, prompt_length:]
        group_of_row = packed.pack_id // m

        def group_loss(p, g):
            with forward_context():
                logp_g, ent_g = group_logprobs(model_fn(p, frozen), packed, g, chunk_size=chunk_size,
                                               temperature=temperature, mesh=mesh)
            base = g * m * t
            logp = unpack_completions(logp_g, packed.dest, cmask, base)
            ent = unpack_completions(ent_g, packed.dest, cmask, base)
            mb = dict(minibatch, loss_mask=minibatch["loss_mask"] & (group_of_row == g)[:, None])
            return loss_from_logp(logp, ent, mb, normalizer)

        value_and_grad = jax.value_and_grad(group_loss, has_aux=True)
        shapes = jax.eval_shape(value_and_grad, params, jnp.int32(0))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(grads, g):
            (loss, metrics), gr = jax.lax.cond(g * m < packed.num_packs, lambda: value_and_grad(params, g),
                                               lambda: zeros)
            return jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, gr), (loss, metrics)

        acc0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes[1])
        grads, (losses, stacked) = jax.lax.scan(body, acc0, jnp.arange(packed.groups, dtype=jnp.int32))
        grads = jax.tree.map(lambda a, s: a.astype(s.dtype), grads, shapes[1])
        return (jnp.sum(losses), stacked), grads

    return grad_fn
