"""Logits parity with transformers (float32, padded batch), save -> transformers round trip, sharded
checkpoints, bf16 tensors, error messages, tokenizer loading."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.models.llm import CheckpointError, load_pretrained, load_tokenizer, save_pretrained
from adrpo_jax.models.llm.checkpoint import SafetensorsFile, write_safetensors
from tests.models.llm.conftest import FAMILIES, hf_logits, torch, transformers


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_parity_padded_batch(tiny_hf, padded_batch, name):
  tiny = tiny_hf(name)
  tokens, mask = padded_batch
  ref = hf_logits(tiny, tokens, mask)
  model = load_pretrained(tiny.path)
  ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  assert ours.dtype == np.float32 and np.isfinite(ours).all()  # padded query rows too
  assert np.abs(ref).max() > 1.0  # non-trivial logits
  diff = np.abs(ours - ref)[mask].max()
  assert diff <= 1e-4, f"{name}: max abs logits diff {diff}"


def test_sliding_window_is_active(tiny_hf, padded_batch):
  # Guard against a vacuous qwen2 parity: without the window our logits must differ from HF's.
  tiny = tiny_hf("qwen2")
  tokens, mask = padded_batch
  full = load_pretrained(tiny.path, config_overrides=dict(sliding_window=None, layer_types=None))
  diff = np.abs(np.asarray(full(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))) -
                hf_logits(tiny, tokens, mask))[mask].max()
  assert diff > 1e-2


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_save_then_transformers_load(tiny_hf, padded_batch, tmp_path, name):
  tiny = tiny_hf(name)
  tokens, mask = padded_batch
  model = load_pretrained(tiny.path)
  out = save_pretrained(model, tmp_path / "saved")
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  diff = np.abs(hf_logits(type(tiny)(name, out, reloaded), tokens, mask) - hf_logits(tiny, tokens, mask))
  assert diff[mask].max() == 0.0  # float32 weights round-trip bit-exactly
  gen = transformers.GenerationConfig.from_pretrained(str(out))
  assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 0)


def test_sharded_save_with_index_and_bf16(tiny_hf, padded_batch, tmp_path):
  tiny = tiny_hf("qwen2")
  tokens, mask = padded_batch
  model = load_pretrained(tiny.path)
  out = save_pretrained(model, tmp_path / "sharded", max_shard_size="40KB", dtype=jnp.bfloat16)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 3 and all((out / f).exists() for f in files)
  assert not (out / "model.safetensors").exists()
  assert SafetensorsFile(out / files[0]).get(SafetensorsFile(out / files[0]).names()[0]).dtype == jnp.bfloat16
  # transformers loads the sharded bf16 directory ...
  hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  ref_bf16 = hf_logits(type(tiny)("qwen2", out, hf_bf16), tokens, mask)
  # ... and so do we, with the same (bf16-rounded) weights.
  ours = np.asarray(load_pretrained(out)(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  assert np.abs(ours - ref_bf16)[mask].max() <= 1e-4
  # bf16 rounding moved the logits only a little from the float32 original.
  assert np.abs(ours - hf_logits(tiny, tokens, mask))[mask].max() < 0.3


def test_bf16_params_and_compute(tiny_hf, padded_batch):
  tiny = tiny_hf("llama")
  tokens, mask = padded_batch
  model = load_pretrained(tiny.path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  logits = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  assert logits.dtype == jnp.bfloat16
  ref = hf_logits(tiny, tokens, mask)
  err = np.abs(np.asarray(logits, np.float32) - ref)[mask]
  assert err.max() < 0.25 and err.mean() < 0.05
  # float32 compute over bfloat16 parameters is separate from the parameter dtype.
  mixed = load_pretrained(tiny.path, dtype=jnp.float32, param_dtype=jnp.bfloat16)
  assert mixed(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).dtype == jnp.float32


def _copy_without(src, dst, drop=None, reshape=None):
  shutil.copytree(src, dst)
  f = SafetensorsFile(dst / "model.safetensors")
  names = [n for n in f.names() if n != drop]
  arrays = {n: np.array(f.get(n)) for n in names}
  if reshape:
    arrays[reshape] = arrays[reshape][:-1]
  write_safetensors(dst / "model.safetensors", [(n, arrays[n].shape, arrays[n].dtype) for n in names],
                    arrays.__getitem__)


def test_error_messages(tiny_hf, tmp_path):
  tiny = tiny_hf("llama")
  bad = tmp_path / "gpt2"
  shutil.copytree(tiny.path, bad)
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"model_type='gpt2'.*supported: \('llama', 'qwen2', 'qwen3', "):
    load_pretrained(bad)
  name = "model.layers.1.mlp.up_proj.weight"
  _copy_without(tiny.path, tmp_path / "missing", drop=name)
  with pytest.raises(CheckpointError, match=rf"{name}.*not found in .*model.safetensors"):
    load_pretrained(tmp_path / "missing")
  _copy_without(tiny.path, tmp_path / "shape", reshape=name)
  with pytest.raises(CheckpointError, match=rf"{name}.*shape \(127, 64\), expected \(128, 64\)"):
    load_pretrained(tmp_path / "shape")
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(tmp_path / "nowhere")


def test_loader_does_not_import_torch_and_warns_on_unexpected(tiny_hf, tmp_path, caplog):
  import subprocess
  import sys
  code = ("import sys; from adrpo_jax.models.llm import load_pretrained; "
          f"load_pretrained({str(tiny_hf('qwen3').path)!r}); assert 'torch' not in sys.modules, 'torch imported'")
  subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  d = tmp_path / "extra"
  shutil.copytree(tiny_hf("qwen3").path, d)
  f = SafetensorsFile(d / "model.safetensors")
  arrays = {n: np.array(f.get(n)) for n in f.names()}
  arrays["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  arrays["model.extra_head.weight"] = np.ones(4, np.float32)
  write_safetensors(d / "model.safetensors", [(n, a.shape, a.dtype) for n, a in arrays.items()], arrays.__getitem__)
  with caplog.at_level("WARNING"):
    load_pretrained(d)
  assert "model.extra_head.weight" in caplog.text and "inv_freq" not in caplog.text


def test_sharded_loading_on_a_mesh(tiny_hf, padded_batch):
  tiny = tiny_hf("llama")
  tokens, mask = padded_batch
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = load_pretrained(tiny.path, mesh=mesh)
  q = model.layers[0].self_attn.q_proj.kernel[...]      # [D=64, H=4, hd=16]
  k = model.layers[0].self_attn.k_proj.kernel[...]      # [64, K=2, 16]: 2 kv heads not divisible by 4
  emb = model.embed_tokens.embedding[...]               # [V=160, 64]
  def sharded_as(x, *spec):
    return x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)), x.ndim)
  assert sharded_as(q, "fsdp", "tensor", None)
  assert sharded_as(k, "fsdp", None, None)
  assert sharded_as(emb, "tensor", "fsdp")
  assert not sharded_as(k, "fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8
  logits = jax.jit(lambda m, t, a: m(t, attention_mask=a))(model, jnp.asarray(tokens), jnp.asarray(mask))
  assert np.abs(np.asarray(logits) - hf_logits(tiny, tokens, mask))[mask].max() <= 1e-4


def test_load_tokenizer_offline(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(["the cat sat on the mat", "2 + 2 = 4", "héllo wörld"] * 20,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
  hf.save_pretrained(str(tmp_path))
  loaded = load_tokenizer(tmp_path)
  assert loaded.padding_side == "left" and loaded.pad_token == "<eos>"  # no pad token -> EOS
  batch = loaded(["the cat", "héllo wörld 2 + 2"], padding=True)
  assert batch["attention_mask"][0][0] == 0  # left padding
  assert loaded.decode(loaded("héllo wörld")["input_ids"]) == "héllo wörld"
  with pytest.raises(ValueError, match="padding_side"):
    load_tokenizer(tmp_path, padding_side="middle")
