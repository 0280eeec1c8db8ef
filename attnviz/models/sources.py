"""Where the model for ``heatmap`` comes from: rebuilt from the checkpoint, a user factory, or an
HF model directory (``hf`` extra)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from attnviz.checkpoint import Checkpoint
from attnviz.errors import UsageError, param
from attnviz.heads_override import LayerHeads, config_edits
from attnviz.inspection import InspectReport
from attnviz.models.hf_safety import MAX_HF_JSON_BYTES
from attnviz.models.lens import describe, is_lens_state_dict, load_lens
from attnviz.models.torch_transformer import ModelBuildError, TransformerSpec, load_transformer


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # "encoder" | "decoder" | "transformer" | "factory" | "hf" | "lens"
    description: str
    tokenizer: Any = None
    d_model: int | None = None
    notes: list[str] = field(default_factory=list)
    path: Path | None = None  # an HF directory
    config: Any = None  # its transformers config
    attn_implementation: str | None = None  # what transformers runs: sdpa or eager

    @property
    def takes_tokens(self) -> bool:
        return self.kind in {"factory", "hf", "lens"}


def _factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{param('factory')} '{spec}' is not 'package.module:factory'",
                         param="factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like uvicorn: modules beside the user resolve
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{param('factory')}: cannot import '{module_name}' ({exc})",
                         param="factory") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{param('factory')}: '{module_name}' has no callable '{attr}'",
                         param="factory")
    return factory


def load_factory_model(spec: str, checkpoint: Checkpoint, *, strict: bool) -> LoadedModel:
    model = _factory(spec)()
    if not isinstance(model, nn.Module):
        raise UsageError(f"{param('factory')} '{spec}' returned {type(model).__name__}, not an "
                         "nn.Module", param="factory")
    state = {name: checkpoint.read_tensor(name) for name in checkpoint.tensors}
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if strict and (missing or unexpected):
        raise ModelBuildError(
            f"checkpoint does not fit {param('factory')} {spec}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}",
            path=checkpoint.path, hint=f"fix the factory or pass {param('strict', False)}")
    model.load_state_dict(state, strict=False)
    notes = []
    if missing or unexpected:
        notes.append(f"--no-strict: {len(missing)} missing keys {missing[:5]}, "
                     f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    return LoadedModel(model.eval(), "factory", f"{spec}()", notes=notes)


def is_hf_directory(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        if config.stat().st_size > MAX_HF_JSON_BYTES:
            return True  # hf_safety refuses it with the reason
        data = json.loads(config.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "model_type" in data


def load_hf_model(path: Path, checkpoint: Checkpoint | None = None, *,
                  attn_implementation: str = "auto", auto_name: str = "AutoModel",
                  heads_from: Iterable[LayerHeads] = ()) -> LoadedModel:
    """An HF directory through ``hf_loading`` (no custom code, config checked against the
    weights, sdpa where the architecture has it, else eager).

    ``heads_from``: resolved layers (``InspectReport.layers``); the model is built with their
    heads overrides, or ``HeadsError`` says why config.json cannot take them."""
    from attnviz.models.hf_loading import load_model as load_hf

    if checkpoint is None:
        from attnviz.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path)
    shapes = {name: tuple(info.shape) for name, info in checkpoint.tensors.items()}
    parts = load_hf(path, shapes, attn_implementation=attn_implementation,
                    auto_name=auto_name, edits=config_edits(heads_from))
    config = parts.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    return LoadedModel(parts.model, "hf", f"{type(parts.model).__name__} from {path.name} "
                       f"({parts.attn_implementation} attention)", tokenizer=parts.tokenizer,
                       d_model=hidden if isinstance(hidden, int) else None,
                       notes=parts.notes, path=path, config=config,
                       attn_implementation=parts.attn_implementation)


def load_model(path: Path, checkpoint: Checkpoint, report: InspectReport, *,
               factory: str | None = None, strict: bool = True, norm_first: bool = False,
               activation: str = "relu", attn_implementation: str = "auto") -> LoadedModel:
    if factory is not None:
        loaded = load_factory_model(factory, checkpoint, strict=strict)
        loaded.d_model = next((item.layer.embed_dim for item in report.layers), None)
        return loaded
    if is_hf_directory(path):
        return load_hf_model(path, checkpoint, attn_implementation=attn_implementation,
                             heads_from=report.layers)
    if is_lens_state_dict(checkpoint.tensors):  # TransformerLens: tokens in, logits out
        lens = load_lens(checkpoint)
        return LoadedModel(lens, "lens", describe(lens.cfg), d_model=lens.cfg.d_model,
                           notes=list(lens.cfg.notes))
    model, spec = load_transformer(checkpoint, report, norm_first=norm_first,
                                   activation=activation)
    return LoadedModel(model, spec.kind, _describe(spec), d_model=spec.d_model)


def _describe(spec: TransformerSpec) -> str:
    layers = {"encoder": f"{spec.num_encoder_layers} encoder layers",
              "decoder": f"{spec.num_decoder_layers} decoder layers",
              "transformer": f"{spec.num_encoder_layers}+{spec.num_decoder_layers} layers"}
    return (f"nn.Transformer {spec.kind} rebuilt from the checkpoint: d_model {spec.d_model}, "
            f"{spec.nhead} heads, {layers[spec.kind]}, feed-forward {spec.dim_feedforward}")
