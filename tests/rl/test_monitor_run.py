"""The reward-hacking monitor inside runs (eval.gold_rewards, eval.stop_when): the LLM recipe scores gold rewards
on its held-out completions and stops a run whose gold reward falls while the proxy rises (checkpoint kept, no
export); a run whose gold reward holds goes to the end. The flow recipe logs the independent judge."""

import itertools

import numpy as np
import pytest

from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.metrics import read_jsonl
from tests.rl.test_trainer import tiny_config

_calls = {"proxy": itertools.count(), "gold": itertools.count()}


def rising(prompts, completions, **kw):
    """The proxy: rises with every training step (the same for every sample: zero advantages)."""
    return [0.1 * next(_calls["proxy"])] * len(completions)


def falling(prompts, completions, **kw):
    """A gold reward that falls at every evaluation."""
    return [1.0 - 0.2 * next(_calls["gold"])] * len(completions)


def steady(prompts, completions, **kw):
    return [1.0] * len(completions)


def _config(model_dir, gold: str, **overrides):
    _calls.update(proxy=itertools.count(), gold=itertools.count())
    config = tiny_config(model_dir, total_steps=6, eval_every=1, **{"rl.ref_sync_steps": 0}, **overrides)
    config.rewards.functions, config.rewards.weights = ("tests.rl.test_monitor_run:rising",), (1.0,)
    config.eval.num_examples = 8
    config.eval.gold_rewards = (f"tests.rl.test_monitor_run:{gold}",)
    config.eval.stop_when, config.eval.monitor_window = "gold_falls:2", 2
    config.model.save_final = True
    return config


@pytest.mark.slow
def test_stop_rule_fires_on_the_hacking_run_and_not_on_the_regularized_one(tiny_model_dir, tmp_path):
    hacked = RLTrainer(_config(tiny_model_dir, "falling"), tmp_path / "hacked").run()
    assert hacked["step"] == 2 and "Reward hacking suspected: stopping at step 2" in hacked["stopped"]
    records = read_jsonl(tmp_path / "hacked" / "metrics.jsonl")
    gold = [r["eval/gold/falling"] for r in records if "eval/gold/falling" in r]
    assert gold == pytest.approx([1.0, 0.8, 0.6]) and records[-1]["monitor/stop"] == 1.0
    assert (tmp_path / "hacked" / "checkpoints" / "2").is_dir() and not (tmp_path / "hacked" / "final_model").exists()
    steady_run = RLTrainer(_config(tiny_model_dir, "steady"), tmp_path / "steady").run()
    assert steady_run["step"] == 6 and "stopped" not in steady_run
    records = read_jsonl(tmp_path / "steady" / "metrics.jsonl")
    assert all(r.get("monitor/stop", 0.0) == 0.0 for r in records) and "monitor/steady/trend" in records[-1]
    assert np.isfinite(records[-1]["monitor/proxy_trend"])


@pytest.mark.slow
def test_flow_run_logs_the_independent_judge_as_gold(tmp_path):
    from adrpo_jax.flow.trainer import FlowTrainer
    from tests.flow.test_trainer import _tiny_models, tiny_trainer_config

    config = tiny_trainer_config()
    config.total_steps, config.eval_every = 2, 1
    config.eval.write_images = False
    config.eval.gold_rewards = ("judge",)
    config.eval.proxy_metric = "eval/reward_mean"
    out = FlowTrainer(config, tmp_path, models=_tiny_models()).run()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert out["step"] == 2 and [r["step"] for r in records if "eval/gold/judge_reward" in r] == [0, 1, 2]
    assert all(np.isfinite(r["eval/gold/judge_digit_accuracy"]) for r in records if "eval/gold/judge_reward" in r)
    assert "monitor/judge_reward/trend" in records[-1]
