"""LoRA on the NNX decoder (and plain nnx.Linear models): target matching, init == base, the adapter update vs a
NumPy reference (3-D attention kernels included), gradients vs NumPy, adapters-off == base exactly, merge,
merge -> save_pretrained -> transformers, state dicts, dropout keys, logical-axis shardings on a
(data=2, fsdp=2, tensor=2) mesh, and training only adapters with nnx.Optimizer (base bit-identical)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adrpo_jax import train
from adrpo_jax.models import lora
from adrpo_jax.models.llm import CausalLM, DecoderConfig, save_pretrained, token_logprobs

CFG = DecoderConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LIST_CFG = dataclasses.replace(CFG, scan_layers=False)  # per-layer sites (stacked: tests/models/llm/test_scan_layers)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _numpy_model(cfg=CFG, seed=0):
    """A fresh copy of a CausalLM with NumPy-drawn weights (sharp distributions; no per-shape XLA compilations)."""
    return nnx.clone(_cached_numpy_model(cfg, seed))


@functools.lru_cache(maxsize=None)
def _cached_numpy_model(cfg, seed):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = str(path[-1].key)
        if name == "weight":
            v = 1.0 + 0.1 * rng.standard_normal(x.shape)
        elif name == "embedding":
            v = rng.standard_normal(x.shape)
        else:
            v = rng.standard_normal(x.shape) * 1.5 / math.sqrt(int(np.prod(x.shape[:-1])))
        return jnp.asarray(v, x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _randomize_adapters(model, seed=1, scale=0.3):
    """Non-zero B (and new A) so that the adapters change the output."""
    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state)
    nnx.update(model, state)
    return model


def _adapted(targets=ALL_TARGETS, rank=3, alpha=6.0, seed=0, **kw):
    model = _numpy_model(seed=seed)
    return lora.apply_lora(model, lora.LoRAConfig(rank, alpha, target_modules=targets, **kw), rngs=nnx.Rngs(7))


@jax.jit
def _logits(model, tokens, mask):
    return model(tokens, attention_mask=mask)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 48, (2, 7)), jnp.int32)
MASK = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7], bool)


# ------------------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------------------


def test_sites_and_target_matching():
    base = _numpy_model(LIST_CFG)
    paths = [s.path for s in lora.lora_sites(base)]
    assert {"layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "lm_head"} <= set(paths)
    assert len(paths) == len(set(paths)) == 2 * 7 + 1

    def adapted(targets):
        m = lora.apply_lora(_numpy_model(LIST_CFG), lora.LoRAConfig(2, 2.0, target_modules=targets), rngs=nnx.Rngs(0))
        return sorted(s.path for s in lora.lora_sites(m) if s.adapted)

    assert adapted(("q_proj", "v_proj")) == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                                            "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    assert adapted((r"layers\.1\.mlp\..*",)) == ["layers.1.mlp.down_proj", "layers.1.mlp.gate_proj",
                                                "layers.1.mlp.up_proj"]
    assert adapted("all-linear") == sorted(p for p in paths if p != "lm_head")    # never the output layer
    assert adapted(r".*\.(q|o)_proj") == ["layers.0.self_attn.o_proj", "layers.0.self_attn.q_proj",
                                          "layers.1.self_attn.o_proj", "layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="matched no projection"):  # a single string is a regex: full match
        adapted("q_proj")
    with pytest.raises(ValueError, match=r"entries \['qproj'\] match no projection"):
        adapted(("q_proj", "qproj"))
    with pytest.raises(ValueError, match="cannot carry an adapter.*embed_tokens"):
        adapted(("embed_tokens",))
    m = lora.apply_lora(_numpy_model(), lora.LoRAConfig(2, 2.0, target_modules=("q_proj",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already have LoRA adapters"):
        lora.apply_lora(m, lora.LoRAConfig(2, 2.0, target_modules=("q_proj",)), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kw, match", [
    (dict(rank=0, alpha=1.0), "rank"), (dict(rank=2, alpha=0.0), "alpha"), (dict(rank=2, alpha=1.0, dropout=1.0),
                                                                             "dropout"),
    (dict(rank=2, alpha=1.0, target_modules=()), "target_modules"),
    (dict(rank=2, alpha=1.0, target_modules=("q_proj", "(")), "not a valid regex"),
    (dict(rank=2, alpha=1.0, init="xavier"), "init"), (dict(rank=2, alpha=1.0, param_dtype="int8"), "param_dtype"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        lora.LoRAConfig(**kw)


def test_config_scale_and_roundtrip():
    c = lora.LoRAConfig(rank=16, alpha=32, target_modules=["q_proj", "v_proj"], use_rslora=True)
    assert c.scale == 32 / 4 and c.target_modules == ("q_proj", "v_proj")
    assert lora.LoRAConfig.from_dict(c.to_dict()) == c
    assert lora.LoRAConfig(rank=4, alpha=8).scale == 2.0


# ------------------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------------------


def test_init_is_exactly_the_base_model_and_adapter_shapes():
    base = _numpy_model()
    y0 = np.asarray(_logits(base, TOKENS, MASK))
    model = _adapted()
    # B = 0 adds exact zeros, but the adapted forward is a different program from the base model's (other fusion
    # and summation order on another CPU/ISA): a few float32 ulps, far below any real adapter effect (> 1e-2)
    np.testing.assert_allclose(np.asarray(_logits(model, TOKENS, MASK)), y0, rtol=1e-5, atol=1e-6)
    q = model.layers[0].self_attn.q_proj.lora
    assert q.lora_a.shape == (16, 3) and q.lora_b.shape == (3, 4, 4)
    o = model.layers[0].self_attn.o_proj.lora
    assert o.lora_a.shape == (4, 4, 3) and o.lora_b.shape == (3, 16)
    assert float(jnp.max(jnp.abs(q.lora_b[...]))) == 0.0
    bound = 1 / math.sqrt(16)  # kaiming_uniform: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a = np.asarray(q.lora_a[...])
    assert a.std() > 0.3 * bound and np.abs(a).max() <= bound
    assert lora.lora_param_count(model) == sum(int(np.prod(x.shape)) for x in
                                               jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def test_adapter_update_matches_numpy_for_3d_kernels():
    model = _randomize_adapters(_adapted(rank=3, alpha=6.0))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    q = model.layers[0].self_attn.q_proj
    w, a, b = (np.asarray(v[...], np.float64) for v in (q.kernel, q.lora.lora_a, q.lora.lora_b))
    want = np.einsum("btd,dhk->bthk", x, w) + 2.0 * np.einsum("btr,rhk->bthk", x @ a, b)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(q, x)), want, rtol=1e-5, atol=1e-5)
    o = model.layers[0].self_attn.o_proj  # input axes (heads, head_dim): A [H, hd, r]
    xo = rng.standard_normal((2, 5, 4, 4)).astype(np.float32)
    w, a, b = (np.asarray(v[...], np.float64) for v in (o.kernel, o.lora.lora_a, o.lora.lora_b))
    want = np.einsum("bthk,hkd->btd", xo, w) + 2.0 * np.einsum("bthk,hkr,rd->btd", xo, a, b)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(o, xo)), want, rtol=1e-5, atol=1e-5)
    # lm_head: logits = x W + s (x A) B (the adapter added to the output, not folded into lm_head_matrix)
    h = model.lm_head
    w, a, b = (np.asarray(v[...], np.float64) for v in (h.kernel, h.lora.lora_a, h.lora.lora_b))
    want = x @ w + 2.0 * (x @ a) @ b
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m.logits(x))(model, x)), want, rtol=1e-5, atol=1e-5)


def test_gradients_match_numpy_and_only_adapters_get_them():
    """y = x W + s (x A) B on an nnx.Linear; L = sum(y * G): dL/dA = s x^T (G B^T), dL/dB = s (x A)^T G."""
    lin = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    lora.apply_lora(lin, lora.LoRAConfig(2, 3.0, target_modules="all-linear"), rngs=nnx.Rngs(1))
    assert type(lin) is lora.LoRALinear
    _randomize_adapters(lin)
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    graphdef, params, rest = nnx.split(lin, nnx.LoRAParam, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) * g))(params)
    assert sorted(nnx.to_pure_dict(grads)["lora"]) == ["lora_a", "lora_b"] and len(jax.tree.leaves(grads)) == 2
    a, b = np.asarray(lin.lora.lora_a[...], np.float64), np.asarray(lin.lora.lora_b[...], np.float64)
    s = 1.5
    np.testing.assert_allclose(grads["lora"]["lora_a"][...], s * x.T @ (g @ b.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["lora"]["lora_b"][...], s * (x @ a).T @ g, rtol=1e-5, atol=1e-5)


def test_adapters_off_is_exactly_the_base_model():
    base = _numpy_model()
    model = _randomize_adapters(_adapted())
    y_base = np.asarray(_logits(base, TOKENS, MASK))
    assert np.abs(np.asarray(_logits(model, TOKENS, MASK)) - y_base).max() > 1e-2
    with lora.lora_disabled(model):
        # adapters off vs the plain base model: two different programs, float32 ulps apart (effect checked > 1e-2)
        np.testing.assert_allclose(np.asarray(_logits(model, TOKENS, MASK)), y_base, rtol=1e-5, atol=1e-6)
    assert all(s.adapter.enabled for s in lora.lora_sites(model) if s.adapted)  # restored
    # functional: a second GraphDef with the adapters off, the same state (the trainer's reference pass)
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    ref_graphdef = nnx.split(lora.set_lora_enabled(nnx.clone(model), False), nnx.LoRAParam, ...)[0]
    assert ref_graphdef != graphdef
    logp = jax.jit(lambda g, p, f: token_logprobs(nnx.merge(g, p, f), TOKENS, MASK), static_argnums=0)
    base_g, base_p = nnx.split(base)
    want = np.asarray(jax.jit(lambda p: token_logprobs(nnx.merge(base_g, p), TOKENS, MASK))(base_p))
    # two different jitted programs (measured 4.8e-7 apart on an Intel CPU): few-ulp tolerance, effect is > 1e-3
    np.testing.assert_allclose(np.asarray(logp(ref_graphdef, params, frozen)), want, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(logp(graphdef, params, frozen)) - want).max() > 1e-3


def test_merge_equals_lora_model_and_leaves_it_untouched():
    model = _randomize_adapters(_adapted())
    kernel_before = np.asarray(model.layers[1].mlp.down_proj.kernel[...]).copy()
    y = np.asarray(_logits(model, TOKENS, MASK))
    merged = lora.merge_lora(model)
    assert not lora.has_lora(merged) and lora.has_lora(model)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    # the merged state has exactly the base model's structure, and merged kernel = W + s A B
    assert jax.tree.structure(nnx.state(merged)) == jax.tree.structure(nnx.state(_numpy_model()))
    d = model.layers[1].mlp.down_proj
    want = np.asarray(d.kernel[...], np.float64) + 2.0 * np.asarray(d.lora.lora_a[...], np.float64) @ np.asarray(
        d.lora.lora_b[...], np.float64)
    np.testing.assert_allclose(np.asarray(merged.layers[1].mlp.down_proj.kernel[...]), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_logits(merged, TOKENS, MASK)), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.down_proj.kernel[...]), kernel_before)
    np.testing.assert_array_equal(np.asarray(_logits(model, TOKENS, MASK)), y)


def test_merged_model_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = _randomize_adapters(_adapted())
    y = np.asarray(_logits(model, TOKENS, MASK))
    save_pretrained(lora.merge_lora(model), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    mask = np.asarray(MASK)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(np.asarray(TOKENS), dtype=torch.long),
                 attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0), dtype=torch.long))
    got = out.logits.float().numpy()
    np.testing.assert_allclose(got[mask], y[mask], rtol=1e-4, atol=1e-4)


def test_state_dict_roundtrip():
    model = _randomize_adapters(_adapted(targets=("q_proj", "lm_head")))
    sd = lora.lora_state_dict(model)
    assert sorted(sd) == sorted(f"{p}.lora_{x}" for p in ("layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj",
                                                          "lm_head") for x in "ab")
    other = _adapted(targets=("q_proj", "lm_head"))
    lora.load_lora_state_dict(other, {k: np.asarray(v) for k, v in sd.items()})
    for k, v in lora.lora_state_dict(other).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(sd[k]))
    with pytest.raises(ValueError, match="missing"):
        lora.load_lora_state_dict(other, {k: v for k, v in sd.items() if k != "lm_head.lora_a"})
    with pytest.raises(ValueError, match="wrong shapes"):
        lora.load_lora_state_dict(other, {**sd, "lm_head.lora_a": np.zeros((3, 3))})


def test_dropout_is_keyed_and_functional():
    lin = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    lora.apply_lora(lin, lora.LoRAConfig(4, 4.0, dropout=0.5, target_modules="all-linear"), rngs=nnx.Rngs(1))
    _randomize_adapters(lin)
    x = jnp.ones((3, 8))

    @jax.jit
    def forward(m, x, key):
        with lora.lora_dropout_rng(key):
            return m(x)

    y_det = np.asarray(jax.jit(lambda m, x: m(x))(lin, x))
    y1, y1b, y2 = (np.asarray(forward(lin, x, jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(y1, y1b)
    assert np.abs(y1 - y_det).max() > 1e-3 and np.abs(y1 - y2).max() > 1e-3
    # inverted dropout on the adapter input: the mask keeps x / (1 - p) or 0, so the update is that of a masked x
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(jax.random.key(0), 0), 0.5, (3, 8)))
    a, b = np.asarray(lin.lora.lora_a[...], np.float64), np.asarray(lin.lora.lora_b[...], np.float64)
    base = np.asarray(x) @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...])
    np.testing.assert_allclose(y1, base + 1.0 * ((np.asarray(x) * keep / 0.5) @ a) @ b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="inside the jitted function"):
        with lora.lora_dropout_rng(jax.random.key(0)):
            jax.jit(lambda m, x: m(x))(lin, x)


# ------------------------------------------------------------------------------------------------------------
# Sharding and training
# ------------------------------------------------------------------------------------------------------------


def test_adapters_are_sharded_like_their_base_kernels():
    mesh = train.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = lora.apply_lora(_numpy_model(LIST_CFG), lora.LoRAConfig(3, 6.0, target_modules=ALL_TARGETS),
                            rngs=nnx.Rngs(7))
    shardings = train.logical_to_named_sharding(nnx.state(model), mesh)
    flat = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(shardings)}
    checked = 0
    for site in lora.lora_sites(model):
        prefix = tuple(site.path.split("."))
        w = tuple(flat[prefix + ("kernel",)].spec) + (None,) * 3
        a = tuple(flat[prefix + ("lora", "lora_a")].spec) + (None,) * 3
        b = tuple(flat[prefix + ("lora", "lora_b")].spec) + (None,) * 3
        n_in = 2 if site.path.endswith("o_proj") else 1
        n_out = site.kernel.ndim - n_in
        assert a[:n_in] == w[:n_in] and a[n_in] is None, site.path
        assert b[0] is None and b[1:1 + n_out] == w[n_in:n_in + n_out], site.path
        checked += 1
    assert checked == 15
    spec = lambda *k: tuple(flat[k].spec)  # noqa: E731
    assert spec("layers", "0", "self_attn", "q_proj", "lora", "lora_a") == ("fsdp",)
    assert spec("layers", "0", "self_attn", "q_proj", "lora", "lora_b") == (None, "tensor")
    assert spec("layers", "0", "mlp", "down_proj", "lora", "lora_a") == ("tensor",)
    assert spec("lm_head", "lora", "lora_b") == (None, "tensor")
    # a sharded adapted model computes the same logits as the unsharded one
    _randomize_adapters(model)
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, train.logical_to_named_sharding(state, mesh)))
    assert "fsdp" in str(sharded.layers[0].self_attn.q_proj.lora.lora_a[...].sharding.spec)
    y = np.asarray(_logits(model, TOKENS, MASK))
    batch = train.host_local_to_global({"t": np.asarray(TOKENS).repeat(2, 0), "m": np.asarray(MASK).repeat(2, 0)}, mesh)
    y_sharded = np.asarray(_logits(sharded, batch["t"], batch["m"]))[::2]
    np.testing.assert_allclose(y_sharded, y, rtol=1e-5, atol=1e-5)
    merged = lora.merge_lora(sharded)
    assert merged.layers[0].mlp.up_proj.kernel[...].sharding == sharded.layers[0].mlp.up_proj.kernel[...].sharding


@pytest.mark.slow
def test_nnx_optimizer_trains_only_adapters():
    model = _adapted(targets=("q_proj", "v_proj", "down_proj"))
    base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, lora.BASE_PARAMS)))
    lora_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    n_adapter = len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    moment_shapes = sorted(x.shape for x in jax.tree.leaves(opt.opt_state) if getattr(x, "ndim", 0) > 0)
    # 3 sites x (A, B): one stacked [L, ...] pair per site with scan_layers, one pair per layer and site without
    expected = 3 * 2 * (1 if CFG.scan_layers else CFG.num_hidden_layers)
    assert moment_shapes == sorted(adapter_shapes * 2) and n_adapter == expected  # mu and nu over adapters only

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return -jnp.mean(token_logprobs(m, TOKENS, MASK)[:, 1:])
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(3)]
    assert losses[-1] < losses[0]
    base_after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, lora.BASE_PARAMS)))
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)  # bit-identical
    lora_after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), lora_after, lora_before)
    assert all(jax.tree.leaves(changed))


def test_bf16_projection_with_float32_adapters():
    cfg = dataclasses.replace(CFG, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = lora.apply_lora(_numpy_model(cfg), lora.LoRAConfig(2, 4.0, target_modules=("q_proj",)), rngs=nnx.Rngs(1))
    q = model.layers[0].self_attn.q_proj
    assert q.kernel.dtype == jnp.bfloat16 and q.lora.lora_a.dtype == jnp.float32  # adapters stored in float32
    q.kernel[...] = jnp.ones(q.kernel.shape, jnp.bfloat16)
    _randomize_adapters(q)
    x = np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float32)
    y = jax.jit(lambda m, x: m(x))(q, x)
    assert y.dtype == jnp.bfloat16  # the update runs in the projection's compute dtype
    a, b = np.asarray(q.lora.lora_a[...], np.float64), np.asarray(q.lora.lora_b[...], np.float64)
    want = np.einsum("btd,dhk->bthk", x, np.ones((16, 4, 4))) + 2.0 * np.einsum("btr,rhk->bthk", x @ a, b)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=3e-2, atol=6e-2)
