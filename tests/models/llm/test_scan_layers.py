"""Scan over layers (`DecoderConfig.scan_layers`, default True): the stacked layout equals the list layout in
logits, gradients and cached decoding; parameter names / logical axes / shardings; one scan in the program
whatever the depth; HF and LoRA state dict round trips between the layouts; clear errors."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax import train
from adrpo_jax.models import lora
from adrpo_jax.models.llm import CausalLM, DecoderConfig, load_pretrained, save_pretrained, token_logprobs
from adrpo_jax.models.llm.modeling import DecoderLayer, StackedDecoderLayers

# 3 layers, the middle one with a sliding window (per-layer windows inside the scan), q/k norm, biases, GQA.
CFG = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, attention_bias=True, attention_out_bias=True,
                    qk_norm=True, model_type="qwen3", sliding_window=3,
                    layer_types=("full_attention", "sliding_attention", "full_attention"),
                    scan_layers=True)  # the scan itself (the default 'auto' runs a model this small unrolled)
LIST = dataclasses.replace(CFG, scan_layers=False)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)
MASK = jnp.asarray(np.arange(9)[None, :] >= np.array([[2], [0]]))  # row 0 left-padded by 2
# Scan vs list are different XLA programs (a while loop vs unrolled layers): float32 tolerance, not bit equality.
TOL = dict(rtol=1e-5, atol=1e-5)


def _models(cfg=CFG):
  """The same weights in both layouts (the stack draws its layers in the list layout's order); fresh copies."""
  return tuple(nnx.clone(m) for m in _cached_models(cfg))


@functools.lru_cache(maxsize=None)
def _cached_models(cfg):
  return CausalLM(cfg, rngs=nnx.Rngs(0)), CausalLM(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0))


def _stack(list_model, get):
  """np.stack of `get(layer i)` over the layers of a list-layout model (or of its state)."""
  return np.stack([np.asarray(get(list_model.layers[i])) for i in range(CFG.num_hidden_layers)])


def test_stacked_parameters_names_axes_and_shardings():
  model = nnx.eval_shape(lambda: CausalLM(CFG, rngs=nnx.Rngs(0)))
  assert isinstance(model.layers, StackedDecoderLayers) and len(model.layers) == 3
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  flat = {".".join(map(str, p)): tuple(v.get_value()) for p, v in nnx.to_flat_state(specs)}
  assert flat["layers.self_attn.q_proj.kernel"] == ("layers", "embed", "heads", "head_dim")
  assert flat["layers.mlp.down_proj.kernel"] == ("layers", "mlp", "embed")
  assert flat["layers.self_attn.q_norm.weight"] == ("layers", "norm")
  assert flat["embed_tokens.embedding"] == ("vocab", "embed")
  assert model.layers.self_attn.q_proj.kernel.shape == (3, 32, 4, 8)
  assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param))) == CFG.num_params()
  # the sharding rules leave 'layers' unsharded and shard the rest as in the list layout
  mesh = train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = train.logical_to_named_sharding(nnx.state(model, nnx.Param), mesh)
  spec = {".".join(map(str, p)): tuple(v.get_value().spec) for p, v in nnx.to_flat_state(shardings)}
  assert spec["layers.self_attn.q_proj.kernel"] == (None, "fsdp", "tensor")
  assert spec["layers.mlp.down_proj.kernel"] == (None, "tensor", "fsdp")


def test_same_weights_and_layer_views():
  scan, lst = _models()
  np.testing.assert_array_equal(np.asarray(scan.layers.mlp.up_proj.kernel[...]),
                                _stack(lst, lambda l: l.mlp.up_proj.kernel[...]))
  layer = scan.layers[-1]  # a detached copy of layer 2, as a plain DecoderLayer
  assert type(layer) is DecoderLayer and layer.self_attn.q_proj.kernel.shape == (32, 4, 8)
  assert layer.self_attn.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
  np.testing.assert_array_equal(np.asarray(layer.self_attn.k_proj.bias[...]),
                                np.asarray(lst.layers[2].self_attn.k_proj.bias[...]))
  with pytest.raises(IndexError, match="layer index 3 out of range for 3 layers"):
    scan.layers[3]


def test_scan_equals_list_logits_and_gradients():
  scan, lst = _models()
  forward = jax.jit(lambda m, t, a: m(t, attention_mask=a))
  np.testing.assert_allclose(np.asarray(forward(scan, TOKENS, MASK)), np.asarray(forward(lst, TOKENS, MASK)), **TOL)

  def loss(m):
    return jnp.sum(token_logprobs(m, TOKENS, MASK) * MASK)

  grad = jax.jit(nnx.grad(loss))
  g_scan, g_list = grad(scan), grad(lst)
  for get in (lambda m: m.self_attn.q_proj.kernel, lambda m: m.self_attn.k_norm.weight,
              lambda m: m.mlp.down_proj.kernel, lambda m: m.input_layernorm.weight, lambda m: m.self_attn.v_proj.bias):
    np.testing.assert_allclose(np.asarray(get(g_scan.layers)[...]), _stack(g_list, lambda l: get(l)[...]), **TOL)
  np.testing.assert_allclose(np.asarray(g_scan.embed_tokens.embedding[...]),
                             np.asarray(g_list.embed_tokens.embedding[...]), **TOL)
  # per-layer remat inside the scan with a named policy: the same gradients
  for policy in ("dots_with_no_batch_dims_saveable",):
    remat = CausalLM(dataclasses.replace(CFG, remat=True, remat_policy=policy), rngs=nnx.Rngs(0))
    g = grad(remat)
    np.testing.assert_allclose(np.asarray(g.layers.mlp.gate_proj.kernel[...]),
                               np.asarray(g_scan.layers.mlp.gate_proj.kernel[...]), **TOL)


def test_cached_prefill_and_decode_scan_equals_list():
  scan, lst = _models()

  @jax.jit
  def decode(m):
    cache = m.init_cache(2, 12)
    logits, cache = m(TOKENS[:, :6], attention_mask=MASK[:, :6], cache=cache)
    out = [logits]
    for i in range(6, 9):
      logits, cache = m(TOKENS[:, i:i + 1], attention_mask=MASK[:, i:i + 1], cache=cache)
      out.append(logits)
    return jnp.concatenate(out, 1), cache

  (a, cache_s), (b, cache_l) = decode(scan), decode(lst)
  assert cache_s.stacked and cache_s.keys.shape == (3, 2, 2, 12, 8) and not cache_l.stacked
  valid = np.asarray(MASK)
  np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], **TOL)
  np.testing.assert_allclose(np.asarray(cache_s.keys), np.stack([np.asarray(k) for k in cache_l.keys]), **TOL)
  full = jax.jit(lambda m: m(TOKENS, attention_mask=MASK))(scan)
  np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(full)[valid], **TOL)


def test_program_has_one_scan_whatever_the_depth():
  def grad_jaxpr(layers):
    cfg = dataclasses.replace(CFG, num_hidden_layers=layers, layer_types=None, sliding_window=None)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    fn = jax.value_and_grad(lambda s: jnp.sum(token_logprobs(nnx.merge(graphdef, s), TOKENS, MASK)))
    return jax.make_jaxpr(fn)(state)

  shallow, deep = grad_jaxpr(2), grad_jaxpr(8)
  count = lambda jaxpr: sum(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns)  # noqa: E731
  # forward scan + its transpose, at top level; the program size does not grow with depth
  assert count(shallow) == count(deep) == 2
  assert len(shallow.jaxpr.eqns) == len(deep.jaxpr.eqns)
  lst = dataclasses.replace(CFG, num_hidden_layers=2, scan_layers=False, layer_types=None, sliding_window=None)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(lst, rngs=nnx.Rngs(0))))
  assert count(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(TOKENS))(state)) == 0


def test_hf_checkpoint_round_trip_between_layouts(tmp_path):
  scan, lst = _models(dataclasses.replace(CFG, tie_word_embeddings=False))
  save_pretrained(scan, tmp_path / "scan", max_shard_size=20_000)  # sharded files: layers split across them
  assert (tmp_path / "scan" / "model.safetensors.index.json").exists()
  for scan_layers in (True, False):
    loaded = load_pretrained(tmp_path / "scan", config_overrides={"scan_layers": scan_layers})
    assert isinstance(loaded.layers, StackedDecoderLayers) == scan_layers
    np.testing.assert_array_equal(np.asarray(loaded.layers[1].mlp.up_proj.kernel[...]),
                                  np.asarray(lst.layers[1].mlp.up_proj.kernel[...]))
    np.testing.assert_array_equal(np.asarray(loaded.layers[2].self_attn.o_proj.kernel[...]),
                                  np.asarray(lst.layers[2].self_attn.o_proj.kernel[...]))
  save_pretrained(lst, tmp_path / "list")  # the list layout writes byte-identical tensors
  assert (tmp_path / "list" / "model.safetensors").read_bytes() == \
      _single_file(tmp_path / "scan", tmp_path / "rewritten", scan)


def _single_file(src, dst, model):
  save_pretrained(model, dst)
  return (dst / "model.safetensors").read_bytes()


@pytest.mark.slow  # ~11 s; LoRA on the (default) stacked layout also runs in tests/rl/test_lora.py
def test_lora_on_stacked_layers_matches_list_layout():
  cfg = dataclasses.replace(CFG, tie_word_embeddings=False)
  scan, lst = _models(cfg)
  targets = ("q_proj", "o_proj", "down_proj", "lm_head")
  lst = lora.apply_lora(lst, lora.LoRAConfig(2, 4.0, target_modules=targets), rngs=nnx.Rngs(1))
  scan = lora.apply_lora(scan, lora.LoRAConfig(2, 4.0, target_modules=targets), rngs=nnx.Rngs(1))
  q = scan.layers.self_attn.q_proj.lora
  assert q.lora_a.shape == (3, 32, 2) and q.lora_b.shape == (3, 2, 4, 8)
  assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
  site = next(s for s in lora.lora_sites(scan) if s.path == "layers.self_attn.o_proj")
  assert site.layers == 3 and site.layer_paths[1] == "layers.1.self_attn.o_proj"
  rng = np.random.default_rng(3)  # non-zero B everywhere
  nnx.update(lst, jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                               nnx.state(lst, nnx.LoRAParam)))
  # the state dict uses per-layer names in both layouts: the list model's adapters load into the stack
  sd = lora.lora_state_dict(lst)
  assert sorted(lora.lora_state_dict(scan)) == sorted(sd)
  lora.load_lora_state_dict(scan, sd)
  np.testing.assert_array_equal(np.asarray(scan.layers.mlp.down_proj.lora.lora_b[...][2]),
                                np.asarray(lst.layers[2].mlp.down_proj.lora.lora_b[...]))
  forward = jax.jit(lambda m: m(TOKENS, attention_mask=MASK))
  y = np.asarray(forward(lst))
  np.testing.assert_allclose(np.asarray(forward(scan)), y, **TOL)
  with lora.lora_disabled(scan), lora.lora_disabled(lst):
    np.testing.assert_allclose(np.asarray(forward(scan)), np.asarray(forward(lst)), **TOL)
  merged = lora.merge_lora(scan)
  assert not lora.has_lora(merged)
  np.testing.assert_allclose(np.asarray(forward(merged)), y, **TOL)
  np.testing.assert_allclose(np.asarray(merged.layers.mlp.down_proj.kernel[...]),
                             _stack(lora.merge_lora(lst), lambda l: l.mlp.down_proj.kernel[...]), **TOL)
  # adapter gradients agree (layer i of the stacked gradient = layer i's gradient)
  grad = jax.jit(nnx.grad(lambda m: jnp.sum(token_logprobs(m, TOKENS, MASK) * MASK),
                          argnums=nnx.DiffState(0, nnx.LoRAParam)))
  g_s, g_l = grad(scan), grad(lst)
  np.testing.assert_allclose(np.asarray(g_s.layers.self_attn.q_proj.lora.lora_a[...]),
                             _stack(g_l, lambda l: l.self_attn.q_proj.lora.lora_a[...]), **TOL)


def test_lora_dropout_differs_per_layer_of_a_stack():
  cfg = dataclasses.replace(CFG, layer_types=None, sliding_window=None)
  model = lora.apply_lora(CausalLM(cfg, rngs=nnx.Rngs(0)), lora.LoRAConfig(2, 4.0, dropout=0.5,
                                                                           target_modules=("q_proj",)),
                          rngs=nnx.Rngs(1))
  # the key each layer's adapters see inside the scan: fold_in(key, layer index)
  @jax.jit
  def keys(key):
    with lora.lora_dropout_rng(key):
      out = []
      for i in range(3):
        with lora.lora_dropout_fold_in(jnp.int32(i)):
          out.append(jax.random.key_data(lora._DROPOUT_KEY.get()))
      return jnp.stack(out)

  k = np.asarray(keys(jax.random.key(0)))
  assert len({tuple(r.ravel()) for r in k}) == 3
  # and the dropout pass is deterministic per key, different from the no-dropout pass
  fwd = jax.jit(lambda m, key: _dropout_forward(m, key))
  a, b = fwd(model, jax.random.key(0)), fwd(model, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  nnx.update(model, jax.tree.map(lambda x: x + 0.5, nnx.state(model, nnx.LoRAParam)))
  assert np.abs(np.asarray(fwd(model, jax.random.key(0)) - fwd(model, jax.random.key(1)))).max() > 1e-4


def _dropout_forward(model, key):
  with lora.lora_dropout_rng(key):
    return model(TOKENS)


def test_errors_name_the_layout_and_the_bad_value():
  scan, lst = _models()
  with pytest.raises(ValueError, match="stacked .* layout but the model has scan_layers=False"):
    lst(TOKENS, cache=scan.init_cache(2, 12))
  with pytest.raises(ValueError, match="per-layer list layout but the model has scan_layers=True"):
    scan(TOKENS, cache=lst.init_cache(2, 12))
  with pytest.raises(ValueError, match="remat_policy='dots_saveabel' is not a jax.checkpoint_policies policy.*"
                                       "dots_with_no_batch_dims_saveable"):
    dataclasses.replace(CFG, remat_policy="dots_saveabel")
  with pytest.raises(ValueError, match="scan_layers=1 must be a bool"):
    dataclasses.replace(CFG, scan_layers=1)
  with pytest.raises(ValueError, match=r"selects layers \[1\] of the stacked site 'layers.mlp.down_proj'.*"
                                       "scan_layers=False"):
    lora.apply_lora(scan, lora.LoRAConfig(2, 4.0, target_modules=(r"layers\.1\.mlp\..*",)), rngs=nnx.Rngs(1))


def test_train_checkpoint_of_the_other_layout_fails_naming_both_layouts():
  from adrpo_jax.train.checkpoint import CheckpointMismatchError, check_tree_matches
  stacked = nnx.state(nnx.eval_shape(lambda: CausalLM(CFG, rngs=nnx.Rngs(0))), nnx.Param)
  listed = nnx.state(nnx.eval_shape(lambda: CausalLM(LIST, rngs=nnx.Rngs(0))), nnx.Param)
  with pytest.raises(CheckpointMismatchError, match=r"per-layer list layout .*current model's in the stacked "
                                                    r"layout.*resume with scan_layers=False") as e:
    check_tree_matches({"params": listed}, {"params": stacked})
  assert str(e.value).count("resume with") == 1  # the layout hint is said once
  with pytest.raises(CheckpointMismatchError, match=r"in the stacked layout .*resume with scan_layers=True"):
    check_tree_matches({"params": stacked}, {"params": listed})
  check_tree_matches({"params": stacked}, {"params": stacked})


def test_one_window_shared_by_all_layers_stays_static():
  cfg = dataclasses.replace(CFG, layer_types=("sliding_attention",) * 3)
  scan, lst = _models(cfg)
  forward = jax.jit(lambda m: m(TOKENS, attention_mask=MASK))
  np.testing.assert_allclose(np.asarray(forward(scan)), np.asarray(forward(lst)), **TOL)
  jaxpr = str(jax.make_jaxpr(lambda m: m(TOKENS, attention_mask=MASK))(scan))
  assert jaxpr.count("scan[") == 1
  # the window differs from full attention (the test would not see a dropped window otherwise)
  full = CausalLM(dataclasses.replace(cfg, layer_types=None), rngs=nnx.Rngs(0))
  assert np.abs(np.asarray(forward(full)) - np.asarray(forward(scan))).max() > 1e-3
