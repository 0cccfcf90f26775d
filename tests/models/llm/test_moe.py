"""Qwen3-MoE / Qwen2-MoE: parity with transformers, checkpoint round trip, the expert implementations, layouts,
remat and LoRA on the experts (sharded runs: test_moe_sharded.py; router replay: test_moe_replay.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig, generate, load_pretrained, save_pretrained, token_logprobs
from adrpo_jax.models.llm import moe
from adrpo_jax.models.lora import LoRAConfig, apply_lora, lora_sites, lora_state_dict, merge_lora
from tests.models.llm.families import hf_greedy, hf_logits, hf_state, padded_batch, tiny_hf

pytest.importorskip("torch")
FAMILIES = ("qwen3_moe", "qwen2_moe")
_forward = jax.jit(lambda m, t, a: m(t, attention_mask=a))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_on_left_padded_batch(name):
  tiny = tiny_hf(name)
  model = load_pretrained(tiny.path)
  assert bool(model.config.scan_layers) == (name == "qwen3_moe")  # qwen2_moe's dense layer 1: the list layout
  tokens, mask = padded_batch()
  ours = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
  ref = hf_logits(tiny, tokens, mask)
  assert np.abs(ours - ref)[mask].max() < 1e-4, np.abs(ours - ref)[mask].max()


@pytest.mark.slow  # three sampler / log-prob compilations and HF generate (~40 s here)
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_continuation_identical_and_sampled_logprobs(name):
  tiny = tiny_hf(name)
  model = load_pretrained(tiny.path)
  tokens, mask = padded_batch()
  out = generate(model, tokens, mask, greedy=True, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(out.completions), hf_greedy(tiny, tokens, mask, 6))
  sampled = generate(model, tokens, mask, rng=jax.random.key(3), temperature=0.8, max_new_tokens=6)
  logp = token_logprobs(model, sampled.tokens, sampled.attention_mask, temperature=0.8)[:, tokens.shape[1]:]
  valid = np.asarray(sampled.completion_mask)
  np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(sampled.logprobs)[valid], atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_round_trip_is_exact(name, tmp_path):
  transformers = pytest.importorskip("transformers")
  tiny = tiny_hf(name)
  model = load_pretrained(tiny.path)
  save_pretrained(model, tmp_path / "out")
  assert (tmp_path / "out" / "config.json").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  ref = hf_state(tiny)
  got = {k: v.detach().float().numpy() for k, v in back.state_dict().items()}
  assert set(got) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  again = load_pretrained(tmp_path / "out")
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fused_expert_checkpoint_loads(tmp_path):
  """A checkpoint in transformers 5's in-memory layout (experts fused: gate_up_proj [E, 2F, D], down_proj
  [E, D, F]) loads to the same model."""
  import shutil

  from adrpo_jax.models.llm.checkpoint import SafetensorsFile, write_safetensors

  tiny = tiny_hf("qwen3_moe")
  shutil.copytree(tiny.path, tmp_path / "fused")
  f = SafetensorsFile(tmp_path / "fused" / "model.safetensors")
  arrays = {n: np.array(f.get(n)) for n in f.names() if ".experts." not in n}
  for i in range(2):
    q = f"model.layers.{i}.mlp.experts"
    gate = np.stack([f.get(f"{q}.{j}.gate_proj.weight") for j in range(8)])
    up = np.stack([f.get(f"{q}.{j}.up_proj.weight") for j in range(8)])
    arrays[f"{q}.gate_up_proj"] = np.concatenate([gate, up], axis=1)
    arrays[f"{q}.down_proj"] = np.stack([f.get(f"{q}.{j}.down_proj.weight") for j in range(8)])
  write_safetensors(tmp_path / "fused" / "model.safetensors", [(n, a.shape, a.dtype) for n, a in arrays.items()],
                    arrays.__getitem__)
  a, b = load_pretrained(tiny.path), load_pretrained(tmp_path / "fused")
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------------------
# The expert computation
# ------------------------------------------------------------------------------------------------------
_LAYER_CFG = DecoderConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, model_type="qwen3_moe", num_experts=6, num_experts_per_tok=2,
                           moe_intermediate_size=12, norm_topk_prob=True, moe_block_size=8)


def _block(impl, lora=False, shared=False, seed=0):
  """A SparseMoeBlock (+ adapters on the three expert kernels) with numpy-drawn weights (no per-shape compile of
  jax.random): std 0.3, so outputs and routing are far from ties; adapter B != 0, so the adapters act."""
  cfg = _LAYER_CFG.replace(moe_impl=impl)
  if shared:
    cfg = cfg.replace(model_type="qwen2_moe", shared_expert_intermediate_size=10, qk_norm=False)

  def build():
    with nnx.use_eager_sharding(False):  # logical names stay metadata (as inside CausalLM)
      block = moe.SparseMoeBlock(cfg, rngs=nnx.Rngs(0))
    if lora:
      apply_lora(block, LoRAConfig(rank=3, alpha=6.0, target_modules=("gate_proj", "up_proj", "down_proj")),
                 rngs=nnx.Rngs(1))
    return block

  graphdef, state = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(seed)
  pure = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  block = nnx.merge(graphdef, state)
  block.experts.interpret = True  # megablox in Pallas interpret mode on CPU
  return block


def _block_loss(graphdef, state, x):
  y, aux = nnx.merge(graphdef, state).forward(x)
  return jnp.sum(y * jnp.cos(y)), (y, aux.expert_indices)


@pytest.mark.parametrize("lora,shared,impls", [
    (False, False, ("blocked",)),
    pytest.param(False, False, ("ragged",), marks=pytest.mark.slow),
    pytest.param(True, True, ("blocked", "ragged"), marks=pytest.mark.slow),
    pytest.param(True, True, ("megablox",), marks=pytest.mark.slow),  # Pallas interpret mode: slow to trace
])
def test_expert_implementations_agree_with_gradients(lora, shared, impls):
  """blocked / ragged / megablox (interpret) equal the dense every-expert reference, outputs and gradients (w.r.t.
  the input, the router and every expert kernel and adapter). Different compiled computations: 1e-5."""
  x = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 2
  results = {}
  for impl in ("dense",) + impls:
    graphdef, state = nnx.split(_block(impl, lora, shared))
    (_, (y, idx)), grads = jax.jit(jax.value_and_grad(_block_loss, argnums=(1, 2), has_aux=True),
                                   static_argnums=0)(graphdef, state, x)
    results[impl] = (y, idx, grads)
  y0, idx0, g0 = results["dense"]
  assert len(set(np.asarray(idx0).ravel().tolist())) == 6  # every expert gets rows
  for impl in impls:
    y, idx, g = results[impl]
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx0))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y0), atol=1e-5, err_msg=impl)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):  # float32 sums in other orders: 1e-5 of the scale
      a, b = np.asarray(a), np.asarray(b)
      np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=1e-4, err_msg=impl)


def test_ragged_dot_equals_dense_per_expert_reference():
  rng = np.random.default_rng(0)
  sizes = np.array([5, 0, 9, 1, 0, 7], np.int32)  # empty experts included; 3 rows past the last group
  m = int(sizes.sum()) + 3
  x = rng.standard_normal((m, 16)).astype(np.float32)
  params = {"gate_proj": rng.standard_normal((6, 16, 12)).astype(np.float32),
            "up_proj": rng.standard_normal((6, 16, 12)).astype(np.float32),
            "down_proj": rng.standard_normal((6, 12, 16)).astype(np.float32)}
  ref = np.zeros((m, 16), np.float32)
  start = 0
  for e, s in enumerate(sizes):
    xs = x[start:start + s].astype(np.float64)
    h = xs @ params["gate_proj"][e]
    h = h / (1 + np.exp(-h)) * (xs @ params["up_proj"][e])
    ref[start:start + s] = h @ params["down_proj"][e]
    start += s
  for impl in ("ragged", "blocked"):
    y = moe._expert_ffn(jnp.asarray(x), jnp.asarray(sizes), params, {}, act="silu", impl=impl, block=4)
    np.testing.assert_allclose(np.asarray(y)[:start], ref[:start], rtol=1e-4, atol=1e-4, err_msg=impl)
    assert np.all(np.isfinite(np.asarray(y)))


def test_routing_replay_keeps_router_gradient():
  graphdef, state = nnx.split(_block("blocked"))
  x = jax.random.normal(jax.random.key(1), (2, 4, 16))
  fwd = jax.jit(lambda st, x, idx: nnx.merge(graphdef, st).forward(x, expert_indices=idx))
  y, aux = jax.jit(lambda st, x: nnx.merge(graphdef, st).forward(x))(state, x)
  y2, _ = fwd(state, x, aux.expert_indices)
  np.testing.assert_allclose(np.asarray(y2), np.asarray(y), atol=1e-5)  # same experts: same output
  other = (aux.expert_indices + 1) % 6
  y3, aux3 = fwd(state, x, other)
  np.testing.assert_array_equal(np.asarray(aux3.expert_indices), np.asarray(other))
  assert float(jnp.max(jnp.abs(y3 - y))) > 0.1 * float(jnp.max(jnp.abs(y)))
  block = nnx.merge(graphdef, state)

  def loss(state):
    return jnp.sum(nnx.merge(graphdef, state).forward(x, expert_indices=other)[0] ** 2)

  g = jax.jit(jax.grad(loss))(state)
  assert float(jnp.abs(g["gate"]["kernel"][...]).max()) > 0  # the router learns through the replayed gates
  with pytest.raises(ValueError, match="expert_indices must be"):
    block.forward(x, expert_indices=other[..., :1])


def test_routing_metrics_and_losses():
  graphdef, state = nnx.split(_block("blocked"))
  x = jax.random.normal(jax.random.key(1), (2, 4, 16))
  valid = jnp.asarray([[True] * 4, [False, True, True, True]])
  _, aux = jax.jit(lambda st, x, v: nnx.merge(graphdef, st).forward(x, token_valid=v))(state, x, valid)
  assert float(aux.tokens) == 7 and float(jnp.sum(aux.load)) == 14
  stacked = moe.stack_aux([aux, aux])
  m = moe.routing_metrics(stacked)
  assert 0 < float(m["moe/load_entropy"]) <= 1 and 1 <= float(m["moe/max_load"]) <= 6
  # uniform routing: the load-balancing loss is k
  uniform = moe.MoEAux(expert_indices=aux.expert_indices, load=jnp.full((6,), 2 / 6), prob_sum=jnp.full((6,), 1 / 6),
                       z_sum=jnp.zeros(()), tokens=jnp.ones(()))
  np.testing.assert_allclose(float(moe.load_balancing_loss(uniform)), 2.0, rtol=1e-6)
  assert float(moe.router_z_loss(aux)) > 0
  rec = jnp.asarray([[[[0, 1]], [[2, 3]]]])  # [B=1, T=2, L=1, k=2]
  assert float(moe.routing_mismatch(rec, rec[..., ::-1])) == 0.0  # order within the k does not matter
  assert float(moe.routing_mismatch(rec, rec.at[0, 1, 0, 0].set(4))) == 0.5
  assert float(moe.routing_mismatch(rec, rec.at[0, 1, 0, 0].set(4), jnp.asarray([[True, False]]))) == 0.0


# ------------------------------------------------------------------------------------------------------
# Layouts, remat, LoRA, validation
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # three value-and-grad compilations of the whole model
def test_scan_and_list_layouts_agree_with_remat_gradients():
  tiny = tiny_hf("qwen3_moe")
  scan = load_pretrained(tiny.path)
  listed = load_pretrained(tiny.path, config_overrides={"scan_layers": False})
  remat = load_pretrained(tiny.path, remat=True)
  tokens, mask = padded_batch()
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)

  def loss(model):
    logp = token_logprobs(model, tokens, mask)
    return jnp.sum(logp), model.forward_with_routing(tokens, attention_mask=mask)[1].expert_indices

  results = [nnx.jit(nnx.value_and_grad(loss, has_aux=True))(m) for m in (scan, listed, remat)]
  (l0, idx0), g0 = results[0]
  for (l1, idx1), _ in results[1:]:
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(idx1), np.asarray(idx0))
  flat = lambda g: {k: np.asarray(v) for k, v in lora_free(g).items()}  # noqa: E731
  for key, value in flat(results[2][1]).items():
    np.testing.assert_allclose(value, flat(g0)[key], rtol=1e-5, atol=1e-4, err_msg=key)
  listed_grad = flat(results[1][1])
  np.testing.assert_allclose(listed_grad["layers.1.mlp.experts.down_proj"],
                             flat(g0)["layers.mlp.experts.down_proj"][1], rtol=1e-5, atol=1e-4)


def lora_free(state):
  return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def test_expert_lora_adapters_merge_exactly():
  block = _block("blocked", lora=True)
  adapter = block.experts.down_proj_lora
  assert adapter.lora_a.shape == (6, 12, 3) and adapter.lora_b.shape == (6, 3, 16)  # one adapter per expert
  assert adapter.lora_a.get_metadata()["out_sharding"] == ("expert", "mlp", None)
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  fwd = jax.jit(lambda gd, st, x: nnx.merge(gd, st).forward(x)[0], static_argnums=0)
  merged = merge_lora(block)
  a, b = fwd(*nnx.split(block), x), fwd(*nnx.split(merged), x)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
  assert float(jnp.max(jnp.abs(a - fwd(*nnx.split(_block("blocked")), x)))) > 1e-3  # the adapters act


@pytest.mark.slow  # two compilations of the whole adapted / merged model
def test_lora_sites_on_attention_and_experts_merge_exactly():
  model = load_pretrained(tiny_hf("qwen3_moe").path)
  tokens, mask = padded_batch()
  apply_lora(model, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(0))  # 'all-linear'
  adapted = {s.path for s in lora_sites(model) if s.adapted}
  assert {"layers.self_attn.q_proj", "layers.mlp.experts.gate_proj", "layers.mlp.experts.up_proj",
          "layers.mlp.experts.down_proj"} <= adapted
  assert "layers.mlp.gate" not in {s.path for s in lora_sites(model)}  # the router is no LoRA site
  adapter = model.layers.mlp.experts.gate_proj_lora
  assert adapter.lora_a.shape == (2, 8, 64, 2) and adapter.lora_b.shape == (2, 8, 2, 32)
  rng = np.random.default_rng(1)
  for site in lora_sites(model):
    if site.adapted:  # numpy draws: no per-shape compile of jax.random
      site.adapter.lora_b[...] = jnp.asarray(0.05 * rng.standard_normal(site.adapter.lora_b.shape), jnp.float32)
  a = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
  b = np.asarray(_forward(merge_lora(model), jnp.asarray(tokens), jnp.asarray(mask)))
  np.testing.assert_allclose(a[mask], b[mask], atol=1e-4)
  assert "layers.1.mlp.experts.down_proj.lora_b" in lora_state_dict(model)


def test_config_validation_names_the_bad_value():
  base = dict(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=3, num_attention_heads=2,
              model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
              shared_expert_intermediate_size=8)
  with pytest.raises(ValueError, match="num_experts_per_tok=5"):
    DecoderConfig(**{**base, "num_experts_per_tok": 5})
  with pytest.raises(ValueError, match="scan_layers=True needs every layer alike"):
    DecoderConfig(**base, mlp_only_layers=(1,), scan_layers=True)
  try:  # scan_layers='auto' picks the list layout for a mixed layout
    assert DecoderConfig(**base, mlp_only_layers=(1,), scan_layers="auto").scan_layers is False
  except ValueError as err:  # a DecoderConfig without the 'auto' layout choice
    assert "scan_layers='auto'" in str(err)
  assert DecoderConfig(**base, mlp_only_layers=(1,), scan_layers=False).moe_layers == (True, False, True)
  with pytest.raises(ValueError, match="mlp_only_layers"):
    DecoderConfig(**base, mlp_only_layers=(3,), scan_layers=False)
  with pytest.raises(ValueError, match="moe_impl='gmm'"):
    DecoderConfig(**base, moe_impl="gmm")
  cfg = DecoderConfig(**base)
  assert cfg.num_active_params() < cfg.num_params()
  model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == cfg.num_params()
  model = nnx.eval_shape(lambda: CausalLM(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"expert_indices must be \[batch, time, moe_layers, k\]"):
    model.hidden_states(jnp.zeros((1, 3), jnp.int32), expert_indices=jnp.zeros((1, 3, 2, 2), jnp.int32))


def test_qwen3_30b_a3b_preset_builds_abstractly():
  from adrpo_jax.models.llm.presets import abstract_model, preset_config

  cfg = preset_config("qwen3-30b-a3b")
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob) == (128, 8, 768, True)
  model = abstract_model("qwen3-30b-a3b", param_dtype="bfloat16", dtype="bfloat16")
  assert model.layers.mlp.experts.gate_proj.shape == (48, 128, 2048, 768)
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == cfg.num_params()


@pytest.mark.slow
def test_bench_moe_runs_tiny(tmp_path):
  """benchmarks/bench_moe.py end to end at a tiny size: the MoE equals the naive form and the JSON has the ratios
  (timings are not checked)."""
  import json
  import os
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks"))
  import bench_moe

  out = bench_moe.main(["--tokens", "64", "--hidden", "32", "--experts", "4", "--top-k", "2", "--expert-width",
                        "16", "--repeats", "2", "--backward", "--out", str(tmp_path / "m.json")])
  assert max(out["max_abs_diff_vs_naive"].values()) < 1e-5
  assert set(json.loads((tmp_path / "m.json").read_text())["ratios"]) >= {"moe:blocked_over_dense",
                                                                          "naive_over_moe:blocked"}
