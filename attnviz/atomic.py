"""Writing outputs: one guard for where they may go, and atomic writes.

``check_output_path`` is the one output guard: an output may never be a file the command read
(compared by device and inode after following links, so hard links, symlinks and other spellings
of a path are caught, with or without ``--force``), never a directory, device, FIFO or socket
(as root, ``-o /dev/null --force`` would replace the system's /dev/null), and an existing entry
(a dangling symlink included) only with ``--force``.

``atomic_output`` writes to a temp file in the target folder, renamed into place on success. A
failed or interrupted write (exception, Ctrl-C, SIGTERM) leaves the previous file or nothing,
and no temp file behind. The file gets the mode a plain ``open(output, "w")`` would give it
(mkstemp's temp files are 0600): an existing file's mode when it is replaced, else
0666 minus the umask (0644 under the usual umask 022).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType

from attnviz.errors import OutputError, param
from attnviz.formats.base import kind_of


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)  # follows links: the file that would be written over
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _refuse_special(output: Path) -> os.stat_result | None:
    """The stat of what ``output`` points at (None if nothing); refuse anything not regular."""
    try:
        info = os.stat(output)
    except (OSError, ValueError):
        return None  # nothing there, or a dangling symlink
    if stat.S_ISDIR(info.st_mode):
        raise OutputError("output is a directory", path=output, hint="give a file name with -o")
    if not stat.S_ISREG(info.st_mode):
        raise OutputError(f"output is {kind_of(info.st_mode)}, not a regular file; refusing to "
                          "replace it", path=output, hint="choose a file path with -o")
    return info


def _same_as_input(output: Path, source: Path) -> OutputError:
    return OutputError(f"output is the input file {source.name} (this command reads it); "
                       "refusing to overwrite it", path=output, hint="choose another -o path")


def check_output_path(output: Path, inputs: Iterable[Path], *, force: bool) -> None:
    """Refuse to write over an input, a non-regular file, or an existing entry without
    ``force``; check the folder. ``inputs``: every file the command read."""
    output = Path(output)
    target = _refuse_special(output)
    if target is not None:
        for source in inputs:
            if _identity(Path(source)) == (target.st_dev, target.st_ino):
                raise _same_as_input(output, Path(source))
    absolute = Path(os.path.abspath(output))
    for source in inputs:
        if Path(os.path.abspath(source)) == absolute:
            raise _same_as_input(output, Path(source))
    if os.path.lexists(output) and not force:
        what = "output exists" if target is not None else "output exists (a dangling symlink)"
        raise OutputError(what, path=output, hint=f"pass {param('force', True)} to overwrite it")
    folder = absolute.parent
    if not folder.is_dir():
        raise OutputError("output folder does not exist", path=output,
                          hint=f"create {folder} first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", path=output,
                          hint="choose a folder you can write to")


def _umask() -> int:
    """The process umask, read without changing it where the system says it (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)  # elsewhere: the only portable read sets it, so set it back
    os.umask(current)
    return current


def output_mode(output: Path) -> int:
    """The permission bits ``open(output, "w")`` would leave: the existing file's, else
    0666 minus the umask."""
    try:
        info = os.stat(output)
    except (OSError, ValueError):
        return 0o666 & ~_umask()
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else 0o666 & ~_umask()


class Terminated(SystemExit):
    """SIGTERM, raised as an exception so the temp file is removed on the way out."""


@contextlib.contextmanager
def _terminate_like_interrupt() -> Iterator[None]:
    """While writing, SIGTERM unwinds the stack like Ctrl-C does (exit status 143)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def atomic_output(output: Path) -> Iterator[Path]:
    """Yield a temp path beside ``output``; rename it onto ``output`` only if the block succeeds."""
    output = Path(output)
    folder = Path(os.path.abspath(output)).parent  # beside the entry itself, even a symlink
    with _terminate_like_interrupt():
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
            _refuse_special(output)  # checked again: it may have changed while writing
            os.chmod(temp, output_mode(output))  # not mkstemp's 0600
            os.replace(temp, output)
        except BaseException as exc:
            temp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise OutputError(f"writing failed ({exc.strerror or exc})", path=output,
                                  hint="check free disk space and permissions") from exc
            raise
