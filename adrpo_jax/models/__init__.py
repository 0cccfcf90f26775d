"""Flax NNX models. Subpackages are imported on demand (no heavy imports here):

  adrpo_jax.models.llm   decoder-only causal LM (Llama / Qwen2 / Qwen3), HF checkpoint I/O, sampler, log-probs
"""
