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
}

if TYPE_CHECKING:
    from attnviz.checkpoint import Checkpoint, TensorInfo, load_checkpoint
    from attnviz.errors import AttnvizError
    from attnviz.inspection import InspectReport, inspect_checkpoint, report_to_json
    from attnviz.layouts import LAYOUTS, find_attention_layers

__all__ = [
    "LAYOUTS",
    "AttnvizError",
    "Checkpoint",
    "InspectReport",
    "TensorInfo",
    "__version__",
    "find_attention_layers",
    "inspect_checkpoint",
    "load_checkpoint",
    "report_to_json",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'attnviz' has no attribute {name!r}")
