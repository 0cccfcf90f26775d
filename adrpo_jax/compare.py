r"""Compare finished (or running) runs: one PNG of curves and one Markdown table, from their ``metrics.jsonl``.

    python -m adrpo_jax.compare RUN_DIR [RUN_DIR ...] --out PREFIX [--labels A B ...]
    python launch.py --mode=compare --workdir=PREFIX_DIR RUN_DIR [RUN_DIR ...]

Writes ``PREFIX.png`` and ``PREFIX.md`` (the table is also printed). The trainer of each run comes from its
``config.json`` (``trainer``), else from the metric names; all runs must be of one kind:

* LLM runs (``'llm'``): reward vs step, held-out accuracy vs step, reward vs KL to the reference.
* flow runs (``'flow'``): reward vs step, eval reward vs eval diversity, eval reward vs the W2 bound.

Table: one row per run, the last logged step, and for each metric its final value (last record that has it)
and its best value (max for rewards/accuracy/diversity, min for KL / W2; with the step where it occurred).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

__all__ = ["load_run", "run_kind", "summarize", "markdown_table", "plot_runs", "compare", "main", "KINDS"]

# kind -> (table metrics (key, label, higher_is_better), curve panels ((x key, y key, title), ...))
KINDS: dict[str, dict[str, Any]] = {
    "llm": {
        "table": (("reward_mean", "reward", True), ("eval/accuracy", "eval accuracy", True),
                  ("kl_mean", "KL", False), ("beta_eff_mean", "beta_eff", None)),
        "panels": (("step", "reward_mean", "train reward vs step"),
                   ("step", "eval/accuracy", "held-out accuracy vs step"),
                   ("kl_mean", "reward_mean", "train reward vs KL(policy || reference)")),
    },
    "flow": {
        "table": (("reward_mean", "reward", True), ("eval/reward_mean", "eval reward", True),
                  ("eval/diversity", "eval diversity", True), ("eval/w2_bound", "eval W2 bound", False)),
        "panels": (("step", "reward_mean", "train reward vs step"),
                   ("eval/diversity", "eval/reward_mean", "eval reward vs eval diversity"),
                   ("eval/w2_bound", "eval/reward_mean", "eval reward vs W2 bound to the pre-trained model")),
    },
}


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(run_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(records of run_dir/metrics.jsonl, config.json as a dict or {})``; FileNotFoundError names the path."""
    from adrpo_jax.train.metrics import read_jsonl  # pylint: disable=import-outside-toplevel

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {str(run_dir)!r} a run directory (launch.py --workdir)?")
    config: dict[str, Any] = {}
    if (run_dir / "config.json").is_file():
        try:
            config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            config = {}
    return read_jsonl(path), config


def run_kind(records: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None = None) -> str:
    """``'llm'`` or ``'flow'``: ``config['trainer']`` when it names one, else guessed from the metric names."""
    trainer = (config or {}).get("trainer")
    if trainer in KINDS:
        return trainer
    keys = set().union(*[set(r) for r in records]) if records else set()
    if keys & {"w2_mean", "eval/w2_bound", "eval/diversity", "images_per_sec"}:
        return "flow"
    if keys & {"kl_mean", "eval/accuracy", "tokens_per_sec"}:
        return "llm"
    raise ValueError(f"cannot tell the trainer of a run (config trainer={trainer!r}, no LLM or flow metrics).")


def _series(records: Sequence[Mapping[str, Any]], xkey: str, ykey: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        x = r.get(xkey)
        y = r.get(ykey)
        if _finite(x) and _finite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def summarize(records: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Any]:
    """``{"last_step", <key>: {"final", "best", "best_step"}}`` for each table metric of ``kind`` (None when the
    run never logged it)."""
    out: dict[str, Any] = {"last_step": max((int(r["step"]) for r in records if "step" in r), default=None)}
    for key, _, higher in KINDS[kind]["table"]:
        steps, values = _series(records, "step", key)
        if not values:
            out[key] = None
            continue
        if higher is None:  # no "best" direction (e.g. the effective KL coefficient)
            best_i = None
        else:
            best_i = max(range(len(values)), key=lambda i: values[i] if higher else -values[i])
        out[key] = {"final": values[-1], "best": values[best_i] if best_i is not None else None,
                                "best_step": int(steps[best_i]) if best_i is not None else None}
    return out


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"


def markdown_table(summaries: Mapping[str, Mapping[str, Any]], kind: str) -> str:
    """The Markdown table of :func:`summarize` results (``{label: summary}``)."""
    head = ["run", "last step"]
    for _, label, higher in KINDS[kind]["table"]:
        head.append(f"{label} final")
        if higher is not None:
            head.append(f"{label} best ({'max' if higher else 'min'}) @ step")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        cells = [name, str(s["last_step"]) if s["last_step"] is not None else "–"]
        for key, _, higher in KINDS[kind]["table"]:
            m = s.get(key)
            cells.append(_fmt(m["final"]) if m else "–")
            if higher is not None:
                cells.append(f"{_fmt(m['best'])} @ {m['best_step']}" if m else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], kind: str, path: str | os.PathLike, *,
                            title: str = "") -> Path:
    """One PNG with a panel per curve of ``kind`` (``KINDS[kind]['panels']``), one line per run."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    panels = KINDS[kind]["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (xkey, ykey, panel_title) in zip(axes[0], panels):
        for name, records in runs.items():
            xs, ys = _series(records, xkey, ykey)
            if not xs:
                continue
            style = "-" if xkey == "step" else "-o"  # reward-vs-X panels: points joined in step order
            ax.plot(xs, ys, style, ms=3, lw=1.5, label=name)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("RL step" if xkey == "step" else xkey)
        ax.set_ylabel(ykey)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                        labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes ``<out>.png`` and ``<out>.md`` for ``run_dirs``; returns ``{"png", "table", "markdown", "kind",
    "summaries"}``. Raises ValueError for no runs, a label count that differs, or runs of different trainers."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("compare needs at least one run directory.")
    if labels is not None and len(labels) != len(dirs):
        raise ValueError(f"--labels has {len(labels)} names for {len(dirs)} run directories.")
    names = list(labels) if labels is not None else [d.name or str(d) for d in dirs]
    if len(set(names)) != len(names):  # same basename in different parents: use the full paths
        names = [str(d) for d in dirs]
    runs, kinds = {}, {}
    for name, d in zip(names, dirs):
        records, config = load_run(d)
        runs[name] = records
        kinds[name] = run_kind(records, config)
    if len(set(kinds.values())) > 1:
        raise ValueError(f"compare runs of one trainer; got {kinds}.")
    kind = next(iter(kinds.values()))
    summaries = {name: summarize(records, kind) for name, records in runs.items()}
    out = Path(out)
    png = plot_runs(runs, kind, out.with_name(out.name + ".png"), title=f"{kind} runs: {', '.join(names)}")
    table = markdown_table(summaries, kind)
    md = out.with_name(out.name + ".md")
    md.write_text(table, encoding="utf-8")
    return {"png": str(png), "table": str(md), "markdown": table, "kind": kind, "summaries": summaries}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adrpo_jax.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.png and PREFIX.md")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per run (default: directory names)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.runs, args.out, labels=args.labels)
    except (FileNotFoundError, ValueError) as err:
        sys.stderr.write(f"ERROR {err}\n")
        return 1
    sys.stdout.write(result["markdown"])
    sys.stdout.write(f"\nWrote {result['png']} and {result['table']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
