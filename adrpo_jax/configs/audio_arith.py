r"""GRPO / ADRPO on spoken questions with an audio LLM (``adrpo_jax.rl.audio_trainer``). ::

    python launch.py --config=configs/audio_arith.py:cpu --workdir=/tmp/audio_adrpo
    python launch.py --config=configs/audio_arith.py:cpu_grpo --workdir=/tmp/audio_grpo
    python launch.py --config=configs/audio_arith.py:gpu --workdir=/tmp/omni_avqa \
        --config.model.path=/data/Qwen2.5-Omni-7B --config.data.path=/data/avqa_train.jsonl \
        --config.eval.path=/data/mmau_test_mini.jsonl

Variants:

* ``cpu`` (default): ADRPO on the built-in spoken-arithmetic task ("what is seven plus two", synthesized by
  espeak-ng + sox, cached; the numpy beep-counting task without them) with ``builtin:tiny_audio_arith``: a tiny
  random Qwen2-Audio-shaped model supervised briefly to a weak sampled accuracy, then cached. The encoder is
  frozen during RL; exact-match + format reward. Minutes on 2 CPU cores.
* ``cpu_grpo``: the same with a fixed KL coefficient (``rl.adaptive=False``).
* ``gpu``: Qwen2.5-Omni-7B (thinker) + LoRA r=16 on one 80 GB GPU (``--mode=plan``: its programs compiled for one H100):
  AVQA / MMAU-format jsonl (``{"audio", "question", "choices", "answer"}``) with the chat template, 30 s
  windows, multiple-choice accuracy + ``<think>/<answer>`` format reward. Needs local weights
  (``--config.model.path``) and data (``--config.data.path``, optional ``--config.eval.path``): nothing is
  downloaded; a missing path is a clear error.
* ``tpu``: the same on a TPU v5e-8 (``mesh.fsdp=8``: weights sharded by their logical axis names).
"""

import ml_collections

from adrpo_jax.rl.config import add_audio_config, add_llm_config
from adrpo_jax.train.config import add_common_config

VARIANTS = ("cpu", "cpu_grpo", "gpu", "tpu")


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    variant = arg or "cpu"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/audio_arith.py; choose one of {VARIANTS}")
    config = add_audio_config(add_llm_config(add_common_config(ml_collections.ConfigDict())))
    config.trainer = "adrpo_jax.rl.audio_trainer:train_and_evaluate"  # = the recipe name "audio"
    config.seed = 0

    # -- the CPU demo: ADRPO on the tiny supervised audio model ---------------------------------------------
    config.total_steps = 200
    config.log_every = 10
    config.eval_every = 50
    config.checkpoint.every_steps = 50
    config.checkpoint.max_to_keep = 2
    config.mesh.data = -1
    config.optim.name = "adamw"
    config.optim.learning_rate = 3e-4
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 1.0
    config.optim.b2 = 0.99

    config.model.path = "builtin:tiny_audio_arith"
    config.model.save_final = False
    config.audio.task = "auto"
    config.audio.seconds = 2.5
    config.audio.n_mels = 80
    config.audio.audio_token = "@"
    config.audio.audio_template = "{audio}"
    config.audio.min_value = 0
    config.audio.max_value = 4  # 25 spoken problems: learnable by the tiny model
    config.audio.operations = "+"
    config.sampling.max_prompt_length = 64  # <= 62 audio tokens for 2.5 s + '='
    config.sampling.max_new_tokens = 4
    config.sampling.temperature = 1.0

    config.rl.num_prompts_per_step = 16
    config.rl.group_size = 8
    config.rl.beta = 0.04
    config.rl.adaptive = True
    config.rl.adv_clip = "multiple"
    config.rl.adv_clip_multiple = 1.0
    config.rewards.functions = ("exact_match", "format")
    config.rewards.weights = (1.0, 0.1)
    config.eval.num_examples = 128
    config.eval.accuracy_reward = "exact_match"

    if variant == "cpu_grpo":
        config.rl.adaptive = False

    elif variant in ("gpu", "tpu"):
        # A shape preset (--mode=plan needs no weights); to train: --config.model.path=/path/to/Qwen2.5-Omni-7B
        config.model.path = "preset:qwen2.5-omni-7b"
        config.model.dtype = "bfloat16"
        config.model.param_dtype = "bfloat16"
        config.model.remat = True
        config.model.logprob_chunk_size = 256
        config.audio.task = "jsonl"  # --config.data.path=/path/to/avqa_train.jsonl
        config.audio.seconds = 30.0
        config.audio.n_mels = 128
        config.audio.audio_token = "<|AUDIO|>"
        config.audio.audio_template = "<|audio_bos|>{audio}<|audio_eos|>"
        config.data.chat_template = True
        config.data.system_prompt = (
            "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, "
            "capable of perceiving auditory and visual inputs, as well as generating text "
            "and speech."
        )
        config.lora.enabled = True
        config.lora.rank = 16
        config.lora.alpha = 32.0
        config.sampling.max_prompt_length = 1024  # <= 750 audio tokens (30 s) + question + template
        config.sampling.max_new_tokens = 256
        config.sampling.temperature = 1.0
        config.rl.num_prompts_per_step = 8
        config.rl.group_size = 8
        config.rl.num_minibatches = 4
        config.optim.grad_accum_steps = 4
        config.optim.learning_rate = 1e-6
        config.optim.warmup_steps = 10
        # The answer is the option's text inside <answer>, scored as MMAU's own evaluation scores it (the number
        # the paper compares against); audio.choice_format='letter' + 'choice_accuracy' is the letter variant.
        config.audio.choice_format = "text"
        config.rewards.functions = ("mmau_accuracy", "answer_format")
        config.rewards.weights = (1.0, 0.5)
        config.eval.accuracy_reward = "mmau_accuracy"
        config.eval.num_examples = 1000  # MMAU test-mini
        config.total_steps = 1000
        config.log_every = 5
        config.eval_every = 100
        config.checkpoint.every_steps = 50
        if variant == "gpu":
            config.eval.batch_size = 50  # prompts per eval generate: the largest that fits the plan (1000 = 20 chunks)
            config.plan.target = "h100:1"  # XLA's GPU compiler for one H100, without a GPU (deviceless)
        if variant == "tpu":
            config.mesh.data = 1
            config.mesh.fsdp = 8  # weights, adapters and optimizer state sharded 8 ways
            config.rl.num_prompts_per_step = 16
            config.eval.batch_size = 40  # 5 prompts per chip per eval generate (1000 = 25 chunks)
            config.plan.target = "v5e:2x4"
    return config
