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
from attnviz.models.sources import LoadedModel, load_model
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


def token_labels(length: int, source: list[str], target: list[str]) -> list[str]:
    if target and length == len(target) and length != len(source):
        return target
    if length == len(source):
        return source
    if target and length == len(target):
        return target
    return [str(i) for i in range(length)]


def select_panels(maps: AttentionMaps, options: HeatmapOptions
                  ) -> tuple[list[list[torch.Tensor]], list[str], list[str]]:
    """Panels (rows = layers or their mean, cols = heads or their mean) for one batch item."""
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
    heads = first.shape[1]
    head_ids = parse_selector(options.head, heads, "head")

    def row(stack: torch.Tensor) -> list[torch.Tensor]:  # stack (H, Lq, Lk)
        if head_ids is None:
            return [stack.mean(dim=0)]
        return [stack[h] for h in head_ids]

    if layer_ids is None:
        mean = torch.stack([maps[n][options.batch_index] for n in chosen]).mean(dim=0)
        rows, row_titles = [row(mean)], [f"mean of {len(chosen)} layers"]
    else:
        for name in chosen:
            if maps[name].shape[1] != heads and head_ids is not None:
                raise UsageError(f"layer '{name}' has {maps[name].shape[1]} heads, not {heads}")
        rows = [row(maps[n][options.batch_index]) for n in chosen]
        row_titles = [n or "(root)" for n in chosen]
    col_titles = ["head mean"] if head_ids is None else [f"head {h}" for h in head_ids]
    return rows, row_titles, col_titles


def open_for_heatmap(path: Path, output: Path, save_maps: str | Path | None, *,
                     key: str | None, config: str | Path | None,
                     force: bool) -> tuple[Checkpoint, Path | None]:
    """Load the checkpoint's metadata and check both outputs before any model work."""
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"-o {output.name}: use a .png, .svg or .pdf file name")
    ckpt = load_checkpoint(path, key=key, config=config)
    check_output_path(output, [path, *ckpt.files], force=force)
    maps_path = Path(save_maps) if save_maps is not None else None
    if maps_path is not None:
        check_output_path(maps_path, [path, *ckpt.files, output], force=force)
    return ckpt, maps_path


def sequence_heatmap(checkpoint: str | Path, output: str | Path, request: SequenceRequest, *,
                     options: HeatmapOptions = HeatmapOptions(), factory: str | None = None,
                     strict: bool = True, heads: Iterable[str] = (),
                     config: str | Path | None = None, key: str | None = None,
                     save_maps: str | Path | None = None, force: bool = False,
                     norm_first: bool = False, activation: str = "relu") -> HeatmapResult:
    path, output = Path(checkpoint), Path(output)
    if options.view not in VIEWS or options.scale not in SCALES:
        raise UsageError(f"--view is one of {', '.join(VIEWS)}; --scale one of "
                         f"{', '.join(SCALES)}")
    ckpt, maps_path = open_for_heatmap(path, output, save_maps, key=key, config=config,
                                       force=force)
    maps, prepared, loaded = capture_sequence(path, ckpt, analyse(ckpt, heads), request,
                                              factory=factory, strict=strict,
                                              norm_first=norm_first, activation=activation)
    rows, row_titles, col_titles = select_panels(maps, options)
    view = options.view
    if view == "auto":
        view = "matrix" if len(rows) == 1 and len(rows[0]) == 1 else "grid"
    if view == "matrix" and (len(rows) > 1 or len(rows[0]) > 1):
        raise UsageError("--view matrix shows one map: select one --layer and one --head "
                         "(or 'mean')")
    _render(rows, row_titles, col_titles, prepared, output, view, options)
    result = HeatmapResult(output, view, row_titles, col_titles, loaded.description,
                           notes=list(loaded.notes))
    if maps.missed:
        result.notes.append(f"no map from {len(maps.missed)} attention module(s): "
                            f"{', '.join(maps.missed[:4])}")
    if maps_path is not None:
        save_maps_file(maps, prepared, maps_path, loaded.description)
        result.maps_file = maps_path
    return result


def capture_sequence(path: Path, ckpt: Checkpoint, report: InspectReport,
                     request: SequenceRequest, *, factory: str | None = None,
                     strict: bool = True, norm_first: bool = False, activation: str = "relu"
                     ) -> tuple[AttentionMaps, PreparedCall, LoadedModel]:
    """Load or rebuild the model, prepare the request's inputs and run it under capture."""
    loaded = load_model(path, ckpt, report, factory=factory, strict=strict,
                        norm_first=norm_first, activation=activation)
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
    return maps, prepared, loaded


def _render(rows: list[list[torch.Tensor]], row_titles: list[str], col_titles: list[str],
            prepared: PreparedCall, output: Path, view: str, options: HeatmapOptions) -> None:
    from attnviz import render

    fmt = render.FORMATS[output.suffix.lower()]
    with atomic_output(output) as temp:
        if view == "matrix":
            matrix = rows[0][0].float().numpy()
            title = options.title or f"{row_titles[0]} · {col_titles[0]}"
            render.render_matrix(matrix, token_labels(matrix.shape[0], prepared.source_labels,
                                                 prepared.target_labels),
                                 token_labels(matrix.shape[1], prepared.source_labels,
                                         prepared.target_labels),
                                 temp, fmt, title=title, cmap=options.cmap)
        else:
            shapes = {tuple(p.shape) for r in rows for p in r}
            if len(shapes) > 1:
                raise UsageError("the selected layers have maps of different shapes "
                                 f"{sorted(shapes)}; select layers of one kind with --layer")
            panels = [[p.float().numpy() for p in r] for r in rows]
            render.render_grid(panels, row_titles, col_titles, temp, fmt,
                               title=options.title or "attention per layer and head",
                               shared_scale=options.scale == "shared", cmap=options.cmap)


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
    with atomic_output(path) as temp:
        save_file(tensors, str(temp), metadata=metadata)
