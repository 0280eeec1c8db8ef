"""The report's maps at any length: thumbnails pooled as the capture streams, plus chosen query
rows at full resolution.

``ReportMaps`` is the reducer ``attnviz report`` captures with: each layer's probabilities
arrive in tiles and are folded straight into k x k token blocks (k = ceil(length / max_tokens),
1 for short inputs: exact maps), the mean of each block by default or its max; at the end of a
layer its heads are encoded as the page's 8-bit PNGs and the floats are dropped. So a report
holds one layer's pooled work and the PNGs, never a full map (``capture_attention(reduce=...)``
computes SDPA and ``nn.MultiheadAttention`` probabilities in tiles). ``QueryRows`` keeps the
chosen query rows over every key; ``row_layers`` turns them into the strips the page shows when
a head is opened, with each row's most attended keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnviz.capture import AttentionMaps
from attnviz.checkpoint import Checkpoint
from attnviz.errors import UsageError, param
from attnviz.inspection import InspectReport
from attnviz.pooling import POOL_MODES
from attnviz.query_rows import query_rows
from attnviz.reducers import MapReducer, QueryRows, Reducers, Shape4
from attnviz.report_data import (
    MAX_LABELS,
    HeadMap,
    MapLayer,
    PairLabels,
    ReportData,
    RowHead,
    RowLayer,
    block_size,
    encode_values,
)
from attnviz.sequence_inputs import SequenceRequest
from attnviz.tiling import Tile

ROW_WRAP = 4096  # keys per line of a stored row (browsers cap a canvas side near 32k pixels)
TOP_KEYS = 8  # most attended keys listed per stored row
SLAB_VALUES = 1 << 21  # probabilities folded at once (float64 copies of 16 MiB)


@dataclass
class _Layer:
    shape: Shape4
    block: int
    value: torch.Tensor  # (H, rows, cols) float64: block sums (mean) or maxima (max)
    masked: torch.Tensor  # (H, rows, cols) float64: masked cells per block


@dataclass
class PooledLayer:
    query_len: int
    key_len: int
    block: int
    heads: list[HeadMap]


@dataclass
class ReportMaps(MapReducer):
    """Batch item ``batch_index`` of every layer, k x k block-pooled and encoded per head."""

    max_tokens: int
    mode: str = "mean"
    batch_index: int = 0
    layers: dict[str, PooledLayer] = field(default_factory=dict)
    _current: _Layer | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 8:
            raise UsageError(f"{param('max_tokens')} {self.max_tokens}: use 8 or more",
                             param="max_tokens")
        check_pool(self.mode)

    def begin(self, key: str, shape: Shape4) -> None:
        _, heads, length, source = shape
        block = block_size(max(length, source), self.max_tokens)
        cells = (heads, -(-length // block), -(-source // block))
        self._current = _Layer(shape, block, torch.zeros(cells, dtype=torch.float64),
                               torch.zeros(cells, dtype=torch.float64))

    def add(self, key: str, tile: Tile) -> None:
        layer = self._current
        assert layer is not None
        probs = tile.probs[self.batch_index].detach()  # (H, tq, tk)
        # a few query rows at a time: the float64 copies stay small whatever the tile size
        step = max(1, SLAB_VALUES // max(1, probs.shape[0] * probs.shape[2]))
        cols = torch.arange(tile.k0, tile.k1) // layer.block  # (tk,) block of each key
        for start in range(0, probs.shape[1], step):
            self._fold(layer, probs[:, start:start + step].to("cpu", torch.float64),
                       tile.rows[start:start + step].cpu() // layer.block, cols)

    def _fold(self, layer: _Layer, probs: torch.Tensor, rows: torch.Tensor,
              cols: torch.Tensor) -> None:
        """Fold probabilities (H, tq, tk) of query blocks ``rows`` x key blocks ``cols``."""
        masked = torch.isnan(probs) | (probs == 0)
        clean = probs.masked_fill(masked, 0.0)
        width = (*clean.shape[:2], layer.value.shape[2])  # (H, tq, cols)
        if self.mode == "mean":
            by_col = torch.zeros(width, dtype=torch.float64).index_add_(2, cols, clean)
            layer.value.index_add_(1, rows, by_col)
        else:  # probabilities are >= 0: a zero start is the identity of max
            by_col = torch.zeros(width, dtype=torch.float64).scatter_reduce_(
                2, cols.expand(clean.shape), clean, "amax")  # (H, tq, cols)
            layer.value.scatter_reduce_(1, rows[None, :, None].expand(width), by_col, "amax")
        gone = torch.zeros(width, dtype=torch.float64).index_add_(2, cols, masked.double())
        layer.masked.index_add_(1, rows, gone)

    def end(self, key: str) -> None:
        layer = self._current
        assert layer is not None
        _, heads, length, source = layer.shape
        counts = torch.outer(_block_sizes(length, layer.block),
                             _block_sizes(source, layer.block))  # (rows, cols) cells per block
        values = layer.value / counts if self.mode == "mean" else layer.value
        fully = layer.masked >= counts  # wholly masked blocks only
        self.layers[key] = PooledLayer(length, source, layer.block, [
            encode_values(values[h].numpy(), fully[h].numpy()) for h in range(heads)])
        self._current = None

    def map_layers(self, labels: PairLabels) -> list[MapLayer]:
        """The page's layers, named by ``labels(name, rows, cols)``."""
        out = []
        for name, layer in self.layers.items():
            rows, cols = labels(name, layer.query_len, layer.key_len)
            out.append(MapLayer(name or "(root)", layer.query_len, layer.key_len, layer.block,
                                layer.heads, _side(rows, layer.query_len),
                                _side(cols, layer.key_len)))
        return out


def _block_sizes(length: int, block: int) -> torch.Tensor:
    sizes = torch.full((-(-length // block),), float(block), dtype=torch.float64)
    sizes[-1] = length - block * (sizes.numel() - 1)  # the ragged last block
    return sizes


def _side(names: list[str], length: int) -> list[str]:
    return names if length <= MAX_LABELS else [str(i) for i in range(length)]


def row_choice(query: str | None, max_tokens: int) -> Callable[[int], list[int]]:
    """The rows ``query`` names, or by default the last row of every layer longer than
    ``max_tokens`` (the one whose map is pooled; for a causal LM, the next-token position)."""
    if query is not None:
        return query_rows(query)
    return lambda length: [length - 1] if length > max_tokens else []


def top_keys(row: torch.Tensor, labels: Sequence[str], k: int) -> list[tuple[int, str, float]]:
    """The ``k`` most attended keys of a full row (S,) as (position, token, probability)."""
    clean = torch.nan_to_num(row.double(), nan=-1.0)
    probs, where = torch.topk(clean, min(k, clean.numel()))
    return [(int(i), labels[int(i)] if int(i) < len(labels) else str(int(i)),
             round(float(p), 6)) for p, i in zip(probs, where, strict=True) if p > 0]


def encode_rows(rows: torch.Tensor) -> tuple[bytes, list[float], int]:
    """Rows (n, S) wrapped into lines of ``ROW_WRAP`` keys, each row scaled to its own
    maximum (a far row's small probabilities keep their 8 bits): (PNG, maxima, keys a line)."""
    count, keys = rows.shape
    wrap = min(keys, ROW_WRAP)
    lines = -(-keys // wrap)
    values = rows.double()
    masked = torch.isnan(values) | (values == 0)
    values = values.masked_fill(masked, 0.0)
    maxima = values.amax(dim=1)  # (n,)
    scaled = values / torch.where(maxima > 0, maxima, 1.0)[:, None]  # (n, S) in [0, 1]
    padded = torch.zeros((count, lines * wrap), dtype=torch.float64)
    padded[:, :keys] = scaled
    hidden = torch.ones((count, lines * wrap), dtype=torch.bool)  # the last line's padding
    hidden[:, :keys] = masked
    stored = encode_values(padded.reshape(count * lines, wrap).numpy(),  # (n * lines, wrap)
                           hidden.reshape(count * lines, wrap).numpy(), maximum=1.0)
    return stored.png, [float(m) for m in maxima], wrap


def row_layers(reducer: QueryRows, names: Sequence[str], shapes: dict[str, tuple[int, ...]],
               labels: PairLabels, batch_index: int = 0) -> list[RowLayer]:
    """The stored rows of each layer that has some (``names``: the page's layer order)."""
    out = []
    for index, name in enumerate(names):
        chosen = reducer.chosen.get(name) or []
        if not chosen:
            continue
        stack = reducer.maps[name][batch_index]  # (H, n, S)
        query_names, key_names = labels(name, *shapes[name][2:])
        heads = []
        for head in stack:
            png, maxima, wrap = encode_rows(head)
            heads.append(RowHead(png, maxima, [top_keys(r, key_names, TOP_KEYS)
                                               for r in head]))
        out.append(RowLayer(index, list(chosen), [query_names[q] if q < len(query_names)
                                                  else str(q) for q in chosen],
                            int(stack.shape[-1]), wrap, heads))
    return out


def rows_note(data: ReportData, query: str | None) -> str | None:
    """What the page says about its full-resolution rows."""
    if not data.rows:
        return None
    count = len({q for layer in data.rows for q in layer.queries})
    where = "open a head to see them as strips over every key, with their top keys"
    if query is not None:
        return f"full-resolution rows of {count} chosen quer{'y' if count == 1 else 'ies'} " \
               f"({query}): {where}"
    return (f"maps longer than {data.max_tokens} tokens are pooled; their last query is kept "
            f"at full resolution (the default; --query picks others): {where}")


def fill_report(data: ReportData, pooled: ReportMaps, rows: QueryRows, maps: AttentionMaps,
                labels: PairLabels, query: str | None) -> None:
    """``data``'s maps, rows and notes from the reducers a capture fed."""
    data.pool = pooled.mode
    data.maps = pooled.map_layers(labels)
    data.rows = row_layers(rows, list(pooled.layers), maps.shapes, labels)
    note = rows_note(data, query)
    if note:
        data.notes.append(note)
    if maps.missed:
        data.notes.append(f"no map from {len(maps.missed)} attention module(s): "
                          f"{', '.join(maps.missed[:4])}")


def full_maps_report(data: ReportData, maps: AttentionMaps, labels: PairLabels, *,
                     pool: str, query: str | None) -> None:
    """``fill_report`` for maps captured whole (a model given in memory)."""
    from attnviz.reducers import reduce_maps

    pooled = ReportMaps(data.max_tokens, pool)
    rows = QueryRows(row_choice(query, data.max_tokens))
    reduce_maps(maps.maps, Reducers([pooled, rows]))
    fill_report(data, pooled, rows, maps, labels, query)


def streamed_sequence(path: Path, ckpt: Checkpoint, report: InspectReport,
                      request: SequenceRequest, data: ReportData, *, pool: str,
                      query: str | None, factory: str | None, strict: bool, norm_first: bool,
                      activation: str, attn_implementation: str,
                      probes: Sequence[str] = ()) -> AttentionMaps:
    """Run the sequence under a streamed capture and fill ``data`` (model, inputs, maps, rows,
    head atlas, with ``probes`` run as a second pass, notes); the returned maps hold only
    routes and shapes."""
    from attnviz.captions import sequence_parts
    from attnviz.heatmap import capture_sequence
    from attnviz.report_atlas import statistics_reducer, streamed_atlas

    pooled = ReportMaps(data.max_tokens, pool)
    rows = QueryRows(row_choice(query, data.max_tokens))
    stats = statistics_reducer()  # the head atlas: per-head statistics, streamed too
    maps, prepared, loaded = capture_sequence(
        path, ckpt, report, request, factory=factory, strict=strict, norm_first=norm_first,
        activation=activation, attn_implementation=attn_implementation,
        reduce=Reducers([pooled, rows, stats]))
    data.model, data.notes = loaded.description, [*data.notes, *loaded.notes, *prepared.notes]
    data.inputs = sequence_parts(request, prepared)
    fill_report(data, pooled, rows, maps, prepared.labels_for, query)
    data.atlas, notes = streamed_atlas(stats.layers, report, prepared, loaded, checkpoint=path,
                                       request=request, probes=probes)
    data.notes += notes
    return maps


def check_pool(pool: str) -> None:
    """Refuse a pooling mode for long maps other than mean or max."""
    if pool not in POOL_MODES:
        raise UsageError(f"'{pool}': use {' or '.join(POOL_MODES)}", param="pool")
