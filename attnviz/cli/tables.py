"""Rich rendering of command results (part of the CLI layer: only the CLI imports this).

Every piece of file text (tensor and layer names, keys, global names, warnings) is shown as a
``rich.text.Text`` built by ``_text``: never parsed as markup (a name like ``[/]`` would crash
the table, ``[red]`` restyle it), with control characters made visible (a raw escape sequence
could erase the DANGER line) and cut to a length a terminal can show.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from attnviz.formatting import count, size
from attnviz.text_safety import safe_str, terminal

if TYPE_CHECKING:
    from attnviz.inspection import InspectReport
    from attnviz.split_export import SplitResult

SHOWN_CHARS = 300  # of one name in a table; --json has them in full
LAYER_COLUMNS = ("layout", "E", "kdim", "vdim", "heads", "source", "kv heads", "head dim", "bias",
                 "dtype")
NUMERIC_COLUMNS = {"E", "kdim", "vdim", "heads", "kv heads", "head dim"}
TREE_DEPTH = 32  # name segments shown as tree levels; deeper ones stay joined


def _text(value: Any, style: str | None = None, limit: int = SHOWN_CHARS) -> Text:
    return Text(terminal(safe_str(value), limit), style=style or "")


def console_for(stderr: bool = False) -> Console:
    """A console that never reads markup or emoji codes out of the text it is given."""
    return Console(highlight=False, emoji=False, stderr=stderr)


def print_inspect(report: InspectReport, *, show_all: bool, tensor_filter: str | None,
                  console: Console | None = None) -> None:
    console = console or console_for()
    ckpt = report.checkpoint
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold", no_wrap=True)
    summary.add_column(overflow="fold")  # paths and names wrap, never cut
    summary.add_row("file", _text(ckpt.path))
    summary.add_row("format", _text(ckpt.format))
    summary.add_row("tensors", f"{len(ckpt.tensors)} tensors, {count(ckpt.num_parameters)} "
                    f"parameters, {size(ckpt.total_bytes)}")
    summary.add_row("dtypes", _text(", ".join(f"{d} ({n})" for d, n in report.dtypes.items())
                                    or "-"))
    container = ckpt.container_key or "(top level)"
    if ckpt.other_containers:
        container += f"  (others: {', '.join(ckpt.other_containers)}; choose with --key)"
    summary.add_row("container", _text(container, limit=4 * SHOWN_CHARS))
    summary.add_row("prefix stripped", _text(ckpt.stripped_prefix or "-"))
    if ckpt.config_path:
        summary.add_row("config", _text(ckpt.config_path))
    context = report.context
    summary.add_row("architecture", _text(f"{context.architecture} ({context.source})"
                                          if context.architecture else f"- ({context.source})"))
    if context.forced:
        summary.add_row("layout", _text(f"{context.forced} (--layout)"))
    foreign = Text(", ").join(_text(f.qualified_name, "bold red" if f.names_code else None)
                              for f in ckpt.foreign_objects[:200])
    if len(ckpt.foreign_objects) > 200:
        foreign.append(f", ... ({len(ckpt.foreign_objects)} in all, see --json)")
    summary.add_row("foreign objects", foreign if ckpt.foreign_objects else "-")
    console.print(summary)

    _print_layers(report, tensor_filter, console)
    if report.unrecognised:
        odd = Table(title="unrecognised attention-like tensors", title_justify="left")
        for column in ("tensor", "shape", "why"):
            odd.add_column(column, overflow="fold")
        for odd_tensor in report.unrecognised:
            odd.add_row(_text(odd_tensor.name), _text(list(odd_tensor.shape)),
                        _text(odd_tensor.reason))
        console.print(odd)
    if show_all:
        console.print(_tensor_tree(report, tensor_filter))
    for warning in report.warnings:
        danger = warning.startswith("DANGER")
        console.print(Text.assemble(("warning:", "bold red" if danger else "yellow"), " ",
                                    _text(warning, limit=4 * SHOWN_CHARS)), soft_wrap=True)


def _layer_fields(item: Any) -> dict[str, str]:
    layer, heads = item.layer, item.heads
    return {"layout": safe_str(layer.layout), "E": safe_str(layer.embed_dim),
            "kdim": safe_str(layer.kdim), "vdim": safe_str(layer.vdim),
            "heads": safe_str(heads.num_heads or "?"), "source": safe_str(heads.source),
            "kv heads": safe_str(heads.num_kv_heads or "?"),
            "head dim": safe_str(heads.head_dim or "?"), "bias": "yes" if layer.has_bias else "no",
            "dtype": safe_str(layer.dtype)}


def _layer_table(rows: list[tuple[int, str, dict[str, str]]], columns: list[str],
                 stacked: bool = False) -> Table:
    """# and layer, then ``columns``; ``stacked`` puts them under the name instead."""
    table = Table()
    table.add_column("#", justify="right", no_wrap=True)
    # a name longer than the whole line wraps rather than losing characters to an ellipsis
    table.add_column("layer", overflow="fold")
    for column in [] if stacked else columns:
        table.add_column(column, overflow="fold",
                         justify="right" if column in NUMERIC_COLUMNS else "left")
    for index, name, fields in rows:
        cell = _text(name)
        if stacked and columns:
            cell.append("\n")
            cell.append_text(_text(_pairs(fields, columns), "dim"))
        table.add_row(str(index), cell, *([] if stacked else [_text(fields[c]) for c in columns]))
    return table


def _pairs(fields: dict[str, str], columns: list[str]) -> str:
    return "; ".join(f"{column} {fields[column]}" for column in columns)  # values hold commas


def _fits(table: Table, console: Console) -> bool:
    """Every cell on one line (a console measures against its own width: lift that)."""
    unbounded = console.options.update(max_width=10**6)
    return console.measure(table, options=unbounded).maximum <= console.width


def _print_layers(report: InspectReport, tensor_filter: str | None, console: Console) -> None:
    """The layer table, every name in full at any width: all columns when they fit; else the
    values every layer shares go in the heading and the table keeps the ones that differ; else
    those go under each name. ``#`` is the layer's index (what ``--layer N`` selects)."""
    rows = [(index, item.layer.display_name, _layer_fields(item))
            for index, item in enumerate(report.layers)
            if report.shows_layer(item.index) and (
                not tensor_filter or fnmatch.fnmatchcase(item.layer.display_name, tensor_filter))]
    total = len(report.layers)
    heading = Text(f"{total} attention layer{'' if total == 1 else 's'}", style="bold")
    if tensor_filter or report.selected is not None:
        heading.append(f" ({len(rows)} shown)")
    if not rows:
        console.print(heading)
        return
    full = _layer_table(rows, list(LAYER_COLUMNS))
    if _fits(full, console):
        console.print(heading)
        console.print(full)
        return
    shared = [c for c in LAYER_COLUMNS if len({fields[c] for _, _, fields in rows}) == 1]
    differing = [c for c in LAYER_COLUMNS if c not in shared]
    if shared:
        heading.append(", each with ")
        heading.append_text(_text(_pairs(rows[0][2], shared)))
    console.print(heading)
    narrow = _layer_table(rows, differing)
    if not _fits(narrow, console):
        narrow = _layer_table(rows, differing, stacked=True)
    console.print(narrow)


def _tensor_tree(report: InspectReport, tensor_filter: str | None) -> Tree:
    ckpt = report.checkpoint
    tree = Tree(_text(ckpt.path.name))
    nodes: dict[str, Tree] = {}
    for name, info in ckpt.tensors.items():
        if (tensor_filter and not fnmatch.fnmatchcase(name, tensor_filter)) or \
                not report.shows_tensor(name):
            continue
        parts = name.split(".", TREE_DEPTH)  # at most TREE_DEPTH + 1 parts: linear in the name
        parent = tree
        for depth in range(1, len(parts)):
            path = ".".join(parts[:depth])
            if path not in nodes:
                nodes[path] = parent.add(_text(parts[depth - 1]))
            parent = nodes[path]
        label = _text(parts[-1])
        label.append(f"  {list(info.shape)} {info.dtype}")
        parent.add(label)
    return tree


def split_table(result: SplitResult) -> Any:
    verified = any(done.verify is not None for done in result.layers)
    table = Table(title=f"{len(result.layers)} layers split", title_justify="left")
    for column in ("layer", "layout", "H/Hkv/d", "heads from", "tensors"):
        table.add_column(column, overflow="fold")
    if verified:
        table.add_column("verify (max abs err)")
    for done in result.layers:
        heads = done.heads
        row: list[Any] = [_text(done.layer), _text(done.layout),
                          f"{heads.num_heads}/{heads.num_kv_heads}/{heads.head_dim}",
                          _text(heads.source), str(done.tensors)]
        if done.verify is not None:
            row.append(f"{max(done.verify.max_abs_error, done.verify.max_abs_error_weights):.1e}"
                       + (" ok" if done.verify.ok() else " MISMATCH"))
        table.add_row(*row)
    if verified:
        table.caption = ("verify: per-head attention vs nn.MultiheadAttention (MHA layouts) or "
                         "F.scaled_dot_product_attention on the stored tensors, float64")
    return table


def print_stats(stats: list[Any], console: Console | None = None) -> None:
    """Per-tensor statistics; on a line too narrow for a row, the numbers go under the name."""
    console = console or console_for()
    columns = ("min", "max", "mean", "std", "NaN", "Inf")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    def build(stacked: bool) -> Table:
        table = Table(title="value statistics (finite values)", title_justify="left")
        table.add_column("tensor", overflow="fold")  # names wrap, never cut
        for column in [] if stacked else columns:
            table.add_column(column, justify="right", no_wrap=True)
        for item in stats:
            values = [fmt(item.min), fmt(item.max), fmt(item.mean), fmt(item.std),
                      str(item.nan), str(item.inf)]
            style = "bold red" if item.nan or item.inf else None
            name = _text(item.name)
            if stacked:
                name.append("\n" + "; ".join(f"{c} {v}" for c, v in zip(columns, values,
                                                                          strict=True)))
                table.add_row(name, style=style)
            else:
                table.add_row(name, *values, style=style)
        return table

    table = build(stacked=False)
    console.print(table if _fits(table, console) else build(stacked=True))
