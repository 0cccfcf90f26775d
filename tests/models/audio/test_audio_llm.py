"""Parity of adrpo_jax.models.audio_llm with transformers 5.23 on tiny random Qwen2-Audio and Qwen2.5-Omni
thinker checkpoints (float32, CPU): encoder outputs, full logits on a left-padded batch, completion log-probs
through `token_logprobs(model.lm, ..., embeds=model.embed_inputs(...))`, greedy generation, the tie-flag trap."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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
def test_encoder_outputs_and_logits_match(kind, loaded):
  """Encoder outputs (the embeddings transformers splices in) and the full logits of a left-padded batch of
  clips of different lengths (omni: shorter than a chunk, exactly k chunks, k chunks + a remainder)."""
  model, hf = loaded[kind]
  _, seconds, frames = CASES[kind]
  feats, fmask = _features(frames, seconds)
  n = audio_llm.audio_output_lengths(np.asarray(frames))
  ids, mask = _prompts(n, start_end=kind != "qwen2_audio")
  captured = {}
  hook = hf.model.language_model.register_forward_pre_hook(
      lambda mod, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
  try:
    ref_logits = _hf_logits(hf, ids, mask, feats, fmask)
  finally:
    hook.remove()
  ref = captured["embeds"].float().numpy()[ids == AUDIO]  # the spliced audio embeddings, in order
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask, feats, fmask):
    m = nnx.merge(graphdef, state)
    return m.encode_audio(feats, fmask), m(ids, mask, feats, fmask)

  (emb, valid), logits = run(state, jnp.asarray(ids), jnp.asarray(mask, bool), jnp.asarray(feats),
                             jnp.asarray(fmask))
  assert np.asarray(valid).sum(-1).tolist() == n.tolist()
  ours = np.concatenate([np.asarray(emb)[i, :k] for i, k in enumerate(n)], 0)
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)
  m = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[m], ref_logits[m], atol=TOL, rtol=TOL)


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
  graphdef, state = nnx.split(model)

  @jax.jit
  def logprobs(state, tokens, tmask, feats, fmask):  # as the trainer: jitted, encoder once, embeds to the LM
    m = nnx.merge(graphdef, state)
    emb, valid = m.encode_audio(feats, fmask)
    return token_logprobs(m.lm, tokens, tmask, embeds=m.embed_inputs(tokens, emb, valid))

  lp = logprobs(state, jnp.asarray(tokens), jnp.asarray(tmask, bool), jnp.asarray(feats), jnp.asarray(fmask))
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
  n = int(audio_llm.audio_output_lengths(37))
  emb, valid = jnp.zeros((1, 25, 32)), jnp.arange(25)[None] < n
  with pytest.raises(ValueError, match="audio tokens"):
    model.embed_inputs(jnp.asarray(ids), emb, valid)
  spliced = model.embed_inputs(jnp.asarray(_prompts([n])[0]), emb + 1.0, valid)  # counts match: spliced in order
  assert int(jnp.sum(jnp.all(spliced == 1.0, axis=-1))) == n
  with pytest.raises(ValueError, match="image / video"):
    model(jnp.asarray(ids), jnp.asarray(mask, bool), pixel_values=np.zeros((1, 3)))
  with pytest.raises(ValueError, match="fixed window"):
    model.encode_audio(jnp.asarray(feats[:, :, :50]), jnp.asarray(fmask[:, :50]))


def test_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
  with pytest.raises(ValueError, match="qwen2_audio"):
    audio_llm.load_pretrained(tmp_path)


def test_full_omni_directory_loads_the_thinker(checkpoints, loaded, caplog):
  """model_type 'qwen2_5_omni': the thinker under 'thinker.'; talker / token2wav / visual tensors ignored."""
  from adrpo_jax.models.llm.checkpoint import SafetensorsFile, write_safetensors
  src, dst = checkpoints / "omni_thinker", checkpoints / "omni_full"
  dst.mkdir(exist_ok=True)
  thinker = json.loads((src / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "architectures":
                                               ["Qwen2_5OmniForConditionalGeneration"], "thinker_config": thinker}))
  f = SafetensorsFile(src / "model.safetensors")
  arrays = {"thinker." + k: np.asarray(f.get(k)) for k in f.names()}
  arrays.update({"talker.model.norm.weight": np.ones(4, np.float32), "token2wav.x.weight": np.ones(2, np.float32)})
  write_safetensors(dst / "model.safetensors", [(k, v.shape, v.dtype) for k, v in arrays.items()], arrays.__getitem__)
  with caplog.at_level("INFO", logger="adrpo_jax.models.audio_llm"):
    full = audio_llm.load_pretrained(dst)
  assert "talker" in caplog.text and "token2wav" in caplog.text and "thinker.visual" in caplog.text
  assert "unexpected tensor" not in caplog.text
  assert full.model_type == "qwen2_5_omni" and full.lm.config.tie_word_embeddings is False
  ref = jax.tree.leaves(nnx.state(loaded["omni_thinker"][0], nnx.Param))
  got = jax.tree.leaves(nnx.state(full, nnx.Param))
  assert len(ref) == len(got) and all(np.array_equal(a, b) for a, b in zip(ref, got))


def test_logical_axis_names_shard_on_a_mesh(checkpoints):
  """Every parameter has logical names the project's rules know; load_pretrained(mesh=) places them sharded."""
  from adrpo_jax import train
  mesh = train.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, devices=jax.devices()[:8])
  model = audio_llm.load_pretrained(checkpoints / "qwen2_audio", mesh=mesh)
  state = nnx.state(model, nnx.Param)
  shardings = train.logical_to_named_sharding(state, mesh)  # raises on an unknown logical name
  enc_q = model.encoder.layers[0].self_attn.q_proj.kernel
  assert enc_q.get_metadata()["out_sharding"] == ("embed", "heads")
  assert tuple(enc_q[...].sharding.spec) == ("fsdp", "tensor")
  assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(state))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_bfloat16_runs_close_to_float32(kind, checkpoints, loaded):
  model32, _ = loaded[kind]
  d, seconds, frames = CASES[kind]
  model = audio_llm.load_pretrained(checkpoints / d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  feats, fmask = _features(frames, seconds)
  ids, mask = _prompts(audio_llm.audio_output_lengths(np.asarray(frames)), start_end=kind != "qwen2_audio")
  args = (jnp.asarray(ids), jnp.asarray(mask, bool), jnp.asarray(feats), jnp.asarray(fmask))
  out = model(*args)
  assert out.dtype == jnp.bfloat16
  ref = np.asarray(model32(*args))
  m = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out, np.float32)[m], ref[m], atol=0.1)


@pytest.mark.slow
def test_qwen2_audio_text_tie_flag_follows_transformers(tmp_path):
  """text_config.tie_word_embeddings=True (as the built-in tiny model writes it): transformers 5.23 keeps the
  checkpoint's own language_model.lm_head; so do we."""
  torch.manual_seed(1)
  cfg = transformers.Qwen2AudioConfig(
      audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=N_MELS, encoder_layers=1,
                        encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16, max_source_positions=50),
      text_config=dict(model_type="qwen2", **_text_config(tie_word_embeddings=True)), audio_token_index=AUDIO)
  transformers.Qwen2AudioForConditionalGeneration(cfg).save_pretrained(tmp_path)
  hf = _hf(tmp_path, "qwen2_audio")
  ids = np.array([[1, 2, 3, 4, 5]])
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
  model = audio_llm.load_pretrained(tmp_path)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=TOL, rtol=TOL)
