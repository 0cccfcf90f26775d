"""SD3 prompt embeddings (adrpo_jax.flow.text_embeddings) vs diffusers' StableDiffusion3Pipeline.encode_prompt on
tiny random CLIP-L / CLIP-G / T5 encoders and tokenizers built offline in the diffusers pipeline layout."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from adrpo_jax.flow import text_embeddings as te

PROMPTS = ["a cat", "a dog and a cat", "zebra", "a very long prompt about many many cats and dogs"]
MAX_SEQ = 12
CLIP_LEN = 16
CHARS = "abcdefghijklmnopqrstuvwxyz"


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
    for c in CHARS:
        vocab[c + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LEN)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARS] + [("\u2581" + c, -2.5) for c in CHARS]
    pieces += [("\u2581cat", -1.0), ("\u2581dog", -1.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _build_text_dir(root, seed=0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = _clip_tokenizer()
    n_vocab = len(tok)
    for sub, (hidden, proj) in {"text_encoder": (32, 24), "text_encoder_2": (40, 28)}.items():
        cfg = CLIPTextConfig(vocab_size=n_vocab, hidden_size=hidden, intermediate_size=48, projection_dim=proj,
                             num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=CLIP_LEN,
                             hidden_act="gelu" if sub == "text_encoder_2" else "quick_gelu",
                             bos_token_id=0, eos_token_id=1, pad_token_id=1)
        CLIPTextModelWithProjection(cfg).save_pretrained(root / sub)
    for sub in ("tokenizer", "tokenizer_2"):
        tok.save_pretrained(root / sub)
    t5tok = _t5_tokenizer()
    t5cfg = T5Config(vocab_size=len(t5tok), d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(t5cfg).save_pretrained(root / "text_encoder_3")
    t5tok.save_pretrained(root / "tokenizer_3")
    return root


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return _build_text_dir(tmp_path_factory.mktemp("sd3_text"))


def _diffusers_pipeline(root, use_t5=True, joint_attention_dim=96):
    import torch
    from diffusers import StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    kw = dict(transformer=None, scheduler=None, vae=None,
              text_encoder=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder", dtype=torch.float32),
              tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
              text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2",
                                                                         dtype=torch.float32),
              tokenizer_2=AutoTokenizer.from_pretrained(root / "tokenizer_2"),
              text_encoder_3=T5EncoderModel.from_pretrained(root / "text_encoder_3", dtype=torch.float32)
              if use_t5 else None,
              tokenizer_3=AutoTokenizer.from_pretrained(root / "tokenizer_3") if use_t5 else None)
    pipe = StableDiffusion3Pipeline(**kw)
    if not use_t5:  # diffusers reads the zero T5 width from the transformer's config
        pipe.transformer = type("T", (), {"config": type("C", (), {"joint_attention_dim": joint_attention_dim})()})()
    return pipe


def _diffusers_embeddings(pipe, prompts, clip_skip=None):
    import torch

    with torch.no_grad():
        pe, npe, pp, npp = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"),
                                              do_classifier_free_guidance=True, clip_skip=clip_skip,
                                              max_sequence_length=MAX_SEQ)
    return pe.numpy(), npe.numpy(), pp.numpy(), npp.numpy()


@pytest.fixture(scope="module")
def reference(text_dir):
    return _diffusers_embeddings(_diffusers_pipeline(text_dir), PROMPTS)


def test_encode_prompts_matches_diffusers(text_dir, reference):
    pe, npe, pp, npp = reference
    states, pooled = te.encode_prompts(PROMPTS, text_dir, max_sequence_length=MAX_SEQ, batch_size=3)
    n = len(PROMPTS)
    assert states.dtype == np.float32 and pooled.dtype == np.float32
    assert states.shape == (n + 1, CLIP_LEN + MAX_SEQ, 96) and pooled.shape == (n + 1, 24 + 28)
    assert pe.shape == states[:n].shape
    np.testing.assert_allclose(states[:n], pe, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled[:n], pp, atol=1e-5, rtol=0)
    # the null row (appended) = diffusers' negative (empty) prompt
    np.testing.assert_allclose(states[n], npe[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled[n], npp[0], atol=1e-5, rtol=0)
    # the CLIP part is zero-padded from 32 + 40 to 96 features; T5 states are not zero
    assert np.all(states[:, :CLIP_LEN, 72:] == 0) and np.abs(states[:, CLIP_LEN:]).max() > 0


def test_clip_skip_and_no_t5_match_diffusers(text_dir):
    prompts = PROMPTS[:2]
    pipe = _diffusers_pipeline(text_dir, use_t5=False, joint_attention_dim=80)
    pe, npe, pp, npp = _diffusers_embeddings(pipe, prompts, clip_skip=1)
    states, pooled = te.encode_prompts(prompts, text_dir, use_t5=False, joint_attention_dim=80, clip_skip=1,
                                       max_sequence_length=MAX_SEQ)
    assert states.shape == (3, CLIP_LEN + MAX_SEQ, 80)
    np.testing.assert_allclose(states[:2], pe, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled[:2], pp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(states[2], npe[0], atol=1e-5, rtol=0)  # negative prompt ignores clip_skip
    assert np.all(states[:, CLIP_LEN:] == 0)


def test_explicit_paths_equal_root_layout(text_dir):
    explicit = te.resolve_text_paths(clip_l_path=text_dir / "text_encoder", clip_g_path=text_dir / "text_encoder_2",
                                     t5_path=text_dir / "text_encoder_3", tokenizer_l_path=text_dir / "tokenizer",
                                     tokenizer_g_path=text_dir / "tokenizer_2",
                                     tokenizer_t5_path=text_dir / "tokenizer_3")
    assert te.resolve_text_paths(text_dir) == explicit
    no_t5 = te.resolve_text_paths(text_dir, use_t5=False)
    assert no_t5.t5 is None and no_t5.tokenizer_t5 is None and no_t5.clip_l == explicit.clip_l
    # tokenizers default to the encoder's own directory without a root
    alone = te.resolve_text_paths(clip_l_path=text_dir / "text_encoder", clip_g_path=text_dir / "text_encoder_2")
    assert alone.tokenizer_l == alone.clip_l and alone.t5 is None


def test_cache_hit_and_invalidation(text_dir, reference, tmp_path, monkeypatch):
    pe, npe, pp, _ = reference
    cache = te.PromptEmbeddingCache(tmp_path / "cache")
    paths = te.resolve_text_paths(text_dir)
    t1 = cache.get(PROMPTS, paths, max_sequence_length=MAX_SEQ)
    assert (cache.hits, cache.misses) == (0, 1)
    assert t1.prompts == tuple(PROMPTS) + ("",) and t1.null_id == len(PROMPTS)
    np.testing.assert_allclose(t1.embeddings[:len(PROMPTS)], pe, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(t1.ids(["zebra", ""]), [2, len(PROMPTS)])
    with pytest.raises(ValueError, match="not in the table"):
        t1.ids(["nope"])

    calls = []
    real = te.encode_prompt_rows
    monkeypatch.setattr(te, "encode_prompt_rows", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    t2 = te.cached_prompt_embeddings(PROMPTS, text_dir, tmp_path / "cache", max_sequence_length=MAX_SEQ)
    assert calls == [] and t2.key == t1.key
    np.testing.assert_array_equal(t2.embeddings, t1.embeddings)
    np.testing.assert_array_equal(t2.pooled, t1.pooled)
    # changed prompts / options -> recompute (the new table's rows are right)
    t3 = te.cached_prompt_embeddings(PROMPTS[:2], text_dir, tmp_path / "cache", max_sequence_length=MAX_SEQ)
    assert len(calls) == 1 and t3.key != t1.key and t3.num_prompts == 3
    np.testing.assert_allclose(t3.embeddings[:2], t1.embeddings[:2], atol=1e-5, rtol=0)
    np.testing.assert_allclose(t3.embeddings[2], t1.embeddings[t1.null_id], atol=1e-5, rtol=0)
    assert len(list((tmp_path / "cache").glob("sd3_prompts_*/meta.json"))) == 2  # one directory per key
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary left behind
    assert isinstance(t2.embeddings, np.memmap) and isinstance(t1.embeddings, np.memmap)  # the miss reads back
    # every option is in the key
    kw = dict(max_sequence_length=MAX_SEQ, clip_skip=None, joint_attention_dim=4096, torch_dtype="float32",
              null_id=len(PROMPTS))
    rows = list(t1.prompts)
    assert te.embedding_cache_key(rows, paths, **kw) == t1.key
    for change in [dict(max_sequence_length=MAX_SEQ - 2), dict(clip_skip=1), dict(torch_dtype="bfloat16")]:
        assert te.embedding_cache_key(rows, paths, **{**kw, **change}) != t1.key, change


def test_cache_hit_does_not_import_torch(text_dir, tmp_path):
    te.cached_prompt_embeddings(["a cat"], text_dir, tmp_path, max_sequence_length=MAX_SEQ)
    code = textwrap.dedent(f"""
        import sys
        from adrpo_jax.flow import text_embeddings as te
        t = te.cached_prompt_embeddings(["a cat"], {str(text_dir)!r}, {str(tmp_path)!r}, max_sequence_length={MAX_SEQ})
        assert t.embeddings.shape == (2, {CLIP_LEN + MAX_SEQ}, 96), t.embeddings.shape
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "torch imported on a cache hit"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_changed_encoder_weights_recompute(tmp_path):
    """A new checkpoint in the same directory (size/mtime of the weights, or a config change) misses the cache."""
    root = _build_text_dir(tmp_path / "enc", seed=1)
    paths = te.resolve_text_paths(root)
    kw = dict(max_sequence_length=MAX_SEQ, clip_skip=None, joint_attention_dim=4096, torch_dtype="float32",
              null_id=1)
    k1 = te.embedding_cache_key(["a", ""], paths, **kw)
    assert te.embedding_cache_key(["a", ""], paths, **kw) == k1
    cfg = root / "text_encoder_3" / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_heads": 4', '"num_heads": 2'))
    assert te.embedding_cache_key(["a", ""], paths, **kw) != k1


def test_bad_inputs(text_dir, tmp_path):
    with pytest.raises(ValueError, match="sequence of str"):
        te.prompt_rows("a cat")
    with pytest.raises(ValueError, match="text_path"):
        te.resolve_text_paths(tmp_path / "missing")
    with pytest.raises(ValueError, match="text_encoder_2"):
        te.resolve_text_paths(clip_l_path=text_dir / "text_encoder")
    with pytest.raises(ValueError, match="text_encoder_3"):
        te.resolve_text_paths(clip_l_path=text_dir / "text_encoder", clip_g_path=text_dir / "text_encoder_2",
                              use_t5=True)
    with pytest.raises(ValueError, match="max_sequence_length"):
        te.encode_prompts(["a"], text_dir, max_sequence_length=0)
    with pytest.raises(ValueError, match="torch_dtype"):
        te.cached_prompt_embeddings(["a"], text_dir, tmp_path, torch_dtype="int8")
    with pytest.raises(ValueError, match="T5 width"):
        te.encode_prompts(["a"], text_dir, use_t5=False, joint_attention_dim=50, max_sequence_length=4)
