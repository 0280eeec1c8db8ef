"""Pickles inside pickles: the bytes given to ``torch.storage._load_from_bytes`` or
``pickle.loads``, which a normal unpickler loads with ``torch.load(weights_only=False)``.

They are read here with the same restricted reader and the same caps as the outer file, only to
list the globals they name; nothing they hold is used as a tensor. Payloads nest at most
``MAX_NESTING`` deep and at most ``LIMITS.max_nested_pickles`` are read per file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from attnviz.errors import CheckpointError
from attnviz.formats.placeholders import ForeignObject
from attnviz.formats.safe_pickle import StorageRef, restricted_load, storage_from_pid
from attnviz.formats.torch_legacy import BoundedReader, load_legacy_pickles
from attnviz.formats.torch_zip import load_zip_pickle, open_zip
from attnviz.limits import LIMITS

MAX_NESTING = 3


def _any_storage(pid: Any) -> Any:
    if isinstance(pid, tuple) and pid[:1] == ("storage",):
        dtype, key, numel, location = storage_from_pid(pid)
        return StorageRef(key, dtype, numel, location)
    return None  # a raw pickle's own persistent ids mean nothing here


def read_nested(payload: bytes, where: Path) -> tuple[Any, list[type[ForeignObject]]]:
    """The object a nested payload holds and the globals it names, or a CheckpointError.

    ``payload`` may be a torch zip, a legacy torch file or a bare pickle; ``where`` names it
    in messages.
    """
    if len(payload) > LIMITS.max_pickle_bytes:
        raise CheckpointError(f"nested pickle of {len(payload)} bytes, over the cap", path=where)
    if payload.startswith(b"PK\x03\x04"):
        with open_zip(where, io.BytesIO(payload)) as archive:
            root, foreign, _, _, _ = load_zip_pickle(archive, where, len(payload))
        return root, foreign
    stream = io.BytesIO(payload)
    if payload.startswith(b"\x80") and b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19" in \
            payload[:16]:  # LONG1 of the legacy magic number
        root, foreign, _, _ = load_legacy_pickles(
            BoundedReader(stream, len(payload)), where)  # type: ignore[arg-type]
        return root, foreign
    return restricted_load(payload, _any_storage)
