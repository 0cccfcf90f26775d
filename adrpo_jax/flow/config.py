r"""Config sections of the flow-matching RL trainer (``data``, ``model``, ``pretrain``, ``classifier``, ``reward``,
``rl``, ``sampling``, ``eval``) and their validation.

An experiment config adds them on top of the kit's common sections::

    config = add_flow_config(add_common_config(ml_collections.ConfigDict()))
    config.rl.method = "fixed_beta"

and :func:`validate_flow_config` (called by the trainer before anything is built) checks every key's type and
range and their combinations, raising :class:`~adrpo_jax.train.config.ConfigError` naming the key. Every key
keeps one type so that it can be overridden from the command line; "unset" sentinels are ``''`` for paths,
``0`` for sizes taken from elsewhere and ``inf`` for bounds.

Batch layout: one RL step samples ``rl.samples_per_prompt`` (G) images for each of ``rl.prompts_per_step`` (K)
prompts (condition ids, drawn from ``(seed, step)``), ``B = K * G`` images in prompt-major order. ``B`` must be
divisible by the data-parallel size ``mesh.data * mesh.fsdp`` times ``optim.grad_accum_steps``.
``total_steps`` counts RL steps; each does ``rl.num_inner_updates`` optimizer updates on its batch (the
learning-rate schedule counts updates).

Methods (``rl.method``; ADRPO.md, "Flow matching"), all on the same (t, x0, x_t) draws, with the per-prompt
advantage ``A = r - mean_prompt(r)``:

============== ========================================================================================
``adrpo``      ``A ||v - u||^2 + (beta_0 - clip(A)) ||v - sg(v_ref)||^2``  (ADRPO-W2)
``fixed_beta`` ``A ||v - u||^2 + beta_0 ||v - sg(v_ref)||^2``               (adaptation off)
``orw_cfm_w2`` ``exp(tau r) ||v - u||^2 + alpha ||v - sg(v_ref)||^2``       (ORW-CFM-W2, raw weights)
``none``       ``A ||v - u||^2``                                            (no regularization)
============== ========================================================================================

=====================================  ===================================================================
key                                    meaning
=====================================  ===================================================================
``data.image_size``                    image side (8 = native digits; larger upsamples bilinearly)
``data.condition_mode``                ``digit`` (10 prompts) | ``digit_thickness`` (20: digit AND thin/thick)
``data.test_fraction``, ``split_seed``  the deterministic train/test split
``model.path``                         a DiT directory (``save_dit``) to fine-tune; '' = pre-train (cached)
``model.*``                            the :class:`~adrpo_jax.models.dit.DiTConfig` fields; ``image_size`` /
                                       ``num_classes`` 0 = from ``data``; ``dtype`` is the compute dtype.
                                       With ``model.path`` the architecture is the saved model's, while
                                       ``dtype``, ``param_dtype``, ``remat`` and ``scan_layers`` are the
                                       config's (applied to the loaded model; saved parameters are cast to
                                       ``param_dtype``). ``scan_layers``: the DiT blocks stacked and run by
                                       one ``lax.scan`` (default False; not part of the pre-training cache key)
``model.save_final``                   write the fine-tuned policy (``save_dit``) to ``workdir/final_model``
``pretrain.*``                         conditional flow-matching pre-training (``pretrain.py``), cached under
                                       ``$ADRPO_JAX_CACHE``: steps, batch_size, learning_rate, warmup_steps,
                                       weight_decay, grad_clip, ema_decay, time_sampling, seed, log_every
``classifier.path``                    a classifier directory (``save_classifier``); '' = train it (cached)
``classifier.*``                       the classifier's architecture and training (``pretrain.py``)
``reward.kind``                        ``classifier``: log p(prompted digit) [+ w log p(prompted thickness)];
                                       ``image_stat``: an image statistic (hackable); ``combined``: the sum
                                       classifier + ``image_stat_weight`` * image statistic
``reward.classifier_output``           ``log_prob`` (in (-inf, 0]) | ``prob`` (exp of it, in [0, 1])
``reward.thickness_weight``            w of the thickness log-probability (``digit_thickness`` prompts)
``reward.image_stat``                  ``mean_ink`` | ``neg_mean_ink`` | ``contrast`` | ``sharpness``
``reward.image_stat_target``           inf = the statistic itself; else ``-(stat - target)^2``
``reward.image_stat_scale``            multiplies the statistic's reward
``reward.image_stat_weight``           its weight in ``combined``
``rl.method``                          ``adrpo`` | ``fixed_beta`` | ``orw_cfm_w2`` | ``none`` (table above)
``rl.beta``                            beta_0 (``adrpo``, ``fixed_beta``)
``rl.coefficient_sign``                ``adrpo``: beta_i = beta_0 - clip(A_i) (the paper: better samples
                                       regularized less) | ``crd``: beta_0 + clip(A_i) (better samples
                                       regularized more, Flow-Factory's CRD direction); ``rl.method='adrpo'`` only
``rl.adv_clip``                        clip of A inside the coefficient: ``multiple`` | ``absolute`` | ``none``
``rl.adv_clip_multiple``               ``multiple``: A clipped to +-m * beta_0 (beta_eff in [0, 2 beta_0])
``rl.adv_clip_min`` / ``adv_clip_max``  ``absolute`` bounds (+-inf = unbounded on that side)
``rl.clip_cfm_advantages``             also clip the A that weights the CFM term (default: raw A)
``rl.scale_advantages_by_std``         divide A by the prompt's reward std (+ ``advantage_eps``); default off
``rl.tau`` / ``rl.alpha``              ORW-CFM-W2's reward temperature and fixed W2 coefficient
``rl.orw_max_exponent``                cap on tau * r inside exp (inf = none)
``rl.prompts_per_step``                K prompts per RL step (drawn without repetition while K <= #prompts)
``rl.samples_per_prompt``              G images per prompt (>= 2 for the advantage methods)
``rl.num_inner_updates``               optimizer updates per RL step, each with fresh (t, x0) draws
``rl.time_sampling``                   t of the CFM path: ``uniform`` | ``logit_normal``
``rl.cond_dropout_prob``               CFG dropout of the condition in the loss (same rows for v and v_ref)
``rl.sampler_refresh_steps``           sample from a copy of the policy refreshed every N steps (1 = current)
``rl.ref_refresh_steps``               refresh the reference every N steps (0 = frozen pre-trained model)
``rl.ref_refresh_alpha``               ref = alpha * policy + (1 - alpha) * ref at a refresh (1 = copy)
``sampling.method``                    ``euler`` | ``heun`` | ``midpoint`` (the rollout and eval ODE solver)
``sampling.num_steps``                 integration steps
``sampling.cfg_scale``                 classifier-free guidance scale (1 = none)
``sampling.sde_noise``                 > 0: Euler-Maruyama SDE with the same marginals (method ``euler``)
``eval.samples_per_prompt``            eval images per prompt (fixed noise); every prompt of the mode
``eval.seed``                          seed of the eval noise (fixed over the run)
``eval.w2_time_samples``               (t, x0) draws per sample of the W2 bound
``eval.write_images``                  write ``samples_before.png`` / ``samples_before_after.png``
``lora.enabled``                       train LoRA adapters on the DiT instead of all its weights (below)
``lora.rank`` / ``lora.alpha``         r and alpha (update scale alpha / r; alpha / sqrt(r) with use_rslora)
``lora.dropout``                       dropout on the adapter inputs in the loss's policy forward only (a
                                       fresh key per inner update / micro-batch); sampling, the reference
                                       and evaluation are deterministic. 0 = off
``lora.target_modules``                DiT site names (``'attn.wq'``, ``'wq'``, ``'fc1'``, ``'modulation'``,
                                       ``'final_linear'``, ...), regexes full-matching the site path
                                       (``'blocks\.[0-1]\.attn\..*'``) or ``('all-linear',)``
``lora.init``                          ``kaiming_uniform`` (peft default) | ``gaussian``; B starts at 0
``lora.use_rslora``                    rank-stabilized scale alpha / sqrt(r)
=====================================  ===================================================================

LoRA (``lora.enabled``; :mod:`adrpo_jax.models.lora`): only the adapters are trained and live in the
optimizer state and the checkpoints (the base weights are the pre-trained DiT, reloaded from ``model.path`` or
the pre-training cache on resume). The frozen reference of the W2 term is the same model with its adapters
switched off, so no second copy of the weights exists; with ``rl.ref_refresh_steps > 0`` the reference is base
+ a copy of the adapters taken at each refresh (``rl.ref_refresh_alpha`` must be 1: mixing the factors A and B
is not mixing the weights). ``model.save_final`` writes the merged DiT (``W + s A B``, ``load_dit`` reads it).

>>> from adrpo_jax.train.config import common_config
>>> config = add_flow_config(common_config())
>>> config.rl.method = "ppo"
>>> validate_flow_config(config)
Traceback (most recent call last):
...
adrpo_jax.train.config.ConfigError: `rl.method` must be one of ['adrpo', 'fixed_beta', 'orw_cfm_w2', 'none'], got 'ppo'.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from adrpo_jax.train.config import (ConfigError, get_by_path, merge_defaults, require_choice, require_float,
                                    require_float_or_inf, require_int, require_type, validate_advantage_clip)

__all__ = [
    "add_sd3_config",
    "validate_sd3_config",
    "validate_sd3_batch_layout",
    "SD3_TRAINER",
    "SD3_DEFAULT_PROMPTS",
    "SD3_LORA_TARGETS",
    "METHODS",
    "add_flow_config",
    "validate_flow_config",
    "validate_flow_batch_layout",
    "pretrain_config",
    "num_prompt_conditions",
    "uses_reference",
    "lora_config",
    "LORA_DEFAULT_TARGETS",
]

METHODS = ("adrpo", "fixed_beta", "orw_cfm_w2", "none")
ADVANTAGE_METHODS = ("adrpo", "fixed_beta", "none")
COEFFICIENT_SIGNS = ("adrpo", "crd")  # = adrpo_jax.losses.COEFFICIENT_SIGNS
CONDITION_MODES = ("digit", "digit_thickness")
REWARD_KINDS = ("classifier", "image_stat", "combined")
CLASSIFIER_OUTPUTS = ("log_prob", "prob")
IMAGE_STATS = ("mean_ink", "neg_mean_ink", "contrast", "sharpness")
TIME_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun", "midpoint")
DTYPES = ("float32", "bfloat16", "float16")
# The DiT's attention projections and MLP (not the adaLN modulation, embeddings or the output layer).
LORA_DEFAULT_TARGETS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "fc1", "fc2")

# Keys of the pre-training sections that pretrain.py reads (everything else is the trainer's).
_MODEL_KEYS = ("image_size", "channels", "patch_size", "hidden", "depth", "heads", "mlp_ratio", "num_classes",
               "class_dropout_prob", "frequency_dim", "time_scale", "pos_embed", "dtype", "param_dtype", "remat",
               "scan_layers")
_PRETRAIN_KEYS = ("steps", "batch_size", "learning_rate", "warmup_steps", "weight_decay", "grad_clip",
                  "ema_decay", "time_sampling", "seed", "log_every")
_CLASSIFIER_KEYS = ("channels", "features", "steps", "batch_size", "learning_rate", "weight_decay", "noise_std",
                    "seed")


def add_flow_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the flow trainer's sections (defaults: ADRPO-W2 on composite digit+thickness prompts) in place.

    Keys already present are kept. Returns ``config``.
    """
    defaults = {
        "trainer": "flow",
        "data": {"image_size": 8, "condition_mode": "digit_thickness", "test_fraction": 0.2, "split_seed": 0},
        "model": {
            "path": "",
            "image_size": 0, "channels": 1, "patch_size": 2, "hidden": 64, "depth": 4, "heads": 4,
            "mlp_ratio": 4.0, "num_classes": 0, "class_dropout_prob": 0.1, "frequency_dim": 256,
            "time_scale": 1000.0, "pos_embed": "sincos", "dtype": "float32", "param_dtype": "float32",
            "remat": False, "scan_layers": False,
            "save_final": False,
        },
        "pretrain": {
            "steps": 2000, "batch_size": 64, "learning_rate": 2e-3, "warmup_steps": 100, "weight_decay": 0.0,
            "grad_clip": 1.0, "ema_decay": 0.999, "time_sampling": "uniform", "seed": 0, "log_every": 200,
        },
        "classifier": {
            "path": "",
            "channels": (32, 64, 64), "features": 128, "steps": 800, "batch_size": 128, "learning_rate": 2e-3,
            "weight_decay": 1e-4, "noise_std": 0.1, "seed": 0,
        },
        "reward": {
            "kind": "classifier", "classifier_output": "log_prob", "thickness_weight": 1.0,
            "image_stat": "mean_ink", "image_stat_target": math.inf, "image_stat_scale": 1.0,
            "image_stat_weight": 1.0,
        },
        "rl": {
            "method": "adrpo",
            "beta": 1.0,
            "coefficient_sign": "adrpo",
            "adv_clip": "multiple",
            "adv_clip_multiple": 1.0,
            "adv_clip_min": -math.inf,
            "adv_clip_max": math.inf,
            "clip_cfm_advantages": False,
            "scale_advantages_by_std": False,
            "advantage_eps": 1e-4,
            "tau": 0.5,
            "alpha": 1.0,
            "orw_max_exponent": math.inf,
            "prompts_per_step": 10,
            "samples_per_prompt": 8,
            "num_inner_updates": 1,
            "time_sampling": "uniform",
            "cond_dropout_prob": 0.0,
            "sampler_refresh_steps": 1,
            "ref_refresh_steps": 0,
            "ref_refresh_alpha": 1.0,
        },
        "sampling": {"method": "heun", "num_steps": 10, "cfg_scale": 1.0, "sde_noise": 0.0},
        "eval": {"samples_per_prompt": 8, "seed": 1234, "w2_time_samples": 4, "write_images": True},
        "lora": {"enabled": False, "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": LORA_DEFAULT_TARGETS,
                 "init": "kaiming_uniform", "use_rslora": False},
    }
    merge_defaults(config, defaults)
    return config


# ----------------------------------------------------------------------------------------------------------


def num_prompt_conditions(config: Any) -> int:
    """Number of distinct prompts (condition ids) of ``data.condition_mode``: 10 or 20."""
    return 10 if config.data.condition_mode == "digit" else 20


def uses_reference(config: Any) -> bool:
    """Whether the loss has a W2 term (``none`` has none; its reference forward only feeds ``w2_mean``)."""
    return config.rl.method != "none"


def _validate_data_model(config) -> None:
    require_type(config, "data.image_size", int)
    size = require_int(config, "data.image_size", min=8)
    mode = require_choice(config, "data.condition_mode", CONDITION_MODES)
    require_float(config, "data.test_fraction", min=0.0, max=1.0, min_inclusive=False, max_inclusive=False)
    require_int(config, "data.split_seed", min=0)

    path = require_type(config, "model.path", str)
    if path and not os.path.exists(os.path.join(os.path.expanduser(path), "config.json")):
        raise ConfigError(f"`model.path`={path!r} is not a saved DiT directory (no config.json); '' pre-trains one.",
                          key="model.path", value=path)
    image = require_int(config, "model.image_size", min=0)
    if image not in (0, size):
        raise ConfigError(f"`model.image_size`={image} must be 0 (= data.image_size) or equal `data.image_size`="
                          f"{size}.", key="model.image_size", value=image)
    for key in ("channels", "patch_size", "hidden", "depth", "heads", "frequency_dim"):
        require_int(config, f"model.{key}", min=1)
    if size % config.model.patch_size:
        raise ConfigError(f"`model.patch_size`={config.model.patch_size} must divide the image size {size}.",
                          key="model.patch_size", value=config.model.patch_size)
    if config.model.hidden % config.model.heads:
        raise ConfigError(f"`model.heads`={config.model.heads} must divide `model.hidden`={config.model.hidden}.",
                          key="model.heads", value=config.model.heads)
    if config.model.frequency_dim % 2:
        raise ConfigError(f"`model.frequency_dim` must be even, got {config.model.frequency_dim}.",
                          key="model.frequency_dim", value=config.model.frequency_dim)
    n = num_prompt_conditions(config)
    classes = require_int(config, "model.num_classes", min=0)
    if classes not in (0, n):
        raise ConfigError(f"`model.num_classes`={classes} must be 0 (= from data.condition_mode) or {n} "
                          f"(data.condition_mode={mode!r}).", key="model.num_classes", value=classes)
    require_float(config, "model.mlp_ratio", min=0.0, min_inclusive=False)
    require_float(config, "model.class_dropout_prob", min=0.0, max=1.0, max_inclusive=False)
    require_float(config, "model.time_scale", min=0.0, min_inclusive=False)
    require_choice(config, "model.pos_embed", ("sincos", "learned"))
    require_choice(config, "model.dtype", DTYPES)
    require_choice(config, "model.param_dtype", DTYPES)
    require_type(config, "model.remat", bool)
    require_type(config, "model.scan_layers", bool)
    require_type(config, "model.save_final", bool)

    for key in ("steps", "batch_size", "log_every"):
        require_int(config, f"pretrain.{key}", min=1)
    require_int(config, "pretrain.warmup_steps", min=0)
    require_int(config, "pretrain.seed", min=0)
    require_float(config, "pretrain.learning_rate", min=0.0, min_inclusive=False)
    require_float(config, "pretrain.weight_decay", min=0.0)
    require_float(config, "pretrain.grad_clip", min=0.0)
    require_float(config, "pretrain.ema_decay", min=0.0, max=1.0, max_inclusive=False)
    require_choice(config, "pretrain.time_sampling", TIME_SAMPLINGS)

    cpath = require_type(config, "classifier.path", str)
    if cpath and not os.path.exists(os.path.join(os.path.expanduser(cpath), "config.json")):
        raise ConfigError(f"`classifier.path`={cpath!r} is not a saved classifier directory (no config.json); '' "
                          "trains one.", key="classifier.path", value=cpath)
    channels = get_by_path(config, "classifier.channels")
    if not isinstance(channels, (tuple, list)) or not channels or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
        raise ConfigError(f"`classifier.channels` must be a non-empty tuple of positive ints, got {channels!r}.",
                          key="classifier.channels", value=channels)
    for key in ("features", "steps", "batch_size"):
        require_int(config, f"classifier.{key}", min=1)
    require_int(config, "classifier.seed", min=0)
    require_float(config, "classifier.learning_rate", min=0.0, min_inclusive=False)
    require_float(config, "classifier.weight_decay", min=0.0)
    require_float(config, "classifier.noise_std", min=0.0)


def _validate_reward(config) -> None:
    require_choice(config, "reward.kind", REWARD_KINDS)
    require_choice(config, "reward.classifier_output", CLASSIFIER_OUTPUTS)
    require_float(config, "reward.thickness_weight", min=0.0)
    require_choice(config, "reward.image_stat", IMAGE_STATS)
    target = require_type(config, "reward.image_stat_target", float)
    if target != target or target == -math.inf:
        raise ConfigError(f"`reward.image_stat_target` must be a finite number or +inf (= no target), got "
                          f"{target!r}.", key="reward.image_stat_target", value=target)
    require_float(config, "reward.image_stat_scale")
    require_float(config, "reward.image_stat_weight")


def _validate_rl(config) -> None:
    method = require_choice(config, "rl.method", METHODS)
    require_float(config, "rl.beta", min=0.0)
    sign = require_choice(config, "rl.coefficient_sign", COEFFICIENT_SIGNS)
    if sign != "adrpo" and method != "adrpo":
        raise ConfigError(f"`rl.coefficient_sign`={sign!r} only applies to rl.method='adrpo' (the adaptive "
                          f"coefficient); rl.method={method!r} has no adaptive term. Leave rl.coefficient_sign="
                          "'adrpo'.", key="rl.coefficient_sign", value=sign)
    clip = validate_advantage_clip(config, "rl")
    clip_cfm = require_type(config, "rl.clip_cfm_advantages", bool)
    if clip_cfm and method == "none" and config.rl.adv_clip == "multiple":
        raise ConfigError("`rl.clip_cfm_advantages`=True with rl.method='none' and rl.adv_clip='multiple': the "
                          "clip bounds are +-adv_clip_multiple * beta_0 = +-0 (beta_0 is 0 for 'none'), so every "
                          "CFM weight, the loss and the gradient would be exactly 0 on every step. Set "
                          "rl.clip_cfm_advantages=False, or clip with rl.adv_clip='absolute'.",
                          key="rl.clip_cfm_advantages", value=clip_cfm)
    require_type(config, "rl.scale_advantages_by_std", bool)
    require_float(config, "rl.advantage_eps", min=0.0)
    require_float(config, "rl.tau")
    require_float(config, "rl.alpha", min=0.0)
    cap = require_float_or_inf(config, "rl.orw_max_exponent")
    if cap == -math.inf:
        raise ConfigError("`rl.orw_max_exponent` must be a number or +inf (= no cap), got -inf.",
                          key="rl.orw_max_exponent", value=cap)
    require_int(config, "rl.prompts_per_step", min=1)
    g = require_int(config, "rl.samples_per_prompt", min=1)
    if method in ADVANTAGE_METHODS and g < 2:
        raise ConfigError(f"`rl.samples_per_prompt`={g} must be >= 2 with rl.method={method!r}: the advantage "
                          "r - mean_prompt(r) of a prompt with one sample is 0.", key="rl.samples_per_prompt",
                          value=g)
    require_int(config, "rl.num_inner_updates", min=1)
    require_choice(config, "rl.time_sampling", TIME_SAMPLINGS)
    require_float(config, "rl.cond_dropout_prob", min=0.0, max=1.0, max_inclusive=False)
    require_int(config, "rl.sampler_refresh_steps", min=1)
    sync = require_int(config, "rl.ref_refresh_steps", min=0)
    alpha = require_float(config, "rl.ref_refresh_alpha", min=0.0, max=1.0, min_inclusive=False)
    if sync == 0 and alpha != 1.0:
        raise ConfigError(f"`rl.ref_refresh_alpha`={alpha} has no effect with `rl.ref_refresh_steps`=0 (the "
                          "reference is never refreshed).", key="rl.ref_refresh_alpha", value=alpha)
    if sync > 0 and method == "none":
        raise ConfigError(f"`rl.ref_refresh_steps`={sync} has no effect with rl.method='none' (no W2 term).",
                          key="rl.ref_refresh_steps", value=sync)


def _validate_sampling_eval(config) -> None:
    method = require_choice(config, "sampling.method", SAMPLERS)
    require_int(config, "sampling.num_steps", min=1)
    require_float(config, "sampling.cfg_scale", min=0.0)
    noise = require_float(config, "sampling.sde_noise", min=0.0)
    if noise > 0 and method != "euler":
        raise ConfigError(f"`sampling.sde_noise`={noise} > 0 samples the SDE by Euler-Maruyama: set "
                          f"sampling.method='euler' (got {method!r}).", key="sampling.sde_noise", value=noise)
    require_int(config, "eval.samples_per_prompt", min=2)
    require_int(config, "eval.seed", min=0)
    require_int(config, "eval.w2_time_samples", min=1)
    require_type(config, "eval.write_images", bool)


def _validate_lora(config) -> None:
    lora = lora_config(config)
    if lora is not None and int(config.rl.ref_refresh_steps) > 0 and float(config.rl.ref_refresh_alpha) != 1.0:
        raise ConfigError(f"`rl.ref_refresh_alpha`={config.rl.ref_refresh_alpha} cannot be used with LoRA: the "
                          "refreshed reference is base + a copy of the adapters, and mixing the factors A and B does "
                          "not mix the weights W + s A B. Use rl.ref_refresh_alpha=1.0 (copy) or lora.enabled=False.",
                          key="rl.ref_refresh_alpha", value=config.rl.ref_refresh_alpha)


def lora_config(config: Any):
    """The :class:`~adrpo_jax.models.lora.LoRAConfig` of a validated config, or None when ``lora.enabled`` is off
    (or the config has no ``lora`` section)."""
    from adrpo_jax.recipe.policy import lora_config as build  # pylint: disable=import-outside-toplevel
    return build(config, "DiT site")


def validate_flow_config(config: Any) -> None:
    """Checks every flow-trainer key (types, ranges, combinations); raises :class:`ConfigError` naming the key.

    Device-dependent divisibility is :func:`validate_flow_batch_layout`.
    """
    for section in ("data", "model", "pretrain", "classifier", "reward", "rl", "sampling", "eval"):
        if section not in config:
            raise ConfigError(f"Config section `{section}` is missing (build the config with add_flow_config).",
                              key=section)
    _validate_data_model(config)
    _validate_reward(config)
    _validate_rl(config)
    _validate_sampling_eval(config)
    _validate_lora(config)


def validate_flow_batch_layout(config: Any, data_parallel_size: int, process_count: int = 1) -> dict[str, int]:
    """Divisibility of the RL batch ``K * G`` and of the eval batch by the mesh / micro-batches / processes.

    Returns ``{"batch_size", "micro_batch_size", "eval_batch_size"}``.
    """
    k, g = int(config.rl.prompts_per_step), int(config.rl.samples_per_prompt)
    batch = k * g
    accum = int(config.optim.grad_accum_steps)
    if batch % accum:
        raise ConfigError(f"`optim.grad_accum_steps`={accum} must divide the images per step rl.prompts_per_step * "
                          f"rl.samples_per_prompt = {k} * {g} = {batch}.", key="optim.grad_accum_steps", value=accum)
    micro = batch // accum
    if micro % data_parallel_size:
        what = f" / optim.grad_accum_steps={accum} = {micro}" if accum > 1 else ""
        raise ConfigError(f"The images per step rl.prompts_per_step * rl.samples_per_prompt = {k} * {g} = {batch}"
                          f"{what} must be divisible by the data-parallel size {data_parallel_size} (mesh.data * "
                          "mesh.fsdp).", key="rl.prompts_per_step", value=k)
    if batch % process_count:
        raise ConfigError(f"The images per step {batch} must be divisible by the process count {process_count}.",
                          key="rl.prompts_per_step", value=k)
    eval_batch = num_prompt_conditions(config) * int(config.eval.samples_per_prompt)
    if eval_batch % data_parallel_size:
        raise ConfigError(f"The eval batch (#prompts {num_prompt_conditions(config)} * eval.samples_per_prompt="
                          f"{config.eval.samples_per_prompt} = {eval_batch}) must be divisible by the data-parallel "
                          f"size {data_parallel_size}.", key="eval.samples_per_prompt",
                          value=config.eval.samples_per_prompt)
    return {"batch_size": batch, "micro_batch_size": micro, "eval_batch_size": eval_batch}


def pretrain_config(config: Any) -> ml_collections.ConfigDict:
    """The ``data``/``model``/``pretrain``/``classifier`` sections in the form ``adrpo_jax.flow.pretrain`` reads
    (``model.image_size``/``num_classes`` 0 -> None, trainer-only keys dropped): its cache key."""
    model = {k: config.model[k] for k in _MODEL_KEYS}
    for key in ("image_size", "num_classes"):
        if model[key] == 0:
            model[key] = None
    model["cond_dim"] = None
    return ml_collections.ConfigDict({
        "data": {k: config.data[k] for k in ("image_size", "condition_mode", "test_fraction", "split_seed")},
        "model": model,
        "pretrain": {k: config.pretrain[k] for k in _PRETRAIN_KEYS},
        "classifier": {k: (tuple(config.classifier[k]) if k == "channels" else config.classifier[k])
                       for k in _CLASSIFIER_KEYS},
    })


# ----------------------------------------------------------------------------------------------------------
# The SD3 recipe's sections (adrpo_jax.flow.sd3_trainer): the flow sections with SD3's defaults + vae / text
# ----------------------------------------------------------------------------------------------------------

SD3_TRAINER = "adrpo_jax.flow.sd3_trainer:train_and_evaluate"  # = the recipe name "sd3"
SD3_REWARD_KINDS = ("clip", "image_mean")
# Attribute-binding / counting / composition prompts in the spirit of DrawBench (the paper's prompt set).
SD3_DEFAULT_PROMPTS = (
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
SD3_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "attn.add_q_proj", "attn.add_k_proj",
                        "attn.add_v_proj", "attn.to_add_out", "ff.fc1", "ff.fc2", "ff_context.fc1", "ff_context.fc2")


def add_sd3_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the SD3 trainer's sections (on top of the kit's common ones) in place; existing keys are kept."""
    flow = add_flow_config(ml_collections.ConfigDict())
    defaults = {
        "trainer": SD3_TRAINER,
        "data": {"prompts": SD3_DEFAULT_PROMPTS},
        "model": {"path": "", "tiny": False, "dtype": "bfloat16", "param_dtype": "float32", "remat": False,
                  "scan_layers": False, "save_final": False},
        "vae": {"path": ""},
        "text": {"path": "", "cache_dir": "", "max_sequence_length": 256, "torch_dtype": "float32"},
        "reward": {"kind": "clip", "clip_path": "", "clip_scale": 100.0, "clip_clamp": True},
        "rl": flow.rl.to_dict(),
        "sampling": {"method": "euler", "num_steps": 28, "cfg_scale": 4.5, "sde_noise": 0.0, "time_shift": 3.0},
        "eval": {"samples_per_prompt": 2, "seed": 1234, "w2_time_samples": 1},
        "lora": dict(flow.lora.to_dict(), enabled=True, rank=16, alpha=16.0, target_modules=SD3_LORA_TARGETS),
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
    kind = require_choice(config, "reward.kind", SD3_REWARD_KINDS)
    if kind == "clip":
        _check_dir(config, "reward.clip_path", tiny)
    require_float(config, "reward.clip_scale", min=0.0, min_inclusive=False)
    require_type(config, "reward.clip_clamp", bool)
    for key in ("dtype", "param_dtype"):
        require_choice(config, f"model.{key}", DTYPES)
    for key in ("remat", "scan_layers", "save_final"):
        require_type(config, f"model.{key}", bool)
    _validate_rl(config)
    method = require_choice(config, "sampling.method", SAMPLERS)
    require_int(config, "sampling.num_steps", min=1)
    require_float(config, "sampling.cfg_scale", min=0.0)
    noise = require_float(config, "sampling.sde_noise", min=0.0)
    if noise > 0 and method != "euler":
        raise ConfigError(f"`sampling.sde_noise`={noise} > 0 samples the SDE by Euler-Maruyama: set "
                          f"sampling.method='euler' (got {method!r}).", key="sampling.sde_noise", value=noise)
    require_float(config, "sampling.time_shift", min=0.0, min_inclusive=False)
    require_int(config, "eval.samples_per_prompt", min=2)
    require_int(config, "eval.seed", min=0)
    require_int(config, "eval.w2_time_samples", min=1)
    _validate_lora(config)


def validate_sd3_batch_layout(config: Any, data_parallel_size: int, process_count: int = 1) -> dict[str, int]:
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
