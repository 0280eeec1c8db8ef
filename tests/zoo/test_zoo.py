"""The conformance zoo: every architecture in ``cases.py`` through inspect, split and heatmap,
against what transformers itself computes. Writes the matrix (docs/zoo.md, and a summary with the
worst errors at the end of the pytest run).

Regenerate docs/zoo.md: ``ATTNVIZ_WRITE_ZOO_DOCS=1 pytest tests/zoo/test_zoo.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attnviz.inspection import inspect_checkpoint

from .cases import CASES, attention_maps, build, eager_forward, save_state_dict
from .conformance import (
    TOLERANCE,
    Row,
    check_bare,
    check_weights,
    found_modules,
    hf_attention_count,
    innermost_attention_modules,
    summarise_geometry,
)
from .maps import check_maps
from .matrix import RESULTS, render

pytest.importorskip("transformers")
DOC = Path(__file__).resolve().parents[2] / "docs" / "zoo.md"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_zoo_case(case, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    row = Row(case.name, case.model_type, case.family, notes=case.notes)
    RESULTS[case.name] = row
    if case.unsupported is not None:
        assert case.unsupported.strip()
        row.weights = row.maps = f"refused: {case.unsupported}"
        return
    directory = tmp_path / case.name
    model = build(case, directory)
    eager = attention_maps(eager_forward(case, model))

    # inspect: every attention module, self and cross, with its geometry
    report = inspect_checkpoint(directory)
    assert report.layers, "no attention layer found"
    assert all(item.heads.num_heads is not None for item in report.layers), report.warnings
    assert hf_attention_count(eager) >= 1
    expected = innermost_attention_modules(model)
    found = found_modules(model, report)
    assert found == expected, f"missed {sorted(expected - found)}, extra {sorted(found - expected)}"
    row.layouts = ", ".join(sorted({item.layer.layout for item in report.layers}))
    row.layers = str(len(report.layers))
    row.geometry = summarise_geometry(report)

    # q/k/v/o of every head against the HF module, with a wrong-head control
    checks = check_weights(case, model, report)
    for check in checks:
        assert check.problem is None, f"{check.layer}: {check.problem}"
        assert check.max_abs_error <= TOLERANCE, check
        assert check.control > 100 * TOLERANCE, f"{check.layer}: a wrong head would pass"
    for item, check in zip(report.layers, checks, strict=True):
        if "out" in item.layer.keys and not item.layer.layout.startswith("torch_mha"):
            assert "o" in check.errors, f"{check.layer}: output projection not checked"
    row.weights = "exact"
    row.worst["weights"] = max(c.max_abs_error for c in checks)

    # the same weights as a bare state_dict
    bare = save_state_dict(case, model, tmp_path / "bare" / "weights.pth")
    row.bare = check_bare(directory, bare, report)

    # heatmap maps against eager output_attentions
    row.maps, worst = check_maps(case, model, directory, tmp_path)
    if worst is not None:
        row.worst["maps"] = worst


def test_zoo_matrix_is_documented() -> None:
    if len(RESULTS) != len(CASES):
        pytest.skip("the matrix needs every zoo case in the same run")  # -k selections
    text = render(CASES)
    if os.environ.get("ATTNVIZ_WRITE_ZOO_DOCS"):
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/zoo.md is stale: ATTNVIZ_WRITE_ZOO_DOCS=1 pytest " \
        "tests/zoo/test_zoo.py"
