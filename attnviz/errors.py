"""Error hierarchy. Every failure a user can cause is an ``AttnvizError`` with an exit code.

The CLI prints ``str(error)`` as one line; messages therefore name the file, what is wrong and
what to do next.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class AttnvizError(Exception):
    """Base class: a failure attnviz understands and explains in one line."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        return " ".join(text.split())  # always one line


def with_path(error: AttnvizError, path: str | Path, hint: str | None = None) -> AttnvizError:
    """The same error naming ``path`` (errors raised deep inside a reader do not know it)."""
    if error.path is not None:
        return error
    return type(error)(error.message, path=path, hint=error.hint or hint)


def did_you_mean(given: str, names: list[str], fallback: str) -> str:
    """A hint naming the closest of ``names`` to what the user typed, else ``fallback``."""
    import difflib

    close = difflib.get_close_matches(given.replace("*", ""), names, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else fallback


class UsageError(AttnvizError):
    """Bad flags or flag combinations."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(AttnvizError):
    """The input file cannot be read as a checkpoint."""

    exit_code = EXIT_BAD_INPUT


class NoAttentionError(CheckpointError):
    """A command that needs attention layers got a file without any."""


class UnknownFormatError(CheckpointError):
    """Magic bytes match no supported container."""


class CorruptCheckpointError(CheckpointError):
    """A supported container whose content is inconsistent (truncated, bad header, bad offsets)."""


class UnsupportedCheckpointError(CheckpointError):
    """A recognised but unsupported container (TorchScript, compressed records, ...)."""


class LimitExceededError(CheckpointError):
    """A declared size or a structure exceeds a safety cap."""


class ContainerKeyError(CheckpointError):
    """``--key`` names no mapping of tensors."""


class HeadsError(AttnvizError):
    """Head counts that cannot be right for a layer (E % H != 0, Hkv not dividing H, ...)."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(AttnvizError):
    """A config.json that cannot be read."""

    exit_code = EXIT_BAD_INPUT


class OutputError(AttnvizError):
    """An output cannot be written (exists, same as input, unwritable)."""

    exit_code = EXIT_BAD_INPUT


class AmbiguousLayoutError(UsageError):
    """Key names and shapes fit several packings and nothing says which model wrote the file."""
