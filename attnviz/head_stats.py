"""Per-head statistics of attention maps, accumulated from tiles as a capture streams them.

For every query row the reducer keeps a handful of sums (L floats per head and statistic, never
an (L, S) map), and at the end of a layer averages them over the rows that may attend to
something and over the batch. With ``p`` a row's probabilities over keys ``j`` and ``i`` the
row's own position (self-attention: rows and keys are the same tokens):

- ``entropy_bits``: -sum p log2 p; ``entropy_norm``: that over log2(keys the row may see, p > 0)
  (1.0 = uniform over what it may see, 0.0 = one key; rows that may see one key only are
  left out of this mean);
- ``first``: p[0] (sink / BOS / CLS); ``prefix``: sum of p over the first ``prefix`` keys (CLS
  and register tokens of image models);
- ``previous``/``self``/``next``: p[i-1], p[i], p[i+1]; ``local``: sum of p over |j - i| <= w;
- ``distance``: sum p |j - i|, in tokens;
- ``sharp``: the share of rows whose largest probability exceeds 0.5.

Position-relative statistics are NaN for cross-attention (rows and keys are different tokens).

``probes`` adds named diagonals for token probes: ``Diagonal(offset, start, stop)`` is the mean
of p[i, i + offset] over rows start <= i < stop. On a block of T random tokens repeated twice
from position s, induction is ``Diagonal(-(T - 1), s + T, s + 2T)`` (the token after the earlier
copy) and duplicate-token ``Diagonal(-T, s + T, s + 2T)`` (the earlier copy itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnviz.reducers import MapReducer, Shape4
from attnviz.tiling import Tile

STATISTICS = ("entropy_bits", "entropy_norm", "first", "prefix", "previous", "self", "next",
              "local", "distance", "sharp")
POSITIONAL = ("previous", "self", "next", "local", "distance")


@dataclass(frozen=True)
class Diagonal:
    """Mass on key i + ``offset`` of rows ``start`` <= i < ``stop``."""

    offset: int
    start: int
    stop: int


@dataclass
class LayerStats:
    """One layer's per-head statistics: ``values[stat]`` is (H,), averaged over ``rows``."""

    heads: int
    rows: int
    self_attention: bool
    values: dict[str, torch.Tensor]


@dataclass
class HeadStatistics(MapReducer):
    """Streams per-head statistics; ``layers[key]`` after the capture."""

    window: int = 2
    prefix: int = 1
    probes: dict[str, Diagonal] = field(default_factory=dict)
    layers: dict[str, LayerStats] = field(default_factory=dict)
    _sums: dict[str, torch.Tensor] = field(default_factory=dict)
    _shape: Shape4 = (0, 0, 0, 0)

    def begin(self, key: str, shape: Shape4) -> None:
        batch, heads, length, _ = shape
        self._shape = shape
        names = ("plogp", "seen", "first", "prefix", "previous", "self", "next", "local",
                 "distance", "max", *self.probes)
        self._sums = {n: torch.zeros(batch, heads, length, dtype=torch.float64) for n in names}
        self._sums["max"].fill_(float("nan"))

    def add(self, key: str, tile: Tile) -> None:
        probs = tile.probs.to(torch.float64)  # (B, H, tq, tk)
        valid = ~torch.isnan(probs)
        p = torch.where(valid, probs, torch.zeros_like(probs))
        rows = tile.rows
        keys = torch.arange(tile.k0, tile.k1, device=p.device)
        offset = keys[None, :] - rows.to(p.device)[:, None]  # (tq, tk): key minus query position
        sums = self._sums

        def fold(name: str, values: torch.Tensor) -> None:  # values (B, H, tq)
            sums[name][:, :, rows] += values

        fold("plogp", torch.where(p > 0, p * torch.log2(p.clamp(min=1e-300)), 0.0).sum(-1))
        fold("seen", (p > 0).sum(-1).to(torch.float64))
        fold("first", p[..., :1].sum(-1) if tile.k0 == 0 else p.new_zeros(p.shape[:-1]))
        fold("prefix", p[..., :max(0, self.prefix - tile.k0)].sum(-1))
        diagonals = [("previous", offset == -1), ("self", offset == 0), ("next", offset == 1),
                     ("local", offset.abs() <= self.window)]
        diagonals += [(name, offset == probe.offset) for name, probe in self.probes.items()]
        for name, hit in diagonals:
            fold(name, (p * hit).sum(-1))
        fold("distance", (p * offset.abs()).sum(-1))
        row_max = torch.where(valid.any(-1), p.amax(-1), torch.nan)  # (B, H, tq)
        current = sums["max"][:, :, rows]
        sums["max"][:, :, rows] = torch.fmax(current, row_max)

    def end(self, key: str) -> None:
        batch, heads, length, source = self._shape
        sums = self._sums
        live = sums["seen"] > 0  # rows that may attend to something
        count = live.sum(dim=(0, 2)).clamp(min=1).to(torch.float64)  # (H,)

        def mean(values: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
            mask = live if where is None else live & where
            total = torch.where(mask, values, 0.0).sum(dim=(0, 2))
            return total / mask.sum(dim=(0, 2)).clamp(min=1)  # (H,)

        entropy = -sums["plogp"]
        capacity = torch.log2(sums["seen"].clamp(min=1))
        norm = torch.where(capacity > 0, entropy / capacity.clamp(min=1e-12), 0.0)
        positions = torch.arange(length)[None, None, :].expand(batch, heads, length)
        self_attention = length == source
        values = {
            "entropy_bits": mean(entropy), "entropy_norm": mean(norm, sums["seen"] > 1),
            "first": mean(sums["first"]), "prefix": mean(sums["prefix"]),
            "previous": mean(sums["previous"], positions >= 1),
            "self": mean(sums["self"]), "next": mean(sums["next"], positions < length - 1),
            "local": mean(sums["local"]), "distance": mean(sums["distance"]),
            "sharp": mean((sums["max"] > 0.5).to(torch.float64)),
        }
        for name, probe in self.probes.items():
            in_range = (positions >= probe.start) & (positions < min(probe.stop, length))
            values[name] = mean(sums[name], in_range)
        if not self_attention:
            for name in (*POSITIONAL, *self.probes):
                values[name] = torch.full((heads,), math.nan, dtype=torch.float64)
        self.layers[key] = LayerStats(heads, int(count.max().item()), self_attention,
                                      {k: v.float() for k, v in values.items()})
        self._sums = {}
