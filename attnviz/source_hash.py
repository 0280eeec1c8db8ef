"""sha256 of checkpoint files, computed on a background thread while other work goes on.

Stdlib only, so the CLI can start it before importing numpy and friends.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path

from attnviz.errors import CheckpointError


class BackgroundHash:
    """sha256 of the source files on a daemon thread (hashlib releases the GIL), cancellable
    so that an error elsewhere does not wait for a multi-GB read to finish."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._start(list(paths))

    def _start(self, paths: list[Path]) -> None:
        self.paths = paths
        self._digests: dict[str, str] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def restart(self, paths: list[Path]) -> None:
        self.cancel()
        self._thread.join()
        self._start(paths)

    def _run(self) -> None:
        buffer = bytearray(4 << 20)
        view = memoryview(buffer)
        try:
            for path in self.paths:
                digest = hashlib.sha256()
                with path.open("rb") as handle:
                    while not self._stop.is_set() and (count := handle.readinto(buffer)):
                        digest.update(view[:count])
                self._digests[path.name] = digest.hexdigest()
        except OSError as exc:
            self._error = exc

    def result(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise CheckpointError(f"cannot read the source to hash it ({self._error})")
        return self._digests

    def cancel(self) -> None:
        self._stop.set()
