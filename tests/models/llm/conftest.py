"""Session fixtures: tiny random Hugging Face models (torch, CPU), saved once per test session.

Variants cover the features the parity tests must see:
  llama       GQA 4/2, llama3 rope scaling, untied embeddings
  qwen2       q/k/v bias, tied embeddings, sliding-window attention on layer 1 (window 4)
  qwen3       q/k norm, head_dim 32 != hidden/heads, yarn rope scaling, untied
  llama_bias  q/k/v/o and MLP biases, MHA (kv heads = heads), linear rope scaling, tied
Weights are re-drawn with a larger scale than HF's init so logits and attention patterns are not trivial.
"""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 160
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _hf_config(name):
  if name == "llama":
    return transformers.LlamaConfig(**_COMMON, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))
  if name == "qwen2":
    return transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True, use_sliding_window=True,
                                    sliding_window=4, max_window_layers=1)
  if name == "qwen3":
    return transformers.Qwen3Config(**_COMMON, head_dim=32, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))
  if name == "llama_bias":
    return transformers.LlamaConfig(**{**_COMMON, "hidden_size": 48, "num_attention_heads": 3,
                                       "num_key_value_heads": 3}, attention_bias=True, mlp_bias=True,
                                    tie_word_embeddings=True,
                                    rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))
  raise KeyError(name)


FAMILIES = ("llama", "qwen2", "qwen3", "llama_bias")


@dataclasses.dataclass
class TinyModel:
  name: str
  path: Path
  torch_model: "torch.nn.Module"


def build_tiny_hf(name: str, directory: Path, seed: int = 0) -> TinyModel:
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(name)).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif pname.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) * 1.5)
  model.save_pretrained(str(directory))
  return TinyModel(name, directory, model)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
  """`tiny_hf(name)` -> TinyModel (built once per session)."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = build_tiny_hf(name, tmp_path_factory.mktemp(f"hf_{name}"))
    return cache[name]

  return get


@pytest.fixture(scope="session")
def padded_batch():
  """Left-padded tokens [3, 12] and mask (rows with 4, 1 and 0 padding slots)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, VOCAB, (3, 12)).astype(np.int32)
  mask = np.ones((3, 12), bool)
  mask[0, :4] = False
  mask[1, :1] = False
  tokens[~mask] = 0
  return tokens, mask


def hf_logits(tiny: TinyModel, tokens, mask):
  """Reference logits with HF's generate-time position convention (cumsum(mask) - 1, clipped at 0)."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = tiny.torch_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                           attention_mask=torch.tensor(mask.astype(np.int64)),
                           position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def numpy_model(cfg, seed: int = 0):
  """A `CausalLM(cfg)` with numpy-drawn weights (no jax.random: its compile is slow on CPU), scaled so that
  distributions are sharp: kernels ~ N(0, 1.5^2 / fan_in), embeddings ~ N(0, 1), norms ~ 1 + N(0, 0.1^2)."""
  import jax
  from flax import nnx

  from adrpo_jax.models.llm import CausalLM

  graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = str(path[-1].key)
    if name == "weight":
      v = 1.0 + 0.1 * rng.standard_normal(x.shape)
    elif name == "bias":
      v = 0.1 * rng.standard_normal(x.shape)
    elif name == "embedding":
      v = rng.standard_normal(x.shape)
    else:
      v = rng.standard_normal(x.shape) * 1.5 / math.sqrt(int(np.prod(x.shape[:-1])))
    return jax.numpy.asarray(v, x.dtype)

  pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)
