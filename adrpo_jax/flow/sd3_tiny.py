"""Tiny random SD3 components for the ``cpu`` variant of ``configs/sd3_adrpo.py`` (and its tests), built once.

    python -m adrpo_jax.flow.sd3_tiny            # prints the directory (builds it if absent)

:func:`build_tiny_sd3` writes, with ``diffusers`` / ``transformers`` (PyTorch on the CPU, random weights, offline
tokenizers made from a hand-written vocabulary), the directory layout a real SD3 run reads, under
``$ADRPO_JAX_CACHE/sd3_tiny-<version>`` (``~/.cache/adrpo_jax`` by default):

* ``transformer/``: an ``SD3Transformer2DModel`` (2 layers, 2 heads of 8, latents 8 x 8 x 4, patch 2, text width
  32, pooled 16), with its adaLN / output weights perturbed away from zero;
* ``vae/``: an ``AutoencoderKL`` (4 latent channels, 8 x 8 latents -> 16 x 16 images, SD3's scaling and shift
  factors, no quant convs);
* ``text/``: the pipeline layout (``text_encoder``, ``text_encoder_2`` = CLIP text models with projection,
  ``text_encoder_3`` = T5 encoder, ``tokenizer``, ``tokenizer_2``, ``tokenizer_3``) with widths 16 + 16 -> 32
  = the T5 width;
* ``clip/``: a ``CLIPModel`` (16 x 16 images, patch 4) with its tokenizer and image processor, for the
  CLIP-score reward.

Returns ``{"model", "vae", "text", "clip", "root"}`` paths. The build takes a few seconds; later calls return the
cached directory (written to a temporary name, then renamed, so a killed build leaves nothing half-made).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from adrpo_jax.cache import cache_root

__all__ = ["VERSION", "build_tiny_sd3", "TINY_MAX_SEQUENCE_LENGTH", "TINY_JOINT_ATTENTION_DIM"]

VERSION = "v1"
TINY_MAX_SEQUENCE_LENGTH = 8
TINY_JOINT_ATTENTION_DIM = 32
_CLIP_LEN = 16
_CHARS = "abcdefghijklmnopqrstuvwxyz"


def _clip_tokenizer():
    from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
    for c in _CHARS:
        vocab[c + "</w>"] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        import json  # pylint: disable=import-outside-toplevel
        Path(d, "vocab.json").write_text(json.dumps(vocab))
        Path(d, "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                             model_max_length=_CLIP_LEN)


def _t5_tokenizer():
    from transformers import T5Tokenizer  # pylint: disable=import-outside-toplevel

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _build(root: Path, seed: int = 0) -> None:
    import torch  # pylint: disable=import-outside-toplevel
    from diffusers import AutoencoderKL, SD3Transformer2DModel  # pylint: disable=import-outside-toplevel
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig,  # pylint: disable=import-outside-toplevel
                              CLIPTextModelWithProjection, T5Config, T5EncoderModel)

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TINY_JOINT_ATTENTION_DIM, caption_projection_dim=16, pooled_projection_dim=16,
        out_channels=4, pos_embed_max_size=8)
    with torch.no_grad():  # adaLN-Zero / output layers start at zero in training; perturb them (random model)
        for p in transformer.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.05)
    transformer.save_pretrained(root / "transformer")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    vae.save_pretrained(root / "vae")

    text = root / "text"
    tok = _clip_tokenizer()
    for sub, (hidden, proj, act) in {"text_encoder": (16, 8, "quick_gelu"),
                                     "text_encoder_2": (16, 8, "gelu")}.items():
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=32, projection_dim=proj,
                             num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=_CLIP_LEN,
                             hidden_act=act, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        CLIPTextModelWithProjection(cfg).save_pretrained(text / sub)
    for sub in ("tokenizer", "tokenizer_2"):
        tok.save_pretrained(text / sub)
    t5tok = _t5_tokenizer()
    t5cfg = T5Config(vocab_size=len(t5tok), d_model=TINY_JOINT_ATTENTION_DIM, d_kv=8, d_ff=32, num_layers=1,
                     num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(t5cfg).save_pretrained(text / "text_encoder_3")
    t5tok.save_pretrained(text / "tokenizer_3")

    clip = root / "clip"
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=_CLIP_LEN, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=8)
    CLIPModel(cfg).save_pretrained(clip)
    tok.save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(clip)


def build_tiny_sd3(root: str | os.PathLike | None = None) -> dict[str, str]:
    """The tiny SD3 directories (built on the first call; see the module docstring). ``root`` defaults to
    ``cache_root() / f"sd3_tiny-{VERSION}"``."""
    root = Path(root) if root is not None else cache_root() / f"sd3_tiny-{VERSION}"
    if not (root / "DONE").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
        try:
            _build(tmp)
            (tmp / "DONE").write_text(VERSION + "\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return {"model": str(root / "transformer"), "vae": str(root / "vae"), "text": str(root / "text"),
            "clip": str(root / "clip"), "root": str(root)}


if __name__ == "__main__":
    print(build_tiny_sd3()["root"])
