"""DINO's figure (``--keep-mass``, registers), ``--point`` on rebuilt ViTs, and any ViT-like
``--model`` factory with ``--image``: token grids inferred or given, maps equal to the model's
own ``nn.MultiheadAttention`` weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.image_heatmap import ImageOptions, image_figure
from attnviz.image_inputs import vit_image
from attnviz.inspection import analyse
from attnviz.models.vision_figures import keep_mass_mask
from tests.test_vision_rebuilds import dinov2_hub, randomise, save

transformers = pytest.importorskip("transformers")
runner = CliRunner()
FACTORY = "attnviz_test_tiny_vit"
FACTORY_SOURCE = '''
import torch
from torch import nn


class TinyViT(nn.Module):
    """Patch 16, ``prefix`` learned tokens before the patches, one MHA block."""

    def __init__(self, prefix: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 16, 16)
        self.lead = nn.Parameter(torch.randn(1, prefix, 16))
        self.pos = nn.Parameter(torch.randn(1, prefix + 16, 16))
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, images, need_weights=False):
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.lead.expand(x.shape[0], -1, -1), x], 1) + self.pos
        y = self.norm(x)
        out, weights = self.attn(y, y, y, need_weights=need_weights,
                                 average_attn_weights=False)
        return (x + out, weights) if need_weights else x + out


def one_cls():
    return TinyViT(1)


def three_prefix():
    return TinyViT(3)
'''


def cli(*args: Any) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def picture(tmp_path: Path, size: tuple[int, int] = (56, 56)) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "photo.png"
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path)
    return path


def registers_file(tmp_path: Path) -> tuple[Path, Any]:
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=384, num_hidden_layers=2, num_attention_heads=6, patch_size=14,
        image_size=56, mlp_ratio=1, num_register_tokens=4, attn_implementation="eager")
    model = randomise(transformers.Dinov2WithRegistersModel(config))
    return save(tmp_path, "dinov2_vits14_reg4_pretrain.pth",
                dinov2_hub(model.state_dict(), 2)), model


def figure_of(path: Path, **options: Any) -> Any:
    ckpt = load_checkpoint(path)
    return image_figure(path, ckpt, analyse(ckpt), ImageOptions(**options))


def test_keep_mass_keeps_the_smallest_set_holding_that_mass() -> None:
    rows = torch.rand(50, 37, dtype=torch.float64) ** 3  # skewed, like attention
    for mass in (0.1, 0.6, 0.9, 1.0):
        kept = keep_mass_mask(rows, mass)
        for row, keep in zip(rows, kept, strict=True):
            total, inside = float(row.sum()), row[keep]
            assert float(inside.sum()) >= mass * total - 1e-6
            assert float(inside.sum() - inside.min()) < mass * total  # none can be dropped
            if (~keep).any():
                assert float(inside.min()) >= float(row[~keep].max())  # the largest ones


def test_keep_mass_figure_and_register_mass_against_hf(tmp_path: Path) -> None:
    path, model = registers_file(tmp_path)
    image = picture(tmp_path)
    plain, _, description = figure_of(path, image=image)
    assert description.startswith("DINOv2 rebuilt from the checkpoint (hub layout)")
    assert "6 heads [inferred (DINOv2 hub, E=384)" in description and "4 registers" in description
    pixels = vit_image(image, (56, 56), None, 14).tensor
    with torch.no_grad():
        last = model(pixel_values=pixels, output_attentions=True).attentions[-1]  # (1, H, T, T)
    on_registers = last[0, :, 0, 1:5].sum(-1)  # (H,): the CLS row's mass on the 4 registers
    saved = json.loads(plain.metadata["register_mass"])
    np.testing.assert_allclose(saved["blocks.1.attn"], on_registers.numpy(), atol=1e-4)
    assert [t.split(" · regs ")[1] for t in plain.titles[0]] == [
        f"{float(v):.0%}" for v in on_registers]
    np.testing.assert_allclose(plain.heats[0][2], last[0, 2, 0, 5:].reshape(4, 4).numpy(),
                               atol=1e-5)
    masked, _, _ = figure_of(path, image=image, keep_mass=0.6)
    for full, shown in zip(plain.heats[0], masked.heats[0], strict=True):
        inside = full[shown > 0]
        assert inside.sum() >= 0.6 * full.sum() - 1e-6
        assert inside.sum() - inside.min() < 0.6 * full.sum()
        np.testing.assert_array_equal(shown[shown > 0], inside)


def test_cli_registers_view_keep_mass_and_refusals(tmp_path: Path) -> None:
    path, _ = registers_file(tmp_path)
    image, out, maps = picture(tmp_path), tmp_path / "dino.png", tmp_path / "maps.safetensors"
    code, stdout, err = cli("heatmap", path, "--image", image, "-o", out, "--view", "registers",
                            "--keep-mass", "0.6", "--save-maps", maps)
    assert code == 0, err
    assert "2 row(s) x 6 panel(s)" in stdout and "register tokens, per head" in stdout
    with safe_open(str(maps), "pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("blocks.1.attn").shape == (1, 6, 21, 21)
    assert meta["registers"] == "4" and meta["prefix_tokens"] == "5"
    code, stdout, err = cli("heatmap", path, "--image", image, "-o", out, "--force",
                            "--size", "70x98")  # any size: positions interpolated
    assert code == 0 and "grid 5x7" in stdout, err
    timm_like = tmp_path / "no_regs.pth"
    torch.save({k: v for k, v in torch.load(path).items() if k != "register_tokens"},
               timm_like)
    for args, message in (
            ([path, "--keep-mass", "0"], "--keep-mass 0: use a fraction in (0, 1]"),
            ([path, "--prefix-tokens", "1"], "--prefix-tokens/--grid describe the tokens"),
            ([path, "--no-strict"], "--no-strict only applies with --model"),
            ([timm_like, "--view", "registers"], "this model has no register tokens"),
            ([Path(__file__).parent.parent / "sample_checkpoints" / "detr_tiny.pth",
              "--keep-mass", "0.5"], "not to DETR's")):
        code, _, err = cli("heatmap", *args, "--image", image, "-o", out, "--force")
        assert code == 2 and message in err, (args, err)
    code, _, err = cli("heatmap", path, "--seq-len", "4", "--keep-mass", "0.5", "-o", out)
    assert code == 2 and "--keep-mass does not apply without --image" in err


@pytest.mark.parametrize("registers", [0, 4])
def test_point_draws_the_row_of_the_patch_under_it(tmp_path: Path, registers: int) -> None:
    path, _ = registers_file(tmp_path)
    if not registers:
        plain = tmp_path / "plain.pth"
        state = {k: v for k, v in torch.load(path).items() if k != "register_tokens"}
        torch.save(state, plain)
        path = plain
    figure, maps, _ = figure_of(path, image=picture(tmp_path), points=((20.0, 35.0),))
    token = 1 + registers + 2 * 4 + 1  # row 35 // 14 = 2, column 20 // 14 = 1 of 4 x 4
    expected = maps["blocks.1.attn"][0, :, token, 1 + registers:].reshape(6, 4, 4)
    for head, heat in enumerate(figure.heats[0]):
        np.testing.assert_allclose(heat, expected[head].numpy(), atol=1e-6)
    assert figure.points == (((20.0, 35.0),),)


@pytest.fixture
def factory_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / f"{FACTORY}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, FACTORY, raising=False)
    return tmp_path


def factory_model(directory: Path, name: str) -> tuple[Any, Path]:
    module = __import__(FACTORY)
    torch.manual_seed(3)
    model = getattr(module, name)().eval()
    path = directory / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_factory_tokens_inferred_and_maps_equal_mha_weights(factory_weights: Path) -> None:
    model, path = factory_model(factory_weights, "three_prefix")
    image = picture(factory_weights, (80, 64))
    out, maps = factory_weights / "f.png", factory_weights / "f.safetensors"
    code, stdout, err = cli("heatmap", path, "--image", image, "--model",
                            f"{FACTORY}:three_prefix", "--size", "64", "-o", out,
                            "--save-maps", maps)
    assert code == 0, err
    assert "over 19 tokens = 3 prefix + 4x4 patches (inferred from the image size)" in stdout
    assert "token 0 is taken as CLS" in stdout
    pixels = vit_image(image, (64, 64), 64, 1).tensor
    with torch.no_grad():
        _, weights = model(pixels, need_weights=True)  # torch's own (1, H, T, T)
    with safe_open(str(maps), "pt") as handle:
        torch.testing.assert_close(handle.get_tensor("attn"), weights, atol=1e-6, rtol=1e-5)
        assert handle.metadata()["grid"] == "[4, 4]"


def test_factory_ambiguous_grids_are_asked_for(factory_weights: Path) -> None:
    _, path = factory_model(factory_weights, "one_cls")
    image, out = picture(factory_weights, (64, 64)), factory_weights / "g.png"
    common = ("heatmap", path, "--image", image, "--model", f"{FACTORY}:one_cls", "-o", out,
              "--size", "64", "--force")
    code, _, err = cli(*common)
    assert code == 2 and "attention over 17 tokens: several grids fit (4x4 + 1, 3x3 + 8)" in err
    assert "--prefix-tokens N and/or --grid HxW" in err
    for extra in (("--prefix-tokens", "1"), ("--grid", "4x4"), ("--grid", "4", "--point",
                                                                "10,50")):
        code, stdout, err = cli(*common, *extra)
        assert code == 0 and "1 prefix + 4x4 patches" in stdout, (extra, err)
    code, _, err = cli(*common, "--grid", "5x5")
    assert code == 2 and "--grid 5x5 does not fit attention over 17 tokens" in err
    code, _, err = cli(*common, "--prefix-tokens", "17")
    assert code == 2 and "--prefix-tokens 17 leaves no patch grid in 17 tokens" in err


def test_torchvision_runs_only_at_its_native_size(tmp_path: Path) -> None:
    config = transformers.ViTConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                                    intermediate_size=32, patch_size=16, image_size=32,
                                    layer_norm_eps=1e-6)
    from tests.test_vision_rebuilds import vit_torchvision

    model = randomise(transformers.ViTModel(config, add_pooling_layer=False))
    path = save(tmp_path, "vit_b_16.pth", vit_torchvision(model.state_dict(), 1, False))
    image, out = picture(tmp_path), tmp_path / "tv.png"
    code, stdout, err = cli("heatmap", path, "--image", image, "-o", out)
    assert code == 0 and "torchvision ViT rebuilt" in stdout and "12 heads" in stdout, err
    code, _, err = cli("heatmap", path, "--image", image, "-o", out, "--force", "--size", "48")
    assert code == 2 and "runs only at its native size 32x32" in err
