"""The head atlas figure: a layer x head grid, each cell coloured by the head's top role, its
score as intensity (pale at the role's threshold, full colour at 1), the role's three-letter
code written in the cell so that the grid reads without colour too.

Sizes are fixed in inches per cell (never below ``MIN_CELL``), so a 32 x 32 model's grid is
as legible as a 4 x 4 one, only larger; text is plain (``render.PLAIN_TEXT``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from attnviz.head_roles import (
    ROLE_COLOURS,
    ROLES,
    ROLES_BY_NAME,
    role_rgb,
    text_colour,
)
from attnviz.render import PLAIN_TEXT, wrap_title
from attnviz.text_safety import terminal

if TYPE_CHECKING:
    from attnviz.head_atlas import HeadAtlas

NO_ROLE_RGB = (1.0, 1.0, 1.0)
UNDEFINED_RGB = (0.86, 0.86, 0.86)  # a head this layer does not have
MIN_CELL, MAX_CELL = 0.3, 0.6  # inches
DPI = 150


@dataclass(frozen=True)
class AtlasLayout:
    """What the figure came out as: pixel sizes and the smallest text, for checks."""

    width_px: int
    height_px: int
    cell_px: float
    cell_font_pt: float
    tick_font_pt: float


def cell_colour(role: str | None, score: float) -> tuple[float, float, float]:
    """The role's colour blended with white by how far the score is from threshold to 1."""
    return role_rgb(role, score) or NO_ROLE_RGB


def atlas_grid(atlas: HeadAtlas) -> tuple[np.ndarray[Any, Any], list[list[str]]]:
    """(layers, heads, 3) colours and the code written in each cell."""
    heads = max((len(layer.heads) for layer in atlas.layers), default=1)
    rgb = np.empty((len(atlas.layers), heads, 3))
    rgb[:] = UNDEFINED_RGB
    codes = [["" for _ in range(heads)] for _ in atlas.layers]
    for r, layer in enumerate(atlas.layers):
        for entry in layer.heads:
            score = entry.scores[entry.top] if entry.top is not None else float("nan")
            rgb[r, entry.head] = cell_colour(entry.top, score)
            codes[r][entry.head] = ROLES_BY_NAME[entry.top].short if entry.top else ""
    return rgb, codes


def render_atlas(atlas: HeadAtlas, output: Path, fmt: str, *, title: str,
                 dpi: int = DPI) -> AtlasLayout:
    with plt.rc_context(PLAIN_TEXT):
        return _render(atlas, output, fmt, title=title, dpi=dpi)


def _render(atlas: HeadAtlas, output: Path, fmt: str, *, title: str, dpi: int) -> AtlasLayout:
    rgb, codes = atlas_grid(atlas)
    rows, cols = rgb.shape[:2]
    cell = float(np.clip(9.0 / max(rows, cols, 1), MIN_CELL, MAX_CELL))
    cell_font = round(min(9.0, cell * 72 * 0.3), 1)  # three letters fill about 60% of a cell
    tick_font = round(min(9.0, max(6.0, cell * 72 * 0.33)), 1)
    labels = [terminal(f"{layer.index} {layer.name}", 40) for layer in atlas.layers]
    left = 0.3 + 0.55 * tick_font / 72 * max((len(t) for t in labels), default=1)
    legend_w = 2.3
    grid_w, grid_h = cols * cell, rows * cell
    fig_w = left + grid_w + legend_w + 0.2
    wrapped = wrap_title(title, fig_w - 0.3, 11)
    top = 0.5 + 0.2 * (wrapped.count("\n") + 1)
    legend_h = 0.25 * (len(ROLES) + 2) + 0.6
    fig_h = 0.5 + max(grid_h, legend_h) + top
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((left / fig_w, (fig_h - top - grid_h) / fig_h, grid_w / fig_w,
                       grid_h / fig_h))
    ax.imshow(rgb, interpolation="nearest", aspect="auto")
    for r in range(rows):
        for c in range(cols):
            if codes[r][c]:
                ax.text(c, r, codes[r][c], ha="center", va="center", fontsize=cell_font,
                        color=text_colour((rgb[r, c, 0], rgb[r, c, 1], rgb[r, c, 2])))
    ax.set_xticks(range(cols))
    ax.set_xticklabels([str(c) for c in range(cols)], fontsize=tick_font)
    ax.xaxis.tick_top()
    ax.set_xlabel("head", fontsize=tick_font)
    ax.xaxis.set_label_position("top")
    ax.set_yticks(range(rows))
    ax.set_yticklabels(labels, fontsize=tick_font)
    ax.set_xticks(np.arange(-0.5, cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="both", length=0)
    handles = [Patch(facecolor=ROLE_COLOURS[role.name], edgecolor="0.5",
                     label=f"{role.short}  {role.name} (≥ {role.threshold:g})") for role in ROLES]
    handles.append(Patch(facecolor=NO_ROLE_RGB, edgecolor="0.5", label="no role"))
    fig.legend(handles=handles, loc="upper left", fontsize=8, frameon=False,
               title="top role; pale = score at\nthreshold, full colour = 1",
               title_fontsize=8, alignment="left",
               bbox_to_anchor=((left + grid_w + 0.15) / fig_w, (fig_h - top) / fig_h))
    fig.suptitle(wrapped, fontsize=11, y=1 - 0.12 / fig_h, va="top")
    options = {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}
    fig.savefig(output, format=fmt, **options)  # type: ignore[arg-type]
    width, height = fig.canvas.get_width_height()
    plt.close(fig)
    return AtlasLayout(width, height, cell * dpi, cell_font, tick_font)
