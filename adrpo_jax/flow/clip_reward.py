r"""CLIP-score reward of the SD3 experiment: ``reward(images [B, H, W, 3], cond [B] prompt ids) -> [B]``, jittable.

The text side is fixed (a prompt set), so its CLIP features are computed once on the host with ``transformers``
(:func:`encode_clip_texts`, PyTorch on the CPU) and kept as a ``[N, E]`` table; the *vision* tower runs in JAX
(:func:`clip_image_features`), so the reward is a pure function that runs inside the jitted sampler right after
the VAE decode (:func:`adrpo_jax.flow.sd3.make_latent_reward`). The vision weights are read from the
``safetensors`` of a local ``transformers`` ``CLIPModel`` directory (e.g. ``openai/clip-vit-large-patch14``)
without torch.

**Vision tower** (transformers ``CLIPVisionModel`` + ``visual_projection``): patch convolution (no bias) ->
``[class token; patches]`` + learned positions -> ``pre_layrnorm`` -> pre-LN encoder layers (``x + attn(LN1 x)``,
``x + fc2(act(fc1(LN2 x)))``, ``act`` = the config's ``hidden_act``: ``quick_gelu`` for OpenAI CLIP, ``gelu`` for
OpenCLIP / LAION) -> ``post_layernorm`` of the class token -> ``visual_projection``. Layers are stacked and run
under ``lax.scan`` (one compiled layer). Tested against ``CLIPModel.get_image_features`` within 1e-4
(``tests/flow/test_clip_reward.py``).

**Preprocessing** (:func:`clip_preprocess`, CLIP's image processor in JAX): images in ``[-1, 1]`` (the VAE
decode's range, ``input_range="minus_one_one"``, the default of :mod:`adrpo_jax.flow.rewards`) or ``[0, 1]``
(``"zero_one"``) are mapped to ``[0, 1]`` and clamped (diffusers' postprocessing), the shortest edge is resized
to the model's ``image_size`` with ``jax.image.resize(method="bicubic")`` (antialiased when downscaling, like
PIL's bicubic), the centre is cropped to ``image_size x image_size`` and the channels are normalized with the
processor's ``image_mean`` / ``image_std`` (OpenAI's values by default). Unlike the processor we do not round to
8-bit pixels, and bicubic kernels differ slightly from PIL's: scores differ from a PIL pipeline by a little.

**Score** -- CLIPScore (Hessel et al., 2021, arXiv 2104.08718): ``w * max(cos(E_img, E_txt), 0)``; we take
``w = 100`` by default, the scale of ``torchmetrics.multimodal.CLIPScore`` and of the CLIP scores the ADRPO paper
reports for SD3 (~33); Hessel et al.'s ``w = 2.5`` is ``scale=2.5``; ``clamp=False`` keeps negative cosines (a
denser training signal). ``logit_scale`` is not used. ``components`` also returns the raw ``clip_cosine``.

Example (``clip_dir`` a local CLIPModel directory; ``table`` from
:func:`adrpo_jax.flow.text_embeddings.cached_prompt_embeddings`, so prompt ids agree)::

    reward = CLIPScoreReward.from_pretrained(clip_dir, table.prompts)
    r = reward(images_in_minus_one_one, prompt_ids)        # [B] float32, jittable
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from adrpo_jax.models.dit import concrete_value

__all__ = [
    "CLIPVisionSpec",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "load_clip_vision",
    "clip_preprocess",
    "clip_resize_size",
    "clip_truncated_prompts",
    "clip_image_features",
    "encode_clip_texts",
    "CLIPScoreReward",
]

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INPUT_RANGES = ("minus_one_one", "zero_one")
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
}
_VISION = "vision_model."


@dataclasses.dataclass(frozen=True)
class CLIPVisionSpec:
    """Static shape / preprocessing facts of a CLIP vision tower (hashable: safe as a jit static argument)."""
    hidden_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    projection_dim: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# ----------------------------------------------------------------------------------------------------------
# Weights (safetensors, no torch)
# ----------------------------------------------------------------------------------------------------------


def _safetensors_files(path: Path) -> dict[str, Path]:
    """``{tensor name: file}`` of a directory's ``model.safetensors`` or sharded ``model.safetensors.index.json``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open  # pylint: disable=import-outside-toplevel
        with safe_open(str(single), framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    raise ValueError(f"no model.safetensors (or its index) in {str(path)!r}: save the CLIPModel with "
                     "save_pretrained(..., safe_serialization=True).")


def _read_tensors(files: dict[str, Path], names: Sequence[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    out = {}
    for file, keys in by_file.items():
        with safe_open(str(file), framework="numpy") as f:
            for k in keys:
                out[k] = np.asarray(f.get_tensor(k), np.float32)
    return out


def _rgb(values: Any, name: str, path: Path) -> tuple[float, float, float]:
    """A preprocessor's per-channel ``image_mean`` / ``image_std``: three floats (R, G, B)."""
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"{name}={values!r} in {str(path)!r}: expected 3 values (R, G, B) for the RGB ViT.")
    return out[0], out[1], out[2]


def load_clip_vision(path: str | os.PathLike) -> tuple[CLIPVisionSpec, dict[str, Any]]:
    """The vision tower of a local ``CLIPModel`` (or ``CLIPVisionModelWithProjection``) directory.

    Returns ``(spec, params)``: ``params`` is a pytree of float32 numpy arrays (``embeddings``, ``pre_ln``,
    ``layers`` stacked on a leading ``[num_layers]`` axis, ``post_ln``, ``projection [hidden, E]``), shapes
    derived from the weights; heads / activation / epsilon from ``config.json`` (``vision_config``), mean / std
    from ``preprocessor_config.json`` when present.
    """
    root = Path(os.fspath(path)).expanduser()
    if not (root / "config.json").is_file():
        raise ValueError(f"`path`={os.fspath(path)!r} is not a CLIP model directory (no config.json).")
    config = json.loads((root / "config.json").read_text())
    vcfg = config.get("vision_config", config)
    files = _safetensors_files(root)
    prefix = _VISION if any(k.startswith(_VISION) for k in files) else ""
    needed = [f"{prefix}embeddings.class_embedding", f"{prefix}embeddings.patch_embedding.weight",
              f"{prefix}embeddings.position_embedding.weight", f"{prefix}pre_layrnorm.weight",
              f"{prefix}pre_layrnorm.bias", f"{prefix}post_layernorm.weight", f"{prefix}post_layernorm.bias",
              "visual_projection.weight"]
    missing = [n for n in needed if n not in files]
    if missing:
        raise ValueError(f"{str(root)!r} has no CLIP vision tower with a projection (missing {missing[:3]}); "
                         "pass a CLIPModel or CLIPVisionModelWithProjection directory.")
    layer_ids = sorted({int(k[len(prefix + "encoder.layers."):].split(".")[0]) for k in files
                        if k.startswith(prefix + "encoder.layers.")})
    if layer_ids != list(range(len(layer_ids))) or not layer_ids:
        raise ValueError(f"{str(root)!r}: encoder layers {layer_ids[:5]}... are not 0..L-1.")
    parts = ["layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
             "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
             "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight",
             "self_attn.out_proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    layer_names = [f"{prefix}encoder.layers.{i}.{p}" for i in layer_ids for p in parts]
    t = _read_tensors(files, needed + layer_names)

    def stack(part, transpose=False):
        arrs = [t[f"{prefix}encoder.layers.{i}.{part}"] for i in layer_ids]
        return np.stack([a.T if transpose else a for a in arrs])

    patch_w = t[f"{prefix}embeddings.patch_embedding.weight"]  # [hidden, C, p, p]
    hidden, channels, p, _ = patch_w.shape
    pos = t[f"{prefix}embeddings.position_embedding.weight"]
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid + 1 != pos.shape[0] or channels != 3:
        raise ValueError(f"{str(root)!r}: {pos.shape[0]} positions / {channels} channels is not a square RGB ViT.")
    num_heads = int(vcfg.get("num_attention_heads", 12))
    if hidden % num_heads:
        raise ValueError(f"hidden size {hidden} is not divisible by num_attention_heads={num_heads}.")
    act = str(vcfg.get("hidden_act", "quick_gelu"))
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported (one of {sorted(_ACTIVATIONS)}).")
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    pre = root / "preprocessor_config.json"
    if pre.is_file():
        pcfg = json.loads(pre.read_text())
        mean = _rgb(pcfg.get("image_mean", mean), "image_mean", pre)
        std = _rgb(pcfg.get("image_std", std), "image_std", pre)
    proj = t["visual_projection.weight"]  # [E, hidden]
    spec = CLIPVisionSpec(hidden_size=int(hidden), num_layers=len(layer_ids), num_heads=num_heads, patch_size=int(p),
                          image_size=int(grid * p), projection_dim=int(proj.shape[0]), hidden_act=act,
                          layer_norm_eps=float(vcfg.get("layer_norm_eps", 1e-5)), image_mean=mean, image_std=std)
    params = {
        "class_embedding": t[f"{prefix}embeddings.class_embedding"],
        # [p, p, C, hidden] flattened in the (row, col, channel) order of our NHWC patches
        "patch_kernel": patch_w.transpose(2, 3, 1, 0).reshape(p * p * channels, hidden),
        "position_embedding": pos,
        "pre_ln": {"scale": t[f"{prefix}pre_layrnorm.weight"], "bias": t[f"{prefix}pre_layrnorm.bias"]},
        "post_ln": {"scale": t[f"{prefix}post_layernorm.weight"], "bias": t[f"{prefix}post_layernorm.bias"]},
        "projection": proj.T,
        "layers": {
            "ln1": {"scale": stack("layer_norm1.weight"), "bias": stack("layer_norm1.bias")},
            "ln2": {"scale": stack("layer_norm2.weight"), "bias": stack("layer_norm2.bias")},
            "q": {"kernel": stack("self_attn.q_proj.weight", True), "bias": stack("self_attn.q_proj.bias")},
            "k": {"kernel": stack("self_attn.k_proj.weight", True), "bias": stack("self_attn.k_proj.bias")},
            "v": {"kernel": stack("self_attn.v_proj.weight", True), "bias": stack("self_attn.v_proj.bias")},
            "o": {"kernel": stack("self_attn.out_proj.weight", True), "bias": stack("self_attn.out_proj.bias")},
            "fc1": {"kernel": stack("mlp.fc1.weight", True), "bias": stack("mlp.fc1.bias")},
            "fc2": {"kernel": stack("mlp.fc2.weight", True), "bias": stack("mlp.fc2.bias")},
        },
    }
    return spec, params


# ----------------------------------------------------------------------------------------------------------
# The vision tower and preprocessing in JAX
# ----------------------------------------------------------------------------------------------------------


def clip_resize_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(new_height, new_width)`` of CLIP's shortest-edge resize, as transformers computes it
    (``get_resize_output_image_size(..., default_to_square=False)``): the short side becomes ``size``, the long one
    ``int(size * long / short)`` (truncated, not rounded: a rounded long side shifts the centre crop of a
    non-square image by a pixel).

    >>> clip_resize_size(300, 451, 224), clip_resize_size(1024, 768, 224)
    ((224, 336), (298, 224))
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def clip_preprocess(images: jax.Array, spec: CLIPVisionSpec,
                    input_range: Literal["minus_one_one", "zero_one"] = "minus_one_one") -> jax.Array:
    """CLIP's image processing: ``images [B, H, W, 3]`` (``input_range``) -> normalized ``[B, S, S, 3]`` float32,
    ``S = spec.image_size`` (clamp to [0, 1], bicubic resize of the shortest edge to ``S``, centre crop, mean/std)."""
    if input_range not in INPUT_RANGES:
        raise ValueError(f"`input_range` must be one of {INPUT_RANGES}, got {input_range!r}.")
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"`images` must be floating [B, H, W, 3], got shape {images.shape} dtype {images.dtype}.")
    x = images.astype(jnp.float32)
    if input_range == "minus_one_one":
        x = x * 0.5 + 0.5
    x = jnp.clip(x, 0.0, 1.0)
    b, h, w, _ = x.shape
    s = spec.image_size
    if (h, w) != (s, s):
        nh, nw = clip_resize_size(h, w, s)
        x = jax.image.resize(x, (b, nh, nw, 3), method="bicubic", antialias=True)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[:, top:top + s, left:left + s, :]
    mean = jnp.asarray(spec.image_mean, jnp.float32)
    std = jnp.asarray(spec.image_std, jnp.float32)
    return (x - mean) / std


def _layer_norm(x, p, eps):
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p, dtype):
    return jnp.dot(x.astype(dtype), p["kernel"].astype(dtype),
                   preferred_element_type=jnp.float32) + p["bias"].astype(jnp.float32)


def clip_image_features(params: dict[str, Any], spec: CLIPVisionSpec, pixels: jax.Array, *,
                        dtype: Any = jnp.float32) -> jax.Array:
    """``CLIPModel.get_image_features``: normalized ``pixels [B, S, S, 3]`` (NHWC, :func:`clip_preprocess`) ->
    image embeddings ``[B, E]`` float32 (not unit-normalized). ``dtype``: the matmul input dtype (float32
    accumulation; layer norms, softmax and residuals stay float32). Pure; jittable."""
    s, p = spec.image_size, spec.patch_size
    if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
        raise ValueError(f"`pixels` must be [B, {s}, {s}, 3], got shape {pixels.shape}.")
    b, g, d, nh = pixels.shape[0], s // p, spec.hidden_size, spec.num_heads
    hd = d // nh
    patches = pixels.astype(jnp.float32).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, g * g, p * p * 3)
    x = jnp.dot(patches.astype(dtype), params["patch_kernel"].astype(dtype), preferred_element_type=jnp.float32)
    cls = jnp.broadcast_to(params["class_embedding"].astype(jnp.float32), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + params["position_embedding"].astype(jnp.float32)[None]
    x = _layer_norm(x, params["pre_ln"], spec.layer_norm_eps)
    act = _ACTIVATIONS[spec.hidden_act]
    n = x.shape[1]

    def layer(x, lp):
        h = _layer_norm(x, lp["ln1"], spec.layer_norm_eps)
        q = _dense(h, lp["q"], dtype).reshape(b, n, nh, hd)
        k = _dense(h, lp["k"], dtype).reshape(b, n, nh, hd)
        v = _dense(h, lp["v"], dtype).reshape(b, n, nh, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype),
                            preferred_element_type=jnp.float32) * (hd ** -0.5)
        attn = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)
        x = x + _dense(o.reshape(b, n, d), lp["o"], dtype)
        h = _layer_norm(x, lp["ln2"], spec.layer_norm_eps)
        x = x + _dense(act(_dense(h, lp["fc1"], dtype)), lp["fc2"], dtype)
        return x, None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    pooled = _layer_norm(x[:, 0], params["post_ln"], spec.layer_norm_eps)
    return jnp.dot(pooled.astype(dtype), params["projection"].astype(dtype), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Text features (torch, once)
# ----------------------------------------------------------------------------------------------------------


def _text_max_length(tokenizer, path: str | os.PathLike) -> int:
    config = json.loads((Path(os.fspath(path)).expanduser() / "config.json").read_text())
    positions = int(config.get("text_config", config).get("max_position_embeddings", 77))
    return min(int(tokenizer.model_max_length), positions)


def clip_truncated_prompts(prompts: Sequence[str], path: str | os.PathLike, *, warn: bool = True) -> list[int]:
    """Indices of the ``prompts`` longer than the CLIP text tower's context (``model_max_length``, 77 tokens with
    BOS / EOS) of the ``CLIPModel`` directory ``path``: their text features, hence their CLIP reward, see only the
    first 77 tokens. With ``warn``, one warning with the count, the longest length and an example (the SD3 text
    encoders warn the same way). Needs only the tokenizer (no torch)."""
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
    max_len = _text_max_length(tokenizer, path)
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True).input_ids]
    over = [i for i, n in enumerate(lengths) if n > max_len]
    if over and warn:
        logger.warning("%d of %d prompts are longer than the CLIP reward's %d tokens (longest %d) and are scored "
                       "against their first %d tokens only, e.g. %r", len(over), len(prompts), max_len,
                       max(lengths), max_len, prompts[over[0]][:120])
    return over


def encode_clip_texts(prompts: Sequence[str], path: str | os.PathLike, *, batch_size: int = 64,
                      warn_truncated: bool = True) -> np.ndarray:
    """``CLIPModel.get_text_features`` of ``prompts`` (tokenizer of ``path``, truncated to its
    ``model_max_length``, 77: :func:`clip_truncated_prompts` counts and warns about the cut ones): ``[N, E]``
    float32 numpy, not normalized. Imports torch."""
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, str) for p in prompts) or not len(prompts):
        raise ValueError(f"`prompts` must be a non-empty sequence of str, got {prompts!r:.200}.")
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import AutoTokenizer, CLIPModel  # pylint: disable=import-outside-toplevel

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
    model = CLIPModel.from_pretrained(os.fspath(path), dtype=torch.float32).eval()
    max_len = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    if warn_truncated:
        clip_truncated_prompts(prompts, path)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), padding=True, truncation=True,
                            max_length=max_len, return_tensors="pt")
            feats = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
            feats = getattr(feats, "pooler_output", feats)
            out.append(feats.float().numpy())
    return np.concatenate(out, 0).astype(np.float32)


def _cached_text_features(prompts: Sequence[str], path: Path, cache_dir: Path | None) -> np.ndarray:
    if cache_dir is None:
        return encode_clip_texts(prompts, path, warn_truncated=False)
    from adrpo_jax.flow.text_embeddings import _dir_fingerprint  # pylint: disable=import-outside-toplevel
    key = hashlib.sha256(json.dumps({"v": 1, "prompts": list(prompts), "dir": _dir_fingerprint(str(path))},
                                    sort_keys=True).encode()).hexdigest()
    file = Path(cache_dir).expanduser() / f"clip_text_{key[:32]}.npy"
    if file.is_file():
        feats = np.load(file)
        if feats.shape[0] == len(prompts):
            return feats
    feats = encode_clip_texts(prompts, path, warn_truncated=False)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, feats)
    os.replace(tmp, file)
    return feats


# ----------------------------------------------------------------------------------------------------------
# The reward
# ----------------------------------------------------------------------------------------------------------


class CLIPScoreReward:
    """``r(x, c) = scale * max(cos(E_img(x), E_txt(prompt c)), 0)`` (CLIPScore; see the module docstring).

    Args:
      spec, params: the vision tower (:func:`load_clip_vision`).
      text_features: ``[N, E]`` CLIP text features of the prompt table (row = prompt id; normalized here).
      input_range: ``"minus_one_one"`` (default: VAE decodes, the flow rewards' convention) or ``"zero_one"``.
      scale: ``w`` (100 = torchmetrics / the paper's scale; 2.5 = Hessel et al.).
      clamp: ``max(cos, 0)`` as CLIPScore (True) or the raw cosine.
      dtype: matmul input dtype of the vision tower (float32, the default, whatever the policy's compute dtype:
        bf16 rounding of the cosines is a noticeable part of the 1-3 point spreads the advantages are made of;
        ``jnp.bfloat16`` only by explicit choice, e.g. a ``reward.dtype`` config key).

    ``truncated_prompts``: the prompt ids whose text is longer than CLIP's 77 tokens (scored on their first 77;
    counted and warned about by :meth:`from_pretrained`).

    Pure and jittable like :class:`adrpo_jax.flow.rewards.ClassifierReward`: arrays are held as attributes and a
    ``jax.jit``-ed function of ``(params, text, images, cond)`` is called (inlined when called under another
    jit). ``components`` returns ``reward`` and ``clip_cosine`` ``[B]`` float32.

    **Large towers under an outer jit.** Calling the reward inside another ``jax.jit`` closes over its arrays,
    and JAX embeds closed-over arrays in the program as constants (a ViT-L/14 tower is ~1.2 GB of float32: slow
    compiles, a second copy in memory). Pass the arrays as an argument instead: ``reward.state`` is the pytree
    (``{"params", "text"}``), ``reward.bind(state)`` the same reward over those (traced) arrays::

        step = jax.jit(lambda state, x, c: reward.bind(state)(x, c))
        step(reward.state, images, cond)
    """

    def __init__(self, spec: CLIPVisionSpec, params: dict[str, Any], text_features: Any, *,
                 input_range: Literal["minus_one_one", "zero_one"] = "minus_one_one", scale: float = 100.0,
                 clamp: bool = True, dtype: Any = jnp.float32):
        if not isinstance(spec, CLIPVisionSpec):
            raise ValueError(f"`spec` must be a CLIPVisionSpec, got {type(spec).__name__}.")
        if input_range not in INPUT_RANGES:
            raise ValueError(f"`input_range` must be one of {INPUT_RANGES}, got {input_range!r}.")
        text = np.asarray(text_features, np.float32)
        if text.ndim != 2 or text.shape[1] != spec.projection_dim or text.shape[0] < 1:
            raise ValueError(f"`text_features` must be [N, {spec.projection_dim}] (the projection width), "
                             f"got shape {text.shape}.")
        if not np.all(np.isfinite(text)) or np.any(np.linalg.norm(text, axis=-1) == 0):
            raise ValueError("`text_features` must be finite and non-zero rows.")
        if not scale > 0:
            raise ValueError(f"`scale` must be > 0, got {scale!r}.")
        self.spec = spec
        self.input_range = input_range
        self.scale = float(scale)
        self.clamp = bool(clamp)
        self.dtype = jnp.dtype(dtype)
        self.params = jax.tree.map(jnp.asarray, params)
        self.text = jnp.asarray(text / np.linalg.norm(text, axis=-1, keepdims=True))
        self.truncated_prompts: tuple[int, ...] = ()
        self._components = jax.jit(self._components_fn)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, prompts: Sequence[str], *,
                        cache_dir: str | os.PathLike | None = None, **kwargs) -> "CLIPScoreReward":
        """Vision tower from the ``CLIPModel`` directory ``path``; text features of ``prompts`` (row = prompt
        id; pass :attr:`PromptEmbeddings.prompts <adrpo_jax.flow.text_embeddings.PromptEmbeddings>` so ids agree)
        computed with torch, or read from ``cache_dir`` (``clip_text_<hash>.npy``, no torch) when given."""
        spec, params = load_clip_vision(path)
        root = Path(os.fspath(path)).expanduser()
        cache = None if cache_dir is None else Path(cache_dir)
        text = _cached_text_features(list(prompts), root, cache)
        reward = cls(spec, params, text, **kwargs)
        # counted (and warned about once) on every start, also when the features come from the cache
        reward.truncated_prompts = tuple(clip_truncated_prompts(list(prompts), root))
        return reward

    @property
    def num_prompts(self) -> int:
        return int(self.text.shape[0])

    @property
    def state(self) -> dict[str, Any]:
        """The reward's arrays ``{"params": vision tower, "text": [N, E] unit text features}``, to pass through
        jitted code as an argument (see :meth:`bind`)."""
        return {"params": self.params, "text": self.text}

    def bind(self, state: dict[str, Any]) -> "_BoundCLIPScoreReward":
        """This reward over the arrays ``state`` (same structure as :attr:`state`; may be tracers): a callable
        ``(images, cond) -> [B]`` with ``components``, that closes over nothing but ``state``."""
        return _BoundCLIPScoreReward(self, state)

    def image_features(self, images: jax.Array) -> jax.Array:
        """Unnormalized CLIP image embeddings ``[B, E]`` of ``images`` (in ``input_range``)."""
        return clip_image_features(self.params, self.spec, clip_preprocess(images, self.spec, self.input_range),
                                   dtype=self.dtype)

    def _components_fn(self, params, text, images, cond):
        pixels = clip_preprocess(images, self.spec, self.input_range)
        feats = clip_image_features(params, self.spec, pixels, dtype=self.dtype)
        feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
        cos = jnp.sum(feats * jnp.take(text, cond, axis=0), axis=-1)
        score = jnp.maximum(cos, 0.0) if self.clamp else cos
        return {"reward": self.scale * score, "clip_cosine": cos}

    def components(self, images: jax.Array, cond: jax.Array) -> dict[str, jax.Array]:
        """``{"reward": [B], "clip_cosine": [B]}`` float32."""
        return self._checked_components(self.state, images, cond)

    def _checked_components(self, state, images, cond):
        images, cond = jnp.asarray(images), jnp.asarray(cond)
        if images.ndim != 4 or images.shape[-1] != 3 or not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"`images` must be floating [B, H, W, 3], got shape {images.shape} "
                             f"dtype {images.dtype}.")
        if cond.shape != (images.shape[0],) or not jnp.issubdtype(cond.dtype, jnp.integer):
            raise ValueError(f"`cond` must be [{images.shape[0]}] int prompt ids, got shape {cond.shape} "
                             f"dtype {cond.dtype}.")
        values = concrete_value(cond)
        if values is not None and values.size:
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= self.num_prompts:
                raise ValueError(f"`cond` must be prompt ids in [0, {self.num_prompts}), got values in [{lo}, {hi}].")
        return self._components(state["params"], state["text"], images, cond.astype(jnp.int32))

    def __call__(self, images: jax.Array, cond: jax.Array) -> jax.Array:
        return self.components(images, cond)["reward"]


class _BoundCLIPScoreReward:
    """A :class:`CLIPScoreReward` over explicit arrays (:meth:`CLIPScoreReward.bind`)."""

    def __init__(self, reward: CLIPScoreReward, state: dict[str, Any]):
        if not isinstance(state, dict) or set(state) != {"params", "text"}:
            raise ValueError(f"`state` must be CLIPScoreReward.state ({{'params', 'text'}}), got "
                             f"{type(state).__name__} {sorted(state) if isinstance(state, dict) else ''}.")
        text = state["text"]
        if tuple(text.shape) != tuple(reward.text.shape):
            raise ValueError(f"`state['text']` has shape {tuple(text.shape)}, expected {tuple(reward.text.shape)}.")
        self.reward, self.state = reward, state

    def components(self, images: jax.Array, cond: jax.Array) -> dict[str, jax.Array]:
        return self.reward._checked_components(self.state, images, cond)  # pylint: disable=protected-access

    def __call__(self, images: jax.Array, cond: jax.Array) -> jax.Array:
        return self.components(images, cond)["reward"]
