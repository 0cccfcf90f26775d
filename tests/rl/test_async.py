"""Bounded-staleness asynchronous RL (issue 26 item 3): the lagged schedule's versions and exact resume on a fake
recipe, then the LLM recipe: max_lag=0 is bit-identical to the synchronous loop, max_lag=1 trains with the
behaviour policy of the previous step and resumes exactly after a restore."""
import copy

import jax
import numpy as np
import pytest

from adrpo_jax.recipe.schedule import LaggedSchedule, policy_version
from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.metrics import read_jsonl
from tests.rl.test_trainer import tiny_config


class _Iterator:
    def __init__(self):
        self.position = 0

    def next_rows(self):
        self.position += 1
        return self.position - 1

    def get_state(self):
        return {"position": self.position}

    def set_state(self, s):
        self.position = int(s["position"])


class FakeRecipe:
    """params = the version (int); a rollout records (step, prompt position, params version)."""

    def __init__(self):
        self.iterator = _Iterator()
        self.log = []

    def rollout_start(self, step, state, *, params, logprob_passes):
        assert not logprob_passes
        return {"step": step, "rows": self.iterator.next_rows(), "params": params}

    def rollout_finish(self, h):
        self.log.append((h["step"], h["rows"], h["params"]))
        return {"sample": (h["step"], h["rows"], h["params"])}, {"wait_s": 0.0}

    def lagged_logprobs(self, state, batch):
        return batch

    def copy_params(self, p):
        return p

    def update(self, step, state, rollout):
        batch, _ = rollout
        assert batch["sample"][0] == step
        return dict(state, params=state["params"] + 1, trace=state["trace"] + (batch["sample"],)), {"loss": 0.0}


def _run(recipe, schedule, state, steps):
    for t in steps:
        state, metrics = schedule.train_step(t, state)
    return state, metrics


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lagged_schedule_versions_and_exact_resume(k):
    total = 7
    recipe = FakeRecipe()
    sched = LaggedSchedule(recipe, k, total)
    state0 = {"params": 0, "lag_params": (0,) * k, "trace": ()}
    state, metrics = _run(recipe, sched, state0, range(total))
    assert list(state["trace"]) == [(t, t, policy_version(t, k)) for t in range(total)]
    assert metrics["async/lag"] == k and metrics["async/policy_version"] == total - 1 - k
    # checkpoint after step s: (state, host state); a new process resumes and continues identically
    for s in range(1, total):
        r1, r2 = FakeRecipe(), FakeRecipe()
        s1 = LaggedSchedule(r1, k, total)
        mid, _ = _run(r1, s1, state0, range(s))
        host = s1.get_host_state()
        s2 = LaggedSchedule(r2, k, total)
        s2.set_host_state(copy.deepcopy(host))
        resumed, _ = _run(r2, s2, copy.deepcopy(mid), range(s, total))
        assert resumed["trace"] == state["trace"], (k, s)
        assert resumed["lag_params"] == state["lag_params"]


def test_lagged_schedule_rejects_bad_lag_and_state():
    with pytest.raises(ValueError, match="max_lag=0 must be an int >= 1"):
        LaggedSchedule(FakeRecipe(), 0, 4)
    sched = LaggedSchedule(FakeRecipe(), 2, 4)
    with pytest.raises(ValueError, match="holds 1 parameter copies, max_lag=2 needs 2"):
        sched.train_step(0, {"params": 0, "lag_params": (0,), "trace": ()})


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


@pytest.mark.slow
def test_max_lag_zero_is_the_synchronous_loop(tiny_model_dir, tmp_path):
    """max_lag=0 (every issue-26 key at its default) runs Recipe.train_step = update(rollout(...)): three steps equal
    a hand-written synchronous loop on a config without the issue-26 keys, bit for bit."""
    config = tiny_config(tiny_model_dir, eval_every=0, total_steps=3, **{"rl.ref_sync_steps": 0,
                                                                           "rl.num_minibatches": 2,
                                                                           "rl.num_prompts_per_step": 8})
    trainer = RLTrainer(config, tmp_path / "a")
    assert trainer.async_schedule is None and "lag_params" not in trainer.abstract_state
    trainer.run()
    legacy = tiny_config(tiny_model_dir, eval_every=0, total_steps=3, **{"rl.ref_sync_steps": 0,
                                                                           "rl.num_minibatches": 2,
                                                                           "rl.num_prompts_per_step": 8})
    for key in ("max_lag", "importance_correction", "importance_level", "importance_cap", "pack_tokens"):
        del legacy.rl[key]
    ref = RLTrainer(legacy, tmp_path / "b")
    state = ref.init_state()
    for step in range(3):
        state, _ = ref.update(step, state, ref.rollout(step, state))
    for a, b in zip(_params(result_state(trainer)), _params(state)):
        np.testing.assert_array_equal(a, b)


def result_state(trainer):
    return trainer.result.state


@pytest.mark.slow
@pytest.mark.parametrize("correction", ["none", "truncate"])
def test_max_lag_one_trains_and_resumes_exactly(tiny_model_dir, tmp_path, correction):
    """max_lag=1: step t's rollout is sampled by version t - 1 (lag metrics), the importance statistics are logged;
    a run stopped after 2 of 4 steps and resumed ends with the parameters and metrics of the uninterrupted run."""
    # a constant learning rate: the 2-step run's schedule must not depend on its total_steps
    kw = {"rl.ref_sync_steps": 0, "rl.max_lag": 1, "rl.importance_correction": correction,
          "optim.schedule": "constant"}
    full = RLTrainer(tiny_config(tiny_model_dir, eval_every=0, total_steps=4, **kw), tmp_path / "full")
    assert full.async_schedule is not None and len(full.abstract_state["lag_params"]) == 1
    full.run()
    records = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [r["async/lag"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    assert [r["async/policy_version"] for r in records] == [0.0, 0.0, 1.0, 2.0]
    if correction != "none":
        assert all(np.isfinite(r["is_ratio_mean"]) and 0 <= r["is_clipped_fraction"] <= 1 for r in records)
    RLTrainer(tiny_config(tiny_model_dir, eval_every=0, total_steps=2, **kw), tmp_path / "resumed").run()
    resumed = RLTrainer(tiny_config(tiny_model_dir, eval_every=0, total_steps=4, **kw), tmp_path / "resumed")
    out = resumed.run()
    assert out["resumed_from"] == 2
    for a, b in zip(_params(full.result.state), _params(resumed.result.state)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(full.result.state["lag_params"]),
                    jax.tree.leaves(resumed.result.state["lag_params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    for key in ("loss", "reward_mean", "kl_mean"):
        assert [r[key] for r in again][2:] == [r[key] for r in records][2:], key


class ProbedRecipe(FakeRecipe):
    """A FakeRecipe whose rollouts report a weight sync and a sampler output to watch (what a split run gives)."""

    def rollout_start(self, step, state, *, params, logprob_passes):
        h = super().rollout_start(step, state, params=params, logprob_passes=logprob_passes)
        return dict(h, ready_probe=jax.numpy.zeros(()), sync_s=0.5, sync_bytes=100.0)


@pytest.mark.parametrize("k", [1, 2])
def test_lag_histogram_idle_and_sync_metrics(k):
    """async/lag_hist/<j> is one-hot per step (interval means = fractions summing to 1); time/update_idle is the
    rollout wait; the dispatching steps log time/rollout_idle >= 0 and the weight sync summed over their dispatches."""
    from adrpo_jax.train.loop import _mean_records  # the loop's interval aggregation
    total = 6
    sched = LaggedSchedule(ProbedRecipe(), k, total)
    state = {"params": 0, "lag_params": (0,) * k, "trace": ()}
    per_step = []
    for t in range(total):
        state, m = sched.train_step(t, state)
        per_step.append(m)
    for t, m in enumerate(per_step):
        lag = min(t, k)
        assert [m[f"async/lag_hist/{j}"] for j in range(k + 1)] == [float(j == lag) for j in range(k + 1)]
        assert m["time/update_idle"] == m["time/rollout_wait"]
        dispatches = (k + 1 if t == 0 else 1) if t + k < total else (k if t == 0 else 0)
        if dispatches:
            assert m["time/weight_sync"] == 0.5 * dispatches and m["async/weight_sync_bytes"] == 100.0 * dispatches
            assert m["time/rollout_idle"] >= 0.0
        else:
            assert "time/weight_sync" not in m and "time/rollout_idle" not in m
    mean = _mean_records(per_step)
    hist = [mean[f"async/lag_hist/{j}"] for j in range(k + 1)]
    assert abs(sum(hist) - 1.0) < 1e-12 and hist[k] == (total - k) / total
    assert mean["async/lag_max"] == k and mean["async/lag"] < k  # *_max: the interval's maximum
