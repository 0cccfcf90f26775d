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


_TINY_TUNIX = ["--vocab", "256", "--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "2",
               "--kv-heads", "2", "--batch", "2", "--prompt-len", "4", "--new-tokens", "3", "--long-new-tokens", "5",
               "--long-batch", "2", "--update-rows", "4", "--update-len", "10", "--group", "2", "--reps", "1",
               "--long-reps", "1", "--modes", "greedy,top_p"]


@pytest.mark.slow
def test_bench_tunix_ours_side_runs_tiny(tmp_path):
  """bench_tunix.py without tunix (ours only, two layer layouts side by side): every case is timed, ratios are
  taken against the first variant and the JSON is written (~20 s)."""
  import json

  import bench_tunix
  out = tmp_path / "t.json"
  result = bench_tunix.main(_TINY_TUNIX + ["--sides", "ours", "--ours", "scan,unrolled", "--json", str(out)])
  assert set(result["cases"]) == {"greedy_short", "top_p_short", "greedy_long", "top_p_long", "grpo_update"}
  sides = result["cases"]["grpo_update"]["sides"]
  assert set(sides) == {"ours:scan", "ours:unrolled"} and sides["ours:unrolled"]["speedup_vs_ours:scan"] > 0
  assert json.loads(out.read_text())["params"] == result["params"]
  with pytest.raises(ValueError, match="'nope'"):
    bench_tunix.main(_TINY_TUNIX + ["--sides", "ours", "--modes", "nope"])


def _tunix_python():
  """An interpreter with google-tunix: this one, or $TUNIX_PYTHON (its own venv, requirements-bench-tunix.txt)."""
  import importlib.util
  if importlib.util.find_spec("tunix") is not None:
    return sys.executable
  return os.environ.get("TUNIX_PYTHON")


@pytest.mark.slow
def test_bench_tunix_both_sides_tiny(tmp_path):
  """The identical-output checks (log-probs, greedy tokens, first GRPO update) pass against Tunix and every case
  is timed on both sides (~1-2 min; skipped without a tunix interpreter: set TUNIX_PYTHON)."""
  import json
  python = _tunix_python()
  if not python:
    pytest.skip("google-tunix is not installed here and TUNIX_PYTHON is not set")
  out = tmp_path / "t.json"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([python, os.path.join(ROOT, "benchmarks", "bench_tunix.py"), *_TINY_TUNIX, "--json", str(out)],
                        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["checks"]["failed"] == [] and result["checks"]["logp_max_abs_diff_ours_vs_tunix"] < 1e-5
  assert all("speedup_vs_tunix" in case["sides"]["ours:default"] for case in result["cases"].values())


@pytest.mark.slow
def test_bench_decode_mbu_runs_tiny_and_reports_both_statistics(capsys):
  """A tiny model, both layer executions, 2 rounds: the best-of and the per-round (paired with each round's copy
  bandwidth) MBU are in the result and the table (timings are not checked)."""
  import bench_decode_mbu
  result = bench_decode_mbu.main(["--vocab", "64", "--hidden", "32", "--intermediate", "64", "--layers", "2",
                                  "--heads", "2", "--kv-heads", "1", "--batch", "2", "--prompt-len", "4",
                                  "--steps", "2,4", "--rounds", "2"])
  assert set(result["variants"]) == {"scan", "unrolled"} and len(result["copy_bandwidth_all"]) == 2
  for r in result["variants"].values():
    assert len(r["step_ms_rounds"]) == 2 and "mbu_rounds_median" in r and "mbu_rounds_quartiles" in r
  assert "MBU per round, median" in capsys.readouterr().out
