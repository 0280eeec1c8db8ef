"""Rendering attention maps to PNG/SVG/PDF. The only module that imports matplotlib.

A layer x head grid is composed into one RGB image and drawn with a single ``imshow`` (one
axes, one colour bar), which is what makes a 12 x 12 grid at 197 tokens fast; a single map is
drawn as a matrix with token labels on both axes. Masked positions (probability exactly 0, or
NaN from a fully masked row) are drawn in light grey, apart from the colour scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

MASKED_RGB = (0.86, 0.86, 0.86)
GAP_RGB = (1.0, 1.0, 1.0)
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
MAX_TICK_LABELS = 64

Matrix = np.ndarray[Any, Any]


def _masked(matrix: Matrix) -> Matrix:
    return np.asarray(~np.isfinite(matrix) | (matrix == 0))


def _label_step(count: int) -> int:
    return max(1, -(-count // MAX_TICK_LABELS))


def render_matrix(matrix: Matrix, query_labels: Sequence[str], key_labels: Sequence[str],
                  output: Path, fmt: str, *, title: str, cmap: str = "viridis",
                  dpi: int = 150) -> None:
    """One (Lq, Lk) map with token labels on both axes and a colour bar."""
    rows, cols = matrix.shape
    size = min(14.0, max(4.0, 0.22 * max(rows, cols) + 2.5))
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=dpi, layout="constrained")
    palette = colormaps[cmap].with_extremes(bad=MASKED_RGB)
    shown = np.ma.masked_array(matrix, mask=_masked(matrix))
    finite = matrix[np.isfinite(matrix)]
    vmax = float(finite.max()) if finite.size else 1.0
    image = ax.imshow(shown, cmap=palette, vmin=0.0, vmax=vmax or 1.0, interpolation="nearest",
                      aspect="auto")
    for axis, labels, count in ((ax.xaxis, key_labels, cols), (ax.yaxis, query_labels, rows)):
        step = _label_step(count)
        ticks = list(range(0, count, step))
        axis.set_ticks(ticks)
        axis.set_ticklabels([str(labels[i]) if i < len(labels) else str(i) for i in ticks],
                            fontsize=max(5, 10 - count // 16))
    plt.setp(ax.get_xticklabels(), rotation=90)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=11)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention probability")
    fig.savefig(output, format=fmt)
    plt.close(fig)


def compose_grid(panels: Sequence[Sequence[Matrix]], *, shared_scale: bool,
                 cmap: str = "viridis", gap: int = 2) -> tuple[Matrix, float]:
    """All panels as one RGB image (rows x cols of (Lq, Lk) maps with white gaps)."""
    rows, cols = len(panels), len(panels[0])
    height, width = panels[0][0].shape
    finite = [p[np.isfinite(p)] for row in panels for p in row]
    vmax = max((float(f.max()) for f in finite if f.size), default=1.0) or 1.0
    canvas = np.empty((rows * (height + gap) - gap, cols * (width + gap) - gap, 3), np.float32)
    canvas[:] = GAP_RGB
    palette = colormaps[cmap]
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            if panel.shape != (height, width):
                raise ValueError("grid panels must share one shape")
            local = np.nan_to_num(panel, nan=0.0)
            top = vmax if shared_scale else (float(local.max()) or 1.0)
            rgb = palette(np.clip(local / top, 0.0, 1.0))[..., :3]  # (Lq, Lk, 3)
            rgb[_masked(panel)] = MASKED_RGB
            y, x = r * (height + gap), c * (width + gap)
            canvas[y:y + height, x:x + width] = rgb
    return canvas, vmax


def render_grid(panels: Sequence[Sequence[Matrix]], row_titles: Sequence[str],
                col_titles: Sequence[str], output: Path, fmt: str, *, title: str,
                shared_scale: bool = True, cmap: str = "viridis", dpi: int = 120) -> None:
    """A layer x head grid in one image, labelled by row and column, with one colour bar."""
    canvas, vmax = compose_grid(panels, shared_scale=shared_scale, cmap=cmap)
    rows, cols = len(panels), len(panels[0])
    height, width = panels[0][0].shape
    panel_inches = min(1.6, max(0.7, 14.0 / max(rows, cols)))
    fig, ax = plt.subplots(figsize=(cols * panel_inches + 2.0, rows * panel_inches + 1.2),
                           dpi=dpi, layout="constrained")
    ax.imshow(canvas, interpolation="nearest", aspect="auto")
    ax.set_xticks([c * (width + 2) + width / 2 - 0.5 for c in range(cols)])
    ax.set_xticklabels(col_titles, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([r * (height + 2) + height / 2 - 0.5 for r in range(rows)])
    ax.set_yticklabels(row_titles, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=11)
    scale = Normalize(0.0, vmax if shared_scale else 1.0)
    label = "attention probability" if shared_scale else "fraction of each panel's maximum"
    fig.colorbar(ScalarMappable(scale, colormaps[cmap]), ax=ax, shrink=0.6, label=label)
    fig.savefig(output, format=fmt)
    plt.close(fig)
