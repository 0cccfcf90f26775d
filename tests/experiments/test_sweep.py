"""experiments/_sweep.py helpers and the issue-15 scripts' grids (fast); a slow 2-step smoke run of the scripts."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXP))

import _sweep  # noqa: E402  pylint: disable=wrong-import-position


def test_pareto_front_both_directions():
  pts = [(1.0, 1.0), (2.0, 0.5), (0.5, 0.2), (3.0, 3.0), (2.5, 2.0)]
  # x smaller is better (a distance): (0.5, 0.2), (1, 1), (2.5, 2)? no: (3, 3) has the best y
  assert _sweep.pareto_front(pts, x_larger_better=False) == [(0.5, 0.2), (1.0, 1.0), (2.5, 2.0), (3.0, 3.0)]
  # x larger is better (diversity): (3, 3) dominates everything
  assert _sweep.pareto_front(pts, x_larger_better=True) == [(3.0, 3.0)]
  assert _sweep.pareto_front([(float("nan"), 1.0)], True) == []


def test_summarize_sensitivity_and_table():
  per_run = {"a_beta1/seed0": {"r": 1.0}, "a_beta1/seed1": {"r": 3.0}, "a_beta0.1/seed0": {"r": 0.0},
             "b_beta1/seed0": {"r": 2.0, "x": math.nan}}
  s = _sweep.summarize(per_run)
  assert s["a_beta1"]["r"] == (2.0, pytest.approx(2 ** 0.5), 2)  # sample sd (ddof 1)
  assert "x" not in s["b_beta1"]
  sens = _sweep.sensitivity(s, {"a_beta1": "a", "a_beta0.1": "a", "b_beta1": "b"},
                            {"a_beta1": 1.0, "a_beta0.1": 0.1, "b_beta1": 1.0}, "r")
  assert sens["a"]["spread"] == 2.0 and sens["a"]["best_beta"] == 1.0 and sens["b"]["spread"] == 0.0
  table = _sweep.markdown_table(s, [("r", "reward")])
  assert "| a_beta1 | 2.000 ± 1.414 | 2 |" in table
  assert "spread" in _sweep.sensitivity_markdown(sens, "r")


def test_curves_best_point_and_final_eval():
  recs = [{"step": 0, "acc": 0.1}, {"step": 10, "acc": 0.5}, {"step": 10, "acc": 0.4}, {"step": 20, "acc": 0.3},
          {"step": 20, "other": 1}]
  assert _sweep.eval_curve(recs, "acc") == ([0, 10, 20], [0.1, 0.4, 0.3])  # the last record of a step wins
  assert _sweep.best_point(recs, "acc") == (10, 0.4)
  assert _sweep.final_eval(recs, ["acc", "other"]) == {"acc": 0.3, "other": 1.0}
  assert _sweep.final_eval(recs, ["acc"], step=0) == {"acc": 0.1}


def test_build_config_overrides_and_resume_marker(tmp_path):
  spec = _sweep.RunSpec("x", "llm_arith", "cpu_grpo", {"rl.beta": 1, "rewards.weights": [1.0, 0.5],
                                                       "data.arithmetic.max_digits": 3}, 2, 7, 7)
  spec = _sweep.with_overrides([spec], ["eval.num_examples=32", "rl.kl_estimator=k1"])[0]
  config = _sweep.build_config(json.loads(json.dumps(spec.to_json())))
  assert config.rl.beta == 1.0 and isinstance(config.rl.beta, float) and config.rewards.weights == (1.0, 0.5)
  assert config.seed == 2 and config.total_steps == 7 and config.eval.num_examples == 32
  assert config.rl.kl_estimator == "k1" and not config.rl.adaptive
  with pytest.raises(ValueError, match="rl.nope"):
    _sweep.build_config({**spec.to_json(), "overrides": {"rl.nope": 1}})
  assert not _sweep.is_done(tmp_path, spec)
  d = _sweep.run_dir(tmp_path, spec)
  d.mkdir(parents=True)
  (d / "DONE").write_text(json.dumps(spec.to_json(), sort_keys=True))
  assert _sweep.is_done(tmp_path, spec)
  assert not _sweep.is_done(tmp_path, _sweep.RunSpec("x", "llm_arith", "cpu", {}, 2, 7, 7))  # another spec


def test_script_grids(capsys):
  import ablations, flow_compare, llm_hard_task, reward_hacking  # pylint: disable=import-outside-toplevel
  flow_compare.main(["--workdir", "/nonexistent", "--dry-run"])
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 3 * (4 + 4 + 4 + 1)  # ADRPO beta_0, ORW alpha, fixed beta: 4 each; none
  assert any(line.startswith("orw_cfm_w2_alpha0.1/seed0") and "'rl.alpha': 0.1" in line for line in out)
  llm_hard_task.main(["--workdir", "/nonexistent", "--dry-run"])
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 3 * 5 * 2 and "'sampling.max_prompt_length': 8" in out[0]  # beta 0.01 .. 1, GRPO + ADRPO
  reward_hacking.main(["--workdir", "/nonexistent", "--side", "flow", "--dry-run", "--seeds", "0"])
  assert "'reward.kind': 'combined'" in capsys.readouterr().out
  ablations.main(["--workdir", "/nonexistent", "--side", "llm", "--dry-run", "--seeds", "0"])
  out = capsys.readouterr().out
  assert "kl_k1/seed0" in out and "'rl.adv_clip': 'none'" in out


def test_a_preempted_child_is_not_marked_finished(tmp_path):
  """A trainer stopped by SIGTERM returns normally (``preempted``); the sweep must not mark it DONE."""
  spec = {"steps": 300}
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 100, 136)))
  assert not _sweep.finished(tmp_path, spec)  # no record at the last step
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 100, 200, 300)))
  assert _sweep.finished(tmp_path, spec)
  assert not _sweep.finished(tmp_path, spec, {"preempted": True, "step": 300})
  assert not _sweep.finished(tmp_path, spec, type("Result", (), {"preempted": True})())
  assert _sweep.finished(tmp_path, spec, {"preempted": False})


@pytest.mark.slow
def test_scripts_smoke_two_steps(tmp_path):
  """Two RL steps of one LLM run (llm_hard_task; the cached builtin:tiny_arith model) and one flow run
  (flow_compare; the cached pre-trained DiT), tiny evaluations; a second call reuses the finished runs."""
  import flow_compare, llm_hard_task  # pylint: disable=import-outside-toplevel
  out = llm_hard_task.main(["--workdir", str(tmp_path / "llm"), "--seeds", "0", "--betas", "0.1", "--steps", "2",
                            "--eval-every", "2", "--jobs", "2", "--set", "eval.num_examples=16"])
  assert set(out["summary"]) == {"grpo_beta0.1", "adrpo_beta0.1"}
  assert (tmp_path / "llm" / "llm_hard_frontier.png").exists()
  out = flow_compare.main(["--workdir", str(tmp_path / "flow"), "--seeds", "0", "--steps", "2", "--eval-every", "2",
                           "--adrpo-betas", "1", "--fixed-betas", "--orw-alphas", "--no-none", "--jobs", "1",
                           "--set", "eval.samples_per_prompt=4"])
  assert "eval/w2_bound" in out["final"]["adrpo_beta1"]
  again = flow_compare.main(["--workdir", str(tmp_path / "flow"), "--seeds", "0", "--steps", "2", "--eval-every",
                             "2", "--adrpo-betas", "1", "--fixed-betas", "--orw-alphas", "--no-none",
                             "--set", "eval.samples_per_prompt=4"])
  # the same finished runs read twice; one seed gives a nan sd (ddof 1), so compare the JSON text (NaN == NaN)
  assert json.dumps(again["final"], sort_keys=True) == json.dumps(out["final"], sort_keys=True)
