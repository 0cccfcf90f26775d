"""Chunked per-token log-probs (and entropies) without materializing [B, T, V] float32 logits.

The hidden states [B, T, D] come from one forward pass; the output projection, the float32 log-softmax
and the gather of the chosen token run over chunks of `chunk_size` token positions (flattened over batch
and time) with `jax.lax.map`, each chunk under `jax.checkpoint`, so neither the forward nor the backward
pass holds more than one [chunk_size, V] float32 block of logits (plus its softmax) at a time.

Alignment (convenient for RL where completions follow prompts): the result has the shape of `tokens`,
`logp[:, t] = log p(tokens[:, t] | tokens[:, :t])` for t >= 1, and 0 at t = 0 and wherever `mask[:, t]` is
False. The log-probs of completion tokens of a prompt+completion batch are `logp[:, P:]`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def logprobs_from_hidden(hidden: Array, tokens: Array, lm_head: Array, mask: Array | None = None, *,
                         chunk_size: int = 512, temperature: float = 1.0, return_entropy: bool = False):
  """Per-token log-probs from final hidden states, chunked over token positions.

  Args:
    hidden: [B, T, D] final-norm hidden states (any float dtype).
    tokens: [B, T] int token ids; hidden[:, t - 1] predicts tokens[:, t].
    lm_head: [D, V] output projection (`model.lm_head_matrix()`); logits = hidden @ lm_head with float32
      accumulation, divided by `temperature`.
    mask: [B, T] bool/0-1, True on real tokens (default all True). Output is 0 where False.
    chunk_size: token positions (over B * (T - 1)) per chunk; memory ~ 2 * chunk_size * V * 4 bytes.
    temperature: > 0, log-probs of softmax(logits / temperature) (must match the sampling temperature).
    return_entropy: also return the entropy [B, T] (float32) of each predictive distribution.
  Returns:
    logp [B, T] float32 (see module doc for the alignment), or (logp, entropy).

  >>> h = jnp.zeros((1, 3, 2)); w = jnp.zeros((2, 4))  # uniform over 4 tokens
  >>> logprobs_from_hidden(h, jnp.array([[1, 2, 3]]), w).round(4).tolist()
  [[0.0, -1.3863, -1.3863]]
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
  zeros = jnp.zeros((b, t), jnp.float32)
  if t < 2:
    return (zeros, zeros) if return_entropy else zeros

  n = b * (t - 1)
  flat_h = hidden[:, :-1].reshape(n, d)
  flat_y = tokens[:, 1:].reshape(n).astype(jnp.int32)
  c = min(chunk_size, n)
  n_chunks = -(-n // c)
  pad = n_chunks * c - n
  if pad:
    flat_h = jnp.pad(flat_h, ((0, pad), (0, 0)))
    flat_y = jnp.pad(flat_y, (0, pad))
  inv_temperature = 1.0 / temperature

  @jax.checkpoint
  def chunk(h_c, y_c, w):
    logits = jnp.einsum("cd,dv->cv", h_c, w.astype(h_c.dtype), preferred_element_type=jnp.float32)
    logits = logits * inv_temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
    logp = chosen - lse
    if not return_entropy:
      return logp, None
    probs = jnp.exp(logits - lse[:, None])
    return logp, lse - jnp.sum(probs * logits, axis=-1)

  if n_chunks == 1:
    logp, ent = chunk(flat_h, flat_y, lm_head)
  else:
    logp, ent = jax.lax.map(lambda xs: chunk(xs[0], xs[1], lm_head),
                            (flat_h.reshape(n_chunks, c, d), flat_y.reshape(n_chunks, c)))

  def finish(x):
    x = x.reshape(-1)[:n].reshape(b, t - 1)
    x = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), x], axis=1)
    return x if mask is None else jnp.where(mask.astype(bool), x, 0.0)

  if return_entropy:
    return finish(logp), finish(ent)
  return finish(logp)


def token_logprobs(model: Any, tokens: Array, mask: Array | None = None, *, positions: Array | None = None,
                   chunk_size: int = 512, return_entropy: bool = False, temperature: float = 1.0):
  """log p(tokens[:, t] | tokens[:, :t]) for every position, float32 [B, T], chunked (see module doc).

  Args:
    model: a `CausalLM`, or a `(graphdef, state)` pair (merged here; works inside `jax.jit`).
    tokens: [B, T] int ids, e.g. `GenerationOutput.tokens` (left-padded prompt + completion).
    mask: [B, T] bool attention mask (False on padding), e.g. `GenerationOutput.attention_mask`. Padding
      is never attended to and gets log-prob 0.
    positions: [B, T] rotary positions (default `positions_from_mask(mask)`).
    chunk_size, temperature, return_entropy: see `logprobs_from_hidden`.
  Returns:
    logp [B, T] float32 (0 at t = 0 and on padding), or (logp, entropy) with `return_entropy`.
  Differentiable w.r.t. the model parameters.
  """
  if isinstance(model, tuple):
    if len(model) != 2:
      raise ValueError("model must be a CausalLM or a (graphdef, state) pair")
    model = nnx.merge(*model)
  tokens = jnp.asarray(tokens)
  mask = None if mask is None else jnp.asarray(mask, bool)
  hidden = model.hidden_states(tokens, positions=positions, attention_mask=mask)
  return logprobs_from_hidden(hidden, tokens, model.lm_head_matrix(), mask, chunk_size=chunk_size,
                              temperature=temperature, return_entropy=return_entropy)
