"""``heatmap --image`` on an HF model directory (``hf`` extra): the directory's own image
processor prepares the image, the model runs under capture, and the figure follows the
family: DETR's per-object figure, ViT-like CLS overlays (the vision tower of CLIP/SigLIP, whose
text tower also runs when ``--text``/``--tokens`` is given), or for windowed attention (Swin)
each window's map placed back on the image grid."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attnviz.capture import AttentionMaps, capture_attention
from attnviz.checkpoint import Checkpoint
from attnviz.errors import UsageError, param
from attnviz.heads_override import LayerHeads
from attnviz.models.hf_maps import adapt_maps
from attnviz.models.sources import load_hf_model
from attnviz.sequence_inputs import PreparedCall, SequenceRequest

if TYPE_CHECKING:
    from attnviz.image_heatmap import Figure, ImageOptions

WINDOWED_TYPES = ("swin", "swinv2", "donut-swin", "maskformer-swin")


def hf_vision_figure(path: Path, ckpt: Checkpoint, options: ImageOptions, *,
                     heads_from: Iterable[LayerHeads] = (), reference: Sequence[str] = ()
                     ) -> tuple[Figure, AttentionMaps, str]:
    """``reference``: the checkpoint's layer names in inspect's order, which layer indices
    count (attnviz.image_heatmap.pick_layers)."""
    from PIL import Image

    from attnviz.image_heatmap import _detr_figure
    from attnviz.image_inputs import open_rgb
    from attnviz.models.hf_inputs import prepare_hf

    model_type = str((ckpt.config or {}).get("model_type", ""))
    detr = "detr" in model_type
    loaded = load_hf_model(path, ckpt, attn_implementation=options.attn_implementation,
                           auto_name="AutoModelForObjectDetection" if detr else "AutoModel",
                           heads_from=heads_from)
    request = SequenceRequest(text=options.text, tokens=options.tokens, image=options.image)
    prepared = prepare_hf(loaded, request)
    if "pixel_values" not in prepared.inputs:
        raise UsageError(f"{type(loaded.model).__name__} takes no image", path=path)
    with torch.no_grad(), capture_attention(loaded.model) as maps:
        out = prepared.run()
    notes = [*loaded.notes, *prepared.notes, *adapt_maps(maps, loaded.model, prepared.inputs)]
    height, width = prepared.inputs["pixel_values"].shape[-2:]
    image = Image.fromarray(open_rgb(options.image))
    pixels = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
    name = type(loaded.model).__name__
    if detr:
        cross = [n for n in maps if n.endswith(("multihead_attn", "encoder_attn"))]
        if not cross:
            raise UsageError("no decoder cross-attention captured from this DETR", path=path)
        fh, fw = math.ceil(height / 32), math.ceil(width / 32)  # ResNet stride 32
        if fh * fw != maps[cross[0]].shape[-1]:
            raise UsageError(f"cannot tell the feature map of {maps[cross[0]].shape[-1]} cells "
                             f"for a {height}x{width} input", path=path)
        labels = getattr(loaded.model.config, "id2label", {}) or {}
        names = [str(labels.get(i, f"class {i}")) for i in range(out.logits.shape[-1])]
        figure = _detr_figure(maps, out.logits, out.pred_boxes, (fh, fw), pixels,
                              (image.height, image.width), names, options, reference=reference)
        description = f"{name} from {path.name}: feature map {fh}x{fw}"
    elif model_type in WINDOWED_TYPES:
        figure, description = _windowed(loaded.model, maps, pixels, options, path, reference)
    else:
        figure, description = _vit_like(loaded.model, maps, prepared, pixels, options, path,
                                        reference)
    figure.notes = [*notes, *figure.notes]
    figure.prepared = prepared
    return figure, maps, f"{description} ({loaded.attn_implementation} attention)"


def _vision_names(model: Any, maps: AttentionMaps) -> list[str]:
    from attnviz.models.hf_maps import towers

    tower = next((t for t, side in towers(model).items() if side == "image"), None)
    return [n for n in maps if tower is None or n.startswith(f"{tower}.")]


def _vit_like(model: Any, maps: AttentionMaps, prepared: PreparedCall, pixels: np.ndarray,
              options: ImageOptions, path: Path, reference: Sequence[str] = ()
              ) -> tuple[Figure, str]:
    from attnviz.image_heatmap import _vit_figure

    config = getattr(model.config, "vision_config", None) or model.config
    patch = int(getattr(config, "patch_size", 16))
    height, width = pixels.shape[:2]
    grid = (height // patch, width // patch)
    names = _vision_names(model, maps)
    tokens = maps[names[0]].shape[-1]
    prefix = tokens - grid[0] * grid[1]
    if prefix < 0 or any(maps[n].shape[-1] != tokens for n in names):
        raise UsageError(f"maps of {tokens} tokens do not fit a {grid[0]}x{grid[1]} patch "
                         f"grid (patch {patch}): this model's attention is not over image "
                         "patches plus prefix tokens", path=path)
    # Dinov2WithRegisters: [CLS, registers..., patches]; the figure shows the registers apart
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    registers = registers if 0 < registers < prefix else 0
    figure = _vit_figure(maps, names, grid, prefix, prefix > 0, patch, pixels, options,
                         reference=reference, registers=registers)
    text = [n for n in maps if n not in names]
    if text:
        figure.notes.append(f"text tower captured too: {len(text)} layers (see --save-maps "
                            "or attnviz report)")
    description = (f"{type(model).__name__} from {path.name}: {len(names)} layers, "
                   f"patch {patch}, grid {grid[0]}x{grid[1]}")
    return figure, description


def window_heats(maps: AttentionMaps, model: Any, names: list[str],
                 grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Each windowed layer's maps back on its stage's grid: (H, h, w), the mean attention each
    position receives from the queries of its window.

    The layer saw (B * windows, H, w^2, w^2) maps over the padded, cyclically shifted feature
    map; windows are laid back row-major, the shift is undone and the padding cropped."""
    heats = {}
    for name in names:
        block = model.get_submodule(name.rsplit(".", 1)[0])
        stage = int(name.split("layers.")[1].split(".")[0])
        height, width = grid
        for _ in range(stage):  # each patch merging halves the grid (rounding up)
            height, width = (height + 1) // 2, (width + 1) // 2
        size, shift = int(block.window_size), int(block.shift_size)
        padded_h, padded_w = -(-height // size) * size, -(-width // size) * size
        rows, cols = padded_h // size, padded_w // size
        probs = maps[name]
        if probs.shape[0] != rows * cols or probs.shape[-1] != size * size:
            raise UsageError(f"layer '{name}': windowed attention maps {list(probs.shape)} do not "
                             f"tile a {height}x{width} grid in {size}x{size} windows")
        heads = probs.shape[1]
        received = probs.mean(dim=2)  # (windows, H, w^2): mean over the window's queries
        tiles = received.reshape(rows, cols, heads, size, size)  # (R, C, H, w, w)
        plane = tiles.permute(2, 0, 3, 1, 4).reshape(heads, padded_h, padded_w)  # (H, Hp, Wp)
        if shift:
            plane = torch.roll(plane, shifts=(shift, shift), dims=(1, 2))  # undo the shift
        heats[name] = plane[:, :height, :width]  # (H, h, w)
    return heats


def _windowed(model: Any, maps: AttentionMaps, pixels: np.ndarray, options: ImageOptions,
              path: Path, reference: Sequence[str] = ()) -> tuple[Figure, str]:
    from attnviz.image_heatmap import Figure, _head_panels, pick_layers
    from attnviz.render import overlay
    from attnviz.selectors import select_heads

    if options.view == "rollout":
        raise UsageError(f"{param('view')} rollout needs global attention; this model's "
                         "attention is "
                         f"windowed (Swin): use {param('view')} overlay", path=path, param="view")
    patch = int(getattr(model.config, "patch_size", 4))
    height, width = pixels.shape[:2]
    grid = (-(-height // patch), -(-width // patch))
    names = list(maps)
    if options.layer is not None and options.layer.strip().lower() == "mean":
        raise UsageError("windowed attention: stages differ in grid and heads; select layers, "
                         "not 'mean'", param="layer")
    chosen, _ = pick_layers(maps, names, reference, options, what="windowed layers",
                            allow_mean=False)
    heats = window_heats(maps, model, chosen or [], grid)
    rows = []
    for layer, stack in heats.items():
        head_ids = select_heads(options.head or "all", stack.shape[0])
        rows.append((layer, _head_panels(stack, head_ids)))
    vmax = max(float(np.max(h)) for _, panels in rows for _, h in panels)
    width_cells = max(len(panels) for _, panels in rows)
    blank = np.ones((height, width, 3), np.float32)
    panels_rgb = [[overlay(pixels, h, vmax=vmax, alpha=options.alpha, smooth=options.smooth)
                   for _, h in panels] + [blank] * (width_cells - len(panels))
                  for _, panels in rows]
    titles = [[f"{layer} · {t}" for t, _ in panels] + [""] * (width_cells - len(panels))
              for layer, panels in rows]
    heat_rows: list[list[np.ndarray | None]] = [[h for _, h in panels] for _, panels in rows]
    figure = Figure(panels_rgb, titles, "windowed attention: mean attention each patch "
                    "receives within its window", vmax, heats=heat_rows, image=pixels,
                    metadata={"windowed": "1", "image_size": f"[{height}, {width}]"})
    figure.notes.append("windowed attention (Swin): each window's maps are placed back on the "
                        "image grid (shift undone, padding cropped)")
    description = (f"{type(model).__name__} from {path.name}: {len(names)} windowed blocks, "
                   f"patch {patch}")
    return figure, description
