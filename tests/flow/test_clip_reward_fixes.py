"""Issue 28 item 7 (section 10 of the SD3 review): CLIP's non-square resize as transformers sizes it, and
prompts longer than CLIP's text context counted and warned about."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.flow import clip_reward as cr
from tests.flow.test_clip_reward import _build_clip


@pytest.mark.parametrize("h, w", [(300, 451), (451, 300), (1024, 768), (768, 1024), (224, 224), (100, 333)])
def test_resize_size_is_transformers(h, w):
  from transformers.image_transforms import get_resize_output_image_size
  want = get_resize_output_image_size(np.zeros((h, w, 3)), 224, default_to_square=False,
                                      input_data_format="channels_last")
  assert cr.clip_resize_size(h, w, 224) == tuple(want)


def test_non_square_preprocess_close_to_clip_image_processor():
  """300 x 451: the long side is int(224 * 451 / 300) = 336 (main rounded to 337 and shifted the centre crop:
  0.039 max difference against 0.015 now, the square images' level)."""
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  h, w = 300, 451
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  img = np.stack([np.sin(6 * xx + c) * np.cos(5 * yy) for c in range(3)], -1) * 0.5 + 0.5
  u8 = np.round(img * 255).astype(np.uint8)
  ref = CLIPImageProcessorPil()(images=[u8], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  spec = cr.CLIPVisionSpec(hidden_size=8, num_layers=1, num_heads=2, patch_size=14, image_size=224, projection_dim=4)
  ours = np.asarray(cr.clip_preprocess(jnp.asarray(u8[None] / 255.0, jnp.float32), spec, "zero_one"))[0]
  assert np.abs(ours - ref).max() < 0.025


def test_long_prompts_are_counted_and_warned(tmp_path, caplog):
  _build_clip(tmp_path / "clip")
  prompts = ["a cat", "abcdefghijklmnopqrstuvwxyz abc"]  # the tiny tokenizer's context is 16 tokens
  with caplog.at_level(logging.WARNING, logger="adrpo_jax.flow.clip_reward"):
    reward = cr.CLIPScoreReward.from_pretrained(tmp_path / "clip", prompts, cache_dir=tmp_path / "cache")
  assert reward.truncated_prompts == (1,)
  assert caplog.text.count("1 of 2 prompts are longer than the CLIP reward's 16 tokens") == 1
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="adrpo_jax.flow.clip_reward"):  # cached features: still counted
    again = cr.CLIPScoreReward.from_pretrained(tmp_path / "clip", prompts, cache_dir=tmp_path / "cache")
  assert again.truncated_prompts == (1,) and "1 of 2 prompts" in caplog.text
  assert cr.clip_truncated_prompts(["a cat"], tmp_path / "clip") == []
