"""Continuous batching (issue 26 item 1): the tokens of a request depend only on its own key, so the continuous
engine equals the static sampler with the same per-row keys (greedy and sampled, any slot count, shared-prompt
groups, both layer layouts), results in submission order, per-request budgets, and the slot accounting."""
import jax
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig, generate
from adrpo_jax.models.llm.continuous import generate_continuous, make_continuous_generate_fn, request_keys
from adrpo_jax.models.llm.sampler import SamplingConfig

VOCAB = 48
EOS = (2, 5, 7)  # a few stop ids so that a random model stops at varied lengths


def _model(scan_layers=True, seed=0):
  cfg = DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      initializer_range=0.3, scan_layers=scan_layers)
  return CausalLM(cfg, rngs=nnx.Rngs(seed))


def _prompts(r, p, seed=0, group=1):
  rng = np.random.default_rng(seed)
  u = r // group
  toks = rng.integers(8, VOCAB, size=(u, p)).astype(np.int32)
  mask = np.ones((u, p), bool)
  for i in range(u):  # left padding of varied length
    pad = int(rng.integers(0, p - 1))
    toks[i, :pad], mask[i, :pad] = 0, False
  return np.repeat(toks, group, axis=0), np.repeat(mask, group, axis=0)


def _assert_same(out, ref):
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(out.attention_mask), np.asarray(ref.attention_mask))
  np.testing.assert_array_equal(np.asarray(out.completion_mask), np.asarray(ref.completion_mask))
  np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
  np.testing.assert_array_equal(np.asarray(out.done), np.asarray(ref.done))
  # A slot decodes as a batch of one row: float rounding may differ from the batched row in the last bits.
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("greedy,top_k,top_p,slot_counts", [
    (True, None, None, (3,)), (False, None, None, (3,)),
    pytest.param(True, None, None, (1, 12), marks=pytest.mark.slow),
    pytest.param(False, None, None, (1, 12), marks=pytest.mark.slow),
    pytest.param(False, 8, 0.9, (1, 3), marks=pytest.mark.slow)])
def test_continuous_equals_static_with_per_request_keys(greedy, top_k, top_p, slot_counts):
  model = _model()
  r, p, n = 10, 6, 12
  toks, mask = _prompts(r, p)
  key = jax.random.key(7)
  kw = dict(max_new_tokens=n, eos_token_ids=EOS, greedy=greedy, temperature=0.8, top_k=top_k, top_p=top_p)
  ref = generate(model, toks, mask, rng=request_keys(key, r), **kw)
  lengths = np.asarray(ref.lengths)
  assert len(set(lengths.tolist())) > 2 and (lengths < n).any(), lengths  # varied lengths: real refills
  for slots in slot_counts:
    out, stats = generate_continuous(model, toks, mask, rng=key, num_slots=slots, return_stats=True, **kw)
    _assert_same(out, ref)
    # every produced token after the first took one slot-step; the loop ran as long as needed, no longer
    assert int(stats.slot_steps_used) == int(np.sum(np.maximum(lengths - 1, 0)))
    s = min(slots, r)
    assert int(stats.decode_steps) >= -(-int(stats.slot_steps_used) // s)
  # per-row keys given directly: the same
  out = generate_continuous(model, toks, mask, rng=request_keys(key, r), num_slots=slot_counts[0], **kw)
  _assert_same(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_continuous_shared_prompt_groups(scan_layers):
  r, p, n, g = 12, 5, 10, 3
  toks, mask = _prompts(r, p, seed=1, group=g)
  key = jax.random.key(1)
  model = _model(scan_layers=scan_layers, seed=2)
  kw = dict(max_new_tokens=n, eos_token_ids=EOS, temperature=1.0)
  grouped = generate(model, toks, mask, rng=request_keys(key, r), prompt_group_size=g, **kw)
  out = generate_continuous(model, toks, mask, rng=key, num_slots=4, prompt_group_size=g, **kw)
  _assert_same(out, grouped)
  if not scan_layers:  # every row prefilled alone: the same too
    _assert_same(out, generate(model, toks, mask, rng=request_keys(key, r), **kw))


def test_request_output_independent_of_neighbours_and_order():
  """A request's completion is a function of its prompt and key only: reversing the submission order (and so
  every slot assignment and neighbour) gives each request the same tokens."""
  model = _model(seed=3)
  r, p, n = 10, 6, 12  # the shapes and options of the first test: its compiled program serves
  toks, mask = _prompts(r, p, seed=3)
  keys = request_keys(jax.random.key(5), r)
  kw = dict(max_new_tokens=n, eos_token_ids=EOS, greedy=False, temperature=0.8, top_k=None, top_p=None)
  a = generate_continuous(model, toks, mask, rng=keys, num_slots=3, **kw)
  rev = generate_continuous(model, toks[::-1], mask[::-1], rng=keys[::-1], num_slots=3, **kw)
  assert len(set(np.asarray(a.lengths).tolist())) > 2
  _assert_same(jax.tree.map(lambda x: x[::-1], rev), a)


@pytest.mark.slow
def test_per_request_budgets_and_first_token_stops():
  model = _model(seed=4)
  r, p, n = 9, 4, 8
  toks, mask = _prompts(r, p, seed=4)
  key = jax.random.key(0)
  budgets = np.array([1, 8, 3, 2, 8, 1, 5, 7, 4], np.int32)
  out = generate_continuous(model, toks, mask, rng=key, num_slots=2, max_new_tokens=n, max_lengths=budgets,
                            eos_token_ids=())
  np.testing.assert_array_equal(np.asarray(out.lengths), budgets)
  assert not np.asarray(out.done).any()  # no stop token: every row was cut at its budget
  ref = generate(model, toks, mask, rng=request_keys(key, r), max_new_tokens=n, eos_token_ids=())
  cm = np.asarray(out.completion_mask)
  np.testing.assert_array_equal(np.where(cm, np.asarray(out.completions), -1),
                                np.where(cm, np.asarray(ref.completions), -1))  # the prefixes of the full rows
  # max_new_tokens=1: every request is done at its first token, the loop never runs
  one, stats = generate_continuous(model, toks, mask, rng=key, num_slots=3, max_new_tokens=1, eos_token_ids=EOS,
                                   return_stats=True)
  _assert_same(one, generate(model, toks, mask, rng=request_keys(key, r), max_new_tokens=1, eos_token_ids=EOS))
  assert int(stats.decode_steps) == 0


def test_continuous_rejects_bad_arguments():
  model = _model()
  graphdef = nnx.graphdef(model)
  with pytest.raises(ValueError, match="num_slots"):
    make_continuous_generate_fn(graphdef, SamplingConfig(max_new_tokens=4), 0)
  with pytest.raises(ValueError, match="SamplingConfig"):
    make_continuous_generate_fn(graphdef, {"max_new_tokens": 4}, 2)
  toks, mask = _prompts(4, 3)
  with pytest.raises(ValueError, match="rng is required"):
    generate_continuous(model, toks, mask, num_slots=2, max_new_tokens=4)
  with pytest.raises(ValueError, match="left-padded"):
    generate_continuous(model, toks, np.concatenate([mask[:, :-1], np.zeros((4, 1), bool)], 1),
                        rng=jax.random.key(0), num_slots=2, max_new_tokens=4)
