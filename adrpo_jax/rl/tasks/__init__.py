"""Built-in verifiable tasks for RL fine-tuning of language models."""

from adrpo_jax.rl.tasks.arithmetic import (
    ArithmeticTask,
    build_char_tokenizer,
    exact_match_reward,
    final_number_reward,
    format_reward,
    parse_final_number,
)

__all__ = [
    "ArithmeticTask",
    "build_char_tokenizer",
    "exact_match_reward",
    "final_number_reward",
    "format_reward",
    "parse_final_number",
]
