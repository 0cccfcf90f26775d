r"""The ADRPO-W2 online fine-tuning trainer for flow-matching models: ``train_and_evaluate(config, workdir)``
(registry name ``'flow'``).

    python launch.py --config=configs/flow_digits.py:cpu --workdir=/tmp/flow_adrpo [--config.total_steps=200]

Start-up: the config is validated (:mod:`adrpo_jax.flow.config`), the pre-trained DiT and the reward classifier
are loaded from ``model.path`` / ``classifier.path`` or pre-trained once and cached under ``$ADRPO_JAX_CACHE``
(:mod:`adrpo_jax.flow.pretrain`; the first run of a config pre-trains, later runs reuse), and the reward model
of ``reward.*`` is built on the classifier.

One RL step (``total_steps`` counts them; :func:`adrpo_jax.flow.step.make_train_step`, one jitted, donated
program): ``rl.prompts_per_step`` prompt ids drawn from ``(seed, step)`` (:func:`step_prompts`) x
``rl.samples_per_prompt`` images sampled from the current policy (or a sampling copy refreshed every
``rl.sampler_refresh_steps``), rewards, per-prompt advantages, ``rl.num_inner_updates`` optimizer updates of
the ``rl.method`` loss (each with fresh ``(t, x0)``; the loss runs in ``shard_map`` over the batch axes), and
the optional reference refresh (``rl.ref_refresh_steps``; logged when it happens).

State: ``{"params", "opt_state"}`` (+ ``"ref_params"`` when the reference is refreshed, + ``"sampler_params"``
with a sampling copy), born sharded over the ``('data', 'fsdp', 'tensor')`` mesh from the DiT's logical axis
names; the frozen reference (the pre-trained weights, a separate parameter tree sharded like the policy) is
loaded at start and never checkpointed. Every random draw derives from ``fold_in(key(seed), step)`` and the
prompts from ``(seed, step)``, so there is no host state and a resumed run (after SIGTERM or SIGKILL) is
bit-identical to an uninterrupted one. Checkpoints, logging, preemption and the non-finite-update skip limit
come from :func:`adrpo_jax.train.run_training`.

Metrics (``workdir/metrics.jsonl``, one line per ``log_every`` steps, means over the interval):
``reward_mean/std/min/max``, ``reward/<component>_mean`` (e.g. ``digit_correct``, ``thickness_correct``),
``advantage_mean/std/min/max``, ``loss``, ``cfm_term``, ``w2_term``, ``w2_mean`` (the W2 velocity bound to the
reference on the training batch), ``cfm_error_mean``, ``beta_eff_mean/min/max``, ``adv_clip_fraction``,
``zero_std_prompt_fraction``, ``num_nonfinite_rewards``, ``sample_diversity``, ``grad_norm``, ``update_norm``,
``skipped_updates``, ``ref_refreshed``, ``images_per_sec``, ``step_time_s``, ``learning_rate``; every
``eval_every`` steps (and at step 0 of a fresh run) on a fixed eval batch (every prompt x
``eval.samples_per_prompt``, fixed noise): ``eval/reward_mean``, ``eval/diversity`` (mean per-prompt pairwise
L2), ``eval/batch_diversity``, ``eval/digit_accuracy``, ``eval/thickness_accuracy``, ``eval/digit_entropy``,
``eval/thickness_entropy`` (per-prompt entropy of the classifier's predicted attribute),
``eval/frechet_distance`` (classifier features vs the pre-trained model's samples of the same prompts and
noise), ``eval/frechet_distance_data`` (vs the test split), ``eval/w2_bound`` (the W2 velocity bound to the
pre-trained model on the policy's eval samples). Images: ``workdir/samples_before.png`` at the start and
``workdir/samples_before_after.png`` (pre-trained vs fine-tuned, one row per prompt) at the end; with
``model.save_final`` the fine-tuned DiT goes to ``workdir/final_model`` (``load_dit``).

Where a step's time goes: the step is one fused XLA program (sampling, reward and update overlap nothing on
the host), so by default only ``step_time_s`` / ``images_per_sec`` (and ``time/eval``, ``time/checkpoint``)
are logged. ``logging.phase_timing=True`` runs it as three jitted programs with the same keys, the host
waiting for each: ``time/sample``, ``time/reward``, ``time/update`` (the same math, another compilation:
equal to the fused step up to float32 rounding).

LoRA (``lora.enabled``, :mod:`adrpo_jax.models.lora`): adapters on the DiT sites of ``lora.target_modules``; the
state (optimizer state and checkpoints included) holds the adapters only, the pre-trained weights are the
frozen part (``frozen``, reloaded at start, never checkpointed), the reference of the W2 term is the same model
with its adapters off (``ref_graphdef``; no second copy of the weights; with ``rl.ref_refresh_steps`` base + a
refreshed copy of the adapters), and ``model.save_final`` writes the merged DiT (``merge_lora``: ``W + s A B``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax import train
from adrpo_jax.flow import config as config_lib
from adrpo_jax.flow.data import describe_condition, load_digits_splits, prompt_conditions
from adrpo_jax.flow.metrics import evaluate_samples, frechet_distance_from_features, velocity_w2_bound
from adrpo_jax.flow.rewards import ClassifierReward, CombinedReward, ImageStatReward
from adrpo_jax.flow.sampling import sample, sample_noise
from adrpo_jax.flow.step import FlowStepOptions, make_train_step
from adrpo_jax.models.classifier import DigitClassifier, load_classifier
from adrpo_jax.models.dit import DiT, load_dit
from adrpo_jax.models.lora import apply_lora, merge_lora, set_lora_enabled

__all__ = ["train_and_evaluate", "FlowTrainer", "FlowEvaluator", "step_prompts", "build_reward_model",
           "load_models", "model_load_overrides"]

log = logging.getLogger(__name__)

BEFORE_GRID = "samples_before.png"
BEFORE_AFTER_GRID = "samples_before_after.png"
FINAL_MODEL = "final_model"


def step_prompts(seed: int, step: int, prompts_per_step: int, samples_per_prompt: int,
                 num_conditions: int) -> np.ndarray:
    """The ``[K * G]`` prompt ids of RL step ``step`` (prompt-major: each id repeated G times).

    A deterministic function of ``(seed, step)``: the K ids are the first K of seeded permutations of all
    ``num_conditions`` ids (concatenated when K > num_conditions, so every prompt appears ``K // n`` or
    ``K // n + 1`` times).

    >>> step_prompts(0, 3, 4, 2, 10).shape
    (8,)
    >>> sorted(set(step_prompts(0, 3, 10, 1, 10).tolist())) == list(range(10))
    True
    """
    rng = np.random.default_rng([int(seed), int(step), 0x5EED])
    reps = -(-int(prompts_per_step) // int(num_conditions))
    ids = np.concatenate([rng.permutation(num_conditions) for _ in range(reps)])[:prompts_per_step]
    return np.repeat(ids.astype(np.int32), samples_per_prompt)


def build_reward_model(config: Any, classifier: DigitClassifier | None) -> Callable:
    """The reward model of ``config.reward`` (see :mod:`adrpo_jax.flow.config`) on ``classifier``."""
    r = config.reward
    parts = {}
    if r.kind in ("classifier", "combined"):
        if classifier is None:
            raise ValueError(f"reward.kind={r.kind!r} needs a classifier")
        parts["classifier"] = ClassifierReward(classifier, config.data.condition_mode,
                                               thickness_weight=float(r.thickness_weight), kind=r.classifier_output)
    if r.kind in ("image_stat", "combined"):
        target = None if math.isinf(float(r.image_stat_target)) else float(r.image_stat_target)
        parts["image_stat"] = ImageStatReward(r.image_stat, target=target, scale=float(r.image_stat_scale))
    if r.kind == "combined":
        return CombinedReward(parts, weights={"classifier": 1.0, "image_stat": float(r.image_stat_weight)})
    return next(iter(parts.values()))


def model_load_overrides(config: Any) -> dict[str, Any]:
    """``model.dtype``, ``model.param_dtype``, ``model.remat``, ``model.scan_layers``: the settings of the config
    that a loaded DiT (``model.path`` or the pre-training cache) takes instead of its saved ones."""
    return {"dtype": str(config.model.dtype), "param_dtype": str(config.model.param_dtype),
            "remat": bool(config.model.remat), "scan_layers": bool(config.model.scan_layers)}


def load_models(config: Any) -> tuple[DiT, DigitClassifier]:
    """The pre-trained DiT and the classifier of ``config`` (loaded from ``model.path`` / ``classifier.path``,
    or pre-trained / trained once and cached, see :mod:`adrpo_jax.flow.pretrain`)."""
    from adrpo_jax.flow import pretrain  # pylint: disable=import-outside-toplevel

    pre_cfg = config_lib.pretrain_config(config)
    log_fn = lambda msg: log.info("%s", msg)  # noqa: E731
    if config.model.path:
        # The architecture is the saved model's; how it computes (dtype, remat) and stores (param_dtype) is the
        # config's, as for a pre-trained model.
        model = load_dit(os.path.expanduser(config.model.path), **model_load_overrides(config))
        log.info("Loaded the flow model from %s (dtype %s, param_dtype %s, remat %s)", config.model.path,
                 model.config.dtype, model.config.param_dtype, model.config.remat)
    else:
        model, info = pretrain.pretrain_flow_model(pre_cfg, log_fn=log_fn)
        log.info("Pre-trained flow model: %s (test CFM loss %.4f%s)", info.get("directory"),
                 info.get("test_cfm_loss", float("nan")), ", cached" if info.get("cached") else "")
    if config.classifier.path:
        classifier = load_classifier(os.path.expanduser(config.classifier.path))
    else:
        classifier, info = pretrain.train_classifier(pre_cfg, log_fn=log_fn)
        log.info("Reward classifier: %s (test digit accuracy %.4f%s)", info.get("directory"),
                 info.get("test_digit_accuracy", float("nan")), ", cached" if info.get("cached") else "")
    return model, classifier


def _check_model(model: DiT, config: Any, num_conditions: int) -> None:
    cfg = model.config
    if cfg.cond_dim is not None:
        raise train.ConfigError("`model.path`: the flow trainer conditions on class ids; the loaded DiT has "
                                f"cond_dim={cfg.cond_dim}.", key="model.path")
    if cfg.num_classes != num_conditions:
        raise train.ConfigError(f"`model.path`: the DiT has num_classes={cfg.num_classes} but "
                                f"data.condition_mode={config.data.condition_mode!r} has {num_conditions} prompts.",
                                key="model.path")
    if cfg.image_size != config.data.image_size:
        raise train.ConfigError(f"`model.path`: the DiT has image_size={cfg.image_size} but data.image_size="
                                f"{config.data.image_size}.", key="model.path")


class FlowEvaluator:
    """Fixed-batch evaluation: every prompt x ``eval.samples_per_prompt`` images from fixed noise, scored against
    the pre-trained model's samples of the same prompts and noise (computed once).

    Every process holds the whole (small) eval batch: sampling runs batch-sharded, the samples come back
    replicated, the metrics are host computations (:func:`adrpo_jax.flow.metrics.evaluate_samples`).
    """

    def __init__(self, trainer: "FlowTrainer"):
        config, mesh, opts = trainer.config, trainer.mesh, trainer.opts
        self.trainer = trainer
        self.mode = config.data.condition_mode
        self.num_conditions = trainer.num_conditions
        self.samples_per_prompt = int(config.eval.samples_per_prompt)
        cond = prompt_conditions(self.mode, self.samples_per_prompt)
        n = cond.shape[0]
        key = jax.random.key(int(config.eval.seed))
        k_x0, self.sde_key, self.w2_key = jax.random.split(key, 3)
        x0 = np.asarray(jax.jit(lambda k: sample_noise(k, (n,) + opts.image_shape))(k_x0))
        rows = train.process_batch_slice(n, mesh)
        self.cond_host = cond
        self.x0 = train.host_local_to_global(x0[rows], mesh)
        self.cond = train.host_local_to_global(cond[rows], mesh)
        repl = train.replicated_sharding(mesh)
        graphdef, base_graphdef = trainer.graphdef, trainer.base_graphdef

        def merge(params, frozen, g=graphdef):
            return nnx.merge(g, params) if frozen is None else nnx.merge(g, params, frozen)

        def sample_fn(params, frozen, x0, cond, key, g=graphdef):
            model = merge(params, frozen, g)
            return sample(lambda x, t, c: model(x, t, c), x0, cond, num_steps=opts.sampling_steps,
                          method=opts.sampling_method, cfg_scale=opts.cfg_scale,
                          null_cond=None if opts.cfg_scale == 1.0 else opts.null_class, sde_noise=opts.sde_noise,
                          key=key if opts.sde_noise > 0 else None)

        self._sample = jax.jit(sample_fn, out_shardings=repl)
        # The pre-trained model (LoRA: the same weights with the adapters off).
        self._sample_base = self._sample if base_graphdef is graphdef else \
            jax.jit(lambda *a: sample_fn(*a, g=base_graphdef), out_shardings=repl)
        n_time = int(config.eval.w2_time_samples)

        def w2_fn(params, ref_params, frozen, x1, cond, key):
            policy, ref = merge(params, frozen), merge(ref_params, frozen, base_graphdef)
            return velocity_w2_bound(lambda x, t, c: policy(x, t, c), lambda x, t, c: ref(x, t, c), x1, cond, key,
                                     num_time_samples=n_time)

        self._w2 = jax.jit(w2_fn, out_shardings=repl)
        self.classifier = trainer.classifier
        cgraph, self._cstate = nnx.split(self.classifier)
        self._features = jax.jit(lambda s, x: nnx.merge(cgraph, s)(x, return_features=True)[1])
        self.reference_images = self.sample(trainer.ref_params, trainer.frozen, pretrained=True)
        self.reference_features = np.asarray(self._features(self._cstate, self.reference_images))
        _, test = load_digits_splits(config.data.image_size, test_fraction=config.data.test_fraction,
                                     seed=config.data.split_seed)
        self.data_features = np.asarray(self._features(self._cstate, jnp.asarray(test.images)))
        self.last_images: tuple[int, np.ndarray] | None = None

    def sample(self, params, frozen, *, pretrained: bool = False) -> np.ndarray:
        """The eval samples ``[n, H, W, C]`` (host numpy) of a parameter tree (of the policy's graph, or with
        ``pretrained`` of the pre-trained model's graph: adapters off under LoRA)."""
        fn = self._sample_base if pretrained else self._sample
        return np.asarray(jax.device_get(fn(params, frozen, self.x0, self.cond, self.sde_key)))

    def __call__(self, step: int, params, frozen) -> dict[str, float]:
        images = self.sample(params, frozen)
        self.last_images = (step, images)
        cond = jnp.asarray(self.cond_host)
        out = evaluate_samples(jnp.asarray(images), cond, classifier=self.classifier, condition_mode=self.mode,
                               num_conditions=self.num_conditions, reward_fn=self.trainer.reward_model,
                               reference_features=self.reference_features)
        feats = np.asarray(self._features(self._cstate, jnp.asarray(images)))
        out["frechet_distance_data"] = frechet_distance_from_features(feats, self.data_features)
        out["w2_bound"] = float(self._w2(params, self.trainer.ref_params, frozen, jnp.asarray(images), cond,
                                         self.w2_key))
        return {f"eval/{k}": float(v) for k, v in out.items()}

    def save_grid(self, path: str | os.PathLike, panels: dict[str, np.ndarray], title: str | None = None, *,
                  max_per_prompt: int = 8) -> str:
        """Side-by-side grids of eval samples, one row per prompt (its first ``max_per_prompt`` samples)."""
        from adrpo_jax.flow.plotting import save_comparison_grid  # pylint: disable=import-outside-toplevel

        s = self.samples_per_prompt
        k = min(s, max_per_prompt)
        cut = {name: x.reshape((-1, s) + x.shape[1:])[:, :k].reshape((-1,) + x.shape[1:]) for name, x in panels.items()}
        return save_comparison_grid(cut, path, nrow=k, title=title)


class FlowTrainer:
    """Builds everything of a flow RL run from a config (used by :func:`train_and_evaluate`).

    Args:
      config: the experiment config (common sections + :func:`~adrpo_jax.flow.config.add_flow_config`).
      workdir: run directory.
      trainable: the parameter filter of the policy (default: ``nnx.Param``, or ``nnx.LoRAParam`` with
        ``lora.enabled``); the rest of the model state is ``frozen``.
      reward_model: overrides the reward model of ``config.reward`` (any pure, jittable
        ``(images [B, H, W, C], cond [B]) -> [B]``, optionally with ``components``).
      models: ``(pre-trained DiT, classifier)`` to use instead of :func:`load_models` (tests).

    Public attributes: ``mesh``, ``opts`` (:class:`FlowStepOptions`), ``graphdef``, ``tx``, ``schedule``,
    ``abstract_state``, ``state_shardings``, ``ref_params`` (the trainable part of the frozen pre-trained
    reference; with LoRA the initial adapters, which ``base_graphdef`` ignores), ``frozen``, ``reward_model``,
    ``classifier``, ``evaluator`` (None when ``eval_every`` = 0 and images are off), ``lora_config`` (None
    without LoRA), ``base_graphdef`` (the pre-trained model's graph: ``graphdef``, or adapters off with LoRA),
    ``ref_graphdef`` (the graph of the step's reference forward: ``base_graphdef`` with LoRA and a frozen
    reference, else ``graphdef``).
    """

    def __init__(self, config: Any, workdir: str | os.PathLike, *, trainable: Any = None,
                 reward_model: Callable | None = None, models: tuple[DiT, DigitClassifier] | None = None):
        config_lib.validate_flow_config(config)
        self.config, self.workdir = config, os.fspath(workdir)
        self.lora_config = config_lib.lora_config(config)
        if trainable is None:
            trainable = nnx.LoRAParam if self.lora_config is not None else nnx.Param
        self.trainable = trainable
        self.mesh = train.make_mesh(config.mesh)
        self.layout = config_lib.validate_flow_batch_layout(config, train.data_parallel_size(self.mesh),
                                                            jax.process_count())
        self.num_conditions = config_lib.num_prompt_conditions(config)
        pretrained, self.classifier = models if models is not None else load_models(config)
        _check_model(pretrained, config, self.num_conditions)
        self.model_config = pretrained.config
        self.reward_model = reward_model if reward_model is not None else build_reward_model(config, self.classifier)
        mc = self.model_config
        self.opts = FlowStepOptions.from_config(config, num_conditions=self.num_conditions, null_class=mc.null_class,
                                                image_shape=(mc.image_size, mc.image_size, mc.channels))
        self.updates_per_step = int(config.rl.num_inner_updates)
        self.tx, self.schedule = train.make_optimizer(config.optim, int(config.total_steps) * self.updates_per_step)

        abstract_model = nnx.eval_shape(self._new_model)
        self.graphdef, _, abstract_frozen = nnx.split(abstract_model, trainable, ...)
        self.ref_in_state = int(config.rl.ref_refresh_steps) > 0
        self.sampler_in_state = int(config.rl.sampler_refresh_steps) > 1
        self.base_graphdef = self.ref_graphdef = self.graphdef
        if self.lora_config is not None:
            self.base_graphdef = nnx.split(set_lora_enabled(abstract_model, False), trainable, ...)[0]
            if not self.ref_in_state:  # the reference: the policy's own weights with the adapters off
                self.ref_graphdef = self.base_graphdef
        tx, trainable_, ref_in_state, sampler_in_state = self.tx, trainable, self.ref_in_state, self.sampler_in_state
        new_model = self._new_model

        def plan():
            params = nnx.state(new_model(), trainable_)
            state = {"params": params, "opt_state": tx.init(params)}
            if ref_in_state:
                state["ref_params"] = params
            if sampler_in_state:
                state["sampler_params"] = params
            return state

        self._plan = plan
        self.abstract_state = train.plan_sharded(plan, self.mesh)
        self.state_shardings = train.shardings_of(self.abstract_state)
        param_shardings = self.state_shardings["params"]
        _, pre_params, pre_frozen = nnx.split(pretrained, trainable, ...)
        if jax.tree.structure(nnx.to_pure_dict(pre_frozen)) != jax.tree.structure(nnx.to_pure_dict(abstract_frozen)):
            raise AssertionError("the pre-trained model's frozen state does not match the policy's frozen part")
        if self.lora_config is None:
            # The frozen reference: the pre-trained weights, a separate tree sharded like the policy.
            self.ref_params = jax.device_put(pre_params, param_shardings)
        else:
            # The reference is base_graphdef (adapters off): any adapter values give the pre-trained model.
            self.ref_params = train.create_sharded(lambda: nnx.state(new_model(), trainable_),
                                                   self.abstract_state["params"])
        self.frozen = None  # the non-trainable model state (None for a plain DiT with the nnx.Param filter)
        if jax.tree.leaves(pre_frozen):
            self.frozen = jax.device_put(pre_frozen, train.logical_to_named_sharding(pre_frozen, self.mesh))
        del pretrained

        self.rows = train.process_batch_slice(self.layout["batch_size"], self.mesh)
        self.base_key = jax.random.key(int(config.seed))
        repl = train.replicated_sharding(self.mesh)
        lora_dropout = self.lora_config is not None and self.lora_config.dropout > 0
        self.step_fn = jax.jit(make_train_step(self.graphdef, self.tx, self.reward_model, self.opts, self.mesh,
                                               ref_graphdef=self.ref_graphdef, lora_dropout=lora_dropout),
                               out_shardings=(self.state_shardings, repl), donate_argnums=0)
        self.phase_fns = None
        if bool(train.get_by_path(config, "logging.phase_timing", False)):
            self.phase_fns = self._make_phase_fns(lora_dropout)
        self.evaluator = None
        if int(config.eval_every) > 0 or bool(config.eval.write_images):
            self.evaluator = FlowEvaluator(self)

    # ------------------------------------------------------------------------------------------------------

    def _new_model(self) -> DiT:
        """A freshly initialized policy (with adapters under LoRA; their A a function of ``seed`` only); only
        ever built abstractly or under jit."""
        model = DiT(self.model_config, rngs=nnx.Rngs(0))
        if self.lora_config is not None:
            key = jax.random.fold_in(jax.random.key(int(self.config.seed)), 0x10A)
            apply_lora(model, self.lora_config, rngs=nnx.Rngs(params=key))
        return model

    def init_state(self) -> dict[str, Any]:
        """The fresh train state: copies of the pre-trained weights (sharded) and a new optimizer state. With
        LoRA: fresh adapters (B = 0: the policy starts as the pre-trained model), born sharded, and their
        optimizer state."""
        if self.lora_config is not None:
            return train.create_sharded(self._plan, self.abstract_state)
        sh = self.state_shardings
        copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=sh["params"])
        state = {"params": copy(self.ref_params),
                 "opt_state": jax.jit(self.tx.init, out_shardings=sh["opt_state"])(self.ref_params)}
        if self.ref_in_state:
            state["ref_params"] = copy(self.ref_params)
        if self.sampler_in_state:
            state["sampler_params"] = copy(self.ref_params)
        return state

    def prompts(self, step: int) -> np.ndarray:
        """All ``[K * G]`` prompt ids of ``step`` (global; this process feeds ``[self.rows]``)."""
        rl = self.config.rl
        return step_prompts(int(self.config.seed), step, int(rl.prompts_per_step), int(rl.samples_per_prompt),
                            self.num_conditions)

    def _make_phase_fns(self, lora_dropout: bool) -> dict[str, Callable]:
        """``logging.phase_timing``: the step of ``make_train_step`` as three jitted programs (sample, reward,
        update + refreshes) with the same keys, so that each phase can be timed; the same math as the fused
        step (another compilation: equal up to float32 rounding, not bit-identical)."""
        from adrpo_jax.flow.step import (_select_tree, make_flow_update, make_rollout_fn, mix_params,
                                         reward_components)  # pylint: disable=import-outside-toplevel
        from adrpo_jax.flow.metrics import pairwise_diversity  # pylint: disable=import-outside-toplevel

        opts, mesh, reward_model = self.opts, self.mesh, self.reward_model
        repl = train.replicated_sharding(mesh)
        bs = train.batch_sharding(mesh)
        no_reward = lambda x, c: jnp.zeros(x.shape[:1], jnp.float32)  # noqa: E731  # the sampler alone
        rollout = make_rollout_fn(self.graphdef, no_reward, opts, mesh)
        update = make_flow_update(self.graphdef, self.tx, opts, mesh, ref_graphdef=self.ref_graphdef,
                                  lora_dropout=lora_dropout)

        def sample_fn(state, frozen, cond, key):
            k_roll, _ = jax.random.split(key)
            sampler = state["sampler_params"] if "sampler_params" in state else state["params"]
            return rollout(sampler, frozen, cond, k_roll)[0]

        def update_fn(state, ref_params, frozen, cond, key, x1, comps, refresh_ref, refresh_sampler):
            _, k_update = jax.random.split(key)
            reference = state["ref_params"] if "ref_params" in state else ref_params
            if reference is None:
                reference = state["params"]
            batch = {"x1": x1, "cond": cond, "rewards": comps["reward"],
                     "components": {k: v for k, v in comps.items() if k != "reward"}}
            params, opt_state, metrics = update(state["params"], state["opt_state"], reference, frozen, batch,
                                                k_update)
            new_state = dict(state, params=params, opt_state=opt_state)
            refresh_ref = jnp.asarray(refresh_ref, bool)
            refresh_sampler = jnp.asarray(refresh_sampler, bool)
            if "ref_params" in state:
                new_state["ref_params"] = _select_tree(refresh_ref, mix_params(reference, params,
                                                                               opts.ref_refresh_alpha), reference)
            if "sampler_params" in state:
                sampler = state["sampler_params"]
                new_state["sampler_params"] = _select_tree(refresh_sampler, params, sampler)
            metrics = dict(metrics)
            metrics["sample_diversity"] = pairwise_diversity(x1, cond, opts.num_conditions)[1]
            metrics["ref_refreshed"] = (refresh_ref & ("ref_params" in state)).astype(jnp.float32)
            metrics["sampler_refreshed"] = (refresh_sampler & ("sampler_params" in state)).astype(jnp.float32)
            return new_state, metrics

        return {"sample": jax.jit(sample_fn, out_shardings=bs),
                "reward": jax.jit(lambda x1, cond: reward_components(reward_model, x1, cond)),
                "update": jax.jit(update_fn, out_shardings=(self.state_shardings, repl), donate_argnums=0)}

    def train_step(self, step: int, state) -> tuple[dict[str, Any], dict[str, Any]]:
        rl = self.config.rl
        cond = train.host_local_to_global(self.prompts(step)[self.rows], self.mesh)
        key = jax.random.fold_in(self.base_key, step)
        refresh_ref = self.ref_in_state and (step + 1) % int(rl.ref_refresh_steps) == 0
        refresh_sampler = self.sampler_in_state and (step + 1) % int(rl.sampler_refresh_steps) == 0
        # A LoRA reference (adapters off) takes the policy's own adapters (ignored): ref_params None.
        ref = None if self.ref_in_state or self.lora_config is not None else self.ref_params
        if self.phase_fns is None:
            state, metrics = self.step_fn(state, ref, self.frozen, cond, key, np.bool_(refresh_ref),
                                          np.bool_(refresh_sampler))
        else:  # logging.phase_timing: three programs, the host waiting for each
            fns = self.phase_fns
            t0 = time.perf_counter()
            x1 = jax.block_until_ready(fns["sample"](state, self.frozen, cond, key))
            t1 = time.perf_counter()
            comps = jax.block_until_ready(fns["reward"](x1, cond))
            t2 = time.perf_counter()
            state, metrics = jax.block_until_ready(fns["update"](state, ref, self.frozen, cond, key, x1, comps,
                                                                 np.bool_(refresh_ref), np.bool_(refresh_sampler)))
            metrics = dict(metrics, **{"time/sample": t1 - t0, "time/reward": t2 - t1,
                                       "time/update": time.perf_counter() - t2})
        # Logged as ref_refreshed / sampler_refreshed; at DEBUG so that a logged step prints one console line.
        if refresh_ref:
            log.debug("step %d: reference refreshed (ref = %g * policy + %g * ref)", step + 1,
                      float(rl.ref_refresh_alpha), 1.0 - float(rl.ref_refresh_alpha))
        if refresh_sampler:
            log.debug("step %d: sampling copy refreshed", step + 1)
        return state, metrics

    def eval_step(self, step: int, state) -> dict[str, Any]:
        return self.evaluator(step, state["params"], self.frozen) if self.evaluator is not None else {}

    def _is_primary(self) -> bool:
        return jax.process_index() == 0

    def run(self) -> dict[str, Any]:
        config = self.config
        writer = train.MetricWriter(self.workdir, config.logging, run_config=config)
        evaluate = int(config.eval_every) > 0
        images = bool(config.eval.write_images) and self.evaluator is not None

        def init_state():
            state = self.init_state()
            if evaluate:  # the "before" numbers of a fresh run (policy == pre-trained model), logged at step 0
                writer.truncate_after(-1)
                writer.write(0, self.eval_step(0, state))
            if images and self._is_primary():
                self.evaluator.save_grid(os.path.join(self.workdir, BEFORE_GRID),
                                         {"pre-trained": self.evaluator.reference_images},
                                         title=self._grid_title("pre-trained model"))
            return state

        try:
            result = train.run_training(
                config=config, workdir=self.workdir, init_state=init_state, abstract_state=self.abstract_state,
                train_step=self.train_step, eval_step=self.eval_step if evaluate else None,
                learning_rate_fn=lambda s: self.schedule(s * self.updates_per_step), throughput_keys=("images",),
                writer=writer)
        finally:
            writer.close()
        self.result = result
        out = result.to_dict()
        if not result.preempted:
            if config.model.save_final:
                out["final_model"] = self.save_model(result.state["params"], os.path.join(self.workdir, FINAL_MODEL))
            if images:
                path = self.write_before_after(result.step, result.state["params"])
                if path is not None:
                    out["samples_grid"] = path
        return out

    def save_model(self, params, path: str | os.PathLike) -> str | None:
        """Writes the policy ``params`` as a DiT directory (``load_dit`` reads it; with LoRA the merged DiT, ``W + s
        A B``); every process takes part (the parameters may be split across processes), process 0 writes.
        Returns the path on process 0."""
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        from adrpo_jax.models.dit import save_dit  # pylint: disable=import-outside-toplevel

        gather = (lambda x: multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 \
            else jax.device_get
        host = gather(params)
        frozen = gather(self.frozen) if self.frozen is not None else None
        if not self._is_primary():
            return None
        host = jax.tree.map(np.asarray, host)
        model = nnx.merge(self.graphdef, host) if frozen is None else \
            nnx.merge(self.graphdef, host, jax.tree.map(np.asarray, frozen))
        if self.lora_config is not None:
            model = merge_lora(model)
        save_dit(model, path)
        log.info("Saved the fine-tuned policy to %s", path)
        return str(path)

    def _grid_title(self, what: str) -> str:
        prompts = ", ".join(describe_condition(c, self.config.data.condition_mode)
                            for c in range(min(self.num_conditions, 3)))
        return f"{what}\nrows: {prompts}, ..."

    def write_before_after(self, step: int, params) -> str | None:
        """Writes ``workdir/samples_before_after.png`` (pre-trained vs ``params`` on the eval prompts/noise);
        returns its path (process 0) or None."""
        last = self.evaluator.last_images
        after = last[1] if last is not None and last[0] == step else self.evaluator.sample(params, self.frozen)
        if not self._is_primary():
            return None
        path = self.evaluator.save_grid(
            os.path.join(self.workdir, BEFORE_AFTER_GRID),
            {"before (pre-trained)": self.evaluator.reference_images,
             f"after {step} steps ({self.config.rl.method})": after},
            title=self._grid_title("before / after fine-tuning"))
        log.info("Sample grid (before / after): %s", path)
        print(f"Sample grid (before / after fine-tuning): {path}", flush=True)
        return str(Path(path))


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) ADRPO-W2 / baseline fine-tuning of ``config`` in ``workdir``; returns the last logged
    metrics plus ``step``, ``preempted``, ``resumed_from`` (and ``samples_grid``, the before/after PNG)."""
    return FlowTrainer(config, workdir).run()
