"""Issue 28 item 8: the audio splice is per row and limited to the prompt; host-side audio-token count check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.models import audio_llm

AUDIO = 7


def _inputs():
  # two rows, prompt of 5 positions (3 audio tokens each), completion of 3; row 0 sampled an audio token
  tokens = np.array([[1, AUDIO, AUDIO, AUDIO, 2, 3, AUDIO, 4],
                     [AUDIO, AUDIO, AUDIO, 5, 2, 3, 4, 4]])
  base = jnp.zeros((2, 8, 1))
  emb = jnp.array([[10.0, 11.0, 12.0], [20.0, 21.0, 22.0]])[..., None]
  valid = jnp.ones((2, 3), bool)
  return tokens, base, emb, valid


def test_an_audio_token_in_a_completion_shifts_nothing():
  """The review's reproduction (jitted): on main row 0's completion token got row 1's first embedding and
  row 1 became 21 22 22."""
  tokens, base, emb, valid = _inputs()
  run = jax.jit(audio_llm.splice_audio, static_argnames="prompt_length")
  for kw in ({}, {"prompt_length": 5}):
    out = np.asarray(run(base, jnp.asarray(tokens == AUDIO), emb, valid, **kw))[..., 0]
    np.testing.assert_array_equal(out[0], [0, 10, 11, 12, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[1], [20, 21, 22, 0, 0, 0, 0, 0])


def test_prompt_length_limits_the_splice():
  # row 0's prompt (5 positions) holds only 2 audio tokens; its completion's audio token stays text with
  # prompt_length, although the row has a third embedding
  tokens = np.array([[1, AUDIO, AUDIO, 9, 2, AUDIO, 4, 4]])
  base = jnp.zeros((1, 8, 1))
  emb, valid = jnp.array([[10.0, 11.0, 12.0]])[..., None], jnp.ones((1, 3), bool)
  fn = jax.jit(audio_llm.splice_audio, static_argnames="prompt_length")
  out = np.asarray(fn(base, jnp.asarray(tokens == AUDIO), emb, valid, prompt_length=5))[0, :, 0]
  np.testing.assert_array_equal(out, [0, 10, 11, 0, 0, 0, 0, 0])


def test_per_row_splice_with_padding_and_eager_checks():
  # left-aligned valid embeddings of different lengths per row: row 1 has 2 of 3
  tokens = np.array([[AUDIO, AUDIO, AUDIO, 1], [0, AUDIO, AUDIO, 1]])
  base = jnp.full((2, 4, 1), -1.0)
  emb = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[..., None]
  valid = jnp.array([[True, True, True], [True, True, False]])
  out = np.asarray(audio_llm.splice_audio(base, jnp.asarray(tokens == AUDIO), emb, valid))[..., 0]
  np.testing.assert_array_equal(out, [[1, 2, 3, -1], [-1, 4, 5, -1]])
  # eager: a per-row mismatch is an error even when the totals agree (on main only totals were compared)
  swapped = np.array([[AUDIO, AUDIO, 0, 1], [AUDIO, AUDIO, AUDIO, 1]])
  with pytest.raises(ValueError, match="per row"):
    audio_llm.splice_audio(base, jnp.asarray(swapped == AUDIO), emb, valid)
  # N clips != B rows: transformers' order over the flattened batch
  one = np.array([[AUDIO, AUDIO, 1, 1], [AUDIO, 1, 1, 1]])
  out = np.asarray(audio_llm.splice_audio(base, jnp.asarray(one == AUDIO), emb[:1], valid[:1]))[..., 0]
  np.testing.assert_array_equal(out, [[1, 2, -1, -1], [3, -1, -1, -1]])


def test_check_audio_token_counts():
  tokens = np.array([[AUDIO, AUDIO, 1], [AUDIO, AUDIO, AUDIO]])
  audio_llm.check_audio_token_counts(tokens, AUDIO, [2, 3])
  with pytest.raises(ValueError, match=r"prompt row 1 holds 3 audio tokens .* gives 2 embeddings.*'the <\|AUDIO"):
    audio_llm.check_audio_token_counts(tokens, AUDIO, [2, 2], texts=["a", "the <|AUDIO|> token"])
