"""The jitted pieces of a GRPO / ADRPO step: log-probs, rollout preparation (rewards -> advantages -> loss
mask), the minibatch update and the whole RL update.

Pure functions of arrays plus static :class:`StepOptions`, over the NNX split ``(graphdef, params, frozen)``
(``frozen`` is empty for a plain :class:`~adrpo_jax.models.llm.CausalLM`), the forward under GSPMD and the GRPO loss
in ``shard_map``: the conventions of :mod:`adrpo_jax.train.step_utils`.

One RL update (:func:`make_rl_update`) on a rollout batch of ``B`` rows (``B = prompts * G``, groups
contiguous) with ``N`` completion slots::

    rewards [B] (NaN = missing) --(+ DAPO overlong penalty, - beta * KL if kl_placement='reward')--> r
    A = group advantages of r over the valid rows (GRPO / Dr. GRPO / RLOO / batch-normalized)
    loss mask = completion mask & valid rows (& not truncated, with mask_truncated_completions)
    for each of num_iterations passes: permute rows, split into num_minibatches minibatches:
        one optimizer update per minibatch: gradient of
            grpo_loss(logp, old_logp, ref_logp, A, loss mask)   (ADRPO: beta_i = beta_0 - clip(A_i))
            - entropy_coef * aggregate(entropy)
        accumulated over optim.grad_accum_steps micro-batches, normalized by the *minibatch's* global
        normalizer (token count / sequence count / B_mb * N), so accumulation is exact; non-finite loss or
        gradients skip the update (optimizer state untouched).

>>> opts = StepOptions(group_size=2, prompt_length=1, max_new_tokens=2)
>>> prep = prepare_rollout(opts, {
...     "completion_mask": jnp.ones((4, 2), bool), "lengths": jnp.full((4,), 2), "done": jnp.ones(4, bool),
...     "rewards": jnp.array([1.0, 0.0, jnp.nan, 1.0]), "reward_valid": jnp.array([True, True, False, True])})
>>> prep.advantages.round(3).tolist(), prep.loss_mask[:, 0].tolist()
([0.707, -0.707, 0.0, 0.0], [True, True, False, True])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from adrpo_jax import losses
from adrpo_jax.models.llm.logprobs import token_logprobs
from adrpo_jax.rl import packing
from adrpo_jax.train.parallel import batch_sharded_loss
from adrpo_jax.train.sharding import BATCH_AXES
from adrpo_jax.train.step_utils import (accumulate_gradients, apply_updates_if_finite, check_options, constrain_batch,
                                       masked_mean_std, masked_min_max, mix_params, options_from_section,
                                       reduce_update_metrics, repeat_updates, split_micro_batches)
from adrpo_jax.train.step_utils import mesh_context as _mesh_context  # a module name: tests trace without it

__all__ = [
    "StepOptions",
    "PreparedRollout",
    "overlong_penalty",
    "sequence_kl",
    "prepare_rollout",
    "loss_normalizer",
    "completion_logprobs",
    "make_logprob_fn",
    "make_loss_fn",
    "make_logp_loss_fn",
    "make_minibatch_update",
    "make_rl_update",
    "mix_reference",
    "merge_model",
]

PyTree = Any
Metrics = dict[str, jax.Array]

# Metrics of one micro-batch that add up over micro-batches (they are shares of one minibatch loss / counts).
_SUM_KEYS = ("loss", "pg_loss", "kl_term", "entropy_term", "num_tokens", "num_sequences")
# grpo_loss metrics kept from the minibatch pass (the coefficient statistics come from the whole rollout).
_LOSS_KEYS = ("loss", "pg_loss", "kl_term", "kl_mean", "clip_fraction", "clip_fraction_low", "clip_fraction_high",
              "dual_clip_fraction", "ratio_mean", "ratio_min", "ratio_max", "num_tokens", "num_sequences")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the step (hashable). Field meanings: ``adrpo_jax/rl/config.py`` (``rl.*`` keys).

    ``prompt_length`` (P) and ``max_new_tokens`` (N) fix the layout ``tokens [B, P + N]``; ``temperature`` is
    the sampling temperature (log-probs are computed at it, as TRL). ``adv_clip_min/max`` None = unbounded.
    """

    group_size: int
    prompt_length: int
    max_new_tokens: int
    num_iterations: int = 1
    num_minibatches: int = 1
    grad_accum_steps: int = 1
    shuffle_minibatches: bool = True
    advantage_estimator: str = "grpo"
    scale_rewards: str = "group"
    advantage_eps: float = 1e-4
    beta: float = 0.04
    adaptive: bool = True
    coefficient_sign: str = "adrpo"  # beta_i = beta_0 - clip(A_i) ("adrpo") or beta_0 + clip(A_i) ("crd")
    adv_clip: str = "multiple"
    adv_clip_multiple: float = 1.0
    adv_clip_min: float | None = None
    adv_clip_max: float | None = None
    clip_pg_advantages: bool = False
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    ratio_level: str = "token"
    loss_aggregation: str = "token_mean"
    kl_estimator: str = "k3"
    kl_placement: str = "loss"
    max_log_ratio: float = 20.0
    entropy_coef: float = 0.0
    mask_truncated_completions: bool = False
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    temperature: float = 1.0
    logprob_chunk_size: int = 512
    reward_names: tuple[str, ...] = ()
    router_replay: str = "none"  # MoE: "rollout" replays the rollout's experts in the training passes
    moe_aux_loss_coef: float = 0.0  # MoE load-balancing loss (Switch) weight, off for RL by default
    moe_z_loss_coef: float = 0.0  # MoE router z-loss weight
    pack_tokens: int = 0  # > 0: log-prob passes and updates on packed rows (adrpo_jax.rl.packing)
    max_lag: int = 0  # rollouts of step t from the policy of step t - max_lag (adrpo_jax.recipe.schedule)
    importance_correction: str = "none"  # behaviour -> proximal weights: none | truncate | mask
    importance_level: str = "token"  # token | sequence
    importance_cap: float = 2.0  # c > 1 of the bounded weights

    def __post_init__(self):
        check_options(self, choices={
            "router_replay": ("none", "rollout"), "adv_clip": losses.CLIP_MODES,
            "coefficient_sign": losses.COEFFICIENT_SIGNS, "kl_placement": ("loss", "reward"),
            "advantage_estimator": ("grpo", "rloo", "batch_normalized"), "scale_rewards": ("group", "batch", "none"),
            "importance_correction": ("none",) + losses.IMPORTANCE_MODES, "importance_level": losses.IMPORTANCE_LEVELS,
        }, ints={"group_size": 1, "prompt_length": 1, "max_new_tokens": 1, "num_iterations": 1, "num_minibatches": 1,
                 "grad_accum_steps": 1, "max_lag": 0, "pack_tokens": 0})
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.kl_placement == "reward" and self.adaptive:
            raise ValueError("adaptive=True cannot be combined with kl_placement='reward' (the coefficient would "
                             "depend on the advantage it changes)")
        if not float(self.importance_cap) > 1.0:
            raise ValueError(f"importance_cap={self.importance_cap!r} must be > 1")
        if 0 < self.pack_tokens < self.prompt_length + self.max_new_tokens:
            raise ValueError(f"pack_tokens={self.pack_tokens!r} must be 0 (off) or >= prompt_length + max_new_tokens "
                             f"= {self.prompt_length + self.max_new_tokens}")

    @classmethod
    def from_config(cls, config: Any, *, prompt_length: int | None = None,
                    reward_names: tuple[str, ...] = ()) -> "StepOptions":
        """Options of a validated trainer config: the ``rl`` keys of the fields' names (the ``optional`` ones below
        may be missing), ``sampling.max_prompt_length`` (or ``prompt_length``), ``max_new_tokens`` and
        ``temperature``, ``optim.grad_accum_steps``, ``model.logprob_chunk_size``; an infinite clip bound or
        ``dual_clip`` 0 is None."""
        rl, sampling = config.rl, config.sampling
        inf_to_none = lambda x: None if math.isinf(float(x)) else float(x)  # noqa: E731
        return options_from_section(cls, rl, dict(
            prompt_length=int(prompt_length or sampling.max_prompt_length), max_new_tokens=int(sampling.max_new_tokens),
            grad_accum_steps=int(config.optim.grad_accum_steps), temperature=float(sampling.temperature),
            logprob_chunk_size=int(config.model.logprob_chunk_size), reward_names=tuple(reward_names),
            adv_clip_min=inf_to_none(rl.adv_clip_min), adv_clip_max=inf_to_none(rl.adv_clip_max),
            dual_clip=float(rl.dual_clip) or None), optional=(
            "coefficient_sign", "router_replay", "moe_aux_loss_coef", "moe_z_loss_coef", "pack_tokens", "max_lag",
            "importance_correction", "importance_level", "importance_cap"))

    # -- derived ------------------------------------------------------------------------------------------
    @property
    def coefficient_is_zero(self) -> bool:
        """The KL coefficient is identically 0 (no reference model is needed)."""
        return self.beta == 0.0 and (not self.adaptive or self.adv_clip == "multiple")

    @property
    def use_reference(self) -> bool:
        return not self.coefficient_is_zero

    @property
    def use_old_logprobs(self) -> bool:
        """Old log-probs from a pre-update forward: the batch is reused, or the KL goes into the reward; or the
        rollouts are stale (``max_lag``) / importance-corrected: the surrogate's ratio needs them."""
        return (self.kl_placement == "reward" and self.use_reference) or self.ratio_uses_old_logprobs

    @property
    def ratio_uses_old_logprobs(self) -> bool:
        """Pass old log-probs to the surrogate (else on-policy, ratio 1; TRL's rule); always with stale rollouts
        (``max_lag > 0``: the sampling policy is not the current one) or an importance correction."""
        return (self.num_iterations > 1 or self.num_minibatches > 1 or self.max_lag > 0
                or self.importance_correction != "none")

    @property
    def use_behaviour_logprobs(self) -> bool:
        """The batch carries the sampling (behaviour) policy's log-probs ``behaviour_logp``: the importance weights
        of the proximal (``old_logp``) over the behaviour policy enter the loss."""
        return self.importance_correction != "none"

    @property
    def loss_logp_keys(self) -> tuple[str, ...]:
        """The ``[B, N]`` log-probs the loss reads besides the policy's: ``old_logp`` (the ratio's, when
        :attr:`ratio_uses_old_logprobs`), ``behaviour_logp`` (importance weights), ``ref_logp`` (KL in the loss)."""
        return tuple(key for key, used in (("old_logp", self.ratio_uses_old_logprobs),
                                           ("behaviour_logp", self.use_behaviour_logprobs),
                                           ("ref_logp", self.use_reference and self.kl_placement == "loss")) if used)

    @property
    def moe_router_losses(self) -> bool:
        """The loss adds the MoE load-balancing / router z-losses (either coefficient > 0)."""
        return self.moe_aux_loss_coef > 0 or self.moe_z_loss_coef > 0

    @property
    def loss_beta(self) -> float:
        return self.beta if self.kl_placement == "loss" else 0.0

    @property
    def num_updates(self) -> int:
        return self.num_iterations * self.num_minibatches

    def coefficient_kwargs(self) -> dict[str, Any]:
        return dict(adaptive=self.adaptive and self.kl_placement == "loss", coefficient_sign=self.coefficient_sign,
                    clip=self.adv_clip, clip_multiple=self.adv_clip_multiple,
                    clip_min=self.adv_clip_min if self.adv_clip == "absolute" else None,
                    clip_max=self.adv_clip_max if self.adv_clip == "absolute" else None)


# ----------------------------------------------------------------------------------------------------------
# Rollout preparation: rewards -> advantages -> loss mask
# ----------------------------------------------------------------------------------------------------------


def overlong_penalty(lengths: jax.Array, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> jax.Array:
    r"""DAPO's soft overlong punishment per completion, in ``[-penalty, 0]``.

    With ``L = max_new_tokens`` and ``c = buffer``: 0 for ``len <= L - c``, ``penalty * (L - c - len) / c`` for
    ``L - c < len <= L`` (linear from 0 to ``-penalty``); ``len`` counts the completion's tokens including EOS.

    >>> overlong_penalty(jnp.array([2, 6, 7, 8]), 8, 4).tolist()
    [0.0, -0.5, -0.75, -1.0]
    """
    if buffer <= 0:
        return jnp.zeros(jnp.shape(lengths), jnp.float32)
    excess = jnp.asarray(lengths, jnp.float32) - (max_new_tokens - buffer)
    return -penalty * jnp.clip(excess / buffer, 0.0, 1.0)


def sequence_kl(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *, estimator: str = "k3",
                max_log_ratio: float = 20.0) -> jax.Array:
    """``[B]`` sum over valid tokens of the per-token KL estimate of ``KL(pi || pi_ref)`` (the sequence KL
    subtracted from the reward with ``kl_placement='reward'``)."""
    kl = losses.kl_divergence(logp, ref_logp, estimator, max_log_ratio=max_log_ratio, mask=mask)
    return jnp.sum(kl, axis=-1)


class PreparedRollout(NamedTuple):
    """Output of :func:`prepare_rollout`: ``advantages [B]`` float32, ``loss_mask [B, N]`` bool, ``rewards [B]``
    (the shaped reward the advantages were computed from; 0 for missing rows), ``valid [B]``, ``metrics``."""

    advantages: jax.Array
    loss_mask: jax.Array
    rewards: jax.Array
    valid: jax.Array
    metrics: Metrics


def prepare_rollout(opts: StepOptions, batch: dict[str, jax.Array]) -> PreparedRollout:
    """Rewards -> advantages and loss mask of a rollout batch (global arrays; jit-able).

    Args:
      opts: the step options.
      batch: ``completion_mask [B, N]`` bool, ``lengths [B]`` int, ``done [B]`` bool (ended with a stop
        token), ``rewards [B]`` float (NaN / any value where missing), ``reward_valid [B]`` bool; optional
        ``reward_components [B, F]`` (per-function values, NaN = missing; logged as ``reward/<name>_mean``),
        ``prompt_truncated [B]`` bool, and ``old_logp`` / ``ref_logp [B, N]`` (needed for
        ``kl_placement='reward'``).

    Returns:
      :class:`PreparedRollout`. Missing rows (``reward_valid`` False or a non-finite reward) get advantage 0,
      enter no statistic and have an all-False loss mask.
    """
    cmask = batch["completion_mask"].astype(bool)
    b = cmask.shape[0]
    if b % opts.group_size:
        raise ValueError(f"batch of {b} rows is not divisible by group_size={opts.group_size}")
    lengths = batch["lengths"].astype(jnp.int32)
    done = batch["done"].astype(bool)
    raw = batch["rewards"].astype(jnp.float32)
    valid = batch["reward_valid"].astype(bool) & jnp.isfinite(raw)
    task_reward = jnp.where(valid, raw, 0.0)
    metrics: Metrics = {}
    if opts.overlong_buffer > 0:
        pen = overlong_penalty(lengths, opts.max_new_tokens, opts.overlong_buffer, opts.overlong_penalty)
        task_reward = jnp.where(valid, task_reward + pen, 0.0)
        metrics["reward/overlong_mean"] = masked_mean_std(pen, valid)[0]
    shaped = task_reward
    if opts.kl_placement == "reward" and opts.use_reference:
        if "old_logp" not in batch or "ref_logp" not in batch:
            raise ValueError("kl_placement='reward' needs `old_logp` and `ref_logp` in the batch")
        seq_kl = sequence_kl(batch["old_logp"], batch["ref_logp"], cmask, estimator=opts.kl_estimator,
                             max_log_ratio=opts.max_log_ratio)
        shaped = jnp.where(valid, task_reward - opts.beta * seq_kl, 0.0)
        tok_kl = losses.kl_divergence(batch["old_logp"], batch["ref_logp"], opts.kl_estimator,
                                      max_log_ratio=opts.max_log_ratio, mask=cmask)
        metrics["kl_mean"] = masked_mean_std(tok_kl, cmask & valid[:, None])[0]
        metrics["kl_reward_penalty_mean"] = masked_mean_std(opts.beta * seq_kl, valid)[0]

    g = opts.group_size
    if opts.advantage_estimator == "grpo":
        adv = losses.group_advantages(shaped, group_size=g, scale_by_std=opts.scale_rewards != "none",
                                      std_level="batch" if opts.scale_rewards == "batch" else "group",
                                      eps=opts.advantage_eps, mask=valid)
    elif opts.advantage_estimator == "rloo":
        adv = losses.rloo_advantages(shaped, group_size=g, mask=valid)
    else:
        adv = losses.batch_normalized_advantages(shaped, scale_by_std=opts.scale_rewards == "batch",
                                                 eps=opts.advantage_eps, mask=valid)
    adv = jnp.where(valid, adv, 0.0)

    loss_mask = cmask & valid[:, None]
    if opts.mask_truncated_completions:
        loss_mask = loss_mask & done[:, None]
    seq_has_loss = jnp.any(loss_mask, axis=-1)

    metrics["reward_mean"], metrics["reward_std"] = masked_mean_std(task_reward, valid)
    metrics["reward"] = metrics["reward_mean"]  # TRL's name (also shown on the progress bar)
    comps = batch.get("reward_components")
    if comps is not None:
        names = opts.reward_names or tuple(f"fn{j}" for j in range(comps.shape[1]))
        if len(names) != comps.shape[1]:
            raise ValueError(f"reward_components has {comps.shape[1]} columns but reward_names has {len(names)}")
        for j, name in enumerate(names):
            col = comps[:, j].astype(jnp.float32)
            metrics[f"reward/{name}_mean"] = masked_mean_std(col, valid & jnp.isfinite(col))[0]
    metrics["advantage_mean"], metrics["advantage_std"] = masked_mean_std(adv, valid)
    metrics["advantage_min"], metrics["advantage_max"] = masked_min_max(adv, valid)
    grouped_r = shaped.reshape(b // g, g)
    grouped_v = valid.reshape(b // g, g)
    g_lo, g_hi = (jnp.min(jnp.where(grouped_v, grouped_r, jnp.inf), axis=1),
                  jnp.max(jnp.where(grouped_v, grouped_r, -jnp.inf), axis=1))
    no_signal = ~(g_hi > g_lo)  # < 2 valid samples or all-equal rewards
    metrics["zero_std_group_fraction"] = jnp.mean(no_signal.astype(jnp.float32))
    if opts.coefficient_is_zero:
        for key in ("beta_eff_mean", "beta_eff_min", "beta_eff_max", "adv_clip_fraction"):
            metrics[key] = jnp.zeros((), jnp.float32)
    else:
        metrics.update(losses.coefficient_metrics(adv, opts.beta, mask=seq_has_loss, **opts.coefficient_kwargs()))
    lengths_f = lengths.astype(jnp.float32)
    metrics["completion_length_mean"] = jnp.mean(lengths_f)
    metrics["completion_length_min"] = jnp.min(lengths_f)
    metrics["completion_length_max"] = jnp.max(lengths_f)
    metrics["truncated_fraction"] = jnp.mean((~done).astype(jnp.float32))
    metrics["num_missing_rewards"] = jnp.sum(~valid).astype(jnp.float32)
    metrics["tokens"] = jnp.sum(lengths_f)
    metrics["loss_tokens"] = jnp.sum(loss_mask).astype(jnp.float32)
    if "prompt_truncated" in batch:
        metrics["prompts_truncated"] = jnp.sum(batch["prompt_truncated"].astype(jnp.float32)) / g
    return PreparedRollout(advantages=adv, loss_mask=loss_mask, rewards=shaped, valid=valid, metrics=metrics)


def loss_normalizer(loss_mask: jax.Array, loss_aggregation: str, max_new_tokens: int) -> jax.Array:
    """The global denominator of one minibatch's loss (>= 1), computed once and passed to every micro-batch:
    token count (``token_mean``), all ``B_mb`` rows, a row without loss tokens included (``sequence_mean``, as
    TRL's ``grpo``), rows with a loss token (``nonempty_sequence_mean``), ``B_mb * N`` (``constant_normalizer``)."""
    mask = loss_mask.astype(bool)
    if loss_aggregation == "token_mean":
        n = jnp.sum(mask, dtype=jnp.float32)
    elif loss_aggregation == "sequence_mean":
        n = jnp.asarray(mask.shape[0], jnp.float32)
    elif loss_aggregation == "nonempty_sequence_mean":
        n = jnp.sum(jnp.any(mask, axis=-1), dtype=jnp.float32)
    elif loss_aggregation == "constant_normalizer":
        n = jnp.asarray(mask.shape[0] * max_new_tokens, jnp.float32)
    else:
        raise ValueError(f"loss_aggregation={loss_aggregation!r} is unknown")
    return jnp.maximum(n, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Log-probs
# ----------------------------------------------------------------------------------------------------------


def merge_model(graphdef: nnx.GraphDef, params: PyTree, frozen: PyTree | None = None) -> nnx.Module:
    """``nnx.merge`` of the trainable and frozen states."""
    return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def completion_logprobs(model: nnx.Module, tokens: jax.Array, attention_mask: jax.Array, opts: StepOptions,
                        model_inputs: dict[str, jax.Array] | None = None, *, return_routing: bool = False):
    """``(logp [B, N], entropy [B, N])`` of the completion tokens ``tokens[:, P:]`` at the sampling temperature
    (float32; 0 on padding), from one chunked forward pass (never a [B, T, V] float32 logits array); only the
    N completion positions are projected onto the vocabulary (``logits_to_keep``), the prompt's are not.

    ``model_inputs`` (multimodal models, e.g. ``{"audio_embeds": [B, A, D], "audio_valid": [B, A]}`` of an
    audio LM): the model's input embeddings are ``model.embed_inputs(tokens, **model_inputs)`` and the log-probs
    come from ``model.lm`` on them. None (text): exactly the text path.

    ``model_inputs["expert_indices"]`` (mixture-of-experts models, ``rl.router_replay='rollout'``): the rollout's
    routing record ``[B, P+N, L_moe, k]`` (``GenerationOutput.expert_indices``); the pass routes every token with the
    rollout's experts (router replay; gates from the current router). ``return_routing``: also return the sparse
    layers' routing (``moe.MoEAux`` stacked over them, None for a dense model) as a third output."""
    if tokens.shape[1] != opts.prompt_length + opts.max_new_tokens:
        raise ValueError(f"tokens of length {tokens.shape[1]} != prompt_length {opts.prompt_length} + "
                         f"max_new_tokens {opts.max_new_tokens}")
    kw: dict[str, Any] = dict(chunk_size=opts.logprob_chunk_size, return_entropy=True, temperature=opts.temperature,
                              logits_to_keep=opts.max_new_tokens)
    if model_inputs is not None and "expert_indices" in model_inputs:  # router replay (MoE)
        model_inputs = dict(model_inputs)
        kw["expert_indices"] = model_inputs.pop("expert_indices")
        model_inputs = model_inputs or None
    if return_routing:
        kw["return_routing"] = True
    if model_inputs is not None:
        multimodal: Any = model  # an audio LLM: its embeddings of the tokens + the other inputs, then its LM
        embeds = multimodal.embed_inputs(tokens, **model_inputs)
        out = token_logprobs(multimodal.lm, tokens, attention_mask, embeds=embeds, **kw)
    else:
        out = token_logprobs(model, tokens, attention_mask, **kw)
    return (*out[0], out[1]) if return_routing else out


def _group_packs(opts: StepOptions, model_inputs, rows: int, width: int, mesh: Mesh | None) -> int:
    """:func:`adrpo_jax.rl.packing.packs_per_group` of ``rows`` rows of ``width`` tokens, once the batch is packable."""
    if model_inputs is not None or opts.moe_router_losses:
        raise ValueError("rl.pack_tokens: packed rows are text-only, without router replay or MoE router losses "
                         "(the batch has model_inputs, or rl.moe_*_loss_coef > 0); set rl.pack_tokens=0")
    data_parallel = 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
    return packing.packs_per_group(rows, width, opts.pack_tokens, data_parallel)


def make_logprob_fn(graphdef: nnx.GraphDef, opts: StepOptions, mesh: Mesh | None = None
                    ) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Pure ``fn(params, frozen, tokens, attention_mask, model_inputs=None) -> (logp [B, N], entropy [B, N])``
    (not jitted; ``model_inputs``: see :func:`completion_logprobs`). With a ``mesh`` the activations are kept
    batch-sharded (:func:`~adrpo_jax.train.step_utils.mesh_context`). With ``opts.pack_tokens`` the rows are packed
    (:func:`adrpo_jax.rl.packing.packed_completion_logprobs`: the same values, cost following the real tokens)."""

    def fn(params, frozen, tokens, attention_mask, model_inputs=None):
        with _mesh_context(mesh):
            model = merge_model(graphdef, params, frozen)
            if opts.pack_tokens:
                m = _group_packs(opts, model_inputs, tokens.shape[0], tokens.shape[1], mesh)
                logp, ent = packing.packed_completion_logprobs(
                    model, tokens, attention_mask, prompt_length=opts.prompt_length, pack_tokens=opts.pack_tokens,
                    group_packs=m, chunk_size=opts.logprob_chunk_size, temperature=opts.temperature, mesh=mesh)
            else:
                logp, ent = completion_logprobs(model, tokens, attention_mask, opts, model_inputs)
        return jax.lax.stop_gradient(logp), jax.lax.stop_gradient(ent)

    return fn


# ----------------------------------------------------------------------------------------------------------
# Loss and updates
# ----------------------------------------------------------------------------------------------------------


def _global_mean(x, mask, axis_name):
    total = jnp.sum(jnp.where(mask, x, 0.0))
    count = jnp.sum(mask, dtype=jnp.float32)
    if axis_name is not None:
        total, count = jax.lax.psum(total, axis_name), jax.lax.psum(count, axis_name)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def make_loss_fn(graphdef: nnx.GraphDef, opts: StepOptions, mesh: Mesh | None
                 ) -> Callable[[PyTree, PyTree, dict[str, jax.Array], jax.Array], tuple[jax.Array, Metrics]]:
    """``loss_fn(params, frozen, minibatch, normalizer) -> (loss, metrics)`` of one (micro-)batch.

    ``minibatch``: ``tokens [b, P+N]``, ``attention_mask [b, P+N]``, ``loss_mask [b, N]``, ``advantages [b]``,
    and ``old_logp`` / ``ref_logp [b, N]`` when used. ``normalizer`` is the global normalizer of the whole
    minibatch (:func:`loss_normalizer`). With a ``mesh``, the loss runs in ``shard_map`` over the batch axes
    (:func:`adrpo_jax.train.batch_sharded_loss`); with None, on one device. ``metrics``: ``loss``, ``pg_loss``,
    ``kl_term``, ``entropy_term``, ``kl_mean``, clip fractions, ratio stats, ``entropy_mean``, counts.
    The model forward, then :func:`make_logp_loss_fn` on its log-probs (+ the MoE router losses).
    """
    loss_from_logp = make_logp_loss_fn(opts, mesh)

    def loss_fn(params, frozen, minibatch, normalizer):
        with _mesh_context(mesh):
            model = merge_model(graphdef, params, frozen)
            out = completion_logprobs(model, minibatch["tokens"], minibatch["attention_mask"], opts,
                                      minibatch.get("model_inputs"), return_routing=opts.moe_router_losses)
            logp, entropy = out[:2]
            router_loss = _router_loss(out[2], opts) if opts.moe_router_losses else None
        loss, out = loss_from_logp(logp, entropy, minibatch, normalizer)
        if router_loss is not None:  # a global scalar (routing statistics pooled over the micro-batch)
            loss = loss + router_loss
            out = dict(out, loss=out["loss"] + jax.lax.stop_gradient(router_loss))
        return loss, out

    return loss_fn


def make_logp_loss_fn(opts: StepOptions, mesh: Mesh | None
                      ) -> Callable[[jax.Array, jax.Array, dict[str, jax.Array], jax.Array], tuple[jax.Array, Metrics]]:
    """``loss_from_logp(logp [b, N], entropy [b, N], minibatch, normalizer) -> (loss, metrics)``: the GRPO loss of
    :func:`make_loss_fn` given the policy's completion log-probs and entropies (the minibatch's ``loss_mask``,
    ``advantages`` and ``old_logp`` / ``ref_logp`` when used are read; not the tokens)."""
    loss_kw = dict(beta=opts.loss_beta, **opts.coefficient_kwargs(), clip_pg_advantages=opts.clip_pg_advantages,
                   eps_low=opts.eps_low, eps_high=opts.eps_high, dual_clip=opts.dual_clip,
                   ratio_level=opts.ratio_level, loss_aggregation=opts.loss_aggregation,
                   kl_estimator=opts.kl_estimator, max_log_ratio=opts.max_log_ratio)

    def loss_from_logp(logp, entropy, minibatch, normalizer):
        shard_batch = {"logp": logp, "entropy": entropy, "loss_mask": minibatch["loss_mask"],
                       "advantages": minibatch["advantages"], **{k: minibatch[k] for k in opts.loss_logp_keys}}

        def per_device(b, axis_name=None):
            mask = b["loss_mask"]
            weights, is_metrics = None, {}
            if opts.use_behaviour_logprobs:  # stale rollouts: bounded proximal / behaviour importance weights
                weights, is_metrics = losses.importance_weights(
                    b["old_logp"], b["behaviour_logp"], mask, mode=opts.importance_correction,
                    level=opts.importance_level, cap=opts.importance_cap, max_log_ratio=opts.max_log_ratio,
                    axis_name=axis_name)
            loss, m = losses.grpo_loss(b["logp"], b.get("old_logp"), b.get("ref_logp"), b["advantages"], mask,
                                       normalizer=normalizer, axis_name=axis_name, weights=weights, **loss_kw)
            out = {k: m[k] for k in _LOSS_KEYS}
            out.update(is_metrics)
            out["entropy_mean"] = _global_mean(jax.lax.stop_gradient(b["entropy"]), mask, axis_name)
            if opts.entropy_coef:
                ent_share = losses.aggregate_loss(b["entropy"], mask, loss_aggregation=opts.loss_aggregation,
                                                  normalizer=normalizer, axis_name=axis_name)
                loss = loss - opts.entropy_coef * ent_share
                psum = (lambda x: x) if axis_name is None else (lambda x: jax.lax.psum(x, axis_name))
                out["entropy_term"] = -opts.entropy_coef * psum(jax.lax.stop_gradient(ent_share))
                out["loss"] = psum(jax.lax.stop_gradient(loss))
            else:
                out["entropy_term"] = jnp.zeros((), jnp.float32)
            return loss, out

        if mesh is None:
            return per_device(shard_batch)
        return batch_sharded_loss(per_device, mesh)(shard_batch)

    return loss_from_logp


def _router_loss(routing, opts: StepOptions):
    """``moe_aux_loss_coef * load_balancing_loss + moe_z_loss_coef * router_z_loss`` of a micro-batch's routing,
    divided by the micro-batch count (the micro-batch losses are summed); 0 for a dense model."""
    from adrpo_jax.models.llm import moe  # pylint: disable=import-outside-toplevel

    if routing is None:
        return jnp.zeros((), jnp.float32)
    total = (opts.moe_aux_loss_coef * moe.load_balancing_loss(routing)
             + opts.moe_z_loss_coef * moe.router_z_loss(routing))
    return total / opts.grad_accum_steps


# Per-part metrics that are means / extremes over the loss tokens (ratio and clip statistics: over the sequences
# with ratio_level='sequence'); reduced over micro-batches and updates weighted by that count, and an empty part
# (no loss token) is left out of the min / max.
_TOKEN_STAT_KEYS = ("kl_mean", "entropy_mean", "is_ratio_mean", "is_ratio_min", "is_ratio_max", "is_weight_mean",
                    "is_clipped_fraction", "is_masked_fraction")
_RATIO_STAT_KEYS = ("ratio_mean", "ratio_min", "ratio_max", "clip_fraction", "clip_fraction_low",
                    "clip_fraction_high", "dual_clip_fraction")


def _reduce(stacked: Metrics, ratio_level: str, sum_keys: tuple[str, ...] = ()) -> Metrics:
    """Per-micro-batch metric vectors [k] -> minibatch metrics (``sum_keys=_SUM_KEYS``: shares and counts summed),
    or per-update vectors [U] -> the step's metrics: statistics weighted by their token (sequence) count, empty
    parts left out of min / max."""
    weights = {}
    if "num_tokens" in stacked:
        ratio_count = stacked["num_sequences" if ratio_level == "sequence" else "num_tokens"]
        weights = {key: stacked["num_tokens"] for key in _TOKEN_STAT_KEYS if key in stacked}
        weights.update({key: ratio_count for key in _RATIO_STAT_KEYS if key in stacked})
    return reduce_update_metrics(stacked, weights=weights, sum_keys=sum_keys)


def make_minibatch_update(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, opts: StepOptions,
                          mesh: Mesh | None, *, return_grads: bool = False):
    """``update(params, opt_state, frozen, minibatch) -> (params, opt_state, metrics)``: one optimizer update.

    The gradient is accumulated over ``opts.grad_accum_steps`` micro-batches (rows ``i, i + k, ...``; kit's
    ``accumulate_gradients``) with the minibatch's global normalizer, so it equals the full-minibatch gradient;
    ``apply_updates_if_finite`` skips a non-finite update. With ``return_grads`` the (summed) gradients are
    returned too: ``(params, opt_state, metrics, grads)``.
    """
    loss_fn = make_loss_fn(graphdef, opts, mesh)
    k = opts.grad_accum_steps
    if opts.pack_tokens:  # packed rows: the gradient summed over groups of packs (adrpo_jax.rl.packing)
        packed_grad = packing.make_packed_grad_fn(
            lambda p, frozen: merge_model(graphdef, p, frozen), make_logp_loss_fn(opts, mesh),
            prompt_length=opts.prompt_length, chunk_size=opts.logprob_chunk_size, temperature=opts.temperature,
            mesh=mesh, forward_context=lambda: _mesh_context(mesh))

    def update(params, opt_state, frozen, minibatch):
        normalizer = loss_normalizer(minibatch["loss_mask"], opts.loss_aggregation, opts.max_new_tokens)
        if opts.pack_tokens:
            tokens = minibatch["tokens"]
            m = _group_packs(opts, minibatch.get("model_inputs"), tokens.shape[0] // k, tokens.shape[1], mesh)
            packed = packing.pack_rows(tokens, minibatch["attention_mask"], opts.prompt_length, opts.pack_tokens, m)
            (loss, stacked), grads = packed_grad(params, frozen, minibatch, packed, normalizer)
        else:
            def grad_fn(p, micro):
                micro = dict(micro)
                index = micro.pop("_micro_index")
                (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, frozen, micro, normalizer)
                onehot = jax.nn.one_hot(index, k, dtype=jnp.bool_)
                m = {key: jnp.where(onehot, v.astype(jnp.float32), 0.0) for key, v in m.items()}
                return (loss, m), grads

            micro = split_micro_batches(minibatch, k)
            micro["_micro_index"] = jnp.arange(k)
            (loss, stacked), grads = accumulate_gradients(grad_fn, params, micro)
        metrics = _reduce(stacked, opts.ratio_level, _SUM_KEYS)
        new_params, new_opt_state, info = apply_updates_if_finite(tx, grads, opt_state, params, loss=loss)
        metrics.update(info)
        return (new_params, new_opt_state, metrics) + ((grads,) if return_grads else ())

    return update


def minibatch_indices(opts: StepOptions, batch_size: int, key: jax.Array | None) -> jax.Array:
    """``[num_iterations * num_minibatches, batch_size // num_minibatches]`` row indices of every update.

    Each pass permutes the rows (``shuffle_minibatches``, from ``fold_in(key, pass)``) and takes minibatch
    ``m`` = rows ``m, m + M, m + 2M, ...`` of that order (strided, so a sharded batch stays spread over all
    devices without shuffling).
    """
    m = opts.num_minibatches
    if batch_size % m:
        raise ValueError(f"batch of {batch_size} rows is not divisible by num_minibatches={m}")
    rows = []
    for it in range(opts.num_iterations):
        order = jnp.arange(batch_size)
        if opts.shuffle_minibatches and key is not None and opts.num_updates > 1:
            order = jax.random.permutation(jax.random.fold_in(key, it), batch_size)
        rows.append(order.reshape(batch_size // m, m).T)
    return jnp.concatenate(rows, axis=0)


def make_rl_update(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, opts: StepOptions,
                   mesh: Mesh | None, *, return_grads: bool = False):
    """``rl_update(params, opt_state, frozen, batch, key) -> (params, opt_state, metrics)``: one RL step's
    updates on a rollout batch (see the module docstring); jit it with ``donate_argnums=(0, 1)``.

    ``batch``: the keys of :func:`prepare_rollout` plus ``tokens [B, P+N]`` and ``attention_mask [B, P+N]``
    (optional ``model_inputs``: a dict of ``[B, ...]`` arrays, see :func:`completion_logprobs`; ``old_logp`` /
    ``ref_logp [B, N]`` when :attr:`StepOptions.use_old_logprobs` / :attr:`StepOptions.use_reference`). ``key``
    drives the minibatch permutation. ``return_grads`` (tests, one update per step only) appends the update's
    gradients to the outputs.
    """
    if return_grads and opts.num_updates != 1:
        raise ValueError("return_grads needs num_iterations * num_minibatches == 1")
    minibatch_update = make_minibatch_update(graphdef, tx, opts, mesh, return_grads=return_grads)

    def rl_update(params, opt_state, frozen, batch, key):
        prep = prepare_rollout(opts, batch)
        train_batch = {"tokens": batch["tokens"], "attention_mask": batch["attention_mask"],
                       "loss_mask": prep.loss_mask, "advantages": prep.advantages}
        train_batch.update({key_: batch[key_] for key_ in opts.loss_logp_keys})
        if "model_inputs" in batch:  # multimodal rows (e.g. audio embeddings): sliced with the rows
            train_batch["model_inputs"] = batch["model_inputs"]

        def one_update(p, o, idx):  # idx None: the whole batch (one update)
            mb = train_batch if idx is None else constrain_batch(
                jax.tree.map(lambda x: jnp.take(x, idx, axis=0), train_batch), mesh)
            return minibatch_update(p, o, frozen, mb)

        indices = None if opts.num_updates == 1 else minibatch_indices(opts, prep.advantages.shape[0], key)
        params, opt_state, stacked, grads = repeat_updates(one_update, params, opt_state, indices)
        metrics = dict(prep.metrics)
        for key_, value in _reduce(stacked, opts.ratio_level).items():
            if key_ == "kl_mean" and opts.kl_placement == "reward":
                continue  # the rollout's KL(old || ref) (the shaped one) is the meaningful one there
            metrics[key_] = value
        if not opts.use_reference:
            metrics.pop("kl_mean", None)
        return (params, opt_state, metrics) + ((grads[0],) if return_grads else ())

    return rl_update


mix_reference = mix_params  # the reference refresh (one function for every recipe: train.step_utils.mix_params)
