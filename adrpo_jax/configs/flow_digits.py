r"""ADRPO-W2 online fine-tuning of a flow-matching DiT on digits (``trainer='flow'``). ::

    python launch.py --config=configs/flow_digits.py:cpu --workdir=/tmp/flow_adrpo [--config.total_steps=N]
    python launch.py --config=configs/flow_digits.py:cpu_fixed_beta --workdir=/tmp/flow_fixed --config.rl.beta=0.3

The task: composite "attribute binding" prompts (``data.condition_mode='digit_thickness'``: 20 prompts such as
"3 thick", "7 thin"); the reward is the log-probability of the prompted digit and of the prompted stroke
thickness under the project's classifier. The pre-trained DiT (0.33M parameters, 8x8, pre-trained by
conditional flow matching for ~3 minutes on the first run and cached) binds the thickness imperfectly, which
leaves the reward headroom.

Variants (the same run, only the objective differs; docs/math.md, "Flow matching"):

* ``cpu`` (default): ADRPO-W2, ``A ||v - u||^2 + (beta_0 - clip(A)) ||v - v_ref||^2`` with beta_0 = 1 and A
  clipped at +-beta_0 inside the coefficient. A few minutes on 2 CPU cores; the reward rises clearly.
* ``cpu_fixed_beta``: ``A ||v - u||^2 + beta_0 ||v - v_ref||^2`` (adaptation off).
* ``cpu_orw``: ORW-CFM-W2, ``exp(tau r) ||v - u||^2 + alpha ||v - v_ref||^2`` (tau 0.5, alpha 1; raw weights),
  sampling from a copy of the policy refreshed every 10 steps (ORW's "copy refreshed every epoch").
* ``cpu_none``: ``A ||v - u||^2``, no regularization.
* ``cpu_lora``: ADRPO-W2 training only LoRA adapters (rank 8, alpha 16) on the DiT's attention projections and
  MLPs (``lora.target_modules``); the W2 reference is the same DiT with the adapters off; checkpoints hold the
  adapters, ``model.save_final`` writes the merged DiT. A higher learning rate (2e-3), as usual for adapters.
* ``gpu`` / ``tpu``: templates for accelerators: 16x16 images, a larger DiT (hidden 256, depth 8, patch 2),
  bfloat16 compute with float32 parameters, an FSDP mesh (``mesh.fsdp=-1``), 32 prompts x 16 samples.

Every key can be overridden, e.g. ``--config.rl.beta=0.3``, ``--config.rl.adv_clip=none``,
``--config.reward.kind=combined --config.reward.image_stat=mean_ink`` (a hackable ink bonus),
``--config.rl.ref_refresh_steps=50 --config.rl.ref_refresh_alpha=0.1``.
"""

import ml_collections

from adrpo_jax.flow.config import add_flow_config
from adrpo_jax.train.config import add_common_config

VARIANTS = ("cpu", "cpu_fixed_beta", "cpu_orw", "cpu_none", "cpu_lora", "gpu", "tpu")


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    variant = arg or "cpu"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/flow_digits.py; choose one of {VARIANTS}")
    config = add_flow_config(add_common_config(ml_collections.ConfigDict()))
    config.trainer = "flow"
    config.seed = 0

    # -- the CPU demo: ADRPO-W2 on composite digit+thickness prompts ----------------------------------------
    config.total_steps = 120
    config.log_every = 10
    config.eval_every = 40
    config.checkpoint.every_steps = 40
    config.checkpoint.max_to_keep = 2
    config.mesh.data = -1
    config.optim.name = "adam"
    config.optim.learning_rate = 5e-4
    config.optim.schedule = "constant"  # independent of total_steps: extending a run resumes bit-identically
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 1.0

    config.data.image_size = 8
    config.data.condition_mode = "digit_thickness"
    config.reward.kind = "classifier"
    config.reward.classifier_output = "log_prob"
    config.reward.thickness_weight = 1.0

    config.rl.method = "adrpo"
    config.rl.beta = 1.0
    config.rl.adv_clip = "multiple"
    config.rl.adv_clip_multiple = 1.0
    config.rl.prompts_per_step = 10
    config.rl.samples_per_prompt = 8
    config.rl.num_inner_updates = 1
    config.sampling.method = "heun"
    config.sampling.num_steps = 8
    config.sampling.cfg_scale = 1.0
    config.eval.samples_per_prompt = 32  # 640 eval images: the Frechet distance needs N >> 128 features

    if variant == "cpu_fixed_beta":
        config.rl.method = "fixed_beta"
    elif variant == "cpu_orw":
        config.rl.method = "orw_cfm_w2"
        config.rl.tau = 0.5
        config.rl.alpha = 1.0
        config.rl.sampler_refresh_steps = 10
    elif variant == "cpu_none":
        config.rl.method = "none"
    elif variant == "cpu_lora":
        config.lora.enabled = True
        config.lora.rank = 8
        config.lora.alpha = 16.0
        config.optim.learning_rate = 2e-3
    elif variant in ("gpu", "tpu"):
        config.data.image_size = 16
        config.model.patch_size = 2
        config.model.hidden = 256
        config.model.depth = 8
        config.model.heads = 8
        config.model.dtype = "bfloat16"
        config.model.param_dtype = "float32"
        config.pretrain.steps = 20000
        config.pretrain.batch_size = 256
        config.pretrain.learning_rate = 5e-4
        config.pretrain.warmup_steps = 1000
        config.classifier.steps = 2000
        config.mesh.data = 1
        config.mesh.fsdp = -1
        config.optim.learning_rate = 2e-4
        config.rl.prompts_per_step = 32
        config.rl.samples_per_prompt = 16
        config.rl.num_inner_updates = 2
        config.sampling.num_steps = 20
        config.eval.samples_per_prompt = 16
        config.total_steps = 2000
        config.log_every = 10
        config.eval_every = 200
        config.checkpoint.every_steps = 200
    return config
