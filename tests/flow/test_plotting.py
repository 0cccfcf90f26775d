"""Sample grids: layout of the tiled array and PNG files."""

import matplotlib.image
import numpy as np
import pytest

from adrpo_jax.flow import plotting


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 1), v) for v in (-1.0, 0.0, 1.0)])
    grid = plotting.image_grid(images, nrow=2, padding=1, pad_value=0.25)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
    np.testing.assert_array_equal(grid[1:3, 1:4], 0.0)     # first image (-1 -> 0)
    np.testing.assert_array_equal(grid[1:3, 5:8], 0.5)     # second image (0 -> 0.5)
    np.testing.assert_array_equal(grid[4:6, 1:4], 1.0)     # third image, second row
    np.testing.assert_array_equal(grid[4:6, 5:8], 0.25)    # empty cell
    with pytest.raises(ValueError, match="images"):
        plotting.image_grid(np.zeros((2, 3, 3)), nrow=2)


def test_png_files(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (20, 8, 8, 1))
    path = plotting.save_image_grid(x, tmp_path / "grid.png", nrow=10, title="samples")
    assert matplotlib.image.imread(path).ndim == 3
    path = plotting.save_comparison_grid({"before": x, "after": -x}, tmp_path / "sub" / "cmp.png", nrow=5)
    img = matplotlib.image.imread(path)
    assert img.shape[1] > img.shape[0]  # two panels side by side
