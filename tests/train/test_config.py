"""Common config sections and validation (ConfigError names the dotted key and the value)."""

import ml_collections
import pytest

from adrpo_jax.train import config as config_lib
from adrpo_jax.train.config import ConfigError


def test_defaults_validate_and_lock():
    config = config_lib.common_config()
    config.trainer = "flow"
    config_lib.finalize_config(config)
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.optim.learnig_rate = 1.0  # typo in trainer code fails loudly


def test_add_common_config_keeps_existing_values():
    config = ml_collections.ConfigDict({"seed": 7, "optim": {"name": "sgd"}, "model": {"width": 4}})
    config_lib.add_common_config(config)
    assert config.seed == 7 and config.optim.name == "sgd" and config.model.width == 4
    assert config.optim.learning_rate == 1e-4 and config.mesh.data == -1


@pytest.mark.parametrize("key,value,fragment", [
    ("optim.learning_rate", -0.1, "`optim.learning_rate` must be > 0"),
    ("optim.learning_rate", "x", "`optim.learning_rate` must be of type float"),
    ("optim.name", "rmsprop", "`optim.name` must be one of"),
    ("optim.schedule", "step", "`optim.schedule` must be one of"),
    ("optim.b2", 1.0, "`optim.b2` must be < 1.0"),
    ("optim.warmup_steps", 5000, "`optim.warmup_steps`=5000 must be <= `total_steps`=1000"),
    ("optim.momentum", 0.9, "`optim.momentum` only applies"),
    ("total_steps", 0, "`total_steps` must be >= 1"),
    ("total_steps", 1.5, "`total_steps` must be of type int"),
    ("log_every", True, "`log_every` must be of type int"),
    ("mesh.data", 0, "`mesh.data` must be >= 1"),
    ("mesh.tensor", -1, "At most one mesh axis may be -1"),
    ("checkpoint.every_steps", 0, "`checkpoint.every_steps` must be >= 1"),
    ("numerics.max_consecutive_skips", 0, "`numerics.max_consecutive_skips` must be >= 1"),
    ("logging.wandb", "yes", "`logging.wandb` must be of type bool"),
    ("distributed.mode", "maybe", "`distributed.mode` must be one of"),
    ("distributed.coordinator_address", "localhost", "'host:port'"),
    ("distributed.process_id", 2, "`distributed.process_id`=2 must be < `distributed.num_processes`=2"),
])
def test_validation_names_key_and_value(key, value, fragment):
    config = config_lib.common_config()
    config.distributed.num_processes = 2
    section, _, leaf = key.rpartition(".")
    node = config_lib.get_by_path(config, section) if section else config
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError) as err:
        config_lib.validate_common_config(config)
    assert fragment in str(err.value)
    assert err.value.key is not None and err.value.key.split(".")[0] == key.split(".")[0]
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("trainer", ["gan", "", "my module:f", 3])
def test_unknown_trainer_names_the_value(trainer):
    """`trainer` is checked by the runner (the recipe registry lives above the config layer)."""
    from adrpo_jax.recipe.base import validate_trainer_name  # pylint: disable=import-outside-toplevel
    with pytest.raises(ConfigError, match="`trainer` must be one of") as err:
        validate_trainer_name(trainer)
    assert err.value.key == "trainer" and repr(trainer) in str(err.value)


def test_require_helpers():
    c = ml_collections.ConfigDict({"rl": {"batch_size": 12, "group_size": 5, "name": "a"}})
    with pytest.raises(ConfigError, match=r"`rl.batch_size`=12 must be divisible by `rl.group_size`=5"):
        config_lib.require_divisible(c, "rl.batch_size", "rl.group_size")
    config_lib.require_divisible(c, "rl.batch_size", 4)
    with pytest.raises(ConfigError, match=r"`rl.batch_size`=12 must be divisible by the data-parallel size 8"):
        config_lib.require_divisible(c, "rl.batch_size", 8, what="the data-parallel size 8")
    with pytest.raises(ConfigError, match=r"`rl.name` must be one of \['b'\], got 'a'"):
        config_lib.require_choice(c, "rl.name", ["b"])
    with pytest.raises(ConfigError, match=r"`rl.group_size` must be <= 4, got 5"):
        config_lib.require_range(c, "rl.group_size", max=4)
    with pytest.raises(ConfigError, match=r"`rl.missing` is missing"):
        config_lib.get_by_path(c, "rl.missing")


def test_find_unknown_override():
    config = config_lib.common_config()
    assert config_lib.find_unknown_override(config, ["optim.b1", "mesh.data"]) is None
    msg = config_lib.find_unknown_override(config, ["optim.b1", "optim.beta1"])
    assert "`config.optim.beta1`" in msg and "b1" in msg
    assert "`config.nope`" in config_lib.find_unknown_override(config, ["nope"])


def test_config_diff_and_fingerprint_ignore_runtime_keys():
    a = config_lib.common_config()
    a.model = ml_collections.ConfigDict({"width": 8})
    b = ml_collections.ConfigDict(a.to_dict())
    b.total_steps = 5000
    b.checkpoint.every_steps = 7
    b.mesh.fsdp = 4
    assert config_lib.config_diff(a, b) == []
    assert config_lib.config_fingerprint(a) == config_lib.config_fingerprint(b)
    b.model.width = 16
    assert config_lib.config_diff(a, b) == [("model.width", 8, 16)]
    assert config_lib.config_fingerprint(a) != config_lib.config_fingerprint(b)
