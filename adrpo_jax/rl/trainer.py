"""The GRPO / ADRPO recipe for language models: ``train_and_evaluate(config, workdir)`` (``config.trainer = 'llm'``).

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

Asynchronous RL (``rl.max_lag`` >= 1, :mod:`adrpo_jax.recipe.schedule`): with ``mesh.rollout_devices = N`` the
sampler runs on its own mesh of the first N devices (``rollout_mesh``; ``self.mesh`` is the training mesh of the
others): :meth:`RLTrainer.sync_weights` reshards the behaviour parameters onto it by ``jax.device_put`` at every
dispatch (``time/weight_sync``, ``async/weight_sync_bytes``) and the sampler's outputs are copied back to the
training mesh (``time/rollout_transfer``: the part not done when the completions reach the host).
"""

from __future__ import annotations

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
from jax.sharding import PartitionSpec as P

from adrpo_jax import train
import adrpo_jax.train.sharding  # noqa: F401  (train.sharding.BATCH_AXES)
from adrpo_jax.models.llm import CausalLM, DecoderConfig, load_pretrained, load_tokenizer
from adrpo_jax.models.llm.presets import PRESET_PREFIX, preset
from adrpo_jax.models.llm.continuous import make_continuous_generate_fn
from adrpo_jax.models.llm.sampler import SamplingConfig, make_generate_fn, make_plan_fns
from adrpo_jax.models.lora import apply_lora
from adrpo_jax.recipe.base import Recipe
from adrpo_jax.recipe.policy import Policy, PolicySpec
from adrpo_jax.rl import config as config_lib
from adrpo_jax.rl import data as data_lib
from adrpo_jax.rl.rewards import RewardComputer, check_rewards_present, resolve_reward_function
from adrpo_jax.rl.rollout import PromptEncoder, stop_token_ids
from adrpo_jax.rl.router_replay import make_routing_metrics_fn, training_model_inputs
from adrpo_jax.rl.step import StepOptions, make_logprob_fn, make_rl_update
from adrpo_jax.train import perf
from adrpo_jax.train.monitor import gold_metric_keys
from adrpo_jax.train.programs import Program, abstract_like, key_struct, matmul_flops

__all__ = ["train_and_evaluate", "resolve_model_path", "RLTrainer", "Evaluator"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# built-in models whose shapes a preset states exactly (the plan mode uses it instead of converting the weights)
_BUILTIN_PRESETS = {"builtin:smollm2": "smollm2-135m"}


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


def _model_overrides(m: Any) -> dict[str, Any]:
    """The LM's ``DecoderConfig`` fields set from the `model` section: remat, layer layout, attention."""
    return dict(remat=bool(m.remat), remat_policy=m.remat_policy or None, **_engine_overrides(m))


def _cache_structs(cache: Any, mesh: Mesh) -> Any:
    """A KV cache's ShapeDtypeStructs as the sampler holds it: rows over the batch axes (axis 1 of the stacked
    ``[L, B, K, S, hd]`` layout, else 0), key/value heads over ``tensor`` when they divide, scalars replicated."""
    tensor = mesh.shape.get("tensor", 1)

    def one(x):
        if x.ndim == 0:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P()))
        spec = [None] * x.ndim
        spec[1 if x.ndim == 5 else 0] = train.sharding.BATCH_AXES
        if x.ndim >= 4 and tensor > 1 and x.shape[-3] % tensor == 0:
            spec[-3] = "tensor"
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(*spec)))

    return jax.tree.map(one, cache)


def _finite_scores(scores) -> np.ndarray:
    return np.asarray([0.0 if s is None or not np.isfinite(s) else float(s) for s in scores], np.float32)


def eval_layout(num_examples: int, batch_size: int, data_parallel: int) -> tuple[int, int]:
    """``(chunk, padded)``: rows per eval generate call (``batch_size`` or all, rounded up to a multiple of the
    data-parallel size) and the padded example count (a multiple of the chunk).

    >>> eval_layout(100, 0, 8), eval_layout(100, 30, 8)
    ((104, 104), (32, 128))
    """
    chunk = int(batch_size) or int(num_examples)
    chunk = -(-chunk // data_parallel) * data_parallel
    return chunk, -(-int(num_examples) // chunk) * chunk


class Evaluator:
    """Held-out accuracy: greedy (or sampled) completions of fixed examples, scored by one reward function.

    Every process generates the global batch (sharded) and scores its own rows; the accuracy is a global mean.
    The examples go through ``eval/generate`` in chunks of ``eval.batch_size`` rows (0: all at once; rounded up
    to a multiple of the data-parallel size), so the eval's KV cache follows the chunk, not the eval set; the
    last chunk is padded (padding rows are not counted). The prompts go through the recipe's prompt front end
    (text: the tokenizer; audio: the encoder + audio tokens); the programs are the recipe's ``eval/generate``
    and ``eval/mean``.
    """

    def __init__(self, recipe: "RLTrainer", examples: list[dict[str, Any]]):
        if not examples:
            raise ValueError("no evaluation examples")
        self.recipe, self.mesh = recipe, recipe.mesh
        self.name, self.reward_fn = resolve_reward_function(recipe.config.eval.accuracy_reward)
        n = len(examples)
        self.chunk, self.n_pad = eval_layout(n, int(recipe.config.eval.get("batch_size", 0)),
                                             train.data_parallel_size(self.mesh))
        padded = examples + [examples[-1]] * (self.n_pad - n)
        rows = train.process_batch_slice(self.chunk, self.mesh)
        valid = np.arange(self.n_pad) < n
        self.chunks = [(padded[i:i + self.chunk][rows], valid[i:i + self.chunk][rows])
                       for i in range(0, self.n_pad, self.chunk)]
        self.n = n
        self._key = jax.random.key(0)
        # Gold rewards (eval.gold_rewards: scorers the run never trains on), logged as eval/gold/<name> for the
        # reward-hacking monitor (adrpo_jax.train.monitor).
        names = tuple(recipe.config.eval.get("gold_rewards", ()))
        keys = gold_metric_keys(recipe.config, "llm") if names else ()
        self.gold = [(key, resolve_reward_function(name)[1]) for key, name in zip(keys, names)]

    def __call__(self, state) -> dict[str, Any]:
        recipe, fns = self.recipe, self.recipe.fns
        # each metric's per-row values (means over the valid rows), then the valid-row mask
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("eval/accuracy", "eval/completion_length_mean",
                                                               "eval/truncated_fraction", *dict(self.gold), "valid")}
        for rows, valid in self.chunks:
            g, model_inputs, prompts, _ = recipe.prompt_inputs(rows, state, group=1)
            out = fns["eval/generate"](state["params"], recipe.frozen, g["tokens"], g["mask"], self._key,
                                       *recipe.generate_extra(model_inputs))
            local = train.global_to_host_local({"completions": out.completions, "lengths": out.lengths,
                                                "done": out.done})
            texts = recipe.prompt_encoder().decode(local["completions"], local["lengths"])
            columns = data_lib.columns_of(rows)
            for key, fn in (("eval/accuracy", self.reward_fn), *self.gold):
                parts[key].append(_finite_scores(fn(prompts=prompts, completions=texts, **columns)))
            parts["valid"].append(valid.astype(np.float32))
            parts["eval/completion_length_mean"].append(local["lengths"].astype(np.float32))
            parts["eval/truncated_fraction"].append((~local["done"]).astype(np.float32))
        g = train.host_local_to_global({k: np.concatenate(v) for k, v in parts.items()}, self.mesh)
        return {k: fns["eval/mean"](g[k], g["valid"]) for k in parts if k != "valid"}


class RLTrainer(Recipe):
    """The text-LLM recipe: everything of an LLM RL run, built from a validated config (module docstring).

    Public attributes useful to tests and tools (beyond :class:`~adrpo_jax.recipe.base.Recipe`'s): ``opts``
    (:class:`StepOptions`), ``tokenizer``, ``encoder``, ``rewards`` (:class:`RewardComputer`), ``iterator``
    (:class:`~adrpo_jax.rl.data.PromptIterator`), ``sampling``, ``evaluator``, ``model_config``, ``layout``.

    ``abstract=True`` (the plan mode): shapes only: no tokenizer, no data, no weights (``model.path`` must hold a
    ``config.json``).
    """

    name = "llm"
    throughput_key = "tokens"
    monitor_kind = "llm"

    def __init__(self, config: Any, workdir: str | os.PathLike, *, trainable: Any = None, mesh: Mesh | None = None,
                 abstract: bool = False):
        self.validate(config)
        super().__init__(config, workdir, mesh=mesh, abstract=abstract)
        # mesh.rollout_devices = N (with rl.max_lag >= 1): the sampler on the first N devices, the rest train
        # (self.mesh, built without them); None = one mesh. The plan mode plans every program on the training mesh.
        self.rollout_mesh = None if abstract else train.sharding.make_rollout_mesh(config.mesh)
        if abstract and int(config.mesh.get("rollout_devices", 0)):
            log.warning("plan mode with mesh.rollout_devices=%d: every program, the sampler included, is planned on "
                        "the training mesh %s (the rollout mesh's own programs are not planned)",
                        int(config.mesh.rollout_devices), dict(self.mesh.shape))
        self.sampler_mesh = self.rollout_mesh if self.rollout_mesh is not None else self.mesh
        # The data files first, before anything heavy (issue 28 item 20): one ConfigError naming the setting.
        self.data_sources: dict[str, Any] = {} if abstract else self.check_data()
        self.layout = config_lib.validate_llm_batch_layout(config, train.data_parallel_size(self.mesh),
                                                           1 if abstract else jax.process_count())
        if self.rollout_mesh is not None:
            self._check_rollout_mesh()
        self.lora_cfg = config_lib.lora_config(config)
        self._setup_model()
        if config.sampling.top_k > self.model_config.vocab_size:
            raise train.ConfigError(f"`sampling.top_k`={config.sampling.top_k} exceeds the vocabulary size "
                                    f"{self.model_config.vocab_size}.", key="sampling.top_k")
        self.rewards = RewardComputer(tuple(config.rewards.functions), tuple(config.rewards.weights),
                                      on_error=config.rewards.on_error, timeout_s=config.rewards.timeout_s,
                                      stop_when_all_missing=bool(config.rewards.get("stop_when_all_missing", True)))
        self.opts = StepOptions.from_config(config, reward_names=self.rewards.names)
        self.updates_per_step = config_lib.updates_per_step(config)
        tx, self.schedule = train.make_optimizer(config.optim, int(config.total_steps) * self.updates_per_step)
        if trainable is None:
            trainable = nnx.LoRAParam if self.lora_cfg is not None else self.default_trainable()
        rl = config.rl
        reference = "none" if not self.opts.use_reference else ("refreshed" if rl.ref_sync_steps > 0 else "frozen")
        self.policy = Policy(PolicySpec(new_model=self._new_model, load_pretrained=self._load_pretrained, tx=tx,
                                        trainable=trainable, lora=self.lora_cfg, reference=reference,
                                        ref_alpha=float(rl.ref_mixup_alpha), lag_copies=int(rl.get("max_lag", 0))),
                             self.mesh, abstract=abstract)
        s = config.sampling
        both: dict[str, Any] = dict(max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature),
                                    eos_token_ids=self.stop_ids, pad_token_id=self.pad_token_id)  # rollout's + eval's
        self.sampling = SamplingConfig(**both, top_k=int(s.top_k) or None,
                                       top_p=float(s.top_p) if s.top_p < 1.0 else None,
                                       prompt_group_size=self._shared_prompt_group())
        self.engine, self.decode_slots = self._rollout_engine()
        self.eval_sampling = SamplingConfig(**both, greedy=bool(config.eval.greedy))
        self.router_replay = str(rl.get("router_replay", "none"))
        self.is_moe = int(getattr(self.model_config, "num_experts", 0) or 0) > 0
        self.evaluator = None
        self.iterator = None
        if not abstract:
            self.iterator = data_lib.PromptIterator(
                self.make_prompt_source(), int(rl.num_prompts_per_step), int(rl.group_size),
                rows=train.process_batch_slice(self.layout["batch_size"], self.mesh), seed=int(config.seed),
                shuffle=bool(config.data.shuffle))
            self.get_host_state, self.set_host_state = self.iterator.get_state, self.iterator.set_state
            if self.has_evaluator:
                self.evaluator = Evaluator(self, self.make_eval_examples())
        if self.rollout_mesh is not None:  # the sampler's own copy of the frozen weights, once
            self._rollout_shardings()
            self.rollout_frozen = jax.device_put(self.frozen, self.rollout_shardings["frozen"])
        self._set_programs(self.build_programs())
        self.base_key = jax.random.key(int(config.seed))
        self.async_schedule = None
        if int(rl.get("max_lag", 0)) > 0 and not abstract:  # bounded-staleness async RL (recipe/schedule.py)
            from adrpo_jax.recipe.schedule import LaggedSchedule  # pylint: disable=import-outside-toplevel
            self.async_schedule = LaggedSchedule(self, int(rl.max_lag), int(config.total_steps))
            self.get_host_state = self.async_schedule.get_host_state
            self.set_host_state = self.async_schedule.set_host_state
        self._samples_path = os.path.join(self.workdir, "samples.jsonl")
        self._update_flops: float | None = None

    def prompt_encoder(self) -> PromptEncoder:
        """The prompt encoder (tokenizer + chat template); absent in the plan mode (``abstract=True``)."""
        if self.encoder is None:
            raise RuntimeError("this recipe was built without a tokenizer (abstract=True, the plan mode)")
        return self.encoder

    def train_step(self, step: int, state: Any) -> tuple[Any, dict[str, Any]]:
        """One step: the synchronous ``update(rollout(...))`` of :class:`Recipe`, or with ``rl.max_lag`` >= 1 the
        lagged schedule's step (:mod:`adrpo_jax.recipe.schedule`)."""
        if self.async_schedule is not None:
            return self.async_schedule.train_step(step, state)
        return super().train_step(step, state)

    # ---- disaggregated rollout mesh (mesh.rollout_devices) -------------------------------------------------

    def _check_rollout_mesh(self) -> None:
        """Checks a split run before the model is built (ConfigErrors naming ``mesh.rollout_devices``): the rollout
        mesh is disjoint from the training mesh, its data-parallel size divides the rollout rows, and the recipe
        samples token-id prompts (the audio recipe's embeddings are not handed over)."""
        n, rollout = int(self.config.mesh.rollout_devices), self.rollout_mesh
        assert rollout is not None  # called only for a split run
        overlap = set(rollout.devices.flat) & set(self.mesh.devices.flat)
        if overlap:
            raise train.ConfigError(f"`mesh.rollout_devices`={n}: the rollout mesh's devices "
                                    f"{sorted(d.id for d in overlap)} are also in the training mesh (a mesh was passed "
                                    "in that holds them); build the training mesh from the other devices.",
                                    key="mesh.rollout_devices", value=n)
        b, dp = self.layout["batch_size"], train.data_parallel_size(rollout)
        if b % dp:
            raise train.ConfigError(f"`mesh.rollout_devices`={n}: the rollout batch of {b} rows "
                                    f"(rl.num_prompts_per_step * rl.group_size) must be divisible by the rollout "
                                    f"mesh's data-parallel size {dp} (mesh.rollout_devices / mesh.rollout_tensor).",
                                    key="mesh.rollout_devices", value=n)
        if type(self).make_generate is not RLTrainer.make_generate or \
                type(self).prompt_inputs is not RLTrainer.prompt_inputs:
            raise train.ConfigError(f"`mesh.rollout_devices`={n} is not available for the {self.name!r} recipe (its "
                                    "prompts are not token ids only); use 0.", key="mesh.rollout_devices", value=n)

    def _rollout_shardings(self) -> None:
        """``rollout_shardings`` (``params`` / ``frozen`` on the rollout mesh, from the parameters' logical axis
        names) and ``rollout_param_bytes`` (the bytes one weight sync writes onto the rollout devices: every
        device's shard, replicas counted)."""
        rollout, trainable = self.rollout_mesh, self.policy.trainable

        def parts():
            _, params, frozen = nnx.split(self._new_model(), trainable, ...)
            return {"params": params, "frozen": frozen}

        abstract = train.plan_sharded(parts, rollout)
        self.rollout_shardings = train.shardings_of(abstract)
        self.rollout_param_bytes = sum(
            int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize * len(x.sharding.device_set)
            for x in jax.tree.leaves(abstract["params"]))

    def sync_weights(self, params: Any) -> tuple[Any, float]:
        """The weight handover of a split run: ``params`` (on the training mesh) resharded onto the rollout mesh by
        ``jax.device_put``; returns the copy and its time (seconds; the host waits for the copy: the sampler
        cannot start before its weights, and the update that follows donates ``params``)."""
        t0 = time.perf_counter()
        out = jax.block_until_ready(jax.device_put(params, self.rollout_shardings["params"]))
        return out, time.perf_counter() - t0

    # ---- what the audio recipe overrides ------------------------------------------------------------------

    @staticmethod
    def validate(config: Any) -> None:
        config_lib.validate_llm_config(config)

    def default_trainable(self) -> Any:
        return nnx.Param

    def _setup_model(self) -> None:
        """``model_dir``, ``tokenizer``, ``model_config``, ``encoder``, ``stop_ids``, ``pad_token_id``."""
        m = self.config.model
        source: Any  # a preset's config dict or the checkpoint directory
        if str(m.path).startswith(PRESET_PREFIX):  # shapes only (plan mode; validation refuses it to train)
            self.model_dir, tokenizer_dir, source = None, None, preset(m.path)
        elif self.abstract and m.path in _BUILTIN_PRESETS:  # the plan never converts or loads a built-in's weights
            self.model_dir, tokenizer_dir, source = None, None, preset(_BUILTIN_PRESETS[m.path])
        else:
            self.model_dir, tokenizer_dir = resolve_model_path(m)
            source = self.model_dir
        self.model_config = DecoderConfig.from_hf_config(
            source, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype], **_model_overrides(m))
        self._setup_text_io(tokenizer_dir)

    def _setup_text_io(self, tokenizer_dir: Path | None) -> None:
        d = self.config.data
        if self.abstract:  # the plan: token ids only matter as shapes
            self.tokenizer = self.encoder = None
            try:
                self.stop_ids = stop_token_ids(None, self.model_config)
            except ValueError:  # no EOS in config.json: any id serves a plan
                self.stop_ids = (0,)
            self.pad_token_id = int(self.stop_ids[0])
            return
        if tokenizer_dir is None:
            raise train.ConfigError(f"`model.path`={self.config.model.path!r} names shapes only (a preset for "
                                    "--mode=plan); training needs a checkpoint directory.", key="model.path",
                                    value=self.config.model.path)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.encoder = PromptEncoder(self.tokenizer, int(self.config.sampling.max_prompt_length),
                                     chat_template=d.chat_template, system_prompt=d.system_prompt,
                                     prompt_template=d.prompt_template)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model_config)
        self.pad_token_id = self.encoder.pad_token_id

    def check_data(self) -> dict[str, Any]:
        """Checks the data files before the model is loaded (:func:`adrpo_jax.rl.data.check_data`); returns the
        loaded sources by config key (``data.path`` / ``eval.path``), reused by :meth:`make_prompt_source` and
        :meth:`make_eval_examples` instead of reading the files twice."""
        return data_lib.check_data(self.config)

    def make_prompt_source(self):
        if "data.path" in self.data_sources:
            return self.data_sources["data.path"]
        return data_lib.make_prompt_source(self.config)

    def make_eval_examples(self) -> list[dict[str, Any]]:
        if "eval.path" in self.data_sources:
            source = self.data_sources["eval.path"]
            return [source[i] for i in range(min(int(self.config.eval.num_examples), len(source)))]
        return data_lib.make_eval_examples(self.config)

    def _lora_rngs(self) -> nnx.Rngs:
        # The adapters' initial A: a function of the seed only (identical on every process).
        return nnx.Rngs(params=jax.random.fold_in(jax.random.key(int(self.config.seed)), 0x10A))

    def _new_model(self) -> CausalLM:
        """A freshly initialized policy (with adapters under LoRA); only ever built abstractly / under jit."""
        model = CausalLM(self.model_config, rngs=nnx.Rngs(0))
        if self.lora_cfg is not None:
            apply_lora(model, self.lora_cfg, rngs=self._lora_rngs())
        return model

    def _load_pretrained(self) -> CausalLM:
        """The pretrained model, sharded (without adapters: with LoRA only its frozen base is used)."""
        m = self.config.model
        if self.model_dir is None:
            raise train.ConfigError(f"`model.path`={m.path!r} names shapes only (a preset for --mode=plan); loading "
                                    "weights needs a checkpoint directory.", key="model.path", value=m.path)
        return load_pretrained(self.model_dir, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype],
                               remat=m.remat, remat_policy=m.remat_policy or None,
                               config_overrides=_engine_overrides(m), shardings=lambda names, shape: NamedSharding(
                                   self.mesh, train.logical_to_partition_spec(names, shape, self.mesh)))

    def make_generate(self, sampling: SamplingConfig, mesh: Mesh | None = None):
        """``fn(params, frozen, tokens [B, P], mask [B, P], key, *model_inputs) -> GenerationOutput`` (traced on
        ``mesh``, default the training mesh)."""
        gen = make_generate_fn(self.graphdef, sampling, mesh or self.mesh)  # rows stay batch-sharded in the model
        return lambda params, frozen, t, m, k: gen(nnx.merge_state(params, frozen), t, m, k)

    def _rollout_engine(self) -> tuple[str, int]:
        """``(engine, slots)`` of the rollout sampler (``sampling.engine`` / ``sampling.decode_slots``,
        :func:`adrpo_jax.rl.config.rollout_engine`); a recipe with its own ``make_generate`` (multimodal prompts)
        samples with the static engine."""
        mesh = self.sampler_mesh
        engine, slots = config_lib.rollout_engine(self.config, self.layout["batch_size"],
                                                  train.data_parallel_size(mesh),
                                                  platform=getattr(mesh.devices.flat[0], "platform", "cpu"))
        if engine == "continuous" and type(self).make_generate is not RLTrainer.make_generate:
            if str(self.config.sampling.get("engine", "static")) == "continuous":
                raise train.ConfigError(f"`sampling.engine`='continuous' is not available for the {self.name!r} "
                                        "recipe (its prompts are not token ids only); use 'static' or 'auto'.",
                                        key="sampling.engine", value="continuous")
            engine = "static"
        return engine, slots

    def make_rollout_generate(self):
        """The rollout's sampler ``fn(params, frozen, tokens [B, P], mask [B, P], key, *model_inputs) ->
        GenerationOutput``: the static one, or the continuous engine
        (:mod:`adrpo_jax.models.llm.continuous`: ``self.decode_slots`` slots refilled as rows stop, shared-prompt
        prefill, row r drawn with ``fold_in(key, r)``)."""
        if self.engine != "continuous":
            return self.make_generate(self.sampling, self.rollout_mesh)
        gen = make_continuous_generate_fn(self.graphdef, self.sampling, self.decode_slots, self.sampler_mesh)
        return lambda params, frozen, t, m, k: gen(nnx.merge_state(params, frozen), t, m, k)

    def prompt_inputs(self, rows, state, group: int, mesh: Mesh | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any] | None, list[str], list[str]]:
        """The prompt front end: ``(global {tokens, mask, truncated}, model_inputs or None, prompts for the reward
        functions, prompts for the samples log)``; the arrays on ``mesh`` (default the training mesh)."""
        del state, group
        prompts = [r["prompt"] for r in rows]
        tokens, pmask, ptrunc = self.prompt_encoder().encode(prompts)
        g = train.host_local_to_global({"tokens": tokens, "mask": pmask, "truncated": ptrunc}, mesh or self.mesh)
        return g, None, prompts, prompts

    def generate_extra(self, model_inputs: dict[str, Any] | None) -> tuple:
        """The generate programs' arguments after the key (audio: the embeddings)."""
        return ()

    def _shared_prompt_group(self) -> int:
        """G when each device's rows hold whole groups of G rows of one prompt (rows r // G of a prompt): the
        sampler then prefills each prompt once for its G rows, shard-locally; else 1 (every row prefills)."""
        g = int(self.opts.group_size)
        return g if (self.layout["batch_size"] // train.data_parallel_size(self.sampler_mesh)) % g == 0 else 1

    # ---- programs -------------------------------------------------------------------------------------------

    def _prompt_structs(self, batch: int, mesh: Mesh | None = None) -> tuple:
        bs = train.batch_sharding(mesh or self.mesh)
        p = int(self.config.sampling.max_prompt_length)
        return (jax.ShapeDtypeStruct((batch, p), jnp.int32, sharding=bs),
                jax.ShapeDtypeStruct((batch, p), jnp.bool_, sharding=bs))

    def _model_input_structs(self, batch: int) -> tuple:
        """The abstract ``generate_extra`` of a ``batch``-row prompt batch (audio: embeddings)."""
        return ()

    def _generate_args(self, batch: int, rollout_side: bool = False) -> tuple:
        """The abstract arguments of a generate program; ``rollout_side``: the rollout mesh's (split runs)."""
        if rollout_side and self.rollout_mesh is not None:
            sh = self.rollout_shardings
            return (abstract_like(self.abstract_state["params"], sh["params"]),
                    abstract_like(self.policy.abstract_frozen, sh["frozen"]),
                    *self._prompt_structs(batch, self.rollout_mesh), key_struct())
        return (self.abstract_state["params"], self.policy.abstract_frozen, *self._prompt_structs(batch),
                key_struct(), *self._model_input_structs(batch))

    def rollout_batch_struct(self) -> dict[str, Any]:
        """The abstract rollout batch of one step (what ``update`` consumes), from the sampler's output shapes."""
        bs = train.batch_sharding(self.mesh)
        b = self.layout["batch_size"]
        out = self._rollout_out_struct()
        f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bs)  # noqa: E731
        batch = {"tokens": out.tokens, "attention_mask": out.attention_mask, "completion_mask": out.completion_mask,
                 "lengths": out.lengths, "done": out.done,
                 "prompt_truncated": jax.ShapeDtypeStruct((b,), jnp.bool_)}
        o, n = self.opts, out.completion_mask.shape[1]
        for key, used in (("old_logp", o.use_old_logprobs), ("behaviour_logp", o.use_behaviour_logprobs),
                          ("ref_logp", o.use_reference)):
            if used:
                batch[key] = f32(b, n)
        batch.update(rewards=f32(b), reward_valid=jax.ShapeDtypeStruct((b,), jnp.bool_),
                     reward_components=f32(b, len(self.rewards.names)))
        extra = self._model_input_structs(b)
        if extra:
            batch["model_inputs"] = dict(zip(self.model_input_names, extra))
        inputs = training_model_inputs(out, batch.get("model_inputs"), self.router_replay)
        if inputs is not None:  # + the sampler's routing record (rl.router_replay='rollout', MoE)
            batch["model_inputs"] = inputs
        return abstract_like(batch, bs)

    def _rollout_out_struct(self) -> Any:
        """The abstract sampler output (``GenerationOutput``) of one rollout batch."""
        return jax.eval_shape(self.programs["generate"].fn,
                              *self._generate_args(self.layout["batch_size"], rollout_side=True))

    model_input_names: tuple[str, ...] = ()

    def build_programs(self) -> list[Program]:
        opts, mesh = self.opts, self.mesh
        bs, repl = train.batch_sharding(mesh), train.replicated_sharding(mesh)
        sh = self.state_shardings
        b = self.layout["batch_size"]
        frozen = lambda: self.policy.abstract_frozen  # noqa: E731
        params = lambda: self.abstract_state["params"]  # noqa: E731
        # The static sampler's loop is planned as its prefill and decode steps (a compiler counts a loop body once)
        plan_generate = ("plan/prefill", "plan/decode") if self.abstract and self.engine == "static" else ()

        def logprob_args():
            batch = self.rollout_batch_struct()
            extra = (batch["model_inputs"],) if "model_inputs" in batch else ()
            return (params(), frozen(), batch["tokens"], batch["attention_mask"], *extra)

        programs = [
            Program("generate", self.make_rollout_generate(), args=lambda: self._generate_args(b, rollout_side=True),
                    out_shardings=train.batch_sharding(self.sampler_mesh), phase="rollout",
                    shrink_key="sampling.decode_slots" if self.engine == "continuous" else "rl.num_prompts_per_step",
                    planned_by=plan_generate),
            Program("logprobs", make_logprob_fn(self.graphdef, opts, mesh), args=logprob_args,
                    out_shardings=(bs, bs), phase="rollout", shrink_key="model.logprob_chunk_size",
                    per_step=float(opts.use_old_logprobs) + float(opts.use_reference)),
            Program("update", make_rl_update(self.graphdef, self.tx, opts, mesh),
                    args=lambda: (params(), self.abstract_state["opt_state"], frozen(), self.rollout_batch_struct(),
                                  key_struct()),
                    out_shardings=(sh["params"], sh["opt_state"], repl), donate_argnums=(0, 1),
                    shrink_key="optim.grad_accum_steps"),
        ]
        if plan_generate:  # the sampler's prefill and one decode step, planned on their own (the loop: N steps)
            programs += self._plan_programs()
        if self.is_moe:  # routing statistics of the training pass's router vs the rollout's record (moe/*)
            def moe_args():
                batch = self.rollout_batch_struct()
                return (params(), frozen(), batch["tokens"], batch["attention_mask"],
                        abstract_like(self._rollout_out_struct().expert_indices, bs))
            programs.append(Program("moe/metrics", make_routing_metrics_fn(self.graphdef, mesh), args=moe_args,
                                    out_shardings=repl, phase="rollout"))
        if self.policy.lora_reference:  # the reference: adapters off (another graph, another program)
            programs.append(Program("ref_logprobs", make_logprob_fn(self.ref_graphdef, opts, mesh), args=logprob_args,
                                    out_shardings=(bs, bs), phase="rollout", shrink_key="model.logprob_chunk_size",
                                    planned_by=("logprobs",)))  # the policy pass's shapes, adapters off
        if self.has_evaluator:
            chunk, n = self._eval_layout()
            programs += [
                Program("eval/generate", self.make_generate(self.eval_sampling),
                        args=lambda: self._generate_args(chunk), out_shardings=bs, phase="eval",
                        shrink_key="eval.batch_size", per_step=n // chunk,
                        planned_by=plan_generate if chunk <= b else ()),  # no larger than the rollout's
                Program("eval/mean", lambda x, v: jnp.sum(x * v) / jnp.maximum(jnp.sum(v), 1.0),
                        args=lambda: (jax.ShapeDtypeStruct((n,), jnp.float32, sharding=bs),) * 2,
                        out_shardings=repl, phase="eval")]
        return programs

    def _eval_layout(self) -> tuple[int, int]:
        """``(chunk, padded)`` of the evaluator (:func:`eval_layout`), also when none is built (the plan mode)."""
        if self.evaluator is not None:
            return self.evaluator.chunk, self.evaluator.n_pad
        return eval_layout(int(self.config.eval.num_examples), int(self.config.eval.batch_size),
                           train.data_parallel_size(self.mesh))

    def _plan_fns(self) -> tuple[Any, Any, Any, tuple[int, ...]]:
        """``(prefill, decode, state, donate)``: the sampler's phases ``prefill(*state(), tokens, mask,
        *model_inputs) -> (_, cache)`` and ``decode(*state(), token, done, cache, key)``, and decode's donated
        arguments (text: the cache, which the sampler's loop updates in place; undonated, the plan counted it
        twice)."""
        prefill, decode = make_plan_fns(self.graphdef, self.sampling, self.mesh)
        return prefill, decode, lambda: (nnx.merge_state(self.abstract_state["params"],
                                                         self.policy.abstract_frozen),), (3,)

    def _plan_programs(self) -> list[Program]:
        """``plan/prefill`` and ``plan/decode`` (x ``max_new_tokens - 1``, :meth:`_plan_fns`): the generate
        program's two phases, so the plan's cost counts every decode step (a compiler counts a while loop's body
        once)."""
        bs = train.batch_sharding(self.mesh)
        prefill, decode, state, donate = self._plan_fns()
        b = self.layout["batch_size"]
        pre_args = lambda: (*state(), *self._prompt_structs(b), *self._model_input_structs(b))  # noqa: E731

        def decode_args():
            _, cache = jax.eval_shape(prefill, *pre_args())
            return (*state(), jax.ShapeDtypeStruct((b,), jnp.int32, sharding=bs),
                    jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=bs), _cache_structs(cache, self.mesh),
                    key_struct())

        n = int(self.config.sampling.max_new_tokens)
        return [Program("plan/prefill", prefill, args=pre_args, phase="rollout", shrink_key="rl.num_prompts_per_step"),
                Program("plan/decode", decode, args=decode_args, phase="rollout", per_step=max(n - 1, 0),
                        donate_argnums=donate, shrink_key="rl.num_prompts_per_step")]

    # ---- host phases ----------------------------------------------------------------------------------------

    def rollout(self, step: int, state) -> tuple[dict[str, Any], dict[str, Any]]:
        """Generates, scores and assembles the rollout batch of ``step`` (global arrays) and host info
        (``host["times"]``: the phase times of the module docstring, seconds): :meth:`rollout_finish` of
        :meth:`rollout_start`."""
        return self.rollout_finish(self.rollout_start(step, state))

    def rollout_start(self, step: int, state, *, params: Any = None, logprob_passes: bool = True) -> dict[str, Any]:
        """The dispatched part of the rollout of ``step``: this step's prompts drawn and encoded, the sampler (with
        ``params``, default ``state["params"]``) and, with ``logprob_passes``, the old-policy / reference log-prob
        passes queued on the device (asynchronous); the handle :meth:`rollout_finish` completes."""
        opts, fns = self.opts, self.fns
        t_start = time.perf_counter()
        if self.iterator is None:
            raise RuntimeError("rollout_start: this recipe was built without data (abstract=True, the plan mode)")
        rows = self.iterator.next_rows()
        # mesh.rollout_devices (split): prompts and weights to the rollout mesh, its sampler, outputs back
        split = self.rollout_mesh is not None
        g, model_inputs, prompts, shown = self.prompt_inputs(rows, state, int(opts.group_size), mesh=self.rollout_mesh)
        key = jax.random.fold_in(self.base_key, step)
        sample_key, update_key = jax.random.split(key)
        sync: dict[str, float] = {}
        behaviour = state["params"] if params is None else params
        if split:
            sampler_params, sync_s = self.sync_weights(behaviour)
            sync = {"sync_s": sync_s, "sync_bytes": float(self.rollout_param_bytes)}
            out_rollout = fns["generate"](sampler_params, self.rollout_frozen, g["tokens"], g["mask"], sample_key)
            out = jax.device_put(out_rollout, train.batch_sharding(self.mesh))  # dispatched: waits for the sampler
            g = dict(g, truncated=jax.device_put(g["truncated"], train.batch_sharding(self.mesh)))
        else:
            out_rollout = out = fns["generate"](behaviour, self.frozen, g["tokens"], g["mask"], sample_key,
                                                *self.generate_extra(model_inputs))
        # rl.router_replay='rollout' (MoE policies): the training passes route with the sampler's recorded experts
        model_inputs = training_model_inputs(out, model_inputs, self.router_replay)
        moe = None
        if self.is_moe:  # routing statistics and the rollout-vs-training mismatch of this step (dispatched)
            moe = fns["moe/metrics"](behaviour, self.frozen, out.tokens, out.attention_mask, out.expert_indices)
        # Dispatch the device work that does not need the rewards first (asynchronous), then score on the host.
        batch: dict[str, Any] = {"tokens": out.tokens, "attention_mask": out.attention_mask,
                                 "completion_mask": out.completion_mask, "lengths": out.lengths, "done": out.done,
                                 "prompt_truncated": g["truncated"]}
        if model_inputs is not None:
            batch["model_inputs"] = model_inputs
        if opts.use_behaviour_logprobs or not logprob_passes:  # the sampler's own: the behaviour policy's
            batch["behaviour_logp"] = out.logprobs
        if opts.use_old_logprobs and logprob_passes:
            batch["old_logp"] = self._logprobs(state["params"], batch)
        if opts.use_reference and logprob_passes:
            batch["ref_logp"] = self._logprobs(self.policy.reference(state), batch, ref=True)
        return {"step": step, "t_start": t_start, "rows": rows, "prompts": prompts, "shown": shown,
                "update_key": update_key, "out": out, "out_rollout": out_rollout, "batch": batch, "moe": moe,
                "ready_probe": out_rollout.lengths, **sync}

    def rollout_finish(self, handle: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The host part of a rollout (:meth:`rollout_start`'s handle): waits for the completions, decodes and
        scores them, and assembles the batch the update consumes."""
        mesh = self.mesh
        blocking = self.phase_timing()
        step, t_start, rows, prompts, shown = (handle[k] for k in ("step", "t_start", "rows", "prompts", "shown"))
        update_key, batch = handle["update_key"], handle["batch"]
        out = handle.get("out_rollout", handle["out"])  # the sampler's own outputs (on the rollout mesh if split)
        t_wait = time.perf_counter()
        local = train.global_to_host_local({"completions": out.completions, "lengths": out.lengths})
        t_generated = t_sampled = time.perf_counter()  # the host waited for the sampler here anyway
        transfer_s = None
        if handle["out"] is not out:  # split: the outputs' copy onto the training mesh (its part not yet done)
            jax.block_until_ready(handle["out"])
            transfer_s = time.perf_counter() - t_generated
            t_generated = time.perf_counter()
        logprob_outputs = [batch[k] for k in ("old_logp", "ref_logp") if k in batch]
        if blocking:  # logging.phase_timing: the log-prob passes alone (no overlap with the reward functions)
            jax.block_until_ready(logprob_outputs)
        t_reward = time.perf_counter()
        texts = self.prompt_encoder().decode(local["completions"], local["lengths"])
        columns = data_lib.columns_of(rows)
        columns["completion_ids"] = [row[:n].tolist() for row, n in zip(local["completions"], local["lengths"])]
        scored = self.rewards(prompts, texts, **columns)
        self.check_rewards(scored, step + 1)
        t_scored = time.perf_counter()
        if not blocking:  # the part of the log-prob passes not hidden behind the reward functions; the update
            jax.block_until_ready(logprob_outputs)  # waits for them on the device anyway
        t_logprobs = time.perf_counter()
        batch.update(train.host_local_to_global({"rewards": scored.rewards, "reward_valid": scored.valid,
                                                 "reward_components": scored.per_function}, mesh))
        times = {"time/rollout": t_generated - t_start, "time/reward": t_scored - t_reward,
                 "time/logprobs": (t_reward - t_generated) if blocking else (t_logprobs - t_scored)}
        if transfer_s is not None:
            times["time/rollout_transfer"] = transfer_s
        host = {"prompts": shown, "completions": texts, "rewards": scored.rewards, "key": update_key,
                "num_errors": scored.num_errors, "times": times, "wait_s": t_sampled - t_wait,
                "decode_steps": int(np.max(local["lengths"], initial=0)), "moe": handle.get("moe")}
        return batch, host

    rollout_batch = rollout

    def copy_params(self, params: Any) -> Any:
        """A device copy of a trainable-parameter tree (the behaviour policy kept while the update donates)."""
        return self.fns["policy/copy"](params)

    def lagged_logprobs(self, state, batch: dict[str, Any]) -> dict[str, Any]:
        """A stale rollout's log-prob passes under ``state`` (the policy the update starts from): with an importance
        correction the proximal ``old_logp`` (a pass with ``state["params"]``; ``behaviour_logp`` stays the
        sampler's), else ``old_logp`` = the behaviour log-probs (PPO's ratio against the sampling policy); the
        reference pass with the current reference (:mod:`adrpo_jax.recipe.schedule`)."""
        opts = self.opts
        batch = dict(batch)
        behaviour = batch.pop("behaviour_logp")
        if opts.use_behaviour_logprobs:
            batch["behaviour_logp"] = behaviour
            batch["old_logp"] = self._logprobs(state["params"], batch)
        elif opts.use_old_logprobs:
            batch["old_logp"] = behaviour
        if opts.use_reference:
            batch["ref_logp"] = self._logprobs(self.policy.reference(state), batch, ref=True)
        return batch

    def _logprobs(self, params: Any, batch: dict[str, Any], *, ref: bool = False) -> Any:
        """The completion log-probs ``[B, N]`` of ``batch``'s tokens (and ``model_inputs``) under ``params``
        (dispatched): the policy's pass, or with ``ref`` the reference's (``ref_logprobs``: adapters off under LoRA)."""
        fn = self.fns["ref_logprobs"] if ref and self.policy.lora_reference else self.fns["logprobs"]
        extra = (batch["model_inputs"],) if "model_inputs" in batch else ()
        return fn(params, self.frozen, batch["tokens"], batch["attention_mask"], *extra)[0]

    def check_rewards(self, scored: Any, step: int) -> None:
        """Stops (``rewards.stop_when_all_missing``, else logs an error) when every sample of the step misses its
        reward: the check of one process's :class:`~adrpo_jax.rl.rewards.RewardOutput`, or with several processes
        of the missing and sample counts summed over all of them (each process scores its own rows)."""
        if jax.process_count() == 1:
            self.rewards.check(scored, step=step)
            return
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        counts = np.asarray([scored.num_missing, len(scored.valid)], np.int64)
        total = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(axis=0)
        check_rewards_present(int(total[0]), int(total[1]), self.rewards.names,
                              stop=self.rewards.stop_when_all_missing, step=step)

    def update(self, step: int, state, rollout) -> tuple[dict[str, Any], dict[str, Any]]:
        batch, host = rollout
        t_update = time.perf_counter()
        if self._update_flops is None:  # the update's matmul FLOPs (every scanned layer / micro-batch), once
            self._update_flops = matmul_flops(jax.make_jaxpr(self.programs["update"].fn)(
                state["params"], state["opt_state"], self.frozen, batch, host["key"]), count_loops=True)
            t_update = time.perf_counter()
        params, opt_state, metrics = self.fns["update"](state["params"], state["opt_state"], self.frozen, batch,
                                                        host["key"])
        # The loop reads the update's `skipped` flag after every step: the host waits for the update anyway.
        metrics = jax.block_until_ready(metrics)
        new_state = dict(state, params=params, opt_state=opt_state)
        metrics = dict(metrics)
        metrics.update(host["times"], **{"time/update": time.perf_counter() - t_update})
        metrics.update(self._perf_metrics(state, host, metrics["time/update"]))
        if host.get("moe") is not None:
            metrics.update(host["moe"])
        errors = np.asarray([host["num_errors"]], np.float32)  # this process's rows; sum over processes, as
        if jax.process_count() > 1:  # num_missing_rewards (computed from the global batch) is
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
            errors = multihost_utils.process_allgather(errors, tiled=True)
        metrics["reward_errors"] = float(np.sum(errors))
        if self.policy.ref_in_state:
            synced = (step + 1) % int(self.config.rl.ref_sync_steps) == 0
            if synced:
                new_state["ref_params"] = self.policy.refresh(state["ref_params"], params)
                log.info("step %d: reference refreshed (alpha=%g)", step + 1, self.config.rl.ref_mixup_alpha)
            metrics["ref_synced"] = float(synced)
        if (step + 1) % int(self.config.log_every) == 0 and jax.process_index() == 0:
            self._write_samples(step + 1, host)
        return new_state, metrics

    def _perf_metrics(self, state, host: dict[str, Any], update_s: float) -> dict[str, float]:
        """``perf/update_mfu``: the update's matmul FLOPs over its time and the chips' peak; ``perf/rollout_mbu``:
        the bytes a decode step cannot avoid reading (the weights once, the KV cache written so far), times the
        decode steps, over the rollout's time and the chips' bandwidth (:mod:`adrpo_jax.train.perf`)."""
        chip, n = perf.mesh_chips(self.mesh)
        out = {"perf/update_mfu": perf.utilization(self._update_flops or 0.0, 0.0, update_s, chip, n)["mfu"]}
        steps = int(host.get("decode_steps", 0))
        if steps > 0:
            weights = self.mesh.size * (perf.per_device_bytes(state["params"]) + perf.per_device_bytes(self.frozen))
            c = self.model_config
            slots = int(self.config.sampling.max_prompt_length) + steps / 2.0  # the cache filled on average
            head_dim = int(c.head_dim or c.hidden_size // c.num_attention_heads)
            kv_heads = int(c.num_key_value_heads or c.num_attention_heads)
            kv = 2 * c.num_hidden_layers * self.layout["batch_size"] * slots * kv_heads * head_dim * \
                np.dtype(self.sampling.cache_dtype or c.dtype).itemsize
            out["perf/rollout_mbu"] = perf.utilization(0.0, steps * (weights + kv), host["times"]["time/rollout"],
                                                       chip, n)["mbu"]
        return out

    def _write_samples(self, step: int, host: dict[str, Any], k: int = 4) -> None:
        try:
            with open(self._samples_path, "a", encoding="utf-8") as f:
                for p, c, r in list(zip(host["prompts"], host["completions"], host["rewards"].tolist()))[:k]:
                    f.write(json.dumps({"step": step, "prompt": p, "completion": c,
                                        "reward": None if r != r else r}) + "\n")
        except OSError as err:  # logging must never kill a run
            log.warning("could not write %s: %s", self._samples_path, err)

    def evaluate(self, step: int, state) -> dict[str, Any]:
        del step
        return self.evaluator(state) if self.evaluator is not None else {}

    def export(self, params, path: str | os.PathLike) -> Path:
        """Writes ``params`` (the policy) as a Hugging Face directory with the tokenizer (process 0 writes); with
        LoRA, the merged model ``W + s A B`` (a plain checkpoint that ``transformers`` loads)."""
        from adrpo_jax.models.llm import save_pretrained  # pylint: disable=import-outside-toplevel
        model = self.policy.merged(params)
        if not isinstance(model, CausalLM):
            raise TypeError(f"export: the merged policy is a {type(model).__name__}, not a CausalLM")
        path = save_pretrained(model, path, tokenizer=self.tokenizer)
        log.info("Saved the trained policy to %s", path)
        return Path(path)

    def load_final(self, path: Path) -> Any:
        m = self.config.model
        model = load_pretrained(path, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype])
        return jax.device_put(nnx.state(model, self.trainable), self.state_shardings["params"])


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) GRPO / ADRPO training of ``config`` in ``workdir``; returns :meth:`Recipe.run`'s dict."""
    return RLTrainer(config, workdir).run()
