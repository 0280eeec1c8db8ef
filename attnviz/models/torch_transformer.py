"""Rebuilding ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` / ``nn.Transformer`` from a
state_dict alone: dims and layer counts from shapes, heads resolved as ``inspect`` does.

What shapes cannot tell (pre- or post-norm, the activation) comes from flags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnviz.checkpoint import Checkpoint
from attnviz.errors import AttnvizError, HeadsError, param
from attnviz.inspection import InspectReport


class ModelBuildError(AttnvizError):
    """The checkpoint is not a model attnviz can rebuild by itself."""

    exit_code = 2


@dataclass(frozen=True)
class TransformerSpec:
    """What the state_dict says about an nn.Transformer-family model."""

    kind: str  # "encoder", "decoder" or "transformer"
    prefix: str  # key prefix before 'layers.' / 'encoder.' (e.g. 'transformer.')
    d_model: int
    nhead: int
    dim_feedforward: int
    num_encoder_layers: int
    num_decoder_layers: int
    bias: bool
    encoder_norm: bool
    decoder_norm: bool


def _count(keys: set[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise ModelBuildError(f"layer indices {sorted(found)} are not 0..{len(found) - 1}")
    return len(found)


def detect_transformer(checkpoint: Checkpoint, report: InspectReport) -> TransformerSpec:
    keys = set(checkpoint.tensors)
    anchor = next((k for k in checkpoint.tensors if re.search(
        r"(^|\.)layers\.0\.self_attn\.in_proj_weight$", k)), None)
    if anchor is None:  # say what the file is and what it needs instead
        from attnviz.models.family import cannot_rebuild

        raise cannot_rebuild(checkpoint, report)
    prefix = anchor[: anchor.index("layers.0.self_attn")]
    if prefix.endswith(("encoder.", "decoder.")):
        prefix = prefix[: -len("encoder.")]
    enc = _count(keys, rf"^{re.escape(prefix)}encoder\.layers\.(\d+)\.self_attn\.in_proj_weight$")
    dec = _count(keys, rf"^{re.escape(prefix)}decoder\.layers\.(\d+)\.self_attn\.in_proj_weight$")
    bare = _count(keys, rf"^{re.escape(prefix)}layers\.(\d+)\.self_attn\.in_proj_weight$")
    bare_cross = _count(keys,
                        rf"^{re.escape(prefix)}layers\.(\d+)\.multihead_attn\.in_proj_weight$")
    if enc and dec:
        kind, first = "transformer", f"{prefix}encoder.layers.0."
    elif enc or (bare and not bare_cross):
        kind, first = "encoder", f"{prefix}encoder.layers.0." if enc else f"{prefix}layers.0."
    else:
        kind, first = "decoder", f"{prefix}decoder.layers.0." if dec else f"{prefix}layers.0."
    qkv = checkpoint.tensors[f"{first}self_attn.in_proj_weight"]
    ff = checkpoint.tensors.get(f"{first}linear1.weight")
    if ff is None:
        raise ModelBuildError(f"no '{first}linear1.weight': not an nn.Transformer layer",
                              path=checkpoint.path)
    heads = {item.heads.num_heads for item in report.layers
             if item.layer.name.startswith(prefix) and item.layer.layout == "torch_mha"}
    if None in heads or not heads:
        raise HeadsError("number of heads unknown", path=checkpoint.path,
                         hint=f"pass {param('heads')} N (or {param('config')})")
    if len(heads) > 1:
        raise HeadsError(f"layers disagree on the number of heads: {sorted(heads)}",  # type: ignore[type-var]
                         path=checkpoint.path,
                         hint=f"nn.Transformer uses one count: {param('heads')} N")
    stack = {"encoder": (enc or bare, 0), "decoder": (0, dec or bare),
             "transformer": (enc, dec)}[kind]
    return TransformerSpec(
        kind=kind, prefix=prefix, d_model=qkv.shape[1], nhead=int(heads.pop() or 0),
        dim_feedforward=ff.shape[0], num_encoder_layers=stack[0], num_decoder_layers=stack[1],
        bias=f"{first}self_attn.in_proj_bias" in keys,
        encoder_norm=f"{prefix}encoder.norm.weight" in keys or (
            kind == "encoder" and f"{prefix}norm.weight" in keys),
        decoder_norm=f"{prefix}decoder.norm.weight" in keys or (
            kind == "decoder" and f"{prefix}norm.weight" in keys),
    )


def build_transformer(spec: TransformerSpec, *, norm_first: bool = False,
                      activation: str = "relu") -> nn.Module:
    """An eval-mode, batch_first module matching ``spec`` (weights not loaded yet)."""
    common: dict[str, Any] = dict(d_model=spec.d_model, nhead=spec.nhead,
                                  dim_feedforward=spec.dim_feedforward, dropout=0.0,
                                  activation=activation, batch_first=True, norm_first=norm_first,
                                  bias=spec.bias)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(**common), spec.num_encoder_layers,
        norm=nn.LayerNorm(spec.d_model, bias=spec.bias) if spec.encoder_norm else None,
        enable_nested_tensor=False)
    decoder = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(**common), spec.num_decoder_layers,
        norm=nn.LayerNorm(spec.d_model, bias=spec.bias) if spec.decoder_norm else None)
    if spec.kind == "transformer":
        model: nn.Module = nn.Transformer(custom_encoder=encoder, custom_decoder=decoder,
                                          **common)
    else:
        model = encoder if spec.kind == "encoder" else decoder
    return model.eval()


def state_for(spec: TransformerSpec, checkpoint: Checkpoint,
              model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the rebuilt module's key names."""
    wanted = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for name in checkpoint.tensors:
        if not name.startswith(spec.prefix):
            continue
        key = name[len(spec.prefix):]
        if spec.kind != "transformer" and key.startswith(("encoder.", "decoder.")):
            key = key.split(".", 1)[1]
        if key in wanted:
            state[key] = checkpoint.read_tensor(name)
    return state


def adopt_state(model: nn.Module, state: dict[str, torch.Tensor], path: object) -> nn.Module:
    """Give a module built on the meta device the checkpoint's tensors (no random init, no
    second copy), cast to the module's dtypes; refuse if anything is left without values."""
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ModelBuildError(f"the rebuilt model needs {len(missing)} tensors the file lacks, "
                              f"e.g. '{missing[0]}'", path=str(path),
                              hint=f"pass {param('factory')} package.module:factory for other "
                                   "models")
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in wanted.items()}, strict=True,
                          assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelBuildError(f"internal error: '{left[0]}' has no value after loading")
    return model.eval()


def load_transformer(checkpoint: Checkpoint, report: InspectReport, *, norm_first: bool = False,
                     activation: str = "relu") -> tuple[nn.Module, TransformerSpec]:
    spec = detect_transformer(checkpoint, report)
    with torch.device("meta"):
        model = build_transformer(spec, norm_first=norm_first, activation=activation)
    return adopt_state(model, state_for(spec, checkpoint, model), checkpoint.path), spec
