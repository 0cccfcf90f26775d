"""Issue 18, items 5-7 (flow): a loss identically 0 refused at start, ``model.path`` honouring the config's
dtype / param_dtype / remat, and the pre-training cache key without the numerics-neutral ``remat``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.flow.config import add_flow_config, validate_flow_config
from adrpo_jax.train.config import ConfigError, common_config


def base():
    return add_flow_config(common_config())


# -- item 5 ----------------------------------------------------------------------------------------------------


def test_method_none_with_clipped_cfm_advantages_is_refused():
    """rl.method='none' has beta_0 = 0, so the 'multiple' clip is +-0: the CFM weights, the loss and the gradient
    would be 0 on every step. The combination is refused naming the key; with an absolute clip it is valid."""
    config = base()
    config.rl.method = "none"
    config.rl.clip_cfm_advantages = True
    with pytest.raises(ConfigError, match="clip_cfm_advantages") as err:
        validate_flow_config(config)
    assert err.value.key == "rl.clip_cfm_advantages"
    config.rl.adv_clip = "absolute"
    config.rl.adv_clip_min, config.rl.adv_clip_max = -1.0, 1.0
    validate_flow_config(config)  # a real clip: allowed
    config.rl.adv_clip = "multiple"
    config.rl.adv_clip_min, config.rl.adv_clip_max = -float("inf"), float("inf")
    config.rl.clip_cfm_advantages = False
    validate_flow_config(config)  # raw advantages: the 'none' baseline


# -- item 6 ----------------------------------------------------------------------------------------------------


def _tiny_dit(**kw):
    from adrpo_jax.models.dit import DiT, DiTConfig
    return DiT(DiTConfig(image_size=8, patch_size=4, hidden=16, depth=1, heads=2, num_classes=10, frequency_dim=16,
                       mlp_ratio=2.0, **kw), rngs=nnx.Rngs(0))


def test_model_path_takes_dtype_param_dtype_and_remat_from_the_config(tmp_path):
    """A DiT saved in float32 without remat, fine-tuned from `model.path` with bfloat16 + remat requested, is loaded
    with the requested settings (parameters cast to bfloat16), not the saved ones."""
    from adrpo_jax.flow.trainer import load_models
    from adrpo_jax.models.classifier import ClassifierConfig, DigitClassifier, save_classifier
    from adrpo_jax.models.dit import load_dit, save_dit

    saved = _tiny_dit()
    save_dit(saved, tmp_path / "dit")
    save_classifier(DigitClassifier(ClassifierConfig(image_size=8, channels=(4,), features=8), rngs=nnx.Rngs(1)),
                                    tmp_path / "clf")
    config = base()
    config.data.condition_mode = "digit"
    config.model.path = str(tmp_path / "dit")
    config.classifier.path = str(tmp_path / "clf")
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.model.remat = True
    validate_flow_config(config)
    model, _ = load_models(config)
    assert (model.config.dtype, model.config.param_dtype, model.config.remat) == ("bfloat16", "bfloat16", True)
    want = nnx.state(saved, nnx.Param)
    got = nnx.state(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))  # the same cast, exact
    # The architecture stays the saved model's: it cannot be overridden.
    with pytest.raises(ValueError, match="hidden"):
        load_dit(tmp_path / "dit", hidden=32)


# -- item 7 ----------------------------------------------------------------------------------------------------


def test_remat_is_not_part_of_the_pretraining_cache_key(tmp_path, monkeypatch):
    """Toggling model.remat reuses the cached pre-trained DiT (and the loaded model has the requested remat); the
    cache directory of a remat=False config is the one it had before remat left the key (no cache invalidated)."""
    from adrpo_jax.flow import pretrain

    monkeypatch.setenv("ADRPO_JAX_CACHE", str(tmp_path))
    config = pretrain.default_config()
    config.model.update(patch_size=4, hidden=16, depth=1, heads=2, frequency_dim=16, mlp_ratio=2.0)
    config.pretrain.update(steps=2, batch_size=8, warmup_steps=0, log_every=1)
    config.data.test_fraction = 0.05  # a small test split: the CFM eval loss runs over it twice
    model, info = pretrain.pretrain_flow_model(config, log_fn=None)
    assert not info["cached"] and model.config.remat is False
    # The pre-fix key (the whole DiT config, remat included) names the same directory.
    # (`scan_layers` did not exist then: it is left out of the key as well, see tests/flow/test_dit_scan.py.)
    old_model = {k: v for k, v in pretrain.dit_config_from(config).to_dict().items() if k != "scan_layers"}
    old_key = {"data": pretrain._with_defaults(config, "data"), "model": old_model,
             "pretrain": {k: v for k, v in pretrain._with_defaults(config, "pretrain").items() if k != "log_every"}}
    assert info["directory"] == str(tmp_path / "flow_digits" / f"dit-{pretrain._hash({**old_key, 'version': 1})}")

    config.model.remat = True
    again, info2 = pretrain.pretrain_flow_model(config, log_fn=None)
    assert info2["cached"] and info2["directory"] == info["directory"]
    assert again.config.remat is True
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same saved file, loaded twice
    config.model.remat = False
    config.model.dtype = "bfloat16"  # changes the numbers: a different entry
    assert pretrain._hash({**old_key, "version": 1}) not in pretrain._run_dir(
            "dit", {"data": old_key["data"], "model": pretrain._model_cache_key(pretrain.dit_config_from(config)),
                            "pretrain": old_key["pretrain"]}, None, True)


# -- issue 16: the flow step's phases --------------------------------------------------------------------------


@pytest.mark.slow  # two tiny flow runs (~1 min of compilation on 2 cores)
def test_phase_timing_splits_the_step_into_timed_phases_with_the_same_numbers(tmp_path, caplog):
    """logging.phase_timing=True: time/sample, time/reward, time/update (within step_time_s), one console line per
    record, and the metrics of the fused step up to float32 rounding (two different compiled programs)."""
    import logging

    from adrpo_jax.flow.trainer import FlowTrainer
    from adrpo_jax.train.metrics import read_jsonl
    from tests.flow.test_trainer import _tiny_models, tiny_trainer_config

    caplog.set_level(logging.INFO)
    runs = {}
    for phase_timing in (False, True):
        config = tiny_trainer_config(total_steps=2)
        config.log_every, config.eval_every, config.eval.write_images = 1, 0, False
        config.model.save_final = False
        config.logging.phase_timing = phase_timing
        FlowTrainer(config, tmp_path / str(phase_timing), models=_tiny_models()).run()
        runs[phase_timing] = read_jsonl(tmp_path / str(phase_timing) / "metrics.jsonl")
    fused, split = runs[False], runs[True]
    assert [r["step"] for r in split] == [1, 2]
    for a, b in zip(fused, split):
        assert "time/sample" not in a
        phases = [b[k] for k in ("time/sample", "time/reward", "time/update")]
        assert all(p > 0 for p in phases) and sum(phases) <= b["step_time_s"] + 1e-3, b
        for key in ("reward_mean", "loss", "w2_mean", "sample_diversity", "grad_norm", "ref_refreshed"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)  # float32 rounding
    lines = [m.getMessage() for m in caplog.records if m.getMessage().startswith("step ")]
    assert len(lines) == 4, lines  # one line per logged step (no "refreshed" line beside it)
    assert all("reward_mean=" in line for line in lines) and "time/update=" in lines[-1]
