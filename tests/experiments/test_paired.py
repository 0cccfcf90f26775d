"""experiments/_sweep.py seed-paired differences (`paired_deltas`, the `--paired` command line) on hand-made runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXP))

import _sweep  # noqa: E402  pylint: disable=wrong-import-position


def _run(workdir: Path, label: str, seed: int, values: dict[int, float], done: bool = True) -> None:
  d = workdir / label / f"seed{seed}"
  d.mkdir(parents=True)
  (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/r": v}) + "\n" for s, v in values.items()))
  if done:
    (d / "DONE").write_text("")


@pytest.fixture()
def sweep(tmp_path):
  for seed, (a, b) in enumerate([(1.0, 0.5), (2.0, 1.0), (0.0, 0.5)]):
    _run(tmp_path, "a", seed, {0: 0.0, 10: a})
    _run(tmp_path, "b", seed, {0: 0.0, 10: b})
  _run(tmp_path, "a", 3, {10: 9.0})  # no partner seed in "b": left out
  _run(tmp_path, "b", 4, {10: 9.0}, done=False)
  return tmp_path


def test_paired_deltas_final_and_at_a_step(sweep):
  out = _sweep.paired_deltas(sweep, [("a", "b")], ["eval/r"])["a - b"]["eval/r"]
  assert out["deltas"] == {0: 0.5, 1: 1.0, 2: -0.5}
  assert out["mean"] == pytest.approx(1 / 3)
  assert out["std"] == pytest.approx(0.7637626, rel=1e-6)  # sample std (ddof=1) of 0.5, 1, -0.5
  assert out["same_sign"] == 2
  at0 = _sweep.paired_deltas(sweep, [("a", "b")], ["eval/r"], step=0)["a - b"]["eval/r"]
  assert at0["deltas"] == {0: 0.0, 1: 0.0, 2: 0.0}
  table = _sweep.paired_markdown(_sweep.paired_deltas(sweep, [("a", "b")], ["eval/r"]))
  assert "| a - b | eval/r | +0.500, +1.000, -0.500 | +0.333 ± 0.764 | 2/3 |" in table


def test_paired_errors_name_the_bad_input(sweep):
  with pytest.raises(ValueError, match="no finished seed of both 'a' and 'c'"):
    _sweep.paired_deltas(sweep, [("a", "c")], ["eval/r"])
  proc = subprocess.run([sys.executable, str(EXP / "_sweep.py"), "--paired", str(sweep), "a-b", "--keys", "eval/r"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "pair 'a-b' must be A:B" in proc.stderr
  proc = subprocess.run([sys.executable, str(EXP / "_sweep.py"), "--paired", str(sweep), "a:b", "--keys", "eval/r"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and "| a - b | eval/r |" in proc.stdout
