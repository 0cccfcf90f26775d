"""Engine items of the scale issue, checked in the compiled programs on 8 forced CPU devices (tests/conftest sets
--xla_force_host_platform_device_count=8):

* `attention_impl='auto'` decides xla vs chunked by the bytes of the score tensor (B*H*T*S float32 per device),
  not by T*S alone;
* chunked attention has no cross-device predicate (no `pred` all-reduce inside its block loops);
* on a data x fsdp x tensor mesh the embedding output [B, T, D] stays batch-sharded (never the global batch on a
  device);
* the log-prob chunk width counts the rows of one device, not the global batch;
* per-device memory of fsdp=8 <= data=8 for the log-prob gradient, also when the caller sets no mesh context
  (the activations' mesh is read from the arrays).
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adrpo_jax import train
from adrpo_jax.models.llm import CausalLM, DecoderConfig, token_logprobs
from adrpo_jax.models.llm.attention import AttentionMask, chunked_attention, select_impl
from adrpo_jax.models.llm.logprobs import chunk_width
from adrpo_jax.train.sharding import BATCH_AXES
from tests.topologies import tpu_devices


def _mesh(**axes):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (forced) devices")
  return train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **axes})


# ---------------------------------------------------------------------------------------------------------
# (a) auto: score bytes
# ---------------------------------------------------------------------------------------------------------
def test_auto_counts_score_bytes_not_just_t_times_s():
  """A cached prefill of 64 rows x 32 heads x 512 queries x 1,536 slots is 6 GiB of float32 scores per layer:
  chunked, although T * S < auto_min_len**2; one row of the same T x S stays on xla."""
  cached = AttentionMask(key_valid=jnp.ones((64, 1536), bool), q_offset=jnp.int32(0))
  big = select_impl("auto", platform="gpu", q_shape=(64, 512, 32, 128), k_shape=(64, 1536, 8, 128),
                    dtype=jnp.bfloat16, mask=cached)
  assert big == "chunked"
  one = AttentionMask(key_valid=jnp.ones((1, 1536), bool), q_offset=jnp.int32(0))
  assert select_impl("auto", platform="gpu", q_shape=(1, 512, 32, 128), k_shape=(1, 1536, 8, 128),
                     dtype=jnp.bfloat16, mask=one) == "xla"
  # cpu: same rule
  assert select_impl("auto", platform="cpu", q_shape=(64, 512, 32, 128), k_shape=(64, 1536, 8, 128),
                     dtype=jnp.float32, mask=cached) == "chunked"


def test_auto_score_bytes_count_rows_per_device():
  """Under a batch-sharded mesh the budget is per device: 8 devices hold 1/8 of the rows' scores each."""
  mask = AttentionMask(key_valid=jnp.ones((64, 1536), bool), q_offset=jnp.int32(0))
  kw = dict(platform="cpu", q_shape=(64, 128, 8, 64), k_shape=(64, 1536, 8, 64), dtype=jnp.float32, mask=mask,
            auto_max_score_bytes=2 ** 28)  # 64 * 8 * 128 * 1536 * 4 B = 384 MiB globally, 48 MiB per device
  assert select_impl("auto", **kw) == "chunked"
  with jax.sharding.use_abstract_mesh(_mesh(data=8).abstract_mesh):
    assert select_impl("auto", **kw) == "xla"


# ---------------------------------------------------------------------------------------------------------
# (d) chunked attention: no cross-device predicate
# ---------------------------------------------------------------------------------------------------------
def test_chunked_attention_has_no_cross_device_predicate():
  """grad of chunked attention over a data=8 batch: no pred all-reduce (the old `jnp.any(valid_j)` block skip was
  one per block pair, forward and backward)."""
  mesh = _mesh(data=8)
  b, t, h, hd = 16, 256, 2, 16
  bs = NamedSharding(mesh, P(BATCH_AXES))
  sds = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=bs)  # noqa: E731

  def loss(q, k, v, valid):
    out = chunked_attention(q, k, v, AttentionMask(key_valid=valid), scale=0.25, chunk_size=64)
    return jnp.sum(out * out)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      sds((b, t, h, hd)), sds((b, t, h, hd)), sds((b, t, h, hd)), sds((b, t), jnp.bool_)).compile().as_text()
  pred_all_reduce = [line for line in hlo.splitlines() if re.search(r"= pred\[[^\]]*\] all-reduce", line)]
  assert not pred_all_reduce, pred_all_reduce[:3]


# ---------------------------------------------------------------------------------------------------------
# (b) embedding output batch-sharded on data x fsdp x tensor
# ---------------------------------------------------------------------------------------------------------
def _tiny_cfg(**kw):
  base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True)
  base.update(kw)
  return DecoderConfig(**base)


def _abstract_params(cfg, mesh):
  return train.plan_sharded(lambda: nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param), mesh)


@pytest.mark.parametrize("t", [32, 1])
def test_embedding_output_stays_batch_sharded_on_3d_mesh(t, capfd):
  """data=2 x fsdp=2 x tensor=2, a forward (T=32) and a decode-sized call (T=1): the lookup runs on the table's own
  fsdp shards for the ids of the device's fsdp group (a masked lookup + all-reduce over tensor), then one all-to-all
  of [B / data, T, D / fsdp] gives each device its rows at full width; the table is never gathered. Before the
  constraints, GSPMD computed it with the table's sharding and then went to the batch sharding by replicating the
  [B, T, D] output ("Involuntary full rematerialization")."""
  cfg = _tiny_cfg()
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  b, d = 16, cfg.hidden_size
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  bs = NamedSharding(mesh, P(BATCH_AXES))
  tok = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=bs)

  def fwd(params, tokens):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return nnx.merge(graphdef, params).hidden_states(tokens)

  capfd.readouterr()
  hlo = jax.jit(fwd).lower(_abstract_params(cfg, mesh), tok).compile().as_text()
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
  v = cfg.vocab_size
  gathers = [line for line in hlo.splitlines() if "all-gather(" in line]
  assert not [g for g in gathers if f"[{v},{d}]" in g or f"[{v // 2},{d}]" in g], gathers  # the table stays sharded
  for line in (line for line in hlo.splitlines() if "all-to-all(" in line):  # at most [B / data, T, D / fsdp] each
    shapes = re.findall(r"f32\[([\d,]+)\]", line.split("all-to-all(")[0])
    assert sum(math.prod(int(x) for x in sh.split(",")) for sh in shapes) <= b // 2 * t * d // 2, line
  assert not re.search(rf"\[{b},{t},", hlo)  # no [B, T, ...] of the global batch on a device
  assert re.search(rf"f32\[{b // 4},{t},{d}\]", hlo)  # the rows of one device, full width


# ---------------------------------------------------------------------------------------------------------
# (c) log-prob chunk width per device
# ---------------------------------------------------------------------------------------------------------
def test_logprob_chunk_width_counts_rows_per_device():
  assert chunk_width(64, 1000, 512) == 8  # no mesh: all 64 rows are local
  with jax.sharding.use_abstract_mesh(_mesh(data=8).abstract_mesh):
    assert chunk_width(64, 1000, 512) == 64  # 8 rows per device
    assert chunk_width(64, 40, 512) == 40  # never wider than the sequence
    assert chunk_width(60, 1000, 512) == 8  # 60 rows do not divide over 8 devices: global rows
  with jax.sharding.use_abstract_mesh(_mesh(data=2, fsdp=2, tensor=2).abstract_mesh):
    assert chunk_width(64, 1000, 512) == 32  # 16 rows per device (tensor is not a batch axis)


def test_logprobs_map_over_per_device_chunks():
  """The traced program maps over ceil(N / (chunk / rows per device)) chunks: 2 for 64 rows, N = 128, chunk
  512 on data=8 (before: 16 chunks of 8 positions)."""
  cfg = _tiny_cfg(num_hidden_layers=1)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((64, 129), jnp.int32)
  mesh = _mesh(data=8)

  def f(m, t):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return token_logprobs(m, t, logits_to_keep=128, chunk_size=512)

  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, t: f(nnx.merge(graphdef, s), t))(state, tokens)
  lengths = []

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "scan":
        lengths.append(eqn.params["length"])
      for v in eqn.params.values():
        if isinstance(v, jax.extend.core.ClosedJaxpr):
          walk(v.jaxpr)
        elif isinstance(v, jax.extend.core.Jaxpr):
          walk(v)

  walk(jaxpr.jaxpr)
  assert 2 in lengths and 16 not in lengths, lengths


# ---------------------------------------------------------------------------------------------------------
# fsdp=8 <= data=8 per device
# ---------------------------------------------------------------------------------------------------------
def _logprob_grad_memory(cfg, mesh, b, t, *, mesh_context: bool):
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  bs = NamedSharding(mesh, P(BATCH_AXES))
  tok = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=bs)
  msk = jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=bs)

  def loss(params, tokens, mask):
    model = nnx.merge(graphdef, params)
    if mesh_context:
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jnp.sum(token_logprobs(model, tokens, mask))
    return jnp.sum(token_logprobs(model, tokens, mask))

  params = _abstract_params(cfg, mesh)
  out_shardings = (NamedSharding(mesh, P()), jax.tree.map(lambda x: x.sharding, params))
  ma = jax.jit(jax.value_and_grad(loss), out_shardings=out_shardings).lower(params, tok, msk).compile(
  ).memory_analysis()
  return ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes


@pytest.mark.parametrize("mesh_context", [False, True])
def test_fsdp_holds_less_than_data_for_the_logprob_gradient(mesh_context):
  """Small shape (the SmolLM2-shape check is the slow test below). Without a mesh context the model reads the
  mesh from its arrays (before: fsdp=8 followed the table's sharding and ran every row on every device)."""
  cfg = _tiny_cfg(vocab_size=4096, hidden_size=128, intermediate_size=256)
  mem = {axis: _logprob_grad_memory(cfg, _mesh(**{axis: 8}), 32, 64, mesh_context=mesh_context)
         for axis in ("data", "fsdp")}
  assert mem["fsdp"] <= mem["data"], mem


def _v5e_mesh(**axes):
  return train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **axes}, devices=tpu_devices("v5e:2x4"))


@pytest.mark.slow
@pytest.mark.parametrize("layers,target", [(2, "cpu"), (4, "cpu"), (2, "v5e:2x4")])
def test_fsdp_holds_less_than_data_at_smollm2_shape(layers, target):
  """vocab 49,152, B = 64, T = 192, hidden 256: the log-prob gradient (no mesh context, as a user calls it) and
  the RL update (`make_rl_update` with its mesh), per device arguments + temps + outputs (~1 min), on 8 forced
  CPU devices and compiled by the TPU compiler for a v5e-8 (traced as a TPU runs it: splash attention)."""
  import optax

  from adrpo_jax.models.llm.activation_sharding import compiling_for
  from adrpo_jax.rl.step import StepOptions, make_rl_update
  cfg = DecoderConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  b, pl, nl = 64, 64, 128
  lp, upd = {}, {}
  make = _mesh if target == "cpu" else _v5e_mesh
  platform = None if target == "cpu" else "tpu"
  for axis in ("data", "fsdp"):
    mesh = make(**{axis: 8})
    with compiling_for(platform):
      lp[axis] = _logprob_grad_memory(cfg, mesh, b, pl + nl, mesh_context=False)
    tx = optax.adamw(1e-6)

    def init(tx=tx):
      params = nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
      return {"params": params, "opt_state": tx.init(params)}

    abstract = train.plan_sharded(init, mesh)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    opts = StepOptions(group_size=8, prompt_length=pl, max_new_tokens=nl, beta=0.04, adaptive=True)
    bs = NamedSharding(mesh, P(BATCH_AXES))
    s = lambda shape, dtype, bs=bs: jax.ShapeDtypeStruct(shape, dtype, sharding=bs)  # noqa: E731
    batch = {"tokens": s((b, pl + nl), jnp.int32), "attention_mask": s((b, pl + nl), jnp.bool_),
             "completion_mask": s((b, nl), jnp.bool_), "lengths": s((b,), jnp.int32), "done": s((b,), jnp.bool_),
             "rewards": s((b,), jnp.float32), "reward_valid": s((b,), jnp.bool_),
             "ref_logp": s((b, nl), jnp.float32)}
    with compiling_for(platform):
      ma = jax.jit(make_rl_update(graphdef, tx, opts, mesh), donate_argnums=(0, 1)).lower(
          abstract["params"], abstract["opt_state"], None, batch, jax.random.key(0)).compile().memory_analysis()
    upd[axis] = (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
                 - ma.alias_size_in_bytes)
  assert lp["fsdp"] <= lp["data"], lp
  assert upd["fsdp"] <= upd["data"], upd
  np.testing.assert_array_less(0, [lp["fsdp"], upd["fsdp"]])
