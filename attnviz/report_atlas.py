"""The head atlas in the HTML report: what ``attnviz heads`` finds, from the report's own
capture (``attnviz.head_atlas``), as a layer x head table of top roles and scores, a list of
the heads holding each role, and the data the page's script uses to put each head's role on
its thumbnail and its scores in the opened-head panel (report_assets/report_atlas.js).

Every head's colour is its top role's, pale at the role's threshold and full at a score of 1
(``attnviz.head_roles.role_rgb``: the atlas figure's colours)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnviz.head_roles import (
    ROLE_COLOURS,
    ROLES,
    ROLES_BY_NAME,
    hex_colour,
    role_rgb,
    text_colour,
)

if TYPE_CHECKING:
    import torch

    from attnviz.head_atlas import HeadAtlas
    from attnviz.head_stats import HeadStatistics, LayerStats
    from attnviz.inspection import InspectReport
    from attnviz.models.sources import LoadedModel
    from attnviz.sequence_inputs import PreparedCall, SequenceRequest

WINDOW = 2  # the local window of the report's statistics: `attnviz heads`'s default


def statistics_reducer() -> HeadStatistics:
    """The reducer a report's capture feeds, as ``attnviz heads`` builds it."""
    from attnviz.head_atlas import MAX_PREFIX
    from attnviz.head_stats import HeadStatistics

    return HeadStatistics(window=WINDOW, leading=MAX_PREFIX)


def streamed_atlas(layers: Mapping[str, LayerStats], report: InspectReport,
                   prepared: PreparedCall, loaded: LoadedModel, *, checkpoint: Path,
                   request: SequenceRequest, probes: Sequence[str] = ()
                   ) -> tuple[dict[str, Any] | None, list[str]]:
    """The atlas JSON document of statistics streamed from a sequence capture, with the token
    probes' scores (a second, probe-only pass, as ``attnviz heads --probe`` runs it), and the
    notes for the page; None when no map was captured."""
    from attnviz.head_atlas import (
        HeadAtlas,
        atlas_data,
        build_layers,
        describe_input,
        is_cross,
        probe_statistics,
    )
    from attnviz.head_probes import DEFAULT_BLOCK, make_probe

    if not layers:
        return None, []
    stats = {k: v.as_cross() if is_cross(k, prepared) else v for k, v in layers.items()}
    probe = make_probe(loaded, tuple(probes), seed=request.seed) if probes else None
    probed, notes = None, []
    if probe is not None:
        probed, _ = probe_statistics(loaded, report, probe, WINDOW)
        if probe.block < DEFAULT_BLOCK:
            notes.append(f"probe block shortened from {DEFAULT_BLOCK} to {probe.block} tokens "
                         "to fit the model's positions and vocabulary")
    reference = [item.layer.name for item in report.layers]
    atlas = HeadAtlas(loaded.description, str(checkpoint), describe_input(request, prepared),
                      WINDOW, 0, build_layers(stats, reference, probed), probe)
    return atlas_data(atlas), notes


def whole_maps_atlas(maps: Mapping[str, torch.Tensor], reference: Sequence[str] = (), *,
                     prefix_tokens: int = 0, prepared: PreparedCall | None = None,
                     model: str = "", checkpoint: str = "", source: str = ""
                     ) -> dict[str, Any] | None:
    """The atlas JSON document of maps captured whole (image reports, models in memory);
    None when there are none."""
    from attnviz.head_atlas import atlas_data, atlas_from_maps, is_cross

    if not maps:
        return None

    atlas: HeadAtlas = atlas_from_maps(
        maps, reference=reference, window=WINDOW, prefix_tokens=prefix_tokens,
        cross=lambda name: is_cross(name, prepared), model=model, checkpoint=checkpoint,
        source=source)
    return atlas_data(atlas)


def _cell(head: Mapping[str, Any]) -> tuple[str, str] | None:
    """(background, text colour) of a head with a top role; None for none."""
    top = head["top_role"]
    rgb = role_rgb(top, head["top_score"] if head["top_score"] is not None else float("nan"))
    return None if rgb is None else (hex_colour(rgb), text_colour(rgb))


def atlas_payload(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What the page's script gets: the JSON document as ``attnviz heads --json`` writes it,
    each head's cell colours, and each role's short code and colour."""
    return {"doc": doc, "cells": [[_cell(h) for h in layer["heads"]] for layer in doc["layers"]],
            "roles": {r.name: {"short": r.short, "colour": ROLE_COLOURS[r.name],
                               "text": _chip_text(r.name), "threshold": r.threshold}
                      for r in ROLES}}


def _chip_text(role: str) -> str:
    return text_colour(role_rgb(role, 1.0) or (1.0, 1.0, 1.0))


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _head_title(layer: Mapping[str, Any], head: Mapping[str, Any]) -> str:
    held = ", ".join(f"{r} {_score(head['scores'][r])}" for r in head["roles"]) or "no role"
    return f"{layer['name']} · head {head['head']}: {held}"


def _legend() -> str:
    chips = "".join(
        f'<span class="role-chip" style="background:{ROLE_COLOURS[r.name]};color:'
        f'{_chip_text(r.name)}">{html.escape(r.short)}</span>'
        f"{html.escape(r.name)} (≥ {r.threshold:g} {html.escape(r.statistic)}) " for r in ROLES)
    return f'<p class="role-legend">{chips}<span class="role-chip">–</span>no role</p>'


def atlas_section(doc: Mapping[str, Any], map_index: Mapping[str, int]) -> str:
    """The report's "Head roles" section; ``map_index``: the page's map row of each layer
    name (a cell links to its head there: ``#L<row>H<head>``)."""
    esc = html.escape
    width = max((len(layer["heads"]) for layer in doc["layers"]), default=0)
    head_row = "".join(f"<th>h{h}</th>" for h in range(width))
    rows = []
    holders: dict[str, list[tuple[float, str, str]]] = {r.name: [] for r in ROLES}
    for layer in doc["layers"]:
        cells = [f"<td>{layer['index']}</td>", f'<th scope="row">{esc(layer["name"])}</th>']
        row = map_index.get(layer["name"])
        for head in layer["heads"]:
            address = None if row is None else f"#L{row}H{head['head']}"
            for role in head["roles"]:
                score = head["scores"][role]
                holders[role].append((-(score or 0.0), f"L{layer['index']} H{head['head']}",
                                      address or ""))
            colours = _cell(head)
            text = "–" if head["top_role"] is None else \
                f"{ROLES_BY_NAME[head['top_role']].short} {_score(head['top_score'])}"
            inner = esc(text) if address is None else f'<a href="{address}">{esc(text)}</a>'
            style = "" if colours is None else \
                f' style="background:{colours[0]};color:{colours[1]}"'
            cells.append(f'<td class="role-cell" data-role="{esc(head["top_role"] or "")}"'
                         f'{style} title="{esc(_head_title(layer, head))}">{inner}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    found = []
    for role in ROLES:
        heads = sorted(holders[role.name])
        if not heads:
            continue
        names = ", ".join(
            (f'<a href="{a}">{esc(n)}</a>' if a else esc(n)) + f" ({-s:.2f})"
            for s, n, a in heads)
        found.append(f"<tr><th scope=\"row\">{esc(role.name)}</th><td>{len(heads)}</td>"
                     f"<td>{names}</td></tr>")
    probe = doc.get("probe")
    probed = ("Probe roles (induction, duplicate-token) were scored on a repeated block of "
              f"{probe['block']} random tokens." if probe else
              "Probe roles (induction, duplicate-token) need a probe: pass --probe "
              "induction,duplicate.")
    listing = ("<table class=\"role-holders\"><thead><tr><th>role</th><th>heads</th>"
               f"<th>layer (#) and head (score)</th></tr></thead><tbody>{''.join(found)}</tbody>"
               "</table>") if found else "<p>No head holds any role on this input.</p>"
    return f"""<section id="roles"><h2>Head roles</h2>
<p class="help">What each head does on this input, in numbers (as <code>attnviz heads</code>
computes them; docs/heads.md defines every score): a head holds each role whose score reaches
the role's threshold, several or none. A cell shows the head's top role and its score, pale at
the threshold and full colour at 1; hover it for every role held, click it to open the head.
{esc(probed)} Scores are means over every query row of the input ({esc(doc["input"])}).</p>
{_legend()}
<div class="atlas-wrap"><table class="atlas"><thead><tr><th>#</th><th>layer \\ head</th>
{head_row}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>
<h3>Heads holding each role</h3>{listing}</section>"""
