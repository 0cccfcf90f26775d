"""``--config=configs/llm_gsm8k.py[:variant]``: the packaged config ``adrpo_jax/configs/llm_gsm8k.py``, re-exported
so that the checkout's commands keep working (``--config=llm_gsm8k[:variant]`` names it from any directory)."""

from adrpo_jax.configs.llm_gsm8k import SYSTEM_PROMPT, VARIANTS, get_config

__all__ = ["SYSTEM_PROMPT", "VARIANTS", "get_config"]
