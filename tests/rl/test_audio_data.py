"""Audio tasks, the multiple-choice jsonl source, log-mel features and the audio QA rewards (hand-made inputs)."""

import json
import logging
import shutil
import wave

import numpy as np
import pytest

from adrpo_jax.rl import audio_data as ad
from adrpo_jax.rl.data import PromptIterator, columns_of
from adrpo_jax.rl.rewards import RewardComputer

needs_espeak = pytest.mark.skipif(not ad.spoken_task_available(), reason="espeak-ng / sox not installed")


def test_number_words():
  assert [ad.number_to_words(n) for n in (0, 7, 12, 20, 42, 99, 105)] == [
      "zero", "seven", "twelve", "twenty", "forty two", "ninety nine", "one hundred and five"]
  with pytest.raises(ValueError, match="1000"):
    ad.number_to_words(1000)


@needs_espeak
def test_spoken_arithmetic_task(tmp_path):
  task = ad.SpokenArithmeticTask(min_value=0, max_value=9, operations=("+", "-"), seed=3, cache_dir=tmp_path / "a")
  rows = [task[i] for i in range(6)]
  for i, r in enumerate(rows):
    a, op, b, ans = task.problem(i)
    assert r["answer"] == str(ans) and ans == (a + b if op == "+" else a - b) and ans >= 0
    assert r["transcript"] == f"what is {ad.number_to_words(a)} {'plus' if op == '+' else 'minus'} {ad.number_to_words(b)}"
    x = ad.read_wav(r["audio"])
    assert x.dtype == np.float32 and 0.5 < len(x) / ad.SAMPLE_RATE < 4.0 and np.abs(x).max() > 0.05
  assert task[4] == rows[4]  # a pure function of (seed, index)
  # The synthesis is deterministic: a fresh cache gives byte-identical clips.
  other = ad.SpokenArithmeticTask(operations=("+", "-"), seed=3, cache_dir=tmp_path / "b")
  assert open(other[0]["audio"], "rb").read() == open(rows[0]["audio"], "rb").read()
  with pytest.raises(ValueError, match="operations"):
    ad.SpokenArithmeticTask(operations=("/",), cache_dir=tmp_path)


def _count_bursts(x, rate=ad.SAMPLE_RATE):
  frame = rate // 100
  energy = np.sqrt(np.mean(x[: len(x) // frame * frame].reshape(-1, frame) ** 2, axis=1))
  on = energy > 0.1
  return int(np.sum(on[1:] & ~on[:-1]) + on[0])


def test_beep_task_counts_and_cache(tmp_path):
  task = ad.BeepCountTask(min_beeps=1, max_beeps=5, seconds=2.0, seed=1, cache_dir=tmp_path)
  for i in range(8):
    row = task[i]
    x = ad.read_wav(row["audio"])
    assert len(x) == 32000
    assert _count_bursts(x) == int(row["answer"]), i
    np.testing.assert_allclose(x, task.samples(i)[0], atol=1 / 32767 + 1e-6)  # 16-bit round trip
  assert {int(task[i]["answer"]) for i in range(40)} == {1, 2, 3, 4, 5}
  with pytest.raises(ValueError, match="max_beeps"):
    ad.BeepCountTask(max_beeps=10, seconds=1.0)


def test_make_audio_task_falls_back_without_binaries(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(shutil, "which", lambda name: None)
  with caplog.at_level(logging.WARNING):
    task = ad.make_audio_task("auto", seed=2, cache_dir=tmp_path, max_value=9)
  assert isinstance(task, ad.BeepCountTask) and task.seed == 2
  assert "beep" in caplog.text
  with pytest.raises(RuntimeError, match="espeak-ng"):
    ad.make_audio_task("spoken_arithmetic", cache_dir=tmp_path)
  with pytest.raises(ValueError, match="unknown audio task"):
    ad.make_audio_task("speech")


def test_read_wav_formats(tmp_path):
  path = tmp_path / "s.wav"
  t = np.arange(8000) / 8000
  stereo = np.stack([np.sin(2 * np.pi * 5 * t), np.sin(2 * np.pi * 5 * t)], 1)
  with wave.open(str(path), "wb") as w:
    w.setnchannels(2)
    w.setsampwidth(2)
    w.setframerate(8000)
    w.writeframes((stereo * 16000).astype("<i2").tobytes())
  x = ad.read_wav(path)
  assert x.shape == (16000,)  # resampled 8 kHz -> 16 kHz
  np.testing.assert_allclose(x[::2], stereo[:, 0] * 16000 / 32768, atol=2e-3)
  (tmp_path / "bad.wav").write_bytes(b"not a wav")
  with pytest.raises(ValueError, match="not a WAV file"):
    ad.read_wav(tmp_path / "bad.wav")


def test_log_mel_features_match_whisper_extractor():
  from transformers import WhisperFeatureExtractor
  rng = np.random.default_rng(0)
  clips = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (8000, 20000, 40000)]
  feats, mask = ad.LogMelFeatures(n_mels=80, seconds=2.0)(clips)
  assert feats.shape == (3, 80, 200) and mask.shape == (3, 200) and feats.dtype == np.float32
  assert mask.sum(1).tolist() == [50, 125, 200]  # the 2.5 s clip is cut to 2 s
  ref = WhisperFeatureExtractor(feature_size=80)(clips[1], sampling_rate=16000, return_tensors="np",
                                                padding="max_length", max_length=32000)["input_features"]
  np.testing.assert_allclose(feats[1], ref[0, :, :200], atol=1e-5)


def _write_jsonl(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_choice_jsonl_source(tmp_path):
  ad.write_wav(tmp_path / "a.wav", np.zeros(1600))
  rows = [{"audio": "a.wav", "question": "What sound?", "choices": ["cat", "dog barking", "rain"], "answer": "dog barking"},
          {"audio": str(tmp_path / "a.wav"), "question": "Which?", "choices": ["x", "y"], "answer": "B", "id": "q7"},
          {"audio": "a.wav", "question": "Idx?", "choices": ["x", "y", "z"], "answer": 2}]
  _write_jsonl(tmp_path / "d.jsonl", rows)
  src = ad.AudioChoiceJsonlSource(tmp_path / "d.jsonl")
  assert len(src) == 3
  r0 = src[0]
  assert r0["audio"] == str(tmp_path / "a.wav") and r0["answer"] == "dog barking" and r0["answer_letter"] == "B"
  assert "(A) cat\n(B) dog barking\n(C) rain" in r0["prompt"] and r0["prompt"].startswith("What sound?")
  assert src[1]["answer"] == "y" and src[1]["id"] == "q7" and src[2]["answer"] == "z"
  it = PromptIterator(src, num_prompts=2, group_size=2, seed=0)
  cols = columns_of(it.next_rows())
  assert len(cols["choices"]) == 4 and isinstance(cols["choices"][0], list)
  for bad, msg in [({"audio": "a.wav", "question": "q", "choices": ["x", "y"]}, "missing field 'answer'"),
                   ({"audio": "a.wav", "question": "q", "choices": ["x", "y"], "answer": "w"}, "none of the choices"),
                   ({"audio": "a.wav", "question": "q", "choices": ["x"], "answer": "x"}, "2..26"),
                   ({"audio": "nope.wav", "question": "q", "choices": ["x", "y"], "answer": "x"}, "does not exist")]:
    _write_jsonl(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(ValueError, match=msg):
      ad.AudioChoiceJsonlSource(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("completion, expected", [
    ("<answer>B</answer>", 1), ("<answer>(b)</answer>", 1), ("<think>hmm</think> <answer>a dog barking</answer>", 1),
    ("B", 1), ("(C)", 2), ("C. rain", 2), ("A dog barking.", 1), ("it is raining, rain", 2), ("", None),
    ("<answer>D</answer>", None), ("cat or rain", None), ("<answer>A</answer> then <answer>C</answer>", None),
    ("Because the sound", None)])
def test_parse_choice(completion, expected):  # tag-free prompts (require_tag=False); issue 28's cases elsewhere
  assert ad.parse_choice(completion, ["cat", "a dog barking", "rain"], require_tag=False) == expected


def test_audio_rewards_registered_and_combined():
  choices = [["cat", "dog", "rain"]] * 4
  completions = ["<think>woof</think><answer>B</answer>", "<answer>A</answer>", "dog", "<answer>B"]
  computer = RewardComputer(["choice_accuracy", "answer_format"], weights=[1.0, 0.5])
  out = computer(["q"] * 4, completions, choices=choices, answer=["dog"] * 4)
  assert out.rewards.tolist() == [1.5, 0.5, 0.0, 0.0]  # "dog" gives no <answer>: no accuracy reward
  assert ad.answer_format_reward(None, [" <answer>x</answer> ", "<think>a</think>\n<answer>b</answer>",
                                        "<answer>x</answer> tail", "x"]) == [1.0, 1.0, 0.0, 0.0]
  with pytest.raises(ValueError, match="choices"):
    ad.choice_accuracy_reward(["q"], ["A"], answer=["x"])
