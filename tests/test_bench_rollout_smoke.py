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
