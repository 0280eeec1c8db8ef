"""What a checkpoint says about the model that wrote it: the architecture that decides between
layouts whose key names and shapes are the same (``c_attn [3E, E]`` is nanoGPT's blocked packing
in a nanoGPT file and per-head interleaved in a GPT-BigCode directory)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attnviz.formats.placeholders import ForeignObject
from attnviz.layouts.registry import CHECKPOINT_ARCHITECTURES
from attnviz.layouts.spec import LayoutContext


def layout_context(config: Mapping[str, Any] | None, root: Any,
                   forced: str | None = None) -> LayoutContext:
    """config.json ``model_type`` first, then settings a training script stored in the file."""
    if config:
        model_type = config.get("model_type")
        if isinstance(model_type, str) and model_type:
            return LayoutContext(model_type, f"config.json model_type '{model_type}'", forced)
    if isinstance(root, Mapping | ForeignObject):
        for key, architecture in CHECKPOINT_ARCHITECTURES:
            node = root.get(key) if isinstance(root, Mapping) else root.attribute(key)
            if isinstance(node, Mapping | ForeignObject):
                return LayoutContext(architecture, f"checkpoint '{key}' ({architecture})", forced)
    source = "no config.json model_type" if config is None or not config else \
        "config.json has no model_type"
    return LayoutContext(None, source, forced)
