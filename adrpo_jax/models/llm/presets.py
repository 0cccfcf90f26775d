"""Named model shapes for the plan mode: the ``config.json`` fields of public checkpoints, as plain dicts.

``model.path = 'preset:<name>'`` lets ``--mode=plan`` build a recipe's programs at a real model's shapes without
its weights (:meth:`adrpo_jax.models.llm.DecoderConfig.from_hf_config` takes the dict). Values are those of the
published ``config.json`` files (Hugging Face model cards). Importing this module imports nothing heavy.

>>> 'qwen3-8b' in PRESETS and PRESETS['qwen3-8b']['model_type']
'qwen3'
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "preset", "PRESET_PREFIX", "preset_config", "abstract_model"]

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
    # Qwen/Qwen3-30B-A3B: 48 sparse layers, 128 experts of width 768, top 8; 30.5B parameters, 3.35B active
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                      "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                      "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "vocab_size": 151936, "max_position_embeddings": 40960,
                      "max_window_layers": 48, "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-6,
                      "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
                      "use_sliding_window": False, "sliding_window": None, "router_aux_loss_coef": 0.001,
                      "output_router_logits": False, "bos_token_id": 151643, "eos_token_id": 151645,
                      "torch_dtype": "bfloat16"},
    # google/gemma-3-12b-it (image-text; the text_config is the language model, other fields transformers' defaults:
    # head_dim 256, query_pre_attn_scalar 256, vocabulary 262,208, rope 1e6 (x8 linear) global / 1e4 local, 5:1
    # sliding (1,024) : global layers, tied embeddings)
    "gemma-3-12b": {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                    "eos_token_id": [1, 106], "boi_token_index": 255999, "eoi_token_index": 256000,
                    "image_token_index": 262144, "mm_tokens_per_image": 256, "initializer_range": 0.02,
                    "torch_dtype": "bfloat16",
                    "text_config": {"model_type": "gemma3_text", "hidden_size": 3840, "intermediate_size": 15360,
                                    "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
                                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
                    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                                      "patch_size": 14, "vision_use_head": False}},
    # google/gemma-3-27b-it (as 12b; head_dim 128 and query_pre_attn_scalar 168 != head_dim)
    "gemma-3-27b": {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                    "eos_token_id": [1, 106], "boi_token_index": 255999, "eoi_token_index": 256000,
                    "image_token_index": 262144, "mm_tokens_per_image": 256, "initializer_range": 0.02,
                    "torch_dtype": "bfloat16",
                    "text_config": {"model_type": "gemma3_text", "head_dim": 128, "hidden_size": 5376,
                                    "intermediate_size": 21504, "num_attention_heads": 32, "num_hidden_layers": 62,
                                    "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
                                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
                    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                                      "patch_size": 14, "vision_use_head": False}},
}


def preset(name: str) -> dict[str, Any]:
    """The config dict of ``name`` (with or without the ``'preset:'`` prefix); ``KeyError`` naming the choices."""
    key = name[len(PRESET_PREFIX):] if name.startswith(PRESET_PREFIX) else name
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {key!r}; one of {sorted(PRESETS)}")
    return dict(PRESETS[key])


def preset_config(name: str, **overrides):
    """``DecoderConfig`` of preset ``name`` (``overrides``: dtype, param_dtype, remat, moe_impl, ...).

    >>> cfg = preset_config("qwen3-30b-a3b")
    >>> round(cfg.num_params() / 1e9, 2), round(cfg.num_active_params() / 1e9, 2), cfg.num_moe_layers
    (30.53, 3.35, 48)
    >>> g = preset_config("gemma-3-27b")
    >>> g.layer_sliding_windows[:6], g.attention_scale == 168 ** -0.5, g.rope_local_theta, g.eos_token_id
    ((1024, 1024, 1024, 1024, 1024, None), True, 10000.0, (1, 106))
    """
    from adrpo_jax.models.llm.config import DecoderConfig  # pylint: disable=import-outside-toplevel

    return DecoderConfig.from_hf_config(preset(name), **overrides)


def abstract_model(name: str, **overrides):
    """The ``CausalLM`` of preset ``name`` as abstract arrays (``nnx.eval_shape``: shapes, dtypes, logical axes)."""
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from adrpo_jax.models.llm.modeling import CausalLM  # pylint: disable=import-outside-toplevel

    config = preset_config(name, **overrides)
    return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
