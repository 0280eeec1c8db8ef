"""Compact HTML tables for the result objects in a notebook (their ``_repr_html_``) and short
``repr`` texts. Every name and value may come from a stranger's file: each passes through
``text_safety`` (one line, control characters visible) and is HTML-escaped. No torch import.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnviz.text_safety import html_text, safe_str, terminal

if TYPE_CHECKING:
    from attnviz.capture import AttentionMaps
    from attnviz.heatmap import HeatmapResult
    from attnviz.inspection import InspectReport
    from attnviz.report import ReportResult
    from attnviz.split import HeadWeights
    from attnviz.split_export import SplitResult

MAX_ROWS = 40  # table rows before "… N more"
MAX_ITEMS = 12  # warnings and notes listed
PREVIEW_BYTES = 8 * 1024 * 1024  # a heatmap result shows its image inline up to this size


def _text(value: Any, limit: int = 200) -> str:
    """Any value from a file or a user as HTML text: one line, controls visible, escaped."""
    return html_text(terminal(safe_str(value), limit))


def _known(value: Any) -> Any:
    return "?" if value is None else value


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td style="text-align:left">{_text(c)}</td>' for c in row)
                   + "</tr>" for row in rows[:MAX_ROWS])
    if len(rows) > MAX_ROWS:
        body += f'<tr><td colspan="{len(header)}">… {len(rows) - MAX_ROWS} more</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fields(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f'<tr><th style="text-align:left">{_text(k)}</th>'
                   f'<td style="text-align:left">{_text(v, 400)}</td></tr>'
                   for k, v in pairs if v is not None)
    return f"<table>{rows}</table>"


def _items(title: str, items: Sequence[str]) -> str:
    if not items:
        return ""
    shown = "".join(f"<li>{_text(item, 400)}</li>" for item in items[:MAX_ITEMS])
    if len(items) > MAX_ITEMS:
        shown += f"<li>… {len(items) - MAX_ITEMS} more</li>"
    return f"<p><strong>{_text(title)}</strong></p><ul>{shown}</ul>"


def _box(kind: str, title: Any, *parts: str) -> str:
    return (f'<div class="attnviz-result"><p><strong>{_text(kind)}</strong> · '
            f'{_text(title)}</p>{"".join(parts)}</div>')


def _shape(array: Any) -> str:
    return str(tuple(int(n) for n in array.shape))


def inspect_html(report: InspectReport) -> str:
    from attnviz.captions import checkpoint_name
    from attnviz.formatting import count, size

    ckpt = report.checkpoint
    items = [item for item in report.layers if report.shows_layer(item.index)]
    chosen = f"{len(items)} of {len(report.layers)} (selected)" if report.selected is not None \
        else str(len(items))
    fields = _fields([
        ("file", ckpt.path), ("format", ckpt.format),
        ("tensors", f"{len(ckpt.tensors)} tensors, {count(ckpt.num_parameters)} parameters, "
                    f"{size(ckpt.total_bytes)}"),
        ("dtypes", ", ".join(f"{name} ({n})" for name, n in report.dtypes.items()) or "-"),
        ("architecture", f"{report.context.architecture or 'unknown'} ({report.context.source})"),
        ("container", ckpt.container_key), ("prefix stripped", ckpt.stripped_prefix),
        ("config", ckpt.config_path), ("attention layers", chosen),
        ("unrecognised tensors", len(report.unrecognised) or None)])
    rows = [[item.index, item.layer.display_name, item.layer.layout, item.layer.packing.value,
             item.layer.embed_dim, _known(item.heads.num_heads), _known(item.heads.num_kv_heads),
             _known(item.heads.head_dim), item.heads.source] for item in items]
    table = _table(["#", "layer", "layout", "packing", "E", "heads", "kv heads", "head dim",
                    "heads from"], rows) if rows else "<p>No attention layers recognised.</p>"
    return _box("InspectReport", checkpoint_name(ckpt.path), fields, table,
                _items("warnings", report.warnings))


def inspect_repr(report: InspectReport) -> str:
    path = terminal(str(report.checkpoint.path), 120)
    return (f"InspectReport({path!r}, {report.checkpoint.format}, {len(report.layers)} attention "
            f"layers, {len(report.warnings)} warnings)")


def map_shapes(maps: AttentionMaps) -> dict[str, tuple[int, ...]]:
    """Every captured call's (B, H, Lq, Lk), kept maps or streamed."""
    shapes = {name: tuple(int(n) for n in shape) for name, shape in maps.shapes.items()}
    for name, tensor in maps.maps.items():
        shapes.setdefault(name, tuple(int(n) for n in tensor.shape))
    return shapes


def maps_html(maps: AttentionMaps) -> str:
    shapes = map_shapes(maps)
    rows = [[name or "(root)", str(shape), maps.routes.get(name, "?"),
             "kept" if name in maps.maps else "streamed (not kept)",
             "yes" if name in maps.scores else "no"] for name, shape in shapes.items()]
    heads = sum(shape[1] for shape in shapes.values() if len(shape) > 1)  # (B, H, Lq, Lk)
    fields = _fields([("attention calls", len(shapes)), ("head maps", heads),
                      ("no map from", ", ".join(maps.missed[:6]) if maps.missed else None)])
    hint = "<p>maps.show() draws them inline as the report's head view.</p>" if maps.maps else ""
    return _box("AttentionMaps", f"{len(shapes)} layers, (B, H, Lq, Lk) each", fields,
                _table(["layer", "shape", "captured by", "map", "scores"], rows), hint)


def maps_repr(maps: AttentionMaps) -> str:
    shapes = map_shapes(maps)
    shown = ", ".join(f"{terminal(name or '(root)', 60)!r}: {shape}"
                      for name, shape in list(shapes.items())[:3])
    more = f", … {len(shapes) - 3} more" if len(shapes) > 3 else ""
    missed = f"; no map from {len(maps.missed)}" if maps.missed else ""
    return f"AttentionMaps({len(shapes)} layers (B, H, Lq, Lk): {shown}{more}{missed})"


def _preview(path: Path) -> str:
    """A written PNG or SVG inline (an SVG in <img> runs no script)."""
    mime = {".png": "image/png", ".svg": "image/svg+xml"}.get(path.suffix.lower())
    try:
        if mime is None or path.stat().st_size > PREVIEW_BYTES:
            return ""
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return ""
    return f'<img alt="{_text(path.name)}" style="max-width:100%" src="data:{mime};base64,{data}">'


def heatmap_html(result: HeatmapResult) -> str:
    fields = _fields([("output", result.output), ("view", result.view), ("model", result.model),
                      ("layers", f"{len(result.layers)}: " + ", ".join(result.layers[:6])
                       + (" …" if len(result.layers) > 6 else "")),
                      ("heads", ", ".join(result.heads[:16])
                       + (" …" if len(result.heads) > 16 else "")),
                      ("maps file", result.maps_file)])
    return _box("HeatmapResult", result.output.name, fields, _items("warnings", result.warnings),
                _items("notes", result.notes), _preview(result.output))


def report_result_html(result: ReportResult) -> str:
    from attnviz.formatting import size

    fields = _fields([("output", result.output or "not written: the page is in result.page"),
                      ("model", result.model), ("layers", result.layers),
                      ("head maps", result.heads), ("overlays", result.overlays or None),
                      ("page size", size(result.bytes_written))])
    return _box("ReportResult", result.output.name if result.output else "in memory", fields,
                _items("warnings", result.warnings), _items("notes", result.notes),
                "<p>result.show() draws the page inline.</p>")


def split_html(result: SplitResult) -> str:
    from attnviz.formatting import size

    rows = [[done.index, done.layer, done.layout, _known(done.heads.num_heads),
             _known(done.heads.num_kv_heads), _known(done.heads.head_dim), done.tensors,
             "-" if done.verify is None else f"{done.verify.max_abs_error:.2e}"]
            for done in result.layers]
    fields = _fields([("output", result.output), ("format", result.format),
                      ("tensors", f"{result.tensors_written} tensors, "
                                  f"{size(result.bytes_written)}"),
                      ("sidecar", result.sidecar), ("verified against", result.hf_reference),
                      ("upcast to float32", len(result.upcast) or None)])
    return _box("SplitResult", result.output.name, fields,
                _table(["#", "layer", "layout", "heads", "kv heads", "head dim", "tensors",
                        "max error"], rows), _items("warnings", result.warnings))


def _weight_parts(hw: HeadWeights) -> list[tuple[str, Any]]:
    parts = [("q", hw.q), ("k", hw.k), ("v", hw.v), ("q_bias", hw.q_bias),
             ("k_bias", hw.k_bias), ("v_bias", hw.v_bias), ("o", hw.o), ("o_bias", hw.o_bias)]
    return [(name, array) for name, array in parts if array is not None]


def head_weights_html(hw: HeadWeights) -> str:
    fields = _fields([("layout", hw.layer.layout), ("heads", hw.num_heads),
                      ("kv heads", hw.num_kv_heads), ("head dim", hw.head_dim),
                      ("parameters", hw.num_parameters)])
    rows = [[name, _shape(array), str(array.dtype).removeprefix("torch.")]
            for name, array in _weight_parts(hw)]
    return _box("HeadWeights", hw.layer.display_name, fields,
                _table(["part", "shape", "dtype"], rows),
                "<p>q (H, d, E), k and v (Hkv, d, E), o (H, E_out, d): head h is [h].</p>")


def head_weights_repr(hw: HeadWeights) -> str:
    shapes = ", ".join(f"{name} {_shape(array)}" for name, array in _weight_parts(hw)[:3])
    return (f"HeadWeights({terminal(hw.layer.display_name, 80)!r}, H={hw.num_heads}, "
            f"Hkv={hw.num_kv_heads}, d={hw.head_dim}: {shapes}, …)")
