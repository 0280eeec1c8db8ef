"""What every container reader returns, and the check every input file passes first."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnviz.errors import CheckpointError
from attnviz.formats.placeholders import ForeignObject

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def kind_of(mode: int) -> str:
    """'a FIFO (named pipe)', 'a character device'... for a non-regular file's mode."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def require_regular(path: Path, what: str = "input") -> os.stat_result:
    """Stat ``path`` (following links) and refuse anything but a regular file.

    Reading a FIFO blocks forever and a device never ends (/dev/zero): neither is a checkpoint.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"cannot be read ({exc.strerror})", path=path,
                              hint="check the path") from exc
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{what} is {kind_of(info.st_mode)}, not a regular file",
                              path=path, hint="pass a checkpoint file or a model directory")
    return info


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
