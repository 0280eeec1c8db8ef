"""DETR in the official facebookresearch layout, rebuilt from its state_dict (no torchvision).

Backbone ``backbone.0.body.*`` (frozen-BN ResNet), ``input_proj``, sine positions (normalised,
temperature 10000, hidden/2 features per axis), a post-norm encoder/decoder (pre-norm when the
stored args say so) built from ``nn.MultiheadAttention`` with positions added to q and k only,
``query_embed``, ``class_embed`` and the 3-layer ``bbox_embed`` MLP. Sequence-first (L, B, C).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from attnviz.checkpoint import Checkpoint
from attnviz.errors import HeadsError, param
from attnviz.heads import Settings, settings_from
from attnviz.inspection import InspectReport
from attnviz.models.resnet import ResNetBody
from attnviz.models.torch_transformer import ModelBuildError, adopt_state

BODY = "backbone.0.body."


@dataclass(frozen=True)
class DetrSpec:
    hidden: int
    heads: int
    feedforward: int
    encoder_layers: int
    decoder_layers: int
    queries: int
    classes: int  # including "no object"
    pre_norm: bool
    dilation: bool


def _flag(settings: list[Settings], name: str) -> bool:
    """A boolean training arg (``args.pre_norm``, ``args.dilation``); False when absent."""
    return next((v for s in settings if isinstance(v := s.value(name), bool)), False)


def detect_detr(checkpoint: Checkpoint, report: InspectReport) -> DetrSpec:
    t = checkpoint.tensors
    for key in ("input_proj.weight", "query_embed.weight", "class_embed.weight",
                f"{BODY}conv1.weight",
                "transformer.decoder.layers.0.multihead_attn.in_proj_weight"):
        if key not in t:
            raise ModelBuildError(f"not an official-layout DETR checkpoint: no '{key}'",
                                  path=checkpoint.path)
    heads = {i.heads.num_heads for i in report.layers if i.layer.name.startswith("transformer.")}
    if None in heads or len(heads) != 1:
        raise HeadsError("number of heads unknown", path=checkpoint.path,
                         hint=f"pass {param('heads')} N (DETR training checkpoints store "
                              "args.nheads)")

    def count(stack: str) -> int:
        return len({m.group(1) for k in t
                    if (m := re.match(rf"transformer\.{stack}\.layers\.(\d+)\.", k))})

    settings = settings_from(checkpoint.config, checkpoint.root)
    return DetrSpec(
        hidden=t["query_embed.weight"].shape[1], heads=int(heads.pop() or 0),
        feedforward=t["transformer.decoder.layers.0.linear1.weight"].shape[0],
        encoder_layers=count("encoder"), decoder_layers=count("decoder"),
        queries=t["query_embed.weight"].shape[0], classes=t["class_embed.weight"].shape[0],
        pre_norm=_flag(settings, "pre_norm"), dilation=_flag(settings, "dilation"))


def sine_positions(height: int, width: int, features: int,
                   temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine embedding for an unpadded (h, w) map: (2*features, h, w)."""
    ones = torch.ones(1, height, width)
    y = ones.cumsum(1)  # (1, h, w): 1..h down the rows
    x = ones.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(features, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / features)  # (features,)
    pos_x = x[..., None] / dim_t  # (1, h, w, features)
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)[0]  # (2*features, h, w)


class EncoderLayer(nn.Module):
    def __init__(self, spec: DetrSpec) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(spec.hidden, spec.heads)
        self.linear1 = nn.Linear(spec.hidden, spec.feedforward)
        self.linear2 = nn.Linear(spec.feedforward, spec.hidden)
        self.norm1, self.norm2 = nn.LayerNorm(spec.hidden), nn.LayerNorm(spec.hidden)
        self.pre_norm = spec.pre_norm

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = self.norm1(src)
            src = src + self.self_attn(x + pos, x + pos, x)[0]
            return src + self.linear2(F.relu(self.linear1(self.norm2(src))))
        src = self.norm1(src + self.self_attn(src + pos, src + pos, src)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DetrSpec) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(spec.hidden, spec.heads)
        self.multihead_attn = nn.MultiheadAttention(spec.hidden, spec.heads)
        self.linear1 = nn.Linear(spec.hidden, spec.feedforward)
        self.linear2 = nn.Linear(spec.feedforward, spec.hidden)
        self.norm1, self.norm2 = nn.LayerNorm(spec.hidden), nn.LayerNorm(spec.hidden)
        self.norm3 = nn.LayerNorm(spec.hidden)
        self.pre_norm = spec.pre_norm

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = self.norm1(tgt)
            tgt = tgt + self.self_attn(x + query_pos, x + query_pos, x)[0]
            x = self.norm2(tgt)
            tgt = tgt + self.multihead_attn(x + query_pos, memory + pos, memory)[0]
            return tgt + self.linear2(F.relu(self.linear1(self.norm3(tgt))))
        tgt = self.norm1(tgt + self.self_attn(tgt + query_pos, tgt + query_pos, tgt)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt + query_pos, memory + pos, memory)[0])
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Stack(nn.Module):
    def __init__(self, layers: list[nn.Module], norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class Transformer(nn.Module):
    def __init__(self, spec: DetrSpec) -> None:
        super().__init__()
        self.encoder = Stack([EncoderLayer(spec) for _ in range(spec.encoder_layers)],
                             nn.LayerNorm(spec.hidden) if spec.pre_norm else None)
        self.decoder = Stack([DecoderLayer(spec) for _ in range(spec.decoder_layers)],
                             nn.LayerNorm(spec.hidden))


class Backbone(nn.Module):
    def __init__(self, body: ResNetBody) -> None:
        super().__init__()
        self.body = body


class MLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden),
                                     nn.Linear(hidden, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


@dataclass
class DetrOutput:
    logits: torch.Tensor  # (B, Q, classes)
    boxes: torch.Tensor  # (B, Q, 4) cx, cy, w, h in [0, 1]
    feature_size: tuple[int, int]  # (h, w) of the encoder's feature map


class DETR(nn.Module):
    def __init__(self, spec: DetrSpec, body: ResNetBody) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = nn.ModuleList([Backbone(body)])
        self.input_proj = nn.Conv2d(body.out_channels, spec.hidden, 1)
        self.transformer = Transformer(spec)
        self.query_embed = nn.Embedding(spec.queries, spec.hidden)
        self.class_embed = nn.Linear(spec.hidden, spec.classes)
        self.bbox_embed = MLP(spec.hidden)

    def forward(self, images: torch.Tensor) -> DetrOutput:
        backbone: Backbone = self.backbone[0]  # type: ignore[assignment]
        features = self.input_proj(backbone.body(images))  # (B, C, h, w)
        batch, channels, height, width = features.shape
        pos = sine_positions(height, width, channels // 2).to(features)  # (C, h, w)
        src = features.flatten(2).permute(2, 0, 1)  # (hw, B, C)
        pos = pos.flatten(1).T.unsqueeze(1).expand(-1, batch, -1)  # (hw, B, C)
        memory = src
        for layer in self.transformer.encoder.layers:
            memory = layer(memory, pos)
        if self.transformer.encoder.norm is not None:
            memory = self.transformer.encoder.norm(memory)
        query_pos = self.query_embed.weight.unsqueeze(1).expand(-1, batch, -1)  # (Q, B, C)
        tgt = torch.zeros_like(query_pos)
        for layer in self.transformer.decoder.layers:
            tgt = layer(tgt, memory, pos, query_pos)
        norm = self.transformer.decoder.norm
        hidden = (norm(tgt) if norm is not None else tgt).transpose(0, 1)  # (B, Q, C)
        return DetrOutput(self.class_embed(hidden), self.bbox_embed(hidden).sigmoid(),
                          (height, width))


def load_detr(checkpoint: Checkpoint, report: InspectReport) -> tuple[DETR, DetrSpec]:
    spec = detect_detr(checkpoint, report)
    shapes = {k[len(BODY):]: v.shape for k, v in checkpoint.tensors.items() if k.startswith(BODY)}
    with torch.device("meta"):
        model = DETR(spec, ResNetBody(shapes, dilation=spec.dilation))
    state = {k: checkpoint.read_tensor(k) for k in model.state_dict() if k in checkpoint.tensors}
    adopt_state(model, state, checkpoint.path)
    return model, spec
