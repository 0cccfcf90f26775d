"""The digits data set of the flow-matching experiments (``sklearn.datasets.load_digits``, nothing downloaded).

Images are 8x8 grey-scale digits (1797 of them, 10 classes), bundled inside scikit-learn. They are scaled to
``[-1, 1]`` (0 ink -> -1, full ink -> +1), laid out NHWC ``[N, H, W, 1]`` float32 and optionally upsampled
bilinearly to ``image_size x image_size`` (e.g. 16).

Conditions (prompts). Two condition modes:

* ``"digit"``: condition id = the digit, in ``[0, 10)``.
* ``"digit_thickness"``: a composite "attribute binding" prompt (digit AND stroke thickness), condition id
  ``2 * digit + thickness`` in ``[0, 20)``; ``thickness`` is 1 ("thick") when the image's mean ink is above
  the median mean ink of its digit class (medians computed on the *training* split only, so the test split
  does not leak into the label), else 0 ("thin"). :func:`split_condition` inverts the map.

The train/test split is deterministic (a seeded, class-stratified permutation), independent of
``image_size``.

Example:
  >>> train, test = load_digits_splits(image_size=8)
  >>> train.images.shape, train.images.dtype, test.labels.dtype
  ((1438, 8, 8, 1), dtype('float32'), dtype('int32'))
  >>> float(train.images.min()), float(train.images.max())
  (-1.0, 1.0)
  >>> int(condition_ids(3, 1, "digit_thickness")), describe_condition(7, "digit_thickness")
  (7, '3 thick')
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np

__all__ = [
    "CONDITION_MODES",
    "DigitsDataset",
    "load_digits_dataset",
    "load_digits_splits",
    "num_conditions",
    "condition_ids",
    "split_condition",
    "describe_condition",
    "prompt_conditions",
    "step_prompts",
]

ConditionMode = Literal["digit", "digit_thickness"]
CONDITION_MODES = ("digit", "digit_thickness")
NUM_DIGITS = 10
NUM_THICKNESS = 2
THICKNESS_NAMES = ("thin", "thick")


def _check_mode(mode: str) -> None:
    if mode not in CONDITION_MODES:
        raise ValueError(f"`condition_mode` must be one of {CONDITION_MODES}, got {mode!r}.")


def num_conditions(condition_mode: ConditionMode) -> int:
    """Number of distinct condition ids of a mode (10 for ``"digit"``, 20 for ``"digit_thickness"``)."""
    _check_mode(condition_mode)
    return NUM_DIGITS if condition_mode == "digit" else NUM_DIGITS * NUM_THICKNESS


def condition_ids(digits, thickness, condition_mode: ConditionMode):
    """Condition ids from digit labels ``[N]`` and thickness labels ``[N]`` (0 thin / 1 thick).

    ``"digit"`` -> ``digit``; ``"digit_thickness"`` -> ``2 * digit + thickness``. Works on NumPy or JAX
    arrays and Python ints (returns the same kind).
    """
    _check_mode(condition_mode)
    if condition_mode == "digit":
        return digits
    return 2 * digits + thickness


def split_condition(cond, condition_mode: ConditionMode):
    """Inverse of :func:`condition_ids`: ``cond [N] -> (digit [N], thickness [N] or None)``.

    In ``"digit"`` mode the thickness is not part of the prompt and ``None`` is returned for it.
    """
    _check_mode(condition_mode)
    if condition_mode == "digit":
        return cond, None
    return cond // 2, cond % 2


def describe_condition(cond: int, condition_mode: ConditionMode) -> str:
    """Human-readable prompt of a condition id, e.g. ``"3"`` or ``"3 thick"``."""
    n = num_conditions(condition_mode)
    cond = int(cond)
    if not 0 <= cond < n:
        raise ValueError(f"`cond` must be in [0, {n}) for condition_mode={condition_mode!r}, got {cond}.")
    digit, thick = split_condition(cond, condition_mode)
    return str(digit) if thick is None else f"{digit} {THICKNESS_NAMES[thick]}"


def prompt_conditions(condition_mode: ConditionMode, samples_per_prompt: int) -> np.ndarray:
    """All condition ids of a mode, each repeated ``samples_per_prompt`` times: ``[K * samples_per_prompt]``.

    The layout ``[0, 0, ..., 1, 1, ...]`` (prompt-major) is what the per-prompt metrics and the sample grids
    expect.

    >>> prompt_conditions("digit", 2)[:6]
    array([0, 0, 1, 1, 2, 2], dtype=int32)
    """
    if samples_per_prompt < 1:
        raise ValueError(f"`samples_per_prompt` must be >= 1, got {samples_per_prompt}.")
    return np.repeat(np.arange(num_conditions(condition_mode), dtype=np.int32), samples_per_prompt)


@dataclasses.dataclass(frozen=True)
class DigitsDataset:
    """One split of the digits data.

    Attributes:
      images: ``[N, H, W, 1]`` float32 in ``[-1, 1]``.
      labels: ``[N]`` int32 digit in ``[0, 10)``.
      thickness: ``[N]`` int32, 1 = thick (mean ink above the class median of the train split), 0 = thin.
      mean_ink: ``[N]`` float32 mean ink of the original 8x8 image in ``[0, 1]``.
    """

    images: np.ndarray
    labels: np.ndarray
    thickness: np.ndarray
    mean_ink: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def conditions(self, condition_mode: ConditionMode = "digit") -> np.ndarray:
        """``[N]`` int32 condition ids of the images (see :func:`condition_ids`)."""
        return condition_ids(self.labels, self.thickness, condition_mode).astype(np.int32)


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # local import: scikit-learn is a data-only dependency

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)  # [N, 8, 8] in [0, 1]
    return images, d.target.astype(np.int32)


def _split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified deterministic split: per class, a seeded permutation; the first part is test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(NUM_DIGITS):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = round(test_fraction * idx.size)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """``[N, h, w] -> [N, size, size]`` bilinear (half-pixel centres, edge clamped), NumPy only."""
    n, h, w = images.shape
    if (h, w) == (size, size):
        return images

    def weights(in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(size) + 0.5) * in_size / size - 0.5
        pos = np.clip(pos, 0.0, in_size - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, in_size - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    ylo, yhi, wy = weights(h)
    xlo, xhi, wx = weights(w)
    rows = images[:, ylo, :] * (1 - wy)[None, :, None] + images[:, yhi, :] * wy[None, :, None]
    return rows[:, :, xlo] * (1 - wx)[None, None, :] + rows[:, :, xhi] * wx[None, None, :]


def load_digits_splits(image_size: int = 8, *, test_fraction: float = 0.2,
                       seed: int = 0) -> tuple[DigitsDataset, DigitsDataset]:
    """The deterministic ``(train, test)`` splits of the digits data (see the module docstring).

    Args:
      image_size: output side length; 8 is the native resolution, larger values upsample bilinearly
        (e.g. 16, which suits ``patch_size=2`` or 4 DiTs). Must be >= 8.
      test_fraction: fraction of each class held out for the test split, in ``(0, 1)``.
      seed: seed of the split permutation.
    """
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"`image_size` must be an int >= 8 (native digits are 8x8), got {image_size!r}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
    raw, labels = _raw_digits()
    train_idx, test_idx = _split_indices(labels, test_fraction, seed)
    mean_ink = raw.reshape(raw.shape[0], -1).mean(axis=1).astype(np.float32)
    medians = np.array([np.median(mean_ink[train_idx][labels[train_idx] == c]) for c in range(NUM_DIGITS)])
    thickness = (mean_ink > medians[labels]).astype(np.int32)
    scaled = _resize_bilinear(raw, int(image_size)) * 2.0 - 1.0
    images = np.clip(scaled, -1.0, 1.0).astype(np.float32)[..., None]

    def make(idx: np.ndarray) -> DigitsDataset:
        return DigitsDataset(images=images[idx], labels=labels[idx], thickness=thickness[idx],
                             mean_ink=mean_ink[idx])

    return make(train_idx), make(test_idx)


def load_digits_dataset(image_size: int = 8, split: Literal["train", "test", "all"] = "train", *,
                        test_fraction: float = 0.2, seed: int = 0) -> DigitsDataset:
    """One split (``"train"``, ``"test"`` or ``"all"``) of :func:`load_digits_splits`."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"`split` must be 'train', 'test' or 'all', got {split!r}.")
    train, test = load_digits_splits(image_size, test_fraction=test_fraction, seed=seed)
    if split == "train":
        return train
    if split == "test":
        return test
    return DigitsDataset(*(np.concatenate([getattr(train, f.name), getattr(test, f.name)])
                           for f in dataclasses.fields(DigitsDataset)))


def step_prompts(seed: int, step: int, prompts_per_step: int, samples_per_prompt: int,
                 num_conditions: int) -> np.ndarray:
    """The ``[K * G]`` prompt ids of RL step ``step`` (prompt-major: each id repeated G times).

    A deterministic function of ``(seed, step)``: the K ids are the first K of seeded permutations of all
    ``num_conditions`` ids (concatenated when K > num_conditions, so every prompt appears ``K // n`` or
    ``K // n + 1`` times).

    >>> step_prompts(0, 3, 4, 2, 10).shape
    (8,)
    >>> sorted(set(step_prompts(0, 3, 10, 1, 10).tolist())) == list(range(10))
    True
    """
    rng = np.random.default_rng([int(seed), int(step), 0x5EED])
    reps = -(-int(prompts_per_step) // int(num_conditions))
    ids = np.concatenate([rng.permutation(num_conditions) for _ in range(reps)])[:prompts_per_step]
    return np.repeat(ids.astype(np.int32), samples_per_prompt)
