"""The jitted RL update on hand-built batches vs. independent NumPy references.

The model's log-probs come from ``token_logprobs`` (tested in tests/models/llm); everything after them --
advantages, masks, the GRPO/ADRPO loss, KL placement, truncation masking, reference refresh, entropy bonus,
overlong penalty, gradient accumulation and minibatching -- is recomputed here in NumPy (float64).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adrpo_jax.models.llm import token_logprobs
from adrpo_jax.rl.step import (StepOptions, make_minibatch_update, make_rl_update, mix_reference, overlong_penalty,
                               prepare_rollout)
from tests.rl.conftest import rollout_batch, tiny_model

P, N, B, G = 3, 4, 8, 2
BETA = 0.2


def _opts(**kw):
    base = dict(group_size=G, prompt_length=P, max_new_tokens=N, beta=BETA, shuffle_minibatches=False)
    base.update(kw)
    return StepOptions(**base)


@pytest.fixture(scope="module")
def model():
    cfg, graphdef, params = tiny_model(seed=0)
    _, _, ref_params = tiny_model(seed=1)
    return graphdef, params, ref_params


def _logp(graphdef, params, batch, with_entropy=False):
    out = token_logprobs(nnx.merge(graphdef, params), jnp.asarray(batch["tokens"]),
                         jnp.asarray(batch["attention_mask"]), return_entropy=with_entropy)
    if with_entropy:
        return tuple(np.asarray(x, np.float64)[:, P:] for x in out)
    return np.asarray(out, np.float64)[:, P:]


def np_group_advantages(r, valid, scale=True, eps=1e-4):
    adv = np.zeros(len(r))
    for g in range(len(r) // G):
        idx = [i for i in range(g * G, (g + 1) * G) if valid[i]]
        v = r[idx].astype(np.float64)
        if len(v) < 2 or v.max() == v.min():
            continue
        c = v - v.mean()
        adv[idx] = c / (v.std(ddof=1) + eps) if scale else c
    return adv


def np_k3(logp, ref):
    d = ref - logp
    return np.exp(d) - d - 1.0


def np_grpo(logp, ref, adv, mask, *, beta=BETA, adaptive=True, aggregation="token_mean", entropy=None,
            entropy_coef=0.0):
    """On-policy GRPO/ADRPO loss (ratio 1): -A + beta_i * k3, aggregated."""
    coef = beta - np.clip(adv, -beta, beta) if adaptive else np.full_like(adv, beta)
    pg = -adv[:, None] * np.ones_like(logp)
    kl = np_k3(logp, ref) if ref is not None else np.zeros_like(logp)
    m = mask.astype(np.float64)

    def agg(x):
        if aggregation == "token_mean":
            return (x * m).sum() / m.sum()
        if aggregation == "sequence_mean":
            n = m.sum(1)
            ok = n > 0
            return ((x * m).sum(1)[ok] / n[ok]).sum() / x.shape[0]  # every row counts (TRL grpo)
        return (x * m).sum() / (x.shape[0] * N)

    out = {"pg_loss": agg(pg), "kl_term": agg(coef[:, None] * kl)}
    out["loss"] = out["pg_loss"] + out["kl_term"]
    if entropy is not None:
        out["entropy_term"] = -entropy_coef * agg(entropy)
        out["loss"] += out["entropy_term"]
    return out


_COMPILED = {}


def _run(opts, model, batch, *, lr=0.0, ref=True):
    graphdef, params, ref_params = model
    tx = optax.sgd(lr)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    if opts.use_old_logprobs:
        b["old_logp"] = jnp.asarray(_logp(graphdef, params, batch), jnp.float32)
    if ref and opts.use_reference:
        b["ref_logp"] = jnp.asarray(_logp(graphdef, ref_params, batch), jnp.float32)
    key = (opts, lr)
    if key not in _COMPILED:  # one compilation per distinct options (the graphdef is the same everywhere)
        _COMPILED[key] = jax.jit(make_rl_update(graphdef, tx, opts, None))
    fn = _COMPILED[key]
    new_params, _, metrics = fn(params, tx.init(params), None, b, jax.random.key(0))
    return new_params, jax.device_get(metrics)


def _assert_close(metrics, expected, rtol=1e-5, atol=1e-6):
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("adaptive", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_loss_matches_numpy(model, adaptive):
    batch = rollout_batch(B, P, N)
    _, m = _run(_opts(adaptive=adaptive), model, batch)
    graphdef, params, ref_params = model
    logp, ref = _logp(graphdef, params, batch), _logp(graphdef, ref_params, batch)
    adv = np_group_advantages(batch["rewards"], batch["reward_valid"])
    _assert_close(m, np_grpo(logp, ref, adv, batch["completion_mask"], adaptive=adaptive))
    coef = BETA - np.clip(adv, -BETA, BETA) if adaptive else np.full(B, BETA)
    _assert_close(m, {"beta_eff_mean": coef.mean(), "beta_eff_min": coef.min(), "beta_eff_max": coef.max(),
                      "reward_mean": batch["rewards"].mean(), "advantage_max": adv.max(),
                      "truncated_fraction": 1 / B, "completion_length_mean": batch["lengths"].mean()})
    assert m["kl_mean"] > 0 and m["ratio_mean"] == pytest.approx(1.0)


def test_truncation_mask_removes_truncated_rows_from_the_loss(model):
    batch = rollout_batch(B, P, N)
    assert not batch["done"][0]
    _, plain = _run(_opts(), model, batch)
    _, masked = _run(_opts(mask_truncated_completions=True), model, batch)
    graphdef, params, ref_params = model
    logp, ref = _logp(graphdef, params, batch), _logp(graphdef, ref_params, batch)
    adv = np_group_advantages(batch["rewards"], batch["reward_valid"])  # advantages keep the truncated row
    mask = batch["completion_mask"] & batch["done"][:, None]
    _assert_close(masked, np_grpo(logp, ref, adv, mask))
    assert masked["loss_tokens"] == plain["loss_tokens"] - N
    assert abs(masked["loss"] - plain["loss"]) > 1e-4


def test_kl_in_reward_shapes_the_advantage_and_leaves_the_loss_kl_free(model):
    batch = rollout_batch(B, P, N)
    opts = _opts(adaptive=False, kl_placement="reward")
    assert opts.use_old_logprobs and opts.use_reference
    _, m = _run(opts, model, batch)
    graphdef, params, ref_params = model
    logp, ref = _logp(graphdef, params, batch), _logp(graphdef, ref_params, batch)
    cmask = batch["completion_mask"]
    seq_kl = (np_k3(logp, ref) * cmask).sum(1)
    shaped = batch["rewards"] - BETA * seq_kl
    adv = np_group_advantages(shaped, batch["reward_valid"])
    expected = np_grpo(logp, None, adv, cmask)
    _assert_close(m, {"loss": expected["loss"], "pg_loss": expected["pg_loss"], "kl_term": 0.0,
                      "kl_reward_penalty_mean": (BETA * seq_kl).mean(),
                      "kl_mean": (np_k3(logp, ref) * cmask).sum() / cmask.sum(),
                      "advantage_min": adv.min(), "advantage_max": adv.max(),
                      "reward_mean": batch["rewards"].mean()}, rtol=1e-4)  # float32 k3 sums of O(1) KLs
    _, in_loss = _run(_opts(adaptive=False), model, batch)  # placements give different losses
    assert abs(in_loss["kl_term"]) > 1e-3


def test_adaptive_with_kl_in_reward_is_rejected():
    with pytest.raises(ValueError, match="kl_placement='reward'"):
        _opts(adaptive=True, kl_placement="reward")


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_reference_refresh_changes_the_loss_as_specified(model, alpha):
    graphdef, params, ref_params = model
    mixed = jax.jit(lambda r, p: mix_reference(r, p, alpha))(ref_params, params)
    for r, p, x in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), jax.tree.leaves(mixed)):
        # XLA may fuse alpha*p + (1-alpha)*r into an FMA, NumPy does not: an ulp of the terms, so atol 1e-6
        np.testing.assert_allclose(x, alpha * np.asarray(p) + (1 - alpha) * np.asarray(r), rtol=1e-6, atol=1e-6)
    batch = rollout_batch(B, P, N)
    _, before = _run(_opts(), model, batch)
    _, after = _run(_opts(), (graphdef, params, mixed), batch)
    logp, ref = _logp(graphdef, params, batch), _logp(graphdef, mixed, batch)
    adv = np_group_advantages(batch["rewards"], batch["reward_valid"])
    _assert_close(after, np_grpo(logp, ref, adv, batch["completion_mask"]))
    if alpha == 1.0:  # a hard copy: the policy *is* the reference, the KL term vanishes
        assert after["kl_term"] == pytest.approx(0.0, abs=1e-7) and after["kl_mean"] == pytest.approx(0.0, abs=1e-7)
    assert abs(after["kl_term"] - before["kl_term"]) > 1e-4


def test_missing_and_nan_rewards_are_masked_everywhere(model):
    batch = rollout_batch(B, P, N)
    batch["rewards"][3] = np.nan  # a NaN reward
    batch["reward_valid"][5] = False  # a missing reward (e.g. every reward function returned None)
    batch["rewards"][5] = 123.0
    _, m = _run(_opts(), model, batch)
    graphdef, params, ref_params = model
    logp, ref = _logp(graphdef, params, batch), _logp(graphdef, ref_params, batch)
    valid = np.ones(B, bool)
    valid[[3, 5]] = False
    adv = np_group_advantages(np.nan_to_num(batch["rewards"]), valid)
    assert adv[2] == 0 and adv[4] == 0  # their groups have one valid sample left: advantage 0, not NaN
    _assert_close(m, np_grpo(logp, ref, adv, batch["completion_mask"] & valid[:, None]))
    _assert_close(m, {"num_missing_rewards": 2, "reward_mean": batch["rewards"][valid].mean(),
                      "zero_std_group_fraction": np.mean(
                          [not (valid[g * 2] and valid[g * 2 + 1] and batch["rewards"][g * 2] != batch["rewards"][g * 2 + 1])
                           for g in range(B // 2)])})
    assert np.isfinite(m["loss"]) and not m["skipped"]


@pytest.mark.slow
def test_dr_grpo_and_entropy_bonus(model):
    batch = rollout_batch(B, P, N)
    opts = _opts(scale_rewards="none", loss_aggregation="constant_normalizer", entropy_coef=0.01)
    _, m = _run(opts, model, batch)
    graphdef, params, ref_params = model
    logp, ent = _logp(graphdef, params, batch, with_entropy=True)
    ref = _logp(graphdef, ref_params, batch)
    adv = np_group_advantages(batch["rewards"], batch["reward_valid"], scale=False)
    cmask = batch["completion_mask"]
    _assert_close(m, np_grpo(logp, ref, adv, cmask, aggregation="constant_normalizer", entropy=ent,
                             entropy_coef=0.01))
    _assert_close(m, {"entropy_mean": (ent * cmask).sum() / cmask.sum()})


def test_overlong_penalty_matches_dapo():
    lengths = np.arange(0, 11)
    ref = np.where(lengths <= 6, 0.0, (6 - lengths) / 4.0) * 0.5
    np.testing.assert_allclose(overlong_penalty(jnp.asarray(lengths), 10, 4, 0.5), ref, atol=1e-7)
    batch = rollout_batch(B, P, N)
    prep = prepare_rollout(_opts(overlong_buffer=2, overlong_penalty=1.0), {k: jnp.asarray(v) for k, v in batch.items()})
    pen = np.clip((batch["lengths"] - (N - 2)) / 2.0, 0, 1)
    np.testing.assert_allclose(prep.rewards, batch["rewards"] - pen, rtol=1e-6)
    np.testing.assert_allclose(prep.metrics["reward/overlong_mean"], -pen.mean(), rtol=1e-6)


@pytest.mark.parametrize("aggregation,accum", [("token_mean", 4),
                                               pytest.param("sequence_mean", 2, marks=pytest.mark.slow)])
def test_gradient_accumulation_equals_the_full_minibatch(model, aggregation, accum):
    graphdef, params, ref_params = model
    batch = rollout_batch(B, P, N)
    prep = prepare_rollout(_opts(), {k: jnp.asarray(v) for k, v in batch.items()})
    mb = {"tokens": jnp.asarray(batch["tokens"]), "attention_mask": jnp.asarray(batch["attention_mask"]),
          "loss_mask": prep.loss_mask.at[2].set(False), "advantages": prep.advantages,
          "ref_logp": jnp.asarray(_logp(graphdef, ref_params, batch), jnp.float32)}
    tx = optax.sgd(0.5)
    results = []
    for k in (1, accum):
        fn = jax.jit(make_minibatch_update(graphdef, tx, _opts(grad_accum_steps=k, loss_aggregation=aggregation),
                                           None, return_grads=True))
        results.append(jax.device_get(fn(params, tx.init(params), None, mb)))
    (p1, _, m1, g1) = results[0]
    for p_k, _, m_k, g_k in results[1:]:
        # k micro-batch sums vs one sum: another float32 summation order. Entries that nearly cancel (1e-4 in a
        # leaf of O(0.3)) move by an ulp of the large terms (1.2e-7 under --xla_cpu_max_isa=AVX2 / on an Intel CPU),
        # so the absolute tolerance scales with each leaf's largest entry (a wrong normalization is a factor k off).
        np.testing.assert_allclose(m_k["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m_k["ratio_min"], m1["ratio_min"], rtol=1e-6)
        np.testing.assert_allclose(m_k["num_tokens"], m1["num_tokens"])
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g_k)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p_k)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_minibatches_and_iterations_are_sequential_minibatch_updates(model):
    graphdef, params, ref_params = model
    batch = rollout_batch(B, P, N)
    opts = _opts(num_minibatches=2, num_iterations=2)
    assert opts.ratio_uses_old_logprobs
    lr = 0.5
    new_params, m = _run(opts, model, batch, lr=lr)
    # Reference: four sequential single updates on rows [0, 2, 4, 6] and [1, 3, 5, 7], twice.
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    old = jnp.asarray(_logp(graphdef, params, batch), jnp.float32)
    ref = jnp.asarray(_logp(graphdef, ref_params, batch), jnp.float32)
    prep = prepare_rollout(opts, b)
    full = {"tokens": b["tokens"], "attention_mask": b["attention_mask"], "loss_mask": prep.loss_mask,
            "advantages": prep.advantages, "old_logp": old, "ref_logp": ref}
    tx = optax.sgd(lr)
    update = jax.jit(make_minibatch_update(graphdef, tx, dataclasses.replace(opts, num_minibatches=2), None))
    p, o = params, tx.init(params)
    ratios = []
    for _ in range(2):
        for rows in ([0, 2, 4, 6], [1, 3, 5, 7]):
            p, o, mm = update(p, o, None, jax.tree.map(lambda x: x[np.asarray(rows)], full))
            ratios.append(float(mm["ratio_mean"]))
    for a, c in zip(jax.tree.leaves(p), jax.tree.leaves(new_params)):
        # two different programs, 4 SGD steps at lr 0.5: float32 noise (measured up to 1.7e-6 with the layer scan)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=5e-6)
    assert ratios[0] == pytest.approx(1.0) and abs(ratios[-1] - 1.0) > 1e-4  # off-policy after the first update
    assert m["ratio_max"] == pytest.approx(max(float(x) for x in [m["ratio_max"]]))


@pytest.mark.slow
def test_beta_zero_needs_no_reference(model):
    batch = rollout_batch(B, P, N)
    opts = _opts(beta=0.0)
    assert not opts.use_reference
    _, m = _run(opts, model, batch, ref=False)
    graphdef, params, _ = model
    adv = np_group_advantages(batch["rewards"], batch["reward_valid"])
    _assert_close(m, {"loss": np_grpo(_logp(graphdef, params, batch), None, adv, batch["completion_mask"],
                                      beta=0.0)["loss"], "beta_eff_max": 0.0})
    assert "kl_mean" not in m
    assert not _opts(beta=0.0, adv_clip="none").coefficient_is_zero  # beta_i = -A is not zero


def test_nonfinite_loss_skips_the_update(model):
    graphdef, params, ref_params = model
    batch = rollout_batch(B, P, N)
    poisoned = jax.tree.map(lambda x: x * jnp.nan, ref_params)  # NaN reference log-probs poison the KL term
    new_params, m = _run(_opts(), (graphdef, params, poisoned), batch, lr=0.1)
    assert bool(m["skipped"]) and m["skipped_updates"] == 1 and not np.isfinite(m["loss"])
    for a, c in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
        np.testing.assert_array_equal(a, c)
