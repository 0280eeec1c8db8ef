"""Full attention maps streamed to a safetensors file, layer by layer, never held in memory.

The layers and their shapes are known only as the forward pass reaches them, but safetensors
puts its header (names, shapes, offsets) first. So the header gets a reserved, space-padded
region (the format allows trailing spaces in the header), tensor bytes are written after it as
tiles arrive, and the header is filled in at the end. If the header outgrows its reservation the
bytes are moved once, with the kernel's copy, to make room. Every tensor is float32
(B, H, Lq, Lk) in C order, as ``safetensors.torch.save_file`` would write it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnviz.reducers import MapReducer, Shape4
from attnviz.tiling import Tile

HEADER_RESERVE = 64 * 1024
FLOAT32_BYTES = 4


@dataclass
class _Entry:
    shape: Shape4
    start: int  # offset in the data section


@dataclass
class MapsToDisk(MapReducer):
    """Writes each layer's maps to ``path`` (opened here, finished by ``finish``)."""

    path: Path
    entries: dict[str, _Entry] = field(default_factory=dict)
    _size: int = 0
    _pending: torch.Tensor | None = None  # one row block waiting for its last key tile
    _fd: int = -1

    def __post_init__(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)

    def begin(self, key: str, shape: Shape4) -> None:
        self.entries[key] = _Entry(shape, self._size)
        batch, heads, length, source = shape
        self._size += batch * heads * length * source * FLOAT32_BYTES

    def add(self, key: str, tile: Tile) -> None:
        entry = self.entries[key]
        batch, heads, length, source = entry.shape
        rows = tile.rows
        if tile.k0 == 0 and tile.k1 == source:
            block = tile.probs
        else:  # gather a row block's key tiles, then write whole rows
            if tile.k0 == 0:
                self._pending = torch.empty(batch, heads, rows.numel(), source)
            assert self._pending is not None
            self._pending[..., tile.k0:tile.k1] = tile.probs
            if tile.k1 < source:
                return
            block = self._pending
        first = int(rows[0])
        if rows.numel() > 1 and not torch.equal(rows, torch.arange(first, first + rows.numel())):
            raise ValueError("streamed maps need consecutive query rows")
        data = block.to(torch.float32).contiguous().numpy()  # (B, H, tq, S)
        for b in range(batch):
            for h in range(heads):
                cell = ((b * heads + h) * length + first) * source  # (B, H, L, S) C order
                offset = 8 + HEADER_RESERVE + entry.start + cell * FLOAT32_BYTES
                os.pwrite(self._fd, np.ascontiguousarray(data[b, h]).tobytes(), offset)
        self._pending = None

    def finish(self, metadata: dict[str, str]) -> None:
        """Write the header; the file is then a complete safetensors file."""
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        for key, entry in self.entries.items():
            size = int(np.prod(entry.shape)) * FLOAT32_BYTES
            header[key or "(root)"] = {"dtype": "F32", "shape": list(entry.shape),
                                       "data_offsets": [entry.start, entry.start + size]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(raw) <= HEADER_RESERVE:
            raw += b" " * (HEADER_RESERVE - len(raw))
            os.pwrite(self._fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(self._fd, 8 + HEADER_RESERVE + self._size)
            os.close(self._fd)
            self._fd = -1
            return
        raw += b" " * (-len(raw) % 8)
        moved = self.path.with_name(self.path.name + ".body")
        with open(moved, "wb") as body, os.fdopen(self._fd, "rb", closefd=True) as source:
            self._fd = -1
            source.seek(8 + HEADER_RESERVE)
            shutil.copyfileobj(source, body, 1 << 20)
        with open(self.path, "wb") as out, open(moved, "rb") as body:
            out.write(len(raw).to_bytes(8, "little") + raw)
            shutil.copyfileobj(body, out, 1 << 20)
        moved.unlink()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
