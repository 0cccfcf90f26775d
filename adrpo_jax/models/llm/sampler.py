"""Jitted, KV-cached autoregressive sampling for a batch of left-padded prompts.

One call = a prefill of all prompts (one forward over [B, P]) + a `jax.lax.while_loop` of single-token
decode steps that stops as soon as every row is done, so one compilation serves every step. The KV cache
is a plain pytree (`KVCache`) of length P + max_new_tokens.

Log-probs returned with the samples (`GenerationOutput.logprobs`) are float32
`log_softmax(logits / temperature)[token]` over the *full* vocabulary, i.e. after temperature scaling and
*before* top-k / top-p truncation (what TRL uses for the old-policy log-probs). This is exactly what
`token_logprobs(model, out.tokens, out.attention_mask, temperature=temperature)` recomputes, so the
on-policy importance ratio is 1. With `greedy=True` they are computed the same way.

Sampling does not sort the vocabulary: top-k / top-p find their thresholds with `lax.top_k` over at most 256
candidates or by exact bisection over the float order (`process_logits`, the same token sets as the sorted
definition `process_logits_reference`), and the draw is an inverse CDF with two uniforms per row
(`sample_inverse_cdf`). `SamplingConfig(sampler="reference")` keeps the sorted / Gumbel path. With
`prompt_group_size=G` (GRPO's G completions per prompt) each prompt is prefilled once for its G rows.

Two entry points:
  * `generate(model, prompt_tokens, prompt_mask, ...)`: convenience; jits once per
    (graphdef, SamplingConfig, shapes) and reuses the compiled function across calls.
  * `make_generate_fn(graphdef, config)`: the pure function `(state, prompt_tokens, prompt_mask, rng) ->
    GenerationOutput` for trainers that `jax.jit` it themselves (with shardings / donation).

`rng` is one key (split once per decode step for the whole batch) or one key per row ([B] keys): token i of row
r is then drawn with `fold_in(rng[r], i)`, a function of the row's own key only (the continuous-batching engine,
`adrpo_jax.models.llm.continuous`, gives the same tokens for the same per-row keys).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from adrpo_jax.models.llm.modeling import CausalLM, KVCache, StackedDecoderLayers, positions_from_mask, unroll_fits

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling options (hashable: one compilation per distinct config and shape).

  Attributes:
    max_new_tokens: N, completion length budget (>= 1).
    temperature: > 0; logits are divided by it before top-k / top-p / sampling.
    top_k: keep the k most likely tokens (None = all).
    top_p: nucleus sampling, keep the smallest prefix of sorted tokens whose probability mass reaches
      top_p (at least one token), applied after top_k (None or 1.0 = off).
    greedy: argmax decoding (temperature, top_k, top_p then only affect the returned log-probs).
    eos_token_ids: ids that end a row (EOS / stop tokens); the stop token itself is part of the completion.
    pad_token_id: written after a row is done (completion_mask is False there).
    cache_dtype: KV-cache dtype (None = the model's compute dtype).
    prompt_group_size: G >= 1: the rows come in consecutive groups of G rows with the *same* prompt (GRPO's
      G completions per prompt, rows r // G of one prompt); each group's prompt is prefilled once and its KV
      cache repeated to the G rows. The batch must be a multiple of G; the rows of a group are not checked
      inside a jitted function (`generate` checks them).
    sampler: "fast" (top-k / top-p without sorting the vocabulary, inverse-CDF draw) or "reference" (the
      sorted definition and one Gumbel per vocabulary entry; same distribution, slower, for tests/benchmarks).
    unroll_layers: how a model with stacked layers (`DecoderConfig.scan_layers=True`) runs its layers while
      sampling: True = unrolled over per-layer weights sliced once per call (`CausalLM.unstacked`, one transient
      copy of the layer weights), False = the layer `lax.scan` (whose body copies every layer's weights out of
      the stack at every decode step), None (auto) = unrolled when the model has at most
      `modeling.AUTO_UNROLL_MAX_LAYERS` layers and `AUTO_UNROLL_MAX_BYTES` of layer weights (deep models keep
      the scan's compile time). Same tokens and log-probs either way. List-layout models always run unrolled.
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  greedy: bool = False
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0
  cache_dtype: str | None = None
  prompt_group_size: int = 1
  sampler: str = "fast"
  unroll_layers: bool | None = None

  def __post_init__(self):
    if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
    if not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature} must be > 0 (use greedy=True for argmax decoding)")
    if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1):
      raise ValueError(f"top_k={self.top_k!r} must be None or an int >= 1")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if not isinstance(self.prompt_group_size, (int, np.integer)) or self.prompt_group_size < 1:
      raise ValueError(f"prompt_group_size={self.prompt_group_size!r} must be an int >= 1")
    if self.sampler not in ("fast", "reference"):
      raise ValueError(f"sampler={self.sampler!r} must be 'fast' or 'reference'")
    if self.unroll_layers is not None and not isinstance(self.unroll_layers, (bool, np.bool_)):
      raise ValueError(f"unroll_layers={self.unroll_layers!r} must be True, False or None (auto)")
    if self.unroll_layers is not None:
      object.__setattr__(self, "unroll_layers", bool(self.unroll_layers))
    object.__setattr__(self, "prompt_group_size", int(self.prompt_group_size))
    eos = self.eos_token_ids
    eos = () if eos is None else ((int(eos),) if isinstance(eos, (int, np.integer)) else tuple(int(e) for e in eos))
    object.__setattr__(self, "eos_token_ids", eos)
    object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
    object.__setattr__(self, "temperature", float(self.temperature))
    if self.cache_dtype is not None:
      object.__setattr__(self, "cache_dtype", jnp.dtype(self.cache_dtype).name)


def decode_unrolled(model: CausalLM, config: SamplingConfig) -> bool:
  """Whether `generate` runs the layers of `model` unrolled (`SamplingConfig.unroll_layers`; None: the size rule
  `modeling.unroll_fits`, for scan_layers=True and 'auto' alike; a list-layout model always is)."""
  if not isinstance(model.layers, StackedDecoderLayers):
    return True
  if config.unroll_layers is not None:
    return config.unroll_layers
  return unroll_fits(model)


@flax.struct.dataclass
class GenerationOutput:
  """Result of `generate` (B rows, P prompt slots, N = max_new_tokens).

  Attributes:
    tokens: [B, P + N] int32, the prompt (as given, left-padded) followed by the completion.
    attention_mask: [B, P + N] bool, prompt_mask followed by completion_mask: feed it (with `tokens`) to
      `token_logprobs` / the model; `positions_from_mask(attention_mask)` are the positions used here.
    completions: [B, N] int32, sampled tokens, `pad_token_id` after a row is done.
    completion_mask: [B, N] bool, True up to and including the stop token.
    logprobs: [B, N] float32 sampling log-probs (see module doc), 0 where completion_mask is False.
    lengths: [B] int32, number of completion tokens (sum of completion_mask).
    done: [B] bool, the row ended with a stop token (False: truncated at max_new_tokens).
    expert_indices: mixture-of-experts models: [B, P + N, L_moe, k] (uint8 for <= 256 experts) the experts each
      prompt and completion token was routed to in each sparse layer (router replay: give it back to
      `token_logprobs(..., expert_indices=)` / the model); the last completion slot, never fed back, and slots
      after a row's end hold 0 (harmless: no scored token depends on them). None for dense models.
  """

  tokens: Array
  attention_mask: Array
  completions: Array
  completion_mask: Array
  logprobs: Array
  lengths: Array
  done: Array
  expert_indices: Array | None = None


def process_logits_reference(logits: Array, *, temperature: float = 1.0, top_k: int | None = None,
                             top_p: float | None = None) -> Array:
  """The sorted definition of `process_logits` (sorts the vocabulary for top-p); kept for tests and benchmarks.

  Temperature, then top-k (the k largest values, ties with the k-th included: transformers' `TopKLogitsWarper`),
  then top-p as transformers' `TopPLogitsWarper`: sort ascending (stably: equal values in index order), remove
  the tokens whose cumulative probability is <= 1 - top_p, always keep the last (most likely) one.
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    order = jnp.argsort(logits, axis=-1, stable=True)
    sorted_asc = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_asc, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - top_p).at[:, -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def _ordered_keys(x: Array) -> Array:
  """int32 keys with the order of the float32 values (-0.0 == +0.0; -inf lowest): x < y <=> key(x) < key(y)."""
  x = jnp.where(x == 0, jnp.float32(0), x)
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _bisect_keys(lo: Array, hi: Array, ok) -> Array:
  """The smallest int32 t in [lo, hi] ([B] each) with ok(t) True, for ok monotone (False...False True...True)
  and ok(hi) True. Bisection on the integers, exact (the keys are the float values' order, no tolerance): 32
  rounds of one pass over the row each halve any int32 interval to one point. A fixed count, not a loop on
  "any row unfinished": with the rows sharded, that test would be a cross-device reduction every round."""

  def body(_, c):
    lo, hi = c
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
    good = ok(mid)
    return jnp.where(good, lo, mid + 1), jnp.where(good, mid, hi)

  return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def process_logits(logits: Array, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> Array:
  """Temperature, then top-k, then top-p: float32 [B, V] logits with removed tokens at -inf.

  Keeps exactly the token sets of the sorted definition (`process_logits_reference`, transformers' warpers)
  without sorting the vocabulary (nor `lax.top_k`, a partial sort that is as slow as a sort on CPU): top-k
  finds the k-th largest value by bisection over the float order (ties with it kept, as transformers);
  top-p keeps a token iff the mass after it in the ascending (value, index) order is < top_p, i.e. iff the
  cumulative probability of transformers' ascending sort at it is > 1 - top_p: the threshold value (the
  smallest whose strictly-larger mass is < top_p) by bisection, then, of the tokens *equal* to it, the
  highest-index ones while that mass stays < top_p. So the kept set has transformers' size; among tokens of
  exactly equal probability at the threshold (common with bfloat16 logits) the kept ones are those a stable
  sort keeps (transformers' own `torch.sort` is not stable there, so which of the equal tokens it keeps is
  arbitrary). One pass over the vocabulary per bisection round (at most 32) and two more for the ties.
  Only the float rounding of the mass sums differs from the sorted definition (a token whose mass-before lies
  within float32 rounding of top_p may fall on the other side).

  >>> l = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  >>> jnp.isfinite(process_logits(l, top_p=0.7)).tolist()
  [[True, True, False, False]]
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    # The k-th largest value: the smallest t with #{x > t} < k (ties with it are kept).
    keys = _ordered_keys(logits)
    kth = _bisect_keys(jnp.min(keys, -1), jnp.max(keys, -1), lambda t: jnp.sum(keys > t[:, None], -1) < top_k)
    logits = jnp.where(keys < kth[:, None], -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    keys = _ordered_keys(logits)
    weights = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))  # 0 at -inf
    budget = top_p * jnp.sum(weights, -1)
    lo = jnp.min(jnp.where(jnp.isfinite(logits), keys, jnp.iinfo(jnp.int32).max), -1)
    # The smallest value whose strictly-larger mass is < top_p: every token above it is kept, every one below
    # removed.
    threshold = _bisect_keys(lo, jnp.max(keys, -1),
                             lambda t: jnp.sum(jnp.where(keys > t[:, None], weights, 0.0), -1) < budget)
    above = keys > threshold[:, None]
    tie = keys == threshold[:, None]
    mass_above = jnp.sum(jnp.where(above, weights, 0.0), -1, keepdims=True)
    w_tie = jnp.max(jnp.where(tie, weights, 0.0), -1, keepdims=True)  # the (equal) weight of the tied tokens
    # Of the tokens equal to the threshold, keep those whose mass after them (above + the tied tokens of
    # higher index) is < top_p: the highest-index ones, at least one.
    tied_after = jnp.cumsum(tie[:, ::-1].astype(jnp.int32), axis=-1)[:, ::-1] - tie.astype(jnp.int32)
    keep = above | (tie & (mass_above + tied_after.astype(jnp.float32) * w_tie < budget[:, None]))
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def _block_size(v: int) -> int:
  c = 128
  while c * c < v:
    c *= 2
  return c


def is_key_batch(rng: Array, batch_size: int) -> bool:
  """True when `rng` holds one PRNG key per row ([B] typed keys or [B, 2] raw uint32 keys), False for one key."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.shape == (batch_size,)
  return rng.ndim == 2 and rng.shape[0] == batch_size


def step_keys(rng: Array, step) -> Array:
  """The keys of decode step `step` from per-row keys: `fold_in(key_r, step)` for every row (per-row keys)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(rng)


def sample_inverse_cdf(rng: Array, logits: Array) -> Array:
  """One categorical draw per row of softmax(logits) [B, V] (-inf = excluded), by inverse CDF: [B] int32.

  Two levels of blocks of C ~ sqrt(V) tokens: a uniform picks a block from the cumulative block masses, a
  second uniform picks a token inside that block from its cumulative masses (float32 cumsums of <= ~sqrt(V)
  terms, so small probabilities keep their resolution). Two uniforms per row instead of one Gumbel per
  vocabulary entry. Both picks are clamped to the last entry with positive mass, so a removed token is never
  returned (rounding can only make the target reach the total mass, never pass a positive entry).
  `rng`: one key, or one key per row ([B] keys, `is_key_batch`): row r's uniforms then come from its own key.
  """
  b, v = logits.shape
  c = _block_size(v)
  nb = -(-v // c)
  w = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
  w = jnp.pad(w, ((0, 0), (0, nb * c - v))).reshape(b, nb, c)
  if is_key_batch(rng, b):  # one key per row (per-row keys): each row's draw depends on its own key only
    u = jax.vmap(lambda k: jax.random.uniform(k, (2,), jnp.float32))(rng)
  else:
    u = jax.random.uniform(rng, (b, 2), jnp.float32)

  def pick(weights, u):  # [B, n] weights >= 0 (some > 0), [B] uniform in [0, 1) -> [B] index
    cdf = jnp.cumsum(weights, axis=-1)
    target = u[:, None] * cdf[:, -1:]
    idx = jnp.sum(cdf <= target, axis=-1)
    n = weights.shape[-1]
    last = n - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
    return jnp.minimum(idx, last)

  block = pick(jnp.sum(w, -1), u[:, 0])
  inner = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0]
  token = block * c + pick(inner, u[:, 1])
  return token.astype(jnp.int32)


def _select_reference(logits: Array, rng: Array, config: "SamplingConfig") -> tuple[Array, Array]:
  """The previous `_select`: sorted top-p, one Gumbel per vocabulary entry."""
  logits = logits.astype(jnp.float32)
  scaled = logits / config.temperature
  if config.greedy:
    token = jnp.argmax(logits, axis=-1)
  else:
    processed = process_logits_reference(logits, temperature=config.temperature, top_k=config.top_k,
                                          top_p=config.top_p)
    if is_key_batch(rng, logits.shape[0]):
      token = jax.vmap(lambda k, x: jax.random.categorical(k, x, axis=-1))(rng, processed)
    else:
      token = jax.random.categorical(rng, processed, axis=-1)
  logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
  return token.astype(jnp.int32), logp


def _select(logits: Array, rng: Array, config: "SamplingConfig") -> tuple[Array, Array]:
  """Next tokens [B] int32 and their float32 log-probs under log_softmax(logits / temperature)."""
  if config.sampler == "reference":
    return _select_reference(logits, rng, config)
  logits = logits.astype(jnp.float32)
  scaled = logits / config.temperature
  if config.greedy:  # argmax (first index of the maximum) as two plain reductions, cheaper than a variadic one
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    top = jnp.max(logits, axis=-1, keepdims=True)
    token = jnp.min(jnp.where(logits == top, iota, logits.shape[-1]), axis=-1)
    token = jnp.minimum(token, logits.shape[-1] - 1)  # all-NaN rows: index V-1 instead of out of range
  else:
    processed = process_logits(logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    token = sample_inverse_cdf(rng, processed)
  # log_softmax(scaled)[token] without materializing the [B, V] log-softmax.
  logp = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(scaled, axis=-1)
  return token, logp


def _last_logits(model: CausalLM, hidden: Array) -> Array:
  """float32 logits [B, V] of hidden [B, D] (the output matmul accumulates in float32)."""
  w = model.lm_head_matrix()
  hidden = hidden.astype(model.config.dtype)
  return model.lm_head_lora(hidden, jnp.einsum("bd,dv->bv", hidden, w.astype(model.config.dtype),
                                               preferred_element_type=jnp.float32))


def repeat_cache_rows(cache: KVCache, g: int) -> KVCache:
  """Each row of a KV cache repeated g times (rows [0]*g + [1]*g + ...), for any cache layout.

  The batch axis of each leaf is found from its rank: scalars (the write index) are shared, [B] / [B, S] leaves
  (next positions, slot mask) repeat axis 0, key/value leaves repeat axis ndim - 4 ([B, K, S, hd] per-layer
  arrays: 0; stacked [L, B, K, S, hd]: 1).
  """
  if g == 1:
    return cache
  b = cache.mask.shape[0]

  def rep(x):
    if x.ndim == 0:
      return x
    axis = x.ndim - 4 if x.ndim >= 4 else 0
    if x.shape[axis] != b:
      raise ValueError(f"cache leaf of shape {x.shape} has no batch axis of size {b} at axis {axis}")
    return jnp.repeat(x, g, axis=axis)

  return jax.tree.map(rep, cache)


def _routing_record(routing, dtype) -> Array:
  """[L_moe, B, T, k] routing of the stacked sparse layers -> the [B, T, L_moe, k] record in `dtype`."""
  return jnp.moveaxis(routing.expert_indices, 0, 2).astype(dtype)


def _prefill(model: CausalLM, prompt_tokens: Array, prompt_mask: Array, max_length: int,
             config: SamplingConfig, prompt_embeds: Array | None = None, with_routing: bool = False):
  """float32 logits [B, V] of the next token after each prompt, and the filled cache of B rows (and with
  `with_routing` the prompt's routing record [B, P, L_moe, k] of an MoE model)."""
  b = prompt_tokens.shape[0]
  g = config.prompt_group_size
  if b % g:
    raise ValueError(f"batch size {b} is not a multiple of prompt_group_size={g}")
  if g > 1:  # one row per group: the prompts of a group are equal
    prompt_tokens = prompt_tokens.reshape(b // g, g, -1)[:, 0]
    prompt_mask = prompt_mask.reshape(b // g, g, -1)[:, 0]
    if prompt_embeds is not None:
      prompt_embeds = prompt_embeds.reshape(b // g, g, *prompt_embeds.shape[1:])[:, 0]
  cache = model.init_cache(b // g, max_length, config.cache_dtype)
  # Left padding puts every row's last prompt token in the last column.
  (hidden, cache), routing = model.forward_with_routing(
      prompt_tokens, positions=positions_from_mask(prompt_mask), attention_mask=prompt_mask, cache=cache,
      embeds=prompt_embeds)
  logits = _last_logits(model, hidden[:, -1])
  if g > 1:
    logits = jnp.repeat(logits, g, axis=0)
    cache = repeat_cache_rows(cache, g)
  if not with_routing:
    return logits, cache
  record = _routing_record(routing, _record_dtype(model))
  return logits, cache, (jnp.repeat(record, g, axis=0) if g > 1 else record)


def _record_dtype(model: CausalLM):
  from adrpo_jax.models.llm.moe import np_dtype_for  # pylint: disable=import-outside-toplevel

  return jnp.dtype(np_dtype_for(model.config.num_experts))


def _generate(model: CausalLM, prompt_tokens: Array, prompt_mask: Array, rng: Array,
              config: SamplingConfig, prompt_embeds: Array | None = None) -> GenerationOutput:
  b, p = prompt_tokens.shape
  n = config.max_new_tokens
  prompt_tokens = prompt_tokens.astype(jnp.int32)
  prompt_mask = prompt_mask.astype(bool)
  eos = jnp.asarray(config.eos_token_ids or (-1,), jnp.int32)
  if prompt_embeds is not None and tuple(prompt_embeds.shape[:2]) != (b, p):
    raise ValueError(f"prompt_embeds must be [batch, prompt_len, hidden] with [batch, prompt_len] = {(b, p)}, got "
                     f"shape {tuple(prompt_embeds.shape)}")
  if decode_unrolled(model, config):  # per-layer weights sliced here, once: the decode loop reads them in place
    model = model.unstacked()
  record = model.config.num_moe_layers > 0  # MoE: record every token's experts (router replay)
  if record:
    logits, cache, prompt_routing = _prefill(model, prompt_tokens, prompt_mask, p + n, config, prompt_embeds,
                                             with_routing=True)
    routing = jnp.zeros((b, n) + prompt_routing.shape[2:], prompt_routing.dtype)
  else:
    logits, cache = _prefill(model, prompt_tokens, prompt_mask, p + n, config, prompt_embeds)
    routing = None
  per_row = is_key_batch(rng, b)  # per-row keys: token i of row r is drawn with fold_in(key_r, i)
  if per_row:
    step_rng = step_keys(rng, 0)
  else:
    rng, step_rng = jax.random.split(rng)
  token, logp = _select(logits, step_rng, config)
  done = jnp.isin(token, eos)
  completions = jnp.full((b, n), config.pad_token_id, jnp.int32).at[:, 0].set(token)
  logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp)
  valid = jnp.zeros((b, n), bool).at[:, 0].set(True)
  graphdef, state = nnx.split(model)

  def cond(carry):
    i, done = carry[0], carry[5]
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, token, cache, completions, logprobs, done, valid, rng, routing = carry
    step_model = nnx.merge(graphdef, state)
    # Feed the previous token (rows already done feed padding that nothing attends to).
    (hidden, cache), step_routing = step_model.forward_with_routing(token[:, None], attention_mask=~done[:, None],
                                                                    cache=cache)
    if routing is not None:  # the fed token is completion i - 1
      routing = jax.lax.dynamic_update_slice(routing, _routing_record(step_routing, routing.dtype), (0, i - 1, 0, 0))
    if per_row:
      step_rng = step_keys(rng, i)
    else:
      rng, step_rng = jax.random.split(rng)
    new, logp = _select(_last_logits(step_model, hidden[:, 0]), step_rng, config)
    new = jnp.where(done, config.pad_token_id, new)
    logp = jnp.where(done, 0.0, logp)
    completions = jax.lax.dynamic_update_slice(completions, new[:, None], (0, i))
    logprobs = jax.lax.dynamic_update_slice(logprobs, logp[:, None], (0, i))
    valid = jax.lax.dynamic_update_slice(valid, ~done[:, None], (0, i))
    done = done | jnp.isin(new, eos)
    return i + 1, new, cache, completions, logprobs, done, valid, rng, routing

  carry = (jnp.ones((), jnp.int32), token, cache, completions, logprobs, done, valid, rng, routing)
  _, _, _, completions, logprobs, done, valid, _, routing = jax.lax.while_loop(cond, body, carry)
  return GenerationOutput(
      tokens=jnp.concatenate([prompt_tokens, completions], axis=1),
      attention_mask=jnp.concatenate([prompt_mask, valid], axis=1),
      completions=completions,
      completion_mask=valid,
      logprobs=logprobs,
      lengths=jnp.sum(valid, axis=1, dtype=jnp.int32),
      done=done,
      expert_indices=None if routing is None else jnp.concatenate([prompt_routing, routing], axis=1),
  )


def make_generate_fn(graphdef: nnx.GraphDef, config: SamplingConfig, mesh: Mesh | None = None):
  """Pure `fn(state, prompt_tokens [B,P], prompt_mask [B,P], rng, prompt_embeds=None) -> GenerationOutput`.

  Not jitted. `prompt_embeds` [B, P, D]: input embeddings of the prompt (multimodal prefill, e.g. audio spliced
  in); the decode steps embed the sampled tokens. Omitted, the program is the text-only one.

  `graphdef, state = nnx.split(model)`; jit it yourself, e.g. `jax.jit(fn, in_shardings=...)`. With a `mesh`
  the function traces under it as the abstract mesh, so the activations stay sharded over the mesh's batch
  axes (`activation_sharding`; the KV cache follows them): without it, on an `fsdp` mesh GSPMD follows the
  embedding table's sharding and runs every row on every device.
  """
  if not isinstance(config, SamplingConfig):
    raise ValueError(f"config must be a SamplingConfig, got {type(config).__name__}")
  if mesh is not None and not isinstance(mesh, (Mesh, AbstractMesh)):
    raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
  abstract = None if mesh is None else (mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh)

  def generate_fn(state, prompt_tokens, prompt_mask, rng, prompt_embeds=None):
    with contextlib.nullcontext() if abstract is None else jax.sharding.use_abstract_mesh(abstract):
      return _generate(nnx.merge(graphdef, state), prompt_tokens, prompt_mask, rng, config, prompt_embeds)

  return generate_fn


@functools.lru_cache(maxsize=64)
def _jitted_generate(graphdef: nnx.GraphDef, config: SamplingConfig):
  return jax.jit(make_generate_fn(graphdef, config))


def _check_prompts(prompt_tokens, prompt_mask):
  if prompt_tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must be [batch, prompt_len], got shape {prompt_tokens.shape}")
  if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
    raise ValueError(f"prompt_tokens must be integers, got dtype {prompt_tokens.dtype}")
  if prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompt_tokens shape {prompt_tokens.shape}")
  if isinstance(prompt_mask, jax.core.Tracer):
    return
  mask = np.asarray(prompt_mask).astype(bool)
  if not mask[:, -1].all():
    rows = np.nonzero(~mask[:, -1])[0].tolist()
    raise ValueError(f"prompt_mask must be left-padded (last column all True); rows {rows} end with padding")
  if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
    raise ValueError("prompt_mask must be left-padded: padding (False) only before the first real token")


def _check_groups(prompt_tokens, prompt_mask, g: int):
  b = prompt_tokens.shape[0]
  if b % g:
    raise ValueError(f"batch size {b} is not a multiple of prompt_group_size={g}")
  if g == 1 or isinstance(prompt_tokens, jax.core.Tracer) or isinstance(prompt_mask, jax.core.Tracer):
    return
  t = np.asarray(prompt_tokens).reshape(b // g, g, -1)
  m = np.asarray(prompt_mask).reshape(b // g, g, -1)
  bad = np.nonzero(((t != t[:, :1]) & m).any((1, 2)) | (m != m[:, :1]).any((1, 2)))[0]
  if len(bad):
    raise ValueError(f"prompt_group_size={g}: the rows of groups {bad.tolist()} do not hold the same prompt")


def generate(model: CausalLM, prompt_tokens: Array, prompt_mask: Array | None = None, *, rng: Array | None = None,
             max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             greedy: bool = False, eos_token_ids: Any = (), pad_token_id: int = 0,
             cache_dtype: Any = None, prompt_group_size: int = 1, sampler: str = "fast",
             prompt_embeds: Array | None = None, unroll_layers: bool | None = None) -> GenerationOutput:
  """Samples up to `max_new_tokens` tokens after each left-padded prompt (jitted, KV-cached).

  Args:
    model: a `CausalLM`.
    prompt_tokens: [B, P] int, left-padded prompts.
    prompt_mask: [B, P] bool, False on left padding (default: no padding).
    rng: PRNG key (required unless greedy), or one key per row ([B] keys): token i of row r is then drawn with
      `fold_in(rng[r], i)` only, so a row's completion does not depend on its batch neighbours (what
      `adrpo_jax.models.llm.continuous` reproduces slot by slot).
    max_new_tokens, temperature, top_k, top_p, greedy, eos_token_ids, pad_token_id, cache_dtype,
      prompt_group_size, sampler, unroll_layers: see `SamplingConfig` (with prompt_group_size > 1 the rows of
      each group must be equal; checked here).
    prompt_embeds: optional [B, P, D] input embeddings of the prompts used by the prefill instead of the
      token embeddings (e.g. audio spliced into the prompt, `audio_llm`); decode steps embed sampled tokens.
  Returns:
    `GenerationOutput`. Compiled once per (model structure, options, B, P): later calls reuse it.

  >>> from adrpo_jax.models.llm import DecoderConfig, CausalLM
  >>> cfg = DecoderConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
  ...                     num_attention_heads=2, tie_word_embeddings=True)
  >>> model = CausalLM(cfg, rngs=nnx.Rngs(0))
  >>> out = generate(model, jnp.array([[0, 3, 4], [5, 6, 7]]), jnp.array([[0, 1, 1], [1, 1, 1]], bool),
  ...                greedy=True, max_new_tokens=4, eos_token_ids=(2,))
  >>> out.tokens.shape, out.completion_mask.shape, out.logprobs.dtype
  ((2, 7), (2, 4), dtype('float32'))
  """
  if not isinstance(model, CausalLM):
    raise ValueError(f"model must be a CausalLM, got {type(model).__name__}")
  prompt_tokens = jnp.asarray(prompt_tokens)
  prompt_mask = jnp.ones(prompt_tokens.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
  _check_prompts(prompt_tokens, prompt_mask)
  if rng is None:
    if not greedy:
      raise ValueError("rng is required for sampling (greedy=False)")
    rng = jax.random.key(0)
  config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          greedy=greedy, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                          cache_dtype=cache_dtype, prompt_group_size=prompt_group_size, sampler=sampler,
                          unroll_layers=unroll_layers)
  _check_groups(prompt_tokens, prompt_mask, config.prompt_group_size)
  graphdef, state = nnx.split(model)
  if prompt_embeds is None:
    return _jitted_generate(graphdef, config)(state, prompt_tokens, prompt_mask, rng)
  return _jitted_generate(graphdef, config)(state, prompt_tokens, prompt_mask, rng, jnp.asarray(prompt_embeds))


def make_plan_fns(graphdef: nnx.GraphDef, config: SamplingConfig, mesh: Mesh | None = None):
  """The sampler's two phases as separate pure functions, for ahead-of-time planning (their memory and cost
  per call; the generation loop itself runs them inside one program):

  * `prefill(state, prompt_tokens [B, P], prompt_mask [B, P]) -> (logits [B, V], cache)`;
  * `decode(state, token [B], done [B], cache, rng) -> (token [B], logp [B], cache)`: one decode step.
  """
  abstract = None if mesh is None else (mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh)
  ctx = lambda: contextlib.nullcontext() if abstract is None else jax.sharding.use_abstract_mesh(abstract)  # noqa: E731

  def prefill(state, prompt_tokens, prompt_mask):
    with ctx():
      p = prompt_tokens.shape[1]
      return _prefill(nnx.merge(graphdef, state), prompt_tokens.astype(jnp.int32), prompt_mask.astype(bool),
                      p + config.max_new_tokens, config)

  def decode(state, token, done, cache, rng):
    with ctx():
      model = nnx.merge(graphdef, state)
      hidden, cache = model.hidden_states(token[:, None], attention_mask=~done[:, None], cache=cache)
      new, logp = _select(_last_logits(model, hidden[:, 0]), rng, config)
      return new, logp, cache

  return prefill, decode
