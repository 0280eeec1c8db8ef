"""``attnviz heatmap FILE --image`` end to end for OpenAI CLIP state_dicts, open_clip training
files, traced CLIP TorchScript archives and timm Swin files: the maps saved by the command equal
HF eager ``output_attentions`` of the model the file was converted from (the converters of
tests/test_clip_swin.py), ``inspect`` recognises each family, ``report --image`` draws CLIP and
says it does not draw Swin, and what the files cannot say is asked for, never guessed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.testing import assert_close
from typer.testing import CliRunner

from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.image_heatmap import ImageOptions, image_figure
from attnviz.inspection import analyse
from attnviz.models.family import recognise
from attnviz.models.swin import detect_swin, geometries, layer_name
from tests.conftest import write_checkpoint
from tests.test_clip_swin import (
    _hf_swin_run,
    _hf_window_coords,
    clip_to_openai,
    hf_clip,
    hf_swin,
    swin_to_timm,
)
from tests.test_torchscript import traced_clip

transformers = pytest.importorskip("transformers")
runner = CliRunner()
# the reference facts' normalisations (docs/reference): CLIP's own, and ImageNet's for Swin
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cli(*args: Any) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def picture(tmp_path: Path, size: int = 32) -> Path:
    """An image at the models' native size, so the command resizes nothing."""
    path = tmp_path / "photo.png"
    pixels = (np.random.default_rng(3).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def pixels(path: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
    x = x.permute(2, 0, 1).float() / 255.0  # (3, H, W)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


def saved_maps(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in list(handle.keys())}, dict(handle.metadata())


def draw(checkpoint: Path, image: Path, tmp_path: Path, *args: Any) -> tuple[str, Path]:
    out, maps = tmp_path / "figure.png", tmp_path / "maps.safetensors"
    code, stdout, err = cli("heatmap", checkpoint, "--image", image, "-o", out,
                            "--save-maps", maps, "--force", *args)
    assert code == 0, err
    assert Image.open(out).size[0] > 100
    return stdout, maps


def check_clip(maps_file: Path, hf: Any, image: Path, prefix: str = "visual.") -> None:
    maps, meta = saved_maps(maps_file)
    with torch.no_grad():
        expected = hf(pixel_values=pixels(image, CLIP_MEAN, CLIP_STD),
                      output_attentions=True).attentions
    names = [f"{prefix}transformer.resblocks.{i}.attn" for i in range(len(expected))]
    assert [n for n in maps if n in names] == names
    for name, reference in zip(names, expected, strict=True):
        assert_close(maps[name], reference, atol=1e-5, rtol=1e-4)
    assert json.loads(meta["grid"]) == [4, 4] and meta["prefix_tokens"] == "1"


# ---------------------------------------------------------------------------------------------
# CLIP


def test_openai_state_dict_with_activation_flag(tmp_path: Path) -> None:
    hf = hf_clip()
    path = write_checkpoint(tmp_path, clip_to_openai(hf), "clip_vit.pth")
    image = picture(tmp_path)
    code, _, err = cli("heatmap", path, "--image", image, "-o", tmp_path / "x.png")
    assert code == 2 and "--activation quick_gelu or gelu" in err  # the file does not say
    stdout, maps = draw(path, image, tmp_path, "--activation", "quick_gelu")
    assert "CLIP visual tower rebuilt from the checkpoint: 2 blocks, width 128, 2 heads" in stdout
    assert "MLP activation: QuickGELU (given)" in stdout and "CLIP's mean/std" in stdout
    check_clip(maps, hf, image)


def test_open_clip_training_file_reads_its_config(tmp_path: Path) -> None:
    hf = hf_clip(act="gelu")
    state = {f"module.{k}": v for k, v in clip_to_openai(hf).items()}
    path = write_checkpoint(tmp_path, {"epoch": 3, "name": "run", "state_dict": state},
                            "epoch_3.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"quick_gelu": False, "vision_cfg": {"width": 128, "layers": 2}}}))
    image = picture(tmp_path)
    stdout, maps = draw(path, image, tmp_path)
    assert "MLP activation: GELU (open_clip_config.json quick_gelu)" in stdout
    check_clip(maps, hf, image)


def test_traced_torchscript_archive(tmp_path: Path) -> None:
    path, _, _, hf = traced_clip(tmp_path)
    image = picture(tmp_path)
    stdout, maps = draw(path, image, tmp_path)
    assert "TorchScript class of visual.transformer.resblocks.0.mlp.gelu" in stdout
    assert "its code was not run" in stdout
    check_clip(maps, hf, image)


def test_tower_alone_heads_from_the_flag(tmp_path: Path) -> None:
    hf = hf_clip(hidden=96, heads=4)  # 96 is no multiple of 64: CLIP's width rule cannot say
    path = write_checkpoint(tmp_path, clip_to_openai(hf, prefix=""), "tower.pth")
    image = picture(tmp_path)
    code, _, err = cli("heatmap", path, "--image", image, "-o", tmp_path / "x.png",
                       "--activation", "quick_gelu")
    assert code == 2 and "--heads N" in err
    stdout, maps = draw(path, image, tmp_path, "--activation", "quick_gelu", "--heads", "4")
    assert "4 heads [--heads]" in stdout
    check_clip(maps, hf, image, prefix="")


def test_report_draws_clip(tmp_path: Path) -> None:
    path, _, _, _ = traced_clip(tmp_path)
    out = tmp_path / "report.html"
    code, stdout, err = cli("report", path, "--image", picture(tmp_path), "-o", out)
    assert code == 0, err
    assert "CLIP visual tower rebuilt" in stdout
    page = out.read_text(encoding="utf-8")
    assert "visual.transformer.resblocks.1.attn" in page and "rollout" in page


@pytest.mark.parametrize(("args", "message"), [
    (("--activation", "relu"), "'relu' is not a CLIP MLP activation: use quick_gelu or gelu"),
    (("--activation", "gelu", "--model", "x:y"),
     "--activation does not apply to a --model factory"),
])
def test_clip_activation_refusals(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    path = write_checkpoint(tmp_path, clip_to_openai(hf_clip()), "clip.pth")
    code, _, err = cli("heatmap", path, "--image", picture(tmp_path), "-o", tmp_path / "x.png",
                       *args)
    assert code == 2 and message in err, err


# ---------------------------------------------------------------------------------------------
# Swin


@pytest.fixture
def swin(tmp_path: Path) -> tuple[Path, Any, Path]:
    model = hf_swin()
    path = write_checkpoint(tmp_path, swin_to_timm(model), "swin_tiny.safetensors")
    return path, model, picture(tmp_path)


def test_swin_maps_and_geometry_match_hf(tmp_path: Path, swin: tuple[Path, Any, Path]) -> None:
    path, model, image = swin
    stdout, maps_file = draw(path, image, tmp_path)
    assert "Swin rebuilt from the checkpoint: 3 stages, depths [2, 2, 2]" in stdout
    assert "1 row(s) x 4 panel(s)" in stdout  # the last block of the last stage: 4 heads
    maps, meta = saved_maps(maps_file)
    per_block, _, _ = _hf_swin_run(model, pixels(image, IMAGENET_MEAN, IMAGENET_STD))
    assert list(maps) == list(per_block)
    for name, reference in per_block.items():
        assert_close(maps[name], reference, atol=1e-5, rtol=1e-4)
    windows = json.loads(meta["windows"])
    assert windows[layer_name(0, 1)]["shift"] == [2, 2] and windows[layer_name(0, 1)][
        "stride"] == 2
    assert windows[layer_name(2, 1)]["grid"] == [4, 4] and meta["windowed"] == "1"


def test_swin_figure_is_hf_attention_placed_back(swin: tuple[Path, Any, Path]) -> None:
    path, model, image = swin
    ckpt = load_checkpoint(path)
    per_block, _, _ = _hf_swin_run(model, pixels(image, IMAGENET_MEAN, IMAGENET_STD))
    name = layer_name(0, 1)  # shifted windows
    geo = geometries(detect_swin(ckpt), (32, 32))[name]
    coords = _hf_window_coords(*geo.grid, geo.window[0], geo.shift[0])  # HF's own partition
    attention = per_block[name]  # (windows, H, N, N)
    figure, _, _ = image_figure(path, ckpt, analyse(ckpt),
                                ImageOptions(image=image, layer="1", points=((13.0, 30.0),)))
    query = torch.tensor([30 // 2, 13 // 2])  # the token under pixel (x 13, y 30), stride 2
    (window, slot), = (coords == query).all(-1).nonzero().tolist()
    rows, cols = coords[window].unbind(-1)
    for head in range(geo.heads):
        expected = torch.zeros(geo.grid)
        expected[rows, cols] = attention[window, head, slot]
        assert_close(torch.as_tensor(figure.heats[0][head]), expected)
    assert figure.titles[0][0] == f"{name} · (13,30) · head 0"
    received, _, _ = image_figure(path, ckpt, analyse(ckpt), ImageOptions(image=image, layer="1"))
    expected = torch.zeros(geo.heads, *geo.grid)
    for w in range(geo.windows):
        rows, cols = coords[w].unbind(-1)
        expected[:, rows, cols] = attention[w].mean(dim=1)  # over the window's queries
    assert_close(torch.as_tensor(np.stack(received.heats[0])), expected)


def test_swin_stages_with_other_head_counts_leave_empty_cells(
        tmp_path: Path, swin: tuple[Path, Any, Path]) -> None:
    path, _, image = swin
    stdout, _ = draw(path, image, tmp_path, "--layer", "3-4", "--point", "5,5")
    assert "2 row(s) x 4 panel(s)" in stdout and "rows with fewer heads" in stdout


@pytest.mark.parametrize(("args", "message"), [
    (("--view", "rollout"), "--view rollout: Swin's attention is windowed"),
    (("--view", "registers"), "it has no register tokens"),
    (("--keep-mass", "0.6"), "--keep-mass thresholds a CLS row"),
    (("--layer", "mean"), "select blocks, not 'mean'"),
    (("--query", "2"), "--query picks DETR queries; Swin takes --point x,y"),
    (("--activation", "gelu"), "--activation with --image applies to CLIP visual files, not "
                               "timm Swin"),
    (("--size", "16"), "at 16x16 stage 2 has a 2x2 grid, smaller than its 4x4 window"),
])
def test_swin_refusals(tmp_path: Path, swin: tuple[Path, Any, Path], args: tuple[str, ...],
                       message: str) -> None:
    path, _, image = swin
    code, _, err = cli("heatmap", path, "--image", image, "-o", tmp_path / "x.png", *args)
    assert code == 2 and message in err, err


def test_report_says_it_does_not_draw_swin(tmp_path: Path,
                                            swin: tuple[Path, Any, Path]) -> None:
    path, _, image = swin
    code, _, err = cli("report", path, "--image", image, "-o", tmp_path / "r.html")
    assert code == 2
    assert "attnviz report does not draw timm Swin files" in err and "attnviz heatmap" in err
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------------------------
# inspect


def inspect_sources(path: Path) -> set[tuple[int, str]]:
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return {(a["num_heads"], a["num_heads_source"])
            for a in json.loads(result.stdout)["attention"]}


def test_inspect_recognises_each_family(tmp_path: Path) -> None:
    hf = hf_clip()
    files = {
        "OpenAI CLIP / open_clip checkpoint": write_checkpoint(
            tmp_path / "a", clip_to_openai(hf), "clip.pth"),
        "CLIP-style visual tower alone": write_checkpoint(
            tmp_path / "b", clip_to_openai(hf, prefix=""), "tower.safetensors"),
        "a Swin checkpoint (timm layout": write_checkpoint(
            tmp_path / "c", swin_to_timm(hf_swin()), "swin.safetensors"),
    }
    (tmp_path / "d").mkdir()
    files["OpenAI CLIP / open_clip checkpoint (visual"] = traced_clip(tmp_path / "d")[0]
    for title, path in files.items():
        ckpt = load_checkpoint(path)
        family = recognise(ckpt, analyse(ckpt))
        assert family is not None and family.vision and title in family.description
    clip_heads = {(2, "inferred (CLIP visual, E=128): vision_config.num_attention_heads")}
    assert inspect_sources(files["OpenAI CLIP / open_clip checkpoint"]) == clip_heads
    assert inspect_sources(files["OpenAI CLIP / open_clip checkpoint (visual"]) == clip_heads
    assert inspect_sources(files["CLIP-style visual tower alone"]) == {
        (2, "inferred (CLIP visual, E=128): num_heads")}
    assert (4, "shape of layers.2.blocks.1.attn.relative_position_bias_table") in \
        inspect_sources(files["a Swin checkpoint (timm layout"])


# ---------------------------------------------------------------------------------------------
# HF Dinov2WithRegisters directories: the registers view


def test_hf_dinov2_with_registers_directory_shows_registers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
        image_size=56, mlp_ratio=1, num_register_tokens=4, attn_implementation="eager")
    directory = tmp_path / "hf-dinov2-reg"
    model = transformers.Dinov2WithRegistersModel(config).eval()
    model.save_pretrained(directory)
    processor = transformers.BitImageProcessor(
        size={"height": 56, "width": 56}, do_center_crop=False)
    processor.save_pretrained(directory)
    image = picture(tmp_path, 56)
    stdout, maps_file = draw(directory, image, tmp_path, "--view", "registers")
    assert "2 row(s) x 4 panel(s)" in stdout  # the CLS row, then patches -> registers
    _, meta = saved_maps(maps_file)
    assert meta["registers"] == "4"
    inputs = processor(images=Image.open(image).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        last = model(**inputs, output_attentions=True).attentions[-1]  # (1, H, T, T)
    mass = json.loads(meta["register_mass"])
    (values,) = mass.values()
    np.testing.assert_allclose(values, last[0, :, 0, 1:5].sum(-1).numpy(), atol=1e-4)
