"""`attnviz inspect` through the real CLI: output, JSON schema, errors, exit codes, lightness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnviz import __version__
from attnviz.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_inspect_sample_detr_reads_heads_from_namespace_args() -> None:
    code, out, _ = invoke("inspect", str(SAMPLES / "detr_tiny.pth"))
    assert code == 0
    assert "transformer.decoder.layers.1.multihead_attn" in out
    assert "checkpoint args: nheads" in out
    assert "argparse.Namespace" in out
    assert "container" in out and "model" in out


def test_inspect_json_schema_fields() -> None:
    code, out, _ = invoke("inspect", str(SAMPLES / "detr_tiny.pth"), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["schema_version"] == 1
    assert doc["format"] == "torch-zip"
    assert doc["container_key"] == "model"
    assert doc["stripped_prefix"] is None
    assert len(doc["attention"]) == 6
    layer = doc["attention"][0]
    assert layer == layer | {
        "name": "transformer.encoder.layers.0.self_attn", "layout": "torch_mha",
        "embed_dim": 64, "kdim": 64, "vdim": 64, "num_heads": 4,
        "num_heads_source": "checkpoint args: nheads", "num_kv_heads": 4, "head_dim": 16,
        "has_bias": True,
    }
    assert layer["tensors"]["q"] == "transformer.encoder.layers.0.self_attn.in_proj_weight"
    assert layer["tensors"]["out"] == "transformer.encoder.layers.0.self_attn.out_proj.weight"
    names = {t["name"]: t for t in doc["tensors"]}
    assert names["query_embed.weight"]["shape"] == [10, 64]
    assert names["query_embed.weight"]["dtype"] == "float32"
    assert doc["foreign_objects"][0]["name"] == "argparse.Namespace"
    assert doc["foreign_objects"][0]["names_code"] is False
    assert doc["foreign_objects"][0]["attributes"]["nheads"] == 4
    assert doc["foreign_objects"][0]["where"] == "args"
    assert isinstance(doc["warnings"], list)


def test_inspect_heads_flag_and_pattern() -> None:
    path = str(SAMPLES / "transformer_d64_h4.pth")
    code, out, _ = invoke("inspect", path, "--json")
    assert code == 0
    assert {a["num_heads"] for a in json.loads(out)["attention"]} == {None}
    _, out, _ = invoke("inspect", path, "--json", "--heads", "4", "--heads", "decoder.*=8")
    heads = {a["name"]: (a["num_heads"], a["head_dim"]) for a in json.loads(out)["attention"]}
    assert heads["encoder.layers.0.self_attn"] == (4, 16)
    assert heads["decoder.layers.1.multihead_attn"] == (8, 8)


def test_inspect_directory_reads_config_and_filter() -> None:
    code, out, _ = invoke("inspect", str(SAMPLES / "qkv_encoder"), "--json", "--filter",
                          "layers.1*")
    assert code == 0
    doc = json.loads(out)
    assert doc["format"] == "safetensors"
    assert doc["config"].endswith("config.json")
    assert [a["name"] for a in doc["attention"]] == ["layers.1.attn"]
    assert all(t["name"].startswith("layers.1") for t in doc["tensors"])
    assert doc["metadata"]["description"].startswith("attnviz sample")


def test_inspect_all_shows_tree() -> None:
    code, out, _ = invoke("inspect", str(SAMPLES / "mha_kvdim.pth"), "--all", "--heads", "4")
    assert code == 0
    assert "k_proj_weight  [64, 32] float32" in out
    assert "torch_mha_kvdim" in out


def test_bad_flag_combination_is_rejected_up_front() -> None:
    code, _, err = invoke("inspect", str(SAMPLES / "mha_kvdim.pth"), "--json", "--all")
    assert code == 2
    assert "--json already lists every tensor" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heads", "x"], "--heads 'x' is not N"),
        (["--heads", "0"], "positive integer"),
        (["--heads", "5"], r"E=64 is not divisible by H=5"),
        (["--key", "nope"], "--key 'nope' names no mapping of tensors"),
        (["--config", "/nonexistent/config.json"], "no such file"),
    ],
)
def test_errors_are_one_line_with_exit_2(args: list[str], message: str) -> None:
    code, out, err = invoke("inspect", str(SAMPLES / "transformer_d64_h4.pth"), *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("attnviz: error: ")
    assert __import__("re").search(message, lines[0])
    assert "Traceback" not in out + err


def test_error_names_the_file_and_next_step(tmp_path: Path) -> None:
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    code, _, err = invoke("inspect", str(bad))
    assert code == 2
    assert str(bad) in err and "Git LFS pointer" in err and "git lfs pull" in err


def test_debug_shows_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "empty.pth"
    bad.write_bytes(b"")
    result = runner.invoke(app, ["--debug", "inspect", str(bad)])
    assert result.exit_code != 0
    assert result.exception is not None and "empty" in str(result.exception)


def test_missing_file() -> None:
    code, _, err = invoke("inspect", "/nonexistent/model.pth")
    assert code == 2 and "no such file" in err


def test_version() -> None:
    code, out, _ = invoke("--version")
    assert code == 0 and out.strip() == f"attnviz {__version__}"


def test_no_attention_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pth"
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, path)
    code, out, _ = invoke("inspect", str(path))
    assert code == 0 and "no attention layers recognised" in out


PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['attnviz'] + sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module('attnviz', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    "heavy = sorted(m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules)\n"
    "print('HEAVY', heavy, file=sys.stderr)\n"
)


@pytest.mark.parametrize("args", [["--help"], ["inspect", "{detr}", "--json"],
                                  ["inspect", "{detr}", "--all"]])
def test_help_and_inspect_do_not_import_torch_or_matplotlib(args: list[str]) -> None:
    argv = [a.format(detr=SAMPLES / "detr_tiny.pth") for a in args]
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          check=False, env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"})
    assert "HEAVY []" in done.stderr, done.stderr[-2000:]


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "attnviz", "--version"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == f"attnviz {__version__}"


def test_stats_report_nan_and_inf_without_crashing(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = torch.tensor([1.0, float("nan"), -3.0, float("inf"), float("-inf"), 5.0])
    state = {"w": weights, "half": weights.to(torch.bfloat16), "ids": torch.arange(4),
             "flag": torch.tensor([True, False]), "empty": torch.zeros(0)}
    for path in (tmp_path / "x.pth", tmp_path / "x.safetensors"):
        if path.suffix == ".pth":
            torch.save(state, path)
        else:
            save_file(state, str(path))
        code, out, err = invoke("inspect", str(path), "--json", "--stats")
        assert code == 0, err
        doc = json.loads(out)
        stats = {s["name"]: s for s in doc["stats"]}
        assert stats["w"] == stats["w"] | {"nan": 1, "inf": 2, "min": -3.0, "max": 5.0,
                                           "mean": 1.0}
        assert stats["half"]["nan"] == 1 and stats["half"]["max"] == 5.0
        assert stats["ids"] == stats["ids"] | {"nan": 0, "min": 0.0, "max": 3.0}
        assert stats["empty"]["min"] is None
        assert any("'w' holds 1 NaN and 2 Inf" in w for w in doc["warnings"])
    code, out, _ = invoke("inspect", str(tmp_path / "x.pth"), "--stats")
    assert code == 0 and "value statistics" in out


def test_a_filter_that_matches_nothing_says_what_was_meant() -> None:
    done = runner.invoke(app, ["inspect", str(SAMPLES / "detr_tiny.pth"), "--json",
                               "--filter", "transformer.encoder.layer.*"])
    assert done.exit_code == 2  # a selector that matches nothing is a usage error
    assert done.stdout == ""
    assert "matches no layer or tensor (did you mean " \
           "'transformer.encoder.layers.1.self_attn'" in done.stderr, done.stderr
    assert "0 transformer.encoder.layers.0.self_attn" in done.stderr
