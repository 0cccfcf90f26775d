"""Every table of experiments/README.md is what ``python experiments/_sweep.py --report`` renders from the
committed JSON files (the report blocks), and the rendering helpers state their convention."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from scipy import stats

EXP = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXP))

import _report  # noqa: E402  pylint: disable=wrong-import-position


def test_readme_tables_regenerate_from_the_json_files():
  text = (EXP / "README.md").read_text()
  blocks = _report.blocks_of(text)
  assert {"decisive_block1", "decisive_tests", "llm_dense", "monitor_replay", "issue15_flow_compare",
          "audio"} <= set(blocks)
  rendered = _report.render(list(blocks))
  stale = [name for name, content in blocks.items() if rendered[name] != content]
  assert not stale, f"README blocks differ from the JSON files: {stale} (python experiments/_sweep.py --report)"
  assert _report.update(text, rendered) == text


def test_formatting_convention_is_mean_and_95pct_t_half_width():
  v = [1.0, 2.0, 4.0]
  half = stats.t.ppf(0.975, 2) * stats.tstd(v) / math.sqrt(3)
  assert _report.fmt(v) == f"{sum(v) / 3:.3f} ± {half:.3f}"
  assert _report.fmt([2.5]) == "2.500" and _report.fmt([]) == ""
  # a stored population sd (ddof 0) of n = 3 seeds is 1.22x too small: converted
  sd0 = stats.tstd(v) * math.sqrt(2 / 3)
  assert _report.fmt_summary(sum(v) / 3, sd0, 3) == _report.fmt(v)
  deltas, mean, p, same = _report.paired({0: 1.0, 1: 2.0, 2: 3.5}, {0: 0.5, 1: 1.0, 2: 1.0})
  assert deltas == "+0.500 / +1.000 / +2.500" and same == "3/3"
  assert p == f"{stats.ttest_1samp([0.5, 1.0, 2.5], 0.0).pvalue:.2f}" and mean.startswith("+1.333 [")


def test_update_replaces_blocks_and_rejects_unknown_names():
  text = "a\n<!-- BEGIN report:audio -->\nold\n<!-- END report:audio -->\nb\n"
  new = _report.update(text, {"audio": "NEW"})
  assert new == "a\n<!-- BEGIN report:audio -->\nNEW\n<!-- END report:audio -->\nb\n"
  with pytest.raises(ValueError, match="nope"):
    _report.update("<!-- BEGIN report:nope -->\nx\n<!-- END report:nope -->", {"audio": ""})
