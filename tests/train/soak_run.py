r"""One recipe's soak run in its own process (tests/train/test_soak.py runs it; usable by hand):

    python tests/train/soak_run.py --config=configs/llm_arith.py:cpu --workdir=/tmp/soak --steps=300 \
        --set rl.num_prompts_per_step=4 --set rl.group_size=4 --out=/tmp/soak/report.json

It builds the recipe of the config as the runner does and runs :meth:`Recipe.run` (the step-0 evaluation, the
loop with its evaluations and checkpoints) while recording:

* **compiles per program**: every jitted program of ``recipe.fns`` is wrapped; a call after which the program's
  compilation cache (``jax.jit``'s ``_cache_size()``) grew is a compile, recorded with the step and the abstract
  signature of its arguments (per leaf: path, shape, dtype, weak type, sharding; plus the tree structure), so a
  second compile of a program names the leaves whose shape / dtype / sharding changed since its first compile;
* **every XLA compile** of the process (``jax.monitoring``'s backend-compile event, by function name) and the step
  it happened in, so compiles outside the programs (eager operations on changing shapes) show too;
* the process's **resident memory** (``VmRSS``) and the number of live jax arrays after every step (the state
  blocked on, so the step's buffers exist), and the step's wall time.

The report is one JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib.util
import json
import os
import sys
import time
from typing import Any


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def _load_config(spec: str):
    path, _, variant = spec.partition(".py:")
    path = path if path.endswith(".py") else path + ".py"
    module_spec = importlib.util.spec_from_file_location("_soak_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _set(config: Any, dotted: str, text: str) -> None:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    node[leaf] = value


def signature(args: tuple, kwargs: dict) -> dict[str, Any]:
    """The abstract signature jax.jit keys its cache on (for arrays): per leaf path -> 'shape dtype[weak] sharding';
    Python scalars -> their type; plus the tree structure's text."""
    import jax  # pylint: disable=import-outside-toplevel

    leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs))
    out = {}
    for path, leaf in leaves:  # path[0]: 0 = the positional arguments, 1 = the keywords
        key = ("args" if path[0].idx == 0 else "kwargs") + jax.tree_util.keystr(path[1:])
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            weak = "(weak)" if getattr(leaf, "weak_type", False) else ""
            sharding = getattr(leaf, "sharding", None)
            spec = getattr(sharding, "spec", None)
            out[key] = f"{tuple(leaf.shape)} {leaf.dtype}{weak} {spec if spec is not None else type(sharding).__name__}"
        else:
            out[key] = type(leaf).__name__
    return {"leaves": out, "tree": str(treedef)}


def signature_diff(first: dict[str, Any], now: dict[str, Any], limit: int = 8) -> list[str]:
    """What changed between two :func:`signature` s: ``'path: old -> new'`` lines."""
    lines = []
    a, b = first["leaves"], now["leaves"]
    for key in list(dict.fromkeys([*a, *b])):
        if a.get(key) != b.get(key):
            lines.append(f"{key}: {a.get(key, '<absent>')} -> {b.get(key, '<absent>')}")
    if not lines and first["tree"] != now["tree"]:
        lines.append("the argument tree structure (static parts: graph definitions, static arguments) changed")
    return lines[:limit] + ([f"... ({len(lines) - limit} more)"] if len(lines) > limit else [])


class CompileWatch:
    """Wraps ``fns`` (a recipe's dict of jitted programs, in place) and listens to every XLA compile."""

    def __init__(self, fns: dict[str, Any]):
        import jax  # pylint: disable=import-outside-toplevel
        from jax._src import dispatch  # pylint: disable=import-outside-toplevel

        self.step = 0  # the step being run (0: set-up, the step-0 evaluation)
        self.phase = "setup"
        self.programs: dict[str, dict[str, Any]] = {}
        self.backend: list[tuple[int, str, str]] = []  # (step, phase, function name) of every XLA compile
        self._event = dispatch.BACKEND_COMPILE_EVENT
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        for name, fn in list(fns.items()):
            if hasattr(fn, "_cache_size"):
                self.programs[name] = {"compiles": [], "calls": 0, "first_signature": None}
                fns[name] = self._wrap(name, fn)

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        del duration
        if event == self._event:
            self.backend.append((self.step, self.phase, str(kwargs.get("fun_name", "?"))))

    def _wrap(self, name: str, fn: Any):
        record = self.programs[name]

        def call(*args, **kwargs):
            before = fn._cache_size()  # pylint: disable=protected-access
            out = fn(*args, **kwargs)
            record["calls"] += 1
            if fn._cache_size() > before:  # pylint: disable=protected-access
                sig = signature(args, kwargs)
                entry: dict[str, Any] = {"step": self.step, "phase": self.phase}
                if record["first_signature"] is None:
                    record["first_signature"] = sig
                else:
                    entry["changed"] = signature_diff(record["first_signature"], sig)
                record["compiles"].append(entry)
            return out

        call.__wrapped__ = fn
        return call

    def report(self) -> dict[str, Any]:
        return {"programs": {n: {"compiles": r["compiles"], "calls": r["calls"]} for n, r in self.programs.items()},
                "backend_compiles": self.backend}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    config = _load_config(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        _set(config, key, value)
    config.total_steps = args.steps
    config.logging.progress_bar = False

    import jax  # pylint: disable=import-outside-toplevel
    from adrpo_jax.recipe.base import resolve_recipe  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train.config import validate_common_config  # pylint: disable=import-outside-toplevel

    validate_common_config(config)
    config.lock()
    t0 = time.perf_counter()
    recipe = resolve_recipe(config.trainer)(config, args.workdir)
    setup_s = time.perf_counter() - t0
    watch = CompileWatch(recipe.fns)
    rss, live, times = [], [], []
    step_fn, evaluate = recipe.train_step, recipe.evaluate

    def train_step(step: int, state: Any):
        watch.step, watch.phase = step + 1, "step"
        start = time.perf_counter()
        state, metrics = step_fn(step, state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
        rss.append(_rss_kib())
        live.append(len(jax.live_arrays()))
        return state, metrics

    def evaluate_fn(step: int, state: Any):
        watch.phase = "eval"
        try:
            return evaluate(step, state)
        finally:
            watch.phase = "step"

    export = recipe.export

    def export_fn(*a: Any, **k: Any):
        watch.phase = "export"  # after the loop: the final model's export (host-side slicing) is not a step
        return export(*a, **k)

    recipe.train_step, recipe.evaluate, recipe.export = train_step, evaluate_fn, export_fn
    t0 = time.perf_counter()
    result = recipe.run()
    report = {"config": args.config, "trainer": recipe.name, "steps": args.steps, "done": int(result["step"]),
              "setup_s": setup_s, "run_s": time.perf_counter() - t0, "rss_kib": rss, "live_arrays": live,
              "step_s": times, "eval_every": int(config.eval_every),
              "checkpoint_every": int(config.checkpoint.every_steps), "log_every": int(config.log_every),
              **watch.report()}
    counts = collections.Counter(name for _, _, name in watch.backend)
    report["backend_compiles_by_name"] = dict(counts)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
