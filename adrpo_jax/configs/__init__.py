r"""The experiment configs, shipped with the package: ``--config=NAME[:variant]`` names one of them. ::

    adrpo-jax train --config=llm_arith:cpu --workdir=/tmp/arith      # the packaged adrpo_jax/configs/llm_arith.py
    python -m adrpo_jax.launch --config=flow_digits:cpu --workdir=/tmp/flow --mode=train
    python launch.py --config=configs/llm_arith.py:cpu --workdir=/tmp/arith   # a checkout: configs/ re-exports these

Each module defines ``get_config(arg) -> ml_collections.ConfigDict`` (``arg``: the text after ``:``, a variant
name) and, where it has variants, ``VARIANTS``. A config module imports no jax (loading a config is fast and
works without an accelerator). A path (``--config=path/to/my_config.py:variant``) works as well: copy one of
these files (:func:`config_path` prints where they are) as the start of your own.

======================  ==================================================================================
name                    what it trains
======================  ==================================================================================
``llm_arith``           GRPO / ADRPO on the built-in arithmetic task (tiny char-level model; SmolLM2; TPU)
``llm_gsm8k``           GRPO / ADRPO on a GSM8K-style jsonl with a local Hugging Face checkpoint
``llm_pod``             Qwen2.5-7B, Qwen3-8B, Qwen3-30B-A3B, Gemma 3 on TPU pod slices (``--mode=plan``)
``flow_digits``         ADRPO-W2 fine-tuning of a flow-matching DiT on digits
``sd3_adrpo``           ADRPO-W2 fine-tuning of Stable Diffusion 3 with a CLIP reward and LoRA
``audio_arith``         GRPO / ADRPO with an audio LLM (Qwen2-Audio / Qwen2.5-Omni thinker)
======================  ==================================================================================
"""

from __future__ import annotations

import os

__all__ = ["NAMES", "config_path"]

#: The packaged configs, by the name ``--config=NAME[:variant]`` takes.
NAMES = ("llm_arith", "llm_gsm8k", "llm_pod", "flow_digits", "sd3_adrpo", "audio_arith")


def config_path(name: str) -> str:
    """The file of the packaged config ``name`` (one of :data:`NAMES`); a ``ValueError`` naming them otherwise.

    >>> os.path.basename(config_path("llm_arith"))
    'llm_arith.py'
    """
    if name not in NAMES:
        raise ValueError(f"no packaged config named {name!r}; the packaged configs are {', '.join(NAMES)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
