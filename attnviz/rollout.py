"""Attention rollout (Abnar & Zuidema 2020), with head fusion and a discard ratio.

Per layer: fuse heads (mean, max or min); optionally zero the lowest fraction of entries, never
the CLS column (key 0); add the identity; renormalise each row (sum over the last dim, keeping
dims); multiply the layers in order, first layer first. Two known bugs elsewhere: renormalising
over the wrong axis, and pairing layers in reverse order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnviz.errors import UsageError, param

FUSIONS = ("mean", "max", "min")


def fuse_heads(attention: torch.Tensor, fusion: str) -> torch.Tensor:
    """(B, H, T, T) -> (B, T, T)."""
    if fusion == "mean":
        return attention.mean(dim=1)
    if fusion == "max":
        return attention.amax(dim=1)
    if fusion == "min":
        return attention.amin(dim=1)
    raise UsageError(f"{param('head_fusion')} {fusion}: use one of {', '.join(FUSIONS)}",
                     param="head_fusion")


def discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` of each map's entries, keeping every entry of column 0."""
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"{param('discard_ratio')} {ratio}: use a value in [0, 1)",
                         param="discard_ratio")
    batch, tokens, _ = fused.shape
    flat = fused.reshape(batch, tokens * tokens)  # (B, T*T)
    count = min(int(flat.shape[-1] * ratio), tokens * (tokens - 1))
    if count == 0:
        return fused
    protected = torch.zeros(tokens, tokens, dtype=torch.bool)
    protected[:, 0] = True  # the CLS column is never discarded
    candidates = flat.masked_fill(protected.flatten(), float("inf"))
    lowest = candidates.topk(count, dim=-1, largest=False).indices  # (B, count)
    return flat.scatter(-1, lowest, 0.0).reshape(batch, tokens, tokens)


def attention_rollout(layers: Sequence[torch.Tensor], *, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Rollout of (B, H, T, T) maps, given first layer first -> (B, T, T)."""
    if not layers:
        raise UsageError("attention rollout needs at least one layer")
    batch, _, tokens, _ = layers[0].shape
    identity = torch.eye(tokens, dtype=torch.float64)
    result = identity.expand(batch, tokens, tokens)
    for attention in layers:
        fused = fuse_heads(attention.to(torch.float64), head_fusion)  # (B, T, T)
        fused = discard_lowest(fused, discard_ratio)
        step = fused + identity
        step = step / step.sum(dim=-1, keepdim=True)  # rows sum to 1
        result = step @ result  # later layers act on what earlier layers mixed
    return result.float()
