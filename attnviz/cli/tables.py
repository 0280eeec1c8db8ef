"""Rich rendering of command results (part of the CLI layer: only the CLI imports this)."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from attnviz.formatting import count, size

if TYPE_CHECKING:
    from attnviz.inspection import InspectReport
    from attnviz.split_export import SplitResult


def print_inspect(report: InspectReport, *, show_all: bool, tensor_filter: str | None,
                  console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    ckpt = report.checkpoint
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("file", str(ckpt.path))
    summary.add_row("format", ckpt.format)
    summary.add_row("tensors", f"{len(ckpt.tensors)} tensors, {count(ckpt.num_parameters)} "
                    f"parameters, {size(ckpt.total_bytes)}")
    summary.add_row("dtypes", ", ".join(f"{d} ({n})" for d, n in report.dtypes.items()) or "-")
    container = ckpt.container_key or "(top level)"
    if ckpt.other_containers:
        container += f"  (others: {', '.join(ckpt.other_containers)}; choose with --key)"
    summary.add_row("container", container)
    summary.add_row("prefix stripped", ckpt.stripped_prefix or "-")
    if ckpt.config_path:
        summary.add_row("config", str(ckpt.config_path))
    foreign = ", ".join(("[bold red]" if f.names_code else "") + f.qualified_name +
                        ("[/]" if f.names_code else "") for f in ckpt.foreign_objects)
    summary.add_row("foreign objects", foreign or "-")
    console.print(summary)

    table = Table(title=f"{len(report.layers)} attention layers", title_justify="left")
    for column in ("layer", "layout", "E", "kdim", "vdim", "heads", "source", "kv heads",
                   "head dim", "bias", "dtype"):
        table.add_column(column, justify="right" if column in {"E", "kdim", "vdim", "heads",
                                                              "kv heads", "head dim"} else "left")
    for item in report.layers:
        layer, heads = item.layer, item.heads
        if tensor_filter and not fnmatch.fnmatchcase(layer.display_name, tensor_filter):
            continue
        table.add_row(layer.display_name, layer.layout, str(layer.embed_dim), str(layer.kdim),
                      str(layer.vdim), str(heads.num_heads or "?"), heads.source,
                      str(heads.num_kv_heads or "?"), str(heads.head_dim or "?"),
                      "yes" if layer.has_bias else "no", layer.dtype)
    console.print(table)
    if report.unrecognised:
        odd = Table(title="unrecognised attention-like tensors", title_justify="left")
        for column in ("tensor", "shape", "why"):
            odd.add_column(column)
        for odd_tensor in report.unrecognised:
            odd.add_row(odd_tensor.name, str(list(odd_tensor.shape)), odd_tensor.reason)
        console.print(odd)
    if show_all:
        tree = Tree(str(ckpt.path.name))
        nodes: dict[str, Tree] = {}
        for name, info in ckpt.tensors.items():
            if tensor_filter and not fnmatch.fnmatchcase(name, tensor_filter):
                continue
            parts = name.split(".")
            parent = tree
            for depth in range(1, len(parts)):
                path = ".".join(parts[:depth])
                if path not in nodes:
                    nodes[path] = parent.add(parts[depth - 1])
                parent = nodes[path]
            parent.add(f"{parts[-1]}  {list(info.shape)} {info.dtype}")
        console.print(tree)
    for warning in report.warnings:
        style = "bold red" if warning.startswith("DANGER") else "yellow"
        console.print(f"[{style}]warning:[/] {warning}")


def split_table(result: SplitResult) -> Any:
    verified = any(done.verify is not None for done in result.layers)
    table = Table(title=f"{len(result.layers)} layers split", title_justify="left")
    for column in ("layer", "layout", "H/Hkv/d", "heads from", "tensors"):
        table.add_column(column, overflow="fold")
    if verified:
        table.add_column("verify (max abs err)")
    for done in result.layers:
        heads = done.heads
        row = [done.layer, done.layout, f"{heads.num_heads}/{heads.num_kv_heads}/{heads.head_dim}",
               heads.source, str(done.tensors)]
        if done.verify is not None:
            row.append(f"{max(done.verify.max_abs_error, done.verify.max_abs_error_weights):.1e}"
                       + (" ok" if done.verify.ok() else " MISMATCH"))
        table.add_row(*row)
    if verified:
        table.caption = ("verify: per-head attention vs nn.MultiheadAttention (MHA layouts) or "
                         "F.scaled_dot_product_attention on the stored tensors, float64")
    return table


def print_stats(stats: list[Any]) -> None:
    table = Table(title="value statistics (finite values)", title_justify="left")
    for column in ("tensor", "min", "max", "mean", "std", "NaN", "Inf"):
        table.add_column(column, justify="left" if column == "tensor" else "right")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    for item in stats:
        style = "bold red" if item.nan or item.inf else None
        table.add_row(item.name, fmt(item.min), fmt(item.max), fmt(item.mean), fmt(item.std),
                      str(item.nan), str(item.inf), style=style)
    Console(highlight=False).print(table)
