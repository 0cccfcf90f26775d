"""GRPO / ADRPO on audio LLMs (spoken questions): ``config.trainer = 'adrpo_jax.rl.audio_trainer:train_and_evaluate'``.

    python launch.py --config=configs/audio_arith.py:cpu --workdir=/tmp/audio_adrpo

The text trainer (:class:`adrpo_jax.rl.trainer.RLTrainer`) with an audio front end. Per RL step:

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

import functools
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from adrpo_jax import train
from adrpo_jax.models.llm import load_tokenizer
from adrpo_jax.models.llm.sampler import SamplingConfig, make_generate_fn
from adrpo_jax.models.lora import apply_lora, set_lora_enabled
from adrpo_jax.rl import audio_data
from adrpo_jax.rl import config as config_lib
from adrpo_jax.rl import data as data_lib
from adrpo_jax.rl.rewards import RewardComputer, resolve_reward_function
from adrpo_jax.rl.rollout import PromptEncoder, stop_token_ids
from adrpo_jax.rl.step import StepOptions, make_logprob_fn, make_rl_update, mix_reference
from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.config import ConfigError, merge_defaults

__all__ = ["AudioRLTrainer", "add_audio_config", "validate_audio_config", "make_audio_source", "train_and_evaluate"]

AUDIO_TASKS = ("auto", "spoken_arithmetic", "beeps", "jsonl")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def add_audio_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the ``audio`` section (keys already present are kept); call after ``add_llm_config``."""
    merge_defaults(config, {"audio": {
        "task": "auto",  # auto | spoken_arithmetic | beeps | jsonl (data.path / eval.path)
        "seconds": 30.0,  # the feature window: clips are padded / cut to it (Omni: 30 s)
        "n_mels": 128,
        "audio_token": "<|AUDIO|>",
        "audio_template": "<|audio_bos|>{audio}<|audio_eos|>",
        "freeze_encoder": True,
        "min_value": 0, "max_value": 9, "operations": "+",  # built-in spoken task
        "min_beeps": 1, "max_beeps": 5,  # built-in fallback task
        "cache_dir": "",
        "feature_cache_size": 4096,
    }})
    return config


def validate_audio_config(config: Any) -> None:
    """Checks the audio trainer's config (clear ``ConfigError`` naming the key for a missing model or data)."""
    a = config.audio
    if a.task not in AUDIO_TASKS:
        raise ConfigError(f"`audio.task`={a.task!r} must be one of {AUDIO_TASKS}.", key="audio.task", value=a.task)
    path = str(config.model.path)
    if not path.startswith("builtin:"):
        p = os.path.expanduser(path)
        if not path or not os.path.isfile(os.path.join(p, "config.json")):
            raise ConfigError(f"`model.path`={path!r} is not a local transformers directory of a qwen2_audio / "
                              "qwen2_5_omni model (no config.json); nothing is downloaded: pass "
                              "--config.model.path=/path/to/Qwen2.5-Omni-7B.", key="model.path", value=path)
    elif path != "builtin:tiny_audio_arith":
        raise ConfigError(f"`model.path`={path!r}: the audio trainer's built-in model is 'builtin:tiny_audio_arith'.",
                          key="model.path", value=path)
    if a.task == "jsonl":
        for key in ("data.path", "eval.path"):
            value = train.get_by_path(config, key, "")
            if key == "eval.path" and not value:
                continue
            if not value or not os.path.isfile(os.path.expanduser(value)):
                raise ConfigError(f"`{key}`={value!r} must be a jsonl file of {{audio, question, choices, answer}} "
                                  "rows (audio.task='jsonl'): pass --config.data.path=/path/to/avqa_train.jsonl.",
                                  key=key, value=value)
    if float(a.seconds) <= 0 or int(a.n_mels) < 1:
        raise ConfigError(f"`audio.seconds`={a.seconds} and `audio.n_mels`={a.n_mels} must be positive.",
                          key="audio.seconds")
    if "{audio}" not in a.audio_template:
        raise ConfigError(f"`audio.audio_template`={a.audio_template!r} must contain '{{audio}}'.",
                          key="audio.audio_template")
    for fn in (config_lib._validate_rl, config_lib._validate_sampling,  # pylint: disable=protected-access
               config_lib._validate_rewards, config_lib._validate_lora):  # pylint: disable=protected-access
        fn(config)


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
    """:class:`RLTrainer` for audio prompts (see the module docstring); reuses its ``train_step``, ``run``,
    ``reference_params`` and checkpoint layout."""

    def __init__(self, config: Any, workdir: str | os.PathLike):  # pylint: disable=super-init-not-called
        add_audio_config(config)
        validate_audio_config(config)
        if jax.process_count() > 1:
            raise ConfigError("the audio trainer runs in a single process (multi-host audio rollouts are not "
                              "implemented).", key="mesh")
        self.config, self.workdir = config, os.fspath(workdir)
        self.lora_config = config_lib.lora_config(config)
        self.mesh = train.make_mesh(config.mesh)
        self.layout = config_lib.validate_llm_batch_layout(config, train.data_parallel_size(self.mesh), 1)
        self.model_dir, tokenizer_dir = resolve_audio_model(config)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        a = config.audio
        self.audio_token = a.audio_token
        self.audio_template = a.audio_template
        model = _load_audio_model(self.model_dir, config)
        if self.lora_config is not None:
            apply_lora(model.lm, self.lora_config, rngs=self._lora_rngs())
            self.trainable = nnx.LoRAParam
        else:
            self.trainable = _lm_only if bool(a.freeze_encoder) else nnx.Param
        self.model_config = model.lm.config
        self.rewards = RewardComputer(tuple(config.rewards.functions), tuple(config.rewards.weights),
                                      on_error=config.rewards.on_error, timeout_s=config.rewards.timeout_s)
        self.opts = StepOptions.from_config(config, reward_names=self.rewards.names)
        self.updates_per_step = config_lib.updates_per_step(config)
        self.tx, self.schedule = train.make_optimizer(config.optim, int(config.total_steps) * self.updates_per_step)
        self.encoder = PromptEncoder(self.tokenizer, int(config.sampling.max_prompt_length),
                                     chat_template=config.data.chat_template, system_prompt=config.data.system_prompt,
                                     prompt_template=config.data.prompt_template)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model_config)
        self.features = audio_data.LogMelFeatures(n_mels=int(a.n_mels), seconds=float(a.seconds))
        self._feature_cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

        self.graphdef, params, frozen = nnx.split(model, self.trainable, ...)
        self.lm_graphdef = nnx.graphdef(model.lm)
        self.ref_in_state = self.opts.use_reference and config.rl.ref_sync_steps > 0
        self.lora_reference = self.lora_config is not None and self.opts.use_reference and not self.ref_in_state
        self.ref_graphdef = self.graphdef
        if self.lora_reference:  # same state, adapters off
            self.ref_graphdef = nnx.split(set_lora_enabled(model, False), self.trainable, ...)[0]
            set_lora_enabled(model, True)
        # Born sharded from the parameters' logical axis names (replicated where a leaf has none).
        tx, ref_in_state = self.tx, self.ref_in_state

        def plan(p):
            st = {"params": p, "opt_state": tx.init(p)}
            if ref_in_state:
                st["ref_params"] = p
            return st

        abstract = jax.eval_shape(plan, params)
        shardings = train.logical_to_named_sharding(abstract, self.mesh)
        self.abstract_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                           abstract, shardings)
        self.state_shardings = train.shardings_of(self.abstract_state)
        self._params0 = jax.device_put(params, self.state_shardings["params"])
        self.frozen = jax.device_put(frozen, train.logical_to_named_sharding(frozen, self.mesh))
        del model
        self.ref_params = (self._params0 if self.opts.use_reference and not self.ref_in_state
                           and not self.lora_reference else None)
        self.iterator = data_lib.PromptIterator(
            make_audio_source(config, int(config.seed)), int(config.rl.num_prompts_per_step),
            int(config.rl.group_size), seed=int(config.seed), shuffle=bool(config.data.shuffle))
        self._build_functions()
        self.evaluator = None
        self.eval_rows = None
        if int(config.eval_every) > 0:
            source = make_audio_source(config, int(config.seed), eval_split=True)
            n = min(int(config.eval.num_examples), len(source))
            dp = train.data_parallel_size(self.mesh)
            n_pad = -(-n // dp) * dp
            rows = [source[i] for i in range(n)]
            self.eval_rows = rows + [rows[-1]] * (n_pad - n)
            self.eval_valid = np.arange(n_pad) < n
            self.eval_name, self.eval_reward = resolve_reward_function(config.eval.accuracy_reward)
            self.evaluator = True
        self.base_key = jax.random.key(int(config.seed))
        self._samples_path = os.path.join(self.workdir, "samples.jsonl")

    # ------------------------------------------------------------------------------------------------------

    def _build_functions(self) -> None:
        config, opts, mesh = self.config, self.opts, self.mesh
        bs = train.batch_sharding(mesh)
        s = config.sampling
        self.sampling = SamplingConfig(max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature),
                                       top_k=int(s.top_k) or None, top_p=float(s.top_p) if s.top_p < 1.0 else None,
                                       eos_token_ids=self.stop_ids, pad_token_id=self.encoder.pad_token_id,
                                       prompt_group_size=1)  # the audio is shared per prompt already (encode)
        graphdef, lm_graphdef, g = self.graphdef, self.lm_graphdef, int(opts.group_size)

        def generate_with(sampling):
            gen = make_generate_fn(lm_graphdef, sampling, mesh)

            def fn(params, frozen, tokens, mask, key, audio_embeds, audio_valid):
                model = nnx.merge(graphdef, params, frozen)
                embeds = model.embed_inputs(tokens, audio_embeds, audio_valid)
                return gen(nnx.state(model.lm), tokens, mask, key, prompt_embeds=embeds)

            return jax.jit(fn, out_shardings=bs)

        self._generate_with = generate_with
        self.generate = generate_with(self.sampling)

        def encode(params, frozen, features, feature_mask, group):
            model = nnx.merge(graphdef, params, frozen)
            emb, valid = model.encode_audio(features[::group], feature_mask[::group])  # once per prompt
            emb = jnp.repeat(jax.lax.stop_gradient(emb), group, axis=0)
            return emb, jnp.repeat(valid, group, axis=0)

        self.encode_audio = jax.jit(encode, static_argnums=4, out_shardings=(bs, bs))
        self.logprobs = jax.jit(make_logprob_fn(self.graphdef, opts, mesh), out_shardings=(bs, bs))
        self.ref_logprobs = (jax.jit(make_logprob_fn(self.ref_graphdef, opts, mesh), out_shardings=(bs, bs))
                             if self.lora_reference else self.logprobs)
        sh = self.state_shardings
        self.update = jax.jit(make_rl_update(self.graphdef, self.tx, opts, mesh),
                              out_shardings=(sh["params"], sh["opt_state"], train.replicated_sharding(mesh)),
                              donate_argnums=(0, 1))
        self.mix = jax.jit(functools.partial(mix_reference, alpha=float(config.rl.ref_mixup_alpha)),
                           out_shardings=sh["params"], donate_argnums=0)
        del g

    def init_state(self) -> dict[str, Any]:
        sh = self.state_shardings
        copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=sh["params"])
        state = {"params": copy(self._params0),
                 "opt_state": jax.jit(self.tx.init, out_shardings=sh["opt_state"])(self._params0)}
        if self.ref_in_state:
            state["ref_params"] = copy(self._params0)
        return state

    # ------------------------------------------------------------------------------------------------------

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

    def rollout_batch(self, step: int, state) -> tuple[dict[str, Any], dict[str, Any]]:
        mesh, opts = self.mesh, self.opts
        t_start = time.perf_counter()
        rows = self.iterator.next_rows()
        g, prompts, _ = self.audio_prompts(rows, state["params"], int(opts.group_size))
        model_inputs = {"audio_embeds": g["audio_embeds"], "audio_valid": g["audio_valid"]}
        key = jax.random.fold_in(self.base_key, step)
        sample_key, update_key = jax.random.split(key)
        out = self.generate(state["params"], self.frozen, g["tokens"], g["mask"], sample_key, g["audio_embeds"],
                            g["audio_valid"])
        batch: dict[str, Any] = {"tokens": out.tokens, "attention_mask": out.attention_mask,
                                 "completion_mask": out.completion_mask, "lengths": out.lengths, "done": out.done,
                                 "prompt_truncated": g["truncated"], "model_inputs": model_inputs}
        if opts.use_old_logprobs:
            batch["old_logp"], _ = self.logprobs(state["params"], self.frozen, out.tokens, out.attention_mask,
                                                 model_inputs)
        if opts.use_reference:
            batch["ref_logp"], _ = self.ref_logprobs(self.reference_params(state), self.frozen, out.tokens,
                                                     out.attention_mask, model_inputs)
        local = train.global_to_host_local({"completions": out.completions, "lengths": out.lengths})
        t_generated = time.perf_counter()
        texts = self.encoder.decode(local["completions"], local["lengths"])
        columns = data_lib.columns_of(rows)
        columns["completion_ids"] = [row[:n].tolist() for row, n in zip(local["completions"], local["lengths"])]
        scored = self.rewards(prompts, texts, **columns)
        t_scored = time.perf_counter()
        jax.block_until_ready([batch[k] for k in ("old_logp", "ref_logp") if k in batch])
        batch.update(train.host_local_to_global({"rewards": scored.rewards, "reward_valid": scored.valid,
                                                 "reward_components": scored.per_function}, mesh))
        times = {"time/rollout": t_generated - t_start, "time/reward": t_scored - t_generated,
                 "time/logprobs": time.perf_counter() - t_scored}
        host = {"prompts": [r.get("transcript", r["prompt"]) for r in rows], "completions": texts,
                "rewards": scored.rewards, "key": update_key, "num_errors": scored.num_errors, "times": times}
        return batch, host

    def eval_step(self, step: int, state) -> dict[str, Any]:
        del step
        if self.evaluator is None:
            return {}
        if not hasattr(self, "_eval_generate"):
            s = self.config.sampling
            self._eval_generate = self._generate_with(SamplingConfig(
                max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature),
                greedy=bool(self.config.eval.greedy), eos_token_ids=self.stop_ids,
                pad_token_id=self.encoder.pad_token_id))
        rows = self.eval_rows
        g, prompts, _ = self.audio_prompts(rows, state["params"], 1)
        out = self._eval_generate(state["params"], self.frozen, g["tokens"], g["mask"], jax.random.key(0),
                                  g["audio_embeds"], g["audio_valid"])
        local = train.global_to_host_local({"completions": out.completions, "lengths": out.lengths, "done": out.done})
        texts = self.encoder.decode(local["completions"], local["lengths"])
        scores = self.eval_reward(prompts=prompts, completions=texts, **data_lib.columns_of(rows))
        scores = np.asarray([0.0 if v is None or not np.isfinite(v) else float(v) for v in scores], np.float32)
        v = self.eval_valid
        return {"eval/accuracy": float(scores[v].mean()),
                "eval/completion_length_mean": float(local["lengths"][v].mean()),
                "eval/truncated_fraction": float((~local["done"][v]).mean())}

    def save_model(self, params, path: str | os.PathLike) -> Path:
        """Writes the trained policy's parameters (merged LoRA when used) as ``params.npz`` (flat
        ``'a/b/c'`` keys of ``nnx.to_pure_dict``) in ``path``."""
        from adrpo_jax.models.lora import merge_lora  # pylint: disable=import-outside-toplevel
        model = nnx.merge(self.graphdef, params, self.frozen)
        if self.lora_config is not None:
            model = merge_lora(model)
        from flax import traverse_util  # pylint: disable=import-outside-toplevel
        flat = {"/".join(map(str, k)): np.asarray(v)
                for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez(path / "params.npz", **flat)
        return path


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) GRPO / ADRPO on audio prompts; returns the last logged metrics (see ``RLTrainer.run``)."""
    return AudioRLTrainer(config, workdir).run()
