"""The launcher inside the package (adrpo_jax/launch.py): subcommands, packaged config names, the checkout's shims.

Fast: the command-line rewriting (``resolve_argv``), the packaged configs against the checkout's ``configs/``
re-exports, and the flag errors of ``python -m adrpo_jax.launch`` (they stop before jax is imported). The wheel
itself (``adrpo-jax train --config=llm_arith:cpu`` in a fresh virtualenv, outside the repository):
tests/test_wheel.py (slow).
"""

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adrpo_jax import configs
from adrpo_jax.launch import MODES, resolve_argv

REPO = Path(__file__).resolve().parents[2]
PACKAGED = Path(configs.__file__).parent


def test_subcommands_map_to_mode():
    for mode in MODES:
        assert resolve_argv(["adrpo-jax", mode, "--workdir=w"]) == ["adrpo-jax", f"--mode={mode}", "--workdir=w"]
    # --mode alone (today's launch.py commands) is untouched; a subcommand that repeats it is dropped
    assert resolve_argv(["launch.py", "--workdir=w", "--mode=eval"]) == ["launch.py", "--workdir=w", "--mode=eval"]
    assert resolve_argv(["x", "eval", "--mode=eval", "--workdir=w"]) == ["x", "--mode=eval", "--workdir=w"]
    with pytest.raises(ValueError, match=r"the subcommand 'train' and --mode=eval disagree"):
        resolve_argv(["x", "train", "--mode=eval", "--workdir=w"])
    # compare's positional arguments are run directories, whatever their names
    assert resolve_argv(["x", "eval", "train", "--mode=compare", "--workdir=o"]) == \
        ["x", "eval", "train", "--mode=compare", "--workdir=o"]
    # only the first argument is a subcommand
    assert resolve_argv(["x", "--workdir=w", "train"]) == ["x", "--workdir=w", "train"]


def test_packaged_config_names_resolve_to_the_packaged_files(tmp_path, monkeypatch):
    path = str(PACKAGED / "llm_arith.py")
    assert resolve_argv(["x", "--config=llm_arith:cpu_grpo"]) == ["x", f"--config={path}:cpu_grpo"]
    assert resolve_argv(["x", "--config=llm_arith"]) == ["x", f"--config={path}"]
    assert resolve_argv(["x", "--config", "llm_pod:qwen3-8b,full,4k"]) == \
        ["x", "--config", f"{PACKAGED / 'llm_pod.py'}:qwen3-8b,full,4k"]
    # paths are left to ml_collections: the checkout's shims, a file of one's own, a name that is a file here
    for spec in ("configs/llm_arith.py:cpu", "/abs/my.py", "my_config.py:x", "sub/dir:x"):
        assert resolve_argv(["x", f"--config={spec}"]) == ["x", f"--config={spec}"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llm_arith").write_text("")
    assert resolve_argv(["x", "--config=llm_arith:cpu"]) == ["x", "--config=llm_arith:cpu"]
    (tmp_path / "llm_arith").unlink()
    (tmp_path / "llm_arith").mkdir()  # a directory of that name (e.g. a workdir) is not a config file
    assert resolve_argv(["x", "--config=llm_arith:cpu"]) == ["x", f"--config={path}:cpu"]
    with pytest.raises(ValueError, match=r"'llm_arth' is neither a file nor a packaged config \(did you mean "
                                         r"'llm_arith'\?\); the packaged configs are llm_arith, "):
        resolve_argv(["x", "--config=llm_arth:cpu"])


def test_packaged_configs_and_the_checkout_shims_agree():
    assert sorted(configs.NAMES) == sorted(p.stem for p in PACKAGED.glob("*.py") if p.stem != "__init__")
    assert sorted(configs.NAMES) == sorted(p.stem for p in (REPO / "configs").glob("*.py"))
    for name in configs.NAMES:
        packaged = importlib.import_module(f"adrpo_jax.configs.{name}")
        spec = importlib.util.spec_from_file_location(f"_shim_{name}", REPO / "configs" / f"{name}.py")
        shim = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shim)
        assert shim.get_config is packaged.get_config, name
        assert getattr(shim, "VARIANTS", None) == getattr(packaged, "VARIANTS", None), name
    with pytest.raises(ValueError, match="no packaged config named 'nope'; the packaged configs are llm_arith"):
        configs.config_path("nope")


def _module_launch(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "adrpo_jax.launch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_module_launcher_flag_errors_outside_the_repository(tmp_path):
    """``python -m adrpo_jax.launch`` from another directory: a packaged name with an unknown key, a misspelt
    name, disagreeing subcommand and --mode: exit 1, one line, before jax is imported."""
    r = _module_launch("train", "--config=llm_arith:cpu", f"--workdir={tmp_path / 'w'}",
                       "--config.rl.num_generations=4", cwd=tmp_path)
    assert r.returncode == 1 and "Did you mean `rl.group_size` (TRL's `num_generations`)?" in r.stderr, \
        r.stderr[-2000:]
    r = _module_launch("--config=flow_digit:cpu", f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
    assert r.returncode == 1 and "(did you mean 'flow_digits'?)" in r.stderr, r.stderr[-2000:]
    r = _module_launch("plan", "--mode=train", f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
    assert r.returncode == 1 and "the subcommand 'plan' and --mode=train disagree" in r.stderr, r.stderr[-2000:]
    r = _module_launch("eval", f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
    assert r.returncode == 1 and "--mode=eval without --config reads the run's config" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_importing_the_launcher_defines_no_flags_and_imports_no_jax():
    code = ("import sys\nfrom absl import flags\nimport adrpo_jax.launch as l\n"
            "assert 'workdir' not in flags.FLAGS and 'config' not in flags.FLAGS\n"
            "l.resolve_argv(['x', 'train', '--config=sd3_adrpo:cpu'])\n"
            "l._define_flags(); l._define_flags()  # idempotent\n"
            "print(sorted(k for k in sys.modules if k == 'jax' or k.startswith(('jax.', 'flax'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:] + out.stdout


def test_version_and_no_arguments(tmp_path):
    import adrpo_jax

    r = _module_launch("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"adrpo_jax {adrpo_jax.__version__}", r.stderr[-2000:]
    r = _module_launch(cwd=tmp_path)  # the commands, then absl's error about the missing --workdir (exit 1)
    assert r.returncode == 1 and r.stderr.startswith("usage:\n  adrpo-jax train --config=NAME[:variant]"), r.stderr
    assert "Flag --workdir must have a value" in r.stderr
