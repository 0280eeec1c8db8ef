"""heatmap and report never write over a file they read (--image, --input, the weights), and
render file text (tokens) as plain text, never mathtext."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from attnviz import render
from attnviz.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_heatmap_output_onto_its_own_image_is_refused_even_with_force(tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    shutil.copy(SAMPLES / "shapes_demo.png", image)
    before = image.read_bytes()
    for extra in ((), ("--force",)):
        code, output = run("heatmap", str(SAMPLES / "vit_shapes.pth"), "--image", str(image),
                           "-o", str(image), *extra)
        assert code == 2, output
        assert "input" in output and "Traceback" not in output
    assert image.read_bytes() == before
    link = tmp_path / "link.png"  # the same file through a symlink
    link.symlink_to(image)
    code, _ = run("heatmap", str(SAMPLES / "vit_shapes.pth"), "--image", str(image), "-o",
                  str(link), "--force")
    assert code == 2 and image.read_bytes() == before


def test_save_maps_onto_the_input_embeddings_is_refused(tmp_path: Path) -> None:
    embeddings = tmp_path / "x.npy"
    np.save(embeddings, np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32))
    before = embeddings.read_bytes()
    code, output = run("heatmap", str(SAMPLES / "transformer_d64_h4.pth"), "--heads", "4",
                       "--input", str(embeddings), "-o", str(tmp_path / "h.png"),
                       "--save-maps", str(embeddings), "--force")
    assert code == 2, output
    assert embeddings.read_bytes() == before
    assert not (tmp_path / "h.png").exists()


def test_report_output_onto_its_image_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "page.html"  # an image file whatever its name says
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image, format="PNG")
    before = image.read_bytes()
    code, output = run("report", str(SAMPLES / "vit_shapes.pth"), "--image", str(image), "-o",
                       str(image), "--force")
    assert code == 2, output
    assert image.read_bytes() == before


def test_tokens_with_dollar_signs_render_as_plain_text(tmp_path: Path) -> None:
    labels = ["$\\frac{a", "b$", "$x^$", "$$", "\\$"]
    out = tmp_path / "m.png"
    render.render_matrix(torch.rand(5, 5).numpy(), labels, labels, out, "png",
                         title="$\\alpha", cmap="viridis")
    assert Image.open(out).size[0] > 100
    grid = tmp_path / "g.png"
    render.render_grid([[np.eye(3)]], ["$layer$"], ["$head"], grid, "png", title="$t",
                       shared_scale=True, cmap="viridis")
    assert Image.open(grid).size[0] > 100
