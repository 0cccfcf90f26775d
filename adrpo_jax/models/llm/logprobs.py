"""Chunked per-token log-probs (and entropies) without materializing [B, T, V] float32 logits.

The hidden states [B, T, D] come from one forward pass; the output projection, the float32 log-softmax
and the gather of the chosen token run over chunks of time steps *within every row* (each chunk is
[B, c] positions, `c = max(1, chunk_size // b)` with b the rows of one device: B divided by the mesh's batch
axes, `chunk_width`) with `jax.lax.map`, each chunk under `jax.checkpoint`, so neither the forward nor the
backward pass holds more than one [b, c, V] float32 block of logits per device (plus its softmax) at a time.
Chunking over time keeps a batch-sharded [B, T, D] batch-sharded: each device projects
its own rows only (flattening [B, T] into chunks would cross the batch shards and make every device
all-gather and project the whole global batch).

`logits_to_keep=K` (TRL's name) projects only the last K positions onto the vocabulary (the completion of
a prompt + completion batch): the prompt's hidden states are still computed, its logits are not.

Alignment (convenient for RL where completions follow prompts): the full result has the shape of `tokens`,
`logp[:, t] = log p(tokens[:, t] | tokens[:, :t])` for t >= 1, and 0 at t = 0 and wherever `mask[:, t]` is
False. The log-probs of completion tokens of a prompt+completion batch are `logp[:, P:]`, or directly
`logits_to_keep=N` (result [B, N], the same values).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from adrpo_jax.models.llm.activation_sharding import (constrain_batch, constrain_vocab_parallel,
                                                       rows_per_device, vocab_parallel_axes)
from adrpo_jax.models.llm.modeling import projection

Array = jax.Array


def chunk_width(batch_size: int, n_positions: int, chunk_size: int, x: Array | None = None) -> int:
  """Positions per row in one log-prob chunk: `max(1, min(n_positions, chunk_size // rows))`, rows = the rows of
  one device (`batch_size` divided by the batch axes of the current mesh, or of `x`'s mesh, when they divide it),
  so each device projects about `chunk_size` positions per chunk whatever the data-parallel degree.

  >>> chunk_width(64, 1000, 512)  # one device holds all 64 rows
  8
  """
  return max(1, min(n_positions, chunk_size // rows_per_device(batch_size, x)))


def _check_logits_to_keep(logits_to_keep, t):
  if logits_to_keep is None:
    return t
  if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or not 1 <= logits_to_keep <= t:
    raise ValueError(f"logits_to_keep={logits_to_keep!r} must be an int in [1, T={t}] (or None for all positions)")
  return logits_to_keep


def logprobs_from_hidden(hidden: Array, tokens: Array, lm_head: Array, mask: Array | None = None, *,
                         chunk_size: int = 512, temperature: float = 1.0, return_entropy: bool = False,
                         logits_to_keep: int | None = None, logits_lora: Any = None):
  """Per-token log-probs from final hidden states, chunked over time within rows (see module doc).

  Args:
    hidden: [B, T, D] final-norm hidden states (any float dtype).
    tokens: [B, T] int token ids; hidden[:, t - 1] predicts tokens[:, t].
    lm_head: [D, V] output projection (`model.lm_head_matrix()`); logits = hidden @ lm_head with float32
      accumulation, divided by `temperature`.
    mask: [B, T] bool/0-1, True on real tokens (default all True). Output is 0 where False.
    chunk_size: token positions per chunk and device, as [B, c] with c = max(1, chunk_size // b) (every row, a
      few time steps; b = the rows of one device, `chunk_width`); memory per device ~ 2 * max(chunk_size, b) *
      V * 4 bytes.
    temperature: > 0, log-probs of softmax(logits / temperature) (must match the sampling temperature).
    return_entropy: also return the entropy (float32) of each predictive distribution.
    logits_to_keep: None (all T positions) or K in [1, T]: only the last K positions are projected onto
      the vocabulary and returned (TRL's `logits_to_keep`); equal to the full result's `[:, T - K:]`.
    logits_lora: None or `f(h [B, c, D], logits [B, c, V] float32) -> logits` applied to each chunk before the
      temperature (`CausalLM.lm_head_lora`: a LoRA adapter on lm_head adds s (dropout(h) A) B; its dropout
      key is folded with the chunk index, so chunks draw different masks).
  Returns:
    logp [B, T] (or [B, K]) float32 (see module doc for the alignment), or (logp, entropy).

  >>> h = jnp.zeros((1, 3, 2)); w = jnp.zeros((2, 4))  # uniform over 4 tokens
  >>> logprobs_from_hidden(h, jnp.array([[1, 2, 3]]), w).round(4).tolist()
  [[0.0, -1.3863, -1.3863]]
  >>> logprobs_from_hidden(h, jnp.array([[1, 2, 3]]), w, logits_to_keep=1).round(4).tolist()
  [[-1.3863]]
  """
  if hidden.ndim != 3:
    raise ValueError(f"hidden must be [batch, time, dim], got shape {hidden.shape}")
  b, t, d = hidden.shape
  if tokens.shape != (b, t):
    raise ValueError(f"tokens shape {tokens.shape} must be [batch, time] = {(b, t)}")
  if lm_head.ndim != 2 or lm_head.shape[0] != d:
    raise ValueError(f"lm_head must be [dim={d}, vocab], got shape {lm_head.shape}")
  if mask is not None and mask.shape != (b, t):
    raise ValueError(f"mask shape {mask.shape} must equal tokens shape {(b, t)}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0")
  k = _check_logits_to_keep(logits_to_keep, t)
  start = max(t - k, 1)  # first output column with a prediction (column 0 has none)
  n_t = t - start  # predicted columns
  if n_t == 0:
    zeros = jnp.zeros((b, k), jnp.float32)
    return (zeros, zeros) if return_entropy else zeros

  h = constrain_batch(hidden[:, start - 1:t - 1])  # [B, n_t, D]: only the positions that are kept
  y = tokens[:, start:t].astype(jnp.int32)
  c = chunk_width(b, n_t, chunk_size, h)
  n_chunks = -(-n_t // c)
  c = -(-n_t // n_chunks)  # the same number of chunks, as even as possible: < n_chunks padded positions (160
  pad = n_chunks * c - n_t  # positions at width 64 were 3 chunks of 64 = 32 padded; now 3 of 54, 2 padded)
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(y, ((0, 0), (0, pad)))
  inv_temperature = 1.0 / temperature

  @jax.checkpoint
  def chunk(h_c, y_c, w, i):  # [B, c, D], [B, c], [D, V], chunk index
    vocab = vocab_parallel_axes(b, h_c.shape[1], w.shape[1], h_c)
    if vocab:  # fsdp: V sharded, rows gathered over fsdp (never a whole [D, V] weight or gradient per device)
      h_c, w = constrain_vocab_parallel(h_c, w, vocab)
    else:
      h_c = constrain_batch(h_c)
    logits = projection("bcd,dv->bcv", h_c, w.astype(h_c.dtype), jnp.float32)  # (its kernel gradient: modeling)
    if logits_lora is not None:
      from adrpo_jax.models.lora import lora_dropout_fold_in  # pylint: disable=import-outside-toplevel
      with lora_dropout_fold_in(i):
        logits = logits_lora(h_c, logits)
    logits = logits * inv_temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    if vocab:  # a select + sum over the sharded vocabulary (a gather along it would all-gather the logits)
      hit = jnp.arange(logits.shape[-1], dtype=jnp.int32) == y_c[..., None]
      chosen = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    else:
      chosen = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
    logp = chosen - lse
    if not return_entropy:
      return logp, None
    probs = jnp.exp(logits - lse[..., None])
    return logp, lse - jnp.sum(probs * logits, axis=-1)

  if n_chunks == 1:
    logp, ent = chunk(h, y, lm_head, jnp.int32(0))
  else:  # [n_chunks, B, c, ...]: the batch axis stays an axis of its own (and keeps its sharding)
    hs = jnp.swapaxes(h.reshape(b, n_chunks, c, d), 0, 1)
    ys = jnp.swapaxes(y.reshape(b, n_chunks, c), 0, 1)
    logp, ent = jax.lax.map(lambda xs: chunk(xs[0], xs[1], lm_head, xs[2]),
                            (hs, ys, jnp.arange(n_chunks, dtype=jnp.int32)))
    logp = jnp.swapaxes(logp, 0, 1).reshape(b, n_chunks * c)
    ent = None if ent is None else jnp.swapaxes(ent, 0, 1).reshape(b, n_chunks * c)

  def finish(x):
    x = x[:, :n_t]
    if k > n_t:  # column 0 (no prediction) is kept: 0
      x = jnp.concatenate([jnp.zeros((b, k - n_t), jnp.float32), x], axis=1)
    return x if mask is None else jnp.where(mask[:, t - k:].astype(bool), x, 0.0)

  if return_entropy:
    return finish(logp), finish(ent)
  return finish(logp)


def token_logprobs(model: Any, tokens: Array, mask: Array | None = None, *, positions: Array | None = None,
                   chunk_size: int = 512, return_entropy: bool = False, temperature: float = 1.0,
                   logits_to_keep: int | None = None, embeds: Array | None = None,
                   expert_indices: Array | None = None, return_routing: bool = False):
  """log p(tokens[:, t] | tokens[:, :t]) for every position, float32 [B, T], chunked (see module doc).

  Args:
    model: a `CausalLM`, or a `(graphdef, state)` pair (merged here; works inside `jax.jit`).
    tokens: [B, T] int ids, e.g. `GenerationOutput.tokens` (left-padded prompt + completion).
    mask: [B, T] bool attention mask (False on padding), e.g. `GenerationOutput.attention_mask`. Padding
      is never attended to and gets log-prob 0.
    positions: [B, T] rotary positions (default `positions_from_mask(mask)`).
    chunk_size, temperature, return_entropy, logits_to_keep: see `logprobs_from_hidden`
      (`logits_to_keep=N`: the last N positions only, e.g. the completion; the prompt is not projected).
    embeds: optional [B, T, D] input embeddings instead of the token embeddings (see `CausalLM.hidden_states`);
      the scored ids are still `tokens`.
    expert_indices: MoE models: [B, T, L_moe, k] experts to route with (router replay, e.g. the rollout's
      `GenerationOutput.expert_indices`); None routes with the current router.
    return_routing: also return the sparse layers' routing (`moe.MoEAux` stacked over them; None for a dense
      model): `(result, routing)`.
  Returns:
    logp [B, T] (or [B, N]) float32 (0 at t = 0 and on padding), or (logp, entropy) with `return_entropy`.
  Differentiable w.r.t. the model parameters.
  """
  if isinstance(model, tuple):
    if len(model) != 2:
      raise ValueError("model must be a CausalLM or a (graphdef, state) pair")
    model = nnx.merge(*model)
  tokens = jnp.asarray(tokens)
  mask = None if mask is None else jnp.asarray(mask, bool)
  kw = {} if expert_indices is None else {"expert_indices": expert_indices}
  if return_routing:
    hidden, routing = model.forward_with_routing(tokens, positions=positions, attention_mask=mask, embeds=embeds, **kw)
  else:
    hidden = model.hidden_states(tokens, positions=positions, attention_mask=mask, embeds=embeds, **kw)
  out = logprobs_from_hidden(hidden, tokens, model.lm_head_matrix(), mask, chunk_size=chunk_size,
                             temperature=temperature, return_entropy=return_entropy,
                             logits_to_keep=logits_to_keep, logits_lora=getattr(model, "lm_head_lora", None))
  return (out, routing) if return_routing else out
