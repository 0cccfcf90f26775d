r"""Guard for refactors: the same short runs on two commits must give bit-identical metrics and weights.

    python benchmarks/compare_commits.py OLD NEW [--steps 6] [--out /tmp/guard] [--reuse-old]

For each recipe's cpu variant (llm_arith:cpu, its LoRA + refreshed-reference form, flow_digits:cpu and :cpu_lora)
it runs ``launch.py`` for ``--steps`` steps (evaluating every ``steps / 2``) in a git worktree of OLD and of NEW and
compares ``metrics.jsonl`` (every key but timings) and the final checkpoint's arrays exactly. Then a workdir written
by OLD after 2 steps is resumed by NEW to 4 steps (all four recipes, SD3 and audio included) and compared with OLD
run uninterrupted to 4. Exact equality is right here: the same computation run twice on one machine (the runs of
one recipe compile the same programs); run it on one machine, not across two. ``--reuse-old`` keeps OLD's runs
from an earlier call (same OLD, same ``--steps``) and runs NEW alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TIMING = ("time/", "perf/")
TIMING_KEYS = {"step_time_s", "steps_per_sec", "tokens_per_sec", "images_per_sec", "eval_seconds"}
COMMON = ["--config.log_every=1", "--config.logging.progress_bar=False", "--config.checkpoint.every_steps=1"]
RUNS = {
    "llm": ("configs/llm_arith.py:cpu", []),
    "llm_lora": ("configs/llm_arith.py:cpu", ["--config.lora.enabled=True", "--config.rl.ref_sync_steps=2"]),
    "flow": ("configs/flow_digits.py:cpu", []),
    "flow_lora": ("configs/flow_digits.py:cpu_lora", []),
}
RESUME = {"llm": "configs/llm_arith.py:cpu", "flow": "configs/flow_digits.py:cpu", "sd3": "configs/sd3_adrpo.py:cpu",
          "audio": "configs/audio_arith.py:cpu"}


def _launch(tree: Path, config: str, workdir: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([sys.executable, "launch.py", f"--config={config}", f"--workdir={workdir}", *COMMON, *args],
                   cwd=tree, env=env, check=True)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _compare_metrics(a: Path, b: Path) -> list:
    diffs = []
    ra, rb = _records(a), _records(b)
    if [r["step"] for r in ra] != [r["step"] for r in rb]:
        return [("steps", [r["step"] for r in ra], [r["step"] for r in rb])]
    for x, y in zip(ra, rb):
        keys = {k for k in x if not k.startswith(TIMING) and k not in TIMING_KEYS}
        keys_b = {k for k in y if not k.startswith(TIMING) and k not in TIMING_KEYS}
        if keys != keys_b:
            diffs.append((x["step"], "keys", sorted(keys ^ keys_b)))
        diffs += [(x["step"], k, x[k], y[k]) for k in keys & keys_b if x[k] != y[k]]
    return diffs


def _compare_checkpoints(a: Path, b: Path) -> list:
    import jax  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    with ocp.PyTreeCheckpointer() as c:
        ta, tb = c.restore(a.resolve()), c.restore(b.resolve())
    la, lb = jax.tree_util.tree_flatten_with_path(ta)[0], jax.tree_util.tree_flatten_with_path(tb)[0]
    if [p for p, _ in la] != [p for p, _ in lb]:
        return ["structure differs"]
    return [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(la, lb) if not np.array_equal(x, y)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="/tmp/adrpo_guard")
    ap.add_argument("--reuse-old", action="store_true",
                    help="keep OLD's finished runs already in --out (from an earlier call with the same OLD commit and "
                         "--steps): only NEW runs again, e.g. to check several NEW commits against one OLD")
    args = ap.parse_args()
    out = Path(args.out)
    trees = {}
    for name, commit in (("old", args.old), ("new", args.new)):
        trees[name] = out / f"tree_{name}"
        if not trees[name].exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[name]), commit], cwd=REPO, check=True)
        else:  # a tree of an earlier call: moved to this call's commit
            subprocess.run(["git", "checkout", "--quiet", "--detach", commit], cwd=trees[name], check=True)
    failures = []
    # OLD's runs are reused only when they are of this OLD commit and --steps (the stamp) and finished (their last
    # checkpoint exists); any other OLD output is removed first
    old_sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=trees["old"], capture_output=True, text=True,
                             check=True).stdout.strip()
    stamp, record = out / "old_runs.json", {"commit": old_sha, "steps": args.steps}
    reuse = args.reuse_old and stamp.exists() and json.loads(stamp.read_text()) == record
    if not reuse:
        if args.reuse_old:
            print(f"--reuse-old: no runs of {old_sha[:12]} at --steps={args.steps} in {out}: running OLD again")
        for folder in ("old", "resume"):
            shutil.rmtree(out / folder, ignore_errors=True)
        stamp.write_text(json.dumps(record))

    def launch_old(workdir: Path, config: str, total_steps: int, *extra: str) -> None:
        if reuse and (workdir / "checkpoints" / str(total_steps)).exists():
            return
        shutil.rmtree(workdir, ignore_errors=True)
        _launch(trees["old"], config, workdir, f"--config.total_steps={total_steps}", *extra)

    for run, (config, extra) in RUNS.items():
        evals = f"--config.eval_every={max(args.steps // 2, 1)}"
        launch_old(out / "old" / run, config, args.steps, evals, *extra)
        shutil.rmtree(out / "new" / run, ignore_errors=True)
        _launch(trees["new"], config, out / "new" / run, f"--config.total_steps={args.steps}", evals, *extra)
        m = _compare_metrics(out / "old" / run / "metrics.jsonl", out / "new" / run / "metrics.jsonl")
        c = _compare_checkpoints(out / "old" / run / "checkpoints" / str(args.steps) / "state",
                                 out / "new" / run / "checkpoints" / str(args.steps) / "state")
        print(f"{run}: metrics {'identical' if not m else m[:5]}; final weights {'identical' if not c else c[:5]}")
        failures += m + c
    for run, config in RESUME.items():
        whole, half = out / "resume" / f"{run}_old", out / "resume" / f"{run}_old2"
        mixed = out / "resume" / f"{run}_mixed"
        launch_old(whole, config, 4, "--config.eval_every=0")
        launch_old(half, config, 2, "--config.eval_every=0")
        shutil.rmtree(mixed, ignore_errors=True)
        shutil.copytree(half, mixed)  # OLD's 2-step workdir, resumed by NEW
        _launch(trees["new"], config, mixed, "--config.total_steps=4", "--config.eval_every=0")
        m = _compare_metrics(whole / "metrics.jsonl", mixed / "metrics.jsonl")
        c = _compare_checkpoints(whole / "checkpoints" / "4" / "state", mixed / "checkpoints" / "4" / "state")
        print(f"resume {run} (old 2 steps -> new to 4 vs old 4): metrics {'identical' if not m else m[:5]}; "
              f"weights {'identical' if not c else c[:5]}")
        failures += m + c
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
