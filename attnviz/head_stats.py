"""Per-head statistics of attention maps, accumulated from tiles as a capture streams them.

For every query row the reducer keeps a handful of sums (L floats per head and statistic, never
an (L, S) map); at the end of a layer it folds them into per-head totals and row counts, so
that several inputs (several captures fed to one reducer) add up to one mean. With ``p`` a
row's probabilities over keys ``j`` and ``i`` the row's own position (self-attention: rows and
keys are the same tokens), each statistic is a mean over the rows that may attend to something:

- ``entropy_bits``: -sum p log2 p; ``entropy_norm``: that over log2(keys the row may see)
  (1.0 = uniform over what it may see, 0.0 = one key; rows that may see one key only are
  left out). A key counts as seen when p > 0: masked keys have p = 0 exactly, and so has a key
  whose score is more than ~100 below the row's maximum (float32 underflow);
- ``first``: p[0] (sink / BOS / CLS); ``prefix``: sum of p over the first ``prefix`` keys (CLS
  and register tokens of image models; ``LayerStats.prefix_mass`` gives any count up to
  ``leading``);
- ``previous``/``self``/``next``: p[i-1], p[i], p[i+1] (over rows where that key exists);
  ``local``: sum of p over |j - i| <= w; ``distance``: sum p |j - i|, in tokens;
- ``sharp``: the share of rows whose largest probability exceeds 0.5.

Position-relative statistics are NaN for cross-attention (rows and keys are different tokens),
and a statistic no row defines (``previous`` of a one-token input) is NaN.

``probes`` adds named diagonals for token probes: ``Diagonal(offset, start, stop)`` is the mean
of p[i, i + offset] over rows start <= i < stop. On a block of T random tokens repeated twice
from position s, induction is ``Diagonal(-(T - 1), s + T, s + 2T)`` (the token after the earlier
copy) and duplicate-token ``Diagonal(-T, s + T, s + 2T)`` (the earlier copy itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from attnviz.reducers import MapReducer, Shape4
from attnviz.tiling import Tile

STATISTICS = ("entropy_bits", "entropy_norm", "first", "prefix", "previous", "self", "next",
              "local", "distance", "sharp")
POSITIONAL = ("previous", "self", "next", "local", "distance")
# what each statistic is, for the docs and the JSON (p: a query row i's probabilities over keys
# j; every statistic is the mean of the expression over the rows named)
DEFINITIONS: dict[str, str] = {
    "entropy_bits": "-sum_j p_ij log2 p_ij, bits; rows that may attend to something",
    "entropy_norm": "entropy_bits / log2(n_i), n_i = keys with p_ij > 0 (the keys row i may "
                    "see); rows with n_i >= 2",
    "first": "p_i0, mass on the first key (BOS, CLS or a sink)",
    "prefix": "sum_{j < P} p_ij, mass on the first P keys: an image layer's CLS and register "
              "tokens (P: the layer's prefix_tokens); null for other layers",
    "previous": "p_i(i-1); rows i >= 1; self-attention only",
    "self": "p_ii; self-attention only",
    "next": "p_i(i+1); rows i <= L-2; self-attention only",
    "local": "sum_{|j-i| <= w} p_ij; self-attention only",
    "distance": "sum_j p_ij |j - i|, tokens; self-attention only",
    "sharp": "1 if max_j p_ij > 0.5 else 0: the share of sharp rows",
}
_ROW_SUMS = ("plogp", "seen", "first", "previous", "self", "next", "local", "distance", "max")


def _index(rows: torch.Tensor) -> slice | torch.Tensor:
    """Rows as a slice when they are consecutive (a plain view, not a gather and scatter)."""
    first, count = int(rows[0]), rows.numel()
    if int(rows[-1]) - first == count - 1 and bool((rows.diff() == 1).all()):
        return slice(first, first + count)
    return rows.cpu()


@dataclass(frozen=True)
class Diagonal:
    """Mass on key i + ``offset`` of rows ``start`` <= i < ``stop``."""

    offset: int
    start: int
    stop: int


@dataclass(frozen=True)
class LayerStats:
    """One layer's per-head totals and row counts (H,) per statistic; ``values`` the means.

    ``rows``: query rows that may attend to something (all inputs and batch items);
    ``leading``: (H, K) totals over those rows of the mass on each of the first K keys."""

    heads: int
    rows: int
    self_attention: bool
    totals: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    leading: torch.Tensor
    prefix: int = 1
    probes: tuple[str, ...] = ()

    @property
    def values(self) -> dict[str, torch.Tensor]:
        """Each statistic's mean per head (H,) float32; NaN where no row defines it."""
        out = {}
        for name, total in self.totals.items():
            count = self.counts[name]
            out[name] = torch.where(count > 0, total / count.clamp(min=1), math.nan).float()
        out["prefix"] = self.prefix_mass(self.prefix)
        if not self.self_attention:
            for name in (*POSITIONAL, *self.probes):
                out[name] = torch.full((self.heads,), math.nan)
        return {name: out[name] for name in (*STATISTICS, *self.probes) if name in out}

    def prefix_mass(self, count: int) -> torch.Tensor:
        """Mean mass on the first ``count`` keys per head (H,) (count <= K)."""
        if count > self.leading.shape[1]:
            raise ValueError(f"prefix {count} exceeds the {self.leading.shape[1]} keys kept")
        live = self.counts["first"]
        total = self.leading[:, :count].sum(dim=1)
        return torch.where(live > 0, total / live.clamp(min=1), math.nan).float()

    def merge(self, other: LayerStats) -> LayerStats:
        """Both inputs' rows in one mean (a second capture of the same layer)."""
        if other.heads != self.heads:
            raise ValueError(f"cannot merge {other.heads} heads into {self.heads}")
        width = min(self.leading.shape[1], other.leading.shape[1])
        return LayerStats(
            self.heads, self.rows + other.rows, self.self_attention and other.self_attention,
            {k: v + other.totals[k] for k, v in self.totals.items() if k in other.totals},
            {k: v + other.counts[k] for k, v in self.counts.items() if k in other.counts},
            self.leading[:, :width] + other.leading[:, :width], self.prefix,
            tuple(p for p in self.probes if p in other.probes))

    def as_cross(self) -> LayerStats:
        """The same layer known to be cross-attention (rows and keys are different tokens,
        even where their counts are equal): its positional statistics become NaN."""
        return replace(self, self_attention=False)


@dataclass
class HeadStatistics(MapReducer):
    """Streams per-head statistics; ``layers[key]`` after the capture (a key seen again, in a
    second capture fed to the same reducer, is merged into one mean)."""

    window: int = 2
    prefix: int = 1
    probes: dict[str, Diagonal] = field(default_factory=dict)
    leading: int = 16
    layers: dict[str, LayerStats] = field(default_factory=dict)
    _sums: dict[str, torch.Tensor] = field(default_factory=dict)
    _shape: Shape4 = (0, 0, 0, 0)
    _scratch: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def begin(self, key: str, shape: Shape4) -> None:
        batch, heads, length, _ = shape
        self._shape = shape
        self._sums = {n: torch.zeros(batch, heads, length, dtype=torch.float64)
                      for n in (*_ROW_SUMS, *self.probes)}
        self._sums["max"].fill_(float("nan"))
        self._sums["lead"] = torch.zeros(batch, heads, max(self.leading, self.prefix),
                                         dtype=torch.float64)

    def add(self, key: str, tile: Tile) -> None:
        # A pass over a tile costs about what the capture's own softmax does, and a fresh
        # tile-sized tensor costs more than the arithmetic (page faults): the elementwise
        # work goes through one reused scratch buffer, reductions run in the tile's float32,
        # only the (B, H, tq) results are summed in float64.
        p = tile.probs.float()  # (B, H, tq, tk)
        if self._scratch.numel() < p.numel() or self._scratch.device != p.device:
            self._scratch = torch.empty(p.numel(), device=p.device)
        scratch = self._scratch[:p.numel()].view(p.shape)
        seen = torch.sign(p, out=scratch).sum(-1)  # keys with p > 0 (NaN rows: NaN)
        if bool(torch.isnan(seen).any()):
            p = torch.nan_to_num(p, nan=0.0)  # fully masked rows see nothing: never live
            seen = torch.sign(p, out=scratch).sum(-1)
        # p log2 p with 0 log 0 = 0: below 1e-30 the clamp changes p log p by < 1e-28
        torch.clamp(p, min=1e-30, out=scratch)
        plogp = torch.log2(scratch, out=scratch).mul_(p).sum(-1)  # (B, H, tq)
        rows = tile.rows.to(p.device)
        at = _index(tile.rows)
        sums = self._sums

        def fold(name: str, values: torch.Tensor) -> None:  # values (B, H, tq)
            sums[name][:, :, at] += values.to(torch.float64).cpu()

        fold("plogp", plogp)
        fold("seen", seen)
        if tile.k0 == 0:
            fold("first", p[..., 0])
        lead = sums["lead"].shape[-1]
        if tile.k0 < lead:  # mass on each of the first keys, summed over rows at once
            part = p[..., :lead - tile.k0].sum(dim=2).to(torch.float64).cpu()  # (B, H, k)
            sums["lead"][..., tile.k0:tile.k0 + part.shape[-1]] += part
        offsets = {"previous": -1, "self": 0, "next": 1}
        offsets.update({name: probe.offset for name, probe in self.probes.items()})
        for name, offset in offsets.items():
            fold(name, self._diagonal(p, rows, tile.k0, offset))
        local = p.new_zeros(p.shape[:-1])
        for offset in range(-self.window, self.window + 1):
            local += self._diagonal(p, rows, tile.k0, offset)
        fold("local", local)
        fold("distance", self._distance(p, rows, tile.k0))
        current = sums["max"][:, :, at]
        sums["max"][:, :, at] = torch.fmax(current, p.amax(-1).to(torch.float64).cpu())

    @staticmethod
    def _distance(p: torch.Tensor, rows: torch.Tensor, k0: int) -> torch.Tensor:
        """sum_j p[..., r, j] |j - rows[r]| over the tile's keys: (B, H, tq).

        Keys left of every row (|j - i| = i - j) and right of every row (j - i) need only
        sum_j p and sum_j p j (a matrix-vector product); only the keys between the rows' first
        and last position are weighted one by one."""
        width = p.shape[-1]
        keys = torch.arange(k0, k0 + width, device=p.device, dtype=p.dtype)
        position = rows.to(p.dtype)  # (tq,)
        left = max(0, min(width, int(rows.min()) + 1 - k0))  # keys j <= every row
        right = max(left, min(width, int(rows.max()) - k0))  # keys j >= every row
        total = p.new_zeros(p.shape[:-1])
        for lo, hi, sign in ((0, left, -1.0), (right, width, 1.0)):
            if hi > lo:
                part = p[..., lo:hi]
                moment = part @ keys[lo:hi]  # (B, H, tq): sum_j p j, a matrix-vector product
                total += sign * (moment - position * part.sum(-1))
        if right > left:
            gap = (keys[None, left:right] - position[:, None]).abs()  # (tq, right - left)
            total += (p[..., left:right] * gap).sum(-1)
        return total

    @staticmethod
    def _diagonal(p: torch.Tensor, rows: torch.Tensor, k0: int, offset: int) -> torch.Tensor:
        """p[..., r, rows[r] + offset] where that key is in this tile, else 0: (B, H, tq)."""
        column = rows + offset - k0  # (tq,)
        inside = (column >= 0) & (column < p.shape[-1])
        index = column.clamp(0, p.shape[-1] - 1).expand(*p.shape[:-1])[..., None]
        picked = p.gather(-1, index)[..., 0]  # (B, H, tq)
        return picked * inside

    def end(self, key: str) -> None:
        batch, heads, length, source = self._shape
        sums = self._sums
        live = sums["seen"] > 0  # (B, H, L): rows that may attend to something
        positions = torch.arange(length)[None, None, :].expand(batch, heads, length)
        totals: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}

        def add(name: str, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
            mask = live if where is None else live & where
            totals[name] = torch.where(mask, values, 0.0).sum(dim=(0, 2))  # (H,)
            counts[name] = mask.sum(dim=(0, 2)).to(torch.float64)

        entropy = -sums["plogp"]
        capacity = torch.log2(sums["seen"].clamp(min=1))
        add("entropy_bits", entropy)
        add("entropy_norm", entropy / capacity.clamp(min=1e-12), sums["seen"] > 1)
        for name in ("first", "self", "local", "distance"):
            add(name, sums[name])
        add("previous", sums["previous"], positions >= 1)
        add("next", sums["next"], positions < min(length, source) - 1)
        add("sharp", (sums["max"] > 0.5).to(torch.float64))
        for name, probe in self.probes.items():
            add(name, sums[name], (positions >= probe.start) & (positions < probe.stop))
        layer = LayerStats(heads, int(live.sum(dim=(0, 2)).max().item()), length == source,
                           totals, counts, sums["lead"].sum(dim=0), self.prefix,
                           tuple(self.probes))
        earlier = self.layers.get(key)
        self.layers[key] = layer if earlier is None else earlier.merge(layer)
        self._sums = {}
