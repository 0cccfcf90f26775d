"""Issue 28, audio data items: WAV formats and anti-aliased resampling (10), load-time checks and
data.on_bad_row (10), long clips counted / the Omni feature window (11), parse_choice (9), MMAU / AVQA
converters and the MMAU scorer (14). Hand-made inputs only."""

import json
import logging
import struct

import numpy as np
import pytest

from adrpo_jax.rl import audio_data as ad
from adrpo_jax.train.config import ConfigError


def _wav_bytes(samples_bytes: bytes, *, rate: int, channels: int, bits: int, tag: int = 1, extensible: bool = False,
               declared: int | None = None) -> bytes:
  block = channels * bits // 8
  if extensible:
    guid = struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0) + guid
  else:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
  data_size = len(samples_bytes) if declared is None else declared
  body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", 3) + b"abc\x00"
  body += b"data" + struct.pack("<I", data_size) + samples_bytes
  return b"RIFF" + struct.pack("<I", len(body)) + body


def _tone(freq, rate, seconds=0.5, amp=0.5):
  t = np.arange(int(rate * seconds)) / rate
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float64)


def test_read_wav_24bit_float_extensible(tmp_path):
  x = _tone(440.0, 16000)
  ints = np.round(x * (2**23 - 1)).astype(np.int64)
  b24 = np.stack([(ints >> s) & 0xFF for s in (0, 8, 16)], 1).astype(np.uint8).tobytes()
  cases = {
      "pcm24.wav": _wav_bytes(b24, rate=16000, channels=1, bits=24),
      "float32.wav": _wav_bytes(x.astype("<f4").tobytes(), rate=16000, channels=1, bits=32, tag=3),
      "float64.wav": _wav_bytes(x.astype("<f8").tobytes(), rate=16000, channels=1, bits=64, tag=3),
      "ext16.wav": _wav_bytes(np.round(x * 32767).astype("<i2").tobytes(), rate=16000, channels=1, bits=16,
                              extensible=True),
      "ext24_stereo.wav": _wav_bytes(np.repeat(np.frombuffer(b24, np.uint8).reshape(-1, 3), 2, 0).tobytes(),
                                     rate=16000, channels=2, bits=24, extensible=True),
      "extfloat.wav": _wav_bytes(x.astype("<f4").tobytes(), rate=16000, channels=1, bits=32, tag=3, extensible=True),
  }
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    y = ad.read_wav(tmp_path / name)
    assert y.dtype == np.float32 and y.shape == x.shape, name
    np.testing.assert_allclose(y, x, atol=1e-4, err_msg=name)
  info = ad.wav_info(tmp_path / "ext24_stereo.wav")
  assert (info.sample_rate, info.channels, info.bits, info.encoding, info.frames) == (16000, 2, 24, "pcm", len(x))


@pytest.mark.parametrize("data, match", [
    (_wav_bytes(b"\x00\x01" * 100, rate=16000, channels=1, bits=16, declared=4000), "truncated"),
    (_wav_bytes(b"\x00\x01\x02", rate=16000, channels=2, bits=16), "whole number"),
    (_wav_bytes(b"", rate=16000, channels=1, bits=16), "no audio frames"),
    (_wav_bytes(b"\x00" * 64, rate=16000, channels=1, bits=4, tag=0x11), "IMA ADPCM"),
    (_wav_bytes(b"\x00" * 64, rate=16000, channels=1, bits=12), "12-bit PCM"),
    (b"RIFF\x10\x00\x00\x00WAVEfmt ", "no 'data' chunk"),
    (b"ID3\x03mp3 data", "not a WAV file"),
])
def test_bad_wav_files_raise_naming_the_file(tmp_path, data, match):
  path = tmp_path / "bad.wav"
  path.write_bytes(data)
  with pytest.raises(ValueError, match=match) as err:
    ad.read_wav(path)
  assert str(path) in str(err.value)


def test_resampling_removes_content_above_the_new_nyquist(tmp_path):
  """44.1 kHz: a 1 kHz tone and a 12 kHz tone. Resampled to 16 kHz the 12 kHz tone must not fold to 4 kHz
  (linear interpolation puts it there at -2 dB below the 1 kHz tone; polyphase filtering below -60 dB)."""
  rate = 44100
  x = _tone(1000.0, rate, 1.0, 0.3) + _tone(12000.0, rate, 1.0, 0.3)
  path = tmp_path / "hi.wav"
  path.write_bytes(_wav_bytes(np.round(x * 32767).astype("<i2").tobytes(), rate=rate, channels=1, bits=16))
  y = ad.read_wav(path)
  assert len(y) == 16000
  spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
  freqs = np.fft.rfftfreq(len(y), 1 / 16000)
  at = lambda f: spec[np.abs(freqs - f) <= 20].max()  # noqa: E731
  assert 20 * np.log10(at(4000.0) / at(1000.0)) < -60.0
  np.testing.assert_allclose(np.abs(y[2000:-2000]).max(), 0.3, rtol=0.02)  # the 1 kHz tone passes


def _write_jsonl(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_bad_audio_is_refused_at_load_naming_file_and_line(tmp_path):
  ad.write_wav(tmp_path / "ok.wav", np.zeros(1600))
  (tmp_path / "trunc.wav").write_bytes(_wav_bytes(b"\x00\x01" * 10, rate=16000, channels=1, bits=16, declared=400))
  (tmp_path / "empty.wav").write_bytes(_wav_bytes(b"", rate=16000, channels=1, bits=16))
  q = {"question": "q?", "choices": ["x", "y"], "answer": "x"}
  rows = [{"audio": "ok.wav", **q}, {"audio": "trunc.wav", **q}, {"audio": "ok.wav", **q},
          {"audio": "empty.wav", **q}, {"audio": "ok.wav", **q, "question": ""},
          {"audio": "ok.wav", **q, "answer": None}]
  path = tmp_path / "d.jsonl"
  _write_jsonl(path, rows)
  with pytest.raises(ValueError) as err:
    ad.AudioChoiceJsonlSource(path)
  msg = str(err.value)
  assert f"{path}:2: audio file" in msg and "truncated" in msg and f"{path}:4:" in msg and "no audio frames" in msg
  assert f"{path}:5:" in msg and "question" in msg and f"{path}:6:" in msg and "4 bad rows of 6" in msg
  assert "data.on_bad_row=skip" in msg
  src = ad.AudioChoiceJsonlSource(path, on_bad_row="skip")
  assert len(src) == 2 and src.num_skipped == 4 and [line for line, _ in src.skipped] == [2, 4, 5, 6]
  assert [src[i]["index"] for i in range(2)] == [0, 1] and src.sample_rates == {16000: 2}
  with pytest.raises(ValueError, match="on_bad_row"):
    ad.AudioChoiceJsonlSource(path, on_bad_row="ignore")


def test_check_audio_data_names_the_key(tmp_path, caplog):
  import ml_collections
  ad.write_wav(tmp_path / "long.wav", np.zeros(16000 * 3))
  (tmp_path / "bad.wav").write_bytes(b"junk")
  _write_jsonl(tmp_path / "train.jsonl", [{"audio": "long.wav", "question": "q", "choices": ["a", "b"], "answer": 1}])
  _write_jsonl(tmp_path / "eval.jsonl", [{"audio": "bad.wav", "question": "q", "choices": ["a", "b"], "answer": 1}])
  config = ml_collections.ConfigDict({"audio": {"task": "jsonl", "seconds": 2.0},
                                      "data": {"path": str(tmp_path / "train.jsonl"), "on_bad_row": "raise"},
                                      "eval": {"path": str(tmp_path / "eval.jsonl")}})
  with pytest.raises(ConfigError, match="eval.jsonl:1: audio file") as err:
    ad.check_audio_data(config)
  assert err.value.key == "eval.path"
  config.eval.path = ""
  with caplog.at_level(logging.WARNING):
    sources = ad.check_audio_data(config)
  assert len(sources["data.path"]) == 1 and "1 of 1 clips are longer than audio.seconds=2" in caplog.text
  config.data.on_bad_row = "ignore"
  with pytest.raises(ConfigError, match="data.on_bad_row"):
    ad.check_audio_data(config)
  config.audio.task = "beeps"
  assert ad.check_audio_data(config) == {}


def test_long_clips_are_counted_and_logged(caplog):
  feats = ad.LogMelFeatures(n_mels=80, seconds=2.0)
  with caplog.at_level(logging.WARNING):
    feats([np.zeros(16000, np.float32), np.zeros(40000, np.float32)])
    feats([np.zeros(48000, np.float32)])
  assert feats.num_cut == 2 and feats.num_clips == 3
  assert feats.metrics() == {"audio/clips_cut": 2.0, "audio/clips_cut_fraction": pytest.approx(2 / 3)}
  assert caplog.text.count("was cut to audio.seconds=2") == 1  # warned once


def test_omni_feature_window_follows_the_processor():
  """The Omni processor keeps up to 300 s (chunk_length 300): a 35 s clip keeps all 3500 frames, equal to
  WhisperFeatureExtractor(chunk_length=300)'s; batches are padded to the longest clip in 2 s chunks."""
  from transformers import WhisperFeatureExtractor

  from adrpo_jax.models.audio_llm import AudioEncoderConfig
  rng = np.random.default_rng(0)
  clip = (0.1 * rng.standard_normal(35 * 16000)).astype(np.float32)
  short = (0.1 * rng.standard_normal(3 * 16000 + 555)).astype(np.float32)
  omni = AudioEncoderConfig(kind="omni", num_mel_bins=80, d_model=8, encoder_layers=1, encoder_attention_heads=2,
                            encoder_ffn_dim=8, max_source_positions=1500, n_window=100, output_dim=8)
  feats = ad.LogMelFeatures.for_encoder(omni)
  f, m = feats([clip, short])
  assert f.shape == (2, 80, 3600) and m.sum(1).tolist() == [3500, 304] and feats.num_cut == 0
  ref = WhisperFeatureExtractor(feature_size=80, chunk_length=300)
  for i, x in enumerate((clip, short)):
    r = ref(x, sampling_rate=16000, return_tensors="np", padding="max_length", truncation=True)["input_features"][0]
    n = int(m[i].sum())
    np.testing.assert_allclose(f[i, :, :n], r[:, :n], atol=1e-5)
  assert feats([short])[0].shape == (1, 80, 400)
  whisper = AudioEncoderConfig(kind="whisper", num_mel_bins=80, d_model=8, encoder_layers=1,
                               encoder_attention_heads=2, encoder_ffn_dim=8, max_source_positions=1500)
  assert ad.LogMelFeatures.for_encoder(whisper).num_frames == 3000
  with pytest.raises(ValueError, match="fixed window of 30 s"):
    ad.LogMelFeatures.for_encoder(whisper, seconds=20.0)
  stacked, mask = ad.LogMelFeatures.stack([f[0], f[1, :, :400]], [m[0], m[1, :400]])
  assert stacked.shape == (2, 80, 3600) and mask[1].sum() == 304


CHOICES = ["cat", "a dog barking", "rain"]


@pytest.mark.parametrize("completion, expected", [
    ("<think>It is definitely not rain; I need more", None),  # no answer: the reasoning is not scored
    ("rain", None),
    ("<answer>A</answer> then <answer>C</answer>", None),  # several answers
    ("<answer>A. cat or B. dog barking</answer>", None),  # a hedge
    ("<answer>(B) a dog barking, not rain</answer>", None),
    ("<answer>The answer is B</answer>", 1), ("<answer>Option C</answer>", 2), ("<answer>B) a dog barking</answer>", 1),
    ("<think>x</think><answer>rain</answer>", 2), ("<answer>cat or rain</answer>", None),
])
def test_parse_choice_answers_only(completion, expected):
  assert ad.parse_choice(completion, CHOICES) == expected


def test_parse_choice_letter_before_text():
  assert ad.parse_choice("<answer>(B)</answer>", ["B", "A", "C", "D"]) == 1
  assert ad.parse_choice("<answer>C</answer>", ["A", "C", "E", "G"]) == 2
  assert ad.parse_choice("<answer>D</answer>", ["C", "D", "E"]) == 1  # no option D: the text
  assert ad.parse_choice("<answer>B minor</answer>", ["A major", "B minor"]) == 1  # a word, not a letter
  assert ad.parse_choice("I think it is rain", CHOICES, require_tag=False) == 2
  assert ad.choice_accuracy_untagged_reward(["q"], ["<think>cat?</think> rain"], choices=[CHOICES],
                                            answer=["rain"]) == [1.0]


def test_answer_format_needs_exactly_one_answer():
  assert ad.answer_format_reward(None, ["<think>a</think><answer>b</answer><answer>c</answer>",
                                        "<answer>b</answer>", "<think>a</think><answer>b</answer>",
                                        "<answer><answer>b</answer></answer>"]) == [0.0, 1.0, 1.0, 0.0]


def test_mmau_scorer_and_categories():
  # MMAU's evaluation.py string_match, on the content of the answer block
  assert ad.mmau_string_match("dog barking", "The dog is barking.", ["cat", "dog barking", "rain"])
  assert not ad.mmau_string_match("dog barking", "dog barking or rain", ["cat", "dog barking", "rain"])
  assert not ad.mmau_string_match("dog barking", "", ["cat", "dog barking"])
  assert ad.mmau_string_match("Man", "man", ["Man", "Woman"])  # 'woman' is another token, not a substring
  out = ad.mmau_accuracy_reward(["q"] * 4, ["<think>cat?</think><answer>a dog barking</answer>", "a dog barking",
                                           "<answer>B</answer>", "<answer>rain</answer><answer>dog</answer>"],
                                choices=[CHOICES] * 4, answer=["a dog barking"] * 4)
  assert out == [1.0, 0.0, 0.0, 0.0]
  acc = ad.accuracy_by_category([1, 0, 1, 1, 0], ["sound", "sound", "music", "speech", ""],
                                valid=[True, True, True, True, True])
  assert acc == {"eval/accuracy/music": 1.0, "eval/accuracy/sound": 0.5, "eval/accuracy/speech": 1.0,
                 "eval/accuracy_macro": pytest.approx(2.5 / 3)}


def test_mmau_and_avqa_converters(tmp_path):
  audio = tmp_path / "test-mini-audios"
  audio.mkdir()
  ad.write_wav(audio / "a1.wav", np.zeros(1600))
  mmau = [{"id": "m1", "audio_id": "./test-mini-audios/a1.wav", "question": "What is heard?",
           "choices": ["Man", "Woman"], "answer": "Woman", "dataset": "x", "task": "speech", "split": "test-mini",
           "category": "Speaker", "sub-category": "gender", "difficulty": "easy"}]
  (tmp_path / "mmau-test-mini.json").write_text(json.dumps(mmau))
  assert ad.convert_mmau(tmp_path / "mmau-test-mini.json", tmp_path / "out" / "mmau.jsonl") == 1
  src = ad.AudioChoiceJsonlSource(tmp_path / "out" / "mmau.jsonl")
  row = src[0]
  assert row["audio"] == str(audio / "a1.wav") and row["answer"] == "Woman" and row["answer_letter"] == "B"
  assert row["task"] == "speech" and row["sub_category"] == "gender" and row["difficulty"] == "easy"
  avqa = [{"id": 183, "video_name": "vid_000030", "video_id": 341, "question_text": "What happened?",
           "multi_choice": ["motorboat", "yacht", "sailboat", "car"], "answer": 1, "question_relation": "View",
           "question_type": "Happening"}]
  (tmp_path / "train_qa.json").write_text(json.dumps(avqa))
  ad.write_wav(tmp_path / "vid_000030.wav", np.zeros(1600))
  assert ad.convert_avqa(tmp_path / "train_qa.json", tmp_path / "avqa.jsonl", audio_dir=tmp_path) == 1
  row = ad.AudioChoiceJsonlSource(tmp_path / "avqa.jsonl")[0]
  assert row["answer"] == "yacht" and row["question"] == "What happened?" and row["question_type"] == "Happening"
  (tmp_path / "broken.json").write_text(json.dumps([{"audio_id": "x.wav", "question": "q"}]))
  with pytest.raises(ValueError, match=r"broken.json\[0\]: missing \['choices', 'answer'\]"):
    ad.convert_mmau(tmp_path / "broken.json", tmp_path / "b.jsonl")
  assert ad.main(["mmau", str(tmp_path / "mmau-test-mini.json"), str(tmp_path / "cli.jsonl")]) == 0
  assert (tmp_path / "cli.jsonl").read_text() == (tmp_path / "out" / "mmau.jsonl").read_text()
