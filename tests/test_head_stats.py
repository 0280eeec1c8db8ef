"""Per-head statistics: planted heads get exactly their values; tiles change nothing."""

from __future__ import annotations

import math

import pytest
import torch

from attnviz.head_stats import Diagonal, HeadStatistics
from attnviz.tiling import Tile
from tests.planted_heads import planted_maps


def _feed(stats: HeadStatistics, maps: torch.Tensor, key_tile: int, row_tile: int) -> None:
    batch, heads, length, source = maps.shape
    stats.begin("layer", (batch, heads, length, source))
    for r0 in range(0, length, row_tile):
        rows = torch.arange(r0, min(length, r0 + row_tile))
        for k0 in range(0, source, key_tile):
            k1 = min(source, k0 + key_tile)
            stats.add("layer", Tile(rows, k0, k1, maps[:, :, rows, k0:k1]))
    stats.end("layer")


@pytest.mark.parametrize(("key_tile", "row_tile"), [(64, 64), (3, 2), (1, 5)])
def test_planted_heads(key_tile: int, row_tile: int) -> None:
    stats = HeadStatistics(window=1)
    _feed(stats, planted_maps(12), key_tile, row_tile)
    v = stats.layers["layer"].values
    torch.testing.assert_close(v["previous"], torch.tensor([1.0, 1 / 11, 0.0,
                                                            v["previous"][3].item()]))
    assert v["first"][1] == 1.0 and v["self"][2] == 1.0
    assert v["entropy_bits"][0] == 0.0 and v["entropy_norm"][3] == pytest.approx(1.0, abs=1e-6)
    assert v["sharp"].tolist() == [1.0, 1.0, 1.0, pytest.approx(1 / 12)]  # row 0 only
    assert v["distance"][2] == 0.0 and v["distance"][1] == pytest.approx(sum(range(12)) / 12)
    assert v["local"][0] == 1.0 and v["local"][2] == 1.0


def test_statistics_match_their_definitions_on_random_maps() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 9, 9, generator=gen, dtype=torch.float64)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -math.inf)
    maps = torch.softmax(scores, dim=-1)
    stats = HeadStatistics(window=2, prefix=3)
    _feed(stats, maps, 4, 3)
    v = stats.layers["layer"].values
    i = torch.arange(9)
    logp = torch.where(maps > 0, maps * torch.log2(maps.clamp(min=1e-300)), 0.0)
    entropy = -logp.sum(-1)  # (B, H, L)
    seen = (maps > 0).sum(-1).double()
    norm = torch.where(seen > 1, entropy / torch.log2(seen), 0.0)
    distance = (maps * (i[None, :] - i[:, None]).abs()).sum(-1)
    expected = {
        "entropy_bits": entropy.mean(dim=(0, 2)),
        "entropy_norm": norm[..., 1:].mean(dim=(0, 2)),  # row 0 sees one key only
        "prefix": maps[..., :3].sum(-1).mean(dim=(0, 2)),
        "previous": maps[..., i[1:], i[1:] - 1].mean(dim=(0, 2)),
        "self": maps[..., i, i].mean(dim=(0, 2)),
        "local": (maps * ((i[None, :] - i[:, None]).abs() <= 2)).sum(-1).mean(dim=(0, 2)),
        "distance": distance.mean(dim=(0, 2)),
        "sharp": (maps.amax(-1) > 0.5).double().mean(dim=(0, 2)),
    }
    for name, value in expected.items():
        torch.testing.assert_close(v[name], value.float(), msg=name)


def test_cross_attention_has_no_positional_statistics_and_nan_rows_are_skipped() -> None:
    maps = torch.full((1, 2, 3, 5), 0.2)
    maps[0, :, 1] = float("nan")  # a row that may attend to nothing
    stats = HeadStatistics()
    _feed(stats, maps, 2, 2)
    layer = stats.layers["layer"]
    assert not layer.self_attention and layer.rows == 2
    assert torch.isnan(layer.values["previous"]).all()
    torch.testing.assert_close(layer.values["entropy_norm"], torch.ones(2))
    torch.testing.assert_close(layer.values["first"], torch.full((2,), 0.2))


def test_probe_diagonals_score_an_induction_head() -> None:
    """A repeated block of 5 tokens from position 1; head 0 attends to the token after the earlier
    copy (induction), head 1 to the earlier copy (duplicate), head 2 to the first token."""
    length, block, start = 11, 5, 1
    maps = torch.zeros(1, 3, length, length)
    maps[0, :, :, 0] = 1.0
    for i in range(start + block, start + 2 * block):
        maps[0, 0, i] = 0.0
        maps[0, 0, i, i - block + 1] = 1.0
        maps[0, 1, i] = 0.0
        maps[0, 1, i, i - block] = 1.0
    probes = {"induction": Diagonal(-(block - 1), start + block, start + 2 * block),
              "duplicate": Diagonal(-block, start + block, start + 2 * block)}
    stats = HeadStatistics(probes=probes)
    _feed(stats, maps, 4, 3)
    v = stats.layers["layer"].values
    assert v["induction"].tolist() == [1.0, 0.0, 0.0]
    assert v["duplicate"].tolist() == [0.0, 1.0, 0.0]


def test_planted_heads_get_exactly_their_roles() -> None:
    from attnviz.head_roles import assign_roles

    stats = HeadStatistics(window=1)
    _feed(stats, planted_maps(32), 8, 8)
    roles = assign_roles(stats.layers["layer"].values)
    assert [r.top for r in roles] == ["previous-token", "sink", "self", "broad"]
    assert [set(r.held) for r in roles] == [{"previous-token"}, {"sink"}, {"self"}, {"broad"}]


def _random_maps(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, 3, length, length, generator=gen, dtype=torch.float64)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(causal, -math.inf), dim=-1)


def test_two_inputs_fed_to_one_reducer_make_one_mean() -> None:
    first, second = _random_maps(1, 7), _random_maps(2, 7)
    merged, together = HeadStatistics(), HeadStatistics()
    _feed(merged, first, 3, 2)
    _feed(merged, second, 5, 4)
    _feed(together, torch.cat([first, second]), 7, 7)  # (2, H, L, L): one batch of both
    assert merged.layers["layer"].rows == together.layers["layer"].rows == 14
    for name, value in together.layers["layer"].values.items():
        torch.testing.assert_close(merged.layers["layer"].values[name], value, msg=name)
    # inputs of different lengths: each row counts once
    short = _random_maps(3, 4)
    _feed(merged, short, 4, 4)
    rows = [first[0, :, i, i] for i in range(7)] + [second[0, :, i, i] for i in range(7)] + \
        [short[0, :, i, i] for i in range(4)]
    torch.testing.assert_close(merged.layers["layer"].values["self"],
                               torch.stack(rows).mean(0).float())


def test_prefix_mass_of_any_count_and_undefined_statistics_are_nan() -> None:
    maps = _random_maps(4, 9)
    stats = HeadStatistics(prefix=3)
    _feed(stats, maps, 2, 3)
    layer = stats.layers["layer"]
    for count in (1, 3, 5):
        torch.testing.assert_close(layer.prefix_mass(count),
                                   maps[..., :count].sum(-1).mean(dim=(0, 2)).float())
    torch.testing.assert_close(layer.values["prefix"], layer.prefix_mass(3))
    with pytest.raises(ValueError, match="prefix 17 exceeds the 16 keys kept"):
        layer.prefix_mass(17)
    one = HeadStatistics(probes={"induction": Diagonal(-4, 20, 30)})
    _feed(one, torch.ones(1, 2, 1, 1), 1, 1)  # a one-token input: no previous or next token
    values = one.layers["layer"].values
    assert torch.isnan(values["previous"]).all() and torch.isnan(values["next"]).all()
    assert torch.isnan(values["induction"]).all()  # the probe's rows are not in this input
    assert values["self"].tolist() == [1.0, 1.0]


def test_a_square_cross_attention_is_marked_after_the_capture() -> None:
    stats = HeadStatistics()
    _feed(stats, _random_maps(5, 6), 6, 6)
    layer = stats.layers["layer"]
    assert layer.self_attention and not torch.isnan(layer.values["previous"]).any()
    cross = layer.as_cross()
    assert not cross.self_attention and torch.isnan(cross.values["distance"]).all()
    torch.testing.assert_close(cross.values["entropy_bits"], layer.values["entropy_bits"])
