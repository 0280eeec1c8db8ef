"""Figures worth putting in a paper: titles that say model, input, layers and scale; fonts a
publisher accepts (TrueType in PDF, text in SVG); colour bars on overlays; the report's input.

Titles and labels are read back from the SVG matplotlib writes (text kept as text); fonts from
the PDF's own font dictionaries; overlay colours against matplotlib's colour maps."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib import colormaps

from attnviz import render
from attnviz.checkpoint import load_checkpoint
from attnviz.heatmap import HeatmapOptions, sequence_heatmap
from attnviz.image_heatmap import ImageOptions, image_figure, image_heatmap, per_panel_overlays
from attnviz.inspection import analyse
from attnviz.report import build_report
from attnviz.sequence_inputs import SequenceRequest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
TRANSFORMER = SAMPLES / "transformer_d64_h4.pth"
PICTURE = SAMPLES / "shapes_demo.png"


def svg_texts(path: Path) -> list[str]:
    """The text of every <text> element (matplotlib writes one per line of a label)."""
    root = ET.parse(path).getroot()
    return ["".join(node.itertext()) for node in root.iter("{http://www.w3.org/2000/svg}text")]


def flat(texts: list[str]) -> str:
    return " ".join(" ".join(texts).split())


def hf_text_model(root: Path) -> Path:
    """A tiny BERT and a word-level tokenizer, built with transformers."""
    from .test_hf_heatmap import build, tiny_tokenizer

    directory = build(root, "bert")
    tiny_tokenizer(directory)
    return directory


# ---- titles --------------------------------------------------------------------------------

def test_grid_title_names_model_input_layers_and_scale(tmp_path: Path) -> None:
    out = tmp_path / "grid.svg"
    sequence_heatmap(TRANSFORMER, out, SequenceRequest(seq_len=7, seed=3), heads=("4",),
                     options=HeatmapOptions(layer="1-3"))
    title = flat(svg_texts(out))
    for part in ("attention per layer and head", "transformer_d64_h4.pth (nn.Transformer",
                 "input: 7 random inputs (seed 3)", "layers 1–3 of 6", "one colour scale"):
        assert part in title, (part, title)
    panel = tmp_path / "panel.svg"
    sequence_heatmap(TRANSFORMER, panel, SequenceRequest(seq_len=7), heads=("4",),
                     options=HeatmapOptions(layer="0,2,5", scale="panel"))
    title = flat(svg_texts(panel))
    assert "layers 0, 2, 5 of 6" in title and "colour scale per panel" in title
    assert "one colour scale" not in title
    mine = tmp_path / "mine.svg"
    sequence_heatmap(TRANSFORMER, mine, SequenceRequest(seq_len=7), heads=("4",),
                     options=HeatmapOptions(layer="1", title="Figure 3: my caption"))
    texts = svg_texts(mine)
    assert "Figure 3: my caption" in texts
    assert "random inputs" not in flat(texts) and "transformer_d64_h4" not in flat(texts)


def test_matrix_title_names_layer_head_and_input(tmp_path: Path) -> None:
    out = tmp_path / "m.svg"
    sequence_heatmap(TRANSFORMER, out, SequenceRequest(seq_len=5), heads=("4",),
                     options=HeatmapOptions(layer="2", head="1"))
    title = flat(svg_texts(out))
    names = list(load_checkpoint(TRANSFORMER).tensors)
    assert "decoder.layers.0.self_attn.in_proj_weight" in names  # layer 2 is the decoder's first
    for part in ("decoder.layers.0.self_attn · head 1", "layer 2 of 6",
                 "input: 5 random inputs (seed 0)"):
        assert part in title, (part, title)


def test_hf_title_quotes_the_input_text_safely(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = hf_text_model(tmp_path)
    text = "the cat sat on the mat $x^2$ \x1b[31m a dog sat on a mat the end of it all"
    ids = transformers.AutoTokenizer.from_pretrained(directory)(text)["input_ids"]
    out = tmp_path / "hf.svg"
    sequence_heatmap(directory, out, SequenceRequest(text=text))
    title = flat(svg_texts(out))
    assert f"“the cat sat on the mat $x^2$ \\x1b[31m a dog sat on…” ({len(ids)} tokens)" \
        in title
    assert "BertModel from bert" in title and "layers 0–1 of 2" in title
    assert "\x1b" not in title  # the escape is shown, never written raw


def test_image_titles_and_colour_bars(tmp_path: Path) -> None:
    out = tmp_path / "vit.svg"
    image_heatmap(SAMPLES / "vit_shapes.pth", out, ImageOptions(PICTURE, layer="1-2"))
    texts = svg_texts(out)
    title = flat(texts)
    for part in ("CLS attention to each patch · vit_shapes.pth (ViT)",
                 "input: image shapes_demo.png (64x64)", "blocks 1–2 of 4",
                 "one colour scale"):
        assert part in title, (part, title)
    assert "attention (shared scale)" in texts  # the colour bar's label
    panel = tmp_path / "panel.svg"
    image_heatmap(SAMPLES / "vit_shapes.pth", panel, ImageOptions(PICTURE, scale="panel"))
    texts = svg_texts(panel)
    assert "fraction of each panel's maximum" in texts
    assert "colour scale per panel" in flat(texts)
    detr = tmp_path / "detr.svg"
    image_heatmap(SAMPLES / "detr_shapes.pth", detr,
                  ImageOptions(PICTURE, size="128", top_k=1, threshold=0.0))
    assert "decoder layer 1 of 2" in flat(svg_texts(detr))


def test_per_panel_overlays_reach_the_top_of_the_colour_map() -> None:
    path = SAMPLES / "vit_shapes.pth"
    ckpt = load_checkpoint(path)
    options = ImageOptions(PICTURE, alpha=0.6)
    figure, _, _ = image_figure(path, ckpt, analyse(ckpt), options)
    assert figure.image is not None and figure.heats is not None
    redone = per_panel_overlays(figure, options)
    top = colormaps["inferno"](1.0)[:3]
    pixels = figure.image.astype(np.float32) / 255.0
    grid = figure.heats[0][0].shape  # type: ignore[union-attr]
    cell_h, cell_w = pixels.shape[0] // grid[0], pixels.shape[1] // grid[1]
    maxima = []
    for heats, row in zip(figure.heats, redone, strict=True):
        for heat, panel in zip(heats, row, strict=True):
            assert heat is not None
            r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
            y, x = r * cell_h + cell_h // 2, c * cell_w + cell_w // 2
            expected = 0.4 * pixels[y, x] + 0.6 * np.asarray(top)
            np.testing.assert_allclose(panel[y, x], expected, atol=1e-5)
            maxima.append(float(heat.max()))
    assert max(maxima) > 1.2 * min(maxima)  # the heads differ: one shared scale would not do it


# ---- fonts ---------------------------------------------------------------------------------

def pdf_fonts(path: Path) -> set[bytes]:
    return set(re.findall(rb"/Subtype\s*/(Type3|TrueType|Type0|Type1|CIDFontType\d)",
                          path.read_bytes()))


def test_pdf_embeds_truetype_and_leaves_rcparams_alone(tmp_path: Path) -> None:
    before = dict(matplotlib.rcParams)
    with matplotlib.rc_context({"pdf.fonttype": 3}):  # a caller's own setting
        grid, matrix = tmp_path / "grid.pdf", tmp_path / "matrix.pdf"
        sequence_heatmap(TRANSFORMER, grid, SequenceRequest(seq_len=6), heads=("4",))
        sequence_heatmap(TRANSFORMER, matrix, SequenceRequest(seq_len=6), heads=("4",),
                         options=HeatmapOptions(layer="0", head="0"))
        overlay = tmp_path / "overlay.pdf"
        image_heatmap(SAMPLES / "vit_shapes.pth", overlay, ImageOptions(PICTURE))
        assert matplotlib.rcParams["pdf.fonttype"] == 3
    for path in (grid, matrix, overlay):
        fonts = pdf_fonts(path)
        assert b"Type3" not in fonts, (path.name, fonts)
        assert fonts & {b"TrueType", b"Type0"}, (path.name, fonts)
    assert dict(matplotlib.rcParams) == before


def test_type3_is_what_the_test_would_catch(tmp_path: Path) -> None:
    """The check above can fail: matplotlib's default PDF fonts are Type 3."""
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.text(0.5, 0.5, "head 0")
    out = tmp_path / "default.pdf"
    fig.savefig(out)
    plt.close(fig)
    assert b"Type3" in pdf_fonts(out)


def test_svg_keeps_labels_as_text(tmp_path: Path) -> None:
    out = tmp_path / "grid.svg"
    sequence_heatmap(TRANSFORMER, out, SequenceRequest(seq_len=6), heads=("4",),
                     options=HeatmapOptions(layer="0-1", head="0,3"))
    texts = svg_texts(out)
    for label in ("encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "head 0",
                  "head 3", "attention probability"):
        assert label in texts, (label, texts)
    assert 'id="DejaVuSans-' not in out.read_text()  # no glyphs drawn as paths


def test_labels_from_files_are_one_line_and_not_mathtext(tmp_path: Path) -> None:
    out = tmp_path / "g.svg"
    render.render_grid([[np.eye(3)]], ["evil\nname $\\alpha$"], ["head\t0"], out, "svg",
                       title="t")
    texts = svg_texts(out)
    assert "evil\\x0aname $\\alpha$" in texts and "head\\x090" in texts


def test_long_titles_wrap_between_parts_and_words() -> None:
    title = "attention per layer and head · a-very-long-model-name (kind)\n" + \
        "input: “some words here” (3 tokens) · layers 0–5 of 6 · one colour scale"
    wrapped = render.wrap_title(title, 3.0, 11)
    lines = wrapped.splitlines()
    assert len(lines) > 2 and all(len(line) <= 34 for line in lines)
    assert " ".join(wrapped.split()) == " ".join(title.split())
    assert not any(re.search(r"\w-$", line) for line in lines)  # never split inside a word


# ---- the report's input --------------------------------------------------------------------

def input_section(page: str) -> str:
    match = re.search(r'<section id="input">(.*?)</section>', page, flags=re.S)
    assert match is not None
    assert page.index('<section id="input">') < page.index('<section id="summary">')
    return match.group(1)


def test_report_shows_the_input_text_and_its_tokens(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = hf_text_model(tmp_path)
    text = "the cat sat on <b>the</b> mat"
    out = tmp_path / "r.html"
    build_report(directory, out, request=SequenceRequest(text=text))
    section = input_section(out.read_text())
    assert "the cat sat on &lt;b&gt;the&lt;/b&gt; mat" in section and "<b>" not in section
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    import html

    assert re.findall(r'<span class="chip">(.*?)</span>', section) == \
        [html.escape(t) for t in tokens]
    assert f"{len(tokens)} tokens as the model saw them" in section


def test_report_shows_random_and_image_inputs(tmp_path: Path) -> None:
    out = tmp_path / "seq.html"
    build_report(TRANSFORMER, out, request=SequenceRequest(seq_len=9, seed=4), heads=("4",))
    section = input_section(out.read_text())
    assert "9 random inputs (seed 4)" in section and "chip" not in section  # positions only
    image = tmp_path / "img.html"
    build_report(SAMPLES / "vit_shapes.pth", image, image=ImageOptions(PICTURE))
    assert "shapes_demo.png (model input 64x64)" in input_section(image.read_text())
    bare = tmp_path / "bare.html"
    build_report(TRANSFORMER, bare, heads=("4",))
    assert '<section id="input">' not in bare.read_text()


def test_caption_pieces() -> None:
    from attnviz.captions import index_span, layer_span, model_label, sequence_title

    assert index_span([0, 1, 2, 5, 7, 8], 12, "layer") == "layers 0–2, 5, 7–8 of 12"
    assert layer_span([None], ["a", "b"]) == "mean of 2 layers"
    title = sequence_title("grid", ["b"], ["a", "b"], ["head 0"], shared=True, model="m",
                           source="input: x")
    assert title == "attention per layer and head · m\ninput: x · layer 1 of 2 · one colour scale"
    assert model_label("BertModel from model (sdpa attention)", Path("/x/minilm/model")) == \
        "BertModel from minilm/model (sdpa attention)"
