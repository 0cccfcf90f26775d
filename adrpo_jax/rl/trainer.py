"""The GRPO / ADRPO trainer for language models: ``train_and_evaluate(config, workdir)`` (registry name ``'llm'``).

    python launch.py --config=configs/llm_arith.py:cpu --workdir=/tmp/adrpo_arith [--config.total_steps=200]

One RL step (``total_steps`` counts them):

1. this process's rows of ``rl.num_prompts_per_step`` prompts x ``rl.group_size`` (a deterministic function of
   ``(seed, step)``), rendered and left-padded, assembled into global sharded arrays;
2. ``G`` completions per prompt from the jitted KV-cached sampler (key ``fold_in(key(seed), step)``);
3. **host/device overlap**: the jitted old-policy and reference log-prob passes are *dispatched* (JAX runs them
   asynchronously), then the host decodes this process's completions and runs the reward functions while the
   device computes, then the rewards go back as global arrays (nothing waits on the device before the rewards
   are computed, and the rewards never wait on the log-probs);
4. one jitted, donated update (:func:`adrpo_jax.rl.step.make_rl_update`): advantages on the global batch, then
   ``rl.num_iterations`` x ``rl.num_minibatches`` optimizer updates of the clipped GRPO objective with ADRPO's
   adaptive KL coefficient, gradient accumulation, clipping, skip of non-finite updates;
5. optional reference refresh (``rl.ref_sync_steps``, logged as ``ref_synced``).

LoRA (``lora.enabled``): the trainable state is the adapters (``nnx.LoRAParam``) and their optimizer state; the
base weights, loaded from ``model.path`` and sharded, are the frozen part of the split; the reference
log-probs come from the same weights with the adapters switched off (a second ``GraphDef``), so no reference
copy is held (with ``rl.ref_sync_steps > 0`` the reference is base + a copy of the adapters); ``save_final``
writes the merged model.

State: ``{"params", "opt_state"}`` (+ ``"ref_params"`` when the reference is refreshed), born sharded over the
``('data', 'fsdp', 'tensor')`` mesh from the parameters' logical axis names; a frozen reference (the initial
policy) is loaded from ``model.path`` at start, sharded like the policy, and never checkpointed; with a KL
coefficient identically 0 no reference exists at all. Checkpoints, logging, preemption and the non-finite skip
limit come from :func:`adrpo_jax.train.run_training`; the prompt iterator's position is host state, so a
resumed run (also after SIGKILL) continues bit-identically.

Metrics (one JSONL line / TensorBoard point per ``log_every`` steps, means over the interval): ``reward_mean``,
``reward_std``, ``reward/<fn>_mean``, ``advantage_mean/std/min/max``, ``kl_mean``, ``beta_eff_mean/min/max``,
``adv_clip_fraction``, ``clip_fraction`` (+ ``_low``/``_high``), ``ratio_mean/min/max``, ``entropy_mean``,
``completion_length_mean/min/max``, ``truncated_fraction``, ``zero_std_group_fraction``,
``num_missing_rewards``, ``pg_loss``, ``kl_term``, ``entropy_term``, ``loss``, ``grad_norm``,
``skipped_updates``, ``tokens_per_sec``, ``step_time_s``, ``learning_rate``, ``ref_synced``, ``eval/accuracy``.
A few decoded samples per logged step go to ``workdir/samples.jsonl``.

Where a step's time goes (seconds, means over the interval; also on the console line): ``time/rollout``
(prompts, then the sampler until the completions reach the host, where the host waits anyway),
``time/reward`` (decoding and the reward functions, host), ``time/logprobs`` and ``time/update`` (the update
dispatched until its metrics are ready; the loop reads them every step anyway). The old-policy / reference
log-prob passes overlap the reward functions (step 3), so by default ``time/logprobs`` is only their part not
hidden behind the rewards (the wait after scoring); with ``logging.phase_timing=True`` the host waits for them
before scoring and ``time/logprobs`` is their full time (the overlap is lost: a slower step, exact phases).
``time/eval`` and ``time/checkpoint`` come from :func:`adrpo_jax.train.run_training`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from adrpo_jax import train
from adrpo_jax.models.llm import CausalLM, DecoderConfig, load_pretrained, load_tokenizer
from adrpo_jax.models.llm.sampler import SamplingConfig, make_generate_fn
from adrpo_jax.models.lora import apply_lora, merge_lora, set_lora_enabled
from adrpo_jax.rl import config as config_lib
from adrpo_jax.rl import data as data_lib
from adrpo_jax.rl.rewards import RewardComputer, resolve_reward_function
from adrpo_jax.rl.rollout import PromptEncoder, stop_token_ids
from adrpo_jax.rl.step import StepOptions, make_logprob_fn, make_rl_update, mix_reference

__all__ = ["train_and_evaluate", "resolve_model_path", "RLTrainer", "Evaluator"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_model_path(model_config: Any) -> tuple[Path, Path]:
    """``(model_dir, tokenizer_dir)`` of ``config.model``; builds / converts a ``builtin:`` model on first use."""
    path = model_config.path
    if path == "builtin:tiny_arith":
        from adrpo_jax.rl.sft import ensure_tiny_arith_model  # pylint: disable=import-outside-toplevel
        model_dir = ensure_tiny_arith_model()
    elif path == "builtin:smollm2":
        from adrpo_jax.models.llm.smollm2 import convert_smollm2  # pylint: disable=import-outside-toplevel
        model_dir = convert_smollm2()
    else:
        model_dir = Path(os.path.expanduser(path))
    tok = Path(os.path.expanduser(model_config.tokenizer_path)) if model_config.tokenizer_path else model_dir
    return model_dir, tok


def _engine_overrides(m: Any) -> dict[str, Any]:
    """`DecoderConfig` fields set from the `model` config section: layer layout and attention implementation."""
    return {"scan_layers": m.scan_layers, "attention_impl": m.attention_impl,
            "attention_chunk_size": m.attention_chunk_size, "attention_auto_min_len": m.attention_auto_min_len}


def _param_sharding_fn(mesh: Mesh):
    def fn(names, shape):
        return NamedSharding(mesh, train.logical_to_partition_spec(names, shape, mesh))
    return fn


class Evaluator:
    """Held-out accuracy: greedy (or sampled) completions of fixed examples, scored by one reward function.

    Every process generates the global batch (sharded) and scores its own rows; the accuracy is a global mean.
    The example count is padded to a multiple of the data-parallel size (padding rows are not counted).
    """

    def __init__(self, examples: list[dict[str, Any]], encoder: PromptEncoder, graphdef: nnx.GraphDef,
                 sampling: SamplingConfig, mesh: Mesh, accuracy_reward: str):
        if not examples:
            raise ValueError("no evaluation examples")
        self.encoder, self.mesh = encoder, mesh
        self.name, self.reward_fn = resolve_reward_function(accuracy_reward)
        dp = train.data_parallel_size(mesh)  # global (all processes' devices)
        n = len(examples)
        n_pad = -(-n // dp) * dp
        rows = train.process_batch_slice(n_pad, mesh)
        padded = examples + [examples[-1]] * (n_pad - n)
        self.rows = padded[rows]
        self.valid_local = (np.arange(n_pad) < n)[rows]
        self.n = n
        tokens, mask, _ = encoder.encode([r["prompt"] for r in self.rows])
        self.batch = train.host_local_to_global({"tokens": tokens, "mask": mask}, mesh)
        gen = make_generate_fn(graphdef, sampling, mesh)  # mesh: rows stay batch-sharded in the model
        bs = train.batch_sharding(mesh)
        self._generate = jax.jit(lambda params, frozen, t, m, k: gen(nnx.merge_state(params, frozen), t, m, k),
                                 out_shardings=bs)
        self._global_mean = jax.jit(lambda x, v: jnp.sum(x * v) / jnp.maximum(jnp.sum(v), 1.0),
                                    out_shardings=train.replicated_sharding(mesh))
        self._key = jax.random.key(0)

    def __call__(self, params, frozen) -> dict[str, Any]:
        out = self._generate(params, frozen, self.batch["tokens"], self.batch["mask"], self._key)
        local = train.global_to_host_local({"completions": out.completions, "lengths": out.lengths,
                                            "done": out.done})
        texts = self.encoder.decode(local["completions"], local["lengths"])
        columns = data_lib.columns_of(self.rows)
        scores = self.reward_fn(prompts=[r["prompt"] for r in self.rows], completions=texts, **columns)
        scores = np.asarray([0.0 if s is None or not np.isfinite(s) else float(s) for s in scores], np.float32)
        g = train.host_local_to_global({"score": scores, "valid": self.valid_local.astype(np.float32),
                                        "length": local["lengths"].astype(np.float32),
                                        "truncated": (~local["done"]).astype(np.float32)}, self.mesh)
        return {"eval/accuracy": self._global_mean(g["score"], g["valid"]),
                "eval/completion_length_mean": self._global_mean(g["length"], g["valid"]),
                "eval/truncated_fraction": self._global_mean(g["truncated"], g["valid"])}


class RLTrainer:
    """Builds everything of an LLM RL run from a validated config (used by :func:`train_and_evaluate`).

    Public attributes useful to tests and tools: ``mesh``, ``graphdef``, ``opts`` (:class:`StepOptions`),
    ``tx``, ``abstract_state``, ``tokenizer``, ``encoder``, ``rewards`` (:class:`RewardComputer`),
    ``iterator`` (:class:`~adrpo_jax.rl.data.PromptIterator`), ``trainable`` (the parameter filter; default
    ``nnx.Param``, ``nnx.LoRAParam`` with LoRA), ``lora_config`` (None without LoRA), ``ref_graphdef`` (the
    ``GraphDef`` the reference log-probs are computed with: adapters off with LoRA).
    """

    def __init__(self, config: Any, workdir: str | os.PathLike, *, trainable: Any = None):
        config_lib.validate_llm_config(config)
        self.config, self.workdir = config, os.fspath(workdir)
        self.lora_config = config_lib.lora_config(config)
        if trainable is None:
            trainable = nnx.LoRAParam if self.lora_config is not None else nnx.Param
        self.trainable = trainable
        self.mesh = train.make_mesh(config.mesh)
        self.layout = config_lib.validate_llm_batch_layout(config, train.data_parallel_size(self.mesh),
                                                           jax.process_count())
        self.model_dir, tokenizer_dir = resolve_model_path(config.model)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        m = config.model
        self.model_config = DecoderConfig.from_hf_config(
            self.model_dir, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype], remat=m.remat,
            remat_policy=m.remat_policy or None, **_engine_overrides(m))
        if config.sampling.top_k > self.model_config.vocab_size:
            raise train.ConfigError(f"`sampling.top_k`={config.sampling.top_k} exceeds the vocabulary size "
                                    f"{self.model_config.vocab_size}.", key="sampling.top_k")
        self.rewards = RewardComputer(tuple(config.rewards.functions), tuple(config.rewards.weights),
                                      on_error=config.rewards.on_error, timeout_s=config.rewards.timeout_s)
        self.opts = StepOptions.from_config(config, reward_names=self.rewards.names)
        self.updates_per_step = config_lib.updates_per_step(config)
        self.tx, self.schedule = train.make_optimizer(config.optim, int(config.total_steps) * self.updates_per_step)
        self.encoder = PromptEncoder(self.tokenizer, int(config.sampling.max_prompt_length),
                                     chat_template=config.data.chat_template, system_prompt=config.data.system_prompt,
                                     prompt_template=config.data.prompt_template)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model_config)

        abstract_model = nnx.eval_shape(lambda: self._new_model(0))
        self.graphdef, _, abstract_frozen = nnx.split(abstract_model, trainable, ...)
        self.ref_in_state = self.opts.use_reference and config.rl.ref_sync_steps > 0
        # LoRA with a frozen reference: the reference is the policy's own weights with the adapters switched off.
        self.lora_reference = self.lora_config is not None and self.opts.use_reference and not self.ref_in_state
        self.ref_graphdef = self.graphdef
        if self.lora_reference:
            self.ref_graphdef = nnx.split(set_lora_enabled(abstract_model, False), trainable, ...)[0]
        tx, ref_in_state, new_model = self.tx, self.ref_in_state, self._new_model

        def plan():
            params = nnx.state(new_model(0), trainable)
            state = {"params": params, "opt_state": tx.init(params)}
            if ref_in_state:
                state["ref_params"] = params
            return state

        self._plan = plan
        self.abstract_state = train.plan_sharded(plan, self.mesh)
        self.state_shardings = train.shardings_of(self.abstract_state)
        self._pretrained: CausalLM | None = None
        self.frozen = abstract_frozen if not jax.tree.leaves(abstract_frozen) else \
            nnx.split(self._load_pretrained(), trainable, ...)[2]
        if jax.tree.structure(nnx.to_pure_dict(self.frozen)) != \
                jax.tree.structure(nnx.to_pure_dict(abstract_frozen)):  # internal consistency, not a user error
            raise AssertionError("the loaded frozen state does not match the model's frozen part")
        # A frozen reference (the initial policy) is loaded, not checkpointed; a refreshed one lives in the state.
        self.ref_params = (nnx.state(self._load_pretrained(), trainable)
                           if self.opts.use_reference and not self.ref_in_state and not self.lora_reference else None)

        self.iterator = data_lib.PromptIterator(
            data_lib.make_prompt_source(config), int(config.rl.num_prompts_per_step), int(config.rl.group_size),
            rows=train.process_batch_slice(self.layout["batch_size"], self.mesh), seed=int(config.seed),
            shuffle=bool(config.data.shuffle))
        self._build_functions()
        self.evaluator = None
        if int(config.eval_every) > 0:
            eval_sampling = SamplingConfig(
                max_new_tokens=int(config.sampling.max_new_tokens), temperature=float(config.sampling.temperature),
                greedy=bool(config.eval.greedy), eos_token_ids=self.stop_ids, pad_token_id=self.encoder.pad_token_id)
            self.evaluator = Evaluator(data_lib.make_eval_examples(config), self.encoder, self.graphdef,
                                       eval_sampling, self.mesh, config.eval.accuracy_reward)
        self.base_key = jax.random.key(int(config.seed))
        self._samples_path = os.path.join(self.workdir, "samples.jsonl")

    # ------------------------------------------------------------------------------------------------------

    def _lora_rngs(self) -> nnx.Rngs:
        # The adapters' initial A: a function of the seed only (identical on every process).
        return nnx.Rngs(params=jax.random.fold_in(jax.random.key(int(self.config.seed)), 0x10A))

    def _new_model(self, seed: int) -> CausalLM:
        """A freshly initialized policy (with adapters under LoRA); only ever built abstractly / under jit."""
        model = CausalLM(self.model_config, rngs=nnx.Rngs(seed))
        if self.lora_config is not None:
            apply_lora(model, self.lora_config, rngs=self._lora_rngs())
        return model

    def _load_pretrained(self) -> CausalLM:
        """The pretrained model, sharded (without adapters: with LoRA only its state, the frozen base, is used; its
        structure is that of the adapted model's non-adapter part)."""
        if self._pretrained is None:
            m = self.config.model
            self._pretrained = load_pretrained(self.model_dir, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype],
                                               remat=m.remat, remat_policy=m.remat_policy or None,
                                               config_overrides=_engine_overrides(m),
                                               shardings=_param_sharding_fn(self.mesh))
        return self._pretrained

    def _shared_prompt_group(self) -> int:
        """G when each device's rows hold whole groups of G rows of one prompt (rows r // G of a prompt): the
        sampler then prefills each prompt once for its G rows, shard-locally; else 1 (every row prefills)."""
        g = int(self.opts.group_size)
        return g if (self.layout["batch_size"] // train.data_parallel_size(self.mesh)) % g == 0 else 1

    def _build_functions(self) -> None:
        config, opts, mesh = self.config, self.opts, self.mesh
        bs = train.batch_sharding(mesh)
        repl = train.replicated_sharding(mesh)
        s = config.sampling
        self.sampling = SamplingConfig(max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature),
                                       top_k=int(s.top_k) or None, top_p=float(s.top_p) if s.top_p < 1.0 else None,
                                       eos_token_ids=self.stop_ids, pad_token_id=self.encoder.pad_token_id,
                                       prompt_group_size=self._shared_prompt_group())
        gen = make_generate_fn(self.graphdef, self.sampling, mesh)  # mesh: rows stay batch-sharded
        self.generate = jax.jit(lambda params, frozen, t, m, k: gen(nnx.merge_state(params, frozen), t, m, k),
                                out_shardings=bs)
        self.logprobs = jax.jit(make_logprob_fn(self.graphdef, opts, mesh), out_shardings=(bs, bs))
        self.ref_logprobs = (jax.jit(make_logprob_fn(self.ref_graphdef, opts, mesh), out_shardings=(bs, bs))
                             if self.lora_reference else self.logprobs)
        sh = self.state_shardings
        self.update = jax.jit(make_rl_update(self.graphdef, self.tx, opts, mesh),
                              out_shardings=(sh["params"], sh["opt_state"], repl), donate_argnums=(0, 1))
        self.mix = jax.jit(functools.partial(mix_reference, alpha=float(config.rl.ref_mixup_alpha)),
                           out_shardings=sh["params"], donate_argnums=0)

    def init_state(self) -> dict[str, Any]:
        """The fresh train state: the pretrained weights (copied, sharded), a new optimizer state. With LoRA: fresh
        adapters (B = 0, so the policy starts as the pretrained model) born sharded, and their optimizer state."""
        if self.lora_config is not None:
            self._pretrained = None  # the base weights live on in self.frozen
            return train.create_sharded(self._plan, self.abstract_state)
        params = nnx.state(self._load_pretrained(), self.trainable)
        sh = self.state_shardings
        copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=sh["params"])
        state = {"params": copy(params), "opt_state": jax.jit(self.tx.init, out_shardings=sh["opt_state"])(params)}
        if self.ref_in_state:
            state["ref_params"] = copy(params)
        self._pretrained = None  # a frozen reference keeps its arrays in self.ref_params; nothing else is held
        return state

    def reference_params(self, state) -> Any:
        """The trainable-state argument of the reference log-prob pass (with LoRA and a frozen reference: the
        policy's own adapters, which ``ref_graphdef`` ignores)."""
        if self.lora_reference:
            return state["params"]
        return state["ref_params"] if self.ref_in_state else self.ref_params

    # ------------------------------------------------------------------------------------------------------

    def rollout_batch(self, step: int, state) -> tuple[dict[str, Any], dict[str, Any]]:
        """Generates, scores and assembles the rollout batch of ``step`` (global arrays) and host info
        (``host["times"]``: the phase times of the module docstring, seconds)."""
        mesh, opts = self.mesh, self.opts
        blocking = bool(train.get_by_path(self.config, "logging.phase_timing", False))
        t_start = time.perf_counter()
        rows = self.iterator.next_rows()
        prompts = [r["prompt"] for r in rows]
        tokens, pmask, ptrunc = self.encoder.encode(prompts)
        g = train.host_local_to_global({"tokens": tokens, "mask": pmask, "truncated": ptrunc}, mesh)
        key = jax.random.fold_in(self.base_key, step)
        sample_key, update_key = jax.random.split(key)
        out = self.generate(state["params"], self.frozen, g["tokens"], g["mask"], sample_key)
        # Dispatch the device work that does not need the rewards first (asynchronous), then score on the host.
        batch: dict[str, Any] = {"tokens": out.tokens, "attention_mask": out.attention_mask,
                                 "completion_mask": out.completion_mask, "lengths": out.lengths, "done": out.done,
                                 "prompt_truncated": g["truncated"]}
        if opts.use_old_logprobs:
            batch["old_logp"], _ = self.logprobs(state["params"], self.frozen, out.tokens, out.attention_mask)
        if opts.use_reference:
            batch["ref_logp"], _ = self.ref_logprobs(self.reference_params(state), self.frozen, out.tokens,
                                                     out.attention_mask)
        local = train.global_to_host_local({"completions": out.completions, "lengths": out.lengths})
        t_generated = time.perf_counter()  # the host waited for the sampler here anyway
        logprob_outputs = [batch[k] for k in ("old_logp", "ref_logp") if k in batch]
        if blocking:  # logging.phase_timing: the log-prob passes alone (no overlap with the reward functions)
            jax.block_until_ready(logprob_outputs)
        t_reward = time.perf_counter()
        texts = self.encoder.decode(local["completions"], local["lengths"])
        columns = data_lib.columns_of(rows)
        columns["completion_ids"] = [row[:n].tolist() for row, n in zip(local["completions"], local["lengths"])]
        scored = self.rewards(prompts, texts, **columns)
        t_scored = time.perf_counter()
        if not blocking:  # the part of the log-prob passes not hidden behind the reward functions; the update
            jax.block_until_ready(logprob_outputs)  # waits for them on the device anyway
        t_logprobs = time.perf_counter()
        batch.update(train.host_local_to_global({"rewards": scored.rewards, "reward_valid": scored.valid,
                                                 "reward_components": scored.per_function}, mesh))
        times = {"time/rollout": t_generated - t_start, "time/reward": t_scored - t_reward,
                 "time/logprobs": (t_reward - t_generated) if blocking else (t_logprobs - t_scored)}
        host = {"prompts": prompts, "completions": texts, "rewards": scored.rewards, "key": update_key,
                "num_errors": scored.num_errors, "times": times}
        return batch, host

    def train_step(self, step: int, state) -> tuple[dict[str, Any], dict[str, Any]]:
        batch, host = self.rollout_batch(step, state)
        t_update = time.perf_counter()
        params, opt_state, metrics = self.update(state["params"], state["opt_state"], self.frozen, batch,
                                                 host["key"])
        # The loop reads the update's `skipped` flag after every step: the host waits for the update anyway.
        metrics = jax.block_until_ready(metrics)
        new_state = dict(state, params=params, opt_state=opt_state)
        metrics = dict(metrics)
        metrics.update(host["times"], **{"time/update": time.perf_counter() - t_update})
        errors = np.asarray([host["num_errors"]], np.float32)  # this process's rows; sum over processes, as
        if jax.process_count() > 1:  # num_missing_rewards (computed from the global batch) is
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
            errors = multihost_utils.process_allgather(errors, tiled=True)
        metrics["reward_errors"] = float(np.sum(errors))
        sync = int(self.config.rl.ref_sync_steps)
        if self.ref_in_state:
            synced = (step + 1) % sync == 0
            if synced:
                new_state["ref_params"] = self.mix(state["ref_params"], params)
                log.info("step %d: reference refreshed (alpha=%g)", step + 1, self.config.rl.ref_mixup_alpha)
            metrics["ref_synced"] = float(synced)
        if (step + 1) % int(self.config.log_every) == 0 and jax.process_index() == 0:
            self._write_samples(step + 1, host)
        return new_state, metrics

    def _write_samples(self, step: int, host: dict[str, Any], k: int = 4) -> None:
        try:
            with open(self._samples_path, "a", encoding="utf-8") as f:
                for p, c, r in list(zip(host["prompts"], host["completions"], host["rewards"].tolist()))[:k]:
                    f.write(json.dumps({"step": step, "prompt": p, "completion": c,
                                        "reward": None if r != r else r}) + "\n")
        except OSError as err:  # logging must never kill a run
            log.warning("could not write %s: %s", self._samples_path, err)

    def eval_step(self, step: int, state) -> dict[str, Any]:
        del step
        return self.evaluator(state["params"], self.frozen) if self.evaluator is not None else {}

    def run(self) -> dict[str, Any]:
        config = self.config
        writer = train.MetricWriter(self.workdir, config.logging, run_config=config)
        upd = self.updates_per_step

        def init_state():
            state = self.init_state()
            if self.evaluator is not None:  # the "before" number of a fresh run, logged at step 0
                writer.truncate_after(-1)
                writer.write(0, {k: v for k, v in jax.device_get(self.eval_step(0, state)).items()})
            return state

        try:
            result = train.run_training(
                config=config, workdir=self.workdir, init_state=init_state, abstract_state=self.abstract_state,
                train_step=self.train_step, get_host_state=self.iterator.get_state,
                set_host_state=self.iterator.set_state,
                eval_step=self.eval_step if self.evaluator is not None else None,
                learning_rate_fn=lambda s: self.schedule(s * upd), throughput_keys=("tokens",), writer=writer)
        finally:
            writer.close()
        self.result = result
        out = result.to_dict()
        if config.model.save_final and not result.preempted:
            out["final_model"] = str(self.save_model(result.state["params"], os.path.join(self.workdir, "final_model")))
        return out

    def save_model(self, params, path: str | os.PathLike) -> Path:
        """Writes ``params`` (the policy) as a Hugging Face directory with the tokenizer (process 0 writes); with
        LoRA, the merged model ``W + s A B`` (a plain checkpoint that ``transformers`` loads)."""
        from adrpo_jax.models.llm import save_pretrained  # pylint: disable=import-outside-toplevel
        model = nnx.merge(self.graphdef, params, self.frozen)
        if self.lora_config is not None:
            model = merge_lora(model)
        path = save_pretrained(model, path, tokenizer=self.tokenizer)
        log.info("Saved the trained policy to %s", path)
        return Path(path)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) GRPO / ADRPO training of ``config`` in ``workdir``; returns the last logged metrics
    plus ``step``, ``preempted``, ``resumed_from``."""
    return RLTrainer(config, workdir).run()
