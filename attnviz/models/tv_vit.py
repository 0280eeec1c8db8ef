"""torchvision's VisionTransformer rebuilt from its state_dict alone (no torchvision).

Keys: ``conv_proj`` (patch embedding), ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_N.{ln_1, self_attention, ln_2, mlp.0, mlp.3}`` (published
weight files still carry the older ``mlp.linear_1`` / ``mlp.linear_2``), ``encoder.ln``,
``heads.head``. ``self_attention`` is an ``nn.MultiheadAttention`` (batch first), whose packed
``in_proj_weight`` cannot say its heads: they come from a config or stored args, else the
width table of torchvision's builders (vit_b 12, vit_l 16, vit_h 16), else ``--heads``.
LayerNorm eps 1e-6, exact GELU, pre-norm blocks. torchvision runs it only at the size its
position table was trained for, and so does attnviz. The classifier head does not change the
attention and is not rebuilt.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from attnviz.checkpoint import Checkpoint
from attnviz.inspection import InspectReport
from attnviz.models.torch_transformer import ModelBuildError
from attnviz.models.vision_registry import RECORDS_BY_NAME, BuiltVision, TokenLayout
from attnviz.models.vit_parts import rebuild, resolve_heads, square_side

LAYER = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.")
OLD_MLP = {"mlp.linear_1.": "mlp.0.", "mlp.linear_2.": "mlp.3."}  # torchvision < 0.13 names


@dataclass(frozen=True)
class TvViTSpec:
    dim: int
    depth: int
    heads: int
    heads_source: str
    patch: int
    channels: int
    mlp_hidden: int
    grid: int  # the position table covers grid x grid patches (+ the class token)
    eps: float = 1e-6

    @property
    def image_size(self) -> tuple[int, int]:
        return self.grid * self.patch, self.grid * self.patch


def _new_name(name: str) -> str:
    for old, new in OLD_MLP.items():
        name = name.replace(old, new)
    return name


def detect_tv_vit(checkpoint: Checkpoint, report: InspectReport) -> TvViTSpec:
    t = checkpoint.tensors
    conv = t["conv_proj.weight"].shape
    if len(conv) != 4 or conv[2] != conv[3]:
        raise ModelBuildError(f"conv_proj.weight {list(conv)} is not a square patch "
                              "embedding (convolutional stems are not supported)",
                              path=checkpoint.path)
    dim, channels, patch = conv[0], conv[1], conv[2]
    layers = {int(m.group(1)) for k in t if (m := LAYER.match(k))}
    if layers != set(range(len(layers))):
        raise ModelBuildError(f"encoder layer indices {sorted(layers)[:8]} are not 0..N-1",
                              path=checkpoint.path)
    names = {_new_name(k) for k in t}
    fc1 = "encoder.layers.encoder_layer_0.mlp.0.weight"
    if fc1 not in names:
        raise ModelBuildError("no 'encoder.layers.encoder_layer_0.mlp.0.weight' (or "
                              "mlp.linear_1): not torchvision's MLP block", path=checkpoint.path)
    hidden = t[fc1 if fc1 in t else fc1.replace("mlp.0.", "mlp.linear_1.")].shape[0]
    side = square_side(t["encoder.pos_embedding"].shape[1] - 1,  # the class token's slot first
                       "encoder.pos_embedding", checkpoint.path)
    heads, source = resolve_heads(checkpoint, report, "encoder.layers.", noun="layers",
                                  rule=RECORDS_BY_NAME["torchvision_vit"].heads_rule, dim=dim)
    return TvViTSpec(dim=dim, depth=len(layers), heads=heads, heads_source=source,
                     patch=patch, channels=channels, mlp_hidden=hidden, grid=side)


class EncoderBlock(nn.Module):
    def __init__(self, spec: TvViTSpec) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.self_attention = nn.MultiheadAttention(spec.dim, spec.heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.mlp = nn.Sequential(nn.Linear(spec.dim, spec.mlp_hidden), nn.GELU(),
                                 nn.Dropout(0.0), nn.Linear(spec.mlp_hidden, spec.dim),
                                 nn.Dropout(0.0))  # keys mlp.0 and mlp.3, as torchvision's MLP

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(inputs)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = x + inputs
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, spec: TvViTSpec) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.zeros(1, spec.grid ** 2 + 1, spec.dim))
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(spec)) for i in range(spec.depth)))
        self.ln = nn.LayerNorm(spec.dim, eps=spec.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class TorchvisionViT(nn.Module):
    """torchvision's VisionTransformer forward, up to the class token's features."""

    def __init__(self, spec: TvViTSpec) -> None:
        super().__init__()
        self.spec = spec
        self.conv_proj = nn.Conv2d(spec.channels, spec.dim, spec.patch, spec.patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.encoder = Encoder(spec)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.spec.image_size:
            raise ModelBuildError(f"torchvision's ViT runs at {self.spec.image_size}, not "
                                  f"{tuple(images.shape[-2:])}")
        x = self.conv_proj(images).flatten(2).transpose(1, 2)  # (B, C, gh, gw) -> (B, gh*gw, C)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)[:, 0]  # (B, C)


def load_tv_vit(checkpoint: Checkpoint, report: InspectReport
                ) -> tuple[TorchvisionViT, TvViTSpec]:
    spec = detect_tv_vit(checkpoint, report)
    names = {_new_name(k): k for k in checkpoint.tensors}
    return rebuild(lambda: TorchvisionViT(spec), checkpoint, file_key=names.get), spec


def build_tv_vit(checkpoint: Checkpoint, report: InspectReport) -> BuiltVision:
    """The vision registry's ``torchvision_vit`` record."""
    model, spec = load_tv_vit(checkpoint, report)
    description = (f"torchvision ViT rebuilt from the checkpoint: {spec.depth} layers, dim "
                   f"{spec.dim}, {spec.heads} heads [{spec.heads_source}], patch {spec.patch}")
    return BuiltVision(model, description, spec.patch, spec.image_size, TokenLayout(),
                       blocks="encoder.layers.", any_size=False)
