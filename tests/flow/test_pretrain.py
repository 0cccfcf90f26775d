"""Pre-training: a short CFM run lowers the held-out loss, is deterministic and cached; (slow) the default
pre-trained model's samples are classified as the prompted digit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.flow import data, metrics, pretrain, sampling

TINY = {"hidden": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0}


def _tiny_config(steps=60):
    cfg = pretrain.default_config()
    cfg.model.update(TINY)
    cfg.pretrain.update({"steps": steps, "batch_size": 32, "log_every": 20, "warmup_steps": 5,
                         "learning_rate": 3e-3})
    return cfg


def test_short_run_lowers_cfm_loss_and_is_cached(tmp_path):
    cfg = _tiny_config()
    model, m = pretrain.pretrain_flow_model(cfg, workdir=tmp_path / "run", log_fn=None)
    assert not m["cached"] and m["steps"] == 60 and len(m["loss_curve"]) == 3
    assert m["test_cfm_loss"] < 0.8 * m["initial_test_cfm_loss"], m
    assert m["loss_curve"][-1][1] < m["loss_curve"][0][1]
    assert m["num_params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # a finished run with the same config is loaded, not re-trained; the weights round-trip exactly
    again, m2 = pretrain.pretrain_flow_model(cfg, workdir=tmp_path / "run", log_fn=None)
    assert m2["cached"] and m2["test_cfm_loss"] == m["test_cfm_loss"]
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def test_cache_root_and_config_validation(monkeypatch, tmp_path):
    monkeypatch.setenv("ADRPO_JAX_CACHE", str(tmp_path))
    assert str(pretrain.cache_root()) == str(tmp_path)
    cfg = pretrain.default_config()
    assert pretrain.dit_config_from(cfg).num_classes == 10
    cfg.data.condition_mode = "digit_thickness"
    cfg.data.image_size = 16
    dit_cfg = pretrain.dit_config_from(cfg)
    assert dit_cfg.num_classes == 20 and dit_cfg.image_size == 16
    assert pretrain.classifier_config_from(cfg).image_size == 16
    bad = pretrain.default_config()
    bad.pretrain.lr = 1.0
    with pytest.raises(ValueError, match="Unknown keys \\['lr'\\]"):
        pretrain.pretrain_flow_model(bad, use_cache=False, log_fn=None)
    with pytest.raises(ValueError, match="time_sampling"):
        pretrain.sample_time(jax.random.key(0), 4, "beta")


@pytest.mark.slow
def test_default_pretrained_model_samples_the_prompted_digits(tmp_path, trained_classifier):
    clf, _ = trained_classifier
    model, m = pretrain.pretrain_flow_model(pretrain.default_config(), workdir=tmp_path / "dit", log_fn=None)
    graphdef, state = nnx.split(model)
    sample_fn = sampling.make_sample_fn(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c), num_steps=10,
                                        method="heun")
    cond = jnp.asarray(data.prompt_conditions("digit", 30))
    x0 = sampling.sample_noise(jax.random.key(0), (cond.shape[0], 8, 8, 1))
    images = sample_fn(state, x0, cond)
    ev = metrics.evaluate_samples(images, cond, classifier=clf)
    print("pretrain", {k: v for k, v in m.items() if k != "loss_curve"}, "samples", ev)
    assert ev["digit_accuracy"] > 0.6, (ev, m)
    assert ev["diversity"] > 1.0, ev  # not collapsed
