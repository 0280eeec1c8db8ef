"""``attnviz heatmap --image``: ViT and DETR rebuilt from their checkpoints, attention over the
image (per head, head mean, rollout), DETR's per-object decoder attention and encoder
self-attention at reference points."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnviz import __version__
from attnviz.atomic import atomic_output
from attnviz.capture import AttentionMaps, capture_attention
from attnviz.checkpoint import Checkpoint
from attnviz.errors import UsageError, param
from attnviz.heads_override import override_warnings
from attnviz.heatmap import HeatmapResult, check_selectors, open_for_heatmap
from attnviz.image_inputs import detr_image, parse_size, vit_image
from attnviz.inspection import analyse
from attnviz.models.coco_names import COCO_NAMES
from attnviz.models.sources import is_hf_directory
from attnviz.rollout import attention_rollout
from attnviz.selectors import listing, order_like, select_among, select_heads

VIEWS = ("auto", "overlay", "rollout")
SCALES = ("shared", "panel")


@dataclass(frozen=True)
class ImageOptions:
    image: Path
    size: str | None = None
    normalize: bool = True
    layer: str | None = None  # None: the last layer
    head: str | None = None  # None: every head for ViT, the head mean for DETR
    view: str = "auto"
    top_k: int = 3
    threshold: float = 0.7
    queries: tuple[int, ...] = ()
    points: tuple[tuple[float, float], ...] = ()
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    alpha: float = 0.55
    smooth: bool = False
    title: str | None = None
    scale: str = "shared"  # or "panel": each overlay coloured by its own maximum
    text: str | None = None  # multi-tower HF models (CLIP): the text tower's input
    tokens: str | None = None
    attn_implementation: str = "auto"


@dataclass
class Figure:
    panels: list[list[np.ndarray]]
    titles: list[list[str]]
    title: str
    vmax: float
    boxes: list[list[tuple[tuple[float, float, float, float], str] | None]] | None = None
    points: tuple[tuple[tuple[float, float], ...], ...] = ()  # reference pixels, per row
    metadata: dict[str, str] | None = None
    heats: list[list[np.ndarray | None]] | None = None  # the raw (h, w) map behind each panel
    image: np.ndarray | None = None  # (H, W, 3) uint8: the model's input pixels
    notes: list[str] = field(default_factory=list)
    prepared: Any = None  # HF models: the PreparedCall (forward kwargs, token sides)
    layers: str = ""  # which layers the figure shows, in words ("block 3 of 4")


def image_heatmap(checkpoint: str | Path, output: str | Path, options: ImageOptions, *,
                  heads: tuple[str, ...] = (), config: str | Path | None = None,
                  key: str | None = None, save_maps: str | Path | None = None,
                  force: bool = False, layout: str | None = None) -> HeatmapResult:
    path, output = Path(checkpoint), Path(output)
    if options.view not in VIEWS:
        raise UsageError(f"{param('view')} with {param('image')} is one of {', '.join(VIEWS)}",
                         param="view")
    if options.scale not in SCALES:
        raise UsageError(f"'{options.scale}': use {' or '.join(SCALES)}", param="scale")
    check_selectors(options.layer, options.head)
    ckpt, maps_path = open_for_heatmap(path, output, save_maps, key=key, config=config,
                                       force=force, reads=[options.image])
    report = analyse(ckpt, heads, layout=layout)
    figure, maps, description = image_figure(path, ckpt, report, options)
    from attnviz import render
    from attnviz.captions import image_input, image_title, model_label

    shared = options.scale == "shared"
    panels = figure.panels if shared else per_panel_overlays(figure, options)
    size = None if figure.image is None else (figure.image.shape[0], figure.image.shape[1])
    title = options.title or image_title(figure.title, model_label(description, path),
                                         image_input(options, size), figure.layers,
                                         shared=shared)
    bar = (figure.vmax, "attention (shared scale)") if shared else \
        (1.0, "fraction of each panel's maximum")
    with atomic_output(output) as temp:
        render.render_image_panels(panels, temp, render.FORMATS[output.suffix.lower()],
                                   title=title, panel_titles=figure.titles, boxes=figure.boxes,
                                   points=figure.points, colorbar=bar)
    result = HeatmapResult(output, "overlay", [t[0] for t in figure.titles],
                           figure.titles[0], description, notes=list(figure.notes),
                           warnings=override_warnings(report.layers))
    if maps_path is not None:
        from safetensors.torch import save_file

        metadata = {"format": "attnviz-maps", "attnviz_version": __version__,
                    "model": description, "layers": json.dumps(list(maps)),
                    "routes": json.dumps(maps.routes), "layout": "B, H, Lq, Lk",
                    **(figure.metadata or {})}
        prepared = figure.prepared
        if prepared is not None and prepared.layer_sides is not None:
            metadata["axes"] = json.dumps({n: list(prepared.layer_sides(n.split("#")[0]))
                                           for n in maps})
            metadata["sides"] = json.dumps(prepared.sides)
            metadata["inputs"] = json.dumps({k: list(v.shape)
                                             for k, v in prepared.inputs.items()})
        with atomic_output(maps_path) as temp:
            save_file({n: t.contiguous() for n, t in maps.items()}, str(temp), metadata=metadata)
        result.maps_file = maps_path
    return result


def per_panel_overlays(figure: Figure, options: ImageOptions) -> list[list[np.ndarray]]:
    """The figure's overlays again, each coloured from 0 to its own map's maximum."""
    from attnviz.render import overlay

    if figure.image is None or figure.heats is None:
        return figure.panels
    panels = []
    for row, heats in zip(figure.panels, figure.heats, strict=True):
        redone = list(row)  # cells without a map (the plain image, blanks) stay as they are
        for c, heat in enumerate(heats):
            if heat is not None:
                redone[c] = overlay(figure.image, heat, vmax=float(np.nanmax(heat)),
                                    alpha=options.alpha, smooth=options.smooth)
        panels.append(redone)
    return panels


def is_detr(path: Path, ckpt: Checkpoint) -> bool:
    """A DETR: the official layout's query embedding and input projection, or an HF DETR."""
    if is_hf_directory(path):
        return "detr" in str((ckpt.config or {}).get("model_type", ""))
    return "query_embed.weight" in ckpt.tensors and "input_proj.weight" in ckpt.tensors


def rollout_heat(maps: AttentionMaps, names: list[str], grid: tuple[int, int], prefix: int,
                 options: ImageOptions) -> np.ndarray:
    """Attention rollout over ``names`` as a (gh, gw) map: the CLS row, or with no prefix
    token the mean over patch rows (as ``cls_rows`` does for one layer)."""
    rolled = attention_rollout([maps[n] for n in names], head_fusion=options.head_fusion,
                               discard_ratio=options.discard_ratio)[0]  # (T, T)
    rows = rolled[0, prefix:] if prefix else rolled[prefix:, prefix:].mean(0)  # (gh * gw,)
    heat: np.ndarray = rows.reshape(grid).numpy()
    return heat


def image_figure(path: Path, ckpt: Checkpoint, report: Any, options: ImageOptions
                 ) -> tuple[Figure, AttentionMaps, str]:
    """Rebuild the vision model the checkpoint holds, run it on the image under capture, and
    lay out its figure: (figure, every captured map, a one-line model description)."""
    if is_hf_directory(path):
        from attnviz.models.hf_vision import hf_vision_figure

        return hf_vision_figure(path, ckpt, options, heads_from=report.layers,
                                reference=reference_names(report))
    if options.text is not None or options.tokens is not None:
        raise UsageError(f"{param('text')}/{param('tokens')} with {param('image')} need a "
                         "multi-tower HF model directory (CLIP, SigLIP)", path=path, param="text")
    if options.attn_implementation != "auto":
        raise UsageError(f"{param('attn_implementation')} applies to HF model directories only",
                         param="attn_implementation")
    if is_detr(path, ckpt):
        return _detr(ckpt, report, options)
    if "patch_embed.proj.weight" in ckpt.tensors:
        return _vit(ckpt, report, options)
    from attnviz.models.family import recognise

    family = recognise(ckpt, report)
    held = f"; this file: {family.description}" if family is not None else ""
    raise UsageError(f"{param('image')} needs a ViT (timm layout: patch_embed, "
                     f"blocks.N.attn.qkv) or a DETR (official layout) checkpoint{held}",
                     path=path, param="image",
                     hint="for sequence models use "
                          f"{param('text')}/{param('tokens')}/{param('input_file')}/"
                          f"{param('seq_len')}")


def _span(chosen: list[int] | None, total: int, unit: str) -> str:
    from attnviz.captions import index_span

    return f"mean of {total} {unit}s" if chosen is None else index_span(chosen, total, unit)


def _heads(options: ImageOptions, count: int, default: str) -> list[int] | None:
    return select_heads(options.head or default, count)


def reference_names(report: Any) -> list[str]:
    """The checkpoint's layer names in inspect's order: what layer indices count."""
    return [item.layer.name for item in getattr(report, "layers", ())]


def pick_layers(maps: AttentionMaps, eligible: Sequence[str], reference: Sequence[str],
                options: ImageOptions, *, what: str, allow_mean: bool, one: str = ""
                ) -> tuple[list[str] | None, list[int] | None]:
    """``options.layer`` among the captured layers a figure can draw (``eligible``): their
    names (None for ``mean``) and their places among ``eligible`` (for titles). Indices count
    every captured layer in the checkpoint's order, as ``inspect`` shows them; no selector:
    the last eligible layer. ``one``: the figure draws one layer, so saying why."""
    names, aliases = order_like(list(maps), reference)
    chosen = select_among(options.layer, names, set(eligible), what=what,
                          allow_mean=allow_mean, aliases=aliases)
    if one and (chosen is None or len(chosen) != 1):
        allowed = [i for i, name in enumerate(names) if name in set(eligible)]
        raise UsageError(f"{one}: select one", param="layer",
                         hint=f"{what}: {listing(names, allowed)}")
    if chosen is None:
        return None, None
    place = {name: i for i, name in enumerate(eligible)}
    return [names[i] for i in chosen], [place[names[i]] for i in chosen]


def _head_panels(stack: torch.Tensor, head_ids: list[int] | None) -> list[tuple[str, Any]]:
    """(H, h, w) -> [(title, (h, w) map)] for the chosen heads, or their mean."""
    if head_ids is None:
        return [("head mean", stack.mean(dim=0).numpy())]
    return [(f"head {h}", stack[h].numpy()) for h in head_ids]


def _vit(ckpt: Checkpoint, report: Any, options: ImageOptions
         ) -> tuple[Figure, AttentionMaps, str]:
    from attnviz.models.vit import load_vit

    model, spec = load_vit(ckpt, report)
    image = vit_image(options.image, spec.image_size, parse_size(options.size), spec.patch,
                      normalize=options.normalize)
    with torch.no_grad(), capture_attention(model) as maps:
        model(image.tensor)
    names = [n for n in maps if n.startswith("blocks.")]
    grid = (image.pixels.shape[0] // spec.patch, image.pixels.shape[1] // spec.patch)
    description = (f"ViT rebuilt from the checkpoint: {spec.depth} blocks, dim {spec.dim}, "
                   f"{spec.heads} heads, patch {spec.patch}, grid {grid[0]}x{grid[1]}")
    figure = _vit_figure(maps, names, grid, spec.prefix_tokens, spec.has_cls, spec.patch,
                         image.pixels, options, reference=reference_names(report))
    return figure, maps, description


def _vit_figure(maps: AttentionMaps, names: list[str], grid: tuple[int, int], prefix: int,
                has_cls: bool, patch: int, image_pixels: np.ndarray, options: ImageOptions,
                reference: Sequence[str] = ()) -> Figure:
    """CLS -> patch overlays (layer x head grid) or rollout, for any ViT's captured maps
    (``names``: the image layers; ``reference``: the checkpoint's layers, see pick_layers)."""
    from attnviz.render import overlay

    heads = maps[names[0]].shape[1]

    def cls_rows(attention: torch.Tensor) -> torch.Tensor:  # (1, H, T, T) -> (H, gh, gw)
        rows = attention[0, :, 0, prefix:] if has_cls else attention[0, :, prefix:,
                                                                     prefix:].mean(1)
        return rows.reshape(rows.shape[0], *grid)

    meta = {"grid": json.dumps(grid), "prefix_tokens": str(prefix),
            "image_size": json.dumps(image_pixels.shape[:2]), "patch": str(patch)}
    pixels = image_pixels.astype(np.float32) / 255.0
    if options.view == "rollout":
        heat = rollout_heat(maps, names, grid, prefix, options)
        vmax = float(heat.max())
        panel = overlay(image_pixels, heat, vmax=vmax, alpha=options.alpha, smooth=options.smooth)
        title = (f"attention rollout over {len(names)} blocks (head fusion "
                 f"{options.head_fusion}, discard ratio {options.discard_ratio:g})")
        return Figure([[pixels, panel]], [["image", "rollout: CLS attention"]], title, vmax,
                      metadata=meta, heats=[[None, heat]], image=image_pixels,
                      layers=f"all {len(names)} blocks")
    chosen, layer_ids = pick_layers(maps, names, reference, options, what="image layers",
                                    allow_mean=True)
    head_ids = _heads(options, heads, "all")
    rows: list[tuple[str, list[tuple[str, Any]]]] = []
    if chosen is None:
        stack = torch.stack([cls_rows(maps[n]) for n in names]).mean(dim=0)
        rows.append((f"mean of {len(names)} blocks", _head_panels(stack, head_ids)))
    else:
        rows += [(name, _head_panels(cls_rows(maps[name]), head_ids)) for name in chosen]
    vmax = max(float(np.max(h)) for _, heads in rows for _, h in heads)
    panels = [[overlay(image_pixels, h, vmax=vmax, alpha=options.alpha, smooth=options.smooth)
               for _, h in heads] for _, heads in rows]
    titles = [[f"{name} · {t}" for t, _ in heads] for name, heads in rows]
    title = "CLS attention to each patch" if has_cls else "mean attention to each patch"
    heats: list[list[np.ndarray | None]] = [[h for _, h in heads] for _, heads in rows]
    return Figure(panels, titles, title, vmax, metadata=meta, heats=heats, image=image_pixels,
                  layers=_span(layer_ids, len(names), "block"))


def _class_names(ckpt: Checkpoint, classes: int) -> list[str]:
    from attnviz.heads import settings_from

    for settings in settings_from(ckpt.config, ckpt.root):
        names = settings.value("class_names")
        if isinstance(names, list | tuple) and len(names) >= classes - 1:
            return [str(n) for n in names]
    if classes == 92:
        return list(COCO_NAMES)
    return [f"class {i}" for i in range(classes)]


def _detr(ckpt: Checkpoint, report: Any, options: ImageOptions
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
    figure = _detr_figure(maps, out.logits, out.boxes, (fh, fw), image.pixels,
                          image.original_size, _class_names(ckpt, spec.classes), options,
                          reference=reference_names(report))
    return figure, maps, description


def _detr_figure(maps: AttentionMaps, logits: torch.Tensor, pred_boxes: torch.Tensor,
                 feature_size: tuple[int, int], image_pixels: np.ndarray,
                 original_size: tuple[int, int], names: list[str], options: ImageOptions,
                 reference: Sequence[str] = ()) -> Figure:
    """The DETR paper's figure (per-query box + cross-attention) or encoder attention at
    points, for any DETR's captured maps (rebuilt official layout or HF); ``reference``: the
    checkpoint's layers, see pick_layers."""
    from attnviz.render import overlay

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
