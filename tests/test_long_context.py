"""Long inputs: grids pooled to their pixels keep a single spike; --save-maps streams the same
tensors a plain capture holds; a pooled matrix says so."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attnviz.cli import app
from attnviz.render import render_grid

runner = CliRunner()
transformers = pytest.importorskip("transformers")


def test_a_single_spike_survives_in_the_grid_png(tmp_path: Path) -> None:
    """One 3000 x 3000 map with all mass of one row on one key: max pooling keeps the pixel."""
    panel = np.full((3000, 3000), 0.01, dtype=np.float32)
    panel[1700, 2345] = 1.0
    empty = np.full((3000, 3000), 0.5, dtype=np.float32)
    for mode, visible in (("max", True), ("mean", False)):
        out = tmp_path / f"{mode}.png"
        note = render_grid([[panel, empty]], ["layer"], ["head 0", "head 1"], out, "png",
                           title="spike", pool=mode, dpi=100)
        assert note is not None and f"by {mode}" in note
        pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)[:, :1000]  # head 0
        yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 200) & (pixels[..., 2] < 100)
        # viridis' top colour: the spike at full scale (mean pooling dilutes it below the
        # other head's 0.5, which then sets the scale)
        assert bool(yellow.any()) is visible


def _llama_dir(tmp_path: Path) -> Path:
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2,
                                      intermediate_size=48, vocab_size=97,
                                      max_position_embeddings=2048)
    torch.manual_seed(0)
    model_dir = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir


def test_streamed_save_maps_equal_eager_attentions_and_the_grid_is_pooled(
        tmp_path: Path) -> None:
    from safetensors import safe_open

    model_dir = _llama_dir(tmp_path)
    ids = [(i * 31 + 7) % 97 for i in range(600)]
    out, maps = tmp_path / "grid.png", tmp_path / "maps.safetensors"
    done = runner.invoke(app, ["heatmap", str(model_dir), "--tokens", ",".join(map(str, ids)),
                               "-o", str(out), "--save-maps", str(maps)])
    assert done.exit_code == 0, done.output
    assert "pooled" in done.output
    eager = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                              attn_implementation="eager")
    with torch.no_grad():
        reference = eager(torch.tensor([ids]), output_attentions=True).attentions
    with safe_open(str(maps), "pt") as saved:
        names = list(saved.keys())
        assert names == ["layers.0.self_attn", "layers.1.self_attn"]
        for name, expected in zip(names, reference, strict=True):
            torch.testing.assert_close(saved.get_tensor(name), expected, rtol=1e-5, atol=2e-6)
        assert "layers.0.self_attn" in saved.metadata()["layers"]
    assert Image.open(out).size[0] <= 2600


def test_a_pooled_matrix_labels_cells_by_their_first_token(tmp_path: Path) -> None:
    model_dir = _llama_dir(tmp_path)
    ids = ",".join(str(i % 97) for i in range(700))
    done = runner.invoke(app, ["heatmap", str(model_dir), "--tokens", ids, "--layer", "1",
                               "--show-heads", "0", "--pool", "mean", "-o",
                               str(tmp_path / "m.png")])
    assert done.exit_code == 0, done.output
    assert "map pooled by mean from 700x700" in done.output
    bad = runner.invoke(app, ["heatmap", str(model_dir), "--tokens", ids, "--pool", "median",
                              "-o", str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and "median" in bad.output


def test_query_last_draws_strips_over_every_key(tmp_path: Path) -> None:
    model_dir = _llama_dir(tmp_path)
    ids = ",".join(str((i * 13) % 97) for i in range(900))
    out = tmp_path / "last.png"
    done = runner.invoke(app, ["heatmap", str(model_dir), "--tokens", ids, "--query", "last",
                               "--layer", "1", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "strips" in done.output and out.stat().st_size > 0
    for flags, message in ((["--query", "2-1"], "range '2-1' is reversed"),
                           (["--query", "first"], "'first' is not a query row"),
                           (["--query", "5000"], r"outside 0\.\.899"),
                           (["--query", "last", "--view", "grid"], "takes no --view")):
        bad = runner.invoke(app, ["heatmap", str(model_dir), "--tokens", ids, *flags,
                                  "-o", str(tmp_path / "x.png")])
        assert bad.exit_code == 2, bad.output
        assert re.search(message, bad.output), bad.output
