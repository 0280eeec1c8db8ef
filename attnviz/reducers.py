"""What a streamed capture keeps of each layer's probabilities, decided before the forward pass.

``capture_attention(model, reduce=...)`` hands every layer's probabilities to a reducer as tiles
(``attnviz.tiling.Tile``, (B, H, tq, tk) blocks) the moment they exist and then drops them, so a
capture holds one layer's work at a time, not every layer's (B, H, L, S) maps. A reducer sees
``begin(key, shape)``, the layer's tiles in row-block order (key tiles in order within a block),
then ``end(key)``. Keys are the capture's layer keys (``name``, ``name#2`` for a second call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from attnviz.errors import UsageError
from attnviz.pooling import BlockPool, PoolInfo
from attnviz.tiling import Tile

Shape4 = tuple[int, int, int, int]


class MapReducer:
    """The interface; the base class keeps nothing."""

    def rows_wanted(self, length: int) -> list[int] | None:
        """Query rows this reducer needs of a layer with ``length`` rows (None: every row)."""
        return None

    def begin(self, key: str, shape: Shape4) -> None:
        """A layer's maps (B, H, L, S) are about to arrive."""

    def add(self, key: str, tile: Tile) -> None:
        """One tile of the current layer."""

    def end(self, key: str) -> None:
        """The layer is complete."""


@dataclass
class PooledMaps(MapReducer):
    """Each layer block-pooled to at most ``rows`` x ``cols`` cells (see ``attnviz.pooling``)."""

    rows: int
    cols: int
    mode: str = "max"
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, PoolInfo] = field(default_factory=dict)
    _pool: BlockPool | None = None

    def begin(self, key: str, shape: Shape4) -> None:
        batch, heads, length, source = shape
        self._pool = BlockPool((batch, heads), length, source, self.rows, self.cols, self.mode)

    def add(self, key: str, tile: Tile) -> None:
        assert self._pool is not None
        self._pool.add(tile.rows, tile.k0, tile.k1, tile.probs)

    def end(self, key: str) -> None:
        assert self._pool is not None
        self.maps[key] = self._pool.result()  # (B, H, rows, cols)
        self.info[key] = self._pool.info
        self._pool = None


RowChoice = Sequence[int] | Callable[[int], Sequence[int]]


@dataclass
class QueryRows(MapReducer):
    """Chosen query rows over every key, at full resolution: (B, H, len(rows), S) per layer.

    ``rows``: indices (negative from the end) or a function of the layer's row count, so that
    'the last token' means each layer's own last row (decoder and cross-attention differ)."""

    rows: RowChoice
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    chosen: dict[str, list[int]] = field(default_factory=dict)
    _buffer: torch.Tensor | None = None
    _index: dict[int, int] = field(default_factory=dict)

    def rows_wanted(self, length: int) -> list[int]:
        picked = self.rows(length) if callable(self.rows) else self.rows
        resolved = [r + length if r < 0 else r for r in picked]
        bad = [r for r in resolved if not 0 <= r < length]
        if bad:
            raise UsageError(f"query row {bad[0]} is outside 0..{length - 1}", param="query")
        return list(dict.fromkeys(resolved))

    def begin(self, key: str, shape: Shape4) -> None:
        batch, heads, length, source = shape
        wanted = self.rows_wanted(length)
        self.chosen[key] = wanted
        self._index = {row: i for i, row in enumerate(wanted)}
        self._buffer = torch.full((batch, heads, len(wanted), source), float("nan"))

    def add(self, key: str, tile: Tile) -> None:
        assert self._buffer is not None
        for position, row in enumerate(tile.rows.tolist()):
            if row in self._index:
                self._buffer[:, :, self._index[row], tile.k0:tile.k1] = \
                    tile.probs[:, :, position].float()

    def end(self, key: str) -> None:
        assert self._buffer is not None
        self.maps[key] = self._buffer
        self._buffer = None


@dataclass
class FullMaps(MapReducer):
    """Every cell (B, H, L, S) per layer: what a plain capture keeps (short inputs)."""

    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    _buffer: torch.Tensor | None = None

    def begin(self, key: str, shape: Shape4) -> None:
        self._buffer = torch.empty(shape)

    def add(self, key: str, tile: Tile) -> None:
        assert self._buffer is not None
        self._buffer[:, :, tile.rows, tile.k0:tile.k1] = tile.probs.float()

    def end(self, key: str) -> None:
        assert self._buffer is not None
        self.maps[key] = self._buffer
        self._buffer = None


@dataclass
class Reducers(MapReducer):
    """Several reducers fed from one pass; rows are computed if any of them wants them."""

    parts: Sequence[MapReducer]

    def rows_wanted(self, length: int) -> list[int] | None:
        union: dict[int, None] = {}
        for part in self.parts:
            wanted = part.rows_wanted(length)
            if wanted is None:
                return None
            union.update(dict.fromkeys(wanted))
        return list(union)

    def begin(self, key: str, shape: Shape4) -> None:
        for part in self.parts:
            part.begin(key, shape)

    def add(self, key: str, tile: Tile) -> None:
        for part in self.parts:
            part.add(key, tile)

    def end(self, key: str) -> None:
        for part in self.parts:
            part.end(key)


def feed_whole(reducer: MapReducer, key: str, tensor: torch.Tensor,
               step: int | None = None) -> None:
    """Feed one layer's maps that exist whole (B, H, L, S) to ``reducer``, in row slabs."""
    batch, heads, length, source = tensor.shape
    wanted = reducer.rows_wanted(length)
    rows = torch.arange(length) if wanted is None else torch.as_tensor(wanted, dtype=torch.long)
    step = step or max(1, (16 * 1024 * 1024) // max(1, batch * heads * source))
    reducer.begin(key, (batch, heads, length, source))
    for start in range(0, rows.numel(), step):
        block = rows[start:start + step]
        reducer.add(key, Tile(block, 0, source, tensor.index_select(2, block)))
    reducer.end(key)


def reduce_maps(maps: dict[str, torch.Tensor], reducer: MapReducer) -> None:
    """Feed maps that were captured whole to ``reducer``, layer by layer."""
    for key, tensor in maps.items():
        feed_whole(reducer, key, tensor)
