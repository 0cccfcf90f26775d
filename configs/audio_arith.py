"""``--config=configs/audio_arith.py[:variant]``: the packaged config ``adrpo_jax/configs/audio_arith.py``, re-exported
so that the checkout's commands keep working (``--config=audio_arith[:variant]`` names it from any directory)."""

from adrpo_jax.configs.audio_arith import VARIANTS, get_config

__all__ = ["VARIANTS", "get_config"]
