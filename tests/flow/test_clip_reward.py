"""The CLIP-score reward (adrpo_jax.flow.clip_reward): JAX vision tower == transformers CLIPModel.get_image_features,
the reward == a torch-computed 100 * max(cos, 0), jit, preprocessing, bad inputs; tiny random CLIPModels."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.flow import clip_reward as cr

PROMPTS = ["a cat", "a dog", "zebra", ""]
CHARS = "abcdefghijklmnopqrstuvwxyz"


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
    for c in CHARS:
        vocab[c + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def _build_clip(path, *, hidden_act="quick_gelu", seed=0):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tok = _tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                           image_size=30, patch_size=6, hidden_act=hidden_act),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # random layer norms / class token: every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name or "class_embedding" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    model = _build_clip(path)
    spec, params = cr.load_clip_vision(path)
    return path, model, spec, params


def _torch_image_features(model, pixels_nhwc):
    import torch

    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(np.asarray(pixels_nhwc)).permute(0, 3, 1, 2))
    return getattr(out, "pooler_output", out).numpy()


def test_spec_from_weights(clip):
    _, _, spec, params = clip
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.patch_size, spec.image_size,
            spec.projection_dim, spec.hidden_act) == (32, 3, 4, 6, 30, 16, "quick_gelu")
    assert params["layers"]["q"]["kernel"].shape == (3, 32, 32) and params["projection"].shape == (32, 16)


def test_image_features_match_transformers(clip):
    _, model, spec, params = clip
    pixels = np.random.default_rng(0).normal(size=(3, 30, 30, 3)).astype(np.float32)
    ours = jax.jit(lambda p, x: cr.clip_image_features(p, spec, x))(params, jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(ours), _torch_image_features(model, pixels), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_gelu_variant_sharded_weights_and_bf16(tmp_path):
    """An OpenCLIP-style tower (gelu) saved as sharded safetensors (an index) == transformers; the bf16-matmul
    reward (the accelerator configs' dtype) stays close to the float32 one."""
    model = _build_clip(tmp_path / "a", hidden_act="gelu", seed=1)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    spec, params = cr.load_clip_vision(tmp_path / "sharded")
    assert spec.hidden_act == "gelu"
    pixels = np.random.default_rng(1).normal(size=(2, 30, 30, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(cr.clip_image_features(params, spec, jnp.asarray(pixels))),
                               _torch_image_features(model, pixels), atol=1e-4, rtol=0)
    text = np.random.default_rng(2).normal(size=(3, spec.projection_dim))
    images = jax.random.uniform(jax.random.key(3), (4, 30, 30, 3), minval=-1, maxval=1)
    cond = jnp.array([0, 1, 2, 1])
    f32 = cr.CLIPScoreReward(spec, params, text, clamp=False).components(images, cond)["clip_cosine"]
    bf16 = cr.CLIPScoreReward(spec, params, text, clamp=False, dtype=jnp.bfloat16).components(images, cond)
    diff = np.abs(np.asarray(bf16["clip_cosine"]) - np.asarray(f32)).max()
    assert 0 < diff < 1e-2, diff  # bf16 matmuls are in effect, and close


def test_preprocess():
    spec = cr.CLIPVisionSpec(hidden_size=8, num_layers=1, num_heads=2, patch_size=2, image_size=4, projection_dim=4)
    mean, std = np.asarray(cr.OPENAI_CLIP_MEAN), np.asarray(cr.OPENAI_CLIP_STD)
    x = np.random.default_rng(0).uniform(-1.2, 1.2, size=(2, 4, 4, 3)).astype(np.float32)
    out = np.asarray(cr.clip_preprocess(jnp.asarray(x), spec))  # already at image_size: clamp + normalize only
    np.testing.assert_allclose(out, (np.clip(x * 0.5 + 0.5, 0, 1) - mean) / std, atol=1e-6)
    out01 = np.asarray(cr.clip_preprocess(jnp.asarray(x * 0.5 + 0.5), spec, "zero_one"))
    np.testing.assert_allclose(out01, out, atol=1e-6)
    # a constant image stays constant through resize + crop; a wide image is centre-cropped to [4, 4]
    const = np.full((1, 8, 12, 3), 0.5, np.float32)
    res = np.asarray(cr.clip_preprocess(jnp.asarray(const), spec, "zero_one"))
    assert res.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(res, np.broadcast_to((0.5 - mean) / std, res.shape), atol=1e-5)
    with pytest.raises(ValueError, match="input_range"):
        cr.clip_preprocess(jnp.asarray(x), spec, "0_255")


def test_preprocess_close_to_clip_image_processor():
    """Our resize + crop + normalize vs transformers' CLIPImageProcessor (PIL bicubic on 8-bit pixels) at 224 on a
    smooth 512x384 image: equal up to the 8-bit rounding and the bicubic kernels (normalized units)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    yy, xx = np.meshgrid(np.linspace(0, 1, 512), np.linspace(0, 1, 384), indexing="ij")
    img = np.stack([0.5 + 0.4 * np.sin(6 * xx + 2 * yy), 0.5 + 0.4 * np.cos(5 * yy), xx * yy], -1)
    u8 = np.round(img * 255).astype(np.uint8)
    ref = CLIPImageProcessorPil()(images=[u8], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    spec = cr.CLIPVisionSpec(hidden_size=8, num_layers=1, num_heads=2, patch_size=14, image_size=224,
                             projection_dim=4)
    ours = np.asarray(cr.clip_preprocess(jnp.asarray(u8[None] / 127.5 - 1.0, jnp.float32), spec))[0]
    assert ours.shape == ref.shape == (224, 224, 3)
    diff = np.abs(ours - ref)
    assert diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())


@pytest.fixture(scope="module")
def reward(clip, tmp_path_factory):
    path, _, _, _ = clip
    return cr.CLIPScoreReward.from_pretrained(path, PROMPTS, cache_dir=tmp_path_factory.mktemp("clip_cache"))


def test_reward_equals_torch_clip_score(clip, reward):
    import torch

    path, model, spec, _ = clip
    tok = _tokenizer()
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, size=(4, 30, 30, 3)).astype(np.float32)  # at image_size: no resize
    cond = np.array([0, 1, 2, 0], np.int32)
    with torch.no_grad():
        enc = tok([PROMPTS[c] for c in cond], padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        txt = getattr(txt, "pooler_output", txt)
    pixels = (images * 0.5 + 0.5 - np.asarray(cr.OPENAI_CLIP_MEAN)) / np.asarray(cr.OPENAI_CLIP_STD)
    img = torch.from_numpy(_torch_image_features(model, pixels.astype(np.float32)))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1).numpy()
    comps = reward.components(jnp.asarray(images), jnp.asarray(cond))
    np.testing.assert_allclose(np.asarray(comps["clip_cosine"]), cos, atol=1e-5)
    np.testing.assert_allclose(np.asarray(comps["reward"]), 100 * np.maximum(cos, 0), atol=1e-3)
    raw = cr.CLIPScoreReward(spec, reward.params, np.asarray(reward.text), clamp=False, scale=2.5)
    np.testing.assert_allclose(np.asarray(raw(jnp.asarray(images), jnp.asarray(cond))), 2.5 * cos, atol=1e-5)


def test_reward_jit_and_larger_images(reward):
    """Inside another jit (as in the sampler: flow.step.reward_components), on 64x48 images (resized + cropped)."""
    images = jax.random.uniform(jax.random.key(0), (3, 64, 48, 3), minval=-1, maxval=1)
    cond = jnp.array([3, 1, 0])
    from adrpo_jax.flow.step import reward_components
    comps = jax.jit(lambda x, c: reward_components(reward, x, c))(images, cond)
    assert set(comps) == {"reward", "clip_cosine"} and comps["reward"].shape == (3,)
    cos = np.asarray(comps["clip_cosine"])
    assert np.all(np.abs(cos) <= 1 + 1e-6) and np.all(np.isfinite(cos))
    np.testing.assert_allclose(np.asarray(comps["reward"]), 100 * np.maximum(cos, 0), atol=1e-4)


def test_bound_state_is_an_argument_not_a_constant(reward):
    """reward.bind(state) under jit: same values, and the tower's weights are not baked into the program."""
    images = jax.random.uniform(jax.random.key(1), (4, 30, 30, 3), minval=-1, maxval=1)
    cond = jnp.array([0, 2, 1, 3], jnp.int32)  # the shapes of test_reward_equals_torch_clip_score: no recompile
    bound = jax.jit(lambda s, x, c: reward.bind(s)(x, c))
    np.testing.assert_allclose(np.asarray(bound(reward.state, images, cond)), np.asarray(reward(images, cond)),
                               atol=1e-5)
    closed = jax.jit(lambda x, c: reward(x, c))
    n_bound = len(bound.lower(reward.state, images, cond).as_text())
    n_closed = len(closed.lower(images, cond).as_text())
    assert n_closed > n_bound + 50_000, (n_closed, n_bound)  # the closure embeds ~40k float constants
    with pytest.raises(ValueError, match="state"):
        reward.bind({"params": reward.params})


def test_text_feature_cache_skips_torch(clip, reward, tmp_path, monkeypatch):
    path = clip[0]
    cache = tmp_path / "c"
    first = cr.CLIPScoreReward.from_pretrained(path, PROMPTS, cache_dir=cache)
    monkeypatch.setattr(cr, "encode_clip_texts", lambda *a, **k: pytest.fail("recomputed the cached texts"))
    second = cr.CLIPScoreReward.from_pretrained(path, PROMPTS, cache_dir=cache)
    np.testing.assert_array_equal(np.asarray(first.text), np.asarray(second.text))
    np.testing.assert_allclose(np.asarray(first.text), np.asarray(reward.text), atol=1e-6)
    assert len(list(cache.glob("clip_text_*.npy"))) == 1


def test_bad_inputs(clip, reward, tmp_path):
    _, _, spec, params = clip
    ok = jnp.zeros((2, 30, 30, 3))
    with pytest.raises(ValueError, match="images"):
        reward(jnp.zeros((2, 30, 30)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="images"):
        reward(jnp.zeros((2, 30, 30, 1)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="cond"):
        reward(ok, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="cond"):
        reward(ok, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"prompt ids in \[0, 4\)"):
        reward(ok, jnp.array([0, 4]))
    with pytest.raises(ValueError, match="pixels"):
        cr.clip_image_features(params, spec, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="text_features"):
        cr.CLIPScoreReward(spec, params, np.ones((3, 7)))
    with pytest.raises(ValueError, match="input_range"):
        cr.CLIPScoreReward(spec, params, np.ones((3, 16)), input_range="0_255")
    with pytest.raises(ValueError, match="config.json"):
        cr.load_clip_vision(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="safetensors"):
        cr.load_clip_vision(tmp_path)
    with pytest.raises(ValueError, match="prompts"):
        cr.encode_clip_texts("a cat", tmp_path)
