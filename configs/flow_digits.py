"""``--config=configs/flow_digits.py[:variant]``: the packaged config ``adrpo_jax/configs/flow_digits.py``, re-exported
so that the checkout's commands keep working (``--config=flow_digits[:variant]`` names it from any directory)."""

from adrpo_jax.configs.flow_digits import VARIANTS, get_config

__all__ = ["VARIANTS", "get_config"]
