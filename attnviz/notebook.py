"""``show``: the report's interactive head view inline in a notebook (the result objects'
tables are in ``notebook_tables``).

``show`` embeds the very page ``attnviz report`` writes (styles, script and maps inline, nothing
fetched) in an ``<iframe srcdoc>`` sandboxed to scripts only. Notebook front ends put HTML
outputs into their own page, where sanitisers strip or skip scripts and styles leak both ways;
a frame keeps the page's script, styles and content-security policy to itself and gives it no
access to the notebook. A PNG of the layer x head grid travels in the same display bundle for
viewers that render no HTML (``static=True``: the PNG alone).

No torch at import: torch loads only for a view of a model or of maps, matplotlib only for
the PNG.
"""

from __future__ import annotations

import base64
import html
import importlib
import io
import json
import re
import sys
import tempfile
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnviz.errors import UsageError
from attnviz.text_safety import html_text, terminal

FRAME_HEIGHT = 720  # px: the frame grows to its page's height up to this, then scrolls
PNG_CELLS = 64  # each head of the static PNG is pooled to at most this many cells a side
PNG_LAYERS = 48
PAGE_SUFFIXES = (".html", ".htm")
SECTIONS = ("attention", "overlays", "summary", "norms", None)
_DATA_BLOCK = re.compile(r'<script id="attnviz-data" type="application/json">(.*?)</script>',
                         re.S)

# Runs last in the frame: tells the notebook page its height and the page's body[data-*] state
# (ready, heads drawn, script errors), which the frame's element then carries.
_FRAME_STATUS = """<script>(function () {
  var body = document.body, last = "", start = "__START__";
  function post() {
    var d = body.dataset;
    if (start && d.ready === "1") {  // once drawn: scroll the section asked for under the header
      var target = document.getElementById(start), header = document.querySelector("header");
      start = "";
      if (target) window.scrollTo(0, target.getBoundingClientRect().top + window.scrollY -
        (header ? header.offsetHeight : 0));
    }
    var state = { attnviz: 1, ready: d.ready || "0", heads: d.heads || "0",
      overlays: d.overlays || "0", errors: d.errors || "0",
      height: Math.ceil(body.getBoundingClientRect().height) + 2 };
    var key = JSON.stringify(state);
    if (key !== last) { last = key; parent.postMessage(state, "*"); }
  }
  new MutationObserver(post).observe(body, { attributes: true });
  if (window.ResizeObserver) new ResizeObserver(post).observe(body);
  window.addEventListener("message", function (event) {
    if (event.source === parent && event.data === "attnviz-status") { last = ""; post(); }
  });
  post();
})();</script>"""
# Runs in the notebook (where it may: trusted outputs); without it the frame keeps its height.
_PARENT = """<script>(function () {
  var frame = document.getElementById("__ID__");
  if (!frame) return;
  window.addEventListener("message", function (event) {
    var d = event.data;
    if (event.source !== frame.contentWindow || !d || d.attnviz !== 1) return;
    ["ready", "heads", "overlays", "errors"].forEach(function (key) {
      frame.setAttribute("data-" + key, String(d[key]).slice(0, 12));
    });
    var height = Number(d.height);
    if (height > 0) frame.style.height = Math.max(160, Math.min(height, __MAX__)) + "px";
  });
  if (frame.contentWindow) frame.contentWindow.postMessage("attnviz-status", "*");
})();</script>"""


def _check_section(section: str | None) -> None:
    if section not in SECTIONS:
        raise UsageError(f"section {terminal(str(section), 40)!r} is not one of the page's: "
                         f"{', '.join(s for s in SECTIONS if s)} (or None)", param="section")


def frame_html(page: str, *, title: str = "attnviz head view", height: int = FRAME_HEIGHT,
               section: str | None = "attention") -> str:
    """``page`` in a sandboxed ``<iframe srcdoc>``, with the script that sizes it, scrolled to
    ``section`` (an id of the report page: summary, attention, overlays, norms) once drawn."""
    _check_section(section)
    cut = page.rfind("</body>")
    status = _FRAME_STATUS.replace("__START__", section or "")
    page = page[:cut] + status + page[cut:] if cut >= 0 else page + status
    uid = f"attnviz-{uuid.uuid4().hex[:16]}"
    parent = _PARENT.replace("__ID__", uid).replace("__MAX__", str(int(height)))
    label = html_text(terminal(title, 200))
    return (f'<div class="attnviz-view"><iframe id="{uid}" title="{label}" '
            f'sandbox="allow-scripts" style="width:100%;height:{int(height)}px;border:1px solid '
            f'#d0d7de;border-radius:4px" srcdoc="{html.escape(page, quote=True)}"></iframe>'
            f"{parent}</div>")


def page_data(page: str) -> dict[str, Any] | None:
    """The JSON block a report page draws from (maps as 8-bit PNGs), or None."""
    match = _DATA_BLOCK.search(page)
    if match is None:
        return None
    try:
        document = json.loads(match.group(1))
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _pooled(values: Any, cells: int) -> Any:
    """(rows, cols) -> at most ``cells`` a side: the mean of k x k blocks, NaN (masked) kept."""
    import numpy as np

    k = max(1, -(-max(values.shape) // cells))
    if k == 1:
        return values
    rows, cols = -(-values.shape[0] // k) * k, -(-values.shape[1] // k) * k
    padded = np.full((rows, cols), np.nan)
    padded[:values.shape[0], :values.shape[1]] = values
    blocks = padded.reshape(rows // k, k, cols // k, k)  # (rows/k, k, cols/k, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-masked block stays NaN
        return np.nanmean(blocks, axis=(1, 3))


def grid_png(page: str, *, title: str) -> bytes | None:
    """The page's layer x head grid as one PNG (each head on its own scale, as the page opens),
    or None when the page has no maps."""
    document = page_data(page)
    layers = (document or {}).get("maps") or []
    if not layers:
        return None
    import numpy as np
    from PIL import Image

    from attnviz.render import render_grid

    rows, names = [], []
    for layer in layers[:PNG_LAYERS]:
        row = []
        for head in layer["heads"]:
            if head is None:
                continue
            image = Image.open(io.BytesIO(base64.b64decode(head["png"]))).convert("LA")
            grey_alpha = np.asarray(image, dtype=np.float64)  # (rows, cols, 2)
            values = grey_alpha[..., 0] / 255.0 * float(head["max"])
            row.append(_pooled(np.where(grey_alpha[..., 1] == 0, np.nan, values), PNG_CELLS))
        rows.append(row)
        names.append(str(layer["name"]))
    width = max(len(row) for row in rows)
    height = max(p.shape[0] for row in rows for p in row)
    across = max(p.shape[1] for row in rows for p in row)
    panels = [[np.pad(p, ((0, height - p.shape[0]), (0, across - p.shape[1])),
                      constant_values=np.nan) for p in row]
              + [np.full((height, across), np.nan)] * (width - len(row)) for row in rows]
    more = f" (first {PNG_LAYERS} of {len(layers)} layers)" if len(layers) > PNG_LAYERS else ""
    with tempfile.TemporaryDirectory(prefix="attnviz-") as folder:
        out = Path(folder) / "grid.png"
        render_grid(panels, names, [f"head {h}" for h in range(width)], out, "png",
                    title=f"{title}{more}", shared_scale=False)
        return out.read_bytes()


@dataclass
class HeadView:
    """A report page shown inline: an ``iframe srcdoc`` and a PNG of its grid as fallback."""

    page: str
    png: bytes | None = None
    title: str = "attnviz head view"
    heads: int = 0
    height: int = FRAME_HEIGHT
    static: bool = False
    section: str | None = "attention"

    def to_html(self) -> str:
        return frame_html(self.page, title=self.title, height=self.height, section=self.section)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        bundle = {"text/plain": repr(self)}
        if self.png is not None:
            bundle["image/png"] = base64.b64encode(self.png).decode("ascii")
        if not self.static:
            bundle["text/html"] = self.to_html()
        return bundle

    def __repr__(self) -> str:
        return f"<attnviz head view: {terminal(self.title, 80)}, {self.heads} heads>"


def _is(value: Any, module: str, name: str) -> bool:
    """``isinstance`` against a class of a module only if that module is loaded (an object of
    a class no one imported cannot exist): no torch import to tell a path from maps."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, name))


def _refuse(what: str, given: Mapping[str, Any]) -> None:
    used = [name for name, value in given.items() if value is not None]
    if used:
        raise UsageError(f"{', '.join(used)} do{'es' if len(used) == 1 else ''} not apply to "
                         f"{what}", param=used[0],
                         hint="they shape a page being built: from a checkpoint, model=... or "
                              "AttentionMaps")


def _read_page(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the report page: {type(exc).__name__}",
                         path=path, hint="pass a page written by attnviz report") from None


def _page_of(source: Any, given: Mapping[str, Any], report: dict[str, Any], *,
             title: str | None, max_tokens: int | None) -> str:
    """The page of a report result, a report page file, or a checkpoint (built now)."""
    if _is(source, "attnviz.report", "ReportResult"):
        _refuse("a report result", {**given, **report, "max_tokens": max_tokens})
        if source.page is not None:
            return str(source.page)
        return _read_page(source.output)
    if not isinstance(source, str | Path):
        raise UsageError(f"cannot show a {type(source).__name__}", param="source",
                         hint="pass AttentionMaps, a ReportResult, a report .html or checkpoint "
                              "path, or model=... with inputs=...")
    path = Path(source)
    if path.suffix.lower() in PAGE_SUFFIXES:
        _refuse("a report page", {**given, **report, "max_tokens": max_tokens})
        return _read_page(path)
    _refuse("a checkpoint path (give request=SequenceRequest(...))", given)
    from dataclasses import replace

    from attnviz.report import ReportOptions, build_report

    if title is not None or max_tokens is not None:
        options = report.get("options", ReportOptions())
        report["options"] = replace(options, title=title or options.title,
                                    max_tokens=max_tokens or options.max_tokens)

    result = build_report(path, None, **report)
    return result.page or ""


def head_view(source: Any = None, *, model: Any = None, inputs: Any = None,
              tokens: Sequence[Any] | None = None, target_tokens: Sequence[Any] | None = None,
              tokenizer: Any = None, title: str | None = None, height: int = FRAME_HEIGHT,
              section: str | None = "attention", static: bool = False, png: bool = True,
              max_tokens: int | None = None, **report: Any) -> HeadView:
    """The view ``show`` displays; see there."""
    _check_section(section)
    if height < 160:
        raise UsageError(f"height {height}: use 160 pixels or more", param="height")
    if static and not png:
        raise UsageError("static=True shows the PNG: leave png on", param="png")
    given = {"inputs": inputs, "tokens": tokens, "target_tokens": target_tokens,
             "tokenizer": tokenizer}
    if model is not None or _is(source, "attnviz.capture", "AttentionMaps"):
        if model is not None and source is not None:
            raise UsageError("give what to show or model=..., not both", param="model")
        if report:
            raise UsageError(f"{', '.join(report)}: options of a checkpoint report, not of "
                             "a model or maps", param=next(iter(report)))
        from attnviz.model_report import maps_report_data, model_report_data
        from attnviz.report_data import DEFAULT_MAX_TOKENS
        from attnviz.report_html import render_html

        limit = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if model is not None:
            data, _ = model_report_data(model, inputs, tokens=tokens, title=title,
                                        target_tokens=target_tokens, tokenizer=tokenizer,
                                        max_tokens=limit)
        else:
            _refuse("AttentionMaps (already captured)", {"inputs": inputs,
                                                         "tokenizer": tokenizer})
            data = maps_report_data(source, tokens=tokens, target_tokens=target_tokens,
                                    title=title, max_tokens=limit)
        page, name = render_html(data), data.title
    elif source is None:
        raise UsageError("nothing to show", param="source",
                         hint="pass AttentionMaps, a report .html or checkpoint path, or "
                              "model=... with inputs=...")
    else:
        page = _page_of(source, given, report, title=title, max_tokens=max_tokens)
        name = title or (Path(source).name if isinstance(source, str | Path) else "report")
    document = page_data(page)
    heads = sum(len(layer.get("heads") or []) for layer in (document or {}).get("maps") or [])
    picture = grid_png(page, title=name) if png else None
    if static and picture is None:
        raise UsageError("this report has no attention maps to draw as a PNG", param="static",
                         hint="give the report an input, or show it with static=False")
    return HeadView(page, picture, name, heads, height, static, section)


def show(source: Any = None, **kwargs: Any) -> None:
    """Show the report's interactive head view inline in a Jupyter notebook, offline.

    ``source``: ``AttentionMaps``, a ``ReportResult``, a report ``.html`` page, or a checkpoint
    path (then ``build_report`` options: ``request=SequenceRequest(...)``, ``heads=``, ...); or
    ``model=`` a loaded ``nn.Module`` with ``inputs=`` (a tensor, a tuple of arguments, a dict of
    keyword arguments). ``tokens`` / ``target_tokens`` name the key and query positions (or
    ``tokenizer=``, from ``input_ids``). ``height``: the frame's largest height in pixels;
    ``static=True``: the PNG of the grid alone; ``png=False``: no PNG fallback.
    """
    view = head_view(source, **kwargs)
    try:
        display = importlib.import_module("IPython.display").display
    except ImportError:
        raise UsageError("show() draws in a Jupyter notebook and needs IPython",
                         hint="install ipykernel, or write the page with "
                              "build_report(..., output='report.html')") from None
    display(view)
