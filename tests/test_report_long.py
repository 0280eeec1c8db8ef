"""`attnviz report` at long inputs: maps pooled as the streamed capture produces them, chosen
query rows at full resolution, and no layer's full map ever built.

References: eager ``output_attentions`` of the transformers LLaMA module itself, pooled by
torch's own ``avg_pool2d`` / ``max_pool2d``."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from PIL import Image
from typer.testing import CliRunner

from attnviz.cli import app
from attnviz.report import ReportOptions, build_report
from attnviz.sequence_inputs import SequenceRequest
from tests.spies import LargestTensor
from tests.test_report import assert_clean, decode, payload, render

transformers = pytest.importorskip("transformers")
runner = CliRunner()
LENGTH = 77  # with --max-tokens 16: 5 x 5 token blocks, a ragged last one of 2
IDS = [(i * 31 + 7) % 97 for i in range(LENGTH)]


def _config() -> Any:
    return transformers.LlamaConfig(hidden_size=32, num_attention_heads=4,
                                    num_key_value_heads=2, num_hidden_layers=2,
                                    intermediate_size=48, vocab_size=97,
                                    max_position_embeddings=1024)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("report-long") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_config()).save_pretrained(model_dir)
    return model_dir


def _eager(model_dir: Path, ids: list[int]) -> tuple[torch.Tensor, ...]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                              attn_implementation="eager")
    with torch.no_grad():
        return tuple(model(torch.tensor([ids]), output_attentions=True).attentions)


def _tokens(ids: list[int]) -> SequenceRequest:
    return SequenceRequest(tokens=",".join(map(str, ids)))


def decode_rows(layer: dict[str, Any], head: int) -> np.ndarray:
    """A stored head's rows (n, S) as the page's script reads them (NaN where masked)."""
    entry = layer["heads"][head]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["png"]))).convert("LA"))
    count, keys, wrap = len(layer["queries"]), layer["keys"], layer["wrap"]
    grey = image[..., 0].reshape(count, -1)[:, :keys] / 255.0  # (n, lines * wrap) -> (n, S)
    shown = image[..., 1].reshape(count, -1)[:, :keys] > 0
    assert image.shape[1] == wrap
    return np.where(shown, grey * np.asarray(entry["max"])[:, None], np.nan)


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_long_maps_are_pooled_while_captured_like_torch_pooling(llama_dir: Path, tmp_path: Path,
                                                                mode: str) -> None:
    out = tmp_path / "r.html"
    result = build_report(llama_dir, out, request=_tokens(IDS),
                          options=ReportOptions(max_tokens=16, pool=mode))
    assert (result.layers, result.heads) == (2, 8)
    document = payload(out.read_text())
    reference = _eager(llama_dir, IDS)
    pool = F.avg_pool2d if mode == "mean" else F.max_pool2d
    for layer, expected in zip(document["maps"], reference, strict=True):
        assert (layer["q"], layer["k"], layer["block"]) == (LENGTH, LENGTH, 5)
        pooled = pool(expected.double(), 5, ceil_mode=True)[0].numpy()  # (H, 16, 16)
        for h, entry in enumerate(layer["heads"]):
            values, masked = decode(entry)
            assert values.shape == (16, 16)
            np.testing.assert_array_equal(masked, pooled[h] == 0)  # blocks above the diagonal
            np.testing.assert_allclose(values[~masked], pooled[h][~masked],
                                       atol=entry["max"] / 510 + 1e-6)
    how = "averaged" if mode == "mean" else "max-pooled"
    assert f"Maps longer than 16 tokens are {how} in k x k token blocks" in out.read_text()
    # the default rows: every layer's last query, over every key
    assert "their last query is kept at full resolution" in out.read_text()
    for stored, expected in zip(document["rows"], reference, strict=True):
        assert stored["queries"] == [LENGTH - 1] and stored["keys"] == LENGTH
        for h in range(4):
            np.testing.assert_allclose(decode_rows(stored, h)[0],
                                       expected[0, h, -1].numpy(),
                                       atol=max(stored["heads"][h]["max"]) / 510 + 1e-6)


def test_chosen_query_rows_equal_eager_rows_with_their_top_keys(llama_dir: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "q.html"
    done = runner.invoke(app, ["report", str(llama_dir), "--tokens", ",".join(map(str, IDS)),
                               "--max-tokens", "16", "--query", "3", "--query", "70-72",
                               "--no-norms", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "full-resolution rows of 4 chosen queries (3,70-72)" in done.output
    document = payload(out.read_text())
    reference = _eager(llama_dir, IDS)
    for stored, expected in zip(document["rows"], reference, strict=True):
        assert stored["queries"] == [3, 70, 71, 72]
        assert stored["qnames"] == [f"#{IDS[q]}" for q in (3, 70, 71, 72)]
        for h in range(4):
            rows = expected[0, h, [3, 70, 71, 72]].double()  # (4, S)
            decoded = decode_rows(stored, h)
            masked = rows.numpy() == 0  # causal: keys after the query
            np.testing.assert_array_equal(np.isnan(decoded), masked)
            for i, row in enumerate(rows):
                top = stored["heads"][h]["max"][i]
                assert top == pytest.approx(float(row.max()), rel=1e-5)
                np.testing.assert_allclose(decoded[i][~masked[i]], row.numpy()[~masked[i]],
                                           atol=top / 510 + 1e-7)
                listed = stored["heads"][h]["top"][i]
                best = torch.topk(row, 8).values
                best = best[best > 0]  # query 3 sees 4 keys: only those are listed
                torch.testing.assert_close(torch.tensor([p for _, _, p in listed],
                                                        dtype=torch.float64),
                                           best, rtol=1e-4, atol=1e-6)
                for key, name, probability in listed:
                    assert name == f"#{IDS[key]}"
                    assert float(row[key]) == pytest.approx(probability, rel=1e-4)


def test_a_short_input_keeps_exact_maps_and_stores_no_rows(llama_dir: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "short.html"
    build_report(llama_dir, out, request=_tokens(IDS[:12]), options=ReportOptions(norms=False))
    document = payload(out.read_text())
    assert document["rows"] == [] and "full resolution" not in out.read_text()
    for layer, expected in zip(document["maps"], _eager(llama_dir, IDS[:12]), strict=True):
        assert layer["block"] == 1
        for h, entry in enumerate(layer["heads"]):
            values, masked = decode(entry)
            exact = expected[0, h].numpy()
            np.testing.assert_array_equal(masked, exact == 0)
            np.testing.assert_allclose(values[~masked], exact[~masked],
                                       atol=entry["max"] / 510 + 1e-7)


def test_the_streamed_report_never_builds_a_layer_map(llama_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from attnviz import tiling

    length, heads, tile_rows = 256, 4, 8
    monkeypatch.setattr(tiling, "DEFAULT_BLOCK_VALUES", heads * tile_rows * length)
    ids = [(i * 13 + 5) % 97 for i in range(length)]
    spy = LargestTensor()
    with spy:
        result = build_report(llama_dir, tmp_path / "r.html", request=_tokens(ids),
                              options=ReportOptions(max_tokens=32, norms=False))
    assert result.heads == 2 * heads
    # logits (L x vocab) or one tile of rows; never a layer's (H, L, L), let alone all of them
    assert spy.largest <= max(97 * length, heads * tile_rows * length * 2)
    assert spy.largest < heads * length * length // 8
    document = payload((tmp_path / "r.html").read_text())
    assert [layer["block"] for layer in document["maps"]] == [8, 8]


def test_a_model_in_memory_gets_rows_from_its_full_capture(llama_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    result = build_report(model=model, inputs=torch.tensor([IDS]),
                          options=ReportOptions(max_tokens=16, query="last", norms=False))
    assert result.page is not None
    document = payload(result.page)
    reference = _eager(llama_dir, IDS)
    assert [r["queries"] for r in document["rows"]] == [[LENGTH - 1]] * 2
    np.testing.assert_allclose(decode_rows(document["rows"][1], 2)[0],
                               reference[1][0, 2, -1].numpy(),
                               atol=max(document["rows"][1]["heads"][2]["max"]) / 510 + 1e-6)


@pytest.mark.parametrize(("flags", "message"), [
    (["--pool", "median"], "--pool: 'median': use max or mean"),
    (["--query", "2-1"], "--query: range '2-1' is reversed"),
    (["--query", "500"], r"--query: query rows 500\.\.500 are outside 0\.\.76"),
])
def test_report_flags_are_checked(llama_dir: Path, tmp_path: Path, flags: list[str],
                                  message: str) -> None:
    done = runner.invoke(app, ["report", str(llama_dir), "--tokens", ",".join(map(str, IDS)),
                               *flags, "-o", str(tmp_path / "x.html")])
    assert done.exit_code == 2, done.output
    assert re.search(message, done.output), done.output
    assert not (tmp_path / "x.html").exists()
    done = runner.invoke(app, ["report", str(llama_dir), "--query", "3", "-o",
                               str(tmp_path / "y.html")])
    assert done.exit_code == 2 and "--query rows apply to a sequence input" in done.output


def test_an_opened_head_shows_its_rows_as_strips_in_chromium(llama_dir: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "long.html"
    build_report(llama_dir, out, request=_tokens(IDS),
                 options=ReportOptions(max_tokens=16, query="last,5", norms=False))
    attributes, dom, log = render(out, tmp_path, "#L1H2")
    assert_clean(attributes, log)
    detail = re.search(r'<div id="detail"([^>]*)>', dom)
    assert detail is not None and 'data-rows="2"' in detail.group(1), detail
    assert dom.count('class="row-strip"') == 2
    assert "query 76" in dom and "top keys: " in dom
