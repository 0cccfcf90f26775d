r"""The single entry point for training runs, their evaluation, their plans and their comparison. ::

    adrpo-jax train --config=llm_arith:cpu --workdir=/tmp/arith [--config.key=value ...]
    adrpo-jax eval --workdir=DIR                       # newest checkpoint -> DIR/eval.jsonl (DIR's config.json)
    adrpo-jax plan --config=llm_pod:qwen3-8b,full --workdir=DIR --config.plan.target=v6e:2x4
    adrpo-jax compare --workdir=OUT RUN_DIR [RUN_DIR ...]   # OUT/compare.png, OUT/compare.md

The same as ``python -m adrpo_jax.launch ...`` and, in a checkout, ``python launch.py ...``; the subcommand is
``--mode=train|eval|plan|compare`` (``--mode=`` itself keeps working; ``train`` is the default).
``--config=NAME[:variant]`` names a config shipped in the package (:mod:`adrpo_jax.configs`: ``llm_arith``,
``llm_gsm8k``, ``llm_pod``, ``flow_digits``, ``sd3_adrpo``, ``audio_arith``); ``--config=path/to/file.py[:variant]``
a config file of your own (a checkout's ``configs/NAME.py`` re-export the packaged ones).

Steps: parse and validate the config (unknown keys and bad values fail here, naming the key), initialize
``jax.distributed`` when ``config.distributed`` or the environment asks for it, enable the persistent
compilation cache, then run the recipe of ``config.trainer`` through the runner (``adrpo_jax/recipe/runner.py``;
names in ``adrpo_jax/recipe/base.py``), which writes ``DIR/config.json`` (process 0) once the first step
succeeded (a failed start leaves none behind). Re-running the same command resumes from the last checkpoint in
``DIR/checkpoints``.

Exit codes: 0 on success and after a graceful preemption (SIGTERM/SIGINT); 1 with a one-line message for
flag, config, checkpoint-mismatch and non-finite errors. Multi-host commands: docs/distributed.md. A lost
process (killed, host down) of a multi-process run stops the others within ``distributed.heartbeat_timeout_s``
with one line naming it, the last checkpoint step and the command to resume, exit code 75
(``adrpo_jax/train/distributed.py``). ``eval``: ``adrpo_jax/recipe/runner.py``; without ``--config`` it reads
the run's own ``DIR/config.json`` (``adrpo_jax/recipe/workdir_config.py``; ``--config.*`` overrides still
apply). ``compare``: ``adrpo_jax/compare.py``. ``plan``: ``adrpo_jax/recipe/plan.py``.

For users porting a run (docs/porting_trl.md): an unknown key names the keys it may have meant (TRL's names
included: ``--config.rl.num_generations`` -> ``rl.group_size``); overriding ``rewards.functions`` alone sets
``rewards.weights`` to 1.0 per function and points ``eval.accuracy_reward`` at the first function
(``apply_override_followers``); ``import_path`` gets the config file's directory and the current directory, so a
``'module:function'`` reward next to either imports without ``PYTHONPATH``. A finished run prints a short
summary with the paths of its outputs.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

__all__ = ["MODES", "USAGE", "main", "resolve_argv"]

#: The subcommands (``adrpo-jax MODE ...``), the same as ``--mode=MODE``.
MODES = ("train", "eval", "plan", "compare")

_MODE_HELP = (
    "train | eval (the newest checkpoint -> WORKDIR/eval.jsonl) | plan (every program compiled for "
    "--config.plan.target, no weights -> WORKDIR/plan.json) | compare (positional run directories -> "
    "WORKDIR/compare.png and WORKDIR/compare.md)."
)

#: The commands, printed when the launcher gets no arguments.
USAGE = """usage:
  adrpo-jax train --config=NAME[:variant] --workdir=DIR [--config.key=value ...]
  adrpo-jax eval --workdir=DIR                          (the run's config.json; --config to override)
  adrpo-jax plan --config=NAME[:variant] --workdir=DIR --config.plan.target=v5e:2x4
  adrpo-jax compare --workdir=OUT RUN_DIR [RUN_DIR ...]
packaged configs (NAME): llm_arith, llm_gsm8k, llm_pod, flow_digits, sd3_adrpo, audio_arith; or path/to/config.py
(python -m adrpo_jax.launch and a checkout's python launch.py take the same arguments; --mode=MODE = the subcommand;
 --helpshort for the flags, --version)"""

_ARGV: list[str] = []  # the command line as parsed (subcommand -> --mode, packaged config names -> their files)


def _define_flags() -> None:
    """``--config``, ``--workdir``, ``--mode`` in absl's global FLAGS, once per process (defined when the launcher
    runs, not when this module is imported: importing it, e.g. for the docs, defines no flags)."""
    if "workdir" in flags.FLAGS and "mode" in flags.FLAGS and "config" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config: a packaged config's NAME[:variant] (adrpo_jax.configs: llm_arith, "
        "llm_gsm8k, llm_pod, flow_digits, sd3_adrpo, audio_arith) or path/to/config.py[:variant].",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config.json).")
    flags.DEFINE_enum("mode", "train", list(MODES), _MODE_HELP)
    flags.mark_flags_as_required(["workdir"])
    # --helpshort lists the main program's flags: the console script's (and launch.py's) are defined here
    program = sys.argv[0] if sys.argv else ""
    for name in ("config", "workdir", "mode"):
        if flags.FLAGS[name] not in flags.FLAGS.get_flags_for_module(program):
            flags.FLAGS.register_flag_by_module(program, flags.FLAGS[name])


log = logging.getLogger("launch")


def _override_keys(argv: list[str]) -> list[str]:
    keys = []
    for arg in argv[1:]:
        if arg.startswith(("--config.", "-config.")):
            keys.append(arg.split("config.", 1)[1].split("=", 1)[0])
    return keys


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith(("--config=", "-config=")):
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
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` / ``--name value`` in ``argv`` (the last one), else None."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        for prefix in (f"--{name}=", f"-{name}="):
            if arg.startswith(prefix):
                value = arg[len(prefix) :]
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _packaged_config(spec: str) -> str | None:
    """``NAME[:arg]`` of a packaged config (:mod:`adrpo_jax.configs`) -> ``.../adrpo_jax/configs/NAME.py[:arg]``;
    None for a path (anything with a ``/``, a ``.py`` or an existing file: ml_collections loads it). A bare name
    that is neither raises ``ValueError`` naming the packaged configs (and the closest one)."""
    name, sep, arg = spec.partition(":")
    if not name or name.endswith(".py") or "/" in name or os.sep in name or os.path.isfile(name):
        return None
    from adrpo_jax import configs  # pylint: disable=import-outside-toplevel

    if name not in configs.NAMES:
        import difflib  # pylint: disable=import-outside-toplevel

        close = difflib.get_close_matches(name, configs.NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"--config={spec}: {name!r} is neither a file nor a packaged config{hint}; the packaged "
            f"configs are {', '.join(configs.NAMES)}; a file of your own: "
            "--config=path/to/config.py[:variant]"
        )
    return configs.config_path(name) + sep + arg


def resolve_argv(argv: list[str]) -> list[str]:
    """The command line as absl parses it: a leading subcommand (``adrpo-jax train ...``, one of :data:`MODES`)
    becomes ``--mode=train``, and ``--config=NAME[:variant]`` of a packaged config its file's path.

    A subcommand that disagrees with an explicit ``--mode`` raises ``ValueError`` (except with ``--mode=compare``,
    whose positional arguments are run directories, whatever their names).

    >>> resolve_argv(["adrpo-jax", "eval", "--workdir=/tmp/run"])
    ['adrpo-jax', '--mode=eval', '--workdir=/tmp/run']
    >>> resolve_argv(["launch.py", "--config=llm_arith:cpu"])[1].endswith("adrpo_jax/configs/llm_arith.py:cpu")
    True
    """
    argv = list(argv)
    if len(argv) > 1 and argv[1] in MODES:
        mode = _flag_value(argv, "mode")
        if mode is None:
            argv[1] = f"--mode={argv[1]}"
        elif mode == argv[1]:
            del argv[1]
        elif mode != "compare":
            raise ValueError(f"the subcommand {argv[1]!r} and --mode={mode} disagree: give one of them")
    for i, arg in enumerate(argv[1:], start=1):
        for prefix in ("--config=", "-config="):
            if arg.startswith(prefix):
                resolved = _packaged_config(arg[len(prefix) :])
                argv[i] = prefix + resolved if resolved else arg
        if arg in ("--config", "-config") and i + 1 < len(argv):
            argv[i + 1] = _packaged_config(argv[i + 1]) or argv[i + 1]
    return argv


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
        sys.stderr.write(
            f"FATAL --mode=eval without --config reads the run's config from {path}, which does not "
            "exist (a run writes it once its first step succeeded). Pass the run's "
            "--config=path/to/config.py[:variant] and its --config.* overrides.\n"
        )
        sys.exit(1)
    from adrpo_jax.recipe import workdir_config  # pylint: disable=import-outside-toplevel

    return [argv[0], f"--config={workdir_config.__file__}:{os.path.abspath(os.path.expanduser(workdir))}", *argv[1:]]


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a clear message (naming the full key and the keys it may have meant) for unknown
    ``--config.*`` overrides; a subcommand and packaged config names through :func:`resolve_argv`; ``eval``
    without ``--config`` reads ``WORKDIR/config.json``."""
    global _ARGV  # pylint: disable=global-statement
    if len(argv) == 2 and argv[1] in ("--version", "version"):
        from adrpo_jax import __version__  # pylint: disable=import-outside-toplevel

        print(f"adrpo_jax {__version__}")
        sys.exit(0)
    if len(argv) == 1:  # no arguments: the commands, then absl's message about the missing --workdir
        sys.stderr.write(USAGE + "\n")
    try:
        argv = resolve_argv(argv)
    except ValueError as err:
        sys.stderr.write(f"FATAL Flags parsing error: {err}\n")
        sys.exit(1)
    argv = _with_workdir_config(argv)
    _ARGV = argv
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


# XLA flags of a deviceless GPU compile: the default Triton gemm tiling needs autotuning on a device (without it
# some shapes fail: "Couldn't find output tile sizes"), and CUB's radix sort queries the device.
GPU_DEVICELESS_FLAGS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_cub_radix_sort=false")


def _plan(config, workdir: str) -> None:
    """--mode=plan: compile every program of the recipe for ``plan.target`` (adrpo_jax/recipe/plan.py)."""
    import re  # pylint: disable=import-outside-toplevel

    target = str(config.plan.target or "")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a topology is compiled for, not run on: no accelerator needed
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: libtpu's process lock is not needed
    if re.match(r"^h[12]00:", target):  # XLA:GPU without a device cannot autotune: cuBLAS gemms, no CUB sort
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *GPU_DEVICELESS_FLAGS]).strip()
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


def _run(argv: list[str]) -> None:
    """The launcher once absl parsed the flags (``argv``: the positional arguments, program name first)."""
    opts = flags.FLAGS
    if opts.mode == "compare":
        _compare(argv[1:], os.path.abspath(os.path.expanduser(opts.workdir)))
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
    if opts.config is None:
        raise app.UsageError("--config is required (except with --mode=compare).")
    # Heavy imports after flag parsing (fast failure for bad flags); jax is imported but not yet initialized.
    from adrpo_jax.recipe.plan import PlanError  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train import distributed  # pylint: disable=import-outside-toplevel
    from adrpo_jax.train.checkpoint import (  # pylint: disable=import-outside-toplevel
        CheckpointMismatchError,
        CheckpointRestoreError,
        CheckpointSaveError,
    )
    from adrpo_jax.train.loop import NonFiniteUpdatesError  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS["verbosity"].present:
        # orbax logs every save phase at INFO through absl; keep those at WARNING (pass --verbosity=0 to see them).
        logging.getLogger("absl").setLevel(logging.WARNING)
    config = opts.config
    workdir = os.path.abspath(os.path.expanduser(opts.workdir))
    for message in config_lib.apply_override_followers(config, _override_keys(_ARGV)):
        log.info("%s", message)
    _extend_import_path(config)
    if opts.mode == "plan":
        config_lib.validate_common_config(config)
        return _plan(config, workdir)
    try:
        config_lib.validate_common_config(config)
        from adrpo_jax.recipe import base as recipe_base  # pylint: disable=import-outside-toplevel

        recipe_base.validate_trainer_name(config.trainer)
        if not config.is_locked:
            config.lock()
        if distributed.initialize_from_config(config.distributed):  # before any device use
            distributed.PeerWatchdog(
                config.distributed.heartbeat_timeout_s, checkpoint_dir=os.path.join(workdir, "checkpoints")
            ).start()
        distributed.setup_compilation_cache(config.compilation_cache_dir)

        import jax  # pylint: disable=import-outside-toplevel

        from adrpo_jax.train.sharding import make_mesh  # pylint: disable=import-outside-toplevel

        log.info("adrpo_jax launch: %s; workdir %s", distributed.describe_processes(), workdir)
        make_mesh(config.mesh)  # fail now (naming mesh.*) if the mesh does not fit the devices
        from adrpo_jax.recipe import runner  # pylint: disable=import-outside-toplevel

        if opts.mode == "eval":
            runner.evaluate_run(config, workdir)
            log.info("Wrote %s", os.path.join(workdir, runner.EVAL_FILE))
            return
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            runner.warn_config_changes(config, workdir)  # config.json: written by the runner after the first step
        result = runner.train(config, workdir)
    except (
        config_lib.ConfigError,
        CheckpointMismatchError,
        CheckpointRestoreError,
        CheckpointSaveError,
        NonFiniteUpdatesError,
        FileNotFoundError,
        PlanError,
    ) as err:
        sys.stderr.write(f"ERROR {type(err).__name__}: {err}\n")
        sys.stderr.flush()
        sys.exit(1)
    result = dict(result or {})
    if result.get("preempted"):
        log.warning(
            "Run preempted at step %s; checkpoint saved. Re-run the same command to resume.", result.get("step")
        )
    elif jax.process_index() == 0:
        print(runner.run_summary(result, workdir, config), flush=True)


def _extend_import_path(config) -> None:
    """``config.import_path`` += the config file's directory and the current directory (absolute; those already
    there are kept once), so that a ``'module:function'`` reward next to either imports without ``PYTHONPATH``
    (``--mode=eval`` re-reads the directories from the run's config.json)."""
    if "import_path" not in config:
        return
    spec = _config_arg(_ARGV)
    dirs = [d for d in str(config.import_path or "").split(os.pathsep) if d]
    from adrpo_jax import configs  # pylint: disable=import-outside-toplevel
    from adrpo_jax.recipe import workdir_config  # pylint: disable=import-outside-toplevel

    if spec:
        path = os.path.abspath(os.path.expanduser(spec.split(".py:", 1)[0] + ".py" if ".py:" in spec else spec))
        # the package's own files (workdir_config.py, the packaged configs) add no directory
        if os.path.dirname(path) not in (
            os.path.dirname(os.path.abspath(workdir_config.__file__)),
            os.path.dirname(os.path.abspath(configs.__file__)),
        ):
            dirs.append(os.path.dirname(path))
    dirs.append(os.getcwd())
    unique = []
    for d in dirs:
        d = os.path.abspath(os.path.expanduser(d))
        if d not in unique:
            unique.append(d)
    config.import_path = os.pathsep.join(unique)


def main(argv: list[str] | None = None) -> None:
    """The launcher: ``adrpo-jax`` (console script), ``python -m adrpo_jax.launch``, a checkout's ``launch.py``.

    ``argv``: the command line, program name first (default ``sys.argv``). Exits the process (absl's
    ``app.run``): 0 on success or a graceful preemption, 1 with a one-line message for bad flags, configs,
    checkpoints and non-finite updates, 75 when a peer process of a multi-process run was lost.
    """
    _define_flags()
    main_module = sys.modules.get("__main__")
    if main_module is not None and not main_module.__doc__:  # the console script: absl's usage text is this
        main_module.__doc__ = __doc__
    logging.getLogger().setLevel(logging.INFO)
    app.run(_run, argv=list(sys.argv if argv is None else argv), flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
