"""A timm Swin rebuilt from its checkpoint for ``heatmap --image`` (the vision registry's
``swin`` record runs ``run_swin``): a chosen block's per-head window attention placed back on
the image.

Swin has no CLS token and no global attention: each block attends inside w x w windows of its
stage's token grid, shifted by w // 2 every other block (``attnviz.models.swin``). So:

- without ``--point``, a head's panel is the mean attention each patch receives from the
  queries of its own window (``window_received_map``): one map covering the whole image;
- with ``--point x,y`` (pixels of the original image, repeatable), it is the attention of the
  token under that pixel over its window (``window_query_map``), zero outside the window;
- ``--layer`` picks blocks by index (inspect's ``#`` column) or by name
  ``layers.S.blocks.B.attn``; the default is the last block of the last stage (at the native
  size its window covers the whole image). Several blocks draw one row each.

Refused, one line each: rollout and ``--keep-mass`` (no CLS row), ``--view registers``,
``--layer mean`` (stages differ in grid and heads), DETR's ``--query``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import torch

from attnviz.capture import AttentionMaps
from attnviz.checkpoint import Checkpoint
from attnviz.errors import UsageError, param
from attnviz.image_heatmap import (
    Figure,
    ImageOptions,
    _head_panels,
    _heads,
    _span,
    pick_layers,
    reference_names,
)
from attnviz.image_inputs import IMAGENET_MEAN, IMAGENET_STD, PreparedImage, parse_size, vit_image
from attnviz.models.swin_windows import WindowGeometry, window_query_map, window_received_map


def _refuse(options: ImageOptions) -> None:
    if options.view in ("rollout", "registers"):
        why = "rollout follows a CLS row through global attention" if options.view == "rollout" \
            else "it has no register tokens"
        raise UsageError(f"{param('view')} {options.view}: Swin's attention is windowed and {why}",
                         param="view", hint=f"use {param('view')} overlay")
    if options.keep_mass is not None:
        raise UsageError(f"{param('keep_mass')} thresholds a CLS row; Swin's windowed attention "
                         "has none", param="keep_mass")
    if options.queries:
        raise UsageError(f"{param('queries')} picks DETR queries; Swin takes "
                         f"{param('points')} x,y", param="queries")
    if options.layer is not None and options.layer.strip().lower() == "mean":
        raise UsageError("Swin's stages differ in grid and heads: select blocks, not 'mean'",
                         param="layer")


def _query_token(point: tuple[float, float], image: PreparedImage, geo: WindowGeometry
                 ) -> tuple[tuple[int, int], tuple[float, float]]:
    """The stage token under an original-image pixel, and that pixel on the model's input."""
    x, y = image.to_input(*point)
    height, width = image.pixels.shape[:2]
    if not (0 <= x < width and 0 <= y < height):
        raise UsageError(f"{param('points')} {point[0]:g},{point[1]:g} falls outside the part "
                         f"of the image the model sees ({width}x{height} after resize and crop)",
                         param="points")
    return (int(y) // geo.stride, int(x) // geo.stride), (x, y)


def _on_pixels(stack: torch.Tensor, geo: WindowGeometry, size: tuple[int, int]) -> torch.Tensor:
    """(H, rows, cols) token maps -> (H, height, width) when the stage's tokens overhang the
    input (padded merges round the grid up), so each token covers exactly its stride x stride
    pixels; maps that tile the input exactly stay on the token grid (``--smooth`` works)."""
    if (geo.grid[0] * geo.stride, geo.grid[1] * geo.stride) == size:
        return stack
    blocks = stack.repeat_interleave(geo.stride, 1).repeat_interleave(geo.stride, 2)
    return blocks[:, :size[0], :size[1]]  # (H, height, width)


def run_swin(ckpt: Checkpoint, report: Any, options: ImageOptions
             ) -> tuple[Figure, AttentionMaps, str]:
    from attnviz.models.swin import detect_swin, swin_attention_maps
    from attnviz.render import overlay

    _refuse(options)
    spec = detect_swin(ckpt)
    image = vit_image(options.image, spec.image_size, parse_size(options.size), spec.patch,
                      normalize=options.normalize, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    size = (image.pixels.shape[0], image.pixels.shape[1])
    maps, geometry, spec = swin_attention_maps(ckpt, image.tensor)
    names = [n for n in spec.layer_names if n in maps]
    chosen, layer_ids = pick_layers(maps, names, reference_names(report), options,
                                    what="Swin blocks", allow_mean=False)
    rows: list[tuple[str, list[tuple[str, Any]]]] = []
    marks: list[tuple[tuple[float, float], ...]] = []
    for name in chosen or []:
        geo, attention = geometry[name], maps[name]  # (windows, H, N, N)
        head_ids = _heads(options, geo.heads, "all")
        if not options.points:
            stack = _on_pixels(window_received_map(attention, geo), geo, size)
            rows.append((name, _head_panels(stack, head_ids)))
            marks.append(())
        for point in options.points:
            token, at = _query_token(point, image, geo)
            stack = _on_pixels(window_query_map(attention, geo, token), geo, size)
            rows.append((f"{name} · ({point[0]:g},{point[1]:g})", _head_panels(stack, head_ids)))
            marks.append((at,))
    vmax = max(float(np.max(h)) for _, panels in rows for _, h in panels)
    columns = max(len(panels) for _, panels in rows)
    blank = np.ones((*size, 3), np.float32)  # stages with fewer heads: empty cells
    pad = columns - min(len(panels) for _, panels in rows)
    overlays = [[overlay(image.pixels, h, vmax=vmax, alpha=options.alpha, smooth=options.smooth)
                 for _, h in panels] + [blank] * (columns - len(panels)) for _, panels in rows]
    titles = [[f"{name} · {t}" for t, _ in panels] + [""] * (columns - len(panels))
              for name, panels in rows]
    heats: list[list[np.ndarray | None]] = [
        [np.asarray(h) for _, h in panels] + [None] * (columns - len(panels)) for _, panels in rows]
    what = "attention of the patch at each point over its window" if options.points else \
        "mean attention each patch receives within its window"
    meta = {"windowed": "1", "image_size": json.dumps(size), "patch": str(spec.patch),
            "windows": json.dumps({n: dataclasses.asdict(g) for n, g in geometry.items()})}
    figure = Figure(overlays, titles, f"Swin window attention: {what}", vmax, metadata=meta,
                    heats=heats, image=image.pixels, layers=_span(layer_ids, len(names), "block"),
                    points=tuple(marks) if options.points else ())
    figure.notes.append("Swin attends within windows (shifted every other block): each map is "
                        "placed back on the image, zero outside the query's window"
                        if options.points else
                        "Swin attends within windows (shifted every other block): each panel is "
                        "the mean attention a patch receives from its own window's queries")
    if pad:
        figure.notes.append("stages differ in heads: rows with fewer heads end in empty cells")
    stages = spec.stages
    sides = sorted({s.window for s in stages})
    windows = f"window {sides[0]}" if len(sides) == 1 else f"windows {[s.window for s in stages]}"
    description = (f"Swin rebuilt from the checkpoint: {len(stages)} stages, depths "
                   f"{[s.depth for s in stages]}, dims {[s.dim for s in stages]}, heads "
                   f"{[s.heads for s in stages]} (shape of the relative position bias tables), "
                   f"{windows}, patch {spec.patch}, input {size[1]}x{size[0]}")
    return figure, maps, description
