"""``--window``: a query/key range of every layer's maps, captured at full resolution.

Grammar (inclusive token positions, counted from 0): ``A-B`` zooms queries A..B over keys A..B
(a square block of the diagonal), ``qA-B`` queries A..B over every key, ``kA-B`` every query over
keys A..B, ``qA-B,kC-D`` both ranges. A single position ``A`` is the range ``A-A``.

``WindowMaps`` is the reducer that keeps only that block of each layer as the capture streams it:
only the window's query rows are computed, and each tile is cut to the window's keys, so memory is
O(layers x heads x window^2), never a full map. A window wider than ``cells`` (the panel's share
of the figure) is block-pooled to it as it arrives; otherwise it is kept cell for cell.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attnviz.errors import UsageError
from attnviz.pooling import BlockPool, PoolInfo
from attnviz.reducers import MapReducer, Shape4
from attnviz.tiling import Tile

_RANGE = r"(\d+)(?:\s*-\s*(\d+))?"
_TERM = re.compile(rf"([qk]?)\s*{_RANGE}")
GRAMMAR = "A-B, qA-B, kA-B or qA-B,kC-D (inclusive positions from 0, e.g. 100-163)"
Span = tuple[int, int]  # inclusive first and last position


@dataclass(frozen=True)
class Window:
    """Query and key ranges (inclusive); None: the whole axis."""

    queries: Span | None
    keys: Span | None

    def describe(self) -> str:
        def text(span: Span | None) -> str:
            return "all" if span is None else f"{span[0]}-{span[1]}"

        if self.queries == self.keys:
            return f"window {text(self.queries)}"
        return f"window queries {text(self.queries)} × keys {text(self.keys)}"

    def resolve(self, length: int, source: int) -> tuple[int, int, int, int] | str:
        """(q0, q1, k0, k1) as half-open bounds in a (length, source) map, or why it does not
        fit (a sentence)."""
        q0, q1 = (0, length - 1) if self.queries is None else self.queries
        k0, k1 = (0, source - 1) if self.keys is None else self.keys
        if q1 >= length:
            return f"queries {q0}-{q1} are outside 0..{length - 1}"
        if k1 >= source:
            return f"keys {k0}-{k1} are outside 0..{source - 1}"
        return q0, q1 + 1, k0, k1 + 1


def parse_window(text: str) -> Window:
    """``--window`` text -> ``Window``; a one-line ``UsageError`` (``window``) if malformed."""
    terms = [t.strip().lower() for t in text.split(",")]
    if not any(terms):
        raise UsageError(f"an empty window: use {GRAMMAR}", param="window")
    spans: dict[str, Span] = {}
    for term in terms:
        match = _TERM.fullmatch(term)
        if match is None:
            raise UsageError(f"'{term}' is not a window: use {GRAMMAR}", param="window")
        axis, first, last = match.group(1), int(match.group(2)), match.group(3)
        stop = first if last is None else int(last)
        if stop < first:
            raise UsageError(f"range '{term}' is reversed: write '{axis}{stop}-{first}'",
                             param="window")
        for name in ("q", "k") if not axis else (axis,):
            if name in spans:
                raise UsageError(f"'{text.strip()}' gives the "
                                 f"{'queries' if name == 'q' else 'keys'} twice",
                                 param="window", hint="name each axis once, e.g. "
                                 "q100-163,k0-599")
            spans[name] = (first, stop)
    return Window(spans.get("q"), spans.get("k"))


@dataclass
class WindowMaps(MapReducer):
    """Each layer's ``window`` block (B, H, wq, wk), pooled (``mode``) only beyond ``cells``.

    Layers the window does not fit get a NaN block of the window's size and a reason in
    ``outside``, so that layer indices stay those of the capture; drawing one is refused."""

    window: Window
    cells: int = 1024
    mode: str = "max"
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, PoolInfo] = field(default_factory=dict)
    spans: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # unpooled
    outside: dict[str, str] = field(default_factory=dict)
    _pool: BlockPool | None = None
    _span: tuple[int, int, int, int] | None = None

    def rows_wanted(self, length: int) -> list[int]:
        if self.window.queries is None:
            return list(range(length))
        first, last = self.window.queries
        return list(range(first, last + 1)) if last < length else []

    def begin(self, key: str, shape: Shape4) -> None:
        batch, heads, length, source = shape
        span = self.window.resolve(length, source)
        if isinstance(span, str):
            self.outside[key] = span
            rows, cols = (size if s is None else s[1] - s[0] + 1 for s, size in
                          ((self.window.queries, length), (self.window.keys, source)))
            self.shapes[key] = (batch, heads, rows, cols)
            self.maps[key] = torch.full((batch, heads, min(rows, self.cells),
                                         min(cols, self.cells)), float("nan"))
            self._pool = self._span = None
            return
        q0, q1, k0, k1 = span
        self._span = span
        self.spans[key] = span
        self.shapes[key] = (batch, heads, q1 - q0, k1 - k0)
        self._pool = BlockPool((batch, heads), q1 - q0, k1 - k0, self.cells, self.cells,
                               self.mode)

    def add(self, key: str, tile: Tile) -> None:
        if self._pool is None or self._span is None:
            return
        q0, q1, k0, k1 = self._span
        inside = (tile.rows >= q0) & (tile.rows < q1)
        first, last = max(k0, tile.k0), min(k1, tile.k1)
        if not bool(inside.any()) or first >= last:
            return
        block = tile.probs[:, :, inside, first - tile.k0:last - tile.k0]  # (B, H, tq', tk')
        self._pool.add(tile.rows[inside] - q0, first - k0, last - k0, block)

    def end(self, key: str) -> None:
        if self._pool is None:
            return
        self.maps[key] = self._pool.result()  # (B, H, min(wq, cells), min(wk, cells))
        self.info[key] = self._pool.info
        self._pool = self._span = None

    def check(self, layers: Sequence[str]) -> None:
        """Refuse drawing a layer the window does not fit."""
        for name in layers:
            if name in self.outside:
                raise UsageError(f"{self.outside[name]} of layer '{name or '(root)'}'",
                                 param="window", hint="choose a range inside the layer, or "
                                 "other layers")

    def labels(self, key: str, query: list[str], keys: list[str]) -> tuple[list[str], list[str]]:
        """The window's share of a layer's full-length token labels."""
        span = self.spans.get(key)
        if span is None:
            return query, keys
        q0, q1, k0, k1 = span
        return query[q0:q1], keys[k0:k1]
