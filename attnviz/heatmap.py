"""``attnviz heatmap`` for sequences: load or rebuild the model, run it under
``capture_attention``, select layers and heads, render, and optionally save the raw maps."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from attnviz import __version__
from attnviz.atomic import atomic_output, check_output_path
from attnviz.capture import AttentionMaps, capture_attention
from attnviz.checkpoint import Checkpoint, load_checkpoint
from attnviz.errors import UsageError, param
from attnviz.heads_override import check_captured_heads, override_warnings
from attnviz.inspection import InspectReport, analyse
from attnviz.maps_stream import MapsToDisk
from attnviz.models.sources import LoadedModel, is_hf_directory, load_model
from attnviz.pooling import POOL_MODES
from attnviz.query_rows import query_rows
from attnviz.reducers import MapReducer, PooledMaps, QueryRows, Reducers, reduce_maps
from attnviz.selectors import order_like, parse, select, select_heads
from attnviz.sequence_inputs import PreparedCall, SequenceRequest, prepare, run_forward
from attnviz.window import WindowMaps, parse_window

VIEWS = ("auto", "matrix", "grid")
SCALES = ("shared", "panel")
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")
Labels = Callable[[str, int, int], tuple[list[str], list[str]]]  # (layer, Lq, Lk) -> tokens


@dataclass(frozen=True)
class HeatmapOptions:
    layer: str = "all"
    head: str = "all"
    view: str = "auto"
    scale: str = "shared"
    batch_index: int = 0
    title: str | None = None
    cmap: str = "viridis"
    pool: str = "max"  # how maps larger than their pixels are reduced: max or mean
    query: str | None = None  # rows to draw as strips over every key (attnviz.query_rows)
    window: str | None = None  # a query/key range at full resolution (attnviz.window)


@dataclass
class HeatmapResult:
    output: Path
    view: str
    layers: list[str]
    heads: list[str]
    model: str
    maps_file: Path | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # heads overrides of stored counts

    def _repr_html_(self) -> str:  # with the written PNG or SVG inline
        from attnviz.notebook_tables import heatmap_html

        return heatmap_html(self)


def parse_selector(text: str, count: int, what: str) -> list[int] | None:
    """'all', 'mean' (-> None), '3', '-1', '0-3', '0,2,5-7' -> indices of ``count`` things
    (``what``: 'layer' or 'head', also the parameter named by errors); attnviz.selectors has
    the whole grammar, names and globs included."""
    return select_heads(text, count, param=what) if what == "head" else \
        select(text, [str(i) for i in range(count)], param=what, noun=what, allow_mean=True)


def check_selectors(layer: str | None, head: str | None) -> None:
    """Refuse layer or head selectors that cannot select anything (a reversed range, a name
    for a head) before any model work; what they pick is resolved after the capture."""
    if layer is not None:
        parse(layer, allow_mean=True)
    if head is not None:
        parse(head, param="head", noun="head", allow_mean=True, by_name=False)


@dataclass
class Panels:
    """What a grid shows: rows of (Lq, Lk) maps, their titles, the layer behind each row
    (None for a mean over layers) and notes on padding."""

    rows: list[list[torch.Tensor]]
    row_titles: list[str]
    col_titles: list[str]
    layers: list[str | None]
    notes: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # every captured layer, by its index


def select_panels(maps: AttentionMaps, options: HeatmapOptions,
                  reference: Sequence[str] = ()) -> Panels:
    """Panels (rows = layers or their mean, cols = heads or their mean) for one batch item.

    ``options.layer`` is an attnviz.selectors selector; its indices count the captured layers
    in the order of ``reference``, the checkpoint's layers as inspect lists them (captured
    modules it lacks come last), so that ``--layer 3`` is inspect's layer 3.

    Layers with fewer heads than the most (BART: 4 encoder, 8 decoder heads) get empty cells
    (NaN, drawn grey) for the heads they lack; maps of different shapes (encoder, decoder,
    cross-attention) are padded with NaN to the largest, so the default command never fails."""
    names, aliases = order_like(list(maps), reference)
    shown = [name or "(root)" for name in names]
    layer_ids = select(options.layer, shown, allow_mean=True,
                       aliases=[None if a is None else a or "(root)" for a in aliases])
    chosen = names if layer_ids is None else [names[i] for i in layer_ids]
    shapes = {tuple(maps[n].shape[1:]) for n in chosen}
    if layer_ids is None and len(shapes) > 1:
        raise UsageError("'mean' needs layers of one shape; these differ", param="layer",
                         hint="select layers of one kind, e.g. 0-5")
    first = maps[chosen[0]]
    if not 0 <= options.batch_index < first.shape[0]:
        raise UsageError(f"{param('batch_index')} {options.batch_index}: the batch has "
                         f"{first.shape[0]}", param="batch_index")
    heads = max(maps[n].shape[1] for n in chosen)
    head_ids = select_heads(options.head, heads)
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
    return Panels(rows, row_titles, col_titles, layers, notes, names)


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
        raise UsageError(f"{param('view')} is one of {', '.join(VIEWS)}; {param('scale')} one of "
                         f"{', '.join(SCALES)}", param="view")
    check_selectors(options.layer, options.head)
    if options.query is not None and options.view != "auto":
        raise UsageError(f"{param('query')} draws strips; it takes no {param('view')}",
                         param="query")
    if options.pool not in POOL_MODES:
        raise UsageError(f"'{options.pool}': use {' or '.join(POOL_MODES)}", param="pool")
    if options.query is not None and options.window is not None:
        raise UsageError(f"{param('window')} zooms into maps, {param('query')} draws strips: "
                         "pass one", param="window")
    window = None if options.window is None else parse_window(options.window)
    ckpt, maps_path = open_for_heatmap(path, output, save_maps, key=key, config=config,
                                       force=force, reads=request_files(request))
    report = analyse(ckpt, heads, layout=layout)
    cells = stream_cells(report)
    pooled: PooledMaps | QueryRows | WindowMaps = PooledMaps(cells, cells, mode=options.pool)
    if options.query is not None:
        pooled = QueryRows(query_rows(options.query))
    elif window is not None:  # only the window's rows are computed, cut to its keys
        pooled = WindowMaps(window, cells, options.pool)
    with contextlib.ExitStack() as stack:
        writer = None
        if maps_path is not None:  # full maps go to disk layer by layer as they are captured
            writer = MapsToDisk(stack.enter_context(atomic_output(maps_path)))
            stack.callback(writer.close)
        maps, prepared, loaded = capture_sequence(
            path, ckpt, report, request, factory=factory, strict=strict, norm_first=norm_first,
            activation=activation, attn_implementation=attn_implementation,
            reduce=pooled if writer is None else Reducers([pooled, writer]))
        if writer is not None and maps_path is not None:
            writer.finish(maps_metadata(maps, prepared, loaded.description))
    maps = replace(maps, maps=pooled.maps)
    if isinstance(pooled, QueryRows):
        from attnviz.heatmap_strips import query_strips

        return query_strips(maps, pooled, prepared, loaded, report, output, options, maps_path)
    panels = select_panels(maps, options, [item.layer.name for item in report.layers])
    shapes, source_note = maps.shapes, ""
    labels: Labels = prepared.labels_for
    if isinstance(pooled, WindowMaps):
        shapes, labels = _window_view(pooled, maps, panels, prepared)
        source_note = pooled.window.describe()
    rows = panels.rows
    view = options.view
    if view == "auto":
        view = "matrix" if len(rows) == 1 and len(rows[0]) == 1 else "grid"
    if view == "matrix" and (len(rows) > 1 or len(rows[0]) > 1):
        raise UsageError(f"{param('view')} matrix shows one map: select one {param('layer')} and "
                         f"one {param('head')} (or 'mean')", param="view")
    if options.title is None:
        from attnviz.captions import model_label, sequence_input, sequence_title

        options = replace(options, title=sequence_title(
            view, panels.layers, panels.order, panels.col_titles,
            shared=options.scale == "shared", model=model_label(loaded.description, path),
            source=" · ".join(t for t in (sequence_input(request, prepared), source_note)
                              if t)))
    notes = _render(panels, labels, output, view, options, shapes)
    result = HeatmapResult(output, view, panels.row_titles, panels.col_titles,
                           loaded.description,
                           notes=[*loaded.notes, *prepared.notes, *panels.notes, *notes],
                           warnings=override_warnings(report.layers))
    if maps.missed:
        result.notes.append(f"no map from {len(maps.missed)} attention module(s): "
                            f"{', '.join(maps.missed[:4])}")
    result.maps_file = maps_path
    if isinstance(pooled, WindowMaps):
        first = next(n for n in maps if n not in pooled.outside)
        result.notes.insert(0, f"{pooled.window.describe()}: {shapes[first][2]}x"
                               f"{shapes[first][3]} of the {maps.shapes[first][2]}x"
                               f"{maps.shapes[first][3]} map, the only cells captured")
    return result


def _window_view(pooled: WindowMaps, maps: AttentionMaps, panels: Panels,
                 prepared: PreparedCall) -> tuple[dict[str, tuple[int, ...]], Labels]:
    """The window's unpooled shapes and token labels, once the drawn layers are known."""
    pooled.check([n for n in panels.layers if n is not None] or list(maps))

    def labels(name: str, _rows: int, _cols: int) -> tuple[list[str], list[str]]:
        return pooled.labels(name, *prepared.labels_for(name, *maps.shapes[name][2:]))

    return dict(pooled.shapes), labels


def stream_cells(report: InspectReport, max_pixels: int = 2000) -> int:
    """Cells a side each map is pooled to as it is captured: its share of the grid's pixels
    (the checkpoint's layers x its most heads), never below what a matrix view needs."""
    layers = max(1, len(report.layers))
    heads = max((item.heads.num_heads or 1 for item in report.layers), default=1)
    return max(256, min(1024, max_pixels // max(layers, heads)))


def capture_sequence(path: Path, ckpt: Checkpoint, report: InspectReport,
                     request: SequenceRequest, *, factory: str | None = None,
                     strict: bool = True, norm_first: bool = False, activation: str = "relu",
                     attn_implementation: str = "auto", reduce: MapReducer | None = None
                     ) -> tuple[AttentionMaps, PreparedCall, LoadedModel]:
    """Load or rebuild the model, prepare the request's inputs and run it under capture.

    ``reduce``: stream each layer's maps to this reducer (``maps`` then holds only routes and
    shapes); models whose maps need reshaping afterwards (banded attention) are captured whole
    and then fed to it. For an HF directory ``prepared.inputs`` are the kwargs given to the
    model (or to its ``prepared.module``), and banded maps are put in the shape the model
    defines."""
    if attn_implementation != "auto" and not is_hf_directory(path):
        raise UsageError(f"{param('attn_implementation')} applies to HF model directories only",
                         param="attn_implementation")
    loaded = load_model(path, ckpt, report, factory=factory, strict=strict,
                        norm_first=norm_first, activation=activation,
                        attn_implementation=attn_implementation)
    prepared = prepare(loaded, request)
    banded = loaded.kind == "hf" and _is_banded(loaded.model)
    streamed = reduce if reduce is not None and not banded else None
    with torch.no_grad(), capture_attention(loaded.model, reduce=streamed) as maps:
        run_forward(prepared, loaded.description, path=path,
                    hint="check that the inputs fit the model "
                         f"({param('seq_len')}, {param('input_file')}, "
                         f"{param('tokens')}, {param('tgt_')}*)")
    check_captured_heads(maps, report.layers, loaded.description)
    if loaded.kind == "hf" and streamed is None:
        from attnviz.models.hf_maps import adapt_maps

        prepared.notes += adapt_maps(maps, loaded.model, prepared.inputs)
    if reduce is not None and streamed is None:
        reduce_maps(maps.maps, reduce)
        maps.shapes.update({k: tuple(v.shape) for k, v in maps.maps.items()})
        maps.maps = {}
    return maps, prepared, loaded


def _is_banded(model: torch.nn.Module) -> bool:
    from attnviz.models.hf_maps import is_banded

    return is_banded(getattr(getattr(model, "config", None), "model_type", None))


def _render(panels: Panels, labels: Labels, output: Path, view: str,
            options: HeatmapOptions, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Draw the panels; ``shapes`` are the unpooled (B, H, Lq, Lk) of what is drawn and
    ``labels(name, Lq, Lk)`` its token labels."""
    from attnviz import render

    fmt = render.FORMATS[output.suffix.lower()]
    notes = []
    with atomic_output(output) as temp:
        if view == "matrix":
            matrix = panels.rows[0][0].float().numpy()
            title = options.title or f"{panels.row_titles[0]} · {panels.col_titles[0]}"
            layer = panels.layers[0]
            name = layer if layer is not None else next(iter(shapes), "")
            source = shapes.get(name, (0, 0, *matrix.shape))
            query, key = labels(name, *source[2:])
            if tuple(source[2:]) != matrix.shape:  # pooled: each cell labelled by its first token
                query, key = block_labels(query, matrix.shape[0]), block_labels(key,
                                                                                matrix.shape[1])
                notes.append(f"map pooled by {options.pool} from {source[2]}x{source[3]} to "
                             f"{matrix.shape[0]}x{matrix.shape[1]} cells")
            render.render_matrix(matrix, query, key, temp, fmt, title=title, cmap=options.cmap)
        else:
            rows, padded = pad_panels(panels.rows)
            if padded:
                notes.append("layers have maps of different shapes: each is drawn top-left in "
                             "its cell, grey beyond its own size")
            pooled = render.render_grid([[p.numpy() for p in r] for r in rows],
                                        panels.row_titles, panels.col_titles, temp, fmt,
                                        title=options.title or "attention per layer and head",
                                        shared_scale=options.scale == "shared", cmap=options.cmap,
                                        pool=options.pool)
            captured = {tuple(s[2:]) for s in shapes.values()}
            biggest = max(captured, default=(0, 0))
            if pooled or biggest > tuple(rows[0][0].shape):
                notes.append(pooled or f"maps pooled by {options.pool} to "
                             f"{rows[0][0].shape[0]}x{rows[0][0].shape[1]} cells")
    return notes


def block_labels(labels: list[str], cells: int) -> list[str]:
    """Labels of pooled cells: the first token of each cell's block of positions."""
    length = len(labels)
    return [labels[-(-j * length // cells)] for j in range(cells)]


def maps_metadata(maps: AttentionMaps, prepared: PreparedCall,
                  description: str) -> dict[str, str]:
    """What a saved maps file says about its tensors: layers, routes, tokens, axes."""
    names = list(maps.routes)
    metadata = {
        "format": "attnviz-maps", "attnviz_version": __version__, "model": description,
        "layers": json.dumps(names), "routes": json.dumps(maps.routes),
        "source_tokens": json.dumps(prepared.source_labels),
        "target_tokens": json.dumps(prepared.target_labels),
        "layout": "B, H, Lq, Lk",
    }
    if prepared.layer_sides is not None:  # HF: which tokens each layer's rows and cols are
        resolve = prepared.layer_sides
        metadata["axes"] = json.dumps({name or "(root)": list(resolve(name.split("#")[0]))
                                       for name in names})
        metadata["sides"] = json.dumps(prepared.sides)
        metadata["inputs"] = json.dumps({k: list(v.shape) for k, v in prepared.inputs.items()})
        metadata["module"] = prepared.module
    return metadata
