r"""A reward-hacking monitor: gold rewards logged beside the training (proxy) reward, the gap between their
trends, and an optional stop rule. Pure host-side logic (floats in, floats out); no JAX.

A *gold* reward is a scorer the policy was never trained on: exact match on held-out problems (LLM), the
independent judge of the flow digits (:mod:`adrpo_jax.flow.judge`), a second reward model. When the proxy keeps
rising while the gold falls, the policy is exploiting the proxy (Goodhart); the monitor makes that visible at
every evaluation and can stop the run there.

Feed it every record the trainer logs, in order (training logs and evaluations alike)::

    monitor = RewardHackingMonitor("reward_mean", ["eval/accuracy"], stop_rule=parse_stop_when("gold_falls:3"),
                                   min_drop=0.02)
    for record in records:                      # each dict has "step"
        extra = monitor.update(record)          # {} for a training log; monitor/* metrics at an evaluation
        if monitor.decision is not None:        # the stop rule fired at this evaluation
            save_checkpoint(); print(monitor.decision.message); break

**Proxy at an evaluation**: the mean of the proxy values logged since the previous evaluation (the latest one if
none), so that a noisy per-step training reward is compared at the resolution of the evaluations.

**Logged at an evaluation**, per gold key ``g`` (its short name: the last ``/``-part, e.g. ``accuracy``):
``monitor/proxy`` (the proxy as above), ``monitor/proxy_trend`` and ``monitor/<g>/trend`` (least-squares slope
over the last ``window`` evaluations, per 1000 steps), ``monitor/<g>/trend_gap`` (the proxy's trend minus the
gold's, each divided by that series' range so far: dimensionless, > 0 when the proxy rises faster than the gold),
``monitor/<g>/best`` (running best), ``monitor/<g>/drop`` (best - current), ``monitor/<g>/falls`` (consecutive
evaluations more than ``min_drop`` below the running best), and ``monitor/stop`` (1 at the evaluation where the
rule fires).

**Stop rule** ``gold_falls:N`` (:func:`parse_stop_when`): at evaluation k it fires when, for one gold key, the gold
has been more than ``min_drop`` below its running best for ``N`` consecutive evaluations (k - N + 1 .. k)
*and* the proxy at k is above the proxy at the evaluation where the gold was best (for a best before the first
training log, e.g. the step-0 evaluation of the starting model: the first proxy logged after it). A gold that falls
together with the proxy (a run that simply degrades) or that only wobbles within ``min_drop`` of its best does not
fire it.

**Choose ``min_drop`` above the evaluation noise**: the running best of a noisy gold is biased upwards, so a drop
smaller than the gold's evaluation noise fires late in runs that do not hack. About two standard errors of one
evaluation is a good default: for an accuracy p on n held-out problems, ``2 sqrt(p (1 - p) / n)`` (0.05 for p ~ 0.3,
n = 256). ``experiments/README.md`` (section F) measures the firing rates on hacking and regularized runs for
several drops.

Config keys (``eval.*``; :data:`MONITOR_DEFAULTS`, checked by :func:`validate_monitor_config`): ``gold_rewards``
(tuple of gold scorer names: LLM reward functions scored on the held-out completions, logged as
``eval/gold/<name>``; flow ``judge`` -> ``eval/gold/judge_*``), ``proxy_metric`` ('' = the trainer's training
reward ``reward_mean``), ``stop_when`` ('' = off, or ``gold_falls:N``), ``stop_min_drop`` (delta, in the gold's
units), ``monitor_window`` (evaluations in a trend).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "MONITOR_DEFAULTS",
    "GOLD_PREFIX",
    "StopRule",
    "StopDecision",
    "RewardHackingStop",
    "RewardHackingMonitor",
    "parse_stop_when",
    "validate_monitor_config",
    "monitor_from_config",
    "gold_metric_keys",
    "score_gold_rewards",
    "replay",
]

GOLD_PREFIX = "eval/gold/"
MONITOR_DEFAULTS: dict[str, Any] = {
    "gold_rewards": (),
    "proxy_metric": "",
    "stop_when": "",
    "stop_min_drop": 0.0,
    "monitor_window": 3,
}
# The flow judge's gold metrics (adrpo_jax.flow.judge.JudgeScorer) and the one the stop rule watches.
FLOW_GOLD = {"judge": ("judge_reward", "judge_digit_accuracy", "judge_thickness_accuracy", "judge_fd_data",
                       "judge_fd_pretrained")}
_STOP_RE = re.compile(r"^gold_falls:(\d+)$")


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Fire after ``patience`` consecutive evaluations with the gold more than ``min_drop`` below its best while
    the proxy is above its value at the gold's best (module docstring)."""

    patience: int
    min_drop: float = 0.0

    def __post_init__(self):
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"`patience` must be an int >= 1, got {self.patience!r}.")
        if not (isinstance(self.min_drop, (int, float)) and math.isfinite(self.min_drop) and self.min_drop >= 0):
            raise ValueError(f"`min_drop` must be a finite number >= 0, got {self.min_drop!r}.")


def parse_stop_when(spec: str, min_drop: float = 0.0) -> StopRule | None:
    """``''`` -> None (off); ``'gold_falls:N'`` -> ``StopRule(N, min_drop)``.

    >>> parse_stop_when("gold_falls:3", 0.02)
    StopRule(patience=3, min_drop=0.02)
    >>> parse_stop_when("") is None
    True
    """
    if not isinstance(spec, str):
        raise ValueError(f"`stop_when` must be a string ('' or 'gold_falls:N'), got {spec!r}.")
    if spec == "":
        return None
    m = _STOP_RE.match(spec.strip())
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"`stop_when` must be '' (off) or 'gold_falls:N' with N >= 1 evaluations, got {spec!r}.")
    return StopRule(int(m.group(1)), float(min_drop))


@dataclasses.dataclass(frozen=True)
class StopDecision:
    """Why and where the stop rule fired."""

    step: int
    gold_key: str
    gold: float
    gold_best: float
    gold_best_step: int
    proxy: float
    proxy_at_best: float
    evaluations: int

    @property
    def message(self) -> str:
        return (f"Reward hacking suspected: stopping at step {self.step}. The gold reward {self.gold_key!r} has been "
                f"more than the allowed drop below its best ({self.gold_best:.4g} at step {self.gold_best_step}) for "
                f"{self.evaluations} evaluations in a row (now {self.gold:.4g}) while the proxy rose from "
                f"{self.proxy_at_best:.4g} to {self.proxy:.4g}. The checkpoint of this step is kept; the gold-best "
                f"step {self.gold_best_step} is the one to use (eval.stop_when).")


class RewardHackingStop(RuntimeError):
    """Raised by trainers that stop through an exception; carries the :class:`StopDecision`."""

    def __init__(self, decision: StopDecision):
        super().__init__(decision.message)
        self.decision = decision


def _slope(points: Sequence[tuple[int, float]]) -> float:
    """Least-squares slope of ``(step, value)`` points, per 1000 steps (0 for fewer than 2 distinct steps)."""
    if len(points) < 2:
        return 0.0
    xs = [p[0] / 1000.0 for p in points]
    ys = [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def _short(key: str) -> str:
    return key.rstrip("/").rsplit("/", 1)[-1]


class RewardHackingMonitor:
    """Gold rewards beside the proxy, their trends, and the optional stop rule (module docstring).

    Args:
      proxy_key: the logged key of the optimized reward (e.g. ``reward_mean``).
      gold_keys: logged keys of the gold rewards (an evaluation is a record holding all of them that are
        present at the first evaluation; larger = better).
      window: evaluations in a trend (>= 2).
      stop_rule: a :class:`StopRule` or None (log only).
    """

    def __init__(self, proxy_key: str, gold_keys: Sequence[str], *, window: int = 3,
                 stop_rule: StopRule | None = None):
        if not isinstance(proxy_key, str) or not proxy_key:
            raise ValueError(f"`proxy_key` must be a non-empty metric name, got {proxy_key!r}.")
        gold_keys = tuple(gold_keys)
        if not gold_keys or not all(isinstance(k, str) and k for k in gold_keys):
            raise ValueError(f"`gold_keys` must be a non-empty sequence of metric names, got {gold_keys!r}.")
        if proxy_key in gold_keys:
            raise ValueError(f"the proxy {proxy_key!r} cannot also be a gold reward.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"`window` must be an int >= 2, got {window!r}.")
        if stop_rule is not None and not isinstance(stop_rule, StopRule):
            raise ValueError(f"`stop_rule` must be a StopRule or None, got {stop_rule!r}.")
        self.proxy_key, self.gold_keys, self.window, self.stop_rule = proxy_key, gold_keys, window, stop_rule
        self._pending: list[float] = []
        self._last_proxy = math.nan
        self.history: list[dict[str, Any]] = []  # one entry per evaluation: step, proxy, gold values
        self._falls = dict.fromkeys(gold_keys, 0)
        self.decision: StopDecision | None = None

    # -- state (checkpointable as plain data) --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"pending": list(self._pending), "last_proxy": self._last_proxy, "history": list(self.history),
                "falls": dict(self._falls)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending = [float(x) for x in state["pending"]]
        self._last_proxy = float(state["last_proxy"])
        self.history = [dict(h) for h in state["history"]]
        self._falls = {k: int(state["falls"].get(k, 0)) for k in self.gold_keys}

    # -- updates -------------------------------------------------------------------------------------------
    def update(self, record: Mapping[str, Any]) -> dict[str, float]:
        """Consumes one logged record (with ``step``); returns the ``monitor/*`` metrics at an evaluation, else
        ``{}``. Sets :attr:`decision` when the stop rule fires (once)."""
        if "step" not in record:
            raise ValueError(f"a record needs its 'step', got keys {sorted(record)}.")
        step = int(record["step"])
        proxy = record.get(self.proxy_key)
        if isinstance(proxy, (int, float)) and math.isfinite(proxy):
            self._pending.append(float(proxy))
            self._last_proxy = float(proxy)
        gold = {k: float(record[k]) for k in self.gold_keys
                if isinstance(record.get(k), (int, float)) and math.isfinite(record[k])}
        if not gold:
            return {}
        proxy_now = sum(self._pending) / len(self._pending) if self._pending else self._last_proxy
        self._pending = []
        self.history.append({"step": step, "proxy": proxy_now, **gold})
        return self._evaluate(step)

    def _series(self, key: str) -> list[tuple[int, float]]:
        return [(h["step"], h[key]) for h in self.history if key in h and math.isfinite(h[key])]

    def _evaluate(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        proxy = self._series("proxy")
        if proxy:
            out["monitor/proxy"] = proxy[-1][1]
        proxy_trend = _slope(proxy[-self.window:])
        out["monitor/proxy_trend"] = proxy_trend
        proxy_range = (max(v for _, v in proxy) - min(v for _, v in proxy)) if proxy else 0.0
        fired = None
        for key in self.gold_keys:
            series = self._series(key)
            if not series or series[-1][0] != step:
                continue
            name = _short(key)
            values = [v for _, v in series]
            best_i = max(range(len(values)), key=values.__getitem__)  # the first best on ties
            best = values[best_i]
            trend = _slope(series[-self.window:])
            rng = max(values) - min(values)
            norm = lambda t, r: t / r if r > 0 else 0.0  # noqa: E731
            drop_allowed = self.stop_rule.min_drop if self.stop_rule is not None else 0.0
            self._falls[key] = self._falls[key] + 1 if values[-1] < best - drop_allowed else 0
            out.update({f"monitor/{name}/trend": trend, f"monitor/{name}/best": best,
                        f"monitor/{name}/drop": best - values[-1], f"monitor/{name}/falls": float(self._falls[key]),
                        f"monitor/{name}/trend_gap": norm(proxy_trend, proxy_range) - norm(trend, rng)})
            if self.stop_rule is None or self.decision is not None or fired is not None:
                continue
            best_step = series[best_i][0]
            # the proxy at the gold's best; an evaluation before the first training log (step 0) has none: then
            # the first proxy known after it
            proxy_at_best = next((h["proxy"] for h in self.history
                                  if h["step"] >= best_step and math.isfinite(h["proxy"])), math.nan)
            proxy_now = proxy[-1][1] if proxy else math.nan
            if self._falls[key] >= self.stop_rule.patience and proxy_now > proxy_at_best:
                fired = StopDecision(step=step, gold_key=key, gold=values[-1], gold_best=best,
                                     gold_best_step=best_step, proxy=proxy_now, proxy_at_best=proxy_at_best,
                                     evaluations=self._falls[key])
        if fired is not None:
            self.decision = fired
        out["monitor/stop"] = 1.0 if fired is not None else 0.0
        return out


def replay(records: Iterable[Mapping[str, Any]], monitor: RewardHackingMonitor) -> StopDecision | None:
    """Feeds recorded metrics (e.g. a ``metrics.jsonl``) through ``monitor``; returns the first stop decision."""
    for record in records:
        monitor.update(record)
        if monitor.decision is not None:
            return monitor.decision
    return None


# -- configuration ---------------------------------------------------------------------------------------------


def _get(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def gold_metric_keys(config: Any, kind: str) -> tuple[str, ...]:
    """The logged keys of ``eval.gold_rewards`` for a trainer ``kind`` (``llm`` / ``flow``): an LLM gold reward
    ``name`` is ``eval/gold/<name>`` (a reward function scored on the held-out completions); the flow ``judge``
    is watched through ``eval/gold/judge_reward``."""
    names = tuple(_get(config, "eval.gold_rewards"))
    if kind == "flow":
        return tuple(GOLD_PREFIX + FLOW_GOLD[n][0] for n in names)
    return tuple(GOLD_PREFIX + _short(n.split(":")[-1]) for n in names)


def validate_monitor_config(config: Any, kind: str, *, resolve_reward: Callable[[str], Any] | None = None) -> None:
    """Checks the ``eval.*`` monitor keys (:data:`MONITOR_DEFAULTS`); raises ``ConfigError`` naming the key.
    ``resolve_reward``: the LLM side's reward-function resolver (``adrpo_jax.rl.rewards.resolve_reward_function``:
    the kit does not import the recipes): every gold reward name must resolve."""
    from adrpo_jax.train.config import ConfigError  # pylint: disable=import-outside-toplevel

    if kind not in ("llm", "flow"):
        raise ValueError(f"`kind` must be 'llm' or 'flow', got {kind!r}.")
    names = _get(config, "eval.gold_rewards")
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or not all(isinstance(n, str) and n
                                                                                 for n in names):
        raise ConfigError(f"`eval.gold_rewards` must be a tuple of gold scorer names, got {names!r}.",
                          key="eval.gold_rewards", value=names)
    if kind == "flow":
        bad = [n for n in names if n not in FLOW_GOLD]
        if bad:
            raise ConfigError(f"`eval.gold_rewards` has unknown flow gold scorers {bad}; available: "
                              f"{sorted(FLOW_GOLD)}.", key="eval.gold_rewards", value=names)
    elif resolve_reward is not None:
        for n in names:
            try:
                resolve_reward(n)
            except (ValueError, ImportError, AttributeError) as err:
                raise ConfigError(f"`eval.gold_rewards` entry {n!r}: {err}", key="eval.gold_rewards",
                                  value=names) from err
    proxy = _get(config, "eval.proxy_metric")
    if not isinstance(proxy, str):
        raise ConfigError(f"`eval.proxy_metric` must be a metric name or '', got {proxy!r}.",
                          key="eval.proxy_metric", value=proxy)
    window = _get(config, "eval.monitor_window")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"`eval.monitor_window` must be an int >= 2, got {window!r}.", key="eval.monitor_window",
                          value=window)
    drop = _get(config, "eval.stop_min_drop")
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not math.isfinite(drop) or drop < 0:
        raise ConfigError(f"`eval.stop_min_drop` must be a finite number >= 0, got {drop!r}.",
                          key="eval.stop_min_drop", value=drop)
    spec = _get(config, "eval.stop_when")
    try:
        rule = parse_stop_when(spec, float(drop))
    except ValueError as err:
        raise ConfigError(f"`eval.stop_when`: {err}", key="eval.stop_when", value=spec) from err
    if rule is not None and not names:
        raise ConfigError(f"`eval.stop_when`={spec!r} needs a gold reward to watch: set eval.gold_rewards (e.g. "
                          "('exact_match',) on the LLM side, ('judge',) on the flow side).", key="eval.stop_when",
                          value=spec)
    if rule is not None and int(_get(config, "eval_every")) <= 0:
        raise ConfigError(f"`eval.stop_when`={spec!r} needs evaluations: set eval_every > 0.", key="eval.stop_when",
                          value=spec)


def monitor_from_config(config: Any, kind: str) -> RewardHackingMonitor | None:
    """The monitor of a validated config, or None when ``eval.gold_rewards`` is empty."""
    keys = gold_metric_keys(config, kind)
    if not keys:
        return None
    proxy = _get(config, "eval.proxy_metric") or "reward_mean"
    rule = parse_stop_when(_get(config, "eval.stop_when"), float(_get(config, "eval.stop_min_drop")))
    return RewardHackingMonitor(proxy, keys, window=int(_get(config, "eval.monitor_window")), stop_rule=rule)


def score_gold_rewards(names: Sequence[str], prompts: Sequence[str], completions: Sequence[str],
                       columns: Mapping[str, Sequence[Any]] | None = None, *,
                       resolve_reward: Callable[[str], tuple[str, Callable]]) -> dict[str, float]:
    """LLM gold rewards: the mean of each reward function ``name`` (a built-in name or ``'module:function'``,
    resolved by ``resolve_reward``, e.g. ``adrpo_jax.rl.rewards.resolve_reward_function``) over the held-out
    ``completions``, as ``{"eval/gold/<name>": mean}`` (NaN scores are left out of the mean).

    >>> from adrpo_jax.rl.rewards import resolve_reward_function
    >>> score_gold_rewards(["exact_match"], ["1+1=", "2+2="], ["2", "5"], {"answer": ["2", "4"]},
    ...                    resolve_reward=resolve_reward_function)
    {'eval/gold/exact_match': 0.5}
    """
    out = {}
    for spec in names:
        _, fn = resolve_reward(spec)
        scores = [float(x) for x in fn(list(prompts), list(completions), **dict(columns or {}))]
        finite = [x for x in scores if math.isfinite(x)]
        out[GOLD_PREFIX + _short(spec.split(":")[-1])] = sum(finite) / len(finite) if finite else math.nan
    return out
