"""The `model` section's engine keys (attention implementation, layer layout) are validated and reach the model."""

import ml_collections
import pytest

from adrpo_jax.models.llm import attention
from adrpo_jax.rl.config import ATTENTION_IMPLS, LOSS_AGGREGATIONS, add_llm_config, validate_llm_config
from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.config import ConfigError, add_common_config


def _config(**model):
    config = add_llm_config(add_common_config(ml_collections.ConfigDict()))
    for key, value in model.items():
        config.model[key] = value
    return config


def test_attention_choices_match_the_engine():
    assert ATTENTION_IMPLS == attention.IMPLEMENTATIONS
    assert "nonempty_sequence_mean" in LOSS_AGGREGATIONS
    config = _config()
    assert config.model.attention_impl == "auto"
    config.rl.loss_aggregation = "nonempty_sequence_mean"
    validate_llm_config(config)


@pytest.mark.parametrize("key,value,match", [
    ("attention_impl", "flash", r"model.attention_impl.*'flash'"),
    ("attention_impl", "", r"model.attention_impl"),
    ("attention_chunk_size", 0, r"model.attention_chunk_size"),
    ("attention_auto_min_len", -1, r"model.attention_auto_min_len"),
])
def test_bad_engine_values_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        validate_llm_config(_config(**{key: value}))


def test_engine_keys_reach_the_model(tiny_model_dir, tmp_path):
    config = _config(path=tiny_model_dir, attention_impl="chunked", attention_chunk_size=64,
                     attention_auto_min_len=256, scan_layers=False)
    config.sampling.max_prompt_length = 6
    config.sampling.max_new_tokens = 4
    config.rl.num_prompts_per_step = 4
    config.rl.group_size = 2
    trainer = RLTrainer(config, tmp_path)
    built = trainer._load_pretrained().config  # pylint: disable=protected-access
    for cfg in (trainer.model_config, built):
        assert (cfg.attention_impl, cfg.attention_chunk_size, cfg.attention_auto_min_len, cfg.scan_layers) == (
            "chunked", 64, 256, False)
