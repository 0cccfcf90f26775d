"""DiTConfig.scan_layers: the blocks stacked on a leading 'layers' axis and run by one lax.scan give the numbers of
the list layout (outputs and gradients, with and without remat); one scan in the jaxpr; save_dit writes the list
layout either way and a list-layout save loads into the stacked layout (the cached pre-trained DiT); the
pre-training cache key does not see the switch; LoRA on stacked blocks equals LoRA on the list layout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from adrpo_jax.flow.pretrain import _model_cache_key
from adrpo_jax.models import lora
from adrpo_jax.models.dit import DiT, DiTConfig, StackedDiTBlocks, load_dit, save_dit

CFG = DiTConfig(image_size=8, patch_size=2, hidden=32, depth=3, heads=2, mlp_ratio=2.0, num_classes=10)
TARGETS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "fc1", "fc2")
# Two different compiled computations (a loop of blocks vs one scan): float32 rounding may differ slightly.
TOL = 1e-5


def _perturbed(model, seed=0, scale=0.05):
  """Perturbs the zero-initialised (adaLN-Zero) weights so the output is not trivially 0 (NumPy noise)."""
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32), jnp.linspace(0.1, 0.9, 4),
          jnp.asarray([0, 3, 7, 10], jnp.int32))


@pytest.fixture(scope="module")
def list_and_scan(tmp_path_factory):
  """A perturbed list-layout DiT, saved, and the same weights loaded into the stacked layout."""
  list_model = _perturbed(DiT(CFG, rngs=nnx.Rngs(0)))
  directory = save_dit(list_model, tmp_path_factory.mktemp("dit_list"))
  return list_model, load_dit(directory, scan_layers=True), directory


def _loss_and_grads(model, x, t, cond):
  def loss(m):
    return jnp.mean(jnp.square(m(x, t, cond) - x))
  return jax.jit(nnx.value_and_grad(loss))(model)


def _flat(tree):
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree))[0]}


def _stack_list_layout(flat_list, depth):
  """``blocks/<i>/rest`` entries of a list-layout flat dict stacked into ``blocks/rest``."""
  out = {k: v for k, v in flat_list.items() if not k.startswith("blocks/")}
  rests = sorted({k.split("/", 2)[2] for k in flat_list if k.startswith("blocks/")})
  for rest in rests:
    out[f"blocks/{rest}"] = np.stack([flat_list[f"blocks/{i}/{rest}"] for i in range(depth)])
  return out


def test_same_init_and_layout():
  list_model, scan_model = DiT(CFG, rngs=nnx.Rngs(0)), DiT(dataclasses.replace(CFG, scan_layers=True),
                                                           rngs=nnx.Rngs(0))
  assert isinstance(scan_model.blocks, StackedDiTBlocks) and len(scan_model.blocks) == 3
  # The same random draws in the same order: identical weights (no computation in between).
  flat_scan = _flat(nnx.state(scan_model, nnx.Param))
  flat_list = _stack_list_layout(_flat(nnx.state(list_model, nnx.Param)), 3)
  assert flat_scan.keys() == flat_list.keys()
  for k in flat_scan:
    np.testing.assert_array_equal(flat_scan[k], flat_list[k], err_msg=k)
  assert scan_model.blocks.attn.wq.shape == (3, 32, 2, 16)
  assert scan_model.blocks.attn.wq.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
  assert scan_model.blocks.fc1.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  block = scan_model.blocks[1]  # a detached per-block view
  np.testing.assert_array_equal(np.asarray(block.fc2.kernel[...]), np.asarray(list_model.blocks[1].fc2.kernel[...]))
  assert block.fc2.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
  with pytest.raises(ValueError, match="scan_layers"):
    DiTConfig(scan_layers="yes")


@pytest.mark.slow  # ~6-15 s; the DiT scan is off by default (the MMDiT, scanned by default, is checked in the default suite)
@pytest.mark.parametrize("remat", [False, True])
def test_scan_equals_list_outputs_and_grads(list_and_scan, inputs, remat):
  list_model, scan_model, _ = list_and_scan
  if remat:
    list_model = DiT(dataclasses.replace(CFG, remat=True), rngs=nnx.Rngs(1))
    nnx.update(list_model, nnx.state(list_and_scan[0]))
    scan_model = DiT(dataclasses.replace(CFG, remat=True, scan_layers=True), rngs=nnx.Rngs(1))
    nnx.update(scan_model, nnx.state(list_and_scan[1]))
  loss_l, grads_l = _loss_and_grads(list_model, *inputs)
  loss_s, grads_s = _loss_and_grads(scan_model, *inputs)
  np.testing.assert_allclose(float(loss_s), float(loss_l), rtol=TOL, atol=TOL)
  out_l = jax.jit(lambda m, *a: m(*a))(list_model, *inputs)
  out_s = jax.jit(lambda m, *a: m(*a))(scan_model, *inputs)
  assert float(jnp.max(jnp.abs(out_l))) > 1e-2  # not trivially 0
  np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_l), rtol=TOL, atol=TOL)
  flat_s, flat_l = _flat(grads_s), _stack_list_layout(_flat(grads_l), CFG.depth)
  assert flat_s.keys() == flat_l.keys()
  assert float(np.max(np.abs(flat_s["blocks/attn/wq"]))) > 0
  for k in flat_s:
    np.testing.assert_allclose(flat_s[k], flat_l[k], rtol=TOL, atol=TOL, err_msg=k)


def test_one_scan_in_the_jaxpr(list_and_scan, inputs):
  list_model, scan_model, _ = list_and_scan
  names_scan = [e.primitive.name for e in jax.make_jaxpr(lambda m, *a: m(*a))(scan_model, *inputs).jaxpr.eqns]
  names_list = [e.primitive.name for e in jax.make_jaxpr(lambda m, *a: m(*a))(list_model, *inputs).jaxpr.eqns]
  assert names_scan.count("scan") == 1 and names_list.count("scan") == 0
  # The loop of the list layout traces every block: the scan layout's jaxpr is shorter.
  assert len(names_scan) < len(names_list)
  # With remat the checkpoint sits inside the scan body (one scan, no top-level checkpoint per block).
  remat_model = DiT(dataclasses.replace(CFG, remat=True, scan_layers=True), rngs=nnx.Rngs(0))
  grad_jaxpr = jax.make_jaxpr(nnx.grad(lambda m: jnp.sum(m(*inputs))))(remat_model).jaxpr
  names = [e.primitive.name for e in grad_jaxpr.eqns]
  assert names.count("checkpoint") == 0 and names.count("remat") == 0 and 1 <= names.count("scan") <= 2


def test_save_load_list_layout(list_and_scan, inputs, tmp_path):
  list_model, scan_model, directory = list_and_scan
  # save_dit of the stacked model writes the list layout: the same names and values as the list model's save.
  saved_list = load_file(f"{directory}/params.safetensors")
  scan_dir = save_dit(scan_model, tmp_path / "dit_scan")
  saved_scan = load_file(f"{scan_dir}/params.safetensors")
  assert saved_scan.keys() == saved_list.keys() and "blocks/2/attn/wq" in saved_scan
  for k in saved_list:
    np.testing.assert_array_equal(saved_scan[k], saved_list[k], err_msg=k)
  # ... and loads into either layout (the saved config says scan_layers=True; the override picks the layout).
  assert load_dit(scan_dir).config.scan_layers and not load_dit(scan_dir, scan_layers=False).config.scan_layers
  out = jax.jit(lambda m, *a: m(*a))
  np.testing.assert_allclose(np.asarray(out(load_dit(scan_dir, scan_layers=False), *inputs)),
                             np.asarray(out(list_model, *inputs)), rtol=TOL, atol=TOL)
  # A wrong depth is named, not silently truncated.
  with pytest.raises(ValueError, match="do not match"):
    from adrpo_jax.models.dit import restore_nnx_params
    restore_nnx_params(DiT(dataclasses.replace(CFG, depth=2, scan_layers=True), rngs=nnx.Rngs(0)), directory)


def test_pretrain_cache_key_ignores_scan_layers():
  key = _model_cache_key(dataclasses.replace(CFG, scan_layers=True))
  assert "scan_layers" not in key and key == _model_cache_key(CFG)


@pytest.mark.slow  # ~15 s (the DiT scan is an option, off by default: keep the default suite lean)
def test_lora_on_stacked_blocks(list_and_scan, inputs):
  list_model, scan_model, _ = list_and_scan
  config = lora.LoRAConfig(4, 8.0, target_modules=TARGETS)
  adapted_l = lora.apply_lora(nnx.clone(list_model), config, rngs=nnx.Rngs(3))
  adapted_s = lora.apply_lora(nnx.clone(scan_model), config, rngs=nnx.Rngs(3))
  sites = {s.path: s for s in lora.lora_sites(adapted_s) if s.adapted}
  assert sorted(sites) == sorted(f"blocks.{t}" for t in TARGETS)
  assert sites["blocks.attn.wq"].layers == 3 and sites["blocks.attn.wq"].adapter.lora_a.shape == (3, 32, 4)
  # Random adapters on the list model, moved through the (layout-independent) LoRA state dict.
  state = nnx.state(adapted_l, nnx.LoRAParam)
  rng = np.random.default_rng(1)
  nnx.update(adapted_l, jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), state))
  lora.load_lora_state_dict(adapted_s, lora.lora_state_dict(adapted_l))

  def loss(m):
    return jnp.mean(jnp.square(m(*inputs) - inputs[0]))

  grad_fn = jax.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))
  loss_l, grads_l = grad_fn(adapted_l)
  loss_s, grads_s = grad_fn(adapted_s)
  base_loss = float(jax.jit(loss)(list_model))
  assert abs(float(loss_l) - base_loss) > 1e-4  # the adapters change the output
  np.testing.assert_allclose(float(loss_s), float(loss_l), rtol=TOL, atol=TOL)
  flat_s, flat_l = _flat(grads_s), _stack_list_layout(_flat(grads_l), CFG.depth)
  assert flat_s.keys() == flat_l.keys() and len(flat_s) == 2 * len(TARGETS)
  for k in flat_s:
    np.testing.assert_allclose(flat_s[k], flat_l[k], rtol=TOL, atol=TOL, err_msg=k)
  # Merged stacked adapters equal the adapted stacked model.
  merged = lora.merge_lora(nnx.clone(adapted_s))
  out = jax.jit(lambda m, *a: m(*a))
  np.testing.assert_allclose(np.asarray(out(merged, *inputs)), np.asarray(out(adapted_s, *inputs)),
                             rtol=1e-4, atol=1e-5)  # merged kernel W + sAB vs W x + s(xA)B: different roundings
  # A stacked site is adapted in every block or none.
  with pytest.raises(ValueError, match="but not all"):
    lora.apply_lora(nnx.clone(scan_model), lora.LoRAConfig(4, 8.0, target_modules=(r"blocks\.0\.fc1",)),
                    rngs=nnx.Rngs(0))


@pytest.mark.slow  # ~12-22 s: two compilations of the whole flow step
def test_flow_train_step_with_stacked_blocks_on_a_mesh_equals_the_list_layout(tmp_path):
  """`model.scan_layers` of the flow trainer: the whole jitted flow step (sample -> reward -> ADRPO-W2 update,
  reference / sampling-copy refresh) with stacked blocks on a (data=2, fsdp=2, tensor=2) mesh computes the
  metrics of the list-layout step on one device (to TOL: two different compiled computations); the stacked
  parameters are planned with the 'layers' axis unsharded; the config key reaches the loaded model."""
  import optax

  from adrpo_jax import train
  from adrpo_jax.flow.config import add_flow_config, validate_flow_config
  from adrpo_jax.flow.rewards import ImageStatReward
  from adrpo_jax.flow.step import FlowStepOptions, make_train_step
  from adrpo_jax.flow.trainer import model_load_overrides
  from adrpo_jax.train.config import common_config

  tiny = DiTConfig(image_size=8, patch_size=4, hidden=16, depth=2, heads=2, num_classes=4, frequency_dim=16,
                   mlp_ratio=2.0)
  save_dit(_perturbed(DiT(tiny, rngs=nnx.Rngs(0)), seed=3, scale=0.3), tmp_path / "dit")
  config = add_flow_config(common_config())
  config.model.scan_layers = True
  validate_flow_config(config)
  stacked = load_dit(tmp_path / "dit", **model_load_overrides(config))
  listed = load_dit(tmp_path / "dit")
  assert isinstance(stacked.blocks, StackedDiTBlocks) and not isinstance(listed.blocks, StackedDiTBlocks)

  opts = FlowStepOptions(num_conditions=4, null_class=4, image_shape=(8, 8, 1), sampling_method="euler",
                         sampling_steps=2, beta=0.5, grad_accum_steps=2, cond_dropout_prob=0.25)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))
  reward = ImageStatReward("mean_ink")
  cond = np.repeat(np.arange(4, dtype=np.int32), 8)

  def run(model, mesh):
    graphdef, params = nnx.split(model, nnx.Param)
    state = {"params": params, "opt_state": tx.init(params), "ref_params": params, "sampler_params": params}
    step = make_train_step(graphdef, tx, reward, opts, mesh)
    if mesh is None:
      return jax.device_get(jax.jit(step)(state, None, None, jnp.asarray(cond), jax.random.key(7), True, True)[1])
    shardings = train.shardings_of(train.plan_sharded(lambda: state, mesh))
    specs = {jax.tree_util.keystr(p): x.spec for p, x in jax.tree_util.tree_leaves_with_path(shardings["params"])}
    blocks = {p: s for p, s in specs.items() if "'blocks'" in p}
    assert blocks and all(len(s) == 0 or s[0] is None for s in blocks.values())  # 'layers' is never split
    assert any("fsdp" in str(s) for s in blocks.values())  # the rest of a stacked kernel still is
    out = jax.jit(step, out_shardings=(shardings, train.replicated_sharding(mesh)))(
        jax.device_put(state, shardings), None, None, train.host_local_to_global(cond, mesh), jax.random.key(7),
        True, True)
    return jax.device_get(out[1])

  m_list = run(listed, None)
  m_scan = run(stacked, train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  assert sorted(m_list) == sorted(m_scan) and m_list["w2_mean"] == 0.0 and m_list["loss"] != 0.0
  for key in m_list:
    np.testing.assert_allclose(m_scan[key], m_list[key], rtol=TOL, atol=1e-6, err_msg=key)
