"""ADRPO-W2 for flow-matching models: the digits data, samplers, rewards, metrics and pre-training.

Submodules (imported on demand; this package imports nothing heavy):

  data       sklearn digits in [-1, 1] NHWC, deterministic split, thickness attribute, condition ids
  sampling   jitted fixed-step Euler / Heun / midpoint ODE (and Euler-Maruyama SDE) samplers with CFG
  rewards    RewardModel protocol; ClassifierReward, ImageStatReward, CombinedReward
  metrics    diversity, attribute entropy, Frechet distance, W2 velocity bound, coefficient stats
  pretrain   conditional flow-matching pre-training of the DiT and training of the reward classifier (cached)
  plotting   sample grids as PNG

Models live in :mod:`adrpo_jax.models.dit` (velocity DiT) and :mod:`adrpo_jax.models.classifier`.
"""
