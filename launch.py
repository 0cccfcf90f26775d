r"""The single entry point for training runs, their evaluation and their comparison.

    python launch.py --config=configs/<experiment>.py[:variant] --workdir=DIR [--config.key=value ...]
    python launch.py --workdir=DIR --mode=eval                   # newest checkpoint -> DIR/eval.jsonl (DIR's config)
    python launch.py --mode=compare --workdir=OUT RUN_DIR [RUN_DIR ...]   # OUT/compare.png, OUT/compare.md

Steps: parse and validate the config (unknown keys and bad values fail here, naming the key), initialize
``jax.distributed`` when ``config.distributed`` or the environment asks for it, enable the persistent
compilation cache, then run the recipe of ``config.trainer`` through the runner (``adrpo_jax/recipe/runner.py``;
names in ``adrpo_jax/recipe/base.py``), which writes ``DIR/config.json`` (process 0) once the first step succeeded
(a failed start leaves none behind). Re-running the same command
resumes from the last checkpoint in ``DIR/checkpoints``. Exit code 0 on success and after a graceful
preemption (SIGTERM/SIGINT); 1 with a one-line message for config, checkpoint-mismatch and non-finite errors.
Multi-host commands: docs/distributed.md. A lost process (killed, host down) of a multi-process run stops
the others within ``distributed.heartbeat_timeout_s`` with one line naming it, the last checkpoint step and the
command to resume, exit code 75 (``adrpo_jax/train/distributed.py``). ``--mode=eval``:
``adrpo_jax/recipe/runner.py``; without ``--config`` it reads the run's own ``DIR/config.json``
(``adrpo_jax/recipe/workdir_config.py``; ``--config.*`` overrides still apply). ``--mode=compare``:
``adrpo_jax/compare.py``.

For users porting a run (docs/porting_trl.md): an unknown key names the keys it may have meant (TRL's names
included: ``--config.rl.num_generations`` -> ``rl.group_size``); overriding ``rewards.functions`` alone sets
``rewards.weights`` to 1.0 per function and points ``eval.accuracy_reward`` at the first function
(``apply_override_followers``); ``import_path`` gets the config file's directory and the current directory, so a
``'module:function'`` reward next to either imports without ``PYTHONPATH``. A finished run prints a short summary
with the paths of its outputs.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file: path/to/config.py[:variant].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config.json).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "plan", "compare"],
                          "train | eval (the newest checkpoint -> WORKDIR/eval.jsonl) | plan (every program compiled "
                          "for --config.plan.target, no weights -> WORKDIR/plan.json) | compare (positional run "
                          "directories -> WORKDIR/compare.png and WORKDIR/compare.md).")
flags.mark_flags_as_required(["workdir"])

log = logging.getLogger("launch")


def _override_keys(argv: list[str]) -> list[str]:
    keys = []
    for arg in argv[1:]:
        if arg.startswith("--config.") or arg.startswith("-config."):
            keys.append(arg.split("config.", 1)[1].split("=", 1)[0])
    return keys


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config=") or arg.startswith("-config="):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_config_file(spec: str):
    """``get_config(arg)`` of ``path.py[:arg]`` (what ``--config`` does), to diagnose a failed override."""
    import importlib.util  # pylint: disable=import-outside-toplevel

    path, sep, arg = spec.partition(".py:")
    path = path + ".py" if sep else spec
    module_spec = importlib.util.spec_from_file_location("_adrpo_config_for_diagnosis", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` / ``--name value`` in ``argv`` (the last one), else None."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        for prefix in (f"--{name}=", f"-{name}="):
            if arg.startswith(prefix):
                value = arg[len(prefix):]
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _with_workdir_config(argv: list[str]) -> list[str]:
    """``--mode=eval`` without ``--config``: ``--config=<workdir_config.py>:WORKDIR`` (the run's own config.json)
    inserted before the overrides; a one-line error when WORKDIR has no config.json."""
    if _flag_value(argv, "mode") != "eval" or _config_arg(argv) is not None:
        return argv
    workdir = _flag_value(argv, "workdir")
    if not workdir:
        return argv  # absl reports the missing --workdir
    path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "config.json")
    if not os.path.isfile(path):
        sys.stderr.write(f"FATAL --mode=eval without --config reads the run's config from {path}, which does not "
                         "exist (a run writes it once its first step succeeded). Pass the run's "
                         "--config=path/to/config.py[:variant] and its --config.* overrides.\n")
        sys.exit(1)
    from adrpo_jax.recipe import workdir_config  # pylint: disable=import-outside-toplevel
    return [argv[0], f"--config={workdir_config.__file__}:{os.path.abspath(os.path.expanduser(workdir))}",
            *argv[1:]]


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a clear message (naming the full key and the keys it may have meant) for unknown
    ``--config.*`` overrides; ``--mode=eval`` without ``--config`` reads ``WORKDIR/config.json``."""
    argv = _with_workdir_config(list(argv))
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:
        message = None
        path = _config_arg(argv)
        if path is not None:
            from adrpo_jax.train.config import find_unknown_override  # pylint: disable=import-outside-toplevel
            try:
                config = _load_config_file(path)
                message = find_unknown_override(config, _override_keys(argv))
            except Exception:  # pylint: disable=broad-except
                message = None
        sys.stderr.write(f"FATAL Flags parsing error: {message or f'unknown config key {err}'}\n")
        sys.exit(1)
    except flags.Error as err:
        sys.stderr.write(f"FATAL Flags parsing error: {err}\nPass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)


def _compare(run_dirs: list[str], out_dir: str) -> None:
    from adrpo_jax import compare  # pylint: disable=import-outside-toplevel

    if not run_dirs:
        raise app.UsageError("--mode=compare needs run directories as positional arguments.")
    sys.exit(compare.main([*run_dirs, "--out", os.path.join(out_dir, "compare")]))


def _plan(config, workdir: str) -> None:
    """--mode=plan: compile every program of the recipe for ``plan.target`` (adrpo_jax/recipe/plan.py)."""
    import re  # pylint: disable=import-outside-toplevel
    target = str(config.plan.target or "")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a topology is compiled for, not run on: no accelerator needed
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: libtpu's process lock is not needed
    import jax  # pylint: disable=import-outside-toplevel
    m = re.match(r"^cpu:(\d+)", target)
    if m:
        jax.config.update("jax_num_cpu_devices", max(int(m.group(1)), 1))
    from adrpo_jax.recipe import plan as plan_lib  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train.config import ConfigError  # pylint: disable=import-outside-toplevel
    try:
        report = plan_lib.plan(config, target, workdir=workdir)
    except plan_lib.PlanError as err:
        sys.stderr.write(f"ERROR PlanError: {err}\n(report: {os.path.join(workdir, 'plan.json')})\n")
        sys.exit(1)
    except ConfigError as err:
        sys.stderr.write(f"ERROR ConfigError: {err}\n")
        sys.exit(1)
    print(plan_lib.format_report(report), flush=True)
    log.info("Wrote %s", report.get("output"))


def main(argv: list[str]) -> None:
    if _MODE.value == "compare":
        _compare(argv[1:], os.path.abspath(os.path.expanduser(_WORKDIR.value)))
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (except with --mode=compare).")
    # Heavy imports after flag parsing (fast failure for bad flags); jax is imported but not yet initialized.
    from adrpo_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train import distributed  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train.checkpoint import (  # pylint: disable=import-outside-toplevel
        CheckpointMismatchError, CheckpointRestoreError, CheckpointSaveError)
    from adrpo_jax.train.loop import NonFiniteUpdatesError  # pylint: disable=import-outside-toplevel
    from adrpo_jax.recipe.plan import PlanError  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS["verbosity"].present:
        # orbax logs every save phase at INFO through absl; keep those at WARNING (pass --verbosity=0 to see them).
        logging.getLogger("absl").setLevel(logging.WARNING)
    config = _CONFIG.value
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    for message in config_lib.apply_override_followers(config, _override_keys(sys.argv)):
        log.info("%s", message)
    _extend_import_path(config)
    if _MODE.value == "plan":
        config_lib.validate_common_config(config)
        return _plan(config, workdir)
    try:
        config_lib.validate_common_config(config)
        from adrpo_jax.recipe import base as recipe_base  # pylint: disable=import-outside-toplevel
        recipe_base.validate_trainer_name(config.trainer)
        if not config.is_locked:
            config.lock()
        if distributed.initialize_from_config(config.distributed):  # before any device use
            distributed.PeerWatchdog(config.distributed.heartbeat_timeout_s,
                                     checkpoint_dir=os.path.join(workdir, "checkpoints")).start()
        distributed.setup_compilation_cache(config.compilation_cache_dir)

        import jax  # pylint: disable=import-outside-toplevel
        from adrpo_jax.train.sharding import make_mesh  # pylint: disable=import-outside-toplevel
        log.info("adrpo_jax launch: %s; workdir %s", distributed.describe_processes(), workdir)
        make_mesh(config.mesh)  # fail now (naming mesh.*) if the mesh does not fit the devices
        from adrpo_jax.recipe import runner  # pylint: disable=import-outside-toplevel
        if _MODE.value == "eval":
            runner.evaluate_run(config, workdir)
            log.info("Wrote %s", os.path.join(workdir, runner.EVAL_FILE))
            return
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            runner.warn_config_changes(config, workdir)  # config.json: written by the runner after the first step
        result = runner.train(config, workdir)
    except (config_lib.ConfigError, CheckpointMismatchError, CheckpointRestoreError, CheckpointSaveError,
            NonFiniteUpdatesError, FileNotFoundError, PlanError) as err:
        sys.stderr.write(f"ERROR {type(err).__name__}: {err}\n")
        sys.stderr.flush()
        sys.exit(1)
    result = dict(result or {})
    if result.get("preempted"):
        log.warning("Run preempted at step %s; checkpoint saved. Re-run the same command to resume.",
                    result.get("step"))
    elif jax.process_index() == 0:
        print(runner.run_summary(result, workdir, config), flush=True)


def _extend_import_path(config) -> None:
    """``config.import_path`` += the config file's directory and the current directory (absolute; those already
    there are kept once), so that a ``'module:function'`` reward next to either imports without ``PYTHONPATH``
    (``--mode=eval`` re-reads the directories from the run's config.json)."""
    if "import_path" not in config:
        return
    spec = _config_arg(sys.argv)
    dirs = [d for d in str(config.import_path or "").split(os.pathsep) if d]
    from adrpo_jax.recipe import workdir_config  # pylint: disable=import-outside-toplevel
    if spec:
        path = spec.split(".py:", 1)[0] + ".py" if ".py:" in spec else spec
        if os.path.abspath(path) != os.path.abspath(workdir_config.__file__):
            dirs.append(os.path.dirname(os.path.abspath(os.path.expanduser(path))))
    dirs.append(os.getcwd())
    unique = []
    for d in dirs:
        d = os.path.abspath(os.path.expanduser(d))
        if d not in unique:
            unique.append(d)
    config.import_path = os.pathsep.join(unique)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    app.run(main, flags_parser=_parse_flags)
