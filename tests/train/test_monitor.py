"""The reward-hacking monitor: trends, the gap, and the stop rule on both sides (synthetic and recorded runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from adrpo_jax.rl.rewards import resolve_reward_function
from adrpo_jax.train.config import ConfigError
from adrpo_jax.train.monitor import (
  MONITOR_DEFAULTS,
  RewardHackingMonitor,
  RewardHackingStop,
  StopRule,
  gold_metric_keys,
  monitor_from_config,
  parse_stop_when,
  replay,
  score_gold_rewards,
  validate_monitor_config,
)

DATA = Path(__file__).resolve().parent / "data" / "monitor_runs.json"


def run_records(proxy, gold, every=2):
  """Training logs (proxy) every step from 1 and evaluations (gold) every ``every`` steps from 0."""
  recs = []
  for step in range(len(proxy) + 1):
    if step:
      recs.append({"step": step, "reward_mean": proxy[step - 1]})
    if step % every == 0 and step // every < len(gold):
      recs.append({"step": step, "eval/accuracy": gold[step // every]})
  return recs


def monitor(n=3, drop=0.02, window=3):
  return RewardHackingMonitor("reward_mean", ["eval/accuracy"], window=window, stop_rule=StopRule(n, drop))


def test_fires_when_the_gold_falls_while_the_proxy_rises():
  proxy = list(np.linspace(0.3, 0.9, 20))
  gold = [0.30, 0.40, 0.50, 0.45, 0.40, 0.35, 0.30, 0.25, 0.20, 0.15, 0.10]  # evals at 0, 2, ..., 20
  m = monitor()
  outs = []
  for r in run_records(proxy, gold):
    outs.append((r["step"], m.update(r)))
    if m.decision:
      break
  d = m.decision
  assert d is not None and d.step == 10 and d.gold_best_step == 4 and d.evaluations == 3  # 0.45, 0.40, 0.35 < 0.48
  assert d.gold == pytest.approx(0.35) and d.proxy > d.proxy_at_best
  assert "step 10" in d.message and "eval/accuracy" in d.message and "eval.stop_when" in d.message
  last = outs[-1][1]
  assert last["monitor/stop"] == 1.0 and last["monitor/accuracy/falls"] == 3.0
  assert last["monitor/accuracy/best"] == pytest.approx(0.5) and last["monitor/accuracy/drop"] == pytest.approx(0.15)
  assert last["monitor/accuracy/trend_gap"] > 0  # the proxy rises, the gold falls
  with pytest.raises(RewardHackingStop, match="Reward hacking suspected"):
    raise RewardHackingStop(d)


@pytest.mark.parametrize("gold,proxy", [
  ([0.3, 0.4, 0.5, 0.49, 0.485, 0.49, 0.5, 0.495], np.linspace(0.3, 0.9, 16)),  # a plateau within the drop
  ([0.3, 0.4, 0.5, 0.45, 0.40, 0.35, 0.3, 0.25], np.linspace(0.9, 0.3, 16)),    # gold and proxy fall together
  ([0.3, 0.4, 0.5, 0.45, 0.40, 0.52, 0.45, 0.44], np.linspace(0.3, 0.9, 16)),   # falls twice, then a new best
])
def test_does_not_fire_on_a_plateau_a_joint_decline_or_a_recovery(gold, proxy):
  m = monitor()
  assert replay(run_records(list(proxy), gold), m) is None
  assert all(h["step"] % 2 == 0 for h in m.history) and len(m.history) == len(gold)


def test_step0_best_uses_the_first_logged_proxy_and_proxy_is_averaged_between_evaluations():
  m = monitor(n=2)
  recs = [{"step": 0, "eval/accuracy": 0.5}, {"step": 1, "reward_mean": 0.1}, {"step": 2, "reward_mean": 0.3},
          {"step": 2, "eval/accuracy": 0.4}, {"step": 3, "reward_mean": 0.5}, {"step": 4, "reward_mean": 0.7},
          {"step": 4, "eval/accuracy": 0.3}]
  d = replay(recs, m)
  assert [h["proxy"] for h in m.history][1:] == [pytest.approx(0.2), pytest.approx(0.6)]
  assert math.isnan(m.history[0]["proxy"])
  assert d is not None and d.step == 4 and d.gold_best_step == 0 and d.proxy_at_best == pytest.approx(0.2)


def test_trend_is_the_least_squares_slope_and_state_round_trips():
  gold = [0.1, 0.3, 0.2, 0.6]
  m = RewardHackingMonitor("reward_mean", ["eval/accuracy"], window=3)
  out = {}
  for r in run_records([0.1] * 6, gold, every=2):
    out = m.update(r) or out
  want = np.polyfit([2 / 1000, 4 / 1000, 6 / 1000], gold[1:], 1)[0]
  assert out["monitor/accuracy/trend"] == pytest.approx(want)
  assert out["monitor/stop"] == 0.0 and m.decision is None  # no stop rule: log only
  # a resumed monitor continues exactly
  recs = run_records(list(np.linspace(0.3, 0.9, 20)), [0.3, 0.4, 0.5, 0.45, 0.40, 0.35, 0.3, 0.25], every=2)
  a, b = monitor(), monitor()
  for r in recs[:9]:
    a.update(r)
    b.update(r)
  c = monitor()
  c.load_state_dict(json.loads(json.dumps(b.state_dict())))
  assert [a.update(r) for r in recs[9:]] == [c.update(r) for r in recs[9:]]
  assert a.decision == c.decision is not None


def test_arguments_and_stop_when_errors():
  assert parse_stop_when("gold_falls:4", 0.1) == StopRule(4, 0.1)
  for bad in ("gold_falls", "gold_falls:0", "falls:3", 3):
    with pytest.raises(ValueError, match="stop_when"):
      parse_stop_when(bad)
  with pytest.raises(ValueError, match="patience"):
    StopRule(0)
  with pytest.raises(ValueError, match="min_drop"):
    StopRule(2, -0.1)
  with pytest.raises(ValueError, match="gold_keys"):
    RewardHackingMonitor("reward_mean", [])
  with pytest.raises(ValueError, match="proxy"):
    RewardHackingMonitor("eval/accuracy", ["eval/accuracy"])
  with pytest.raises(ValueError, match="window"):
    RewardHackingMonitor("reward_mean", ["eval/accuracy"], window=1)
  with pytest.raises(ValueError, match="step"):
    monitor().update({"reward_mean": 1.0})


def config(kind="llm", **eval_keys):
  c = ml_collections.ConfigDict({"eval_every": 25, "eval": dict(MONITOR_DEFAULTS)})
  with c.eval.ignore_type():  # the bad-value cases change a key's type
    for k, v in eval_keys.items():
      c.eval[k] = v
  return c


def test_config_keys_validated_and_built():
  validate_monitor_config(config(), "llm")
  assert monitor_from_config(config(), "llm") is None  # no gold reward: no monitor
  c = config(gold_rewards=("exact_match",), stop_when="gold_falls:3", stop_min_drop=0.02)
  validate_monitor_config(c, "llm")
  m = monitor_from_config(c, "llm")
  assert m.gold_keys == ("eval/gold/exact_match",) and m.proxy_key == "reward_mean"
  assert m.stop_rule == StopRule(3, 0.02)
  f = config("flow", gold_rewards=("judge",), proxy_metric="eval/reward_mean")
  validate_monitor_config(f, "flow")
  assert gold_metric_keys(f, "flow") == ("eval/gold/judge_reward",)
  assert monitor_from_config(f, "flow").proxy_key == "eval/reward_mean"
  bad = [(config(gold_rewards="exact_match"), "llm", "eval.gold_rewards"),
         (config(gold_rewards=("no_such_reward",)), "llm", "eval.gold_rewards"),
         (config(gold_rewards=("clip",)), "flow", "eval.gold_rewards"),
         (config(gold_rewards=("exact_match",), stop_when="gold_falls:x"), "llm", "eval.stop_when"),
         (config(stop_when="gold_falls:2"), "llm", "eval.stop_when"),
         (config(gold_rewards=("exact_match",), stop_min_drop=-1.0), "llm", "eval.stop_min_drop"),
         (config(monitor_window=1), "llm", "eval.monitor_window")]
  for c, kind, key in bad:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
      validate_monitor_config(c, kind, resolve_reward=resolve_reward_function)
    assert err.value.key == key
  c = config(gold_rewards=("exact_match",), stop_when="gold_falls:2")
  c.eval_every = 0
  with pytest.raises(ConfigError, match="eval_every"):
    validate_monitor_config(c, "llm")


def test_llm_gold_rewards_scored_on_held_out_completions():
  out = score_gold_rewards(["exact_match", "adrpo_jax.rl.proxy_rewards:length_credit"], ["1+1=", "2+2="],
                           ["2", "5555"], {"answer": ["2", "4"]}, resolve_reward=resolve_reward_function)
  assert out == {"eval/gold/exact_match": 0.5, "eval/gold/length_credit": pytest.approx((0.25 + 1.0) / 2)}


def test_recorded_runs_fire_on_hacking_and_not_on_regularized():
  """Recorded runs of issue 27's LLM dense sweep (the training reward and the held-out exact match of each
  logged step; GRPO and ADRPO, seeds 0-2): at beta 0.01 the policy pads its answers (length credit ~0.93,
  held-out accuracy 0.26 -> ~0.06), at beta 0.6 it does not (accuracy up). With the allowed drop at about two
  standard errors of a 256-problem accuracy (0.05) the rule fires on every hacking run, early (within the first
  half of the run, at the latest 100 steps after the gold's best), and on no regularized run."""
  runs = json.loads(DATA.read_text())
  assert sum(e["hacking"] for e in runs.values()) == 6 and len(runs) == 12
  for name, entry in runs.items():
    assert (entry["held_out_end"] < entry["held_out_start"]) == entry["hacking"], name  # the labels' meaning
    m = RewardHackingMonitor("reward_mean", ["eval/accuracy"], stop_rule=parse_stop_when("gold_falls:3", 0.05))
    d = replay(entry["records"], m)
    assert (d is not None) == entry["hacking"], name
    if d is not None:
      assert d.gold < d.gold_best - 0.05 and d.proxy > d.proxy_at_best
      assert d.step <= 150 and d.step - d.gold_best_step <= 100


def test_recorded_regularized_runs_show_why_the_drop_must_exceed_the_eval_noise():
  """With a drop below the evaluation noise (0.02 < 2 standard errors) the rule also fires late in some
  regularized runs (their gold wobbles below a noisy running best): the false alarm the allowed drop is for."""
  runs = json.loads(DATA.read_text())
  fired = {name: replay(e["records"], RewardHackingMonitor("reward_mean", ["eval/accuracy"],
                                                           stop_rule=StopRule(3, 0.02)))
           for name, e in runs.items() if not e["hacking"]}
  late = [d for d in fired.values() if d is not None]
  assert late and all(d.step >= 150 for d in late)
