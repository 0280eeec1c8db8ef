"""Error hierarchy. Every failure a user can cause is an ``AttnvizError`` with an exit code.

The CLI prints ``str(error)`` as one line; messages therefore name the file, what is wrong and
what to do next.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

_PARAM_MARK = "\x1f"  # around a parameter name inside a message; never in text from files
_PARAM_REF = re.compile(f"{_PARAM_MARK}([A-Za-z_][A-Za-z0-9_]*(?:=(?:True|False))?)"
                        f"{_PARAM_MARK}")


def param(name: str, value: bool | None = None) -> str:
    """A library parameter named inside a message (``f"pass {param('force', True)} to ..."``):
    the library's text says ``force=True`` (``name`` alone without a value), the CLI's says
    its flag (``--force``; ``--no-strict`` for ``param('strict', False)``)."""
    return f"{_PARAM_MARK}{name}{'' if value is None else f'={value}'}{_PARAM_MARK}"


def render_params(text: str, name_for: Callable[[str], str] | None = None) -> str:
    """``text`` with each ``param()`` reference as the parameter's name, or ``name_for(name)``."""
    return _PARAM_REF.sub(lambda m: name_for(m.group(1)) if name_for else m.group(1), text)


def _names(name: str, text: str) -> bool:
    """Whether ``text`` has a ``param()`` reference to ``name`` (with or without a value)."""
    return param(name) in text or f"{_PARAM_MARK}{name}=" in text


class AttnvizError(Exception):
    """Base class: a failure attnviz understands and explains in one line."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None,
                 param: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint
        # the library parameter at fault (``heads``, ``layer``): library messages name it, the
        # CLI shows its flag instead, so no library text ever mentions a command-line flag
        self.param = param
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return self.describe()

    def describe(self, param_label: str | None = None, *,
                 name_for: Callable[[str], str] | None = None) -> str:
        """One line; ``param_label`` replaces the parameter's name and ``name_for`` names each
        ``param()`` reference in the message and hint (the CLI passes flags for both)."""
        label = param_label or (name_for(self.param) if name_for and self.param else self.param)
        if self.param and param_label is None and _names(self.param, self.message):
            label = None  # the message names it already
        message = render_params(self.message, name_for)
        text = f"{label}: {message}" if label else message
        if self.path:
            text = f"{self.path}: {text}"
        if self.hint:
            text = f"{text} ({render_params(self.hint, name_for)})"
        return " ".join(text.split())  # always one line


def with_path(error: AttnvizError, path: str | Path, hint: str | None = None) -> AttnvizError:
    """The same error naming ``path`` (errors raised deep inside a reader do not know it)."""
    if error.path is not None:
        return error
    return type(error)(error.message, path=path, hint=error.hint or hint, param=error.param)


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
