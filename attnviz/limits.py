"""Safety caps on what a file may declare or make attnviz do, checked before any allocation.

Defaults admit every real checkpoint (hundreds of GB, tens of thousands of tensors) while
refusing absurd declarations, so that a small hostile file stays within about 1 GB of memory
and a minute of work. Override with ``ATTNVIZ_MAX_*`` environment variables; docs/security.md
lists them all.
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
    # bytes of objects a pickle builds, estimated per opcode by the dry run (a 20 MB pickle of
    # empty lists or placeholder calls would otherwise build gigabytes)
    max_pickle_memory: int = _env_int("ATTNVIZ_MAX_PICKLE_MEMORY", 400 << 20)
    # containers inside containers, counted on the opcodes before anything is built (C code
    # such as hashing a tuple recurses once per level)
    max_pickle_nesting: int = _env_int("ATTNVIZ_MAX_PICKLE_NESTING", 1000)
    max_globals: int = _env_int("ATTNVIZ_MAX_GLOBALS", 10_000)  # distinct globals per pickle
    max_nested_pickles: int = _env_int("ATTNVIZ_MAX_NESTED_PICKLES", 64)  # inspected per file
    max_tensors: int = _env_int("ATTNVIZ_MAX_TENSORS", 1_000_000)
    max_tensor_bytes: int = _env_int("ATTNVIZ_MAX_TENSOR_BYTES", 1 << 40)
    # bytes that views produce beyond the storage bytes they read (stride-0 and overlapping
    # views), summed over everything read from one checkpoint
    max_view_expansion_bytes: int = _env_int("ATTNVIZ_MAX_VIEW_EXPANSION_BYTES", 256 << 20)
    # bytes read from one checkpoint, as a multiple of its files' size (storages shared by
    # many tensors are read once per tensor); the view-expansion cap comes on top
    max_read_factor: int = _env_int("ATTNVIZ_MAX_READ_FACTOR", 16)
    max_name_bytes: int = _env_int("ATTNVIZ_MAX_NAME_BYTES", 64 << 20)  # all tensor names
    max_walk_nodes: int = _env_int("ATTNVIZ_MAX_WALK_NODES", 1_000_000)  # containers walked
    max_depth: int = _env_int("ATTNVIZ_MAX_DEPTH", 64)
    max_json_bytes: int = _env_int("ATTNVIZ_MAX_JSON_BYTES", 64 << 20)  # config, index, sidecar


LIMITS = Limits()
MAX_RANK = 64  # dimensions of one tensor (numpy's own limit)
MAX_DIM = (1 << 63) - 1  # a size, stride or offset (torch's int64)
