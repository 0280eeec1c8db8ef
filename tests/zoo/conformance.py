"""The zoo's checks, one function each, and the matrix row they fill.

References are transformers' own modules: q, k, v (and the output projection) as the module
computes them (``attnviz.verify_hf``), and eager ``output_attentions`` for the maps. Nothing here
compares attnviz with itself.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnviz.inspection import InspectReport, inspect_checkpoint
from attnviz.split import split_all
from attnviz.verify_hf import HfCheck, pair_modules, verify_model

from .spec import ZooCase

TOLERANCE = 1e-5  # max |HF - attnviz| / max(1, max |HF|): float32 HF against float64 attnviz
MAP_TOLERANCE = 1e-5


@dataclass
class Row:
    """One line of docs/zoo.md."""

    case: str
    model_type: str
    family: str
    layouts: str = "-"
    layers: str = "-"
    geometry: str = "-"
    weights: str = "-"  # q/k/v/o against the HF module
    maps: str = "-"  # heatmap maps against eager output_attentions
    bare: str = "-"  # the bare state_dict file
    notes: str = ""
    worst: dict[str, float] = field(default_factory=dict)  # printed, not written to the docs


def geometry(report: InspectReport) -> list[tuple[Any, ...]]:
    return [(item.layer.layout, item.layer.embed_dim, item.layer.kdim, item.layer.vdim,
             item.heads.num_heads, item.heads.num_kv_heads, item.heads.head_dim)
            for item in report.layers]


def summarise_geometry(report: InspectReport) -> str:
    """'E32 H4/2 d8' per distinct shape, e.g. BART's encoder and decoder widths."""
    seen: list[str] = []
    for _, e, kdim, _, h, hkv, d in geometry(report):
        text = f"E{e}" + (f"/k{kdim}" if kdim != e else "") + f" H{h}" + \
            (f"/{hkv}" if hkv != h else "") + f" d{d}"
        if text not in seen:
            seen.append(text)
    return ", ".join(seen)


def reference_inputs(case: ZooCase, model: nn.Module) -> dict[str, torch.Tensor]:
    """The case's inputs with every position at 0 where the model takes position ids: rotary
    embeddings are then the identity, so q and k at the score product are the projections."""
    inputs = dict(case.inputs(model))
    params = inspect.signature(model.forward).parameters
    if "position_ids" in params and "input_ids" in inputs:
        inputs["position_ids"] = torch.zeros_like(inputs["input_ids"])
    return inputs


def check_weights(case: ZooCase, model: nn.Module, report: InspectReport) -> list[HfCheck]:
    return verify_model(model, split_all(report), reference_inputs(case, model))


def hf_attention_count(maps: dict[str, tuple[torch.Tensor, ...]]) -> int:
    return sum(len(group) for group in maps.values())


def innermost_attention_modules(model: nn.Module) -> set[str]:
    """The model's attention modules by transformers' own naming: classes called *Attention*
    with no *Attention* module inside (BertSelfAttention, not BertAttention around it)."""
    def named(module: nn.Module) -> bool:
        return "attention" in type(module).__name__.lower()

    return {name for name, module in model.named_modules() if named(module) and not any(
        named(child) for child_name, child in module.named_modules() if child_name)}


def found_modules(model: nn.Module, report: InspectReport) -> set[str]:
    paired, _ = pair_modules(model, [item.layer for item in report.layers])
    return {p.attention for p in paired.values()}


def check_bare(directory: Path, bare: Path, report: InspectReport) -> str:
    """The same layers and geometry from the bare file with the directory's config.json.

    A bare ``model.state_dict()`` carries the names the modules have in memory, which
    transformers renames for some architectures (ViT's ``attention.attention.query`` is
    ``attention.q_proj`` once loaded): the geometry must agree, the names may not."""
    with_config = inspect_checkpoint(bare, config=directory / "config.json")
    assert sorted(g[1:] for g in geometry(with_config)) == sorted(g[1:] for g in geometry(report))
    # the same names, maybe listed in another order (a text-sorted file is listed naturally)
    renamed = sorted(i.layer.name for i in with_config.layers) != sorted(
        i.layer.name for i in report.layers)
    return "same geometry, renamed" if renamed else "same"


def match_maps(hf: list[torch.Tensor], mine: dict[str, torch.Tensor], *,
               allow_extra: bool = False) -> dict[str, float]:
    """Pair every eager map with one captured map of the same values; error per captured map.

    Matching by value, not by name or position, so that the check does not depend on how either
    side orders encoder, decoder and cross-attention layers: peaked random weights make every
    layer's maps distinct."""
    free = dict(mine)
    errors: dict[str, float] = {}
    for ref in hf:
        best, best_error = None, float("inf")
        for name, candidate in free.items():
            if candidate.shape != ref.shape:
                continue
            error = float((candidate.double() - ref.double()).abs().max())
            if error < best_error:
                best, best_error = name, error
        assert best is not None, f"no captured map of shape {list(ref.shape)}"
        errors[best] = best_error
        del free[best]
    assert allow_extra or not free, f"captured maps with no eager counterpart: {sorted(free)}"
    return errors
