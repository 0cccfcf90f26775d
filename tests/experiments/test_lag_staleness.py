"""experiments/lag_staleness.py (issue 26): its analysis and tables on synthetic runs (fast), and a slow 2-step
end-to-end run of the script (lags 0 and 1, one seed) in a tmp dir."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from scipy import stats

EXP = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXP))

import lag_staleness  # noqa: E402  pylint: disable=wrong-import-position


def _run(lag, seed, reward, acc):
  return {"lag": lag, "seed": seed, "wall_time_s": 10.0 + lag,
          "final": {"reward_end": reward, "eval/accuracy": acc, "eval_start": 0.25, "lag_mean": float(lag),
                    "clip_fraction_run_mean": 0.01 * lag}}


def test_grid_analysis_and_report():
  specs = lag_staleness.build_specs()
  assert [s.key for s in specs][:3] == ["lag0/seed0", "lag0/seed1", "lag0/seed2"] and len(specs) == 9
  assert {s.overrides["rl.max_lag"] for s in specs} == {0, 1, 2}
  assert all(s.variant == "cpu" and s.steps == 300 and s.eval_every == 75 for s in specs)
  assert lag_staleness.reward_end(([10, 20, 30, 40], [0.1, 0.2, 0.3, 0.7])) == pytest.approx(0.4)
  runs = {f"lag{k}/seed{s}": _run(k, s, 0.3 + 0.01 * s - 0.02 * k * (s + 1), 0.4 - 0.01 * k)
          for k in (0, 1) for s in (0, 1, 2)}
  a = lag_staleness.analyze(runs)
  p = a["paired"]["1"]["reward_end"]
  d = [-0.02, -0.04, -0.06]
  assert list(p["deltas"].values()) == pytest.approx(d)
  half = stats.t.ppf(0.975, 2) * stats.tstd(d) / 3 ** 0.5
  assert (p["mean"], p["lo"], p["hi"]) == pytest.approx((-0.04, -0.04 - half, -0.04 + half))
  assert a["per_lag"]["0"]["reward_end"]["sd"] == pytest.approx(0.01)
  results = json.loads(json.dumps({"design": {"seeds": [0, 1, 2]}, "analysis": a}))  # as read from the file
  md = lag_staleness.report(results)
  assert "| lag 1 - lag 0 | train exact match, last 3 logs | -0.020 / -0.040 / -0.060 | -0.040 [" in md
  assert "| 0 | 0.310 (sd 0.010; 0.300 / 0.310 / 0.320) |" in md


@pytest.mark.slow
def test_script_end_to_end_two_steps(tmp_path, capsys):
  out = lag_staleness.main(["--workdir", str(tmp_path), "--seeds", "0", "--lags", "0", "1", "--steps", "2",
                            "--eval-every", "2", "--log-every", "1", "--jobs", "2",
                            "--set", "eval.num_examples=16"])
  assert set(out["runs"]) == {"lag0/seed0", "lag1/seed0"}
  lag0, lag1 = out["runs"]["lag0/seed0"], out["runs"]["lag1/seed0"]
  assert lag0["final"]["lag_mean"] == 0.0
  assert lag1["final"]["lag_mean"] == pytest.approx(0.5)  # step 0 samples with version 0 (lag 0), step 1 lag 1
  assert lag1["config"]["rl"]["max_lag"] == 1 and lag1["config"]["rl"]["importance_correction"] == "none"
  assert 0.0 <= lag1["final"]["eval/accuracy"] <= 1.0 and lag1["wall_time_s"] > 0
  results = tmp_path / "issue26_lag_staleness.json"
  assert results.exists() and results.with_suffix(".png").exists()
  capsys.readouterr()
  lag_staleness.main(["--report", "--out", str(results)])
  assert "| lag 1 - lag 0 |" in capsys.readouterr().out
