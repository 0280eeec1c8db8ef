"""A report from a model already in memory: ``build_report(model=..., inputs=...)`` and the
notebook views. The model runs once under ``capture_attention``; the page is the one
``attnviz report`` writes for a checkpoint, its summary describing the module instead of a file,
its weight norms split from the module's own state_dict where the layout registry knows the
layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnviz.captions import InputPart
from attnviz.capture import AttentionMaps, capture_attention
from attnviz.errors import AttnvizError, UsageError
from attnviz.notebook_tables import map_shapes
from attnviz.report_data import (
    DEFAULT_MAX_TOKENS,
    NormRow,
    PairLabels,
    ReportData,
)
from attnviz.report_long import full_maps_report
from attnviz.text_safety import safe_str, terminal

PAGE_TOKENS = 2048  # tokens listed at the top of the page (as captions does for a file)


def model_name(model: nn.Module) -> str:
    return terminal(type(model).__qualname__, 80)


def run_captured(model: Any, inputs: Any) -> tuple[AttentionMaps, list[str]]:
    """Call ``model`` on ``inputs`` (a tensor: ``model(x)``; a tuple or list: ``model(*x)``; a
    mapping: ``model(**x)``) under ``torch.no_grad`` and ``capture_attention``."""
    if model is None:
        raise UsageError("neither a checkpoint nor a model given", param="model",
                         hint="pass a checkpoint path, or model=... with inputs=...")
    if not isinstance(model, nn.Module):
        raise UsageError(f"model is a {type(model).__name__}, not a torch.nn.Module",
                         param="model", hint="pass the loaded model, or a checkpoint path")
    if inputs is None:
        raise UsageError(f"no inputs for {model_name(model)}", param="inputs",
                         hint="pass inputs=tensor, a tuple of positional arguments or a dict "
                              "of keyword arguments (e.g. a tokenizer's output)")
    notes = []
    if model.training:
        notes.append(f"{model_name(model)} is in training mode (dropout active); call "
                     "model.eval() for repeatable maps")
    with torch.no_grad(), capture_attention(model) as maps:
        try:
            if isinstance(inputs, Mapping):
                model(**inputs)
            elif isinstance(inputs, tuple | list):
                model(*inputs)
            else:
                model(inputs)
        except AttnvizError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise UsageError(f"the forward pass of {model_name(model)} failed: "
                             f"{type(exc).__name__}: {first}", param="inputs",
                             hint="check that the inputs fit the model") from exc
    if isinstance(inputs, Mapping) and getattr(model, "config", None) is not None:
        from attnviz.models.hf_maps import adapt_maps  # banded HF families: maps to full size

        notes += adapt_maps(maps, model, dict(inputs))
    return maps, notes


def _clean(tokens: Sequence[Any] | None) -> list[str] | None:
    return None if tokens is None else [terminal(safe_str(t), 80) for t in tokens]


def tokenizer_tokens(tokenizer: Any, inputs: Any, key: str) -> list[str] | None:
    """The tokens of ``inputs[key]`` (batch item 0) as ``tokenizer`` names them."""
    if tokenizer is None or not isinstance(inputs, Mapping) or key not in inputs:
        return None
    ids = inputs[key]
    ids = ids[0] if isinstance(ids, torch.Tensor) and ids.dim() > 1 else ids
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    names: list[Any] = list(tokenizer.convert_ids_to_tokens(values))
    return [safe_str(n) for n in names]


def token_labels(tokens: Sequence[str] | None, target: Sequence[str] | None) -> PairLabels:
    """Row labels from ``target`` where its length fits (decoder queries), else ``tokens``;
    column labels from ``tokens`` first; positions where neither fits."""
    def side(length: int, *options: Sequence[str] | None) -> list[str]:
        for names in options:
            if names is not None and len(names) == length:
                return list(names)
        return [str(i) for i in range(length)]

    def pair(_name: str, rows: int, cols: int) -> tuple[list[str], list[str]]:
        return side(rows, target, tokens), side(cols, tokens, target)

    return pair


def _input_parts(inputs: Any, tokens: list[str] | None,
                 target: list[str] | None) -> list[InputPart]:
    def describe(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
        return terminal(type(value).__name__, 40)

    if isinstance(inputs, Mapping):
        shown = ", ".join(f"{terminal(safe_str(k), 40)}: {describe(v)}"
                          for k, v in list(inputs.items())[:12])
    elif isinstance(inputs, tuple | list):
        shown = ", ".join(describe(v) for v in inputs[:12])
    else:
        shown = describe(inputs)
    parts = [InputPart("inputs", shown, (tokens or [])[:PAGE_TOKENS])]
    if target:
        parts.append(InputPart("decoder tokens", f"{len(target)} tokens", target[:PAGE_TOKENS]))
    return parts


@dataclass(frozen=True)
class _Shape:  # what the layout registry reads of a tensor
    shape: tuple[int, ...]
    dtype: str


def _heads_of(maps: AttentionMaps) -> dict[str, int]:
    """Captured head count per module (the first call of each)."""
    heads: dict[str, int] = {}
    for name, shape in map_shapes(maps).items():
        heads.setdefault(name.split("#")[0], int(shape[1]))  # (B, H, Lq, Lk)
    return heads


def module_norms(model: nn.Module, maps: AttentionMaps) -> tuple[list[NormRow], list[str]]:
    """Per-head weight norms of every attention layer the registry finds in the module's
    state_dict, with the head count its captured maps show."""
    from attnviz.heads import HeadsInfo
    from attnviz.layouts import find_attention_layers
    from attnviz.layouts.context import layout_context
    from attnviz.split import source_keys, split_heads

    state = model.state_dict()
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)  # an HF config: its model_type picks layouts
    settings = to_dict() if callable(to_dict) else None
    shapes = {k: _Shape(tuple(v.shape), str(v.dtype).removeprefix("torch."))
              for k, v in state.items()}
    try:
        layers, _ = find_attention_layers(shapes, context=layout_context(settings, None))
    except AttnvizError as error:
        return [], [f"weight norms skipped: {error.message}"]
    heads, rows, skipped = _heads_of(maps), [], []
    for layer in layers:
        count = heads.get(layer.name)
        if count is None or layer.q_rows % count:
            skipped.append(layer.display_name)
            continue
        d = layer.q_rows // count
        info = HeadsInfo(count, "captured maps", (layer.kv_rows or layer.q_rows) // d, d)
        values = {k: state[k].detach().to(torch.float64) for k in source_keys(layer)}
        try:
            hw = split_heads(layer, info, values)
        except (AttnvizError, RuntimeError, ValueError):
            skipped.append(layer.display_name)
            continue

        def norms(array: torch.Tensor) -> list[float]:
            return [round(float(x), 4) for x in torch.linalg.vector_norm(array, dim=(1, 2))]

        rows.append(NormRow(layer.display_name, norms(hw.q), norms(hw.k), norms(hw.v),
                            None if hw.o is None else norms(hw.o)))  # (H,) each
    notes = [f"weight norms skipped for {len(skipped)} layer(s) whose heads were not captured "
             f"({', '.join(skipped[:3])})"] if skipped else []
    return rows, notes


def _summary(model: nn.Module | None, maps: AttentionMaps) -> list[tuple[str, str]]:
    from attnviz.formatting import count, size

    rows = []
    if model is not None:
        params = list(model.parameters())
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        kind = type(model)
        rows += [("model", terminal(f"{kind.__module__}.{kind.__qualname__}", 120)),
                 ("parameters", f"{count(sum(p.numel() for p in params))} parameters, "
                                f"{size(sum(p.numel() * p.element_size() for p in params))}"),
                 ("dtypes", ", ".join(dtypes) or "-"),
                 ("mode", "training" if model.training else "eval")]
    captured = len(map_shapes(maps))
    rows.append(("attention captured", f"{captured} call{'' if captured == 1 else 's'} of "
                                       f"{len(_heads_of(maps))} module(s)"))
    if maps.missed:
        rows.append(("no map from", ", ".join(terminal(n, 80) for n in maps.missed[:6])))
    return rows


def _layer_rows(maps: AttentionMaps) -> list[dict[str, str]]:
    return [{"layer": terminal(name or "(root)", 200), "captured by": maps.routes.get(name, "?"),
             "heads": str(shape[1]), "queries": str(shape[2]), "keys": str(shape[3])}
            for name, shape in map_shapes(maps).items()]  # shape (B, H, Lq, Lk)


def maps_report_data(maps: AttentionMaps, *, model: nn.Module | None = None, inputs: Any = None,
                     tokens: Sequence[Any] | None = None,
                     target_tokens: Sequence[Any] | None = None, title: str | None = None,
                     max_tokens: int = DEFAULT_MAX_TOKENS, norms: bool = True,
                     notes: Sequence[str] = (), pool: str = "mean",
                     query: str | None = None) -> ReportData:
    """The report's data for captured maps (and the model and inputs they came from);
    ``pool`` and ``query`` as for ``attnviz.report_long`` (long maps, full-resolution rows)."""
    if not maps.maps:
        raise UsageError("these AttentionMaps hold no maps (a streamed capture keeps none)",
                         param="maps", hint="capture without reduce= to draw them")
    source, target = _clean(tokens), _clean(target_tokens)
    name = model_name(model) if model is not None else "captured attention maps"
    data = ReportData(title=title or f"attnviz report: {name}", summary=_summary(model, maps),
                      layers=_layer_rows(maps), warnings=[], max_tokens=max_tokens,
                      model=name if model is not None else None, notes=list(notes))
    full_maps_report(data, maps, token_labels(source, target), pool=pool, query=query)
    from attnviz.report_atlas import whole_maps_atlas

    data.atlas = whole_maps_atlas(maps.maps, model=name, source="the inputs given")
    lengths = {n for layer in data.maps for n in (layer.query_len, layer.key_len)}
    for what, names in (("tokens", source), ("target_tokens", target)):
        if names is not None and len(names) not in lengths:
            data.notes.append(f"{what}: {len(names)} given, but the maps have "
                              f"{', '.join(str(n) for n in sorted(lengths))} positions; "
                              "positions are shown instead")
    if model is not None:
        data.inputs = _input_parts(inputs, source, target)
        if norms:
            data.norms, skipped = module_norms(model, maps)
            data.notes += skipped
    return data


def model_report_data(model: Any, inputs: Any, *, tokens: Sequence[Any] | None = None,
                      target_tokens: Sequence[Any] | None = None, tokenizer: Any = None,
                      title: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                      norms: bool = True, pool: str = "mean",
                      query: str | None = None) -> tuple[ReportData, AttentionMaps]:
    """Run ``model`` on ``inputs`` under capture; the report's data and the maps.

    ``tokenizer`` (anything with ``convert_ids_to_tokens``) names ``input_ids`` and
    ``decoder_input_ids`` when ``tokens`` / ``target_tokens`` are not given."""
    maps, notes = run_captured(model, inputs)
    if tokens is None:
        tokens = tokenizer_tokens(tokenizer, inputs, "input_ids")
    if target_tokens is None:
        target_tokens = tokenizer_tokens(tokenizer, inputs, "decoder_input_ids")
    data = maps_report_data(maps, model=model, inputs=inputs, tokens=tokens,
                            target_tokens=target_tokens, title=title, max_tokens=max_tokens,
                            norms=norms, notes=notes, pool=pool, query=query)
    return data, maps


def refuse_file_options(checkpoint: str | Path | None, given: Mapping[str, Any]) -> None:
    """``build_report(model=...)``: the options that only apply to a checkpoint file."""
    if checkpoint is not None:
        raise UsageError("give a checkpoint or a loaded model, not both", param="model")
    used = [name for name, value in given.items() if value not in (None, (), [], False)]
    if used:
        raise UsageError(f"{', '.join(used)} appl{'ies' if len(used) == 1 else 'y'} to a "
                         "checkpoint file, not to a loaded model", param=used[0],
                         hint="give the model its inputs with inputs=...")
