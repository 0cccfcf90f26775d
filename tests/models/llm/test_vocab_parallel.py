"""The vocabulary on an ``fsdp`` mesh (activation_sharding.embedding_lookup / vocab_parallel_axes), on the 8 forced
CPU devices: the embedding is looked up on the table's own ``fsdp`` shards and the log-prob projection runs with
its vocabulary sharded, so no device holds a whole [V, D] table, output weight or float32 gradient of either.
Values and gradients equal one device's; the per-device temp memory is below the gathered form's; the choice
falls back to gathering for tiny vocabularies (more ids per device than vocabulary rows)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adrpo_jax import train
from adrpo_jax.models.llm import CausalLM, DecoderConfig, activation_sharding, token_logprobs
from adrpo_jax.train.sharding import BATCH_AXES

# A vocabulary large next to the tokens a device holds (B T / 8 = 32 << V = 4096), as for a real LLM.
CFG = DecoderConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
B, T, CHUNK = 16, 16, 8


def _mesh(**shape):
  return train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **shape})


def _loss_fn(graphdef):
  def loss(params, tokens, mask):
    lp, ent = token_logprobs(nnx.merge(graphdef, params), tokens, mask, chunk_size=CHUNK, return_entropy=True)
    return jnp.sum(lp * jnp.arange(1, T + 1)) + 0.1 * jnp.sum(ent)
  return loss


def _data():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
  mask = np.ones((B, T), bool)
  mask[::3, :4] = False
  return tokens, mask


def test_choice_by_shape():
  mesh = _mesh(fsdp=8)
  x = jnp.zeros((B, CHUNK, 64))
  assert activation_sharding.vocab_parallel_axes(B, CHUNK, 4096, x) is None  # no mesh
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    assert activation_sharding.vocab_parallel_axes(B, CHUNK, 4096) == ("fsdp",)
    assert activation_sharding.vocab_parallel_axes(B, CHUNK, 4100) is None  # V does not divide over fsdp
    assert activation_sharding.vocab_parallel_axes(B, 512, 4096) is None  # 16 x 512 rows x positions >= V
  with jax.sharding.use_abstract_mesh(_mesh(data=2, fsdp=2, tensor=2).abstract_mesh):
    assert activation_sharding.vocab_parallel_axes(B, CHUNK, 4096) == ("tensor", "fsdp")
  with jax.sharding.use_abstract_mesh(_mesh(data=8).abstract_mesh):
    assert activation_sharding.vocab_parallel_axes(B, CHUNK, 4096) is None  # no fsdp: weights are replicated


@pytest.mark.slow  # ~5-10 s of compiles; the default suite checks the HLO and memory (test_engine_sharding)
@pytest.mark.parametrize("shape", [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_logprob_gradient_equals_one_device(shape):
  """Different compiled computations (sharded reductions sum in another order): compared to 1e-5 of each leaf's
  largest entry (the gathered form before showed the same size of differences: ~5e-7 of the largest entry)."""
  model = CausalLM(CFG, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens, mask = _data()
  loss = _loss_fn(graphdef)
  want_v, want_g = jax.jit(jax.value_and_grad(loss))(params, tokens, mask)
  mesh = _mesh(**shape)
  sharded = train.plan_sharded(lambda: nnx.state(CausalLM(CFG, rngs=nnx.Rngs(0))), mesh)
  params_s = jax.device_put(params, jax.tree.map(lambda s: s.sharding, sharded))
  bs = NamedSharding(mesh, P(BATCH_AXES))
  got_v, got_g = jax.jit(jax.value_and_grad(loss))(params_s, jax.device_put(tokens, bs), jax.device_put(mask, bs))
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * np.max(np.abs(b)))


def _temp_bytes(monkeypatch=None, gathered=False):
  mesh = _mesh(fsdp=8)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(CFG, rngs=nnx.Rngs(0))))
  params = train.plan_sharded(lambda: nnx.state(CausalLM(CFG, rngs=nnx.Rngs(0))), mesh)
  bs = NamedSharding(mesh, P(BATCH_AXES))
  if gathered:  # the form before: the table and the output weight gathered over fsdp
    monkeypatch.setattr(activation_sharding, "vocab_parallel_axes", lambda *a, **k: None)
    monkeypatch.setattr(activation_sharding, "embedding_lookup", lambda table, tokens: jnp.take(
        *activation_sharding.constrain_embedding_lookup(table, tokens), axis=0))
    import adrpo_jax.models.llm.logprobs as logprobs_lib
    import adrpo_jax.models.llm.modeling as modeling_lib
    monkeypatch.setattr(logprobs_lib, "vocab_parallel_axes", lambda *a, **k: None)
    monkeypatch.setattr(modeling_lib, "embedding_lookup", activation_sharding.embedding_lookup)
  compiled = jax.jit(jax.value_and_grad(_loss_fn(graphdef))).lower(
      params, jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bs),
      jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=bs)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_fsdp_temp_memory_below_the_gathered_vocabulary(monkeypatch):
  """Measured 1.19 MiB (vocabulary sharded) vs 2.55 MiB (table and output weight gathered, their float32
  gradients whole on every device): the gathered form holds at least one float32 [V, D] more."""
  sharded = _temp_bytes()
  gathered = _temp_bytes(monkeypatch, gathered=True)
  assert gathered - sharded >= CFG.vocab_size * CFG.hidden_size * 4, (sharded, gathered)

