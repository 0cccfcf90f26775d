"""Pure-function losses of ADRPO (Adaptive Divergence Regularized Policy Optimization).

Plain ``jax.Array`` in, ``jax.Array`` out: no model or config objects. Shapes and the equation of
docs/math.md (the project's working statement of the paper's math) are documented on every function. Argument errors
(rank, shape, dtype, unknown option, out-of-range hyper-parameter) raise ``ValueError`` naming the argument,
at trace time. All loss math runs in float32 (bfloat16/float16 inputs are upcast; float64 stays float64).

Distributed contract (every reduced loss)
----------------------------------------
* ``axis_name=None``: the loss is the plain mean over this call's inputs.
* ``axis_name`` = a mesh/pmap axis name or tuple of names (inside ``jax.shard_map`` / ``pmap``): the function
  returns this device's *share* ``local_sum / global_normalizer``; only the normalizer (a token or sample
  count) crosses devices (psum). Hence ``jax.lax.psum(loss, axis_name)`` is the global loss, and under
  ``shard_map``'s default ``check_vma=True`` the gradient with respect to replicated parameters is already
  summed over devices into exactly the single-device gradient -- do **not** pmean/psum the gradients.
  With ``jax.pmap`` (no varying-manual-axes tracking) the gradient of replicated parameters is per device:
  ``psum`` it over ``axis_name`` yourself (still never ``pmean``).
* ``metrics`` hold global values (psum-ed, stop-gradient), identical on all devices, including
  ``metrics["loss"]``.
* ``normalizer=`` (where offered) overrides the denominator with a given global value, e.g. the token count of
  the whole batch when accumulating gradients over micro-batches: the sum of the micro-batch losses and
  gradients then equals the full-batch loss and gradient.
* Batch statistics (advantage group means/stds, batch means) are global with ``axis_name``; group statistics
  all-gather the small reward vector, so groups may be split across devices arbitrarily.

Example (data-parallel GRPO/ADRPO step body under ``shard_map``; ``logp`` etc. are this device's rows)::

    def step_body(params, batch):
        adv = group_advantages(batch["rewards"], group_size=8, axis_name="data")
        def loss_fn(p):
            logp = policy_logp(p, batch)            # [B_local, T]
            return grpo_loss(logp, batch["old_logp"], batch["ref_logp"], adv, batch["mask"],
                             beta=0.04, axis_name="data")
        (loss_share, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return metrics, grads                       # grads already global (check_vma); metrics global

Module map: ``advantages`` (GRPO/Dr. GRPO, per-prompt mean, RLOO, batch-normalized, exp(tau r)),
``coefficients`` (beta_i = beta_0 - clip(A_i)), ``divergences`` (k1/k2/k3 KL, W2 velocity bound),
``policy_gradient`` (clipped surrogate, aggregation, ``grpo_loss``), ``importance`` (bounded behaviour ->
proximal importance weights for stale rollouts), ``flow_matching`` (rectified-flow path, CFM, ``adrpo_flow_loss``,
``orw_cfm_w2_loss``).
"""

from adrpo_jax.losses.advantages import batch_normalized_advantages
from adrpo_jax.losses.advantages import exponential_reward_weights
from adrpo_jax.losses.advantages import group_advantages
from adrpo_jax.losses.advantages import group_advantages_from_ids
from adrpo_jax.losses.advantages import prompt_mean_advantages
from adrpo_jax.losses.advantages import rloo_advantages
from adrpo_jax.losses.coefficients import CLIP_MODES
from adrpo_jax.losses.coefficients import COEFFICIENT_SIGNS
from adrpo_jax.losses.coefficients import adaptive_coefficient
from adrpo_jax.losses.coefficients import advantage_clip_bounds
from adrpo_jax.losses.coefficients import clip_advantages
from adrpo_jax.losses.coefficients import coefficient_metrics
from adrpo_jax.losses.divergences import KL_ESTIMATORS
from adrpo_jax.losses.divergences import guarded_exp
from adrpo_jax.losses.divergences import kl_divergence
from adrpo_jax.losses.divergences import w2_velocity_penalty
from adrpo_jax.losses.flow_matching import adrpo_flow_loss
from adrpo_jax.losses.flow_matching import cfm_loss
from adrpo_jax.losses.flow_matching import flow_matching_error
from adrpo_jax.losses.flow_matching import orw_cfm_w2_loss
from adrpo_jax.losses.flow_matching import rectified_flow_path
from adrpo_jax.losses.importance import IMPORTANCE_LEVELS
from adrpo_jax.losses.importance import IMPORTANCE_MODES
from adrpo_jax.losses.importance import importance_weights
from adrpo_jax.losses.policy_gradient import LOSS_AGGREGATIONS
from adrpo_jax.losses.policy_gradient import RATIO_LEVELS
from adrpo_jax.losses.policy_gradient import aggregate_loss
from adrpo_jax.losses.policy_gradient import clipped_surrogate
from adrpo_jax.losses.policy_gradient import grpo_loss
from adrpo_jax.losses.policy_gradient import importance_log_ratio

__all__ = [
    # advantages
    "batch_normalized_advantages",
    "exponential_reward_weights",
    "group_advantages",
    "group_advantages_from_ids",
    "prompt_mean_advantages",
    "rloo_advantages",
    # the adaptive coefficient
    "CLIP_MODES",
    "COEFFICIENT_SIGNS",
    "adaptive_coefficient",
    "advantage_clip_bounds",
    "clip_advantages",
    "coefficient_metrics",
    # divergences
    "KL_ESTIMATORS",
    "guarded_exp",
    "kl_divergence",
    "w2_velocity_penalty",
    # policy gradient
    "LOSS_AGGREGATIONS",
    "RATIO_LEVELS",
    "aggregate_loss",
    "clipped_surrogate",
    "grpo_loss",
    "importance_log_ratio",
    # the behaviour -> proximal importance correction (asynchronous rollouts)
    "IMPORTANCE_LEVELS",
    "IMPORTANCE_MODES",
    "importance_weights",
    # flow matching
    "adrpo_flow_loss",
    "cfm_loss",
    "flow_matching_error",
    "orw_cfm_w2_loss",
    "rectified_flow_path",
]
