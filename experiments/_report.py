r"""Every table of ``experiments/README.md`` regenerated from the committed result files.

    python experiments/_sweep.py --report            # rewrite the README's report blocks from the JSON files
    python experiments/_sweep.py --report --check    # exit 1 if a block differs from what the JSON gives

A block is the text between ``<!-- BEGIN report:NAME -->`` and ``<!-- END report:NAME -->``; :data:`REPORTS`
maps each NAME to the function that renders it from the JSON files in ``experiments/``. A block whose JSON is
missing renders as a one-line note. ``tests/experiments/test_report.py`` checks that the README equals the
rendering.

Convention of every table: ``m ± h`` is the mean over seeds and the half-width of its 95 % t confidence interval
(``h = t_{0.975, n-1} sd / sqrt(n)``, sd the sample standard deviation, ddof 1); ``n`` seeds. Seed-paired
differences give the per-seed values, their mean, the 95 % t interval and the two-sided paired t-test p-value.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXP = Path(__file__).resolve().parent
sys.path.insert(0, str(EXP))
import _sweep  # noqa: E402  pylint: disable=wrong-import-position

BEGIN = "<!-- BEGIN report:{} -->"
END = "<!-- END report:{} -->"


# -- formatting ---------------------------------------------------------------------------------------------


def _load(name: str) -> dict[str, Any] | None:
  path = EXP / name
  return json.loads(path.read_text()) if path.exists() else None


def fmt(values: Sequence[float], digits: int = 3) -> str:
  """``m ± h`` (95 % t interval half-width) of per-seed values; ``m`` alone for one value."""
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not vals:
    return ""
  ci = _sweep.t_interval(vals)
  if ci["n"] < 2:
    return f"{ci['mean']:.{digits}f}"
  return f"{ci['mean']:.{digits}f} ± {ci['half']:.{digits}f}"


def fmt_summary(mean: float, sd_ddof0: float, n: int, digits: int = 3) -> str:
  """``m ± h`` from a stored (mean, population sd, n): sd (ddof 1) = sd0 sqrt(n / (n - 1))."""
  from scipy import stats  # pylint: disable=import-outside-toplevel

  if n < 2:
    return f"{mean:.{digits}f}"
  sd = sd_ddof0 * math.sqrt(n / (n - 1))
  return f"{mean:.{digits}f} ± {stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n):.{digits}f}"


def paired(a: Mapping[int, float], b: Mapping[int, float], digits: int = 3) -> tuple[str, str, str, str]:
  """Seed-paired ``a - b``: (per-seed deltas, mean [95 % CI], two-sided p, same-sign count)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel

  seeds = sorted(set(a) & set(b))
  d = np.asarray([a[s] - b[s] for s in seeds], np.float64)
  ci = _sweep.t_interval(d)
  p = float(stats.ttest_1samp(d, 0.0).pvalue) if d.size > 1 and d.std() > 0 else float("nan")
  same = int(np.sum(np.sign(d) == np.sign(d.mean())))
  return (" / ".join(f"{x:+.{digits}f}" for x in d), f"{ci['mean']:+.{digits}f} [{ci['lo']:+.{digits}f}, "
          f"{ci['hi']:+.{digits}f}]", f"{p:.2f}", f"{same}/{d.size}")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def by_label(per_run: Mapping[str, Mapping[str, float]]) -> dict[str, dict[int, Mapping[str, float]]]:
  """``{"label/seedS": metrics}`` -> ``{label: {S: metrics}}`` (insertion order of the labels)."""
  out: dict[str, dict[int, Mapping[str, float]]] = {}
  for key, m in per_run.items():
    lab, seed = key.rsplit("/seed", 1)
    out.setdefault(lab, {})[int(seed)] = m
  return out


def col(runs: Mapping[int, Mapping[str, float]], key: str) -> list[float]:
  return [m[key] for m in runs.values() if key in m]


def seedmap(runs: Mapping[int, Mapping[str, float]], key: str) -> dict[int, float]:
  return {s: m[key] for s, m in runs.items() if key in m}


# -- issue 15 (3 seeds), recomputed with the stated convention ----------------------------------------------


def issue15_flow_compare() -> str:
  d = _load("issue15_flow_compare.json")
  if d is None:
    return "(issue15_flow_compare.json missing)"
  keys = [("eval/reward_mean", "reward"), ("eval/diversity", "diversity"), ("eval/frechet_distance", "FD"),
          ("eval/w2_bound", "W2 bound"), ("eval/digit_accuracy", "digit acc (reward clf)"),
          ("eval/thickness_accuracy", "thick acc (reward clf)")]
  rows = []
  for lab, s in d["final"].items():
    n = s["eval/reward_mean"][2]
    rows.append([lab] + [fmt_summary(*s[k]) if k in s else "" for k, _ in keys] + [n])
  return md_table(["run (120 steps)"] + [h for _, h in keys] + ["n"], rows)


def issue15_hacking_flow() -> str:
  d = _load("issue15_hacking_flow.json")
  if d is None:
    return "(issue15_hacking_flow.json missing)"
  runs = by_label(d["per_run"])
  keys = [("eval/reward_mean", "proxy (eval)"), ("eval/digit_accuracy", "digit acc (reward clf)"),
          ("eval/thickness_accuracy", "thick acc (reward clf)"), ("eval/diversity", "diversity"),
          ("eval/frechet_distance", "FD to pre-trained")]
  rows = [[lab] + [fmt(col(r, k)) for k, _ in keys] + [len(r)] for lab, r in runs.items()]
  table = md_table(["run (120 steps)"] + [h for _, h in keys] + ["n"], rows)
  prow = []
  for b in ("0.1", "1"):
    a, f = runs.get(f"adrpo_beta{b}"), runs.get(f"fixed_beta_beta{b}")
    for k, name in (("eval/reward_mean", "proxy"), ("eval/diversity", "diversity"),
                    ("eval/frechet_distance", "FD")):
      prow.append([f"ADRPO - fixed, beta {b}", name, *paired(seedmap(a, k), seedmap(f, k))])
  return table + "\n\nSeed-paired differences:\n\n" + md_table(
      ["pair", "metric", "per seed (0 / 1 / 2)", "mean [95 % CI]", "p (paired t)", "same sign"], prow)


def issue15_hacking_llm() -> str:
  d = _load("issue15_hacking_llm.json")
  if d is None:
    return "(issue15_hacking_llm.json missing)"
  runs = by_label(d["per_run"])
  keys = [("reward_mean", "proxy (train)"), ("reward/length_credit_mean", "length credit (train)"),
          ("truth_start", "eval acc @0"), ("eval/accuracy", "eval acc @300"), ("truth_best", "best eval acc"),
          ("truth_best_step", "best @ step"), ("kl_mean", "KL (k3)")]
  rows = [[lab] + [fmt(col(r, k), 0 if k == "truth_best_step" else 3) for k, _ in keys] + [len(r)]
          for lab, r in runs.items()]
  prow = []
  for b in ("0.04", "0.3"):
    for k, name in (("eval/accuracy", "eval acc @300"), ("reward/length_credit_mean", "length credit"),
                    ("kl_mean", "KL")):
      prow.append([f"ADRPO - GRPO, beta {b}", name, *paired(seedmap(runs[f"adrpo_beta{b}"], k),
                                                             seedmap(runs[f"grpo_beta{b}"], k))])
  return (md_table(["run (300 steps)"] + [h for _, h in keys] + ["n"], rows) + "\n\nSeed-paired differences:\n\n"
          + md_table(["pair", "metric", "per seed (0 / 1 / 2)", "mean [95 % CI]", "p (paired t)", "same sign"],
                     prow))


def issue15_llm_hard() -> str:
  d = _load("issue15_llm_hard.json")
  if d is None:
    return "(issue15_llm_hard.json missing)"
  runs = by_label(d["per_run"])
  keys = [("acc_start", "eval acc @0"), ("zero_var_start", "zero-var groups, first log"),
          ("eval/accuracy", "eval acc @300"), ("reward/exact_match_mean", "train exact match"), ("kl_mean", "KL"),
          ("zero_std_group_fraction", "zero-var groups"), ("beta_eff_mean", "beta_eff")]
  rows = [[lab] + [fmt(col(r, k)) for k, _ in keys] + [len(r)] for lab, r in runs.items()]
  prow = []
  for b in ("0.01", "0.04", "0.1", "0.3", "1"):
    for k, name in (("eval/accuracy", "eval acc"), ("kl_mean", "KL")):
      prow.append([f"ADRPO - GRPO, beta {b}", name, *paired(seedmap(runs[f"adrpo_beta{b}"], k),
                                                             seedmap(runs[f"grpo_beta{b}"], k))])
  return (md_table(["run (300 steps)"] + [h for _, h in keys] + ["n"], rows) + "\n\nSeed-paired differences:\n\n"
          + md_table(["pair", "metric", "per seed (0 / 1 / 2)", "mean [95 % CI]", "p (paired t)", "same sign"],
                     prow))


def _ablation(name: str, keys, base: str = "default") -> str:
  d = _load(name)
  if d is None:
    return f"({name} missing)"
  runs = by_label(d["per_run"])
  rows = []
  for lab, r in runs.items():
    row = [lab] + [fmt(col(r, k)) for k, _ in keys] + [len(r)]
    if lab != base:
      row += [paired(seedmap(r, keys[0][0]), seedmap(runs[base], keys[0][0]))[1]]
    else:
      row += [""]
    rows.append(row)
  return md_table(["ablation"] + [h for _, h in keys] + ["n", f"paired {keys[0][1]} - default [95 % CI]"], rows)


def issue15_ablations_llm() -> str:
  return _ablation("issue15_ablations_llm.json", [("eval/accuracy", "eval acc @300"),
                                                  ("reward/exact_match_mean", "train exact match"),
                                                  ("kl_mean", "KL (configured estimator)"),
                                                  ("beta_eff_mean", "beta_eff")])


def issue15_ablations_flow() -> str:
  return _ablation("issue15_ablations_flow.json", [("eval/reward_mean", "reward"), ("eval/diversity", "diversity"),
                                                   ("eval/w2_bound", "W2 bound"), ("eval/frechet_distance", "FD"),
                                                   ("eval/thickness_accuracy", "thick acc (reward clf)")])


def audio() -> str:
  d = _load("audio_grpo_vs_adrpo.json")
  if d is None:
    return "(audio_grpo_vs_adrpo.json missing)"
  runs = by_label(d)
  keys = [("reward_start", "train reward start"), ("reward_end", "train reward end"), ("kl_end", "KL end"),
          ("acc_start", "eval acc start"), ("acc_end", "eval acc @200"), ("beta_eff_mean", "mean beta_eff")]
  rows = [[lab] + [fmt(col(r, k)) for k, _ in keys] + [len(r)] for lab, r in runs.items()]
  prow = [["ADRPO - GRPO", name, *paired(seedmap(runs["ADRPO"], k), seedmap(runs["GRPO"], k))]
          for k, name in (("reward_end", "train reward end"), ("kl_end", "KL end"), ("acc_end", "eval acc"))]
  return (md_table(["method (200 steps)"] + [h for _, h in keys] + ["n"], rows) + "\n\n"
          + md_table(["pair", "metric", "per seed (0 / 1 / 2)", "mean [95 % CI]", "p (paired t)", "same sign"],
                     prow))


# -- issue 27 ----------------------------------------------------------------------------------------------

DECISIVE = "issue27_decisive.json"
LLM = "issue27_llm_dense.json"
_FLOW_COLS = [("eval/reward_mean", "reward", 3), ("eval/diversity", "diversity", 3),
              ("eval/gold/judge_fd_pretrained", "judge FD to pre-trained", 2), ("eval/w2_bound", "W2 bound", 4),
              ("eval/gold/judge_reward", "judge reward", 3), ("eval/gold/judge_digit_accuracy", "judge digit acc", 3),
              ("eval/gold/judge_thickness_accuracy", "judge thick acc", 3), ("eval/gold/judge_fd_data",
                                                                              "judge FD to data", 2),
              ("beta_eff_run_mean", "mean coefficient", 3)]




def _decisive_runs(name: str = DECISIVE) -> dict[str, dict[int, dict[str, float]]] | None:
  d = _load(name)
  if d is None:
    return None
  out: dict[str, dict[int, dict[str, float]]] = {}
  for r in d["runs"].values():
    out.setdefault(r["label"], {})[int(r["seed"])] = r["final"]
  return out


def _arm_order(labels: Sequence[str], b0: float) -> list[str]:
  import decisive_test as dt  # pylint: disable=import-outside-toplevel
  wanted = [dt.label("adrpo", b0), dt.label("crd", b0)] + [dt.label("fixed", b) for b in dt.BLOCKS[b0]]
  return [w for w in wanted if w in labels]


def _block_table(b0: float, name: str = DECISIVE) -> str:
  runs = _decisive_runs(name)
  if runs is None:
    return f"({name} not committed yet)"
  labels = _arm_order(list(runs), b0) + (["none"] if b0 == 1.0 and "none" in runs else [])
  if not labels:
    return f"(block beta_0 = {b0:g} not run)"
  rows = [[lab] + [fmt(col(runs[lab], k), dg) for k, _, dg in _FLOW_COLS] + [len(runs[lab])] for lab in labels]
  return md_table(["arm (step 300)"] + [h for _, h, _ in _FLOW_COLS] + ["n"], rows)


def decisive_block1() -> str:
  return _block_table(1.0)


def decisive_block03() -> str:
  """The beta_0 = 0.3 block from the main results file."""
  runs = _decisive_runs()
  import decisive_test as dt  # pylint: disable=import-outside-toplevel
  if runs is not None and dt.label("adrpo", 0.3) in runs:
    return _block_table(0.3)
  return "(block beta_0 = 0.3 not run)"


def decisive_tests() -> str:
  d = _load(DECISIVE)
  if d is None:
    return f"({DECISIVE} not committed yet)"
  a = d["analysis"]
  rows = []
  for key, e in a.items():
    if "decision" not in e:
      continue
    t, env = e["test"], e["envelope_test"]
    gaps = " / ".join(f"{v:+.3f}" for _, v in sorted(e["gaps"]["quadratic"].items(), key=lambda kv: int(kv[0])))
    holm = "primary" if e.get("primary") else ("rejected" if a["holm"]["rejected"].get(key) else "not rejected")
    rows.append([key.replace("|", ", "), gaps, f"{t['mean']:+.4f} [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]",
                 f"{t['t']:.2f}", f"{t['p_one_sided']:.3f}", f"{e['test_less']['p_one_sided']:.3f}",
                 f"[{t['ci90'][0]:+.4f}, {t['ci90'][1]:+.4f}]", f"**{e['decision']}**", holm,
                 f"{env['mean']:+.4f} (p {env['p_one_sided']:.3f})",
                 ", ".join(str(s) for s in e["gaps"]["outside"]) or "-"])
  table = md_table(["arm, plane", "per-seed gaps (seeds 0..5)", "mean gap [95 % CI]", "t", "p (gap > 0)",
                    "p (gap < 0)", "90 % CI", "decision", "Holm (secondary)", "envelope: mean gap (p > 0)",
                    "seeds outside the fixed range"], rows)
  drows = []
  for key, e in a.items():
    if key.startswith("crd_minus_adrpo"):
      t = e["test"]
      diffs = " / ".join(f"{v:+.3f}" for _, v in sorted(e["diff"].items(), key=lambda kv: int(kv[0])))
      drows.append([key.split("|", 1)[1].replace("|", ", "), diffs,
                    f"{t['mean']:+.4f} [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]", f"{e['p_two_sided']:.3f}",
                    "rejected" if a["holm"]["rejected"].get(key) else "not rejected"])
  if drows:
    table += "\n\nThe sign: gap(CRD) - gap(ADRPO), seed-paired:\n\n" + md_table(
        ["block, plane", "per seed", "mean [95 % CI]", "p (two-sided)", "Holm"], drows)
  return table


def decisive_judge_y() -> str:
  """Exploratory: the same gaps with the judge's reward as y."""
  d = _load(DECISIVE)
  if d is None:
    return f"({DECISIVE} not committed yet)"
  import decisive_test as dt  # pylint: disable=import-outside-toplevel
  runs = _decisive_runs()
  a = dt.analyze(runs, [float(b) for b in d["design"]["blocks"]], y_key="eval/gold/judge_reward")
  rows = []
  for key, e in a.items():
    if "decision" in e:
      t = e["test"]
      rows.append([key.replace("|", ", "), f"{t['mean']:+.4f} [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]",
                   f"{t['p_one_sided']:.3f}", f"{e['test_less']['p_one_sided']:.3f}"])
  return md_table(["arm, plane", "judge-reward gap [95 % CI]", "p (gap > 0)", "p (gap < 0)"], rows)


def decisive_matched() -> str:
  """Exploratory (not part of the pre-registered rule): seed-paired differences of the adaptive arms against the
  fixed-beta runs at ADRPO's measured mean coefficient (0.88 and 0.25, pre-registered grid points from the pilot)
  and at the same nominal beta (1.0 and 0.3), per block."""
  runs = _decisive_runs()
  if runs is None:
    return f"({DECISIVE} not committed yet)"
  pairs = [("adrpo_b1", "fixed_b0.88"), ("adrpo_b1", "fixed_b1"), ("crd_b1", "fixed_b1"),
           ("adrpo_b0.3", "fixed_b0.25"), ("adrpo_b0.3", "fixed_b0.3"), ("crd_b0.3", "fixed_b0.3")]
  keys = [("eval/reward_mean", "reward"), ("eval/diversity", "diversity"),
          ("eval/gold/judge_fd_pretrained", "judge FD to pre-trained"), ("eval/gold/judge_reward", "judge reward")]
  rows = []
  for a, b in pairs:
    if a not in runs or b not in runs:
      continue
    for key, name in keys:
      rows.append([f"{a} - {b}", name, *paired(seedmap(runs[a], key), seedmap(runs[b], key))])
  if not rows:
    return "(the block beta_0 = 1 was not run)"
  return md_table(["pair (step 300)", "metric", "per seed (0..5)", "mean [95 % CI]", "p (paired t, two-sided)",
                   "same sign"], rows)


def flow_gold() -> str:
  """Proxy against gold on the flow side: per arm, the change from step 0 to 300 of the reward (the proxy: the
  reward classifier) and of the judge's reward and accuracies, and the final judge FD to real digits."""
  d = _load(DECISIVE)
  if d is None:
    return f"({DECISIVE} not committed yet)"
  per: dict[str, list[Mapping[str, Any]]] = {}
  for r in d["runs"].values():
    per.setdefault(r["label"], []).append(r)

  def delta(r, key):
    steps, vals = r["curves"][key]
    return vals[-1] - vals[0] if steps and steps[0] == 0 else float("nan")

  keys = [("eval/reward_mean", "reward (proxy)"), ("eval/gold/judge_reward", "judge reward"),
          ("eval/digit_accuracy", "digit acc (reward clf)"), ("eval/gold/judge_digit_accuracy", "digit acc (judge)"),
          ("eval/thickness_accuracy", "thick acc (reward clf)"),
          ("eval/gold/judge_thickness_accuracy", "thick acc (judge)")]
  rows = []
  for lab in _arm_order(list(per), 1.0) + [x for x in ("none",) if x in per]:
    rows.append([lab] + [fmt([delta(r, k) for r in per[lab]]) for k, _ in keys]
                + [fmt([r["final"].get("eval/gold/judge_fd_data") for r in per[lab]], 2), len(per[lab])])
  return md_table(["arm"] + [f"change of {h}, step 0 -> 300" for _, h in keys] + ["judge FD to real digits", "n"],
                  rows)


def orw() -> str:
  d = _load(DECISIVE)
  runs = _decisive_runs()
  if d is None or runs is None:
    return f"({DECISIVE} not committed yet)"
  labels = [lab for lab in runs if lab.startswith("orw_tau")]
  if not labels:
    return "(the ORW-CFM-W2 tau grid was not run)"
  labels.sort(key=lambda s: float(s[len("orw_tau"):]))
  rows = []
  for lab in labels:
    e = d["analysis"].get(f"{lab}|diversity")
    gaps = {g: " / ".join(f"{v:+.3f}" for _, v in sorted(e["gaps"][g].items(), key=lambda kv: int(kv[0])))
            + f" ({fmt(list(e['gaps'][g].values()))})" if e else "" for g in ("quadratic", "envelope")}
    outside = ", ".join(str(s) for s in e["gaps"]["outside"]) if e else ""
    rows.append([lab] + [fmt(col(runs[lab], k), dg) for k, _, dg in _FLOW_COLS[:5]]
                + [gaps["quadratic"], gaps["envelope"], outside or "-", len(runs[lab])])
  return md_table(["ORW-CFM-W2 (alpha 1, 300 steps)"] + [h for _, h, _ in _FLOW_COLS[:5]]
                  + ["gap to the beta_0 = 1 fixed frontier at its diversity, per seed (mean ± 95 % half-width)",
                     "the same, envelope frontier (sensitivity)", "seeds outside the fixed range", "n"], rows)


def _llm() -> dict[str, Any] | None:
  return _load(LLM)


def llm_dense() -> str:
  d = _llm()
  if d is None:
    return f"({LLM} not committed yet)"
  import llm_dense_beta as ld  # pylint: disable=import-outside-toplevel
  acc = ld.accuracy_table(d["runs"])
  betas = sorted({float(b) for per in acc.values() for b in per})
  rows = []
  for m in ("grpo", "adrpo", "crd"):
    if m in acc:
      rows.append([m.upper()] + [fmt(list(acc[m][b].values())) if b in acc[m] else "" for b in betas]
                  + [min(len(v) for v in acc[m].values())])
  start = [r["final"]["truth_start"] for r in d["runs"].values()]
  table = md_table(["method \\ beta"] + [f"{b:g}" for b in betas] + ["n"], rows)
  table += f"\n\nHeld-out accuracy of the starting (SFT) model: {np.mean(start):.3f}."
  a = d["analysis"]
  if "best_diff" in a:
    bd, ob = a["best_diff"], a["own_best_diff"]
    t, t2 = bd["test"], ob["test"]
    table += "\n\n" + md_table(
        ["comparison", "per seed", "mean [95 % CI]", "p (two-sided)"],
        [[f"best beta: ADRPO (beta_0 = {a['best_beta']['adrpo']:g}) - GRPO (beta = {a['best_beta']['grpo']:g})",
          " / ".join(f"{v:+.3f}" for _, v in sorted(bd["per_seed"].items(), key=lambda kv: int(kv[0]))),
          f"{t['mean']:+.4f} [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]", f"{bd['p_two_sided']:.3f}"],
         ["each seed's own best beta: ADRPO - GRPO",
          " / ".join(f"{v:+.3f}" for _, v in sorted(ob["per_seed"].items(), key=lambda kv: int(kv[0]))),
          f"{t2['mean']:+.4f} [{t2['ci95'][0]:+.4f}, {t2['ci95'][1]:+.4f}]", f"{ob['p_two_sided']:.3f}"]])
    r, ro = a["range"], a["range_own"]
    w = r["width_diff_adrpo_minus_grpo"]
    table += "\n\n" + md_table(
        ["method", f"betas within {a['tol']:g} of the best of both", "width (decades)",
         f"betas within {a['tol']:g} of its own best", "width (decades)"],
        [[m.upper(), ", ".join(f"{b:g}" for b in r[m]["betas"]) or "none", f"{r[m]['width_decades']:.2f}",
          ", ".join(f"{b:g}" for b in ro[m]["betas"]), f"{ro[m]['width_decades']:.2f}"] for m in ("grpo", "adrpo")])
    table += (f"\n\nWidth difference ADRPO - GRPO: {w['point']:+.2f} decades, seed-bootstrap 95 % interval "
              f"[{w['bootstrap95'][0]:+.2f}, {w['bootstrap95'][1]:+.2f}] ({w['n_boot']} resamples).")
  return table


def llm_crd() -> str:
  d = _llm()
  if d is None:
    return f"({LLM} not committed yet)"
  import llm_dense_beta as ld  # pylint: disable=import-outside-toplevel
  acc = ld.accuracy_table(d["runs"])
  if "crd" not in acc:
    return "(the CRD arm was not run)"
  rows = []
  for b in sorted(acc["crd"]):
    for other in ("adrpo", "grpo"):
      if b in acc.get(other, {}):
        rows.append([f"CRD - {other.upper()}, beta {b:g}", *paired(acc["crd"][b], acc[other][b])])
  return md_table(["pair (held-out accuracy)", "per seed", "mean [95 % CI]", "p (paired t)", "same sign"], rows)


def llm_same_beta() -> str:
  """Exploratory (not pre-registered): ADRPO - GRPO held-out accuracy, seed-paired, at each grid beta (ADRPO's
  beta_0 against GRPO's beta), with the two-sided paired p and the Bonferroni threshold over the grid."""
  d = _llm()
  if d is None:
    return f"({LLM} not committed yet)"
  import llm_dense_beta as ld  # pylint: disable=import-outside-toplevel
  acc = ld.accuracy_table(d["runs"])
  if "adrpo" not in acc or "grpo" not in acc:
    return "(ADRPO and GRPO were not both run)"
  betas = sorted(set(acc["adrpo"]) & set(acc["grpo"]))
  rows = [[f"{b:g}", *paired(acc["adrpo"][b], acc["grpo"][b])] for b in betas]
  return (md_table(["beta (GRPO) = beta_0 (ADRPO)", "ADRPO - GRPO per seed", "mean [95 % CI]", "p (paired t)",
                    "same sign"], rows)
          + f"\n\n{len(betas)} comparisons: Bonferroni threshold {0.05 / len(betas):.4f} per comparison.")


def llm_kl_hack() -> str:
  """Mean KL, length credit and the truth's best step per method and beta (the hack's footprint)."""
  d = _llm()
  if d is None:
    return f"({LLM} not committed yet)"
  groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
  for r in d["runs"].values():
    groups.setdefault((r["family"], float(r["beta"])), []).append(r["final"])
  rows = []
  for (m, b), finals in sorted(groups.items(), key=lambda kv: (kv[0][0] != "grpo", kv[0][0], kv[0][1])):
    rows.append([m.upper(), f"{b:g}", fmt([f.get("reward_mean") for f in finals]),
                 fmt([f.get("reward/length_credit_mean") for f in finals]), fmt([f.get("kl_mean") for f in finals]),
                 fmt([f.get("truth_best") for f in finals]), fmt([f.get("held_out_accuracy") for f in finals]),
                 fmt([f.get("beta_eff_run_mean") for f in finals]), len(finals)])
  return md_table(["method", "beta", "proxy (train, last log)", "length credit (train)", "KL (k3)",
                   "best held-out acc", "held-out acc (250-300)", "mean coefficient", "n"], rows)


def _llm_records(run: Mapping[str, Any]) -> list[dict[str, Any]]:
  recs = [{"step": s, "reward_mean": v} for s, v in zip(*run["curves"]["reward_mean"])]
  recs += [{"step": s, "eval/accuracy": v} for s, v in zip(*run["curves"]["eval/accuracy"])]
  recs.sort(key=lambda x: (x["step"], "eval/accuracy" in x))  # a step's training log before its evaluation
  return recs


def monitor_sensitivity(drops: Sequence[float] = (0.02, 0.05, 0.08), patience: int = 3) -> str:
  """Exploratory: in how many runs the stop rule fires as a function of the allowed drop (N = 3), beside each
  group's end accuracy relative to its start and its length credit (the hack's signature)."""
  d = _llm()
  if d is None:
    return f"({LLM} not committed yet)"
  from adrpo_jax.train.monitor import RewardHackingMonitor, StopRule, replay  # pylint: disable=import-outside-toplevel

  groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
  for r in d["runs"].values():
    groups.setdefault((r["family"], float(r["beta"])), []).append(r)
  rows = []
  for (m, b), runs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "grpo", kv[0][0], kv[0][1])):
    fires = []
    for drop in drops:
      n = sum(replay(_llm_records(r), RewardHackingMonitor("reward_mean", ["eval/accuracy"],
                                                           stop_rule=StopRule(patience, drop))) is not None
              for r in runs)
      fires.append(f"{n}/{len(runs)}")
    change = [r["final"]["held_out_accuracy"] - r["final"]["truth_start"] for r in runs]
    rows.append([m.upper(), f"{b:g}", fmt(change), fmt([r["final"].get("reward/length_credit_mean") for r in runs]),
                 *fires])
  return md_table(["method", "beta", "held-out acc: end - start", "length credit (train, end)"]
                  + [f"fires, drop {x:g}" for x in drops], rows)


def monitor_replay() -> str:
  """The stop rule (gold_falls:3, drop 0.02; pre-registered) replayed on the LLM dense sweep's recorded curves."""
  d = _llm()
  if d is None:
    return f"({LLM} not committed yet)"
  from adrpo_jax.train.monitor import RewardHackingMonitor, StopRule, replay  # pylint: disable=import-outside-toplevel

  groups: dict[tuple[str, float], list[Any]] = {}
  for r in d["runs"].values():
    dec = replay(_llm_records(r), RewardHackingMonitor("reward_mean", ["eval/accuracy"],
                                                       stop_rule=StopRule(3, 0.02)))
    groups.setdefault((r["family"], float(r["beta"])), []).append((dec, r["final"]))
  rows = []
  for (m, b), items in sorted(groups.items(), key=lambda kv: (kv[0][0] != "grpo", kv[0][0], kv[0][1])):
    fired = [x for x in items if x[0] is not None]
    rows.append([m.upper(), f"{b:g}", f"{len(fired)}/{len(items)}",
                 fmt([x[0].step for x in fired], 0) if fired else "-",
                 fmt([x[0].gold_best for x in fired]) if fired else "-",
                 fmt([x[1]["held_out_accuracy"] for x in fired]) if fired else "-",
                 fmt([x[1]["held_out_accuracy"] for x in items if x[0] is None]) or "-"])
  return md_table(["method", "beta", "runs where it fires", "stop step", "gold best (the checkpoint to use)",
                   "held-out acc at the end, fired runs", "held-out acc at the end, other runs"], rows)


def plot_issue15_flow_compare(out_prefix: Path = EXP / "issue15_flow_compare") -> list[Path]:
  """Redraws ``issue15_flow_compare*.png`` from the JSON: reward vs diversity / W2 bound / FD with 95 % t
  intervals, the distance axes logarithmic (the unregularized point sits 10-100x further out)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from scipy import stats  # pylint: disable=import-outside-toplevel

  d = _load("issue15_flow_compare.json")
  styles = {"adrpo": ("*", "C3", 12, "ADRPO-W2 beta_0"), "fixed_beta": ("o", "C0", 7, "fixed-beta W2"),
            "orw_cfm_w2": ("s", "C2", 7, "ORW-CFM-W2 alpha"), "none": ("X", "C1", 9, "none")}
  panels = [("eval/diversity", "diversity (larger: more diverse)", False),
            ("eval/w2_bound", "W2 bound to the pre-trained model (log; smaller: closer)", True),
            ("eval/frechet_distance", "FD to the pre-trained model (log; smaller: closer)", True)]
  outs = []
  for step, summ in [("120", d["final"])] + [(k, v) for k, v in d["per_step"].items() if k in ("40", "80")]:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, (xk, xl, logx) in zip(axes, panels):
      fam_pts: dict[str, list[tuple[float, float]]] = {}
      for lab, m in summ.items():
        fam = next(f for f in styles if lab.startswith(f))
        marker, color, size, _ = styles[fam]
        half = {k: stats.t.ppf(0.975, m[k][2] - 1) * m[k][1] * math.sqrt(m[k][2] / (m[k][2] - 1)) / math.sqrt(m[k][2])
                for k in (xk, "eval/reward_mean")}
        x, y = m[xk][0], m["eval/reward_mean"][0]
        xerr = half[xk]
        if logx:  # an asymmetric bar that stays positive on a log axis
          xerr = [[min(xerr, 0.9 * x)], [xerr]]
        ax.errorbar(x, y, xerr=xerr, yerr=half["eval/reward_mean"], fmt=marker, color=color, ms=size, capsize=2,
                    lw=1)
        ax.annotate(lab.split("_")[-1].replace("beta", "").replace("alpha", ""), (x, y), textcoords="offset points",
                    xytext=(5, 3), fontsize=7, color=color)
        fam_pts.setdefault(fam, []).append((x, y))
      for fam, pts in fam_pts.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=styles[fam][1], alpha=0.5, label=styles[fam][3])
      if logx:
        ax.set_xscale("log")
      ax.set_xlabel(xl)
      ax.set_ylabel("eval reward (larger: better)")
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=7)
    fig.suptitle(f"Issue 15, flow digits at step {step}: mean and 95 % t interval over 3 seeds (labels: beta / "
                 "alpha)", fontsize=10)
    fig.tight_layout()
    path = Path(f"{out_prefix}.png" if step == "120" else f"{out_prefix}_step{step}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    outs.append(path)
  return outs


def plot_decisive(out: Path = EXP / "issue27_decisive.png") -> list[Path]:
  """Redraws ``issue27_decisive.png`` from the committed JSON (per-seed finals and the stored analysis) with
  :func:`decisive_test.plot`."""
  import decisive_test as dt  # pylint: disable=import-outside-toplevel

  d, runs = _load(DECISIVE), _decisive_runs()
  if d is None or runs is None:
    return []
  dt.plot(runs, d["analysis"], out)
  return [out]


def judge() -> str:
  d = _load("issue27_judge.json")
  if d is None:
    return "(issue27_judge.json not committed yet)"
  j, c = d["judge"], d["reward_classifier"]
  return md_table(["model", "trained on", "digit accuracy on unseen real digits", "thickness accuracy",
                   "parameters"],
                  [["reward classifier (CNN + ink inputs)", "train split (80 %)", f"{c['test_digit_accuracy']:.3f}",
                    f"{c['test_thickness_accuracy']:.3f}", c["num_params"]],
                   ["judge (pixel MLP)", f"held-out split ({j['num_train_images']} images)",
                    f"{j['test_digit_accuracy']:.3f} (on {j['num_test_images']})",
                    f"{j['test_thickness_accuracy']:.3f}", j["num_params"]]])


def heldout_overlap() -> str:
  """How many of the 256 LLM eval problems appear among a 300-step run's 4,800 training prompts: the Issue 15
  setup (the first 256 eval draws, duplicates included; no exclusion) against issue 27's (256 distinct problems,
  excluded from the stream). Computed from the task definitions (no JSON needed)."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  from adrpo_jax.rl.data import EVAL_ARITHMETIC_SEED, distinct_examples  # pylint: disable=import-outside-toplevel
  from adrpo_jax.rl.tasks import ArithmeticTask  # pylint: disable=import-outside-toplevel

  rows = []
  for digits in ((1, 2), (2, 3)):
    ev_task = ArithmeticTask(min_digits=digits[0], max_digits=digits[1], seed=EVAL_ARITHMETIC_SEED)
    old_eval = [ev_task[i]["prompt"] for i in range(256)]
    new_eval = [e["prompt"] for e in distinct_examples(ev_task, 256)]
    for seed in (0, 1, 2):
      train = ArithmeticTask(min_digits=digits[0], max_digits=digits[1], seed=seed)
      old_train = {train[i]["prompt"] for i in range(4800)}
      held = dataclasses.replace(train, exclude=frozenset(new_eval))
      new_train = {held[i]["prompt"] for i in range(4800)}
      old_n, new_n = sum(p in old_train for p in old_eval), sum(p in new_train for p in new_eval)
      rows.append([f"{digits[0]}-{digits[1]} digits", seed, f"{old_n} of 256 ({len(set(old_eval))} distinct)",
                   f"{new_n} of 256 (256 distinct)"])
  return md_table(["task", "run seed", "eval problems among the training prompts: Issue 15",
                   "issue 27 (distinct, excluded)"], rows)


def lag_staleness() -> str:
  """Issue 26: training reward and held-out accuracy against ``rl.max_lag`` (``lag_staleness.py``)."""
  d = _load("issue26_lag_staleness.json")
  if d is None:
    return "(issue26_lag_staleness.json not committed yet)"
  import lag_staleness as ls  # pylint: disable=import-outside-toplevel

  return ls.report(d)


REPORTS: dict[str, Callable[[], str]] = {
    "decisive_block1": decisive_block1,
    "decisive_tests": decisive_tests,
    "decisive_block03": decisive_block03,
    "decisive_judge_y": decisive_judge_y,
    "decisive_matched": decisive_matched,
    "flow_gold": flow_gold,
    "orw": orw,
    "judge": judge,
    "heldout_overlap": heldout_overlap,
    "llm_dense": llm_dense,
    "llm_kl_hack": llm_kl_hack,
    "llm_crd": llm_crd,
    "llm_same_beta": llm_same_beta,
    "monitor_replay": monitor_replay,
    "monitor_sensitivity": monitor_sensitivity,
    "issue15_flow_compare": issue15_flow_compare,
    "issue15_hacking_flow": issue15_hacking_flow,
    "issue15_hacking_llm": issue15_hacking_llm,
    "issue15_llm_hard": issue15_llm_hard,
    "issue15_ablations_llm": issue15_ablations_llm,
    "issue15_ablations_flow": issue15_ablations_flow,
    "audio": audio,
    "lag_staleness": lag_staleness,
}


def render(names: Sequence[str] | None = None) -> dict[str, str]:
  return {n: REPORTS[n]() for n in (names or REPORTS)}


_BLOCK = re.compile(r"<!-- BEGIN report:(\w+) -->\n(.*?)\n?<!-- END report:\1 -->", re.S)


def blocks_of(text: str) -> dict[str, str]:
  """The report blocks of a README text: ``{name: content}``."""
  return {m.group(1): m.group(2) for m in _BLOCK.finditer(text)}


def update(text: str, rendered: Mapping[str, str]) -> str:
  """``text`` with every report block replaced by its rendering (unknown names are an error)."""
  unknown = sorted(set(blocks_of(text)) - set(rendered))
  if unknown:
    raise ValueError(f"README report blocks without a renderer: {unknown}; known: {sorted(rendered)}")
  return _BLOCK.sub(lambda m: f"{BEGIN.format(m.group(1))}\n{rendered[m.group(1)]}\n{END.format(m.group(1))}", text)


def main(argv: Sequence[str]) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python experiments/_sweep.py --report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--readme", type=Path, default=EXP / "README.md")
  parser.add_argument("--check", action="store_true", help="exit 1 if the README differs from the JSON files")
  parser.add_argument("--print", dest="show", nargs="*", default=None, metavar="NAME",
                      help="print these blocks (all without names) instead of writing")
  parser.add_argument("--plots", action="store_true", help="also redraw the plots made from the JSON files")
  args = parser.parse_args(argv)
  if args.plots:
    for path in plot_issue15_flow_compare() + plot_decisive():
      print(f"wrote {path}")
  if args.show is not None:
    for name, md in render(args.show or None).items():
      print(f"{BEGIN.format(name)}\n{md}\n{END.format(name)}\n")
    return 0
  text = args.readme.read_text()
  names = list(blocks_of(text))
  new = update(text, render(names))
  if args.check:
    if new != text:
      bad = [n for n, c in blocks_of(text).items() if blocks_of(new)[n] != c]
      print(f"README report blocks out of date: {bad} (run python experiments/_sweep.py --report)")
      return 1
    print(f"{len(names)} report blocks match the JSON files")
    return 0
  args.readme.write_text(new)
  print(f"rewrote {len(names)} report blocks of {args.readme}")
  return 0
