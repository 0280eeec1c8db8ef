"""The ``attnviz`` command line: parse, call the core, print. Only this package imports typer/rich.

Errors are caught once, in ``AttnvizGroup.invoke``: an ``AttnvizError`` becomes one line on
stderr and its exit code; anything else is an internal error. ``--debug`` or
``ATTNVIZ_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from attnviz import __version__
from attnviz.cli import tables
from attnviz.cli.command import (
    AttnvizCommand,
    add_root_options,
    closed_pipe,
    plain_metavars,
    quiet_on_closed_pipe,
)
from attnviz.cli.options import (
    OUTPUT,
    VIEW,
    CheckpointArg,
    ConfigOpt,
    ForceOpt,
    HeadsOpt,
    KeyOpt,
    LayoutOpt,
)
from attnviz.cli.state import QUIET, CliState, state
from attnviz.errors import EXIT_FAILURE, AttnvizError, UsageError
from attnviz.formatting import size
from attnviz.text_safety import rich_markup, terminal


def _debug_enabled(ctx: Any = None) -> bool:
    if ctx is not None and isinstance(ctx.obj, CliState) and ctx.obj.debug:
        return True
    return os.environ.get("ATTNVIZ_DEBUG", "") not in {"", "0"} or "--debug" in sys.argv


# library parameters whose flag is not simply ``--`` + the name with dashes
_FLAG_FOR_PARAM = {"head": "--show-heads", "input_file": "--input", "layers": "--layer",
                   "factory": "--model", "points": "--point", "queries": "--query",
                   "fmt": "--format", "output": "-o", "probes": "--probe"}


def flag_for(param: str) -> str:
    """The command-line flag that sets the library parameter ``param`` (``strict=False``:
    ``--no-strict``; ``force=True``: ``--force``)."""
    name, _, value = param.partition("=")
    flag = _FLAG_FOR_PARAM.get(name, "--" + name.replace("_", "-"))
    return flag.replace("--", "--no-", 1) if value == "False" else flag


class AttnvizGroup(TyperGroup):
    """Typer group whose ``invoke`` turns every failure into one line and an exit code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        add_root_options(self)

    def get_params(self, ctx: Any) -> list[Any]:
        return plain_metavars(super().get_params(ctx))  # with typer's completion options

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with quiet_on_closed_pipe():  # `attnviz --help | head -1`
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        # typer would end a closed pipe with status 1 and one of the messages below with a
        # second BrokenPipeError: stop quietly first
        with quiet_on_closed_pipe():
            return self._invoke_reporting_errors(ctx)

    def _invoke_reporting_errors(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except AttnvizError as error:
            if _debug_enabled(ctx):
                raise
            line = error.describe(name_for=flag_for)  # library parameters shown as flags
            typer.echo(f"attnviz: error: {terminal(line, 2000)}", err=True)
            raise typer.Exit(error.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            closed_pipe()
        except Exception as error:
            if _debug_enabled(ctx):
                raise
            if type(error).__module__.startswith(("typer", "click")):
                raise
            typer.echo(f"attnviz: internal error: {type(error).__name__}: "
                       f"{terminal(' '.join(str(error).split()), 2000)} "
                       "(rerun with --debug for a traceback and please report it)", err=True)
            raise typer.Exit(EXIT_FAILURE) from None

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        """Usage errors (unknown option, missing argument) as one line, like every error."""
        forward = {"args": args, "prog_name": prog_name, "complete_var": complete_var,
                   "windows_expand_args": windows_expand_args, **extra}
        if not standalone_mode:
            return super().main(standalone_mode=False, **forward)
        with quiet_on_closed_pipe():
            self._main_reporting_errors(forward)

    def _main_reporting_errors(self, forward: dict[str, Any]) -> None:
        from typer._click import exceptions as click_errors  # typer's vendored click

        try:
            result = super().main(standalone_mode=False, **forward)
        except click_errors.NoArgsIsHelpError as error:
            error.show()
            sys.exit(error.exit_code)
        except click_errors.ClickException as error:
            ctx = getattr(error, "ctx", None)
            path = ctx.command_path.split(" ", 1) if ctx is not None else []
            where = " ".join(["attnviz", *path[1:]])  # whatever name the program was run by
            message = " ".join(error.format_message().split())
            typer.echo(f"attnviz: error: {terminal(message, 2000)} (see '{where} --help')",
                       err=True)
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.echo("attnviz: aborted", err=True)
            sys.exit(1)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=AttnvizGroup,
    help="Open transformer checkpoints and show what is inside their attention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attnviz {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only results and errors "
                                        "(no status lines, notes or progress bars).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print notes and the "
                                          "time each step took (on stderr).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """attnviz: attention layers, per-head weights and attention maps from checkpoints."""
    ctx.obj = CliState()
    ctx.obj.apply(debug=debug, quiet=quiet, verbose=verbose)  # each command takes them too


@app.command(cls=AttnvizCommand)
def inspect(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    heads: HeadsOpt = None,
    config: ConfigOpt = None,
    key: KeyOpt = None,
    layout: LayoutOpt = None,
    show_all: Annotated[bool, typer.Option(
        "--all", rich_help_panel=OUTPUT, help="Also show every tensor as a tree.")] = False,
    layer: Annotated[str | None, typer.Option(
        "--layer", metavar="LAYERS", rich_help_panel=VIEW, help="Only these layers and their "
        "tensors: index "
        "(as in the # column), range 0-3, name, glob, comma list.")] = None,
    filter_glob: Annotated[str | None, typer.Option(
        "--filter", hidden=True, help="The old spelling of --layer.")] = None,
    as_json: Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT, help="Print one "
                                          "JSON document (docs/json-schema.md).")] = False,
    stats: Annotated[bool, typer.Option(
        "--stats", rich_help_panel=OUTPUT,
        help="Also read the values: min/max/mean/std and NaN/Inf counts per tensor.")] = False,
) -> None:
    """Show every attention layer: layout, dims, heads and where that count came from."""
    from attnviz.inspection import inspect_checkpoint, report_to_json

    if as_json and show_all:
        raise UsageError("--json already lists every tensor; drop --all")
    if config is not None and not config.is_file():
        raise UsageError(f"--config {config}: no such file")
    st = state(ctx)
    with st.step(f"read the metadata of {checkpoint}"):
        report = inspect_checkpoint(checkpoint, heads=heads or (), config=config, key=key,
                                    layout=layout)
    if layer is not None and filter_glob is not None:
        raise UsageError("--layer and --filter (its old spelling) both given; pass one")
    if layer is not None or filter_glob is not None:
        from attnviz.inspection import select_layers

        # matching nothing is a usage error (exit 2), listing the layers with their indices
        report = select_layers(report, layer if layer is not None else filter_glob or "")
    value_stats = None
    if stats:
        from attnviz.tensor_stats import tensor_stats

        value_stats = tensor_stats(report.checkpoint, [
            n for n in report.checkpoint.tensors if report.shows_tensor(n)])
        for item in value_stats:
            if item.nan or item.inf:
                report.warnings.append(f"tensor '{item.name}' holds {item.nan} NaN and "
                                       f"{item.inf} Inf values")
    if as_json:
        document = report_to_json(report)
        if value_stats is not None:
            document["stats"] = [vars(item) for item in value_stats]
        typer.echo(json.dumps(document, indent=2))
        from attnviz.heads_override import override_warnings

        for warning in override_warnings(report.layers):  # in the JSON too; stderr for people
            st.warn(warning)
        return
    tables.print_inspect(report, show_all=show_all, tensor_filter=None)
    if value_stats is not None:
        tables.print_stats(value_stats)


@app.command("split-qkv", cls=AttnvizCommand)
def split_qkv(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", rich_help_panel=OUTPUT,
                                         help="Output file (.safetensors, .pt or .npz).")],
    heads: HeadsOpt = None,
    config: ConfigOpt = None,
    key: KeyOpt = None,
    layout: LayoutOpt = None,
    layer: Annotated[str | None, typer.Option(
        "--layer", metavar="LAYERS", rich_help_panel=VIEW, help="Only these layers: index (as "
        "in inspect's # "
        "column), range 0-3, name, glob, comma list.")] = None,
    layers: Annotated[str | None, typer.Option(
        "--layers", hidden=True, help="The old spelling of --layer.")] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", metavar="safetensors|pt|npz", rich_help_panel=OUTPUT,
        help="The output format (default: from the output suffix).")] = None,
    stacked: Annotated[bool, typer.Option(
        "--stacked", rich_help_panel=OUTPUT,
        help="Write {layer}.q.weight [H, d, E] instead of one tensor per head.")] = False,
    out_proj: Annotated[bool, typer.Option(
        "--out-proj/--no-out-proj", rich_help_panel=OUTPUT,
        help="Also write each head's columns of the output projection.")] = True,
    verify: Annotated[bool, typer.Option(
        "--verify", rich_help_panel=OUTPUT, help="Check per-head attention against the "
        "layout's reference and, for an HF model directory, q/k/v against the transformers "
        "module itself; exit 1 on a mismatch.")] = False,
    force: ForceOpt = False,
) -> None:
    """Export each attention layer's Wq/Wk/Wv/Wo per head, in Linear (out, in) orientation."""
    if layer is not None and layers is not None:
        raise UsageError("--layer and --layers (its old spelling) both given; pass one")
    layers = layer if layer is not None else layers
    if config is not None and not config.is_file():
        raise UsageError(f"--config {config}: no such file")
    from attnviz.source_hash import BackgroundHash

    # the source sha256 is a full read: start it before the heavier imports below
    hashing = BackgroundHash([checkpoint] if checkpoint.is_file() else [])
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from attnviz.split_export import LayerDone, split_checkpoint

    st = state(ctx)
    console = Console(highlight=False)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
        "{task.completed}/{task.total} layers"), TimeRemainingColumn(), transient=True,
        console=Console(stderr=True), disable=not st.progress_enabled)
    task = progress.add_task("splitting", total=None)

    def on_layer(done: LayerDone) -> None:
        progress.update(task, total=done.total, completed=done.index + 1,
                        description=done.layer[-40:])
        st.detail(f"layer {done.index + 1}/{done.total} {done.layer}"
                  + ("" if done.verify is None else
                     f": verify max abs error {done.verify.max_abs_error:.2e}"))
        if done.verify is not None and not done.verify.ok():
            check = done.verify
            console.print(f"[bold red]verify mismatch[/] {rich_markup(done.layer)}: max abs error "
                          f"{check.max_abs_error:.2e} (weights {check.max_abs_error_weights:.2e})"
                          f" vs {check.reference}")

    with progress:
        result = split_checkpoint(checkpoint, output, heads=heads or (), config=config, key=key,
                                  layers=layers, fmt=fmt, stacked=stacked, out_proj=out_proj,
                                  verify=verify, force=force, on_layer=on_layer,
                                  hashing=hashing, layout=layout)
    for warning in result.warnings:
        st.warn(warning)
    if st.verbosity == QUIET:
        return
    console.print(tables.split_table(result))
    if verify:
        from attnviz.verify_hf import HfCheck

        checks = [d.hf_verify for d in result.layers if isinstance(d.hf_verify, HfCheck)]
        local = {d.verify.reference for d in result.layers if d.verify is not None}
        console.print(f"verified against {', '.join(sorted(local))}", markup=False)
        if result.hf_reference and checks:
            worst = max(c.max_abs_error for c in checks)
            console.print(f"verified q, k, v of {len(checks)} layers against "
                          f"{result.hf_reference}: max relative error {worst:.2e}", markup=False)
        elif result.hf_reference:
            console.print(f"not verified against {result.hf_reference}", markup=False)
    console.print(f"wrote {result.output} ({result.format}, {result.tensors_written} tensors, "
                  f"{size(result.bytes_written)})"
                  + (f" and {result.sidecar}" if result.sidecar else ""))
    if result.upcast:
        console.print(f"[yellow]note:[/] {len(result.upcast)} tensors upcast to float32 (numpy "
                      "has no bfloat16/float8)")


@app.command("merge-qkv", cls=AttnvizCommand)
def merge_qkv(
    ctx: typer.Context,
    split: Annotated[Path, typer.Argument(metavar="SPLIT_FILE",
                                          help="A file written by 'attnviz split-qkv'.")],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", rich_help_panel=OUTPUT,
                                         help="Output file (.safetensors or .pt).")],
    force: ForceOpt = False,
) -> None:
    """Rebuild the original packed tensors from a split-qkv file, bit for bit."""
    from attnviz.split_export import merge_split

    result = merge_split(split, output, force=force)
    state(ctx).say(f"wrote {result.output} ({result.layers} layers, {result.tensors} tensors)")


# the other commands register themselves on ``app``
from attnviz.cli import demo_cmd, heads_cmd, heatmap_cmd, report_cmd  # noqa: E402

__all__ = ["app", "demo_cmd", "heads_cmd", "heatmap_cmd", "main", "report_cmd"]


def main() -> None:
    """Console-script entry point."""
    typer.main.get_command(app)(prog_name="attnviz")


if __name__ == "__main__":
    main()
