"""File text shown to people (issue 12, items 5 and 7): tensor names with Rich markup or terminal
escapes, usage errors, a full disk under ``--format pt``, and tokens that would break the HTML
report's inline JSON (``<!--<script>``). One helper, attnviz.text_safety, escapes for all three:
terminal, Rich, HTML."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rich.markup import render
from safetensors.torch import save_file
from typer.testing import CliRunner

from attnviz.cli import app
from attnviz.report_data import MapLayer, ReportData, encode_map
from attnviz.report_html import render_html
from attnviz.text_safety import int_text, rich_markup, safe_repr, script_json, terminal

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
MARKUP = ["[/]", "[red]", "[bold red]x[/bold red]", "\\[", "[/", "\\", "[link=https://x]y[/link]",
          ":fire:", "[@click=quit]"]
ESCAPES = ["\x1b[2K", "\x1b[1A", "\x1b]0;owned\x07", "\r", "\b", "\x9b2J", "\u202e", "\n"]


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def _mha_state(prefix: str) -> dict[str, torch.Tensor]:
    state = torch.nn.MultiheadAttention(8, 2).state_dict()
    return {f"{prefix}.{k}": v.contiguous() for k, v in state.items()}


@pytest.mark.parametrize("flags", [[], ["--all"], ["--stats"]])
def test_tensor_names_with_markup_and_escapes_print_as_text(tmp_path: Path,
                                                            flags: list[str]) -> None:
    prefix = "".join(MARKUP + ESCAPES).replace(".", "")
    state = _mha_state(prefix)
    path = tmp_path / "names.safetensors"
    save_file(state, str(path))

    result = _cli("inspect", str(path), "--heads", "2", *flags)

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\r" not in result.output
    assert "\x9b" not in result.output and "\u202e" not in result.output
    assert terminal(prefix)[:60] in result.stdout.replace("\n", "")  # shown as it is
    if "--stats" in flags:
        assert "value statistics" in result.stdout


def test_split_table_shows_markup_layer_names_as_text(tmp_path: Path) -> None:
    path = tmp_path / "split.safetensors"
    save_file(_mha_state("[/]enc[red]"), str(tmp_path / "in.safetensors"))

    result = _cli("split-qkv", str(tmp_path / "in.safetensors"), "-o", str(path), "--heads", "2")

    assert result.exit_code == 0, result.output
    assert "[/]enc[red]" in result.stdout


@pytest.mark.parametrize("args", [
    ["inspect", "--bogus"], ["inspect"], ["no-such-command"], ["split-qkv", "x.pth"],
    ["inspect", "x.pth", "--heads"], ["merge-qkv"],
])
def test_usage_errors_are_one_line(args: list[str]) -> None:
    result = _cli(*args)

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnviz: error: "), result.stderr
    assert re.search(r"\(see 'attnviz[a-z -]*--help'\)$", lines[0]), lines[0]


def test_error_lines_escape_terminal_sequences(tmp_path: Path) -> None:
    path = tmp_path / "evil\x1b[2K.pth"
    path.write_bytes(b"\x00" * 16)

    result = _cli("inspect", str(path))

    assert result.exit_code == 2 and "\x1b" not in result.stderr
    assert "evil\\x1b[2K.pth" in result.stderr


def test_pt_output_on_a_full_disk_is_one_error_line(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = Path.open

    def full_disk(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self.name.endswith(".partial") and "w" in mode:
            return real_open(Path("/dev/full"), mode, *args, **kwargs)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = _cli("split-qkv", str(SAMPLES / "mha_kvdim.pth"), "-o", str(out_dir / "h.pt"),
                  "--heads", "4")

    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("attnviz: error: ") and os.strerror(errno.ENOSPC) in line, line
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the escaping helper itself


@given(st.lists(st.sampled_from([*"[]/\\ab@#=:x \x1bB", "[/]", "[red]", "\\["]),
                max_size=20).map("".join))
def test_rich_markup_renders_exactly_the_text(text: str) -> None:
    rendered = render("[red]<" + rich_markup(text) + "[bold]>[/bold][/red]", emoji=False)
    assert rendered.plain == "<" + terminal(text) + ">"


@given(st.text())
def test_terminal_text_has_no_control_characters(text: str) -> None:
    shown = terminal(text)
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]", shown)
    assert terminal(shown.replace("\\", "")) == shown.replace("\\", "")  # stable on safe text


def test_huge_integers_have_text() -> None:
    assert int_text(10**5000) == f"<{(10**5000).bit_length()}-bit integer>"
    assert int_text(-(10**50)).startswith("<-")
    assert int_text(12345) == "12345"
    assert safe_repr((10**5000, "x" * 500)).startswith("(<16610-bit integer>, 'xxx")


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20))
def test_script_json_has_no_angle_bracket_and_round_trips(document: Any) -> None:
    text = script_json(document)
    assert not set(text) & {"<", ">", "&", "\u2028", "\u2029"}
    assert json.loads(text) == document


# ---------------------------------------------------------------------------------------------
# item 7: the HTML report's inline JSON

TOKENS = ["<!--<script>", "<!--", "<script>", "</script>", "</SCRIPT >", "-->", "&amp;", "\u2028",
          "\u2029", "<![CDATA[", "</style>"]


def _report_with_tokens() -> ReportData:
    stored = encode_map(np.full((len(TOKENS), len(TOKENS)), 1 / len(TOKENS)))
    data = ReportData(title="tokens", summary=[("file", "x")], layers=[{"layer": "l"}],
                      warnings=[])
    data.maps = [MapLayer("<!--<script>", len(TOKENS), len(TOKENS), 1, [stored], TOKENS,
                          TOKENS[::-1])]
    return data


def _script_blocks(page: str) -> list[str]:
    return re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S | re.I)


def test_inline_json_cannot_change_how_the_html_parser_reads_the_page() -> None:
    page = render_html(_report_with_tokens())

    data_block, code_block = _script_blocks(page)
    # the tokenizer leaves a script element at the first '</script'; inside it, '<!--' then
    # '<script' enters the double-escaped state: the data block holds no '<' at all
    assert "<" not in data_block
    assert json.loads(data_block)["labels"] == [TOKENS, TOKENS[::-1]]
    assert json.loads(data_block)["maps"][0]["name"] == "<!--<script>"
    assert "report.js" not in code_block and "JSON.parse" in code_block
    assert page.count("</script>") == 2


def test_tokens_stay_text_in_chromium(tmp_path: Path) -> None:
    from .test_report import Elements, assert_clean, render

    page = tmp_path / "tokens.html"
    page.write_text(render_html(_report_with_tokens()))

    attributes, dom, log = render(page, tmp_path, "#L0H0Q0")

    assert_clean(attributes, log)  # the page's own script ran to the end, without errors
    assert attributes["heads"] == "1"
    assert [tag for tag, _ in Elements(dom).tags].count("script") == 2
