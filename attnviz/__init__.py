"""attnviz: open transformer checkpoints and show what is inside their attention.

Importing the package is light (no torch, no matplotlib); the public functions are loaded on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_checkpoint": "attnviz.checkpoint",
    "Checkpoint": "attnviz.checkpoint",
    "TensorInfo": "attnviz.checkpoint",
    "inspect_checkpoint": "attnviz.inspection",
    "InspectReport": "attnviz.inspection",
    "report_to_json": "attnviz.inspection",
    "find_attention_layers": "attnviz.layouts",
    "LAYOUTS": "attnviz.layouts",
    "AttnvizError": "attnviz.errors",
    "capture_attention": "attnviz.capture",
    "AttentionMaps": "attnviz.capture",
    "split_layer": "attnviz.split",
    "split_heads": "attnviz.split",
    "merge_heads": "attnviz.split",
    "HeadWeights": "attnviz.split",
    "render_matrix": "attnviz.render",
    "render_grid": "attnviz.render",
    "compose_grid": "attnviz.render",
    "build_report": "attnviz.report",
    "show": "attnviz.notebook",
}

if TYPE_CHECKING:
    from attnviz.capture import AttentionMaps, capture_attention
    from attnviz.checkpoint import Checkpoint, TensorInfo, load_checkpoint
    from attnviz.errors import AttnvizError
    from attnviz.inspection import InspectReport, inspect_checkpoint, report_to_json
    from attnviz.layouts import LAYOUTS, find_attention_layers
    from attnviz.notebook import show
    from attnviz.render import compose_grid, render_grid, render_matrix
    from attnviz.report import build_report
    from attnviz.split import HeadWeights, merge_heads, split_heads, split_layer

__all__ = [
    "LAYOUTS",
    "AttentionMaps",
    "AttnvizError",
    "Checkpoint",
    "HeadWeights",
    "InspectReport",
    "TensorInfo",
    "__version__",
    "build_report",
    "capture_attention",
    "compose_grid",
    "find_attention_layers",
    "inspect_checkpoint",
    "load_checkpoint",
    "merge_heads",
    "render_grid",
    "render_matrix",
    "report_to_json",
    "show",
    "split_heads",
    "split_layer",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'attnviz' has no attribute {name!r}")
