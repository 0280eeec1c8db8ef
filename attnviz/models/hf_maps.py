"""What each captured map of an HF model is: which tokens its rows and columns are (encoder,
decoder, cross-attention, text or image tower), and the maps whose captured form is not
(B, H, Lq, Lk) until put in the shape the model itself defines (Longformer's banded maps)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnviz.capture import AttentionMaps
from attnviz.errors import UsageError

# module names of cross-attention in transformers' encoder-decoders
CROSS_MARKERS = ("encoder_attn", "EncDecAttention", "crossattention", "cross_attn",
                 "cross_attention")
# sub-models of multi-tower models and the side their maps are over
TOWERS = {"text_model": "source", "vision_model": "image"}

SideResolver = Callable[[str], tuple[str, str]]


def towers(model: Any) -> dict[str, str]:
    """{'text_model': 'source', 'vision_model': 'image'} for CLIP/SigLIP-like models."""
    found = {name: side for name, side in TOWERS.items()
             if isinstance(getattr(model, name, None), torch.nn.Module)}
    return found if len(found) > 1 else {}


def _decoder_prefix(model: Any) -> str | None:
    if not getattr(model.config, "is_encoder_decoder", False):
        return None
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    for name, module in model.named_modules():
        if decoder is not None and module is decoder and name:
            return name
    return "decoder"


def side_resolver(model: Any) -> SideResolver:
    """Layer name -> (side of its rows, side of its columns): 'source' (encoder input, text),
    'target' (decoder input) or 'image'."""
    decoder, tower_sides = _decoder_prefix(model), towers(model)

    def resolve(name: str) -> tuple[str, str]:
        for tower, side in tower_sides.items():
            if name.startswith(f"{tower}."):
                return side, side
        if decoder is not None and (name == decoder or name.startswith(f"{decoder}.")):
            if any(marker in name for marker in CROSS_MARKERS):
                return "target", "source"  # rows: decoder tokens, columns: encoder tokens
            return "target", "target"
        return "source", "source"

    return resolve


@dataclass(frozen=True)
class MapAdapter:
    """Turns what ``capture_attention`` saw inside one model family into its defined maps."""

    model_types: tuple[str, ...]
    adapt: Callable[[AttentionMaps, Any, dict[str, torch.Tensor]], list[str]]


def _banded(maps: AttentionMaps, model: Any, inputs: dict[str, torch.Tensor]) -> list[str]:
    """Longformer's (and LED's encoder's) sliding-window softmax runs over
    (B, L_padded, H, 2w + 1) scores; their own ``output_attentions`` are (B, H, L, 2w + 1)
    without the padding they add: column j of row i is key i - w + j. Global attention
    changes the columns: refused."""
    mask = inputs.get("global_attention_mask")
    if mask is not None and bool(mask.any()):
        raise UsageError("global attention in a Longformer-style model is not supported by "
                         "heatmap; run without global_attention_mask")
    length = int(inputs["input_ids"].shape[1])
    attention = inputs.get("attention_mask")
    window = 0
    for name in list(maps):
        module = model.get_submodule(name.split("#")[0])
        if not hasattr(module, "one_sided_attn_window_size"):
            continue  # LED's decoder attention is dense
        probs, heads = maps.maps[name], int(module.num_heads)
        if probs.dim() != 4 or probs.shape[2] != heads:
            raise UsageError(f"layer '{name}': banded attention of shape {list(probs.shape)} "
                             "is not the (B, L, H, 2w+1) of a Longformer sliding window")
        banded = probs.transpose(1, 2)[:, :, :length]  # (B, H, L, 2w + 1)
        if attention is not None:  # transformers zeroes the rows of masked queries
            banded = banded.masked_fill(attention[:, None, :, None] == 0, 0.0)
        maps.maps[name] = banded.contiguous()
        maps.routes[name] = f"{maps.routes.get(name, 'softmax')} (banded: key = row - w + col)"
        maps.scores.pop(name, None)
        window = (probs.shape[-1] - 1) // 2
    return [f"banded sliding-window attention: maps are (B, H, L, {2 * window + 1}) as the "
            f"model defines them; column j of row i is key i - {window} + j"] if window else []


ADAPTERS = (MapAdapter(("longformer", "led"), _banded),)


def adapt_maps(maps: AttentionMaps, model: Any, inputs: dict[str, torch.Tensor]) -> list[str]:
    """Apply the family's adapter, if any; returns notes."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter.adapt(maps, model, inputs)
    return []


def is_banded(model_type: str | None) -> bool:
    return any(model_type in a.model_types for a in ADAPTERS)
