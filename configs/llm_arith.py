"""``--config=configs/llm_arith.py[:variant]``: the packaged config ``adrpo_jax/configs/llm_arith.py``, re-exported
so that the checkout's commands keep working (``--config=llm_arith[:variant]`` names it from any directory)."""

from adrpo_jax.configs.llm_arith import VARIANTS, get_config

__all__ = ["VARIANTS", "get_config"]
