"""DINO (v1) and DINOv2 hub checkpoints rebuilt from their state_dict alone (no dino/dinov2 code).

Files: ``dino_vit{small,base}{8,16}_pretrain.pth`` (facebookresearch/dino: a timm-style ViT,
no classifier head, no LayerScale), ``dinov2_vit{s,b,l,g}14_pretrain.pth`` (LayerScale
``ls1.gamma``/``ls2.gamma``, ``mask_token``, SwiGLU ``mlp.w12``/``mlp.w3`` for ViT-g, blocks
possibly chunked as ``blocks.C.N``) and ``*_reg4_pretrain.pth`` (``register_tokens``). Width,
depth, patch, MLP, registers come from shapes; heads as ``inspect`` resolves them (a config or
stored args, else the hub's width table, else ``--heads``).

Tokens are [CLS, registers..., patches]: positions are added to CLS and patches, then the
registers are inserted after CLS without positions. Positions for another grid follow the
hub's ``interpolate_pos_encoding``: DINO and plain DINOv2 resize the M x M table with bicubic
``scale_factor = ((h + 0.1) / M, (w + 0.1) / M)``, no antialias; the register models with
``size = (h, w)`` and antialias; the table is used as is when the grid is M x M on a square
image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from attnviz.checkpoint import Checkpoint
from attnviz.inspection import InspectReport
from attnviz.models.torch_transformer import ModelBuildError
from attnviz.models.vision_registry import BuiltVision, TokenLayout, match
from attnviz.models.vit_parts import (
    Block,
    Mlp,
    PatchEmbed,
    rebuild,
    resize_positions,
    resolve_heads,
    square_patches,
    square_side,
)

CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")  # DINOv2 block_chunks > 0: blocks.C.N.
PLAIN = re.compile(r"^blocks\.(\d+)\.")
INTERPOLATE_OFFSET = 0.1  # dino issue #8: the hub's work-around, kept for its weights


@dataclass(frozen=True)
class DinoSpec:
    version: int  # 1 (DINO) or 2 (DINOv2)
    dim: int
    depth: int
    heads: int
    heads_source: str
    patch: int
    channels: int
    mlp_hidden: int
    swiglu: bool
    registers: int
    pos_grid: int  # M: the position table is M x M patches (+ CLS)
    layer_scale: bool
    qkv_bias: bool
    chunked: bool
    eps: float = 1e-6

    @property
    def antialias(self) -> bool:
        """The hub's register models interpolate by size with antialias, the others by scale
        factor with the 0.1 offset."""
        return self.registers > 0

    @property
    def image_size(self) -> tuple[int, int]:
        return self.pos_grid * self.patch, self.pos_grid * self.patch


def _block_key(name: str) -> str:
    """``blocks.C.N.rest`` -> ``blocks.N.rest`` (chunked DINOv2 training checkpoints)."""
    return CHUNKED.sub(r"blocks.\2.", name)


def detect_dino(checkpoint: Checkpoint, report: InspectReport) -> DinoSpec:
    t = checkpoint.tensors
    chunked = any(CHUNKED.match(k) for k in t)
    blocks = {int(m.group(2 if chunked else 1)) for k in t
              if (m := (CHUNKED if chunked else PLAIN).match(k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise ModelBuildError(f"block indices {sorted(blocks)[:8]} are not 0..N-1",
                              path=checkpoint.path)
    first = {_block_key(k): k for k in t if _block_key(k).startswith("blocks.0.")}
    dim, channels, patch = square_patches(checkpoint, "patch_embed.proj.weight")
    side = square_side(t["pos_embed"].shape[1] - 1, "pos_embed", checkpoint.path)  # CLS first
    swiglu = "blocks.0.mlp.w12.weight" in first
    hidden_key = "blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"
    if hidden_key not in first:
        raise ModelBuildError(f"no '{hidden_key}': neither the MLP (fc1/fc2) nor the SwiGLU "
                              "(w12/w3) of the DINO hub layout", path=checkpoint.path)
    shape = t[first[hidden_key]].shape

    def rule() -> str:
        family = match(t)
        return family.record.heads_rule() if family is not None else "file"

    heads, source = resolve_heads(checkpoint, report, "blocks.", rule=rule, dim=dim)
    registers = t["register_tokens"].shape[1] if "register_tokens" in t else 0
    version = 2 if chunked or registers or "mask_token" in t else 1
    return DinoSpec(version=version, dim=dim, depth=len(blocks), heads=heads,
                    heads_source=source, patch=patch, channels=channels,
                    mlp_hidden=shape[1] if swiglu else shape[0], swiglu=swiglu,
                    registers=registers, pos_grid=side,
                    layer_scale="blocks.0.ls1.gamma" in first,
                    qkv_bias="blocks.0.attn.qkv.bias" in first, chunked=chunked)


class SwiGLU(nn.Module):
    """DINOv2's SwiGLUFFN: w12 gives [gate | up], w3 projects silu(gate) * up back."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)  # each (B, N, hidden)
        return self.w3(F.silu(gate) * up)


def _mlp(spec: DinoSpec) -> nn.Module:
    return SwiGLU(spec.dim, spec.mlp_hidden) if spec.swiglu else Mlp(spec.dim, spec.mlp_hidden)


class DinoVisionTransformer(nn.Module):
    """The hub's DinoVisionTransformer forward: tokens, pre-norm blocks, final norm, CLS."""

    def __init__(self, spec: DinoSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec.channels, spec.dim, spec.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.pos_grid ** 2, spec.dim))
        if spec.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, spec.registers, spec.dim))
        self.blocks = nn.ModuleList(Block(spec, _mlp(spec)) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.dim, eps=spec.eps)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """(1, 1 + gh*gw, C) positions for an image of ``height`` x ``width`` pixels."""
        spec, side = self.spec, self.spec.pos_grid
        grid = (height // spec.patch, width // spec.patch)
        if grid[0] * grid[1] == side * side and height == width:
            return self.pos_embed
        table = self.pos_embed.float()
        how: dict[str, Any] = {"size": grid, "antialias": True} if spec.antialias else {
            "scale_factor": ((grid[0] + INTERPOLATE_OFFSET) / side,
                             (grid[1] + INTERPOLATE_OFFSET) / side)}
        patches = resize_positions(table[:, 1:], (side, side), grid, **how)  # (1, gh*gw, C)
        return torch.cat([table[:, :1], patches], dim=1).to(self.pos_embed.dtype)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        x = self.patch_embed(images)  # (B, gh*gw, C)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)  # (B, 1 + gh*gw, C)
        x = x + self.positions(height, width)
        if self.spec.registers:  # after CLS, without positions
            x = torch.cat([x[:, :1], self.register_tokens.expand(batch, -1, -1), x[:, 1:]], 1)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]  # (B, C): the normalised CLS token


def load_dino(checkpoint: Checkpoint, report: InspectReport
              ) -> tuple[DinoVisionTransformer, DinoSpec]:
    spec = detect_dino(checkpoint, report)
    names = {_block_key(k): k for k in checkpoint.tensors}
    return rebuild(lambda: DinoVisionTransformer(spec), checkpoint, file_key=names.get), spec


def build_dino(checkpoint: Checkpoint, report: InspectReport) -> BuiltVision:
    """The vision registry's ``dino``, ``dinov2`` and ``dinov2_reg`` records."""
    model, spec = load_dino(checkpoint, report)
    parts = [f"{spec.depth} blocks", f"dim {spec.dim}", f"{spec.heads} heads "
             f"[{spec.heads_source}]", f"patch {spec.patch}"]
    parts += [f"{spec.registers} registers"] if spec.registers else []
    parts += ["LayerScale"] if spec.layer_scale else []
    parts += ["SwiGLU MLP"] if spec.swiglu else []
    name = "DINOv2" if spec.version == 2 else "DINO"
    how = "size, antialias" if spec.antialias else f"+{INTERPOLATE_OFFSET} offset"
    notes = [f"{name} positions trained for {spec.pos_grid}x{spec.pos_grid} patches; other "
             f"grids are interpolated as the hub does (bicubic, {how})"]
    return BuiltVision(model, f"{name} rebuilt from the checkpoint (hub layout): "
                       + ", ".join(parts), spec.patch, spec.image_size,
                       TokenLayout(cls=True, registers=spec.registers), blocks="blocks.",
                       notes=notes)
