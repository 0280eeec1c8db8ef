"""Block pooling equals torch's own pooling, keeps a single spike, and streams from tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from hypothesis import given, settings
from hypothesis import strategies as st

from attnviz.pooling import BlockPool, block_index, pool_map
from attnviz.tiling import attention_tiles, dense_probabilities, sdpa_problem


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_divisible_sizes_equal_torch_pooling(mode: str) -> None:
    maps = torch.rand(2, 3, 12, 20, dtype=torch.float64)
    pooled, info = pool_map(maps, 4, 5, mode)
    reference = (F.max_pool2d if mode == "max" else F.avg_pool2d)(maps, kernel_size=(3, 4))
    torch.testing.assert_close(pooled, reference)
    assert info.factor == (3.0, 4.0) and not info.exact


def test_small_maps_are_untouched() -> None:
    maps = torch.rand(1, 2, 5, 7)
    pooled, info = pool_map(maps, 10, 10)
    assert info.exact and pooled is maps


def test_a_single_spike_survives_max_pooling_but_not_striding() -> None:
    maps = torch.zeros(1, 1, 1000, 1000)
    maps[0, 0, 501, 733] = 1.0
    pooled, _ = pool_map(maps, 100, 100, "max")
    assert pooled.max() == 1.0
    assert pooled[0, 0, 50, 73] == 1.0
    assert maps[..., ::10, ::10].max() == 0.0  # what a strided thumbnail would have shown


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 30), source=st.integers(1, 30), rows=st.integers(1, 12),
       cols=st.integers(1, 12), mode=st.sampled_from(["max", "mean"]), seed=st.integers(0, 50))
def test_uneven_blocks_match_a_plain_loop(length: int, source: int, rows: int, cols: int,
                                          mode: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.rand(length, source, generator=gen, dtype=torch.float64)
    matrix[torch.rand(length, source, generator=gen) < 0.1] = float("nan")
    pooled, info = pool_map(matrix, rows, cols, mode)
    out_rows, out_cols = info.pooled
    row_ids, col_ids = block_index(length, out_rows), block_index(source, out_cols)
    for r in range(out_rows):
        for c in range(out_cols):
            cells = matrix[row_ids == r][:, col_ids == c]
            values = cells[~torch.isnan(cells)]
            if values.numel() == 0:
                assert torch.isnan(pooled[r, c])
            else:
                expected = values.max() if mode == "max" else values.mean()
                torch.testing.assert_close(pooled[r, c], expected)


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_pooling_tiles_equals_pooling_the_dense_map(mode: str) -> None:
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 37, 8, generator=gen)
    k = torch.randn(1, 2, 37, 8, generator=gen)
    problem = sdpa_problem(q, k, is_causal=True, enable_gqa=True)
    dense = dense_probabilities(problem)
    expected, _ = pool_map(dense, 9, 6, mode)
    pool = BlockPool((1, 4), 37, 37, 9, 6, mode)
    for tile in attention_tiles(problem, query_tile=5, key_tile=8):
        pool.add(tile.rows, tile.k0, tile.k1, tile.probs)
    torch.testing.assert_close(pool.result(), expected)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="pool mode 'median'"):
        BlockPool((1,), 4, 4, 2, 2, "median")
