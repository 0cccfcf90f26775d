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

Methods (``rl.method``; docs/math.md, "Flow matching"), all on the same (t, x0, x_t) draws, with the per-prompt
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
``eval.gold_rewards``                  reward-hacking monitor: scorers never trained on, logged as ``eval/gold/<name>``
                                       beside the training reward (LLM: reward functions on the held-out completions;
                                       flow: ``('judge',)``, the independent judge); () = off
``eval.proxy_metric``                  the optimized reward the monitor compares with ('' = ``reward_mean``)
``eval.stop_when``                     '' = log only; ``gold_falls:N``: checkpoint and stop when a gold reward stays
                                       below its best for N evaluations while the proxy rises (``result["stopped"]``)
``eval.stop_min_drop``                 how far below its best a gold value must be to count as a fall
``eval.monitor_window``                evaluations in the monitor's trends (``monitor/*`` metrics)
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

from adrpo_jax.train.monitor import MONITOR_DEFAULTS, validate_monitor_config
from adrpo_jax.train.config import (ConfigError, checking_files, get_by_path, merge_defaults, require_choice,
                                    require_float, require_float_or_inf, require_int, require_sections, require_type,
                                    validate_advantage_clip, validate_ref_refresh)

__all__ = [
    "add_sd3_config",
    "validate_sd3_config",
    "validate_sd3_batch_layout",
    "sd3_prompt_sets",
    "read_prompts_file",
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
        "eval": {"samples_per_prompt": 8, "seed": 1234, "w2_time_samples": 4, "write_images": True,
                 **MONITOR_DEFAULTS},
        "lora": {"enabled": False, "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": LORA_DEFAULT_TARGETS,
                 "init": "kaiming_uniform", "use_rslora": False},
    }
    merge_defaults(config, defaults)
    return config


def num_prompt_conditions(config: Any) -> int:
    """Number of distinct prompts (condition ids) of ``data.condition_mode``: 10 or 20."""
    return 10 if config.data.condition_mode == "digit" else 20


def uses_reference(config: Any) -> bool:
    """Whether the loss has a W2 term (``none`` has none; its reference forward only feeds ``w2_mean``)."""
    return config.rl.method != "none"


def _validate_data_model(config) -> None:
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
    for key in ("dtype", "param_dtype"):
        require_choice(config, f"model.{key}", DTYPES)
    for key in ("remat", "scan_layers", "save_final"):
        require_type(config, f"model.{key}", bool)

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
    validate_advantage_clip(config, "rl")
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
    sync = validate_ref_refresh(config, "rl.ref_refresh_steps", "rl.ref_refresh_alpha")
    if sync > 0 and method == "none":
        raise ConfigError(f"`rl.ref_refresh_steps`={sync} has no effect with rl.method='none' (no W2 term).",
                          key="rl.ref_refresh_steps", value=sync)


def _validate_sampling_eval(config, sd3: bool = False) -> None:
    """The sampler and the eval keys both flow recipes have (``sd3``: with ``sampling.time_shift``)."""
    method = require_choice(config, "sampling.method", SAMPLERS)
    require_int(config, "sampling.num_steps", min=1)
    require_float(config, "sampling.cfg_scale", min=0.0)
    noise = require_float(config, "sampling.sde_noise", min=0.0)
    if noise > 0 and method != "euler":
        raise ConfigError(f"`sampling.sde_noise`={noise} > 0 samples the SDE by Euler-Maruyama: set "
                          f"sampling.method='euler' (got {method!r}).", key="sampling.sde_noise", value=noise)
    if sd3:
        require_float(config, "sampling.time_shift", min=0.0, min_inclusive=False)
    require_int(config, "eval.samples_per_prompt", min=2)
    require_int(config, "eval.seed", min=0)
    require_int(config, "eval.w2_time_samples", min=1)


def _validate_lora(config) -> None:
    if lora_config(config) is not None:
        validate_ref_refresh(config, "rl.ref_refresh_steps", "rl.ref_refresh_alpha", lora=True)


def lora_config(config: Any):
    """The :class:`~adrpo_jax.models.lora.LoRAConfig` of a validated config, or None when ``lora.enabled`` is off
    (or the config has no ``lora`` section)."""
    from adrpo_jax.recipe.policy import lora_config as build  # pylint: disable=import-outside-toplevel
    return build(config, "DiT site")


def validate_flow_config(config: Any) -> None:
    """Checks every flow-trainer key (types, ranges, combinations); raises :class:`ConfigError` naming the key.

    Device-dependent divisibility is :func:`validate_flow_batch_layout`.
    """
    require_sections(config, ("data", "model", "pretrain", "classifier", "reward", "rl", "sampling", "eval"),
                     "add_flow_config")
    _validate_data_model(config)
    _validate_reward(config)
    _validate_rl(config)
    _validate_sampling_eval(config)
    require_type(config, "eval.write_images", bool)
    if "gold_rewards" in config.eval:  # the reward-hacking monitor (adrpo_jax.train.monitor): gold = the judge
        validate_monitor_config(config, "flow")
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
# The MMDiT shapes a plan (abstract build) uses when model.path is empty: adrpo_jax.models.mmdit.PRESETS.
SD3_MODEL_PRESETS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
SD3_ATTENTION_IMPLS = ("", "xla", "cudnn")  # '' = jax.nn.dot_product_attention's default (XLA)
ORW_REWARD_SCALINGS = ("raw", "center", "standardize")
# The exponent tau * r of ORW-CFM-W2's raw weights: above ~20 the weights (~5e8 and up) drown the fixed W2 term;
# above 88 exp overflows float32.
ORW_MAX_RAW_EXPONENT = 20.0
_FLOAT32_EXP_MAX = 88.0
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
    """Adds the SD3 trainer's sections (on top of the kit's common ones) in place; existing keys are kept.

    The SD3 keys beyond the flow trainer's (``adrpo_jax/flow/sd3_trainer.py`` documents the recipe):

    =====================================  ===================================================================
    key                                    meaning
    =====================================  ===================================================================
    ``data.prompts``                       the training prompts (one advantage group each)
    ``data.prompts_file``                  a text file, one prompt per line (blank lines skipped): replaces
                                           ``data.prompts`` when set
    ``data.height`` / ``data.width``       image size in pixels (non-square allowed), divisible by the VAE
                                           factor (8) x the MMDiT patch size (2) = 16; 0 = the model's
                                           ``sample_size`` x 8 (1024 px for SD3 / SD3.5). The latents are
                                           ``[height / 8, width / 8, 16]``
    ``model.path``                         a diffusers ``SD3Transformer2DModel`` directory
    ``model.preset``                       the MMDiT shapes of a plan (``--mode=plan``, no weights) when
                                           ``model.path`` is empty: ``sd3-medium`` | ``sd3.5-medium`` |
                                           ``sd3.5-large`` (the VAE: SD3's; the CLIP reward: ViT-L/14)
    ``model.attention_impl``               ``''`` (XLA: materializes the ``[B, heads, T, T]`` scores) |
                                           ``xla`` | ``cudnn`` (fused flash attention on NVIDIA GPUs; bf16/fp16)
    ``model.remat`` / ``remat_policy``     per-block rematerialization; a ``jax.checkpoint_policies`` name or
                                           ``''`` (save nothing)
    ``model.save_final``                   write ``workdir/final_model``: the merged MMDiT (diffusers layout) in
                                           ``model.save_dtype`` (``bfloat16`` default: the size of the released
                                           checkpoints), and with LoRA ``final_model/lora`` (the adapters as
                                           ``pytorch_lora_weights.safetensors``, ``pipe.load_lora_weights``)
    ``vae.decode_batch``                   images the reward's VAE decode runs at once (a multiple of the
                                           data-parallel size; 0 = the whole batch): its activation memory
                                           follows it (~3.5 GiB per 1024 px image in float32)
    ``vae.attention_query_chunk``          the VAE mid-block attention's query chunk (0 = never chunk)
    ``reward.clip_scale``                  CLIP score = scale * max(cos, 0) (100: the paper's "ClipScore"
                                           points). The advantages are in these units: ``rl.beta`` (beta_0) and
                                           ``rl.adv_clip_multiple`` clip A at +-beta_0 *points*, so with scale
                                           100 and beta_0 = 1 a prompt whose samples differ by more than ~1 point
                                           has beta_eff in {0, 2 beta_0}; choose beta_0 with the scale (e.g. the
                                           typical within-prompt reward std)
    ``reward.dtype``                       matmul dtype of the CLIP reward tower (float32 default, whatever the
                                           MMDiT's: the within-prompt reward differences are ~1 %)
    ``rl.time_shift``                      SD3's shift of the training times (sigma' = s sigma / (1 + (s - 1)
                                           sigma), sigma = 1 - t, on the ``rl.time_sampling`` draw); 0 = the
                                           sampler's ``sampling.time_shift`` (3: diffusers' SD3 fine-tuning)
    ``rl.rollout_micro_batch``             images the rollout samples at once (CFG doubles the forward batch;
                                           a multiple of the data-parallel size dividing the batch; 0 = all)
    ``rl.orw_reward_scaling``              ORW-CFM-W2's exponent: ``raw`` exp(tau r) (the published code; refused
                                           when tau * the reward's range > 20) | ``center`` exp(tau (r - mean))
                                           | ``standardize`` exp(tau (r - mean) / std) (default: tau is unitless;
                                           refused when tau sqrt(K G - 1), its largest exponent, overflows)
    ``eval.prompts`` / ``prompts_file``    held-out eval prompts (never trained on; disjoint from the training
                                           prompts); none = evaluate on the training prompts
    ``eval.batch_size``                    eval images per program call (a multiple of
                                           ``eval.samples_per_prompt`` and of the data-parallel size; 0 = all)
    ``eval.clip_paths``                    eval-only CLIP scorers (``CLIPModel`` directories) never trained on:
                                           ``eval/clip_score_<i>``, so hacking of the training reward shows
                                           (``reward.clip_path`` itself is refused)
    =====================================  ===================================================================
    """
    flow = add_flow_config(ml_collections.ConfigDict())
    defaults = {
        "trainer": SD3_TRAINER,
        "data": {"prompts": SD3_DEFAULT_PROMPTS, "prompts_file": "", "height": 0, "width": 0},
        "model": {"path": "", "preset": "sd3-medium", "tiny": False, "dtype": "bfloat16", "param_dtype": "float32",
                  "remat": False, "remat_policy": "", "scan_layers": False, "attention_impl": "",
                  "save_final": False, "save_dtype": "bfloat16"},
        "vae": {"path": "", "decode_batch": 0, "attention_query_chunk": 4096},
        "text": {"path": "", "cache_dir": "", "max_sequence_length": 256, "torch_dtype": "float32"},
        "reward": {"kind": "clip", "clip_path": "", "clip_scale": 100.0, "clip_clamp": True, "dtype": "float32"},
        # t = sigmoid(N(0, 1)) (logit-normal, symmetric in sigma = 1 - t), then SD3's shift (rl.time_shift): the
        # distribution of diffusers' SD3 fine-tuning (median sigma 0.75) and of the shifted rollout grid.
        "rl": dict(flow.rl.to_dict(), prompts_per_step=4, samples_per_prompt=4, time_sampling="logit_normal",
                   time_shift=0.0, rollout_micro_batch=0, orw_reward_scaling="standardize"),
        "sampling": {"method": "euler", "num_steps": 28, "cfg_scale": 4.5, "sde_noise": 0.0, "time_shift": 3.0},
        "eval": {"samples_per_prompt": 2, "seed": 1234, "w2_time_samples": 1, "prompts": (), "prompts_file": "",
                 "batch_size": 0, "clip_paths": ()},
        "lora": dict(flow.lora.to_dict(), enabled=True, rank=16, alpha=16.0, target_modules=SD3_LORA_TARGETS),
    }
    merge_defaults(config, defaults)
    return config


def _check_dir(config: Any, key: str, tiny: bool, files: bool = True) -> str:
    path = require_type(config, key, str)
    if not path:
        if tiny or not files:
            return path
        raise ConfigError(f"`{key}` is required: a local directory ({_WHAT[key]}); pass --config.{key}=/path. "
                          "Nothing is downloaded. (The `cpu` variant of configs/sd3_adrpo.py builds tiny random "
                          "models instead: model.tiny=True.)", key=key, value=path)
    if files and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"`{key}`={path!r} is not a directory ({_WHAT[key]}).", key=key, value=path)
    return path


_WHAT = {
    "model.path": "a diffusers SD3Transformer2DModel directory with config.json and diffusion_pytorch_model*"
                  ".safetensors, e.g. <sd3-medium>/transformer",
    "vae.path": "a diffusers AutoencoderKL directory, e.g. <sd3-medium>/vae",
    "text.path": "the SD3 pipeline directory with text_encoder, text_encoder_2, text_encoder_3 and their tokenizers",
    "reward.clip_path": "a transformers CLIPModel directory, e.g. openai/clip-vit-large-patch14 saved locally",
}


def _prompt_list(config: Any, key: str, allow_empty: bool, why: str = "") -> tuple[str, ...]:
    prompts = get_by_path(config, key)
    if not isinstance(prompts, (tuple, list)) or not all(isinstance(p, str) and p.strip() for p in prompts) or (
            not prompts and not allow_empty):
        raise ConfigError(f"`{key}` must be a {'' if allow_empty else 'non-empty '}tuple of non-empty strings, got "
                          f"{prompts!r}.", key=key, value=prompts)
    if len(set(prompts)) != len(prompts):
        raise ConfigError(f"`{key}` has duplicates{why}.", key=key, value=tuple(prompts))
    return tuple(prompts)


def read_prompts_file(path: str, key: str) -> tuple[str, ...]:
    """The prompts of a text file (one per line, surrounding whitespace stripped, blank lines skipped);
    ConfigError naming ``key`` for a missing / unreadable / empty file or a duplicate prompt (with its lines)."""
    full = os.path.expanduser(path)
    try:
        with open(full, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"`{key}`={path!r} cannot be read as a UTF-8 text file of prompts (one per line): "
                          f"{err}.", key=key, value=path) from None
    prompts: list[str] = []
    first: dict[str, int] = {}  # prompt -> its first line number
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if text in first:
            raise ConfigError(f"`{key}`={path!r}: line {number} repeats the prompt of line {first[text]} ({text!r}); "
                              "each prompt is one advantage group.", key=key, value=path)
        first[text] = number
        prompts.append(text)
    if not prompts:
        raise ConfigError(f"`{key}`={path!r} has no prompt (one per line; blank lines are skipped).", key=key,
                          value=path)
    return tuple(prompts)


def sd3_prompt_sets(config: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(training prompts, held-out eval prompts)`` of a validated SD3 config: ``data.prompts_file`` (else
    ``data.prompts``) and ``eval.prompts_file`` (else ``eval.prompts``; empty = evaluate on the training
    prompts). The eval prompts never appear among the training prompts (validated)."""
    train_file = str(config.data.prompts_file)
    train_prompts = read_prompts_file(train_file, "data.prompts_file") if train_file else tuple(config.data.prompts)
    eval_file = str(config.eval.prompts_file)
    eval_prompts = read_prompts_file(eval_file, "eval.prompts_file") if eval_file else tuple(config.eval.prompts)
    return train_prompts, eval_prompts


def _validate_sd3_prompts(config: Any, files: bool) -> None:
    _prompt_list(config, "data.prompts", bool(config.data.prompts_file), " (each prompt is one advantage group)")
    eval_prompts = _prompt_list(config, "eval.prompts", allow_empty=True)
    for key in ("data.prompts_file", "eval.prompts_file"):
        path = require_type(config, key, str)
        if path and files and not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"`{key}`={path!r} is not a file (one prompt per line).", key=key, value=path)
    if config.eval.prompts_file and eval_prompts:
        raise ConfigError("Set `eval.prompts` or `eval.prompts_file`, not both.", key="eval.prompts_file",
                          value=config.eval.prompts_file)
    if not files and (config.data.prompts_file or config.eval.prompts_file):
        return  # shapes only: the files are read (and checked) where they exist
    train_prompts, eval_prompts = sd3_prompt_sets(config)
    shared = sorted(set(train_prompts) & set(eval_prompts))
    if shared:
        key = "eval.prompts_file" if config.eval.prompts_file else "eval.prompts"
        raise ConfigError(f"`{key}`: {len(shared)} eval prompt(s) are also training prompts ({shared[:3]!r}): a "
                          "held-out eval set is never trained on. Leave eval.prompts / eval.prompts_file empty to "
                          "evaluate on the training prompts.", key=key, value=shared[:3])


def _validate_orw_scaling(config: Any) -> None:
    """ORW-CFM-W2's exponent against the reward's range: refuse weights that overflow float32 or drown the W2
    term (issue: exp(0.5 * 100 cos) ~ 1e7 made the W2 term ~1e-7 of the loss). ``standardize``: over the step's
    n = K * G samples |r - mean| / std <= sqrt(n - 1) (population std), so tau * sqrt(n - 1) bounds the exponent."""
    scaling = require_choice(config, "rl.orw_reward_scaling", ORW_REWARD_SCALINGS)
    if config.rl.method != "orw_cfm_w2":
        return
    tau = abs(float(config.rl.tau))
    cap = float(config.rl.orw_max_exponent)
    if scaling == "standardize":
        n = int(config.rl.prompts_per_step) * int(config.rl.samples_per_prompt)
        exponent = tau * math.sqrt(max(n - 1, 0))
        if exponent > _FLOAT32_EXP_MAX and not cap <= _FLOAT32_EXP_MAX:
            raise ConfigError(f"`rl.tau`={config.rl.tau} with rl.orw_reward_scaling='standardize': a standardized "
                              f"reward of the step's {n} samples reaches sqrt({n - 1}), so tau z reaches "
                              f"{exponent:.4g} > {_FLOAT32_EXP_MAX:g} (float32 exp overflow). Lower rl.tau or cap it "
                              "with rl.orw_max_exponent.", key="rl.tau", value=config.rl.tau)
        return
    span = float(config.reward.clip_scale) if config.reward.kind == "clip" else 2.0  # image_mean: [-1, 1]
    what = f"the reward's range ({span:g}: reward.clip_scale)" if config.reward.kind == "clip" else \
        f"the reward's range ({span:g})"
    exponent = tau * span
    if scaling == "raw" and exponent > ORW_MAX_RAW_EXPONENT and not cap <= ORW_MAX_RAW_EXPONENT:
        raise ConfigError(f"`rl.orw_reward_scaling`='raw' with rl.tau={config.rl.tau} and {what}: exp(tau r) reaches "
                          f"exp({exponent:g}), so the reward weights (~{math.exp(min(exponent, 700.0) / 2):.0e} at "
                          f"half the range) drown the fixed W2 term (alpha={config.rl.alpha}) and overflow float32 "
                          f"above tau r = {_FLOAT32_EXP_MAX:g}. Use rl.orw_reward_scaling='standardize' (tau "
                          f"unitless) or 'center', or a tau with tau * range <= {ORW_MAX_RAW_EXPONENT:g}.",
                          key="rl.orw_reward_scaling", value=scaling)
    if scaling == "center" and exponent > _FLOAT32_EXP_MAX and not cap <= _FLOAT32_EXP_MAX:
        raise ConfigError(f"`rl.orw_reward_scaling`='center' with rl.tau={config.rl.tau} and {what}: tau (r - mean) "
                          f"can reach {exponent:g} > {_FLOAT32_EXP_MAX:g} (float32 exp overflow). Lower rl.tau, cap "
                          "it with rl.orw_max_exponent, or use 'standardize'.", key="rl.tau", value=config.rl.tau)


def validate_sd3_config(config: Any, *, abstract: bool = False) -> None:
    """Checks the SD3 trainer's keys; raises :class:`ConfigError` naming the key. ``abstract`` (the plan mode,
    also inside ``train.config.shapes_only()``): no file or directory needs to exist (empty paths take the
    ``model.preset`` shapes)."""
    require_sections(config, ("data", "model", "vae", "text", "reward", "rl", "sampling", "eval", "lora"),
                     "add_sd3_config")
    files = not abstract and checking_files()
    _validate_sd3_prompts(config, files)
    for key in ("data.height", "data.width"):  # multiples of VAE factor x patch (16 for SD3): checked with the
        require_int(config, key, min=0)           # models' configs (adrpo_jax.flow.sd3_trainer.resolve_shapes)
    tiny = require_type(config, "model.tiny", bool)
    for key in ("model.path", "vae.path", "text.path"):
        _check_dir(config, key, tiny, files)
    require_choice(config, "model.preset", SD3_MODEL_PRESETS)
    require_type(config, "text.cache_dir", str)
    require_int(config, "text.max_sequence_length", min=1)
    require_choice(config, "text.torch_dtype", ("float32", "bfloat16", "float16"))
    kind = require_choice(config, "reward.kind", SD3_REWARD_KINDS)
    if kind == "clip":
        _check_dir(config, "reward.clip_path", tiny, files)
    require_float(config, "reward.clip_scale", min=0.0, min_inclusive=False)
    require_type(config, "reward.clip_clamp", bool)
    require_choice(config, "reward.dtype", DTYPES)
    for key in ("dtype", "param_dtype", "save_dtype"):
        require_choice(config, f"model.{key}", DTYPES)
    for key in ("remat", "scan_layers", "save_final"):
        require_type(config, f"model.{key}", bool)
    impl = require_choice(config, "model.attention_impl", SD3_ATTENTION_IMPLS)
    if impl == "cudnn" and config.model.dtype == "float32":
        raise ConfigError("`model.attention_impl`='cudnn' needs model.dtype 'bfloat16' or 'float16' (cuDNN's fused "
                          "attention has no float32 path).", key="model.attention_impl", value=impl)
    policy = require_type(config, "model.remat_policy", str)
    if policy:
        import jax  # pylint: disable=import-outside-toplevel
        if policy.startswith("_") or not callable(getattr(jax.checkpoint_policies, policy, None)):
            names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
            raise ConfigError(f"`model.remat_policy`={policy!r} is not a jax.checkpoint_policies name; one of "
                              f"{names} or '' (save nothing).", key="model.remat_policy", value=policy)
        if not config.model.remat:
            raise ConfigError(f"`model.remat_policy`={policy!r} has no effect with model.remat=False.",
                              key="model.remat_policy", value=policy)
    require_int(config, "vae.decode_batch", min=0)
    require_int(config, "vae.attention_query_chunk", min=0)
    _validate_rl(config)
    require_float(config, "rl.time_shift", min=0.0)
    require_int(config, "rl.rollout_micro_batch", min=0)
    _validate_orw_scaling(config)
    _validate_sampling_eval(config, sd3=True)
    require_int(config, "eval.batch_size", min=0)
    clip_paths = get_by_path(config, "eval.clip_paths")
    if not isinstance(clip_paths, (tuple, list)) or not all(isinstance(p, str) and p for p in clip_paths):
        raise ConfigError(f"`eval.clip_paths` must be a tuple of CLIPModel directories, got {clip_paths!r}.",
                          key="eval.clip_paths", value=clip_paths)
    for path in clip_paths if files else ():
        if not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"`eval.clip_paths`: {path!r} is not a directory ({_WHAT['reward.clip_path']}).",
                              key="eval.clip_paths", value=path)
    trained = str(config.reward.clip_path) if kind == "clip" else ""
    same = [p for p in clip_paths if trained and _same_path(p, trained)]
    if same:  # its score is the training reward: it cannot show hacking of it
        raise ConfigError(f"`eval.clip_paths`: {same[0]!r} is reward.clip_path, the scorer the policy is trained "
                          "on; an eval-only scorer must be another CLIP model so that "
                          "hacking of the training reward shows.", key="eval.clip_paths", value=same[0])
    _validate_lora(config)


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _divisor_error(key: str, value: int, total: int, what: str, dp: int) -> ConfigError:
    return ConfigError(f"`{key}`={value} must divide {what} ({total}) and be a multiple of the data-parallel size "
                       f"{dp} (mesh.data * mesh.fsdp): every micro-batch is spread over all devices.", key=key,
                       value=value)


def validate_sd3_batch_layout(config: Any, data_parallel_size: int, process_count: int = 1, *,
                              num_eval_prompts: int | None = None) -> dict[str, int]:
    """Divisibility of the RL batch ``K * G`` (by micro-batches, the mesh's batch axes, processes), of the rollout
    and decode micro-batches, and of the eval calls (``num_eval_prompts`` x ``eval.samples_per_prompt`` images in
    calls of ``eval.batch_size``; ``num_eval_prompts`` default: ``len(data.prompts)``).

    Returns ``{"batch_size", "micro_batch_size", "rollout_micro_batch", "decode_batch", "eval_batch_size",
    "eval_call_size", "eval_calls"}`` (0s resolved: the whole batch; the last eval call is padded)."""
    dp = int(data_parallel_size)
    k, g = int(config.rl.prompts_per_step), int(config.rl.samples_per_prompt)
    batch, accum = k * g, int(config.optim.grad_accum_steps)
    if batch % accum or (batch // accum) % dp:
        raise ConfigError(f"The images per step rl.prompts_per_step * rl.samples_per_prompt = {k} * {g} = {batch} "
                          f"must be divisible by optim.grad_accum_steps={accum} times the data-parallel size "
                          f"{dp} (mesh.data * mesh.fsdp).", key="rl.prompts_per_step", value=k)
    if batch % process_count:
        raise ConfigError(f"The images per step {batch} must be divisible by the process count {process_count}.",
                          key="rl.prompts_per_step", value=k)
    rollout = int(config.rl.rollout_micro_batch) or batch
    if batch % rollout or rollout % dp:
        raise _divisor_error("rl.rollout_micro_batch", rollout, batch, "the images per step "
                             "rl.prompts_per_step * rl.samples_per_prompt", dp)
    decode = int(config.vae.decode_batch) or batch
    if batch % decode or decode % dp:
        raise _divisor_error("vae.decode_batch", decode, batch, "the images per step", dp)
    n_eval = len(config.data.prompts) if num_eval_prompts is None else int(num_eval_prompts)
    spp = int(config.eval.samples_per_prompt)
    eval_batch = n_eval * spp
    call = int(config.eval.batch_size)
    if call and (call % spp or call % dp):
        raise ConfigError(f"`eval.batch_size`={call} must be a multiple of eval.samples_per_prompt={spp} (whole "
                          f"prompts per call) and of the data-parallel size {dp} (mesh.data * mesh.fsdp).",
                          key="eval.batch_size", value=call)
    unit = spp * dp // math.gcd(spp, dp)  # the smallest call: whole prompts on every device
    call = min(call or eval_batch, _round_up(eval_batch, unit))
    call = _round_up(call, unit)
    return {"batch_size": batch, "micro_batch_size": batch // accum, "rollout_micro_batch": rollout,
            "decode_batch": decode, "eval_batch_size": eval_batch, "eval_call_size": call,
            "eval_calls": -(-eval_batch // call)}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m
