"""Swin's window geometry, and its per-window attention maps placed back on the image.

A block's map is (B * windows, H, N, N), N = wh * ww: row i of window k is the attention of
the window's i-th token over the N tokens of that window. With a shift s the grid is rolled
by -s before it is cut into windows (and padded at the bottom/right to whole windows), so
window k and slot i name a token through that roll. ``token_slots`` undoes it: for every
token of the stage's grid, its window and its slot. From there:

- ``window_query_map``: one query token's attention over its window, on the stage's grid
  (zero outside the window), per head;
- ``window_received_map``: for every token, the mean attention it receives from the real
  (not padding) queries of its own window, per head: one map covering the whole image.

Both are (H, rows, cols) on the stage's token grid; a token covers ``stride`` x ``stride``
input pixels (patch * 2 ** merges), so a point (x, y) of the model's input is the token
(y // stride, x // stride). Attention given to padding tokens has no place on the image and
is left out (none at sizes whose grids are whole windows, such as the native size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnviz.errors import UsageError


@dataclass(frozen=True)
class WindowGeometry:
    """Where a block's windows lie: its stage's grid, window, shift and padded grid."""

    stage: int
    block: int
    grid: tuple[int, int]  # real tokens (rows, cols) at this stage
    window: tuple[int, int]
    shift: tuple[int, int]
    padded: tuple[int, int]  # the grid cut into windows: whole windows, padding at the end
    stride: int  # input pixels per token side at this stage
    heads: int

    @property
    def windows(self) -> int:
        """Windows per image: the maps' first dimension is batch x this."""
        return (self.padded[0] // self.window[0]) * (self.padded[1] // self.window[1])

    @property
    def area(self) -> int:
        return self.window[0] * self.window[1]


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into a (2w-1)^2-row bias table for every pair of a w x w window: the
    row offset (shifted to >= 0) times 2w - 1 plus the column offset (as Swin and timm)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                        indexing="ij")).flatten(1)  # (2, N)
    delta = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), >= 0
    return delta[0] * (2 * window - 1) + delta[1]


def mask_regions(geo: WindowGeometry) -> torch.Tensor:
    """(Hp, Wp) region labels of the rolled, padded grid: tokens of one window may attend to
    each other only within one region (timm's ``get_attn_mask``: slices [0, P-w), [P-w, P-s),
    [P-s, P) per shifted dimension; an unshifted dimension is one region)."""
    labels = []
    for size, window, shift in zip(geo.padded, geo.window, geo.shift, strict=True):
        index = torch.arange(size)
        labels.append(torch.zeros(size, dtype=torch.long) if shift == 0 else
                      (index >= size - window).long() + (index >= size - shift).long())
    return labels[0][:, None] * 3 + labels[1][None, :]


def token_slots(geo: WindowGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(window, slot) of every real token, each (rows, cols): the inverse of roll + cut."""
    rows, cols = (torch.arange(n) for n in geo.grid)
    rolled_r = (rows - geo.shift[0]) % geo.grid[0]  # torch.roll(-s): token r moves to r - s
    rolled_c = (cols - geo.shift[1]) % geo.grid[1]
    per_row = geo.padded[1] // geo.window[1]
    window = (rolled_r // geo.window[0])[:, None] * per_row + (rolled_c // geo.window[1])[None]
    slot = (rolled_r % geo.window[0])[:, None] * geo.window[1] + (rolled_c % geo.window[1])[None]
    return window, slot


def _image_maps(attention: torch.Tensor, geo: WindowGeometry, batch: int) -> torch.Tensor:
    if attention.dim() != 4 or attention.shape[2:] != (geo.area, geo.area) or \
            attention.shape[0] % geo.windows:
        raise UsageError(f"a map of shape {tuple(attention.shape)} is not (B x {geo.windows} "
                         f"windows, H, {geo.area}, {geo.area}) for layer "
                         f"layers.{geo.stage}.blocks.{geo.block}")
    images = attention.shape[0] // geo.windows
    if not 0 <= batch < images:
        raise UsageError(f"image {batch} of a batch of {images}", param="batch")
    return attention[batch * geo.windows:(batch + 1) * geo.windows]  # (nW, H, N, N)


def window_query_map(attention: torch.Tensor, geo: WindowGeometry, query: tuple[int, int],
                     batch: int = 0) -> torch.Tensor:
    """(H, rows, cols): token ``query`` = (row, col)'s attention over its window, per head."""
    maps = _image_maps(attention, geo, batch)
    row, col = query
    if not (0 <= row < geo.grid[0] and 0 <= col < geo.grid[1]):
        raise UsageError(f"token ({row}, {col}) is outside the {geo.grid[0]}x{geo.grid[1]} grid "
                         f"of stage {geo.stage}", param="points")
    window, slot = token_slots(geo)
    own = maps[int(window[row, col]), :, int(slot[row, col])]  # (H, N)
    placed = own[:, slot]  # (H, rows, cols): each token's weight from its slot
    return placed * (window == window[row, col]).to(placed.dtype)  # zero outside the window


def window_received_map(attention: torch.Tensor, geo: WindowGeometry,
                        batch: int = 0) -> torch.Tensor:
    """(H, rows, cols): each token's mean attention received from its window's real queries."""
    maps = _image_maps(attention, geo, batch)
    window, slot = token_slots(geo)
    real = torch.zeros(geo.windows, geo.area, dtype=maps.dtype)
    real[window.flatten(), slot.flatten()] = 1.0  # (nW, N): padding slots stay 0
    given = (maps * real[:, None, :, None]).sum(dim=2)  # (nW, H, N): summed over real queries
    mean = given / real.sum(dim=1).clamp(min=1.0)[:, None, None]
    return mean[window, :, slot].permute(2, 0, 1)  # (rows, cols, H) -> (H, rows, cols)
