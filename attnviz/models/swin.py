"""A Swin Transformer in timm's layout, rebuilt from its state_dict alone (no timm).

Keys: ``patch_embed.proj`` / ``patch_embed.norm``, ``layers.S.blocks.B.{norm1, attn.qkv,
attn.relative_position_bias_table, attn.proj, norm2, mlp.fc1, mlp.fc2}``, patch merging
``layers.S.downsample.{norm, reduction}``, ``norm``, ``head.fc``. timm >= 0.9 merges at the
start of stages 1.. (``layers.S.downsample``, S >= 1); older timm and Microsoft's own
checkpoints merge at the end of stages ..-1 and name the classifier ``head``: those keys are
read where timm's ``checkpoint_filter_fn`` moves them. Per stage, heads and the window come
from ``relative_position_bias_table [(2w-1)^2, H]``; ``relative_position_index`` is recomputed
from the window and a stored copy must equal it. Attention runs per window (every odd block
shifted by w // 2 with timm's -100 mask; a stage whose grid equals its window neither shifts
nor splits) through ``F.scaled_dot_product_attention``, so ``capture_attention`` records
(B * windows, H, w*w, w*w) per block, as HF's Swin returns them. attnviz.models.swin_windows
places those maps back on the image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from attnviz.capture import AttentionMaps, capture_attention
from attnviz.checkpoint import Checkpoint
from attnviz.errors import UsageError
from attnviz.models.swin_windows import WindowGeometry, mask_regions, relative_position_index
from attnviz.models.torch_transformer import ModelBuildError
from attnviz.models.vit_parts import Mlp, adopt_checkpoint

ANCHOR = "layers.0.blocks.0.attn.relative_position_bias_table"
EPS = 1e-5  # nn.LayerNorm's default, which timm's Swin uses


@dataclass(frozen=True)
class SwinStage:
    dim: int  # channels of the stage's blocks
    depth: int
    heads: int
    head_dim: int
    window: int
    mlp_hidden: int
    merges: bool  # a patch merging (halving the grid) opens the stage


@dataclass(frozen=True)
class SwinSpec:
    patch: int
    channels: int
    stages: tuple[SwinStage, ...]
    qkv_bias: bool
    num_classes: int
    old_layout: bool  # merging at stage ends and 'head.weight' (timm < 0.9, Microsoft)

    @property
    def image_size(self) -> tuple[int, int]:
        """The size whose last stage fills exactly one window (224 for window 7, 384 for 12):
        the size every released Swin was trained at; the file itself does not record it."""
        merges = sum(stage.merges for stage in self.stages)
        side = self.patch * self.stages[-1].window * 2 ** merges
        return side, side

    @property
    def layer_names(self) -> list[str]:
        return [layer_name(s, b) for s, stage in enumerate(self.stages) for b in range(stage.depth)]


def layer_name(stage: int, block: int) -> str:
    """The capture name of a block's window attention: ``layers.S.blocks.B.attn``."""
    return f"layers.{stage}.blocks.{block}.attn"


def recognise_swin(names: Collection[str]) -> bool:
    """timm-layout Swin: patch embedding plus window attention with a relative bias table
    (check before timm ViT, which shares ``patch_embed.proj.weight``)."""
    return "patch_embed.proj.weight" in names and ANCHOR in names


def _count(names: Collection[str], pattern: str) -> int:
    return len({m.group(1) for n in names if (m := re.match(pattern, n))})


def detect_swin(checkpoint: Checkpoint) -> SwinSpec:
    t, path = checkpoint.tensors, checkpoint.path
    if not recognise_swin(t):
        raise ModelBuildError(f"not a timm-layout Swin: no '{ANCHOR}'", path=path)
    dim0, channels, patch, patch_w = t["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise ModelBuildError(f"non-square patches {patch}x{patch_w} are not supported", path=path)
    count = _count(t, r"layers\.(\d+)\.blocks\.0\.attn\.qkv\.weight$")
    merged = {s for s in range(count + 1) if f"layers.{s}.downsample.reduction.weight" in t}
    old = merged == set(range(count - 1)) and count > 1
    if merged != set(range(1, count)) and not old:
        raise ModelBuildError(f"patch merging at stages {sorted(merged)} fits neither timm "
                              f"layout for {count} stages", path=path)
    stages = []
    for s in range(count):
        depth = _count(t, rf"layers\.{s}\.blocks\.(\d+)\.attn\.qkv\.weight$")
        tables = {tuple(t[f"layers.{s}.blocks.{b}.attn.relative_position_bias_table"].shape)
                  for b in range(depth)
                  if f"layers.{s}.blocks.{b}.attn.relative_position_bias_table" in t}
        if len(tables) != 1:
            raise ModelBuildError(f"stage {s}: relative position tables differ or are missing: "
                                  f"{sorted(tables)}", path=path)
        rows, heads = next(iter(tables))
        side = math.isqrt(rows)
        if side * side != rows or side % 2 == 0:
            raise ModelBuildError(f"stage {s}: a relative position table of {rows} rows is not "
                                  "(2w - 1)^2 for a square window w", path=path)
        first = f"layers.{s}.blocks.0."
        dim = t[f"{first}norm1.weight"].shape[0]
        attn_dim = t[f"{first}attn.qkv.weight"].shape[0] // 3
        if attn_dim % heads:
            raise ModelBuildError(f"stage {s}: qkv of {3 * attn_dim} rows does not split into "
                                  f"3 x {heads} heads", path=path)
        stages.append(SwinStage(dim, depth, heads, attn_dim // heads, (side + 1) // 2,
                                t[f"{first}mlp.fc1.weight"].shape[0], s > 0))
    if stages[0].dim != dim0:
        raise ModelBuildError(f"patch embedding gives {dim0} channels, stage 0 expects "
                              f"{stages[0].dim}", path=path)
    head = t.get("head.weight" if old else "head.fc.weight")
    return SwinSpec(patch, channels, tuple(stages), "layers.0.blocks.0.attn.qkv.bias" in t,
                    head.shape[0] if head is not None and len(head.shape) == 2 else 0, old)


def geometries(spec: SwinSpec, image_size: tuple[int, int]) -> dict[str, WindowGeometry]:
    """Every block's window geometry for an image of ``image_size`` (H, W) pixels, as timm
    computes it (``_calc_window_shift``: a dimension no longer than the window neither splits
    nor shifts); refuses a grid smaller than a window, which would need a resized table."""
    if image_size[0] % spec.patch or image_size[1] % spec.patch:
        raise UsageError(f"image size {image_size[0]}x{image_size[1]} is not a multiple of the "
                         f"patch {spec.patch}", param="size")
    grid = (image_size[0] // spec.patch, image_size[1] // spec.patch)
    stride, out = spec.patch, {}
    for s, stage in enumerate(spec.stages):
        if stage.merges:
            grid, stride = ((grid[0] + 1) // 2, (grid[1] + 1) // 2), stride * 2
        w = stage.window
        if min(grid) < w:
            least = spec.image_size
            raise UsageError(f"at {image_size[0]}x{image_size[1]} stage {s} has a "
                             f"{grid[0]}x{grid[1]} grid, smaller than its {w}x{w} window",
                             param="size", hint=f"use at least {least[0]}x{least[1]}")
        window = (w, w)
        for b in range(stage.depth):
            shift = tuple(0 if r <= w or b % 2 == 0 else w // 2 for r in grid)
            padded = tuple(-(-r // w) * w for r in grid)
            out[layer_name(s, b)] = WindowGeometry(s, b, grid, window, (shift[0], shift[1]),
                                                   (padded[0], padded[1]), stride, stage.heads)
    return out


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B * windows, wh * ww, C), windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window[0], window[0], w // window[1], window[1], c)  # (B,nh,wh,nw,ww,C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], size: tuple[int, int]
                   ) -> torch.Tensor:
    """(B * windows, wh * ww, C) -> (B, Hp, Wp, C)."""
    nh, nw = size[0] // window[0], size[1] // window[1]
    c = windows.shape[-1]
    x = windows.view(-1, nh, nw, window[0], window[1], c)  # (B, nh, nw, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, size[0], size[1], c)


class WindowAttention(nn.Module):
    relative_position_index: torch.Tensor

    def __init__(self, dim: int, stage: SwinStage, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads, self.window = stage.heads, stage.window
        attn_dim = stage.heads * stage.head_dim
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim)
        rows = (2 * stage.window - 1) ** 2
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, stage.heads))
        # filled by load_swin from the window, never from the file (non-persistent, as timm)
        self.register_buffer("relative_position_index", torch.zeros(0, dtype=torch.long),
                             persistent=False)

    def bias(self) -> torch.Tensor:
        area = self.window * self.window
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(area, area, -1).permute(2, 0, 1).unsqueeze(0)  # (1, H, N, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b_, n, _ = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1)  # (B_, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B_, H, N, d)
        attn_mask = self.bias()  # (1, H, N, N)
        if mask is not None:
            windows = mask.shape[0]
            expanded = mask.view(1, windows, 1, n, n).expand(b_ // windows, -1, self.num_heads,
                                                             -1, -1)  # (B, nW, H, N, N)
            attn_mask = attn_mask + expanded.reshape(-1, self.num_heads, n, n)  # (B_, H, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B_, H, N, d)
        return self.proj(out.transpose(1, 2).reshape(b_, n, -1))


class SwinBlock(nn.Module):
    def __init__(self, stage: SwinStage, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(stage.dim, eps=EPS)
        self.attn = WindowAttention(stage.dim, stage, qkv_bias)
        self.norm2 = nn.LayerNorm(stage.dim, eps=EPS)
        self.mlp = Mlp(stage.dim, stage.mlp_hidden)
        self.geometry: WindowGeometry | None = None  # set by the model before each forward

    def _attend(self, x: torch.Tensor, geo: WindowGeometry) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        shift = geo.shift
        if any(shift):  # timm rolls the real grid, then pads
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = F.pad(x, (0, 0, 0, geo.padded[1] - w, 0, geo.padded[0] - h))  # (B, Hp, Wp, C)
        mask = None
        if any(shift):
            regions = mask_regions(geo).to(x.device)  # (Hp, Wp)
            slots = window_partition(regions[None, :, :, None].float(), geo.window)[..., 0]
            differ = slots[:, None, :] != slots[:, :, None]  # (nW, N, N): other region
            mask = torch.zeros(differ.shape, dtype=x.dtype, device=x.device).masked_fill(
                differ, -100.0)
        out = self.attn(window_partition(x, geo.window), mask)  # (B * nW, N, C)
        x = window_reverse(out, geo.window, geo.padded)[:, :h, :w]  # (B, H, W, C)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.geometry is not None, "SwinTransformer.forward sets each block's geometry"
        x = x + self._attend(self.norm1(x), self.geometry)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=EPS)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = x.shape[1], x.shape[2]
        # channel order x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (Swin's)
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5)  # (B,h,w,dc,dr,C)
        return self.reduction(self.norm(x.flatten(3)))  # (B, H/2, W/2, out)


class SwinStageModule(nn.Module):
    def __init__(self, spec: SwinSpec, s: int) -> None:
        super().__init__()
        stage = spec.stages[s]
        if stage.merges:
            self.downsample = PatchMerging(spec.stages[s - 1].dim, stage.dim)
        self.blocks = nn.Sequential(*[SwinBlock(stage, spec.qkv_bias)
                                      for _ in range(stage.depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        out: torch.Tensor = self.blocks(x)
        return out


class PatchEmbed(nn.Module):
    def __init__(self, spec: SwinSpec) -> None:
        super().__init__()
        dim = spec.stages[0].dim
        self.proj = nn.Conv2d(spec.channels, dim, spec.patch, spec.patch)
        self.norm = nn.LayerNorm(dim, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, C, h, w) -> (B, h, w, C)


class Head(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(1, 2)))  # average over the final grid


class SwinTransformer(nn.Module):
    """timm's SwinTransformer forward (NHWC): patch embed + norm, stages, norm, pooled head."""

    def __init__(self, spec: SwinSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        self.layers = nn.Sequential(*[SwinStageModule(spec, s) for s in range(len(spec.stages))])
        self.norm = nn.LayerNorm(spec.stages[-1].dim, eps=EPS)
        if spec.num_classes:
            self.head = Head(spec.stages[-1].dim, spec.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        found = geometries(self.spec, (images.shape[-2], images.shape[-1]))
        for name, module in self.named_modules():
            if isinstance(module, SwinBlock):
                module.geometry = found[f"{name}.attn"]
        x = self.norm(self.layers(self.patch_embed(images)))  # (B, h, w, C)
        return self.head(x) if self.spec.num_classes else x


def _file_key(spec: SwinSpec, name: str) -> str:
    """Where a model tensor sits in the file (timm's checkpoint_filter_fn, in reverse)."""
    if not spec.old_layout:
        return name
    moved = re.sub(r"^layers\.(\d+)\.downsample\.",
                   lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", name)
    return re.sub(r"^head\.fc\.", "head.", moved)


def load_swin(checkpoint: Checkpoint) -> tuple[SwinTransformer, SwinSpec]:
    """The rebuilt Swin with the file's weights (float32), and its spec."""
    spec = detect_swin(checkpoint)
    with torch.device("meta"):
        model = SwinTransformer(spec)
    for name, module in model.named_modules():
        if isinstance(module, WindowAttention):
            index = relative_position_index(module.window)
            stored = f"{name}.relative_position_index"
            kept = checkpoint.read_tensor(stored) if stored in checkpoint.tensors else None
            if kept is not None and (kept.numel() != index.numel() or not torch.equal(
                    kept.long().reshape(index.shape), index)):
                raise ModelBuildError(f"'{stored}' differs from the index its {module.window}x"
                                      f"{module.window} window gives", path=checkpoint.path,
                                      hint="the file was edited or is not a Swin")
            module.register_buffer("relative_position_index", index, persistent=False)
    adopt_checkpoint(model, checkpoint, file_key=lambda k: _file_key(spec, k), float32=True)
    return model, spec


def swin_attention_maps(checkpoint: Checkpoint, images: torch.Tensor
                        ) -> tuple[AttentionMaps, dict[str, WindowGeometry], SwinSpec]:
    """Per-window maps (B * windows, H, w*w, w*w) of every block for ``images`` (B, 3, H, W),
    ImageNet-normalised, with each block's geometry (for attnviz.models.swin_windows)."""
    model, spec = load_swin(checkpoint)
    found = geometries(spec, (images.shape[-2], images.shape[-1]))
    with torch.no_grad(), capture_attention(model) as maps:
        model(images)
    return maps, found, spec
