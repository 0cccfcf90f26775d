"""The benchmark scripts' Python parts import and parse on CPU (they run by hand / on a lent GPU)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_train_step  # noqa: E402
import gpu_smoke  # noqa: E402


def test_bench_train_step_dry_run_plan():
  plan = bench_train_step.main(["--dry-run", "--skip-time", "--completion-lengths", "1024,4096"])
  assert plan["memory"]["lengths"] == [[1088, 1024], [4160, 4096]] or plan["memory"]["lengths"] == [
      (1088, 1024), (4160, 4096)]
  assert [v.split(" ")[0] for v in plan["memory"]["variants"]] == ["default", "default", "xla", "one"]
  with pytest.raises(ValueError, match="'flash'"):
    bench_train_step.main(["--dry-run", "--skip-time", "--variants", "default,flash"])


def test_gpu_smoke_fails_loudly_without_gpu():
  if gpu_smoke.gpu_visible():
    pytest.skip("a GPU is visible")
  assert gpu_smoke.main([]) == 2


def test_gpu_smoke_shell_fails_without_gpu():
  if gpu_smoke.gpu_visible():
    pytest.skip("a GPU is visible")
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_smoke.sh")], capture_output=True, text=True,
                        timeout=60, env=dict(os.environ, PYTHON=sys.executable))
  assert proc.returncode == 2 and "FAILED" in proc.stderr


@pytest.mark.slow
def test_gpu_smoke_dry_run_passes():
  """The comparison code on CPU with 'chunked' standing in for 'cudnn' (~30 s)."""
  assert gpu_smoke.main(["--dry-run"]) == 0


@pytest.mark.slow
def test_bench_decode_layouts_runs_a_tiny_grid(capsys):
  """One short completion, both layouts, the decode kernel: the table prints (timings are not checked)."""
  import bench_decode_layouts
  bench_decode_layouts.main(["--new-tokens", "2", "--impls", "decode", "--batch", "2", "--prompt-len", "4",
                             "--repeats", "1"])
  assert "| 2 (6) | decode |" in capsys.readouterr().out
