"""Tiled probabilities equal what torch itself computes, for every mask convention.

The oracle for SDPA is ``F.scaled_dot_product_attention`` with the identity as its values: its
output is then exactly its own probability matrix, masks, causal alignment and GQA included.
For ``nn.MultiheadAttention`` it is the module's own per-head weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnviz.capture_math import mha_problem
from attnviz.tiling import (
    attention_tiles,
    dense_probabilities,
    dense_scores,
    row_logsumexp,
    sdpa_problem,
)


def _sdpa_oracle(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                 causal: bool = False, scale: float | None = None,
                 gqa: bool = False) -> torch.Tensor:
    batch, kv_heads, source, _ = k.shape
    eye = torch.eye(source, dtype=q.dtype).expand(batch, kv_heads, source, source)  # (B, Hk, S, S)
    return F.scaled_dot_product_attention(q, k, eye, attn_mask=mask, is_causal=causal,
                                          scale=scale, enable_gqa=gqa)  # (B, H, L, S)


def _qk(batch: int, heads: int, kv_heads: int, length: int, source: int,
        dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, source, dim, generator=gen, dtype=torch.float64)
    return q, k


TILES = [(None, None), (1, 1), (3, 5), (4, None), (7, 2), (64, 64)]


def test_plain_causal_gqa_and_scale_match_sdpa() -> None:
    q, k = _qk(2, 6, 2, 11, 11)
    for causal in (False, True):
        problem = sdpa_problem(q, k, is_causal=causal, scale=0.3, enable_gqa=True)
        expected = _sdpa_oracle(q, k, causal=causal, scale=0.3, gqa=True)
        for q_tile, k_tile in TILES:
            got = dense_probabilities(problem, query_tile=q_tile, key_tile=k_tile)
            torch.testing.assert_close(got, expected)


def test_one_key_head_broadcasts_without_enable_gqa() -> None:
    """Multi-query attention (Falcon) calls SDPA with one key head and no enable_gqa: SDPA
    broadcasts it over the query heads, and so must the tiles."""
    q, k = _qk(1, 4, 1, 6, 6)
    problem = sdpa_problem(q, k, is_causal=True)
    expected = _sdpa_oracle(q, k, causal=True)  # (1, 4, 6, 6) by broadcasting
    for q_tile, k_tile in TILES:
        got = dense_probabilities(problem, query_tile=q_tile, key_tile=k_tile)
        torch.testing.assert_close(got, expected)


def test_causal_with_more_keys_than_queries_is_top_left_aligned() -> None:
    q, k = _qk(1, 2, 2, 4, 9)
    problem = sdpa_problem(q, k, is_causal=True)
    expected = _sdpa_oracle(q, k, causal=True)
    torch.testing.assert_close(dense_probabilities(problem, query_tile=3, key_tile=2), expected)


def test_bool_and_float_masks_of_every_broadcast_shape() -> None:
    q, k = _qk(2, 4, 4, 6, 10, seed=1)
    gen = torch.Generator().manual_seed(2)
    bool_masks = [torch.rand(1, 10, generator=gen) > 0.3,  # (1, S)
                  torch.rand(6, 10, generator=gen) > 0.3,  # (L, S)
                  torch.rand(2, 1, 1, 10, generator=gen) > 0.2,  # padding (B, 1, 1, S)
                  torch.rand(2, 4, 6, 10, generator=gen) > 0.3]  # full
    for mask in bool_masks:
        mask = mask.clone()
        mask[..., 0] = True  # every row may see something, else SDPA's fused rows differ
        expected = _sdpa_oracle(q, k, mask=mask)
        problem = sdpa_problem(q, k, attn_mask=mask)
        for q_tile, k_tile in TILES:
            torch.testing.assert_close(
                dense_probabilities(problem, query_tile=q_tile, key_tile=k_tile), expected)
    additive = torch.randn(1, 4, 6, 10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        dense_probabilities(sdpa_problem(q, k, attn_mask=additive), query_tile=2, key_tile=3),
        _sdpa_oracle(q, k, mask=additive))


def test_fully_masked_row_is_nan_like_softmax() -> None:
    q, k = _qk(1, 1, 1, 3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    problem = sdpa_problem(q, k, attn_mask=mask)
    eager = torch.softmax(dense_scores(problem), dim=-1)
    tiled = dense_probabilities(problem, query_tile=1, key_tile=3)
    assert torch.isnan(tiled[0, 0, 1]).all() and torch.isnan(eager[0, 0, 1]).all()
    torch.testing.assert_close(tiled, eager, equal_nan=True)
    assert torch.isneginf(row_logsumexp(problem, torch.tensor([1]), 2)).all()


def test_selected_rows_only() -> None:
    q, k = _qk(1, 3, 1, 9, 9)
    problem = sdpa_problem(q, k, is_causal=True, enable_gqa=True)
    expected = _sdpa_oracle(q, k, causal=True, gqa=True)
    tiles = list(attention_tiles(problem, rows=[8, 0], key_tile=4))
    got = torch.cat([torch.cat([t.probs for t in tiles if t.rows.tolist() == [8, 0]], dim=-1)])
    torch.testing.assert_close(got, expected[:, :, [8, 0]])


def test_float32_inputs_agree_with_sdpa_to_float32_rounding() -> None:
    q, k = (t.float() for t in _qk(1, 4, 4, 33, 33, dim=16, seed=3))
    problem = sdpa_problem(q, k, is_causal=True)
    torch.testing.assert_close(dense_probabilities(problem, query_tile=5, key_tile=7),
                               _sdpa_oracle(q, k, causal=True), rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), kv=st.sampled_from([1, 2]), group=st.integers(1, 3),
       length=st.integers(1, 9), source=st.integers(1, 9), causal=st.booleans(),
       q_tile=st.integers(1, 10), k_tile=st.integers(1, 10), seed=st.integers(0, 99))
def test_any_tiling_equals_the_oracle(batch: int, kv: int, group: int, length: int, source: int,
                                      causal: bool, q_tile: int, k_tile: int, seed: int) -> None:
    q, k = _qk(batch, kv * group, kv, length, source, seed=seed)
    problem = sdpa_problem(q, k, is_causal=causal, enable_gqa=True)
    expected = torch.softmax(dense_scores(problem), dim=-1)
    got = dense_probabilities(problem, query_tile=q_tile, key_tile=k_tile)
    torch.testing.assert_close(got, expected, equal_nan=True)
    torch.testing.assert_close(got, _sdpa_oracle(q, k, causal=causal, gqa=True))


def test_mha_problem_matches_multihead_attention_weights() -> None:
    torch.manual_seed(0)
    for batch_first, kdim in ((True, None), (False, 12)):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                    bias=True, add_bias_kv=kdim is None).double().eval()
        shape = (2, 5, 16) if batch_first else (5, 2, 16)
        query = torch.randn(*shape, dtype=torch.float64)
        key = torch.randn(2, 7, kdim or 16, dtype=torch.float64)
        if not batch_first:
            key = key.transpose(0, 1)
        padding = torch.zeros(2, 7, dtype=torch.bool)
        padding[1, -2:] = True
        attn_mask = torch.zeros(5, 7, dtype=torch.bool)
        attn_mask[0, 3] = True
        kwargs = {"key_padding_mask": padding, "attn_mask": attn_mask, "need_weights": True,
                  "average_attn_weights": False}
        _, weights = mha(query, key, key, **kwargs)
        problem = mha_problem(mha, (query, key, key), kwargs)
        for q_tile, k_tile in TILES:
            torch.testing.assert_close(
                dense_probabilities(problem, query_tile=q_tile, key_tile=k_tile), weights)
