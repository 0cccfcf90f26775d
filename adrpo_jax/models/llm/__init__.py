"""Decoder-only causal LM (Llama / Qwen2 / Qwen3) in Flax NNX with Hugging Face checkpoint I/O, a
jitted KV-cached sampler and chunked per-token log-probs.

    from adrpo_jax.models.llm import load_pretrained, load_tokenizer, generate, token_logprobs
    model = load_pretrained("/path/to/hf_dir")                    # config.json + *.safetensors
    out = generate(model, prompt_tokens, prompt_mask, rng=key, max_new_tokens=64, temperature=0.7)
    logp = token_logprobs(model, out.tokens, out.attention_mask, temperature=0.7)   # [B, P + N]

transformers / torch are only imported by `load_tokenizer` and the SmolLM2 GGUF conversion.
"""
from adrpo_jax.models.llm.checkpoint import (
    DEFAULT_LOGICAL_RULES,
    CheckpointError,
    load_pretrained,
    load_tokenizer,
    logical_to_sharding,
    save_pretrained,
)
from adrpo_jax.models.llm.config import SUPPORTED_MODEL_TYPES, DecoderConfig, rope_inv_freq
from adrpo_jax.models.llm.logprobs import logprobs_from_hidden, token_logprobs
from adrpo_jax.models.llm.modeling import CausalLM, KVCache, positions_from_mask
from adrpo_jax.models.llm.sampler import GenerationOutput, SamplingConfig, generate, make_generate_fn, process_logits
from adrpo_jax.models.llm.smollm2 import convert_smollm2, default_smollm2_dir, find_smollm2_gguf, load_smollm2

__all__ = [
    "CausalLM", "CheckpointError", "DEFAULT_LOGICAL_RULES", "DecoderConfig", "GenerationOutput", "KVCache",
    "SUPPORTED_MODEL_TYPES", "SamplingConfig", "convert_smollm2", "default_smollm2_dir", "find_smollm2_gguf",
    "generate", "load_pretrained", "load_smollm2", "load_tokenizer", "logical_to_sharding", "logprobs_from_hidden",
    "make_generate_fn", "positions_from_mask", "process_logits", "rope_inv_freq", "save_pretrained",
    "token_logprobs",
]
