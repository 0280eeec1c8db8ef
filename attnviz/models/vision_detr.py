"""DETR (official layout) rebuilt from its checkpoint for ``heatmap --image``: the DETR paper's
per-object figure (a box and the last decoder cross-attention per predicted object) and encoder
self-attention at reference points. The vision registry's ``detr`` record runs ``run_detr``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from attnviz.capture import AttentionMaps, capture_attention
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
from attnviz.image_inputs import detr_image, parse_size
from attnviz.models.coco_names import COCO_NAMES


def _class_names(ckpt: Checkpoint, classes: int) -> list[str]:
    from attnviz.heads import settings_from

    for settings in settings_from(ckpt.config, ckpt.root):
        names = settings.value("class_names")
        if isinstance(names, list | tuple) and len(names) >= classes - 1:
            return [str(n) for n in names]
    if classes == 92:
        return list(COCO_NAMES)
    return [f"class {i}" for i in range(classes)]


def run_detr(ckpt: Checkpoint, report: Any, options: ImageOptions
             ) -> tuple[Figure, AttentionMaps, str]:
    from attnviz.models.detr import load_detr

    model, spec = load_detr(ckpt, report)
    image = detr_image(options.image, parse_size(options.size), normalize=options.normalize)
    with torch.no_grad(), capture_attention(model) as maps:
        out = model(image.tensor)
    fh, fw = out.feature_size
    description = (f"DETR rebuilt from the checkpoint: {spec.encoder_layers}+"
                   f"{spec.decoder_layers} layers, hidden {spec.hidden}, {spec.heads} heads, "
                   f"{spec.queries} queries, feature map {fh}x{fw}")
    figure = detr_figure(maps, out.logits, out.boxes, (fh, fw), image.pixels,
                          image.original_size, _class_names(ckpt, spec.classes), options,
                          reference=reference_names(report))
    return figure, maps, description


def detr_figure(maps: AttentionMaps, logits: torch.Tensor, pred_boxes: torch.Tensor,
                 feature_size: tuple[int, int], image_pixels: np.ndarray,
                 original_size: tuple[int, int], names: list[str], options: ImageOptions,
                 reference: Sequence[str] = ()) -> Figure:
    """The DETR paper's figure (per-query box + cross-attention) or encoder attention at
    points, for any DETR's captured maps (rebuilt official layout or HF); ``reference``: the
    checkpoint's layers, see pick_layers."""
    from attnviz.render import overlay

    if options.keep_mass is not None or options.view == "registers":
        raise UsageError(f"{param('keep_mass')} and {param('view')} registers apply to a ViT's "
                         "CLS maps, not to DETR's", param="keep_mass" if options.keep_mass
                         is not None else "view")
    fh, fw = feature_size
    height, width = image_pixels.shape[:2]
    cross_layers = [n for n in maps if n.endswith(("multihead_attn", "encoder_attn"))]
    heads, query_count = maps[cross_layers[0]].shape[1], logits.shape[1]
    probs = logits.softmax(-1)[0, :, :-1]  # (Q, classes): drop "no object"
    scores, labels = probs.max(-1)
    meta = {"feature_size": json.dumps([fh, fw]), "image_size": json.dumps([height, width]),
            "scores": json.dumps([round(float(s), 5) for s in scores]),
            "labels": json.dumps([int(label) for label in labels])}
    head_ids = _heads(options, heads, "mean")
    pixels = image_pixels.astype(np.float32) / 255.0

    def to_panels(heats: list[tuple[str, Any]], vmax: float) -> list[np.ndarray]:
        return [overlay(image_pixels, h, vmax=vmax, alpha=options.alpha, smooth=options.smooth)
                for _, h in heats]

    if options.points:
        layers = [n for n in maps if ".encoder." in n]
        picked, chosen = pick_layers(maps, layers, reference, options, allow_mean=False,
                                     what="encoder self-attention layers",
                                     one="reference points show one encoder layer")
        assert picked is not None and chosen is not None  # ``one``: exactly one
        attention = maps[picked[0]][0]  # (H, hw, hw)
        rows, points = [], []
        for x, y in options.points:
            sx = x * width / original_size[1]  # original pixels -> model input pixels
            sy = y * height / original_size[0]
            if not (0 <= sx < width and 0 <= sy < height):
                raise UsageError(f"{param('points')} {x:g},{y:g} is outside the {original_size[1]}"
                                 f"x{original_size[0]} image", param="points")
            cell = int(sy * fh / height) * fw + int(sx * fw / width)
            rows.append((f"({x:g},{y:g})", _head_panels(attention[:, cell].reshape(-1, fh, fw),
                                                        head_ids)))
            points.append((sx, sy))
        vmax = max(float(np.max(h)) for _, heats in rows for _, h in heats)
        panels = [to_panels(heats, vmax) for _, heats in rows]
        titles = [[f"{layers[chosen[0]]} at {p} · {t}" for t, _ in heats] for p, heats in rows]
        return Figure(panels, titles, "encoder self-attention at reference points", vmax,
                      points=tuple((p,) for p in points), metadata=meta,
                      heats=[[h for _, h in heats] for _, heats in rows], image=image_pixels,
                      layers=_span(chosen, len(layers), "encoder layer"))

    layers = cross_layers
    picked, chosen = pick_layers(maps, layers, reference, options, allow_mean=False,
                                 what="decoder cross-attention layers",
                                 one="DETR figures show one decoder cross-attention layer")
    assert picked is not None and chosen is not None  # ``one``: exactly one
    attention = maps[picked[0]][0]  # (H, Q, hw)
    queries = list(options.queries)
    if any(not 0 <= q < query_count for q in queries):
        raise UsageError(f"{param('queries')} must be in 0..{query_count - 1}", param="queries")
    note = ""
    if not queries:
        order = scores.argsort(descending=True).tolist()
        queries = [q for q in order if scores[q] >= options.threshold][:options.top_k]
        if not queries:
            queries, note = order[:options.top_k], (f" (no query scores >= "
                                                     f"{options.threshold:g}: top {options.top_k})")
    per_query = [(q, _head_panels(attention[:, q].reshape(-1, fh, fw), head_ids))
                 for q in queries]
    vmax = max(float(np.max(h)) for _, heats in per_query for _, h in heats)
    panels, titles = [], []
    boxes: list[list[tuple[tuple[float, float, float, float], str] | None]] = []
    for q, heats in per_query:
        cx, cy, bw, bh = pred_boxes[0, q].tolist()
        box = ((cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width,
               (cy + bh / 2) * height)
        label = f"{names[int(labels[q])]} {float(scores[q]):.2f}"
        panels.append([pixels, *to_panels(heats, vmax)])
        titles.append([f"query {q}: {label}", *[f"query {q} · {t}" for t, _ in heats]])
        row: list[tuple[tuple[float, float, float, float], str] | None] = [(box, label)]
        boxes.append(row + [(box, "")] * len(heats))
    meta["queries"] = json.dumps(queries)
    title = f"{layers[chosen[0]]}: decoder cross-attention per predicted object{note}"
    heat_rows: list[list[np.ndarray | None]] = [[None, *(h for _, h in heats)]
                                                for _, heats in per_query]
    return Figure(panels, titles, title, vmax, boxes=boxes, metadata=meta, heats=heat_rows,
                  image=image_pixels, layers=_span(chosen, len(layers), "decoder layer"))
