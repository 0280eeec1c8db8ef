"""DINO, DINOv2 (with and without registers) and torchvision ViT files rebuilt by attnviz give
transformers' own eager ``output_attentions``.

Each test builds the HF model with random weights, converts its state_dict to the native
layout here (key renames, q|k|v packing, LayerScale, SwiGLU, MHA in_proj), saves it under
tmp_path with no config, and compares the maps of attnviz's rebuild from that file with HF's.
Where HF does not interpolate positions as the hub does (plain DINOv2 and DINO: bicubic with
the 0.1 offset), the oracle is an HF model built at the new size whose position table was
resized by ``torch.nn.functional.interpolate`` with the hub's arguments.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from typer.testing import CliRunner

from attnviz.capture import capture_attention
from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.errors import HeadsError
from attnviz.inspection import analyse
from attnviz.models.family import recognise
from attnviz.models.torch_transformer import ModelBuildError
from attnviz.models.vision_registry import BuiltVision, match, resolve
from attnviz.models.vit import load_vit

transformers = pytest.importorskip("transformers")
runner = CliRunner()
Tensors = dict[str, torch.Tensor]


def randomise(model: Any, seed: int = 0) -> Any:
    """Every parameter random (LayerNorm weights around 1), so no map is uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "token" in name or "position" in name:
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise * 1.5 / math.sqrt(p[0].numel()))
            else:
                p.copy_(noise * 0.3 + (1.0 if "norm" in name and name.endswith("weight")
                                       else 0.0))
    return model.eval()


def packed(sd: Tensors, prefix: str, kind: str) -> torch.Tensor:
    return torch.cat([sd[f"{prefix}{p}_proj.{kind}"] for p in "qkv"])  # (3E, ...) rows q|k|v


def dinov2_hub(sd: Tensors, layers: int, chunks: int = 0) -> Tensors:
    """HF Dinov2 / Dinov2WithRegisters -> facebookresearch/dinov2 hub keys."""
    out = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"],
           "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    for i in range(layers):
        hf = f"encoder.layer.{i}."
        hub = f"blocks.{i // max(1, math.ceil(layers / chunks))}.{i}." if chunks else \
            f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{hub}attn.qkv.{kind}"] = packed(sd, f"{hf}attention.", kind)
            out[f"{hub}attn.proj.{kind}"] = sd[f"{hf}attention.o_proj.{kind}"]
            for norm in ("norm1", "norm2"):
                out[f"{hub}{norm}.{kind}"] = sd[f"{hf}{norm}.{kind}"]
            if f"{hf}mlp.gate_proj.{kind}" in sd:  # SwiGLU: w12 = [gate | up], w3 = down
                out[f"{hub}mlp.w12.{kind}"] = torch.cat([sd[f"{hf}mlp.gate_proj.{kind}"],
                                                         sd[f"{hf}mlp.up_proj.{kind}"]])
                out[f"{hub}mlp.w3.{kind}"] = sd[f"{hf}mlp.down_proj.{kind}"]
            else:
                for fc in ("fc1", "fc2"):
                    out[f"{hub}mlp.{fc}.{kind}"] = sd[f"{hf}mlp.{fc}.{kind}"]
        out[f"{hub}ls1.gamma"] = sd[f"{hf}layer_scale1.lambda1"]
        out[f"{hub}ls2.gamma"] = sd[f"{hf}layer_scale2.lambda1"]
    return out


def vit_dino(sd: Tensors, layers: int) -> Tensors:
    """HF ViTModel -> facebookresearch/dino keys (a timm-style ViT, no head)."""
    out = {"cls_token": sd["embeddings.cls_token"],
           "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    for i in range(layers):
        hf, hub = f"layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{hub}norm1.{kind}"] = sd[f"{hf}layernorm_before.{kind}"]
            out[f"{hub}attn.qkv.{kind}"] = packed(sd, f"{hf}attention.", kind)
            out[f"{hub}attn.proj.{kind}"] = sd[f"{hf}attention.o_proj.{kind}"]
            out[f"{hub}norm2.{kind}"] = sd[f"{hf}layernorm_after.{kind}"]
            for fc in ("fc1", "fc2"):
                out[f"{hub}mlp.{fc}.{kind}"] = sd[f"{hf}mlp.{fc}.{kind}"]
    return out


def vit_torchvision(sd: Tensors, layers: int, old_mlp: bool) -> Tensors:
    """HF ViTModel -> torchvision's VisionTransformer keys (MHA in_proj, mlp.0/3 or
    mlp.linear_1/2), with a random classifier head."""
    out = {"class_token": sd["embeddings.cls_token"],
           "encoder.pos_embedding": sd["embeddings.position_embeddings"],
           "conv_proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "conv_proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "encoder.ln.weight": sd["layernorm.weight"], "encoder.ln.bias": sd["layernorm.bias"],
           "heads.head.weight": torch.randn(10, sd["layernorm.weight"].shape[0]),
           "heads.head.bias": torch.randn(10)}
    fc = ("linear_1", "linear_2") if old_mlp else ("0", "3")
    for i in range(layers):
        hf, tv = f"layers.{i}.", f"encoder.layers.encoder_layer_{i}."
        out[f"{tv}self_attention.in_proj_weight"] = packed(sd, f"{hf}attention.", "weight")
        out[f"{tv}self_attention.in_proj_bias"] = packed(sd, f"{hf}attention.", "bias")
        for kind in ("weight", "bias"):
            out[f"{tv}self_attention.out_proj.{kind}"] = sd[f"{hf}attention.o_proj.{kind}"]
            out[f"{tv}ln_1.{kind}"] = sd[f"{hf}layernorm_before.{kind}"]
            out[f"{tv}ln_2.{kind}"] = sd[f"{hf}layernorm_after.{kind}"]
            out[f"{tv}mlp.{fc[0]}.{kind}"] = sd[f"{hf}mlp.fc1.{kind}"]
            out[f"{tv}mlp.{fc[1]}.{kind}"] = sd[f"{hf}mlp.fc2.{kind}"]
    return out


def save(tmp_path: Path, name: str, state: Tensors) -> Path:
    path = tmp_path / name
    torch.save({k: v.clone().contiguous() for k, v in state.items()}, path)
    return path


def rebuilt(path: Path, heads: tuple[str, ...] = ()) -> BuiltVision:
    ckpt = load_checkpoint(path)
    found = match(ckpt.tensors)
    assert found is not None and found.record.build
    built: BuiltVision = resolve(found.record.build)(ckpt, analyse(ckpt, heads))
    return built


def attnviz_maps(built: BuiltVision, pixels: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), capture_attention(built.model) as maps:
        built.model(pixels)
    return [maps[n] for n in maps if n.startswith(built.blocks)]


def hf_maps(model: Any, pixels: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model(pixel_values=pixels, output_attentions=True).attentions)


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert float(theirs[-1].std()) > 1e-3  # the maps are not uniform


def hub_positions(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The hub's interpolate_pos_encoding for DINO / plain DINOv2, with torch's interpolate."""
    side = math.isqrt(table.shape[1] - 1)
    square = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, M, M)
    resized = F.interpolate(square, scale_factor=((grid[0] + 0.1) / side,
                                                  (grid[1] + 0.1) / side), mode="bicubic")
    return torch.cat([table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, table.shape[-1])],
                     dim=1)  # (1, 1 + gh*gw, C)


def resized_oracle(model: Any, config_class: Any, side: int, grid: tuple[int, int],
                   **extra: Any) -> Any:
    """The same HF model at ``side`` pixels, positions resized as the hub does."""
    config = config_class(**{**model.config.to_dict(), "image_size": side})
    config._attn_implementation = "eager"
    other = type(model)(config, **extra).eval()
    state = dict(model.state_dict())
    key = "embeddings.position_embeddings"
    state[key] = hub_positions(state[key], grid)
    other.load_state_dict(state)
    return other


def inspect_json(path: Path, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["inspect", str(path), "--json", *args])
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_dinov2_hub_file_matches_hf_and_the_hub_interpolation(tmp_path: Path) -> None:
    config = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=2,
                                       num_attention_heads=6, patch_size=14, image_size=56,
                                       mlp_ratio=1, attn_implementation="eager")
    model = randomise(transformers.Dinov2Model(config))
    path = save(tmp_path, "dinov2_vits14_pretrain.pth", dinov2_hub(model.state_dict(), 2))
    data = inspect_json(path)  # no config: ViT-S width 384 -> the hub's 6 heads, inferred
    assert {(a["num_heads"], a["num_heads_source"]) for a in data["attention"]} == {
        (6, "inferred (DINOv2 hub, E=384): num_heads")}
    family = recognise(load_checkpoint(path), analyse(load_checkpoint(path)))
    assert family is not None and family.vision and "DINOv2 hub" in family.description
    built = rebuilt(path)
    assert (built.patch, built.native_size, built.tokens.prefix) == (14, (56, 56), 1)
    native = torch.randn(1, 3, 56, 56)
    assert_same(attnviz_maps(built, native), hf_maps(model, native))
    other = torch.randn(1, 3, 84, 84)  # 6 x 6 patches from a 4 x 4 table
    ours = attnviz_maps(built, other)
    oracle = resized_oracle(model, transformers.Dinov2Config, 84, (6, 6))
    assert_same(ours, hf_maps(oracle, other))
    plain_hf = hf_maps(model, other)  # HF's own Dinov2 resizes without the 0.1 offset
    assert not torch.allclose(ours[-1], plain_hf[-1], atol=1e-4)


@pytest.mark.parametrize("size", [(56, 56), (70, 98)])
def test_dinov2_with_registers_matches_hf_at_any_size(tmp_path: Path,
                                                      size: tuple[int, int]) -> None:
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=384, num_hidden_layers=2, num_attention_heads=6, patch_size=14,
        image_size=56, mlp_ratio=1, num_register_tokens=4, attn_implementation="eager")
    model = randomise(transformers.Dinov2WithRegistersModel(config))
    path = save(tmp_path, "dinov2_vits14_reg4_pretrain.pth",
                dinov2_hub(model.state_dict(), 2))
    found = match(load_checkpoint(path).tensors)
    assert found is not None and found.record.name == "dinov2_reg"
    built = rebuilt(path)
    assert (built.tokens.prefix, built.tokens.registers) == (5, 4)
    pixels = torch.randn(1, 3, *size)
    ours = attnviz_maps(built, pixels)
    assert ours[-1].shape[-1] == 5 + (size[0] // 14) * (size[1] // 14)
    assert_same(ours, hf_maps(model, pixels))


def test_register_tokens_are_never_read_as_a_timm_vit(tmp_path: Path) -> None:
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, patch_size=14,
        image_size=28, mlp_ratio=1, num_register_tokens=2)
    state = dinov2_hub(randomise(transformers.Dinov2WithRegistersModel(config)).state_dict(), 1)
    del state["mask_token"]  # exports without it still hold registers
    path = save(tmp_path, "reg.pth", state)
    ckpt = load_checkpoint(path)
    found = match(ckpt.tensors)
    assert found is not None and found.record.name == "dinov2_reg"
    with pytest.raises(ModelBuildError, match=r"register_tokens.*DINOv2"):
        load_vit(ckpt, analyse(ckpt, ("4",)))


def test_dinov2_swiglu_chunked_blocks_and_heads_asked_for(tmp_path: Path) -> None:
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, patch_size=14, image_size=42,
                                       use_swiglu_ffn=True, attn_implementation="eager")
    model = randomise(transformers.Dinov2Model(config))
    state = dinov2_hub(model.state_dict(), 2, chunks=2)
    assert "blocks.1.1.mlp.w12.weight" in state
    path = save(tmp_path, "dinov2_chunked.pth", state)
    data = inspect_json(path)  # width 32 is no hub model: unknown, and said so
    assert {a["num_heads"] for a in data["attention"]} == {None}
    assert any("--heads" in w for w in data["warnings"])
    with pytest.raises(HeadsError, match=r"embed dim 32 is not in the DINOv2 hub defaults"):
        rebuilt(path)
    assert {a["num_heads_source"] for a in inspect_json(path, "--heads", "4")["attention"]} == {
        "--heads"}
    built = rebuilt(path, ("4",))
    assert "SwiGLU" in built.description
    pixels = torch.randn(1, 3, 42, 42)
    assert_same(attnviz_maps(built, pixels), hf_maps(model, pixels))


def test_dino_v1_hub_file_matches_hf_vit_at_native_and_other_sizes(tmp_path: Path) -> None:
    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                                    intermediate_size=96, patch_size=16, image_size=64,
                                    layer_norm_eps=1e-6, attn_implementation="eager")
    model = randomise(transformers.ViTModel(config, add_pooling_layer=False))
    path = save(tmp_path, "dino_deitsmall16_pretrain.pth", vit_dino(model.state_dict(), 2))
    found = match(load_checkpoint(path).tensors)
    assert found is not None and found.record.name == "dino"
    data = inspect_json(path)
    assert {(a["num_heads"], a["num_heads_source"]) for a in data["attention"]} == {
        (3, "inferred (DINO hub, E=192): num_heads")}
    built = rebuilt(path)
    assert built.description.startswith("DINO rebuilt") and built.native_size == (64, 64)
    native = torch.randn(1, 3, 64, 64)
    assert_same(attnviz_maps(built, native), hf_maps(model, native))
    other = torch.randn(1, 3, 96, 96)
    oracle = resized_oracle(model, transformers.ViTConfig, 96, (6, 6), add_pooling_layer=False)
    assert_same(attnviz_maps(built, other), hf_maps(oracle, other))


@pytest.mark.parametrize("old_mlp", [False, True])
def test_torchvision_vit_matches_hf_vit(tmp_path: Path, old_mlp: bool) -> None:
    config = transformers.ViTConfig(hidden_size=768, num_hidden_layers=1,
                                    num_attention_heads=12, intermediate_size=64, patch_size=16,
                                    image_size=64, layer_norm_eps=1e-6,
                                    attn_implementation="eager")
    model = randomise(transformers.ViTModel(config, add_pooling_layer=False))
    path = save(tmp_path, "vit_b_16-c867db91.pth",
                vit_torchvision(model.state_dict(), 1, old_mlp))
    data = inspect_json(path)
    assert {(a["num_heads"], a["num_heads_source"]) for a in data["attention"]} == {
        (12, "inferred (torchvision ViT, E=768): num_heads")}
    built = rebuilt(path)
    assert not built.any_size and built.native_size == (64, 64)
    pixels = torch.randn(1, 3, 64, 64)
    assert_same(attnviz_maps(built, pixels), hf_maps(model, pixels))
    assert rebuilt(path, ("8",)).model.encoder.layers[0].self_attention.num_heads == 8
