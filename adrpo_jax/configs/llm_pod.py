r"""GRPO / ADRPO on GSM8K-style math with the models RL users train on TPU pod slices: Qwen2.5-7B-Instruct,
Qwen3-8B, Qwen3-30B-A3B (mixture of experts, expert-parallel, router replay) and Gemma 3 12B / 27B. ::

    python launch.py --config=configs/llm_pod.py:qwen2.5-7b,lora --workdir=runs/qwen7b_lora \
        --config.model.path=/models/Qwen2.5-7B-Instruct \
        --config.data.path=/data/gsm8k/train.jsonl --config.eval.path=/data/gsm8k/test.jsonl
    python launch.py --config=configs/llm_pod.py:qwen3-8b,full,4k --workdir=/tmp/plan --mode=plan \
        --config.plan.target=v6e:2x4          # every program compiled for a v6e-8, no weights, no data

The argument is a comma-separated list: the model (``qwen2.5-7b`` | ``qwen3-8b`` | ``qwen3-30b-a3b`` |
``gemma-3-12b`` | ``gemma-3-27b``), optionally the slice (``v5p``: a v5p-8, the default; ``v6e``: a v6e-8, 4k
rollouts with 8 prompts per step, full fine-tuning in micro-batches of one row per chip), the trained part (``lora``:
rank-64 adapters on every projection, the frozen base in bfloat16, the reference = adapters off; ``full``: every
weight, float32 master weights + AdamW, a frozen bfloat16 reference copy), and the completion budget (``1k``:
1,024 tokens; ``4k``: 4,096). G = 8 completions of 16 prompts per step (128 sequences; Gemma: 8 prompts),
prompts up to 512 tokens, ADRPO's adaptive KL (beta_0 = 0.04). ``model.path`` defaults to the model's shape preset
(``preset:qwen2.5-7b``: shapes only, for ``--mode=plan``); to train, point it at the local checkpoint.

The mixture of experts (``qwen3-30b-a3b``, 128 experts, top-8): the experts sharded over an ``expert`` mesh axis of
8 (tokens exchanged by all-to-all, dropless grouped matmuls: ``jax.lax.ragged_dot`` on TPU), FSDP over the rest,
``rl.router_replay='rollout'`` (the training passes route each token with the experts the sampler used: without it
the policy ratio compares different sub-networks), planned on a v5p-16 (``v5p:2x2x4``). Gemma 3 (256k vocabulary
through the chunked log-probs, soft-capping-free, local / global attention layers) on a v6e-8.

Sharding: FSDP over every chip of the slice (``mesh.fsdp = -1``), the update in micro-batches
(``optim.grad_accum_steps``) with activation rematerialization, log-probs in vocabulary chunks; the plans under
``benchmarks/plans/`` show what each variant holds per chip on v5p-8 and v6e-8 (``README.md``, "What fits where").
"""

from __future__ import annotations

import ml_collections

from adrpo_jax.rl.config import add_llm_config
from adrpo_jax.train.config import add_common_config

MODELS = {
    "qwen2.5-7b": "preset:qwen2.5-7b",
    "qwen3-8b": "preset:qwen3-8b",
    "qwen3-30b-a3b": "preset:qwen3-30b-a3b",
    "gemma-3-12b": "preset:gemma-3-12b",
    "gemma-3-27b": "preset:gemma-3-27b",
}
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The Assistant reasons step by step inside <think> "
    "</think> and then gives the final answer as a number inside <answer> </answer>."
)


# The pod slice a recipe is sized for (plan.target): v5p-8 by default (95 GiB per chip); on a v6e-8 (32 GiB per chip)
# the 4k rollouts take 8 prompts per step (the plan: the decode's KV cache of 16 prompts x G = 8 at 4,608 slots does
# not fit next to the weights).
SLICES = {"v5p": "v5p:2x2x2", "v6e": "v6e:2x4"}


def get_config(arg: str = "qwen2.5-7b,lora") -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (arg or "qwen2.5-7b,lora").split(",") if p.strip()]
    model = next((p for p in parts if p in MODELS), "qwen2.5-7b")
    mode = "full" if "full" in parts else "lora"
    length = 4096 if "4k" in parts else 1024
    slice_ = next((p for p in parts if p in SLICES), "")
    unknown = [p for p in parts if p not in MODELS and p not in ("lora", "full", "1k", "4k") and p not in SLICES]
    if unknown:
        raise ValueError(
            f"unknown parts {unknown} of configs/llm_pod.py:{arg}; use <{'|'.join(MODELS)}>,<lora|full>,<1k|4k>"
            f"[,<{'|'.join(SLICES)}>]"
        )
    config = add_llm_config(add_common_config(ml_collections.ConfigDict()))
    config.trainer = "llm"
    config.seed = 0
    config.total_steps = 500
    config.log_every = 5
    config.eval_every = 50
    config.checkpoint.every_steps = 50
    config.checkpoint.max_to_keep = 2

    config.model.path = MODELS[model]  # a shape preset: replace with the local checkpoint directory to train
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16" if mode == "lora" else "float32"
    config.model.remat = True
    config.model.logprob_chunk_size = 4096
    config.model.attention_impl = "auto"
    config.data.source = "jsonl"
    config.data.path = ""  # required to train: a local jsonl of {question, answer}
    config.data.prompt_key = "question"
    config.data.answer_key = "answer"
    config.data.answer_format = "gsm8k"
    config.data.chat_template = True
    config.data.system_prompt = SYSTEM_PROMPT
    config.eval.path = ""  # required to train with eval_every > 0
    config.eval.num_examples = 256
    config.eval.batch_size = 128
    config.eval.accuracy_reward = "final_number"

    config.sampling.max_prompt_length = 512
    config.sampling.max_new_tokens = length
    config.sampling.temperature = 1.0
    config.rl.num_prompts_per_step = 16
    config.rl.group_size = 8
    config.rl.num_minibatches = 1
    config.rl.num_iterations = 1
    config.rl.beta = 0.04
    config.rl.adaptive = True
    config.rewards.functions = ("final_number",)
    config.rewards.weights = (1.0,)
    config.optim.learning_rate = 1e-5 if mode == "lora" else 1e-6
    config.optim.warmup_steps = 10
    config.optim.schedule = "constant"
    config.optim.grad_clip_norm = 1.0
    config.optim.grad_accum_steps = 8 if length == 4096 else 4
    config.lora.enabled = mode == "lora"
    config.lora.rank = 64
    config.lora.alpha = 64.0
    config.lora.target_modules = ("all-linear",)

    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.plan.target = "v5p:2x2x2"
    if model == "qwen3-30b-a3b":
        config.mesh.expert = 8  # 16 of the 128 experts per chip; tokens exchanged by all-to-all
        config.rl.router_replay = "rollout"
        config.plan.target = "v5p:2x2x4"  # a v5p-16 (two hosts)
    elif slice_ == "v6e" or model.startswith("gemma"):
        config.plan.target = "v6e:2x4"
        if length == 4096:
            config.rl.num_prompts_per_step = 8
            if mode == "full":  # one row per chip per micro-batch, Adam's first moment in bfloat16, eval in
                # halves (the plan, Qwen3-8B: update 28.84 GiB of 28.80 with a float32 moment, at 512 or 1,024
                # log-prob positions alike; eval/generate 33.2 GiB at 128 rows, 23.0 at 64)
                config.optim.mu_dtype = "bfloat16"
                config.model.logprob_chunk_size = 1024
                config.eval.batch_size = 64
        elif mode == "full":
            # Full fine-tuning of an 8B on 32 GiB chips: micro-batches of one row per chip (the plan: Qwen3-8B's
            # update needs 35.8 GiB at 4 micro-batches, 27.8 GiB at 16, against 28.8 GiB with the 10 % margin).
            config.optim.grad_accum_steps = 16
    if model.startswith("gemma"):
        # The decode's KV cache (12B: 48 layers x 8 kv heads of 256) at 128 rows x 1,536 slots does not fit a 32 GiB
        # v6e chip next to the weights (the plan: 30.8 GiB at 16 prompts); 8 prompts x G = 8 does (18.5 GiB).
        config.rl.num_prompts_per_step = 8
        config.data.system_prompt = ""  # Gemma's chat template has no system role (folded into the user turn)
    return config
