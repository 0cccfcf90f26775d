r"""ADRPO-W2 (and fixed-beta W2, ORW-CFM-W2, no regularization) on an SD3 MMDiT in latent space, text prompts.

    python launch.py --config=configs/sd3_adrpo.py:gpu --workdir=runs/sd3 \
        --config.model.path=/models/sd3-medium/transformer --config.vae.path=/models/sd3-medium/vae \
        --config.text.path=/models/sd3-medium --config.reward.clip_path=/models/clip-vit-large-patch14
    python launch.py --config=configs/sd3_adrpo.py:cpu --workdir=/tmp/sd3_tiny   # tiny random models, cached
    python launch.py --config=configs/sd3_adrpo.py:tpu --workdir=/tmp/plan --mode=plan \
        --config.plan.target=v5e:2x4                         # every program compiled for a v5e-8, no weights

The ``'sd3'`` recipe (``config.trainer = 'sd3'`` or ``'adrpo_jax.flow.sd3_trainer:train_and_evaluate'``). The RL
step, the policy (LoRA, reference refresh, sampling copy) and the phase timing are the flow recipes' own
(:class:`adrpo_jax.flow.recipe.FlowRecipe`, :func:`adrpo_jax.flow.step.make_train_step`: rollout, per-prompt
advantages, ``rl.method`` losses, inner updates, shard_map'd loss, non-finite skip) on
:class:`~adrpo_jax.flow.sd3.MMDiTVelocity`, the MMDiT seen as a velocity field of our convention over integer
prompt ids:

* prompts (``data.prompts`` or ``data.prompts_file``; held-out ``eval.prompts`` / ``eval.prompts_file``) are
  embedded once on the host (:mod:`adrpo_jax.flow.text_embeddings`, cached on disk); the ``[N + E + 1, L, D]`` /
  ``[N + E + 1, P]`` table (training prompts, eval prompts, then the empty prompt = CFG's null row; ``L = 77 +
  text.max_sequence_length``) lives on the devices in the compute dtype as a frozen variable, its rows sharded
  over ``fsdp``, so ``cond [B]`` stays int prompt ids (advantage groups, CFG null id, ``drop_mask``) exactly as
  on digits; it goes from the memory-mapped cache to the devices shard by shard, each process reading only its
  devices' rows (no host copy of the whole table: 25k prompts at SD3's shape are 136 GB in float32);
* images are ``data.height x data.width`` pixels (0 = the model's ``sample_size`` x 8), latents ``[height / 8,
  width / 8, 16]``; the rollout integrates on SD3's shifted schedule (``sampling.time_shift``, 3.0), with CFG
  (``sampling.cfg_scale``) and optionally the marginal-preserving SDE (``sampling.sde_noise``), in micro-batches
  of ``rl.rollout_micro_batch`` images, then decodes the latents with the VAE (``vae.decode_batch`` images at a
  time) and scores the images inside the same jitted program (``reward.kind``: ``clip`` = CLIP score against the
  prompt, ``reward.clip_scale`` * cos, clamped at 0 with ``reward.clip_clamp``, the tower in ``reward.dtype``
  (float32); ``image_mean`` = mean pixel value, a cheap stand-in);
* the training times of the CFM and W2 terms are ``rl.time_sampling`` (logit-normal) draws shifted like the
  rollout grid (``rl.time_shift``, default the sampler's shift: diffusers' SD3 fine-tuning distribution);
* LoRA (``lora.enabled``, default on for SD3): the adapters are the whole train state; the W2 reference is the
  same MMDiT with adapters off (no second copy of the weights).

Model inputs: ``model.path`` (a diffusers ``SD3Transformer2DModel`` directory), ``vae.path`` (its
``AutoencoderKL``), ``text.path`` (a directory with the SD3 text encoders/tokenizers), ``reward.clip_path`` (a
``transformers`` CLIP directory). With ``model.tiny=True`` (the ``cpu`` variant) empty paths are filled with
tiny random models built once and cached (:mod:`adrpo_jax.flow.sd3_tiny`); otherwise an empty path is a
:class:`~adrpo_jax.train.config.ConfigError`. The plan mode (``SD3Trainer(..., abstract=True)``,
``--mode=plan``) loads nothing: the shapes come from the directories' ``config.json`` files, or for empty paths
from :data:`adrpo_jax.flow.sd3.PRESETS` (``model.preset``: SD3-medium / SD3.5-medium / SD3.5-large, SD3's VAE,
CLIP ViT-L/14).

Metrics: the flow step's (``reward_mean``, ``w2_mean``, ``beta_eff_*``, ``cfm_term``, ``w2_term``, ...), and
every ``eval_every`` steps on a fixed batch (every eval prompt x ``eval.samples_per_prompt``, fixed noise, in
calls of ``eval.batch_size`` images): ``eval/reward_mean`` / ``_std``, ``eval/clip_diversity`` (the paper's
ClipDiversity: per-prompt mean pairwise L2 distance of the CLIP image embeddings; reward ``clip``),
``eval/latent_diversity`` (the same on the latents), ``eval/w2_bound`` (the W2 velocity bound to the pre-trained
model at t ~ U(0, 1)), ``eval/w2_bound_train_t`` (the same at the training time distribution: comparable to the
training ``w2_mean``) and ``eval/clip_score_<i>`` for each eval-only scorer of ``eval.clip_paths`` (never trained
on: hacking of the training CLIP shows as a gap). Checkpoints hold the train state (adapters and their optimizer
state with LoRA); the frozen weights and the prompt table are reloaded at start; resume is exact.
``model.save_final`` writes the merged MMDiT in ``model.save_dtype`` (bfloat16) and, with LoRA, the adapters in
the diffusers / peft format (``final_model/lora``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax import train
from adrpo_jax.flow.config import SD3_DEFAULT_PROMPTS as DEFAULT_PROMPTS
from adrpo_jax.flow.config import SD3_LORA_TARGETS as LORA_DEFAULT_TARGETS
from adrpo_jax.flow.config import SD3_TRAINER as TRAINER
from adrpo_jax.flow.config import add_sd3_config, sd3_prompt_sets, validate_sd3_batch_layout, validate_sd3_config
from adrpo_jax.flow.metrics import pairwise_diversity
from adrpo_jax.flow.recipe import FlowRecipe
from adrpo_jax.flow.sampling import sample, sample_noise
from adrpo_jax.flow.sd3 import (
    CLIP_TEXT_TOKENS,
    PRESETS,
    MMDiTVelocity,
    clip_score_components,
    clip_vision_shapes,
    clip_vision_spec,
    shard_prompt_table,
)
from adrpo_jax.flow.step import FlowStepOptions, draw_path_inputs, velocity_fn
from adrpo_jax.train.config import ConfigError
from adrpo_jax.train.programs import Program, abstract_like, key_struct

__all__ = ["TRAINER", "add_sd3_config", "validate_sd3_config", "SD3Shapes", "SD3Components", "SD3Reward",
           "resolve_shapes", "load_components", "SD3Trainer", "train_and_evaluate", "DEFAULT_PROMPTS",
           "LORA_DEFAULT_TARGETS"]

log = logging.getLogger(__name__)

validate_batch_layout = validate_sd3_batch_layout  # the name of earlier releases

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------------------------------------
# Shapes (from config.json files or presets) and the reward
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SD3Shapes:
    """What a run's programs are shaped by (no weights): the MMDiT / VAE configs, the CLIP towers' specs, the
    prompt table ``[rows, text_len, text_dim]`` / ``[rows, pooled_dim]`` (``rows`` = training + eval prompts + the
    null row, padded to a multiple of ``fsdp``) and the latent shape ``(h, w, c)``."""

    transformer: Any
    vae: Any
    clip: tuple[Any, int] | None           # (CLIPVisionSpec, intermediate size) of the training reward's tower
    eval_clips: tuple[tuple[Any, int], ...]  # of eval.clip_paths
    num_prompts: int                       # N training prompts: ids 0..N-1
    num_eval_prompts: int                  # E held-out prompts: ids N..N+E-1 (0: eval on the training prompts)
    rows: int
    text_len: int
    text_dim: int
    pooled_dim: int
    latent_shape: tuple[int, int, int]
    table_dtype: Any

    @property
    def null_id(self) -> int:
        return self.num_prompts + self.num_eval_prompts

    @property
    def clip_rows(self) -> int:
        """Rows of the CLIP text tables (every training and eval prompt)."""
        return self.num_prompts + self.num_eval_prompts


def _model_overrides(config: Any) -> dict[str, Any]:
    m = config.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=bool(m.remat), remat_policy=m.remat_policy or None,
                scan_layers=bool(m.scan_layers), attention_impl=m.attention_impl or None)


def _paths(config: Any) -> dict[str, str]:
    """The model directories of ``config`` (tiny random ones, built once and cached, for empty paths when
    ``model.tiny``); '' = none given."""
    paths = {"model": config.model.path, "vae": config.vae.path, "text": config.text.path,
             "clip": config.reward.clip_path}
    if bool(config.model.tiny) and not all(paths.values()):
        from adrpo_jax.flow.sd3_tiny import build_tiny_sd3  # pylint: disable=import-outside-toplevel
        built = build_tiny_sd3()
        paths = {k: (v or built[k]) for k, v in paths.items()}
    return {k: os.path.expanduser(v) if v else "" for k, v in paths.items()}


def _clip_text_tokens(text_path: str) -> int:
    """The CLIP part of the prompt states' length: the CLIP-L tokenizer's ``model_max_length`` (77 for SD3)."""
    cfg = Path(text_path) / "tokenizer" / "tokenizer_config.json" if text_path else None
    if cfg is not None and cfg.is_file():
        value = json.loads(cfg.read_text()).get("model_max_length")
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
    return CLIP_TEXT_TOKENS


def _latent_shape(config: Any, tcfg: Any, vcfg: Any) -> tuple[int, int, int]:
    """``(height / f, width / f, c)`` of ``data.height`` / ``data.width`` (0 = ``sample_size * f``), f the VAE
    factor; ConfigError naming the key unless the side is a multiple of ``f * patch`` within the MMDiT's
    position table."""
    f, p = vcfg.downsample_factor, tcfg.patch_size
    out = []
    for key in ("data.height", "data.width"):
        px = int(train.get_by_path(config, key)) or tcfg.sample_size * f
        if px % (f * p):
            raise ConfigError(f"`{key}`={px} must be a multiple of {f * p} (the VAE factor {f} x the MMDiT patch size "
                              f"{p}).", key=key, value=px)
        side = px // f
        if tcfg.pos_embed_max_size is not None and side // p > tcfg.pos_embed_max_size:
            raise ConfigError(f"`{key}`={px} px is {side // p} patches, above the MMDiT's position table "
                              f"(pos_embed_max_size={tcfg.pos_embed_max_size}: at most "
                              f"{tcfg.pos_embed_max_size * p * f} px).", key=key, value=px)
        out.append(side)
    return out[0], out[1], tcfg.in_channels


def resolve_shapes(config: Any, mesh: jax.sharding.Mesh, *, prompts: tuple[tuple[str, ...], tuple[str, ...]]
                   ) -> SD3Shapes:
    """The :class:`SD3Shapes` of a validated config without reading any weight: each part's ``config.json`` when
    its path is given (or ``model.tiny`` built it), else the preset of ``model.preset`` (:data:`PRESETS`)."""
    from adrpo_jax.models import mmdit  # pylint: disable=import-outside-toplevel
    from adrpo_jax.models import vae as vae_lib

    paths, preset = _paths(config), PRESETS[config.model.preset]
    for part, key in (("model", "model.path"), ("vae", "vae.path"), ("clip", "reward.clip_path")):
        if part == "clip" and config.reward.kind != "clip":
            continue
        if paths[part] and not os.path.isfile(os.path.join(paths[part], "config.json")):
            raise ConfigError(f"`{key}`={paths[part]!r} has no config.json here: the shapes are read from it (a plan "
                              "without the files: leave the path empty to use model.preset).", key=key,
                              value=paths[part])
    overrides = _model_overrides(config)
    try:
        tcfg = (mmdit.read_config(paths["model"], **overrides) if paths["model"]
                else mmdit.preset_config(preset["transformer"], **overrides))
    except ValueError as err:
        raise ConfigError(f"`model.*`: {err}", key="model.path", value=config.model.path) from None
    chunk = int(config.vae.attention_query_chunk) or None
    vcfg = (vae_lib.read_config(paths["vae"], attention_query_chunk=chunk) if paths["vae"]
            else vae_lib.sd3_config(attention_query_chunk=chunk))
    clip = None
    if config.reward.kind == "clip":
        clip = clip_vision_spec(paths["clip"] or preset["clip"])
    eval_clips = tuple(clip_vision_spec(p if os.path.isfile(os.path.join(os.path.expanduser(p), "config.json"))
                                        else preset["clip"]) for p in config.eval.clip_paths)
    train_prompts, eval_prompts = prompts
    fsdp = int(mesh.shape.get("fsdp", 1))
    rows = -(-(len(train_prompts) + len(eval_prompts) + 1) // fsdp) * fsdp
    return SD3Shapes(transformer=tcfg, vae=vcfg, clip=clip, eval_clips=eval_clips, num_prompts=len(train_prompts),
                     num_eval_prompts=len(eval_prompts), rows=rows,
                     text_len=_clip_text_tokens(paths["text"]) + int(config.text.max_sequence_length),
                     text_dim=tcfg.joint_attention_dim, pooled_dim=tcfg.pooled_projection_dim,
                     latent_shape=_latent_shape(config, tcfg, vcfg), table_dtype=_DTYPES[config.model.dtype])


class SD3Reward:
    """The recipe's reward as a pure function of its arrays ``state`` (``{"vae": VAE state, "clip": {"params",
    "text"}}``; ``"clip"`` empty for ``image_mean``), so the large towers are arguments, not program constants:
    ``reward = SD3Reward(...).bind(state)``; ``reward(latents [B, h, w, c], cond [B]) -> [B]`` and
    ``reward.components(latents, cond) -> {"reward", "clip_cosine"}``: the VAE decode (``decode_batch`` images at a
    time, strided chunks) of the sampler's scaled latents, then the CLIP score (``scale * max(cos, 0)``) or the
    mean pixel value."""

    def __init__(self, vae_graphdef: Any, clip_spec: Any = None, *, scale: float = 100.0, clamp: bool = True,
                 dtype: Any = jnp.float32, decode_batch: int | None = None):
        self.vae_graphdef, self.clip_spec = vae_graphdef, clip_spec
        self.scale, self.clamp, self.dtype, self.decode_batch = float(scale), bool(clamp), dtype, decode_batch

    def decode(self, vae_state: Any, latents: jax.Array) -> jax.Array:
        """Images ``[B, H, W, 3]`` in about ``[-1, 1]`` of the sampler's (scaled) latents."""
        from adrpo_jax.models.vae import make_decode_fn  # pylint: disable=import-outside-toplevel
        b, chunk = latents.shape[0], self.decode_batch
        chunk = None if not chunk or chunk >= b else math.gcd(b, chunk)  # a divisor: strided, sharding-friendly
        return make_decode_fn(self.vae_graphdef, scaled=True, batch_chunk=chunk)(vae_state, latents)

    def image_components(self, clip_state: Any, images: jax.Array, cond: jax.Array
                         ) -> tuple[dict[str, jax.Array], jax.Array | None]:
        """``(components, CLIP image embeddings [B, E] or None)`` of decoded images."""
        if self.clip_spec is None:
            return {"reward": jnp.mean(images.astype(jnp.float32), axis=(1, 2, 3))}, None
        return clip_score_components(clip_state, self.clip_spec, images, cond, scale=self.scale, clamp=self.clamp,
                                     dtype=self.dtype)

    def bind(self, state: dict[str, Any]) -> _BoundSD3Reward:
        return _BoundSD3Reward(self, state)


class _BoundSD3Reward:
    def __init__(self, reward: SD3Reward, state: dict[str, Any]):
        self.reward, self.state = reward, state

    def components(self, latents: jax.Array, cond: jax.Array) -> dict[str, jax.Array]:
        images = self.reward.decode(self.state["vae"], latents)
        return self.reward.image_components(self.state["clip"], images, cond)[0]

    def __call__(self, latents: jax.Array, cond: jax.Array) -> jax.Array:
        return self.components(latents, cond)["reward"]


# ----------------------------------------------------------------------------------------------------------
# Components: what a run loads (the recipe builds them; tests may pass their own)
# ----------------------------------------------------------------------------------------------------------


class SD3Components:
    """What a run is built from (all loaded on the host once).

    ``transformer``: the MMDiT (:mod:`adrpo_jax.models.mmdit`); ``embeddings [rows, L, D]``, ``pooled [rows,
    P]``: the prompt table (training prompts, eval prompts, the empty prompt = ``null_id``, zero padding rows),
    host numpy or already-placed device arrays (:func:`load_components`: ``embeddings`` flattened ``[rows, L * D]``
    and sharded by :func:`adrpo_jax.flow.sd3.shard_prompt_table`, with ``text_shape = (L, D)``);
    ``latent_shape`` ``(h, w, c)``; ``reward_state``: the arrays of the reward path (``{"vae", "clip"}``, any
    pytree passed to the jitted programs as an argument); ``reward``: the :class:`SD3Reward` over them
    (``reward.bind(reward_state) -> reward(latents, cond)``); ``eval_state``: ``{"clips": (...)}``
    the eval-only CLIP scorers' arrays, ``eval_clip_specs`` their specs; ``null_id``: the empty prompt's row
    (default: the last row). An :class:`SD3Trainer` that loaded the components itself releases the host / device
    copies it has placed (``embeddings``, ``pooled``, ``reward_state``, ``eval_state`` become None)."""

    def __init__(self, transformer, embeddings, pooled, latent_shape, reward_state, reward: SD3Reward, *,
                 eval_state: Any = None, eval_clip_specs: tuple = (), null_id: int | None = None,
                 text_shape: tuple[int, int] | None = None):
        self.transformer = transformer
        host = lambda a: a if isinstance(a, jax.Array) else np.asarray(a)  # noqa: E731 (device tables stay put)
        table = host(embeddings)
        self.embeddings: jax.Array | np.ndarray | None = table
        self.pooled: jax.Array | np.ndarray | None = host(pooled)
        self.text_shape = None if text_shape is None else (int(text_shape[0]), int(text_shape[1]))
        shape = tuple(int(d) for d in latent_shape)
        if len(shape) != 3:
            raise ValueError(f"`latent_shape`={latent_shape!r} must be (h, w, c).")
        self.latent_shape: tuple[int, int, int] = (shape[0], shape[1], shape[2])
        self.reward_state, self.reward = reward_state, reward
        self.eval_state = eval_state if eval_state is not None else {"clips": ()}
        self.eval_clip_specs = tuple(eval_clip_specs)
        self.null_id = int(table.shape[0] - 1 if null_id is None else null_id)


def _sd3_reward(config: Any, vae_graphdef: Any, clip_spec: Any) -> SD3Reward:
    """The :class:`SD3Reward` of ``config.reward`` / ``vae.decode_batch`` on a VAE graph and a CLIP spec (or None)."""
    return SD3Reward(vae_graphdef, clip_spec, scale=float(config.reward.clip_scale),
                     clamp=bool(config.reward.clip_clamp), dtype=_DTYPES[config.reward.dtype],
                     decode_batch=int(config.vae.decode_batch) or None)


def _clip_state(path: str, prompts: list[str], cache_dir: str | None) -> tuple[dict[str, Any], Any]:
    from adrpo_jax.flow.clip_reward import CLIPScoreReward  # pylint: disable=import-outside-toplevel
    clip = CLIPScoreReward.from_pretrained(path, prompts, cache_dir=cache_dir)
    return jax.tree.map(np.asarray, clip.state), clip.spec


def load_components(config: Any, mesh: jax.sharding.Mesh | None = None, *,
                    shapes: SD3Shapes | None = None) -> SD3Components:
    """Loads the MMDiT (placed sharded on ``mesh`` by its logical axis names), the VAE, the prompt table and the
    reward arrays of ``config`` (tiny random models, built once and cached, for empty paths when ``model.tiny``).

    The prompt table goes from the memory-mapped embedding cache straight to its sharded device copy in the
    compute dtype (:func:`adrpo_jax.flow.sd3.shard_prompt_table`): each process reads only the rows its devices
    hold, one shard at a time; no process holds the whole table in host memory."""
    from adrpo_jax.flow import text_embeddings  # pylint: disable=import-outside-toplevel
    from adrpo_jax.models import mmdit  # pylint: disable=import-outside-toplevel
    from adrpo_jax.models import vae as vae_lib

    mesh = mesh if mesh is not None else train.make_mesh(config.mesh)
    prompt_sets = sd3_prompt_sets(config)
    shapes = shapes if shapes is not None else resolve_shapes(config, mesh, prompts=prompt_sets)
    paths = _paths(config)
    transformer = mmdit.load_pretrained(paths["model"], mesh=mesh, **_model_overrides(config))
    vae = vae_lib.load_pretrained(paths["vae"], attention_query_chunk=int(config.vae.attention_query_chunk) or None)
    prompts = [*prompt_sets[0], *prompt_sets[1]]
    from adrpo_jax.cache import cache_root  # pylint: disable=import-outside-toplevel
    # the prompt embeddings and the CLIP text features: computed once with torch, then read from this cache
    cache_dir = os.path.expanduser(config.text.cache_dir) if config.text.cache_dir else \
        str(cache_root() / "prompt_embeddings")
    table = text_embeddings.cached_prompt_embeddings(
        prompts, paths["text"], cache_dir, max_sequence_length=int(config.text.max_sequence_length),
        joint_attention_dim=int(transformer.config.joint_attention_dim), torch_dtype=config.text.torch_dtype)
    if table.null_id != len(prompts) or tuple(table.prompts[:len(prompts)]) != tuple(prompts):
        raise ValueError(f"the prompt table's rows {table.prompts[:5]}... are not the training + eval prompts "
                         "followed by the empty prompt")
    n, dtype = len(prompts) + 1, shapes.table_dtype
    if tuple(table.embeddings.shape[1:]) != (shapes.text_len, shapes.text_dim):
        raise ValueError(f"the prompt table's states are {table.embeddings.shape[1:]}, expected "
                         f"{(shapes.text_len, shapes.text_dim)} (text.max_sequence_length + the CLIP tokens)")
    if table.num_prompts != n:
        raise ValueError(f"the prompt table has {table.num_prompts} rows, expected {n}")
    # rows n..shapes.rows-1 are zero padding; each process reads only its devices' rows of the memory map
    embeddings = shard_prompt_table(table.embeddings, shapes.rows, mesh, dtype, flatten=True)
    pooled = shard_prompt_table(table.pooled, shapes.rows, mesh, dtype)
    del table
    clip_state: dict[str, Any] = {}
    clip_spec = None
    if config.reward.kind == "clip":
        clip_state, clip_spec = _clip_state(paths["clip"], prompts, cache_dir)
    eval_clips = [_clip_state(os.path.expanduser(p), prompts, cache_dir) for p in config.eval.clip_paths]
    vae_graphdef, vae_state = nnx.split(vae)
    return SD3Components(transformer, embeddings, pooled, shapes.latent_shape,
                         {"vae": vae_state, "clip": clip_state}, _sd3_reward(config, vae_graphdef, clip_spec),
                         eval_state={"clips": tuple(c[0] for c in eval_clips)},
                         eval_clip_specs=tuple(c[1] for c in eval_clips), null_id=shapes.null_id,
                         text_shape=(shapes.text_len, shapes.text_dim))


# ----------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------


class SD3Trainer(FlowRecipe):
    """The SD3 recipe (module docstring); ``components`` overrides :func:`load_components` (tests). Attributes:
    :class:`~adrpo_jax.recipe.base.Recipe`'s (``fns["step"]``: the fused RL step), ``opts``, plus ``shapes``
    (:class:`SD3Shapes`), ``layout``, ``train_prompts`` / ``eval_prompts``.

    ``abstract=True`` (the plan mode): no weight, tokenizer or text encoder is loaded; every program's abstract
    arguments are at the run's real shapes (:func:`resolve_shapes`)."""

    name = "sd3"
    shrink_keys: ClassVar[dict[str, str]] = {"step": "optim.grad_accum_steps", "update": "optim.grad_accum_steps",
                                             "sample": "rl.rollout_micro_batch", "reward": "vae.decode_batch"}

    def __init__(self, config: Any, workdir: str | os.PathLike, *, components: SD3Components | None = None,
                 mesh: jax.sharding.Mesh | None = None, abstract: bool = False):
        validate_sd3_config(config, abstract=abstract)
        super().__init__(config, workdir, mesh=mesh, abstract=abstract)
        self.train_prompts, self.eval_prompts = self._prompt_sets(config)
        self.num_prompts = self.num_conditions = len(self.train_prompts)
        self.layout = validate_sd3_batch_layout(config, train.data_parallel_size(self.mesh),
                                                1 if abstract else jax.process_count(),
                                                num_eval_prompts=len(self.eval_prompts) or self.num_prompts)
        self.shapes = shapes = resolve_shapes(config, self.mesh, prompts=(self.train_prompts, self.eval_prompts))
        comp = None
        if not abstract:
            comp = components if components is not None else load_components(config, self.mesh, shapes=shapes)
            if comp.embeddings is None:
                raise ValueError("`components` were released by the SD3Trainer that loaded them (it placed their "
                                 "prompt table and reward arrays): load them again with load_components.")
            if comp.embeddings.shape[0] != shapes.rows or comp.null_id != shapes.null_id:
                raise ValueError(f"the prompt table has {comp.embeddings.shape[0]} rows (null row {comp.null_id}); "
                                 f"expected {shapes.rows} (null row {shapes.null_id})")
            shapes = self.shapes = dataclasses.replace(shapes, latent_shape=comp.latent_shape)
        self.components = comp
        self.opts = FlowStepOptions.from_config(config, num_conditions=self.num_prompts, null_class=shapes.null_id,
                                                image_shape=shapes.latent_shape)
        tcfg = comp.transformer.config if comp is not None else shapes.transformer

        def new_model():  # only ever built abstractly / under jit
            from adrpo_jax.models import mmdit  # pylint: disable=import-outside-toplevel
            return self._with_lora(MMDiTVelocity(
                mmdit.MMDiT(tcfg, rngs=nnx.Rngs(0)),
                jnp.zeros((shapes.rows, shapes.text_len, shapes.text_dim), shapes.table_dtype),
                jnp.zeros((shapes.rows, shapes.pooled_dim), shapes.table_dtype), null_id=shapes.null_id))

        def load_pretrained():  # the loaded MMDiT + the placed table; with LoRA its initial adapters (B = 0)
            return self._with_lora(MMDiTVelocity(comp.transformer, comp.embeddings, comp.pooled, null_id=shapes.null_id,
                                                 dtype=shapes.table_dtype, text_shape=comp.text_shape))

        self._build_policy(new_model, None if abstract else load_pretrained)
        repl = train.replicated_sharding(self.mesh)
        if abstract:
            self.reward, reward_state, eval_state = self._abstract_reward(config, shapes)
            self.eval_clip_specs = tuple(spec for spec, _ in shapes.eval_clips)
            self.reward_state = abstract_like(reward_state, repl)
            self.eval_state = abstract_like(eval_state, repl)
        else:
            assert comp is not None  # loaded above when not abstract
            self.reward, self.eval_clip_specs = comp.reward, comp.eval_clip_specs
            self.reward_state = jax.device_put(comp.reward_state, repl)
            self.eval_state = jax.device_put(comp.eval_state, repl)
            if components is None:  # ours: the placed host copies are not needed any more
                comp.reward_state = comp.eval_state = comp.embeddings = comp.pooled = None
        self._set_programs(self.step_programs() + self.eval_programs())
        if not abstract:
            self._eval_inputs()

    # ---- prompts / shapes -------------------------------------------------------------------------------------

    @staticmethod
    def _prompt_sets(config: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        for key in ("data.prompts_file", "eval.prompts_file"):
            path = str(train.get_by_path(config, key))
            if path and not os.path.isfile(os.path.expanduser(path)):
                raise ConfigError(f"`{key}`={path!r} does not exist: the prompt table (and a plan's figures) are "
                                  "sized by its prompts.", key=key, value=path)
        return sd3_prompt_sets(config)

    @staticmethod
    def _abstract_reward(config: Any, shapes: SD3Shapes) -> tuple[SD3Reward, dict[str, Any], dict[str, Any]]:
        """The plan mode's reward and its abstract ``reward_state`` / ``eval_state`` (shapes only)."""
        from adrpo_jax.models.vae import AutoencoderKL  # pylint: disable=import-outside-toplevel
        vae_graphdef, vae_state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(shapes.vae, rngs=nnx.Rngs(0))))

        def clip(spec, inter):  # a CLIP tower's arrays: the vision weights, the prompts' text features
            return {"params": clip_vision_shapes(spec, inter),
                    "text": jax.ShapeDtypeStruct((shapes.clip_rows, spec.projection_dim), jnp.float32)}

        reward = _sd3_reward(config, vae_graphdef, None if shapes.clip is None else shapes.clip[0])
        reward_state = {"vae": vae_state, "clip": {} if shapes.clip is None else clip(*shapes.clip)}
        return reward, reward_state, {"clips": tuple(clip(spec, inter) for spec, inter in shapes.eval_clips)}

    def make_reward(self, *reward_args: Any) -> Callable:
        return self.reward.bind(*reward_args)

    def reward_args(self) -> tuple:
        return (self.reward_state,)

    def reward_arg_structs(self) -> tuple:
        return (abstract_like(self.reward_state),)

    # ---- evaluation -----------------------------------------------------------------------------------------

    def eval_programs(self) -> list[Program]:
        """``eval/noise`` (the fixed eval noise of the whole padded eval batch) and ``eval/step`` (one call of
        ``eval.batch_size`` images: sample with CFG, decode, rewards, diversities, W2 bounds; per-call sums)."""
        config, opts, mesh, policy = self.config, self.opts, self.mesh, self.policy
        call, calls = self.layout["eval_call_size"], self.layout["eval_calls"]
        spp = int(config.eval.samples_per_prompt)
        groups = call // spp
        shape = (call,) + tuple(opts.image_shape)
        graphdef, base_graphdef, reward = policy.graphdef, policy.base_graphdef, self.reward
        n_time = int(config.eval.w2_time_samples)
        eval_specs = list(self.eval_clip_specs)

        def w2(policy_model, ref, x1, cond, key, train_t):
            """Per-sample ``||v - v_ref||^2`` at (t, x0) draws: t ~ U(0, 1), or the training times (shifted)."""
            total = jnp.zeros(x1.shape[:1], jnp.float32)
            for i in range(n_time):  # static and small: the forward batch stays the call's
                k = jax.random.fold_in(key, i)
                if train_t:
                    t, x0, _ = draw_path_inputs(dataclasses.replace(opts, cond_dropout_prob=0.0), k, x1, mesh)
                else:
                    kt, kx = jax.random.split(k)
                    t, x0 = jax.random.uniform(kt, x1.shape[:1]), sample_noise(kx, x1.shape)
                tb = t.reshape((-1,) + (1,) * (x1.ndim - 1))
                x_t = (1.0 - tb) * x0 + tb * x1
                diff = policy_model(x_t, t, cond) - ref(x_t, t, cond)
                total = total + jnp.mean(jnp.square(diff), axis=tuple(range(1, x1.ndim)))
            return total / n_time

        def group_sums(feats, group, mask):
            per_group, _ = pairwise_diversity(feats, jnp.where(mask, group, groups), groups)
            counts = jnp.sum(jax.nn.one_hot(jnp.where(mask, group, groups), groups), axis=0)
            has = counts > 1
            return jnp.sum(jnp.where(has, per_group, 0.0)), jnp.sum(has).astype(jnp.float32)

        def eval_fn(params, ref_params, frozen, reward_state, eval_state, x0, cond, group, mask, sde_key, w2_key):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                policy_model = velocity_fn(graphdef, params, frozen)
                ref = velocity_fn(base_graphdef, ref_params, frozen)
                x1 = sample(policy_model, x0, cond, num_steps=opts.sampling_steps,
                            method=opts.sampling_method, cfg_scale=opts.cfg_scale,
                            null_cond=None if opts.cfg_scale == 1.0 else opts.null_class, sde_noise=opts.sde_noise,
                            key=sde_key if opts.sde_noise > 0 else None, timesteps=opts.time_grid())
                k_u, k_t = jax.random.split(w2_key)
                w2_u = w2(policy_model, ref, x1, cond, k_u, False)
                w2_t = w2(policy_model, ref, x1, cond, k_t, True)
            m = mask.astype(jnp.float32)
            images = reward.decode(reward_state["vae"], x1)
            comps, feats = reward.image_components(reward_state["clip"], images, cond)
            r = comps["reward"]
            out = {"reward_sum": jnp.sum(r * m), "reward_sq_sum": jnp.sum(jnp.square(r) * m), "count": jnp.sum(m),
                   "w2_sum": jnp.sum(w2_u * m), "w2_train_t_sum": jnp.sum(w2_t * m)}
            out["latent_div_sum"], out["div_groups"] = group_sums(x1, group, mask)
            if feats is not None:
                out["clip_div_sum"] = group_sums(feats, group, mask)[0]
            for i, (spec, state) in enumerate(zip(eval_specs, eval_state["clips"], strict=True)):
                score = clip_score_components(state, spec, images, cond, scale=reward.scale, clamp=reward.clamp,
                                              dtype=reward.dtype)[0]["reward"]
                out[f"clip_score_{i}_sum"] = jnp.sum(score * m)
            return out

        bs = train.batch_sharding(mesh)
        params = lambda: self.abstract_state["params"]  # noqa: E731
        rows = lambda dtype: jax.ShapeDtypeStruct((call,), dtype, sharding=bs)  # noqa: E731
        full = (call * calls,) + tuple(opts.image_shape)
        return [Program("eval/noise", lambda k: sample_noise(k, full), args=lambda: (key_struct(),), phase="eval",
                        out_shardings=train.replicated_sharding(mesh), per_step=0.0),  # once per run
                Program("eval/step", eval_fn, out_shardings=train.replicated_sharding(mesh), phase="eval",
                        shrink_key="eval.batch_size", per_step=float(calls),
                        args=lambda: (params(), params(), policy.abstract_frozen, abstract_like(self.reward_state),
                                      abstract_like(self.eval_state),
                                      jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bs), rows(jnp.int32),
                                      rows(jnp.int32), rows(jnp.bool_), key_struct(), key_struct()))]

    def _eval_inputs(self) -> None:
        """The fixed eval batch, padded to whole calls: per call ``(x0, cond, group, mask)`` global arrays. Its
        prompt rows: every eval prompt (held-out ids ``N..N+E-1``, else the training ids) ``eval.samples_per_prompt``
        times, prompt-major."""
        call, calls = self.layout["eval_call_size"], self.layout["eval_calls"]
        spp = int(self.config.eval.samples_per_prompt)
        p, e = self.num_prompts, len(self.eval_prompts)
        cond = np.repeat(np.arange(p, p + e, dtype=np.int32) if e else np.arange(p, dtype=np.int32), spp)
        n = cond.shape[0]
        total = call * calls
        mask = np.arange(total) < n
        cond = np.concatenate([cond, np.zeros((total - n,), np.int32)])
        group = (np.arange(total) % call) // spp
        k_x0, self._sde_key, self._w2_key = jax.random.split(jax.random.key(int(self.config.eval.seed)), 3)
        x0 = np.asarray(self.fns["eval/noise"](k_x0))
        rows = train.process_batch_slice(call, self.mesh)
        put = lambda a: train.host_local_to_global(a[rows], self.mesh)  # noqa: E731
        self._eval_calls = []
        for i in range(calls):
            s = slice(i * call, (i + 1) * call)
            self._eval_calls.append((put(x0[s]), put(cond[s].astype(np.int32)), put(group[s].astype(np.int32)),
                                     put(mask[s])))

    def evaluate(self, step: int, state) -> dict[str, Any]:
        del step
        ref = self.policy.pretrained_params(state)
        sums: dict[str, float] = {}
        for i, (x0, cond, group, mask) in enumerate(self._eval_calls):
            out = self.fns["eval/step"](state["params"], ref, self.frozen, self.reward_state, self.eval_state, x0,
                                        cond, group, mask, jax.random.fold_in(self._sde_key, i),
                                        jax.random.fold_in(self._w2_key, i))
            for k, v in jax.device_get(out).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        count = max(sums.pop("count"), 1.0)
        mean = sums["reward_sum"] / count
        metrics = {"eval/reward_mean": mean,
                   "eval/reward_std": math.sqrt(max(sums["reward_sq_sum"] / count - mean * mean, 0.0)),
                   "eval/w2_bound": sums["w2_sum"] / count, "eval/w2_bound_train_t": sums["w2_train_t_sum"] / count}
        groups = max(sums["div_groups"], 1.0)
        metrics["eval/latent_diversity"] = sums["latent_div_sum"] / groups
        if "clip_div_sum" in sums:
            metrics["eval/clip_diversity"] = sums["clip_div_sum"] / groups
        for i in range(len(self.eval_clip_specs)):
            metrics[f"eval/clip_score_{i}"] = sums[f"clip_score_{i}_sum"] / count
        return metrics

    # ---- export ---------------------------------------------------------------------------------------------

    def export(self, params, path: str | os.PathLike) -> str | None:
        """Writes the policy's MMDiT (LoRA merged: ``W + s A B``) as a diffusers directory in
        ``model.save_dtype`` and, with LoRA, the adapters in the diffusers / peft format under ``path/lora``
        (``pytorch_lora_weights.safetensors`` with their peft config,
        :func:`adrpo_jax.models.mmdit.save_diffusers_lora`: ``pipe.load_lora_weights(path)``) (process 0)."""
        from adrpo_jax.models import mmdit  # pylint: disable=import-outside-toplevel

        lora_dir = None
        if self.policy.lora is not None:
            lora_dir = os.path.join(os.fspath(path), "lora")
            mmdit.save_diffusers_lora(nnx.merge(self.policy.graphdef, params, self.frozen).transformer, lora_dir)
        model = self._merged_on_host(params)
        if model is None:
            return None
        transformer = getattr(model, "transformer", None)
        if not isinstance(transformer, mmdit.MMDiT):
            raise TypeError(f"the merged policy ({type(model).__name__}) holds no MMDiT transformer (got "
                            f"{type(transformer).__name__}): cannot export it to {path}.")
        mmdit.save_pretrained(transformer, path, dtype=_DTYPES[self.config.model.save_dtype])
        log.info("Saved the fine-tuned MMDiT (%s) to %s%s", self.config.model.save_dtype, path,
                 f" and its LoRA adapters to {lora_dir}" if lora_dir else "")
        return str(path)

    def _merged_on_host(self, params) -> nnx.Module | None:
        """``policy.merged(params, to_host=True)`` without the prompt table: the frozen state is gathered to the
        host with the table replaced by one zero row (an export writes the transformer only; the whole table on
        every host would be 68 GB at 25k prompts in bfloat16). Process 0 gets the module, the others None."""
        def slim(path, x):
            if path and getattr(path[0], "key", None) in ("embeddings", "pooled"):  # the PromptTable variables
                return np.zeros((1, *x.shape[1:]), x.dtype)
            return x

        return self.policy.merged(params, to_host=True,
                                  frozen=jax.tree_util.tree_map_with_path(slim, self.frozen))

    def load_final(self, path: Path) -> Any:
        """The trainable parameters of an exported (merged) diffusers MMDiT directory."""
        from adrpo_jax.models import mmdit  # pylint: disable=import-outside-toplevel

        transformer = mmdit.load_pretrained(path, mesh=self.mesh, **_model_overrides(self.config))
        s = self.shapes  # a one-row stand-in table: only the trainable (transformer) state is returned
        model = MMDiTVelocity(transformer, np.zeros((1, s.text_len, s.text_dim), np.float32),
                              np.zeros((1, s.pooled_dim), np.float32), null_id=0)
        return jax.device_put(nnx.state(model, self.trainable), self.state_shardings["params"])


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) SD3 fine-tuning of ``config`` in ``workdir``; returns the last logged metrics plus
    ``step``, ``preempted``, ``resumed_from``."""
    return SD3Trainer(config, workdir).run()
