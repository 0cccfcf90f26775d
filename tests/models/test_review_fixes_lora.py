"""Issue 18 items 13 and 17: LoRA on lm_head follows PEFT's definition (``y = x W + s * dropout(x) A B``, the update
added to the output, never folded into a bf16 kernel) and dropout masks differ between adapters added by separate
``apply_lora`` calls. The reference is PEFT's definition written out in NumPy (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax.models import lora
from adrpo_jax.models.llm import CausalLM, DecoderConfig, token_logprobs

CFG = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False, param_dtype=jnp.bfloat16)


def _model(seed=0):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = str(path[-1].key)
        v = (1.0 + 0.1 * rng.standard_normal(x.shape) if name == "weight" else rng.standard_normal(x.shape)
             if name == "embedding" else rng.standard_normal(x.shape) * 1.5 / math.sqrt(int(np.prod(x.shape[:-1]))))
        return jnp.asarray(v, x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _lm_head_lora(dropout=0.0, b_scale=1e-4):
    model = lora.apply_lora(_model(), lora.LoRAConfig(rank=4, alpha=8.0, target_modules=("lm_head",),
                                                       dropout=dropout), rngs=1)
    b = model.lm_head.lora.lora_b
    b.set_value(jnp.asarray(b_scale * np.random.default_rng(2).standard_normal(b.get_value().shape), b.dtype))
    return model


def test_lm_head_lora_adds_the_update_to_the_output_in_bf16_params():
    """bf16 storage, float32 compute, B ~ 1e-4: the intended change s (h A) B is below the bf16 spacing of W (~1e-4
    at |W| ~ 0.02..0.3), so folding W + s A B into bf16 (the old lm_head path) rounds it away."""
    model = _lm_head_lora()
    hidden = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, CFG.hidden_size)), jnp.float32)
    h = np.asarray(hidden, np.float64)
    w = np.asarray(model.lm_head.kernel.get_value().astype(jnp.float32), np.float64)
    a = np.asarray(model.lm_head.lora.lora_a.get_value(), np.float64)
    b = np.asarray(model.lm_head.lora.lora_b.get_value(), np.float64)
    s = model.lm_head.lora.scale
    delta = s * (h @ a) @ b  # PEFT: lora_B(lora_A(dropout(x))) * scaling, added to the base layer's output
    ref = h @ w + delta
    assert np.abs(delta).max() > 1e-4
    ours = np.asarray(jax.jit(lambda m, x: m.logits(x))(model, hidden), np.float64)
    # float32 matmuls vs float64 reference (|logits| ~ 5): 1e-5 is float32 rounding, 10x below the update
    err = np.abs(ours - ref).max()
    assert err < 0.1 * np.abs(delta).max(), (err, np.abs(delta).max())
    # token_logprobs (chunked over time, float32 accumulation) sees the same logits
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 6)), jnp.int32)
    hid = model.hidden_states(tokens)
    ref_logits = np.asarray(hid, np.float64) @ w + s * (np.asarray(hid, np.float64) @ a) @ b
    ref_lp = ref_logits[:, :-1] - np.log(np.exp(ref_logits[:, :-1]).sum(-1, keepdims=True))
    ref_lp = np.take_along_axis(ref_lp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    lp = np.asarray(jax.jit(lambda m, t: token_logprobs(m, t, chunk_size=2))(model, tokens))[:, 1:]
    base_lp = np.asarray(jax.jit(lambda m, t: token_logprobs(m, t, chunk_size=2))(lora.merge_lora(model), tokens))
    assert np.abs(lp - ref_lp).max() < 0.1 * np.abs(base_lp[:, 1:] - ref_lp).max() + 1e-6
    # merge stays available explicitly (W + s A B in the storage dtype, bf16 here)
    merged = lora.merge_lora(model)
    np.testing.assert_allclose(np.asarray(merged.lm_head.kernel.get_value(), np.float32),
                               np.asarray(jnp.asarray(w + s * a @ b, jnp.bfloat16), np.float32))


def test_lm_head_lora_applies_its_dropout():
    model = _lm_head_lora(dropout=0.5, b_scale=0.3)
    hidden = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, CFG.hidden_size)), jnp.float32)

    @jax.jit
    def logits(m, x, key):
        with lora.lora_dropout_rng(key):
            return m.logits(x), m.lm_head.lora(x)  # the adapter's own update, same key and mask

    out, update = logits(model, hidden, jax.random.key(0))
    base = np.asarray(hidden) @ np.asarray(model.lm_head.kernel.get_value().astype(jnp.float32))
    no_dropout = np.asarray(jax.jit(lambda m, x: m.logits(x))(model, hidden))
    # s (dropout(h) A) B: the adapter's definition with its mask (float32, two compiled programs: tolerance)
    np.testing.assert_allclose(np.asarray(out), base + np.asarray(update), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out) - no_dropout).max() > 1e-2  # the dropout changed the update
    # and token_logprobs too (the old path folded the adapter into the kernel and ignored the dropout)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 6)), jnp.int32)

    @jax.jit
    def lp(m, t, key):
        with lora.lora_dropout_rng(key):
            return token_logprobs(m, t, chunk_size=2)

    assert np.abs(np.asarray(lp(model, tokens, jax.random.key(0))) -
                  np.asarray(lp(model, tokens, None))).max() > 1e-3


class _TwoHeads(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(8, 8, rngs=rngs)
        self.b = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return self.a(x) + self.b(x)


def test_dropout_masks_differ_across_apply_lora_calls():
    model = _TwoHeads(nnx.Rngs(0))
    lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=2.0, target_modules=("a",), dropout=0.5), rngs=1)
    lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=2.0, target_modules=("b",), dropout=0.5), rngs=2)
    assert (model.a.lora.index, model.b.lora.index) == (0, 1)
    x = jnp.ones((4, 8))
    with lora.lora_dropout_rng(jax.random.key(0)):
        mask_a = np.asarray(model.a.lora._dropout(x)) != 0  # pylint: disable=protected-access
        mask_b = np.asarray(model.b.lora._dropout(x)) != 0  # pylint: disable=protected-access
    assert 0 < mask_a.sum() < mask_a.size and (mask_a != mask_b).any()
    # one call over both sites: the same indices (so existing single-call runs keep their masks)
    one = lora.apply_lora(_TwoHeads(nnx.Rngs(0)), lora.LoRAConfig(rank=2, alpha=2.0, target_modules=("a", "b"),
                                                                 dropout=0.5), rngs=1)
    assert (one.a.lora.index, one.b.lora.index) == (0, 1)
