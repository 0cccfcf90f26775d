"""configs/sd3_adrpo.py: the variants validate; missing weight directories and bad values stop the run naming the
key (no model is built)."""

import importlib.util
from pathlib import Path

import pytest

from adrpo_jax.flow.sd3_trainer import validate_batch_layout, validate_sd3_config
from adrpo_jax.train.config import ConfigError, validate_common_config

REPO = Path(__file__).resolve().parents[2]


def _config(variant):
    spec = importlib.util.spec_from_file_location("sd3_adrpo", REPO / "configs" / "sd3_adrpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def test_cpu_variant_validates():
    config = _config("cpu")
    validate_common_config(config)
    validate_sd3_config(config)
    assert config.model.tiny and config.lora.enabled and config.sampling.time_shift == 3.0
    assert validate_batch_layout(config, 2)["batch_size"] == 8


@pytest.mark.parametrize("variant", ["gpu", "tpu", "tpu_1024"])
def test_accelerator_variants_need_local_directories(variant, tmp_path):
    config = _config(variant)
    assert config.model.dtype == "bfloat16" and config.model.param_dtype == "float32" and config.mesh.fsdp == -1
    with pytest.raises(ConfigError, match=r"`model.path` is required.*--config.model.path") as e:
        validate_sd3_config(config)
    assert e.value.key == "model.path"
    config.model.path = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="is not a directory"):
        validate_sd3_config(config)
    for key in ("model", "vae", "text"):
        config[key].path = str(tmp_path)
    with pytest.raises(ConfigError, match="reward.clip_path"):
        validate_sd3_config(config)
    config.reward.clip_path = str(tmp_path)
    validate_sd3_config(config)


@pytest.mark.parametrize("key,value,match", [
    ("data.prompts", ("a", "a"), "duplicates"),
    ("data.prompts", (), "non-empty"),
    ("reward.kind", "aesthetic", "reward.kind"),
    ("sampling.time_shift", 0.0, "time_shift"),
    ("rl.method", "ppo", "rl.method"),
])
def test_bad_values_name_the_key(key, value, match):
    config = _config("cpu")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate_sd3_config(config)


def test_batch_layout_divisibility():
    config = _config("cpu")
    with pytest.raises(ConfigError, match="data-parallel size 3"):
        validate_batch_layout(config, 3)
