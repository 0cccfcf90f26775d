"""ADRPO-W2 for flow-matching models: the digits data, samplers, rewards, metrics and pre-training.

Submodules (imported on demand; this package imports nothing heavy):

  data       sklearn digits in [-1, 1] NHWC, deterministic split, thickness attribute, condition ids
  sampling   jitted fixed-step Euler / Heun / midpoint ODE (and Euler-Maruyama SDE) samplers with CFG
  rewards    RewardModel protocol; ClassifierReward, ImageStatReward, CombinedReward
  metrics    diversity, attribute entropy, Frechet distance, W2 velocity bound, coefficient stats
  pretrain   conditional flow-matching pre-training of the DiT and training of the reward classifier (cached)
  plotting   sample grids as PNG
  config     the trainer's config sections (data, model, pretrain, classifier, reward, rl, sampling, eval, lora)
             and their validation
  step       the jitted, shard_map-parallel RL step (rollout, rewards, advantages, ADRPO-W2 / baseline loss)
  trainer    FlowTrainer / train_and_evaluate (registry name 'flow'; launch.py --config=configs/flow_digits.py)

Models live in :mod:`adrpo_jax.models.dit` (velocity DiT) and :mod:`adrpo_jax.models.classifier`.
"""
