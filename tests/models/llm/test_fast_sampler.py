"""The fast sampler (issue 13 item 3): top-k / top-p token sets equal the sorted definition, the inverse-CDF
draw follows the target distribution, log-probs keep their definition, shared-prompt prefill == unshared."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig, generate, process_logits
from adrpo_jax.models.llm.modeling import KVCache
from adrpo_jax.models.llm.sampler import (SamplingConfig, _select, process_logits_reference, repeat_cache_rows,
                                          sample_inverse_cdf)


def _numpy_keep(logits, temperature, top_k, top_p):
  """The sorted definition in float64 numpy (independent of both JAX implementations)."""
  z = logits.astype(np.float64) / temperature
  keep = np.isfinite(z)
  if top_k is not None and top_k < z.shape[-1]:
    kth = np.sort(z)[::-1][top_k - 1]
    keep &= z >= kth
  if top_p is not None and top_p < 1.0:
    w = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    w /= w.sum()
    # mass after each token in the ascending (value, index) order < top_p: transformers' TopPLogitsWarper with a
    # stable sort (of the tokens tied at the threshold, the highest-index ones; issue 28 item 17)
    idx = np.arange(z.size)
    after = np.array([w[(z > z[i]) | ((z == z[i]) & (idx > i))].sum() for i in range(z.size)])
    keep &= after < top_p
  return keep


CASES = [(None, 0.8), (7, None), (7, 0.5), (None, 1e-6), (None, 1.0), (1000, None), (1000, 0.9), (1, 0.9),
         (50, 0.999), (3, None)]


@pytest.mark.parametrize("ties", [False, True])
def test_token_sets_equal_sorted_definition(ties):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 50)).astype(np.float32) * 2
  if ties:  # many exact ties, also at the top-k / top-p boundaries
    logits = np.round(logits * 2) / 2
  logits[5, :10] = -np.inf  # tokens already excluded by the caller
  logits[4] = 0.0  # a flat row: everything ties
  logits[4, 3] = -0.0  # -0.0 ties with +0.0
  x = jnp.asarray(logits)

  @jax.jit
  def all_cases(l):  # one compilation for every case
    return [(process_logits(l, temperature=0.7, top_k=k, top_p=p),
             process_logits_reference(l, temperature=0.7, top_k=k, top_p=p)) for k, p in CASES]

  for (top_k, top_p), (out, ref) in zip(CASES, all_cases(x)):
    out, fast, ref = np.asarray(out), np.isfinite(np.asarray(out)), np.isfinite(np.asarray(ref))
    for b in range(6):
      want = _numpy_keep(logits[b], 0.7, top_k, top_p)
      np.testing.assert_array_equal(fast[b], want, err_msg=f"fast, row {b}, top_k={top_k} top_p={top_p}")
      np.testing.assert_array_equal(ref[b], want, err_msg=f"reference, row {b}, top_k={top_k} top_p={top_p}")
    # the kept values stay the temperature-scaled logits (XLA may divide as a multiply by 1/T: 1 ulp)
    np.testing.assert_allclose(out[fast], (logits / np.float32(0.7))[fast], rtol=3e-7)


def test_token_sets_on_a_large_vocabulary():
  """Random logits over 8192 tokens (the bisection's full 32 rounds; both signs): same sets as the sort."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(8, 8192)).astype(np.float32) * np.array([[0.3], [1], [3], [10]] * 2))
  cases = [(None, 0.95), (None, 0.3), (40, 0.9), (5000, None), (300, 0.99)]
  results = jax.jit(lambda l: [(process_logits(l, top_k=k, top_p=p), process_logits_reference(l, top_k=k, top_p=p))
                               for k, p in cases])(logits)
  for (top_k, top_p), (fast, ref) in zip(cases, results):
    fast, ref = np.isfinite(np.asarray(fast)), np.isfinite(np.asarray(ref))
    # Different float summation orders: at most a token whose mass-before is within rounding of top_p differs
    # (none with these seeds; a real mismatch is many tokens).
    np.testing.assert_array_equal(fast, ref, err_msg=f"top_k={top_k} top_p={top_p}")


def _tv_and_chi2(draws, probs):
  from scipy import stats
  n = draws.size
  probs = np.asarray(probs, np.float64)
  counts = np.bincount(draws, minlength=probs.size)
  tv = 0.5 * np.abs(counts / n - probs).sum()
  # TV expected from sampling noise alone (E|N(0, s)| = s sqrt(2/pi)): a biased sampler exceeds 1.5x of it
  tv = tv / (0.5 * np.sqrt(2 / np.pi) * np.sqrt(probs * (1 - probs) / n).sum())
  big = probs * n >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(probs[big], probs[~big].sum()) * n
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return tv, stats.chisquare(obs, exp / exp.sum() * obs.sum()).pvalue, counts


@pytest.mark.parametrize("v", [12, 300])
def test_inverse_cdf_matches_target_distribution(v):
  """200k draws, fixed seed: chi-square p > 1e-3, TV < 1.5x its sampling noise, never an excluded token. v=300 spans three
  blocks of the two-level draw (block size 128) and a padded last block."""
  rng = np.random.default_rng(2)
  z = rng.normal(size=v).astype(np.float32) * 1.5
  z[rng.choice(v, v // 4, replace=False)] = -np.inf
  z[-1] = -np.inf  # the last entry (also the last of the padded block) excluded
  probs = np.where(np.isfinite(z), np.exp(z - z[np.isfinite(z)].max()), 0.0)
  probs /= probs.sum()
  n = 200_000
  draws = np.asarray(jax.jit(sample_inverse_cdf)(jax.random.key(0), jnp.broadcast_to(jnp.asarray(z), (n, v))))
  assert draws.min() >= 0 and draws.max() < v
  tv, p, counts = _tv_and_chi2(draws, probs)
  assert counts[~np.isfinite(z)].sum() == 0
  assert p > 1e-3 and tv < 1.5, (p, tv)


def test_sampled_top_p_distribution_matches_truncated_target():
  """The whole fast `_select` (temperature, top-k, top-p, draw) against the truncated, renormalized target."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=40).astype(np.float32) * 0.7
  cfg = SamplingConfig(max_new_tokens=1, temperature=0.8, top_k=20, top_p=0.9)
  keep = _numpy_keep(logits, 0.8, 20, 0.9)
  assert 5 < keep.sum() < 20  # both truncations act
  z = logits.astype(np.float64) / 0.8
  probs = np.where(keep, np.exp(z - z.max()), 0.0)
  probs /= probs.sum()
  n = 100_000
  token, logp = jax.jit(lambda l, k: _select(l, k, cfg))(jnp.broadcast_to(jnp.asarray(logits), (n, 40)),
                                                         jax.random.key(1))
  tv, p, counts = _tv_and_chi2(np.asarray(token), probs)
  assert counts[~keep].sum() == 0 and p > 1e-3 and tv < 1.5, (p, tv)
  # Log-probs keep their definition: log_softmax(logits / T) over the full vocabulary, before truncation.
  full = z - np.log(np.exp(z - z.max()).sum()) - z.max()
  np.testing.assert_allclose(np.asarray(logp), full[np.asarray(token)], atol=1e-5)


@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=0.7), dict(top_k=5, top_p=0.8)])
def test_select_logprobs_and_greedy_equal_reference(kw):
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(16, 97)).astype(np.float32) * 3)
  logits = logits.at[3, 10].set(logits[3].max())  # a tie for the max: greedy takes the first index
  fast_t, fast_lp = _select(logits, jax.random.key(0), SamplingConfig(max_new_tokens=1, **kw))
  ref_t, _ = _select(logits, jax.random.key(0), SamplingConfig(max_new_tokens=1, sampler="reference", **kw))
  temperature = kw.get("temperature", 1.0)
  want = jax.nn.log_softmax(logits / temperature, axis=-1)[jnp.arange(16), fast_t]
  np.testing.assert_allclose(np.asarray(fast_lp), np.asarray(want), atol=1e-5)  # two computations: float tol
  if kw.get("greedy"):
    np.testing.assert_array_equal(np.asarray(fast_t), np.asarray(ref_t))
  else:
    keep = np.isfinite(np.asarray(process_logits_reference(logits, temperature=temperature,
                                                           top_k=kw.get("top_k"), top_p=kw.get("top_p"))))
    assert keep[np.arange(16), np.asarray(fast_t)].all()


# ---------------------------------------------------------------------------------------------------------
# Shared-prompt prefill
# ---------------------------------------------------------------------------------------------------------
def _tiny(scan_layers):
  cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      scan_layers=scan_layers)
  return CausalLM(cfg, rngs=nnx.Rngs(0))


def _grouped_prompts(g):
  rng = np.random.default_rng(5)
  tokens = rng.integers(3, 64, (2, 6)).astype(np.int32)
  mask = np.ones((2, 6), bool)
  mask[0, :2] = False
  tokens[~mask] = 0
  return np.repeat(tokens, g, 0), np.repeat(mask, g, 0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_repeat_cache_rows_on_both_layouts(scan_layers):
  model = _tiny(scan_layers)
  cache = model.init_cache(2, 8)
  cache = cache.replace(mask=cache.mask.at[1, :3].set(True), next_position=jnp.array([4, 7], jnp.int32),
                        index=jnp.array(3, jnp.int32))
  keys = jax.tree.map(lambda k: k + jnp.arange(2.0).reshape((1,) * (k.ndim - 4) + (2, 1, 1, 1)), cache.keys)
  cache = cache.replace(keys=keys)
  rep = repeat_cache_rows(cache, 3)
  assert isinstance(rep, KVCache) and int(rep.index) == 3
  np.testing.assert_array_equal(np.asarray(rep.next_position), [4, 4, 4, 7, 7, 7])
  np.testing.assert_array_equal(np.asarray(rep.mask), np.repeat(np.asarray(cache.mask), 3, 0))
  for k, k0 in zip(jax.tree.leaves(rep.keys), jax.tree.leaves(cache.keys)):
    axis = k.ndim - 4
    np.testing.assert_array_equal(np.asarray(k), np.repeat(np.asarray(k0), 3, axis))
    assert k.shape[axis] == 6


@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_shared_prefill_equals_unshared(scan_layers):
  """Greedy: the same completions; sampled with the same key: the same draws (same per-row logits up to float
  rounding, and the same RNG stream), log-probs to float32 tolerance (a [2]-row and a [6]-row prefill are
  different compiled computations)."""
  model = _tiny(scan_layers)
  tokens, mask = _grouped_prompts(3)
  for kw in (dict(greedy=True), dict(rng=jax.random.key(3), temperature=1.0, top_p=0.9)):
    a = generate(model, tokens, mask, max_new_tokens=6, **kw)
    b = generate(model, tokens, mask, max_new_tokens=6, prompt_group_size=3, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.attention_mask), np.asarray(b.attention_mask))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
  # sampling makes the G rows of a group differ (they share the prompt, not the draws)
  assert len({tuple(r) for r in np.asarray(b.completions[:3])}) > 1


def test_shared_prefill_runs_one_prefill_row_per_group():
  """The prefill works on B / G rows: hidden states [2, P=6, D=32] instead of [6, 6, 32] in the jaxpr."""
  from adrpo_jax.models.llm.sampler import make_generate_fn
  model = _tiny(True)
  tokens, mask = _grouped_prompts(3)
  graphdef, state = nnx.split(model)
  for g, rows in ((1, 6), (3, 2)):
    fn = make_generate_fn(graphdef, SamplingConfig(max_new_tokens=2, greedy=True, prompt_group_size=g))
    text = str(jax.make_jaxpr(fn)(state, tokens, mask, jax.random.key(0)))
    assert f"f32[{rows},6,32]" in text
    assert ("f32[6,6,32]" in text) == (g == 1)


def test_group_errors():
  model = _tiny(True)
  tokens, mask = _grouped_prompts(3)
  with pytest.raises(ValueError, match="multiple of prompt_group_size=4"):
    generate(model, tokens, mask, greedy=True, max_new_tokens=2, prompt_group_size=4)
  bad = tokens.copy()
  bad[4, -1] += 1
  with pytest.raises(ValueError, match=r"groups \[1\] do not hold the same prompt"):
    generate(model, bad, mask, greedy=True, max_new_tokens=2, prompt_group_size=3)
  with pytest.raises(ValueError, match="prompt_group_size=0"):
    SamplingConfig(max_new_tokens=1, prompt_group_size=0)
  with pytest.raises(ValueError, match="sampler='sorted'"):
    SamplingConfig(max_new_tokens=1, sampler="sorted")


def test_shared_prefill_on_a_data_mesh():
  """The trainer's setting: rows sharded over 8 devices, 2 rows (one group) per device; equals unshared."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from adrpo_jax.models.llm.sampler import make_generate_fn
  model = _tiny(True)
  tokens, mask = _grouped_prompts(2)
  tokens, mask = np.concatenate([tokens] * 4), np.concatenate([mask] * 4)  # 16 rows, 8 groups of 2
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P("data"))
  graphdef, state = nnx.split(model)
  outs = []
  for g in (1, 2):
    fn = jax.jit(make_generate_fn(graphdef, SamplingConfig(max_new_tokens=4, prompt_group_size=g)),
                 out_shardings=rows)
    outs.append(fn(state, jax.device_put(tokens, rows), jax.device_put(mask, rows), jax.random.key(1)))
  np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
  np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=1e-5)
