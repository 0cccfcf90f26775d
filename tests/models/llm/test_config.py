"""DecoderConfig <-> HF config.json, rope frequencies against transformers' rope functions, errors."""
import json

import numpy as np
import pytest

from adrpo_jax.models.llm import DecoderConfig, rope_inv_freq
from tests.models.llm.conftest import FAMILIES, _hf_config, torch, transformers  # noqa: F401


@pytest.mark.parametrize("name", FAMILIES)
def test_from_hf_config_round_trip(name):
  hf = _hf_config(name)
  cfg = DecoderConfig.from_hf_config(hf.to_dict())
  assert cfg.model_type == hf.model_type
  assert cfg.head_dim == getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  assert cfg.tie_word_embeddings == hf.tie_word_embeddings
  # What we write is read back by transformers into an equivalent config ...
  hf2 = transformers.AutoConfig.for_model(**cfg.to_hf_config())
  assert type(hf2) is type(hf)
  for key in ("hidden_size", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "layer_types"):
    assert getattr(hf2, key, None) == getattr(hf, key, None), key
  assert hf2.rope_parameters == hf.rope_parameters
  # ... and by us into the same config.
  assert DecoderConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_family_defaults():
  q2 = DecoderConfig.from_hf_config(_hf_config("qwen2").to_dict())
  assert (q2.attention_bias, q2.attention_out_bias, q2.qk_norm) == (True, False, False)
  assert q2.layer_sliding_windows == (None, 4)
  q3 = DecoderConfig.from_hf_config(_hf_config("qwen3").to_dict())
  assert (q3.attention_bias, q3.qk_norm, q3.head_dim) == (False, True, 32)
  lb = DecoderConfig.from_hf_config(_hf_config("llama_bias").to_dict())
  assert (lb.attention_bias, lb.attention_out_bias, lb.mlp_bias) == (True, True, True)
  # Qwen3 without head_dim uses HF's class default 128, not hidden // heads.
  raw = {**_hf_config("qwen3").to_dict()}
  raw.pop("head_dim")
  assert DecoderConfig.from_hf_config(raw).head_dim == 128


def test_reads_transformers_v4_rope_layout(tmp_path):
  raw = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
         "rope_scaling": {"type": "linear", "factor": 2.0}}
  (tmp_path / "config.json").write_text(json.dumps(raw))
  cfg = DecoderConfig.from_hf_config(tmp_path)
  assert cfg.rope_theta == 500000.0 and cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
  assert hash(cfg) == hash(DecoderConfig.from_hf_config(raw))


@pytest.mark.parametrize("name", FAMILIES)
def test_rope_inv_freq_matches_transformers(name):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf = _hf_config(name)
  rope_type = hf.rope_parameters["rope_type"]
  if rope_type == "default":
    dim = hf.hidden_size // hf.num_attention_heads
    ref = 1.0 / (hf.rope_parameters["rope_theta"] ** (np.arange(0, dim, 2) / dim))
    ref_scale = 1.0
  else:
    ref, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](hf, device="cpu")
    ref = ref.numpy()
  ours, scale = rope_inv_freq(DecoderConfig.from_hf_config(hf.to_dict()))
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  assert scale == pytest.approx(ref_scale)


def test_errors_name_the_bad_value():
  with pytest.raises(ValueError, match=r"gpt2.*supported.*llama.*qwen2.*qwen3"):
    DecoderConfig.from_hf_config({"model_type": "gpt2"})
  base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4)
  with pytest.raises(ValueError, match="num_key_value_heads=3"):
    DecoderConfig(**base, num_key_value_heads=3)
  with pytest.raises(ValueError, match="dynamic"):
    DecoderConfig(**base, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
  with pytest.raises(ValueError, match="param_dtype"):
    DecoderConfig(**base, param_dtype="int8")
  with pytest.raises(ValueError, match="hidden_act"):
    DecoderConfig(**base, hidden_act="swish2")
  with pytest.raises(ValueError, match="lacks"):
    DecoderConfig(**base, rope_scaling={"rope_type": "llama3", "factor": 8.0})
