"""GRPO / ADRPO on audio LLMs (spoken questions): the ``'audio'`` recipe (``config.trainer = 'audio'`` or
``'adrpo_jax.rl.audio_trainer:train_and_evaluate'``).

    python launch.py --config=configs/audio_arith.py:cpu --workdir=/tmp/audio_adrpo
    python launch.py --config=configs/audio_arith.py:tpu --workdir=/tmp/plan --mode=plan   # compiled for a v5e-8

The text recipe (:class:`adrpo_jax.rl.trainer.RLTrainer`) with another prompt front end (:meth:`AudioRLTrainer.
prompt_inputs`); everything else (rollout, log-probs, update, refreshes, evaluator, phase timing) is the text
recipe's. Per RL step:

1. this process's rows (``rl.num_prompts_per_step`` prompts x ``rl.group_size``) from the audio source
   (:mod:`adrpo_jax.rl.audio_data`: the built-in spoken-arithmetic / beep tasks or an AVQA/MMAU-style jsonl,
   checked at start before the model loads: :func:`adrpo_jax.rl.audio_data.check_audio_data`);
   each clip's log-mel features (:meth:`LogMelFeatures.for_encoder <adrpo_jax.rl.audio_data.LogMelFeatures.
   for_encoder>`: Qwen2-Audio's fixed 30 s window, or the Omni thinker's 2 s chunks up to ``audio.seconds``)
   computed once and cached per clip on the host at its own width, stacked per batch (``LogMelFeatures.stack``);
2. the **frozen** audio encoder (program ``audio/encode``) runs once per *prompt*: the host sends the features of
   row ``G * j`` of each group only (``[B / G, n_mels, F]``; every row when a device's rows do not hold whole
   groups), and the embeddings ``audio_embeds [B, A, D]`` / ``audio_valid [B, A]`` are repeated over the
   group's G rows on the device. They are reused by the sampler's prefill (each prompt prefilled once for its
   G rows: ``prompt_group_size = G``), the old-policy and reference log-prob passes and every update of the
   step (the batch's ``model_inputs``, see :func:`adrpo_jax.rl.step.completion_logprobs`). The splice is per
   row (:func:`adrpo_jax.models.audio_llm.splice_audio`): nothing is gathered across the sharded batch;
3. the prompt text holds one ``audio.audio_token`` per valid encoder output (counted from ``audio_valid``),
   wrapped by ``audio.audio_template`` (``'{audio}'`` -> the tokens), then the row's text prompt; it is
   rendered (chat template optional) and left-padded to ``sampling.max_prompt_length`` (a prompt that does
   not fit is an error: cutting audio tokens would misalign the splice), and the host checks that each
   tokenized prompt holds exactly its count of audio tokens
   (:func:`~adrpo_jax.models.audio_llm.check_audio_token_counts`: a question or option containing the audio
   token's text is an error, not a silent misalignment inside jit);
4. the text trainer's rewards (a step whose every reward is missing stops, ``rewards.stop_when_all_missing``),
   advantages, ADRPO update, checkpoints and resume (bit-identical: the audio rows are a function of
   ``(seed, position)`` like the text ones).

**Fixed shapes.** Every program has one shape per run, so the plan mode compiles exactly what runs: the LLM
programs see ``audio_embeds [B, A, D]`` with ``A`` the audio tokens of the longest window (``audio.seconds``;
750 for 30 s); the encoder's output is zero-padded (``audio_valid`` False) up to it. The Omni encoder itself
runs each batch at the batch's longest clip rounded up to its 2 s chunk (a 10 s batch runs 5 chunks, not 15):
``audio/encode`` compiles once per such width (at most ``ceil(audio.seconds / 2)`` variants); the programs a
plan declares (``audio/encode``, ``eval/audio_encode``) are at the longest width, an upper bound of every
variant's memory and cost. Qwen2-Audio's encoder runs its fixed window (one shape).

Metrics beyond the text recipe's: ``audio/clips_cut`` / ``audio/clips_cut_fraction`` (distinct clips longer than
``audio.seconds``, cut to it; the first one is also logged as a warning) and, when the eval rows carry MMAU's
``task`` column, ``eval/accuracy/<category>`` (sound / music / speech) and ``eval/accuracy_macro``
(:func:`~adrpo_jax.rl.audio_data.accuracy_by_category`). The eval runs in chunks of ``eval.batch_size`` prompts.

Config keys of the ``audio`` section (:func:`adrpo_jax.rl.config.add_audio_config`): ``task``, ``seconds``,
``n_mels`` (must equal the encoder's mel bins), ``audio_token``, ``audio_template``, ``choice_format``
(``'letter'``: the jsonl prompts ask for the option's letter, scored by ``choice_accuracy``; ``'text'``: for its
text, R1-AQA's format, scored as MMAU's own evaluation does by ``mmau_accuracy``: the MMAU-comparable setting),
``freeze_encoder`` (must be True: the encoder runs once per prompt outside the update, so ``False`` is refused
rather than silently ignored, and no optimizer state is allocated for it), the built-in tasks' keys,
``cache_dir``, ``feature_cache_size``. ``data.on_bad_row`` (``raise`` | ``skip``) applies to the jsonl rows.

The model (:mod:`adrpo_jax.models.audio_llm`): ``model.path = 'builtin:tiny_audio_arith'`` (a tiny random
audio LM briefly supervised on the spoken task, :mod:`adrpo_jax.rl.audio_sft`, cached), a local transformers
directory of ``qwen2_audio`` / ``qwen2_5_omni(_thinker)`` (loaded sharded over the mesh), or, for the plan mode
only, a shape preset (``'preset:qwen2.5-omni-7b'``, ``'preset:qwen2-audio-7b'``:
:mod:`adrpo_jax.models.audio_presets`). Trainable: the LM's parameters or its LoRA adapters (``lora.enabled``);
with LoRA the reference is the same weights with the adapters off. ``model.remat``, ``remat_policy``,
``scan_layers`` and the attention keys apply to the LM. Single process (multi-host audio rollouts are not
implemented).

``AudioRLTrainer(config, workdir, mesh=<a TPU topology mesh>, abstract=True)`` (the plan mode) builds without
weights, tokenizer or data: shapes from ``model.path``'s ``config.json`` or a preset; its programs
(``audio/encode``, ``generate``, ``plan/prefill``, ``plan/decode``, ``logprobs``, ``update``,
``eval/audio_encode``, ``eval/generate``, ``eval/mean``) lower and compile for the target.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax import train
from adrpo_jax.models.llm.sampler import SamplingConfig, make_generate_fn, make_plan_fns
from adrpo_jax.models.lora import apply_lora
from adrpo_jax.rl import audio_data
from adrpo_jax.rl import data as data_lib
from adrpo_jax.rl.config import add_audio_config, validate_audio_config
from adrpo_jax.rl.trainer import _DTYPES, RLTrainer, _finite_scores, _model_overrides
from adrpo_jax.train.config import ConfigError
from adrpo_jax.train.programs import Program

__all__ = ["AudioRLTrainer", "add_audio_config", "validate_audio_config", "make_audio_source", "train_and_evaluate"]

log = logging.getLogger(__name__)

# rewards.functions / eval.accuracy_reward that read the answer as the option's text (MMAU's scorer)
_TEXT_SCORERS = ("mmau_accuracy",)


def _choice_template(config: Any) -> str:
    fmt = str(config.audio.get("choice_format", "letter"))
    return audio_data.TEXT_CHOICE_TEMPLATE if fmt == "text" else audio_data.DEFAULT_CHOICE_TEMPLATE


def _with_template(source: audio_data.AudioChoiceJsonlSource, template: str):
    """``source`` with every row's prompt rendered by ``template`` (the checked source was loaded with the default
    letter template)."""
    if template != audio_data.DEFAULT_CHOICE_TEMPLATE:
        for row in source.examples:
            row["prompt"] = audio_data.format_choices_prompt(row["question"], row["choices"], template)
    return source


def make_audio_source(config: Any, seed: int, *, eval_split: bool = False,
                      sources: dict[str, Any] | None = None):
    """The audio prompt source of ``config.audio.task`` (``eval_split``: the eval file / a fixed eval seed).

    jsonl: ``eval.path`` (else ``data.path``) for the eval split; rows that fail the load checks follow
    ``data.on_bad_row``; prompts follow ``audio.choice_format``. ``sources``: the already checked sources of
    :func:`adrpo_jax.rl.audio_data.check_audio_data` by key (``data.path`` / ``eval.path``), reused instead of
    reading the files again."""
    a = config.audio
    if a.task == "jsonl":
        key = "eval.path" if eval_split and config.eval.path else "data.path"
        template = _choice_template(config)
        if sources and key in sources:
            return _with_template(sources[key], template)
        path = config.eval.path if key == "eval.path" else config.data.path
        return audio_data.AudioChoiceJsonlSource(os.path.expanduser(path), template=template,
                                                 on_bad_row=str(config.data.get("on_bad_row", "raise")))
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


def _load_audio_model(model_dir: Path, config: Any, *, mesh: jax.sharding.Mesh | None = None):
    """The pre-trained audio LM of ``model_dir``, each parameter placed with its sharding on ``mesh``."""
    from adrpo_jax.models import audio_llm  # pylint: disable=import-outside-toplevel
    m = config.model
    model = audio_llm.load_pretrained(model_dir, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype],
                                      config_overrides=_model_overrides(m), mesh=mesh)
    if (Path(model_dir) / "sft_params.npz").exists():  # the built-in tiny model's supervised parameters
        from adrpo_jax.rl.audio_sft import load_params_npz  # pylint: disable=import-outside-toplevel
        load_params_npz(model, Path(model_dir) / "sft_params.npz")
    return model


def _tiny_audio_config(config: Any) -> dict[str, Any]:
    """The built-in tiny model's ``config.json`` (its cached directory's, else built the way
    :mod:`adrpo_jax.rl.audio_sft` writes it, without training: the plan needs shapes only)."""
    from adrpo_jax.rl import audio_sft  # pylint: disable=import-outside-toplevel
    cfg = audio_sft.sft_config_of(config)
    cached = audio_sft.tiny_audio_dir(cfg)
    if (cached / "config.json").exists():
        from adrpo_jax.models.audio_llm import _full_config  # pylint: disable=import-outside-toplevel
        return _full_config(cached)
    from transformers import Qwen2AudioConfig  # pylint: disable=import-outside-toplevel
    tok = audio_sft.build_char_tokenizer(extra_chars=(audio_sft.AUDIO_CHAR,))
    return Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=cfg.n_mels, encoder_layers=cfg.encoder_layers,
                          encoder_attention_heads=cfg.encoder_heads, encoder_ffn_dim=cfg.encoder_ffn,
                          d_model=cfg.encoder_dim, max_source_positions=round(cfg.seconds * 50)),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, max_position_embeddings=512),
        audio_token_index=tok.convert_tokens_to_ids(audio_sft.AUDIO_CHAR)).to_dict()


def _abstract_full_config(config: Any) -> dict[str, Any]:
    """The transformers config dict of ``model.path`` for a build without weights: a preset, the built-in tiny
    model, or a directory's ``config.json``."""
    from adrpo_jax.models import audio_llm  # pylint: disable=import-outside-toplevel
    from adrpo_jax.models.audio_presets import audio_preset, is_audio_preset  # pylint: disable=import-outside-toplevel
    path = str(config.model.path)
    if is_audio_preset(path):
        return audio_preset(path)
    if path == "builtin:tiny_audio_arith":
        return _tiny_audio_config(config)
    return audio_llm._full_config(Path(os.path.expanduser(path)))  # pylint: disable=protected-access


def _lm_only(path, value) -> bool:  # the trainable filter with a frozen encoder: the LM's parameters
    return isinstance(value, nnx.Param) and len(path) > 0 and str(path[0]) == "lm"


class _Rendered(Sequence):
    """The rendered prompt texts, rendered only when one is shown (an error message)."""

    def __init__(self, encoder: Any, prompts: Sequence[str]):
        self.encoder, self.prompts = encoder, prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):
        return self.encoder.render(self.prompts[i])


def _refuse_rollout_mesh(mesh: jax.sharding.Mesh | None) -> None:
    """The audio recipe samples on its training mesh (the config refuses ``mesh.rollout_devices`` for it)."""
    if mesh is not None:
        raise ValueError(f"the audio recipe has no separate rollout mesh (got one of shape {dict(mesh.shape)}): "
                         "set mesh.rollout_devices=0")


class AudioRLTrainer(RLTrainer):
    """The audio recipe: :class:`RLTrainer` with the audio prompt front end (module docstring). Trainable: the
    LM's parameters, or the LM's LoRA adapters (the encoder is frozen and has no optimizer state)."""

    name = "audio"
    model_input_names = ("audio_embeds", "audio_valid")

    def __init__(self, config: Any, workdir: str | os.PathLike, **kwargs: Any):
        add_audio_config(config)
        if jax.process_count() > 1:
            raise ConfigError("the audio trainer runs in a single process (multi-host audio rollouts are not "
                              "implemented).", key="mesh")
        self._in_eval = False
        self._eval_records: list[tuple[np.ndarray, Any]] = []
        super().__init__(config, workdir, **kwargs)
        if self.evaluator is not None:  # record each eval chunk's scores for the per-category accuracies
            self.evaluator.reward_fn = self._recording(self.evaluator.reward_fn)

    @staticmethod
    def validate(config: Any) -> None:
        validate_audio_config(config)
        if config.audio.task != "jsonl":
            return
        fmt = str(config.audio.get("choice_format", "letter"))
        wrong = _TEXT_SCORERS if fmt == "letter" else ()
        for key, names in (("eval.accuracy_reward", (config.eval.accuracy_reward,)),
                           ("rewards.functions", tuple(config.rewards.functions))):
            bad = [n for n in names if n in wrong]
            if bad:
                raise ConfigError(f"`{key}` uses {bad[0]!r} (MMAU's option-text scorer) but `audio.choice_format`="
                                  f"{fmt!r} asks for the option's letter, which it never scores as correct: set "
                                  "--config.audio.choice_format=text or use 'choice_accuracy'.", key=key,
                                  value=bad[0])

    def check_data(self) -> dict[str, Any]:
        """The audio jsonl files (every row and audio header) checked before the model loads
        (:func:`adrpo_jax.rl.audio_data.check_audio_data`); the sources are reused."""
        return audio_data.check_audio_data(self.config)

    def default_trainable(self) -> Any:
        return _lm_only  # audio.freeze_encoder=True (validated): the LM's parameters only

    # ---- the model ------------------------------------------------------------------------------------------

    def _setup_model(self) -> None:
        config, a, m = self.config, self.config.audio, self.config.model
        self.audio_token, self.audio_template = a.audio_token, a.audio_template
        self._model = None
        if self.abstract:  # shapes only: a preset or a config.json, no weights, no tokenizer
            from adrpo_jax.models import audio_llm  # pylint: disable=import-outside-toplevel
            self.model_dir, tokenizer_dir = None, None
            model_type, lm_config, audio_config, token_id, _ = audio_llm.resolve_configs(
                _abstract_full_config(config), dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype],
                **_model_overrides(m))
            spec = dict(lm_config=lm_config, audio_config=audio_config, audio_token_id=token_id, model_type=model_type)

            def build():
                model = audio_llm.AudioLM(**spec, freeze_encoder=True, rngs=nnx.Rngs(0))
                if self.lora_cfg is not None:
                    apply_lora(model.lm, self.lora_cfg, rngs=self._lora_rngs())
                return model

            # Traced once: tracing the encoder's per-parameter initializers costs O(params^2) in jax (a traced
            # array's `sharding` lookup walks the trace), ~40 s for Omni's 32 layers; _new_model then rebuilds
            # the same module from zeros, which traces in milliseconds.
            model = nnx.eval_shape(build)
            self._abstract_graphdef, self._abstract_tree = nnx.split(model)
        else:
            self.model_dir, tokenizer_dir = resolve_audio_model(config)
            model = _load_audio_model(self.model_dir, config, mesh=self.mesh)
            if self.lora_cfg is not None:  # adapters on the LM only, initialized here (part of the initial policy)
                apply_lora(model.lm, self.lora_cfg, rngs=self._lora_rngs())
            self._model = model
        self.audio_token_id = int(model.audio_token_id)
        self.model_config = model.lm.config
        self.lm_graphdef = nnx.graphdef(model.lm)
        self.features = self._make_features(getattr(model, "audio_config", None))
        self._feature_cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._setup_text_io(tokenizer_dir)

    def _make_features(self, audio_config: Any) -> audio_data.LogMelFeatures:
        """The log-mel front end the encoder takes (``LogMelFeatures.for_encoder``); a model without an encoder
        config (test stand-ins) gets the fixed ``audio.seconds`` window."""
        a = self.config.audio
        if audio_config is None:
            return audio_data.LogMelFeatures(n_mels=int(a.n_mels), seconds=float(a.seconds))
        if int(audio_config.num_mel_bins) != int(a.n_mels):
            raise ConfigError(f"`audio.n_mels`={a.n_mels} but the model's audio encoder takes "
                              f"{audio_config.num_mel_bins} mel bins: set --config.audio.n_mels="
                              f"{audio_config.num_mel_bins}.", key="audio.n_mels", value=a.n_mels)
        try:
            return audio_data.LogMelFeatures.for_encoder(audio_config, float(a.seconds))
        except ValueError as err:
            raise ConfigError(f"`audio.seconds`: {err}", key="audio.seconds", value=a.seconds) from None

    def _new_model(self):
        """The policy's module: the loaded model (run), or one of the resolved configs' shapes (plan: zeros, only
        ever built under ``nnx.eval_shape``), with LoRA adapters on the LM when enabled."""
        if self._model is not None or not self.abstract:
            return self._model
        return nnx.merge(self._abstract_graphdef,
                         jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self._abstract_tree))

    def _load_pretrained(self):
        model, self._model = self._model, None
        return model

    # ---- data -------------------------------------------------------------------------------------------------

    def make_prompt_source(self):
        return make_audio_source(self.config, int(self.config.seed), sources=self.data_sources)

    def make_eval_examples(self) -> list[dict[str, Any]]:
        source = make_audio_source(self.config, int(self.config.seed), eval_split=True, sources=self.data_sources)
        return [source[i] for i in range(min(int(self.config.eval.num_examples), len(source)))]

    # ---- programs ---------------------------------------------------------------------------------------------

    @property
    def encode_group(self) -> int:
        """Rows per encoded clip in a rollout: G when each device's rows hold whole groups (the host sends one
        clip per prompt), else 1 (every row's clip is encoded)."""
        return int(self.sampling.prompt_group_size)

    def make_generate(self, sampling: SamplingConfig, mesh: jax.sharding.Mesh | None = None):
        _refuse_rollout_mesh(mesh)
        gen = make_generate_fn(self.lm_graphdef, sampling, self.mesh)
        graphdef, mesh = self.graphdef, self.mesh

        def fn(params, frozen, tokens, mask, key, audio_embeds, audio_valid):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                model = nnx.merge(graphdef, params, frozen)
                embeds = model.embed_inputs(tokens, audio_embeds, audio_valid)
            return gen(nnx.state(model.lm), tokens, mask, key, prompt_embeds=embeds)

        return fn

    def generate_extra(self, model_inputs: dict[str, Any] | None) -> tuple:
        if model_inputs is None:
            raise ValueError("the audio recipe generates from the prompts' audio: model_inputs (audio_embeds, "
                             "audio_valid) is None")
        return (model_inputs["audio_embeds"], model_inputs["audio_valid"])

    def _feature_structs(self, rows: int, *, sharded: bool = True) -> tuple:
        """``features [rows, n_mels, F]`` float32 and ``feature_mask [rows, F]`` int32 at the longest width F."""
        bs = train.batch_sharding(self.mesh) if sharded else None
        m, f = self.features.n_mels, self.features.num_frames
        return (jax.ShapeDtypeStruct((rows, m, f), jnp.float32, sharding=bs),
                jax.ShapeDtypeStruct((rows, f), jnp.int32, sharding=bs))

    def _model_input_structs(self, batch: int) -> tuple:
        bs = train.batch_sharding(self.mesh)
        encode = self.programs["audio/encode"].fn
        emb, valid = jax.eval_shape(lambda p, f, x, m: encode(p, f, x, m, 1), self.abstract_state["params"],
                                    self.policy.abstract_frozen, *self._feature_structs(batch))
        return (jax.ShapeDtypeStruct(emb.shape, emb.dtype, sharding=bs),
                jax.ShapeDtypeStruct(valid.shape, valid.dtype, sharding=bs))

    def _audio_positions(self) -> int:
        """A: the audio embeddings of the longest window (``audio.seconds``): every LLM program's audio width."""
        graphdef = self.graphdef

        def enc(params, frozen, features, mask):
            return nnx.merge(graphdef, params, frozen).encode_audio(features, mask)

        emb, _ = jax.eval_shape(enc, self.abstract_state["params"], self.policy.abstract_frozen,
                                *self._feature_structs(1, sharded=False))
        return int(emb.shape[1])

    def build_programs(self) -> list[Program]:
        graphdef, mesh = self.graphdef, self.mesh
        bs = train.batch_sharding(mesh)
        a_max = self._audio_positions()

        def encode(params, frozen, features, feature_mask, repeat):
            """features [N, n_mels, F], feature_mask [N, F] -> (audio_embeds [N * repeat, A, D], audio_valid
            [N * repeat, A]): one clip per prompt, zero-padded to the window's A, repeated over its rows."""
            model = nnx.merge(graphdef, params, frozen)
            emb, valid = model.encode_audio(features, feature_mask)
            emb = jax.lax.stop_gradient(emb)
            pad = a_max - emb.shape[1]
            if pad > 0:
                emb = jnp.pad(emb, ((0, 0), (0, pad), (0, 0)))
                valid = jnp.pad(valid, ((0, 0), (0, pad)))
            if repeat > 1:
                emb, valid = jnp.repeat(emb, repeat, axis=0), jnp.repeat(valid, repeat, axis=0)
            return emb, valid

        def encode_program(name: str, rows: int, repeat: int, **kwargs: Any) -> Program:
            return Program(name, encode, args=lambda: (self.abstract_state["params"], self.policy.abstract_frozen,
                                                       *self._feature_structs(rows), repeat),
                           static_argnums=(4,), out_shardings=(bs, bs), **kwargs)

        b, g = self.layout["batch_size"], self.encode_group
        programs = [encode_program("audio/encode", b // g, g, phase="rollout", shrink_key="rl.num_prompts_per_step")]
        base = super().build_programs()
        # The eval prefills every row; the rollout's plan/prefill one row per prompt (b / G rows): an eval chunk
        # larger than that is compiled on its own, not assumed to fit in the rollout's programs.
        prefill_rows = b // int(self.sampling.prompt_group_size)
        base = [dataclasses.replace(p, planned_by=()) if p.name == "eval/generate" and p.planned_by
                and self._eval_layout()[0] > prefill_rows else p for p in base]
        programs += base
        gen = next((p for p in base if p.name == "eval/generate"), None)
        if gen is not None:  # the eval's clips: one per prompt, in chunks of eval.batch_size prompts
            programs.append(encode_program("eval/audio_encode", self._eval_layout()[0], 1, phase="eval",
                                           shrink_key="eval.batch_size", per_step=gen.per_step))
        return programs

    def _plan_fns(self) -> tuple[Any, Any, Any, tuple[int, ...]]:
        """The sampler's phases for the plan (:meth:`RLTrainer._plan_fns`): ``prefill`` of the audio-spliced
        prompts (one prefill per prompt), ``decode`` one step of the LM; the state is ``(params, frozen)``."""
        from adrpo_jax.models.llm.sampler import _prefill  # pylint: disable=import-outside-toplevel
        graphdef, mesh, sampling = self.graphdef, self.mesh, self.sampling
        max_length = int(self.config.sampling.max_prompt_length) + int(self.config.sampling.max_new_tokens)
        _, lm_decode = make_plan_fns(self.lm_graphdef, sampling, mesh)

        def prefill(params, frozen, tokens, mask, audio_embeds, audio_valid):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                model = nnx.merge(graphdef, params, frozen)
                embeds = model.embed_inputs(tokens, audio_embeds, audio_valid)
                return _prefill(model.lm, tokens, mask.astype(bool), max_length, sampling, embeds)

        def decode(params, frozen, token, done, cache, key):
            return lm_decode(nnx.state(nnx.merge(graphdef, params, frozen).lm), token, done, cache, key)

        return prefill, decode, lambda: (self.abstract_state["params"], self.policy.abstract_frozen), ()

    # ---- the prompt front end --------------------------------------------------------------------------------

    def _row_features(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """The rows' features ``[n, n_mels, F]`` / masks ``[n, F]``: each clip's computed once at its own width
        (cached, LRU of ``audio.feature_cache_size`` clips) and stacked at the batch's widest."""
        out_f, out_m = [], []
        for r in rows:
            path = r["audio"]
            if path not in self._feature_cache:
                f, m = self.features.from_paths([path])
                self._feature_cache[path] = (f[0], m[0])
                while len(self._feature_cache) > int(self.config.audio.feature_cache_size):
                    self._feature_cache.popitem(last=False)
            else:
                self._feature_cache.move_to_end(path)
            f, m = self._feature_cache[path]
            out_f.append(f)
            out_m.append(m)
        return audio_data.LogMelFeatures.stack(out_f, out_m)

    def audio_prompts(self, rows, state_params, group: int) -> tuple[dict[str, Any], list[str], np.ndarray]:
        """Encodes the rows' audio and builds their prompt texts; returns ``(global {tokens, mask, truncated,
        audio_embeds, audio_valid}, prompt texts, audio token counts)``. ``group``: rows per encoded clip (the
        rows come in groups of ``group`` rows of one prompt; the clip of each group's first row is encoded)."""
        encoder, tokenizer = self.encoder, self.tokenizer
        if encoder is None or tokenizer is None:
            raise ValueError("audio_prompts needs the tokenizer: this trainer is abstract (plan mode) and encodes no "
                             "prompts")
        rows = list(rows)
        feats, fmask = self._row_features(rows[::group])
        g = train.host_local_to_global({"features": feats, "feature_mask": fmask}, self.mesh)
        encode = self.fns["eval/audio_encode" if self._in_eval and "eval/audio_encode" in self.fns else "audio/encode"]
        emb, valid = encode(state_params, self.frozen, g["features"], g["feature_mask"], group)
        counts = np.asarray(train.global_to_host_local(valid)).sum(axis=1)
        prompts = [self.audio_template.format(audio=self.audio_token * int(c)) + r["prompt"]
                   for r, c in zip(rows, counts)]
        tokens, pmask, ptrunc = encoder.encode(prompts)
        if ptrunc.any():
            i = int(np.argmax(ptrunc))
            raise ValueError(f"a prompt of {len(tokenizer(encoder.render(prompts[i]))['input_ids'])} "
                             f"tokens ({int(counts[i])} audio tokens) exceeds sampling.max_prompt_length="
                             f"{encoder.max_prompt_length}: raise it (audio tokens cannot be cut)")
        from adrpo_jax.models.audio_llm import check_audio_token_counts  # pylint: disable=import-outside-toplevel
        check_audio_token_counts(tokens, self.audio_token_id, counts, texts=_Rendered(encoder, prompts))
        t = train.host_local_to_global({"tokens": tokens, "mask": pmask, "truncated": ptrunc}, self.mesh)
        t.update(audio_embeds=emb, audio_valid=valid)
        return t, [r["prompt"] for r in rows], counts

    def prompt_inputs(self, rows, state, group: int, mesh: jax.sharding.Mesh | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any] | None, list[str], list[str]]:
        _refuse_rollout_mesh(mesh)
        g, prompts, _ = self.audio_prompts(rows, state["params"], self.encode_group if group > 1 else 1)
        model_inputs = {"audio_embeds": g["audio_embeds"], "audio_valid": g["audio_valid"]}
        return g, model_inputs, prompts, [r.get("transcript", r["prompt"]) for r in rows]

    # ---- host phases -------------------------------------------------------------------------------------------

    def update(self, step: int, state, rollout) -> tuple[dict[str, Any], dict[str, Any]]:
        new_state, metrics = super().update(step, state, rollout)
        metrics.update(self.features.metrics())  # audio/clips_cut(_fraction): distinct clips cut so far
        return new_state, metrics

    def _recording(self, reward_fn):
        def fn(**kwargs):
            scores = reward_fn(**kwargs)
            if self._in_eval:
                self._eval_records.append((_finite_scores(scores), kwargs.get("task")))
            return scores
        return fn

    def evaluate(self, step: int, state) -> dict[str, Any]:
        """The text recipe's eval (chunks of ``eval.batch_size`` prompts) plus, when the eval rows carry a
        ``task`` column (MMAU: sound / music / speech), the per-category accuracies."""
        if self.evaluator is None:
            return {}
        self._in_eval, self._eval_records = True, []
        try:
            out = dict(super().evaluate(step, state))
        finally:
            self._in_eval = False
        records, self._eval_records = self._eval_records, []
        if records and all(task is not None for _, task in records):
            valid = np.concatenate([v for _, v in self.evaluator.chunks])
            scores = np.concatenate([s for s, _ in records])
            tasks = [t for _, task in records for t in task]
            out.update(audio_data.accuracy_by_category(scores, tasks, valid=valid))
        return out

    def export(self, params, path: str | os.PathLike) -> Path:
        """Writes the trained policy's parameters (merged LoRA when used) as ``params.npz`` (flat ``'a/b/c'``
        keys of ``nnx.to_pure_dict``) in ``path``."""
        from flax import traverse_util  # pylint: disable=import-outside-toplevel
        model = self.policy.merged(params)
        flat: dict[str, Any] = {"/".join(map(str, k)): np.asarray(v)
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
