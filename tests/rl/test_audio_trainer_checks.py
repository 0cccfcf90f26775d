"""The audio recipe's issue-28 wiring (items 11, 12, 14, 15, 20, 22's data side) and its abstract build for the plan
mode (issue 24): each test fails on the trainer before these changes. The plan's full compile is slow."""

import importlib.util
import json
import types
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np
import pytest

from adrpo_jax.rl import audio_data, audio_trainer
from adrpo_jax.rl.rollout import PromptEncoder
from adrpo_jax.rl.tasks import build_char_tokenizer
from adrpo_jax.train import make_mesh
from adrpo_jax.train.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _config(variant):
    spec = importlib.util.spec_from_file_location("audio_arith_cfg", REPO / "configs" / "audio_arith.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _tone(path, seconds, freq=440.0):
    t = np.arange(int(seconds * audio_data.SAMPLE_RATE)) / audio_data.SAMPLE_RATE
    audio_data.write_wav(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32))
    return str(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _mmau_rows(tmp_path, n=3):
    return [{"audio": _tone(tmp_path / f"a{i}.wav", 1.0 + i), "question": f"q{i}?", "choices": ["cat", "dog"],
             "answer": "dog", "task": ("sound", "music", "speech")[i % 3]} for i in range(n)]


def _jsonl_config(tmp_path, rows, **overrides):
    config = _config("gpu")
    (tmp_path / "omni").mkdir(exist_ok=True)
    (tmp_path / "omni" / "config.json").write_text("{}")
    config.model.path = str(tmp_path / "omni")
    config.data.path = _jsonl(tmp_path / "train.jsonl", rows)
    for key, value in overrides.items():
        node = config
        *parts, last = key.split(".")
        for part in parts:
            node = node[part]
        node[last] = value
    return config


def test_audio_data_errors_surface_before_the_model_loads(tmp_path, monkeypatch):
    rows = _mmau_rows(tmp_path)
    rows[1]["audio"] = str(tmp_path / "missing.wav")
    config = _jsonl_config(tmp_path, rows)

    def heavy(config):
        raise AssertionError("the model was resolved / loaded before the data files were checked")

    monkeypatch.setattr(audio_trainer, "resolve_audio_model", heavy)
    with pytest.raises(ConfigError, match=r"train.jsonl:2: audio file .*missing.wav.* does not exist") as err:
        audio_trainer.AudioRLTrainer(config, tmp_path / "run")
    assert err.value.key == "data.path" and "data.on_bad_row=skip" in str(err.value)


def test_audio_source_reuses_the_check_with_on_bad_row_and_choice_format(tmp_path):
    rows = _mmau_rows(tmp_path, 4)
    rows[2]["answer"] = "horse"  # none of the choices: a bad row
    config = _jsonl_config(tmp_path, rows, **{"data.on_bad_row": "skip"})
    source = audio_trainer.make_audio_source(config, 0)  # on_bad_row reaches the source: 3 rows kept
    assert len(source) == 3 and source.num_skipped == 1
    assert "give the text of the correct option" in source[0]["prompt"]  # audio.choice_format='text' (gpu)
    checked = audio_data.check_audio_data(config)
    reused = audio_trainer.make_audio_source(config, 0, sources=checked)
    assert reused is checked["data.path"] and "text of the correct option" in reused[0]["prompt"]
    config.audio.choice_format = "letter"
    assert "letter of the correct option" in audio_trainer.make_audio_source(config, 0)[0]["prompt"]


def test_unsupported_settings_are_refused_naming_the_key(tmp_path):
    config = _jsonl_config(tmp_path, _mmau_rows(tmp_path))
    config.audio.freeze_encoder = False
    with pytest.raises(ConfigError, match=r"audio\.freeze_encoder") as err:
        audio_trainer.AudioRLTrainer.validate(config)
    assert err.value.key == "audio.freeze_encoder"
    config = _jsonl_config(tmp_path, _mmau_rows(tmp_path), **{"audio.choice_format": "letter"})
    with pytest.raises(ConfigError, match="mmau_accuracy") as err:  # letter prompts, MMAU's text scorer
        audio_trainer.AudioRLTrainer.validate(config)
    assert err.value.key == "eval.accuracy_reward"
    config.audio.choice_format = "words"
    with pytest.raises(ConfigError, match=r"audio\.choice_format"):
        audio_trainer.AudioRLTrainer.validate(config)
    config = _config("gpu")  # the shape preset is for --mode=plan only
    with pytest.raises(ConfigError, match=r"preset:qwen2\.5-omni-7b.*shapes only"):
        audio_trainer.AudioRLTrainer.validate(config)


def _host_trainer(tmp_path, features):
    """The audio recipe's host side with a stand-in encoder (4x downsampling of the valid frames per clip)."""
    cfg = _config("cpu")
    cfg.audio.task, cfg.audio.cache_dir = "beeps", str(tmp_path)
    tok = build_char_tokenizer(extra_chars=("@",))
    t = object.__new__(audio_trainer.AudioRLTrainer)
    t.config, t.tokenizer, t.audio_token, t.audio_template = cfg, tok, "@", "{audio}"
    t.audio_token_id, t._in_eval = tok.convert_tokens_to_ids("@"), False
    t.mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    t.features, t._feature_cache = features, OrderedDict()
    t.encoder = PromptEncoder(tok, 160)
    t.calls = []

    def fake_encode(params, frozen, feats, fmask, group):
        t.calls.append((feats.shape, group))
        n = np.asarray(fmask).sum(axis=1) // 4
        valid = np.arange(128)[None] < n[:, None]
        return np.zeros((len(fmask) * group, 128, 8), np.float32), np.repeat(valid, group, 0)

    t.fns, t.policy = {"audio/encode": fake_encode}, types.SimpleNamespace(frozen=None)
    return t


def test_prompt_with_the_audio_token_text_is_refused(tmp_path):
    """A question holding the audio token's text ('@' here) would misalign the splice inside jit: refused."""
    t = _host_trainer(tmp_path, audio_data.LogMelFeatures(n_mels=80, seconds=2.5))
    wav = _tone(tmp_path / "a.wav", 1.0)
    rows = [{"audio": wav, "prompt": "1+1="}, {"audio": wav, "prompt": "1@1="}]
    with pytest.raises(ValueError, match=r"prompt row 1 holds 26 audio tokens .* 25 embeddings"):
        t.audio_prompts(rows, None, 1)
    g, _, counts = t.audio_prompts(rows[:1], None, 1)
    assert counts.tolist() == [25] and (np.asarray(g["tokens"]) == t.audio_token_id).sum() == 25


def test_omni_features_per_clip_width_and_clips_cut(tmp_path, monkeypatch):
    """The Omni encoder's features: each clip cached at its own width (2-chunk multiples), batches stacked at their
    widest; clips over audio.seconds cut and counted in the step's metrics."""
    omni = types.SimpleNamespace(kind="omni", num_mel_bins=80, n_window=50)  # chunks of 100 frames (1 s)
    t = _host_trainer(tmp_path, audio_data.LogMelFeatures.for_encoder(omni, 4.0))
    short, mid, long = (_tone(tmp_path / f"{n}.wav", s) for n, s in (("s", 0.5), ("m", 2.5), ("l", 5.0)))
    feats, mask = t._row_features([{"audio": short}])
    assert feats.shape == (1, 80, 100) and mask.sum() == 50
    feats, mask = t._row_features([{"audio": short}, {"audio": mid}])
    assert feats.shape == (2, 80, 300) and mask.sum(1).tolist() == [50, 250]
    assert {k: v[0].shape[-1] for k, v in t._feature_cache.items()} == {short: 100, mid: 300}
    feats, _ = t._row_features([{"audio": long}])
    assert feats.shape == (1, 80, 400)  # cut at audio.seconds = 4 s
    from adrpo_jax.rl.trainer import RLTrainer
    monkeypatch.setattr(RLTrainer, "update", lambda self, step, state, rollout: (state, {"loss": 0.0}))
    _, metrics = t.update(0, {}, None)
    assert metrics["audio/clips_cut"] == 1.0 and metrics["audio/clips_cut_fraction"] == pytest.approx(1 / 3)


def test_eval_reports_accuracy_by_category(tmp_path, monkeypatch):
    """Rows with MMAU's task column: eval/accuracy/<task> and the macro mean, padding rows left out."""
    from adrpo_jax.rl.trainer import RLTrainer
    t = object.__new__(audio_trainer.AudioRLTrainer)
    t._in_eval, t._eval_records = False, []

    class FakeEvaluator:
        def __init__(self):
            self.chunks = [(None, np.array([True, True])), (None, np.array([True, False]))]
            self.reward_fn = None

        def __call__(self, state):
            out = []
            for scores, tasks in (([1.0, 0.0], ["sound", "music"]), ([1.0, 1.0], ["sound", "speech"])):
                out += self.reward_fn(prompts=["p"] * 2, completions=["c"] * 2, scores=scores, task=tasks)
            return {"eval/accuracy": float(np.mean(out[:3]))}

    t.evaluator = FakeEvaluator()
    t.evaluator.reward_fn = t._recording(lambda scores, **kw: scores)
    monkeypatch.setattr(RLTrainer, "evaluate", lambda self, step, state: self.evaluator(state))
    out = t.evaluate(0, None)
    assert out["eval/accuracy/sound"] == 1.0 and out["eval/accuracy/music"] == 0.0
    assert "eval/accuracy/speech" not in out  # its only row is padding
    assert out["eval/accuracy_macro"] == 0.5 and not t._in_eval


# ---- the abstract build (plan mode) -------------------------------------------------------------------------

def _tiny_omni_config(tmp_path, **overrides):
    """A tiny Qwen2.5-Omni thinker (config.json only) on the tpu variant's layout: G=4, 8 prompts per step."""
    model_dir = tmp_path / "tiny_omni"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "qwen2_5_omni_thinker", "audio_token_index": 60, "tie_word_embeddings": False,
        "text_config": {"model_type": "qwen2_5_omni_text", "vocab_size": 64, "hidden_size": 64,
                        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "eos_token_id": 2, "rope_theta": 10000.0},
        "audio_config": {"model_type": "qwen2_5_omni_audio_encoder", "num_mel_bins": 16, "d_model": 32,
                         "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                         "max_source_positions": 100, "n_window": 10, "output_dim": 64}}))
    config = _config("tpu")
    config.model.path = str(model_dir)
    config.audio.n_mels, config.audio.seconds = 16, 4.0
    config.sampling.max_prompt_length, config.sampling.max_new_tokens = 128, 8
    config.rl.num_prompts_per_step, config.rl.group_size = 8, 4
    config.rl.num_minibatches, config.optim.grad_accum_steps = 1, 1
    config.eval.num_examples, config.eval.batch_size = 16, 8
    config.plan.target = "cpu:8"
    for key, value in overrides.items():
        node = config
        *parts, last = key.split(".")
        for part in parts:
            node = node[part]
        node[last] = value
    return config


def test_abstract_build_shares_the_prompt_and_freezes_the_encoder(tmp_path):
    """abstract=True: no weights, shapes from config.json; one prefill and one encoded clip per prompt (G rows);
    the encoder has no trainable state; every LLM program sees the window's audio width."""
    from adrpo_jax.train import config as config_lib
    config = _tiny_omni_config(tmp_path, **{"lora.enabled": False})
    mesh = make_mesh(config.mesh, devices=jax.devices()[:8])
    with config_lib.shapes_only():
        recipe = audio_trainer.AudioRLTrainer(config, tmp_path / "plan", mesh=mesh, abstract=True)
    assert recipe.sampling.prompt_group_size == 4 and recipe.encode_group == 4
    features, mask, group = recipe.programs["audio/encode"].abstract_args()[2:]
    assert features.shape == (8, 16, 400) and mask.shape == (8, 400) and group == 4  # B / G clips, 4 s
    emb, valid = recipe._model_input_structs(32)
    assert emb.shape == (32, 100, 64) and valid.shape == (32, 100)  # 4 s = 100 audio positions
    for part in ("params", "opt_state"):  # the LM's parameters only: no AdamW moments for the encoder
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(recipe.abstract_state[part])]
        assert paths and not [p for p in paths if "encoder" in p], part
    names = set(recipe.programs)
    assert {"audio/encode", "generate", "logprobs", "update", "plan/prefill", "plan/decode", "eval/audio_encode",
            "eval/generate", "eval/mean"} <= names


@pytest.mark.slow
def test_tiny_omni_plan_compiles_every_program_for_v5e(tmp_path):
    """The plan mode on the TPU compiler: every program of a LoRA Omni recipe lowers and compiles for a v5e-8,
    the encoder once per prompt; the per-row splice adds no all-gather to the log-prob pass on a data mesh."""
    import os
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from adrpo_jax.recipe import plan as plan_lib
    config = _tiny_omni_config(tmp_path)
    try:
        report = plan_lib.plan(config, "v5e:2x4", workdir=tmp_path)
    except ConfigError as err:
        pytest.skip(f"no TPU compiler: {err}")
    names = {p["name"] for p in report["programs"]}
    assert {"audio/encode", "plan/prefill", "plan/decode", "logprobs", "update", "eval/audio_encode",
            "eval/mean"} <= names and report["fits"]
    encode = next(p for p in report["programs"] if p["name"] == "audio/encode")
    assert encode["flops"] > 0 and encode["per_step"] == 1.0
    # A data-parallel mesh of 8 host devices: the log-prob pass gathers nothing across the batch.
    from adrpo_jax.train import config as config_lib
    config = _tiny_omni_config(tmp_path, **{"mesh.fsdp": 1, "mesh.data": 8})
    mesh = make_mesh(config.mesh, devices=jax.devices()[:8])
    with config_lib.shapes_only():
        recipe = audio_trainer.AudioRLTrainer(config, tmp_path / "dp", mesh=mesh, abstract=True)
    hlo = recipe.programs["logprobs"].lower().compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
