"""Flax NNX models. Subpackages are imported on demand (no heavy imports here):

  adrpo_jax.models.llm   decoder-only causal LM (Llama / Qwen2 / Qwen3), HF checkpoint I/O, sampler, log-probs
  adrpo_jax.models.mmdit SD3 / SD3.5 MMDiT transformer, diffusers checkpoint I/O (load_pretrained / save_pretrained)
"""
