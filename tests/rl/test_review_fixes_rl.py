"""Issue 18, training paths, items 1-4: each test fails on the code before the fix.

1. ``sequence_mean`` divides by all B rows (TRL ``grpo``), in the RL update too (``loss_normalizer``).
2. Micro-batches / minibatches without a loss token do not drag the logged ratio/KL/entropy statistics down.
3. ``JsonlPromptSource`` keeps a dataset's own ``solution`` column and refuses reserved column names.
4. ``reward_errors`` is summed over processes.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adrpo_jax.models.llm import token_logprobs
from adrpo_jax.rl import data as data_lib
from adrpo_jax.rl.step import StepOptions, loss_normalizer, make_rl_update
from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.step_utils import reduce_update_metrics
from tests.rl.conftest import rollout_batch, tiny_model, write_jsonl

P, N, B, G = 3, 4, 8, 2


@pytest.fixture(scope="module")
def model():
    _, graphdef, params = tiny_model(seed=0)
    _, _, ref_params = tiny_model(seed=1)
    return graphdef, params, ref_params


def _opts(**kw):
    base = dict(group_size=G, prompt_length=P, max_new_tokens=N, beta=0.0, adaptive=False,
                shuffle_minibatches=False)
    base.update(kw)
    return StepOptions(**base)


def _run(opts, model, batch):
    graphdef, params, ref_params = model
    tx = optax.sgd(0.0)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    logp = lambda p: token_logprobs(nnx.merge(graphdef, p), b["tokens"], b["attention_mask"])[:, P:]  # noqa: E731
    if opts.use_old_logprobs:
        b["old_logp"] = logp(params)
    if opts.use_reference:
        b["ref_logp"] = logp(ref_params)
    fn = jax.jit(make_rl_update(graphdef, tx, opts, None))
    return jax.device_get(fn(params, tx.init(params), None, b, jax.random.key(0))[2])


# ---- 1 ------------------------------------------------------------------------------------------------------

def test_loss_normalizer_sequence_mean_counts_every_row():
    mask = jnp.ones((B, N), bool).at[jnp.array([1, 4, 6])].set(False)
    assert float(loss_normalizer(mask, "sequence_mean", N)) == B
    assert float(loss_normalizer(mask, "nonempty_sequence_mean", N)) == B - 3
    with pytest.raises(ValueError, match="'mean'"):
        loss_normalizer(mask, "mean", N)


def test_rl_update_sequence_mean_equals_trl_grpo_with_truncated_rows(model):
    """On-policy (ratio 1, beta 0): TRL's grpo loss is mean over all B rows of the row's token mean of -A."""
    batch = rollout_batch(B, P, N)
    batch["done"][[3, 5]] = False  # with row 0: 3 of 8 rows truncated, masked out of the loss
    opts = _opts(loss_aggregation="sequence_mean", mask_truncated_completions=True, scale_rewards="none")
    m = _run(opts, model, batch)
    r = batch["rewards"].astype(np.float64)
    adv = (r.reshape(-1, G) - r.reshape(-1, G).mean(1, keepdims=True)).reshape(-1)
    has_tokens = batch["done"] & batch["completion_mask"].any(1)
    assert has_tokens.sum() == 5
    trl = np.sum(np.where(has_tokens, -adv, 0.0)) / B  # every row counts
    assert abs(trl) > 1e-2  # the old 1/5 normalizer would be off by 1.6x
    np.testing.assert_allclose(m["loss"], trl, rtol=1e-5, atol=1e-7)


# ---- 2 ------------------------------------------------------------------------------------------------------

def _half_empty_batch():
    """Rows 1, 3, 5, 7 (minibatch / micro-batch 1 of 2, strided) have no valid reward: no loss token."""
    batch = rollout_batch(B, P, N)
    batch["reward_valid"][1::2] = False
    return batch


_REF = {}


@pytest.mark.parametrize("split", [pytest.param(dict(num_minibatches=2), marks=pytest.mark.slow),  # default: 10 min
                                   dict(grad_accum_steps=2)])
def test_empty_parts_do_not_dilute_the_logged_statistics(model, split):
    batch = _half_empty_batch()
    m = _run(_opts(beta=0.04, **split), model, batch)
    if "ref" not in _REF:  # one update, one micro-batch: the same loss tokens
        _REF["ref"] = _run(_opts(beta=0.04), model, batch)
    ref = _REF["ref"]
    # lr 0 and old = current log-probs (from another program: float32 tolerance): every ratio is ~1
    np.testing.assert_allclose([m["ratio_mean"], m["ratio_min"], m["ratio_max"]], 1.0, rtol=1e-5)
    for key in ("entropy_mean", "kl_mean", "clip_fraction"):  # two programs: float32 tolerance
        np.testing.assert_allclose(m[key], ref[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert ref["entropy_mean"] > 0.1 and ref["kl_mean"] > 1e-3


def test_reduce_update_metrics_weights_and_empty_parts():
    n = jnp.array([10.0, 0.0, 30.0])
    stacked = {"ratio_mean": jnp.array([1.0, 0.0, 1.1]), "ratio_min": jnp.array([0.8, 0.0, 0.9]),
               "ratio_max": jnp.array([1.2, 0.0, 1.3]), "loss": jnp.array([1.0, 0.0, 2.0]), "num_tokens": n}
    out = reduce_update_metrics(stacked, weights={k: n for k in ("ratio_mean", "ratio_min", "ratio_max")})
    np.testing.assert_allclose(out["ratio_mean"], (10 * 1.0 + 30 * 1.1) / 40, rtol=1e-6)
    np.testing.assert_allclose([out["ratio_min"], out["ratio_max"]], [0.8, 1.3], rtol=1e-6)
    np.testing.assert_allclose(out["loss"], 1.0, rtol=1e-6)  # unweighted keys keep the plain mean
    empty = reduce_update_metrics({"ratio_min": jnp.zeros(2)}, weights={"ratio_min": jnp.zeros(2)})
    assert float(empty["ratio_min"]) == 0.0
    with pytest.raises(ValueError, match="nope"):
        reduce_update_metrics(stacked, weights={"nope": n})


# ---- 3 ------------------------------------------------------------------------------------------------------

def test_jsonl_source_keeps_the_datasets_solution_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answer": "#### 7",
                                               "solution": "Step 1: 3 + 4 = 7. The answer is 7."}])
    src = data_lib.JsonlPromptSource(path)
    assert src[0]["solution"] == "Step 1: 3 + 4 = 7. The answer is 7." and src[0]["answer"] == "7"
    plain = data_lib.JsonlPromptSource(write_jsonl(tmp_path / "p.jsonl", [{"question": "q?", "answer": "#### 7"}]))
    assert plain[0]["solution"] == "#### 7"  # no column of its own: the raw answer field, as before


@pytest.mark.parametrize("column", ["prompts", "completions"])
def test_reserved_column_names_are_refused(tmp_path, column):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answer": "#### 7", column: "x"}])
    with pytest.raises(ValueError, match=rf"d.jsonl:1: .*'{column}'.*reserved"):
        data_lib.JsonlPromptSource(path)
    with pytest.raises(ValueError, match=rf"'{column}'.*reserved"):
        data_lib.columns_of([{"prompt": "q", column: "x"}])


# ---- 4 ------------------------------------------------------------------------------------------------------

def test_reward_errors_are_summed_over_processes(monkeypatch):
    from jax.experimental import multihost_utils

    calls = []

    def fake_allgather(x, tiled=False):
        calls.append(np.asarray(x).copy())
        return np.concatenate([np.asarray(x), np.asarray([5.0], np.float32)])  # another process had 5 errors

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
    fake = types.SimpleNamespace(
        fns={"update": lambda params, opt_state, frozen, batch, key: (params, opt_state, {"loss": 0.0})},
        frozen=None, policy=types.SimpleNamespace(ref_in_state=False), _update_flops=0.0,
        _perf_metrics=lambda *a: {},
        config=types.SimpleNamespace(rl=types.SimpleNamespace(ref_sync_steps=1), log_every=10**9))
    rollout = ({}, {"key": None, "num_errors": 2, "times": {}})
    _, metrics = RLTrainer.update(fake, 0, {"params": 0, "opt_state": 0}, rollout)
    assert metrics["reward_errors"] == 7.0 and len(calls) == 1
