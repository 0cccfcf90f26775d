r"""ADRPO-W2 (and fixed-beta W2, ORW-CFM-W2, no regularization) on an SD3 MMDiT in latent space, text prompts.

    python launch.py --config=configs/sd3_adrpo.py:gpu --workdir=runs/sd3 \
        --config.model.path=/models/sd3-medium/transformer --config.vae.path=/models/sd3-medium/vae \
        --config.text.path=/models/sd3-medium --config.reward.clip_path=/models/clip-vit-large-patch14
    python launch.py --config=configs/sd3_adrpo.py:cpu --workdir=/tmp/sd3_tiny   # tiny random models, cached

The ``'sd3'`` recipe (``config.trainer = 'sd3'`` or ``'adrpo_jax.flow.sd3_trainer:train_and_evaluate'``). The RL
step, the policy (LoRA, reference refresh, sampling copy) and the phase timing are the flow recipes' own
(:class:`adrpo_jax.flow.recipe.FlowRecipe`, :func:`adrpo_jax.flow.step.make_train_step`: rollout, per-prompt
advantages, ``rl.method`` losses, inner updates, shard_map'd loss, non-finite skip) on
:class:`~adrpo_jax.flow.sd3.MMDiTVelocity`, the MMDiT seen as a velocity field of our convention over integer
prompt ids:

* prompts (``data.prompts``) are embedded once on the host (:mod:`adrpo_jax.flow.text_embeddings`, cached on
  disk); the ``[N + 1, L, D]`` / ``[N + 1, P]`` table (prompts, then the empty prompt = CFG's null row) lives on
  the devices as a frozen variable, so ``cond [B]`` stays int prompt ids (advantage groups, CFG null id,
  ``drop_mask``) exactly as on digits;
* the rollout integrates on SD3's shifted schedule (``sampling.time_shift``, 3.0), with CFG
  (``sampling.cfg_scale``) and optionally the marginal-preserving SDE (``sampling.sde_noise``), then decodes the
  latents with the VAE and scores the images inside the same jitted program (``reward.kind``: ``clip`` =
  CLIP score against the prompt, ``reward.clip_scale`` * cos, clamped at 0 with ``reward.clip_clamp``,
  :mod:`adrpo_jax.flow.clip_reward`; ``image_mean`` = mean pixel value, a cheap stand-in);
* LoRA (``lora.enabled``, default on for SD3): the adapters are the whole train state; the W2 reference is the
  same MMDiT with adapters off (no second copy of the weights).

Model inputs: ``model.path`` (a diffusers ``SD3Transformer2DModel`` directory), ``vae.path`` (its
``AutoencoderKL``), ``text.path`` (a directory with the SD3 text encoders/tokenizers), ``reward.clip_path`` (a
``transformers`` CLIP directory). With ``model.tiny=True`` (the ``cpu`` variant) empty paths are filled with
tiny random models built once and cached (:mod:`adrpo_jax.flow.sd3_tiny`); otherwise an empty path is a
:class:`~adrpo_jax.train.config.ConfigError`.

Metrics: the flow step's (``reward_mean``, ``w2_mean``, ``beta_eff_*``, ``cfm_term``, ``w2_term``, ...), and
every ``eval_every`` steps on a fixed batch (every prompt x ``eval.samples_per_prompt``, fixed noise):
``eval/reward_mean``, ``eval/diversity`` (per-prompt pairwise L2 of the latents), ``eval/w2_bound`` (the W2
velocity bound to the pre-trained model). Checkpoints hold the train state (adapters and their optimizer state
with LoRA); the frozen weights and the prompt table are reloaded at start; resume is exact.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax import train
from adrpo_jax.flow import config as flow_config
from adrpo_jax.flow.config import (SD3_DEFAULT_PROMPTS as DEFAULT_PROMPTS, SD3_LORA_TARGETS as LORA_DEFAULT_TARGETS,
                                   SD3_TRAINER as TRAINER, add_sd3_config, validate_sd3_batch_layout,
                                   validate_sd3_config)
from adrpo_jax.flow.metrics import pairwise_diversity, velocity_w2_bound
from adrpo_jax.flow.recipe import FlowRecipe
from adrpo_jax.flow.sampling import sample, sample_noise
from adrpo_jax.flow.sd3 import MMDiTVelocity, make_latent_reward
from adrpo_jax.flow.step import FlowStepOptions
from adrpo_jax.models.lora import apply_lora
from adrpo_jax.recipe.policy import Policy
from adrpo_jax.train.programs import Program, abstract_like, key_struct

__all__ = ["TRAINER", "add_sd3_config", "validate_sd3_config", "SD3Components", "load_components",
           "SD3Trainer", "train_and_evaluate", "DEFAULT_PROMPTS"]

log = logging.getLogger(__name__)

validate_batch_layout = validate_sd3_batch_layout  # the name of earlier releases


# ----------------------------------------------------------------------------------------------------------
# Components: transformer, VAE decode, prompt table, image reward
# ----------------------------------------------------------------------------------------------------------


class SD3Components:
    """What a run is built from (all loaded on the host once).

    ``transformer``: the MMDiT (:mod:`adrpo_jax.models.mmdit`); ``embeddings [N + 1, L, D]``, ``pooled [N + 1,
    P]``: the prompts' rows then the empty prompt's (row ``N`` = null); ``latent_shape`` ``(h, w, c)``;
    ``reward_state``: the arrays of the reward path (VAE decoder, CLIP vision tower; any pytree, passed to the
    jitted step as an argument, so large towers are not baked into the program as constants);
    ``make_reward(reward_state) -> reward(latents [B, h, w, c], cond [B]) -> [B]``: VAE decode of the sampler's
    (scaled) latents then the image reward (pure, jittable; optionally with ``components``).
    """

    def __init__(self, transformer, embeddings, pooled, latent_shape, reward_state, make_reward):
        self.transformer = transformer
        self.embeddings, self.pooled = np.asarray(embeddings), np.asarray(pooled)
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.reward_state, self.make_reward = reward_state, make_reward


def image_mean_reward(images: jax.Array, cond: jax.Array) -> jax.Array:
    """``mean(images)`` per image (brightness in [-1, 1]): a cheap, hackable stand-in reward."""
    del cond
    return jnp.mean(images.astype(jnp.float32), axis=(1, 2, 3))


def load_components(config: Any, mesh: jax.sharding.Mesh | None = None) -> SD3Components:
    """Loads the MMDiT (placed sharded on ``mesh`` by its logical axis names), the VAE, the prompt table and the
    reward of ``config`` (tiny random models, built once and cached, for empty paths when ``model.tiny``)."""
    from adrpo_jax.flow import text_embeddings  # pylint: disable=import-outside-toplevel
    from adrpo_jax.models import mmdit, vae as vae_lib  # pylint: disable=import-outside-toplevel

    paths = {"model": config.model.path, "vae": config.vae.path, "text": config.text.path,
             "clip": config.reward.clip_path}
    if bool(config.model.tiny) and not all(paths.values()):
        from adrpo_jax.flow.sd3_tiny import build_tiny_sd3  # pylint: disable=import-outside-toplevel
        built = build_tiny_sd3()
        paths = {k: (os.path.expanduser(v) if v else built[k]) for k, v in paths.items()}
    paths = {k: os.path.expanduser(v) for k, v in paths.items()}
    transformer = mmdit.load_pretrained(paths["model"], mesh=mesh, dtype=config.model.dtype,
                                        param_dtype=config.model.param_dtype, remat=bool(config.model.remat),
                                        scan_layers=bool(config.model.scan_layers))
    vae = vae_lib.load_pretrained(paths["vae"])
    prompts = list(config.data.prompts)
    cache_dir = os.path.expanduser(config.text.cache_dir) if config.text.cache_dir else None
    table = text_embeddings.cached_prompt_embeddings(
        prompts, paths["text"], cache_dir, max_sequence_length=int(config.text.max_sequence_length),
        joint_attention_dim=int(transformer.config.joint_attention_dim), torch_dtype=config.text.torch_dtype)
    if table.null_id != len(prompts) or tuple(table.prompts[:len(prompts)]) != tuple(prompts):
        raise ValueError(f"the prompt table's rows {table.prompts} are not data.prompts followed by the empty prompt")
    clip = None
    if config.reward.kind == "clip":
        from adrpo_jax.flow.clip_reward import CLIPScoreReward  # pylint: disable=import-outside-toplevel
        clip = CLIPScoreReward.from_pretrained(paths["clip"], prompts, cache_dir=cache_dir,
                                               scale=float(config.reward.clip_scale),
                                               clamp=bool(config.reward.clip_clamp),
                                               dtype=jnp.dtype(config.model.dtype))
    vae_graphdef, vae_state = nnx.split(vae)
    reward_state = {"vae": vae_state, "clip": clip.state if clip is not None else {}}

    def make_reward(state):
        def decode(z):
            v = nnx.merge(vae_graphdef, state["vae"])
            return v.decode(v.unscale_latents(z))

        return make_latent_reward(decode, clip.bind(state["clip"]) if clip is not None else image_mean_reward)

    vcfg = transformer.config
    latent = (int(vcfg.sample_size), int(vcfg.sample_size), int(vcfg.in_channels))
    return SD3Components(transformer, table.embeddings, table.pooled, latent, reward_state, make_reward)


# ----------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------


class SD3Trainer(FlowRecipe):
    """The SD3 recipe (module docstring); ``components`` overrides :func:`load_components` (tests). Attributes as
    :class:`adrpo_jax.flow.trainer.FlowTrainer`'s: ``mesh``, ``opts``, ``policy``, ``graphdef``,
    ``base_graphdef``, ``ref_graphdef``, ``tx``, ``abstract_state``, ``state_shardings``, ``ref_params``,
    ``frozen``, ``fns`` (``fns["step"]``: the fused RL step)."""

    name = "sd3"

    def __init__(self, config: Any, workdir: str | os.PathLike, *, components: SD3Components | None = None,
                 mesh: jax.sharding.Mesh | None = None, abstract: bool = False):
        validate_sd3_config(config)
        super().__init__(config, workdir, mesh=mesh, abstract=abstract)
        self.layout = validate_sd3_batch_layout(config, train.data_parallel_size(self.mesh),
                                                1 if abstract else jax.process_count())
        self.num_prompts = self.num_conditions = len(config.data.prompts)
        comp = components if components is not None else load_components(config, self.mesh)
        self.components = comp
        if comp.embeddings.shape[0] != self.num_prompts + 1:
            raise ValueError(f"the prompt table has {comp.embeddings.shape[0]} rows; expected {self.num_prompts} "
                             "prompts + the empty prompt")
        model = MMDiTVelocity(comp.transformer, comp.embeddings, comp.pooled, null_id=self.num_prompts)
        self.reward_state = jax.device_put(comp.reward_state, train.replicated_sharding(self.mesh))
        self.opts = FlowStepOptions.from_config(config, num_conditions=self.num_prompts, null_class=self.num_prompts,
                                                image_shape=comp.latent_shape)
        self._setup_optimization(config)
        lora = flow_config.lora_config(config)
        if lora is not None:  # the initial adapters: part of the pre-trained model object (B = 0)
            key = jax.random.fold_in(jax.random.key(int(config.seed)), 0x10A)
            apply_lora(model, lora, rngs=nnx.Rngs(params=key))
        trainable = nnx.LoRAParam if lora is not None else nnx.Param
        self.policy = Policy(self.policy_spec(lambda: model, lambda: model, trainable, lora), self.mesh,
                             abstract=abstract)
        del model
        self.rows = train.process_batch_slice(self.layout["batch_size"], self.mesh)
        self.base_key = jax.random.key(int(config.seed))
        self._set_programs(self.step_programs() + self.eval_programs())
        if not abstract:
            self._eval_inputs()

    @property
    def step_fn(self):
        return self.fns["step"]

    def make_reward(self, *reward_args: Any) -> Callable:
        return self.components.make_reward(*reward_args)

    def reward_args(self) -> tuple:
        return (self.reward_state,)

    def reward_arg_structs(self) -> tuple:
        return (abstract_like(self.reward_state),)

    # ---- evaluation -----------------------------------------------------------------------------------------

    def _eval_cond(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_prompts, dtype=np.int32), int(self.config.eval.samples_per_prompt))

    def eval_programs(self) -> list[Program]:
        """``eval/noise`` and ``eval/step`` (sample the fixed eval batch, reward, diversity, W2 bound)."""
        config, opts, mesh, policy = self.config, self.opts, self.mesh, self.policy
        n = self._eval_cond().shape[0]
        shape = (n,) + tuple(opts.image_shape)
        graphdef, base_graphdef, make_reward = policy.graphdef, policy.base_graphdef, self.components.make_reward
        n_time = int(config.eval.w2_time_samples)
        num_prompts = self.num_prompts

        def eval_fn(params, ref_params, frozen, reward_state, x0, cond, sde_key, w2_key):
            policy_model = nnx.merge(graphdef, params, frozen)
            ref = nnx.merge(base_graphdef, ref_params, frozen)
            x1 = sample(lambda x, t, c: policy_model(x, t, c), x0, cond, num_steps=opts.sampling_steps,
                        method=opts.sampling_method, cfg_scale=opts.cfg_scale,
                        null_cond=None if opts.cfg_scale == 1.0 else opts.null_class, sde_noise=opts.sde_noise,
                        key=sde_key if opts.sde_noise > 0 else None, timesteps=opts.time_grid())
            r = make_reward(reward_state)(x1, cond)
            w2 = velocity_w2_bound(lambda x, t, c: policy_model(x, t, c), lambda x, t, c: ref(x, t, c), x1, cond,
                                   w2_key, num_time_samples=n_time)
            return {"reward_mean": jnp.mean(r), "reward_std": jnp.std(r),
                    "diversity": pairwise_diversity(x1, cond, num_prompts)[1], "w2_bound": w2}

        bs = train.batch_sharding(mesh)
        params = lambda: self.abstract_state["params"]  # noqa: E731
        return [Program("eval/noise", lambda k: sample_noise(k, shape), args=lambda: (key_struct(),), phase="eval"),
                Program("eval/step", eval_fn, out_shardings=train.replicated_sharding(mesh), phase="eval",
                        args=lambda: (params(), params(), policy.abstract_frozen, *self.reward_arg_structs(),
                                      jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bs),
                                      jax.ShapeDtypeStruct((n,), jnp.int32, sharding=bs), key_struct(),
                                      key_struct()))]

    def _eval_inputs(self) -> None:
        cond = self._eval_cond()
        k_x0, self._sde_key, self._w2_key = jax.random.split(jax.random.key(int(self.config.eval.seed)), 3)
        x0 = np.asarray(self.fns["eval/noise"](k_x0))
        rows = train.process_batch_slice(cond.shape[0], self.mesh)
        self._eval_x0 = train.host_local_to_global(x0[rows], self.mesh)
        self._eval_cond = train.host_local_to_global(cond[rows], self.mesh)

    @property
    def has_evaluator(self) -> bool:
        return int(self.config.eval_every) > 0

    def evaluate(self, step: int, state) -> dict[str, Any]:
        del step
        out = self.fns["eval/step"](state["params"], self.policy.pretrained_params(state), self.frozen,
                                    self.reward_state, self._eval_x0, self._eval_cond, self._sde_key, self._w2_key)
        return {f"eval/{k}": float(v) for k, v in jax.device_get(out).items()}

    # ---- export ---------------------------------------------------------------------------------------------

    def export(self, params, path: str | os.PathLike) -> str | None:
        """Writes the policy's MMDiT (LoRA merged: ``W + s A B``) as a diffusers directory (process 0)."""
        from adrpo_jax.models import mmdit  # pylint: disable=import-outside-toplevel

        model = self.policy.merged(params, to_host=True)
        if model is None:
            return None
        mmdit.save_pretrained(model.transformer, path)
        log.info("Saved the fine-tuned MMDiT to %s", path)
        return str(path)

    def load_final(self, path: Path) -> Any:
        """The trainable parameters of an exported (merged) diffusers MMDiT directory."""
        from adrpo_jax.models import mmdit  # pylint: disable=import-outside-toplevel

        m = self.config.model
        transformer = mmdit.load_pretrained(path, mesh=self.mesh, dtype=m.dtype, param_dtype=m.param_dtype,
                                            remat=bool(m.remat), scan_layers=bool(m.scan_layers))
        model = MMDiTVelocity(transformer, self.components.embeddings, self.components.pooled,
                              null_id=self.num_prompts)
        return jax.device_put(nnx.state(model, self.trainable), self.state_shardings["params"])


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) SD3 fine-tuning of ``config`` in ``workdir``; returns the last logged metrics plus
    ``step``, ``preempted``, ``resumed_from``."""
    return SD3Trainer(config, workdir).run()
