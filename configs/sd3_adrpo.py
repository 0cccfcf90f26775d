"""``--config=configs/sd3_adrpo.py[:variant]``: the packaged config ``adrpo_jax/configs/sd3_adrpo.py``, re-exported
so that the checkout's commands keep working (``--config=sd3_adrpo[:variant]`` names it from any directory)."""

from adrpo_jax.configs.sd3_adrpo import VARIANTS, get_config

__all__ = ["VARIANTS", "get_config"]
