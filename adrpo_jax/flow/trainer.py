r"""The ADRPO-W2 online fine-tuning recipe for flow-matching models on digits: ``train_and_evaluate(config, workdir)``
(``config.trainer = 'flow'``).

    python launch.py --config=configs/flow_digits.py:cpu --workdir=/tmp/flow_adrpo [--config.total_steps=200]

Start-up: the config is validated (:mod:`adrpo_jax.flow.config`), the pre-trained DiT and the reward classifier
are loaded from ``model.path`` / ``classifier.path`` or pre-trained once and cached under ``$ADRPO_JAX_CACHE``
(:mod:`adrpo_jax.flow.pretrain`; the first run of a config pre-trains, later runs reuse), and the reward model
of ``reward.*`` is built on the classifier.

One RL step (``total_steps`` counts them; :func:`adrpo_jax.flow.step.make_train_step`, one jitted, donated
program, shared with SD3 through :class:`adrpo_jax.flow.recipe.FlowRecipe`): ``rl.prompts_per_step`` prompt ids
drawn from ``(seed, step)`` (:func:`~adrpo_jax.flow.data.step_prompts`) x
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

Where a step's time goes: by default only ``step_time_s`` / ``images_per_sec`` (and ``time/eval``,
``time/checkpoint``); ``logging.phase_timing=True`` adds ``time/sample``, ``time/reward``, ``time/update``
(:mod:`adrpo_jax.flow.recipe`: the step as three programs, the host waiting for each).

LoRA (``lora.enabled``, :mod:`adrpo_jax.models.lora`): adapters on the DiT sites of ``lora.target_modules``; the
state (optimizer state and checkpoints included) holds the adapters only, the pre-trained weights are the
frozen part (``frozen``, reloaded at start, never checkpointed), the reference of the W2 term is the same model
with its adapters off (``ref_graphdef``; no second copy of the weights; with ``rl.ref_refresh_steps`` base + a
refreshed copy of the adapters), and ``model.save_final`` writes the merged DiT (``merge_lora``: ``W + s A B``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax import train
from adrpo_jax.flow import config as config_lib
from adrpo_jax.flow.data import describe_condition, load_digits_splits, prompt_conditions, step_prompts
from adrpo_jax.flow.metrics import evaluate_samples, frechet_distance_from_features, velocity_w2_bound
from adrpo_jax.flow.recipe import FlowRecipe
from adrpo_jax.flow.rewards import ClassifierReward, CombinedReward, ImageStatReward, RewardModel
from adrpo_jax.flow.sampling import sample, sample_noise
from adrpo_jax.flow.step import FlowStepOptions
from adrpo_jax.models.classifier import DigitClassifier, load_classifier
from adrpo_jax.models.dit import DiT, load_dit
from adrpo_jax.recipe.policy import once
from adrpo_jax.train.programs import Program, key_struct

if TYPE_CHECKING:  # imported when first used (FlowEvaluator.judge_metrics)
    from adrpo_jax.flow.judge import JudgeScorer

__all__ = ["train_and_evaluate", "FlowTrainer", "FlowEvaluator", "step_prompts", "build_reward_model",
           "load_models", "model_load_overrides"]

log = logging.getLogger(__name__)

BEFORE_GRID = "samples_before.png"
BEFORE_AFTER_GRID = "samples_before_after.png"


def build_reward_model(config: Any, classifier: DigitClassifier | None) -> Callable:
    """The reward model of ``config.reward`` (see :mod:`adrpo_jax.flow.config`) on ``classifier``."""
    r = config.reward
    parts: dict[str, RewardModel] = {}
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


def abstract_models(config: Any) -> tuple[DiT, DigitClassifier]:
    """What the plan mode builds instead of :func:`load_models`: the DiT of ``model.path``'s ``config.json`` (or of
    the pre-training config) as shapes only, and an untrained classifier of the reward's architecture (small; its
    weights are constants of the step program either way)."""
    from adrpo_jax.flow import pretrain  # pylint: disable=import-outside-toplevel
    from adrpo_jax.models.dit import DiTConfig  # pylint: disable=import-outside-toplevel

    pre_cfg = config_lib.pretrain_config(config)
    if config.model.path:
        import json  # pylint: disable=import-outside-toplevel
        with open(os.path.join(os.path.expanduser(config.model.path), "config.json"), encoding="utf-8") as f:
            cfg = DiTConfig.from_dict({k: v for k, v in json.load(f).items() if k in DiTConfig().to_dict()})
    else:
        cfg = pretrain.dit_config_from(pre_cfg)
    cfg = dataclasses.replace(cfg, **model_load_overrides(config))
    dit = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    classifier = DigitClassifier(pretrain.classifier_config_from(pre_cfg), rngs=nnx.Rngs(0))
    return dit, classifier


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
    the pre-trained model's samples of the same prompts and noise (computed once, at the first evaluation).

    Every process holds the whole (small) eval batch: sampling runs batch-sharded, the samples come back
    replicated, the metrics are host computations (:func:`adrpo_jax.flow.metrics.evaluate_samples`). The device
    work is the recipe's ``eval/*`` programs (:meth:`programs`).
    """

    def __init__(self, trainer: "FlowTrainer"):
        config, mesh = trainer.config, trainer.mesh
        self.trainer = trainer
        self.mode = config.data.condition_mode
        self.num_conditions = trainer.num_conditions
        self.samples_per_prompt = int(config.eval.samples_per_prompt)
        cond = prompt_conditions(self.mode, self.samples_per_prompt)
        key = jax.random.key(int(config.eval.seed))
        k_x0, self.sde_key, self.w2_key = jax.random.split(key, 3)
        fns = trainer.fns
        x0 = np.asarray(fns["eval/noise"](k_x0))
        rows = train.process_batch_slice(cond.shape[0], mesh)
        self.cond_host = cond
        self.x0 = train.host_local_to_global(x0[rows], mesh)
        self.cond = train.host_local_to_global(cond[rows], mesh)
        self.classifier = trainer.classifier
        self._cstate = nnx.state(self.classifier)
        _, test = load_digits_splits(config.data.image_size, test_fraction=config.data.test_fraction,
                                     seed=config.data.split_seed)
        self.data_features = np.asarray(fns["eval/features"](self._cstate, jnp.asarray(test.images)))
        self._reference: np.ndarray | None = None
        self.last_images: tuple[int, np.ndarray] | None = None
        # eval.gold_rewards = ('judge',): the independent judge's gold metrics (adrpo_jax.flow.judge), logged as
        # eval/gold/judge_* for the reward-hacking monitor; built at the first evaluation (cached training)
        self._judge = "judge" in tuple(config.eval.get("gold_rewards", ()))
        self._judge_scorer: JudgeScorer | None = None

    @staticmethod
    def programs(trainer: "FlowTrainer") -> list[Program]:
        """The evaluator's programs: ``eval/noise``, ``eval/sample`` (+ ``eval/sample_base``: the pre-trained
        model's graph under LoRA), ``eval/w2``, ``eval/features`` (the classifier's features)."""
        config, opts, mesh, policy = trainer.config, trainer.opts, trainer.mesh, trainer.policy
        repl, bs = train.replicated_sharding(mesh), train.batch_sharding(mesh)
        graphdef, base_graphdef = policy.graphdef, policy.base_graphdef
        n = prompt_conditions(config.data.condition_mode, int(config.eval.samples_per_prompt)).shape[0]
        shape = (n,) + tuple(opts.image_shape)

        def sample_fn(params, frozen, x0, cond, key, *, g=graphdef):
            model = nnx.merge(g, params, frozen)
            return sample(lambda x, t, c: model(x, t, c), x0, cond, num_steps=opts.sampling_steps,
                          method=opts.sampling_method, cfg_scale=opts.cfg_scale,
                          null_cond=None if opts.cfg_scale == 1.0 else opts.null_class, sde_noise=opts.sde_noise,
                          key=key if opts.sde_noise > 0 else None)

        n_time = int(config.eval.w2_time_samples)

        def w2_fn(params, ref_params, frozen, x1, cond, key):
            policy_model, ref = nnx.merge(graphdef, params, frozen), nnx.merge(base_graphdef, ref_params, frozen)
            return velocity_w2_bound(lambda x, t, c: policy_model(x, t, c), lambda x, t, c: ref(x, t, c), x1, cond,
                                     key, num_time_samples=n_time)

        params = lambda: trainer.abstract_state["params"]  # noqa: E731
        x = lambda: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bs)  # noqa: E731
        c = lambda: jax.ShapeDtypeStruct((n,), jnp.int32, sharding=bs)  # noqa: E731
        sample_args = lambda: (params(), policy.abstract_frozen, x(), c(), key_struct())  # noqa: E731
        out = [Program("eval/noise", lambda k: sample_noise(k, shape), args=lambda: (key_struct(),), phase="eval"),
               Program("eval/sample", sample_fn, args=sample_args, out_shardings=repl, phase="eval"),
               Program("eval/w2", w2_fn, out_shardings=repl, phase="eval",
                       args=lambda: (params(), params(), policy.abstract_frozen,
                                     jax.ShapeDtypeStruct(shape, jnp.float32), c(), key_struct()))]
        if base_graphdef is not graphdef:
            out.append(Program("eval/sample_base", lambda *a: sample_fn(*a, g=base_graphdef), args=sample_args,
                               out_shardings=repl, phase="eval"))
        if trainer.classifier is not None:
            cgraph = nnx.graphdef(trainer.classifier)
            out.append(Program("eval/features", lambda s, im: nnx.merge(cgraph, s)(im, return_features=True)[1],
                               phase="eval"))
        return out

    def sample(self, params, frozen, *, pretrained: bool = False) -> np.ndarray:
        """The eval samples ``[n, H, W, C]`` (host numpy) of a parameter tree (of the policy's graph, or with
        ``pretrained`` of the pre-trained model's graph: adapters off under LoRA)."""
        fns = self.trainer.fns
        fn = fns.get("eval/sample_base", fns["eval/sample"]) if pretrained else fns["eval/sample"]
        return np.asarray(jax.device_get(fn(params, frozen, self.x0, self.cond, self.sde_key)))

    def reference_images(self, state=None) -> np.ndarray:
        """The pre-trained model's eval samples (computed once)."""
        if self._reference is None:
            policy = self.trainer.policy
            self._reference = self.sample(policy.pretrained_params(state), policy.frozen, pretrained=True)
            # a jax array, as at every evaluation: jit keys its cache on numpy vs jax inputs (a numpy argument
            # here compiled eval/features a second time; tests/train/test_soak.py)
            self.reference_features = np.asarray(self.trainer.fns["eval/features"](self._cstate,
                                                                                    jnp.asarray(self._reference)))
        return self._reference

    def __call__(self, step: int, state) -> dict[str, float]:
        params, frozen = state["params"], self.trainer.frozen
        self.reference_images(state)
        images = self.sample(params, frozen)
        self.last_images = (step, images)
        cond = jnp.asarray(self.cond_host)
        out = evaluate_samples(jnp.asarray(images), cond, classifier=self.classifier, condition_mode=self.mode,
                               num_conditions=self.num_conditions, reward_fn=self.trainer.reward_model,
                               reference_features=self.reference_features)
        feats = np.asarray(self.trainer.fns["eval/features"](self._cstate, jnp.asarray(images)))
        out["frechet_distance_data"] = frechet_distance_from_features(feats, self.data_features)
        ref = self.trainer.policy.pretrained_params(state)
        out["w2_bound"] = float(self.trainer.fns["eval/w2"](params, ref, frozen, jnp.asarray(images), cond,
                                                             self.w2_key))
        out = {f"eval/{k}": float(v) for k, v in out.items()}
        if self._judge:
            out.update(self.judge_metrics(images))
        return out

    def judge_metrics(self, images: np.ndarray) -> dict[str, float]:
        """``eval/gold/judge_*`` of eval samples: the independent judge (never the reward) on them."""
        from adrpo_jax.flow.judge import GOLD_PREFIX, JudgeScorer, train_judge  # pylint: disable=import-outside-toplevel
        if self._judge_scorer is None:
            config = self.trainer.config
            judge, _ = train_judge({"data": config.data}, log_fn=lambda m: log.info("%s", m))
            self._judge_scorer = JudgeScorer(judge, self.mode, thickness_weight=float(config.reward.thickness_weight),
                                             reference_images=self._reference, data=config.data)
        return {GOLD_PREFIX + k: float(v) for k, v in self._judge_scorer(images, self.cond_host).items()}

    def save_grid(self, path: str | os.PathLike, panels: dict[str, np.ndarray], title: str | None = None, *,
                  max_per_prompt: int = 8) -> str:
        """Side-by-side grids of eval samples, one row per prompt (its first ``max_per_prompt`` samples)."""
        from adrpo_jax.flow.plotting import save_comparison_grid  # pylint: disable=import-outside-toplevel

        s = self.samples_per_prompt
        k = min(s, max_per_prompt)
        cut = {name: x.reshape((-1, s) + x.shape[1:])[:, :k].reshape((-1,) + x.shape[1:]) for name, x in panels.items()}
        return save_comparison_grid(cut, path, nrow=k, title=title)


class FlowTrainer(FlowRecipe):
    """The digits flow recipe: everything of a flow RL run from a config (used by :func:`train_and_evaluate`).

    Args:
      config: the experiment config (common sections + :func:`~adrpo_jax.flow.config.add_flow_config`).
      workdir: run directory.
      trainable: the parameter filter of the policy (default: ``nnx.Param``, or ``nnx.LoRAParam`` with
        ``lora.enabled``); the rest of the model state is ``frozen``.
      reward_model: overrides the reward model of ``config.reward`` (any pure, jittable
        ``(images [B, H, W, C], cond [B]) -> [B]``, optionally with ``components``).
      models: ``(pre-trained DiT, classifier)`` to use instead of :func:`load_models` (tests).

    Public attributes (beyond :class:`~adrpo_jax.recipe.base.Recipe`'s): ``opts`` (:class:`FlowStepOptions`),
    ``schedule``, ``reward_model``, ``classifier``, ``evaluator`` (None when ``eval_every`` = 0 and images are
    off), ``num_conditions``, ``layout``.
    """

    name = "flow"
    monitor_kind = "flow"

    def __init__(self, config: Any, workdir: str | os.PathLike, *, trainable: Any = None,
                 reward_model: Callable | None = None, models: tuple[DiT, DigitClassifier] | None = None,
                 mesh: jax.sharding.Mesh | None = None, abstract: bool = False):
        config_lib.validate_flow_config(config)
        super().__init__(config, workdir, mesh=mesh, abstract=abstract)
        self.layout = config_lib.validate_flow_batch_layout(config, train.data_parallel_size(self.mesh),
                                                            1 if abstract else jax.process_count())
        self.num_conditions = config_lib.num_prompt_conditions(config)
        if models is None and abstract:  # the plan: shapes only, no pre-training, no weights
            models = abstract_models(config)
        pretrained, self.classifier = models if models is not None else load_models(config)
        _check_model(pretrained, config, self.num_conditions)
        self.model_config = pretrained.config
        self.reward_model = reward_model if reward_model is not None else build_reward_model(config, self.classifier)
        mc = self.model_config
        self.opts = FlowStepOptions.from_config(config, num_conditions=self.num_conditions, null_class=mc.null_class,
                                                image_shape=(mc.image_size, mc.image_size, mc.channels))
        self._build_policy(self._new_model, once(pretrained), trainable)
        del pretrained
        with_evaluator = int(config.eval_every) > 0 or bool(config.eval.write_images)
        self._set_programs(self.step_programs() + (FlowEvaluator.programs(self) if with_evaluator else []))
        self.evaluator = FlowEvaluator(self) if with_evaluator and not abstract else None

    # ------------------------------------------------------------------------------------------------------

    def _new_model(self) -> DiT:
        """A freshly initialized policy (with adapters under LoRA; their A a function of ``seed`` only); only
        ever built abstractly or under jit."""
        return self._with_lora(DiT(self.model_config, rngs=nnx.Rngs(0)))

    def make_reward(self, *reward_args: Any) -> Callable:
        return self.reward_model

    def evaluate(self, step: int, state) -> dict[str, Any]:
        return self.evaluator(step, state) if self.evaluator is not None else {}

    def _evaluator(self, what: str) -> FlowEvaluator:
        if self.evaluator is None:
            raise ValueError(f"{what} needs the evaluator: set eval_every > 0 or eval.write_images=True "
                             f"(got eval_every={self.config.eval_every}, "
                             f"eval.write_images={self.config.eval.write_images}); none in an abstract trainer.")
        return self.evaluator

    @property
    def _images(self) -> bool:
        return bool(self.config.eval.write_images) and self.evaluator is not None

    def on_start(self, state) -> None:
        if self._images:
            evaluator = self._evaluator("on_start's grid")
            reference = evaluator.reference_images(state)
            if jax.process_index() == 0:
                evaluator.save_grid(os.path.join(self.workdir, BEFORE_GRID), {"pre-trained": reference},
                                         title=self._grid_title("pre-trained model"))

    def on_finish(self, result, out: dict[str, Any]) -> None:
        if self._images:
            path = self.write_before_after(result.step, result.state)
            if path is not None:
                out["samples_grid"] = path

    def export(self, params, path: str | os.PathLike) -> str | None:
        """Writes the policy ``params`` as a DiT directory (``load_dit`` reads it; with LoRA the merged DiT, ``W + s
        A B``); every process takes part (the parameters may be split across processes), process 0 writes.
        Returns the path on process 0."""
        from adrpo_jax.models.dit import save_dit  # pylint: disable=import-outside-toplevel

        model = self.policy.merged(params, to_host=True)
        if model is None:
            return None
        if not isinstance(model, DiT):
            raise TypeError(f"the merged policy is a {type(model).__name__}, not a DiT: cannot export it to {path}.")
        save_dit(model, path)
        log.info("Saved the fine-tuned policy to %s", path)
        return str(path)

    def load_final(self, path: Path) -> Any:
        return jax.device_put(nnx.state(load_dit(path), self.trainable), self.state_shardings["params"])

    def _grid_title(self, what: str) -> str:
        prompts = ", ".join(describe_condition(c, self.config.data.condition_mode)
                            for c in range(min(self.num_conditions, 3)))
        return f"{what}\nrows: {prompts}, ..."

    def write_before_after(self, step: int, state) -> str | None:
        """Writes ``workdir/samples_before_after.png`` (pre-trained vs ``state``'s policy on the eval prompts /
        noise); returns its path (process 0) or None."""
        evaluator = self._evaluator("write_before_after")
        last = evaluator.last_images
        after = last[1] if last is not None and last[0] == step else evaluator.sample(state["params"], self.frozen)
        reference = evaluator.reference_images(state)
        if jax.process_index() != 0:
            return None
        path = evaluator.save_grid(
            os.path.join(self.workdir, BEFORE_AFTER_GRID),
            {"before (pre-trained)": reference, f"after {step} steps ({self.config.rl.method})": after},
            title=self._grid_title("before / after fine-tuning"))
        log.info("Sample grid (before / after): %s", path)
        print(f"Sample grid (before / after fine-tuning): {path}", flush=True)
        return str(Path(path))


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) ADRPO-W2 / baseline fine-tuning of ``config`` in ``workdir``; returns the last logged
    metrics plus ``step``, ``preempted``, ``resumed_from`` (and ``samples_grid``, the before/after PNG)."""
    return FlowTrainer(config, workdir).run()
