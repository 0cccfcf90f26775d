"""Named audio-LLM shapes for the plan mode: the ``config.json`` of public checkpoints, as plain dicts.

``model.path = 'preset:<name>'`` lets the audio recipe (``adrpo_jax.rl.audio_trainer``) build its programs at a real
model's shapes without its weights (``--mode=plan``): :func:`adrpo_jax.models.audio_llm.resolve_configs` reads the
dict as it reads a checkpoint's ``config.json``. The values are those of the published ``config.json`` files
(Hugging Face model cards, with the fields transformers fills by default written out), the text / audio parts only
(the Omni talker, token2wav and vision towers are never built here). Importing this module imports nothing heavy.

The text LLM presets live beside them in :mod:`adrpo_jax.models.llm.presets`.

>>> sorted(AUDIO_PRESETS)
['qwen2-audio-7b', 'qwen2.5-omni-7b']
>>> audio_preset('preset:qwen2.5-omni-7b')['thinker_config']['audio_token_index']
151646
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["AUDIO_PRESETS", "audio_preset", "is_audio_preset", "PRESET_PREFIX"]

PRESET_PREFIX = "preset:"

AUDIO_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-Omni-7B: the thinker (audio encoder 0.64 B + Qwen2.5-7B LM); audio-only positions are 1-D.
    "qwen2.5-omni-7b": {
        "model_type": "qwen2_5_omni",
        "thinker_config": {
            "model_type": "qwen2_5_omni_thinker",
            "audio_token_index": 151646, "audio_start_token_id": 151647, "audio_end_token_id": 151648,
            "bos_token_id": 151644, "eos_token_id": 151645, "pad_token_id": 151643,
            "position_id_per_seconds": 25, "seconds_per_chunk": 2, "tie_word_embeddings": False,
            "audio_config": {
                "model_type": "qwen2_5_omni_audio_encoder", "num_mel_bins": 128, "d_model": 1280,
                "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                "max_source_positions": 1500, "n_window": 100, "output_dim": 3584, "activation_function": "gelu",
                "scale_embedding": False,
            },
            "text_config": {
                "model_type": "qwen2_5_omni_text", "vocab_size": 152064, "hidden_size": 3584,
                "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 28,
                "bos_token_id": 151644, "eos_token_id": 151645, "pad_token_id": 151643,
                "tie_word_embeddings": False,
            },
        },
    },
    # Qwen/Qwen2-Audio-7B(-Instruct): Whisper-large-v3-sized encoder (fixed 30 s window) + a Qwen-7B-sized LM.
    "qwen2-audio-7b": {
        "model_type": "qwen2_audio",
        "audio_token_index": 151646,
        "audio_config": {
            "model_type": "qwen2_audio_encoder", "num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32,
            "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "max_source_positions": 1500,
            "activation_function": "gelu", "scale_embedding": False,
        },
        "text_config": {
            "model_type": "qwen2", "vocab_size": 156032, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "use_sliding_window": False, "sliding_window": 32768, "bos_token_id": 151643,
            "eos_token_id": 151645, "tie_word_embeddings": False,
        },
    },
}


def is_audio_preset(path: str) -> bool:
    """Whether ``path`` (a ``model.path``) names an audio preset (``'preset:<name>'``)."""
    return isinstance(path, str) and path.startswith(PRESET_PREFIX) and path[len(PRESET_PREFIX):] in AUDIO_PRESETS


def audio_preset(name: str) -> dict[str, Any]:
    """A deep copy of the config dict of ``name`` (with or without ``'preset:'``); ``KeyError`` naming the choices."""
    key = name[len(PRESET_PREFIX):] if name.startswith(PRESET_PREFIX) else name
    if key not in AUDIO_PRESETS:
        raise KeyError(f"unknown audio model preset {key!r}; one of {sorted(AUDIO_PRESETS)}")
    return copy.deepcopy(AUDIO_PRESETS[key])
