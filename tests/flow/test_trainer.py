"""The flow trainer's config validation, prompt schedule and (slow) a tiny run through FlowTrainer on 8 devices
(tiny random DiT and classifier passed in: nothing is pre-trained): metrics, reference / sampling-copy refresh
schedule, eval, images, checkpoints, the saved final model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.flow import config as config_lib
from adrpo_jax.flow.config import add_flow_config, pretrain_config, validate_flow_batch_layout, validate_flow_config
from adrpo_jax.flow.trainer import FlowTrainer, step_prompts
from adrpo_jax.train.config import ConfigError, common_config

REPO = Path(__file__).resolve().parents[2]


def load_config(variant):
    spec = importlib.util.spec_from_file_location("cfg_flow_digits", REPO / "configs" / "flow_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def base():
    return add_flow_config(common_config())


@pytest.mark.parametrize("variant", ["cpu", "cpu_fixed_beta", "cpu_orw", "cpu_none", "cpu_lora", "gpu", "tpu"])
def test_shipped_configs_validate(variant):
    config = load_config(variant)
    validate_flow_config(config)
    assert config.trainer == "flow"
    expected = {"cpu": "adrpo", "cpu_fixed_beta": "fixed_beta", "cpu_orw": "orw_cfm_w2", "cpu_none": "none"}
    assert config.rl.method == expected.get(variant, "adrpo")


def test_cpu_config_reuses_the_default_pretraining_cache_key():
    """configs/flow_digits.py:cpu pre-trains exactly pretrain.default_config() in digit_thickness mode (one cache
    entry shared by the demo, the experiment and the tests)."""
    from adrpo_jax.flow import pretrain

    ours = pretrain_config(load_config("cpu"))
    default = pretrain.default_config()
    default.data.condition_mode = "digit_thickness"
    assert pretrain.dit_config_from(ours) == pretrain.dit_config_from(default)
    for section in ("data", "pretrain", "classifier"):
        assert pretrain._with_defaults(ours, section) == pretrain._with_defaults(default, section), section


@pytest.mark.parametrize("key,value,match", [
    ("rl.method", "ppo", "rl.method"),
    ("rl.beta", -0.1, "rl.beta"),
    ("rl.beta", math.inf, "rl.beta"),
    ("rl.adv_clip", "soft", "rl.adv_clip"),
    ("rl.adv_clip_min", -1.0, "rl.adv_clip_min"),
    ("rl.adv_clip_multiple", 0.0, "rl.adv_clip_multiple"),
    ("rl.samples_per_prompt", 1, "rl.samples_per_prompt"),
    ("rl.prompts_per_step", 0, "rl.prompts_per_step"),
    ("rl.prompts_per_step", 2.5, "rl.prompts_per_step"),
    ("rl.num_inner_updates", 0, "rl.num_inner_updates"),
    ("rl.time_sampling", "beta", "rl.time_sampling"),
    ("rl.cond_dropout_prob", 1.0, "rl.cond_dropout_prob"),
    ("rl.ref_refresh_alpha", 0.5, "rl.ref_refresh_alpha"),
    ("rl.ref_refresh_alpha", 0.0, "rl.ref_refresh_alpha"),
    ("rl.sampler_refresh_steps", 0, "rl.sampler_refresh_steps"),
    ("rl.scale_advantages_by_std", "yes", "rl.scale_advantages_by_std"),
    ("rl.alpha", -1.0, "rl.alpha"),
    ("sampling.method", "rk4", "sampling.method"),
    ("sampling.num_steps", 0, "sampling.num_steps"),
    ("sampling.sde_noise", 0.5, "sampling.sde_noise"),
    ("reward.kind", "clip", "reward.kind"),
    ("reward.classifier_output", "logits", "reward.classifier_output"),
    ("reward.image_stat", "brightness", "reward.image_stat"),
    ("reward.image_stat_target", -math.inf, "reward.image_stat_target"),
    ("data.condition_mode", "color", "data.condition_mode"),
    ("data.image_size", 6, "data.image_size"),
    ("model.patch_size", 3, "model.patch_size"),
    ("model.heads", 5, "model.heads"),
    ("model.num_classes", 7, "model.num_classes"),
    ("model.dtype", "int8", "model.dtype"),
    ("model.path", "/no/such/dit", "model.path"),
    ("classifier.path", "/no/such/classifier", "classifier.path"),
    ("classifier.channels", (32, -1), "classifier.channels"),
    ("pretrain.ema_decay", 1.0, "pretrain.ema_decay"),
    ("eval.samples_per_prompt", 1, "eval.samples_per_prompt"),
])
def test_bad_values_raise_config_error_naming_the_key(key, value, match):
    config = base()
    section, name = key.split(".")
    del config[section][name]  # ConfigDict is type-safe: re-create the field to test wrong types too
    config[section][name] = value
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")) as info:
        validate_flow_config(config)
    assert info.value.key == key


def test_combinations_are_checked():
    config = base()
    config.rl.method = "none"
    config.rl.ref_refresh_steps = 5
    with pytest.raises(ConfigError, match="rl.ref_refresh_steps"):
        validate_flow_config(config)
    config = base()
    config.rl.method = "orw_cfm_w2"
    config.rl.samples_per_prompt = 1  # ORW needs no per-prompt baseline
    validate_flow_config(config)
    config = base()
    config.rl.adv_clip = "absolute"
    with pytest.raises(ConfigError, match="needs a finite"):
        validate_flow_config(config)
    config.rl.adv_clip_min, config.rl.adv_clip_max = 0.5, -0.5
    with pytest.raises(ConfigError, match="<= `rl.adv_clip_max`"):
        validate_flow_config(config)
    del config["rl"]
    with pytest.raises(ConfigError, match="section `rl` is missing"):
        validate_flow_config(config)


def test_batch_layout_divisibility():
    config = base()
    config.rl.prompts_per_step, config.rl.samples_per_prompt = 10, 8
    assert validate_flow_batch_layout(config, 8) == {"batch_size": 80, "micro_batch_size": 80,
                                                     "eval_batch_size": 160}
    with pytest.raises(ConfigError, match="data-parallel size 32") as info:
        validate_flow_batch_layout(config, 32)
    assert info.value.key == "rl.prompts_per_step"
    config.optim.grad_accum_steps = 3
    with pytest.raises(ConfigError, match="optim.grad_accum_steps"):
        validate_flow_batch_layout(config, 1)
    config.optim.grad_accum_steps = 4
    with pytest.raises(ConfigError, match="80 / optim.grad_accum_steps=4 = 20"):
        validate_flow_batch_layout(config, 8)
    config.optim.grad_accum_steps = 1
    config.eval.samples_per_prompt = 3  # 20 prompts x 3 = 60
    with pytest.raises(ConfigError, match="eval batch") as info:
        validate_flow_batch_layout(config, 8)
    assert info.value.key == "eval.samples_per_prompt"


def test_trainer_validates_before_loading_anything(tmp_path):
    config = base()
    config.rl.samples_per_prompt = 3  # 10 * 3 = 30 images: not divisible by the 8 devices
    with pytest.raises(ConfigError, match="data-parallel size 8"):
        FlowTrainer(config, tmp_path, models=("not", "used"))


def test_step_prompts_are_a_deterministic_balanced_function_of_seed_and_step():
    a = step_prompts(3, 17, 10, 4, 20)
    assert a.shape == (40,) and a.dtype == np.int32
    np.testing.assert_array_equal(a, step_prompts(3, 17, 10, 4, 20))
    assert not np.array_equal(a, step_prompts(3, 18, 10, 4, 20))
    assert not np.array_equal(a, step_prompts(4, 17, 10, 4, 20))
    ids = a.reshape(10, 4)
    assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == 10  # prompt-major, no repeated prompt
    counts = np.bincount(step_prompts(0, 0, 25, 1, 10), minlength=10)
    assert counts.min() == 2 and counts.max() == 3  # K > #prompts: every prompt 2 or 3 times


# ----------------------------------------------------------------------------------------------------------
# A tiny run through FlowTrainer (8 forced devices, data-parallel)
# ----------------------------------------------------------------------------------------------------------


def _tiny_models():
    from adrpo_jax.models.classifier import ClassifierConfig, DigitClassifier
    from adrpo_jax.models.dit import DiT, DiTConfig

    dit = DiT(DiTConfig(image_size=8, patch_size=4, hidden=16, depth=1, heads=2, num_classes=10, frequency_dim=16,
                        mlp_ratio=2.0), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(dit, nnx.Param)
    rng = np.random.default_rng(0)
    dit = nnx.merge(graphdef, jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32),
                                           params))
    clf = DigitClassifier(ClassifierConfig(image_size=8, channels=(4,), features=8), rngs=nnx.Rngs(1))
    return dit, clf


def tiny_trainer_config(total_steps=4):
    config = base()
    config.total_steps = total_steps
    config.log_every = 2
    config.eval_every = 2
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    config.logging.tensorboard = False
    config.logging.progress_bar = False
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.schedule = "constant"
    config.data.condition_mode = "digit"
    config.model.save_final = True
    config.rl.prompts_per_step = 4
    config.rl.samples_per_prompt = 4
    config.rl.ref_refresh_steps = 2
    config.rl.ref_refresh_alpha = 0.5
    config.rl.sampler_refresh_steps = 3
    config.sampling.method = "euler"
    config.sampling.num_steps = 2
    config.eval.samples_per_prompt = 4
    config.eval.w2_time_samples = 1
    return config


@pytest.mark.slow  # ~35 s of XLA compilation (step, eval, samplers) on 2 cores
def test_tiny_trainer_run(tmp_path):
    config = tiny_trainer_config()
    trainer = FlowTrainer(config, tmp_path, models=_tiny_models())
    assert set(trainer.abstract_state) == {"params", "opt_state", "ref_params", "sampler_params"}
    out = trainer.run()
    assert out["step"] == 4 and not out["preempted"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert records[0]["eval/frechet_distance"] < 1e-6 and records[0]["eval/w2_bound"] == 0.0  # policy == reference
    for r in records[1:]:
        for key in ("reward_mean", "loss", "cfm_term", "w2_term", "w2_mean", "beta_eff_mean", "beta_eff_min",
                    "beta_eff_max", "adv_clip_fraction", "zero_std_prompt_fraction", "num_nonfinite_rewards",
                    "sample_diversity", "grad_norm", "images_per_sec", "eval/reward_mean", "eval/diversity",
                    "eval/frechet_distance", "eval/w2_bound", "eval/digit_entropy", "learning_rate"):
            assert key in r and np.isfinite(float(r[key])), key
        assert r["ref_refreshed"] == 0.5  # refreshed at steps 2 and 4: one of the two steps of each interval
    assert records[2]["eval/w2_bound"] > 0
    assert records[1]["sampler_refreshed"] == 0.0 and records[2]["sampler_refreshed"] == 0.5  # after step 3
    assert (tmp_path / "samples_before.png").exists() and (tmp_path / "samples_before_after.png").exists()
    assert out["samples_grid"].endswith("samples_before_after.png")
    from adrpo_jax.models.dit import load_dit
    final = nnx.state(load_dit(tmp_path / "final_model"), nnx.Param)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(trainer.result.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert config_lib.uses_reference(config)
