"""``attnviz heatmap --query``: chosen query rows of every chosen layer and head, drawn as
strips over every key (``attnviz.render_strips``)."""

from __future__ import annotations

from pathlib import Path

from attnviz.atomic import atomic_output
from attnviz.capture import AttentionMaps
from attnviz.errors import UsageError
from attnviz.heads_override import override_warnings
from attnviz.heatmap import HeatmapOptions, HeatmapResult
from attnviz.inspection import InspectReport
from attnviz.models.sources import LoadedModel
from attnviz.reducers import QueryRows
from attnviz.selectors import order_like, select, select_heads
from attnviz.sequence_inputs import PreparedCall


def query_strips(maps: AttentionMaps, rows: QueryRows, prepared: PreparedCall,
                 loaded: LoadedModel, report: InspectReport, output: Path,
                 options: HeatmapOptions, maps_path: Path | None) -> HeatmapResult:
    """Chosen query rows of every chosen layer and head, as strips over every key."""
    from attnviz.render import FORMATS
    from attnviz.render_strips import Strip, render_strips

    names, aliases = order_like(list(maps), [item.layer.name for item in report.layers])
    shown = [name or "(root)" for name in names]
    layer_ids = select(options.layer, shown,
                       aliases=[None if a is None else a or "(root)" for a in aliases])
    chosen = names if layer_ids is None else [names[i] for i in layer_ids]
    strips: list[Strip] = []
    key_labels: list[str] = []
    for name in chosen:
        tensor = maps[name][options.batch_index]  # (H, n, S)
        length, source = maps.shapes[name][2:]
        labels = prepared.labels_for(name, length, source)
        key_labels = key_labels or labels[1]
        head_ids = select_heads(options.head, tensor.shape[0]) or range(tensor.shape[0])
        for head in head_ids:
            for position, row in enumerate(rows.chosen[name]):
                suffix = f" q{row}" if len(rows.chosen[name]) > 1 else ""
                strips.append(Strip(name or "(root)", f"h{head}{suffix}", labels[0][row],
                                    tensor[head, position]))
    if len({s.values.numel() for s in strips}) > 1:
        raise UsageError("the chosen layers have different key lengths: select layers of one "
                         "kind", param="layer", hint="e.g. the decoder's self-attention")
    first_labels = prepared.labels_for(chosen[0], *maps.shapes[chosen[0]][2:])[0]
    rows_named = ", ".join(f"{r} '{first_labels[r]}'" for r in rows.chosen[chosen[0]][:4])
    title = options.title or f"{loaded.description}: what query row {rows_named} attends to"
    with atomic_output(output) as temp:
        notes = render_strips(strips, key_labels, temp, FORMATS[output.suffix.lower()],
                              title=title, pool=options.pool, cmap=options.cmap,
                              shared_scale=options.scale == "shared")
    layers = sorted({s.layer for s in strips}, key=[n or "(root)" for n in chosen].index)
    return HeatmapResult(output, "strips", layers, sorted({s.head for s in strips}),
                         loaded.description, maps_file=maps_path,
                         notes=[*loaded.notes, *prepared.notes, *notes],
                         warnings=override_warnings(report.layers))
