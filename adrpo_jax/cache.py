"""Where the project caches what it builds once (the tiny SFT model, the pre-trained DiT and classifier, the
offline SmolLM2 conversion): ``$ADRPO_JAX_CACHE``, else ``~/.cache/adrpo_jax``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$ADRPO_JAX_CACHE`` (``~`` expanded) or ``~/.cache/adrpo_jax``; not created here."""
    root = os.environ.get("ADRPO_JAX_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "adrpo_jax"
