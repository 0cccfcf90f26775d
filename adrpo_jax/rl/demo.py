"""The CPU demo: SFT a tiny LM on arithmetic (cached), then RL fine-tune it with GRPO and with ADRPO.

    python -m adrpo_jax.rl.demo --workdir /tmp/adrpo_demo [--steps 200] [--seed 0]

Runs, in a few minutes on a laptop CPU and with nothing downloaded:

1. the built-in tiny model (``builtin:tiny_arith``): supervised next-token training to a weak sampled accuracy,
   saved as a Hugging Face directory in ``$ADRPO_JAX_CACHE`` / ``~/.cache/adrpo_jax`` (skipped when cached);
2. ``configs/llm_arith.py:cpu_grpo`` (fixed KL coefficient) into ``WORKDIR/grpo`` and ``configs/llm_arith.py:cpu``
   (ADRPO, adaptive coefficient) into ``WORKDIR/adrpo`` -- the same runs as ``launch.py`` would do
   (checkpoints, ``metrics.jsonl``, TensorBoard events, ``samples.jsonl``, ``final_model/``);
3. a plot of the exact-match reward, the KL to the reference and the held-out accuracy over steps,
   ``WORKDIR/reward_kl.png``, and a summary table on stdout.

Re-running resumes / skips finished runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_experiment_config", "plot_runs", "summarize_run", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_experiment_config(name: str, variant: str = "") -> Any:
    """``get_config(variant)`` of the packaged config ``adrpo_jax/configs/<name>.py`` (loaded from its file: the
    configs are a layer above this package)."""
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (the packaged configs: adrpo_jax/configs/)")
    spec = importlib.util.spec_from_file_location(f"_adrpo_config_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot_runs(runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], path: str | os.PathLike, *,
              keys: Sequence[tuple[str, str]] = (("reward/exact_match_mean", "exact-match reward (train samples)"),
                                                 ("kl_mean", "KL(policy || reference) per token"),
                                                 ("eval/accuracy", "held-out greedy accuracy")),
              title: str = "") -> Path:
    """One panel per metric; each method's runs (seeds) as thin lines and their mean as a thick line."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8))
    axes = np.atleast_1d(axes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes, keys):
        for c, (method, seed_runs) in zip(colors, runs.items()):
            curves = [_series(recs, key) for recs in seed_runs]
            curves = [cv for cv in curves if cv[0]]
            for steps, values in curves:
                ax.plot(steps, values, color=c, alpha=0.3 if len(curves) > 1 else 1.0, lw=1)
            if len(curves) > 1:
                n = min(len(v) for _, v in curves)
                ax.plot(curves[0][0][:n], np.mean([v[:n] for _, v in curves], axis=0), color=c, lw=2.5,
                        label=f"{method} (mean of {len(curves)})")
            elif curves:
                ax.lines[-1].set_label(method)
        ax.set_title(label)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize_run(records: Sequence[Mapping[str, Any]], key: str = "reward/exact_match_mean",
                  window: int = 3) -> dict[str, float]:
    """Start / end (mean of the first / last ``window`` logged values) of ``key``, the final KL and accuracy."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    _, values = _series(records, key)
    _, kl = _series(records, "kl_mean")
    _, acc = _series(records, "eval/accuracy")
    return {"reward_start": float(np.mean(values[:window])) if values else float("nan"),
            "reward_end": float(np.mean(values[-window:])) if values else float("nan"),
            "kl_end": float(np.mean(kl[-window:])) if kl else float("nan"),
            "accuracy_start": acc[0] if acc else float("nan"), "accuracy_end": acc[-1] if acc else float("nan")}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="output directory (runs, plot)")
    parser.add_argument("--steps", type=int, default=0, help="RL steps per run (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    from adrpo_jax.rl.sft import ensure_tiny_arith_model  # pylint: disable=import-outside-toplevel
    from adrpo_jax.rl.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train.distributed import setup_compilation_cache  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train.metrics import read_jsonl  # pylint: disable=import-outside-toplevel

    setup_compilation_cache(str(workdir / ".xla_cache"))
    start = time.time()
    sft_dir = ensure_tiny_arith_model()
    with open(sft_dir / "sft_metrics.json", encoding="utf-8") as f:
        sft = json.load(f)
    print(f"[demo] SFT model: {sft_dir} (sampled accuracy {sft['sampled_accuracy']:.3f}, greedy "
          f"{sft['greedy_accuracy']:.3f}, {sft['steps']} SFT steps)", flush=True)
    runs, summaries, timings = {}, {}, {}
    for name, variant in (("GRPO (fixed beta)", "cpu_grpo"), ("ADRPO (adaptive beta)", "cpu")):
        config = load_experiment_config("llm_arith", variant)
        config.seed = args.seed
        if args.steps:
            config.total_steps = args.steps
        config.logging.progress_bar = False
        config.lock()
        run_dir = workdir / ("adrpo" if variant == "cpu" else "grpo")
        t0 = time.time()
        print(f"[demo] {name}: {config.total_steps} RL steps -> {run_dir}", flush=True)
        train_and_evaluate(config, str(run_dir))
        timings[name] = time.time() - t0
        runs[name] = [read_jsonl(run_dir / "metrics.jsonl")]
        summaries[name] = summarize_run(runs[name][0])
    plot = plot_runs(runs, workdir / "reward_kl.png", title="Tiny LM on 1-2 digit addition: GRPO vs ADRPO")
    print("\n[demo] method                   reward start -> end   KL end   held-out acc start -> end   time")
    for name, s in summaries.items():
        print(f"[demo] {name:24s} {s['reward_start']:.3f} -> {s['reward_end']:.3f}      {s['kl_end']:.3f}    "
              f"{s['accuracy_start']:.3f} -> {s['accuracy_end']:.3f}            {timings[name]:.0f} s")
    print(f"\n[demo] plot:    {plot}\n[demo] logs:    {workdir}/{{grpo,adrpo}}/metrics.jsonl (TensorBoard: "
          f"tensorboard --logdir {workdir})\n[demo] samples: {workdir}/{{grpo,adrpo}}/samples.jsonl\n[demo] models:  "
          f"{workdir}/{{grpo,adrpo}}/final_model\n[demo] total {time.time() - start:.0f} s", flush=True)
    return {"summaries": summaries, "plot": str(plot)}


if __name__ == "__main__":
    main()
