"""Packed updates (issue 26 item 2): the pack plan, the packed layout, packed log-probs == padded, and the packed
GRPO update == the padded one (loss, gradients, updated parameters within 1e-5) for every loss aggregation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adrpo_jax.models.llm import positions_from_mask
from adrpo_jax.rl import packing
from adrpo_jax.rl.config import add_llm_config, validate_llm_config
from adrpo_jax.rl.step import StepOptions, make_logprob_fn, make_rl_update
from adrpo_jax.train.config import ConfigError, common_config

from tests.rl.conftest import rollout_batch, tiny_model

B, P, N = 8, 3, 6


def _batch(seed=0):
    batch = {k: jnp.asarray(v) for k, v in rollout_batch(B, P, N, seed=seed, group_size=2).items()}
    rng = np.random.default_rng(seed + 1)
    batch["ref_logp"] = jnp.asarray(-rng.random((B, N)).astype(np.float32) * 2)
    batch["old_logp"] = jnp.asarray(-rng.random((B, N)).astype(np.float32) * 2)
    return batch


def test_pack_plan_first_fit_decreasing():
    rng = np.random.default_rng(0)
    for _ in range(5):
        lengths = rng.integers(1, 10, size=12)
        pid, off, num = (np.asarray(x) for x in packing.pack_plan(jnp.asarray(lengths), 10))
        assert sorted(set(pid.tolist())) == list(range(int(num)))  # the used packs are a prefix
        for k in range(int(num)):  # rows of a pack do not overlap and fit
            rows = np.nonzero(pid == k)[0]
            spans = sorted((off[r], off[r] + lengths[r]) for r in rows)
            assert spans[-1][1] <= 10 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        # first-fit decreasing in numpy
        fill, want = [], np.zeros(12, int)
        for r in sorted(range(12), key=lambda r: -lengths[r]):
            k = next((i for i, f in enumerate(fill) if f + lengths[r] <= 10), len(fill))
            fill += [0] * (k == len(fill))
            want[r], fill[k] = k, fill[k] + lengths[r]
        np.testing.assert_array_equal(pid, want)


def test_pack_rows_layout():
    batch = _batch()
    packed = packing.pack_rows(batch["tokens"], batch["attention_mask"], P, 12, 2)
    mask = np.asarray(batch["attention_mask"])
    flat = lambda x: np.asarray(x).reshape(-1)  # noqa: E731
    pos = np.asarray(positions_from_mask(batch["attention_mask"]))
    start, length = (np.asarray(x) for x in packing.row_spans(batch["attention_mask"], P))
    assert int(packed.valid.sum()) == int(mask.sum()) == int(length.sum())
    for r in range(B):
        cols = np.arange(start[r], start[r] + length[r])
        assert mask[r, cols].all() and mask[r].sum() == length[r]  # one contiguous run per row
        dest = packed.pack_id[r] * 12 + packed_offset(packed, r) + np.arange(length[r])
        np.testing.assert_array_equal(flat(packed.tokens)[dest], np.asarray(batch["tokens"])[r, cols])
        np.testing.assert_array_equal(flat(packed.positions)[dest], pos[r, cols])  # restart per row
        assert (flat(packed.segment_ids)[dest] == r).all()
    cm = np.asarray(batch["completion_mask"])
    d = np.asarray(packed.dest)
    np.testing.assert_array_equal(flat(packed.tokens)[d[cm]], np.asarray(batch["tokens"])[:, P:][cm])
    assert (d[~cm] == packed.groups * packed.packs_per_group * 12).all()


def packed_offset(packed, r):
    """Row r's offset in its pack, from the completion destinations (or the first token)."""
    flat_seg = np.asarray(packed.segment_ids).reshape(-1)
    first = int(np.nonzero(flat_seg == r)[0][0])
    return first - int(packed.pack_id[r]) * packed.pack_tokens


@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "chunked"])
def test_packed_logprobs_equal_padded(impl):
    _, graphdef, params = tiny_model(0, num_hidden_layers=2, attention_impl=impl, attention_chunk_size=4)
    batch = _batch()
    opts = StepOptions(group_size=2, prompt_length=P, max_new_tokens=N)
    padded = jax.jit(make_logprob_fn(graphdef, opts))(params, None, batch["tokens"], batch["attention_mask"])
    packed = jax.jit(make_logprob_fn(graphdef, dataclasses.replace(opts, pack_tokens=12)))(
        params, None, batch["tokens"], batch["attention_mask"])
    for a, b in zip(padded, packed):  # different reduction lengths: float rounding only
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


def _update(graphdef, params, opts, batch):
    tx = optax.adam(1e-2)
    fn = jax.jit(make_rl_update(graphdef, tx, opts, None, return_grads=opts.num_updates == 1))
    out = fn(params, tx.init(params), None, batch, jax.random.key(0))
    return out


CASES = [
    dict(loss_aggregation="token_mean", grad_accum_steps=2),
    pytest.param(dict(loss_aggregation="sequence_mean", ratio_level="sequence"), marks=pytest.mark.slow),
    pytest.param(dict(loss_aggregation="constant_normalizer", scale_rewards="none", entropy_coef=0.01),
                 marks=pytest.mark.slow),
    pytest.param(dict(loss_aggregation="nonempty_sequence_mean", grad_accum_steps=4), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", CASES)
def test_packed_update_equals_padded(case):
    """One update: loss, gradients and updated parameters within 1e-5 (tolerance: a packed forward reduces over
    different lengths than the padded one, float rounding only)."""
    _, graphdef, params = tiny_model(0, num_hidden_layers=2)
    batch = _batch(seed=3)
    opts = StepOptions(group_size=2, prompt_length=P, max_new_tokens=N, beta=0.04, **case)
    p1, _, m1, g1 = _update(graphdef, params, opts, batch)
    p2, _, m2, g2 = _update(graphdef, params, dataclasses.replace(opts, pack_tokens=12), batch)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), atol=1e-5, rtol=1e-5)
    for key in ("pg_loss", "kl_term", "kl_mean", "num_tokens", "num_sequences", "ratio_mean", "entropy_mean"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), atol=1e-5, rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_packed_update_equals_padded_over_minibatches_and_iterations():
    """num_iterations=2 x num_minibatches=2 (old log-probs, shuffled minibatches): the step's parameters agree."""
    _, graphdef, params = tiny_model(0, num_hidden_layers=2)
    batch = _batch(seed=5)
    opts = StepOptions(group_size=2, prompt_length=P, max_new_tokens=N, num_iterations=2, num_minibatches=2)
    p1, _, m1 = _update(graphdef, params, opts, batch)
    p2, _, m2 = _update(graphdef, params, dataclasses.replace(opts, pack_tokens=9), batch)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_pack_tokens_validation():
    with pytest.raises(ValueError, match="pack_tokens=8 must be 0"):
        StepOptions(group_size=2, prompt_length=P, max_new_tokens=N, pack_tokens=8)
    config = add_llm_config(common_config())
    config.rl.pack_tokens = 20  # < 16 + 8
    with pytest.raises(ConfigError, match=r"`rl.pack_tokens`=20 must be 0 \(off\) or at least"):
        validate_llm_config(config)
    config.rl.pack_tokens = 24
    validate_llm_config(config)
