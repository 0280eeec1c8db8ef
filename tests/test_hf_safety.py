"""HF model directories: attnviz never lets transformers import code from them, and a
config.json cannot make transformers build more than the weights hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from attnviz.cli import app

transformers = pytest.importorskip("transformers")

runner = CliRunner()

TRIPWIRE = """
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import BertConfig, BertModel
class EvilConfig(BertConfig):
    model_type = "evil"
class EvilModel(BertModel):
    config_class = EvilConfig
"""


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), input="y\ny\n", env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def tiny_bert(directory: Path, **overrides: Any) -> Path:
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    if overrides:
        edit(directory / "config.json", **overrides)
    return directory


def edit(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def plant(directory: Path, marker: Path) -> None:
    """modeling/configuration/tokenization/processing files that leave a marker on import."""
    for module in ("modeling_evil", "configuration_evil", "tokenization_evil",
                   "processing_evil"):
        (directory / f"{module}.py").write_text(TRIPWIRE.format(marker=str(marker)))


def one_line_refusal(code: int, out: str, err: str) -> str:
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "[y/N]" not in out + err and "trust_remote_code" not in out + err
    return lines[0]


@pytest.mark.parametrize(("file", "auto_map", "names"), [
    ("config.json", {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModel": "modeling_evil.EvilModel"},
     "class EvilConfig in configuration_evil.py"),
    ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
     "class EvilTokenizer in tokenization_evil.py"),
    ("preprocessor_config.json", {"AutoImageProcessor": "processing_evil.EvilProcessor"},
     "class EvilProcessor in processing_evil.py"),
])
@pytest.mark.parametrize("command", ["heatmap", "report"])
def test_auto_map_is_refused_and_never_imported(tmp_path: Path, file: str,
                                                auto_map: dict[str, Any], names: str,
                                                command: str) -> None:
    directory, marker = tiny_bert(tmp_path / "model"), tmp_path / "marker.txt"
    plant(directory, marker)
    edit(directory / file, auto_map=auto_map)
    suffix = ".png" if command == "heatmap" else ".html"
    code, out, err = cli(command, str(directory), "-o", str(tmp_path / f"out{suffix}"),
                         "--tokens", "1,2,3")
    line = one_line_refusal(code, out, err)
    assert f"{file} asks transformers to import custom code" in line
    assert names in line and "did NOT run it" in line
    assert not marker.exists()
    assert not (tmp_path / f"out{suffix}").exists()


def test_transformers_itself_is_told_not_to_run_remote_code(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """Second wall: with attnviz's own check switched off, every transformers call still
    passes trust_remote_code=False, so transformers refuses instead of importing."""
    from attnviz.models import hf_loading

    directory, marker = tiny_bert(tmp_path / "model"), tmp_path / "marker.txt"
    plant(directory, marker)
    edit(directory / "config.json", model_type="evil",
         auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                   "AutoModel": "modeling_evil.EvilModel"})
    monkeypatch.setattr(hf_loading, "refuse_custom_code", lambda _path: None)
    code, out, err = cli("heatmap", str(directory), "-o", str(tmp_path / "x.png"),
                         "--tokens", "1,2")
    assert "contains custom code" in one_line_refusal(code, out, err)  # transformers refused
    assert not marker.exists()


def test_a_config_with_200k_layers_is_refused_before_any_build(tmp_path: Path) -> None:
    directory = tiny_bert(tmp_path / "model", num_hidden_layers=200_000)
    code, out, err = cli("heatmap", str(directory), "-o", str(tmp_path / "x.png"),
                         "--tokens", "1,2")
    line = one_line_refusal(code, out, err)
    assert "num_hidden_layers = 200000 is over the cap of 1024 layers" in line


@pytest.mark.parametrize(("changes", "message"), [
    ({"num_hidden_layers": 3}, "num_hidden_layers = 3 contradicts the weights, whose "
                               "numbered layer stacks hold 2 layers"),
    ({"intermediate_size": 48}, "config.json contradicts the weights: "
                                "'encoder.layer.0.intermediate.dense.weight' is [64, 32]"),
    ({"hidden_size": 40_000}, "config.json contradicts the weights"),
    ({"num_attention_heads": 5}, "is not divisible by H=5 heads"),
])
def test_a_config_that_contradicts_its_weights_is_bad_input(tmp_path: Path,
                                                            changes: dict[str, Any],
                                                            message: str) -> None:
    directory = tiny_bert(tmp_path / "model", **changes)
    code, out, err = cli("heatmap", str(directory), "-o", str(tmp_path / "x.png"),
                         "--tokens", "1,2")
    assert message in one_line_refusal(code, out, err)


def test_a_huge_integer_in_a_processor_config_is_one_line(tmp_path: Path) -> None:
    directory = tiny_bert(tmp_path / "model")
    (directory / "tokenizer_config.json").write_text('{"model_max_length": ' + "9" * 5000 + "}")
    code, out, err = cli("heatmap", str(directory), "-o", str(tmp_path / "x.png"),
                         "--tokens", "1,2")
    assert "cannot read tokenizer_config.json" in one_line_refusal(code, out, err)


def test_a_build_far_larger_than_the_weights_is_refused(tmp_path: Path) -> None:
    from attnviz.models.hf_safety import HFDirectoryError, check_built_model

    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
        model.register_buffer("mask", torch.ones(20_000, 20_000, dtype=torch.bool))
    shapes = {"weight": (4, 4), "bias": (4,)}
    with pytest.raises(HFDirectoryError, match=r"build 400,000,020 elements but the weights "
                                               r"hold 20"):
        check_built_model(model, shapes, tmp_path)
    small = torch.nn.Linear(4, 4, device="meta")
    check_built_model(small, shapes, tmp_path)  # what the file holds is fine


def test_layer_stacks_count_distinct_indices() -> None:
    from attnviz.models.hf_safety import layer_stacks

    names = {"encoder.layer.0.a": 0, "encoder.layer.1.a": 0, "encoder.layer.1.b.0.w": 0,
             "h.199999.w": 0}
    assert layer_stacks(names) == {"encoder.layer": 2, "encoder.layer.1.b": 1, "h": 1}
