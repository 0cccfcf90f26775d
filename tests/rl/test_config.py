"""validate_llm_config / validate_llm_batch_layout: every bad key fails at start with a ConfigError naming it."""

import importlib.util
from pathlib import Path

import pytest

from adrpo_jax.rl.config import add_llm_config, needs_old_logprobs, needs_reference, validate_llm_batch_layout, \
    validate_llm_config
from adrpo_jax.train.config import ConfigError, common_config

REPO = Path(__file__).resolve().parents[2]


def load_config(name, variant):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def base(tmp_path=None):
    config = add_llm_config(common_config())
    config.model.path = "builtin:tiny_arith"
    return config


@pytest.mark.parametrize("variant", ["cpu", "cpu_grpo", "smollm2", "tpu"])
def test_shipped_configs_validate(variant):
    config = load_config("llm_arith", variant)
    validate_llm_config(config)
    assert config.trainer == "llm"
    assert config.rl.adaptive == (variant != "cpu_grpo")


@pytest.mark.parametrize("key,value,match", [
    ("model.path", "/no/such/dir", "model.path"),
    ("model.path", "builtin:gpt5", "unknown built-in model"),
    ("model.dtype", "int8", "model.dtype"),
    ("model.remat_policy", "nope", "model.remat_policy"),
    ("data.source", "csv", "data.source"),
    ("data.source", "jsonl", "data.path"),
    ("data.prompt_template", "Q: {question}", "data.prompt_template"),
    ("data.arithmetic.operations", "/", "data.arithmetic.operations"),
    ("rl.group_size", 1, "rl.group_size"),
    ("rl.num_iterations", 0, "rl.num_iterations"),
    ("rl.beta", -0.1, "rl.beta"),
    ("rl.eps_low", 1.0, "rl.eps_low"),
    ("rl.dual_clip", 0.5, "rl.dual_clip"),
    ("rl.loss_aggregation", "mean", "rl.loss_aggregation"),
    ("rl.kl_estimator", "k4", "rl.kl_estimator"),
    ("rl.max_log_ratio", 100.0, "rl.max_log_ratio"),
    ("rl.overlong_buffer", 8, "rl.overlong_buffer"),
    ("rl.ref_mixup_alpha", 0.5, "rl.ref_mixup_alpha"),
    ("rl.adv_clip_min", -1.0, "rl.adv_clip_min"),
    ("rl.scale_rewards", "median", "rl.scale_rewards"),
    ("sampling.temperature", 0.0, "sampling.temperature"),
    ("sampling.top_p", 1.5, "sampling.top_p"),
    ("sampling.max_new_tokens", "8", "sampling.max_new_tokens"),
    ("rewards.functions", ("exact_match", "nope"), "rewards.functions"),
    ("rewards.functions", (), "rewards.functions"),
    ("rewards.weights", (1.0,), "rewards.weights"),
    ("rewards.on_error", "ignore", "rewards.on_error"),
    ("eval.accuracy_reward", "nope", "eval.accuracy_reward"),
])
def test_bad_values_name_the_key(key, value, match):
    config = base()
    node = config
    *parts, last = key.split(".")
    for part in parts:
        node = node[part]
    if isinstance(value, tuple):
        node[last] = value
    else:
        with node.ignore_type():
            node[last] = value
    with pytest.raises(ConfigError, match=match) as err:
        validate_llm_config(config)
    assert err.value.key is not None


def test_impossible_combinations():
    config = base()
    config.rl.kl_placement = "reward"
    with pytest.raises(ConfigError, match=r"`rl.adaptive`=True cannot be combined with `rl.kl_placement`='reward'"):
        validate_llm_config(config)
    config.rl.adaptive = False
    validate_llm_config(config)
    assert needs_reference(config.rl) and needs_old_logprobs(config.rl)

    config = base()
    config.rl.beta, config.rl.ref_sync_steps = 0.0, 10
    with pytest.raises(ConfigError, match="rl.ref_sync_steps"):
        validate_llm_config(config)
    config.rl.ref_sync_steps = 0
    validate_llm_config(config)
    assert not needs_reference(config.rl)
    config.rl.adv_clip = "none"  # beta_i = -A: not zero, a reference is needed
    assert needs_reference(config.rl)

    config = base()
    config.rl.adv_clip = "absolute"
    with pytest.raises(ConfigError, match="rl.adv_clip_min"):
        validate_llm_config(config)
    config.rl.adv_clip_max = 0.5
    validate_llm_config(config)


def test_jsonl_needs_eval_path(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    config = base()
    config.data.source, config.data.path, config.eval_every = "jsonl", str(data), 10
    with pytest.raises(ConfigError, match="eval.path"):
        validate_llm_config(config)
    config.eval.path = str(data)
    validate_llm_config(config)


def test_batch_layout():
    config = base()
    config.rl.num_prompts_per_step, config.rl.group_size = 6, 4  # 24 rows
    assert validate_llm_batch_layout(config, 8) == {"batch_size": 24, "minibatch_size": 24, "micro_batch_size": 24}
    with pytest.raises(ConfigError, match="rl.num_prompts_per_step.*process count 4"):
        validate_llm_batch_layout(config, 1, process_count=4)
    config.rl.num_minibatches = 5
    with pytest.raises(ConfigError, match="rl.num_minibatches"):
        validate_llm_batch_layout(config, 1)
    config.rl.num_minibatches = 3
    config.optim.grad_accum_steps = 3
    with pytest.raises(ConfigError, match="optim.grad_accum_steps"):
        validate_llm_batch_layout(config, 1)
    config.optim.grad_accum_steps = 2
    with pytest.raises(ConfigError, match="micro-batch of 4 rows.*data-parallel size 8"):
        validate_llm_batch_layout(config, 8)
    assert validate_llm_batch_layout(config, 4)["micro_batch_size"] == 4


def test_gsm8k_config_requires_local_paths(tmp_path):
    config = load_config("llm_gsm8k", "")
    with pytest.raises(ConfigError, match="`model.path` must be set"):
        validate_llm_config(config)
    config.model.path = "builtin:smollm2"
    with pytest.raises(ConfigError, match="`data.path` must name a jsonl file"):
        validate_llm_config(config)
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    config.data.path = str(data)
    with pytest.raises(ConfigError, match="eval.path"):
        validate_llm_config(config)
    config.eval.path = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="`eval.path`=.*does not exist"):
        validate_llm_config(config)
    config.eval.path = str(data)
    validate_llm_config(config)
    cpu = load_config("llm_gsm8k", "cpu")
    cpu.data.path = cpu.eval.path = str(data)
    validate_llm_config(cpu)
