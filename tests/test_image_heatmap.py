"""Image heatmaps: ViT/DETR rebuilds against reference computations, geometry, rollout, CLI."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from attnviz.capture import capture_attention
from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.image_inputs import IMAGENET_MEAN, IMAGENET_STD, open_rgb, vit_image
from attnviz.inspection import analyse
from attnviz.models.detr import load_detr, sine_positions
from attnviz.models.vit import VisionTransformer, ViTSpec, load_vit
from attnviz.render import overlay, upsample
from attnviz.rollout import attention_rollout

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


# --- rollout ---------------------------------------------------------------------------------


def test_rollout_matches_a_hand_computation_with_discard_ratio() -> None:
    fused1 = np.array([[0.40, 0.34, 0.26], [0.30, 0.50, 0.20], [0.17, 0.23, 0.60]])
    delta = np.array([[0.10, -0.05, -0.05], [0.0, 0.0, 0.0], [0.02, -0.02, 0.0]])
    layer1 = torch.tensor(np.stack([fused1 + delta, fused1 - delta]))[None]  # (1, 2, 3, 3)
    fused2 = np.array([[0.50, 0.30, 0.20], [0.10, 0.80, 0.10], [0.20, 0.25, 0.55]])
    layer2 = torch.tensor(np.stack([fused2, fused2]))[None]
    # discard 1/3 of 9 entries = 3, never from column 0 (so 0.17 at (2, 0) stays):
    kept1 = np.array([[0.40, 0.34, 0.00], [0.30, 0.50, 0.00], [0.17, 0.00, 0.60]])
    kept2 = np.array([[0.50, 0.30, 0.00], [0.10, 0.80, 0.00], [0.20, 0.00, 0.55]])

    def step(kept: np.ndarray) -> np.ndarray:  # add the identity, rows sum to 1
        a = kept + np.eye(3)
        return a / a.sum(axis=1, keepdims=True)

    got = attention_rollout([layer1, layer2], head_fusion="mean", discard_ratio=1 / 3)
    np.testing.assert_allclose(got[0].numpy(), step(kept2) @ step(kept1), rtol=1e-6)
    np.testing.assert_allclose(got[0].sum(-1).numpy(), np.ones(3), rtol=1e-6)
    plain = attention_rollout([layer1, layer2])
    np.testing.assert_allclose(plain[0].numpy(), step(fused2) @ step(fused1), rtol=1e-6)
    swapped = attention_rollout([layer2, layer1])  # layer order matters: later on the left
    assert not np.allclose(swapped[0].numpy(), plain[0].numpy())
    maxed = attention_rollout([layer1], head_fusion="max")
    np.testing.assert_allclose(maxed[0].numpy(), step(np.maximum(fused1 + delta, fused1 - delta)),
                               rtol=1e-6)


def test_discard_never_drops_the_cls_column() -> None:
    attention = torch.full((1, 1, 4, 4), 0.01)
    attention[..., 1:] = 0.5  # the CLS column (key 0) is the smallest everywhere
    rolled = attention_rollout([attention], discard_ratio=0.5)
    assert torch.all(rolled[0, :, 0] > 0)


# --- ViT geometry: attention set by construction -----------------------------------------------


def one_patch_vit(target: int, grid: int = 4, patch: int = 4) -> VisionTransformer:
    """A 1-block ViT whose CLS token attends (almost) only to patch ``target``."""
    tokens = grid * grid + 1
    spec = ViTSpec(dim=tokens, depth=1, heads=1, patch=patch, channels=3, mlp_hidden=4,
                   prefix_tokens=1, register_tokens=0, has_cls=True, has_dist=False,
                   pos_grid=(grid, grid), pos_includes_prefix=True, layer_scale=False,
                   qkv_bias=False, num_classes=0)
    model = VisionTransformer(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.pos_embed[0] = torch.eye(tokens) * 10  # token i carries e_i (patch embed is 0)
        model.blocks[0].norm1.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        qkv = model.blocks[0].attn.qkv.weight  # (3D, D): q rows, k rows, v rows
        qkv[0, 0] = 30.0  # q of the CLS token (dim 0)
        qkv[tokens, 1 + target] = 30.0  # k of the target patch token
    return model.eval()


@pytest.mark.parametrize("target", [0, 5, 15])
def test_one_patch_attention_lights_exactly_that_patch_region(tmp_path: Path,
                                                               target: int) -> None:
    model = one_patch_vit(target)
    image = torch.zeros(1, 3, 16, 16)
    with torch.no_grad(), capture_attention(model) as maps:
        model(image)
    cls_row = maps["blocks.0.attn"][0, 0, 0, 1:].reshape(4, 4).numpy()
    assert cls_row.argmax() == target and cls_row.max() > 0.99
    pixels = np.full((16, 16, 3), 128, np.uint8)
    blended = overlay(pixels, cls_row, vmax=float(cls_row.max()), alpha=1.0)
    brightness = blended.sum(-1)
    row, col = divmod(target, 4)
    region = np.zeros((16, 16), bool)
    region[row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] = True
    assert brightness[region].min() > brightness[~region].max()  # exactly that 4x4 block
    assert np.array_equal(upsample(cls_row, 16, 16)[region], np.full(16, cls_row.max()))


# --- rebuilds agree with an independent computation ---------------------------------------------


def reference_vit(state: dict[str, torch.Tensor], images: torch.Tensor, heads: int,
                  patch: int) -> torch.Tensor:
    """timm's ViT written out with plain functional ops (explicit softmax attention)."""
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                 stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], 1) + state["pos_embed"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    dim = x.shape[-1]
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), state[b + "norm1.weight"], state[b + "norm1.bias"], 1e-6)
        q, k, v = F.linear(h, state[b + "attn.qkv.weight"],
                           state.get(b + "attn.qkv.bias")).chunk(3, dim=-1)
        split = [t.reshape(x.shape[0], -1, heads, dim // heads).transpose(1, 2) for t in (q, k, v)]
        probs = torch.softmax(split[0] @ split[1].transpose(-2, -1) / math.sqrt(dim // heads), -1)
        out = (probs @ split[2]).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(out, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        h = F.layer_norm(x, (dim,), state[b + "norm2.weight"], state[b + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])),
                     state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
        x = x + h
    x = F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], 1e-6)
    return F.linear(x[:, 0], state["head.weight"], state["head.bias"])


def random_vit_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    spec = ViTSpec(dim=32, depth=2, heads=4, patch=8, channels=3, mlp_hidden=64,
                   prefix_tokens=1, register_tokens=0, has_cls=True, has_dist=False,
                   pos_grid=(4, 4), pos_includes_prefix=True, layer_scale=False, qkv_bias=True,
                   num_classes=5)
    model = VisionTransformer(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "vit.pth"
    torch.save({"model": state, "args": argparse.Namespace(num_heads=4)}, path)
    return path, state


def test_vit_rebuild_matches_reference_forward(tmp_path: Path) -> None:
    path, state = random_vit_file(tmp_path)
    ckpt = load_checkpoint(path)
    model, spec = load_vit(ckpt, analyse(ckpt))
    assert (spec.dim, spec.depth, spec.heads, spec.patch, spec.image_size) == (32, 2, 4, 8,
                                                                               (32, 32))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference_vit(state, images, 4, 8),
                                   atol=1e-5, rtol=1e-5)
        wide = model(torch.randn(1, 3, 32, 48))  # non-square grid: position embedding resized
    assert wide.shape == (1, 5) and torch.isfinite(wide).all()


def reference_detr_transformer(state: dict[str, torch.Tensor], src: torch.Tensor,
                               pos: torch.Tensor, heads: int) -> torch.Tensor:
    """DETR's post-norm encoder/decoder with F.multi_head_attention_forward, sequence first."""
    def attend(prefix: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, _ = F.multi_head_attention_forward(
            q, k, v, q.shape[-1], heads, state[prefix + "in_proj_weight"],
            state[prefix + "in_proj_bias"], None, None, False, 0.0,
            state[prefix + "out_proj.weight"], state[prefix + "out_proj.bias"], training=False,
            need_weights=False)
        return out

    def norm(name: str, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), state[name + ".weight"], state[name + ".bias"])

    def ffn(prefix: str, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(F.linear(x, state[prefix + "linear1.weight"],
                                 state[prefix + "linear1.bias"]))
        return F.linear(hidden, state[prefix + "linear2.weight"], state[prefix + "linear2.bias"])

    memory = src
    for i in range(2):
        p = f"transformer.encoder.layers.{i}."
        memory = norm(p + "norm1", memory + attend(p + "self_attn.", memory + pos, memory + pos,
                                                   memory))
        memory = norm(p + "norm2", memory + ffn(p, memory))
    query = state["query_embed.weight"].unsqueeze(1)  # (Q, 1, C)
    tgt = torch.zeros_like(query)
    for i in range(2):
        p = f"transformer.decoder.layers.{i}."
        tgt = norm(p + "norm1", tgt + attend(p + "self_attn.", tgt + query, tgt + query, tgt))
        tgt = norm(p + "norm2", tgt + attend(p + "multihead_attn.", tgt + query, memory + pos,
                                             memory))
        tgt = norm(p + "norm3", tgt + ffn(p, tgt))
    return norm("transformer.decoder.norm", tgt)


def test_detr_rebuild_matches_reference_and_maps_have_feature_geometry() -> None:
    ckpt = load_checkpoint(SAMPLES / "detr_tiny.pth")
    model, spec = load_detr(ckpt, analyse(ckpt))
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(SAMPLES / "detr_tiny.pth", weights_only=True)["model"]
    image = torch.randn(1, 3, 96, 160)  # non-square
    backbone = model.backbone[0].body  # type: ignore[union-attr]
    with torch.no_grad(), capture_attention(model) as maps:
        out = model(image)
        features = F.conv2d(backbone(image), state["input_proj.weight"], state["input_proj.bias"])
    fh, fw = out.feature_size
    assert (fh, fw) == (3, 5) == tuple(features.shape[-2:])
    pos = sine_positions(fh, fw, 32).flatten(1).T.unsqueeze(1)  # (hw, 1, C)
    hidden = reference_detr_transformer(state, features.flatten(2).permute(2, 0, 1), pos, 4)
    logits = F.linear(hidden.transpose(0, 1), state["class_embed.weight"],
                      state["class_embed.bias"])
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    cross = maps["transformer.decoder.layers.1.multihead_attn"]
    assert cross.shape == (1, 4, spec.queries, fh * fw)  # reshapes to the feature map h x w
    assert maps["transformer.encoder.layers.0.self_attn"].shape == (1, 4, fh * fw, fh * fw)
    assert torch.isfinite(out.boxes).all() and out.boxes.min() >= 0 and out.boxes.max() <= 1


def test_sine_positions_match_detr_definition() -> None:
    pos = sine_positions(2, 3, 4)
    assert pos.shape == (8, 2, 3)
    y = torch.tensor([1.0, 2.0]) / (2 + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(4) // 2) / 4)
    torch.testing.assert_close(pos[0, :, 0], (y / dim_t[0]).sin())
    torch.testing.assert_close(pos[1, :, 0], (y / dim_t[1]).cos())


# --- inputs ----------------------------------------------------------------------------------


def test_exif_orientation_grey_and_rgba_are_handled(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # white on the left
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    loaded = open_rgb(tmp_path / "rotated.jpg")
    assert loaded.shape == (40, 20, 3) and loaded[:10].mean() > 200  # white is now on top
    Image.fromarray(pixels[..., 0]).convert("L").save(tmp_path / "grey.png")
    assert open_rgb(tmp_path / "grey.png").shape == (20, 40, 3)
    rgba = np.zeros((20, 40, 4), np.uint8)  # fully transparent -> white backdrop
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert open_rgb(tmp_path / "clear.png").min() == 255
    (tmp_path / "not.png").write_bytes(b"nope")
    with pytest.raises(Exception, match="cannot be read as an image"):
        open_rgb(tmp_path / "not.png")


def test_vit_resize_crop_and_normalisation(tmp_path: Path) -> None:
    Image.fromarray(np.full((60, 90, 3), 200, np.uint8)).save(tmp_path / "x.png")
    prepared = vit_image(tmp_path / "x.png", (32, 32), None, 8)
    assert prepared.pixels.shape == (32, 32, 3) and prepared.original_size == (60, 90)
    expected = (200 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert abs(float(prepared.tensor[0, 0, 5, 5]) - expected) < 1e-2
    wide = vit_image(tmp_path / "x.png", (32, 32), (32, 48), 8)
    assert wide.pixels.shape == (32, 48, 3)


# --- CLI -------------------------------------------------------------------------------------


def demo_image(tmp_path: Path, size: tuple[int, int] = (120, 160)) -> Path:
    rng = np.random.default_rng(0)
    pixels = (rng.random((*size, 3)) * 80 + 80).astype(np.uint8)
    pixels[30:80, 60:120] = [230, 40, 40]
    path = tmp_path / "demo.png"
    Image.fromarray(pixels).save(path)
    return path


def assert_picture(path: Path) -> None:
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100


def test_cli_vit_grid_rollout_and_saved_geometry(tmp_path: Path) -> None:
    path, _ = random_vit_file(tmp_path)
    image = demo_image(tmp_path)
    out, maps = tmp_path / "vit.png", tmp_path / "maps.safetensors"
    code, stdout, err = cli("heatmap", str(path), "--image", str(image), "-o", str(out),
                            "--save-maps", str(maps))
    assert code == 0, err
    assert "ViT rebuilt from the checkpoint: 2 blocks, dim 32, 4 heads" in stdout
    assert "1 row(s) x 4 panel(s)" in stdout
    assert_picture(out)
    with safe_open(str(maps), "pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("blocks.1.attn").shape == (1, 4, 17, 17)
    assert meta["grid"] == "[4, 4]" and meta["prefix_tokens"] == "1"
    code, stdout, err = cli("heatmap", str(path), "--image", str(image), "-o", str(out),
                            "--view", "rollout", "--discard-ratio", "0.5", "--head-fusion",
                            "max", "--force")
    assert code == 0, err
    assert_picture(out)
    code, stdout, err = cli("heatmap", str(path), "--image", str(image), "-o", str(out),
                            "--size", "32x48", "--layer", "all", "--head", "mean", "--force")
    assert code == 0 and "2 row(s) x 1 panel(s)" in stdout, err


def test_cli_detr_queries_points_and_errors(tmp_path: Path) -> None:
    image = demo_image(tmp_path, (100, 180))
    detr = str(SAMPLES / "detr_tiny.pth")
    out = tmp_path / "detr.png"
    code, stdout, err = cli("heatmap", detr, "--image", str(image), "-o", str(out),
                            "--threshold", "0", "--top-k", "2", "--size", "160")
    assert code == 0, err
    assert "feature map 5x9" in stdout and "2 row(s) x 2 panel(s)" in stdout
    assert_picture(out)
    code, stdout, err = cli("heatmap", detr, "--image", str(image), "-o", str(out), "--query",
                            "3", "--head", "all", "--force", "--size", "160")
    assert code == 0 and "1 row(s) x 5 panel(s)" in stdout, err
    code, stdout, err = cli("heatmap", detr, "--image", str(image), "-o", str(out), "--point",
                            "90,50", "--point", "10,10", "--force")
    assert code == 0 and "2 row(s) x 1 panel(s)" in stdout, err
    for args, message in ((["--point", "900,50"], "outside the 180x100 image"),
                          (["--query", "99"], r"--query must be in 0\.\.9"),
                          (["--text", "hi"], "both give the input"),
                          (["--point", "1,1", "--query", "1"], "pick one")):
        code, _, err = cli("heatmap", detr, "--image", str(image), "-o", str(out), "--force",
                           *args)
        assert code == 2 and message.replace("\\", "") in err.replace("\\", ""), (args, err)
    code, _, err = cli("heatmap", str(SAMPLES / "mha_kvdim.pth"), "--image", str(image), "-o",
                       str(out), "--force")
    assert code == 2 and "needs a ViT" in err


# --- the trained samples show real structure -------------------------------------------------


def _training_script() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_samples", Path(__file__).resolve().parent.parent / "scripts" / "train_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_samples"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_trained_vit_cls_attention_lands_on_the_shape() -> None:
    """Through attnviz's own load and capture, on 50 fresh images: the last block's CLS
    attention (head mean, over patches) puts far more mass inside the shape's box than the box's
    share of the image."""
    train: Any = _training_script()
    ckpt = load_checkpoint(SAMPLES / "vit_shapes.pth")
    model, spec = load_vit(ckpt, analyse(ckpt))
    grid = spec.pos_grid
    data = train.make_dataset(np.random.default_rng(7), 50, spec.image_size,
                              render_size=(128, 128), grid=grid)
    with torch.no_grad(), capture_attention(model) as maps:
        logits = model(train.normalise(data.images))
    accuracy = float((logits.argmax(-1) == data.labels).float().mean())
    last = maps[f"blocks.{spec.depth - 1}.attn"]  # (50, H, T, T)
    rows = last[:, :, 0, spec.prefix_tokens:].mean(1)  # (50, patches)
    rows = rows / rows.sum(-1, keepdim=True)
    overlap = train.box_overlap(data.boxes, grid)  # (50, patches): share of each cell in the box
    mass = (rows * overlap).sum(-1)
    area = overlap.sum(-1) / overlap.shape[-1]
    ratio = float((mass / area).mean())
    assert accuracy > 0.5, accuracy  # chance is 1/3
    assert ratio > 2.0, f"CLS mass in box / box area = {ratio:.2f}"


def _hf_vision_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Tiny HF ViT and DETR directories (random weights, saved offline, no hub)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vit_dir, detr_dir = tmp_path / "hf-vit", tmp_path / "hf-detr"
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64)
    transformers.ViTModel(config).save_pretrained(vit_dir)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit_dir)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64],
                                         depths=[1, 1, 1, 1], layer_type="basic",
                                         out_features=["stage4"])
    detr = transformers.DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5,
        num_labels=3, id2label={0: "circle", 1: "square", 2: "triangle"})
    transformers.DetrForObjectDetection(detr).save_pretrained(detr_dir)
    transformers.DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}
                                    ).save_pretrained(detr_dir)
    return vit_dir, detr_dir


def test_hf_vit_and_detr_directories_with_their_image_processors(tmp_path: Path) -> None:
    vit_dir, detr_dir = _hf_vision_dirs(tmp_path)
    image = demo_image(tmp_path, (100, 150))
    out, maps = tmp_path / "hf.png", tmp_path / "maps.safetensors"
    code, stdout, err = cli("heatmap", str(vit_dir), "--image", str(image), "-o", str(out),
                            "--save-maps", str(maps))
    assert code == 0, err
    assert "ViTModel from hf-vit: 2 layers, patch 8, grid 4x4" in stdout
    assert "1 row(s) x 4 panel(s)" in stdout
    assert_picture(out)
    with safe_open(str(maps), "pt") as handle:
        assert handle.metadata()["prefix_tokens"] == "1"
        assert handle.get_tensor(next(iter(handle.keys()))).shape == (1, 4, 17, 17)
    code, stdout, err = cli("heatmap", str(vit_dir), "--image", str(image), "-o", str(out),
                            "--view", "rollout", "--force")
    assert code == 0, err
    code, stdout, err = cli("heatmap", str(detr_dir), "--image", str(image), "-o", str(out),
                            "--threshold", "0", "--top-k", "2", "--force", "--save-maps",
                            str(maps))
    assert code == 0, err
    # the processor resizes 100x150 to 64x96: a stride-32 feature map of 2x3
    assert "DetrForObjectDetection from hf-detr: feature map 2x3" in stdout
    assert "2 row(s) x 2 panel(s)" in stdout
    assert_picture(out)
    with safe_open(str(maps), "pt") as handle:
        meta = handle.metadata()
        cross = [k for k in list(handle.keys()) if k.endswith("encoder_attn")]
        assert handle.get_tensor(cross[-1]).shape == (1, 2, 5, 6)
    assert meta["feature_size"] == "[2, 3]"
    code, stdout, err = cli("heatmap", str(detr_dir), "--image", str(image), "-o", str(out),
                            "--point", "75,50", "--force")
    assert code == 0 and "1 row(s) x 1 panel(s)" in stdout, err


def reference_resnet(state: dict[str, torch.Tensor], image: torch.Tensor,
                     dilation: bool = False) -> torch.Tensor:
    """torchvision's ResNet body with frozen batch norm, written out from the keys."""
    def bn(name: str, x: torch.Tensor) -> torch.Tensor:
        scale = state[f"{name}.weight"] / torch.sqrt(state[f"{name}.running_var"] + 1e-5)
        shift = state[f"{name}.bias"] - state[f"{name}.running_mean"] * scale
        return x * scale[:, None, None] + shift[:, None, None]

    x = F.relu(bn("bn1", F.conv2d(image, state["conv1.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage in range(1, 5):
        blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")})
        dilated = dilation and stage == 4
        for index in blocks:
            p = f"layer{stage}.{index}."
            stride = 2 if index == 0 and stage > 1 and not dilated else 1
            rate = 2 if dilated else 1
            if f"{p}conv3.weight" in state:  # bottleneck: stride on the 3x3
                out = F.relu(bn(p + "bn1", F.conv2d(x, state[p + "conv1.weight"])))
                out = F.relu(bn(p + "bn2", F.conv2d(out, state[p + "conv2.weight"], stride=stride,
                                                    padding=rate, dilation=rate)))
                out = bn(p + "bn3", F.conv2d(out, state[p + "conv3.weight"]))
            else:
                out = F.relu(bn(p + "bn1", F.conv2d(x, state[p + "conv1.weight"], stride=stride,
                                                    padding=rate, dilation=rate)))
                out = bn(p + "bn2", F.conv2d(out, state[p + "conv2.weight"], padding=rate,
                                             dilation=rate))
            shortcut = x
            if f"{p}downsample.0.weight" in state:
                shortcut = bn(p + "downsample.1", F.conv2d(x, state[p + "downsample.0.weight"],
                                                           stride=stride))
            x = F.relu(out + shortcut)
    return x


def bottleneck_body(widths: tuple[int, ...] = (4, 8, 8, 16)) -> dict[str, torch.Tensor]:
    """A tiny ResNet-50-style body: bottleneck blocks, expansion 4, two blocks in stage 1."""
    torch.manual_seed(1)
    state: dict[str, torch.Tensor] = {"conv1.weight": torch.randn(8, 3, 7, 7) * 0.2}

    def bn(name: str, channels: int) -> None:
        state[f"{name}.weight"] = 1 + 0.1 * torch.randn(channels)
        state[f"{name}.bias"] = 0.1 * torch.randn(channels)
        state[f"{name}.running_mean"] = 0.1 * torch.randn(channels)
        state[f"{name}.running_var"] = 1 + 0.1 * torch.rand(channels)

    bn("bn1", 8)
    c_in = 8
    for stage, width in enumerate(widths, start=1):
        for index in range(2 if stage == 1 else 1):
            p = f"layer{stage}.{index}."
            state[p + "conv1.weight"] = torch.randn(width, c_in, 1, 1) * 0.3
            state[p + "conv2.weight"] = torch.randn(width, width, 3, 3) * 0.2
            state[p + "conv3.weight"] = torch.randn(width * 4, width, 1, 1) * 0.3
            for i, c in ((1, width), (2, width), (3, width * 4)):
                bn(f"{p}bn{i}", c)
            if index == 0:
                state[p + "downsample.0.weight"] = torch.randn(width * 4, c_in, 1, 1) * 0.3
                bn(p + "downsample.1", width * 4)
            c_in = width * 4
    return state


@pytest.mark.parametrize("dilation", [False, True])
def test_resnet_bodies_match_an_independent_reference(dilation: bool) -> None:
    from attnviz.models.resnet import ResNetBody

    image = torch.randn(1, 3, 96, 128)
    for state in (bottleneck_body(), _sample_body()):
        body = ResNetBody({k: tuple(v.shape) for k, v in state.items()}, dilation=dilation)
        body.load_state_dict(state, strict=True)
        with torch.no_grad():
            got, expected = body.eval()(image), reference_resnet(state, image, dilation)
        assert got.shape == expected.shape == (1, got.shape[1], 96 // (16 if dilation else 32),
                                               128 // (16 if dilation else 32))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _sample_body() -> dict[str, torch.Tensor]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        model = torch.load(SAMPLES / "detr_shapes.pth", weights_only=True)["model"]
    return {k[len("backbone.0.body."):]: v for k, v in model.items()
            if k.startswith("backbone.0.body.")}


def test_trained_samples_match_the_reference_forwards() -> None:
    with torch.serialization.safe_globals([argparse.Namespace]):
        vit_state = torch.load(SAMPLES / "vit_shapes.pth", weights_only=True)["model"]
        detr_state = torch.load(SAMPLES / "detr_shapes.pth", weights_only=True)["model"]
    ckpt = load_checkpoint(SAMPLES / "vit_shapes.pth")
    vit, spec = load_vit(ckpt, analyse(ckpt))
    images = torch.randn(2, 3, *spec.image_size)
    with torch.no_grad():
        torch.testing.assert_close(vit(images), reference_vit(vit_state, images, spec.heads,
                                                              spec.patch), atol=1e-4, rtol=1e-4)
    ckpt = load_checkpoint(SAMPLES / "detr_shapes.pth")
    detr, detr_spec = load_detr(ckpt, analyse(ckpt))
    image = torch.randn(1, 3, 96, 128)
    body = {k[len("backbone.0.body."):]: v for k, v in detr_state.items()
            if k.startswith("backbone.0.body.")}
    with torch.no_grad():
        out = detr(image)
        features = F.conv2d(reference_resnet(body, image, detr_spec.dilation),
                            detr_state["input_proj.weight"], detr_state["input_proj.bias"])
    assert detr_spec.encoder_layers == detr_spec.decoder_layers == 2
    fh, fw = features.shape[-2:]
    assert out.feature_size == (fh, fw)
    pos = sine_positions(fh, fw, detr_spec.hidden // 2).flatten(1).T.unsqueeze(1)
    hidden = reference_detr_transformer(detr_state, features.flatten(2).permute(2, 0, 1), pos,
                                        detr_spec.heads)
    logits = F.linear(hidden.transpose(0, 1), detr_state["class_embed.weight"],
                      detr_state["class_embed.bias"])
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)


def test_each_point_row_marks_only_its_own_point() -> None:
    """Two --point rows: each row's panels carry that row's reference pixel alone."""
    from attnviz.image_heatmap import ImageOptions, image_figure

    path = SAMPLES / "detr_shapes.pth"
    ckpt = load_checkpoint(path)
    options = ImageOptions(SAMPLES / "shapes_demo.png", size="128",
                           points=((64.0, 64.0), (10.0, 100.0)))
    figure, _, _ = image_figure(path, ckpt, analyse(ckpt), options)
    assert figure.points == (((64.0, 64.0),), ((10.0, 100.0),))
    assert len(figure.panels) == 2
