"""Config sections of the LLM trainer (``model``, ``data``, ``rl``, ``sampling``, ``rewards``, ``eval``) and
their validation.

An experiment config adds them on top of the kit's common sections::

    config = add_llm_config(add_common_config(ml_collections.ConfigDict()))
    config.rl.beta = 0.04

and :func:`validate_llm_config` (called by the trainer at start, before anything is loaded) checks every key's
type and range and the combinations, raising :class:`~adrpo_jax.train.config.ConfigError` naming the key.
"Unset" sentinels keep one type per key so that every key can be overridden from the command line
(``''`` for strings, ``0`` for counts, ``inf`` for bounds).

Batch layout: one RL step draws ``rl.num_prompts_per_step`` prompts and samples ``rl.group_size`` completions
of each, a *rollout batch* of ``B = num_prompts_per_step * group_size`` rows (a group's rows are contiguous).
The batch is split into ``rl.num_minibatches`` minibatches, each giving one optimizer update, for
``rl.num_iterations`` passes (GRPO's mu): ``num_iterations * num_minibatches`` updates per RL step. Each
minibatch is further split into ``optim.grad_accum_steps`` micro-batches whose gradients are summed
(exactly the minibatch gradient). ``total_steps`` counts RL steps; the learning-rate schedule counts updates.

=====================================  ===================================================================
key                                    meaning
=====================================  ===================================================================
``model.path``                         ``builtin:tiny_arith`` (the project's SFT'd char-level model, built and
                                       cached on first use), ``builtin:smollm2`` (SmolLM2-135M-Instruct,
                                       converted offline once), or a local Hugging Face directory
``model.tokenizer_path``               tokenizer directory ('' = ``model.path``)
``model.dtype`` / ``model.param_dtype``  compute / parameter dtype: float32 | bfloat16 | float16
``model.remat``, ``model.remat_policy``  per-layer gradient checkpointing ('' = save nothing)
``model.scan_layers``                  stacked decoder layers run by one ``lax.scan`` (True; False: a Python list
                                       of layers, e.g. to resume a checkpoint written before layer stacking)
``model.attention_impl``               ``auto`` (splash on TPU, cudnn on GPU where the shapes allow, chunked on CPU
                                       from ``attention_auto_min_len``, xla below) | ``xla`` (the quadratic
                                       reference) | ``chunked`` (flash-style, memory linear in T) | ``cudnn`` |
                                       ``splash``
``model.attention_chunk_size``         key slots per block of the ``chunked`` implementation
``model.attention_auto_min_len``       ``auto`` uses chunked attention on CPU when T * S >= this**2
``model.logprob_chunk_size``           token positions per chunk of the log-softmax (memory ~ chunk * vocab)
``model.save_final``                   write the trained policy as a Hugging Face directory (with the
                                       tokenizer) to ``workdir/final_model`` when the run completes
``data.source``                        ``arithmetic`` (built-in task) | ``jsonl`` (one JSON object per line)
``data.path``                          the jsonl file (``jsonl`` source)
``data.prompt_key``/``data.answer_key``  jsonl fields of the question / the reference answer
``data.answer_format``                 ``gsm8k`` (the answer is what follows ``####``) | ``raw``
``data.prompt_template``               ``str.format`` template with ``{prompt}`` (e.g. ``'Q: {prompt}\\nA:'``)
``data.chat_template``                 wrap the prompt in the tokenizer's chat template (instruct models)
``data.system_prompt``                 optional system message for the chat template
``data.shuffle``                       jsonl: reshuffle every epoch from (seed, epoch)
``data.on_bad_row``                    jsonl rows that fail the load checks (invalid JSON, a missing or null field,
                                       an unparsable answer, a bad audio file): ``raise`` (one error naming the
                                       file and each bad line) | ``skip`` (drop them; counted and logged)
``data.arithmetic.*``                  ``min_digits``, ``max_digits``, ``operations`` (e.g. ``'+-*'``),
                                       ``style`` (``symbolic`` | ``word``)
``rl.num_prompts_per_step``            prompts per RL step (divisible by the process count)
``rl.group_size``                      completions per prompt (G >= 2 for group estimators)
``rl.num_iterations``                  mu: passes over each rollout batch (> 1 uses old log-probs)
``rl.num_minibatches``                 optimizer updates per pass
``rl.shuffle_minibatches``             re-permute the rows before each pass (from the step's key)
``rl.advantage_estimator``             ``grpo`` | ``rloo`` | ``batch_normalized``
``rl.scale_rewards``                   ``group`` (GRPO) | ``batch`` | ``none`` (Dr. GRPO: no std)
``rl.advantage_eps``                   added to the std
``rl.beta``                            beta_0 of the KL term (0 = no reference model at all)
``rl.adaptive``                        ADRPO: beta_i = beta_0 - clip(A_i); False = fixed-beta GRPO
``rl.coefficient_sign``                ``adrpo`` (beta_0 - clip(A_i), the paper: better completions regularized
                                       less) | ``crd`` (beta_0 + clip(A_i): better completions regularized more,
                                       the direction of Flow-Factory's CRD ``reward_adaptive_kl``); needs
                                       ``rl.adaptive``
``rl.adv_clip``                        clip of A inside the coefficient: ``multiple`` | ``absolute`` | ``none``
``rl.adv_clip_multiple``               ``multiple``: A clipped to +-m * beta_0
``rl.adv_clip_min`` / ``adv_clip_max``  ``absolute`` bounds (+-inf = unbounded on that side)
``rl.clip_pg_advantages``              also clip A in the policy-gradient term
``rl.eps_low`` / ``rl.eps_high``       surrogate clip [1 - eps_low, 1 + eps_high] (DAPO clip-higher: 0.28)
``rl.dual_clip``                       dual-clip constant c > 1 for A < 0 (0 = off)
``rl.ratio_level``                     ``token`` (GRPO) | ``sequence`` (GSPO)
``rl.loss_aggregation``                ``token_mean`` | ``sequence_mean`` | ``nonempty_sequence_mean`` (the mean
                                       over rows with a valid token) | ``constant_normalizer`` (Dr. GRPO)
``rl.kl_estimator``                    ``k1`` | ``k2`` | ``k3``
``rl.kl_placement``                    ``loss`` (per-token term, the paper) | ``reward`` (r - beta * sum_t KL)
``rl.max_log_ratio``                   clamp of log-ratios inside exp
``rl.entropy_coef``                    entropy bonus: loss -= coef * aggregate(entropy)
``rl.mask_truncated_completions``      completions cut at max_new_tokens without EOS get no loss (DAPO)
``rl.overlong_buffer``                 DAPO soft overlong penalty over the last N tokens (0 = off)
``rl.overlong_penalty``                its maximum (a reward of -penalty at the limit)
``rl.ref_sync_steps``                  refresh the reference every N RL steps (0 = frozen reference)
``rl.ref_mixup_alpha``                 ref = alpha * policy + (1 - alpha) * ref at a refresh (1 = copy)
``rl.max_lag``                         0 = the synchronous loop; k >= 1: the rollout of step t is sampled by the
                                       policy of step t - k (dispatched k steps ahead, overlapping the updates;
                                       ``adrpo_jax.recipe.schedule``); the loss then takes the ratio against
                                       ``old_logp`` (the behaviour's, or with a correction the current policy's)
                                       With ``mesh.rollout_devices`` = N the sampler runs on the first N
                                       devices, the log-prob passes and the update on the rest (weights handed
                                       over by a resharding ``device_put`` at each dispatch)
``rl.importance_correction``           ``none`` (PPO's clip against the behaviour policy) | ``truncate`` |
                                       ``mask``: bounded proximal / behaviour importance weights on the loss
                                       (``adrpo_jax.losses.importance_weights``; old_logp = the current policy)
``rl.importance_level``                ``token`` | ``sequence`` (the product over the completion)
``rl.importance_cap``                  c > 1: truncate at c / mask outside [1/c, c]
``rl.pack_tokens``                     0 = off; T >= P + N: the old / reference log-prob passes and the update
                                       run on the rows' real tokens packed into packs of T slots (segment ids,
                                       positions restarting per row; ``adrpo_jax.rl.packing``): cost follows
                                       the real tokens, not rows x (P + N); the loss is unchanged (per row)
``rl.router_replay``                   mixture-of-experts policies: ``none`` (every pass routes with its own router)
                                       | ``rollout`` (the old-policy, reference and update passes route each token
                                       with the experts the sampler used; gates from the current router)
``rl.moe_aux_loss_coef``               MoE load-balancing loss weight (Switch / transformers; 0 = off, RL default)
``rl.moe_z_loss_coef``                 MoE router z-loss weight (0 = off)
``sampling.max_prompt_length``         prompts are left-padded (longer ones left-truncated) to this
``sampling.max_new_tokens``            completion budget N
``sampling.temperature``, ``top_k`` (0 = off), ``top_p`` (1 = off)
``sampling.engine``                    the rollout sampler: ``static`` (one batch decodes until its longest row
                                       stops) | ``continuous`` (``sampling.decode_slots`` slots refilled as rows
                                       stop: decode steps follow the real tokens; per-row keys, so other samples
                                       than ``static`` from the same seed) | ``auto`` (continuous on CPU when
                                       ``sampling.max_new_tokens`` >= 256 and there are fewer slots than rows;
                                       static on accelerators, where it is not measured yet)
``sampling.decode_slots``              continuous engine's slots (0 = a quarter of the rollout rows, rounded down
                                       to a multiple of the data-parallel size); memory ~ slots x (P + N)
``rewards.functions``                  tuple of built-in names (``exact_match``, ``final_number``, ``format``)
                                       or ``'package.module:function'`` paths
``rewards.weights``                    tuple of floats, one per function (empty = all 1)
``rewards.on_error``                   ``raise`` (fail fast) | ``missing`` (score the sample as missing)
``rewards.timeout_s``                  per-call time limit of a reward function (0 = none)
``rewards.stop_when_all_missing``      stop the run when every sample of a step misses its reward (no function
                                       returned a finite value: nothing can be learned); False = warn only
``eval.num_examples``                  held-out prompts evaluated every ``eval_every`` steps
``eval.path``                          held-out jsonl (required for the ``jsonl`` source)
``eval.accuracy_reward``               the reward function whose mean is ``eval/accuracy``
``eval.greedy``                        greedy decoding (else sampling.temperature)
``eval.batch_size``                    prompts per eval generate call (0 = all at once): bounds the eval's KV cache
``eval.gold_rewards``                  reward-hacking monitor: scorers never trained on, logged as ``eval/gold/<name>``
                                       beside the training reward (LLM: reward functions on the held-out completions;
                                       flow: ``('judge',)``, the independent judge); () = off
``eval.proxy_metric``                  the optimized reward the monitor compares with ('' = ``reward_mean``)
``eval.stop_when``                     '' = log only; ``gold_falls:N``: checkpoint and stop when a gold reward stays
                                       below its best for N evaluations while the proxy rises (``result["stopped"]``)
``eval.stop_min_drop``                 how far below its best a gold value must be to count as a fall
``eval.monitor_window``                evaluations in the monitor's trends (``monitor/*`` metrics)
``lora.enabled``                       train LoRA adapters instead of all weights (see below)
``lora.rank`` / ``lora.alpha``         r and alpha (update scale alpha / r; alpha / sqrt(r) with use_rslora)
``lora.dropout``                       must be 0 here: the policy ratio and KL need a deterministic policy
                                       (TRL's GRPO disables dropout too)
``lora.target_modules``                names (``'q_proj'``), regexes full-matching the site path
                                       (``'layers\\.[0-9]\\.mlp\\..*'``) or ``('all-linear',)`` (all but lm_head)
``lora.init``                          ``kaiming_uniform`` (peft default) | ``gaussian``; B starts at 0
``lora.use_rslora``                    rank-stabilized scale alpha / sqrt(r)
=====================================  ===================================================================

LoRA (``lora.enabled``; :mod:`adrpo_jax.models.lora`): only the adapters are trained and live in the
optimizer state and the checkpoints (the base weights are reloaded from ``model.path`` on resume). The frozen
reference is the same model with its adapters switched off, so no second copy of the weights exists; with
``rl.ref_sync_steps > 0`` the reference is base + a copy of the adapters taken at each refresh
(``rl.ref_mixup_alpha`` must be 1: mixing the factors A and B is not mixing the weights). ``model.save_final``
writes the merged model (W + s A B) as a plain Hugging Face directory.

>>> from adrpo_jax.train.config import common_config
>>> config = add_llm_config(common_config())
>>> config.rl.adaptive, config.rl.kl_placement = True, "reward"
>>> validate_llm_config(config)
Traceback (most recent call last):
...
adrpo_jax.train.config.ConfigError: `rl.adaptive`=True cannot be combined with `rl.kl_placement`='reward': ...
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from adrpo_jax.train.monitor import MONITOR_DEFAULTS, validate_monitor_config
from adrpo_jax.train.config import (
    ConfigError,
    get_by_path,
    merge_defaults,
    require_choice,
    require_float,
    require_int,
    require_sections,
    require_type,
    checking_files,
    validate_advantage_clip,
    validate_ref_refresh,
)

__all__ = [
    "add_llm_config",
    "validate_llm_config",
    "validate_llm_batch_layout",
    "rollout_engine",
    "coefficient_is_zero",
    "needs_reference",
    "needs_old_logprobs",
    "updates_per_step",
    "lora_config",
    "add_audio_config",
    "validate_audio_config",
    "AUDIO_TASKS",
    "AUDIO_CHOICE_FORMATS",
    "BUILTIN_MODELS",
    "DTYPES",
]

BUILTIN_MODELS = ("builtin:tiny_arith", "builtin:smollm2")
DTYPES = ("float32", "bfloat16", "float16")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "batch_normalized")
COEFFICIENT_SIGNS = ("adrpo", "crd")  # = adrpo_jax.losses.COEFFICIENT_SIGNS
SCALE_REWARDS = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "nonempty_sequence_mean", "constant_normalizer")
# = adrpo_jax.models.llm.attention.IMPLEMENTATIONS (kept here so that validation imports no jax; a test checks it)
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash", "decode")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("loss", "reward")
ROUTER_REPLAY = ("none", "rollout")
SAMPLING_ENGINES = ("static", "continuous", "auto")
# `sampling.engine=auto` picks the continuous engine from this completion budget on (benchmarks/bench_rollout.py)
AUTO_CONTINUOUS_MIN_NEW_TOKENS = 256
DATA_SOURCES = ("arithmetic", "jsonl")
ANSWER_FORMATS = ("gsm8k", "raw")
ON_ERROR = ("raise", "missing")
ON_BAD_ROW = ("raise", "skip")
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_llm_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the LLM trainer's sections (defaults: ADRPO on the built-in arithmetic task) in place; returns it.

    Keys already present are kept.
    """
    defaults = {
        "trainer": "llm",
        "model": {
            "path": "builtin:tiny_arith",
            "tokenizer_path": "",
            "dtype": "float32",
            "param_dtype": "float32",
            "remat": False,
            "remat_policy": "",
            "scan_layers": True,
            "attention_impl": "auto",
            "attention_chunk_size": 512,
            "attention_auto_min_len": 1024,
            "logprob_chunk_size": 512,
            "save_final": False,
        },
        "data": {
            "source": "arithmetic",
            "path": "",
            "prompt_key": "question",
            "answer_key": "answer",
            "answer_format": "gsm8k",
            "prompt_template": "{prompt}",
            "chat_template": False,
            "system_prompt": "",
            "shuffle": True,
            "on_bad_row": "raise",
            "arithmetic": {"min_digits": 1, "max_digits": 2, "operations": "+", "style": "symbolic"},
        },
        "rl": {
            "num_prompts_per_step": 16,
            "group_size": 8,
            "num_iterations": 1,
            "num_minibatches": 1,
            "shuffle_minibatches": True,
            "advantage_estimator": "grpo",
            "scale_rewards": "group",
            "advantage_eps": 1e-4,
            "beta": 0.04,
            "adaptive": True,
            "coefficient_sign": "adrpo",
            "adv_clip": "multiple",
            "adv_clip_multiple": 1.0,
            "adv_clip_min": -math.inf,
            "adv_clip_max": math.inf,
            "clip_pg_advantages": False,
            "eps_low": 0.2,
            "eps_high": 0.2,
            "dual_clip": 0.0,
            "ratio_level": "token",
            "loss_aggregation": "token_mean",
            "kl_estimator": "k3",
            "kl_placement": "loss",
            "max_log_ratio": 20.0,
            "entropy_coef": 0.0,
            "mask_truncated_completions": False,
            "overlong_buffer": 0,
            "overlong_penalty": 1.0,
            "ref_sync_steps": 0,
            "ref_mixup_alpha": 1.0,
            "router_replay": "none",
            "moe_aux_loss_coef": 0.0,
            "moe_z_loss_coef": 0.0,
            "pack_tokens": 0,
            "max_lag": 0,
            "importance_correction": "none",
            "importance_level": "token",
            "importance_cap": 2.0,
        },
        "sampling": {"max_prompt_length": 16, "max_new_tokens": 8, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                     "engine": "auto", "decode_slots": 0},
        "rewards": {"functions": ("exact_match", "format"), "weights": (1.0, 0.1), "on_error": "raise",
                    "timeout_s": 0.0, "stop_when_all_missing": True},
        "eval": {"num_examples": 128, "path": "", "accuracy_reward": "exact_match", "greedy": True,
                 "batch_size": 0, **MONITOR_DEFAULTS},
        "lora": {"enabled": False, "rank": 8, "alpha": 16.0, "dropout": 0.0,
                 "target_modules": LORA_DEFAULT_TARGETS, "init": "kaiming_uniform", "use_rslora": False},
    }
    merge_defaults(config, defaults)
    return config


def coefficient_is_zero(rl: Any) -> bool:
    """True when the KL coefficient is identically 0: beta_0 == 0 and no adaptive term can move it off 0.

    With ``adaptive`` and ``adv_clip='multiple'`` the clip bounds are +-m * beta_0 = 0, so beta_i = 0; with
    ``adv_clip`` ``'none'`` / ``'absolute'`` beta_i = -clip(A_i) is not 0 even at beta_0 = 0.
    """
    if float(rl.beta) != 0.0:
        return False
    return (not rl.adaptive) or rl.adv_clip == "multiple"


def needs_reference(rl: Any) -> bool:
    """Whether reference log-probs (and so reference parameters) are needed at all."""
    return not coefficient_is_zero(rl)


def needs_old_logprobs(rl: Any) -> bool:
    """Old-policy log-probs from a forward pass of the pre-update policy: when the rollout batch is reused
    (``num_iterations > 1`` or ``num_minibatches > 1``; TRL's rule) or the KL goes into the reward."""
    return rl.num_iterations > 1 or rl.num_minibatches > 1 or (rl.kl_placement == "reward" and needs_reference(rl))


def updates_per_step(config: Any) -> int:
    """Optimizer updates per RL step: ``num_iterations * num_minibatches``."""
    return int(config.rl.num_iterations) * int(config.rl.num_minibatches)


def _check_preset(path: str, presets: Any, what: str, to_train: str) -> None:
    """``model.path`` = ``preset:<name>``: a known name, and only where no file is read (the plan mode)."""
    if path[len("preset:"):] not in presets:
        raise ConfigError(f"`model.path`={path!r}: unknown {what}; one of {sorted(presets)} (shapes only: "
                          "--mode=plan).", key="model.path", value=path)
    if checking_files():
        raise ConfigError(f"`model.path`={path!r} names shapes only (no weights): use it with --mode=plan, or "
                          f"{to_train} to train.", key="model.path", value=path)


def _validate_model(config) -> None:
    path = require_type(config, "model.path", str)
    if not path:
        raise ConfigError("`model.path` must be set: 'builtin:tiny_arith', 'builtin:smollm2' or a local Hugging "
                          "Face directory.", key="model.path", value=path)
    if path.startswith("builtin:"):
        if path not in BUILTIN_MODELS:
            raise ConfigError(f"`model.path`={path!r}: unknown built-in model; choose one of {list(BUILTIN_MODELS)}.",
                              key="model.path", value=path)
    elif path.startswith("preset:"):  # shapes only (the plan mode): adrpo_jax.models.llm.presets
        from adrpo_jax.models.llm.presets import PRESETS  # pylint: disable=import-outside-toplevel
        _check_preset(path, PRESETS, "preset", "give a local Hugging Face directory")
    elif not os.path.isdir(os.path.expanduser(path)) or not os.path.exists(
            os.path.join(os.path.expanduser(path), "config.json")):
        raise ConfigError(f"`model.path`={path!r} is not a local Hugging Face model directory (no config.json); "
                          "nothing is downloaded: give a local path or a 'builtin:' model.", key="model.path",
                          value=path)
    tok = require_type(config, "model.tokenizer_path", str)
    if tok and checking_files() and not os.path.isdir(os.path.expanduser(tok)):
        raise ConfigError(f"`model.tokenizer_path`={tok!r} is not a directory.", key="model.tokenizer_path", value=tok)
    require_choice(config, "model.dtype", DTYPES)
    require_choice(config, "model.param_dtype", DTYPES)
    require_type(config, "model.remat", bool)
    require_type(config, "model.scan_layers", bool)
    require_choice(config, "model.attention_impl", ATTENTION_IMPLS)
    require_int(config, "model.attention_chunk_size", min=1)
    require_int(config, "model.attention_auto_min_len", min=1)
    policy = require_type(config, "model.remat_policy", str)
    if policy:
        import jax  # pylint: disable=import-outside-toplevel
        if not hasattr(jax.checkpoint_policies, policy):
            raise ConfigError(f"`model.remat_policy`={policy!r} is not an attribute of jax.checkpoint_policies.",
                              key="model.remat_policy", value=policy)
    require_int(config, "model.logprob_chunk_size", min=1)
    require_type(config, "model.save_final", bool)


def _validate_data(config) -> None:
    source = require_choice(config, "data.source", DATA_SOURCES)
    path = require_type(config, "data.path", str)
    if source == "jsonl":
        if not path and checking_files():
            raise ConfigError("`data.path` must name a jsonl file when data.source='jsonl'.", key="data.path",
                              value=path)
        if checking_files() and not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"`data.path`={path!r} does not exist (data.source='jsonl').", key="data.path",
                              value=path)
    for key in ("prompt_key", "answer_key", "system_prompt"):
        require_type(config, f"data.{key}", str)
    for key in ("prompt_key", "answer_key"):
        if not get_by_path(config, f"data.{key}"):
            raise ConfigError(f"`data.{key}` must be a non-empty string.", key=f"data.{key}")
    require_choice(config, "data.answer_format", ANSWER_FORMATS)
    template = require_type(config, "data.prompt_template", str)
    try:
        rendered = template.format(prompt="<<P>>")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"`data.prompt_template`={template!r} is not a valid format string with only "
                          f"{{prompt}}: {err!r}.", key="data.prompt_template", value=template) from None
    if "<<P>>" not in rendered:
        raise ConfigError(f"`data.prompt_template`={template!r} must contain '{{prompt}}'.",
                          key="data.prompt_template", value=template)
    require_type(config, "data.chat_template", bool)
    require_type(config, "data.shuffle", bool)
    require_choice(config, "data.on_bad_row", ON_BAD_ROW)
    lo = require_int(config, "data.arithmetic.min_digits", min=1, max=18)
    require_int(config, "data.arithmetic.max_digits", min=lo, max=18)
    ops = require_type(config, "data.arithmetic.operations", str)
    if not ops or any(op not in "+-*" for op in ops):
        raise ConfigError(f"`data.arithmetic.operations`={ops!r} must be a non-empty string of '+', '-', '*'.",
                          key="data.arithmetic.operations", value=ops)
    require_choice(config, "data.arithmetic.style", ("symbolic", "word"))


def _validate_rl(config) -> None:
    rl = config.rl
    for key in ("num_prompts_per_step", "group_size", "num_iterations", "num_minibatches"):
        require_int(config, f"rl.{key}", min=1)
    group = int(rl.group_size)
    require_type(config, "rl.shuffle_minibatches", bool)
    estimator = require_choice(config, "rl.advantage_estimator", ADVANTAGE_ESTIMATORS)
    if estimator in ("grpo", "rloo") and group < 2:
        raise ConfigError(f"`rl.group_size`={group} must be >= 2 with rl.advantage_estimator={estimator!r} "
                          "(a group of one has advantage 0).", key="rl.group_size", value=group)
    scale = require_choice(config, "rl.scale_rewards", SCALE_REWARDS)
    if estimator == "rloo" and scale != "none":
        raise ConfigError(f"`rl.scale_rewards`={scale!r} does not apply to rl.advantage_estimator='rloo' (RLOO "
                          "advantages are not std-scaled); set rl.scale_rewards='none'.", key="rl.scale_rewards",
                          value=scale)
    if estimator == "batch_normalized" and scale == "group":
        raise ConfigError("`rl.scale_rewards`='group' does not apply to rl.advantage_estimator='batch_normalized'; "
                          "use 'batch' or 'none'.", key="rl.scale_rewards", value=scale)
    require_float(config, "rl.advantage_eps", min=0.0)
    require_float(config, "rl.beta", min=0.0)
    adaptive = require_type(config, "rl.adaptive", bool)
    sign = require_choice(config, "rl.coefficient_sign", COEFFICIENT_SIGNS)
    if sign != "adrpo" and not adaptive:
        raise ConfigError(f"`rl.coefficient_sign`={sign!r} has no effect with `rl.adaptive`=False (the fixed "
                          "coefficient beta_0 has no adaptive term to sign); set rl.adaptive=True or leave "
                          "rl.coefficient_sign='adrpo'.", key="rl.coefficient_sign", value=sign)
    validate_advantage_clip(config, "rl")
    require_type(config, "rl.clip_pg_advantages", bool)
    require_float(config, "rl.eps_low", min=0.0, max=1.0, max_inclusive=False)
    require_float(config, "rl.eps_high", min=0.0)
    dual = require_float(config, "rl.dual_clip", min=0.0)
    if 0.0 < dual <= 1.0:
        raise ConfigError(f"`rl.dual_clip` must be 0 (off) or > 1, got {dual}.", key="rl.dual_clip", value=dual)
    require_choice(config, "rl.ratio_level", RATIO_LEVELS)
    require_choice(config, "rl.loss_aggregation", LOSS_AGGREGATIONS)
    require_choice(config, "rl.kl_estimator", KL_ESTIMATORS)
    require_choice(config, "rl.router_replay", ROUTER_REPLAY)
    require_float(config, "rl.moe_aux_loss_coef", min=0.0)
    require_float(config, "rl.moe_z_loss_coef", min=0.0)
    placement = require_choice(config, "rl.kl_placement", KL_PLACEMENTS)
    if adaptive and placement == "reward":
        raise ConfigError(
            "`rl.adaptive`=True cannot be combined with `rl.kl_placement`='reward': the adaptive coefficient "
            "beta_i = beta_0 - clip(A_i) depends on the advantage that the KL-shaped reward would change (a circular "
            "definition). Use rl.kl_placement='loss' (the paper) or rl.adaptive=False.", key="rl.adaptive",
            value=True)
    require_float(config, "rl.max_log_ratio", min=0.0, max=80.0, min_inclusive=False)
    require_float(config, "rl.entropy_coef", min=0.0)
    require_type(config, "rl.mask_truncated_completions", bool)
    buffer = require_int(config, "rl.overlong_buffer", min=0)
    max_new = int(config.sampling.max_new_tokens)
    if buffer >= max_new and buffer > 0:
        raise ConfigError(f"`rl.overlong_buffer`={buffer} must be < `sampling.max_new_tokens`={max_new}.",
                          key="rl.overlong_buffer", value=buffer)
    require_float(config, "rl.overlong_penalty", min=0.0)
    max_lag = require_int(config, "rl.max_lag", min=0) if "max_lag" in rl else 0
    rollout_devices = int(config.mesh.get("rollout_devices", 0)) if "mesh" in config else 0
    if rollout_devices and not max_lag:  # the rollout mesh samples while the training mesh updates
        raise ConfigError(f"`mesh.rollout_devices`={rollout_devices} needs `rl.max_lag` >= 1 (got {max_lag}): with "
                          "a synchronous loop the two meshes would take turns, each idle half the time.",
                          key="mesh.rollout_devices", value=rollout_devices)
    if "importance_correction" in rl:
        require_choice(config, "rl.importance_correction", ("none", "truncate", "mask"))
        require_choice(config, "rl.importance_level", ("token", "sequence"))
        require_float(config, "rl.importance_cap", min=1.0, min_inclusive=False)
    if "pack_tokens" in rl:
        pack = require_int(config, "rl.pack_tokens", min=0)
        width = int(config.sampling.max_prompt_length) + int(config.sampling.max_new_tokens)
        if 0 < pack < width:
            raise ConfigError(f"`rl.pack_tokens`={pack} must be 0 (off) or at least sampling.max_prompt_length + "
                              f"sampling.max_new_tokens = {width} (a row must fit one pack).", key="rl.pack_tokens",
                              value=pack)
    sync = validate_ref_refresh(config, "rl.ref_sync_steps", "rl.ref_mixup_alpha")
    if sync > 0 and coefficient_is_zero(rl):
        raise ConfigError(f"`rl.ref_sync_steps`={sync} has no effect: the KL coefficient is identically 0 "
                          f"(`rl.beta`={rl.beta}), so no reference model is used.", key="rl.ref_sync_steps",
                          value=sync)


def _validate_sampling(config) -> None:
    require_int(config, "sampling.max_prompt_length", min=1)
    require_int(config, "sampling.max_new_tokens", min=1)
    require_float(config, "sampling.temperature", min=0.0, min_inclusive=False)
    require_int(config, "sampling.top_k", min=0)
    require_float(config, "sampling.top_p", min=0.0, max=1.0, min_inclusive=False)
    if "engine" in config.sampling:  # sections built before the keys existed keep the static engine
        require_choice(config, "sampling.engine", SAMPLING_ENGINES)
    if "decode_slots" in config.sampling:
        require_int(config, "sampling.decode_slots", min=0)


def _validate_rewards(config) -> None:
    from adrpo_jax.rl import rewards as rewards_lib  # pylint: disable=import-outside-toplevel

    functions = get_by_path(config, "rewards.functions")
    if isinstance(functions, str):
        functions = (functions,)
    if not isinstance(functions, (tuple, list)) or not functions or not all(isinstance(f, str) for f in functions):
        raise ConfigError(f"`rewards.functions` must be a non-empty tuple of names or 'module:function' paths, got "
                          f"{functions!r}.", key="rewards.functions", value=functions)
    for spec in functions:
        try:
            rewards_lib.resolve_reward_function(spec)
        except (ValueError, ImportError, AttributeError) as err:
            raise ConfigError(f"`rewards.functions`: {err}", key="rewards.functions", value=spec) from None
    weights = get_by_path(config, "rewards.weights")
    if weights is None:
        weights = ()
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = (weights,)
    if not isinstance(weights, (tuple, list)) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"`rewards.weights` must be a tuple of finite numbers, got {weights!r}.",
                          key="rewards.weights", value=weights)
    if weights and len(weights) != len(functions):
        raise ConfigError(f"`rewards.weights` has {len(weights)} entries but `rewards.functions` has "
                          f"{len(functions)}.", key="rewards.weights", value=weights)
    require_choice(config, "rewards.on_error", ON_ERROR)
    require_float(config, "rewards.timeout_s", min=0.0)
    require_type(config, "rewards.stop_when_all_missing", bool)


def _validate_eval(config) -> None:
    from adrpo_jax.rl import rewards as rewards_lib  # pylint: disable=import-outside-toplevel

    require_int(config, "eval.num_examples", min=1)
    path = require_type(config, "eval.path", str)
    eval_every = int(get_by_path(config, "eval_every", 0) or 0)
    if eval_every > 0 and config.data.source == "jsonl" and not path and checking_files():
        raise ConfigError("`eval.path` must name a held-out jsonl file when data.source='jsonl' and eval_every > 0 "
                          "(set eval_every=0 to train without evaluation).", key="eval.path", value=path)
    if path and checking_files() and not os.path.isfile(os.path.expanduser(path)):
        raise ConfigError(f"`eval.path`={path!r} does not exist.", key="eval.path", value=path)
    name = require_type(config, "eval.accuracy_reward", str)
    try:
        rewards_lib.resolve_reward_function(name)
    except (ValueError, ImportError, AttributeError) as err:
        raise ConfigError(f"`eval.accuracy_reward`: {err}", key="eval.accuracy_reward", value=name) from None
    require_type(config, "eval.greedy", bool)
    require_int(config, "eval.batch_size", min=0)
    if "gold_rewards" in config.eval:  # the reward-hacking monitor (adrpo_jax.train.monitor)
        validate_monitor_config(config, "llm", resolve_reward=rewards_lib.resolve_reward_function)


def _validate_lora(config) -> None:
    if lora_config(config) is None:
        return
    dropout = float(config.lora.dropout)
    if dropout > 0.0:
        raise ConfigError(f"`lora.dropout`={dropout} is not supported by the RL trainer: the policy ratio and the KL "
                          "to the reference need the deterministic policy that sampled the completions (TRL's GRPO "
                          "disables dropout for the same reason). Set lora.dropout=0.0.", key="lora.dropout",
                          value=dropout)
    validate_ref_refresh(config, "rl.ref_sync_steps", "rl.ref_mixup_alpha", lora=True)


def lora_config(config: Any):
    """The :class:`~adrpo_jax.models.lora.LoRAConfig` of a validated config, or None when ``lora.enabled`` is off."""
    from adrpo_jax.recipe.policy import lora_config as build  # pylint: disable=import-outside-toplevel
    return build(config)


def validate_llm_config(config: Any) -> None:
    """Checks every ``model.* / data.* / rl.* / sampling.* / rewards.* / eval.*`` key and their combinations.

    Device-dependent divisibility (batch vs. mesh, prompts vs. processes) is :func:`validate_llm_batch_layout`.
    Raises :class:`ConfigError` naming the key.
    """
    require_sections(config, ("model", "data", "rl", "sampling", "rewards", "eval"), "add_llm_config")
    _validate_sampling(config)
    _validate_model(config)
    _validate_data(config)
    _validate_rl(config)
    _validate_rewards(config)
    _validate_eval(config)
    _validate_lora(config)


def rollout_engine(config: Any, batch_size: int, data_parallel_size: int = 1,
                   platform: str = "cpu") -> tuple[str, int]:
    """``(engine, slots)`` of the rollout sampler: ``sampling.engine`` with ``auto`` resolved, and the continuous
    engine's decode slots (``sampling.decode_slots``; 0 = ``batch_size // 4`` rounded down to a multiple of the
    data-parallel size, at least that size). ``auto`` picks ``continuous`` on ``platform='cpu'`` when
    ``sampling.max_new_tokens >= AUTO_CONTINUOUS_MIN_NEW_TOKENS`` and the slots are fewer than the rows (with as
    many slots as rows every row has a slot from the start and nothing is refilled: no gain over ``static``).
    There a decode step costs about in proportion to its rows, so S slots over B rows pay ~B x (longest row) / (sum
    of the lengths) (measured: benchmarks/bench_rollout.py). On GPU / TPU a step costs about the same for any small
    batch (the weights are read once), fewer slots mean more steps, and ``auto`` stays ``static`` (set
    ``continuous`` and ``sampling.decode_slots`` to try it). ``ConfigError`` naming ``sampling.decode_slots`` when
    the slots do not divide over the data-parallel devices or exceed the rows.

    >>> from adrpo_jax.train.config import common_config
    >>> c = add_llm_config(common_config()); c.sampling.max_new_tokens = 1024
    >>> rollout_engine(c, 128, 2), rollout_engine(c, 2, 2), rollout_engine(c, 128, 2, platform="tpu")
    (('continuous', 32), ('static', 2), ('static', 32))
    """
    s = config.sampling
    engine = str(s.get("engine", "static"))
    dp = max(int(data_parallel_size), 1)
    slots = int(s.get("decode_slots", 0))
    if slots == 0:
        slots = max(dp, (batch_size // 4) // dp * dp)
    elif slots % dp or slots > batch_size:
        raise ConfigError(f"`sampling.decode_slots`={slots} must be a multiple of the data-parallel size {dp} and at "
                          f"most the rollout batch of {batch_size} rows.", key="sampling.decode_slots", value=slots)
    slots = min(slots, batch_size)
    if engine == "auto":
        engine = "continuous" if (platform == "cpu" and int(s.max_new_tokens) >= AUTO_CONTINUOUS_MIN_NEW_TOKENS
                                  and slots < batch_size) else "static"
    return engine, slots


def validate_llm_batch_layout(config: Any, data_parallel_size: int, process_count: int = 1) -> dict[str, int]:
    """Divisibility of the rollout batch by the groups, minibatches, micro-batches, mesh and processes.

    Returns ``{"batch_size", "minibatch_size", "micro_batch_size"}``.
    """
    rl = config.rl
    prompts, group = int(rl.num_prompts_per_step), int(rl.group_size)
    batch = prompts * group
    if prompts % process_count:
        raise ConfigError(f"`rl.num_prompts_per_step`={prompts} must be divisible by the process count "
                          f"{process_count} (each process materializes an equal share of the prompts).",
                          key="rl.num_prompts_per_step", value=prompts)
    m = int(rl.num_minibatches)
    if batch % m:
        raise ConfigError(f"`rl.num_minibatches`={m} must divide the rollout batch rl.num_prompts_per_step * "
                          f"rl.group_size = {prompts} * {group} = {batch}.", key="rl.num_minibatches", value=m)
    minibatch = batch // m
    accum = int(config.optim.grad_accum_steps)
    if minibatch % accum:
        raise ConfigError(f"`optim.grad_accum_steps`={accum} must divide the minibatch size {minibatch} "
                          f"(= {batch} rows / rl.num_minibatches={m}).", key="optim.grad_accum_steps", value=accum)
    micro = minibatch // accum
    if micro % data_parallel_size:
        raise ConfigError(f"The micro-batch of {micro} rows (rl.num_prompts_per_step * rl.group_size / "
                          f"rl.num_minibatches / optim.grad_accum_steps = {batch}/{m}/{accum}) must be divisible "
                          f"by the data-parallel size {data_parallel_size} (mesh.data * mesh.fsdp).",
                          key="rl.num_prompts_per_step", value=prompts)
    return {"batch_size": batch, "minibatch_size": minibatch, "micro_batch_size": micro}


# ----------------------------------------------------------------------------------------------------------
# The audio recipe's section (adrpo_jax.rl.audio_trainer): on top of add_llm_config
# ----------------------------------------------------------------------------------------------------------

AUDIO_TASKS = ("auto", "spoken_arithmetic", "beeps", "jsonl")
# audio.choice_format: what a multiple-choice prompt asks for inside <answer>: the option's letter (scored by
# `choice_accuracy`) or its text (R1-AQA's format, scored as MMAU's evaluation does by `mmau_accuracy`).
AUDIO_CHOICE_FORMATS = ("letter", "text")


def add_audio_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the ``audio`` section (keys already present are kept); call after ``add_llm_config``."""
    merge_defaults(config, {"audio": {
        "task": "auto",  # auto | spoken_arithmetic | beeps | jsonl (data.path / eval.path)
        "seconds": 30.0,  # the feature window: clips are padded / cut to it (Omni: 30 s)
        "n_mels": 128,
        "audio_token": "<|AUDIO|>",
        "audio_template": "<|audio_bos|>{audio}<|audio_eos|>",
        "choice_format": "letter",  # jsonl prompts ask for the option's letter | its text (MMAU's scorer)
        "freeze_encoder": True,  # False is refused (encoder training is not implemented)
        "min_value": 0, "max_value": 9, "operations": "+",  # built-in spoken task
        "min_beeps": 1, "max_beeps": 5,  # built-in fallback task
        "cache_dir": "",
        "feature_cache_size": 4096,
    }})
    return config


def validate_audio_config(config: Any) -> None:
    """Checks the audio recipe's config: the ``audio`` section, the model path, and the LLM sections it shares
    (``rl``, ``sampling``, ``rewards``, ``lora``); ``ConfigError`` naming the key."""
    require_sections(config, ("audio",), "add_audio_config")
    a = config.audio
    if a.task not in AUDIO_TASKS:
        raise ConfigError(f"`audio.task`={a.task!r} must be one of {AUDIO_TASKS}.", key="audio.task", value=a.task)
    path = str(config.model.path)
    if path.startswith("preset:"):  # shapes only (the plan mode): adrpo_jax.models.audio_presets
        from adrpo_jax.models.audio_presets import AUDIO_PRESETS  # pylint: disable=import-outside-toplevel
        _check_preset(path, AUDIO_PRESETS, "audio preset",
                      "pass --config.model.path=/path/to/Qwen2.5-Omni-7B (a local transformers directory)")
    elif not path.startswith("builtin:"):
        p = os.path.expanduser(path)
        if not path or not os.path.isfile(os.path.join(p, "config.json")):
            raise ConfigError(f"`model.path`={path!r} is not a local transformers directory of a qwen2_audio / "
                              "qwen2_5_omni model (no config.json); nothing is downloaded: pass "
                              "--config.model.path=/path/to/Qwen2.5-Omni-7B.", key="model.path", value=path)
    elif path != "builtin:tiny_audio_arith":
        raise ConfigError(f"`model.path`={path!r}: the audio trainer's built-in model is 'builtin:tiny_audio_arith'.",
                          key="model.path", value=path)
    if not bool(a.get("freeze_encoder", True)):
        raise ConfigError("`audio.freeze_encoder`=False is not supported: the audio encoder runs once per prompt "
                          "outside the update (its embeddings are reused by the sampler, the log-prob passes and "
                          "every update), so it would get no gradient; keep it True (train the LM or its LoRA "
                          "adapters).", key="audio.freeze_encoder", value=False)
    choice_format = str(a.get("choice_format", "letter"))
    if choice_format not in AUDIO_CHOICE_FORMATS:
        raise ConfigError(f"`audio.choice_format`={choice_format!r} must be one of {AUDIO_CHOICE_FORMATS}.",
                          key="audio.choice_format", value=choice_format)
    if a.task == "jsonl" and checking_files():
        for key in ("data.path", "eval.path"):
            value = get_by_path(config, key, "")
            if key == "eval.path" and not value:
                continue
            if not value or not os.path.isfile(os.path.expanduser(value)):
                raise ConfigError(f"`{key}`={value!r} must be a jsonl file of {{audio, question, choices, answer}} "
                                  "rows (audio.task='jsonl'): pass --config.data.path=/path/to/avqa_train.jsonl.",
                                  key=key, value=value)
    if float(a.seconds) <= 0 or int(a.n_mels) < 1:
        raise ConfigError(f"`audio.seconds`={a.seconds} and `audio.n_mels`={a.n_mels} must be positive.",
                          key="audio.seconds")
    if "{audio}" not in a.audio_template:
        raise ConfigError(f"`audio.audio_template`={a.audio_template!r} must contain '{{audio}}'.",
                          key="audio.audio_template")
    _validate_rl(config)
    _validate_sampling(config)
    _validate_rewards(config)
    _validate_lora(config)
