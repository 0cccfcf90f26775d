"""What the flow recipes share (the digits DiT, :mod:`adrpo_jax.flow.trainer`; SD3, :mod:`adrpo_jax.flow.sd3_trainer`):
the step options, the policy (reference, sampling copy, LoRA), the step programs and the rollout / update phases.

One RL step is one fused program, ``step`` (:func:`adrpo_jax.flow.step.make_train_step`: sampling, reward,
advantages, the ``rl.method`` loss, inner updates, refreshes). With ``logging.phase_timing=True`` the recipe runs
the same math as three programs, ``sample``, ``reward`` and ``update`` (:func:`adrpo_jax.flow.step.
make_phase_fns`), the host waiting for each: ``time/sample``, ``time/reward``, ``time/update`` (another
compilation: equal to the fused step up to float32 rounding). The rollout phase of the fused step is host work
only (the step's prompts and key); the update phase dispatches the program.

The reward is ``make_reward(*reward_args)``: the digits recipe closes its classifier into the program
(``reward_args = ()``); SD3 passes the VAE and CLIP arrays as an argument (``(reward_state,)``), so the large towers
are not constants of the program.

The reference refresh (``rl.ref_refresh_steps``, ``rl.ref_refresh_alpha``) and the sampling copy
(``rl.sampler_refresh_steps``) are the policy's (:class:`~adrpo_jax.recipe.policy.Policy`): both recipes honour
them, logged as ``ref_refreshed`` / ``sampler_refreshed``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax import train
from adrpo_jax.flow.config import lora_config
from adrpo_jax.flow.data import step_prompts
from adrpo_jax.flow.step import FlowStepOptions, make_phase_fns, make_train_step
from adrpo_jax.models.lora import apply_lora
from adrpo_jax.recipe.base import Recipe
from adrpo_jax.recipe.policy import Policy, PolicySpec
from adrpo_jax.train import perf
from adrpo_jax.train.programs import Program, key_struct, matmul_flops

__all__ = ["FlowRecipe"]

log = logging.getLogger(__name__)


class FlowRecipe(Recipe):
    """Base of the flow recipes (module docstring). A subclass sets ``self.opts``, ``self.num_conditions``,
    ``self.layout``, calls :meth:`_build_policy`, provides :meth:`make_reward`, :meth:`reward_args` (+ their
    abstract values in :meth:`reward_arg_structs`); then calls :meth:`step_programs`."""

    throughput_key = "images"
    _flops: dict[str, float]
    # set by the subclass (class docstring) and _build_policy (rows, base_key)
    opts: FlowStepOptions
    num_conditions: int
    layout: dict[str, int]  # config.validate_flow_batch_layout / validate_sd3_batch_layout
    rows: slice  # this process's rows of the global batch (train.process_batch_slice)
    base_key: jax.Array
    # the config key that shrinks each step program's memory (Program.shrink_key; the plan names it)
    shrink_keys: ClassVar[dict[str, str]] = {}

    def _with_lora(self, model: Any) -> Any:
        """``model`` with adapters under LoRA (their A a function of ``seed`` only), else ``model``."""
        if self.lora_cfg is not None:
            key = jax.random.fold_in(jax.random.key(int(self.config.seed)), 0x10A)
            apply_lora(model, self.lora_cfg, rngs=nnx.Rngs(params=key))
        return model

    def _build_policy(self, new_model: Callable, load_pretrained: Callable | None, trainable: Any = None) -> None:
        """The optimizer, LoRA, ``self.policy`` (``trainable`` default: ``nnx.Param``, or ``nnx.LoRAParam`` under
        LoRA), this process's batch rows and the base key (after ``self.layout`` and ``self.opts``)."""
        config, rl = self.config, self.config.rl
        self._flops = {}
        self.updates_per_step = int(rl.num_inner_updates)
        tx, self.schedule = train.make_optimizer(config.optim, int(config.total_steps) * self.updates_per_step)
        lora = self.lora_cfg = lora_config(config)
        if trainable is None:
            trainable = nnx.LoRAParam if lora is not None else nnx.Param
        spec = PolicySpec(new_model=new_model, load_pretrained=load_pretrained, tx=tx, trainable=trainable,
                          lora=lora, reference="refreshed" if int(rl.ref_refresh_steps) > 0 else "frozen",
                          ref_alpha=float(rl.ref_refresh_alpha), sampler_copy=int(rl.sampler_refresh_steps) > 1,
                          keep_pretrained=True)  # eval: W2 to, and samples of, the pre-trained model
        self.policy = Policy(spec, self.mesh, abstract=self.abstract)
        self.rows = train.process_batch_slice(self.layout["batch_size"], self.mesh)
        self.base_key = jax.random.key(int(config.seed))

    # ---- the reward, as the subclass provides it ------------------------------------------------------------

    def make_reward(self, *reward_args: Any) -> Callable:
        raise NotImplementedError

    def reward_args(self) -> tuple:
        return ()

    def reward_arg_structs(self) -> tuple:
        return ()

    # ---- programs -------------------------------------------------------------------------------------------

    def _step_ref_arg(self) -> Any:
        """The fused step's ``ref_params`` argument: the frozen reference's weights, or None when the reference
        lives in the (donated) state or is the policy's own base weights (LoRA, adapters off)."""
        p = self.policy
        return None if p.ref_in_state or p.lora is not None else p.ref_params

    def step_programs(self) -> list[Program]:
        """``step`` (the fused RL step), and with ``logging.phase_timing`` ``sample`` / ``reward`` / ``update``."""
        opts, mesh, policy = self.opts, self.mesh, self.policy
        repl, bs = train.replicated_sharding(mesh), train.batch_sharding(mesh)
        lora_dropout = policy.lora is not None and policy.lora.dropout > 0
        graphdef, ref_graphdef, tx, make_reward = policy.graphdef, policy.ref_graphdef, policy.tx, self.make_reward

        def step(state, ref_params, frozen, cond, key, refresh_ref, refresh_sampler, *reward_args):
            inner = make_train_step(graphdef, tx, make_reward(*reward_args), opts, mesh, ref_graphdef=ref_graphdef,
                                    lora_dropout=lora_dropout)
            return inner(state, ref_params, frozen, cond, key, refresh_ref, refresh_sampler)

        b = self.layout["batch_size"]
        flag = jax.ShapeDtypeStruct((), jnp.bool_)
        cond = lambda: jax.ShapeDtypeStruct((b,), jnp.int32, sharding=bs)  # noqa: E731
        ref_struct = lambda: None if self._step_ref_arg() is None else self.abstract_state["params"]  # noqa: E731
        # (state, ref_params, frozen, cond, key): the arguments the fused step and the phase-timing update share
        head = lambda: (self.abstract_state, ref_struct(), policy.abstract_frozen, cond(), key_struct())  # noqa: E731
        programs = [Program("step", step, out_shardings=(self.state_shardings, repl), donate_argnums=(0,),
                            args=lambda: (*head(), flag, flag, *self.reward_arg_structs()))]
        if self.phase_timing():
            fns = make_phase_fns(graphdef, tx, opts, mesh, ref_graphdef=ref_graphdef, lora_dropout=lora_dropout)
            reward = lambda x, c, *r: fns["reward"](make_reward(*r), x, c)  # noqa: E731
            x1 = lambda: jax.ShapeDtypeStruct((b, *opts.image_shape), jnp.float32, sharding=bs)  # noqa: E731
            comps = lambda: jax.eval_shape(reward, x1(), cond(), *self.reward_arg_structs())  # noqa: E731
            programs += [
                Program("sample", fns["sample"], out_shardings=bs, phase="rollout",
                        args=lambda: (self.abstract_state, policy.abstract_frozen, cond(), key_struct())),
                Program("reward", reward, phase="rollout", args=lambda: (x1(), cond(), *self.reward_arg_structs())),
                Program("update", fns["update"], out_shardings=(self.state_shardings, repl), donate_argnums=(0,),
                        args=lambda: (*head(), x1(), comps(), flag, flag)),
            ]
        return [dataclasses.replace(p, shrink_key=self.shrink_keys.get(p.name, "")) for p in programs]

    # ---- host phases ----------------------------------------------------------------------------------------

    def prompts(self, step: int) -> np.ndarray:
        """All ``[K * G]`` prompt ids of ``step`` (global; this process feeds ``[self.rows]``)."""
        rl = self.config.rl
        return step_prompts(int(self.config.seed), step, int(rl.prompts_per_step), int(rl.samples_per_prompt),
                            self.num_conditions)

    def rollout(self, step: int, state: Any) -> dict[str, Any]:
        rl = self.config.rl
        out = {"cond": train.host_local_to_global(self.prompts(step)[self.rows], self.mesh),
               "key": jax.random.fold_in(self.base_key, step),
               "refresh_ref": self.policy.ref_in_state and (step + 1) % int(rl.ref_refresh_steps) == 0,
               "refresh_sampler": self.policy.sampler_in_state and (step + 1) % int(rl.sampler_refresh_steps) == 0}
        if "sample" in self.fns:  # logging.phase_timing: the rollout's programs, the host waiting for each
            t0 = time.perf_counter()
            out["x1"] = jax.block_until_ready(self.fns["sample"](state, self.frozen, out["cond"], out["key"]))
            t1 = time.perf_counter()
            out["components"] = jax.block_until_ready(self.fns["reward"](out["x1"], out["cond"], *self.reward_args()))
            out["times"] = {"time/sample": t1 - t0, "time/reward": time.perf_counter() - t1}
        return out

    def update(self, step: int, state: Any, rollout: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        r = rollout
        flags = (np.bool_(r["refresh_ref"]), np.bool_(r["refresh_sampler"]))
        head = (state, self._step_ref_arg(), self.frozen, r["cond"], r["key"])
        if "x1" not in r:
            name, args = "step", (*head, *flags, *self.reward_args())
        else:
            name, args = "update", (*head, r["x1"], r["components"], *flags)
        if name not in self._flops:  # matmul FLOPs of the program (every sampling / inner-update step), once
            self._flops[name] = matmul_flops(jax.make_jaxpr(self.programs[name].fn)(*args), count_loops=True)
        t0 = time.perf_counter()
        # The loop reads the step's `skipped` flag right after it: waiting here costs nothing.
        state, metrics = jax.block_until_ready(self.fns[name](*args))
        seconds = time.perf_counter() - t0
        metrics = dict(metrics)
        if name == "update":
            metrics.update(r["times"], **{"time/update": seconds})
        chip, n = perf.mesh_chips(self.mesh)
        # perf/update_mfu: of the fused step (sampling + reward + update) by default, of the update alone with
        # logging.phase_timing
        metrics["perf/update_mfu"] = perf.utilization(self._flops[name], 0.0, seconds, chip, n)["mfu"]
        # Logged as ref_refreshed / sampler_refreshed; at DEBUG so that a logged step prints one console line.
        if r["refresh_ref"]:
            rl = self.config.rl
            log.debug("step %d: reference refreshed (ref = %g * policy + %g * ref)", step + 1,
                      float(rl.ref_refresh_alpha), 1.0 - float(rl.ref_refresh_alpha))
        if r["refresh_sampler"]:
            log.debug("step %d: sampling copy refreshed", step + 1)
        return state, metrics
