"""The policy of a run, built once for every recipe: what is trained, what is frozen, what the reference is.

A recipe describes its policy with a :class:`PolicySpec` (an abstract model factory, a deferred loader of the
pre-trained weights, the trainable filter, LoRA, the reference mode, an optional sampling copy, the optimizer);
:class:`Policy` turns it into what the programs and the loop need::

    policy = Policy(spec, mesh)                 # loads the weights (sharded); Policy(spec, mesh, abstract=True)
    policy.graphdef, policy.ref_graphdef        # never loads anything (the plan mode)
    policy.abstract_state, policy.state_shardings   # {"params", "opt_state"} (+ "ref_params", "sampler_params")
    state = policy.init_state()                 # pre-trained weights copied (or fresh adapters), new optimizer state
    policy.reference(state)                     # the trainable-shaped tree of the reference forward
    new_ref = policy.refresh(state["ref_params"], state["params"])   # ref <- a * policy + (1 - a) * ref
    model = policy.merged(params)               # the policy as one plain module (LoRA folded in), for export

Reference modes (``spec.reference``):

* ``"none"``: no reference (a KL / W2 coefficient identically 0);
* ``"frozen"``: the pre-trained model. Without LoRA a separate copy of its trainable weights (``ref_params``,
  sharded like the policy, loaded at start, never checkpointed); with LoRA the policy's own weights with the
  adapters switched off (``ref_graphdef``; no copy);
* ``"refreshed"``: a copy in the train state (``state["ref_params"]``, checkpointed) that the recipe refreshes
  with :meth:`Policy.refresh` (TRL's ``ref_model_sync_steps`` / ``ref_model_mixup_alpha``); with LoRA the copy is
  of the adapters (base + refreshed adapters).

``spec.sampler_copy``: a sampling copy ``state["sampler_params"]`` (flow recipes' ``rl.sampler_refresh_steps``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from adrpo_jax import train
from adrpo_jax.models.lora import LoRAConfig, merge_lora, set_lora_enabled
from adrpo_jax.train.programs import Program, abstract_like

__all__ = ["PolicySpec", "Policy", "REFERENCE_MODES", "lora_config", "once"]

log = logging.getLogger(__name__)

REFERENCE_MODES = ("none", "frozen", "refreshed")


def lora_config(config: Any, what: str = "module") -> LoRAConfig | None:
    """The :class:`~adrpo_jax.models.lora.LoRAConfig` of ``config.lora`` (None when disabled or absent); the keys
    are checked by :func:`adrpo_jax.train.config.validate_lora_section`, the rest (init name, regex syntax) by
    ``LoRAConfig`` itself, reported as a ``ConfigError`` naming the key."""
    section = train.validate_lora_section(config, what)
    if section is None:
        return None
    try:
        return LoRAConfig(**section)
    except ValueError as err:
        field = re.search(r"LoRAConfig\.(\w+)", str(err))
        key = f"lora.{field.group(1)}" if field else "lora"
        raise train.ConfigError(f"`{key}`: {err}", key=key, value=train.get_by_path(config, key, None)) from None


def _split(model: nnx.Module, trainable: Any) -> tuple[Any, Any, Any]:
    """``nnx.split(model, trainable, ...)``: the graph definition, the trained state, the rest (typed as a
    3-tuple: nnx declares a variadic one)."""
    parts: tuple[Any, ...] = nnx.split(model, trainable, ...)
    return parts[0], parts[1], parts[2]


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What a recipe trains (see the module docstring).

    Attributes:
      new_model: ``() -> nnx.Module``: a freshly initialized policy (adapters applied under LoRA, their A a function
        of the seed only). Only ever run under ``nnx.eval_shape`` or ``jit`` (never allocated eagerly).
      load_pretrained: ``() -> nnx.Module``: the pre-trained weights (sharded where the loader can), called once
        at build time unless ``abstract``. Its ``nnx.split(model, trainable, ...)`` must give the policy's frozen
        part; its trainable part, when it has one, is the initial policy (a model without adapters under LoRA has
        none: the adapters then start from ``new_model``'s). None: the policy starts from ``new_model``.
      tx: the optimizer.
      trainable: the ``nnx.split`` filter of the trained state (``nnx.Param``; ``nnx.LoRAParam`` under LoRA).
      lora: the LoRA config, or None.
      reference: ``none`` | ``frozen`` | ``refreshed``.
      ref_alpha: the refresh's mixing weight (``refreshed`` only).
      sampler_copy: keep a sampling copy ``state["sampler_params"]``.
      keep_pretrained: hold the pre-trained trainable weights for the whole run (sharded like the policy) even
        when the reference does not need them (evaluations against the pre-trained model).
      lag_copies: k >= 0 copies of the trainable parameters in ``state["lag_params"]`` (a tuple, checkpointed):
        the behaviour policies of the rollouts in flight with bounded-staleness asynchronous RL
        (``rl.max_lag = k``, :mod:`adrpo_jax.recipe.schedule`); fresh runs start with k copies of the initial policy.
    """

    new_model: Callable[[], nnx.Module]
    tx: optax.GradientTransformation
    load_pretrained: Callable[[], nnx.Module] | None = None
    trainable: Any = nnx.Param
    lora: LoRAConfig | None = None
    reference: str = "frozen"
    ref_alpha: float = 1.0
    sampler_copy: bool = False
    keep_pretrained: bool = False
    lag_copies: int = 0

    def __post_init__(self):
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"PolicySpec.reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.reference == "refreshed" and not 0.0 < self.ref_alpha <= 1.0:
            raise ValueError(f"PolicySpec.ref_alpha must be in (0, 1], got {self.ref_alpha!r}")


def once(value: Any) -> Callable[[], Any]:
    """A ``load_pretrained`` for a model already in hand: returns it on the first call and forgets it (the
    policy splits it into the state it keeps; no other reference stays alive)."""
    box = [value]

    def load() -> Any:
        if not box:
            raise RuntimeError("the pre-trained model was already handed over")
        return box.pop()

    return load


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree.leaves(tree))


class Policy:
    """The built policy of a :class:`PolicySpec` on ``mesh`` (``abstract``: shapes and shardings only).

    Attributes:
      graphdef: the policy's graph (adapters on). ``base_graphdef``: the pre-trained model's graph (adapters off
        under LoRA, else ``graphdef``). ``ref_graphdef``: the graph of the reference forward (``base_graphdef``
        for a LoRA policy with a frozen reference, else ``graphdef``).
      abstract_state / state_shardings: the train state's ShapeDtypeStructs (with shardings) / shardings.
      frozen: the non-trainable model state, sharded by its logical axis names (abstract when ``abstract``).
      ref_params: the frozen reference's trainable-shaped weights (reference ``frozen`` without LoRA), else None.
      ref_in_state / lora_reference / sampler_in_state: the layout flags of the module docstring.
    """

    def __init__(self, spec: PolicySpec, mesh: Mesh, *, abstract: bool = False):
        self.spec, self.mesh, self.abstract = spec, mesh, abstract
        self.tx, self.trainable, self.lora = spec.tx, spec.trainable, spec.lora
        abstract_model = nnx.eval_shape(spec.new_model)
        self.graphdef, _, abstract_frozen = _split(abstract_model, self.trainable)
        self.use_reference = spec.reference != "none"
        self.ref_in_state = spec.reference == "refreshed"
        self.lora_reference = self.lora is not None and spec.reference == "frozen"
        self.sampler_in_state = bool(spec.sampler_copy)
        self.base_graphdef = self.graphdef
        if self.lora is not None:
            self.base_graphdef = _split(set_lora_enabled(abstract_model, False), self.trainable)[0]
        self.ref_graphdef = self.base_graphdef if self.lora_reference else self.graphdef
        tx, trainable, new_model = self.tx, self.trainable, spec.new_model
        ref_in_state, sampler_in_state = self.ref_in_state, self.sampler_in_state
        lag_copies = self.lag_copies = int(spec.lag_copies)

        def plan():
            params = nnx.state(new_model(), trainable)
            state = {"params": params, "opt_state": tx.init(params)}
            if ref_in_state:
                state["ref_params"] = params
            if sampler_in_state:
                state["sampler_params"] = params
            if lag_copies:
                state["lag_params"] = tuple(params for _ in range(lag_copies))
            return state

        self._plan = plan
        self.abstract_state = train.plan_sharded(plan, mesh)
        self.state_shardings = train.shardings_of(self.abstract_state)
        self.frozen_shardings = train.logical_to_named_sharding(abstract_frozen, mesh)
        self.abstract_frozen = abstract_like(abstract_frozen, self.frozen_shardings)
        self._initial: Any = None  # the pre-trained trainable weights until init_state copies them
        self.ref_params: Any = None
        if abstract:
            self.frozen = self.abstract_frozen
            if self.use_reference and not self.ref_in_state and not self.lora_reference:
                self.ref_params = self.abstract_state["params"]
            return
        pretrained = spec.load_pretrained() if spec.load_pretrained is not None else None
        if pretrained is None:
            self.frozen = abstract_frozen if not _has_leaves(abstract_frozen) else \
                train.create_sharded(lambda: _split(new_model(), trainable)[2], self.abstract_frozen)
            return
        _, pre_params, pre_frozen = _split(pretrained, self.trainable)
        del pretrained
        pre_structure: Any = jax.tree.structure(nnx.to_pure_dict(pre_frozen))  # PyTreeDef: unresolved in jax's stubs
        if pre_structure != jax.tree.structure(nnx.to_pure_dict(abstract_frozen)):
            raise AssertionError("the pre-trained model's frozen state does not match the policy's frozen part")
        self.frozen = abstract_frozen if not _has_leaves(pre_frozen) else \
            jax.device_put(pre_frozen, self.frozen_shardings)
        if _has_leaves(pre_params):
            self._initial = jax.device_put(pre_params, self.state_shardings["params"])
            if self.use_reference and not self.ref_in_state and not self.lora_reference:
                self.ref_params = self._initial

    # ------------------------------------------------------------------------------------------------------

    def programs(self) -> list[Program]:
        """The policy's own programs: ``policy/init`` (fresh adapters or a fresh policy + optimizer state, born
        sharded), ``policy/copy`` (a sharded copy of a parameter tree), ``policy/opt_init`` and, with a refreshed
        reference, ``policy/refresh`` (``ref`` donated)."""
        sh = self.state_shardings
        params_sds = lambda: (self.abstract_state["params"],)  # noqa: E731
        out = [Program("policy/init", self._plan, args=tuple, out_shardings=sh, phase="init"),
               Program("policy/copy", lambda p: jax.tree.map(jnp.copy, p), args=params_sds,
                       out_shardings=sh["params"], phase="init"),
               Program("policy/opt_init", self.tx.init, args=params_sds, out_shardings=sh["opt_state"],
                       phase="init")]
        if self.ref_in_state:
            alpha = float(self.spec.ref_alpha)
            out.append(Program("policy/refresh", lambda ref, p: train.mix_params(ref, p, alpha),
                               args=lambda: (self.abstract_state["ref_params"], self.abstract_state["params"]),
                               out_shardings=sh["params"], donate_argnums=(0,), phase="update"))
        return out

    def bind(self, fns: dict[str, Callable[..., Any]]) -> None:
        """Gives the policy the jitted callables of its :meth:`programs` (from the recipe's program set)."""
        self._fns = fns

    def init_state(self) -> dict[str, Any]:
        """The fresh train state: the pre-trained trainable weights copied (sharded) and a new optimizer state;
        without pre-trained trainable weights (LoRA adapters) everything is born sharded from ``new_model``."""
        if self.abstract:
            raise RuntimeError("an abstract policy (plan mode) has no weights")
        fns = self._fns
        if self._initial is None:
            return fns["policy/init"]()
        params = fns["policy/copy"](self._initial)
        state = {"params": params, "opt_state": fns["policy/opt_init"](self._initial)}
        if self.ref_in_state:
            state["ref_params"] = fns["policy/copy"](self._initial)
        if self.sampler_in_state:
            state["sampler_params"] = fns["policy/copy"](self._initial)
        if self.lag_copies:
            state["lag_params"] = tuple(fns["policy/copy"](self._initial) for _ in range(self.lag_copies))
        if self.ref_params is None and not self.spec.keep_pretrained:
            self._initial = None  # nothing else holds the pre-trained copy: free it
        return state

    def pretrained_params(self, state: Any = None) -> Any:
        """A trainable-shaped tree that, merged with :attr:`base_graphdef`, is the pre-trained model: the kept
        pre-trained weights (``ref_params`` / ``keep_pretrained``), or (LoRA: any adapter values do) the initial
        adapters / the policy's current ones."""
        if self.ref_params is not None:
            return self.ref_params
        if self._initial is not None:
            return self._initial
        if state is not None:
            return state["params"]
        raise ValueError("the pre-trained weights are not held (pass the train state)")

    def reference(self, state: Any) -> Any:
        """The trainable-shaped tree of the reference forward (with :attr:`ref_graphdef`): ``state["ref_params"]``
        (refreshed), the policy's own adapters (LoRA, frozen reference: ignored by ``ref_graphdef``) or the frozen
        ``ref_params``. None without a reference."""
        if not self.use_reference:
            return None
        if self.ref_in_state:
            return state["ref_params"]
        if self.lora_reference:
            return state["params"]
        return self.ref_params

    def refresh(self, ref_params: Any, params: Any) -> Any:
        """``ref <- ref_alpha * params + (1 - ref_alpha) * ref`` (``ref_params`` donated)."""
        return self._fns["policy/refresh"](ref_params, params)

    def merged(self, params: Any, *, to_host: bool = False, frozen: Any = None) -> nnx.Module | None:
        """The policy of ``params`` as one plain module (adapters folded in: ``W + s A B``), for export.

        ``to_host``: gather every array to host numpy first (all processes take part: the arrays may span
        processes); then only process 0 gets the module, the others None. Otherwise the module holds the
        (sharded) device arrays, for writers that fetch collectively themselves. ``frozen``: the frozen state to
        merge instead of :attr:`frozen` (e.g. with a large table the export does not write swapped for a stand-in)."""
        frozen = self.frozen if frozen is None else frozen
        if to_host:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
                gather = lambda x: multihost_utils.process_allgather(x, tiled=True)  # noqa: E731
            else:
                gather = jax.device_get
            params, frozen = gather(params), gather(frozen)
            if jax.process_index() != 0:
                return None
            params, frozen = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, frozen)
        model = nnx.merge(self.graphdef, params, frozen)
        return merge_lora(model) if self.lora is not None else model
