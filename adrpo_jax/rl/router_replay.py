"""Router replay for mixture-of-experts policies (`rl.router_replay`), the pieces a trainer wires together.

With a mixture-of-experts policy the experts a token is routed to can differ between the rollout (the sampler's
cached decode) and the training passes (a full-sequence forward), from float differences alone; the importance
ratio then compares two different sub-networks, and GRPO runs of Qwen3-30B-A3B have been reported to collapse
from it. `rl.router_replay='rollout'` routes every training pass (old-policy, reference, update) with the experts the
sampler recorded (`GenerationOutput.expert_indices`); the gates still come from the current router, which keeps its
gradient. `'none'` routes every pass with its own router; `moe/routing_mismatch` then measures the disagreement.

    inputs = training_model_inputs(out, model_inputs, config.rl.router_replay)   # batch["model_inputs"]
    metrics_fn = jax.jit(make_routing_metrics_fn(graphdef, mesh))
    metrics = metrics_fn(params, frozen, out.tokens, out.attention_mask, out.expert_indices)  # moe/...

When to use it: always for MoE RL whose ratio uses old log-probs from the sampler or several updates per rollout
(the replayed passes are exact re-evaluations of the rollout's sub-network); 'none' to measure how much routing
drifts (`moe/routing_mismatch`), or for dense models (nothing is recorded).
"""
from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from adrpo_jax.models.llm import moe

ROUTER_REPLAY_MODES = ("none", "rollout")


def training_model_inputs(out: Any, model_inputs: dict[str, Any] | None, router_replay: str) -> dict[str, Any] | None:
  """The batch's `model_inputs` for the training passes: `model_inputs` plus the rollout's routing record under
  'expert_indices' when `router_replay == 'rollout'` and the sampler recorded one (an MoE policy)."""
  if router_replay not in ROUTER_REPLAY_MODES:
    raise ValueError(f"router_replay={router_replay!r} must be one of {ROUTER_REPLAY_MODES}")
  record = getattr(out, "expert_indices", None)
  if router_replay == "none" or record is None:
    return model_inputs
  return {**(model_inputs or {}), "expert_indices": record}


def scored_routing_mask(attention_mask: jax.Array) -> jax.Array:
  """[B, T] bool: the positions whose routing feeds a scored log-prob (real tokens except each row's last one: the
  sampler never feeds the last sampled token back, and a stop token is fed masked)."""
  mask = jnp.asarray(attention_mask, bool)
  t = mask.shape[1]
  last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  return mask & (jnp.arange(t)[None, :] != last[:, None])


def routing_step_metrics(recorded: jax.Array | None, routing: moe.MoEAux, attention_mask: jax.Array,
                         prefix: str = "moe/") -> dict[str, jax.Array]:
  """`moe.routing_metrics` of a pass's routing plus `moe/routing_mismatch` against the rollout's record (when given):
  the fraction of (scored token, sparse layer) pairs whose experts differ."""
  out = moe.routing_metrics(routing, prefix)
  layout = moe.expert_indices_layout(routing)
  if recorded is not None and layout is not None:
    out[f"{prefix}routing_mismatch"] = moe.routing_mismatch(recorded, layout, scored_routing_mask(attention_mask))
  return out


def make_routing_metrics_fn(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None):
  """Pure `fn(params, frozen, tokens [B, T], attention_mask [B, T], recorded [B, T, L, k] or None) -> metrics`: one
  forward pass routing with the current router (no vocabulary projection), its routing statistics and the
  mismatch against the rollout's record. Not jitted; with a `mesh` it traces under it as the abstract mesh."""

  def fn(params, frozen, tokens, attention_mask, recorded=None):
    ctx = contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
    with ctx:
      model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
      model = getattr(model, "lm", model)  # an audio LM's language model
      _, routing = model.forward_with_routing(tokens, attention_mask=attention_mask)
    if routing is None:
      return {}
    return jax.lax.stop_gradient(routing_step_metrics(recorded, routing, attention_mask))

  return fn
