"""GRPO / ADRPO on audio LLMs (spoken questions): the ``'audio'`` recipe (``config.trainer = 'audio'`` or
``'adrpo_jax.rl.audio_trainer:train_and_evaluate'``).

    python launch.py --config=configs/audio_arith.py:cpu --workdir=/tmp/audio_adrpo

The text recipe (:class:`adrpo_jax.rl.trainer.RLTrainer`) with another prompt front end (:meth:`AudioRLTrainer.
prompt_inputs`); everything else (rollout, log-probs, update, refreshes, evaluator, phase timing) is the text
recipe's. Per RL step:

1. this process's rows (``rl.num_prompts_per_step`` prompts x ``rl.group_size``) from the audio source
   (:mod:`adrpo_jax.rl.audio_data`: the built-in spoken-arithmetic / beep tasks or an AVQA/MMAU-style jsonl);
   their log-mel features ``[B, n_mels, 100 * audio.seconds]`` (cached per clip on the host);
2. the **frozen** audio encoder runs once per *prompt* (row ``G * j`` of each group; jitted), its embeddings
   ``audio_embeds [B, A, D]`` / ``audio_valid [B, A]`` are repeated over the group's G rows and reused by the
   sampler's prefill, the old-policy and reference log-prob passes and every update of the step (the batch's
   ``model_inputs``, see :func:`adrpo_jax.rl.step.completion_logprobs`): the encoder is never run again for it;
3. the prompt text holds one ``audio.audio_token`` per valid encoder output (counted from ``audio_valid``),
   wrapped by ``audio.audio_template`` (``'{audio}'`` -> the tokens), then the row's text prompt; it is
   rendered (chat template optional) and left-padded to ``sampling.max_prompt_length`` (a prompt that does
   not fit is an error: cutting audio tokens would misalign the splice);
4. the text trainer's rewards, advantages, ADRPO update, checkpoints and resume (bit-identical: the audio
   rows are a function of ``(seed, position)`` like the text ones).

The model (:mod:`adrpo_jax.models.audio_llm`): ``model.path = 'builtin:tiny_audio_arith'`` (a tiny random
audio LM briefly supervised on the spoken task, :mod:`adrpo_jax.rl.audio_sft`, cached) or a local transformers
directory of ``qwen2_audio`` / ``qwen2_5_omni(_thinker)``. Trainable: the LM's parameters (``audio.freeze_encoder``,
default) or its LoRA adapters (``lora.enabled``); with LoRA the reference is the same weights with the adapters
off. Single process (multi-host audio rollouts are not implemented).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax import train
from adrpo_jax.models.llm.sampler import SamplingConfig, make_generate_fn
from adrpo_jax.models.lora import apply_lora
from adrpo_jax.rl import audio_data
from adrpo_jax.rl import config as config_lib
from adrpo_jax.rl import data as data_lib
from adrpo_jax.rl.config import AUDIO_TASKS, add_audio_config, validate_audio_config  # noqa: F401 (re-exported)
from adrpo_jax.rl.trainer import _DTYPES, RLTrainer
from adrpo_jax.train.config import ConfigError
from adrpo_jax.train.programs import Program

__all__ = ["AudioRLTrainer", "add_audio_config", "validate_audio_config", "make_audio_source", "train_and_evaluate"]


def make_audio_source(config: Any, seed: int, *, eval_split: bool = False):
    """The audio prompt source of ``config.audio.task`` (``eval_split``: the eval file / a fixed eval seed)."""
    a = config.audio
    if a.task == "jsonl":
        path = config.eval.path if eval_split and config.eval.path else config.data.path
        return audio_data.AudioChoiceJsonlSource(os.path.expanduser(path))
    kwargs = dict(min_value=int(a.min_value), max_value=int(a.max_value), operations=tuple(a.operations),
                  min_beeps=int(a.min_beeps), max_beeps=int(a.max_beeps), seconds=min(2.0, float(a.seconds)),
                  cache_dir=a.cache_dir or None)
    return audio_data.make_audio_task(a.task, seed=data_lib.EVAL_ARITHMETIC_SEED if eval_split else seed, **kwargs)


def resolve_audio_model(config: Any) -> tuple[Path, Path]:
    """``(model_dir, tokenizer_dir)``; builds the tiny supervised audio model on first use."""
    path = config.model.path
    if path == "builtin:tiny_audio_arith":
        from adrpo_jax.rl.audio_sft import ensure_tiny_audio_model  # pylint: disable=import-outside-toplevel
        model_dir = ensure_tiny_audio_model(config)
    else:
        model_dir = Path(os.path.expanduser(path))
    tok = Path(os.path.expanduser(config.model.tokenizer_path)) if config.model.tokenizer_path else model_dir
    return model_dir, tok


def _load_audio_model(model_dir: Path, config: Any):
    from adrpo_jax.models import audio_llm  # pylint: disable=import-outside-toplevel
    m = config.model
    try:
        model = audio_llm.load_pretrained(model_dir, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype])
    except TypeError:  # a loader without dtype arguments
        model = audio_llm.load_pretrained(model_dir)
    if (Path(model_dir) / "sft_params.npz").exists():  # the built-in tiny model's supervised parameters
        from adrpo_jax.rl.audio_sft import load_params_npz  # pylint: disable=import-outside-toplevel
        load_params_npz(model, Path(model_dir) / "sft_params.npz")
    return model


def _lm_only(path, value) -> bool:  # the trainable filter with a frozen encoder: the LM's parameters
    return isinstance(value, nnx.Param) and len(path) > 0 and str(path[0]) == "lm"


class AudioRLTrainer(RLTrainer):
    """The audio recipe: :class:`RLTrainer` with the audio prompt front end (module docstring). Trainable: the
    LM's parameters (``audio.freeze_encoder``, default), everything, or the LM's LoRA adapters."""

    name = "audio"
    model_input_names = ("audio_embeds", "audio_valid")

    def __init__(self, config: Any, workdir: str | os.PathLike, **kwargs: Any):
        add_audio_config(config)
        if jax.process_count() > 1:
            raise ConfigError("the audio trainer runs in a single process (multi-host audio rollouts are not "
                              "implemented).", key="mesh")
        super().__init__(config, workdir, **kwargs)

    @staticmethod
    def validate(config: Any) -> None:
        validate_audio_config(config)

    def default_trainable(self) -> Any:
        return _lm_only if bool(self.config.audio.freeze_encoder) else nnx.Param

    def _setup_model(self) -> None:
        config, a = self.config, self.config.audio
        self.model_dir, tokenizer_dir = resolve_audio_model(config)
        self.audio_token, self.audio_template = a.audio_token, a.audio_template
        model = _load_audio_model(self.model_dir, config)
        if self.lora_cfg is not None:  # adapters on the LM only, initialized here (part of the initial policy)
            apply_lora(model.lm, self.lora_cfg, rngs=self._lora_rngs())
        self._model = model
        self.model_config = model.lm.config
        self.lm_graphdef = nnx.graphdef(model.lm)
        self.features = audio_data.LogMelFeatures(n_mels=int(a.n_mels), seconds=float(a.seconds))
        self._feature_cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._setup_text_io(tokenizer_dir)

    def _new_model(self):
        return self._model

    def _load_pretrained(self):
        model, self._model = self._model, None
        return model

    def make_prompt_source(self):
        return make_audio_source(self.config, int(self.config.seed))

    def make_eval_examples(self) -> list[dict[str, Any]]:
        source = make_audio_source(self.config, int(self.config.seed), eval_split=True)
        return [source[i] for i in range(min(int(self.config.eval.num_examples), len(source)))]

    def _shared_prompt_group(self) -> int:
        return 1  # the audio is shared per prompt already (encoded once per prompt)

    def make_generate(self, sampling: SamplingConfig):
        gen = make_generate_fn(self.lm_graphdef, sampling, self.mesh)
        graphdef = self.graphdef

        def fn(params, frozen, tokens, mask, key, audio_embeds, audio_valid):
            model = nnx.merge(graphdef, params, frozen)
            embeds = model.embed_inputs(tokens, audio_embeds, audio_valid)
            return gen(nnx.state(model.lm), tokens, mask, key, prompt_embeds=embeds)

        return fn

    def generate_extra(self, model_inputs: dict[str, Any] | None) -> tuple:
        return (model_inputs["audio_embeds"], model_inputs["audio_valid"])

    def _model_input_structs(self, batch: int) -> tuple:
        bs = train.batch_sharding(self.mesh)
        a = self.config.audio
        frames = int(round(100 * float(a.seconds)))
        feats = (jax.ShapeDtypeStruct((batch, int(a.n_mels), frames), jnp.float32, sharding=bs),
                 jax.ShapeDtypeStruct((batch, frames), jnp.bool_, sharding=bs))
        emb, valid = jax.eval_shape(self.programs["audio/encode"].fn, self.abstract_state["params"],
                                    self.policy.abstract_frozen, *feats, 1)
        return (jax.ShapeDtypeStruct(emb.shape, emb.dtype, sharding=bs),
                jax.ShapeDtypeStruct(valid.shape, valid.dtype, sharding=bs))

    def build_programs(self) -> list[Program]:
        graphdef = self.graphdef
        bs = train.batch_sharding(self.mesh)

        def encode(params, frozen, features, feature_mask, group):
            model = nnx.merge(graphdef, params, frozen)
            emb, valid = model.encode_audio(features[::group], feature_mask[::group])  # once per prompt
            emb = jnp.repeat(jax.lax.stop_gradient(emb), group, axis=0)
            return emb, jnp.repeat(valid, group, axis=0)

        a = self.config.audio
        frames = int(round(100 * float(a.seconds)))
        b, g = self.layout["batch_size"], int(self.opts.group_size)
        encode_args = lambda: (self.abstract_state["params"], self.policy.abstract_frozen,  # noqa: E731
                               jax.ShapeDtypeStruct((b, int(a.n_mels), frames), jnp.float32, sharding=bs),
                               jax.ShapeDtypeStruct((b, frames), jnp.bool_, sharding=bs), g)
        encode_program = Program("audio/encode", encode, args=encode_args, static_argnums=(4,),
                                 out_shardings=(bs, bs), phase="rollout")
        return [encode_program, *super().build_programs()]

    @property
    def encode_audio(self):
        return self.fns["audio/encode"]

    # ---- the prompt front end --------------------------------------------------------------------------------

    def _row_features(self, rows) -> tuple[np.ndarray, np.ndarray]:
        out_f, out_m = [], []
        for r in rows:
            path = r["audio"]
            if path not in self._feature_cache:
                f, m = self.features.from_paths([path])
                self._feature_cache[path] = (f[0], m[0])
                while len(self._feature_cache) > int(self.config.audio.feature_cache_size):
                    self._feature_cache.popitem(last=False)
            f, m = self._feature_cache[path]
            out_f.append(f)
            out_m.append(m)
        return np.stack(out_f), np.stack(out_m)

    def audio_prompts(self, rows, state_params, group: int) -> tuple[dict[str, Any], list[str], np.ndarray]:
        """Encodes the rows' audio (once per prompt) and builds their prompt texts; returns
        ``(global {tokens, mask, truncated, audio_embeds, audio_valid}, prompt texts, audio token counts)``."""
        feats, fmask = self._row_features(rows)
        g = train.host_local_to_global({"features": feats, "feature_mask": fmask}, self.mesh)
        emb, valid = self.encode_audio(state_params, self.frozen, g["features"], g["feature_mask"], group)
        counts = np.asarray(train.global_to_host_local(valid)).sum(axis=1)
        prompts = [self.audio_template.format(audio=self.audio_token * int(c)) + r["prompt"]
                   for r, c in zip(rows, counts)]
        tokens, pmask, ptrunc = self.encoder.encode(prompts)
        if ptrunc.any():
            i = int(np.argmax(ptrunc))
            raise ValueError(f"a prompt of {len(self.tokenizer(self.encoder.render(prompts[i]))['input_ids'])} "
                             f"tokens ({int(counts[i])} audio tokens) exceeds sampling.max_prompt_length="
                             f"{self.encoder.max_prompt_length}: raise it (audio tokens cannot be cut)")
        t = train.host_local_to_global({"tokens": tokens, "mask": pmask, "truncated": ptrunc}, self.mesh)
        t.update(audio_embeds=emb, audio_valid=valid)
        return t, [r["prompt"] for r in rows], counts

    def prompt_inputs(self, rows, state, group: int):
        g, prompts, _ = self.audio_prompts(rows, state["params"], group)
        model_inputs = {"audio_embeds": g["audio_embeds"], "audio_valid": g["audio_valid"]}
        return g, model_inputs, prompts, [r.get("transcript", r["prompt"]) for r in rows]

    def export(self, params, path: str | os.PathLike) -> Path:
        """Writes the trained policy's parameters (merged LoRA when used) as ``params.npz`` (flat ``'a/b/c'``
        keys of ``nnx.to_pure_dict``) in ``path``."""
        from flax import traverse_util  # pylint: disable=import-outside-toplevel
        model = self.policy.merged(params)
        flat = {"/".join(map(str, k)): np.asarray(v)
                for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez(path / "params.npz", **flat)
        return path

    def load_final(self, path: Path) -> Any:
        """The trainable parameters of an exported ``params.npz`` (written by :meth:`export`)."""
        from adrpo_jax.rl.audio_sft import load_params_npz  # pylint: disable=import-outside-toplevel
        model = nnx.merge(self.graphdef, self.abstract_state["params"], self.frozen)  # every Param is replaced
        load_params_npz(model, Path(path) / "params.npz")
        return jax.device_put(nnx.state(model, self.trainable), self.state_shardings["params"])


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) GRPO / ADRPO on audio prompts; returns the last logged metrics (see ``Recipe.run``)."""
    return AudioRLTrainer(config, workdir).run()
