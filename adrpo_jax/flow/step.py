r"""The jitted pieces of one ADRPO-W2 RL step of a flow-matching model: rollout, batch preparation, loss, updates.

Pure functions of arrays plus static :class:`FlowStepOptions`, over the NNX split ``(graphdef, params, frozen)``
(``frozen`` is empty for a plain :class:`~adrpo_jax.models.dit.DiT`), the forward under GSPMD and the loss in
``shard_map``: the conventions of :mod:`adrpo_jax.train.step_utils`. The reference is a separate parameter tree of
the same structure as ``params`` (the frozen pre-trained model, or a refreshed copy).

One RL step (:func:`make_train_step`) on ``B = K * G`` prompt ids ``cond [B]`` (G samples per prompt)::

    x1 = ODE/SDE sample of the policy (or of its sampling copy) from x0 ~ N(0, I)      (stop-gradient: data)
    r = reward_model(x1, cond)                                                           [B]
    valid = finite(r) & finite(x1)          invalid samples enter no statistic, baseline or loss (counted)
    A = r - mean_{same prompt, valid}(r)                                                 docs/math.md, "Advantages"
    for each of rl.num_inner_updates updates (fresh t ~ U(0, 1) or logit-normal, x0' ~ N(0, I)):
        x_t = (1 - t) x0' + t x1,  u = x1 - x0'
        v = v_theta(x_t, t, c),  v_ref = sg(v_ref(x_t, t, c))      one policy and one reference forward
        loss (rl.method):
          adrpo       mean_i [ A_i ||v - u||^2 + (beta_0 - clip(A_i)) ||v - v_ref||^2 ]     (ADRPO-FM)
          fixed_beta  mean_i [ A_i ||v - u||^2 + beta_0 ||v - v_ref||^2 ]
          orw_cfm_w2  mean_i [ exp(tau r_i) ||v - u||^2 + alpha ||v - v_ref||^2 ]             (ORW-CFM-W2)
          none        mean_i [ A_i ||v - u||^2 ]
        optimizer update (skipped when the loss or a gradient is non-finite, or no sample is valid)
    optional: reference refresh ref <- alpha * theta + (1 - alpha) * ref, sampling-copy refresh

Noise drawn inside the step is constrained to the batch sharding; the per-prompt advantages are computed on the
global ``[B]`` rewards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from adrpo_jax import losses
from adrpo_jax.flow.metrics import pairwise_diversity
from adrpo_jax.flow.sampling import METHODS as SAMPLER_METHODS
from adrpo_jax.flow.sampling import sample, sample_noise
from adrpo_jax.train.parallel import batch_sharded_loss
from adrpo_jax.train.step_utils import (accumulate_gradients, apply_updates_if_finite, check_options, masked_mean_std,
                                       masked_min_max, mesh_context, mix_params, options_from_section,
                                       reduce_update_metrics, repeat_updates, select_tree, split_micro_batches)
from adrpo_jax.train.step_utils import constrain_batch as _constrain

__all__ = [
    "FlowStepOptions",
    "PreparedBatch",
    "prepare_batch",
    "draw_path_inputs",
    "inner_update_key",
    "make_loss_fn",
    "make_flow_update",
    "make_rollout_fn",
    "make_train_step",
    "make_phase_fns",
    "mix_params",
    "reward_components",
]

PyTree = Any
Metrics = dict[str, jax.Array]

METHODS = ("adrpo", "fixed_beta", "orw_cfm_w2", "none")
ORW_REWARD_SCALINGS = ("raw", "center", "standardize")
_LOSS_KEYS = ("loss", "cfm_term", "w2_term", "w2_mean", "cfm_error_mean", "num_samples")
_SAMPLE_MEAN_KEYS = ("w2_mean", "cfm_error_mean")  # means over valid samples: averaged weighted by num_samples


@dataclasses.dataclass(frozen=True)
class FlowStepOptions:
    """Static options of the flow RL step (hashable). Meanings: ``adrpo_jax/flow/config.py`` (``rl.*``,
    ``sampling.*``). ``num_conditions`` is the number of prompt ids (advantage groups), ``null_class`` the DiT's
    unconditional class id (CFG), ``image_shape`` ``(H, W, C)``. ``adv_clip_min/max`` and ``orw_max_exponent``
    None = unbounded."""

    num_conditions: int
    null_class: int
    image_shape: tuple[int, int, int]
    method: str = "adrpo"
    beta: float = 1.0
    coefficient_sign: str = "adrpo"  # adrpo: beta_0 - clip(A_i); "crd": beta_0 + clip(A_i) (method adrpo only)
    adv_clip: str = "multiple"
    adv_clip_multiple: float = 1.0
    adv_clip_min: float | None = None
    adv_clip_max: float | None = None
    clip_cfm_advantages: bool = False
    scale_advantages_by_std: bool = False
    advantage_eps: float = 1e-4
    tau: float = 0.5
    alpha: float = 1.0
    orw_max_exponent: float | None = None
    num_inner_updates: int = 1
    grad_accum_steps: int = 1
    time_sampling: str = "uniform"
    cond_dropout_prob: float = 0.0
    sampling_method: str = "heun"
    sampling_steps: int = 10
    cfg_scale: float = 1.0
    sde_noise: float = 0.0
    ref_refresh_alpha: float = 1.0
    time_shift: float = 1.0  # rollout time grid: 1 = uniform; else SD3's shifted schedule (adrpo_jax.flow.sd3)
    train_time_shift: float = 1.0  # the CFM path's t: sigma = 1 - t shifted like the grid (1 = unshifted)
    rollout_micro_batch: int = 0  # images sampled at once by the rollout (0 = the whole batch)
    orw_reward_scaling: str = "raw"  # ORW-CFM-W2's exponent: raw exp(tau r) | center | standardize

    def __post_init__(self):
        check_options(self, choices={
            "method": METHODS, "adv_clip": losses.CLIP_MODES, "coefficient_sign": losses.COEFFICIENT_SIGNS,
            "time_sampling": ("uniform", "logit_normal"), "sampling_method": SAMPLER_METHODS,
            "orw_reward_scaling": ORW_REWARD_SCALINGS,
        }, ints={"num_conditions": 1, "num_inner_updates": 1, "grad_accum_steps": 1, "sampling_steps": 1,
                 "rollout_micro_batch": 0})
        if len(tuple(self.image_shape)) != 3:
            raise ValueError(f"`image_shape`={self.image_shape!r} must be (H, W, C).")
        if self.beta < 0 or self.alpha < 0:
            raise ValueError(f"`beta`={self.beta} and `alpha`={self.alpha} must be >= 0.")
        if not 0.0 <= self.cond_dropout_prob < 1.0:
            raise ValueError(f"`cond_dropout_prob`={self.cond_dropout_prob} must be in [0, 1).")
        if not 0.0 < self.ref_refresh_alpha <= 1.0:
            raise ValueError(f"`ref_refresh_alpha`={self.ref_refresh_alpha} must be in (0, 1].")
        if not self.time_shift > 0 or not self.train_time_shift > 0:
            raise ValueError(f"`time_shift`={self.time_shift} and `train_time_shift`={self.train_time_shift} must "
                             "be > 0.")

    @classmethod
    def from_config(cls, config: Any, *, num_conditions: int, null_class: int,
                    image_shape: tuple[int, int, int]) -> "FlowStepOptions":
        """Options of a validated flow config: the ``rl`` keys of the fields' names (``coefficient_sign``,
        ``rollout_micro_batch`` and ``orw_reward_scaling`` may be missing), ``optim.grad_accum_steps`` and the
        ``sampling`` section; an infinite bound is None (the clip bounds only with ``adv_clip='absolute'``)."""
        rl, s = config.rl, config.sampling
        inf_to_none = lambda x: None if math.isinf(float(x)) else float(x)  # noqa: E731
        absolute = rl.adv_clip == "absolute"
        return options_from_section(cls, rl, dict(
            num_conditions=int(num_conditions), null_class=int(null_class),
            image_shape=cast("tuple[int, int, int]", tuple(int(d) for d in image_shape)),  # length: __post_init__
            adv_clip_min=inf_to_none(rl.adv_clip_min) if absolute else None,
            adv_clip_max=inf_to_none(rl.adv_clip_max) if absolute else None,
            orw_max_exponent=inf_to_none(rl.orw_max_exponent), grad_accum_steps=int(config.optim.grad_accum_steps),
            sampling_method=s.method, sampling_steps=int(s.num_steps), cfg_scale=float(s.cfg_scale),
            sde_noise=float(s.sde_noise), time_shift=float(s.get("time_shift", 1.0)),
            # rl.time_shift (SD3): 0 = the sampler's shift; recipes without the key train on unshifted times
            train_time_shift=float(rl.get("time_shift", 1.0)) or float(s.get("time_shift", 1.0))),
            optional=("coefficient_sign", "rollout_micro_batch", "orw_reward_scaling"))

    # -- derived ------------------------------------------------------------------------------------------
    @property
    def adaptive(self) -> bool:
        """The coefficient is ``beta_0 - clip(A)`` (``adrpo``; ``beta_0 + clip(A)`` with ``coefficient_sign``
        ``"crd"``); else constant."""
        return self.method == "adrpo"

    @property
    def loss_beta(self) -> float:
        """beta_0 of :func:`~adrpo_jax.losses.adrpo_flow_loss` (0 for ``none``)."""
        return 0.0 if self.method == "none" else self.beta

    def time_grid(self) -> jax.Array | None:
        """The rollout's time grid ``[sampling_steps + 1]``: None (uniform) for ``time_shift`` 1, else diffusers'
        shifted SD3 schedule as our time (:func:`adrpo_jax.flow.sd3.sd3_time_grid`)."""
        if self.time_shift == 1.0:
            return None
        from adrpo_jax.flow.sd3 import sd3_time_grid  # pylint: disable=import-outside-toplevel
        return sd3_time_grid(self.sampling_steps, self.time_shift)

    def coefficient_kwargs(self) -> dict[str, Any]:
        return dict(adaptive=self.adaptive, coefficient_sign=self.coefficient_sign, clip=self.adv_clip,
                    clip_multiple=self.adv_clip_multiple, clip_min=self.adv_clip_min, clip_max=self.adv_clip_max)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _merge(graphdef: nnx.GraphDef, params: PyTree, frozen: PyTree | None = None) -> Any:
    """``nnx.merge`` of the trainable and (if any) frozen states, the frozen part as fresh Variables over
    ``stop_gradient`` views: merged inside ``value_and_grad`` or a scan body, the module must not hold values of the
    outer trace (an ``nnx.remat`` inside the model would try to update them: ``TraceContextError``). The frozen
    part has no gradient anyway; ``stop_gradient`` lowers to nothing."""
    return nnx.merge(graphdef, params) if frozen is None else \
        nnx.merge(graphdef, params, jax.tree.map(jax.lax.stop_gradient, frozen))


def velocity_fn(graphdef: nnx.GraphDef, params: PyTree, frozen: PyTree = None) -> Callable[..., jax.Array]:
    """``v(x, t, cond, **kw)`` of the model without gradients (a rollout): merged afresh at each call
    (:func:`_merge`), ``params`` over ``stop_gradient`` views too, so that inside a
    ``lax.scan`` / ``lax.map`` body (the samplers) its Variables hold values of that trace."""

    def v(*args, **kwargs):
        model = _merge(graphdef, jax.tree.map(jax.lax.stop_gradient, params), frozen)
        return model(*args, **kwargs)

    return v


def map_micro_batches(fn: Callable[..., PyTree], num_micro_batches: int, *arrays: jax.Array,
                      broadcast: tuple[jax.Array, ...] = (), mesh: Mesh | None = None) -> PyTree:
    """``fn`` over ``num_micro_batches`` micro-batches of ``arrays`` (each ``[B, ...]``), one at a time
    (``jax.lax.map``), reassembled to ``[B, ...]`` outputs: the activation memory of ``fn`` follows the
    micro-batch ``B / num_micro_batches``. Micro-batch ``i`` takes the strided rows ``i, i + k, ...``
    (:func:`~adrpo_jax.train.step_utils.split_micro_batches`), so with a batch sharded on its leading axis every
    micro-batch stays spread over all devices (constrained to the batch sharding under ``mesh``).
    ``broadcast``: arrays with a leading ``[num_micro_batches]`` axis, entry ``i`` passed to micro-batch ``i``
    after the split arrays (e.g. per-micro-batch keys)."""
    k = int(num_micro_batches)
    if k == 1:
        return fn(*arrays, *(x[0] for x in broadcast))
    split = split_micro_batches(tuple(arrays), k)

    def body(xs):
        chunk, extra = xs
        return _constrain(fn(*(_constrain(x, mesh) for x in chunk), *extra), mesh)

    out = jax.lax.map(body, (split, tuple(broadcast)))
    # [k, B / k, ...] -> [B, ...] with row j * k + i = micro-batch i's row j (the inverse of the strided split)
    return jax.tree.map(lambda y: _constrain(jnp.swapaxes(y, 0, 1).reshape((-1,) + y.shape[2:]), mesh), out)


def reward_components(reward_model: Callable, images: jax.Array, cond: jax.Array) -> dict[str, jax.Array]:
    """``{"reward": [B], <component>: [B], ...}`` of a reward model (its ``components`` when it has them)."""
    if hasattr(reward_model, "components"):
        comps = dict(reward_model.components(images, cond))
    else:
        comps = {"reward": reward_model(images, cond)}
    if "reward" not in comps:
        raise ValueError("the reward model's components() must contain 'reward'")
    b = images.shape[0]
    out = {}
    for name, value in comps.items():
        value = jnp.asarray(value, jnp.float32)
        if value.shape != (b,):
            raise ValueError(f"reward component {name!r} has shape {value.shape}, expected ({b},) (one value per "
                             "image)")
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Batch preparation: rewards -> validity -> advantages (+ statistics)
# ----------------------------------------------------------------------------------------------------------


class PreparedBatch(NamedTuple):
    """Output of :func:`prepare_batch` (global arrays): ``x1 [B, H, W, C]`` (invalid rows zeroed), ``cond [B]``,
    ``rewards [B]`` (0 at invalid rows), ``valid [B]`` bool, ``advantages [B]`` (0 at invalid rows), ``metrics``."""

    x1: jax.Array
    cond: jax.Array
    rewards: jax.Array
    valid: jax.Array
    advantages: jax.Array
    metrics: Metrics
    weight_rewards: jax.Array | None = None  # ORW-CFM-W2: the r of exp(tau r) (rl.orw_reward_scaling); else None


def orw_exponent_rewards(opts: FlowStepOptions, rewards: jax.Array, valid: jax.Array) -> jax.Array:
    """The ``r`` inside ORW-CFM-W2's ``exp(tau r)`` (``opts.orw_reward_scaling``): ``raw`` r (the published
    code), ``center`` ``r - mean(r)`` (the same relative weights; the batch's constant factor ``exp(tau mean r)``,
    ~1e7 on a 0-100 CLIP score, no longer scales the CFM term against the fixed W2 term), ``standardize``
    ``(r - mean(r)) / (std(r) + eps)`` (tau unitless). Means / stds over the valid samples of the global batch;
    0 at invalid rows."""
    if opts.orw_reward_scaling == "raw":
        return rewards
    mean, std = masked_mean_std(rewards, valid)
    out = rewards - mean
    if opts.orw_reward_scaling == "standardize":
        out = out / (std + opts.advantage_eps)
    return jnp.where(valid, out, 0.0)


def prepare_batch(opts: FlowStepOptions, x1: jax.Array, cond: jax.Array, rewards: jax.Array,
                  components: dict[str, jax.Array] | None = None) -> PreparedBatch:
    """Validity, per-prompt advantages and the batch statistics (jit-able; global ``[B]`` arrays).

    A sample is invalid when its reward or any of its pixels is non-finite: it gets advantage 0, its reward
    enters no mean/std (its prompt's baseline ``V(c)`` included) and it is masked out of the loss; its ``x1``
    is replaced by zeros so that NaN never reaches a forward pass. ``A = r - V(c)`` with
    :func:`~adrpo_jax.losses.prompt_mean_advantages` (``/ (std_c + eps)`` with ``scale_advantages_by_std``).

    Metrics: ``reward_mean/std/min/max``, ``reward/<component>_mean``, ``advantage_mean/std/min/max``,
    ``num_nonfinite_rewards``, ``zero_std_prompt_fraction`` (prompts of the batch with < 2 valid samples or
    all-equal rewards), ``beta_eff_mean/min/max`` and ``adv_clip_fraction`` (the W2 coefficient of the
    method: beta_0 - clip(A), beta_0, alpha, or 0), and for ``orw_cfm_w2`` ``orw_weight_mean/min/max``.
    """
    x1 = jnp.asarray(x1)
    if x1.ndim != 4:
        raise ValueError(f"`x1` must be [B, H, W, C] images, got shape {x1.shape}")
    b = x1.shape[0]
    cond = jnp.asarray(cond)
    if cond.shape != (b,) or not jnp.issubdtype(cond.dtype, jnp.integer):
        raise ValueError(f"`cond` must be [{b}] integer prompt ids, got shape {cond.shape} dtype {cond.dtype}")
    r = jnp.asarray(rewards, jnp.float32)
    if r.shape != (b,):
        raise ValueError(f"`rewards` must have shape ({b},), got {r.shape}")
    finite_x = jnp.all(jnp.isfinite(x1.reshape(b, -1)), axis=-1)
    valid = jnp.isfinite(r) & finite_x
    r = jnp.where(valid, r, 0.0)
    x1 = jnp.where(valid.reshape(valid.shape + (1,) * (x1.ndim - 1)), x1, jnp.zeros_like(x1))
    adv = losses.prompt_mean_advantages(r, cond, opts.num_conditions, scale_by_std=opts.scale_advantages_by_std,
                                        eps=opts.advantage_eps, mask=valid)
    adv = jnp.where(valid, adv, 0.0)

    metrics: Metrics = {}
    metrics["reward_mean"], metrics["reward_std"] = masked_mean_std(r, valid)
    metrics["reward_min"], metrics["reward_max"] = masked_min_max(r, valid)
    metrics["reward"] = metrics["reward_mean"]  # shown on the progress bar
    for name, value in (components or {}).items():
        if name == "reward":
            continue
        value = jnp.asarray(value, jnp.float32)
        metrics[f"reward/{name}_mean"] = masked_mean_std(value, valid & jnp.isfinite(value))[0]
    metrics["advantage_mean"], metrics["advantage_std"] = masked_mean_std(adv, valid)
    metrics["advantage_min"], metrics["advantage_max"] = masked_min_max(adv, valid)
    metrics["num_nonfinite_rewards"] = jnp.sum(~valid).astype(jnp.float32)

    onehot = jax.nn.one_hot(cond, opts.num_conditions, dtype=jnp.float32)  # [B, K]
    present = jnp.sum(onehot, axis=0) > 0
    vhot = onehot * valid[:, None]
    hi = jnp.max(jnp.where(vhot > 0, r[:, None], -jnp.inf), axis=0)
    lo = jnp.min(jnp.where(vhot > 0, r[:, None], jnp.inf), axis=0)
    no_signal = present & ~(hi > lo)
    metrics["zero_std_prompt_fraction"] = jnp.sum(no_signal) / jnp.maximum(jnp.sum(present), 1)

    weight_rewards = None
    if opts.method == "orw_cfm_w2":
        weight_rewards = orw_exponent_rewards(opts, r, valid)
        w = losses.exponential_reward_weights(weight_rewards, opts.tau, max_exponent=opts.orw_max_exponent,
                                              mask=valid)
        metrics["orw_weight_mean"] = masked_mean_std(w, valid)[0]
        metrics["orw_weight_min"], metrics["orw_weight_max"] = masked_min_max(w, valid)
        alpha = jnp.asarray(opts.alpha, jnp.float32)
        metrics.update({"beta_eff_mean": alpha, "beta_eff_min": alpha, "beta_eff_max": alpha,
                        "adv_clip_fraction": jnp.zeros((), jnp.float32)})
    else:
        metrics.update(losses.coefficient_metrics(adv, opts.loss_beta, mask=valid, **opts.coefficient_kwargs()))
    return PreparedBatch(x1=x1, cond=cond.astype(jnp.int32), rewards=r, valid=valid, advantages=adv,
                         metrics=metrics, weight_rewards=weight_rewards)


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------


def inner_update_key(key: jax.Array, update_index: int | jax.Array) -> jax.Array:
    """The key of inner update ``i`` of a step: ``fold_in(key, i)``."""
    return jax.random.fold_in(key, update_index)


def draw_path_inputs(opts: FlowStepOptions, key: jax.Array, x1: jax.Array, mesh: Mesh | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(t [B], x0 [B, ...], drop_mask [B] or None)`` of one inner update: the CFM path's time (uniform or
    logit-normal, then with ``opts.train_time_shift`` = s != 1 SD3's shift ``sigma' = s sigma / (1 + (s - 1)
    sigma)`` of ``sigma = 1 - t``), fresh noise ``x0 ~ N(0, I)`` and the CFG condition-dropout rows."""
    from adrpo_jax.flow.pretrain import sample_time  # pylint: disable=import-outside-toplevel

    b = x1.shape[0]
    k_t, k_x0, k_drop = jax.random.split(key, 3)
    t = sample_time(k_t, b, opts.time_sampling)
    if opts.train_time_shift != 1.0:  # SD3's shift on sigma = 1 - t (as the rollout grid): t' = 1 - shift(sigma)
        s, sigma = opts.train_time_shift, 1.0 - t
        t = 1.0 - s * sigma / (1.0 + (s - 1.0) * sigma)
    t = _constrain(t, mesh)
    x0 = _constrain(sample_noise(k_x0, x1.shape, jnp.float32), mesh)
    drop = None
    if opts.cond_dropout_prob > 0:
        drop = _constrain(jax.random.bernoulli(k_drop, opts.cond_dropout_prob, (b,)), mesh)
    return t, x0, drop


def make_loss_fn(opts: FlowStepOptions, mesh: Mesh | None
                 ) -> Callable[[dict[str, jax.Array], jax.Array], tuple[jax.Array, Metrics]]:
    """``loss_fn(batch, normalizer) -> (loss, metrics)``: the method's library loss on velocity arrays.

    ``batch``: ``v``, ``v_ref``, ``u`` ``[b, H, W, C]``, ``advantages``, ``rewards`` ``[b]`` float, ``mask [b]``
    bool. ``normalizer``: the global count of valid samples of the whole batch (so micro-batch losses add up).
    With a ``mesh`` the loss runs in ``shard_map`` over the batch axes (:func:`batch_sharded_loss`); with None
    on one device. ``metrics``: ``loss``, ``cfm_term``, ``w2_term``, ``w2_mean``, ``cfm_error_mean``,
    ``num_samples`` (global).
    """
    def loss_fn(batch, normalizer):
        def per_device(b, axis_name=None):
            if opts.method == "orw_cfm_w2":
                loss, m = losses.orw_cfm_w2_loss(b["v"], b["v_ref"], b["u"], b["rewards"], tau=opts.tau,
                                                 alpha=opts.alpha, max_exponent=opts.orw_max_exponent,
                                                 mask=b["mask"], normalizer=normalizer, axis_name=axis_name)
            else:
                loss, m = losses.adrpo_flow_loss(b["v"], b["v_ref"], b["u"], b["advantages"], beta=opts.loss_beta,
                                                 clip_cfm_advantages=opts.clip_cfm_advantages, mask=b["mask"],
                                                 normalizer=normalizer, axis_name=axis_name,
                                                 **opts.coefficient_kwargs())
            return loss, {k: m[k] for k in _LOSS_KEYS}

        shard_batch = {k: batch[k] for k in ("v", "v_ref", "u", "advantages", "rewards", "mask")}
        if mesh is None:
            return per_device(shard_batch)
        return batch_sharded_loss(per_device, mesh)(shard_batch)

    return loss_fn


def make_flow_update(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, opts: FlowStepOptions,
                     mesh: Mesh | None, *, return_grads: bool = False, ref_graphdef: nnx.GraphDef | None = None,
                     lora_dropout: bool = False):
    """``update(params, opt_state, ref_params, frozen, batch, key) -> (params, opt_state, metrics)``.

    ``batch``: ``x1 [B, H, W, C]`` (the policy's samples), ``cond [B]`` int prompt ids, ``rewards [B]`` (NaN =
    missing), optional ``components`` (``{name: [B]}`` reward parts, logged). Runs :func:`prepare_batch`, then
    ``opts.num_inner_updates`` optimizer updates, update ``i`` with the path inputs of
    ``draw_path_inputs(opts, inner_update_key(key, i), x1)``; each gradient is accumulated over
    ``opts.grad_accum_steps`` micro-batches (strided rows ``i, i + k, ...``; exact: the valid-sample count of the
    whole batch is the normalizer). ``frozen`` is the non-trainable model state (None for none).

    ``ref_graphdef``: the graph the reference forward runs with (default ``graphdef``); a LoRA run passes the
    adapters-off graph of :func:`~adrpo_jax.models.lora.split_lora`, so that ``merge(ref_graphdef, ref_params,
    frozen)`` is the frozen base model whatever adapter values ``ref_params`` holds (pass the policy's own).
    ``lora_dropout``: run the loss's policy forward inside :func:`~adrpo_jax.models.lora.lora_dropout_rng` with a
    key of the update (``fold_in(inner-update key, 0x10D)``, then the micro-batch index), so adapters with
    ``dropout > 0`` drop their inputs there; sampling, the reference and evaluation never do.

    Metrics: those of :func:`prepare_batch`, the loss terms (mean over the inner updates), ``grad_norm``,
    ``update_norm``, ``skipped`` (any update skipped) and ``skipped_updates``. ``return_grads`` (tests; one
    inner update only) appends the gradients.
    """
    if return_grads and opts.num_inner_updates != 1:
        raise ValueError("return_grads needs num_inner_updates == 1")
    from adrpo_jax.models.lora import lora_dropout_rng  # pylint: disable=import-outside-toplevel

    loss_fn = make_loss_fn(opts, mesh)
    k = opts.grad_accum_steps
    ref_graphdef = graphdef if ref_graphdef is None else ref_graphdef

    def one_update(params, opt_state, ref_params, frozen, prep: PreparedBatch, key):
        t, x0, drop = draw_path_inputs(opts, key, prep.x1, mesh)
        x_t, u = losses.rectified_flow_path(x0, prep.x1, t)
        normalizer = jnp.maximum(jnp.sum(prep.valid, dtype=jnp.float32), 1.0)
        rewards = prep.rewards if prep.weight_rewards is None else prep.weight_rewards
        rows = {"x_t": x_t, "t": t, "cond": prep.cond, "u": u, "advantages": prep.advantages,
                "rewards": rewards, "mask": prep.valid}
        if drop is not None:
            rows["drop"] = drop
        if lora_dropout:  # row i of micro-batch j (strided split) has index i * k + j: index[0] is j
            rows["index"] = _constrain(jnp.arange(prep.x1.shape[0], dtype=jnp.int32), mesh)
            dropout_key = jax.random.fold_in(key, 0x10D)

        def grad_fn(p, mb):
            # the reference forward per micro-batch too (its activations follow the micro-batch, not the batch)
            v_ref = jax.lax.stop_gradient(velocity_fn(ref_graphdef, ref_params, frozen)(
                mb["x_t"], mb["t"], mb["cond"], drop_mask=mb.get("drop")))

            def f(p_):
                model = _merge(graphdef, p_, frozen)
                with (lora_dropout_rng(jax.random.fold_in(dropout_key, mb["index"][0])) if lora_dropout
                      else contextlib.nullcontext()):
                    v = model(mb["x_t"], mb["t"], mb["cond"], drop_mask=mb.get("drop"))
                return loss_fn({**mb, "v": v, "v_ref": v_ref}, normalizer)

            (loss, m), grads = jax.value_and_grad(f, has_aux=True)(p)
            # Means over valid samples -> sums, so that micro-batch metrics add up like the loss shares.
            m = {key_: (m[key_] * m["num_samples"] if key_ in _SAMPLE_MEAN_KEYS else m[key_]) for key_ in m}
            return (loss, m), grads

        if k == 1:
            (loss, m), grads = grad_fn(params, rows)
        else:
            (loss, m), grads = accumulate_gradients(grad_fn, params, split_micro_batches(rows, k))
        m = {key_: (m[key_] / jnp.maximum(m["num_samples"], 1.0) if key_ in _SAMPLE_MEAN_KEYS else m[key_])
             for key_ in m}
        # No valid sample at all: nothing to learn from; skip the update (it would only decay the weights).
        check = jnp.where(jnp.any(prep.valid), loss, jnp.nan)
        new_params, new_opt_state, info = apply_updates_if_finite(tx, grads, opt_state, params, loss=check)
        m.update(info)
        return new_params, new_opt_state, m, grads

    def update(params, opt_state, ref_params, frozen, batch, key):
        with mesh_context(mesh):
            prep = prepare_batch(opts, batch["x1"], batch["cond"], batch["rewards"], batch.get("components"))
            n = opts.num_inner_updates
            params, opt_state, stacked, grads = repeat_updates(  # i None: the only update, i = 0
                lambda p, o, i: one_update(p, o, ref_params, frozen, prep,
                                           inner_update_key(key, 0 if i is None else i)),
                params, opt_state, None if n == 1 else jnp.arange(n))
            metrics = dict(prep.metrics)
            metrics.update(reduce_update_metrics(stacked))
            metrics["images"] = jnp.asarray(prep.x1.shape[0], jnp.float32)
            return (params, opt_state, metrics) + (tuple(grads) if return_grads else ())

    return update


# ----------------------------------------------------------------------------------------------------------
# Rollout and the whole step
# ----------------------------------------------------------------------------------------------------------


def make_rollout_fn(graphdef: nnx.GraphDef, reward_model: Callable, opts: FlowStepOptions,
                    mesh: Mesh | None = None):
    """``rollout(params, frozen, cond [B], key) -> (x1 [B, H, W, C], components)``: samples of the model from
    fresh noise (``opts.sampling_*``, CFG with the null class), stop-gradient, and the reward model's outputs
    (:func:`reward_components`; ``components["reward"]`` is the reward). Pure; jit-able."""
    def rollout(params, frozen, cond, key):
        with mesh_context(mesh):
            model = velocity_fn(graphdef, params, frozen)
            b = cond.shape[0]
            k_x0, k_sde = jax.random.split(key)
            x0 = _constrain(sample_noise(k_x0, (b,) + tuple(opts.image_shape), jnp.float32), mesh)

            def sample_chunk(x0_, cond_, k_):
                return sample(lambda x, t, c: model(x, t, c), _constrain(x0_, mesh), _constrain(cond_, mesh),
                              num_steps=opts.sampling_steps, method=opts.sampling_method, cfg_scale=opts.cfg_scale,
                              null_cond=None if opts.cfg_scale == 1.0 else opts.null_class,
                              sde_noise=opts.sde_noise, key=k_ if opts.sde_noise > 0 else None,
                              timesteps=opts.time_grid())

            m = opts.rollout_micro_batch
            if 0 < m < b:  # rl.rollout_micro_batch: m images at a time (SDE noise: one key per micro-batch)
                x1 = map_micro_batches(sample_chunk, b // m, x0, cond, broadcast=(jax.random.split(k_sde, b // m),),
                                       mesh=mesh)
            else:
                x1 = sample_chunk(x0, cond, k_sde)
            x1 = _constrain(jax.lax.stop_gradient(x1), mesh)
            return x1, reward_components(reward_model, x1, cond)

    return rollout


def _make_phases(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, reward_model: Callable,
                 opts: FlowStepOptions, mesh: Mesh | None, return_grads: bool, ref_graphdef: nnx.GraphDef | None,
                 lora_dropout: bool) -> tuple[Callable, Callable]:
    """The two halves of the RL step (shared by :func:`make_train_step` and :func:`make_phase_fns`):
    ``sample(state, frozen, cond, key) -> (x1, components)`` (the rollout of the sampling copy when ``state`` holds
    one, with the first half of the step's ``key``) and ``update_and_refresh(state, ref_params, frozen, cond, key,
    x1, comps, refresh_ref, refresh_sampler) -> (state, metrics[, grads])`` (the update uses its second half)."""
    rollout = make_rollout_fn(graphdef, reward_model, opts, mesh)
    update = make_flow_update(graphdef, tx, opts, mesh, return_grads=return_grads, ref_graphdef=ref_graphdef,
                              lora_dropout=lora_dropout)

    def sample(state, frozen, cond, key):
        k_roll, _ = jax.random.split(key)
        return rollout(state["sampler_params"] if "sampler_params" in state else state["params"], frozen, cond, k_roll)

    def update_and_refresh(state, ref_params, frozen, cond, key, x1, comps, refresh_ref, refresh_sampler):
        _, k_update = jax.random.split(key)
        reference = state.get("ref_params", ref_params)
        if reference is None:
            if ref_graphdef is None:
                raise ValueError("train_step needs `ref_params` (or state['ref_params']) unless a `ref_graphdef` "
                                 "(LoRA: adapters off) makes the reference the policy's own base weights")
            reference = state["params"]
        batch = {"x1": x1, "cond": cond, "rewards": comps["reward"],
                 "components": {k: v for k, v in comps.items() if k != "reward"}}
        params, opt_state, metrics, *grads = update(state["params"], state["opt_state"], reference, frozen, batch,
                                                    k_update)
        new_state = dict(state, params=params, opt_state=opt_state)
        refresh_ref = jnp.asarray(refresh_ref, bool)
        refresh_sampler = jnp.asarray(refresh_sampler, bool)
        if "ref_params" in state:
            new_state["ref_params"] = select_tree(refresh_ref, mix_params(reference, params, opts.ref_refresh_alpha),
                                                  reference)
        if "sampler_params" in state:
            new_state["sampler_params"] = select_tree(refresh_sampler, params, state["sampler_params"])
        metrics = dict(metrics)
        metrics["sample_diversity"] = pairwise_diversity(x1, cond, opts.num_conditions)[1]
        metrics["ref_refreshed"] = (refresh_ref & ("ref_params" in state)).astype(jnp.float32)
        metrics["sampler_refreshed"] = (refresh_sampler & ("sampler_params" in state)).astype(jnp.float32)
        return (new_state, metrics, *grads)

    return sample, update_and_refresh


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, reward_model: Callable,
                    opts: FlowStepOptions, mesh: Mesh | None, *, return_grads: bool = False,
                    ref_graphdef: nnx.GraphDef | None = None, lora_dropout: bool = False):
    """``train_step(state, ref_params, frozen, cond, key, refresh_ref, refresh_sampler) -> (state, metrics)``.

    One whole RL step (module docstring), to be jitted with ``donate_argnums=0``. ``state``: ``params``,
    ``opt_state``, optionally ``ref_params`` (a refreshed reference; then the ``ref_params`` argument is
    ignored and may be None) and ``sampler_params`` (the sampling copy; else the policy samples itself).
    ``refresh_ref`` / ``refresh_sampler``: scalar bools; after the update, ``ref <- mix_params(ref, params,
    opts.ref_refresh_alpha)`` / ``sampler <- params`` where set. ``key`` splits into the rollout's and the
    update's keys. Metrics: the update's, ``sample_diversity`` (mean per-prompt pairwise L2 of the rollout),
    ``ref_refreshed``, ``sampler_refreshed``. :func:`make_phase_fns` is the same step as three programs.
    """
    sample, update_and_refresh = _make_phases(graphdef, tx, reward_model, opts, mesh, return_grads, ref_graphdef,
                                              lora_dropout)

    def train_step(state, ref_params, frozen, cond, key, refresh_ref, refresh_sampler):
        x1, comps = sample(state, frozen, cond, key)
        return update_and_refresh(state, ref_params, frozen, cond, key, x1, comps, refresh_ref, refresh_sampler)

    return train_step


def make_phase_fns(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, opts: FlowStepOptions,
                   mesh: Mesh | None, *, ref_graphdef: nnx.GraphDef | None = None, lora_dropout: bool = False
                   ) -> dict[str, Callable]:
    """:func:`make_train_step` as three functions (to be jitted separately, so each phase can be timed):

    * ``sample(state, frozen, cond, key) -> x1``: the rollout's samples (from the sampling copy when present);
    * ``reward(reward_model, x1, cond) -> components`` (:func:`reward_components`; ``reward_model`` is static
      to the program: close over it);
    * ``update(state, ref_params, frozen, cond, key, x1, components, refresh_ref, refresh_sampler) ->
      (state, metrics)``: the update and the refreshes (``key``: the step's key, as for ``train_step``).

    The same math as the fused step; another compilation, so equal up to float32 rounding, not bit-identical.
    """
    no_reward = lambda x, c: jnp.zeros(x.shape[:1], jnp.float32)  # noqa: E731  # the sampler alone
    sample, update = _make_phases(graphdef, tx, no_reward, opts, mesh, False, ref_graphdef, lora_dropout)

    def sample_fn(state, frozen, cond, key):
        return sample(state, frozen, cond, key)[0]

    return {"sample": sample_fn, "reward": reward_components, "update": update}
