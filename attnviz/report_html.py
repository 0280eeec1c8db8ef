"""Lay out a ``ReportData`` as one self-contained HTML page: styles, script and every image are
inline (data: URLs and one JSON block), so the file works offline, from file://, and can be sent
on. Text from the checkpoint or the input is escaped here and set with textContent in the
script; nothing in the page loads from anywhere else."""

from __future__ import annotations

import base64
import html
from importlib import resources
from typing import Any

from attnviz import __version__
from attnviz.captions import InputPart
from attnviz.report_data import HeadMap, NormRow, ReportData
from attnviz.text_safety import script_json

MAP_COLOURS = "viridis"
OVERLAY_COLOURS = "inferno"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _asset(name: str) -> str:
    return (resources.files("attnviz") / "report_assets" / name).read_text(encoding="utf-8")


def _head(head: HeadMap | None) -> dict[str, Any] | None:
    return None if head is None else {"png": _b64(head.png), "max": head.maximum}


def page_data(data: ReportData, *, alpha: float) -> dict[str, Any]:
    """The JSON the page's script draws from (label lists shared between layers)."""
    from attnviz.render import colormap_lut

    label_sets: list[list[str]] = []

    def label_index(labels: list[str]) -> int:
        if labels not in label_sets:
            label_sets.append(labels)
        return label_sets.index(labels)

    maps = [{"name": layer.name, "q": layer.query_len, "k": layer.key_len, "block": layer.block,
             "qlabels": label_index(layer.query_labels), "klabels": label_index(layer.key_labels),
             "heads": [_head(h) for h in layer.heads]} for layer in data.maps]
    vision = None
    if data.vision is not None:
        section = data.vision
        vision = {"title": section.title, "image": _b64(section.image_png),
                  "w": section.width, "h": section.height, "points": section.points,
                  "rows": [[{"title": cell.title, "heat": _head(cell.heat), "box": cell.box,
                             "label": cell.box_label} for cell in row] for row in section.rows]}
    rows = [{"layer": r.layer, "queries": r.queries, "qnames": r.query_labels, "keys": r.keys,
             "wrap": r.wrap, "heads": [{"png": _b64(h.png), "max": h.maxima, "top": h.top}
                                       for h in r.heads]} for r in data.rows]
    from attnviz.report_atlas import atlas_payload

    return {"version": __version__, "maps": maps, "labels": label_sets, "vision": vision,
            "rows": rows, "atlas": None if data.atlas is None else atlas_payload(data.atlas),
            "alpha": alpha, "lut": {"map": colormap_lut(MAP_COLOURS),
                                    "overlay": colormap_lut(OVERLAY_COLOURS)}}


def _table(header: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    head = "" if header is None else "<thead><tr>" + "".join(
        f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _norm_tables(rows: list[NormRow]) -> str:
    """One table per projection; cells shaded from the table's smallest norm to its largest."""
    parts = []
    for role, title in (("q", "W<sub>q</sub>"), ("k", "W<sub>k</sub>"), ("v", "W<sub>v</sub>"),
                        ("o", "W<sub>o</sub> columns")):
        values = [getattr(r, role) for r in rows]
        if all(v is None for v in values):
            continue
        every = [x for v in values if v for x in v]
        low, span = min(every, default=0.0), (max(every, default=0.0) - min(every, default=0.0))
        width = max(len(v) for v in values if v is not None)
        body = []
        for row, norms in zip(rows, values, strict=True):
            cells = [f'<th scope="row">{html.escape(row.layer)}</th>']
            for x in norms or []:
                shade = 0.08 + 0.72 * ((x - low) / span if span > 0 else 0.5)
                cells.append(f'<td style="background:rgba(49,104,142,{shade:.2f})">{x:.3g}</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
        head = "".join(f"<th>{h}</th>" for h in range(width))
        parts.append(f'<h3>{title}</h3><table class="norms"><thead><tr><th>layer \\ head</th>'
                     f'{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')
    return "".join(parts)


def _inputs(parts: list[InputPart]) -> str:
    """The input at the top of the page: each part's text and the tokens the model saw."""
    if not parts:
        return ""
    rows = []
    for part in parts:
        tokens = ""
        if part.tokens:
            chips = "".join(f'<span class="chip">{html.escape(t)}</span>' for t in part.tokens)
            count = f"{len(part.tokens)} token{'' if len(part.tokens) == 1 else 's'}"
            opened = " open" if len(part.tokens) <= 64 else ""
            tokens = (f'<details class="tokens-seen"{opened}><summary>{count} as the model '
                      f"saw them</summary>{chips}</details>")
        text = f'<div class="input-text">{html.escape(part.text)}</div>' if part.text else ""
        rows.append(f"<dt>{html.escape(part.label)}</dt><dd>{text}{tokens}</dd>")
    return f'<section id="input"><dl class="inputs">{"".join(rows)}</dl></section>'


def render_html(data: ReportData, *, alpha: float = 0.55) -> str:
    esc = html.escape
    summary = _table(None, [[esc(k), esc(v)] for k, v in data.summary], "summary")
    layers = _table(list(data.layers[0]), [[esc(v) for v in row.values()] for row in data.layers],
                    "layers") if data.layers else "<p>No attention layers recognised.</p>"
    notes = "".join(f"<li>{esc(n)}</li>" for n in [*data.warnings, *data.notes])
    sections = [("summary", "Summary")]
    if data.maps:
        sections.append(("attention", f"Attention ({data.head_count} heads)"))
    if data.atlas is not None:
        sections.append(("roles", "Head roles"))
    if data.vision is not None:
        sections.append(("overlays", "Image overlays"))
    if data.norms:
        sections.append(("norms", "Weight norms"))
    nav = " · ".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title in sections)
    blocks = max((layer.block for layer in data.maps), default=1)
    storage = ("Maps are stored as 8-bit PNGs scaled to each head's maximum (values to within "
               "max/510); grey cells are masked.")
    if blocks > 1:
        how = "averaged" if data.pool == "mean" else "max-pooled"
        storage += (f" Maps longer than {data.max_tokens} tokens are {how} in k x k token "
                    f"blocks (k up to {blocks}; each cell the block's "
                    f"{'mean' if data.pool == 'mean' else 'largest value'}); hovering a token "
                    "uses its block.")
    if data.rows:
        storage += (" Chosen query rows are stored at full resolution over every key: open a "
                    "head to see them as strips.")
    parts = [f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; \
style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{esc(data.title)}</title><style>{_asset("report.css")}</style></head>
<body data-errors="0" data-ready="0">
<header><h1>{esc(data.title)}</h1>
<p class="sub">{esc(data.model or "checkpoint only (no forward pass)")}</p>
<nav>{nav}</nav></header>
{_inputs(data.inputs)}
<pre id="errors" hidden></pre>
<section id="summary"><h2>Summary</h2>{summary}
{f"<ul class='notes'>{notes}</ul>" if notes else ""}
<h3>Attention layers</h3>{layers}</section>"""]
    if data.maps:
        parts.append(f"""<section id="attention"><h2>Attention per layer and head</h2>
<p class="help">Rows are the captured attention modules (first batch item), columns heads. Click
a head to enlarge it and explore its tokens. {esc(storage)}</p>
<div class="scale-row"><label>Colour scale <select id="map-scale">
<option value="head" selected>each head from 0 to its own maximum</option>
<option value="shared">one scale for every head</option></select></label>
<div class="colorbar" id="grid-bar"></div></div><div id="grid"></div></section>""")
    if data.atlas is not None:
        from attnviz.report_atlas import atlas_section

        parts.append(atlas_section(data.atlas, {layer.name: i for i, layer in
                                                enumerate(data.maps)}))
    if data.vision is not None:
        parts.append(f"""<section id="overlays"><h2>Image overlays</h2>
<p class="help">{esc(data.vision.title)}. Opacity
<input id="alpha" type="range" min="0" max="1" step="0.05" value="{alpha}"> · click a panel to
enlarge it.</p>
<div class="scale-row"><label>Colour scale <select id="overlay-scale">
<option value="shared" selected>one scale for every panel</option>
<option value="panel">each panel from 0 to its own maximum</option></select></label>
<div class="colorbar" id="overlay-bar"></div></div><div id="overlay-grid"></div></section>""")
    if data.norms:
        parts.append('<section id="norms"><h2>Per-head weight norms</h2><p class="help">'
                     "Frobenius norm of each head's slice (rows of W<sub>q</sub>, W<sub>k</sub>, "
                     "W<sub>v</sub>; columns of W<sub>o</sub>), in Linear (out, in) orientation. "
                     "Key/value tables have one column per key/value head; shading runs from each "
                     "table's smallest norm to its largest.</p>"
                     f"{_norm_tables(data.norms)}</section>")
    # no '<' at all in the block: neither '</script>' nor '<!--<script>' (which would switch
    # the HTML tokenizer to its "double-escaped" state and swallow the page's code) can occur
    payload = script_json(page_data(data, alpha=alpha))
    parts.append(f"""<div id="detail" hidden><div class="panel">
<div class="bar"><button id="prev" title="previous head (←)">←</button><span id="detail-title">
</span><button id="next" title="next head (→)">→</button><button id="close" title="close (Esc)">
×</button></div><div class="body"><div class="left"><canvas id="big"></canvas>
<div class="colorbar" id="detail-bar"></div>
<p id="readout">hover the map or a token</p><div id="head-roles" hidden></div>
<div id="rows" hidden></div></div>
<div class="tokens"><div><h4>queries</h4>
<div id="qtokens"></div></div><div><h4>keys</h4><div id="ktokens"></div></div></div></div>
</div></div>
<footer>attnviz {esc(__version__)} · self-contained: no network access ·
{esc(storage)}</footer>
<script id="attnviz-data" type="application/json">{payload}</script>
<script>{_asset("report_rows.js")}
{_asset("report_atlas.js")}
{_asset("report.js")}</script></body></html>
""")
    return "\n".join(parts)
