r"""ADRPO-W2 fine-tuning of Stable Diffusion 3 (MMDiT, latent flow matching) on text prompts with a CLIP-score
reward and LoRA (``trainer = adrpo_jax.flow.sd3_trainer``), the paper's flow experiment.

    # one GPU (H100 / A100 80 GB), weights in the diffusers layout on local disk:
    python launch.py --config=configs/sd3_adrpo.py:gpu --workdir=runs/sd3_adrpo \
        --config.model.path=/models/stable-diffusion-3-medium-diffusers/transformer \
        --config.vae.path=/models/stable-diffusion-3-medium-diffusers/vae \
        --config.text.path=/models/stable-diffusion-3-medium-diffusers \
        --config.reward.clip_path=/models/clip-vit-large-patch14
    # a TPU v5e-8 (or any slice: mesh.fsdp=-1 takes the rest): the same paths, configs/sd3_adrpo.py:tpu
    # CPU smoke run on tiny random models (built once under $ADRPO_JAX_CACHE):
    python launch.py --config=configs/sd3_adrpo.py:cpu --workdir=/tmp/sd3_tiny

Variants:

* ``gpu`` / ``tpu``: SD3-medium shapes from the checkpoint; bfloat16 compute, float32 master weights (the frozen
  base, the LoRA adapters and the optimizer state; ``model.param_dtype``), FSDP over
  the devices (``mesh.fsdp=-1``; ``tpu`` adds data parallelism across slices via ``mesh.data``), per-layer
  remat, LoRA rank 16 on the attention projections and MLPs; 28 Euler steps on SD3's shifted schedule (shift
  3), CFG 4.5; 4 prompts x 4 images per step (``gpu``), 8 x 4 (``tpu``). ``model.path``, ``vae.path``,
  ``text.path`` and (reward ``clip``) ``reward.clip_path`` are required local directories: an empty or missing
  one stops the run at start naming the key. Prompt embeddings are computed once with ``transformers`` on the
  host (T5-XXL in ``text.torch_dtype``) and cached under ``$ADRPO_JAX_CACHE/prompt_embeddings``.
* ``cpu``: the same trainer on tiny random models (MMDiT 2 layers, 8 x 8 x 4 latents, VAE to 16 x 16 images,
  tiny CLIP/T5 text encoders and a tiny CLIP reward model) built once by ``python -m adrpo_jax.flow.sd3_tiny``
  (called automatically: ``model.tiny=True`` fills empty paths); float32; a few steps in about a minute on 2
  CPU cores. The reward is the tiny random CLIP's score (the plumbing, not a meaningful signal).

Every flow-trainer method runs on it: ``--config.rl.method=fixed_beta | orw_cfm_w2 | none``.
"""

import ml_collections

from adrpo_jax.flow.config import SD3_TRAINER as TRAINER, add_sd3_config
from adrpo_jax.train.config import add_common_config

VARIANTS = ("cpu", "gpu", "tpu")


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    variant = arg or "cpu"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/sd3_adrpo.py; choose one of {VARIANTS}")
    config = add_sd3_config(add_common_config(ml_collections.ConfigDict()))
    config.trainer = TRAINER  # adrpo_jax.flow.sd3_trainer:train_and_evaluate
    config.seed = 0
    config.optim.name = "adam"
    config.optim.schedule = "constant"  # independent of total_steps: extending a run resumes bit-identically
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 1.0
    config.optim.learning_rate = 1e-4

    config.rl.method = "adrpo"
    config.rl.beta = 1.0
    config.rl.adv_clip = "multiple"
    config.rl.adv_clip_multiple = 1.0
    config.rl.time_sampling = "logit_normal"
    config.sampling.method = "euler"
    config.sampling.time_shift = 3.0
    config.lora.enabled = True
    config.lora.rank = 16
    config.lora.alpha = 16.0

    if variant in ("gpu", "tpu"):
        config.total_steps = 1000
        config.log_every = 1
        config.eval_every = 100
        config.checkpoint.every_steps = 50
        config.checkpoint.max_to_keep = 3
        config.model.dtype = "bfloat16"
        config.model.param_dtype = "float32"  # float32 master weights (frozen base, adapters, optimizer)
        config.model.remat = True
        config.mesh.data = 1
        config.mesh.fsdp = -1
        config.text.max_sequence_length = 256
        config.text.torch_dtype = "bfloat16"
        config.reward.kind = "clip"
        config.sampling.num_steps = 28
        config.sampling.cfg_scale = 4.5
        config.rl.prompts_per_step = 4
        config.rl.samples_per_prompt = 4
        config.eval.samples_per_prompt = 2
        if variant == "tpu":
            config.rl.prompts_per_step = 8
        return config

    # -- cpu: tiny random models, float32 ---------------------------------------------------------------------
    config.model.tiny = True
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.mesh.data = -1
    config.total_steps = 6
    config.log_every = 1
    config.eval_every = 3
    config.checkpoint.every_steps = 3
    config.checkpoint.max_to_keep = 2
    config.optim.learning_rate = 1e-3
    config.data.prompts = ("a red cube", "a cat on a sofa", "a yellow bird", "a snowy mountain")
    config.text.max_sequence_length = 16
    config.reward.kind = "clip"
    config.reward.clip_clamp = False  # a random CLIP's cosines are often negative: keep the signal
    config.sampling.num_steps = 4
    config.sampling.cfg_scale = 2.0
    config.rl.prompts_per_step = 2
    config.rl.samples_per_prompt = 4
    config.eval.samples_per_prompt = 2
    config.lora.rank = 4
    config.lora.alpha = 4.0
    return config
