r"""A common sweep runner for the issue-15 experiments: a grid of (label, config overrides, seed) runs, each a
separate process in its own workdir, resumable, sharing one persistent XLA compilation cache; helpers to
aggregate the runs (mean +- std over seeds), draw Pareto frontiers and compute the beta-sensitivity spread.

    specs = [RunSpec("adrpo_beta1", "flow_digits", "cpu", {"rl.beta": 1.0}, seed=0, steps=120, eval_every=40)]
    results = run_sweep(specs, Path("/tmp/sweep"), jobs=2)   # {RunSpec.key: list of metrics.jsonl records}

A run lives in ``WORKDIR/<label>/seed<s>/`` (``metrics.jsonl``, checkpoints, ``spec.json``, ``DONE`` once
finished); finished runs (``DONE`` present with the same spec) are reused, unfinished ones resume from their
last checkpoint (the trainers resume from ``workdir``). Each run is ``python experiments/_sweep.py --child
SPEC.json``; ``--jobs`` runs that many at once (``--nice`` lowers their priority). The compilation cache lives in
``WORKDIR/xla_cache`` (``JAX_COMPILATION_CACHE_DIR``), so the second and later runs of one graph skip XLA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]

__all__ = ["RunSpec", "run_sweep", "load_records", "final_eval", "eval_curve", "summarize", "markdown_table",
           "pareto_front", "plot_frontiers", "sensitivity", "best_point", "add_common_args", "paired_deltas",
           "paired_markdown"]


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run: ``configs/<config>.py:<variant>`` with ``overrides`` (dotted keys) and ``seed``/``steps``.

  ``label`` names the grid point (``adrpo_beta0.3``); ``family`` the method (``adrpo``) and ``beta`` its
  coefficient (None where the method has none), used by the plots and the sensitivity spread.
  """

  label: str
  config: str
  variant: str
  overrides: Mapping[str, Any]
  seed: int
  steps: int
  eval_every: int
  family: str = ""
  beta: float | None = None
  log_every: int = 0  # 0 = max(steps // 12, 1)

  @property
  def key(self) -> str:
    return f"{self.label}/seed{self.seed}"

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["overrides"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.overrides.items()}
    return d


def add_common_args(parser) -> None:
  """``--workdir --seeds --steps --jobs --nice --dry-run`` for the sweep scripts."""
  parser.add_argument("--workdir", type=Path, required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                      help="runs at once (separate processes); default min(2, #cores)")
  parser.add_argument("--nice", type=int, default=0, help="niceness of the run processes (19: idle cycles only)")
  parser.add_argument("--dry-run", action="store_true", help="print the grid and exit")
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                      help="extra config overrides for every run (JSON values), e.g. eval.num_examples=32")


def with_overrides(specs: Sequence[RunSpec], assignments: Sequence[str]) -> list[RunSpec]:
  """``specs`` with ``KEY=VALUE`` overrides added (VALUE parsed as JSON, else kept as a string)."""
  extra = {}
  for item in assignments or ():
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    try:
      extra[key] = json.loads(value)
    except json.JSONDecodeError:
      extra[key] = value
  return [dataclasses.replace(s, overrides={**s.overrides, **extra}) for s in specs] if extra else list(specs)


# -- the child process --------------------------------------------------------------------------------------


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f"unknown config key {dotted!r}")
  old = node[leaf]
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  node[leaf] = value


def build_config(spec: Mapping[str, Any]):
  """The locked config of a run spec (a :meth:`RunSpec.to_json` dict)."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  path = REPO / "configs" / f"{spec['config']}.py"
  mod_spec = importlib.util.spec_from_file_location(f"_sweep_cfg_{spec['config']}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  config = module.get_config(spec["variant"])
  for k, v in spec["overrides"].items():
    _set(config, k, v)
  steps = int(spec["steps"])
  config.seed = int(spec["seed"])
  config.total_steps = steps
  config.eval_every = int(spec["eval_every"])
  config.log_every = int(spec.get("log_every") or max(steps // 12, 1))
  config.checkpoint.every_steps = steps
  config.checkpoint.max_to_keep = 1
  config.logging.progress_bar = False
  config.logging.tensorboard = False
  config.model.save_final = False
  if "eval" in config and "write_images" in config.eval:
    config.eval.write_images = False
  config.lock()
  return config


def code_version(repo: Path = REPO) -> dict[str, Any]:
  """``{"commit": HEAD hash, "dirty": [modified tracked files]}`` of the checkout that runs the code."""
  def git(*args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False).stdout
  commit = git("rev-parse", "HEAD").strip() or "unknown"
  dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
  return {"commit": commit, "dirty": dirty}


def _with_judge(trainer) -> None:
  """Adds the independent judge's gold metrics (``eval/gold/judge_*``, :mod:`adrpo_jax.flow.judge`) to every
  evaluation of a flow trainer, computed on the evaluator's own samples (same prompts and noise). Wraps the
  trainer's evaluation hook (``evaluate`` of the recipe runner, ``eval_step`` of the older trainer)."""
  from adrpo_jax.flow.judge import GOLD_PREFIX, JudgeScorer, train_judge  # pylint: disable=import-outside-toplevel

  config, ev = trainer.config, trainer.evaluator
  judge, _ = train_judge({"data": config.data}, log_fn=None)  # cached after the first run
  hook = "evaluate" if hasattr(trainer, "evaluate") else "eval_step"
  plain = getattr(trainer, hook)
  scorer = []

  def with_gold(step, state):
    out = dict(plain(step, state))
    if not scorer:  # the pre-trained model's eval samples: an attribute (older trainer) or a method of the state
      ref = ev.reference_images(state) if callable(ev.reference_images) else ev.reference_images
      scorer.append(JudgeScorer(judge, config.data.condition_mode,
                                thickness_weight=float(config.reward.thickness_weight), reference_images=ref,
                                data=config.data))
    if ev.last_images is not None and ev.last_images[0] == step:
      out.update({GOLD_PREFIX + k: v for k, v in scorer[0](ev.last_images[1], ev.cond_host).items()})
    return out

  setattr(trainer, hook, with_gold)


def finished(workdir: Path, spec: Mapping[str, Any], result: Any = None) -> bool:
  """Whether a child's run reached its last step: not preempted (a trainer stopped by SIGTERM returns normally
  with ``preempted``) and a record at ``spec["steps"]`` in its ``metrics.jsonl``. Only a finished run gets
  ``DONE``; an unfinished one resumes from its checkpoint on the next sweep."""
  preempted = getattr(result, "preempted", None)
  if preempted is None and isinstance(result, Mapping):
    preempted = result.get("preempted")
  if preempted:
    return False
  return any(r.get("step", -1) >= int(spec["steps"]) for r in load_records(workdir))


def _child(spec_path: Path) -> None:
  spec = json.loads(spec_path.read_text())
  workdir = spec_path.parent
  from adrpo_jax.train.distributed import setup_compilation_cache  # pylint: disable=import-outside-toplevel
  setup_compilation_cache(os.environ.get("JAX_COMPILATION_CACHE_DIR", ""))
  config = build_config(spec)
  info = {"spec": spec, **code_version(), "config": json.loads(config.to_json_best_effort()),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
  t0 = time.time()
  if config.trainer == "flow":
    from adrpo_jax.flow.trainer import FlowTrainer  # pylint: disable=import-outside-toplevel
    trainer = FlowTrainer(config, str(workdir))
    if spec.get("judge", True) and trainer.evaluator is not None:
      _with_judge(trainer)
    result = trainer.run()
  else:
    from adrpo_jax.rl.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel
    result = train_and_evaluate(config, str(workdir))
  info["wall_time_s"] = time.time() - t0
  (workdir / "run_info.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
  if not finished(workdir, spec, result):  # preempted: no DONE, the next sweep resumes it from its checkpoint
    raise SystemExit(f"{workdir}: stopped before step {spec['steps']} (preempted); not marked DONE, "
                     "the next sweep resumes it")
  (workdir / "DONE").write_text(json.dumps(spec, sort_keys=True))


# -- the parent ---------------------------------------------------------------------------------------------


def run_dir(workdir: Path, spec: RunSpec) -> Path:
  return Path(workdir) / spec.label / f"seed{spec.seed}"


def is_done(workdir: Path, spec: RunSpec) -> bool:
  done = run_dir(workdir, spec) / "DONE"
  return done.exists() and json.loads(done.read_text()) == json.loads(json.dumps(spec.to_json(), sort_keys=True))


def finished_runs(workdir: Path, specs: Sequence[RunSpec]) -> Iterable[tuple[RunSpec, list[dict[str, Any]],
                                                                             dict[str, Any]]]:
  """``(spec, metrics records, run_info.json or {})`` of each finished run among ``specs`` in ``workdir``."""
  for spec in specs:
    if not is_done(workdir, spec):
      continue
    d = run_dir(workdir, spec)
    info = json.loads((d / "run_info.json").read_text()) if (d / "run_info.json").exists() else {}
    yield spec, load_records(d), info


def provenance(info: Mapping[str, Any]) -> dict[str, Any]:
  """The commit, dirty flag, wall time and config a run recorded in its ``run_info.json``."""
  return {k: info.get(k) for k in ("commit", "dirty", "wall_time_s", "config")}


def load_records(path: Path) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` (later records of a step win over earlier ones on resume)."""
  path = Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sweep(specs: Sequence[RunSpec], workdir: Path, *, jobs: int = 1, nice: int = 0,
              log: Callable[[str], None] = print, env: Mapping[str, str] | None = None) -> dict[str, list[dict]]:
  """Runs every unfinished spec (``jobs`` processes at once) and returns ``{spec.key: records}``.

  A failed run is reported (its stderr tail) and left out of the result; the others go on.
  """
  workdir = Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  child_env = dict(os.environ)
  child_env.setdefault("JAX_COMPILATION_CACHE_DIR", str(workdir / "xla_cache"))
  child_env.setdefault("HF_HUB_OFFLINE", "1")
  child_env["PYTHONPATH"] = str(REPO) + os.pathsep + child_env.get("PYTHONPATH", "")
  child_env.update(env or {})
  todo = [s for s in specs if not is_done(workdir, s)]
  log(f"{len(specs)} runs, {len(specs) - len(todo)} finished earlier, {len(todo)} to run ({jobs} at once)")
  running: list[tuple[RunSpec, subprocess.Popen, float]] = []
  t0 = time.time()
  failed = []
  while todo or running:
    while todo and len(running) < max(jobs, 1):
      spec = todo.pop(0)
      d = run_dir(workdir, spec)
      d.mkdir(parents=True, exist_ok=True)
      (d / "spec.json").write_text(json.dumps(spec.to_json(), indent=1, sort_keys=True))
      cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(d / "spec.json")]
      if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
      with open(d / "stderr.log", "w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, env=child_env, stdout=err, stderr=subprocess.STDOUT, cwd=str(REPO))
      running.append((spec, proc, time.time()))
    time.sleep(0.5)
    for item in list(running):
      spec, proc, start = item
      if proc.poll() is None:
        continue
      running.remove(item)
      if proc.returncode == 0:
        log(f"[{time.time() - t0:6.0f}s] done {spec.key} ({time.time() - start:.0f}s)")
      else:
        tail = (run_dir(workdir, spec) / "stderr.log").read_text()[-1500:]
        log(f"[{time.time() - t0:6.0f}s] FAILED {spec.key} (rc {proc.returncode}):\n{tail}")
        failed.append(spec.key)
  return {s.key: load_records(run_dir(workdir, s)) for s in specs if is_done(workdir, s)}


# -- aggregation ----------------------------------------------------------------------------------------------


def eval_curve(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """``(steps, values)`` of ``key`` over the run (the last record of a step wins)."""
  by_step = {}
  for r in records:
    if key in r and isinstance(r[key], (int, float)):
      by_step[int(r["step"])] = float(r[key])
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def final_eval(records: Sequence[Mapping[str, Any]], keys: Iterable[str], step: int | None = None) -> dict[str, float]:
  """The values of ``keys`` at ``step`` (default: the last step where each is logged)."""
  out = {}
  for k in keys:
    steps, values = eval_curve(records, k)
    if not steps:
      continue
    if step is None:
      out[k] = values[-1]
    elif step in steps:
      out[k] = values[steps.index(step)]
  return out


def best_point(records: Sequence[Mapping[str, Any]], key: str, maximize: bool = True) -> tuple[int, float]:
  """``(step, value)`` where ``key`` is best over the run."""
  steps, values = eval_curve(records, key)
  if not steps:
    return -1, float("nan")
  i = int(np.argmax(values) if maximize else np.argmin(values))
  return steps[i], values[i]


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
  """Mean, sample std (ddof 1) and the two-sided ``level`` t confidence interval of the mean of ``values``:
  ``mean +- t_{n-1, (1 + level) / 2} sd / sqrt(n)``; ``{"mean", "sd", "n", "lo", "hi", "half"}`` (sd, lo, hi,
  half are nan for n < 2)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel

  v = np.asarray([float(x) for x in values], np.float64)
  n = int(v.size)
  mean = float(v.mean()) if n else float("nan")
  if n < 2:
    return {"mean": mean, "sd": float("nan"), "n": n, "lo": float("nan"), "hi": float("nan"), "half": float("nan")}
  sd = float(v.std(ddof=1))
  half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))
  return {"mean": mean, "sd": sd, "n": n, "lo": mean - half, "hi": mean + half, "half": half}


def summarize(per_run: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, tuple[float, float, int]]]:
  """``{"label/seedS": {metric: value}}`` -> ``{label: {metric: (mean, sd, n_seeds)}}``; sd is the sample
  standard deviation (ddof 1; nan for one seed)."""
  groups: dict[str, list[Mapping[str, float]]] = {}
  for key, metrics in per_run.items():
    groups.setdefault(key.rsplit("/seed", 1)[0], []).append(metrics)
  out = {}
  for label, runs in groups.items():
    keys = sorted(set().union(*[set(r) for r in runs]))
    out[label] = {}
    for k in keys:
      vals = [float(r[k]) for r in runs if k in r and r[k] is not None and not math.isnan(float(r[k]))]
      if vals:
        out[label][k] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"),
                         len(vals))
  return out


def markdown_table(summary: Mapping[str, Mapping[str, tuple[float, float, int]]],
                   columns: Sequence[tuple[str, str]], digits: int = 3) -> str:
  """A markdown table: one row per label, ``mean ± sd`` (sample sd, ddof 1) per ``(metric key, header)`` column,
  and the seeds."""
  lines = ["| run | " + " | ".join(h for _, h in columns) + " | seeds |", "|---|" + "---|" * (len(columns) + 1)]
  for label, s in summary.items():
    cells = []
    n = 0
    for k, _ in columns:
      if k in s:
        m, sd, n = s[k]
        cells.append(f"{m:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{m:.{digits}f}")
      else:
        cells.append("")
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
  return "\n".join(lines)


def pareto_front(points: Sequence[tuple[float, float]], x_larger_better: bool) -> list[tuple[float, float]]:
  """The non-dominated points (y larger is better; x larger or smaller is better), sorted by x."""
  pts = sorted(set((float(x), float(y)) for x, y in points if np.isfinite(x) and np.isfinite(y)))
  front = []
  for p in pts:
    dominated = any((q[1] >= p[1]) and ((q[0] >= p[0]) if x_larger_better else (q[0] <= p[0])) and q != p
                    for q in pts)
    if not dominated:
      front.append(p)
  return sorted(front)


_STYLES = {"adrpo": ("*", "C3", 14), "fixed_beta": ("o", "C0", 8), "grpo": ("o", "C0", 8),
           "orw_cfm_w2": ("s", "C2", 8), "none": ("X", "C1", 10)}


def plot_frontiers(summary: Mapping[str, Mapping[str, tuple[float, float, int]]], labels: Mapping[str, tuple[str, str]],
                   y: tuple[str, str], panels: Sequence[tuple[str, str, bool]], out: Path, title: str,
                   initial: Mapping[str, float] | None = None) -> None:
  """One panel per ``(x key, x label, x larger is better)``: every label's mean +- std, and per family the
  Pareto frontier of its points (a line; the dashed black line is the frontier over all points).

  ``labels``: ``{label: (family, text)}``; ``y``: ``(key, axis label)``.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  ykey, ylabel = y
  fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 5), squeeze=False)
  for ax, (xkey, xlabel, larger) in zip(axes[0], panels):
    fam_pts: dict[str, list[tuple[float, float]]] = {}
    for label, s in summary.items():
      if xkey not in s or ykey not in s:
        continue
      family, text = labels.get(label, (label, label))
      marker, color, size = _STYLES.get(family, ("D", "k", 7))
      ax.errorbar(s[xkey][0], s[ykey][0], xerr=s[xkey][1], yerr=s[ykey][1], fmt=marker, color=color, ms=size,
                  capsize=2, lw=1)
      ax.annotate(text, (s[xkey][0], s[ykey][0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
      fam_pts.setdefault(family, []).append((s[xkey][0], s[ykey][0]))
    for family, pts in fam_pts.items():
      front = pareto_front(pts, larger)
      _, color, _ = _STYLES.get(family, ("D", "k", 7))
      ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=color, alpha=0.6, label=f"{family} frontier")
    allf = pareto_front([p for pts in fam_pts.values() for p in pts], larger)
    ax.plot([p[0] for p in allf], [p[1] for p in allf], "k--", lw=0.8, alpha=0.6, label="overall frontier")
    if initial and xkey in initial and ykey in initial:
      ax.plot([initial[xkey]], [initial[ykey]], "k^", ms=8, label="start")
    ax.set_xlabel(xlabel + (" \u2192 better" if larger else " (\u2190 better)"))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)


def plot_curves(curves: Mapping[str, Mapping[str, list[tuple[list[int], list[float]]]]], keys: Sequence[tuple[str, str]],
                out: Path, title: str) -> None:
  """Curves over steps: ``curves[label][key]`` = one ``(steps, values)`` per seed; one panel per key; the mean
  over seeds thick, the seeds thin."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False)
  for ax, (key, name) in zip(axes[0], keys):
    for i, (label, per_key) in enumerate(curves.items()):
      runs = [r for r in per_key.get(key, []) if r[0]]
      if not runs:
        continue
      for steps, vals in runs:
        ax.plot(steps, vals, color=f"C{i}", alpha=0.25, lw=0.8)
      common = sorted(set.intersection(*[set(s) for s, _ in runs]))
      if common:
        mean = [np.mean([v[s.index(c)] for s, v in runs]) for c in common]
        ax.plot(common, mean, color=f"C{i}", lw=2, label=label)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)


def sensitivity(summary: Mapping[str, Mapping[str, tuple[float, float, int]]], families: Mapping[str, str],
                betas: Mapping[str, float | None], key: str) -> dict[str, dict[str, Any]]:
  """Final ``key`` against beta per family, and its spread ``max - min`` over the family's beta grid (one number
  per method: how much the result depends on tuning beta; smaller = less sensitive)."""
  out: dict[str, dict[str, Any]] = {}
  for label, s in summary.items():
    fam, beta = families.get(label), betas.get(label)
    if fam is None or beta is None or key not in s:
      continue
    out.setdefault(fam, {"points": {}})["points"][float(beta)] = s[key][0]
  for fam, d in out.items():
    vals = list(d["points"].values())
    d["spread"] = float(max(vals) - min(vals)) if vals else float("nan")
    d["best_beta"] = max(d["points"], key=d["points"].get)
    d["points"] = dict(sorted(d["points"].items()))
  return out


def sensitivity_markdown(sens: Mapping[str, Mapping[str, Any]], key_name: str) -> str:
  betas = sorted(set().union(*[set(d["points"]) for d in sens.values()])) if sens else []
  lines = [f"| method | " + " | ".join(f"{key_name} @ beta={b:g}" for b in betas) + " | spread (max - min) | best beta |",
           "|---|" + "---|" * (len(betas) + 2)]
  for fam, d in sens.items():
    cells = [f"{d['points'][b]:.3f}" if b in d["points"] else "" for b in betas]
    lines.append(f"| {fam} | " + " | ".join(cells) + f" | {d['spread']:.3f} | {d['best_beta']:g} |")
  return "\n".join(lines)


def paired_deltas(workdir: Path, pairs: Sequence[tuple[str, str]], keys: Sequence[str],
                  step: int | None = None) -> dict[str, dict[str, dict[str, Any]]]:
  """Seed-paired differences ``a - b`` of the final (or ``step``) values of ``keys`` for each ``(a, b)`` label
  pair of a finished sweep in ``workdir``: ``{f"{a} - {b}": {key: {"deltas": {seed: d}, "mean", "std",
  "same_sign"}}}``; only seeds present in both runs count (``same_sign``: how many deltas share the mean's sign).
  Pairing removes the seed's shared part (same initial samples), so a difference smaller than its paired std is
  one the seeds cannot tell."""
  workdir = Path(workdir)
  out: dict[str, dict[str, dict[str, Any]]] = {}
  for a, b in pairs:
    seeds_a = {p.name for p in (workdir / a).glob("seed*") if (p / "DONE").exists()}
    seeds_b = {p.name for p in (workdir / b).glob("seed*") if (p / "DONE").exists()}
    seeds = sorted(seeds_a & seeds_b, key=lambda n: int(n[4:]))
    if not seeds:
      raise ValueError(f"no finished seed of both {a!r} and {b!r} in {workdir}")
    entry = {}
    for key in keys:
      deltas = {}
      for seed in seeds:
        va = final_eval(load_records(workdir / a / seed), [key], step).get(key)
        vb = final_eval(load_records(workdir / b / seed), [key], step).get(key)
        if va is not None and vb is not None:
          deltas[int(seed[4:])] = float(va - vb)
      if deltas:
        d = np.asarray(list(deltas.values()))
        mean = float(d.mean())
        entry[key] = {"deltas": deltas, "mean": mean, "std": float(d.std(ddof=1)) if d.size > 1 else float("nan"),
                      "same_sign": int(np.sum(np.sign(d) == np.sign(mean)))}
    out[f"{a} - {b}"] = entry
  return out


def paired_markdown(paired: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
  """One row per (pair, key): the per-seed deltas, mean +- std and how many seeds share the mean's sign."""
  lines = ["| pair | metric | per-seed deltas | mean ± std | same sign |", "|---|---|---|---|---|"]
  for pair, entry in paired.items():
    for key, d in entry.items():
      per_seed = ", ".join(f"{v:+.3f}" for v in d["deltas"].values())
      lines.append(f"| {pair} | {key} | {per_seed} | {d['mean']:+.3f} ± {d['std']:.3f} | "
                   f"{d['same_sign']}/{len(d['deltas'])} |")
  return "\n".join(lines)


def write_results(path: Path, **payload) -> None:
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Path(path).write_text(json.dumps(payload, indent=1, default=str))


def _paired_main(argv: Sequence[str]) -> None:
  import argparse
  parser = argparse.ArgumentParser(prog="python experiments/_sweep.py --paired",
                                   description="seed-paired differences A - B of a finished sweep's final values")
  parser.add_argument("workdir", type=Path)
  parser.add_argument("pairs", nargs="+", metavar="A:B", help="run labels, e.g. adrpo_beta1:fixed_beta_beta1")
  parser.add_argument("--keys", nargs="+", required=True, help="metric keys, e.g. eval/reward_mean")
  parser.add_argument("--step", type=int, default=None, help="compare at this eval step (default: the last)")
  args = parser.parse_args(argv)
  pairs = []
  for item in args.pairs:
    a, sep, b = item.partition(":")
    if not sep or not a or not b:
      parser.error(f"pair {item!r} must be A:B (two run labels)")
    pairs.append((a, b))
  print(paired_markdown(paired_deltas(args.workdir, pairs, args.keys, args.step)))


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.path.insert(0, str(REPO))
    _child(Path(sys.argv[2]))
  elif len(sys.argv) > 1 and sys.argv[1] == "--paired":
    _paired_main(sys.argv[2:])
  elif len(sys.argv) > 1 and sys.argv[1] == "--report":
    import _report  # pylint: disable=import-outside-toplevel
    raise SystemExit(_report.main(sys.argv[2:]))
  else:
    raise SystemExit("usage: python experiments/_sweep.py --child SPEC.json (started by run_sweep)\n"
                     "       python experiments/_sweep.py --paired WORKDIR A:B [A:B ...] --keys KEY [KEY ...]\n"
                     "       python experiments/_sweep.py --report [--check]   (README tables from the JSON files)")
