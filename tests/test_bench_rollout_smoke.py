"""benchmarks/bench_rollout.py runs its continuous and packing parts on a toy size (slow: several compilations)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.slow
def test_bench_rollout_toy(tmp_path):
    import bench_rollout  # noqa: E402
    out = tmp_path / "r.json"
    result = bench_rollout.main(["--parts", "continuous,packing", "--rows", "2", "--requests", "4", "--max-new", "16",
                                 "--prompt-len", "4", "--update-rows", "4", "--group-size", "2", "--pack-tokens", "40",
                                 "--repeats", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["continuous"]["useful_tokens"] == result["continuous"]["useful_tokens"] > 0
    assert saved["packing"]["real_tokens"] < saved["packing"]["padded_tokens"]
    assert {"speedup_cpu", "speedup_wall"} <= set(saved["continuous"])


@pytest.mark.slow
def test_bench_rollout_toy_real_lengths(tmp_path):
    """--lengths histogram: the continuous part on lengths drawn from the committed real-run histogram."""
    import bench_rollout
    result = bench_rollout.main(["--parts", "continuous", "--lengths", "histogram", "--rows", "2", "--requests", "4",
                                 "--max-new", "16", "--prompt-len", "4", "--repeats", "1",
                                 "--json", str(tmp_path / "r.json")])
    cont = result["continuous"]
    assert cont["lengths"]["distribution"] == "histogram" and cont["lengths"]["scale"] == 16 / 32768
    assert 1 <= cont["length_max"] <= 16 and cont["useful_tokens"] > 0


def test_histogram_lengths_follow_the_committed_histogram():
    """The committed histogram is consistent (provenance, counts), and the draws scaled to a budget keep its mean
    and its share of completions cut at the source's budget (sampling noise of 40,000 draws: tolerances ~4 sd)."""
    import bench_rollout
    import numpy as np
    hist = bench_rollout.load_length_histogram(bench_rollout.DEFAULT_LENGTHS_FILE)
    assert sum(hist["counts"]) == hist["completions"] >= 500
    assert hist["source"]["commit"] and hist["source"]["repository"] and hist["budget_tokens"] == 32768
    x = bench_rollout.histogram_lengths(40_000, 512, seed=3)
    assert x.dtype == np.int32 and x.min() >= 1 and x.max() <= 512
    assert np.array_equal(x, bench_rollout.histogram_lengths(40_000, 512, seed=3))
    assert abs(x.mean() - hist["mean"] * 512 / 32768) < 0.03 * hist["mean"] * 512 / 32768
    cut = hist["cut_at_context_limit"] / hist["completions"]
    assert abs(np.mean(x >= 500) - cut) < 0.01 + 4 * np.sqrt(cut * (1 - cut) / x.size)


def test_histogram_lengths_scaling_and_bad_files(tmp_path):
    import json

    import bench_rollout
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"bin_edges": [0, 10, 20], "counts": [0, 5], "budget_tokens": 20}))
    x = bench_rollout.histogram_lengths(1000, 40, seed=0, path=str(path))  # [10, 20) scaled x2 -> [20, 40]
    assert x.min() >= 20 and x.max() <= 40
    for bad, field in (({"bin_edges": [0, 10, 5], "counts": [1, 1], "budget_tokens": 20}, "bin_edges"),
                       ({"bin_edges": [0, 10, 20], "counts": [0, 0], "budget_tokens": 20}, "counts"),
                       ({"bin_edges": [0, 10, 20], "counts": [1, 1]}, "budget_tokens")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=field):
            bench_rollout.histogram_lengths(10, 40, seed=0, path=str(path))
