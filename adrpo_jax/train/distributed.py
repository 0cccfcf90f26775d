"""Multi-process initialization (``jax.distributed``) and the persistent compilation cache.

Both must run before anything touches a JAX device (``launch.py`` calls them first thing).

``config.distributed.mode``:

* ``'off'``: never initialize (single process).
* ``'on'``: always initialize; explicit ``coordinator_address``/``num_processes``/``process_id`` (config,
  else the ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` environment variables) are
  passed on, otherwise JAX auto-detects the cluster (Cloud TPU, SLURM, Open MPI).
* ``'auto'`` (default): initialize only when the arguments or the environment show a multi-process launch:
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` > 1, SLURM with ``SLURM_NTASKS`` > 1, a multi-host TPU
  slice (``TPU_WORKER_HOSTNAMES`` with more than one host, or ``MEGASCALE_NUM_SLICES`` > 1),
  ``OMPI_COMM_WORLD_SIZE`` > 1.

>>> detect_multiprocess_environment({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})
'SLURM_NTASKS=4'
>>> detect_multiprocess_environment({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
True
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

from adrpo_jax.train.config import DISTRIBUTED_MODES, ConfigError

__all__ = [
    "detect_multiprocess_environment",
    "maybe_initialize_distributed",
    "initialize_from_config",
    "setup_compilation_cache",
    "describe_processes",
]

log = logging.getLogger(__name__)


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    try:
        return int(value) if value else None
    except ValueError:
        return None


def detect_multiprocess_environment(env: Mapping[str, str] | None = None) -> str | None:
    """Returns a short reason (``'SLURM_NTASKS=4'``) if ``env`` shows a multi-process launch, else None."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}"
    if (n := _int_env(env, "JAX_NUM_PROCESSES")) is not None and n > 1:
        return f"JAX_NUM_PROCESSES={n}"
    if (n := _int_env(env, "SLURM_NTASKS")) is not None and n > 1:
        return f"SLURM_NTASKS={n}"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU_WORKER_HOSTNAMES ({len(hosts)} hosts)"
    if (n := _int_env(env, "MEGASCALE_NUM_SLICES")) is not None and n > 1:
        return f"MEGASCALE_NUM_SLICES={n}"
    if (n := _int_env(env, "OMPI_COMM_WORLD_SIZE")) is not None and n > 1:
        return f"OMPI_COMM_WORLD_SIZE={n}"
    return None


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # pylint: disable=broad-except
        return False


def maybe_initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None, *,
                                 initialization_timeout: int = 300, env: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when ``mode`` says so (module docstring); returns True if it did.

    ``''``/``-1``/None mean "unset" for the explicit arguments. Raises ConfigError for a bad ``mode`` and
    RuntimeError if a JAX backend is already initialized (the call must come first).
    """
    if mode not in DISTRIBUTED_MODES:
        raise ConfigError(f"`distributed.mode` must be one of {list(DISTRIBUTED_MODES)}, got {mode!r}.",
                          key="distributed.mode", value=mode)
    env = os.environ if env is None else env
    address = coordinator_address or None
    nproc = num_processes if num_processes not in (None, -1) else _int_env(env, "JAX_NUM_PROCESSES")
    pid = process_id if process_id not in (None, -1) else _int_env(env, "JAX_PROCESS_ID")
    if mode == "off":
        return False
    if jax.distributed.is_initialized():
        log.info("jax.distributed is already initialized.")
        return False
    if mode == "auto":
        reason = "explicit distributed.* arguments" if (address or (nproc or 0) > 1) else \
            detect_multiprocess_environment(env)
        if reason is None:
            return False
        log.info("Multi-process launch detected (%s): initializing jax.distributed.", reason)
    if _backends_initialized():
        raise RuntimeError("maybe_initialize_distributed must run before any JAX computation or device query "
                           "(a JAX backend is already initialized).")
    kwargs: dict[str, Any] = {"initialization_timeout": initialization_timeout}
    if address:
        kwargs["coordinator_address"] = address
    if nproc is not None:
        kwargs["num_processes"] = nproc
    if pid is not None:
        kwargs["process_id"] = pid
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed initialized: %s", describe_processes())
    return True


def initialize_from_config(distributed_config: Any) -> bool:
    """:func:`maybe_initialize_distributed` with ``config.distributed``'s keys."""
    return maybe_initialize_distributed(
        distributed_config["mode"], distributed_config["coordinator_address"] or None,
        distributed_config["num_processes"], distributed_config["process_id"])


def describe_processes() -> str:
    """One line: process index/count, local/global device counts and platform."""
    return (f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / "
            f"{jax.device_count()} global devices ({jax.default_backend()})")


def setup_compilation_cache(cache_dir: str | os.PathLike | None, *, min_compile_time_secs: float = 0.0) -> bool:
    """Enables JAX's persistent compilation cache in ``cache_dir`` (''/None = off); returns True if enabled.

    Every compiled program (min compile time ``min_compile_time_secs``, any size) is cached, so a re-run
    (resume after preemption, a new ``total_steps``) skips XLA compilation.
    """
    if not cache_dir:
        return False
    cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("Persistent compilation cache: %s", cache_dir)
    return True
