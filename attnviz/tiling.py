"""Attention probabilities in tiles, so that no layer's (B, H, L, S) tensor is ever built.

An ``AttentionProblem`` holds what a fused kernel was given (q, k, masks, scale, causal, GQA
groups). ``attention_tiles`` yields the softmax probabilities block by block: for each block of
query rows it first computes the rows' log-sum-exp over every key tile with the running-max
recurrence FlashAttention uses, then emits ``exp(score - lse)`` per key tile. Peak memory is
O(B x H x query_tile x key_tile), whatever L and S are; the scores are computed twice, which
costs one extra q @ k^T per layer and nothing else.

Mask conventions are normalised when the problem is built: every entry of ``masks`` is either
bool (True = may attend, as in ``F.scaled_dot_product_attention``) or float (added to the
scores), broadcastable to (B, H, L, S) and kept in its own, usually much smaller, shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# a block of scores of at most this many float32 values (64 MiB), when the caller gives no tile
DEFAULT_BLOCK_VALUES = 16 * 1024 * 1024


@dataclass(frozen=True)
class AttentionProblem:
    """The inputs of one attention call: ``query`` (B, H, L, d), ``key`` (B, Hk, S, d) with Hk
    dividing H (grouped-query attention repeats each key head for H // Hk query heads)."""

    query: torch.Tensor
    key: torch.Tensor
    scale: float
    causal: bool = False
    masks: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        heads, kv_heads = self.query.shape[-3], self.key.shape[-3]
        if self.query.dim() != 4 or self.key.dim() != 4:
            raise ValueError("query and key must be (B, H, L, d) and (B, Hk, S, d)")
        if heads % kv_heads:
            raise ValueError(f"{kv_heads} key heads do not divide {heads} query heads")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        batch, heads, length, _ = self.query.shape
        return batch, heads, length, self.key.shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.query.dtype, torch.float32)


def sdpa_problem(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False) -> AttentionProblem:
    """The problem ``F.scaled_dot_product_attention`` solves for these arguments."""
    while query.dim() < 4:  # (L, d) or (H, L, d): SDPA broadcasts leading dims
        query = query.unsqueeze(0)
    while key.dim() < 4:
        key = key.unsqueeze(0)
    if query.dim() > 4:  # (..., H, L, d): fold the extra batch dims
        query = query.reshape(-1, *query.shape[-3:])  # (B', H, L, d)
    if key.dim() > 4:
        key = key.reshape(-1, *key.shape[-3:])  # (B', Hk, S, d)
    # one key head broadcasts over every query head (multi-query attention, as Falcon calls
    # SDPA); other counts differ only under enable_gqa
    if key.shape[-3] not in (1, query.shape[-3]) and not enable_gqa:
        raise ValueError("key heads differ from query heads without enable_gqa")
    factor = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    masks = () if attn_mask is None else (_as_4d(attn_mask),)
    return AttentionProblem(query, key, factor, bool(is_causal), masks)


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dim() > 4:
        mask = mask.reshape(-1, *mask.shape[-3:])  # (B', H or 1, L or 1, S)
    return mask


def _rows_of(mask: torch.Tensor, rows: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    picked = mask if mask.shape[-2] == 1 else mask.index_select(-2, rows)
    return picked if picked.shape[-1] == 1 else picked[..., k0:k1]


def block_scores(problem: AttentionProblem, rows: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Scores (B, H, len(rows), k1 - k0) with masks applied, in float32 or wider."""
    dtype = problem.dtype
    # the scale goes on q (tq x d values) rather than on the (tq x tk) scores; masks are
    # applied in place: each score block is the largest tensor a streamed capture makes
    q = problem.query.index_select(-2, rows).to(dtype) * problem.scale  # (B, H, tq, d)
    k = problem.key[..., k0:k1, :].to(dtype)  # (B, Hk, tk, d)
    group = problem.query.shape[-3] // problem.key.shape[-3]
    if group > 1:
        k = k.repeat_interleave(group, dim=-3)  # (B, H, tk, d)
    scores = q @ k.transpose(-2, -1)  # (B, H, tq, tk)
    if problem.causal:  # top-left aligned, as SDPA's is_causal
        keys = torch.arange(k0, k1, device=rows.device)
        allowed = rows.to(keys.device)[:, None] >= keys[None, :]  # (tq, tk)
        scores.masked_fill_(~allowed, float("-inf"))
    for mask in problem.masks:
        part = _rows_of(mask, rows.to(mask.device), k0, k1)
        if any(size not in (1, full) for size, full in zip(part.shape, scores.shape, strict=True)):
            # a mask with more batch entries than q broadcasts the output: not in place
            scores = (scores.masked_fill(~part, float("-inf")) if part.dtype == torch.bool
                      else scores + part.to(dtype))
        elif part.dtype == torch.bool:
            scores.masked_fill_(~part, float("-inf"))
        else:
            scores.add_(part.to(dtype))
    return scores


def dense_scores(problem: AttentionProblem) -> torch.Tensor:
    """Every score at once (B, H, L, S): for short inputs and as the tiles' reference."""
    _, _, length, source = problem.shape
    rows = torch.arange(length, device=problem.query.device)
    return block_scores(problem, rows, 0, source)


def row_logsumexp(problem: AttentionProblem, rows: torch.Tensor, key_tile: int) -> torch.Tensor:
    """log(sum(exp(scores))) of each row (B, H, len(rows)), one key tile at a time.

    Rows that may attend to nothing get -inf, so their probabilities come out NaN, as
    ``torch.softmax`` gives for a row of -inf."""
    source = problem.shape[3]
    running_max: torch.Tensor | None = None
    total: torch.Tensor | None = None
    for k0 in range(0, source, key_tile):
        scores = block_scores(problem, rows, k0, min(k0 + key_tile, source))  # (B, H, tq, tk)
        tile_max = scores.amax(dim=-1)  # (B, H, tq)
        new_max = tile_max if running_max is None else torch.maximum(running_max, tile_max)
        # -inf - -inf is NaN: shift fully masked rows by 0 instead, their sums stay 0
        shift = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)
        tile_sum = torch.exp(scores - shift[..., None]).sum(dim=-1)
        if total is None or running_max is None:
            total = tile_sum
        else:
            total = total * torch.exp(running_max - shift) + tile_sum
        running_max = new_max
    assert running_max is not None and total is not None
    shift = torch.where(torch.isneginf(running_max), torch.zeros_like(running_max), running_max)
    return shift + torch.log(total)


@dataclass(frozen=True)
class Tile:
    """Probabilities (B, H, len(rows), k1 - k0) of query ``rows`` over keys ``k0:k1``."""

    rows: torch.Tensor
    k0: int
    k1: int
    probs: torch.Tensor


def select_heads(problem: AttentionProblem, heads: Sequence[int]) -> AttentionProblem:
    """The same problem for query heads ``heads`` only (their key heads and mask rows with them)."""
    count = problem.query.shape[-3]
    group = count // problem.key.shape[-3]
    index = torch.as_tensor([h + count if h < 0 else h for h in heads], dtype=torch.long)
    kv_index = index // group
    masks = tuple(m if m.shape[-3] == 1 else m.index_select(-3, index.to(m.device))
                  for m in problem.masks)
    return AttentionProblem(problem.query.index_select(-3, index.to(problem.query.device)),
                            problem.key.index_select(-3, kv_index.to(problem.key.device)),
                            problem.scale, problem.causal, masks)


def tile_sizes(problem: AttentionProblem, query_tile: int | None,
               key_tile: int | None) -> tuple[int, int]:
    """Tile sizes that keep one block of scores under ``DEFAULT_BLOCK_VALUES``: whole rows
    unless a single row of every head is already larger than that."""
    batch, heads, length, source = problem.shape
    whole_rows = max(1, DEFAULT_BLOCK_VALUES // max(1, batch * heads))
    keys = max(1, min(source, key_tile or whole_rows))
    per_row = max(1, batch * heads * keys)
    queries = query_tile or max(1, DEFAULT_BLOCK_VALUES // per_row)
    return max(1, min(length, queries)), keys


def attention_tiles(problem: AttentionProblem, *, rows: Sequence[int] | None = None,
                    query_tile: int | None = None,
                    key_tile: int | None = None) -> Iterator[Tile]:
    """Softmax probabilities in tiles, query blocks in order and key tiles in order within each.

    ``rows``: only these query rows (e.g. the last one), in the order given."""
    _, _, length, source = problem.shape
    device = problem.query.device
    chosen = (torch.arange(length, device=device) if rows is None
              else torch.as_tensor(list(rows), dtype=torch.long, device=device))
    q_tile, k_tile = tile_sizes(problem, query_tile, key_tile)
    for start in range(0, chosen.numel(), q_tile):
        block = chosen[start:start + q_tile]
        if k_tile >= source:  # whole rows: one pass, softmax directly
            scores = block_scores(problem, block, 0, source)
            yield Tile(block, 0, source, torch.softmax(scores, dim=-1))
            continue
        lse = row_logsumexp(problem, block, k_tile)[..., None]  # (B, H, tq, 1)
        for k0 in range(0, source, k_tile):
            k1 = min(k0 + k_tile, source)
            yield Tile(block, k0, k1, block_scores(problem, block, k0, k1).sub_(lse).exp_())


def dense_probabilities(problem: AttentionProblem, *, query_tile: int | None = None,
                        key_tile: int | None = None) -> torch.Tensor:
    """All probabilities (B, H, L, S) assembled from tiles (tests and short inputs)."""
    batch, heads, length, source = problem.shape
    out = torch.empty(batch, heads, length, source, dtype=problem.dtype,
                      device=problem.query.device)
    for tile in attention_tiles(problem, query_tile=query_tile, key_tile=key_tile):
        out[:, :, tile.rows, tile.k0:tile.k1] = tile.probs
    return out
