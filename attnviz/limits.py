"""Safety caps on what a file may declare, checked before any allocation.

Defaults admit every real checkpoint (hundreds of GB, tens of thousands of tensors) while
refusing absurd declarations. Override with ``ATTNVIZ_MAX_*`` environment variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        return default


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = _env_int("ATTNVIZ_MAX_HEADER_BYTES", 100_000_000)
    max_pickle_bytes: int = _env_int("ATTNVIZ_MAX_PICKLE_BYTES", 256 << 20)
    max_pickle_ops: int = _env_int("ATTNVIZ_MAX_PICKLE_OPS", 20_000_000)
    max_tensors: int = _env_int("ATTNVIZ_MAX_TENSORS", 1_000_000)
    max_tensor_bytes: int = _env_int("ATTNVIZ_MAX_TENSOR_BYTES", 1 << 40)
    max_walk_nodes: int = _env_int("ATTNVIZ_MAX_WALK_NODES", 5_000_000)
    max_depth: int = _env_int("ATTNVIZ_MAX_DEPTH", 64)


LIMITS = Limits()
