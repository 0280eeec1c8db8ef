"""What the root options set for every command: tracebacks, and how much to print.

``--quiet`` leaves the result itself (tables, JSON) and errors; ``--verbose`` adds notes and
timings of each step. Progress bars show only on a terminal and never with ``--quiet``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import typer

from attnviz.errors import UsageError
from attnviz.text_safety import terminal

QUIET, NORMAL, VERBOSE = 0, 1, 2


@dataclass
class CliState:
    debug: bool = False
    verbosity: int = NORMAL
    started: float = field(default_factory=time.perf_counter)
    quiet: bool = False
    verbose: bool = False

    def apply(self, *, debug: bool = False, quiet: bool = False, verbose: bool = False) -> None:
        """Root options, given before the command and/or after it (each place adds)."""
        self.debug |= debug
        self.quiet |= quiet
        self.verbose |= verbose
        if self.quiet and self.verbose:
            raise UsageError("--quiet and --verbose contradict each other; pass one")
        self.verbosity = QUIET if self.quiet else VERBOSE if self.verbose else NORMAL

    def say(self, message: str) -> None:
        """A normal status line ('wrote ...'); silent with --quiet."""
        if self.verbosity >= NORMAL:
            typer.echo(terminal(message))  # names and notes carry text from files

    def warn(self, message: str) -> None:
        """A warning (a heads override of a stored count...): on stderr, even with --quiet."""
        typer.echo(f"attnviz: warning: {terminal(message)}", err=True)

    def detail(self, message: str) -> None:
        """Only with --verbose, on stderr, stamped with the time since the command started."""
        if self.verbosity >= VERBOSE:
            typer.echo(f"[{time.perf_counter() - self.started:7.2f}s] {terminal(message)}",
                       err=True)

    @property
    def progress_enabled(self) -> bool:
        return self.verbosity >= NORMAL and sys.stderr.isatty()

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Time one stage of a command for --verbose."""
        begin = time.perf_counter()
        yield
        self.detail(f"{what} ({time.perf_counter() - begin:.2f}s)")


def state(ctx: typer.Context) -> CliState:
    """The root's state (a default one when a command runs without the root callback)."""
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState()
    return root.obj
