"""The GRPO rollout on the continuous-batching engine (issue 26 item 1): `sampling.engine` / `sampling.decode_slots`
resolve and validate, and the trainer's rollout equals the static sampler with per-row keys (8 forced devices)."""
import jax
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm.continuous import request_keys
from adrpo_jax.models.llm.sampler import make_generate_fn
from adrpo_jax.rl import config as config_lib
from adrpo_jax.rl.trainer import RLTrainer
from adrpo_jax.train.config import ConfigError, common_config

from tests.rl.test_trainer import tiny_config


def _config(**kw):
    c = config_lib.add_llm_config(common_config())
    for k, v in kw.items():
        section, key = k.split(".")
        c[section][key] = v
    return c


def test_rollout_engine_resolution_and_errors():
    assert config_lib.rollout_engine(_config(), 64, 1) == ("static", 16)  # default max_new_tokens=8: static
    long = {"sampling.max_new_tokens": 1024}
    assert config_lib.rollout_engine(_config(**long), 64, 8) == ("continuous", 16)
    assert config_lib.rollout_engine(_config(**long), 64, 8, platform="gpu") == ("static", 16)  # not measured there
    assert config_lib.rollout_engine(_config(**long, **{"sampling.engine": "continuous"}), 64, 8, platform="tpu") == (
        "continuous", 16)
    assert config_lib.rollout_engine(_config(**long, **{"sampling.decode_slots": 64}), 64, 8) == ("static", 64)
    assert config_lib.rollout_engine(_config(**{"sampling.engine": "continuous"}), 64, 1) == ("continuous", 16)
    assert config_lib.rollout_engine(_config(**{"sampling.engine": "static", **long}), 64, 1) == ("static", 16)
    with pytest.raises(ConfigError, match=r"`sampling.decode_slots`=12 must be a multiple of the data-parallel size 8"):
        config_lib.rollout_engine(_config(**{"sampling.decode_slots": 12}), 64, 8)
    with pytest.raises(ConfigError, match=r"at most the rollout batch of 64 rows"):
        config_lib.rollout_engine(_config(**{"sampling.decode_slots": 72}), 64, 8)
    with pytest.raises(ConfigError, match=r"`sampling.engine`"):
        config_lib.validate_llm_config(_config(**{"sampling.engine": "paged"}))
    with pytest.raises(ConfigError, match=r"`sampling.decode_slots`"):
        config_lib.validate_llm_config(_config(**{"sampling.decode_slots": -1}))


@pytest.mark.slow
def test_trainer_rollout_on_the_continuous_engine(tiny_model_dir, tmp_path):
    """16 rows (8 prompts x 2) through 8 slots over 8 devices: the rollout's completions equal the static sampler's
    with the per-row keys fold_in(sample key, row), and an update runs on them."""
    config = tiny_config(tiny_model_dir, eval_every=0, **{
        "rl.num_prompts_per_step": 8, "rl.ref_sync_steps": 0, "sampling.max_new_tokens": 6,
        "sampling.engine": "continuous", "sampling.decode_slots": 8})
    trainer = RLTrainer(config, tmp_path)
    assert (trainer.engine, trainer.decode_slots) == ("continuous", 8)
    assert trainer.programs["generate"].shrink_key == "sampling.decode_slots"
    state = trainer.init_state()
    batch, host = trainer.rollout(0, state)
    # the rollout's own draw: the same prompts and sample key, the static sampler with per-row keys
    sample_key = jax.random.split(jax.random.fold_in(trainer.base_key, 0))[0]
    b, p = batch["tokens"].shape[0], int(config.sampling.max_prompt_length)
    static = jax.jit(make_generate_fn(trainer.graphdef, trainer.sampling))
    ref = static(nnx.merge_state(state["params"], trainer.frozen), batch["tokens"][:, :p],
                 batch["attention_mask"][:, :p], request_keys(sample_key, b))
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(batch["completion_mask"]), np.asarray(ref.completion_mask))
    new_state, metrics = trainer.update(0, state, (batch, host))
    assert np.isfinite(float(metrics["loss"]))
