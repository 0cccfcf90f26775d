"""Bounded-staleness asynchronous RL in one process: the rollout of step t comes from the policy of step t - k.

``rl.max_lag = k``: 0 is the synchronous loop (:meth:`~adrpo_jax.recipe.base.Recipe.train_step` =
``update(rollout(step, state))``, untouched). With ``k >= 1`` :class:`LaggedSchedule` replaces the recipe's
``train_step``: the rollout of step ``t`` is sampled by the parameters of version ``v(t) = max(0, t - k)`` (version
``v`` = the parameters after ``v`` updates) and is *dispatched* ``k`` steps ahead, before the update of step ``t - k``
(JAX dispatches asynchronously: the sampler of step ``t + k`` and the update of step ``t`` are queued back to back and
the host scores the completions of step ``t`` meanwhile)::

    train_step(t, state_t):                      # state_t: version t; R_t, ..., R_{t+k-1} in flight
        R_{t+k} = rollout_start(t + k, params_t)  # dispatched (prompts drawn, sampler queued)
        ring    = ring[1:] + (copy(params_t),)   # the behaviour policies of the in-flight rollouts
        R_t     = rollout_finish(R_t)            # host: completions -> rewards (the device keeps sampling)
        R_t    += lagged_logprobs(state_t, R_t)  # proximal / reference log-probs under state_t
        return update(t, state_t, R_t)           # + state["lag_params"] = ring

Each rollout carries its policy version (``host["policy_version"]``) and its behaviour log-probs (the sampler's own,
``GenerationOutput.logprobs``); the loss corrects for the staleness as ``rl.importance_correction`` says
(:func:`adrpo_jax.losses.importance_weights`).

**Exact resume.** The rollout of step ``t`` is a function of ``(seed, t, the parameters of version v(t), the prompt
iterator's position before it)``: the parameters of the in-flight rollouts' versions are part of the train state
(``state["lag_params"]``, ``k`` copies, checkpointed: the policy's ``PolicySpec.lag_copies``) and the host state
saved with a checkpoint is the iterator position *before the oldest in-flight rollout*; after a restore (or at the
start) the schedule recomputes the in-flight rollouts from them, in order, so a resumed run continues
bit-identically.

**Disaggregated meshes** (``mesh.rollout_devices = N``, the LLM recipe): the recipe samples on a rollout mesh of
the first N devices and computes the log-prob passes and the update on a training mesh of the others. Its
``rollout_start`` hands the behaviour parameters over by a resharding ``jax.device_put`` onto the rollout mesh (the
*weight sync*: once per dispatched rollout, i.e. once per step) and queues the copy of the sampler's outputs back
onto the training mesh; the update of step ``t`` and the sampler of step ``t + k`` then run on disjoint devices,
at the same time. The schedule itself is the same.

**Metrics** (per step; the loop logs interval means): ``async/lag`` (t - v(t): the interval mean is the mean lag),
``async/lag_max``, ``async/lag_hist/<j>`` for j = 0..k (1 when this step's rollout had lag j, else 0: the interval
mean is the fraction of the interval's steps with lag j; they sum to 1), ``async/policy_version``,
``time/rollout_dispatch`` (host time drawing prompts, syncing weights and dispatching the sampler),
``time/update_idle`` (= ``time/rollout_wait``: the host blocked for the oldest rollout's completions, i.e. the
training side idle, waiting for a rollout), ``time/rollout_idle`` (the rollout side idle, waiting for weights / the
host: from the completion of the previously dispatched sampler, timed by a watcher thread that blocks on its output,
to the dispatch of the next; 0 when the sampler queue never ran dry. On one mesh the devices are shared, so there it
is the gap in the *sampler* queue, during which the devices run the log-prob passes and the update: not idle
devices), ``time/weight_sync`` and ``async/weight_sync_bytes`` (split runs: the resharding copy's time, the host
waiting for it, and the bytes it writes onto the rollout devices, replicas counted; summed over the rollouts a step
dispatches), ``time/rollout_transfer`` (split runs: the part of the outputs' copy to the training mesh not done
when the completions reached the host), ``time/update`` (dispatch to metrics of the update: the update's time the
host waits), and the importance-weight statistics of the loss (``is_*``). ``time/rollout`` and the
``perf/rollout_mbu`` derived from it are not logged: from dispatch to completions they span k updates. The
dispatch-side metrics (``time/rollout_idle``, ``time/weight_sync``, ``async/weight_sync_bytes``) are logged by
the steps that dispatch a rollout (all but the last k).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["LaggedSchedule", "policy_version"]

log = logging.getLogger(__name__)


def policy_version(step: int, max_lag: int) -> int:
    """The parameter version (updates applied) that samples the rollout of ``step``: ``max(0, step - max_lag)``.

    >>> [policy_version(t, 2) for t in range(5)]
    [0, 0, 0, 1, 2]
    """
    return max(0, int(step) - int(max_lag))


class LaggedSchedule:
    """``train_step`` / host-state hooks of a recipe run with ``max_lag = k >= 1`` (module docstring).

    The recipe provides ``rollout_start(step, state, *, params, logprob_passes) -> handle``,
    ``rollout_finish(handle) -> (batch, host)``, ``lagged_logprobs(state, batch) -> batch``,
    ``update(step, state, rollout)``, ``copy_params(params)``, ``iterator`` (``get_state`` / ``set_state``) and a
    train state with ``"lag_params"`` (k parameter trees).
    """

    def __init__(self, recipe: Any, max_lag: int, total_steps: int):
        if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 1:
            raise ValueError(f"max_lag={max_lag!r} must be an int >= 1 (0 is the synchronous loop)")
        self.recipe, self.k, self.total_steps = recipe, int(max_lag), int(total_steps)
        self._pending: dict[int, Any] = {}  # step -> rollout handle (dispatched)
        self._iter_before: dict[int, dict] = {}  # step -> iterator state before its prompts were drawn
        self._last: Any = None  # the handle dispatched last (the sampler queue's tail: rollout idle time)

    # ---- host state (checkpoints) ---------------------------------------------------------------------------

    def get_host_state(self) -> dict[str, Any]:
        """The iterator position before the oldest in-flight rollout (what a restore recomputes from)."""
        if self._pending:
            return dict(self._iter_before[min(self._pending)])
        return dict(self.recipe.iterator.get_state())

    def set_host_state(self, host: Mapping[str, Any]) -> None:
        self.recipe.iterator.set_state(host)
        self._pending.clear()
        self._iter_before.clear()
        self._last = None

    # ---- the step -------------------------------------------------------------------------------------------

    @staticmethod
    def _watch(handle: dict[str, Any]) -> None:
        """Records in ``handle["ready_at"][0]`` when the sampler's output ``handle["ready_probe"]`` (if the recipe
        gives one) is computed: a daemon thread blocks on it (JAX releases the GIL while it waits)."""
        probe = handle.pop("ready_probe", None)
        if probe is None:
            return
        box: list[float | None] = [None]
        handle["ready_at"] = box

        def wait() -> None:
            try:
                import jax  # pylint: disable=import-outside-toplevel
                jax.block_until_ready(probe)
            except Exception:  # pylint: disable=broad-except  (a failed sampler fails in rollout_finish)
                pass
            box[0] = time.perf_counter()

        threading.Thread(target=wait, name=f"rollout-ready-{handle.get('step')}", daemon=True).start()

    def _start(self, step: int, state: Any, params: Any) -> dict[str, float]:
        """Dispatches the rollout of ``step``; returns its dispatch-side metrics (rollout idle, weight sync)."""
        self._iter_before[step] = dict(self.recipe.iterator.get_state())
        t0 = time.perf_counter()
        handle = self.recipe.rollout_start(step, state, params=params, logprob_passes=False)
        t_queued = time.perf_counter()
        handle["policy_version"] = policy_version(step, self.k)
        handle["dispatch_s"] = t_queued - t0
        out: dict[str, float] = {}
        prev = self._last
        if prev is not None and "ready_at" in prev:  # the sampler queue ran dry from prev's end to this dispatch
            ready = prev["ready_at"][0]
            out["time/rollout_idle"] = 0.0 if ready is None else max(0.0, t_queued - ready)
        if "sync_s" in handle:
            out["time/weight_sync"] = float(handle["sync_s"])
            out["async/weight_sync_bytes"] = float(handle.get("sync_bytes", 0.0))
        self._watch(handle)
        self._last = handle
        self._pending[step] = handle
        return out

    def train_step(self, step: int, state: Any) -> tuple[Any, dict[str, Any]]:
        k = self.k
        ring = tuple(state["lag_params"])
        if len(ring) != k:
            raise ValueError(f"state['lag_params'] holds {len(ring)} parameter copies, max_lag={k} needs {k}")
        dispatched: list[dict[str, float]] = []
        if step not in self._pending:  # a fresh run or a restore: recompute the in-flight rollouts, in order
            if self._pending:
                raise RuntimeError(f"rollouts {sorted(self._pending)} are in flight but step {step} is not")
            for j in range(k):
                if step + j < self.total_steps:
                    dispatched.append(self._start(step + j, state, ring[j]))
        if step + k < self.total_steps:  # sampled by this step's parameters (version `step`), before they change
            dispatched.append(self._start(step + k, state, state["params"]))
        new_ring = ring[1:] + (self.recipe.copy_params(state["params"]),)
        handle = self._pending.pop(step)
        self._iter_before.pop(step, None)
        t0 = time.perf_counter()
        batch, host = self.recipe.rollout_finish(handle)
        batch = self.recipe.lagged_logprobs(state, batch)
        t_finished = time.perf_counter()
        new_state, metrics = self.recipe.update(step, state, (batch, host))
        new_state = dict(new_state, lag_params=new_ring)
        metrics = dict(metrics)
        lag = step - handle["policy_version"]
        metrics.pop("time/rollout", None)  # dispatched steps ago: replaced by its dispatch and wait times
        metrics.pop("perf/rollout_mbu", None)  # derived from that time (it spans k updates): not the sampler's
        wait = float(host.get("wait_s", t_finished - t0))
        metrics.update({"async/lag": float(lag), "async/lag_max": float(lag),
                        "async/policy_version": float(handle["policy_version"]),
                        "time/rollout_dispatch": float(handle["dispatch_s"]),
                        "time/rollout_wait": wait, "time/update_idle": wait})
        metrics.update({f"async/lag_hist/{j}": float(lag == j) for j in range(k + 1)})
        for key in {key for d in dispatched for key in d}:  # summed over this step's dispatches
            metrics[key] = float(sum(d.get(key, 0.0) for d in dispatched))
        return new_state, metrics
