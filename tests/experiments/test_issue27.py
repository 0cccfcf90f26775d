"""Issue 27's pre-registered analyses (pure functions on per-seed numbers) and grids (fast)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

EXP = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXP))

import _sweep  # noqa: E402  pylint: disable=wrong-import-position
import decisive_test as dt  # noqa: E402  pylint: disable=wrong-import-position
import llm_dense_beta as ld  # noqa: E402  pylint: disable=wrong-import-position


def test_t_interval_is_ddof1_with_t_quantile():
  v = [1.0, 2.0, 4.0]
  ci = _sweep.t_interval(v)
  sd = np.std(v, ddof=1)
  assert ci["sd"] == pytest.approx(sd) and ci["n"] == 3
  assert ci["half"] == pytest.approx(stats.t.ppf(0.975, 2) * sd / np.sqrt(3))
  assert np.isnan(_sweep.t_interval([1.0])["half"])


def test_one_sided_t_matches_scipy_and_decision_rule():
  d = [0.01, 0.03, -0.005, 0.02, 0.015, 0.025]
  got = dt.one_sided_t(d, "greater")
  want = stats.ttest_1samp(d, 0.0, alternative="greater")
  assert got["t"] == pytest.approx(want.statistic) and got["p_one_sided"] == pytest.approx(want.pvalue)
  assert dt.one_sided_t(d, "less")["p_one_sided"] == pytest.approx(1 - want.pvalue)
  assert dt.decide(got, dt.one_sided_t(d, "less")) == "beyond"
  neg = [-x for x in d]
  assert dt.decide(dt.one_sided_t(neg, "greater"), dt.one_sided_t(neg, "less")) == "below"
  tiny = [0.001, -0.002, 0.0015, -0.001, 0.0005, -0.0005]
  assert dt.decide(dt.one_sided_t(tiny, "greater"), dt.one_sided_t(tiny, "less")) == "equivalent"
  wide = [0.2, -0.25, 0.1, -0.15, 0.05, -0.02]
  assert dt.decide(dt.one_sided_t(wide, "greater"), dt.one_sided_t(wide, "less")) == "inconclusive"


def test_holm():
  assert dt.holm({"a": 0.01, "b": 0.02, "c": 0.5}) == {"a": True, "b": True, "c": False}
  assert dt.holm({"a": 0.03, "b": 0.04}) == {"a": False, "b": False}  # 0.03 > 0.05 / 2


def synthetic(offset_adrpo=0.05, noise=0.0, seeds=range(6)):
  """Each seed's fixed-beta points on the concave, falling y = 5 - 0.5 x - 0.05 x^2 (x = diversity), ADRPO
  ``offset`` above it, CRD ``offset`` below."""
  rng = np.random.default_rng(0)
  f = lambda x: 5 - 0.5 * x - 0.05 * x * x  # noqa: E731
  per_seed = {}
  for s in seeds:
    shift = rng.normal() * 0.3  # a seed effect: both arms share it
    for b in dt.BLOCKS[1.0]:
      x = 4.0 + b + 0.1 * shift
      per_seed.setdefault(dt.label("fixed", b), {})[s] = {"eval/diversity": x, dt.REWARD: f(x) + shift
                                                           + noise * rng.normal(),
                                                           "eval/gold/judge_fd_pretrained": 10 - x}
    x = 4.0 + 0.9 + 0.1 * shift
    per_seed.setdefault("adrpo_b1", {})[s] = {"eval/diversity": x, dt.REWARD: f(x) + shift + offset_adrpo,
                                              "eval/gold/judge_fd_pretrained": 10 - x}
    per_seed.setdefault("crd_b1", {})[s] = {"eval/diversity": x, dt.REWARD: f(x) + shift - offset_adrpo,
                                            "eval/gold/judge_fd_pretrained": 10 - x}
  return per_seed


def test_gap_to_each_seeds_own_frontier_recovers_the_offset():
  per_seed = synthetic(0.05)
  fixed = [dt.label("fixed", b) for b in dt.BLOCKS[1.0]]
  g = dt.gaps(per_seed, "adrpo_b1", fixed, "eval/diversity", True)
  np.testing.assert_allclose(list(g["quadratic"].values()), 0.05, atol=1e-9)  # the seed effect cancels
  assert g["outside"] == []
  # the envelope joins the points with lines: on a concave curve it lies below it, so its gap is a bit larger
  assert all(0.05 - 1e-12 <= v < 0.06 for v in g["envelope"].values())
  g_fd = dt.gaps(per_seed, "adrpo_b1", fixed, "eval/gold/judge_fd_pretrained", False)
  np.testing.assert_allclose(list(g_fd["quadratic"].values()), 0.05, atol=1e-9)
  a = dt.analyze(per_seed, blocks=(1.0,))
  assert a["adrpo_b1|diversity"]["primary"] and a["adrpo_b1|diversity"]["decision"] == "beyond"
  assert a["crd_b1|diversity"]["decision"] == "below"
  np.testing.assert_allclose(list(a["crd_minus_adrpo|b1|diversity"]["diff"].values()), -0.1, atol=1e-9)
  assert "crd_b1|judge_fd" in a["holm"]["pvalues"] and "adrpo_b1|diversity" not in a["holm"]["pvalues"]
  noisy = dt.analyze(synthetic(0.0, noise=0.02), blocks=(1.0,))
  assert noisy["adrpo_b1|diversity"]["decision"] in ("equivalent", "inconclusive")


def test_frontier_helpers():
  q = dt.quadratic_frontier([0, 1, 2, 3], [0, 1, 4, 9])
  assert q(1.5) == pytest.approx(2.25)
  env = dt.envelope_frontier([1, 2, 3], [3, 2, 0], x_larger_better=True)
  assert env(2.5) == pytest.approx(1.0) and env(4) == pytest.approx(-2.0)  # extrapolated past the end
  assert dt.mean_coefficient([{"step": 10, "beta_eff_mean": 0.8}, {"step": 20, "beta_eff_mean": 1.0}]) == \
      pytest.approx(0.9)


def test_grids(capsys):
  specs = dt.build_specs(dt.SEEDS, list(dt.BLOCKS))
  n1, n3 = len(dt.BLOCKS[1.0]) + 2, len(dt.BLOCKS[0.3]) + 2
  assert len(specs) == len(dt.SEEDS) * (n1 + n3) + len(dt.NONE_SEEDS)
  crd = [s for s in specs if s.label == "crd_b1" and s.seed == 0][0]
  assert crd.overrides == {"rl.method": "adrpo", "rl.beta": 1.0, "rl.coefficient_sign": "crd"}
  assert crd.steps == 300 and crd.eval_every == 100
  cfg = _sweep.build_config(crd.to_json())
  assert cfg.rl.coefficient_sign == "crd" and cfg.total_steps == 300
  assert 0.88 in dt.BLOCKS[1.0] and {0.5, 0.65, 0.8, 0.92, 1.0, 1.3} <= set(dt.BLOCKS[1.0])
  orw = dt.build_specs(dt.SEEDS, [1.0], orw=True)
  assert len(orw) == len(dt.ORW_TAUS) * len(dt.ORW_SEEDS) and orw[0].variant == "cpu_orw"
  llm = ld.build_specs(ld.SEEDS)
  assert len(llm) == len(ld.SEEDS) * (2 * len(ld.BETAS) + len(ld.CRD_BETAS))
  c = _sweep.build_config([s for s in llm if s.family == "crd"][0].to_json())
  assert c.rl.coefficient_sign == "crd" and c.rl.adaptive and c.rewards.weights == (1.0, 0.5)
  g = _sweep.build_config([s for s in llm if s.family == "grpo"][0].to_json())
  assert not g.rl.adaptive and g.eval_every == 25


def test_llm_analysis_best_beta_and_range():
  rng = np.random.default_rng(1)
  acc = {}
  for m, peak in (("grpo", 0.3), ("adrpo", 0.3)):
    for b in ld.BETAS:
      base = 0.5 - 0.1 * (np.log10(b) - np.log10(peak)) ** 2 + (0.03 if m == "adrpo" else 0.0)
      acc.setdefault(m, {})[b] = {s: base + 0.005 * rng.normal() for s in range(6)}
  a = ld.analyze(acc, n_boot=50)
  assert a["best_beta"] == {"grpo": 0.3, "adrpo": 0.3}
  assert a["best_diff"]["test"]["mean"] == pytest.approx(0.03, abs=0.01) and a["best_diff"]["p_two_sided"] < 0.01
  assert a["range"]["adrpo"]["width_decades"] >= a["range"]["grpo"]["width_decades"]
  assert ld.held_out_accuracy(([0, 250, 275, 300], [0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.3)
  assert np.isnan(ld.held_out_accuracy(([0, 250], [0.1, 0.2])))
