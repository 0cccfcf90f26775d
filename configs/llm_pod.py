"""``--config=configs/llm_pod.py[:variant]``: the packaged config ``adrpo_jax/configs/llm_pod.py``, re-exported
so that the checkout's commands keep working (``--config=llm_pod[:variant]`` names it from any directory)."""

from adrpo_jax.configs.llm_pod import MODELS, SYSTEM_PROMPT, get_config

__all__ = ["MODELS", "SYSTEM_PROMPT", "get_config"]
