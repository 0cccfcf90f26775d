"""Issue 28 item 17: top-p keeps transformers' set on bfloat16 logits, where many tokens tie at the threshold
(on main every tied token was kept: 27 of 64 rows kept more tokens than TopPLogitsWarper)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from adrpo_jax.models.llm import sampler

_jit = functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
process_logits, process_logits_reference = _jit(sampler.process_logits), _jit(sampler.process_logits_reference)


def _hf(x, temperature, top_k, top_p, stable):
  s = TemperatureLogitsWarper(temperature)(None, torch.tensor(x))
  if top_k:
    s = TopKLogitsWarper(top_k)(None, s)
  if not stable:
    return np.isfinite(TopPLogitsWarper(top_p)(None, s).numpy())
  # TopPLogitsWarper's own steps with a stable sort (its torch.sort orders equal values arbitrarily)
  sorted_logits, order = torch.sort(s, descending=False, stable=True)
  remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
  remove[..., -1:] = False
  return np.isfinite(s.masked_fill(remove.scatter(1, order, remove), -float("inf")).numpy())


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, 0.9), (0.7, 50, 0.95)])
def test_top_p_matches_transformers_on_bf16_logits(temperature, top_k, top_p):
  rng = np.random.default_rng(int(top_p * 100))
  x = (3.0 * rng.standard_normal((64, 1000))).astype(np.float32)
  x = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))  # bf16 values: many exact ties
  kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  ours = np.isfinite(np.asarray(process_logits(jnp.asarray(x), **kw)))
  ref = np.isfinite(np.asarray(process_logits_reference(jnp.asarray(x), **kw)))
  hf = _hf(x, temperature, top_k, top_p, stable=False)
  np.testing.assert_array_equal(ours.sum(1), hf.sum(1))  # transformers' kept-set size, every row
  stable = _hf(x, temperature, top_k, top_p, stable=True)
  np.testing.assert_array_equal(ours, stable)  # the same set as its algorithm with a stable sort
  np.testing.assert_array_equal(ref, stable)
  # where transformers' unstable sort picked other tokens, they are of exactly the same value
  for r in np.flatnonzero((ours != hf).any(1)):
    assert sorted(x[r][ours[r] & ~hf[r]]) == sorted(x[r][hf[r] & ~ours[r]])


def test_tied_top_token_and_min_tokens():
  x = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])  # four equal most likely tokens
  kept = np.isfinite(np.asarray(process_logits(x, top_p=0.3)))[0]
  assert kept.tolist() == [False, False, True, True, False]  # mass 2 x 0.2375 covers 0.3: the last two
  assert np.isfinite(np.asarray(process_logits(x, top_p=1e-6)))[0].tolist() == [False, False, False, True, False]
