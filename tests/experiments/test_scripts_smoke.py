"""Slow 2-step smoke runs of the issue-15 scripts not covered by test_sweep.py's smoke: reward_hacking.py and
ablations.py, both sides (the cached builtin:tiny_arith model and pre-trained DiT; tiny evaluations)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXP))

pytestmark = pytest.mark.slow


def test_reward_hacking_both_sides_two_steps(tmp_path):
  import reward_hacking  # pylint: disable=import-outside-toplevel
  out = reward_hacking.main(["--side", "llm", "--workdir", str(tmp_path / "llm"), "--seeds", "0", "--betas", "0.3",
                             "--steps", "2", "--eval-every", "2", "--jobs", "2", "--set", "eval.num_examples=16"])
  assert set(out["summary"]) == {"grpo_beta0.3", "adrpo_beta0.3"}
  assert "eval/accuracy" in out["summary"]["adrpo_beta0.3"]
  assert (tmp_path / "llm" / "results.json").exists()
  out = reward_hacking.main(["--side", "flow", "--workdir", str(tmp_path / "flow"), "--seeds", "0", "--betas", "1",
                             "--no-none", "--steps", "2", "--eval-every", "2", "--jobs", "2",
                             "--set", "eval.samples_per_prompt=4"])
  assert set(out["summary"]) == {"adrpo_beta1", "fixed_beta_beta1"}
  assert "eval/thickness_accuracy" in out["summary"]["adrpo_beta1"]


def test_ablations_both_sides_two_steps(tmp_path):
  import ablations  # pylint: disable=import-outside-toplevel
  out = ablations.main(["--side", "llm", "--workdir", str(tmp_path / "llm"), "--seeds", "0", "--steps", "2",
                        "--only", "default", "kl_k1", "--jobs", "2", "--set", "eval.num_examples=16"])
  assert set(out["summary"]) == {"default", "kl_k1"}
  out = ablations.main(["--side", "flow", "--workdir", str(tmp_path / "flow"), "--seeds", "0", "--steps", "2",
                        "--only", "default", "cfm_clip_on", "--jobs", "2", "--set", "eval.samples_per_prompt=4"])
  assert set(out["summary"]) == {"default", "cfm_clip_on"}
  assert "eval/w2_bound" in out["summary"]["cfm_clip_on"]
