"""Named model shapes for the plan mode: the ``config.json`` fields of public checkpoints, as plain dicts.

``model.path = 'preset:<name>'`` lets ``--mode=plan`` build a recipe's programs at a real model's shapes without
its weights (:meth:`adrpo_jax.models.llm.DecoderConfig.from_hf_config` takes the dict). Values are those of the
published ``config.json`` files (Hugging Face model cards). Importing this module imports nothing heavy.

>>> 'qwen3-8b' in PRESETS and PRESETS['qwen3-8b']['model_type']
'qwen3'
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "preset", "PRESET_PREFIX"]

PRESET_PREFIX = "preset:"

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 151643,
                   "eos_token_id": 151645},
    # Qwen/Qwen2.5-0.5B-Instruct
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 151643,
                     "eos_token_id": 151645},
    # Qwen/Qwen3-8B
    "qwen3-8b": {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                 "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                 "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
                 "bos_token_id": 151643, "eos_token_id": 151645},
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2},
}


def preset(name: str) -> dict[str, Any]:
    """The config dict of ``name`` (with or without the ``'preset:'`` prefix); ``KeyError`` naming the choices."""
    key = name[len(PRESET_PREFIX):] if name.startswith(PRESET_PREFIX) else name
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {key!r}; one of {sorted(PRESETS)}")
    return dict(PRESETS[key])
