"""A ViT in the timm layout, rebuilt from its state_dict alone (no timm).

Patch size, width, depth, MLP ratio, class/distillation/register tokens and LayerScale come
from shapes; heads are resolved as ``inspect`` does. Position embeddings are interpolated
(bicubic, like timm) for other image sizes and non-square grids. Attention runs through
``F.scaled_dot_product_attention``, so ``capture_attention`` sees it as any fused model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from attnviz.checkpoint import Checkpoint
from attnviz.errors import param
from attnviz.inspection import InspectReport
from attnviz.models.torch_transformer import ModelBuildError
from attnviz.models.vision_registry import BuiltVision, TokenLayout
from attnviz.models.vit_parts import (
    Block,
    PatchEmbed,
    rebuild,
    resize_positions,
    resolve_heads,
    square_patches,
)

__all__ = ["Block", "ViTSpec", "VisionTransformer", "build_timm_vit", "detect_vit", "load_vit"]


@dataclass(frozen=True)
class ViTSpec:
    dim: int
    depth: int
    heads: int
    patch: int
    channels: int
    mlp_hidden: int
    prefix_tokens: int  # class + distillation + register tokens
    register_tokens: int
    has_cls: bool
    has_dist: bool
    pos_grid: tuple[int, int]  # the grid the position embedding was trained for
    pos_includes_prefix: bool
    layer_scale: bool
    qkv_bias: bool
    num_classes: int
    eps: float = 1e-6

    @property
    def image_size(self) -> tuple[int, int]:
        return self.pos_grid[0] * self.patch, self.pos_grid[1] * self.patch


def detect_vit(checkpoint: Checkpoint, report: InspectReport) -> ViTSpec:
    t = checkpoint.tensors
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight")
    missing = [k for k in needed if k not in t]
    if missing:
        raise ModelBuildError(f"not a timm-layout ViT: no '{missing[0]}'", path=checkpoint.path,
                              hint=f"pass {param('factory')} package.module:factory for other "
                                   "models")
    if "register_tokens" in t:  # DINOv2's registers: read as timm, maps would lose them
        raise ModelBuildError("'register_tokens' is DINOv2's layout, not timm's",
                              path=checkpoint.path, hint="attnviz rebuilds it as DINOv2 with "
                              "registers (attnviz.models.dino)")
    dim, channels, patch = square_patches(checkpoint, "patch_embed.proj.weight")
    depth = len({m.group(1) for k in t if (m := re.match(r"blocks\.(\d+)\.", k))})
    heads, _ = resolve_heads(checkpoint, report, "blocks.")
    has_cls, has_dist = "cls_token" in t, "dist_token" in t
    registers = t["reg_token"].shape[1] if "reg_token" in t else 0
    prefix = int(has_cls) + int(has_dist) + registers
    positions = t["pos_embed"].shape[1]
    grid_tokens = positions - (int(has_cls) + int(has_dist))  # timm: registers get no position
    includes_prefix = True
    side = math.isqrt(grid_tokens)
    if side * side != grid_tokens:  # 'no_embed_class' models embed patches only
        side, includes_prefix = math.isqrt(positions), False
        if side * side != positions:
            raise ModelBuildError(f"pos_embed of {positions} positions is not a square grid",
                                  path=checkpoint.path)
    head = t.get("head.weight")
    return ViTSpec(
        dim=dim, depth=depth, heads=heads, patch=patch, channels=channels,
        mlp_hidden=t["blocks.0.mlp.fc1.weight"].shape[0], prefix_tokens=prefix,
        register_tokens=registers, has_cls=has_cls, has_dist=has_dist, pos_grid=(side, side),
        pos_includes_prefix=includes_prefix, layer_scale="blocks.0.ls1.gamma" in t,
        qkv_bias="blocks.0.attn.qkv.bias" in t,
        num_classes=head.shape[0] if head is not None and len(head.shape) == 2 else 0)


class VisionTransformer(nn.Module):
    """timm's VisionTransformer forward (pre-norm blocks, final norm, token pooling)."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec.channels, spec.dim, spec.patch)
        if spec.has_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        if spec.has_dist:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        if spec.register_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, spec.register_tokens, spec.dim))
        positions = spec.pos_grid[0] * spec.pos_grid[1] + (
            int(spec.has_cls) + int(spec.has_dist) if spec.pos_includes_prefix else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, spec.dim))
        self.blocks = nn.Sequential(*[Block(spec) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.head: nn.Module = (nn.Linear(spec.dim, spec.num_classes) if spec.num_classes
                                else nn.Identity())

    def position_embedding(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix positions, patch positions) for a ``grid``, interpolated when it differs."""
        spec = self.spec
        prefix_count = int(spec.has_cls) + int(spec.has_dist) if spec.pos_includes_prefix else 0
        prefix, patches = self.pos_embed[:, :prefix_count], self.pos_embed[:, prefix_count:]
        if grid != spec.pos_grid:
            patches = resize_positions(patches, spec.pos_grid, grid, size=grid)
        return prefix, patches

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        grid = (images.shape[-2] // spec.patch, images.shape[-1] // spec.patch)
        x = self.patch_embed(images)  # (B, gh*gw, C)
        prefix_pos, patch_pos = self.position_embedding(grid)
        batch = x.shape[0]
        front = []
        if spec.has_cls:
            front.append(self.cls_token.expand(batch, -1, -1))
        if spec.has_dist:
            front.append(self.dist_token.expand(batch, -1, -1))
        x = x + patch_pos
        if front:
            lead = torch.cat(front, dim=1)  # (B, cls+dist, C)
            if spec.pos_includes_prefix:
                lead = lead + prefix_pos
            x = torch.cat([lead, x], dim=1)
        if spec.register_tokens:  # registers sit after class/dist tokens, without positions
            split = int(spec.has_cls) + int(spec.has_dist)
            x = torch.cat([x[:, :split], self.reg_token.expand(batch, -1, -1), x[:, split:]], 1)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.tokens(images)))
        return self.head(x[:, 0] if self.spec.has_cls else x.mean(dim=1))


def load_vit(checkpoint: Checkpoint, report: InspectReport) -> tuple[VisionTransformer, ViTSpec]:
    spec = detect_vit(checkpoint, report)
    return rebuild(lambda: VisionTransformer(spec), checkpoint), spec


def build_timm_vit(checkpoint: Checkpoint, report: InspectReport) -> BuiltVision:
    """The vision registry's ``timm_vit`` record."""
    model, spec = load_vit(checkpoint, report)
    description = (f"ViT rebuilt from the checkpoint: {spec.depth} blocks, dim {spec.dim}, "
                   f"{spec.heads} heads, patch {spec.patch}")
    tokens = TokenLayout(cls=spec.has_cls, extra=int(spec.has_dist),
                         registers=spec.register_tokens)
    return BuiltVision(model, description, spec.patch, spec.image_size, tokens, blocks="blocks.")
