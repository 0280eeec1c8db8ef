"""A streamed capture gives the same numbers as a full one, without building any layer's maps.

References: eager ``output_attentions`` of the transformers module itself, and
``nn.MultiheadAttention``'s own per-head weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from attnviz.capture import capture_attention
from attnviz.errors import UsageError
from attnviz.pooling import pool_map
from attnviz.reducers import FullMaps, PooledMaps, QueryRows, Reducers
from tests.spies import LargestTensor

transformers = pytest.importorskip("transformers")


def _llama(implementation: str) -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2,
                                      intermediate_size=48, vocab_size=97,
                                      max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.config._attn_implementation = implementation
    model.eval()
    return model  # type: ignore[no-any-return]


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(1))


def _eager_attentions(length: int) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = _llama("eager")(_ids(length), output_attentions=True)
    return tuple(out.attentions)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_full_pooled_and_row_reducers_equal_eager_attentions(implementation: str) -> None:
    reference = _eager_attentions(40)
    full, pooled, last = FullMaps(), PooledMaps(7, 9, "max"), QueryRows([-1, 3])
    model = _llama(implementation)
    with torch.no_grad(), capture_attention(model, reduce=Reducers([full, pooled, last]),
                                             query_tile=6) as maps:
        model(_ids(40))
    assert not maps.maps and list(maps.shapes.values()) == [(1, 4, 40, 40)] * 2
    for key, expected in zip(full.maps, reference, strict=True):
        torch.testing.assert_close(full.maps[key], expected, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(pooled.maps[key], pool_map(expected, 7, 9, "max")[0],
                                   rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(last.maps[key], expected[:, :, [39, 3]], rtol=1e-5,
                                   atol=2e-6)
    route = "F.scaled_dot_product_attention" if implementation == "sdpa" else "softmax"
    assert set(maps.routes.values()) == {route}


def test_streaming_leaves_the_model_output_bit_identical() -> None:
    model = _llama("sdpa")
    with torch.no_grad():
        plain = model(_ids(30)).logits
        with capture_attention(model, reduce=PooledMaps(4, 4)):
            streamed = model(_ids(30)).logits
    assert torch.equal(plain, streamed)


def test_no_layer_map_is_ever_built_on_the_sdpa_route() -> None:
    length, tile = 256, 16
    model = _llama("sdpa")
    spy = LargestTensor()
    pooled = PooledMaps(32, 32)
    with torch.no_grad(), capture_attention(model, reduce=pooled, query_tile=tile), spy:
        model(_ids(length))
    heads = 4
    assert spy.largest < heads * length * length // 4  # a quarter of one layer's maps
    assert spy.largest <= max(97 * length, heads * tile * length * 2)  # logits or tiles
    assert pooled.maps["model.layers.1.self_attn"].shape == (1, heads, 32, 32)


def test_multihead_attention_streams_from_its_inputs() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 9, 16)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, -3:] = True
    with torch.no_grad():
        _, weights = layer.self_attn(x, x, x, key_padding_mask=padding, need_weights=True,
                                     average_attn_weights=False)
        full = FullMaps()
        with capture_attention(layer, reduce=full, query_tile=4):
            out = layer(x, src_key_padding_mask=padding)
        plain = layer(x, src_key_padding_mask=padding)
    torch.testing.assert_close(full.maps["self_attn"], weights)
    torch.testing.assert_close(out, plain)


def test_streamed_heads_selection_and_errors() -> None:
    reference = _eager_attentions(12)
    model = _llama("sdpa")
    full = FullMaps()
    with torch.no_grad(), capture_attention(model, reduce=full, heads=[3, 0]):
        model(_ids(12))
    torch.testing.assert_close(full.maps["model.layers.0.self_attn"], reference[0][:, [3, 0]],
                               rtol=1e-5, atol=2e-6)
    with (pytest.raises(UsageError, match="scores are not kept"),
          capture_attention(model, reduce=full, scores=True)):
        pass
    with (pytest.raises(UsageError, match=r"query row 50 is outside 0\.\.11"), torch.no_grad(),
          capture_attention(model, reduce=QueryRows([50]))):
        model(_ids(12))


@pytest.mark.parametrize("reserve", [64 * 1024, 16])
def test_maps_streamed_to_disk_equal_the_full_capture(tmp_path: Path, reserve: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from attnviz import maps_stream

    monkeypatch.setattr(maps_stream, "HEADER_RESERVE", reserve)  # 16: the header must move
    model = _llama("sdpa")
    full = FullMaps()
    writer = maps_stream.MapsToDisk(tmp_path / "maps.safetensors")
    with torch.no_grad(), capture_attention(model, reduce=Reducers([full, writer]),
                                             query_tile=5):
        model(_ids(23))
    writer.finish({"format": "attnviz-maps"})
    saved = load_file(str(tmp_path / "maps.safetensors"))
    assert list(saved) == list(full.maps)
    for key, tensor in full.maps.items():
        assert torch.equal(saved[key], tensor)
    assert not list(tmp_path.glob("*.body"))


def test_key_tiles_are_gathered_into_rows_before_writing(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from attnviz.maps_stream import MapsToDisk
    from attnviz.tiling import attention_tiles, dense_probabilities, sdpa_problem

    gen = torch.Generator().manual_seed(0)
    problem = sdpa_problem(torch.randn(2, 3, 10, 4, generator=gen),
                           torch.randn(2, 3, 13, 4, generator=gen), is_causal=True)
    writer = MapsToDisk(tmp_path / "m.safetensors")
    writer.begin("layer", problem.shape)
    for tile in attention_tiles(problem, query_tile=3, key_tile=4):
        writer.add("layer", tile)
    writer.end("layer")
    writer.finish({})
    torch.testing.assert_close(load_file(str(tmp_path / "m.safetensors"))["layer"],
                               dense_probabilities(problem))
