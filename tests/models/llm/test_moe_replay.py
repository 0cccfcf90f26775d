"""Router replay: the sampler records every token's experts; the training pass replaying them reproduces the sampler's
log-probs (routing mismatch 0), without replay the mismatch is measured; rl.step and rl.config carry the switch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import generate, load_pretrained, moe, token_logprobs
from tests.models.llm.families import padded_batch, tiny_hf

pytest.importorskip("torch")


def _scored_positions(out, p):
  """Positions whose routing feeds a scored log-prob: real prompt and completion tokens but each row's last one
  (the last sampled token is never fed back; a stop token is fed masked)."""
  mask = np.asarray(out.attention_mask).copy()
  last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
  mask[np.arange(mask.shape[0]), last] = False
  return mask


def _near_tie_model():
  """The tiny Qwen3-MoE with near-duplicate experts in its routers: columns 1, 2 of every router equal column 0 up
  to a relative 1e-6 (and 4, 5 column 3), so the top-2 of such a triple is decided by float noise, and the few-ulp
  differences between the cached decode and the full-sequence pass flip choices (the RL failure mode router replay
  removes, made frequent)."""
  model = load_pretrained(tiny_hf("qwen3_moe").path)
  router = model.layers.mlp.gate.kernel
  w = np.asarray(router.get_value()).copy()  # [L, D, E]
  rng = np.random.default_rng(0)
  for a, dups in ((0, (1, 2)), (3, (4, 5))):
    for d in dups:
      w[..., d] = w[..., a] * (1 + 1e-6 * rng.standard_normal(w[..., a].shape))
  router.set_value(jnp.asarray(w))
  return model


def test_sampler_records_routing_and_replay_reproduces_its_logprobs():
  model = _near_tie_model()
  tokens, mask = padded_batch(rows=4, length=10)
  mask[3] = mask[2]
  out = generate(model, tokens, mask, rng=jax.random.key(0), temperature=1.0, max_new_tokens=8)
  rec = out.expert_indices
  assert rec.shape == (4, 18, 2, 2) and rec.dtype == jnp.uint8  # [B, P + N, L_moe, k], 8 experts: uint8
  p = tokens.shape[1]
  scored = _scored_positions(out, p)
  valid = np.asarray(out.completion_mask)

  replay_fn = jax.jit(lambda m, t, a, r: token_logprobs(m, t, a, expert_indices=r, return_routing=True))
  free_fn = jax.jit(lambda m, t, a: token_logprobs(m, t, a, return_routing=True))
  (logp_replay, routing_replay), (logp_free, routing_free) = replay_fn(model, out.tokens, out.attention_mask, rec), \
      free_fn(model, out.tokens, out.attention_mask)
  layout = moe.expert_indices_layout
  # replayed: the training pass used exactly the rollout's experts, and its log-probs are the sampler's
  assert float(moe.routing_mismatch(rec, layout(routing_replay), scored)) == 0.0
  diff_replay = np.abs(np.asarray(logp_replay)[:, p:] - np.asarray(out.logprobs))[valid]
  assert diff_replay.max() < 1e-5, diff_replay.max()
  # not replayed: near-tied routers pick other experts for some tokens, and their log-probs move
  mismatch = float(moe.routing_mismatch(rec, layout(routing_free), scored))
  diff_free = np.abs(np.asarray(logp_free)[:, p:] - np.asarray(out.logprobs))[valid]
  print(f"routing mismatch without replay: {mismatch:.3f} of token-layer choices; max |dlogp| {diff_free.max():.2e} "
        f"(with replay: mismatch 0, max |dlogp| {diff_replay.max():.2e})")
  assert mismatch > 0 and diff_free.max() > 10 * diff_replay.max()


@pytest.mark.slow  # a sampler and an update compilation
def test_grouped_prompts_record_the_shared_prefill_and_greedy_replays():
  model = load_pretrained(tiny_hf("qwen3_moe").path)
  tokens, mask = padded_batch(rows=2, length=8)
  tokens, mask = np.repeat(tokens, 2, axis=0), np.repeat(mask, 2, axis=0)
  out = generate(model, tokens, mask, greedy=True, max_new_tokens=4, prompt_group_size=2)
  _, routing = jax.jit(lambda m, t, a: m.forward_with_routing(t, attention_mask=a))(
      model, out.tokens, out.attention_mask)
  scored = _scored_positions(out, tokens.shape[1])
  assert float(moe.routing_mismatch(out.expert_indices, moe.expert_indices_layout(routing), scored)) == 0.0


def test_rl_step_replays_through_model_inputs():
  from adrpo_jax.rl import step as rl_step

  model = _near_tie_model()
  tokens, mask = padded_batch(rows=2, length=6)
  out = generate(model, tokens, mask, rng=jax.random.key(1), max_new_tokens=4)
  opts = rl_step.StepOptions(group_size=2, prompt_length=6, max_new_tokens=4, router_replay="rollout")
  graphdef, state = nnx.split(model)
  fn = jax.jit(rl_step.make_logprob_fn(graphdef, opts))
  logp, _ = fn(state, None, out.tokens, out.attention_mask, {"expert_indices": out.expert_indices})
  valid = np.asarray(out.completion_mask)
  np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(out.logprobs)[valid], atol=1e-5)
  with pytest.raises(ValueError, match="router_replay='all'"):
    rl_step.StepOptions(group_size=2, prompt_length=6, max_new_tokens=4, router_replay="all")


@pytest.mark.slow  # a sampler and an update compilation
def test_router_losses_enter_the_update_loss_only_when_set():
  from adrpo_jax.rl import step as rl_step

  model = load_pretrained(tiny_hf("qwen3_moe").path)
  tokens, mask = padded_batch(rows=2, length=6)
  out = generate(model, tokens, mask, rng=jax.random.key(1), max_new_tokens=4)
  graphdef, state = nnx.split(model)
  batch = {"tokens": out.tokens, "attention_mask": out.attention_mask, "loss_mask": out.completion_mask,
           "advantages": jnp.asarray([1.0, -1.0])}
  losses = {}
  for coef in (0.0, 0.5):
    opts = rl_step.StepOptions(group_size=2, prompt_length=6, max_new_tokens=4, beta=0.0, adaptive=False,
                               moe_aux_loss_coef=coef, moe_z_loss_coef=coef)
    loss_fn = jax.jit(rl_step.make_loss_fn(graphdef, opts, None))
    losses[coef] = float(loss_fn(state, None, batch, rl_step.loss_normalizer(batch["loss_mask"], "token_mean", 4))[0])
  _, routing = model.forward_with_routing(out.tokens, attention_mask=out.attention_mask)
  expected = 0.5 * (moe.load_balancing_loss(routing) + moe.router_z_loss(routing))
  np.testing.assert_allclose(losses[0.5] - losses[0.0], float(expected), rtol=1e-4)


def test_rl_config_router_replay_key():
  from adrpo_jax.rl.config import add_llm_config, validate_llm_config
  from adrpo_jax.train.config import ConfigError, common_config

  config = add_llm_config(common_config())
  assert config.rl.router_replay == "none" and config.rl.moe_aux_loss_coef == 0.0
  validate_llm_config(config)
  config.rl.router_replay = "always"
  with pytest.raises(ConfigError, match="rl.router_replay"):
    validate_llm_config(config)


def test_router_replay_helpers_for_the_trainer():
  from adrpo_jax.rl import router_replay as rr

  model = _near_tie_model()
  tokens, mask = padded_batch(rows=2, length=6)
  out = generate(model, tokens, mask, rng=jax.random.key(2), max_new_tokens=5)
  assert rr.training_model_inputs(out, None, "none") is None
  inputs = rr.training_model_inputs(out, {"audio": 1}, "rollout")
  assert inputs["audio"] == 1 and inputs["expert_indices"] is out.expert_indices
  np.testing.assert_array_equal(np.asarray(rr.scored_routing_mask(jnp.asarray([[0, 1, 1, 0], [1, 1, 1, 1]], bool))),
                                [[False, True, False, False], [True, True, True, False]])
  graphdef, state = nnx.split(model)
  m = jax.jit(rr.make_routing_metrics_fn(graphdef))(state, None, out.tokens, out.attention_mask, out.expert_indices)
  assert {"moe/routing_mismatch", "moe/load_entropy", "moe/max_load", "moe/router_z_loss"} <= set(m)
  assert 0.0 <= float(m["moe/routing_mismatch"]) < 0.5
