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

When a process dies (SIGKILL, host down) the others used to abort with a C++ stack trace when the
coordination service's shutdown barrier failed (jax's ``missed_heartbeat_callback`` cannot be set from Python
in jax 0.10.2: the binding fails with ``std::bad_cast``). :class:`PeerWatchdog` makes it an operator's event:
every process publishes a heartbeat counter in the coordination service's key-value store from a daemon
thread; a peer whose counter stops for ``distributed.heartbeat_timeout_s`` seconds (jax's own heartbeat
timeout is set to twice that, so its abort never comes first) is reported in one line on stderr (the lost
process, the last checkpoint step, the command to resume) and the survivor exits with
:data:`PEER_LOST_EXIT_CODE` (75, EX_TEMPFAIL) through ``os._exit`` (no barrier left to hang in). Limitation:
when the *coordinator* (process 0) dies, JAX's C++ client terminates the others within about a second with its
own message ("the JAX distributed service detected fatal errors"), before any Python code can run.

>>> detect_multiprocess_environment({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})
'SLURM_NTASKS=4'
>>> detect_multiprocess_environment({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
True
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from adrpo_jax.train.config import DISTRIBUTED_MODES, ConfigError

__all__ = [
    "detect_multiprocess_environment",
    "maybe_initialize_distributed",
    "initialize_from_config",
    "setup_compilation_cache",
    "describe_processes",
    "PeerWatchdog",
    "PEER_LOST_EXIT_CODE",
    "last_checkpoint_step",
]

PEER_LOST_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, the user is invited to retry" (re-run to resume)

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
                                 initialization_timeout: int = 300, heartbeat_timeout_seconds: int | None = None,
                                 env: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when ``mode`` says so (module docstring); returns True if it did.

    ``''``/``-1``/None mean "unset" for the explicit arguments (``heartbeat_timeout_seconds``: jax's default,
    100 s). Raises ConfigError for a bad ``mode`` and RuntimeError if a JAX backend is already initialized (the
    call must come first).
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
    if heartbeat_timeout_seconds is not None:
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_seconds)
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
    """:func:`maybe_initialize_distributed` with ``config.distributed``'s keys (JAX's heartbeat timeout: twice
    ``heartbeat_timeout_s``, so that :class:`PeerWatchdog` reports a lost process first)."""
    timeout = _get(distributed_config, "heartbeat_timeout_s", None)
    return maybe_initialize_distributed(
        distributed_config["mode"], distributed_config["coordinator_address"] or None,
        distributed_config["num_processes"], distributed_config["process_id"],
        heartbeat_timeout_seconds=2 * int(timeout) if timeout else None)


def _get(section: Any, key: str, default: Any) -> Any:
    try:
        return section[key]
    except (KeyError, AttributeError):
        return default


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


# ----------------------------------------------------------------------------------------------------------
# Lost processes
# ----------------------------------------------------------------------------------------------------------


def last_checkpoint_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The newest committed step directory (an all-digit name) under ``checkpoint_dir``, or None.

    Orbax writes a step to a temporary name and renames it when committed, so this is a plain listing (no
    orbax, no barrier: safe while another process is gone).
    """
    try:
        names = os.listdir(checkpoint_dir)
    except OSError:
        return None
    steps = [int(n) for n in names if re.fullmatch(r"\d+", n) and os.path.isdir(os.path.join(checkpoint_dir, n))]
    return max(steps) if steps else None


def _distributed_client() -> Any:
    from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
    return jax_distributed.global_state.client


class PeerWatchdog:
    """Detects a lost process of a multi-process run and stops this one with a readable line (module docstring).

    A daemon thread sets ``adrpo_watchdog/<run>/hb/<process>`` in the coordination service every
    ``interval_s`` (default ``timeout_s / 10``, at least 0.5 s) and reads all counters (one request); a
    counter that has not changed for ``timeout_s`` seconds (measured on this host's monotonic clock; no clock
    sync needed) of a process that did not call :meth:`stop` means that process is lost. A key-value store that
    stays unreachable for ``timeout_s`` means the coordinator (process 0) is lost. Then ``on_lost(message)``
    runs (default: write the message to stderr and ``os._exit(PEER_LOST_EXIT_CODE)``).

    Args:
      timeout_s: seconds without a heartbeat before a process is declared lost.
      checkpoint_dir: where to look for the last checkpoint step (named in the message).
      command: the command to resume with (default: this process's ``sys.orig_argv``).
      client / process_index / process_count: the coordination client and this process (default: jax's).
    """

    def __init__(self, timeout_s: float, *, checkpoint_dir: str | os.PathLike | None = None,
                 command: Sequence[str] | None = None, client: Any = None, process_index: int | None = None,
                 process_count: int | None = None, interval_s: float | None = None, run_id: str = "run",
                 on_lost: Callable[[str], None] | None = None):
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"`timeout_s` must be > 0, got {timeout_s!r}.")
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s) if interval_s else max(0.5, self.timeout_s / 10)
        self.checkpoint_dir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        self.command = list(command) if command is not None else list(getattr(sys, "orig_argv", sys.argv))
        self.client = client if client is not None else _distributed_client()
        self.index = jax.process_index() if process_index is None else int(process_index)
        self.count = jax.process_count() if process_count is None else int(process_count)
        self.prefix = f"adrpo_watchdog/{run_id}"
        self.on_lost = on_lost or self._exit
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- messages ----------------------------------------------------------------------------------------------

    def message(self, lost: int, reason: str) -> str:
        """The one-line report of process ``lost``."""
        step = last_checkpoint_step(self.checkpoint_dir) if self.checkpoint_dir else None
        where = (f"last checkpoint: step {step} in {self.checkpoint_dir}" if step is not None else
                 f"no checkpoint yet in {self.checkpoint_dir}" if self.checkpoint_dir else "no checkpoint directory")
        role = " (the coordinator)" if lost == 0 else ""
        return (f"ERROR process {lost}{role} of {self.count} was lost ({reason}); stopping process {self.index} "
                f"with exit code {PEER_LOST_EXIT_CODE}. {where[0].upper() + where[1:]}. To resume, re-run every "
                f"process's command, e.g. this one: {shlex.join(self.command)}")

    def _exit(self, message: str) -> None:
        try:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            sys.stdout.flush()
        finally:
            os._exit(PEER_LOST_EXIT_CODE)  # pylint: disable=protected-access

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> "PeerWatchdog":
        if self.count <= 1 or self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="adrpo-peer-watchdog", daemon=True)
        self._thread.start()
        log.info("Peer watchdog: a process without a heartbeat for %gs is reported as lost.", self.timeout_s)
        return self

    def stop(self) -> None:
        """Marks this process as finished (its peers stop watching it) and stops the thread."""
        if self._thread is None:
            return
        try:
            self.client.key_value_set(f"{self.prefix}/done/{self.index}", "1", allow_overwrite=True)
        except Exception:  # pylint: disable=broad-except
            pass
        self._stop.set()
        self._thread.join(timeout=self.interval_s * 2 + 1)
        self._thread = None

    def __enter__(self) -> "PeerWatchdog":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the thread --------------------------------------------------------------------------------------------

    def _read(self, kind: str) -> dict[int, str]:
        """``{process: value}`` of the ``hb`` (heartbeat) or ``done`` keys: one request for all processes."""
        out = {}
        for key, value in self.client.key_value_dir_get(f"{self.prefix}/{kind}/"):
            tail = key.rsplit("/", 1)[-1]
            if tail.isdigit():
                out[int(tail)] = value
        return out

    def _run(self) -> None:
        now = time.monotonic()
        seen: dict[int, tuple[str | None, float]] = {p: (None, now) for p in range(self.count) if p != self.index}
        beat = 0
        store_ok_since = now
        while not self._stop.is_set():
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(f"{self.prefix}/hb/{self.index}", str(beat), allow_overwrite=True)
                beats = self._read("hb")
                for peer, (value, since) in list(seen.items()):
                    new = beats.get(peer)
                    if new != value:
                        seen[peer] = (new, now)
                    elif now - since > self.timeout_s and peer not in self._read("done"):
                        self._report(peer, f"no heartbeat for {now - since:.0f} s; "
                                           f"distributed.heartbeat_timeout_s={self.timeout_s:g}")
                        return
                store_ok_since = now
            except Exception as err:  # pylint: disable=broad-except  # the store itself is gone
                if now - store_ok_since > self.timeout_s:
                    self._report(0, f"the coordination service has been unreachable for {now - store_ok_since:.0f} "
                                    f"s: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                    return
            self._stop.wait(self.interval_s)

    def _report(self, peer: int, reason: str) -> None:
        self.lost = self.message(peer, reason)
        log.error("%s", self.lost)
        self.on_lost(self.lost)
