"""OpenAI CLIP / open_clip visual towers and timm Swin rebuilt from files alone, checked against
transformers: HF models with random tiny weights are converted here, in the test, to each native
layout (key renames, q|k|v packed into in_proj_weight / qkv), written to a file, and attnviz's
maps from that file must equal HF eager ``output_attentions``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    SwinConfig,
    SwinForImageClassification,
)
from transformers.models.swin.modeling_swin import window_partition as hf_window_partition

from attnviz.checkpoint import load_checkpoint
from attnviz.errors import HeadsError, UsageError
from attnviz.models.clip_visual import clip_attention_maps, detect_clip_visual
from attnviz.models.swin import geometries, layer_name, swin_attention_maps
from attnviz.models.swin_windows import window_query_map, window_received_map
from attnviz.models.torch_transformer import ModelBuildError
from tests.conftest import write_checkpoint

# ---------------------------------------------------------------------------------------------
# CLIP: HF CLIPVisionModelWithProjection -> OpenAI layout


def hf_clip(hidden: int = 128, heads: int = 2, act: str = "quick_gelu"
            ) -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=heads, image_size=32,
                              patch_size=8, projection_dim=16, hidden_act=act,
                              attn_implementation="eager")
    return CLIPVisionModelWithProjection(config).eval()


_CLIP_RENAMES = (
    (r"^vision_model\.embeddings\.class_embedding$", "class_embedding"),
    (r"^vision_model\.embeddings\.patch_embedding\.weight$", "conv1.weight"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "ln_pre."),
    (r"^vision_model\.post_layernorm\.", "ln_post."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"transformer.resblocks.\1.attn.out_proj."),
)


def _renamed(key: str, renames: Sequence[tuple[str, str]]) -> str:
    """``key`` under the first rename whose pattern it matches; every HF key must have one."""
    for pattern, repl in renames:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    raise AssertionError(f"unmapped HF key {key}")


def clip_to_openai(model: CLIPVisionModelWithProjection, prefix: str = "visual."
                   ) -> dict[str, torch.Tensor]:
    """HF weights in OpenAI CLIP's names; q, k, v packed as nn.MultiheadAttention packs them."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "visual_projection.weight":
            out[f"{prefix}proj"] = value.t().contiguous()  # OpenAI: x @ proj
            continue
        attn = re.match(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$",
                        key)
        if attn:
            base = key.rsplit(".q_proj.", 1)[0]
            kind = attn.group(2)
            packed = torch.cat([sd[f"{base}.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{prefix}transformer.resblocks.{attn.group(1)}.attn.in_proj_{kind}"] = packed
            continue
        if re.search(r"self_attn\.[kv]_proj\.", key) or key.endswith("position_ids"):
            continue
        out[prefix + _renamed(key, _CLIP_RENAMES)] = value
    return out


def _images(*size: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size)


def _hf_clip_maps(model: CLIPVisionModelWithProjection, images: torch.Tensor, **kwargs: Any
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        out = model(pixel_values=images, output_attentions=True, **kwargs)
    return list(out.attentions), out.image_embeds


def _check_clip(path: Path, model: CLIPVisionModelWithProjection, images: torch.Tensor,
                prefix: str = "visual.", **kwargs: Any) -> None:
    maps, output, spec = clip_attention_maps(load_checkpoint(path), images, **kwargs)
    expected, embeds = _hf_clip_maps(model, images, interpolate_pos_encoding=True)
    assert list(maps) == [f"{prefix}transformer.resblocks.{i}.attn" for i in range(2)]
    for name, reference in zip(maps, expected, strict=True):
        assert_close(maps[name], reference, atol=1e-5, rtol=1e-4)
    assert_close(output, embeds, atol=1e-5, rtol=1e-4)
    assert spec.heads == model.config.num_attention_heads


Writer = Callable[[Path, dict[str, torch.Tensor]], Path]


def _safetensors(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    return write_checkpoint(folder, sd, "open_clip_model.safetensors")


def _open_clip_training(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    wrapped = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    return write_checkpoint(folder, wrapped, "epoch_3.pt")


def _bin(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    return write_checkpoint(folder, sd, "open_clip_pytorch_model.bin")


@pytest.mark.parametrize("writer", [_safetensors, _open_clip_training, _bin])
def test_clip_maps_match_hf_from_each_container(tmp_path: Path, writer: Writer) -> None:
    model = hf_clip()
    path = writer(tmp_path, clip_to_openai(model))
    _check_clip(path, model, _images(32, 32, batch=2), activation="quick_gelu")


def test_clip_tower_alone_without_visual_prefix(tmp_path: Path) -> None:
    model = hf_clip()
    path = write_checkpoint(tmp_path, clip_to_openai(model, prefix=""), "tower.pth")
    _check_clip(path, model, _images(32, 32), prefix="", activation="quick_gelu")


def test_clip_other_image_size_interpolates_positions_like_hf(tmp_path: Path) -> None:
    model = hf_clip()
    path = write_checkpoint(tmp_path, clip_to_openai(model))
    _check_clip(path, model, _images(48, 40), activation="quick_gelu")


@pytest.mark.parametrize("quick", [True, False])
def test_clip_activation_from_open_clip_config(tmp_path: Path, quick: bool) -> None:
    model = hf_clip(act="quick_gelu" if quick else "gelu")
    path = write_checkpoint(tmp_path, clip_to_openai(model), "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"quick_gelu": quick, "vision_cfg": {"width": 128, "layers": 2}}}))
    _check_clip(path, model, _images(32, 32))
    spec = detect_clip_visual(load_checkpoint(path))
    assert spec.activation == ("quick_gelu" if quick else "gelu")
    assert "open_clip_config.json" in spec.activation_source


def test_clip_openai_extras_say_quick_gelu(tmp_path: Path) -> None:
    model = hf_clip()
    sd = clip_to_openai(model) | {"input_resolution": torch.tensor(32),
                                  "context_length": torch.tensor(77),
                                  "vocab_size": torch.tensor(49408)}
    path = write_checkpoint(tmp_path, sd, "openai.pth")
    _check_clip(path, model, _images(32, 32))
    assert "OpenAI" in detect_clip_visual(load_checkpoint(path)).activation_source


def test_clip_without_evidence_asks_for_the_activation(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, clip_to_openai(hf_clip()))
    with pytest.raises(UsageError, match=r"which MLP activation.*quick_gelu or gelu"):
        detect_clip_visual(load_checkpoint(path))


def test_clip_heads_outside_the_width_rule_need_heads(tmp_path: Path) -> None:
    model = hf_clip(hidden=96, heads=4)  # 96 // 64 would give 1 head: CLIP's rule fails
    path = write_checkpoint(tmp_path, clip_to_openai(model))
    with pytest.raises(HeadsError, match=r"width 96 is not a multiple of 64"):
        detect_clip_visual(load_checkpoint(path), activation="quick_gelu")
    _check_clip(path, model, _images(32, 32), heads=4, activation="quick_gelu")


def test_clip_refuses_custom_open_clip_attention(tmp_path: Path) -> None:
    sd = clip_to_openai(hf_clip()) | {
        "visual.transformer.resblocks.0.attn.logit_scale": torch.zeros(2, 1, 1)}
    path = write_checkpoint(tmp_path, sd)
    with pytest.raises(ModelBuildError, match=r"scaled cosine attention"):
        detect_clip_visual(load_checkpoint(path), activation="gelu")


# ---------------------------------------------------------------------------------------------
# Swin: HF SwinForImageClassification -> timm layout


def hf_swin() -> SwinForImageClassification:
    config = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2],
                        num_heads=[2, 2, 4], window_size=4, num_labels=5,
                        attn_implementation="eager")
    return SwinForImageClassification(config).eval()


def swin_to_timm(model: SwinForImageClassification, old: bool = False) -> dict[str, torch.Tensor]:
    """HF weights in timm's names (``old``: timm < 0.9 / Microsoft: merging at stage ends,
    ``head.weight``, stored relative_position_index), q, k, v packed into ``qkv``."""
    sd = {k.removeprefix("swin."): v for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    block = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
    renames = (
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^embeddings\.norm\.", "patch_embed.norm."),
        (rf"^{block}layernorm_before\.", r"layers.\1.blocks.\2.norm1."),
        (rf"^{block}layernorm_after\.", r"layers.\1.blocks.\2.norm2."),
        (rf"^{block}mlp\.fc(\d)\.", r"layers.\1.blocks.\2.mlp.fc\3."),
        (rf"^{block}attention\.o_proj\.", r"layers.\1.blocks.\2.attn.proj."),
        (rf"^{block}attention\.relative_position_bias\.relative_position_bias_table$",
         r"layers.\1.blocks.\2.attn.relative_position_bias_table"),
        (r"^layernorm\.", "norm."),
        (r"^classifier\.", "head." if old else "head.fc."),
    )
    for key, value in sd.items():
        if match := re.match(rf"^{block}attention\.q_proj\.(weight|bias)$", key):
            base, kind = key.rsplit(".q_proj.", 1)[0], match.group(3)
            target = f"layers.{match.group(1)}.blocks.{match.group(2)}.attn."
            out[f"{target}qkv.{kind}"] = torch.cat([sd[f"{base}.{p}_proj.{kind}"] for p in "qkv"])
            if old and kind == "weight":
                index = model.swin.get_submodule(base).relative_position_bias
                out[f"{target}relative_position_index"] = index.relative_position_index.view(
                    index.window_area, index.window_area)
            continue
        if re.search(r"attention\.[kv]_proj\.", key):
            continue
        if match := re.match(r"^encoder\.layers\.(\d+)\.downsample\.(.*)$", key):
            stage = int(match.group(1)) + (0 if old else 1)
            out[f"layers.{stage}.downsample.{match.group(2)}"] = value
            continue
        out[_renamed(key, renames)] = value
    return out


def _hf_swin_run(model: SwinForImageClassification, images: torch.Tensor
                 ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Every block's attention as HF's own modules return it (hooks on their outputs), HF's
    output_attentions (the last block of each stage) and the logits."""
    per_block: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.swin.named_modules():
        if match := re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention", name):
            key = layer_name(int(match.group(1)), int(match.group(2)))
            hooks.append(module.register_forward_hook(
                lambda _m, _a, out, key=key: per_block.__setitem__(key, out[1])))
    try:
        with torch.no_grad():
            out = model(pixel_values=images, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    return per_block, list(out.attentions), out.logits


@pytest.mark.parametrize("old", [False, True], ids=["timm", "timm-old"])
def test_swin_window_maps_match_hf(tmp_path: Path, old: bool) -> None:
    model = hf_swin()
    path = write_checkpoint(tmp_path, {"model": swin_to_timm(model, old)}, "swin.pth")
    images = _images(32, 32, batch=2)
    maps, geo, spec = swin_attention_maps(load_checkpoint(path), images)
    per_block, last_blocks, _ = _hf_swin_run(model, images)
    assert list(maps) == spec.layer_names == list(per_block)
    for name in maps:
        assert_close(maps[name], per_block[name], atol=1e-5, rtol=1e-4)
    for s, reference in enumerate(last_blocks):  # HF's output_attentions: each stage's last
        assert_close(maps[layer_name(s, 1)], reference, atol=1e-5, rtol=1e-4)
    assert [g.shift for g in geo.values()] == [(0, 0), (2, 2)] * 2 + [(0, 0)] * 2
    assert maps[layer_name(0, 1)].shape == (2 * 16, 2, 16, 16)  # (B * windows, H, N, N)


def test_swin_logits_match_hf(tmp_path: Path) -> None:
    from attnviz.models.swin import load_swin

    model = hf_swin()
    path = write_checkpoint(tmp_path, swin_to_timm(model), "swin.safetensors")
    rebuilt, spec = load_swin(load_checkpoint(path))
    images = _images(32, 32)
    assert spec.image_size == (32, 32)
    with torch.no_grad():
        assert_close(rebuilt(images), _hf_swin_run(model, images)[2], atol=1e-4, rtol=1e-4)


def _hf_window_coords(rows: int, cols: int, window: int, shift: int) -> torch.Tensor:
    """(windows, N, 2): the original (row, col) of each window slot, cut by HF's own
    window_partition after the roll its Swin applies."""
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    rolled = torch.roll(grid[None].float(), shifts=(-shift, -shift), dims=(1, 2))
    return hf_window_partition(rolled, window).reshape(-1, window * window, 2).long()


@pytest.mark.parametrize("stage_block", [(0, 0), (0, 1), (1, 1)])
def test_swin_maps_placed_back_on_the_image(tmp_path: Path, stage_block: tuple[int, int]) -> None:
    model = hf_swin()
    path = write_checkpoint(tmp_path, swin_to_timm(model), "swin.safetensors")
    maps, geo, _ = swin_attention_maps(load_checkpoint(path), _images(32, 32))
    name = layer_name(*stage_block)
    g, attention = geo[name], maps[name]
    coords = _hf_window_coords(*g.grid, g.window[0], g.shift[0])
    for query in [(0, 0), (g.grid[0] - 1, 1), (3, g.grid[1] - 2)]:
        (window, slot), = [(int(w), int(i)) for w, i in (coords == torch.tensor(query)).all(-1)
                           .nonzero()]
        expected = torch.zeros(g.heads, *g.grid)
        rows, cols = coords[window].unbind(-1)
        expected[:, rows, cols] = attention[window, :, slot]
        assert_close(window_query_map(attention, g, query), expected)
    received = torch.zeros(g.heads, *g.grid)
    for window in range(g.windows):
        rows, cols = coords[window].unbind(-1)
        received[:, rows, cols] = attention[window].mean(dim=1)  # over the window's queries
    assert_close(window_received_map(attention, g), received)


def test_swin_padded_grid_keeps_each_query_mass(tmp_path: Path) -> None:
    """A size whose stage-1 grid (10 rows) is not whole windows: timm pads after the roll.
    Each placed query map holds exactly its attention on real tokens (padding has no place)."""
    path = write_checkpoint(tmp_path, swin_to_timm(hf_swin()), "swin.safetensors")
    maps, geo, _ = swin_attention_maps(load_checkpoint(path), _images(40, 32))
    g = geo[layer_name(1, 1)]
    assert g.grid == (10, 8) and g.padded == (12, 8) and g.shift == (2, 2)
    assert geo[layer_name(2, 1)].shift == (2, 0)  # 5 rows > window 4 shift, 4 columns do not
    attention = maps[layer_name(1, 1)]
    for query in [(0, 0), (9, 7), (5, 3)]:
        placed = window_query_map(attention, g, query)
        assert placed.sum(dim=(1, 2)).le(1 + 1e-6).all()
        assert (placed > 0).sum(dim=(1, 2)).le(g.area).all()


def test_swin_refuses_a_tampered_relative_position_index(tmp_path: Path) -> None:
    sd = swin_to_timm(hf_swin(), old=True)
    key = "layers.0.blocks.1.attn.relative_position_index"
    sd[key] = sd[key].flip(0).contiguous()
    path = write_checkpoint(tmp_path, sd, "swin.pth")
    with pytest.raises(ModelBuildError, match=r"relative_position_index' differs"):
        swin_attention_maps(load_checkpoint(path), _images(32, 32))


def test_swin_refuses_an_image_smaller_than_a_window(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, swin_to_timm(hf_swin()), "swin.safetensors")
    spec = swin_attention_maps(load_checkpoint(path), _images(32, 32))[2]
    with pytest.raises(UsageError, match=r"stage 2 has a 2x2 grid, smaller than its 4x4 window"):
        geometries(spec, (16, 16))
