"""What ``attnviz report`` shows, gathered from a checkpoint and one forward pass: the inspect
summary, every captured map quantised to an 8-bit PNG, the vision overlays and per-head weight
norms. Pure data; ``report_html`` lays it out.

Maps are stored as 8-bit grey PNGs: grey is the attention scaled to the head's maximum
(255 = max, so a value is known to within max/510); maps with masked cells carry an alpha
channel, 0 where a cell is masked (probability
exactly 0, or NaN from a fully masked row). Maps longer than ``max_tokens`` are mean-pooled in
square blocks of k x k tokens first, k = ceil(length / max_tokens); a 512-token map at the
default 256 becomes 256 x 256.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from attnviz.captions import InputPart
from attnviz.capture import AttentionMaps
from attnviz.checkpoint import Checkpoint
from attnviz.errors import UsageError
from attnviz.inspection import InspectReport
from attnviz.split import source_keys, split_heads

DEFAULT_MAX_TOKENS = 256
MAX_LABELS = 4096  # token labels carried per map side; longer sides get index labels

FloatArray = np.ndarray[Any, Any]


@dataclass(frozen=True)
class HeadMap:
    png: bytes  # (rows, cols) grey + alpha
    maximum: float  # the attention that grey 255 stands for


@dataclass
class MapLayer:
    """One captured attention module: a map per head for the first batch item."""

    name: str
    query_len: int
    key_len: int
    block: int  # k: each stored cell is the mean of a k x k block of the full map
    heads: list[HeadMap]
    query_labels: list[str]
    key_labels: list[str]


@dataclass(frozen=True)
class RowHead:
    """One head's chosen query rows over every key: an 8-bit PNG like a map's (each row scaled
    to its own maximum), wrapped into lines of ``RowLayer.wrap`` keys, and each row's most
    attended keys."""

    png: bytes  # (queries x lines, wrap) grey + alpha, padding masked
    maxima: list[float]  # per query: the probability its grey 255 stands for
    top: list[list[tuple[int, str, float]]]  # per query: (key, token, probability)


@dataclass
class RowLayer:
    """Full-resolution query rows of one captured module (``ReportData.maps[layer]``)."""

    layer: int
    queries: list[int]
    query_labels: list[str]
    keys: int
    wrap: int
    heads: list[RowHead]


@dataclass(frozen=True)
class OverlayCell:
    title: str
    heat: HeadMap | None  # None: the plain image
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in image pixels
    box_label: str = ""


@dataclass
class VisionSection:
    title: str
    image_png: bytes  # the model's input pixels
    width: int
    height: int
    rows: list[list[OverlayCell]]
    points: list[list[tuple[float, float]]] = field(default_factory=list)  # per row


@dataclass(frozen=True)
class NormRow:
    """Frobenius norms per head of one layer's Wq, Wk, Wv (kv heads) and Wo columns."""

    layer: str
    q: list[float]
    k: list[float]
    v: list[float]
    o: list[float] | None


@dataclass
class ReportData:
    title: str
    summary: list[tuple[str, str]]
    layers: list[dict[str, str]]  # the inspect table, one dict per attention layer
    warnings: list[str]
    model: str | None = None
    notes: list[str] = field(default_factory=list)
    maps: list[MapLayer] = field(default_factory=list)
    vision: VisionSection | None = None
    norms: list[NormRow] = field(default_factory=list)
    max_tokens: int = DEFAULT_MAX_TOKENS
    inputs: list[InputPart] = field(default_factory=list)  # shown at the top of the page
    pool: str = "mean"  # how a k x k block of a long map becomes one stored cell
    rows: list[RowLayer] = field(default_factory=list)  # full-resolution query rows
    atlas: dict[str, Any] | None = None  # the `attnviz heads --json` document of the maps

    @property
    def head_count(self) -> int:
        return sum(len(layer.heads) for layer in self.maps)


def _pool(matrix: FloatArray, block: int) -> FloatArray:
    """(Lq, Lk) -> (ceil(Lq/k), ceil(Lk/k)): the mean of each k x k block (ragged at the end)."""
    if block == 1:
        return matrix
    rows = np.arange(0, matrix.shape[0], block)
    cols = np.arange(0, matrix.shape[1], block)
    sums = np.add.reduceat(np.add.reduceat(matrix, rows, axis=0), cols, axis=1)
    counts = np.outer(np.diff(np.append(rows, matrix.shape[0])),
                      np.diff(np.append(cols, matrix.shape[1])))  # (Lq/k, Lk/k)
    pooled: FloatArray = sums / counts
    return pooled


def encode_map(matrix: FloatArray, block: int = 1, maximum: float | None = None) -> HeadMap:
    """A (rows, cols) attention map as an 8-bit grey+alpha PNG (see the module docstring)."""
    values = np.asarray(matrix, dtype=np.float64)
    masked = ~np.isfinite(values) | (values == 0)
    values = _pool(np.where(masked, 0.0, values), block)
    masked = _pool(masked.astype(np.float64), block) >= 1.0  # wholly masked blocks only
    return encode_values(values, masked, maximum)


def encode_values(values: FloatArray, masked: FloatArray,
                  maximum: float | None = None) -> HeadMap:
    """Values (rows, cols) with masked cells already 0, and the mask, as the PNG above."""
    from PIL import Image

    top = float(values.max(initial=0.0)) if maximum is None else maximum
    scale = 255.0 / top if top > 0 else 0.0
    grey = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
    if masked.any():  # grey + alpha, (rows, cols, 2); plain grey compresses a fifth better
        image = Image.fromarray(np.stack([grey, np.where(masked, 0, 255).astype(np.uint8)],
                                         axis=-1))
    else:
        image = Image.fromarray(grey)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)  # level 9 is 4-6x slower for 3% less
    return HeadMap(buffer.getvalue(), top)


def block_size(length: int, max_tokens: int) -> int:
    return max(1, math.ceil(length / max_tokens))


PairLabels = Callable[[str, int, int], tuple[list[str], list[str]]]


def map_layers(maps: AttentionMaps, labels: PairLabels, *, max_tokens: int,
               pool: str = "mean") -> list[MapLayer]:
    """Every captured module's maps of batch item 0, pooled in k x k blocks (``pool``: mean
    or max) beyond ``max_tokens``; ``labels(name, rows, cols)`` names the tokens of a layer's
    query rows and key columns (``attnviz.report_long`` does the work, streamed or not)."""
    from attnviz.reducers import reduce_maps
    from attnviz.report_long import ReportMaps

    reducer = ReportMaps(max_tokens, pool)
    reduce_maps(maps.maps, reducer)
    return reducer.map_layers(labels)


def vision_section(figure: Any) -> VisionSection:
    """The overlay figure of ``image_heatmap`` (rows of panels with their raw heats)."""
    from PIL import Image

    if figure.image is None or figure.heats is None:
        raise UsageError("this vision figure carries no image to overlay")
    height, width = figure.image.shape[:2]
    buffer = io.BytesIO()
    Image.fromarray(figure.image).save(buffer, format="PNG", optimize=True)
    rows = []
    for r, heats in enumerate(figure.heats):
        cells = []
        for c, heat in enumerate(heats):
            entry = figure.boxes[r][c] if figure.boxes is not None else None
            box, label = (entry if entry is not None else (None, ""))
            encoded = None if heat is None else encode_map(heat, maximum=figure.vmax)
            cells.append(OverlayCell(figure.titles[r][c], encoded, box, label))
        rows.append(cells)
    return VisionSection(figure.title, buffer.getvalue(), width, height, rows,
                         [[(float(x), float(y)) for x, y in row] for row in figure.points])


def head_norms(ckpt: Checkpoint, report: InspectReport) -> tuple[list[NormRow], list[str]]:
    """Per-head weight norms for every layer whose heads are known (reads those tensors)."""
    rows, skipped = [], []
    for item in report.layers:
        if item.heads.num_heads is None:
            skipped.append(item.layer.display_name)
            continue
        values = {k: ckpt.read_tensor(k).to(torch.float64) for k in source_keys(item.layer)}
        hw = split_heads(item.layer, item.heads, values)

        def norms(array: Any, dims: tuple[int, ...]) -> list[float]:
            return [round(float(x), 4) for x in torch.linalg.vector_norm(array, dim=dims)]

        rows.append(NormRow(item.layer.display_name, norms(hw.q, (1, 2)), norms(hw.k, (1, 2)),
                            norms(hw.v, (1, 2)),
                            None if hw.o is None else norms(hw.o, (1, 2))))  # (H,)
    notes = [f"weight norms skipped for {len(skipped)} layer(s) with unknown heads "
             f"({', '.join(skipped[:3])}); pass --heads"] if skipped else []
    return rows, notes


def layer_rows(report: InspectReport) -> list[dict[str, str]]:
    def text(value: Any) -> str:
        return "?" if value is None else str(value)

    return [{"layer": item.layer.display_name, "layout": item.layer.layout,
             "E": text(item.layer.embed_dim), "heads": text(item.heads.num_heads),
             "kv heads": text(item.heads.num_kv_heads), "head dim": text(item.heads.head_dim),
             "source": item.heads.source} for item in report.layers]


def summary_rows(ckpt: Checkpoint, report: InspectReport) -> list[tuple[str, str]]:
    from attnviz.formatting import count, size

    dtypes = ", ".join(f"{name} ({n})" for name, n in report.dtypes.items())
    return [("file", str(ckpt.path)), ("format", ckpt.format),
            ("tensors", f"{len(ckpt.tensors)} tensors, {count(ckpt.num_parameters)} "
                        f"parameters, {size(ckpt.total_bytes)}"),
            ("dtypes", dtypes or "-"), ("container", ckpt.container_key or "-"),
            ("prefix stripped", ckpt.stripped_prefix or "-"),
            ("foreign objects", ", ".join(sorted({f.qualified_name for f in
                                                  ckpt.foreign_objects})) or "-"),
            ("attention layers", str(len(report.layers)))]


def vision_labels(metadata: dict[str, str] | None, prepared: Any = None) -> PairLabels:
    """Token names for vision maps: prefix tokens then patch cells (row, col); DETR queries.
    With an HF ``PreparedCall`` (CLIP), layers over text take its token labels."""
    meta = metadata or {}
    grid = json.loads(meta.get("grid") or meta.get("feature_size") or "[0, 0]")
    prefix = int(meta.get("prefix_tokens", "0"))
    cells = [f"({r},{c})" for r in range(grid[0]) for c in range(grid[1])]
    names = (["[CLS]"] + [f"[REG{i}]" for i in range(prefix - 1)] if prefix else []) + cells

    def labels(length: int) -> list[str]:
        if length == len(names):
            return names
        if "feature_size" in meta:
            return [f"query {i}" for i in range(length)]
        return [str(i) for i in range(length)]

    def pair(name: str, rows: int, cols: int) -> tuple[list[str], list[str]]:
        if prepared is not None and prepared.layer_sides is not None and "image" not in \
                prepared.layer_sides(name.split("#")[0]):
            result: tuple[list[str], list[str]] = prepared.labels_for(name, rows, cols)
            return result
        return labels(rows), labels(cols)

    return pair

