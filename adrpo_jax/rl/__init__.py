"""Online GRPO / ADRPO training of language models (tasks, prompt data, reward functions, trainer)."""
