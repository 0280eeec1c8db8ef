"""Rendering attention maps to PNG/SVG/PDF. The only module that imports matplotlib.

A layer x head grid is composed into one RGB image and drawn with a single ``imshow`` (one
axes, one colour bar), which is what makes a 12 x 12 grid at 197 tokens fast; a single map is
drawn as a matrix with token labels on both axes. Masked positions (probability exactly 0, or
NaN from a fully masked row) are drawn in light grey, apart from the colour scale.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from attnviz.text_safety import terminal

MASKED_RGB = (0.86, 0.86, 0.86)
# Labels are tokens and layer names from files: plain text, never mathtext ('$...$' in a token
# would be parsed, and can fail to render at all). Fonts go into PDF/PS files as TrueType (Type
# 42; publishers refuse Type 3) and SVG text stays text (searchable, editable). Set per figure:
# importing attnviz leaves the caller's rcParams alone.
PLAIN_TEXT: Any = {"text.parse_math": False, "text.usetex": False, "pdf.fonttype": 42,
                   "ps.fonttype": 42, "svg.fonttype": "none"}
Renderer = TypeVar("Renderer", bound=Callable[..., Any])


def _plain_text(function: Renderer) -> Renderer:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plt.rc_context(PLAIN_TEXT):
            return function(*args, **kwargs)

    return cast(Renderer, wrapper)


def wrap_title(title: str, width_inches: float, fontsize: float) -> str:
    """Each line of ``title`` wrapped to fit ``width_inches`` (DejaVu Sans averages about 0.58
    em a character): between its ' · ' parts where it can, else at spaces; a word longer than
    a line is split only then."""
    chars = max(16, int(width_inches * 72 / (fontsize * 0.58)))
    lines: list[str] = []
    for line in title.splitlines() or [""]:
        current = ""
        for part in line.split(" · "):
            joined = f"{current} · {part}" if current else part
            if len(joined) <= chars:
                current = joined
                continue
            if current:
                lines.append(current + " ·")
            pieces = textwrap.wrap(part, chars, break_on_hyphens=False) or [""]
            lines += pieces[:-1]
            current = pieces[-1]
        lines.append(current)
    return "\n".join(lines)


GAP_RGB = (1.0, 1.0, 1.0)
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
MAX_TICK_LABELS = 64

Matrix = np.ndarray[Any, Any]


def _masked(matrix: Matrix) -> Matrix:
    return np.asarray(~np.isfinite(matrix) | (matrix == 0))


def _label_step(count: int) -> int:
    return max(1, -(-count // MAX_TICK_LABELS))


@_plain_text
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
        axis.set_ticklabels([terminal(str(labels[i]), 40) if i < len(labels) else str(i)
                             for i in ticks],
                            fontsize=max(5, 10 - count // 16))
    plt.setp(ax.get_xticklabels(), rotation=90)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(wrap_title(title, size, 11), fontsize=11)  # centred over the map, not the bar
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention probability")
    fig.savefig(output, format=fmt)
    plt.close(fig)


def pool_panels(panels: Sequence[Sequence[Matrix]], max_pixels: int,
                mode: str) -> tuple[list[list[Matrix]], str | None]:
    """Panels pooled so that the grid fits ``max_pixels`` a side (with 2-pixel gaps)."""
    import torch

    from attnviz.pooling import pool_map

    rows, cols = len(panels), len(panels[0])
    height, width = panels[0][0].shape
    cell_h = max(1, (max_pixels - 2 * (rows - 1)) // rows)
    cell_w = max(1, (max_pixels - 2 * (cols - 1)) // cols)
    if height <= cell_h and width <= cell_w:
        return [list(r) for r in panels], None
    out = []
    info = None
    for row in panels:
        stacked = torch.from_numpy(np.asarray(list(row), dtype=np.float32))  # (C, Lq, Lk)
        pooled, info = pool_map(stacked, min(height, cell_h), min(width, cell_w), mode)
        out.append(list(pooled.numpy()))
    assert info is not None
    factor_h, factor_w = info.factor
    return out, (f"maps pooled {factor_h:.3g}:1 x {factor_w:.3g}:1 by {mode} "
                 f"({height}x{width} -> {info.pooled[0]}x{info.pooled[1]})")


def compose_grid(panels: Sequence[Sequence[Matrix]], *, shared_scale: bool,
                 cmap: str = "viridis", gap: int = 2) -> tuple[Matrix, float]:
    """All panels as one uint8 RGB image (rows x cols of (Lq, Lk) maps, white gaps), colour
    mapped through one 256-entry table."""
    rows, cols = len(panels), len(panels[0])
    height, width = panels[0][0].shape
    if any(p.shape != (height, width) for row in panels for p in row):
        raise ValueError("grid panels must share one shape")
    stack = np.asarray([list(row) for row in panels], dtype=np.float32)  # (R, C, Lq, Lk)
    finite = np.isfinite(stack)
    clean = np.where(finite, stack, 0.0)
    vmax = float(clean.max()) if clean.size else 1.0
    vmax = vmax or 1.0
    top = vmax if shared_scale else np.maximum(clean.max(axis=(2, 3), keepdims=True), 1e-30)
    index = np.clip(clean / top * 255.0 + 0.5, 0, 255).astype(np.uint8)  # (R, C, Lq, Lk)
    table = colormaps[cmap](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]  # (256, 3) uint8
    rgb = table[index]  # (R, C, Lq, Lk, 3)
    rgb[~finite | (stack == 0)] = np.array(MASKED_RGB) * 255
    canvas = np.full((rows, height + gap, cols, width + gap, 3), 255, np.uint8)
    canvas[:, :height, :, :width] = rgb.transpose(0, 2, 1, 3, 4)  # (R, Lq, C, Lk, 3)
    canvas = canvas.reshape(rows * (height + gap), cols * (width + gap), 3)
    return canvas[:-gap, :-gap], vmax


@_plain_text
def render_grid(panels: Sequence[Sequence[Matrix]], row_titles: Sequence[str],
                col_titles: Sequence[str], output: Path, fmt: str, *, title: str,
                shared_scale: bool = True, cmap: str = "viridis", dpi: int = 100,
                min_pixels: int = 900, max_pixels: int = 2000, pool: str = "max") -> str | None:
    """A layer x head grid in one image drawn 1:1 (no resampling), labelled by row and column,
    with one colour bar. Fixed margins instead of a layout engine: the figure is drawn once.

    Maps larger than their share of ``max_pixels`` are block-pooled (``pool``: max keeps a
    single attended token visible, mean averages) to the pixels that show them, before they are
    coloured; the title and the returned note say by how much."""
    panels, pooled = pool_panels(panels, max_pixels, pool)
    if pooled:
        title = f"{title} · {pooled}"
    canvas, vmax = compose_grid(panels, shared_scale=shared_scale, cmap=cmap)
    row_titles = [terminal(t, 80) for t in row_titles]  # names from files: one line each
    col_titles = [terminal(t, 40) for t in col_titles]
    longest = max(canvas.shape[:2])
    grow = max(1, min_pixels // longest)  # small maps: whole-pixel upscaling keeps cells crisp
    step = max(1, -(-longest // max_pixels))  # huge grids: shrink by whole steps
    shown = canvas.repeat(grow, axis=0).repeat(grow, axis=1) if grow > 1 else canvas[::step,
                                                                                      ::step]
    step = 1 / grow if grow > 1 else step
    rows, cols = len(panels), len(panels[0])
    height, width = panels[0][0].shape
    left = 0.15 + 0.065 * max((len(t) for t in row_titles), default=0)  # inches
    right, bottom = 1.6, 0.15
    image_w, image_h = shown.shape[1] / dpi, shown.shape[0] / dpi
    fig_w = left + image_w + right
    title = wrap_title(title, fig_w - 0.3, 11)
    top = 0.55 + 0.2 * (title.count("\n") + 1)  # the title's lines, then the column titles
    fig_h = bottom + image_h + top
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, image_w / fig_w, image_h / fig_h))
    ax.imshow(shown, interpolation="nearest", aspect="auto")
    ax.set_xticks([(c * (width + 2) + width / 2) / step - 0.5 for c in range(cols)])
    ax.set_xticklabels(col_titles, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([(r * (height + 2) + height / 2) / step - 0.5 for r in range(rows)])
    ax.set_yticklabels(row_titles, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / fig_h, va="top")
    bar = fig.add_axes(((left + image_w + 0.3) / fig_w, (bottom + image_h * 0.2) / fig_h,
                        0.18 / fig_w, image_h * 0.6 / fig_h))
    label = "attention probability" if shared_scale else "fraction of each panel's maximum"
    fig.colorbar(ScalarMappable(Normalize(0.0, vmax if shared_scale else 1.0), colormaps[cmap]),
                 cax=bar, label=label)
    options = {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}
    fig.savefig(output, format=fmt, **options)  # type: ignore[arg-type]
    plt.close(fig)
    return pooled


def upsample(heat: Matrix, height: int, width: int, *, smooth: bool = False) -> Matrix:
    """A low-resolution map (h, w) at image size (H, W): nearest cells, or bilinear."""
    if smooth:
        from PIL import Image

        image = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F")
        return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    rows = np.minimum((np.arange(height) * heat.shape[0]) // height, heat.shape[0] - 1)
    cols = np.minimum((np.arange(width) * heat.shape[1]) // width, heat.shape[1] - 1)
    return np.asarray(heat[rows][:, cols])  # (H, W)


def overlay(image: Matrix, heat: Matrix, *, vmax: float, alpha: float = 0.55,
            cmap: str = "inferno", smooth: bool = False) -> Matrix:
    """Alpha-blend a colour-mapped attention map over an (H, W, 3) uint8 image -> floats."""
    height, width = image.shape[:2]
    up = upsample(np.nan_to_num(heat), height, width, smooth=smooth)
    colour = colormaps[cmap](np.clip(up / (vmax or 1.0), 0.0, 1.0))[..., :3]  # (H, W, 3)
    return np.asarray((1.0 - alpha) * image.astype(np.float32) / 255.0 + alpha * colour)


Box = tuple[float, float, float, float]


@_plain_text
def render_image_panels(panels: Sequence[Sequence[Matrix]], output: Path, fmt: str, *,
                        title: str, panel_titles: Sequence[Sequence[str]],
                        boxes: Sequence[Sequence[tuple[Box, str] | None]] | None = None,
                        points: Sequence[Sequence[tuple[float, float]]] = (),
                        colorbar: tuple[float, str] | None = None, cmap: str = "inferno",
                        dpi: int = 110) -> None:
    """Equal-size RGB panels in one image; titles, boxes and reference points drawn on top."""
    from matplotlib.patches import Rectangle

    rows, cols = len(panels), len(panels[0])
    height, width = panels[0][0].shape[:2]
    gap = max(4, width // 40)
    canvas = np.ones((rows * (height + gap) - gap, cols * (width + gap) - gap, 3), np.float32)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            y, x = r * (height + gap), c * (width + gap)
            canvas[y:y + height, x:x + width] = panel
    inches = min(3.2, 16.0 / max(cols, 1))
    fig_w = cols * inches * width / max(height, width) + 1.5
    title = wrap_title(title, fig_w - 0.4, 10)
    fig, ax = plt.subplots(figsize=(fig_w, rows * inches * height / max(height, width) + 0.75
                                    + 0.17 * (title.count("\n") + 1)),
                           dpi=dpi, layout="constrained")
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for r in range(rows):
        for c in range(cols):
            y, x = r * (height + gap), c * (width + gap)
            ax.text(x + 2, y + 2, terminal(panel_titles[r][c], 80), fontsize=7, color="white",
                    va="top", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})
            entry = boxes[r][c] if boxes is not None else None
            if entry is not None:
                (x0, y0, x1, y1), label = entry
                ax.add_patch(Rectangle((x + x0, y + y0), x1 - x0, y1 - y0, fill=False,
                                       edgecolor="lime", linewidth=1.6))
                ax.text(x + x0, y + y1, terminal(label, 60), fontsize=7, color="black", va="bottom",
                        bbox={"facecolor": "lime", "alpha": 0.8, "pad": 1, "linewidth": 0})
            for px, py in points[r] if r < len(points) else ():  # each row its own points
                ax.plot(x + px, y + py, marker="x", color="cyan", markersize=7, mew=2)
    ax.set_title(title, fontsize=10)
    if colorbar is not None:
        vmax, label = colorbar
        fig.colorbar(ScalarMappable(Normalize(0.0, vmax), colormaps[cmap]), ax=ax, shrink=0.7,
                     label=label)
    fig.savefig(output, format=fmt, bbox_inches="tight", pad_inches=0.08)  # no white bands
    plt.close(fig)


def colormap_lut(name: str) -> list[list[int]]:
    """A colour map as 256 RGB byte triples, for pages that colour maps themselves."""
    table = colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]  # (256, 3) in [0, 1]
    return np.round(table * 255).astype(np.uint8).tolist()  # type: ignore[no-any-return]
