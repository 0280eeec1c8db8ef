"""``attnviz heatmap --image``: vision models rebuilt from their checkpoints (the families of
``attnviz.models.vision_registry``: timm ViT, DINO, DINOv2, torchvision ViT, OpenAI CLIP /
open_clip visual towers, Swin, DETR), HF vision
directories, and any ViT-like ``--model`` factory; attention over the image (per head, head
mean, rollout, DINO's ``--keep-mass``, registers), DETR's per-object decoder attention and
encoder self-attention at reference points."""

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
from attnviz.image_inputs import parse_size, vit_image
from attnviz.inspection import analyse
from attnviz.models.sources import is_hf_directory
from attnviz.models.vision_registry import BuiltVision
from attnviz.rollout import attention_rollout
from attnviz.selectors import listing, order_like, select_among, select_heads

VIEWS = ("auto", "overlay", "rollout", "registers")
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
    keep_mass: float | None = None  # DINO's threshold: keep each map's top fraction of mass
    prefix_tokens: int | None = None  # --model factories: tokens before the patch grid
    grid: tuple[int, int] | None = None  # --model factories: the patch grid (rows, columns)
    factory: str | None = None  # package.module:factory building the ViT-like model
    strict: bool = True  # the factory's module must take every tensor and no more
    activation: str | None = None  # CLIP towers: quick_gelu or gelu, when the file cannot say


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
    scale: str | None = None  # "panel": rows measure different things, each its own scale


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
    if options.keep_mass is not None and not 0 < options.keep_mass <= 1:
        raise UsageError(f"{param('keep_mass')} {options.keep_mass:g}: use a fraction in (0, 1]",
                         param="keep_mass")
    check_selectors(options.layer, options.head)
    ckpt, maps_path = open_for_heatmap(path, output, save_maps, key=key, config=config,
                                       force=force, reads=[options.image])
    report = analyse(ckpt, heads, layout=layout)
    figure, maps, description = image_figure(path, ckpt, report, options)
    from attnviz import render
    from attnviz.captions import image_input, image_title, model_label

    shared = (figure.scale or options.scale) == "shared"
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
    from attnviz.models.vision_registry import match

    found = match(ckpt.tensors)
    return found is not None and found.record.name == "detr"


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
    if options.factory is None and not options.strict:
        raise UsageError(f"{param('strict', False)} only applies with {param('factory')}",
                         param="strict")
    if options.factory is None and (options.prefix_tokens is not None or options.grid):
        raise UsageError(f"{param('prefix_tokens')}/{param('grid')} describe the tokens of a "
                         f"{param('factory')} model; rebuilt families know theirs",
                         param="prefix_tokens")
    from attnviz.models.vision_registry import HOOK_OPTIONS, families, match, resolve, taking

    # what the file cannot say, for the rebuilt families whose hooks take it: never ignored
    hf, factory = is_hf_directory(path), options.factory is not None
    found = None if hf or factory else match(ckpt.tensors)
    refused = [name for name in HOOK_OPTIONS if getattr(options, name) is not None and (
        hf or factory or (found is not None and name not in found.record.options))]
    if refused:
        what = found.record.short if found is not None else \
            "an HF directory" if hf else f"a {param('factory')} model"
        raise UsageError(f"{param(refused[0])} with {param('image')} applies to "
                         f"{taking(refused[0])} files, not {what}", path=path,
                         param=refused[0], hint=f"drop {param(refused[0])}")
    if hf:
        if factory:
            raise UsageError(f"{param('factory')} with an HF model directory: the directory "
                             "builds its own model; pass the weights file instead", path=path,
                             param="factory")
        from attnviz.models.hf_vision import hf_vision_figure

        return hf_vision_figure(path, ckpt, options, heads_from=report.layers,
                                reference=reference_names(report))
    if options.text is not None or options.tokens is not None:
        raise UsageError(f"{param('text')}/{param('tokens')} with {param('image')} need a "
                         "multi-tower HF model directory (CLIP, SigLIP)", path=path, param="text")
    if options.attn_implementation != "auto":
        raise UsageError(f"{param('attn_implementation')} applies to HF model directories only",
                         param="attn_implementation")
    if factory:
        from attnviz.models.vision_generic import factory_figure

        return factory_figure(ckpt, options)
    if found is None:
        from attnviz.models.family import recognise

        family = recognise(ckpt, report)
        held = f"; this file: {family.description}" if family is not None else ""
        raise UsageError(f"{param('image')} needs a ViT or DETR checkpoint attnviz rebuilds "
                         f"({families()}){held}", path=path, param="image",
                         hint=f"a ViT-like model: pass {param('factory')} package.module:factory;"
                              f" sequence models: {param('text')}/{param('tokens')}/"
                              f"{param('input_file')}/{param('seq_len')}")
    taken = {name: getattr(options, name) for name in found.record.options}
    if found.record.run:
        runner = resolve(found.record.run)
        result: tuple[Figure, AttentionMaps, str] = runner(ckpt, report, options, **taken)
        return result
    built: BuiltVision = resolve(found.record.build)(ckpt, report, **taken)
    return rebuilt_figure(built, options, reference_names(report))


def rebuilt_figure(built: BuiltVision, options: ImageOptions, reference: Sequence[str] = ()
                   ) -> tuple[Figure, AttentionMaps, str]:
    """Run a rebuilt ViT-like model on the image under capture and draw its CLS figure."""
    size = parse_size(options.size)
    image = vit_image(options.image, built.native_size, size, built.patch,
                      normalize=options.normalize, mean=built.mean, std=built.std)
    if not built.any_size and image.pixels.shape[:2] != built.native_size:
        native = f"{built.native_size[1]}x{built.native_size[0]}"
        raise UsageError(f"{param('size')} {options.size}: {built.description.split(':')[0]} "
                         f"runs only at its native size {native}", param="size",
                         hint=f"drop {param('size')}")
    with torch.no_grad(), capture_attention(built.model) as maps:
        built.model(image.tensor)
    names = [n for n in maps if n.startswith(built.blocks)]
    grid = (image.pixels.shape[0] // built.patch, image.pixels.shape[1] // built.patch)
    figure = _vit_figure(maps, names, grid, built.tokens.prefix, built.tokens.cls, built.patch,
                         image.pixels, options, reference=reference,
                         registers=built.tokens.registers, to_input=image.to_input)
    figure.notes[:0] = built.notes
    return figure, maps, f"{built.description}, grid {grid[0]}x{grid[1]}"


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


def _vit_figure(maps: AttentionMaps, names: list[str], grid: tuple[int, int], prefix: int,
                has_cls: bool, patch: int, image_pixels: np.ndarray, options: ImageOptions,
                reference: Sequence[str] = (), **kwargs: Any) -> Figure:
    """CLS -> patch overlays (layer x head grid) or rollout, for any ViT's captured maps
    (``attnviz.models.vision_figures.cls_figure``)."""
    from attnviz.models.vision_figures import cls_figure

    return cls_figure(maps, names, grid, prefix, has_cls, patch, image_pixels, options,
                      reference, **kwargs)


def _detr_figure(*args: Any, **kwargs: Any) -> Figure:
    """DETR's figures for any DETR's captured maps (``attnviz.models.vision_detr``)."""
    from attnviz.models.vision_detr import detr_figure

    return detr_figure(*args, **kwargs)


def refuse_in_report(path: Path, ckpt: Checkpoint) -> None:
    """``attnviz report --image`` for a family whose figure has no place in the report (its
    record's ``unreported``): one line that says so and names the command that draws it."""
    if is_hf_directory(path):
        return
    from attnviz.models.vision_registry import match

    found = match(ckpt.tensors)
    if found is not None and found.record.unreported:
        raise UsageError(f"attnviz report does not draw {found.record.short} files: "
                         f"{found.record.unreported}", path=path,
                         hint=f"draw it with 'attnviz heatmap FILE {param('image')} IMG'")
