"""Recomputing attention probabilities (and pre-softmax scores) from a call's own arguments.

``sdpa_probabilities`` follows ``F.scaled_dot_product_attention`` exactly: bool ``attn_mask``
True means *may attend* (the opposite of ``nn.MultiheadAttention``), float masks are added,
``is_causal`` masks above the diagonal, ``scale`` defaults to 1/sqrt(d) and ``enable_gqa``
repeats each key/value head for its group of query heads. ``mha_problem`` states an
``nn.MultiheadAttention`` call, whose bool masks mean *masked out*, as the same kind of problem,
which ``attnviz.tiling`` can solve in tiles.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from attnviz.tiling import AttentionProblem, dense_scores

SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
               "enable_gqa")


def bind_sdpa(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(SDPA_PARAMS, args, strict=False))
    bound.update(kwargs)
    return bound


def sdpa_scores(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
    """Pre-softmax scores (..., H, L, S), masks applied as -inf or added, in float32 or wider."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    q, k = query.to(dtype), key.to(dtype)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)  # (..., H, S, d)
    factor = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * factor  # (..., H, L, S)
    length, source = scores.shape[-2], scores.shape[-1]
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))  # SDPA: True = attend
        else:
            scores = scores + attn_mask.to(dtype)
    return scores


def to_bhls(probs: torch.Tensor, heads_hint: int | None = None) -> torch.Tensor:
    """Bring captured maps to (B, H, Lq, Lk)."""
    if probs.dim() == 4:
        return probs
    if probs.dim() == 3:
        if heads_hint and probs.shape[0] % heads_hint == 0:
            return probs.reshape(-1, heads_hint, *probs.shape[-2:])  # (B*H, L, S) -> (B, H, L, S)
        return probs.unsqueeze(0)  # (H, L, S) -> (1, H, L, S)
    if probs.dim() == 2:
        return probs[None, None]  # (L, S) -> (1, 1, L, S)
    return probs.reshape(-1, *probs.shape[-3:])  # (..., H, L, S) -> (B', H, L, S)


def _mha_inputs(module: nn.MultiheadAttention, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def mha_problem(module: nn.MultiheadAttention, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> AttentionProblem:
    """The scores problem of one ``nn.MultiheadAttention`` call, masks as SDPA reads them."""
    bound = _mha_inputs(module, args, kwargs)
    query, key = bound["query"], bound["key"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key = query.unsqueeze(1), key.unsqueeze(1)  # (L, 1, E)
    elif module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)  # (L, N, E)
    heads, dim = module.num_heads, module.head_dim
    if module.in_proj_weight is not None:
        w_q, w_k, _ = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    b_q = b_k = None
    if module.in_proj_bias is not None:
        b_q, b_k, _ = module.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q)  # (L, N, E)
    k = F.linear(key, w_k, b_k)  # (S, N, E)
    batch = q.shape[1]
    key_padding_mask = bound.get("key_padding_mask")
    attn_mask = bound.get("attn_mask")
    if module.bias_k is not None:
        k = torch.cat([k, module.bias_k.repeat(1, batch, 1)])  # (S+1, N, E)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(1, batch, k.shape[-1])])  # (S+1, N, E)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.reshape(q.shape[0], batch, heads, dim).permute(1, 2, 0, 3)  # (N, H, L, d)
    k = k.reshape(k.shape[0], batch, heads, dim).permute(1, 2, 0, 3)  # (N, H, S, d)
    masks: list[torch.Tensor] = []
    if attn_mask is not None:
        mask = attn_mask.reshape(-1, heads, *attn_mask.shape[-2:]) if attn_mask.dim() == 3 \
            else attn_mask[None, None]  # (N, H, L, S) or (1, 1, L, S)
        masks.append(~mask if mask.dtype == torch.bool else mask)  # MHA: True = masked out
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]  # (N, 1, 1, S)
        masks.append(padding if padding.dtype.is_floating_point else ~padding.bool())
    causal = bool(bound.get("is_causal")) and attn_mask is None
    return AttentionProblem(q, k, 1.0 / math.sqrt(dim), causal, tuple(masks))


def mha_scores(module: nn.MultiheadAttention, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> torch.Tensor:
    """Pre-softmax scores (B, H, L, S) of one ``nn.MultiheadAttention`` call."""
    return dense_scores(mha_problem(module, args, kwargs))
