"""The package's layers, read from its import graph (every import, module level or inside a function):

    losses  <  train (the kit)  <  models  <  recipe  <  rl, flow  <  configs  <  launch  (<  experiments)

No package imports one above it, there is no cycle between packages, and loading a config module (the packaged
ones in adrpo_jax/configs/ and the checkout's configs/ that re-export them) imports no jax."""

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "adrpo_jax"
FLOOR = {"losses": 0, "cache": 0, "train": 1, "models": 2, "recipe": 3, "rl": 4, "flow": 4, "compare": 4,
         "configs": 5, "launch": 6}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "adrpo_jax" else None


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        src = _part(".".join(rel.parts)) if rel.name != "__init__" or len(rel.parts) > 2 else None
        if src is None:
            continue
        targets = {p for p in (_part(m) for m in _imports(path)) if p is not None and p != src}
        graph.setdefault(src, set()).update(targets)
    return graph


def test_no_package_imports_a_higher_layer():
    bad = [(src, dst) for src, dsts in _graph().items() for dst in dsts
           if src in FLOOR and dst in FLOOR and FLOOR[dst] > FLOOR[src]]
    assert not bad, f"imports from a lower layer to a higher one: {bad}"


def test_no_cycle_between_packages():
    graph = _graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = [p for p in graph if p in reach(p)]
    assert not cycles, f"packages on an import cycle: {cycles}"


def test_config_modules_import_no_jax():
    code = ("import sys, importlib.util, glob\n"
            "files = sorted(glob.glob('adrpo_jax/configs/*.py')) + sorted(glob.glob('configs/*.py'))\n"
            "assert len(files) >= 13, files\n"
            "for f in files:\n"
            "    s = importlib.util.spec_from_file_location('c', f); m = importlib.util.module_from_spec(s)\n"
            "    s.loader.exec_module(m); getattr(m, 'get_config', lambda: None)()\n"
            "import adrpo_jax.rl.config, adrpo_jax.flow.config, adrpo_jax.train.config\n"
            "print(sorted(k for k in sys.modules if k == 'jax' or k.startswith(('jax.', 'flax'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
