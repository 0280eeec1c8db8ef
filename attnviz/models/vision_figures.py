"""The CLS figure of any ViT-like model (rebuilt, HF, or a ``--model`` factory): per-head CLS
attention over the patch grid (or the row of the patch under a ``--point``), the DINO paper's
``--keep-mass`` threshold, the registers view, and rollout.

``keep_mass`` follows DINO's visualize_attention.py: each map (one query's attention over the
patches) is sorted, normalised to sum 1 and cumulated; the patches where the cumulative sum
exceeds 1 - mass are kept: the smallest set of patches holding that fraction of the mass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from attnviz.capture import AttentionMaps
from attnviz.errors import UsageError, param
from attnviz.image_heatmap import (
    Figure,
    ImageOptions,
    _head_panels,
    _heads,
    _span,
    pick_layers,
    rollout_heat,
)

Panels = list[tuple[str, Any]]  # (title, (gh, gw) map) per head, or the head mean
ToInput = Callable[[float, float], tuple[float, float]]  # original pixel -> model input pixel


def keep_mass_mask(rows: torch.Tensor, mass: float) -> torch.Tensor:
    """(..., N) non-negative rows -> (..., N) booleans: per row, the smallest set of entries
    holding ``mass`` of the row's total (DINO: sort, normalise, cumulative sum > 1 - mass)."""
    values, order = torch.sort(rows, dim=-1)  # ascending, (..., N)
    values = values / values.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    kept = torch.cumsum(values, dim=-1) > (1.0 - mass)  # (..., N), in sorted order
    return torch.zeros_like(kept).scatter(-1, order, kept)  # back to the rows' own order


def _kept(panels: Panels, mass: float) -> Panels:
    """Each panel's map with the patches outside its top ``mass`` set zeroed."""
    out = []
    for title, heat in panels:
        flat = torch.as_tensor(np.asarray(heat, dtype=np.float32)).reshape(-1)  # (gh * gw,)
        mask = keep_mass_mask(flat, mass)
        shown = (flat * mask).reshape(np.shape(heat)).numpy()
        out.append((f"{title} · top {mass:.0%}: {int(mask.sum())} patches", shown))
    return out


def _query_index(point: tuple[float, float], to_input: ToInput, grid: tuple[int, int],
                 size: tuple[int, int], prefix: int) -> tuple[int, tuple[float, float]]:
    """The token of the patch under an original-image pixel, and that pixel in the input."""
    x, y = to_input(*point)
    height, width = size
    if not (0 <= x < width and 0 <= y < height):
        raise UsageError(f"{param('points')} {point[0]:g},{point[1]:g} falls outside the part "
                         f"of the image the model sees ({width}x{height} after resize and crop)",
                         param="points")
    cell = int(y * grid[0] / height) * grid[1] + int(x * grid[1] / width)
    return prefix + cell, (x, y)


def cls_figure(maps: AttentionMaps, names: list[str], grid: tuple[int, int], prefix: int,
               has_cls: bool, patch: int, image_pixels: np.ndarray, options: ImageOptions,
               reference: Sequence[str] = (), *, registers: int = 0,
               to_input: ToInput | None = None) -> Figure:
    """CLS -> patch overlays (layer x head grid) or rollout, for any ViT's captured maps
    (``names``: the image layers; ``reference``: the checkpoint's layers, see pick_layers;
    ``registers``: the last ``registers`` prefix tokens are registers; ``to_input``: maps
    ``--point`` pixels of the original image onto the model's input, None: no points)."""
    from attnviz.render import overlay

    tokens = prefix + grid[0] * grid[1]
    wrong = [n for n in names if tuple(maps[n].shape[-2:]) != (tokens, tokens)]
    if wrong or not names:
        got = list(maps[wrong[0]].shape) if wrong else "none"
        raise UsageError(f"attention maps {got} do not fit {prefix} prefix tokens + a "
                         f"{grid[0]}x{grid[1]} patch grid ({tokens} tokens)",
                         hint=f"pass {param('prefix_tokens')} N and/or {param('grid')} HxW")
    if options.view == "registers" and not registers:
        raise UsageError(f"{param('view')} registers: this model has no register tokens",
                         param="view")
    heads = maps[names[0]].shape[1]
    regs = slice(prefix - registers, prefix)
    meta = {"grid": json.dumps(grid), "prefix_tokens": str(prefix),
            "image_size": json.dumps(image_pixels.shape[:2]), "patch": str(patch)}
    if registers:
        meta["registers"] = str(registers)
    pixels = image_pixels.astype(np.float32) / 255.0
    mass = options.keep_mass
    if options.view == "rollout":
        heat = rollout_heat(maps, names, grid, prefix, options)
        label = "rollout: CLS attention"
        if mass is not None:
            (label, heat), = _kept([(label, heat)], mass)
        vmax = float(heat.max())
        panel = overlay(image_pixels, heat, vmax=vmax, alpha=options.alpha, smooth=options.smooth)
        title = (f"attention rollout over {len(names)} blocks (head fusion "
                 f"{options.head_fusion}, discard ratio {options.discard_ratio:g})")
        return Figure([[pixels, panel]], [["image", label]], title, vmax,
                      metadata=meta, heats=[[None, heat]], image=image_pixels,
                      layers=f"all {len(names)} blocks")
    queries: list[tuple[str, int | None]] = [("", 0 if has_cls else None)]
    marks: list[tuple[tuple[float, float], ...]] = []
    if options.points:
        if to_input is None:
            raise UsageError(f"{param('points')} needs a model attnviz rebuilt or a "
                             f"{param('factory')}", param="points")
        queries, marks = [], []
        for point in options.points:
            index, at = _query_index(point, to_input, grid, image_pixels.shape[:2], prefix)
            queries.append((f"({point[0]:g},{point[1]:g}) · ", index))
            marks.append((at,))

    def query_rows(attention: torch.Tensor, query: int | None) -> torch.Tensor:
        # (1, H, T, T) -> (H, gh, gw): one query's row over the patches, or the patches' mean
        rows = attention[0, :, query, prefix:] if query is not None else \
            attention[0, :, prefix:, prefix:].mean(1)
        return rows.reshape(rows.shape[0], *grid)

    def on_registers(attention: torch.Tensor) -> torch.Tensor:  # (1, H, T, T) -> (H, gh, gw)
        return attention[0, :, prefix:, regs].sum(-1).reshape(heads, *grid)

    chosen, layer_ids = pick_layers(maps, names, reference, options, what="image layers",
                                    allow_mean=True)
    head_ids = _heads(options, heads, "all")
    layers = [(f"mean of {len(names)} blocks", names)] if chosen is None else \
        [(name, [name]) for name in chosen]
    rows: list[tuple[str, Panels]] = []
    point_rows: list[tuple[tuple[float, float], ...]] = []
    notes: list[str] = []
    register_mass: dict[str, list[float]] = {}  # per row: each head's mass on the registers
    for label, group in layers:
        for (where, query), mark in zip(queries, marks or [()] * len(queries), strict=True):
            stack = torch.stack([query_rows(maps[n], query) for n in group]).mean(0)
            panels = _head_panels(stack, head_ids)
            if registers and query is not None:
                on_regs = torch.stack([maps[n][0, :, query, regs].sum(-1)
                                       for n in group]).mean(0)  # (H,)
                shares = [on_regs.mean()] if head_ids is None else [on_regs[h] for h in head_ids]
                panels = [(f"{t} · regs {float(s):.0%}", h)
                          for (t, h), s in zip(panels, shares, strict=True)]
                register_mass[f"{label} · {where}" if where else label] = [
                    round(float(v), 5) for v in on_regs]
                who = "CLS" if query == 0 and has_cls else f"the patch at {where.strip(' ·')}"
                notes.append(f"{label}: attention of {who} on the {registers} register tokens, "
                             "per head: " + " ".join(f"{float(v):.0%}" for v in on_regs))
            rows.append((f"{label} · {where}" if where else label,
                         _kept(panels, mass) if mass is not None else panels))
            point_rows.append(mark)
        if options.view == "registers":
            stack = torch.stack([on_registers(maps[n]) for n in group]).mean(0)
            rows.append((f"{label} · patches → registers", _head_panels(stack, head_ids)))
            point_rows.append(())
    if register_mass:
        meta["register_mass"] = json.dumps(register_mass)
    vmax = max(float(np.max(h)) for _, panels in rows for _, h in panels)
    overlays = [[overlay(image_pixels, h, vmax=vmax, alpha=options.alpha, smooth=options.smooth)
                 for _, h in panels] for _, panels in rows]
    titles = [[f"{name} · {t}" for t, _ in panels] for name, panels in rows]
    what = "attention of the patch at each point" if options.points else \
        "CLS attention to each patch" if has_cls else "mean attention to each patch"
    if options.view == "registers":
        what += f"; each patch's attention to the {registers} registers"
    if mass is not None:  # each panel on its own scale: a spread-out head stays visible
        what += f" (top {mass:.0%} of each map's mass kept)"
    heats: list[list[np.ndarray | None]] = [[h for _, h in panels] for _, panels in rows]
    figure = Figure(overlays, titles, what, vmax, metadata=meta, heats=heats,
                    image=image_pixels, layers=_span(layer_ids, len(names), "block"),
                    points=tuple(point_rows) if options.points else (),
                    scale="panel" if options.view == "registers" or mass is not None else None)
    figure.notes += notes
    return figure
