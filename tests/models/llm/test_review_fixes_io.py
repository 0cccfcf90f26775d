"""Issue 18 items 10, 11, 12, 14, 15, 16: checkpoint I/O and config conversion follow transformers 5.23.

Each test compares with transformers (torch, CPU) on a tiny random model where transformers has a behaviour.
"""
import copy
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.models.llm import load_pretrained, save_pretrained
from adrpo_jax.models.llm.config import DecoderConfig, rope_inv_freq
from adrpo_jax.models.lora import LoRAConfig, apply_lora, lora_sites, merge_lora
from tests.models.llm.conftest import TinyModel, hf_logits, transformers

# Our jitted float32 forward vs transformers' torch float32 forward: two different computations, so a float32
# tolerance (the existing parity tests use the same bound); every defect below moves logits by >= 0.4.
PARITY_ATOL = 1e-4


def _ours(model, tokens, mask):
  return np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))


def _hf_from(name, directory):
  return TinyModel(name, directory, transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval())


def _edit_config(directory, **changes):
  cfg = json.loads((directory / "config.json").read_text())
  cfg.update(changes)
  (directory / "config.json").write_text(json.dumps(cfg))
  return cfg


# -- item 11 ---------------------------------------------------------------------------------------------
def test_rope_scaling_wins_over_rope_parameters_as_in_transformers(tiny_hf, padded_batch, tmp_path):
  tokens, mask = padded_batch
  d = tmp_path / "yarn"
  shutil.copytree(tiny_hf("llama").path, d)  # its config.json has rope_parameters (llama3, theta 5e5)
  yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
  raw = _edit_config(d, rope_scaling=yarn, rope_theta=20000.0)  # as the Qwen model cards say to add YaRN
  hf_cfg = transformers.AutoConfig.from_pretrained(str(d))
  assert hf_cfg.rope_parameters["rope_type"] == "yarn"  # transformers: rope_scaling replaces rope_parameters
  ours_cfg = DecoderConfig.from_hf_config(copy.deepcopy(raw))
  assert ours_cfg.rope_scaling_dict["rope_type"] == "yarn"
  assert ours_cfg.rope_theta == hf_cfg.rope_parameters["rope_theta"] == 20000.0
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
  inv, scale = rope_inv_freq(ours_cfg)
  np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=1e-6)  # float32 numpy vs float32 torch
  assert scale == pytest.approx(hf_scale, rel=1e-6)
  diff = np.abs(_ours(load_pretrained(d), tokens, mask) - hf_logits(_hf_from("llama", d), tokens, mask))
  assert diff[mask].max() <= PARITY_ATOL
  # without rope_theta in rope_scaling nor at the top level, transformers' default 10000 (not rope_parameters')
  del raw["rope_theta"]
  assert DecoderConfig.from_hf_config(copy.deepcopy(raw)).rope_theta == \
      transformers.LlamaConfig.from_dict(copy.deepcopy(raw)).rope_parameters["rope_theta"] == 10000.0
  # an empty rope_scaling leaves rope_parameters in charge (transformers: `rope_scaling or rope_parameters`)
  raw["rope_scaling"] = {}
  assert DecoderConfig.from_hf_config(copy.deepcopy(raw)).rope_scaling_dict["rope_type"] == "llama3"


# -- item 12 ---------------------------------------------------------------------------------------------
def test_tied_config_with_a_different_lm_head_unties_as_transformers(tiny_hf, padded_batch, tmp_path, caplog):
  tokens, mask = padded_batch
  d = tmp_path / "tied_but_head"
  shutil.copytree(tiny_hf("llama").path, d)  # untied: the file has its own lm_head.weight
  _edit_config(d, tie_word_embeddings=True)
  with caplog.at_level(logging.WARNING, logger="adrpo_jax.models.llm.checkpoint"):
    model = load_pretrained(d)
  assert "NOT tying" in caplog.text and "lm_head.weight" in caplog.text
  assert model.config.tie_word_embeddings is False and model.lm_head is not None
  diff = np.abs(_ours(model, tokens, mask) - hf_logits(_hf_from("llama", d), tokens, mask))
  assert diff[mask].max() <= PARITY_ATOL
  # an lm_head.weight equal to the embedding keeps the model tied, silently (transformers ties it too)
  e = tmp_path / "tied_equal"
  model.lm_head.kernel.set_value(model.embed_tokens.embedding.get_value().T)
  save_pretrained(model, e)
  _edit_config(e, tie_word_embeddings=True)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="adrpo_jax.models.llm.checkpoint"):
    assert load_pretrained(e).config.tie_word_embeddings is True
  assert "NOT tying" not in caplog.text


# -- item 14 ---------------------------------------------------------------------------------------------
_SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def test_to_hf_config_refuses_what_the_family_cannot_express():
  llama_sw = DecoderConfig(**_SMALL, model_type="llama", sliding_window=4,
                           layer_types=("full_attention", "sliding_attention"))
  with pytest.raises(ValueError, match=r"llama has no sliding-window.*sliding_window=4"):
    llama_sw.to_hf_config()
  qwen2_norm = DecoderConfig(**_SMALL, model_type="qwen2", attention_bias=True, qk_norm=True)
  with pytest.raises(ValueError, match=r"qwen2 has no q/k norm; qk_norm=True"):
    qwen2_norm.to_hf_config()
  with pytest.raises(ValueError, match=r"llama has no q/k norm; qk_norm=True"):
    DecoderConfig(**_SMALL, model_type="llama", qk_norm=True).to_hf_config()
  # what the families do express still saves: a window that no layer uses, qwen2 / qwen3 sliding layers
  DecoderConfig(**_SMALL, model_type="llama", sliding_window=4).to_hf_config()
  qwen2_sw = llama_sw.replace(model_type="qwen2", attention_bias=True)
  assert qwen2_sw.to_hf_config()["sliding_window"] == 4
  assert DecoderConfig.from_hf_config(qwen2_sw.to_hf_config()).layer_sliding_windows == (None, 4)


# -- item 15 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_use_sliding_window_without_a_window_defaults_as_transformers(family):
  raw = dict(model_type=family, vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=4, use_sliding_window=True,
             max_window_layers=1)
  hf = transformers.AutoConfig.for_model(**copy.deepcopy(raw))
  ours = DecoderConfig.from_hf_config(copy.deepcopy(raw))
  assert ours.sliding_window == hf.sliding_window == 4096
  assert list(ours.layer_types) == list(hf.layer_types) == ["full_attention"] + ["sliding_attention"] * 2
  # an explicit null window (and use_sliding_window=False) still means no window, as in transformers
  for extra in ({"sliding_window": None}, {"use_sliding_window": False}):
    hf = transformers.AutoConfig.for_model(**{**raw, **extra})
    ours = DecoderConfig.from_hf_config({**raw, **extra})
    assert ours.sliding_window is None and hf.sliding_window is None
    assert ours.layer_sliding_windows == (None, None, None)


# -- item 16 ---------------------------------------------------------------------------------------------
def test_stale_index_next_to_model_safetensors_is_ignored(tiny_hf, padded_batch, tmp_path, caplog):
  tokens, mask = padded_batch
  d = tmp_path / "stale"
  shutil.copytree(tiny_hf("llama").path, d)
  names = _names(d)
  (d / "model.safetensors.index.json").write_text(json.dumps(  # left by an earlier sharded save
      {"metadata": {"total_size": 1}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
  with caplog.at_level(logging.WARNING, logger="adrpo_jax.models.llm.checkpoint"):
    model = load_pretrained(d)
  assert "ignoring the index" in caplog.text
  diff = np.abs(_ours(model, tokens, mask) - hf_logits(_hf_from("llama", d), tokens, mask))  # transformers too
  assert diff[mask].max() <= PARITY_ATOL


def _names(directory):
  from adrpo_jax.models.llm.checkpoint import SafetensorsFile
  return SafetensorsFile(directory / "model.safetensors").names()


# -- item 10 ---------------------------------------------------------------------------------------------
def _lora_model(tiny):
  model = load_pretrained(tiny.path)
  apply_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "down_proj")), rngs=0)
  for site in lora_sites(model):  # non-zero B: the adapted model differs from the base
    if site.adapted:
      b = site.adapter.lora_b
      b.set_value(0.3 * jax.random.normal(jax.random.key(1), b.get_value().shape))
  return model


def test_save_pretrained_refuses_unmerged_lora(tiny_hf, tmp_path):
  model = load_pretrained(tiny_hf("llama").path)
  apply_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj",)), rngs=0)
  with pytest.raises(ValueError, match=r"unmerged LoRA adapters on \['layers.*q_proj.*merge_lora\(model\)"):
    save_pretrained(model, tmp_path / "unmerged")
  assert not (tmp_path / "unmerged").exists()  # refused before writing anything
  # the merged model saves (its parity with transformers: test_merged_lora_save_matches_transformers, slow)


@pytest.mark.slow
def test_merged_lora_save_matches_transformers(tiny_hf, padded_batch, tmp_path):
  tokens, mask = padded_batch
  model = _lora_model(tiny_hf("llama"))
  ours = _ours(model, tokens, mask)
  assert np.abs(ours - hf_logits(tiny_hf("llama"), tokens, mask))[mask].max() > 0.1  # LoRA changes logits
  out = save_pretrained(merge_lora(model), tmp_path / "merged")
  assert np.abs(hf_logits(_hf_from("llama", out), tokens, mask) - ours)[mask].max() <= PARITY_ATOL
