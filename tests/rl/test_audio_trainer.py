"""configs/audio_arith.py and the audio trainer: config variants and their errors (fast), and the ``cpu`` variant
end to end through launch.py (slow: reward logged, a resumed run ends bit-identical to an uninterrupted one).
The slow test builds the supervised tiny audio model once in ``$ADRPO_JAX_CACHE`` (or ~/.cache/adrpo_jax)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adrpo_jax.rl import audio_trainer
from adrpo_jax.train.config import ConfigError
from adrpo_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def _config(variant):
  spec = importlib.util.spec_from_file_location("audio_arith_cfg", REPO / "configs" / "audio_arith.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def test_variants_and_clear_errors(tmp_path):
  for v in ("cpu", "cpu_grpo"):
    audio_trainer.validate_audio_config(_config(v))
  assert not _config("cpu_grpo").rl.adaptive and _config("cpu").rl.adaptive
  gpu = _config("gpu")
  assert gpu.lora.enabled and gpu.audio.task == "jsonl" and gpu.rewards.functions == ("mmau_accuracy", "answer_format")
  assert gpu.audio.choice_format == "text" and gpu.eval.accuracy_reward == "mmau_accuracy"  # MMAU-comparable
  assert gpu.eval.batch_size and _config("tpu").eval.batch_size  # the eval generate runs in chunks
  with pytest.raises(ConfigError, match="model.path"):
    audio_trainer.validate_audio_config(gpu)
  (tmp_path / "omni").mkdir()
  (tmp_path / "omni" / "config.json").write_text("{}")
  gpu.model.path = str(tmp_path / "omni")
  with pytest.raises(ConfigError, match="data.path"):
    audio_trainer.validate_audio_config(gpu)
  gpu.data.path = str(tmp_path / "train.jsonl")
  (tmp_path / "train.jsonl").write_text("")
  audio_trainer.validate_audio_config(gpu)
  assert _config("tpu").mesh.fsdp == 8
  bad = _config("cpu")
  bad.audio.task = "speech"
  with pytest.raises(ConfigError, match="audio.task"):
    audio_trainer.validate_audio_config(bad)
  with pytest.raises(ValueError, match="unknown variant"):
    _config("tpu8")


def test_make_audio_source(tmp_path):
  cfg = _config("cpu")
  cfg.audio.cache_dir = str(tmp_path)
  cfg.audio.task = "beeps"
  src = audio_trainer.make_audio_source(cfg, seed=0)
  ev = audio_trainer.make_audio_source(cfg, seed=0, eval_split=True)
  assert src[0]["audio"] != ev[0]["audio"] and src[0]["prompt"] == "="


def _env():
  env = dict(os.environ)
  env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu", "CI": "true",
              "PYTHONUNBUFFERED": "1"})
  return env


def _cmd(workdir, steps, *extra):
  return [sys.executable, "launch.py", "--config=configs/audio_arith.py:cpu", f"--workdir={workdir}",
          f"--config.total_steps={steps}", "--config.checkpoint.every_steps=3", "--config.eval_every=6",
          "--config.log_every=1", "--config.eval.num_examples=16", "--config.rl.num_prompts_per_step=4",
          "--config.rl.group_size=4", "--config.model.save_final=True", "--config.logging.tensorboard=False", *extra]


@pytest.mark.slow
def test_cpu_variant_runs_and_resumes_exactly(tmp_path):
  from adrpo_jax.rl.audio_sft import ensure_tiny_audio_model
  cfg = _config("cpu")
  ensure_tiny_audio_model(cfg)
  full, part = tmp_path / "full", tmp_path / "part"
  r = subprocess.run(_cmd(full, 6), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  records = read_jsonl(full / "metrics.jsonl")
  rewards = [x["reward/exact_match_mean"] for x in records if "reward/exact_match_mean" in x]
  assert len(rewards) == 6 and all(0.0 <= v <= 1.0 for v in rewards)
  assert any("eval/accuracy" in x for x in records)
  # 3 steps, then the same command extended to 6 resumes from the step-3 checkpoint.
  r = subprocess.run(_cmd(part, 3), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  r = subprocess.run(_cmd(part, 6), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from checkpoint step 3" in r.stderr
  a, b = np.load(full / "final_model" / "params.npz"), np.load(part / "final_model" / "params.npz")
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.slow
def test_grpo_vs_adrpo_experiment_smoke(tmp_path):
  """experiments/audio_grpo_vs_adrpo.py --smoke: 2 steps of one seed per method, results and the plot written."""
  # in a subprocess on one CPU device, as a user runs it (this process has 8 forced devices)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run([sys.executable, str(REPO / "experiments" / "audio_grpo_vs_adrpo.py"), "--workdir", str(tmp_path),
                  "--smoke"], check=True, env=env, cwd=REPO, timeout=900)
  results = json.loads((tmp_path / "results.json").read_text())
  assert sorted(results) == ["ADRPO/seed0", "GRPO/seed0"]
  assert (tmp_path / "audio_reward_kl.png").exists() and (tmp_path / "results.json").exists()


def test_tiny_model_audio_token_counts():
  from adrpo_jax.rl.audio_sft import _audio_token_counts
  lengths = np.array([1, 3, 50, 171, 249, 250])
  mask = (np.arange(250)[None] < lengths[:, None]).astype(np.int32)
  assert _audio_token_counts(mask).tolist() == [0, 1, 12, 43, 62, 62]  # 25 per second


@pytest.mark.slow  # importing the transformers model module alone takes seconds
def test_tiny_model_audio_token_counts_match_transformers():
  """The tiny model's prompt has one '@' per encoder output: the count formula == transformers' own."""
  import torch
  from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
  from adrpo_jax.rl.audio_sft import _audio_token_counts
  lengths = np.array([1, 2, 3, 50, 171, 249, 250])
  mask = (np.arange(250)[None] < lengths[:, None]).astype(np.int32)
  _, ref = Qwen2AudioEncoder._get_feat_extract_output_lengths(None, torch.tensor(lengths))
  assert _audio_token_counts(mask).tolist() == ref.tolist()


def test_audio_prompts_host_side(tmp_path):
  """The host side of an audio rollout with a stand-in encoder: features per row (cached per clip), one audio
  token per valid encoder output in the prompt, left-padded; a prompt that does not fit is an error."""
  from adrpo_jax.rl import audio_data
  from adrpo_jax.rl.rollout import PromptEncoder
  from adrpo_jax.rl.tasks import build_char_tokenizer
  from adrpo_jax.train import make_mesh

  cfg = _config("cpu")
  cfg.audio.task, cfg.audio.cache_dir = "beeps", str(tmp_path)
  tok = build_char_tokenizer(extra_chars=("@",))
  t = object.__new__(audio_trainer.AudioRLTrainer)
  t.config, t.tokenizer, t.audio_token, t.audio_template = cfg, tok, "@", "{audio}"
  t.audio_token_id, t._in_eval = tok.convert_tokens_to_ids("@"), False
  t.mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=__import__("jax").devices()[:1])
  t.features = audio_data.LogMelFeatures(n_mels=80, seconds=2.5)
  t._feature_cache = __import__("collections").OrderedDict()
  t.encoder = PromptEncoder(tok, 64)
  calls = []

  def fake_encode(params, frozen, feats, fmask, group):  # 4x downsampling of the valid frames, per prompt
    calls.append((feats.shape, group))
    n = np.asarray(fmask).sum(axis=1) // 4
    valid = np.arange(64)[None] < n[:, None]
    return np.zeros((len(fmask) * group, 64, 8), np.float32), np.repeat(valid, group, 0)

  t.fns, t.policy = {"audio/encode": fake_encode}, __import__("types").SimpleNamespace(frozen=None)
  src = audio_trainer.make_audio_source(cfg, seed=0)
  rows = [src[0]] * 2 + [src[1]] * 2
  g, prompts, counts = t.audio_prompts(rows, None, 2)
  # the host sends one clip per group of 2 rows; 2 s of beeps = 200 frames
  assert calls == [((2, 80, 250), 2)] and counts.tolist() == [50, 50, 50, 50]
  tokens, mask = np.asarray(g["tokens"]), np.asarray(g["mask"])
  at = tok.convert_tokens_to_ids("@")
  assert (tokens == at).sum(1).tolist() == [50] * 4 and mask.sum(1).tolist() == [51] * 4
  assert tok.decode(tokens[0, -1:].tolist()) == "=" and prompts == ["="] * 4
  assert len(t._feature_cache) == 2
  t.encoder = PromptEncoder(tok, 40)
  with pytest.raises(ValueError, match="max_prompt_length"):
    t.audio_prompts(rows, None, 2)
