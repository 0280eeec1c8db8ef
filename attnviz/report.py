"""``attnviz report``: one forward pass (a sequence or an image) under capture, plus the
checkpoint's summary and per-head weight norms, written as one self-contained HTML file."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnviz.atomic import atomic_output, check_output_path
from attnviz.capture import AttentionMaps
from attnviz.checkpoint import Checkpoint, load_checkpoint
from attnviz.errors import UsageError, param
from attnviz.heads_override import override_warnings
from attnviz.heatmap import check_selectors, request_files
from attnviz.image_heatmap import ImageOptions
from attnviz.inspection import InspectReport, analyse
from attnviz.report_data import (
    DEFAULT_MAX_TOKENS,
    OverlayCell,
    PairLabels,
    ReportData,
    encode_map,
    head_norms,
    layer_rows,
    map_layers,
    summary_rows,
    vision_labels,
    vision_section,
)
from attnviz.sequence_inputs import SequenceRequest

REPORT_SUFFIXES = (".html", ".htm")


@dataclass(frozen=True)
class ReportOptions:
    max_tokens: int = DEFAULT_MAX_TOKENS
    title: str | None = None
    norms: bool = True
    alpha: float = 0.55
    pool: str = "mean"  # how k x k blocks of maps longer than max_tokens become one cell
    query: str | None = None  # sequences: query rows kept at full resolution (query_rows)
    probes: tuple[str, ...] = ()  # sequences: token probes of the head atlas (head_probes)


@dataclass
class ReportResult:
    output: Path | None  # None: nothing written, the page is in ``page``
    layers: int  # captured attention modules drawn
    heads: int  # head maps drawn
    overlays: int
    bytes_written: int
    model: str | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # heads overrides of stored counts
    page: str | None = field(default=None, repr=False)

    def _repr_html_(self) -> str:
        from attnviz.notebook_tables import report_result_html

        return report_result_html(self)

    def show(self, **kwargs: Any) -> None:
        """Draw the page inline in a notebook (``attnviz.notebook.show``)."""
        from attnviz.notebook import show

        show(self, **kwargs)


def _vision(path: Path, ckpt: Checkpoint, report: InspectReport, options: ImageOptions,
            data: ReportData) -> tuple[AttentionMaps, PairLabels]:
    from dataclasses import replace

    from attnviz.image_heatmap import image_figure, is_detr, refuse_in_report, rollout_heat

    refuse_in_report(path, ckpt)  # Swin's windows: heatmap draws them, the report does not
    if options.layer is None and not is_detr(path, ckpt):
        options = replace(options, layer="all")  # a ViT's CLS overlays for every block
    figure, maps, description = image_figure(path, ckpt, report, options)
    data.model = description
    data.notes += figure.notes
    data.vision = vision_section(figure)
    from attnviz.captions import image_parts

    data.inputs = image_parts(options, (data.vision.height, data.vision.width),
                              figure.prepared)
    meta = figure.metadata or {}
    from attnviz.head_atlas import describe_input
    from attnviz.report_atlas import whole_maps_atlas
    from attnviz.sequence_inputs import PreparedCall

    data.atlas = whole_maps_atlas(
        maps.maps, [item.layer.name for item in report.layers],
        prefix_tokens=int(meta.get("prefix_tokens", "0")),
        prepared=figure.prepared if isinstance(figure.prepared, PreparedCall) else None,
        model=description, checkpoint=str(path),
        source=describe_input(SequenceRequest(image=options.image), None))
    if "grid" in meta:  # a ViT: add the rollout over every block
        grid, prefix = tuple(json.loads(meta["grid"])), int(meta["prefix_tokens"])
        names = [n for n in maps if maps[n].shape[-1] == maps[n].shape[-2]
                 and maps[n].shape[-1] == prefix + grid[0] * grid[1]]  # not a text tower
        heat = rollout_heat(maps, names, (grid[0], grid[1]), prefix, options)
        data.vision.rows.append([OverlayCell("rollout · image", None),
                                 OverlayCell(f"rollout · {len(names)} blocks, "
                                             f"{options.head_fusion} fusion", encode_map(heat))])
    return maps, vision_labels(figure.metadata, figure.prepared)


def build_report(checkpoint: str | Path | None = None, output: str | Path | None = None, *,
                 model: Any = None, inputs: Any = None, tokens: Sequence[Any] | None = None,
                 target_tokens: Sequence[Any] | None = None, tokenizer: Any = None,
                 request: SequenceRequest | None = None, image: ImageOptions | None = None,
                 options: ReportOptions = ReportOptions(), factory: str | None = None,
                 strict: bool = True, heads: Iterable[str] = (),
                 config: str | Path | None = None, key: str | None = None, force: bool = False,
                 norm_first: bool = False, activation: str = "relu",
                 attn_implementation: str = "auto", layout: str | None = None
                 ) -> ReportResult:
    """Capture, lay out and write the report; raises ``AttnvizError`` on bad input.

    From a checkpoint file, or from ``model`` (a loaded ``nn.Module``) run on ``inputs`` (a
    tensor, a tuple of arguments or a dict of keyword arguments), its rows and columns named by
    ``tokens`` / ``target_tokens`` or ``tokenizer``. Without ``output`` nothing is written and
    the page is in ``result.page``."""
    output = None if output is None else Path(output)
    if output is not None and output.suffix.lower() not in REPORT_SUFFIXES:
        raise UsageError(f"-o {output.name}: the report is HTML; use a .html file name")
    if request is not None and image is not None:
        raise UsageError(f"give a sequence input or {param('image')}, not both")
    if not 0.0 <= options.alpha <= 1.0:
        raise UsageError(f"{param('alpha')} {options.alpha:g}: use a value in [0, 1]",
                         param="alpha")
    from attnviz.report_long import check_pool

    check_pool(options.pool)
    if options.query is not None:
        from attnviz.query_rows import parse_query_rows

        parse_query_rows(options.query)
        if image is not None or (model is None and request is None):
            raise UsageError(f"{param('query')} rows apply to a sequence input", param="query")
    from attnviz.head_probes import parse_probes

    probes = parse_probes(options.probes)
    if probes and (image is not None or model is not None or request is None):
        raise UsageError(f"{param('probes')} applies to a checkpoint run on a sequence input",
                         param="probes",
                         hint="for a probe-only atlas run the heads command with "
                              f"{param('probes')}")
    if model is not None or checkpoint is None:
        from attnviz.model_report import model_report_data, refuse_file_options

        refuse_file_options(checkpoint, {"request": request, "image": image, "factory": factory,
                                         "heads": tuple(heads), "config": config, "key": key,
                                         "layout": layout})
        if output is not None:
            check_output_path(output, [], force=force)
        data, _ = model_report_data(model, inputs, tokens=tokens, target_tokens=target_tokens,
                                    tokenizer=tokenizer, title=options.title,
                                    max_tokens=options.max_tokens, norms=options.norms,
                                    pool=options.pool, query=options.query)
        return finish_report(data, output, alpha=options.alpha)
    path = Path(checkpoint)
    if image is not None:
        check_selectors(image.layer, image.head)
    ckpt = load_checkpoint(path, key=key, config=config)
    reads = request_files(request) + ([image.image] if image is not None else [])
    if output is not None:
        check_output_path(output, [path, *ckpt.inputs, *reads], force=force)
    report = analyse(ckpt, heads, layout=layout)
    from attnviz.captions import checkpoint_name

    data = ReportData(title=options.title or f"attnviz report: {checkpoint_name(path)}",
                      summary=summary_rows(ckpt, report),
                      layers=layer_rows(report), warnings=list(report.warnings),
                      max_tokens=options.max_tokens)
    if image is not None:
        from dataclasses import replace

        if attn_implementation != "auto":
            image = replace(image, attn_implementation=attn_implementation)
        maps, labels = _vision(path, ckpt, report, image, data)
        data.maps = map_layers(maps, labels, max_tokens=options.max_tokens, pool=options.pool)
        if maps.missed:
            data.notes.append(f"no map from {len(maps.missed)} attention module(s): "
                              f"{', '.join(maps.missed[:4])}")
    elif request is not None:  # streamed: pooled as captured, never every layer's full maps
        from attnviz.report_long import streamed_sequence

        streamed_sequence(path, ckpt, report, request, data, pool=options.pool,
                          query=options.query, factory=factory, strict=strict,
                          norm_first=norm_first, activation=activation,
                          attn_implementation=attn_implementation,
                          probes=probes)
    else:
        data.notes.append("no input given: pass --text, --tokens, --input, --seq-len or --image "
                          "for attention maps")
    if options.norms:
        data.norms, skipped = head_norms(ckpt, report)
        data.notes += skipped
    return finish_report(data, output, alpha=options.alpha,
                         warnings=override_warnings(report.layers))


def finish_report(data: ReportData, output: Path | None, *, alpha: float,
                  warnings: list[str] | None = None) -> ReportResult:
    """Lay out ``data``; write it to ``output``, or keep the page in the result (None)."""
    from attnviz.report_html import render_html

    page = render_html(data, alpha=alpha)
    overlays = sum(len(r) for r in data.vision.rows) if data.vision else 0
    result = ReportResult(output, len(data.maps), data.head_count, overlays,
                          len(page.encode("utf-8")), data.model, data.notes, warnings or [])
    if output is None:
        result.page = page
    else:
        with atomic_output(output) as temp:
            temp.write_text(page, encoding="utf-8")
        result.bytes_written = output.stat().st_size
    return result
