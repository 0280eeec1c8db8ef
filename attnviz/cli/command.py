"""What every attnviz command shares beyond its own options: help that shows value names
(``N``, ``FILE``), never Python types (``<list[str]>``) or braces (``{checkpoint}``); the root
options (-q/-v/--debug) accepted after the command too; a quiet end when the reader of stdout
goes away (``attnviz inspect model.pth | head -1``).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from rich.console import Console
from typer.core import TyperCommand

from attnviz.cli.state import state

# the status of a process killed by SIGPIPE (128 + 13), what `cat` and `git` end with
CLOSED_PIPE_EXIT = 141
GLOBAL_PANEL = "Global options"
# --help shows the panels in this order (typer's own "Options" panel, for an option declared
# without one, always comes first)
PANEL_ORDER = ("Input", "Model", "View", "Image views (ViT-like, DETR)", "Output", GLOBAL_PANEL)
ROOT_OPTIONS = ("debug", "quiet", "verbose")


def plain_metavars(params: list[Any]) -> list[Any]:
    """On/off flags show no value; any other parameter a name (``HEADS``), never its type."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif getattr(param, "metavar", None) is None:
            param.metavar = param.name.upper()
    return params


def _panel_rank(param: Any) -> int:
    panel = getattr(param, "rich_help_panel", None)
    return PANEL_ORDER.index(panel) if panel in PANEL_ORDER else -1


def closed_pipe() -> NoReturn:
    """The reader is gone: point stdout/stderr at /dev/null (so the final flush cannot fail
    again) and end with the status a tool killed by SIGPIPE has, printing nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):  # not a real file (a test runner's buffer)
            pass
    os.close(devnull)
    sys.exit(CLOSED_PIPE_EXIT)


def _raise_broken_pipe(console: Console) -> None:
    raise BrokenPipeError  # rich's own handling would end with status 1


@contextmanager
def quiet_on_closed_pipe() -> Iterator[None]:
    """Every closed pipe while the CLI runs, rich's output (tables, --help) included, ends in
    ``closed_pipe``. ``on_broken_pipe`` is rich's documented hook for this."""
    previous = Console.on_broken_pipe
    Console.on_broken_pipe = _raise_broken_pipe  # type: ignore[method-assign, assignment]
    try:
        yield
    except BrokenPipeError:
        closed_pipe()
    finally:
        Console.on_broken_pipe = previous  # type: ignore[method-assign]


class AttnvizCommand(TyperCommand):
    """A typer command with plain value names in its help and usage line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.sort(key=_panel_rank)  # stable: arguments keep their order

    def get_params(self, ctx: Any) -> list[Any]:
        return plain_metavars(super().get_params(ctx))

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.rich_help_panel = GLOBAL_PANEL
        return option

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """``[OPTIONS] CHECKPOINT`` (typer writes ``{checkpoint}`` for a required argument)."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces.extend(param.get_usage_pieces(ctx))
                continue
            name = param.metavar or param.name.upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


def _root_option_after_command(ctx: Any, param: Any, value: bool) -> bool:
    if value:
        state(ctx).apply(**{param.name: True})
    return value


def add_root_options(root: Any) -> None:
    """Give every command of ``root`` a copy of its -q/-v/--debug options, so that they work
    after the command name as well as before it (click only parses them before)."""
    originals = [p for p in root.params if p.name in ROOT_OPTIONS]
    for command in root.commands.values():
        names = {p.name for p in command.params}
        for original in originals:
            if original.name in names:
                continue
            option = copy.copy(original)
            option.expose_value = False  # the command's function does not take it
            option.callback = _root_option_after_command
            option.rich_help_panel = GLOBAL_PANEL
            command.params.append(option)
