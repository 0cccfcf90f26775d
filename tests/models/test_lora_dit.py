"""LoRA on the DiT velocity network (model level; what the flow trainer uses): sites (nnx.Linear layers and the
attention's raw kernels), init == base exactly, gradients only on adapters, adapters-off == base, merge ==
adapted model (and save_dit of the merged model reloads as a plain DiT), adapter shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax import train
from adrpo_jax.models import lora
from adrpo_jax.models.dit import DiT, DiTConfig, load_dit, save_dit

CFG = DiTConfig(image_size=8, patch_size=2, hidden=32, depth=1, heads=2, mlp_ratio=2.0, num_classes=10)
TARGETS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "fc1", "fc2")


def _base(seed=0, scale=0.05):
    """A DiT whose zero-initialised (adaLN-Zero) weights are perturbed, so the output is not trivially 0."""
    model = DiT(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)  # NumPy noise: no per-shape XLA compilations
    state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def _randomize_adapters(model, seed=1, scale=0.2):
    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state))
    return model


@jax.jit
def _velocity(model, x, t, cond):
    return model(x, t, cond)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32), jnp.linspace(0.1, 0.9, 4),
            jnp.asarray([0, 3, 7, 10], jnp.int32))


@pytest.fixture(scope="module")
def base_and_adapted():
    base = _base()
    adapted = lora.apply_lora(nnx.clone(base), lora.LoRAConfig(4, 8.0, target_modules=TARGETS), rngs=nnx.Rngs(3))
    return base, adapted


def test_sites_and_init_equals_base(base_and_adapted, inputs):
    base, adapted = base_and_adapted
    all_sites = [s.path for s in lora.lora_sites(base)]
    assert {"blocks.0.attn.wq", "blocks.0.attn.wo", "blocks.0.fc1", "patch_embed", "final_linear"} <= set(all_sites)
    chosen = sorted(s.path for s in lora.lora_sites(adapted) if s.adapted)
    assert chosen == sorted(f"blocks.0.{t}" for t in TARGETS)
    blk = adapted.blocks[0]
    assert type(blk.fc1) is lora.LoRALinear and type(blk.modulation) is nnx.Linear
    assert blk.attn.wq_lora.lora_a.shape == (32, 4) and blk.attn.wq_lora.lora_b.shape == (4, 2, 16)
    assert blk.attn.wo_lora.lora_a.shape == (2, 16, 4) and blk.attn.wo_lora.lora_b.shape == (4, 32)
    # B = 0 at init, but a different program from the base model's (other fusion/summation order): float32 ulps
    np.testing.assert_allclose(np.asarray(_velocity(adapted, *inputs)), np.asarray(_velocity(base, *inputs)),
                               rtol=1e-5, atol=1e-6)


def test_attention_update_matches_numpy(base_and_adapted):
    _, adapted = base_and_adapted
    attn = nnx.clone(adapted.blocks[0].attn)
    _randomize_adapters(attn)
    x = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)
    f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    s = 2.0

    def proj(w, lo):
        update = np.einsum("blr,rhd->blhd", x @ f64(lo.lora_a), f64(lo.lora_b))
        return np.einsum("ble,ehd->blhd", x, f64(w)) + s * update

    q = proj(attn.wq, attn.wq_lora) + f64(attn.bq)
    k = proj(attn.wk, attn.wk_lora) + f64(attn.bk)
    v = proj(attn.wv, attn.wv_lora) + f64(attn.bv)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(16)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    want = (np.einsum("blhd,hde->ble", out, f64(attn.wo))
            + s * np.einsum("blhd,hdr,re->ble", out, f64(attn.wo_lora.lora_a), f64(attn.wo_lora.lora_b)) + f64(attn.bo))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(attn, x)), want, rtol=1e-5, atol=1e-5)


def test_gradients_only_on_adapters_and_off_equals_base(base_and_adapted, inputs):
    base, adapted = base_and_adapted
    graphdef, params, frozen = nnx.split(adapted, nnx.LoRAParam, ...)
    x, t, cond = inputs

    @jax.jit
    def loss_and_grad(p):
        return jax.value_and_grad(lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p, frozen)(x, t, cond) - x)))(p)

    _, grads = loss_and_grad(params)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))
    assert len(leaves) == 2 * len(TARGETS)  # A and B of every adapted site, nothing else
    assert all(str(path[-1].key) in ("lora_a", "lora_b") for path, _ in leaves)
    # B = 0 at init: dL/dB != 0 drives learning, dL/dA = 0 until B moves
    assert all(float(jnp.abs(g).max()) > 0 for path, g in leaves if path[-1].key == "lora_b")
    assert all(float(jnp.abs(g).max()) == 0 for path, g in leaves if path[-1].key == "lora_a")

    moved = _randomize_adapters(nnx.clone(adapted))
    v_base = np.asarray(_velocity(base, *inputs))
    assert np.abs(np.asarray(_velocity(moved, *inputs)) - v_base).max() > 1e-3
    with lora.lora_disabled(moved):
        # adapters off vs the base model: different programs, float32 ulps apart (the adapters' effect is > 1e-3)
        np.testing.assert_allclose(np.asarray(_velocity(moved, *inputs)), v_base, rtol=1e-5, atol=1e-6)
    # the flow trainer's functional form: the reference velocity from the same states, adapters off
    graphdef, ref_graphdef, adapters, base_state = lora.split_lora(moved)
    v_ref = jax.jit(lambda a, b: nnx.merge(ref_graphdef, a, b)(x, t, cond))(adapters, base_state)
    np.testing.assert_allclose(np.asarray(v_ref), v_base, rtol=1e-5, atol=1e-6)  # jitted vs eager: float32 ulps


def test_merge_equals_and_saves_as_plain_dit(base_and_adapted, inputs, tmp_path):
    base, adapted = base_and_adapted
    moved = _randomize_adapters(nnx.clone(adapted))
    v = np.asarray(_velocity(moved, *inputs))
    merged = lora.merge_lora(moved)
    assert not lora.has_lora(merged) and type(merged.blocks[0].fc1) is nnx.Linear
    assert nnx.graphdef(merged) == nnx.graphdef(base)
    np.testing.assert_allclose(np.asarray(_velocity(merged, *inputs)), v, rtol=1e-5, atol=1e-5)
    loaded = load_dit(save_dit(merged, tmp_path / "dit"))
    np.testing.assert_allclose(np.asarray(_velocity(loaded, *inputs)), v, rtol=1e-5, atol=1e-5)


def test_dit_adapters_sharded_like_base(base_and_adapted):
    _, adapted = base_and_adapted
    mesh = train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = train.logical_to_named_sharding(nnx.state(adapted, nnx.LoRAParam), mesh)
    blk = sh["blocks"][0]
    assert tuple(blk["attn"]["wq_lora"]["lora_a"].get_value().spec) == ("fsdp",)         # kernel: (embed, heads, hd)
    assert tuple(blk["attn"]["wq_lora"]["lora_b"].get_value().spec) == (None, "tensor")
    assert tuple(blk["fc1"]["lora"]["lora_b"].get_value().spec) == (None, "tensor")      # kernel: (embed, mlp)
    assert tuple(blk["fc2"]["lora"]["lora_a"].get_value().spec) == ("tensor",)           # kernel: (mlp, embed)
