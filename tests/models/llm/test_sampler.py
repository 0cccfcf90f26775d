"""KV-cached sampler: greedy == transformers.generate, EOS / masks, top-k / top-p, sampling log-probs,
no recompilation, distribution of samples."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.models.llm import (SamplingConfig, generate, load_pretrained, make_generate_fn, process_logits,
                                  token_logprobs)
from adrpo_jax.models.llm.sampler import _jitted_generate
from tests.models.llm.conftest import VOCAB, torch

MAX_NEW = 8


@pytest.fixture(scope="module")
def models(tiny_hf):
  """One loaded model per family for the module (equal graphdefs -> compiled samplers are reused)."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = load_pretrained(tiny_hf(name).path)
    return cache[name]

  return get


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, VOCAB, (3, 7)).astype(np.int32)
  mask = np.ones((3, 7), bool)
  mask[0, :4] = False
  mask[1, :2] = False
  tokens[~mask] = 0
  return tokens, mask


def _hf_greedy(tiny, tokens, mask, max_new):
  with torch.no_grad():
    out = tiny.torch_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                    attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=max_new,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[:, tokens.shape[1]:].numpy()


@pytest.mark.parametrize("name", ["llama", pytest.param("qwen2", marks=pytest.mark.slow), "qwen3"])
def test_greedy_equals_transformers_generate(tiny_hf, models, prompts, name):
  tiny = tiny_hf(name)
  tokens, mask = prompts
  model = models(name)
  out = generate(model, tokens, mask, greedy=True, max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(np.asarray(out.completions), _hf_greedy(tiny, tokens, mask, MAX_NEW))
  assert np.asarray(out.completion_mask).all() and not np.asarray(out.done).any()
  np.testing.assert_array_equal(np.asarray(out.tokens[:, :7]), tokens)


def test_eos_stops_rows_and_masks(models, prompts):
  tokens, mask = prompts
  model = models("qwen3")
  free = np.asarray(generate(model, tokens, mask, greedy=True, max_new_tokens=MAX_NEW).completions)
  eos = (int(free[0, 2]), int(free[2, 5]))  # stop tokens that occur in rows 0 and 2
  out = generate(model, tokens, mask, greedy=True, max_new_tokens=MAX_NEW, eos_token_ids=eos, pad_token_id=1)
  for row in range(3):
    hits = np.nonzero(np.isin(free[row], eos))[0]
    length = hits[0] + 1 if len(hits) else MAX_NEW
    expect_mask = np.arange(MAX_NEW) < length
    np.testing.assert_array_equal(np.asarray(out.completion_mask[row]), expect_mask)
    np.testing.assert_array_equal(np.asarray(out.completions[row]), np.where(expect_mask, free[row], 1))
    assert int(out.lengths[row]) == length and bool(out.done[row]) == bool(len(hits))
    assert (np.asarray(out.logprobs[row])[~expect_mask] == 0).all()
  np.testing.assert_array_equal(np.asarray(out.attention_mask), np.concatenate([mask, out.completion_mask], 1))


SAMPLING = dict(max_new_tokens=MAX_NEW, temperature=0.7, top_k=5, top_p=0.9)


def test_sampling_logprobs_match_recomputation_and_topk(models, prompts):
  tokens, mask = prompts
  model = models("llama")
  temperature, k = SAMPLING["temperature"], SAMPLING["top_k"]
  out = generate(model, tokens, mask, rng=jax.random.key(3), **SAMPLING)
  valid = np.asarray(out.completion_mask)
  lp = np.asarray(token_logprobs(model, out.tokens, out.attention_mask, temperature=temperature))[:, 7:]
  np.testing.assert_allclose(np.asarray(out.logprobs)[valid], lp[valid], atol=2e-5)
  # Every sampled token is among the k most likely ones of the full-forward logits (independent path).
  logits = np.asarray(model(out.tokens, attention_mask=out.attention_mask))
  completions = np.asarray(out.completions)
  for b in range(3):
    for i in np.nonzero(valid[b])[0]:
      prev = logits[b, 7 + i - 1]
      assert (prev > prev[completions[b, i]]).sum() < k
  # top_k=1 sampling is greedy.
  g = generate(model, tokens, mask, greedy=True, max_new_tokens=MAX_NEW)
  s = generate(model, tokens, mask, rng=jax.random.key(0), top_k=1, max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(np.asarray(g.completions), np.asarray(s.completions))


@pytest.mark.slow
def test_first_token_distribution(models):
  """The first sampled token follows softmax(logits / T): chi-square goodness of fit."""
  from scipy import stats
  model = models("qwen2")
  n, temperature = 4096, 0.8
  prompt = np.array([[5, 9, 17, 33]] * n, np.int32)
  out = generate(model, prompt, rng=jax.random.key(7), max_new_tokens=1, temperature=temperature)
  z = np.asarray(model(prompt[:1])[0, -1], np.float64) / temperature
  probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  first = np.asarray(out.completions[:, 0])
  counts = np.bincount(first, minlength=VOCAB)
  expected = probs * n
  big = expected >= 5  # pool the rare tokens into one bin
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  assert stats.chisquare(obs, exp / exp.sum() * obs.sum()).pvalue > 1e-3
  np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), np.log(probs[first] ), atol=1e-5)


def test_process_logits_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 50)).astype(np.float32) * 2
  for top_k, top_p in [(None, 0.8), (7, None), (7, 0.5), (None, 1e-6)]:
    fn = jax.jit(lambda x: process_logits(x, temperature=0.5, top_k=top_k, top_p=top_p))
    got = np.isfinite(np.asarray(fn(jnp.asarray(logits))))
    for b in range(4):
      scaled = logits[b] / 0.5
      order = np.argsort(-scaled)
      keep = np.ones(50, bool)
      if top_k:
        keep[order[top_k:]] = False
      if top_p:
        p = np.exp(scaled - scaled.max()) * keep
        p /= p.sum()
        mass_before = np.cumsum(p[order]) - p[order]
        keep_sorted = (mass_before < top_p) & keep[order]
        keep_sorted[0] = True
        keep = np.zeros(50, bool)
        keep[order[keep_sorted]] = True
      np.testing.assert_array_equal(got[b], keep, err_msg=f"top_k={top_k} top_p={top_p}")


def test_no_recompilation_and_pure_fn(tiny_hf, models, prompts):
  from flax import nnx
  tokens, mask = prompts
  model = models("llama")
  a = generate(model, tokens, mask, rng=jax.random.key(0), **SAMPLING)
  b = generate(load_pretrained(tiny_hf("llama").path), tokens + 1, mask, rng=jax.random.key(1), **SAMPLING)
  graphdef, state = nnx.split(model)
  assert _jitted_generate(graphdef, SamplingConfig(**SAMPLING))._cache_size() == 1  # one compile for both
  assert not np.array_equal(np.asarray(a.completions), np.asarray(b.completions))
  # The pure function (what a trainer jits with its shardings) gives the same result as generate().
  fn = make_generate_fn(graphdef, SamplingConfig(**SAMPLING))
  with jax.disable_jit(False):
    c = jax.jit(fn).lower(state, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0))
  assert "while" in c.as_text()  # the decode loop is one lax.while_loop, not a Python loop
  np.testing.assert_array_equal(np.asarray(a.completions),
                                np.asarray(_jitted_generate(graphdef, SamplingConfig(**SAMPLING))(
                                    state, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0)).completions))


def test_input_validation(models):
  model = models("llama")
  tokens = np.array([[3, 4, 0]], np.int32)
  with pytest.raises(ValueError, match="left-padded"):
    generate(model, tokens, np.array([[1, 1, 0]], bool), greedy=True, max_new_tokens=2)
  with pytest.raises(ValueError, match="rng is required"):
    generate(model, tokens, max_new_tokens=2)
  with pytest.raises(ValueError, match="temperature"):
    generate(model, tokens, rng=jax.random.key(0), max_new_tokens=2, temperature=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, tokens, greedy=True, max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, tokens, rng=jax.random.key(0), max_new_tokens=2, top_p=1.5)


def test_greedy_on_a_sharded_model(tiny_hf, prompts):
  """The trainer path: parameters sharded FSDP x tensor over 8 devices, data-parallel prompts."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  tokens, mask = prompts
  tiny = tiny_hf("llama")
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = load_pretrained(tiny.path, mesh=mesh)
  tokens4 = np.concatenate([tokens, tokens[:1]])  # 4 rows: divisible by the fsdp axis
  mask4 = np.concatenate([mask, mask[:1]])
  rows = NamedSharding(mesh, P("fsdp"))
  out = generate(model, jax.device_put(tokens4, rows), jax.device_put(mask4, rows), greedy=True,
                 max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(np.asarray(out.completions), _hf_greedy(tiny, tokens4, mask4, MAX_NEW))
