"""What the ViT-like rebuilds share (timm ViT, DINO/DINOv2, torchvision ViT, CLIP, Swin): the
timm-named modules (``attn.qkv``, ``mlp.fc1``, ``ls1.gamma``, ``patch_embed.proj``), bicubic
resizing of a position table, and the reading of shapes, heads and weights from the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from attnviz.checkpoint import Checkpoint
from attnviz.errors import HeadsError, param
from attnviz.inspection import InspectReport
from attnviz.models.torch_transformer import ModelBuildError, adopt_state

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class BlockSpec(Protocol):
    """What a pre-norm ViT block needs from a rebuild's spec."""

    @property
    def dim(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def qkv_bias(self) -> bool: ...
    @property
    def layer_scale(self) -> bool: ...
    @property
    def mlp_hidden(self) -> int: ...
    @property
    def eps(self) -> float: ...


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block, LayerScale optional; ``mlp`` replaces the GELU Mlp (DINOv2's SwiGLU)."""

    def __init__(self, spec: BlockSpec, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.attn = Attention(spec.dim, spec.heads, spec.qkv_bias)
        self.norm2 = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.mlp = mlp if mlp is not None else Mlp(spec.dim, spec.mlp_hidden)
        self.ls1: nn.Module = LayerScale(spec.dim) if spec.layer_scale else nn.Identity()
        self.ls2: nn.Module = LayerScale(spec.dim) if spec.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, gh, gw) -> (B, gh*gw, C)


def resize_positions(patches: torch.Tensor, trained: tuple[int, int], grid: tuple[int, int],
                     **how: Any) -> torch.Tensor:
    """(1, h*w, C) patch positions trained for ``trained`` -> (1, gh*gw, C) for ``grid``,
    bicubic (align_corners=False); ``how`` is ``size=grid`` or the hub's ``scale_factor``,
    with ``antialias``."""
    dim = patches.shape[-1]
    square = patches.reshape(1, *trained, dim).permute(0, 3, 1, 2)  # (1, C, h, w)
    square = F.interpolate(square, mode="bicubic", align_corners=False, **how)  # (1, C, gh, gw)
    if tuple(square.shape[-2:]) != grid:
        raise ModelBuildError(f"interpolated positions {tuple(square.shape[-2:])} are not "
                              f"the {grid[0]}x{grid[1]} grid")
    return square.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


def square_patches(checkpoint: Checkpoint, key: str) -> tuple[int, int, int]:
    """(dim, channels, patch) of a square patch-embedding convolution."""
    dim, channels, patch, patch_w = checkpoint.tensors[key].shape
    if patch != patch_w:
        raise ModelBuildError(f"non-square patches {patch}x{patch_w} are not supported",
                              path=checkpoint.path)
    return dim, channels, patch


def square_side(positions: int, name: str, path: Any) -> int:
    """The side of a square grid of ``positions`` patch positions (the table ``name``)."""
    side = math.isqrt(positions)
    if side * side != positions:
        raise ModelBuildError(f"{name} of {positions} patch positions is not a square grid",
                              path=path)
    return side


def resolve_heads(checkpoint: Checkpoint, report: InspectReport, blocks: str, *,
                  noun: str = "blocks", rule: Callable[[], str] | None = None,
                  dim: int = 0) -> tuple[int, str]:
    """(heads, source) as ``inspect`` resolved them for the layers under ``blocks``; ``rule``
    names the width table the hint points at when they are unknown."""
    found = {i.heads.num_heads: i.heads.source for i in report.layers
             if i.layer.name.startswith(blocks)}
    if None in found or len(found) != 1:
        hint = f"pass {param('heads')} N"
        if rule is not None:
            hint = f"embed dim {dim} is not in the {rule()}: {hint}"
        raise HeadsError("number of heads unknown" if None in found or not found else
                         f"{noun} disagree on heads: {sorted(h or 0 for h in found)}",
                         path=checkpoint.path, hint=hint)
    heads, source = next(iter(found.items()))
    return int(heads or 0), source


def adopt_checkpoint(model: nn.Module, checkpoint: Checkpoint, *,
                     file_key: Callable[[str], str | None] | None = None,
                     float32: bool = False) -> None:
    """Fill ``model`` (built on the meta device) with the file's tensors: each of its names read
    from ``file_key(name)`` (the name itself unless given); what the file lacks is reported by
    ``adopt_state``."""
    state = {}
    for name in model.state_dict():
        key = file_key(name) if file_key is not None else name
        if key is not None and key in checkpoint.tensors:
            tensor = checkpoint.read_tensor(key)
            state[name] = tensor.float() if float32 else tensor
    adopt_state(model, state, checkpoint.path)


def rebuild(build: Callable[[], ModuleT], checkpoint: Checkpoint, *,
            file_key: Callable[[str], str | None] | None = None,
            float32: bool = False) -> ModuleT:
    """``build()`` on the meta device (no memory, no init), then filled by ``adopt_checkpoint``."""
    with torch.device("meta"):
        model = build()
    adopt_checkpoint(model, checkpoint, file_key=file_key, float32=float32)
    return model
