"""A torchvision-layout ResNet backbone with frozen batch norm, rebuilt from shapes (no
torchvision): bottleneck blocks (ResNet-50/101) or basic blocks (ResNet-18/34), widths and block
counts from the keys, stride 32 (16 with a dilated last stage, DETR's DC5)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers, as in DETR)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                            ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]  # (B, C, H, W)


def _conv(shape: tuple[int, ...], stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    out_c, in_c, k, _ = shape
    padding = dilation * (k // 2)
    return nn.Conv2d(in_c, out_c, k, stride=stride, padding=padding, dilation=dilation,
                     bias=False)


class Block(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block; stride on the 3x3."""

    conv1: nn.Conv2d
    conv2: nn.Conv2d
    conv3: nn.Conv2d
    bn1: FrozenBatchNorm2d
    bn2: FrozenBatchNorm2d
    bn3: FrozenBatchNorm2d

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], prefix: str, stride: int,
                 dilation: int) -> None:
        super().__init__()
        self.bottleneck = f"{prefix}conv3.weight" in shapes
        middle = "conv2" if self.bottleneck else "conv1"
        names = ("conv1", "conv2", "conv3") if self.bottleneck else ("conv1", "conv2")
        for index, name in enumerate(names, start=1):
            shape = shapes[f"{prefix}{name}.weight"]
            conv = _conv(shape, stride if name == middle else 1,
                         dilation if shape[-1] == 3 else 1)
            setattr(self, name, conv)
            setattr(self, f"bn{index}", FrozenBatchNorm2d(shape[0]))
        self.downsample: nn.Module | None = None
        if f"{prefix}downsample.0.weight" in shapes:
            shape = shapes[f"{prefix}downsample.0.weight"]
            self.downsample = nn.Sequential(_conv(shape, stride), FrozenBatchNorm2d(shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
        else:
            out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


class ResNetBody(nn.Module):
    """conv1/bn1/maxpool then layer1..layer4; returns the last stage's feature map."""

    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dilation: bool = False) -> None:
        super().__init__()
        self.conv1 = _conv(shapes["conv1.weight"], stride=2)
        self.bn1 = FrozenBatchNorm2d(shapes["conv1.weight"][0])
        for stage in range(1, 5):
            count = len({m.group(1) for k in shapes
                         if (m := re.match(rf"layer{stage}\.(\d+)\.", k))})
            stride = 1 if stage == 1 or (stage == 4 and dilation) else 2
            blocks = [Block(shapes, f"layer{stage}.{i}.", stride if i == 0 else 1,
                            2 if stage == 4 and dilation else 1) for i in range(count)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.out_channels = shapes[next(k for k in sorted(shapes, reverse=True)
                                         if k.startswith("layer4.") and "conv" in k)][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
