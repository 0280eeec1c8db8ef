"""attnviz in a notebook: the committed quickstart runs in a Jupyter kernel (nbclient), its saved
head view renders in headless Chromium inside its sandboxed frame, the result objects show as
short, escaped tables, and ``build_report(model=..., inputs=...)`` stores what torch and
transformers compute."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pytest
import torch
import transformers
from nbclient import NotebookClient
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import attnviz
from attnviz.errors import UsageError
from attnviz.heatmap import sequence_heatmap
from attnviz.notebook import HeadView, head_view
from attnviz.report import build_report
from attnviz.sequence_inputs import SequenceRequest
from attnviz.split import split_layer
from tests.test_report import decode, payload, render

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "notebooks" / "quickstart.ipynb"
SAMPLE = ROOT / "sample_checkpoints" / "transformer_d64_h4.pth"
SAMPLE_HEADS = 24  # 2 encoder self, 2 decoder self and 2 cross-attention modules x 4 heads


def sample_model() -> nn.Transformer:
    model = nn.Transformer(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=128, batch_first=True)
    model.load_state_dict(torch.load(SAMPLE, weights_only=True))
    return model.eval()


def png_of(bundle_value: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(bundle_value)))
    image.load()
    return image


# ---- the notebook, executed ---------------------------------------------------------------------

def test_committed_notebook_carries_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict[str, Any]]]:
    """Run the quickstart in a fresh kernel of this interpreter, save it, read it back: the
    outputs of each code cell."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    folder = tmp_path_factory.mktemp("notebook")
    write_kernel_spec(folder / "kernels" / "attnviz-test")  # this interpreter, whatever is set
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")], ensure_native_kernel=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="attnviz-test",
                            km=KernelManager(kernel_name="attnviz-test",
                                             kernel_spec_manager=specs),
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    saved = folder / "executed.ipynb"
    nbformat.write(notebook, saved)
    again = nbformat.read(saved, as_version=4)
    return [[dict(o) for o in cell.outputs] for cell in again.cells if cell.cell_type == "code"]


def cell_with(outputs: list[list[dict[str, Any]]], marker: str) -> dict[str, Any]:
    """The one output whose data holds ``marker`` in some mime type."""
    found = [o for cell in outputs for o in cell
             if any(marker in str(v) for v in o.get("data", {}).values())]
    assert len(found) == 1, [o.get("data", {}).keys() for cell in outputs for o in cell]
    return found[0]


def test_notebook_results_show_as_short_tables(executed: list[list[dict[str, Any]]]) -> None:
    assert not any(o["output_type"] == "error" for cell in executed for o in cell)
    inspect = cell_with(executed, "<strong>InspectReport</strong>")["data"]
    for name in ("encoder.layers.0.self_attn", "decoder.layers.1.multihead_attn"):
        assert name in inspect["text/html"]
    maps = cell_with(executed, "<strong>AttentionMaps</strong>")["data"]
    assert "(1, 4, 6, 9)" in maps["text/html"]  # cross-attention: 6 decoder queries, 9 keys
    report = cell_with(executed, "<strong>ReportResult</strong>")["data"]
    for data in (inspect, maps, report):  # the ~80,000-character dumps are gone
        assert len(data["text/plain"]) < 400 and len(data["text/html"]) < 20_000


def test_notebook_static_view_is_a_png_alone(executed: list[list[dict[str, Any]]]) -> None:
    static = [o for cell in executed for o in cell
              if "image/png" in o.get("data", {}) and "text/html" not in o["data"]]
    assert len(static) == 1
    image = png_of(static[0]["data"]["image/png"])
    assert image.width > 400 and image.height > 400


def frame_page(view_html: str, path: Path, frame_script: str = "") -> Path:
    """The saved output as a page of its own (how a notebook front end shows it); with
    ``frame_script`` added to the framed page, and the outer page recording its messages."""
    if frame_script:
        match = re.search(r'srcdoc="([^"]*)"', view_html)
        assert match is not None
        inner = html.unescape(match.group(1)).replace("</body>", frame_script + "</body>")
        view_html = view_html.replace(match.group(0),
                                      f'srcdoc="{html.escape(inner, quote=True)}"')
    listener = ("<script>window.addEventListener('message', function (e) { if (e.data && "
                "e.data.test) document.body.setAttribute('data-test', e.data.test); });</script>")
    path.write_text(f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"></head>'
                    f"<body>{listener}{view_html}</body></html>", encoding="utf-8")
    return path


def frame_state(dom: str) -> dict[str, str]:
    frames = re.findall(r"<iframe\b[^>]*>", re.sub(r'srcdoc="[^"]*"', "", dom))
    assert len(frames) == 1, frames
    return dict(re.findall(r'data-([a-z]+)="([^"]*)"', frames[0]))


def test_notebook_head_view_renders_in_chromium(executed: list[list[dict[str, Any]]],
                                                tmp_path: Path) -> None:
    output = cell_with(executed, "<iframe")
    data = output["data"]
    assert output["output_type"] == "display_data"
    assert 'sandbox="allow-scripts"' in data["text/html"]  # no same-origin: no notebook access
    assert png_of(data["image/png"]).width > 400  # the fallback where HTML is not drawn
    links = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""",
                       html.unescape(data["text/html"]))
    assert not links  # offline: nothing loads from anywhere
    _, dom, log = render(frame_page(data["text/html"], tmp_path / "view.html"), tmp_path)
    state = frame_state(dom)
    assert (state["ready"], state["heads"], state["errors"]) == ("1", str(SAMPLE_HEADS), "0")
    assert "Uncaught" not in log, [line for line in log.splitlines() if "Uncaught" in line]


CLICK = """<script>(function () {
  function run() {
    if (document.body.dataset.ready !== "1") return setTimeout(run, 20);
    var detail = document.getElementById("detail");
    document.querySelector('canvas[data-layer="3"][data-head="2"]').click();
    var opened = !detail.hidden && detail.dataset.open + ":" + detail.dataset.queries + "x" +
      detail.dataset.keys;
    document.getElementById("close").click();
    parent.postMessage({ test: opened + (detail.hidden ? ":closed" : ":open") }, "*");
  }
  run();
})();</script>"""


def test_a_head_opens_and_closes_inside_the_sandboxed_frame(
        executed: list[list[dict[str, Any]]], tmp_path: Path) -> None:
    view = cell_with(executed, "<iframe")["data"]["text/html"]
    page = frame_page(view, tmp_path / "click.html", CLICK)
    attributes, dom, log = render(page, tmp_path)
    # layer 3 is decoder.layers.0.multihead_attn: 6 decoder queries over 9 source keys
    assert attributes.get("test") == "L3H2:6x9:closed"
    assert frame_state(dom)["errors"] == "0"  # opening a head writes no #L3H2 link here
    assert "Uncaught" not in log


# ---- build_report and show from a loaded model ---------------------------------------------------

def test_build_report_from_a_loaded_model_stores_what_torch_computes(tmp_path: Path) -> None:
    model = sample_model()
    src, tgt = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(1)), \
        torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    tokens = [f"<b>s{i}</b>" for i in range(9)]
    out = tmp_path / "model.html"
    result = build_report(model=model, inputs={"src": src, "tgt": tgt}, tokens=tokens,
                          output=out)
    assert (result.output, result.layers, result.heads) == (out, 6, SAMPLE_HEADS)
    document = payload(out.read_text(encoding="utf-8"))
    assert [m["name"] for m in document["maps"]][:2] == ["encoder.layers.0.self_attn",
                                                           "encoder.layers.1.self_attn"]
    first = document["maps"][0]
    assert document["labels"][first["klabels"]] == tokens
    with torch.no_grad():  # the first encoder layer's attention sees the source itself
        _, reference = model.encoder.layers[0].self_attn(src, src, src, need_weights=True,
                                                         average_attn_weights=False)
    for h, entry in enumerate(first["heads"]):
        values, _ = decode(entry)
        torch.testing.assert_close(torch.from_numpy(values).float(), reference[0, h],
                                   atol=entry["max"] / 500, rtol=0)
    with torch.no_grad():  # Wq of head h: rows h*d..(h+1)*d of in_proj_weight's first block
        wq = model.encoder.layers[0].self_attn.in_proj_weight.detach()[:64].reshape(4, 16, 64)
    page = out.read_text(encoding="utf-8")
    for h in range(4):
        assert f">{float(torch.linalg.norm(wq[h])):.3g}<" in page


def test_build_report_from_an_hf_model_names_tokens_with_its_tokenizer() -> None:
    config = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37)
    torch.manual_seed(0)
    sdpa = transformers.BertModel(transformers.BertConfig(**config)).eval()
    eager = transformers.BertModel(transformers.BertConfig(**config,
                                                           attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())

    class Tokenizer:
        def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
            return [f"tok{i}" for i in ids]

    inputs = {"input_ids": torch.tensor([[2, 7, 11, 3, 5]]),
              "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    result = build_report(model=sdpa, inputs=inputs, tokenizer=Tokenizer())
    assert result.output is None and result.page is not None and result.heads == 8
    document = payload(result.page)
    assert document["labels"][document["maps"][0]["klabels"]] == ["tok2", "tok7", "tok11",
                                                                   "tok3", "tok5"]
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).attentions
    for layer, entry in zip(reference, document["maps"], strict=True):
        for h, head in enumerate(entry["heads"]):
            values, _ = decode(head)
            torch.testing.assert_close(torch.from_numpy(values).float(), layer[0, h],
                                       atol=head["max"] / 500, rtol=0)
    # per layer: a row in each of the four norm tables (Wq..Wo) and one in the head-role table
    assert result.page.count('<th scope="row">encoder.layer.') == 2 * (4 + 1)


def test_build_report_from_a_model_refuses_what_does_not_fit(tmp_path: Path) -> None:
    model, src = sample_model(), torch.randn(1, 4, 64)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": model}, "no inputs for Transformer"),
        ({"model": model, "inputs": (src, src), "checkpoint": SAMPLE}, "not both"),
        ({"model": model, "inputs": (src, src), "request": SequenceRequest(seq_len=3)},
         "request applies to a checkpoint file"),
        ({"model": "model.pth", "inputs": src}, "not a torch.nn.Module"),
        ({"model": model, "inputs": (torch.randn(1, 4, 32), src)},
         "forward pass of Transformer failed"),
        ({}, "neither a checkpoint nor a model"),
        ({"model": model, "inputs": (src, src), "output": tmp_path / "r.png"}, "use a .html"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            build_report(**kwargs)


def test_head_view_bundle_and_show(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model, src, tgt = sample_model(), torch.randn(1, 5, 64), torch.randn(1, 3, 64)
    with torch.no_grad(), attnviz.capture_attention(model) as maps:
        model(src, tgt)
    view = head_view(maps, tokens=list("abcde"), target_tokens=list("xyz"), height=400)
    bundle = view._repr_mimebundle_()
    assert view.heads == SAMPLE_HEADS and set(bundle) == {"text/plain", "text/html", "image/png"}
    frame = re.search(r'srcdoc="([^"]*)"', bundle["text/html"])
    assert frame is not None and "<" not in frame.group(1)  # the whole page is one attribute
    assert "<title>" in html.unescape(frame.group(1))
    grid = np.asarray(png_of(bundle["image/png"]).convert("RGB"))
    assert grid.std() > 10  # maps drawn, not a blank canvas
    assert set(head_view(maps, static=True)._repr_mimebundle_()) == {"text/plain", "image/png"}
    shown: list[Any] = []
    monkeypatch.setattr("IPython.display.display", lambda value: shown.append(value))
    maps.show(png=False)
    attnviz.show(model=model, inputs=(src, tgt), png=False)
    page = tmp_path / "r.html"
    build_report(SAMPLE, page, request=SequenceRequest(seq_len=6), heads=("4",)).show(png=False)
    attnviz.show(page)  # a page written earlier
    attnviz.show(SAMPLE, request=SequenceRequest(seq_len=6), heads=("4",), png=False)
    assert [type(v) for v in shown] == [HeadView] * 5
    assert [v.heads for v in shown] == [SAMPLE_HEADS] * 5
    assert shown[2].page == shown[3].page == page.read_text(encoding="utf-8")
    assert "image/png" not in shown[0]._repr_mimebundle_()
    for kwargs, message in [({"section": "nowhere"}, "section 'nowhere' is not one"),
                            ({"height": 50}, "height 50"),
                            ({"model": model, "inputs": src}, "not both")]:
        with pytest.raises(UsageError, match=message):
            head_view(maps, **kwargs)
    with pytest.raises(UsageError, match="tokens does not apply to a report page"):
        head_view(page, tokens=["a"])


# ---- the result objects' tables ---------------------------------------------------------------

def test_tables_escape_names_from_the_file(tmp_path: Path) -> None:
    name = 'layers.0.<img src=x onerror="alert(1)">\x1b[2J.attn'
    tensors = {f"{name}.in_proj_weight": torch.zeros(96, 32),
               f"{name}.out_proj.weight": torch.zeros(32, 32)}
    path = tmp_path / "hostile.safetensors"
    save_file(tensors, str(path))
    report = attnviz.inspect_checkpoint(path, heads=["4"])
    shown = report._repr_html_()
    assert "<img" not in shown and "\x1b" not in shown
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;\\x1b[2J.attn" in shown
    assert "\x1b" not in repr(report)


def test_maps_heatmap_and_split_results_are_short(tmp_path: Path) -> None:
    model = sample_model()
    with torch.no_grad(), attnviz.capture_attention(model) as maps:
        model(torch.randn(1, 300, 64), torch.randn(1, 200, 64))
    assert len(repr(maps)) < 300 and "(1, 4, 300, 300)" in repr(maps)
    assert "decoder.layers.1.multihead_attn" in maps._repr_html_()
    out = tmp_path / "grid.png"
    result = sequence_heatmap(SAMPLE, out, SequenceRequest(seq_len=6), heads=("4",))
    inline = re.search(r'src="data:image/png;base64,([^"]+)"', result._repr_html_())
    assert inline is not None and base64.b64decode(inline.group(1)) == out.read_bytes()
    weights = split_layer(attnviz.load_checkpoint(SAMPLE), "encoder.layers.0.self_attn", 4)
    assert len(repr(weights)) < 200 and "(4, 16, 64)" in repr(weights)
    assert "<td style=\"text-align:left\">(4, 64, 16)</td>" in weights._repr_html_()  # o
