"""Digits data: shapes, ranges, deterministic stratified split, thickness attribute, condition ids, resize."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from adrpo_jax.flow import data


def test_splits_shapes_ranges_and_determinism():
    train, test = data.load_digits_splits(8)
    assert train.images.shape == (1438, 8, 8, 1) and test.images.shape == (359, 8, 8, 1)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    # the split is a partition of the raw data, stratified (each class ~20% test), and deterministic
    raw = load_digits()
    all_images = np.concatenate([train.images, test.images])[..., 0]
    expected = raw.images.astype(np.float32) / 8.0 - 1.0
    assert sorted(map(bytes, all_images)) == sorted(map(bytes, expected))
    for c in range(10):
        n_c = np.sum(raw.target == c)
        assert abs(np.sum(test.labels == c) - 0.2 * n_c) <= 1
    train2, _ = data.load_digits_splits(8)
    np.testing.assert_array_equal(train.images, train2.images)
    other, _ = data.load_digits_splits(8, seed=1)
    assert not np.array_equal(other.labels, train.labels)
    assert len(data.load_digits_dataset(8, "all")) == 1797


def test_thickness_is_above_train_median_of_the_class():
    train, test = data.load_digits_splits(8)
    for c in range(10):
        ink = train.mean_ink[train.labels == c]
        med = np.median(ink)
        np.testing.assert_array_equal(train.thickness[train.labels == c], (ink > med).astype(np.int32))
        assert 0.4 <= train.thickness[train.labels == c].mean() <= 0.5 + 1e-9
        np.testing.assert_array_equal(test.thickness[test.labels == c],
                                      (test.mean_ink[test.labels == c] > med).astype(np.int32))
    np.testing.assert_allclose(train.mean_ink, (train.images[..., 0] + 1).mean(axis=(1, 2)) / 2, atol=1e-6)


def test_upsampling_matches_torch_bilinear():
    train16, _ = data.load_digits_splits(16)
    train8, _ = data.load_digits_splits(8)
    assert train16.images.shape == (1438, 16, 16, 1)
    ref = torch.nn.functional.interpolate(torch.tensor((train8.images[:20, ..., 0] + 1) / 2)[:, None], size=16,
                                          mode="bilinear", align_corners=False)[:, 0].numpy() * 2 - 1
    np.testing.assert_allclose(train16.images[:20, ..., 0], ref, atol=1e-5)
    np.testing.assert_array_equal(train16.labels, train8.labels)


def test_condition_ids_round_trip_and_names():
    digits, thick = np.arange(10).repeat(2), np.tile([0, 1], 10)
    cond = data.condition_ids(digits, thick, "digit_thickness")
    np.testing.assert_array_equal(np.sort(cond), np.arange(20))
    d2, t2 = data.split_condition(cond, "digit_thickness")
    np.testing.assert_array_equal(d2, digits)
    np.testing.assert_array_equal(t2, thick)
    assert data.split_condition(cond, "digit")[1] is None
    assert data.num_conditions("digit") == 10 and data.num_conditions("digit_thickness") == 20
    assert data.describe_condition(5, "digit") == "5"
    assert data.describe_condition(0, "digit_thickness") == "0 thin"
    train, _ = data.load_digits_splits(8)
    np.testing.assert_array_equal(train.conditions("digit_thickness"), 2 * train.labels + train.thickness)
    np.testing.assert_array_equal(data.prompt_conditions("digit_thickness", 3)[:7], [0, 0, 0, 1, 1, 1, 2])


@pytest.mark.parametrize("call, match", [
    (lambda: data.load_digits_splits(4), "image_size"),
    (lambda: data.load_digits_splits(8, test_fraction=1.0), "test_fraction"),
    (lambda: data.load_digits_dataset(8, "val"), "split"),
    (lambda: data.num_conditions("digit_color"), "condition_mode"),
    (lambda: data.describe_condition(20, "digit_thickness"), "cond"),
    (lambda: data.prompt_conditions("digit", 0), "samples_per_prompt"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
