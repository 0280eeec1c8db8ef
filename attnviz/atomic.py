"""Writing outputs atomically: a temp file in the target folder, renamed into place on success.

A failed or interrupted write (exception, Ctrl-C) leaves the previous file or nothing, and no
temp file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from attnviz.errors import OutputError


def check_output_path(output: Path, inputs: Iterable[Path], *, force: bool) -> None:
    """Refuse to overwrite an input, or an existing output without ``force``; check the folder."""
    target = output.resolve()
    for source in inputs:
        src = source.resolve()
        if target == src or (output.exists() and source.exists() and os.path.samefile(output,
                                                                                   source)):
            raise OutputError("output is the input file; refusing to overwrite it",
                              path=output, hint="choose another -o path")
    if output.is_dir():
        raise OutputError("output is a directory", path=output, hint="give a file name with -o")
    if output.exists() and not force:
        raise OutputError("output exists", path=output, hint="pass --force to overwrite it")
    folder = target.parent
    if not folder.is_dir():
        raise OutputError("output folder does not exist", path=output,
                          hint=f"create {folder} first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", path=output,
                          hint="choose a folder you can write to")


@contextlib.contextmanager
def atomic_output(output: Path) -> Iterator[Path]:
    """Yield a temp path beside ``output``; rename it onto ``output`` only if the block succeeds."""
    folder = output.resolve().parent
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial",
                                             dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot create a file in {folder} ({exc.strerror})", path=output,
                          hint="choose a folder you can write to") from exc
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        os.replace(temp, output)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"writing failed ({exc.strerror or exc})", path=output,
                              hint="check free disk space and permissions") from exc
        raise
