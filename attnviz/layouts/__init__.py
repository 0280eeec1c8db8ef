"""Checkpoint layouts: declared records (``registry``) and the matcher that applies them."""

from attnviz.layouts.match import find_attention_layers
from attnviz.layouts.registry import LAYOUTS
from attnviz.layouts.spec import AttentionLayer, LayoutSpec, Packing, Unrecognised

__all__ = [
    "LAYOUTS",
    "AttentionLayer",
    "LayoutSpec",
    "Packing",
    "Unrecognised",
    "find_attention_layers",
]
