"""The embeddings entry point (`embeds=` / `prompt_embeds=`) of the decoder stack, used by the audio LLM:
`embed_tokens(tokens)` passed as embeddings gives the token path's logits, log-probs and generation."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig, generate, token_logprobs


@pytest.fixture(scope="module")
def model():
  cfg = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
  return CausalLM(cfg, rngs=nnx.Rngs(0))


TOKENS = jnp.array([[0, 0, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], jnp.int32)
MASK = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)


def test_embeds_equal_token_path(model):
  emb = model.embed_tokens(TOKENS)
  np.testing.assert_array_equal(model(TOKENS, attention_mask=MASK, embeds=emb), model(TOKENS, attention_mask=MASK))
  lp = token_logprobs(model, TOKENS, MASK)
  np.testing.assert_array_equal(token_logprobs(model, TOKENS, MASK, embeds=emb), lp)
  # other embeddings change the result: the argument is used
  assert not np.allclose(token_logprobs(model, TOKENS, MASK, embeds=emb + 0.5), lp)


def test_prompt_embeds_generation(model):
  emb = model.embed_tokens(TOKENS)
  kw = dict(greedy=True, max_new_tokens=4)
  ref = generate(model, TOKENS, MASK, **kw)
  out = generate(model, TOKENS, MASK, prompt_embeds=emb, **kw)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-6)
  # shared-prompt prefill takes one embeddings row per group, like the tokens
  rep = lambda x: jnp.repeat(x, 2, axis=0)  # noqa: E731
  grouped = generate(model, rep(TOKENS), rep(MASK), prompt_embeds=rep(emb), prompt_group_size=2, **kw)
  np.testing.assert_array_equal(grouped.tokens, rep(ref.tokens))


def test_embeds_shape_errors(model):
  with pytest.raises(ValueError, match="embeds must be"):
    model(TOKENS, embeds=jnp.zeros((2, 5, 16)))
  with pytest.raises(ValueError, match="floating"):
    model(TOKENS, embeds=jnp.zeros((2, 6, 16), jnp.int32))
  with pytest.raises(ValueError, match="prompt_embeds"):
    generate(model, TOKENS, MASK, prompt_embeds=jnp.zeros((2, 5, 16)), greedy=True, max_new_tokens=2)
