"""Parity of adrpo_jax.models.audio_llm with transformers 5.23 on tiny random Qwen2-Audio and Qwen2.5-Omni
thinker checkpoints (float32, CPU): encoder outputs, full logits on a left-padded batch, completion log-probs
through `token_logprobs(model.lm, ..., embeds=model.embed_inputs(...))`, greedy generation, the tie-flag trap."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adrpo_jax.models import audio_llm  # noqa: E402
from adrpo_jax.models.llm import generate, token_logprobs  # noqa: E402

AUDIO, IMAGE, VIDEO, VSTART, ASTART, AEND, PAD = 63, 62, 61, 60, 58, 59, 0
N_MELS, SR, HOP = 16, 16000, 160
TOL = 1e-4


def _text_config(**kw):
  return dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, **kw)


def _feature_extractor(seconds):
  return transformers.WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=SR, hop_length=HOP,
                                              chunk_length=seconds, n_fft=400)


def _features(frames, seconds):
  """Log-mel features [N, N_MELS, 100 * seconds] + frame mask for clips of `frames` frames (numpy waves)."""
  rng = np.random.default_rng(0)
  waves = [(0.1 * rng.standard_normal(HOP * f)).astype(np.float32) for f in frames]
  out = _feature_extractor(seconds)(waves, sampling_rate=SR, return_attention_mask=True, padding="max_length",
                                    return_tensors="np")
  assert out["attention_mask"].sum(-1).tolist() == list(frames)
  return out["input_features"].astype(np.float32), out["attention_mask"].astype(np.int64)


def _prompts(counts, text_len=4, start_end=False):
  """Left-padded ids [B, P] / mask: [ASTART] AUDIO * n [AEND] + text tokens."""
  rows = []
  for i, n in enumerate(counts):
    body = ([ASTART] if start_end else []) + [AUDIO] * int(n) + ([AEND] if start_end else [])
    rows.append(body + [1 + (7 * i + j) % 50 for j in range(text_len)])
  p = max(map(len, rows))
  ids = np.full((len(rows), p), PAD, np.int64)
  mask = np.zeros((len(rows), p), np.int64)
  for i, r in enumerate(rows):
    ids[i, p - len(r):], mask[i, p - len(r):] = r, 1
  return ids, mask


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("audio_llms")
  torch.manual_seed(0)
  qa = transformers.Qwen2AudioConfig(
      audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=N_MELS, encoder_layers=2,
                        encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16, max_source_positions=50),
      text_config=dict(model_type="qwen2", **_text_config()), audio_token_index=AUDIO)
  transformers.Qwen2AudioForConditionalGeneration(qa).eval().save_pretrained(root / "qwen2_audio")
  thinker = transformers.Qwen2_5OmniThinkerConfig(
      audio_config=dict(num_mel_bins=N_MELS, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                        d_model=16, max_source_positions=50, n_window=5, output_dim=32),
      vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                         fullatt_block_indexes=[0]),
      text_config=dict(model_type="qwen2_5_omni_text", **_text_config(
          rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6})),
      audio_token_index=AUDIO, image_token_index=IMAGE, video_token_index=VIDEO, vision_start_token_id=VSTART,
      audio_start_token_id=ASTART, audio_end_token_id=AEND)
  transformers.Qwen2_5OmniThinkerForConditionalGeneration(thinker).eval().save_pretrained(root / "omni_thinker")
  return root


def _hf(path, kind):
  cls = (transformers.Qwen2AudioForConditionalGeneration if kind == "qwen2_audio"
         else transformers.Qwen2_5OmniThinkerForConditionalGeneration)
  return cls.from_pretrained(path).eval()


def _hf_logits(hf, ids, mask, feats, fmask):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), input_features=torch.tensor(feats),
              feature_attention_mask=torch.tensor(fmask)).logits.float().numpy()


CASES = {  # (checkpoint, feature seconds, clip frames)
    "qwen2_audio": ("qwen2_audio", 1, (37, 100, 64)),
    # omni chunk = 2 * n_window = 10 frames: shorter than a chunk, exactly 3 chunks, 3 chunks + 7
    "omni_thinker": ("omni_thinker", 1, (7, 30, 37)),
}


@pytest.fixture(scope="module")
def loaded(checkpoints):
  return {k: (audio_llm.load_pretrained(checkpoints / d), _hf(checkpoints / d, "qwen2_audio" if k == "qwen2_audio"
                                                                else "omni")) for k, (d, _, _) in CASES.items()}


@pytest.mark.parametrize("kind", list(CASES))
def test_encoder_outputs_match(kind, loaded):
  model, hf = loaded[kind]
  _, seconds, frames = CASES[kind]
  feats, fmask = _features(frames, seconds)
  emb, valid = model.encode_audio(jnp.asarray(feats), jnp.asarray(fmask))
  n = audio_llm.audio_output_lengths(np.asarray(frames))
  assert np.asarray(valid).sum(-1).tolist() == n.tolist()
  ids, mask = _prompts(n, start_end=kind != "qwen2_audio")
  captured = {}
  hook = hf.model.language_model.register_forward_pre_hook(
      lambda mod, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
  try:
    _hf_logits(hf, ids, mask, feats, fmask)
  finally:
    hook.remove()
  ref = captured["embeds"].float().numpy()[ids == AUDIO]  # the spliced audio embeddings, in order
  ours = np.concatenate([np.asarray(emb)[i, :k] for i, k in enumerate(n)], 0)
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind", list(CASES))
def test_logits_left_padded_batch(kind, loaded):
  model, hf = loaded[kind]
  _, seconds, frames = CASES[kind]
  feats, fmask = _features(frames, seconds)
  ids, mask = _prompts(audio_llm.audio_output_lengths(np.asarray(frames)), start_end=kind != "qwen2_audio")
  ref = _hf_logits(hf, ids, mask, feats, fmask)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask, bool), jnp.asarray(feats), jnp.asarray(fmask)))
  m = mask.astype(bool)
  np.testing.assert_allclose(ours[m], ref[m], atol=TOL, rtol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_completion_logprobs(kind, loaded):
  model, hf = loaded[kind]
  _, seconds, frames = CASES[kind]
  feats, fmask = _features(frames, seconds)
  ids, mask = _prompts(audio_llm.audio_output_lengths(np.asarray(frames)), start_end=kind != "qwen2_audio")
  comp = np.array([[5, 9, 11], [13, 2, 40], [7, 7, 3]], np.int64)
  tokens, tmask = np.concatenate([ids, comp], 1), np.concatenate([mask, np.ones_like(comp)], 1)
  ref = torch.log_softmax(torch.tensor(_hf_logits(hf, tokens, tmask, feats, fmask)), -1).numpy()
  ref = np.take_along_axis(ref[:, :-1], tokens[:, 1:, None], -1)[..., 0][:, -3:]
  emb, valid = model.encode_audio(jnp.asarray(feats), jnp.asarray(fmask))
  embeds = model.embed_inputs(jnp.asarray(tokens), emb, valid)
  lp = token_logprobs(model.lm, jnp.asarray(tokens), jnp.asarray(tmask, bool), embeds=embeds)
  np.testing.assert_allclose(np.asarray(lp)[:, -3:], ref, atol=TOL, rtol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_greedy_generation_matches(kind, loaded):
  model, hf = loaded[kind]
  _, seconds, frames = CASES[kind]
  feats, fmask = _features(frames, seconds)
  ids, mask = _prompts(audio_llm.audio_output_lengths(np.asarray(frames)), start_end=kind != "qwen2_audio")
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      input_features=torch.tensor(feats), feature_attention_mask=torch.tensor(fmask),
                      do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=PAD)
  ref = ref[:, ids.shape[1]:].numpy()
  emb, valid = model.encode_audio(jnp.asarray(feats), jnp.asarray(fmask))
  out = generate(model.lm, jnp.asarray(ids), jnp.asarray(mask, bool), greedy=True, max_new_tokens=5,
                 pad_token_id=PAD, prompt_embeds=model.embed_inputs(jnp.asarray(ids), emb, valid))
  np.testing.assert_array_equal(np.asarray(out.completions), ref)


def test_tie_flag_trap(checkpoints, loaded):
  """The thinker's own tie_word_embeddings (False) decides, not text_config.tie_word_embeddings (True)."""
  raw = json.loads((checkpoints / "omni_thinker" / "config.json").read_text())
  assert raw["tie_word_embeddings"] is False and raw["text_config"]["tie_word_embeddings"] is True
  model, _ = loaded["omni_thinker"]
  assert model.lm.config.tie_word_embeddings is False
  full = transformers.AutoConfig.from_pretrained(checkpoints / "omni_thinker").to_dict()
  assert audio_llm.resolve_configs(full)[1].tie_word_embeddings is False
  full["tie_word_embeddings"] = True
  assert audio_llm.resolve_configs(full)[1].tie_word_embeddings is True
  # the file's lm_head (not the embedding) is the head: the wrong flag would tie them and move the logits
  head = np.asarray(model.lm.lm_head_matrix())
  emb = np.asarray(model.lm.embed_tokens.embedding[...])
  assert head.shape in (emb.shape, emb.T.shape)
  assert not np.allclose(head if head.shape == emb.shape else head.T, emb)


def test_splice_count_mismatch_and_visual_inputs(loaded):
  model, _ = loaded["qwen2_audio"]
  feats, fmask = _features((37,), 1)
  ids, mask = _prompts([audio_llm.audio_output_lengths(37) - 1])
  with pytest.raises(ValueError, match="audio tokens"):
    model(jnp.asarray(ids), jnp.asarray(mask, bool), jnp.asarray(feats), jnp.asarray(fmask))
  with pytest.raises(ValueError, match="image / video"):
    model(jnp.asarray(ids), jnp.asarray(mask, bool), pixel_values=np.zeros((1, 3)))
  with pytest.raises(ValueError, match="fixed window"):
    model.encode_audio(jnp.asarray(feats[:, :, :50]), jnp.asarray(fmask[:, :50]))


def test_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
  with pytest.raises(ValueError, match="qwen2_audio"):
    audio_llm.load_pretrained(tmp_path)
