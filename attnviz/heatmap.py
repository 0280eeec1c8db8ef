"""``attnviz heatmap`` for sequences: load or rebuild the model, run it under
``capture_attention``, select layers and heads, render, and optionally save the raw maps."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnviz import __version__
from attnviz.atomic import atomic_output, check_output_path
from attnviz.capture import AttentionMaps, capture_attention
from attnviz.checkpoint import Checkpoint, load_checkpoint
from attnviz.errors import AttnvizError, UsageError
from attnviz.inspection import InspectReport, analyse
from attnviz.models.sources import LoadedModel, is_hf_directory, load_model
from attnviz.models.torch_transformer import ModelBuildError
from attnviz.sequence_inputs import PreparedCall, SequenceRequest, prepare

VIEWS = ("auto", "matrix", "grid")
SCALES = ("shared", "panel")
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")


@dataclass(frozen=True)
class HeatmapOptions:
    layer: str = "all"
    head: str = "all"
    view: str = "auto"
    scale: str = "shared"
    batch_index: int = 0
    title: str | None = None
    cmap: str = "viridis"


@dataclass
class HeatmapResult:
    output: Path
    view: str
    layers: list[str]
    heads: list[str]
    model: str
    maps_file: Path | None = None
    notes: list[str] = field(default_factory=list)


def parse_selector(text: str, count: int, what: str) -> list[int] | None:
    """'all', 'mean' (-> None), '3', '-1', '0-3', '0,2,5-7' -> indices in range."""
    text = text.strip().lower()
    if text == "mean":
        return None
    if text == "all":
        return list(range(count))
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if re.fullmatch(r"-?\d+", part):
            chosen.append(int(part))
        elif match := re.fullmatch(r"(\d+)-(\d+)", part):
            chosen += list(range(int(match.group(1)), int(match.group(2)) + 1))
        else:
            raise UsageError(f"--{what} '{text}': use an index, a range like 0-3, a list, "
                             "'all' or 'mean'")
    resolved = [i + count if i < 0 else i for i in chosen]
    bad = [i for i in resolved if not 0 <= i < count]
    if bad or not resolved:
        raise UsageError(f"--{what} '{text}' is out of range: there are {count} {what}s "
                         f"(0..{count - 1})")
    return resolved


@dataclass
class Panels:
    """What a grid shows: rows of (Lq, Lk) maps, their titles, the layer behind each row
    (None for a mean over layers) and notes on padding."""

    rows: list[list[torch.Tensor]]
    row_titles: list[str]
    col_titles: list[str]
    layers: list[str | None]
    notes: list[str] = field(default_factory=list)


def select_panels(maps: AttentionMaps, options: HeatmapOptions) -> Panels:
    """Panels (rows = layers or their mean, cols = heads or their mean) for one batch item.

    Layers with fewer heads than the most (BART: 4 encoder, 8 decoder heads) get empty cells
    (NaN, drawn grey) for the heads they lack; maps of different shapes (encoder, decoder,
    cross-attention) are padded with NaN to the largest, so the default command never fails."""
    names = list(maps)
    layer_ids = parse_selector(options.layer, len(names), "layer")
    chosen = names if layer_ids is None else [names[i] for i in layer_ids]
    shapes = {tuple(maps[n].shape[1:]) for n in chosen}
    if layer_ids is None and len(shapes) > 1:
        raise UsageError("--layer mean needs layers of one shape; these differ",
                         hint="select layers of one kind, e.g. --layer 0-5")
    first = maps[chosen[0]]
    if not 0 <= options.batch_index < first.shape[0]:
        raise UsageError(f"--batch-index {options.batch_index}: the batch has {first.shape[0]}")
    heads = max(maps[n].shape[1] for n in chosen)
    head_ids = parse_selector(options.head, heads, "head")
    notes: list[str] = []

    def row(stack: torch.Tensor) -> list[torch.Tensor]:  # stack (H, Lq, Lk)
        if head_ids is None:
            return [stack.mean(dim=0)]
        return [stack[h] if h < stack.shape[0] else torch.full(stack.shape[1:], float("nan"))
                for h in head_ids]

    if layer_ids is None:
        mean = torch.stack([maps[n][options.batch_index] for n in chosen]).mean(dim=0)
        rows, row_titles = [row(mean)], [f"mean of {len(chosen)} layers"]
        layers: list[str | None] = [None]
    else:
        counts = {maps[n].shape[1] for n in chosen}
        if len(counts) > 1 and head_ids is not None:
            notes.append(f"layers have {', '.join(str(c) for c in sorted(counts))} heads: "
                         "grey cells are heads a layer does not have")
        rows = [row(maps[n][options.batch_index]) for n in chosen]
        row_titles = [n or "(root)" for n in chosen]
        layers = list(chosen)
    col_titles = ["head mean"] if head_ids is None else [f"head {h}" for h in head_ids]
    return Panels(rows, row_titles, col_titles, layers, notes)


def pad_panels(rows: list[list[torch.Tensor]]) -> tuple[list[list[torch.Tensor]], bool]:
    """Every panel NaN-padded (bottom, right) to the largest (Lq, Lk); True if any was."""
    height = max(p.shape[0] for r in rows for p in r)
    width = max(p.shape[1] for r in rows for p in r)
    padded = [[torch.nn.functional.pad(p.float(), (0, width - p.shape[1], 0,
                                                   height - p.shape[0]), value=float("nan"))
               for p in r] for r in rows]  # (Lq, Lk) -> (max Lq, max Lk)
    return padded, any(p.shape != (height, width) for r in rows for p in r)


def request_files(request: SequenceRequest | None) -> list[Path]:
    """The files a request reads (never to be written over)."""
    if request is None:
        return []
    return [p for p in (request.input_file, request.tgt_input, request.audio, request.image)
            if p is not None]


def open_for_heatmap(path: Path, output: Path, save_maps: str | Path | None, *,
                     key: str | None, config: str | Path | None, force: bool,
                     reads: list[Path] | None = None) -> tuple[Checkpoint, Path | None]:
    """Load the checkpoint's metadata and check both outputs before any model work.

    ``reads``: the other files the command reads (--image, --input, --audio ...)."""
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"-o {output.name}: use a .png, .svg or .pdf file name")
    ckpt = load_checkpoint(path, key=key, config=config)
    inputs = [path, *ckpt.inputs, *(reads or [])]
    check_output_path(output, inputs, force=force)
    maps_path = Path(save_maps) if save_maps is not None else None
    if maps_path is not None:
        check_output_path(maps_path, [*inputs, output], force=force)
    return ckpt, maps_path


def sequence_heatmap(checkpoint: str | Path, output: str | Path, request: SequenceRequest, *,
                     options: HeatmapOptions = HeatmapOptions(), factory: str | None = None,
                     strict: bool = True, heads: Iterable[str] = (),
                     config: str | Path | None = None, key: str | None = None,
                     save_maps: str | Path | None = None, force: bool = False,
                     norm_first: bool = False, activation: str = "relu",
                     attn_implementation: str = "auto", layout: str | None = None
                     ) -> HeatmapResult:
    path, output = Path(checkpoint), Path(output)
    if options.view not in VIEWS or options.scale not in SCALES:
        raise UsageError(f"--view is one of {', '.join(VIEWS)}; --scale one of "
                         f"{', '.join(SCALES)}")
    ckpt, maps_path = open_for_heatmap(path, output, save_maps, key=key, config=config,
                                       force=force, reads=request_files(request))
    report = analyse(ckpt, heads, layout=layout)
    maps, prepared, loaded = capture_sequence(path, ckpt, report, request, factory=factory,
                                              strict=strict, norm_first=norm_first,
                                              activation=activation,
                                              attn_implementation=attn_implementation)
    panels = select_panels(maps, options)
    rows = panels.rows
    view = options.view
    if view == "auto":
        view = "matrix" if len(rows) == 1 and len(rows[0]) == 1 else "grid"
    if view == "matrix" and (len(rows) > 1 or len(rows[0]) > 1):
        raise UsageError("--view matrix shows one map: select one --layer and one --head "
                         "(or 'mean')")
    notes = _render(panels, prepared, output, view, options)
    result = HeatmapResult(output, view, panels.row_titles, panels.col_titles,
                           loaded.description,
                           notes=[*loaded.notes, *prepared.notes, *panels.notes, *notes])
    if maps.missed:
        result.notes.append(f"no map from {len(maps.missed)} attention module(s): "
                            f"{', '.join(maps.missed[:4])}")
    if maps_path is not None:
        save_maps_file(maps, prepared, maps_path, loaded.description)
        result.maps_file = maps_path
    return result


def capture_sequence(path: Path, ckpt: Checkpoint, report: InspectReport,
                     request: SequenceRequest, *, factory: str | None = None,
                     strict: bool = True, norm_first: bool = False, activation: str = "relu",
                     attn_implementation: str = "auto"
                     ) -> tuple[AttentionMaps, PreparedCall, LoadedModel]:
    """Load or rebuild the model, prepare the request's inputs and run it under capture.

    For an HF directory ``prepared.inputs`` are the kwargs given to the model (or to its
    ``prepared.module``), and banded maps are put in the shape the model defines."""
    if attn_implementation != "auto" and not is_hf_directory(path):
        raise UsageError("--attn-implementation applies to HF model directories only")
    loaded = load_model(path, ckpt, report, factory=factory, strict=strict,
                        norm_first=norm_first, activation=activation,
                        attn_implementation=attn_implementation)
    prepared = prepare(loaded, request)
    with torch.no_grad(), capture_attention(loaded.model) as maps:
        try:
            prepared.run()
        except AttnvizError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
            # the model rejected these inputs: a usage problem, not an attnviz bug
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ModelBuildError(f"the forward pass of {loaded.description} failed: "
                                  f"{type(exc).__name__}: {first}", path=path,
                                  hint="check that the inputs fit the model (--seq-len, "
                                  "--input, --tokens, --tgt-*)") from exc
    if loaded.kind == "hf":
        from attnviz.models.hf_maps import adapt_maps

        prepared.notes += adapt_maps(maps, loaded.model, prepared.inputs)
    return maps, prepared, loaded


def _render(panels: Panels, prepared: PreparedCall, output: Path, view: str,
            options: HeatmapOptions) -> list[str]:
    from attnviz import render

    fmt = render.FORMATS[output.suffix.lower()]
    notes = []
    with atomic_output(output) as temp:
        if view == "matrix":
            matrix = panels.rows[0][0].float().numpy()
            title = options.title or f"{panels.row_titles[0]} · {panels.col_titles[0]}"
            layer = panels.layers[0]
            if layer is None:
                query, key = prepared.labels_for("", *matrix.shape)
            else:
                query, key = prepared.labels_for(layer, *matrix.shape)
            render.render_matrix(matrix, query, key, temp, fmt, title=title, cmap=options.cmap)
        else:
            rows, padded = pad_panels(panels.rows)
            if padded:
                notes.append("layers have maps of different shapes: each is drawn top-left in "
                             "its cell, grey beyond its own size")
            render.render_grid([[p.numpy() for p in r] for r in rows], panels.row_titles,
                               panels.col_titles, temp, fmt,
                               title=options.title or "attention per layer and head",
                               shared_scale=options.scale == "shared", cmap=options.cmap)
    return notes


def save_maps_file(maps: AttentionMaps, prepared: PreparedCall, path: Path,
                   description: str) -> None:
    """The raw captured maps (B, H, Lq, Lk) by layer name, tokens and routes in the metadata."""
    from safetensors.torch import save_file

    tensors = {name or "(root)": tensor.contiguous() for name, tensor in maps.items()}
    tensors.update({f"{name or '(root)'}.scores": t.contiguous()
                    for name, t in maps.scores.items()})
    metadata = {
        "format": "attnviz-maps", "attnviz_version": __version__, "model": description,
        "layers": json.dumps(list(maps)), "routes": json.dumps(maps.routes),
        "source_tokens": json.dumps(prepared.source_labels),
        "target_tokens": json.dumps(prepared.target_labels),
        "layout": "B, H, Lq, Lk",
    }
    if prepared.layer_sides is not None:  # HF: which tokens each layer's rows and cols are
        resolve = prepared.layer_sides
        metadata["axes"] = json.dumps({name or "(root)": list(resolve(name.split("#")[0]))
                                       for name in maps})
        metadata["sides"] = json.dumps(prepared.sides)
        metadata["inputs"] = json.dumps({k: list(v.shape) for k, v in prepared.inputs.items()})
        metadata["module"] = prepared.module
    with atomic_output(path) as temp:
        save_file(tensors, str(temp), metadata=metadata)
