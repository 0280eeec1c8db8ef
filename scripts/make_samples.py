"""Write the bundled sample checkpoints (seeded, each well under 2 MB).

Run: python scripts/make_samples.py [OUT_DIR]   (default: sample_checkpoints/)

- transformer_d64_h4.pth: nn.Transformer(d_model=64, nhead=4, 2+2 layers) state_dict.
- detr_tiny.pth: DETR official key names, {'model', 'args': Namespace(nheads=4, ...), ...}.
- qkv_encoder/: a custom fused ``qkv_proj`` encoder as safetensors + config.json (4 heads).
- mha_kvdim.pth: nn.MultiheadAttention(64, 4, kdim=32, vdim=48, add_bias_kv=True).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

SEED = 20261121


def transformer_state_dict() -> dict[str, torch.Tensor]:
    model = nn.Transformer(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=128)
    return model.state_dict()


def _frozen_bn(prefix: str, channels: int, out: dict[str, torch.Tensor]) -> None:
    out[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(channels)
    out[f"{prefix}.bias"] = 0.1 * torch.randn(channels)
    out[f"{prefix}.running_mean"] = 0.1 * torch.randn(channels)
    out[f"{prefix}.running_var"] = 1 + 0.1 * torch.rand(channels)


def _conv(name: str, c_out: int, c_in: int, k: int, out: dict[str, torch.Tensor]) -> None:
    out[name] = torch.randn(c_out, c_in, k, k) * (2.0 / (c_in * k * k)) ** 0.5


def detr_state_dict(hidden: int = 64, nheads: int = 4, queries: int = 10,
                    classes: int = 92) -> dict[str, torch.Tensor]:
    """Official facebookresearch/detr key names with a small ResNet-18-style backbone."""
    sd: dict[str, torch.Tensor] = OrderedDict()
    body = "backbone.0.body"
    _conv(f"{body}.conv1.weight", 8, 3, 7, sd)
    _frozen_bn(f"{body}.bn1", 8, sd)
    channels = [8, 16, 32, 64]
    c_in = 8
    for index, c_out in enumerate(channels, start=1):
        block = f"{body}.layer{index}.0"
        _conv(f"{block}.conv1.weight", c_out, c_in, 3, sd)
        _frozen_bn(f"{block}.bn1", c_out, sd)
        _conv(f"{block}.conv2.weight", c_out, c_out, 3, sd)
        _frozen_bn(f"{block}.bn2", c_out, sd)
        if c_in != c_out or index > 1:
            _conv(f"{block}.downsample.0.weight", c_out, c_in, 1, sd)
            _frozen_bn(f"{block}.downsample.1", c_out, sd)
        c_in = c_out
    sd["input_proj.weight"] = torch.randn(hidden, c_in, 1, 1) * 0.05
    sd["input_proj.bias"] = torch.zeros(hidden)
    sd["query_embed.weight"] = torch.randn(queries, hidden)
    for i in range(2):
        layer = nn.TransformerEncoderLayer(hidden, nheads, dim_feedforward=128)
        for name, value in layer.state_dict().items():
            sd[f"transformer.encoder.layers.{i}.{name}"] = value
    for i in range(2):
        decoder_layer = nn.TransformerDecoderLayer(hidden, nheads, dim_feedforward=128)
        for name, value in decoder_layer.state_dict().items():
            sd[f"transformer.decoder.layers.{i}.{name}"] = value
    norm = nn.LayerNorm(hidden)
    for name, value in norm.state_dict().items():
        sd[f"transformer.decoder.norm.{name}"] = value
    head = nn.Linear(hidden, classes)
    sd["class_embed.weight"], sd["class_embed.bias"] = head.weight.data, head.bias.data
    for i, (n_out, n_in) in enumerate([(hidden, hidden), (hidden, hidden), (4, hidden)]):
        linear = nn.Linear(n_in, n_out)
        sd[f"bbox_embed.layers.{i}.weight"] = linear.weight.data
        sd[f"bbox_embed.layers.{i}.bias"] = linear.bias.data
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def detr_args(hidden: int = 64, nheads: int = 4, queries: int = 10) -> argparse.Namespace:
    return argparse.Namespace(
        lr=1e-4, backbone="resnet18", dilation=False, position_embedding="sine",
        enc_layers=2, dec_layers=2, dim_feedforward=128, hidden_dim=hidden, dropout=0.1,
        nheads=nheads, num_queries=queries, pre_norm=False, masks=False, dataset_file="coco",
    )


class FusedAttention(nn.Module):
    """The custom fused encoder attention: one qkv_proj Linear, reshaped (N, P, 3, H, d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)


def qkv_encoder_state_dict(dim: int = 64, depth: int = 2) -> dict[str, torch.Tensor]:
    layers = nn.ModuleList()
    for _ in range(depth):
        block = nn.Module()
        block.norm1 = nn.LayerNorm(dim)
        block.attn = FusedAttention(dim)
        block.norm2 = nn.LayerNorm(dim)
        block.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        layers.append(block)
    model = nn.Module()
    model.embed = nn.Linear(16, dim)
    model.layers = layers
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "sample_checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    torch.save(transformer_state_dict(), out / "transformer_d64_h4.pth")
    torch.save({"model": detr_state_dict(), "args": detr_args(), "epoch": 300},
               out / "detr_tiny.pth")
    encoder_dir = out / "qkv_encoder"
    encoder_dir.mkdir(exist_ok=True)
    save_file(qkv_encoder_state_dict(), str(encoder_dir / "model.safetensors"),
              metadata={"description": "attnviz sample: custom fused qkv_proj encoder"})
    (encoder_dir / "config.json").write_text(
        json.dumps({"model_type": "qkv_encoder", "hidden_size": 64, "num_attention_heads": 4,
                    "num_hidden_layers": 2}, indent=2) + "\n")
    mha = nn.MultiheadAttention(64, 4, kdim=32, vdim=48, add_bias_kv=True)
    torch.save(mha.state_dict(), out / "mha_kvdim.pth")
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(out)}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
