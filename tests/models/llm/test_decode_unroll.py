"""The sampler's layer execution for stacked models (`SamplingConfig.unroll_layers`): unrolled over per-layer
weights sliced once per call, the layer scan, or the size-based auto choice; same tokens and log-probs."""
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig, SamplingConfig, generate, make_generate_fn, modeling
from adrpo_jax.models.llm import sampler as sampler_lib


def _cfg(**kw):
  base = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2)
  base.update(kw)
  return DecoderConfig(**base)


@pytest.fixture(scope="module")
def model():
  return CausalLM(_cfg(), rngs=nnx.Rngs(0))


def _prompts():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 128, (4, 6)), jnp.int32)
  mask = jnp.asarray(np.arange(6)[None, :] >= np.array([0, 2, 0, 3])[:, None])
  return tokens, mask


@pytest.mark.parametrize("kw", [dict(greedy=True),
                                pytest.param(dict(temperature=0.9, top_p=0.9), marks=pytest.mark.slow),
                                pytest.param(dict(top_k=5), marks=pytest.mark.slow)])
def test_unrolled_equals_scanned(model, kw):
  """Same computation in both executions: identical tokens; log-probs to float rounding (different fusions)."""
  tokens, mask = _prompts()
  out = {u: generate(model, tokens, mask, rng=jax.random.key(3), max_new_tokens=7, unroll_layers=u, **kw)
         for u in (False, True)}
  np.testing.assert_array_equal(out[True].tokens, out[False].tokens)
  np.testing.assert_allclose(out[True].logprobs, out[False].logprobs, atol=2e-6)


def test_unstacked_view_shares_the_weights(model):
  view = model.unstacked()
  assert view.config.scan_layers is False and len(view.layers) == 3 and model.config.scan_layers == "auto"
  np.testing.assert_array_equal(view.layers[2].self_attn.q_proj.kernel[...],
                                model.layers.self_attn.q_proj.kernel[...][2])
  x = jnp.asarray([[5, 6, 7]])
  np.testing.assert_allclose(jax.jit(lambda m: m(x))(view), jax.jit(lambda m: m(x))(model), atol=1e-5)
  listed = CausalLM(_cfg(scan_layers=False), rngs=nnx.Rngs(0))
  assert listed.unstacked() is listed


def test_auto_unrolls_small_models_only(model, monkeypatch):
  cfg = SamplingConfig(max_new_tokens=2)
  assert sampler_lib.decode_unrolled(model, cfg)
  assert not sampler_lib.decode_unrolled(model, SamplingConfig(max_new_tokens=2, unroll_layers=False))
  monkeypatch.setattr(modeling, "AUTO_UNROLL_MAX_LAYERS", 2)  # deeper than the limit: the scan
  assert not sampler_lib.decode_unrolled(model, cfg)
  monkeypatch.setattr(modeling, "AUTO_UNROLL_MAX_LAYERS", 16)
  monkeypatch.setattr(modeling, "AUTO_UNROLL_MAX_BYTES", 1024)  # larger than the limit: the scan
  assert not sampler_lib.decode_unrolled(model, cfg)
  with pytest.raises(ValueError, match="unroll_layers='yes'"):
    SamplingConfig(max_new_tokens=2, unroll_layers="yes")


@functools.lru_cache(maxsize=None)  # compiled once per layout for the two tests that read it
def _decode_loop_bodies(unroll: bool) -> tuple[str, ...]:
  """The optimized HLO of the decode while loops' bodies (D = 64, F = 96, 4 heads over 2 kv heads of 16, B = 2
  rows, a cache of 5 + 4 = 9 slots)."""
  cfg = _cfg(hidden_size=64, intermediate_size=96)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  fn = make_generate_fn(graphdef, SamplingConfig(max_new_tokens=4, greedy=True, unroll_layers=unroll))
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  hlo = jax.jit(fn).lower(state, sds((2, 5), jnp.int32), sds((2, 5), jnp.bool_), jax.random.key(0)).compile().as_text()
  bodies = []
  for name in set(re.findall(r"while\([^\n]*?body=%?([\w.\-]+)", hlo)):
    m = re.search(rf"\n%?{re.escape(name)} [^\n]*\{{\n(.*?)\n\}}", hlo, re.S)
    bodies.append(m.group(1) if m else "")
  return tuple(bodies)


def _decode_loop_weight_slices(unroll: bool) -> int:
  """Fusions / slices producing one layer's MLP kernel [D, F] inside the decode while loop's body."""
  return sum(len(re.findall(r"= f32\[(?:1,)?(?:64,96|96,64)\]\{[0-9,]+\} (?:slice|dynamic-slice|copy|fusion)\(", body))
             for body in _decode_loop_bodies(unroll))


@pytest.mark.parametrize("unroll", [True, False])
def test_decode_step_reads_the_cache_in_place(unroll):
  """The KV cache is [B, K, S, hd] per layer (heads before slots): the decode step's two attention products
  read it as it lies. With slots first ([B, S, K, hd]) XLA wrote a transposed copy of every layer's keys and
  values at every step (on CPU a third of the step's time); no transpose or copy of a layer's cache
  (2 x 2 x 9 x 16 = 576 elements) is left in the loop."""
  bodies = _decode_loop_bodies(unroll)
  assert bodies
  layer_cache = r"f32\[(?:2,2,9,16|2,2,16,9|2,9,2,16|2,16,2,9|2,9,16,2)\]"
  layers_per_body = 3 if unroll else 1
  for body in bodies:
    moves = [line.strip()[:160] for line in body.splitlines()
             if re.search(rf"= {layer_cache}\{{[0-9,]+\}} (?:transpose|copy)\(", line)
             or re.search(rf"%[\w.\-]*transpose[\w.\-]* = {layer_cache}", line)]
    if "xla_cpu_max_isa" in os.environ.get("XLA_FLAGS", ""):
      # the suite's second XLA setting (AVX2, no YNNPACK dots): that dot emitter wants the keys as [B, K, hd, S]
      # and copies them; the values are still read in place (the old layout copied both: 2 per layer)
      assert len(moves) <= layers_per_body, moves
    else:
      assert not moves, moves


def test_unrolled_decode_loop_reads_weights_in_place():
  """The scanned decode step slices every layer's weights out of the stack inside the loop (a copy per step);
  the unrolled one slices them once, before the loop."""
  assert _decode_loop_weight_slices(True) == 0
  assert _decode_loop_weight_slices(False) > 0


# ---------------------------------------------------------------------------------------------------------
# scan_layers='auto': the forward of a small stacked model runs unrolled
# ---------------------------------------------------------------------------------------------------------
def test_auto_forward_is_unrolled_and_equal_to_the_scan():
  auto = CausalLM(_cfg(), rngs=nnx.Rngs(1))
  scanned = nnx.merge(nnx.graphdef(CausalLM(_cfg(scan_layers=True), rngs=nnx.Rngs(1))), nnx.state(auto))
  assert auto.config.scan_layers == "auto" and modeling.runs_unrolled(auto)
  assert not modeling.runs_unrolled(scanned)
  tokens = jnp.asarray([[4, 5, 6, 7], [0, 9, 10, 11]])
  mask = jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1]], bool)

  def loss(m):
    return jnp.sum(m(tokens, attention_mask=mask) ** 2)

  hlo = {name: jax.jit(jax.grad(loss)).lower(m).as_text() for name, m in (("auto", auto), ("scan", scanned))}
  assert "while" not in hlo["auto"] and "while" in hlo["scan"]  # the layer loop (and its backward) is gone
  g_auto, g_scan = jax.jit(jax.grad(loss))(auto), jax.jit(jax.grad(loss))(scanned)
  for a, b in zip(jax.tree.leaves(nnx.state(g_auto)), jax.tree.leaves(nnx.state(g_scan))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"scan_layers='yes' must be a bool .* or 'auto'"):
    _cfg(scan_layers="yes")


def test_auto_unrolled_lora_dropout_draws_the_scans_masks():
  """LoRA dropout inside the unrolled view folds the layer index into the key, as the scan does."""
  from adrpo_jax.models.lora import LoRAConfig, apply_lora, lora_dropout_rng
  auto = apply_lora(CausalLM(_cfg(), rngs=nnx.Rngs(1)), LoRAConfig(rank=2, alpha=4.0, dropout=0.5),
                    rngs=nnx.Rngs(2))
  graphdef, state = nnx.split(auto)
  scanned = nnx.merge(graphdef, state)
  scanned.config = _cfg(scan_layers=True)  # the same module graph, run by the scan
  for m in (auto, scanned):  # non-zero B so the adapters (and their dropout) change the output
    for path, var in nnx.iter_graph(m):
      if isinstance(var, nnx.Variable) and path and str(path[-1]) == "lora_b":
        var.set_value(jnp.full(var.shape, 0.1, var.dtype))
  tokens = jnp.asarray([[4, 5, 6, 7]])

  def fwd(m):
    with lora_dropout_rng(jax.random.key(7)):
      return m(tokens)

  assert modeling.runs_unrolled(auto) and not modeling.runs_unrolled(scanned)
  np.testing.assert_allclose(jax.jit(fwd)(auto), jax.jit(fwd)(scanned), rtol=1e-5, atol=1e-6)
