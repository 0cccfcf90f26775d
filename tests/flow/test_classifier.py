"""Digit classifier: outputs, features, save/load, and (slow) accuracy of the trained model on the test split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.flow import pretrain
from adrpo_jax.models.classifier import ClassifierConfig, DigitClassifier, load_classifier, save_classifier

SMALL = ClassifierConfig(image_size=8, channels=(8, 16), features=16)


def test_outputs_features_and_axis_names():
    clf = DigitClassifier(SMALL, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)), jnp.float32)
    logits, feats = jax.jit(lambda m, x: m(x, return_features=True))(clf, x)
    assert logits["digit"].shape == (3, 10) and logits["thickness"].shape == (3, 2) and feats.shape == (3, 16)
    assert all(v.dtype == jnp.float32 for v in logits.values())
    np.testing.assert_allclose(clf.features(x), feats, rtol=1e-5, atol=1e-6)
    specs = nnx.get_partition_spec(nnx.state(clf, nnx.Param))
    assert tuple(specs["convs"][0]["kernel"].get_value()) == (None, None, "conv_in", "conv_out")
    with pytest.raises(ValueError, match="`x`"):
        clf(jnp.zeros((2, 16, 16, 1)))
    with pytest.raises(ValueError, match="heads"):
        ClassifierConfig(heads=(("digit", 10), ("digit", 2)))


def test_save_load_round_trip(tmp_path):
    clf = DigitClassifier(SMALL, rngs=nnx.Rngs(1))
    save_classifier(clf, tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    assert loaded.config == SMALL
    for a, b in zip(jax.tree.leaves(nnx.state(clf, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_trained_classifier_is_accurate_on_the_test_split(trained_classifier):
    clf, metrics = trained_classifier
    assert metrics["test_digit_accuracy"] > 0.95, metrics
    assert metrics["test_thickness_accuracy"] > 0.85, metrics
    # re-using the finished run
    again, m2 = pretrain.train_classifier(pretrain.default_config(), workdir=metrics["directory"], log_fn=None)
    assert m2["cached"] and m2["test_digit_accuracy"] == metrics["test_digit_accuracy"]
