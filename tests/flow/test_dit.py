"""DiT velocity network: shapes, conditioning, CFG dropout, parameter count, axis names, dtypes, save/load."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models import dit as dit_lib
from adrpo_jax.models.dit import DiT, DiTConfig

CFG = DiTConfig(image_size=8, patch_size=2, hidden=32, depth=1, heads=2, mlp_ratio=2.0, num_classes=10)
ALLOWED_NAMES = {None, "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "vocab", "conv_in", "conv_out",
                 "norm"}


def _perturbed(model, seed=0, scale=0.05):
    """A copy whose zero-initialised (adaLN-Zero) weights are non-zero, so every input matters (NumPy noise:
    no per-shape XLA compilations)."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state)
    return graphdef, state


@pytest.fixture(scope="module")
def model():
    return DiT(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def apply(model):
    graphdef, state = _perturbed(model)

    @jax.jit
    def fn(state, x, t, cond, drop_mask):
        return nnx.merge(graphdef, state)(x, t, cond, drop_mask=drop_mask)

    return lambda x, t, c, drop=None: fn(state, x, t, c, jnp.zeros((x.shape[0],), bool) if drop is None else drop)


def _inputs(b=4, seed=0):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((b, 8, 8, 1)), jnp.float32)
    t = jnp.linspace(0.1, 0.9, b)
    return x, t


def test_output_shape_dtype_and_zero_init(model):
    x, t = _inputs()
    v = jax.jit(lambda m, x, t: m(x, t, jnp.array([0, 1, 2, 10])))(model, x, t)
    assert v.shape == (4, 8, 8, 1) and v.dtype == jnp.float32
    np.testing.assert_array_equal(v, 0.0)  # adaLN-Zero + zero final layer: the initial field is 0


def test_conditioning_time_and_null_class_change_the_output(apply):
    x, t = _inputs()
    c = jnp.array([1, 2, 3, 4])
    v = apply(x, t, c)
    assert bool(jnp.all(jnp.isfinite(v)))
    assert float(jnp.abs(v - apply(x, t, c + 1)).max()) > 1e-3
    assert float(jnp.abs(v - apply(x, t[::-1], c)).max()) > 1e-3
    null = jnp.full((4,), CFG.num_classes)
    v_null = apply(x, t, null)
    assert float(jnp.abs(v - v_null).max()) > 1e-3
    # drop_mask == null class id, row by row
    drop = jnp.array([True, False, True, False])
    v_drop = apply(x, t, c, drop)
    np.testing.assert_allclose(v_drop[0::2], v_null[0::2], atol=1e-6)
    np.testing.assert_allclose(v_drop[1::2], v[1::2], atol=1e-6)


def test_cfg_dropout_helpers():
    cond = jnp.arange(2000, dtype=jnp.int32) % 10
    dropped = dit_lib.cond_dropout(cond, jax.random.key(0), 0.25, 10)
    frac = float(jnp.mean(dropped == 10))
    assert 0.2 < frac < 0.3
    kept = dropped != 10
    np.testing.assert_array_equal(dropped[kept], cond[kept])
    np.testing.assert_array_equal(dit_lib.cond_dropout(cond, jax.random.key(0), 0.0, 10), cond)
    mask = dit_lib.cfg_drop_mask(jax.random.key(0), 2000, 0.25)
    np.testing.assert_array_equal(dropped == 10, mask)  # same key -> same mask: deterministic
    with pytest.raises(ValueError, match="prob"):
        dit_lib.cfg_drop_mask(jax.random.key(0), 3, 1.5)


def test_param_count_matches_closed_form(model):
    h, p2c, f, mlp = CFG.hidden, CFG.patch_size ** 2 * CFG.channels, CFG.frequency_dim, int(CFG.hidden * CFG.mlp_ratio)
    block = 4 * (h * h + h) + (h * mlp + mlp) + (mlp * h + h) + (h * 6 * h + 6 * h)
    expected = ((p2c * h + h) + (f * h + h) + (h * h + h) + (CFG.num_classes + 1) * h + CFG.depth * block
                + (h * 2 * h + 2 * h) + (h * p2c + p2c))
    assert dit_lib.count_params(model) == expected


def test_every_param_has_known_logical_axis_names(model):
    state = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    assert flat
    for path, var in flat:
        names = var.get_metadata().get("out_sharding")
        assert names is not None, f"param {path} has no logical axis names"
        assert len(names) == var[...].ndim, (path, names, var[...].shape)
        assert set(names) <= ALLOWED_NAMES, (path, names)
        if var[...].ndim >= 2:  # every matrix has a shardable axis
            assert any(n is not None for n in names), (path, names)
    specs = nnx.get_partition_spec(state)
    assert tuple(specs["blocks"][0]["attn"]["wq"].get_value()) == ("embed", "heads", "head_dim")


def test_patchify_matches_loop_reference_and_inverts():
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    tokens = dit_lib.patchify(jnp.asarray(x), 2)
    ref = np.stack([np.stack([x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :].reshape(-1)
                              for i in range(4) for j in range(4)]) for b in range(2)])
    np.testing.assert_array_equal(tokens, ref)
    np.testing.assert_array_equal(dit_lib.unpatchify(tokens, 2, 8, 3), x)


def test_layer_norm_matches_numpy():
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32) * 3 + 1
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(dit_lib._layer_norm(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-4)


def test_variants_bf16_remat_learned_pos_and_embedding_conditioning(model):
    x, t = _inputs(2)
    cond = jnp.array([3, 4])
    graphdef, state = _perturbed(model)
    v32 = jax.jit(lambda s: nnx.merge(graphdef, s)(x, t, cond))(state)

    # bf16 compute + remat with the same parameters (same param tree: only static config differs)
    other = DiT(dataclasses.replace(CFG, dtype="bfloat16", remat=True), rngs=nnx.Rngs(0))
    g2, _ = nnx.split(other)
    v = jax.jit(lambda s: nnx.merge(g2, s)(x, t, cond))(state)
    assert v.dtype == jnp.float32
    rel = float(jnp.linalg.norm(v - v32) / jnp.linalg.norm(v32))
    assert rel < 0.05, rel

    # embedding conditioning (text-encoder style) with a learned null embedding, learned pos-emb
    emb_cfg = dataclasses.replace(CFG, cond_dim=6, pos_embed="learned")
    emb_model = DiT(emb_cfg, rngs=nnx.Rngs(1))
    g3, s3 = _perturbed(emb_model)
    e = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6)), jnp.float32)

    @jax.jit
    def f(s, c, drop):
        m = nnx.merge(g3, s)
        return m(x, t, c, drop_mask=drop), m.null_condition(2)

    v_c, null = f(s3, e, jnp.array([False, False]))
    v_d, _ = f(s3, e, jnp.array([True, False]))
    v_n, _ = f(s3, null, jnp.array([False, False]))
    assert null.shape == (2, 6)
    np.testing.assert_allclose(v_d[0], v_n[0], atol=1e-6)
    np.testing.assert_allclose(v_d[1], v_c[1], atol=1e-6)
    assert float(jnp.abs(v_c - v_n).max()) > 1e-3


def test_save_load_round_trip(tmp_path, model):
    graphdef, state = _perturbed(model)
    perturbed = nnx.merge(graphdef, state)
    dit_lib.save_dit(perturbed, tmp_path / "dit")
    loaded = dit_lib.load_dit(tmp_path / "dit")
    assert loaded.config == CFG
    a = jax.tree.leaves(nnx.state(perturbed, nnx.Param))
    b = jax.tree.leaves(nnx.state(loaded, nnx.Param))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="DiT"):
        dit_lib.read_saved_config(tmp_path / "dit", "DigitClassifier")
    with pytest.raises(ValueError, match="config.json"):
        dit_lib.load_dit(tmp_path / "missing")


@pytest.mark.parametrize("kwargs, match", [
    (dict(patch_size=3), "patch_size"),
    (dict(heads=5), "heads"),
    (dict(dtype="float8"), "dtype"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **kwargs)


def test_bad_inputs_raise(model):
    x, t = _inputs(2)
    with pytest.raises(ValueError, match="`x`"):
        model(jnp.zeros((2, 16, 16, 1)), t, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="`t`"):
        model(x, jnp.zeros((3,)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="in \\[0, 10\\]"):
        model(x, t, jnp.array([0, 11]))
    with pytest.raises(ValueError, match="integer class ids"):
        model(x, t, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="drop_mask"):
        model(x, t, jnp.array([0, 1]), drop_mask=jnp.zeros((3,), bool))
    with pytest.raises(ValueError, match="Unknown DiTConfig keys"):
        DiTConfig.from_dict({"hidden": 8, "width": 3})


@pytest.mark.parametrize("distribution, shape, in_axis, out_axis, expected_std", [
    ("xavier_uniform", (64, 32), -2, -1, np.sqrt(2.0 / 96)),
    ("xavier_uniform", (32, 4, 8), 0, (1, 2), np.sqrt(2.0 / 64)),
    ("lecun_normal", (3, 3, 8, 16), -2, -1, np.sqrt(1.0 / 72)),
    ("normal", (50, 40), -2, -1, 0.02),
])
def test_host_initializer_statistics_and_jit_consistency(distribution, shape, in_axis, out_axis, expected_std):
    init = dit_lib.host_initializer(distribution, in_axis=in_axis, out_axis=out_axis)
    key = jax.random.key(0)
    w = init(key, shape, jnp.float32)
    assert w.shape == shape and w.dtype == jnp.float32
    assert abs(float(w.std()) / expected_std - 1.0) < 0.1
    np.testing.assert_array_equal(jax.jit(lambda k: init(k, shape, jnp.float32))(key), w)
    assert not np.array_equal(init(jax.random.key(1), shape, jnp.float32), w)
    if distribution == "lecun_normal":
        assert float(jnp.abs(w).max()) <= 2.0 * expected_std / 0.87962566103423978 + 1e-6
