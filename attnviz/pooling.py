"""Block pooling of attention maps down to the pixels that will show them.

A map of L x S cells drawn in h x w pixels is reduced by splitting rows and columns into h and w
nearly equal blocks (row i goes to block floor(i * h / L)) and taking each block's max (default:
a head that puts all its mass on one needle token still lights its pixel) or mean. When a map
already fits, the blocks are single cells and pooling is the identity. NaN cells (padding,
rows that may attend to nothing) are ignored; a block of only NaN stays NaN.

``BlockPool`` accumulates from tiles as they are produced, so the full map never exists;
``pool_map`` pools a map that is already in memory with the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POOL_MODES = ("max", "mean")


def block_index(length: int, blocks: int, device: torch.device | None = None) -> torch.Tensor:
    """The block (0..blocks-1) each of ``length`` positions falls in."""
    return torch.arange(length, device=device) * blocks // length


@dataclass(frozen=True)
class PoolInfo:
    """How a map was reduced: source cells per pixel along each axis (1.0 = exact)."""

    source: tuple[int, int]
    pooled: tuple[int, int]
    mode: str

    @property
    def factor(self) -> tuple[float, float]:
        return self.source[0] / self.pooled[0], self.source[1] / self.pooled[1]

    @property
    def exact(self) -> bool:
        return self.source == self.pooled


class BlockPool:
    """Accumulates probability tiles (..., tq, tk) into (..., rows, cols) pooled blocks."""

    def __init__(self, lead: tuple[int, ...], length: int, source: int, rows: int, cols: int,
                 mode: str = "max", device: torch.device | None = None) -> None:
        if mode not in POOL_MODES:
            raise ValueError(f"pool mode {mode!r}: use one of {', '.join(POOL_MODES)}")
        self.rows, self.cols = max(1, min(rows, length)), max(1, min(cols, source))
        self.info = PoolInfo((length, source), (self.rows, self.cols), mode)
        self.mode = mode
        self.row_index = block_index(length, self.rows, device)
        self.col_index = block_index(source, self.cols, device)
        fill = float("-inf") if mode == "max" else 0.0
        self.value = torch.full((*lead, self.rows, self.cols), fill, dtype=torch.float64,
                                device=device)  # (..., rows, cols)
        self.count = torch.zeros((*lead, self.rows, self.cols), dtype=torch.float64,
                                 device=device)

    def add(self, rows: torch.Tensor, k0: int, k1: int, block: torch.Tensor) -> None:
        """Fold ``block`` (..., len(rows), k1 - k0), the cells of query ``rows`` x keys k0:k1."""
        if not block.dtype.is_floating_point:
            block = block.to(torch.float32)
        reduce = "amax" if self.mode == "max" else "sum"
        fill = float("-inf") if self.mode == "max" else 0.0
        row_ids = self.row_index[rows.to(self.row_index.device)]
        cols = self.col_index[k0:k1].to(block.device)
        # NaN cells (rows that may attend to nothing) are rare: only then is each cell's
        # presence counted; otherwise every block's count is rows x columns it covers
        # one reduction finds them: a NaN anywhere makes the sum NaN (so would +inf and -inf
        # together, which only sends such a block down the exact path below)
        has_nan = bool(block.sum().isnan())
        missing = torch.isnan(block) if has_nan else None
        if missing is not None:
            block = block.masked_fill(missing, fill)
        width = (*block.shape[:-1], self.cols)
        # the column reduction runs in the tile's own dtype (max is exact in any dtype; a sum
        # here covers one row's few hundred cells at most), the row reduction in float64
        by_col = torch.full(width, fill, dtype=block.dtype, device=block.device).scatter_reduce(
            -1, cols.expand(*block.shape), block, reduce=reduce, include_self=True
        ).to(torch.float64)  # (..., tq, cols)
        lead = block.shape[:-2]
        index = row_ids[:, None].expand(*lead, row_ids.numel(), self.cols)  # (..., tq, cols)
        self.value.scatter_reduce_(-2, index, by_col.to(self.value.device), reduce=reduce,
                                   include_self=True)
        if missing is not None:
            present = (~missing).to(torch.float64)
            seen_col = torch.zeros(width, dtype=torch.float64, device=block.device).scatter_add(
                -1, cols.expand(*block.shape), present)  # (..., tq, cols)
            self.count.scatter_add_(-2, index, seen_col.to(self.count.device))
        else:
            per_row = torch.bincount(row_ids, minlength=self.rows).to(torch.float64)  # (rows,)
            per_col = torch.bincount(cols, minlength=self.cols).to(torch.float64)  # (cols,)
            self.count += (per_row[:, None] * per_col[None, :]).to(self.count.device)

    def result(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(..., rows, cols): NaN where a block held no value."""
        out = self.value if self.mode == "max" else self.value / self.count.clamp(min=1)
        return out.masked_fill(self.count == 0, float("nan")).to(dtype)


def pool_map(matrix: torch.Tensor, rows: int, cols: int,
             mode: str = "max") -> tuple[torch.Tensor, PoolInfo]:
    """Pool (..., L, S) to at most (..., rows, cols); identity where the map already fits."""
    length, source = matrix.shape[-2], matrix.shape[-1]
    pool = BlockPool(tuple(matrix.shape[:-2]), length, source, rows, cols, mode,
                     device=matrix.device)
    if pool.info.exact:
        return matrix, pool.info
    step = max(1, (16 * 1024 * 1024) // max(1, matrix[..., :1, :].numel()))
    for start in range(0, length, step):  # a slab of rows at a time: no full-size copies
        stop = min(length, start + step)
        pool.add(torch.arange(start, stop, device=matrix.device), 0, source,
                 matrix[..., start:stop, :])
    return pool.result(matrix.dtype if matrix.dtype.is_floating_point else torch.float32), \
        pool.info
