"""adrpo_jax: Adaptive Divergence Regularized Policy Optimization (ADRPO) in JAX / Flax NNX.

Subpackages:
  losses   pure-function losses (advantages, adaptive coefficient, divergences, GRPO, flow matching)
  models   Flax NNX models (decoder LM with HF checkpoint I/O, flow-matching DiT)
  train    shared training infrastructure (mesh/sharding, checkpoints, metrics, optimizers, preemption)
  rl       the GRPO/ADRPO trainer for LLMs
  flow     the ADRPO-W2 online fine-tuning of flow-matching models
"""

__version__ = "0.1.0"
