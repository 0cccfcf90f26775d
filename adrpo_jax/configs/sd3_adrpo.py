r"""ADRPO-W2 fine-tuning of Stable Diffusion 3 (MMDiT, latent flow matching) on text prompts with a CLIP-score
reward and LoRA (``trainer = adrpo_jax.flow.sd3_trainer``), the paper's flow experiment. ::

    # one GPU (H100 / A100 80 GB), weights in the diffusers layout on local disk:
    python launch.py --config=configs/sd3_adrpo.py:gpu --workdir=runs/sd3_adrpo \
        --config.model.path=/models/stable-diffusion-3-medium-diffusers/transformer \
        --config.vae.path=/models/stable-diffusion-3-medium-diffusers/vae \
        --config.text.path=/models/stable-diffusion-3-medium-diffusers \
        --config.reward.clip_path=/models/clip-vit-large-patch14 \
        --config.data.prompts_file=drawbench_train.txt --config.eval.prompts_file=drawbench_eval.txt
    # a TPU v5e-8 at 512 px (configs/sd3_adrpo.py:tpu) or a v6e-8 / v5p at 1024 px (:tpu_1024): the same paths;
    # check that it fits first, on any machine (the TPU compiler, no TPU and no weights needed):
    python launch.py --config=configs/sd3_adrpo.py:tpu --workdir=/tmp/plan --mode=plan --config.plan.target=v5e:2x4
    # CPU smoke run on tiny random models (built once under $ADRPO_JAX_CACHE):
    python launch.py --config=configs/sd3_adrpo.py:cpu --workdir=/tmp/sd3_tiny

Variants:

* ``gpu``: SD3-medium (``model.preset`` for plans; the checkpoint's shapes otherwise) at 1024 px on one 80 GB GPU;
  bfloat16 compute with cuDNN's fused attention (``model.attention_impl='cudnn'``), float32 master weights (the
  frozen base, the LoRA adapters and the optimizer state; ``model.param_dtype``), per-layer remat; 4 prompts x 4
  images per step, the update in 4 micro-batches of 4 images (``optim.grad_accum_steps``), the rollout 4 images
  (8 with CFG) at a time, the reward's VAE decode 2 at a time, eval calls of 8 images.
* ``tpu``: a TPU v5e-8 (8 chips x 16 GiB) at 512 px (flow_grpo's resolution): FSDP over the 8 chips
  (``mesh.fsdp=-1``), 8 prompts x 4 images per step, micro-batches of 8 images (one per chip) for the update,
  the rollout (two per chip with CFG), the decode and the eval.
* ``tpu_1024``: 1024 px on a v6e-8 (8 chips x 32 GiB) or a v5p (95 GiB per chip): as ``tpu``, one image per chip
  per micro-batch everywhere.
* all three: LoRA rank 16 on the attention projections and MLPs; 28 Euler steps on SD3's shifted schedule (shift
  3), CFG 4.5; training times logit-normal shifted like the sampler (``rl.time_shift``). ``model.path``,
  ``vae.path``, ``text.path`` and (reward ``clip``) ``reward.clip_path`` are required local directories to train:
  an empty or missing one stops the run at start naming the key (a plan takes the ``model.preset`` shapes).
  Prompt embeddings are computed once with ``transformers`` on the host (T5-XXL in ``text.torch_dtype``) and cached
  under ``$ADRPO_JAX_CACHE/prompt_embeddings``. ``data.height`` / ``data.width`` set another resolution (any
  multiple of 16, non-square allowed).
* ``cpu``: the same trainer on tiny random models (MMDiT 2 layers, 8 x 8 x 4 latents, VAE to 16 x 16 images,
  tiny CLIP/T5 text encoders and a tiny CLIP reward model) built once by ``python -m adrpo_jax.flow.sd3_tiny``
  (called automatically: ``model.tiny=True`` fills empty paths); float32; a few steps in about a minute on 2
  CPU cores. The reward is the tiny random CLIP's score (the plumbing, not a meaningful signal).

Every flow-trainer method runs on it: ``--config.rl.method=fixed_beta | orw_cfm_w2 | none``. With the CLIP score
in points (``reward.clip_scale=100``) the advantages are in points too: ``rl.beta`` (beta_0) clips them at +-beta_0
points (choose it near the typical within-prompt reward spread), and ORW-CFM-W2 uses standardized rewards in its
exponent (``rl.orw_reward_scaling``).
"""

import ml_collections

from adrpo_jax.flow.config import SD3_TRAINER as TRAINER
from adrpo_jax.flow.config import add_sd3_config
from adrpo_jax.train.config import add_common_config

VARIANTS = ("cpu", "gpu", "tpu", "tpu_1024")


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

    if variant in ("gpu", "tpu", "tpu_1024"):
        config.total_steps = 1000
        config.log_every = 1
        config.eval_every = 100
        config.checkpoint.every_steps = 50
        config.checkpoint.max_to_keep = 3
        config.model.preset = "sd3-medium"  # the shapes of a plan without model.path
        config.model.dtype = "bfloat16"
        config.model.param_dtype = "float32"  # float32 master weights (frozen base, adapters, optimizer)
        config.model.remat = True
        config.model.scan_layers = True  # one compiled block per run of equal blocks (compile time)
        config.model.save_dtype = "bfloat16"
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
        if variant == "gpu":  # one 80 GB GPU, 1024 px (the checkpoint's sample size)
            config.model.attention_impl = "cudnn"
            config.optim.grad_accum_steps = 4
            config.rl.rollout_micro_batch = 4
            config.vae.decode_batch = 2
            config.eval.batch_size = 8
        else:  # 8 chips: one image per chip per micro-batch
            config.rl.prompts_per_step = 8
            config.optim.grad_accum_steps = 4
            config.rl.rollout_micro_batch = 8
            config.vae.decode_batch = 8
            config.eval.batch_size = 8 if variant == "tpu_1024" else 16
            config.data.height = config.data.width = 512 if variant == "tpu" else 1024
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
