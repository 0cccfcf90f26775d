"""Tiny random Hugging Face models of the MoE and Gemma families (torch, CPU), built once per process.

Weights are re-drawn with a larger scale than HF's init so that logits, attention patterns and routing are not
trivial (router logits spread over several units, so no near-tie between the k-th and the (k+1)-th expert), norms
away from their identity value, so every path (q/k norms, sandwich norms, the shared expert's gate) matters.

  qwen3_moe   8 experts, top 2, norm_topk_prob, q/k norm, head_dim 16 != hidden/heads, 2 sparse layers (scan)
  qwen2_moe   6 experts, top 2, shared expert + sigmoid gate, q/k/v bias, mlp_only_layers=[1] (a dense layer
              between sparse ones: the list layout)
  gemma2      attention soft-cap 5, final soft-cap 3 (both active at this weight scale), query_pre_attn_scalar 24,
              alternating sliding (window 4) / global layers, tied embeddings
  gemma3      q/k norms, sliding_window_pattern 2 (window 4), rope 1e6 with linear scaling x4 on the global layers,
              local rope 1e4 on the sliding ones, tied embeddings
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

VOCAB = 160
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(name: str):
  import transformers

  if name == "qwen3_moe":
    return transformers.Qwen3MoeConfig(**_COMMON, num_hidden_layers=2, head_dim=16, num_experts=8,
                                       num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
  if name == "qwen2_moe":
    return transformers.Qwen2MoeConfig(**_COMMON, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                                       moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                       mlp_only_layers=[1])
  if name == "gemma2":
    return transformers.Gemma2Config(**_COMMON, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24,
                                     sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
  if name == "gemma3":
    return transformers.Gemma3TextConfig(**_COMMON, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24,
                                         sliding_window=4, sliding_window_pattern=2, rope_theta=1e6,
                                         rope_local_base_freq=1e4,
                                         rope_scaling={"rope_type": "linear", "factor": 4.0})
  raise KeyError(name)


@dataclasses.dataclass
class TinyHF:
  name: str
  path: Path
  torch_model: object


_ROOT = Path(tempfile.mkdtemp(prefix="adrpo_families_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def tiny_hf(name: str, seed: int = 0) -> TinyHF:
  """A tiny random HF model of family `name`, saved to a temporary directory (cached per process)."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(name)).eval()
  gemma = name.startswith("gemma")
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):
        p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))  # Gemma norms scale by (1 + w)
      elif pname.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) * 1.5)
  path = _ROOT / f"{name}_{seed}"
  model.save_pretrained(str(path))
  return TinyHF(name, path, model)


def padded_batch(rows: int = 3, length: int = 12, seed: int = 0):
  """Left-padded tokens [rows, length] and mask (rows with 4, 1 and 0 padding slots)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, (rows, length)).astype(np.int32)
  mask = np.ones((rows, length), bool)
  mask[0, :4] = False
  if rows > 1:
    mask[1, :1] = False
  tokens[~mask] = 0
  return tokens, mask


def hf_logits(tiny: TinyHF, tokens, mask):
  """Reference logits with HF's generate-time position convention (cumsum(mask) - 1, clipped at 0)."""
  import torch

  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = tiny.torch_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                           attention_mask=torch.tensor(mask.astype(np.int64)),
                           position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def hf_greedy(tiny: TinyHF, tokens, mask, n: int):
  """HF greedy continuation [rows, n] of left-padded prompts (no EOS stop: eos_token_id=-1 never matches)."""
  import torch

  with torch.no_grad():
    out = tiny.torch_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                    attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[:, tokens.shape[1]:].numpy()


def hf_state(tiny: TinyHF) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in tiny.torch_model.state_dict().items()}
