"""What every container reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnviz.formats.placeholders import ForeignObject


@dataclass(frozen=True)
class StorageSpan:
    """Absolute byte range of one storage inside a file."""

    path: Path
    offset: int
    length: int
    byteorder: str = "little"


@dataclass
class LoadedFile:
    """One container, parsed for metadata only: no tensor bytes have been read."""

    path: Path
    format: str
    root: Any
    spans: dict[str, StorageSpan]
    foreign: list[type[ForeignObject]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
