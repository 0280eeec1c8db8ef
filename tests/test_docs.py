"""Generated docs stay in sync with the code they describe."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_layouts_doc_matches_registry() -> None:
    spec = importlib.util.spec_from_file_location("make_layout_docs",
                                                  ROOT / "scripts" / "make_layout_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "layouts.md").read_text() == module.render(), (
        "docs/layouts.md is stale: run python scripts/make_layout_docs.py")


def test_json_schema_doc_lists_every_top_level_field() -> None:
    import json

    from typer.testing import CliRunner

    from attnviz.cli import app

    result = CliRunner().invoke(app, ["inspect", str(ROOT / "sample_checkpoints" / "detr_tiny.pth"),
                                      "--json"])
    doc = json.loads(result.stdout)
    schema = (ROOT / "docs" / "json-schema.md").read_text()
    for field in list(doc) + list(doc["attention"][0]):
        assert f"`{field}`" in schema, f"docs/json-schema.md does not document '{field}'"


def test_python_examples_in_docs_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # examples use repository-relative sample paths
    for page in ("split-qkv.md", "why-is-my-attention-none.md"):
        text = (ROOT / "docs" / page).read_text()
        blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
        assert blocks, page
        for block in blocks:
            exec(compile(block, f"docs/{page}", "exec"), {})
