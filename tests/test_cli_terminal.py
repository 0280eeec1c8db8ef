"""The CLI in a terminal: inspect tables readable at any width, a quiet end on a closed pipe,
root options anywhere, help without Python types, numbers checked before any work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from attnviz.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
TRANSFORMER = SAMPLES / "transformer_d64_h4.pth"
VIT, DETR = SAMPLES / "vit_shapes.pth", SAMPLES / "detr_shapes.pth"
PICTURE = SAMPLES / "shapes_demo.png"
WIDTHS = (60, 80, 120, 200)
runner = CliRunner()


def invoke(*args: str, columns: int = 200) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": str(columns)}, prog_name="attnviz")
    return result.exit_code, result.stdout, result.stderr


def command_names() -> list[str]:
    return sorted(getattr(typer.main.get_command(app), "commands", {}))


# --- inspect's table ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny HF directories written by transformers itself: BERT (long dotted names) and BART
    (mixed head counts, so some columns differ between layers)."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        vocab_size=50, max_position_embeddings=16))
    bert.save_pretrained(root / "bert")
    bart = transformers.BartModel(transformers.BartConfig(
        d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=4, encoder_ffn_dim=8, decoder_ffn_dim=8, vocab_size=40,
        max_position_embeddings=32))
    bart.save_pretrained(root / "bart")
    return {"bert": root / "bert", "bart": root / "bart"}


def long_named(tmp_path: Path) -> Path:
    """An nn.MultiheadAttention whose name is longer than a 60-column line."""
    prefix = "backbone.a_rather_long_module_name_for_wrapping.stage_three.blocks.11.self_attn"
    mha = torch.nn.MultiheadAttention(16, 4)
    path = tmp_path / "long.pth"
    torch.save({f"{prefix}.{k}": v for k, v in mha.state_dict().items()}, path)
    return path


def _cases(hf_dirs: dict[str, Path], tmp_path: Path) -> list[list[str]]:
    return [[str(TRANSFORMER), "--heads", "4", "--heads", "decoder.*=8"],
            [str(SAMPLES / "detr_tiny.pth")], [str(VIT)], [str(SAMPLES / "qkv_encoder")],
            [str(SAMPLES / "mha_kvdim.pth"), "--heads", "4"],
            [str(hf_dirs["bert"])], [str(hf_dirs["bart"])], [str(long_named(tmp_path)),
                                                              "--heads", "4"]]


def _layer_names(args: list[str]) -> list[str]:
    """The layer names in report order, from --json (the table's '#' is this index)."""
    code, out, _ = invoke("inspect", *args, "--json")
    assert code == 0
    return [layer["name"] or "(root)" for layer in json.loads(out)["attention"]]


def _squashed(text: str) -> str:
    """The text without whitespace and box drawing: a name wrapped inside its cell joins up."""
    return re.sub(r"[\s\u2500-\u257f]", "", text)


def _table(out: str) -> str:
    return out[out.index("attention layer"):]


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect_shows_every_layer_name_in_full(width: int, hf_dirs: dict[str, Path],
                                                tmp_path: Path) -> None:
    for args in _cases(hf_dirs, tmp_path):
        names = _layer_names(args)
        code, out, _ = invoke("inspect", *args, columns=width)
        assert code == 0, out
        table = _table(out)
        assert "…" not in table, f"{args} at {width} columns:\n{out}"
        assert max(len(line) for line in table.splitlines()) <= width
        for index, name in enumerate(names):
            if len(name) + 8 <= width:  # fits beside '# ' and the borders: on one line
                assert re.search(rf"│ +{index} │ {re.escape(name)} ", table), (
                    f"{name} (#{index}) at {width} columns:\n{out}")
            else:  # longer than the line: wrapped, every character still there
                assert f"{index}{name}" in _squashed(table), f"{name} at {width}:\n{out}"


def test_long_name_wraps_at_60_columns_and_stays_on_one_line_when_it_fits(
        tmp_path: Path) -> None:
    path = str(long_named(tmp_path))
    name = _layer_names([path, "--heads", "4"])[0]
    assert len(name) > 60
    _, narrow, _ = invoke("inspect", path, "--heads", "4", columns=60)
    assert name not in narrow and name in _squashed(narrow)
    _, wide, _ = invoke("inspect", path, "--heads", "4", columns=200)
    assert name in wide


def test_inspect_at_80_columns_moves_shared_values_to_the_heading(
        hf_dirs: dict[str, Path]) -> None:
    code, out, _ = invoke("inspect", str(hf_dirs["bart"]), columns=80)
    assert code == 0
    heading = " ".join(out[:out.index("┏")].split())  # the heading wraps at 80 columns
    assert "6 attention layers, each with layout hf_q_proj; E 16; kdim 16;" in heading
    # what differs between encoder (2 heads) and decoder (4 heads) layers stays per layer
    squashed = _squashed(out)
    assert "heads2;" in squashed and "heads4;" in squashed and "headdim8" in squashed
    _, wide, _ = invoke("inspect", str(hf_dirs["bart"]), columns=200)
    assert re.search(r"┃ # ┃ layer +┃ layout +┃", wide)  # wide enough: every column


def test_inspect_to_a_pipe_keeps_names_whole(hf_dirs: dict[str, Path]) -> None:
    """Output to a pipe: rich falls back to 80 columns."""
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}}
    done = subprocess.run([sys.executable, "-m", "attnviz", "inspect", str(hf_dirs["bert"])],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    for index, name in enumerate(_layer_names([str(hf_dirs["bert"])])):
        assert re.search(rf"│ +{index} │ {re.escape(name)} ", done.stdout), done.stdout


def test_filter_keeps_the_layer_index() -> None:
    code, out, _ = invoke("inspect", str(TRANSFORMER), "--heads", "4", "--filter",
                          "decoder.layers.0.multihead_attn", columns=80)
    assert code == 0
    assert re.search(r"│ 3 │ decoder\.layers\.0\.multihead_attn ", out), out
    assert "6 attention layers (1 shown)" in out


def test_stats_table_keeps_tensor_names_whole_at_60_columns() -> None:
    code, out, _ = invoke("inspect", str(SAMPLES / "qkv_encoder"), "--stats", columns=60)
    assert code == 0 and "…" not in out
    for name in ("layers.1.norm2.weight", "layers.0.attn.qkv_proj.weight"):
        assert re.search(rf"│ {re.escape(name)} ", out), out


# --- a closed pipe ------------------------------------------------------------------------------

def _closed_stdout(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run attnviz with stdout a pipe whose reader is already gone (`| head -0`, always)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "attnviz", *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=cwd, check=False)
    finally:
        os.close(write)


CLOSED_PIPE_RUNS = [["--help"], [], *([name, "--help"] for name in command_names()),
                    ["inspect", str(SAMPLES / "detr_tiny.pth")],
                    ["inspect", str(SAMPLES / "detr_tiny.pth"), "--json"],
                    ["inspect", str(SAMPLES / "qkv_encoder"), "--stats", "--all"]]


@pytest.mark.parametrize("args", CLOSED_PIPE_RUNS, ids=lambda a: " ".join(a) or "no-args")
def test_closed_pipe_ends_quietly(args: list[str]) -> None:
    done = _closed_stdout(*args)
    assert done.returncode in {0, 141}, done.stderr
    assert done.stderr == ""


def test_closed_pipe_after_a_heatmap_ends_quietly(tmp_path: Path) -> None:
    done = _closed_stdout("heatmap", str(TRANSFORMER), "--heads", "4", "--seq-len", "4", "-o",
                          str(tmp_path / "grid.png"))
    assert done.returncode in {0, 141} and done.stderr == ""
    assert (tmp_path / "grid.png").stat().st_size > 0  # the work itself was done


# --- root options anywhere ----------------------------------------------------------------------

@pytest.mark.parametrize("name", command_names())
def test_every_command_takes_the_root_options_after_its_name(name: str) -> None:
    # -q and -v reach the same state wherever they are given: together they are refused
    for args in ([name, "-q", "-v"], ["-q", name, "--verbose"], [name, "--quiet", "-v"]):
        code, _, err = invoke(*args)
        assert code == 2 and "--quiet and --verbose contradict" in err, (args, err)
    code, _, err = invoke(name, "--debug", "--quiet", "--no-such-option")
    assert code == 2 and "No such option" in err and "--debug" not in err


def test_quiet_and_verbose_after_the_command(tmp_path: Path) -> None:
    base = ["heatmap", str(TRANSFORMER), "--heads", "4", "--seq-len", "4", "--force", "-o",
            str(tmp_path / "x.png")]
    code, out, _ = invoke(*base)
    assert code == 0 and "wrote" in out
    code, out, err = invoke(*base, "-q")
    assert code == 0 and out == "" and err == ""
    code, out, err = invoke(*base, "-v")
    assert code == 0 and "wrote" in out
    assert re.search(r"\[ +\d+\.\d\ds\] loaded the model", err), err


def test_debug_after_the_command_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "empty.pth"
    bad.write_bytes(b"")
    code, _, err = invoke("inspect", str(bad))
    assert code == 2 and err.startswith("attnviz: error: ")
    result = runner.invoke(app, ["inspect", str(bad), "--debug"])
    assert result.exit_code != 0
    assert result.exception is not None and "empty" in str(result.exception)


# --- help ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", *command_names()])
def test_help_shows_value_names_not_python_types(name: str) -> None:
    code, out, _ = invoke(*([name] if name else []), "--help", columns=120)
    assert code == 0
    assert not re.search(r"<(list|bool|str|int|float)\b", out), out
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert "{" not in usage and re.search(rf"Usage: attnviz {name} ?\[OPTIONS\]", usage), out
    assert "Global options" in out or not name


@pytest.mark.parametrize("name", ["heatmap", "report", "split-qkv", "inspect"])
def test_help_groups_options_in_panels(name: str) -> None:
    _, out, _ = invoke(name, "--help", columns=120)
    panels = re.findall(r"╭─ ([^─]+?) ─", out)
    wanted = {"heatmap": ["Input", "Model", "View", "Image views (ViT-like, DETR)", "Output"],
              "report": ["Input", "Model", "View", "Image views (ViT-like, DETR)", "Output"],
              "split-qkv": ["Model", "Output"], "inspect": ["Model", "Output"]}[name]
    assert [p for p in panels if p in wanted] == wanted, panels
    assert panels[-1] == "Global options"
    _, usage, _ = invoke(name, "--help", columns=120)
    assert re.search(r"Usage: attnviz \S+ \[OPTIONS\] CHECKPOINT", usage)


def test_show_heads_is_listed_and_head_is_a_hidden_alias(tmp_path: Path) -> None:
    _, out, _ = invoke("heatmap", "--help", columns=120)
    assert "--show-heads" in out and not re.search(r"--head(?![-s])", out)
    base = ["heatmap", str(TRANSFORMER), "--heads", "4", "--seq-len", "4", "--layer", "0",
            "--force"]
    for flag in ("--show-heads", "--head"):
        code, out, err = invoke(*base, flag, "1,3", "-o", str(tmp_path / "x.png"))
        assert code == 0, err
        assert "1 layer row(s) x 2 head column(s)" in out
    code, _, err = invoke(*base, "--show-heads", "1", "--head", "2", "-o",
                          str(tmp_path / "y.png"))
    assert code == 2 and "--show-heads and --head" in err
    assert not (tmp_path / "y.png").exists()


# --- numbers and files checked up front -------------------------------------------------------

SEQUENCE = ["heatmap", str(TRANSFORMER), "--heads", "4"]
IMAGE = ["heatmap", str(VIT), "--image", str(PICTURE)]
DETR_IMAGE = ["heatmap", str(DETR), "--image", str(PICTURE), "--size", "128"]
BAD_NUMBERS = [
    (SEQUENCE, ["--seq-len", "0"], "--seq-len", "an integer >= 1"),
    (SEQUENCE, ["--seq-len", "-3"], "--seq-len", "an integer >= 1"),
    (SEQUENCE, ["--seq-len", "4", "--tgt-seq-len", "0"], "--tgt-seq-len", "an integer >= 1"),
    (SEQUENCE, ["--seq-len", "4", "--pad", "-1"], "--pad", "an integer >= 0"),
    (SEQUENCE, ["--seq-len", "4", "--seed", "-1"], "--seed", "an integer in [0, "),
    (SEQUENCE, ["--seq-len", "4", "--seed", str(2**64)], "--seed", "an integer in [0, "),
    (SEQUENCE, ["--seq-len", "4", "--batch-index", "-1"], "--batch-index", "an integer >= 0"),
    (IMAGE, ["--alpha", "1.5"], "--alpha", "a number in [0, 1]"),
    (IMAGE, ["--alpha", "nan"], "--alpha", "a number in [0, 1]"),
    (IMAGE, ["--view", "rollout", "--discard-ratio", "1"], "--discard-ratio",
     "a number in [0, 1)"),
    (IMAGE, ["--discard-ratio", "-0.5"], "--discard-ratio", "a number in [0, 1)"),
    (IMAGE, ["--size", "0"], "--size", "sides >= 1"),
    (IMAGE, ["--size", "0x64"], "--size", "sides >= 1"),
    (IMAGE, ["--size", "big"], "--size", "sides >= 1"),
    (DETR_IMAGE, ["--top-k", "0"], "--top-k", "an integer >= 1"),
    (DETR_IMAGE, ["--threshold", "1.5"], "--threshold", "a number in [0, 1]"),
    (DETR_IMAGE, ["--threshold", "-0.1"], "--threshold", "a number in [0, 1]"),
    (DETR_IMAGE, ["--query", "2", "--query", "-1"], "--query", "an integer >= 0"),
    (DETR_IMAGE, ["--point", "-5,10"], "--point", "each >= 0"),
    (DETR_IMAGE, ["--point", "inf,10"], "--point", "each >= 0"),
    (["report", str(TRANSFORMER), "--heads", "4", "--seq-len", "4"], ["--max-tokens", "4"],
     "--max-tokens", "an integer >= 8"),
]


@pytest.mark.parametrize(("command", "args", "flag", "allowed"), BAD_NUMBERS,
                         ids=[" ".join(a) for _, a, _, _ in BAD_NUMBERS])
def test_numbers_are_checked_before_any_work(tmp_path: Path, command: list[str],
                                             args: list[str], flag: str, allowed: str) -> None:
    output = tmp_path / ("out.html" if command[0] == "report" else "out.png")
    code, out, err = invoke(*command, *args, "-o", str(output))
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnviz: error: "), err
    assert flag in lines[0] and allowed in lines[0], lines[0]
    assert not output.exists()


def test_valid_edges_of_the_ranges_are_accepted(tmp_path: Path) -> None:
    code, _, err = invoke(*SEQUENCE, "--seq-len", "1", "--pad", "0", "--seed", str(2**63 - 1),
                          "--batch-index", "0", "-o", str(tmp_path / "one.png"))
    assert code == 0, err
    assert (tmp_path / "one.png").stat().st_size > 0


@pytest.mark.parametrize("flag", ["--image", "--input", "--tgt-input", "--config"])
def test_an_input_file_that_is_a_directory_says_so(tmp_path: Path, flag: str) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    args = {"--image": [*IMAGE[:2], "--image", str(folder)],
            "--input": [*SEQUENCE, "--input", str(folder)],
            "--tgt-input": [*SEQUENCE, "--seq-len", "4", "--tgt-input", str(folder)],
            "--config": [*SEQUENCE, "--seq-len", "4", "--config", str(folder)]}[flag]
    code, _, err = invoke(*args, "-o", str(tmp_path / "x.png"))
    assert code == 2
    assert flag in err and "is a directory, not a file" in err and "no such file" not in err
    code, _, err = invoke(*args[:-1], str(tmp_path / "missing"), "-o", str(tmp_path / "x.png"))
    assert code == 2 and flag in err and "no such file" in err


def test_inspect_config_directory_says_so(tmp_path: Path) -> None:
    code, _, err = invoke("inspect", str(TRANSFORMER), "--config", str(tmp_path))
    assert code == 2 and "--config" in err and "is a directory" in err
