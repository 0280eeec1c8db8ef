"""The head atlas as data, JSON and figure: a 32 x 32 grid renders legibly, the JSON is valid
and documented, the docs' roles table is the code's, maps captured whole give the same atlas."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from attnviz.head_atlas import (
    SCHEMA,
    HeadAtlas,
    HeadEntry,
    LayerEntry,
    atlas_data,
    atlas_from_maps,
    atlas_to_json,
)
from attnviz.head_roles import ROLES, roles_markdown
from attnviz.head_stats import STATISTICS
from attnviz.render_atlas import render_atlas
from tests.planted_heads import planted_maps

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _synthetic(layers: int, heads: int, seed: int = 0) -> HeadAtlas:
    """Random top roles (a fifth of the heads without one) and scores above threshold."""
    rng = random.Random(seed)
    entries = []
    for index in range(layers):
        row = []
        for head in range(heads):
            role = rng.choice([*ROLES, None, None])
            scores = {r.name: 0.0 for r in ROLES}
            if role is not None:
                scores[role.name] = rng.uniform(role.threshold, 1.0)
            held = () if role is None else (role.name,)
            statistics = {**dict.fromkeys(STATISTICS, 0.0), "prefix": math.nan}  # no image
            row.append(HeadEntry(head, held[0] if held else None, held, scores, statistics))
        entries.append(LayerEntry(index, f"model.layers.{index}.self_attn", 128, True, row))
    return HeadAtlas("LlamaModel from synthetic (sdpa attention)", "synthetic", "input: test",
                     2, 0, entries)


def test_a_32_by_32_atlas_renders_at_a_readable_size(tmp_path: Path) -> None:
    out = tmp_path / "atlas.png"
    layout = render_atlas(_synthetic(32, 32), out, "png", title="32 x 32")
    with Image.open(out) as image:
        assert image.size == (layout.width_px, layout.height_px)
        pixels = image.convert("RGB")
        colours = {pixels.getpixel((x, y)) for x in range(0, image.width, 7)
                   for y in range(0, image.height, 7)}
    # cells at least 0.3 inch (45 px at 150 dpi), their codes and the tick labels >= 6 pt
    assert layout.cell_px >= 45 and layout.cell_font_pt >= 6 and layout.tick_font_pt >= 6
    assert layout.width_px <= 3000 and layout.height_px <= 3000  # still one screen-ish page
    assert len(colours) > 20  # roles drawn in their colours, not one flat image


def test_small_and_large_grids_use_the_same_readable_cells(tmp_path: Path) -> None:
    small = render_atlas(_synthetic(2, 4), tmp_path / "a.svg", "svg", title="small")
    large = render_atlas(_synthetic(32, 32), tmp_path / "b.svg", "svg", title="large")
    assert small.cell_px >= large.cell_px >= 45
    svg = (tmp_path / "b.svg").read_text()
    assert "previous-token" in svg and "model.layers.31.self_attn" in svg  # text stays text


def test_json_is_valid_nan_free_and_versioned() -> None:
    atlas = _synthetic(2, 3)
    atlas.layers[0].heads[0].statistics["previous"] = math.nan
    doc = atlas_to_json(atlas)
    text = json.dumps(doc, allow_nan=False)  # no NaN/Infinity anywhere
    assert json.loads(text)["schema"] == SCHEMA == "attnviz.heads/1"
    assert doc["layers"][0]["heads"][0]["statistics"]["previous"] is None
    assert doc["layers"][0]["heads"][0]["statistics"]["prefix"] is None  # not an image model
    assert [r["name"] for r in doc["roles"]] == [r.name for r in ROLES]
    assert atlas_data(atlas) == doc


def test_docs_list_every_role_and_every_json_field() -> None:
    heads_page = (DOCS / "heads.md").read_text()
    assert roles_markdown() in heads_page, "docs/heads.md: paste roles_markdown()'s table"
    for name in STATISTICS:
        assert f"`{name}`" in heads_page
    schema = (DOCS / "json-schema.md").read_text()
    section = schema[schema.index("attnviz heads --json"):]
    doc = atlas_to_json(_synthetic(1, 1))
    fields = [*doc, *doc["layers"][0], *doc["layers"][0]["heads"][0], *doc["roles"][0]]
    missing = [f for f in fields if f"`{f}`" not in section]
    assert not missing, f"docs/json-schema.md heads section lacks {missing}"
    assert re.search(r"attnviz\.heads/1", section)


def test_atlas_from_whole_maps_for_the_report() -> None:
    maps = {"dec.self_attn": planted_maps(24), "dec.cross": planted_maps(24)}
    atlas = atlas_from_maps(maps, reference=["dec.self_attn", "dec.cross"],
                            cross=lambda name: name.endswith("cross"))
    first, second = atlas.layers
    assert [h.top for h in first.heads] == ["previous-token", "sink", "self", "broad"]
    assert first.self_attention and not second.self_attention
    assert [h.top for h in second.heads] == [None, "sink", None, "broad"]  # no positions
    data = atlas_data(atlas)
    assert data["layers"][1]["heads"][0]["scores"]["previous-token"] is None
    json.dumps(data, allow_nan=False)


@pytest.mark.parametrize("prefix", [0, 5])
def test_image_prefix_mass_is_reported_for_cls_and_registers(prefix: int) -> None:
    maps = torch.full((1, 2, 9, 9), 1 / 9)
    atlas = atlas_from_maps({"blocks.0.attn": maps}, prefix_tokens=prefix)
    doc = atlas_to_json(atlas)
    value = doc["layers"][0]["heads"][0]["statistics"]["prefix"]
    assert doc["prefix_tokens"] == prefix
    assert value == (None if prefix == 0 else pytest.approx(prefix / 9, abs=1e-6))


def test_the_python_example_of_the_heads_page_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DOCS.parent)  # the example reads sample_checkpoints/
    (block,) = re.findall(r"```python\n(.*?)```", (DOCS / "heads.md").read_text(), flags=re.S)
    namespace: dict[str, object] = {}
    exec(compile(block, "docs/heads.md", "exec"), namespace)
    data = namespace["data"]
    assert isinstance(data, dict) and data["schema"] == SCHEMA and len(data["layers"]) == 6
    json.dumps(data, allow_nan=False)


def test_the_demo_writes_the_heads_table_json_and_figure(tmp_path: Path) -> None:
    from attnviz.cli.demo_cmd import _heads_job
    from attnviz.sequence_inputs import SequenceRequest

    written: list[Path] = []
    sample = DOCS.parent / "sample_checkpoints" / "transformer_d64_h4.pth"
    _, run = _heads_job("t", sample, SequenceRequest(seq_len=8, causal=True), ("4",), tmp_path,
                        written)
    run()
    assert sorted(p.name for p in written) == ["t.json", "t.png", "t.txt"]
    assert json.loads((tmp_path / "t.json").read_text())["layers"][0]["num_heads"] == 4
    assert "encoder.layers.0.self_attn" in (tmp_path / "t.txt").read_text()
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
