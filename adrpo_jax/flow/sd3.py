r"""SD3's flow convention mapped onto ours, in one place, and the MMDiT as a velocity field of our trainer.

**Conventions.** Ours (docs/math.md, "Flow matching"; :mod:`adrpo_jax.losses.flow_matching`,
:mod:`adrpo_jax.flow.sampling`): ``t = 0`` is noise ``x0``, ``t = 1`` data ``x1``, ``x_t = (1 - t) x0 + t x1``,
target ``u = x1 - x0``; samplers integrate ``dx/dt = v`` from ``t = 0`` up to ``t = 1``.
diffusers / SD3 (``FlowMatchEulerDiscreteScheduler``): ``sigma = 1`` is noise, ``sigma = 0`` data,
``x = (1 - sigma) x_data + sigma noise``, the model predicts ``noise - x_data`` at ``timestep = 1000 sigma``,
and a step is ``x <- x + (sigma_next - sigma) * model_output``. Hence, on the same point::

    sigma = 1 - t        timestep = 1000 (1 - t)        v_ours(x, t) = -model_output(x, 1000 (1 - t))

(the same path: ``x_t = (1 - t) x0 + t x1 = (1 - sigma) x1 + sigma x0``; the same Euler step:
``(t_next - t) v_ours = (sigma_next - sigma) model_output``). The inference schedule is diffusers'
``set_timesteps``: ``sigmas = shift s / (1 + (shift - 1) s)`` on ``s = linspace(1, sigma_min, N)`` with
``sigma_min`` the (already shifted) smallest training sigma ``shift(1 / 1000)``, then a final ``0``; SD3 uses
``shift = 3.0``. :func:`sd3_time_grid` is that schedule as our increasing time grid ``1 - sigmas``, for
:func:`adrpo_jax.flow.sampling.sample` (``timesteps=``); the Euler sampler on it reproduces diffusers'
scheduler step by step (``tests/flow/test_sd3_convention.py``). The marginal-preserving SDE and CFG of
:mod:`adrpo_jax.flow.sampling` apply unchanged (they only need our path convention).

**The velocity module.** :class:`MMDiTVelocity` wraps an SD3 transformer (:mod:`adrpo_jax.models.mmdit`) and a
table of prompt embeddings (``[N, L, D]`` text states + ``[N, P]`` pooled, computed once on the host by
:mod:`adrpo_jax.flow.text_embeddings`) into ``module(x [B, h, w, c], t [B], cond [B] int, drop_mask=None) ->
v [B, h, w, c]`` in our convention: the call signature of :class:`~adrpo_jax.models.dit.DiT`, so the flow
trainer's steps (:mod:`adrpo_jax.flow.step`: rollout, CFG with a null condition id, per-prompt advantages,
CFG dropout via ``drop_mask``, LoRA with adapters off as the reference) run on it unchanged. The null
condition is the row of the empty prompt (``null_id``). The table is a non-trainable variable
(:class:`PromptTable`), so it sits in the ``frozen`` part of the split model and is never trained or
checkpointed. Its rows are sharded like the weights' ``embed`` axis (``fsdp``): a large prompt set is not
replicated (DrawBench's 200 prompts are 1.1 GB in float32, flow_grpo's ~25k would be 136 GB); the lookup of a
batch's rows is then a sharded gather (XLA: a local masked gather + a reduce-scatter of the ``[B, L, D]`` rows).
:func:`shard_prompt_table` builds that device table from a (memory-mapped) host table reading only the rows of
the calling process's devices, one shard at a time, converted to the compute dtype per shard: host memory is
``O(one shard)``, never the table.

**Shapes without weights** (the plan mode): :data:`PRESETS` names the released models' parts (the MMDiT's
``config.json`` fields in :data:`adrpo_jax.models.mmdit.PRESETS`, SD3's VAE, the CLIP ViT-L/14 reward tower:
:data:`CLIP_PRESETS`); :func:`clip_vision_shapes` is the abstract parameter tree of a CLIP vision tower.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "SD3_SHIFT",
    "NUM_TRAIN_TIMESTEPS",
    "shift_sigmas",
    "sd3_sigmas",
    "sd3_time_grid",
    "t_to_sigma",
    "sigma_to_t",
    "t_to_timestep",
    "velocity_from_diffusers",
    "velocity_to_diffusers",
    "diffusers_noisy_sample",
    "diffusers_euler_step",
    "PromptTable",
    "prompt_table_sharding",
    "shard_prompt_table",
    "MMDiTVelocity",
    "make_latent_reward",
    "PRESETS",
    "CLIP_PRESETS",
    "CLIP_TEXT_TOKENS",
    "clip_vision_spec",
    "clip_vision_shapes",
    "clip_score_components",
]

SD3_SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: Any, shift: float | np.floating) -> Any:
    """SD3's timestep shift ``shift s / (1 + (shift - 1) s)`` (numpy or jax; 1 = identity).

    >>> float(shift_sigmas(0.5, 3.0))
    0.75
    """
    if not shift > 0:
        raise ValueError(f"`shift` must be > 0, got {shift!r}.")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sd3_sigmas(num_steps: int, shift: float = SD3_SHIFT,
               num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps).sigmas``:
    ``[num_steps + 1]`` float32, decreasing from 1 to 0 (static dynamic-shift off, no Karras/terminal options).

    >>> sd3_sigmas(2, shift=1.0).round(4).tolist()
    [1.0, 0.0010000000474974513, 0.0]
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive int, got {num_steps!r}.")
    # __init__: training sigmas = shift(linspace(1, N, N)[::-1] / N); sigma_max / sigma_min are its ends.
    n = int(num_train_timesteps)
    train_sigmas = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    train_sigmas = shift_sigmas(train_sigmas, np.float32(shift)).astype(np.float32)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    # set_timesteps: timesteps = linspace(sigma_max * N, sigma_min * N, steps); sigmas = shift(timesteps / N).
    timesteps = np.linspace(sigma_max * n, sigma_min * n, num_steps)
    sigmas = timesteps / n
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.concatenate([sigmas.astype(np.float32), np.zeros((1,), np.float32)])


def sd3_time_grid(num_steps: int, shift: float = SD3_SHIFT) -> jax.Array:
    """Our increasing time grid ``[num_steps + 1]`` (``t = 1 - sigma``, 0 -> 1) of :func:`sd3_sigmas`, for
    ``sample(..., timesteps=sd3_time_grid(n, shift))``."""
    return jnp.asarray(1.0 - sd3_sigmas(num_steps, shift), jnp.float32)


def t_to_sigma(t: Any) -> Any:
    """``sigma = 1 - t`` (our time -> diffusers' noise level)."""
    return 1.0 - t


def sigma_to_t(sigma: Any) -> Any:
    """``t = 1 - sigma``."""
    return 1.0 - sigma


def t_to_timestep(t: Any, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Any:
    """The transformer's ``timestep`` input at our time ``t``: ``num_train_timesteps * (1 - t)``."""
    return num_train_timesteps * (1.0 - t)


def velocity_from_diffusers(model_output: Any) -> Any:
    """Our velocity ``v = dx/dt`` from SD3's prediction ``noise - x_data``: ``-model_output``."""
    return -model_output


def velocity_to_diffusers(v: Any) -> Any:
    """SD3's ``noise - x_data`` target from our velocity: ``-v``."""
    return -v


def diffusers_noisy_sample(x_data: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """diffusers' ``scale_noise``: ``(1 - sigma) x_data + sigma noise``, ``sigma [B]`` broadcast over the rest."""
    s = jnp.reshape(sigma, jnp.shape(sigma) + (1,) * (x_data.ndim - jnp.ndim(sigma)))
    return (1.0 - s) * x_data + s * noise


def diffusers_euler_step(sample: jax.Array, model_output: jax.Array, sigma: Any, sigma_next: Any) -> jax.Array:
    """diffusers' deterministic ``FlowMatchEulerDiscreteScheduler.step``: ``x + (sigma_next - sigma) out``."""
    return sample + (sigma_next - sigma) * model_output


# ----------------------------------------------------------------------------------------------------------
# The MMDiT as our velocity field over prompt ids
# ----------------------------------------------------------------------------------------------------------


class PromptTable(nnx.Variable):
    """Non-trainable prompt-embedding arrays (never in the ``nnx.Param`` / ``nnx.LoRAParam`` filters)."""


def _as_table(x: Any, dtype: Any) -> Any:
    """``x`` as an array of ``dtype``: host (numpy) arrays stay on the host (placed sharded later), traced /
    device arrays stay jax arrays (no copy when already of ``dtype``)."""
    if isinstance(x, (jax.Array, jax.core.Tracer)):
        return x if dtype is None or x.dtype == jnp.dtype(dtype) else x.astype(dtype)
    x = np.asarray(x)
    return x if dtype is None else x.astype(jnp.dtype(dtype))


def prompt_table_sharding(shape: tuple[int, ...], mesh: jax.sharding.Mesh, row_axis: str | None = "embed",
                          rules: Any = None) -> jax.sharding.NamedSharding:
    """The ``NamedSharding`` of a :class:`PromptTable` array of ``shape`` on ``mesh``: rows on ``row_axis``'s
    mesh axis (``embed`` -> ``fsdp`` by the default rules; replicated when the rows do not divide it), the rest
    replicated -- what the policy's frozen-state shardings give the table."""
    from adrpo_jax import train  # pylint: disable=import-outside-toplevel
    names = (row_axis,) + (None,) * (len(shape) - 1)
    spec = train.logical_to_partition_spec(names, shape, mesh, train.DEFAULT_LOGICAL_RULES if rules is None else rules,
                                           name="prompt_table")
    return jax.sharding.NamedSharding(mesh, spec)


def _row_block(source: Any, rows: int, index: tuple[slice, ...], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The block ``index`` of the ``[rows, *shape[1:]]`` table ``source`` (``[n, ...]`` with ``n <= rows``; rows
    ``n..rows-1`` are zeros) in ``dtype``, reading only ``source`` rows inside the block (a memory-mapped
    ``source`` reads only their pages) and converting them straight into the block."""
    start, stop, step = index[0].indices(rows)
    if step != 1:
        raise ValueError(f"a prompt-table shard must be a contiguous row range, got {index[0]}")
    cols = index[1:]
    block_shape = (stop - start,) + tuple(len(range(*c.indices(d))) for c, d in zip(cols, shape[1:], strict=True))
    out = np.zeros(block_shape, dtype)
    hi = min(stop, int(source.shape[0]))
    if start < hi:
        part = source[start:hi]
        part = np.reshape(part, (hi - start, *shape[1:])) if tuple(part.shape[1:]) != tuple(shape[1:]) else part
        out[:hi - start] = part[(slice(None), *cols)]
    return out


def shard_prompt_table(source: Any, rows: int, mesh: jax.sharding.Mesh, dtype: Any, *,
                       flatten: bool = False, row_axis: str | None = "embed") -> jax.Array:
    """The device table ``[rows, ...]`` of ``source`` in ``dtype``, sharded by :func:`prompt_table_sharding`,
    built without a full host copy.

    ``source``: ``[n, ...]`` host rows (``n <= rows``; rows ``n..rows-1`` are zero padding), any array-like that
    slices rows: a ``np.memmap`` of the prompt-embedding cache (:mod:`adrpo_jax.flow.text_embeddings`) reads
    only the indexed rows from disk. ``flatten``: store ``[rows, prod(rest)]`` (the :class:`MMDiTVelocity`
    layout of the text states). For each distinct shard of the devices this process addresses (replicas of a
    shard on several local devices are read once), the shard's rows are read and converted to ``dtype`` into
    one host block, copied to those devices, and dropped before the next shard: the host holds at most one
    shard at a time (``rows / fsdp`` rows), and a process reads only the rows its devices hold. Multi-process:
    every process calls it (no communication)."""
    n = int(source.shape[0])
    if n > rows:
        raise ValueError(f"the table has {n} rows, more than the {rows} rows asked for")
    rest = tuple(int(d) for d in source.shape[1:])
    shape = (rows, int(np.prod(rest))) if flatten else (rows, *rest)
    sharding = prompt_table_sharding(shape, mesh, row_axis)
    groups: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        assert index is not None  # jax types the map's values Optional; a NamedSharding's are never None
        key = tuple((s.start, s.stop, s.step) for s in index)
        groups.setdefault(key, [index]).append(device)
    arrays: dict[Any, jax.Array] = {}
    for index, *devices in groups.values():
        block = _row_block(source, rows, index, shape, jnp.dtype(dtype))
        for device in devices:
            arrays[device] = jax.device_put(block, device)
        jax.block_until_ready([arrays[d] for d in devices])  # the host block is dropped before the next read
        del block
    return jax.make_array_from_single_device_arrays(
        shape, sharding, [arrays[d] for d in sharding.addressable_devices_indices_map(shape)])


class MMDiTVelocity(nnx.Module):
    """``v(x, t, cond, drop_mask=None)`` of an SD3 transformer in our convention, over integer prompt ids.

    Args:
      transformer: an :mod:`adrpo_jax.models.mmdit` model (``transformer(latents NHWC, timestep [B] on the
        0..1000 scale, encoder_hidden_states [B, L, D], pooled_projections [B, P])`` -> diffusers' ``.sample``).
      embeddings: ``[N, L, D]`` text states of the prompt set (the null / empty prompt among the rows), or
        already flattened ``[N, L * D]`` with ``text_shape = (L, D)`` (e.g. the device table of
        :func:`shard_prompt_table`, placed as is).
      pooled: ``[N, P]`` pooled text embeddings.
      null_id: the row of the empty prompt (CFG's unconditional branch and ``drop_mask`` rows).
      num_train_timesteps: the timestep scale (1000 for SD3).
      dtype: the table's storage dtype (None: as given; the trainer stores it in the compute dtype).
      row_axis: the logical axis name of the table's rows (``"embed"``: sharded over ``fsdp`` like the weights'
        embedding axis, when the row count divides it; None: replicated).
      text_shape: ``(L, D)`` of a flattened ``embeddings`` (None: ``embeddings`` is ``[N, L, D]``).

    ``embeddings`` / ``pooled`` are stored as :class:`PromptTable` variables, ``embeddings`` flattened to
    ``[N, L * D]`` (a row gather of a sharded 2-D table needs no relayout copy of the table on TPU); numpy inputs
    stay on the host until the model's state is placed. The transformer casts to its compute dtype. Attribute
    ``null_class`` (= ``null_id``) mirrors the DiT's; ``text_shape`` = ``(L, D)``.
    """

    def __init__(self, transformer: nnx.Module, embeddings: Any, pooled: Any, *, null_id: int,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, dtype: Any = None, row_axis: str | None = "embed",
                 text_shape: tuple[int, int] | None = None):
        embeddings, pooled = _as_table(embeddings, dtype), _as_table(pooled, dtype)
        if text_shape is not None:
            text_shape = (int(text_shape[0]), int(text_shape[1]))
            if embeddings.ndim == 3 and tuple(embeddings.shape[1:]) != text_shape:
                raise ValueError(f"`embeddings` is {embeddings.shape}, not [N, *text_shape={text_shape}].")
            if embeddings.ndim == 2 and embeddings.shape[1] != text_shape[0] * text_shape[1]:
                raise ValueError(f"flattened `embeddings` {embeddings.shape} must be [N, L * D] with (L, D) = "
                                 f"`text_shape` {text_shape}.")
        if embeddings.ndim != 3 and not (embeddings.ndim == 2 and text_shape is not None):
            raise ValueError(f"`embeddings` must be [N, L, D] (or [N, L * D] with `text_shape`), got shape "
                             f"{embeddings.shape}.")
        if pooled.ndim != 2 or pooled.shape[0] != embeddings.shape[0]:
            raise ValueError(f"`pooled` must be [N, P] with N = {embeddings.shape[0]} (the rows of `embeddings`), "
                             f"got shape {pooled.shape}.")
        n = int(embeddings.shape[0])
        if not 0 <= int(null_id) < n:
            raise ValueError(f"`null_id`={null_id} must be a row of the prompt table (0..{n - 1}).")
        self.transformer = transformer
        if embeddings.ndim == 3:
            text_shape = (int(embeddings.shape[1]), int(embeddings.shape[2]))
        assert text_shape is not None  # a flattened [N, L * D] table needs it (checked above)
        self.text_shape: tuple[int, int] = text_shape
        flat = embeddings if embeddings.ndim == 2 else embeddings.reshape(n, -1)
        with nnx.use_eager_sharding(False):  # logical names are metadata: placed by the trainer's shardings
            self.embeddings = PromptTable(flat, out_sharding=(row_axis, None))
            self.pooled = PromptTable(pooled, out_sharding=(row_axis, None))
        self.null_id = int(null_id)
        self.num_prompts = n
        self.num_train_timesteps = int(num_train_timesteps)

    @property
    def null_class(self) -> int:
        return self.null_id

    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array, *,
                 drop_mask: jax.Array | None = None) -> jax.Array:
        """Velocity ``[B, h, w, c]`` float32 at latents ``x [B, h, w, c]``, our time ``t [B]`` (or scalar),
        prompt ids ``cond [B]`` int; ``drop_mask [B]`` bool rows use the empty prompt."""
        if x.ndim != 4:
            raise ValueError(f"`x` must be latents [B, h, w, c], got shape {x.shape}.")
        b = x.shape[0]
        cond = jnp.asarray(cond)
        if cond.shape != (b,) or not jnp.issubdtype(cond.dtype, jnp.integer):
            raise ValueError(f"`cond` must be [{b}] int prompt ids, got shape {cond.shape} dtype {cond.dtype}.")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        if drop_mask is not None:
            drop_mask = jnp.asarray(drop_mask)
            if drop_mask.shape != (b,):
                raise ValueError(f"`drop_mask` must have shape ({b},), got {drop_mask.shape}.")
            cond = jnp.where(drop_mask.astype(bool), jnp.asarray(self.null_id, cond.dtype), cond)
        states = jnp.take(self.embeddings[...], cond, axis=0).reshape((b, *self.text_shape))
        pooled = jnp.take(self.pooled[...], cond, axis=0)
        out = self.transformer(x, t_to_timestep(t, self.num_train_timesteps), states, pooled)
        return velocity_from_diffusers(out.astype(jnp.float32))


class _LatentReward:
    """``image_reward`` behind a decode (see :func:`make_latent_reward`); keeps ``components`` when it has them."""

    def __init__(self, decode, image_reward):
        self.decode, self.image_reward = decode, image_reward
        if hasattr(image_reward, "components"):
            self.components = lambda latents, cond: image_reward.components(decode(latents), cond)

    def __call__(self, latents, cond):
        return self.image_reward(self.decode(latents), cond)


def make_latent_reward(decode: Callable[[jax.Array], jax.Array], image_reward: Callable[..., jax.Array]
                       ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``reward(latents [B, h, w, c], cond [B]) -> [B]``: ``image_reward(decode(latents), cond)`` (and
    ``reward.components(latents, cond)`` when ``image_reward`` has ``components``).

    ``decode`` maps the sampler's (scaled) latents to images ``[B, H, W, 3]`` in ``[-1, 1]`` (e.g. VAE
    unscale + decode); the composition is pure, so the flow step decodes inside its jitted rollout."""
    return _LatentReward(decode, image_reward)


# ----------------------------------------------------------------------------------------------------------
# Shapes without weights (the plan mode) and the CLIP score as a pure function
# ----------------------------------------------------------------------------------------------------------

#: CLIP's text tokens in the SD3 prompt states: ``L = CLIP_TEXT_TOKENS + text.max_sequence_length``.
CLIP_TEXT_TOKENS = 77

#: CLIP vision towers by name: the ``vision_config`` fields of their ``config.json`` (+ ``projection_dim``).
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    # openai/clip-vit-large-patch14 (the paper's CLIP score)
    "clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768,
                                   hidden_act="quick_gelu", layer_norm_eps=1e-5),
}

#: The released SD3-family pipelines by name: their MMDiT (:data:`adrpo_jax.models.mmdit.PRESETS`), VAE
#: (``vae.sd3_config``: all three share it) and the CLIP reward tower the recipe pairs them with.
PRESETS: dict[str, dict[str, str]] = {
    name: {"transformer": name, "vae": "sd3", "clip": "clip-vit-large-patch14"}
    for name in ("sd3-medium", "sd3.5-medium", "sd3.5-large")
}


def clip_vision_spec(source: Any) -> tuple[Any, int]:
    """``(CLIPVisionSpec, intermediate_size)`` of a CLIP vision tower from a ``CLIPModel`` directory's
    ``config.json`` (no weights read) or a :data:`CLIP_PRESETS` name / dict."""
    import json  # pylint: disable=import-outside-toplevel
    import os  # pylint: disable=import-outside-toplevel

    from adrpo_jax.flow.clip_reward import CLIPVisionSpec  # pylint: disable=import-outside-toplevel
    if isinstance(source, str) and source in CLIP_PRESETS:
        d, proj = dict(CLIP_PRESETS[source]), CLIP_PRESETS[source]["projection_dim"]
    elif isinstance(source, dict):
        d, proj = dict(source), source["projection_dim"]
    else:
        path = os.path.join(os.path.expanduser(os.fspath(source)), "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{os.fspath(source)!r} is neither a CLIP preset ({sorted(CLIP_PRESETS)}) nor a CLIPModel "
                             "directory with a config.json.")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        d = dict(raw.get("vision_config", raw))
        proj = int(raw.get("projection_dim", d.get("projection_dim", 512)))
    spec = CLIPVisionSpec(hidden_size=int(d["hidden_size"]), num_layers=int(d["num_hidden_layers"]),
                          num_heads=int(d["num_attention_heads"]), patch_size=int(d["patch_size"]),
                          image_size=int(d["image_size"]), projection_dim=int(proj),
                          hidden_act=str(d.get("hidden_act", "quick_gelu")),
                          layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)))
    return spec, int(d["intermediate_size"])


def clip_vision_shapes(spec: Any, intermediate_size: int) -> dict[str, Any]:
    """The parameter tree of :func:`adrpo_jax.flow.clip_reward.load_clip_vision` as float32
    ``ShapeDtypeStruct`` s (shapes only)."""
    h, n, i, p = spec.hidden_size, spec.num_layers, int(intermediate_size), spec.patch_size
    f32 = lambda *shape: jax.ShapeDtypeStruct(tuple(shape), jnp.float32)  # noqa: E731
    ln = lambda *lead: {"scale": f32(*lead, h), "bias": f32(*lead, h)}  # noqa: E731
    dense = lambda a, b: {"kernel": f32(n, a, b), "bias": f32(n, b)}  # noqa: E731
    grid = spec.image_size // p
    return {"class_embedding": f32(h), "patch_kernel": f32(p * p * 3, h), "position_embedding": f32(grid * grid + 1, h),
            "pre_ln": ln(), "post_ln": ln(), "projection": f32(h, spec.projection_dim),
            "layers": {"ln1": ln(n), "ln2": ln(n), "q": dense(h, h), "k": dense(h, h), "v": dense(h, h),
                       "o": dense(h, h), "fc1": dense(h, i), "fc2": dense(i, h)}}


def clip_score_components(state: dict[str, Any], spec: Any, images: jax.Array, cond: jax.Array, *,
                          scale: float, clamp: bool, dtype: Any = jnp.float32
                          ) -> tuple[dict[str, jax.Array], jax.Array]:
    """The CLIP score of :class:`adrpo_jax.flow.clip_reward.CLIPScoreReward` as a pure function of its arrays
    ``state = {"params", "text" [N, E] unit rows}``: ``({"reward": scale * max(cos, 0) (or cos), "clip_cosine":
    cos}, image_embeddings [B, E])`` for ``images [B, H, W, 3]`` in ``[-1, 1]`` and prompt rows ``cond [B]``
    (the unnormalized image embeddings are what ClipDiversity measures)."""
    from adrpo_jax.flow.clip_reward import clip_image_features, clip_preprocess  # pylint: disable=import-outside-toplevel
    feats = clip_image_features(state["params"], spec, clip_preprocess(images, spec, "minus_one_one"), dtype=dtype)
    unit = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
    cos = jnp.sum(unit * jnp.take(state["text"], cond, axis=0), axis=-1)
    score = jnp.maximum(cos, 0.0) if clamp else cos
    return {"reward": scale * score, "clip_cosine": cos}, feats
