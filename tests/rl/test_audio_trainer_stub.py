"""The audio trainer end to end in-process on a stand-in audio LM (our CausalLM + a linear frame-pooling
"encoder" + the <|AUDIO|> splice), independent of adrpo_jax.models.audio_llm: rollout with prompt embeddings,
log-probs and updates with model_inputs, eval, checkpoints, exact resume (slow: several compilations)."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig
from adrpo_jax.rl import audio_trainer
from adrpo_jax.rl.tasks import build_char_tokenizer
from adrpo_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]


class StubAudioLM(nnx.Module):
  """``encode_audio``: 4 mel frames -> one embedding (valid when all 4 frames are); ``embed_inputs``: the k-th
  audio token of a row gets the row's k-th audio embedding."""

  def __init__(self, vocab, audio_id, n_mels=80, rngs=None):
    cfg = DecoderConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=(2,))
    self.lm = CausalLM(cfg, rngs=rngs)
    self.proj = nnx.Linear(4 * n_mels, 32, rngs=rngs)
    self.audio_id = self.audio_token_id = audio_id

  def encode_audio(self, features, mask):
    b, m, l = features.shape
    k = l // 4
    x = features[:, :, :4 * k].reshape(b, m, k, 4).transpose(0, 2, 1, 3).reshape(b, k, 4 * m)
    return self.proj(x), mask[:, :4 * k].reshape(b, k, 4).sum(-1) == 4

  def embed_inputs(self, ids, audio_embeds, audio_valid):
    base = self.lm.embed_tokens(ids)
    is_audio = ids == self.audio_id
    idx = jnp.clip(jnp.cumsum(is_audio, axis=1) - 1, 0, audio_embeds.shape[1] - 1)
    spliced = jnp.take_along_axis(audio_embeds, idx[..., None], axis=1).astype(base.dtype)
    return jnp.where(is_audio[..., None], spliced, base)


@pytest.fixture
def stub(monkeypatch, tmp_path):
  tok = build_char_tokenizer(extra_chars=("@",))
  tok_dir = tmp_path / "tok"
  tok.save_pretrained(tok_dir)
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  monkeypatch.setattr(audio_trainer, "resolve_audio_model", lambda config: (model_dir, tok_dir))
  monkeypatch.setattr(audio_trainer, "_load_audio_model", lambda d, config, mesh=None: StubAudioLM(
      len(tok), tok.convert_tokens_to_ids("@"), rngs=nnx.Rngs(0)))
  return tmp_path


def _config(tmp, steps, variant="cpu"):
  spec = importlib.util.spec_from_file_location("audio_arith_cfg", REPO / "configs" / "audio_arith.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(variant)
  c.audio.task, c.audio.cache_dir, c.audio.seconds = "beeps", str(tmp / "audio"), 2.0
  c.sampling.max_prompt_length, c.sampling.max_new_tokens = 56, 3
  c.rl.num_prompts_per_step, c.rl.group_size = 2, 4
  c.total_steps, c.eval_every, c.log_every, c.eval.num_examples = steps, 2, 1, 4
  c.checkpoint.every_steps, c.model.save_final = 1, True
  c.logging.tensorboard, c.logging.progress_bar = False, False
  return c


@pytest.mark.slow
def test_stub_audio_trainer_runs_and_resumes_exactly(stub):
  full, part = stub / "full", stub / "part"
  out = audio_trainer.train_and_evaluate(_config(stub, 2), str(full))
  recs = read_jsonl(full / "metrics.jsonl")
  assert [r["step"] for r in recs if "reward_mean" in r] == [1, 2]
  assert any("eval/accuracy" in r for r in recs) and np.isfinite(out["loss"])
  audio_trainer.train_and_evaluate(_config(stub, 1), str(part))
  audio_trainer.train_and_evaluate(_config(stub, 2), str(part))  # resumes from step 1
  a, b = np.load(full / "final_model" / "params.npz"), np.load(part / "final_model" / "params.npz")
  assert sorted(a.files) == sorted(b.files) and any("proj" in k for k in a.files)
  for k in a.files:
    assert a[k].tobytes() == b[k].tobytes(), k
