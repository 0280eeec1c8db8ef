"""`heatmap --window`: a query/key range captured alone, at full resolution.

Reference: eager ``output_attentions`` of the transformers LLaMA module itself, sliced."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from attnviz.capture import capture_attention
from attnviz.cli import app
from attnviz.errors import UsageError
from attnviz.window import Window, WindowMaps, parse_window
from tests.spies import LargestTensor

transformers = pytest.importorskip("transformers")
runner = CliRunner()


def _config() -> Any:
    return transformers.LlamaConfig(hidden_size=32, num_attention_heads=4,
                                    num_key_value_heads=2, num_hidden_layers=2,
                                    intermediate_size=48, vocab_size=97,
                                    max_position_embeddings=1024)


def _llama(implementation: str) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config())
    model.config._attn_implementation = implementation
    return model.eval()  # type: ignore[no-any-return]


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(1))


def _eager(length: int) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(_llama("eager")(_ids(length), output_attentions=True).attentions)


def test_the_window_grammar() -> None:
    assert parse_window("10-19") == Window((10, 19), (10, 19))
    assert parse_window(" q5-9 , k0-30 ") == Window((5, 9), (0, 30))
    assert parse_window("K3-4") == Window(None, (3, 4))
    assert parse_window("q7") == Window((7, 7), None)
    assert parse_window("q5-9,k0-30").describe() == "window queries 5-9 × keys 0-30"
    assert parse_window("4-8").describe() == "window 4-8"
    for text, message in (("", "an empty window"), (" , ", "an empty window"),
                          ("9-3", r"range '9-3' is reversed: write '3-9'"),
                          ("k9-3", r"write 'k3-9'"),
                          ("a-b", "'a-b' is not a window"), ("-5-9", "is not a window"),
                          ("q1-2,q3-4", "gives the queries twice"),
                          ("1-2,k3-4", "gives the keys twice")):
        with pytest.raises(UsageError, match=message) as caught:
            parse_window(text)
        assert caught.value.param == "window"


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("text", ["12-27", "q30-39,k5-20", "k0-44", "q44"])
def test_window_maps_equal_the_slice_of_eager_attentions(implementation: str,
                                                         text: str) -> None:
    length = 45
    reference = _eager(length)
    window = parse_window(text)
    kept = WindowMaps(window, cells=64)
    model = _llama(implementation)
    with torch.no_grad(), capture_attention(model, reduce=kept, query_tile=7) as maps:
        model(_ids(length))
    assert not maps.maps and not kept.outside
    q0, q1 = window.queries or (0, length - 1)
    k0, k1 = window.keys or (0, length - 1)
    for key, expected in zip(kept.maps, reference, strict=True):
        assert kept.shapes[key] == (1, 4, q1 - q0 + 1, k1 - k0 + 1)
        torch.testing.assert_close(kept.maps[key], expected[:, :, q0:q1 + 1, k0:k1 + 1],
                                   rtol=1e-5, atol=2e-6)


def test_only_the_window_rows_are_computed() -> None:
    length, heads = 384, 4
    model = _llama("sdpa")
    kept = WindowMaps(parse_window("100-115"), cells=64)
    spy = LargestTensor()
    with torch.no_grad(), capture_attention(model, reduce=kept), spy:
        model(_ids(length))
    # 16 query rows over every key per tile, never a layer's (H, L, L)
    assert spy.largest <= max(97 * length, heads * 16 * length * 2)
    assert spy.largest < heads * length * length // 8
    assert kept.maps["model.layers.0.self_attn"].shape == (1, heads, 16, 16)


def test_a_window_wider_than_its_panel_is_pooled() -> None:
    length = 60
    reference = _eager(length)
    from attnviz.pooling import pool_map

    kept = WindowMaps(parse_window("q0-59,k10-49"), cells=16, mode="max")
    model = _llama("sdpa")
    with torch.no_grad(), capture_attention(model, reduce=kept, query_tile=9):
        model(_ids(length))
    expected, info = pool_map(reference[1][:, :, :, 10:50], 16, 16, "max")
    torch.testing.assert_close(kept.maps["model.layers.1.self_attn"], expected, rtol=1e-5,
                               atol=2e-6)
    assert kept.info["model.layers.1.self_attn"] == info and not info.exact


# ---- the command ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("window") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_config()).save_pretrained(model_dir)
    return model_dir


IDS = [(i * 31 + 7) % 97 for i in range(300)]
TOKENS = ",".join(map(str, IDS))


def test_matrix_view_draws_the_window_with_its_tokens(llama_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from attnviz import render

    drawn: dict[str, Any] = {}

    def spy(matrix: Any, query: list[str], key: list[str], output: Path, fmt: str, *,
            title: str, cmap: str = "viridis") -> None:
        drawn.update(matrix=matrix, query=query, key=key, title=title)
        output.write_bytes(b"")

    monkeypatch.setattr(render, "render_matrix", spy)
    done = runner.invoke(app, ["heatmap", str(llama_dir), "--tokens", TOKENS, "--window",
                               "q250-269,k240-289", "--layer", "1", "--show-heads", "2", "-o",
                               str(tmp_path / "m.png")])
    assert done.exit_code == 0, done.output
    assert "window queries 250-269 × keys 240-289: 20x50 of the 300x300 map" in done.output
    assert "pooled" not in done.output
    eager = transformers.AutoModelForCausalLM.from_pretrained(llama_dir,
                                                              attn_implementation="eager")
    with torch.no_grad():
        expected = eager(torch.tensor([IDS]), output_attentions=True).attentions[1]
    torch.testing.assert_close(torch.from_numpy(drawn["matrix"]),
                               expected[0, 2, 250:270, 240:290], rtol=1e-5, atol=2e-6)
    assert drawn["query"] == [f"#{IDS[i]}" for i in range(250, 270)]
    assert drawn["key"] == [f"#{IDS[i]}" for i in range(240, 290)]
    assert "window queries 250-269 × keys 240-289" in drawn["title"]


def test_grid_and_layer_mean_views_of_a_window(llama_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "grid.png"
    done = runner.invoke(app, ["heatmap", str(llama_dir), "--tokens", TOKENS, "--window",
                               "100-139", "--show-heads", "0,3", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "grid: 2 layer row(s) x 2 head column(s)" in done.output
    assert "window 100-139: 40x40 of the 300x300 map" in done.output
    assert Image.open(out).size[0] > 0
    done = runner.invoke(app, ["heatmap", str(llama_dir), "--tokens", TOKENS, "--window",
                               "k0-9", "--layer", "mean", "--show-heads", "mean", "-o",
                               str(tmp_path / "mean.png")])
    assert done.exit_code == 0, done.output
    assert "matrix" in done.output and "300x10 of the 300x300 map" in done.output


@pytest.mark.parametrize(("flags", "message"), [
    (["--window", "250-320"], r"--window: queries 250-320 are outside 0\.\.299 of layer "
                              r"'layers\.0\.self_attn'"),
    (["--window", "k5-300"], r"--window: keys 5-300 are outside 0\.\.299"),
    (["--window", "20-10"], r"--window: range '20-10' is reversed: write '10-20'"),
    (["--window", ""], "--window: an empty window: use A-B"),
    (["--window", "first"], "--window: 'first' is not a window"),
    (["--window", "1-5", "--query", "last"], "--window zooms into maps, --query draws strips"),
])
def test_window_errors_name_the_flag(llama_dir: Path, tmp_path: Path, flags: list[str],
                                     message: str) -> None:
    done = runner.invoke(app, ["heatmap", str(llama_dir), "--tokens", TOKENS, *flags, "-o",
                               str(tmp_path / "x.png")])
    assert done.exit_code == 2, done.output
    assert re.search(message, done.output), done.output
    assert len(done.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_window_is_refused_for_images(tmp_path: Path) -> None:
    samples = Path(__file__).resolve().parent.parent / "sample_checkpoints"
    done = runner.invoke(app, ["heatmap", str(samples / "vit_shapes.pth"), "--image",
                               str(samples / "shapes_demo.png"), "--window", "1-4", "-o",
                               str(tmp_path / "x.png")])
    assert done.exit_code == 2, done.output
    assert re.search(r"--window does not apply to --image", done.output), done.output
