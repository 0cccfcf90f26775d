r"""ADRPO-W2 (and fixed-beta W2, ORW-CFM-W2, no regularization) on an SD3 MMDiT in latent space, text prompts.

    python launch.py --config=configs/sd3_adrpo.py:gpu --workdir=runs/sd3 \
        --config.model.path=/models/sd3-medium/transformer --config.vae.path=/models/sd3-medium/vae \
        --config.text.path=/models/sd3-medium --config.reward.clip_path=/models/clip-vit-large-patch14
    python launch.py --config=configs/sd3_adrpo.py:cpu --workdir=/tmp/sd3_tiny   # tiny random models, cached

``config.trainer = 'adrpo_jax.flow.sd3_trainer:train_and_evaluate'``. The RL step is the flow trainer's own
(:func:`adrpo_jax.flow.step.make_train_step`: rollout, per-prompt advantages, ``rl.method`` losses, inner
updates, shard_map'd loss, non-finite skip) on :class:`~adrpo_jax.flow.sd3.MMDiTVelocity`, the MMDiT seen as a
velocity field of our convention over integer prompt ids:

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
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from adrpo_jax import train
from adrpo_jax.flow import config as flow_config
from adrpo_jax.flow.metrics import pairwise_diversity, velocity_w2_bound
from adrpo_jax.flow.sampling import sample, sample_noise
from adrpo_jax.flow.sd3 import MMDiTVelocity, make_latent_reward
from adrpo_jax.flow.step import FlowStepOptions, make_train_step
from adrpo_jax.flow.trainer import step_prompts
from adrpo_jax.models.lora import apply_lora, merge_lora, set_lora_enabled
from adrpo_jax.train.config import ConfigError, merge_defaults, require_choice, require_int, require_type

__all__ = ["TRAINER", "add_sd3_config", "validate_sd3_config", "SD3Components", "load_components",
           "SD3Trainer", "train_and_evaluate", "DEFAULT_PROMPTS"]

log = logging.getLogger(__name__)

TRAINER = "adrpo_jax.flow.sd3_trainer:train_and_evaluate"
REWARD_KINDS = ("clip", "image_mean")
# Attribute-binding / counting / composition prompts in the spirit of DrawBench (the paper's prompt set).
DEFAULT_PROMPTS = (
    "a red cube on top of a blue sphere",
    "three cats sitting on a green sofa",
    "a yellow bird and a black dog",
    "an astronaut riding a horse in the desert",
    "a watercolor painting of a lighthouse at night",
    "a purple umbrella next to an orange bicycle",
    "two wine glasses and a candle on a wooden table",
    "a snowy mountain reflected in a clear lake",
)
# MMDiT sites of the adapters: the joint attention's projections (image and text streams) and both MLPs (SD3.5's
# image-only attn2: add "attn2.to_q", ... to lora.target_modules).
LORA_DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "attn.add_q_proj", "attn.add_k_proj",
                        "attn.add_v_proj", "attn.to_add_out", "ff.fc1", "ff.fc2", "ff_context.fc1", "ff_context.fc2")


def add_sd3_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the SD3 trainer's sections (on top of the kit's common ones) in place; existing keys are kept."""
    flow = flow_config.add_flow_config(ml_collections.ConfigDict())
    defaults = {
        "trainer": TRAINER,
        "data": {"prompts": DEFAULT_PROMPTS},
        "model": {"path": "", "tiny": False, "dtype": "bfloat16", "param_dtype": "float32", "remat": False,
                  "scan_layers": False, "save_final": False},
        "vae": {"path": ""},
        "text": {"path": "", "cache_dir": "", "max_sequence_length": 256, "torch_dtype": "float32"},
        "reward": {"kind": "clip", "clip_path": "", "clip_scale": 100.0, "clip_clamp": True},
        "rl": flow.rl.to_dict(),
        "sampling": {"method": "euler", "num_steps": 28, "cfg_scale": 4.5, "sde_noise": 0.0, "time_shift": 3.0},
        "eval": {"samples_per_prompt": 2, "seed": 1234, "w2_time_samples": 1},
        "lora": dict(flow.lora.to_dict(), enabled=True, rank=16, alpha=16.0, target_modules=LORA_DEFAULT_TARGETS),
    }
    defaults["rl"]["prompts_per_step"] = 4
    defaults["rl"]["samples_per_prompt"] = 4
    defaults["rl"]["time_sampling"] = "logit_normal"  # SD3's training distribution of sigma (symmetric: same t)
    merge_defaults(config, defaults)
    return config


def _check_dir(config: Any, key: str, tiny: bool) -> str:
    path = require_type(config, key, str)
    if not path:
        if tiny:
            return path
        raise ConfigError(f"`{key}` is required: a local directory ({_WHAT[key]}); pass --config.{key}=/path. "
                          "Nothing is downloaded. (The `cpu` variant of configs/sd3_adrpo.py builds tiny random "
                          "models instead: model.tiny=True.)", key=key, value=path)
    if not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"`{key}`={path!r} is not a directory ({_WHAT[key]}).", key=key, value=path)
    return path


_WHAT = {
    "model.path": "a diffusers SD3Transformer2DModel directory with config.json and diffusion_pytorch_model*"
                  ".safetensors, e.g. <sd3-medium>/transformer",
    "vae.path": "a diffusers AutoencoderKL directory, e.g. <sd3-medium>/vae",
    "text.path": "the SD3 pipeline directory with text_encoder, text_encoder_2, text_encoder_3 and their tokenizers",
    "reward.clip_path": "a transformers CLIPModel directory, e.g. openai/clip-vit-large-patch14 saved locally",
}


def validate_sd3_config(config: Any) -> None:
    """Checks the SD3 trainer's keys; raises :class:`ConfigError` naming the key."""
    for section in ("data", "model", "vae", "text", "reward", "rl", "sampling", "eval", "lora"):
        if section not in config:
            raise ConfigError(f"Config section `{section}` is missing (build the config with add_sd3_config).",
                              key=section)
    prompts = config.data.prompts
    if not isinstance(prompts, (tuple, list)) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ConfigError(f"`data.prompts` must be a non-empty tuple of non-empty strings, got {prompts!r}.",
                          key="data.prompts", value=prompts)
    if len(set(prompts)) != len(prompts):
        raise ConfigError("`data.prompts` has duplicates (each prompt is one advantage group).", key="data.prompts",
                          value=prompts)
    tiny = require_type(config, "model.tiny", bool)
    for key in ("model.path", "vae.path", "text.path"):
        _check_dir(config, key, tiny)
    require_type(config, "text.cache_dir", str)
    require_int(config, "text.max_sequence_length", min=1)
    require_choice(config, "text.torch_dtype", ("float32", "bfloat16", "float16"))
    kind = require_choice(config, "reward.kind", REWARD_KINDS)
    if kind == "clip":
        _check_dir(config, "reward.clip_path", tiny)
    flow_config.require_float(config, "reward.clip_scale", min=0.0, min_inclusive=False)
    require_type(config, "reward.clip_clamp", bool)
    for key in ("dtype", "param_dtype"):
        require_choice(config, f"model.{key}", flow_config.DTYPES)
    for key in ("remat", "scan_layers", "save_final"):
        require_type(config, f"model.{key}", bool)
    flow_config._validate_rl(config)  # pylint: disable=protected-access
    method = require_choice(config, "sampling.method", flow_config.SAMPLERS)
    require_int(config, "sampling.num_steps", min=1)
    flow_config.require_float(config, "sampling.cfg_scale", min=0.0)
    noise = flow_config.require_float(config, "sampling.sde_noise", min=0.0)
    if noise > 0 and method != "euler":
        raise ConfigError(f"`sampling.sde_noise`={noise} > 0 samples the SDE by Euler-Maruyama: set "
                          f"sampling.method='euler' (got {method!r}).", key="sampling.sde_noise", value=noise)
    flow_config.require_float(config, "sampling.time_shift", min=0.0, min_inclusive=False)
    require_int(config, "eval.samples_per_prompt", min=2)
    require_int(config, "eval.seed", min=0)
    require_int(config, "eval.w2_time_samples", min=1)
    flow_config._validate_lora(config)  # pylint: disable=protected-access


def validate_batch_layout(config: Any, data_parallel_size: int, process_count: int = 1) -> dict[str, int]:
    """Divisibility of the RL batch ``K * G`` (by micro-batches, the mesh's batch axes, processes) and of the eval
    batch. Returns ``{"batch_size", "micro_batch_size", "eval_batch_size"}``."""
    k, g = int(config.rl.prompts_per_step), int(config.rl.samples_per_prompt)
    batch, accum = k * g, int(config.optim.grad_accum_steps)
    if batch % accum or (batch // accum) % data_parallel_size:
        raise ConfigError(f"The images per step rl.prompts_per_step * rl.samples_per_prompt = {k} * {g} = {batch} "
                          f"must be divisible by optim.grad_accum_steps={accum} times the data-parallel size "
                          f"{data_parallel_size} (mesh.data * mesh.fsdp).", key="rl.prompts_per_step", value=k)
    if batch % process_count:
        raise ConfigError(f"The images per step {batch} must be divisible by the process count {process_count}.",
                          key="rl.prompts_per_step", value=k)
    eval_batch = len(config.data.prompts) * int(config.eval.samples_per_prompt)
    if eval_batch % data_parallel_size:
        raise ConfigError(f"The eval batch (#prompts {len(config.data.prompts)} * eval.samples_per_prompt = "
                          f"{eval_batch}) must be divisible by the data-parallel size {data_parallel_size}.",
                          key="eval.samples_per_prompt", value=config.eval.samples_per_prompt)
    return {"batch_size": batch, "micro_batch_size": batch // accum, "eval_batch_size": eval_batch}


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
# Trainer
# ----------------------------------------------------------------------------------------------------------


class SD3Trainer:
    """Builds an SD3 RL run from a config (see the module docstring); ``components`` overrides
    :func:`load_components` (tests). Attributes as :class:`adrpo_jax.flow.trainer.FlowTrainer`'s: ``mesh``,
    ``opts``, ``graphdef``, ``base_graphdef``, ``ref_graphdef``, ``tx``, ``abstract_state``, ``state_shardings``,
    ``ref_params``, ``frozen``, ``step_fn``."""

    def __init__(self, config: Any, workdir: str | os.PathLike, *, components: SD3Components | None = None):
        validate_sd3_config(config)
        self.config, self.workdir = config, os.fspath(workdir)
        self.lora_config = flow_config.lora_config(config)
        trainable = nnx.LoRAParam if self.lora_config is not None else nnx.Param
        self.mesh = train.make_mesh(config.mesh)
        self.layout = validate_batch_layout(config, train.data_parallel_size(self.mesh), jax.process_count())
        self.num_prompts = len(config.data.prompts)
        comp = components if components is not None else load_components(config, self.mesh)
        self.components = comp
        if comp.embeddings.shape[0] != self.num_prompts + 1:
            raise ValueError(f"the prompt table has {comp.embeddings.shape[0]} rows; expected {self.num_prompts} "
                             "prompts + the empty prompt")
        model = MMDiTVelocity(comp.transformer, comp.embeddings, comp.pooled, null_id=self.num_prompts)
        self.reward_state = jax.device_put(comp.reward_state, train.replicated_sharding(self.mesh))
        self.opts = FlowStepOptions.from_config(config, num_conditions=self.num_prompts, null_class=self.num_prompts,
                                                image_shape=comp.latent_shape)
        self.updates_per_step = int(config.rl.num_inner_updates)
        self.tx, self.schedule = train.make_optimizer(config.optim, int(config.total_steps) * self.updates_per_step)

        if self.lora_config is not None:
            key = jax.random.fold_in(jax.random.key(int(config.seed)), 0x10A)
            apply_lora(model, self.lora_config, rngs=nnx.Rngs(params=key))
        self.graphdef, params, frozen = nnx.split(model, trainable, ...)
        self.base_graphdef = self.ref_graphdef = self.graphdef
        if self.lora_config is not None:
            self.base_graphdef = nnx.split(set_lora_enabled(model, False), trainable, ...)[0]
            set_lora_enabled(model, True)
            self.ref_graphdef = self.base_graphdef
        del model
        tx = self.tx

        def plan():
            return {"params": params, "opt_state": tx.init(params)}

        self.abstract_state = train.plan_sharded(plan, self.mesh)
        self.state_shardings = train.shardings_of(self.abstract_state)
        # The pre-trained (frozen) part: the base weights and the prompt table, sharded by their logical names.
        self.frozen = jax.device_put(frozen, train.logical_to_named_sharding(frozen, self.mesh))
        # Without LoRA the reference is a separate copy of the pre-trained weights; with LoRA it is the policy's
        # own base weights with the adapters off (ref_graphdef), so nothing is kept but the initial adapters (host).
        if self.lora_config is not None:
            self._initial_adapters, self.ref_params = jax.tree.map(np.asarray, params), None
        else:
            self._initial_adapters, self.ref_params = None, jax.device_put(params, self.state_shardings["params"])
        del params
        self.rows = train.process_batch_slice(self.layout["batch_size"], self.mesh)
        self.base_key = jax.random.key(int(config.seed))
        repl = train.replicated_sharding(self.mesh)
        lora_dropout = self.lora_config is not None and self.lora_config.dropout > 0
        graphdef, ref_graphdef, opts, mesh = self.graphdef, self.ref_graphdef if self.lora_config else None, \
            self.opts, self.mesh
        make_reward = comp.make_reward

        def step(state, ref_params, frozen, reward_state, cond, key, refresh_ref, refresh_sampler):
            # the reward's arrays (VAE, CLIP) are an argument of the program, not constants baked into it
            inner = make_train_step(graphdef, tx, make_reward(reward_state), opts, mesh, ref_graphdef=ref_graphdef,
                                    lora_dropout=lora_dropout)
            return inner(state, ref_params, frozen, cond, key, refresh_ref, refresh_sampler)

        self.step_fn = jax.jit(step, out_shardings=(self.state_shardings, repl), donate_argnums=0)
        self._build_eval()

    # ------------------------------------------------------------------------------------------------------

    def init_state(self) -> dict[str, Any]:
        """Fresh state: the pre-trained weights (or fresh adapters, B = 0) and a new optimizer state, sharded."""
        sh = self.state_shardings
        if self.ref_params is None:
            params = jax.device_put(self._initial_adapters, sh["params"])
        else:
            params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=sh["params"])(self.ref_params)
        return {"params": params, "opt_state": jax.jit(self.tx.init, out_shardings=sh["opt_state"])(params)}

    def prompts(self, step: int) -> np.ndarray:
        rl = self.config.rl
        return step_prompts(int(self.config.seed), step, int(rl.prompts_per_step), int(rl.samples_per_prompt),
                            self.num_prompts)

    def train_step(self, step: int, state) -> tuple[dict[str, Any], dict[str, Any]]:
        cond = train.host_local_to_global(self.prompts(step)[self.rows], self.mesh)
        key = jax.random.fold_in(self.base_key, step)
        return self.step_fn(state, self.ref_params, self.frozen, self.reward_state, cond, key, np.bool_(False),
                            np.bool_(False))

    def _build_eval(self) -> None:
        config, opts, mesh = self.config, self.opts, self.mesh
        s = int(config.eval.samples_per_prompt)
        cond = np.repeat(np.arange(self.num_prompts, dtype=np.int32), s)
        n = cond.shape[0]
        k_x0, self._sde_key, self._w2_key = jax.random.split(jax.random.key(int(config.eval.seed)), 3)
        x0 = np.asarray(jax.jit(lambda k: sample_noise(k, (n,) + opts.image_shape))(k_x0))
        rows = train.process_batch_slice(n, mesh)
        self._eval_x0 = train.host_local_to_global(x0[rows], mesh)
        self._eval_cond = train.host_local_to_global(cond[rows], mesh)
        repl = train.replicated_sharding(mesh)
        graphdef, base_graphdef, make_reward = self.graphdef, self.base_graphdef, self.components.make_reward
        n_time = int(config.eval.w2_time_samples)
        num_prompts = self.num_prompts

        def merge(params, frozen, g=graphdef):
            return nnx.merge(g, params, frozen)

        def eval_fn(params, ref_params, frozen, reward_state, x0, cond, sde_key, w2_key):
            policy = merge(params, frozen)
            ref = merge(params if ref_params is None else ref_params, frozen, base_graphdef)
            x1 = sample(lambda x, t, c: policy(x, t, c), x0, cond, num_steps=opts.sampling_steps,
                        method=opts.sampling_method, cfg_scale=opts.cfg_scale,
                        null_cond=None if opts.cfg_scale == 1.0 else opts.null_class, sde_noise=opts.sde_noise,
                        key=sde_key if opts.sde_noise > 0 else None, timesteps=opts.time_grid())
            r = make_reward(reward_state)(x1, cond)
            w2 = velocity_w2_bound(lambda x, t, c: policy(x, t, c), lambda x, t, c: ref(x, t, c), x1, cond, w2_key,
                                   num_time_samples=n_time)
            return {"reward_mean": jnp.mean(r), "reward_std": jnp.std(r),
                    "diversity": pairwise_diversity(x1, cond, num_prompts)[1], "w2_bound": w2}

        self._eval = jax.jit(eval_fn, out_shardings=repl)

    def eval_step(self, step: int, state) -> dict[str, Any]:
        del step
        out = self._eval(state["params"], self.ref_params, self.frozen, self.reward_state, self._eval_x0,
                         self._eval_cond, self._sde_key, self._w2_key)
        return {f"eval/{k}": float(v) for k, v in jax.device_get(out).items()}

    def run(self) -> dict[str, Any]:
        config = self.config
        writer = train.MetricWriter(self.workdir, config.logging, run_config=config)
        evaluate = int(config.eval_every) > 0

        def init_state():
            state = self.init_state()
            if evaluate:  # the pre-trained model's numbers at step 0 of a fresh run
                writer.truncate_after(-1)
                writer.write(0, self.eval_step(0, state))
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
        if not result.preempted and config.model.save_final:
            out["final_model"] = self.save_model(result.state["params"], os.path.join(self.workdir, "final_model"))
        return out

    def save_model(self, params, path: str) -> str | None:
        """Writes the policy's MMDiT (LoRA merged: ``W + s A B``) as a diffusers directory (process 0)."""
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        from adrpo_jax.models import mmdit  # pylint: disable=import-outside-toplevel

        gather = (lambda x: multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 \
            else jax.device_get
        host, frozen = gather(params), gather(self.frozen)
        if jax.process_index() != 0:
            return None
        model = nnx.merge(self.graphdef, jax.tree.map(np.asarray, host), jax.tree.map(np.asarray, frozen))
        if self.lora_config is not None:
            model = merge_lora(model)
        mmdit.save_pretrained(model.transformer, path)
        log.info("Saved the fine-tuned MMDiT to %s", path)
        return path


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) SD3 fine-tuning of ``config`` in ``workdir``; returns the last logged metrics plus
    ``step``, ``preempted``, ``resumed_from``."""
    return SD3Trainer(config, workdir).run()
