r"""GRPO / ADRPO on a GSM8K-style jsonl with a local Hugging Face checkpoint (``trainer='llm'``). ::

    python launch.py --config=configs/llm_gsm8k.py --workdir=/tmp/gsm8k_adrpo \
        --config.model.path=/models/Qwen2.5-0.5B-Instruct \
        --config.data.path=/data/gsm8k/train.jsonl --config.eval.path=/data/gsm8k/test.jsonl

The jsonl holds one ``{"question": ..., "answer": "... #### 72"}`` object per line (GSM8K's format; the reference
answer is what follows ``####``); other field names via ``data.prompt_key`` / ``data.answer_key``. Nothing is
downloaded: ``model.path``, ``data.path`` and ``eval.path`` are local, and a missing one fails at start naming
the key. The reward is 1 when the completion's last number equals the reference answer.

Variants:

* ``default``: a ~0.5B instruct model (e.g. Qwen2.5-0.5B-Instruct), chat template, 16 prompts x 8 completions,
  256 new tokens, 2 minibatches, bf16 compute with f32 parameters, ADRPO (beta_0 = 0.04).
* ``cpu``: the same pipeline small enough for a CPU smoke run: SmolLM2-135M-Instruct (``builtin:smollm2``, converted
  offline), 2 prompts x 4 completions, 48 new tokens, 5 steps.
"""

import ml_collections

from adrpo_jax.rl.config import add_llm_config
from adrpo_jax.train.config import add_common_config

VARIANTS = ("default", "cpu")

SYSTEM_PROMPT = "Solve the math problem step by step. End your answer with the final number on its own, e.g. '#### 42'."


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/llm_gsm8k.py; choose one of {VARIANTS}")
    config = add_llm_config(add_common_config(ml_collections.ConfigDict()))
    config.trainer = "llm"
    config.seed = 0
    config.total_steps = 500
    config.log_every = 5
    config.eval_every = 50
    config.checkpoint.every_steps = 50
    config.checkpoint.max_to_keep = 2

    config.model.path = ""  # required: a local HF directory (e.g. Qwen2.5-0.5B-Instruct)
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = True
    config.model.logprob_chunk_size = 1024
    config.data.source = "jsonl"
    config.data.path = ""  # required
    config.data.prompt_key = "question"
    config.data.answer_key = "answer"
    config.data.answer_format = "gsm8k"
    config.data.chat_template = True
    config.data.system_prompt = SYSTEM_PROMPT
    config.eval.path = ""  # required when eval_every > 0
    config.eval.num_examples = 256
    config.eval.accuracy_reward = "final_number"

    config.sampling.max_prompt_length = 256
    config.sampling.max_new_tokens = 256
    config.sampling.temperature = 1.0
    config.rl.num_prompts_per_step = 16
    config.rl.group_size = 8
    config.rl.num_minibatches = 2
    config.rl.num_iterations = 1
    config.rl.beta = 0.04
    config.rl.adaptive = True
    config.rl.mask_truncated_completions = False
    config.rewards.functions = ("final_number",)
    config.rewards.weights = (1.0,)
    config.optim.learning_rate = 1e-6
    config.optim.warmup_steps = 10
    config.optim.schedule = "constant"
    config.optim.grad_clip_norm = 1.0

    if variant == "cpu":
        config.model.path = "builtin:smollm2"
        config.model.dtype = "float32"
        config.model.remat = False
        config.model.logprob_chunk_size = 256
        config.sampling.max_prompt_length = 192
        config.sampling.max_new_tokens = 48
        config.rl.num_prompts_per_step = 2
        config.rl.group_size = 4
        config.rl.num_minibatches = 1
        config.optim.learning_rate = 2e-6
        config.optim.warmup_steps = 0
        config.eval.num_examples = 8
        config.total_steps = 5
        config.log_every = 1
        config.eval_every = 5
        config.checkpoint.every_steps = 5
    return config
