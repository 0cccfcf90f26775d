"""Sample grids as PNG files (matplotlib, Agg backend; nothing is shown on screen).

Images are ``[N, H, W, C]`` in ``[-1, 1]`` (C = 1 grey or 3 RGB), drawn row-major ``nrow`` per row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["image_grid", "save_image_grid", "save_comparison_grid"]


def image_grid(images: Any, nrow: int, *, padding: int = 1, pad_value: float = 0.5) -> np.ndarray:
    """Tile ``images [N, H, W, C]`` (values in ``[-1, 1]``) into one ``[rows*(H+p)+p, nrow*(W+p)+p, C]`` array in
    ``[0, 1]`` (missing cells and padding are ``pad_value``).

    >>> image_grid(np.zeros((3, 2, 2, 1)), nrow=2).shape
    (7, 7, 1)
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"`images` must be [N, H, W, C] with C in (1, 3), got shape {x.shape}.")
    if nrow < 1:
        raise ValueError(f"`nrow` must be >= 1, got {nrow}.")
    n, h, w, c = x.shape
    rows = -(-n // nrow)
    x = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = x[i]
    return grid


def _figure(panels: Sequence[tuple[str | None, np.ndarray]], path: str, title: str | None, scale: float) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    widths = [p.shape[1] for _, p in panels]
    height = max(p.shape[0] for _, p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(scale * sum(widths) / 16 + 0.5, scale * height / 16 + 0.8),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (name, grid) in zip(axes[0], panels):
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0.0, vmax=1.0,
                  interpolation="nearest")
        ax.set_axis_off()
        if name:
            ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_image_grid(images: Any, path: str | os.PathLike, nrow: int = 10, *, title: str | None = None,
                    scale: float = 1.0) -> str:
    """Save ``images [N, H, W, C]`` in ``[-1, 1]`` as a PNG grid with ``nrow`` images per row; returns the path.

    With the prompt-major layout of :func:`adrpo_jax.flow.data.prompt_conditions` and ``nrow`` = samples per
    prompt, each row shows one prompt.
    """
    return _figure([(None, image_grid(images, nrow))], os.fspath(path), title, scale)


def save_comparison_grid(panels: dict[str, Any] | Sequence[tuple[str, Any]], path: str | os.PathLike,
                         nrow: int = 10, *, title: str | None = None, scale: float = 1.0) -> str:
    """Save side-by-side grids, e.g. ``{"before": x_ref, "after": x_finetuned}``, as one PNG; returns the path."""
    items = list(panels.items()) if isinstance(panels, dict) else list(panels)
    if not items:
        raise ValueError("`panels` must not be empty.")
    return _figure([(name, image_grid(x, nrow)) for name, x in items], os.fspath(path), title, scale)
