"""Honest flags: a heads override is applied everywhere (the model is built with it) or refused
with the reason; a file attnviz cannot run says what it is and what it needs; library errors name
parameters, never CLI flags; outputs get the mode a plain open() gives; the public API is
exported lazily from ``attnviz``.

References are the libraries themselves: transformers modules built with the overridden head
count, ``torch.nn.MultiheadAttention``, the OS's own umask arithmetic.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from attnviz.cli import app, flag_for
from attnviz.errors import AttnvizError, HeadsError, UsageError, param
from attnviz.inspection import inspect_checkpoint, report_to_json

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
runner = CliRunner()


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


# --- tiny HF model directories, built and saved by transformers itself ----------------------

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BERT, E=48 with 12 heads in config.json (any of 1, 2, 3, 4, 6, 12 divides E)."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=12, intermediate_size=64,
                                     max_position_embeddings=32)
    model = transformers.BertModel(config)
    with torch.no_grad():  # larger q/k weights: peaked maps that differ between groupings
        for name, tensor in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                tensor.mul_(6)
    model.save_pretrained(directory)
    return directory


def llama_dir(root: Path, heads: int, kv_heads: int) -> Path:
    transformers = pytest.importorskip("transformers")
    directory = root / f"llama_{heads}_{kv_heads}"
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=64)
    transformers.LlamaModel(config).save_pretrained(directory)
    return directory


def hf_reference(directory: Path, auto: str, ids: list[int], **config_values: int) -> Any:
    """transformers' own eager attentions from the directory, config values overridden the way
    a user of transformers would (from_pretrained with a config stating the new count)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(directory)
    for key, value in config_values.items():
        setattr(config, key, value)
    model = getattr(transformers, auto).from_pretrained(directory, config=config,
                                                        attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                    output_attentions=True)
    return out.attentions


OVERRIDE_12_TO_4 = "heads override: 4 heads instead of the 12 from config.json: num_attention_heads"


def test_hf_heatmap_is_built_with_the_override(bert_dir: Path, tmp_path: Path) -> None:
    maps_file = tmp_path / "maps.safetensors"
    code, _, err = cli("heatmap", bert_dir, "--tokens", "5,17,3,9,42", "--heads", "4",
                       "-o", tmp_path / "h.png", "--save-maps", maps_file)
    assert code == 0, err
    assert OVERRIDE_12_TO_4 in err  # the file said 12: a warning, on stderr
    maps = load_file(str(maps_file))
    reference = hf_reference(bert_dir, "BertModel", [5, 17, 3, 9, 42], num_attention_heads=4)
    for index, expected in enumerate(reference):
        got = maps[f"encoder.layer.{index}.attention.self"]
        assert got.shape == (1, 4, 5, 5)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # control: the config's own 12 heads group the same weights differently
    twelve = hf_reference(bert_dir, "BertModel", [5, 17, 3, 9, 42])
    assert twelve[0].shape == (1, 12, 5, 5)


def test_hf_report_tables_and_grid_agree_with_the_override(bert_dir: Path,
                                                           tmp_path: Path) -> None:
    page = tmp_path / "r.html"
    code, _, err = cli("report", bert_dir, "--tokens", "5,17,3", "--heads", "4", "-o", page)
    assert code == 0, err
    assert OVERRIDE_12_TO_4 in err
    html = page.read_text()
    table = re.search(r'<table class="layers">(.*?)</table>', html, re.S)
    assert table is not None
    header = re.findall(r"<th>(.*?)</th>", table.group(1))
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in
            re.findall(r"<tr>(<td>.*?)</tr>", table.group(1))]
    assert len(rows) == 2
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        assert (cells["heads"], cells["head dim"]) == ("4", "12")
    from attnviz.report import build_report
    from attnviz.sequence_inputs import SequenceRequest

    result = build_report(bert_dir, tmp_path / "r2.html", heads=["4"],
                          request=SequenceRequest(tokens="5,17,3"))
    assert result.heads == 2 * 4  # the grid: 2 layers of 4 head maps, as the table says
    assert result.warnings == [f"{OVERRIDE_12_TO_4}, in 2 layer(s) "
                               "(encoder.layer.0.attention.self, encoder.layer.1.attention.self)"]


def test_inspect_records_the_override_in_json_and_on_stderr(bert_dir: Path) -> None:
    code, out, err = cli("inspect", bert_dir, "--json", "--heads", "4")
    assert code == 0
    document = json.loads(out)
    for layer in document["attention"]:
        assert (layer["num_heads"], layer["head_dim"]) == (4, 12)
        assert layer["num_heads_replaced"] == {"count": 12,
                                               "source": "config.json: num_attention_heads"}
    assert any(OVERRIDE_12_TO_4 in w for w in document["warnings"])
    assert OVERRIDE_12_TO_4 in err
    plain = json.loads(cli("inspect", bert_dir, "--json")[1])
    assert plain["warnings"] == [] and plain["attention"][0]["num_heads_replaced"] is None
    same = json.loads(cli("inspect", bert_dir, "--json", "--heads", "12")[1])
    assert same["warnings"] == []  # an override that agrees with the config replaces nothing


def test_split_verify_runs_transformers_with_the_override(bert_dir: Path,
                                                          tmp_path: Path) -> None:
    code, out, err = cli("split-qkv", bert_dir, "--heads", "4", "--verify",
                         "-o", tmp_path / "s.safetensors")
    assert code == 0, err
    assert "against transformers BertModel" in out
    assert OVERRIDE_12_TO_4 in err
    tensors = load_file(str(tmp_path / "s.safetensors"))
    queries = {n: tuple(t.shape) for n, t in tensors.items() if n.endswith(".q.weight")}
    assert len(queries) == 2 * 4 and set(queries.values()) == {(12, 48)}  # 4 heads of d = 12


def test_llama_override_updates_kv_heads_and_head_dim(tmp_path: Path) -> None:
    directory = llama_dir(tmp_path, heads=4, kv_heads=4)
    maps_file = tmp_path / "maps.safetensors"
    code, _, err = cli("heatmap", directory, "--tokens", "3,1,4,1,5,9", "--heads", "2",
                       "-o", tmp_path / "h.png", "--save-maps", maps_file)
    assert code == 0, err
    assert "2 heads instead of the 4 from config.json: num_attention_heads" in err
    maps = load_file(str(maps_file))
    reference = hf_reference(directory, "LlamaModel", [3, 1, 4, 1, 5, 9],
                             num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    for index, expected in enumerate(reference):
        got = maps[f"layers.{index}.self_attn"]
        assert got.shape == (1, 2, 6, 6)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_override_inconsistent_with_kv_heads_is_refused(tmp_path: Path) -> None:
    directory = llama_dir(tmp_path, heads=4, kv_heads=2)
    output = tmp_path / "h.png"
    code, _, err = cli("heatmap", directory, "--tokens", "1,2,3", "--heads", "8", "-o", output)
    assert code == 2
    assert "num_key_value_heads=2 but the shapes give 4 key/value heads for H=8" in err
    assert not output.exists()
    with pytest.raises(HeadsError, match="num_key_value_heads=2") as caught:
        inspect_checkpoint(directory, heads=["8"])
    assert caught.value.param is None or caught.value.param == "heads"


def test_override_the_config_cannot_express_is_refused(bert_dir: Path, tmp_path: Path) -> None:
    # one num_attention_heads for both layers: 4 for layer 0 only cannot be built
    output = tmp_path / "h.png"
    code, _, err = cli("heatmap", bert_dir, "--tokens", "1,2,3", "--heads",
                       "encoder.layer.0.*=4", "-o", output)
    assert code == 2
    assert "config.json has one num_attention_heads for 2 layers" in err
    assert err.startswith("attnviz: error: --heads: ")  # the CLI names its flag
    assert not output.exists()
    # inspect only describes the split: it applies the pattern and warns
    report = inspect_checkpoint(bert_dir, heads=["encoder.layer.0.*=4"])
    assert [item.heads.num_heads for item in report.layers] == [4, 12]
    assert report.warnings == [f"{OVERRIDE_12_TO_4}, in 1 layer(s) "
                               "(encoder.layer.0.attention.self)"]


def test_override_contradicting_the_layers_own_shapes_is_refused(tmp_path: Path) -> None:
    """A Swin-style relative position table [(2w-1)^2, H] fixes H: no override beats it."""
    e, h = 12, 3
    path = tmp_path / "swin.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.randn(3 * e, e),
               "blocks.0.attn.qkv.bias": torch.randn(3 * e),
               "blocks.0.attn.proj.weight": torch.randn(e, e),
               "blocks.0.attn.proj.bias": torch.randn(e),
               "blocks.0.attn.relative_position_bias_table": torch.randn(9, h),
               "blocks.0.attn.relative_position_index": torch.zeros(4, 4, dtype=torch.int64)},
              str(path))
    with pytest.raises(HeadsError, match=r"override of 4 heads contradicts the shape of "
                                         r"blocks\.0\.attn\.relative_position_bias_table, "
                                         r"which gives 3") as caught:
        inspect_checkpoint(path, heads=["4"])
    assert caught.value.param == "heads"
    code, _, err = cli("inspect", path, "--heads", "4")
    assert code == 2 and "--heads" in err
    agreeing = inspect_checkpoint(path, heads=["3"])
    assert agreeing.layers[0].heads.num_heads == 3 and agreeing.warnings == []


def test_rebuilt_transformer_uses_the_override_of_stored_args(tmp_path: Path) -> None:
    """detr_tiny stores args.nheads = 4; --heads 8 rebuilds nn.Transformer with 8 heads."""
    maps_file = tmp_path / "maps.safetensors"
    code, _, err = cli("heatmap", SAMPLES / "detr_tiny.pth", "--seq-len", "6", "--heads", "8",
                       "-o", tmp_path / "h.png", "--save-maps", maps_file)
    assert code == 0, err
    assert "8 heads instead of the 4 from checkpoint args: nheads" in err
    maps = load_file(str(maps_file))
    name = next(n for n in maps if n.endswith("encoder.layers.0.self_attn"))
    ckpt = inspect_checkpoint(SAMPLES / "detr_tiny.pth").checkpoint
    prefix = "transformer.encoder.layers.0.self_attn."
    mha = torch.nn.MultiheadAttention(64, 8, batch_first=True)
    mha.load_state_dict({k: ckpt.read_tensor(prefix + k) for k in mha.state_dict()})
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))  # heatmap's --seed 0
    with torch.no_grad():
        _, expected = mha(x, x, x, need_weights=True, average_attn_weights=False)
    assert maps[name].shape == (1, 8, 6, 6)
    torch.testing.assert_close(maps[name], expected, rtol=1e-4, atol=1e-5)


def test_a_factory_model_that_ignores_the_override_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "override_factory.py").write_text(
        "from torch import nn\n\n\ndef build():\n"
        "    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, "
        "batch_first=True), 1, enable_nested_tensor=False)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32,
                                                                         batch_first=True),
                                        1, enable_nested_tensor=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "enc.safetensors"))
    common = ("heatmap", "enc.safetensors", "--model", "override_factory:build", "--seq-len",
              "5")
    code, _, err = cli(*common, "--heads", "2", "-o", "h.png")
    assert code == 2
    assert "computes 4 heads in 'layers.0.self_attn', not the 2 of the override" in err
    assert not (tmp_path / "h.png").exists()
    assert cli(*common, "--heads", "4", "-o", "h.png")[0] == 0


# --- what a file is, and what it needs -----------------------------------------------------

@pytest.mark.parametrize("command", ["heatmap", "report"])
def test_a_vit_given_a_sequence_is_told_to_give_an_image(command: str, tmp_path: Path) -> None:
    suffix = ".png" if command == "heatmap" else ".html"
    code, _, err = cli(command, SAMPLES / "vit_shapes.pth", "--seq-len", "8",
                       "-o", tmp_path / f"x{suffix}")
    assert code == 2
    assert "a ViT checkpoint (timm layout" in err
    assert "(give an image with --image FILE)" in err
    assert "nn.Transformer-style" not in err and "--model" not in err


@pytest.mark.parametrize("command", ["heatmap", "report"])
def test_a_gpt2_state_dict_says_what_was_recognised(command: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2,
                                                           vocab_size=50, n_positions=16))
    path = tmp_path / "gpt2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    suffix = ".png" if command == "heatmap" else ".html"
    code, _, err = cli(command, path, "--seq-len", "8", "-o", tmp_path / f"x{suffix}")
    assert code == 2
    assert "recognised 2 attention layer(s) of HF GPT-2" in err
    assert "gpt2_conv1d layout" in err
    assert "HF model directory (the weights with their config.json)" in err
    assert "--model package.module:factory" in err


def test_family_errors_from_the_library_name_parameters() -> None:
    from attnviz.heatmap import sequence_heatmap
    from attnviz.sequence_inputs import SequenceRequest

    with pytest.raises(UsageError, match=r"ViT checkpoint.*give an image with image FILE") as e:
        sequence_heatmap(SAMPLES / "vit_shapes.pth", Path("unused.png"),
                         SequenceRequest(seq_len=8))
    assert "--" not in str(e.value)


# --- library messages name parameters, the CLI shows flags ---------------------------------

FLAG = re.compile(r"(?<![\w-])--(?:[a-z]|$)")  # '--x', or '--' before an f-string field
ALLOWED: set[tuple[str, str]] = set()  # (module, text) of non-flag uses; none today


def _error_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Raised expressions and every ``...Error(...)`` constructed (returned errors too), each
    once."""
    seen: set[int] = set()
    for node in ast.walk(tree):
        found: ast.AST | None = None
        if isinstance(node, ast.Raise) and node.exc is not None:
            found = node.exc
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else \
                func.attr if isinstance(func, ast.Attribute) else ""
            if name.endswith(("Error", "Exception")):
                found = node
        if found is not None and id(found) not in seen:
            seen.add(id(found))
            yield found


def flag_mentions(source: str) -> list[str]:
    """String literals (f-string parts included) inside error construction that name a flag."""
    found = []
    for node in _error_nodes(ast.parse(source)):
        for sub in ast.walk(node):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and \
                    FLAG.search(sub.value):
                found.append(sub.value)
    return found


def library_modules() -> list[Path]:
    package = ROOT / "attnviz"
    return [p for p in sorted(package.rglob("*.py"))
            if p.relative_to(package).parts[0] != "cli"]


def test_the_flag_scan_finds_flags_in_errors_and_only_there() -> None:
    assert flag_mentions('raise UsageError("--heads 3 is wrong")') == ["--heads 3 is wrong"]
    assert sorted(flag_mentions('raise UsageError(f"--{what} {x}: bad", hint="pass --config")')) \
        == ["--", "pass --config"]
    assert flag_mentions("def f():\n    return HeadsError('x', hint='use --heads N')\n") == \
        ["use --heads N"]
    assert flag_mentions('raise OutputError(f"{param(\'force\')} x")') == []
    assert flag_mentions('NOTE = "pass --heads"\nraise ValueError("a-b -- c")') == []
    assert len(library_modules()) > 40  # the scan below reads the real package


def test_library_errors_never_name_a_cli_flag() -> None:
    offenders = []
    for path in library_modules():
        module = str(path.relative_to(ROOT))
        for text in flag_mentions(path.read_text(encoding="utf-8")):
            if (module, text) not in ALLOWED:
                offenders.append(f"{module}: {text!r}")
    assert offenders == [], "library errors must name parameters (errors.param), not flags"
    present = {(str(p.relative_to(ROOT)), t) for p in library_modules()
               for t in flag_mentions(p.read_text(encoding="utf-8"))}
    assert present >= ALLOWED  # no stale allowances


def test_parameters_render_as_names_in_the_library_and_flags_in_the_cli(tmp_path: Path) -> None:
    error = UsageError(f"{param('alpha')} 2: use a value in [0, 1]", param="alpha",
                       hint=f"or pass {param('strict', False)}; {param('force', True)}")
    assert str(error) == "alpha 2: use a value in [0, 1] (or pass strict=False; force=True)"
    assert error.describe(name_for=flag_for) == \
        "--alpha 2: use a value in [0, 1] (or pass --no-strict; --force)"
    labelled = HeadsError("E is not divisible by 5", param="heads")
    assert str(labelled) == "heads: E is not divisible by 5"
    assert labelled.describe(name_for=flag_for) == "--heads: E is not divisible by 5"
    # the real thing, both ways
    with pytest.raises(UsageError) as caught:
        inspect_checkpoint(SAMPLES / "detr_tiny.pth", layout="nosuch")
    assert "detr_tiny.pth: layout nosuch is not a known layout (known: " in str(caught.value)
    assert caught.value.param == "layout" and "--" not in str(caught.value)
    code, _, err = cli("inspect", SAMPLES / "detr_tiny.pth", "--layout", "nosuch")
    assert code == 2
    assert "detr_tiny.pth: --layout nosuch is not a known layout (known: " in err
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"x")
    from attnviz.split_export import split_checkpoint

    with pytest.raises(AttnvizError, match=r"output exists \(pass force=True to overwrite it\)"):
        split_checkpoint(SAMPLES / "detr_tiny.pth", out)
    code, _, err = cli("split-qkv", SAMPLES / "detr_tiny.pth", "-o", out)
    assert code == 2 and "output exists (pass --force to overwrite it)" in err


# --- output modes ---------------------------------------------------------------------------

@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_open_mode(folder: Path, mask: int) -> int:
    """What the OS gives a file made by open(), under ``mask``: the reference."""
    probe = folder / ".probe"
    with umask(mask), open(probe, "w"):
        pass
    made = mode(probe)
    probe.unlink()
    return made


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_command_output_gets_the_plain_open_mode(mask: int, tmp_path: Path) -> None:
    expected = plain_open_mode(tmp_path, mask)
    assert expected == 0o666 & ~mask
    seq = SAMPLES / "transformer_d64_h4.pth"
    outputs = {
        "heatmap": tmp_path / "h.png", "save-maps": tmp_path / "maps.safetensors",
        "report": tmp_path / "r.html", "split": tmp_path / "s.safetensors",
        "split-npz": tmp_path / "s.npz", "sidecar": tmp_path / "s.npz.json",
        "merge": tmp_path / "merged.safetensors",
    }
    with umask(mask):
        runs = [
            ("heatmap", seq, "--heads", "4", "--seq-len", "5", "-o", outputs["heatmap"],
             "--save-maps", outputs["save-maps"]),
            ("report", seq, "--heads", "4", "--seq-len", "5", "-o", outputs["report"]),
            ("split-qkv", SAMPLES / "detr_tiny.pth", "-o", outputs["split"]),
            ("split-qkv", SAMPLES / "detr_tiny.pth", "-o", outputs["split-npz"]),
            ("merge-qkv", outputs["split"], "-o", outputs["merge"]),
        ]
        for args in runs:
            code, _, err = cli(*args)
            assert code == 0, (args, err)
    assert {name: oct(mode(path)) for name, path in outputs.items()} == \
        {name: oct(expected) for name in outputs}


def test_replacing_a_file_keeps_its_mode_like_open_does(tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    with umask(0o022):
        code, _, err = cli("split-qkv", SAMPLES / "detr_tiny.pth", "-o", out, "--force")
    assert code == 0, err
    assert mode(out) == 0o640 and out.read_bytes() != b"old"


def test_demo_outputs_follow_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One run under 027: 0640 is neither mkstemp's 0600 nor a fixed 0644."""
    monkeypatch.chdir(ROOT)  # the bundled samples
    out = tmp_path / "demo"
    with umask(0o027):
        code, _, err = cli("demo", "-o", out)
    assert code == 0, err
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) > 10
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(0o640) for p in files}


# --- the public API, lazily -----------------------------------------------------------------

PUBLIC = {
    "capture_attention": "attnviz.capture", "AttentionMaps": "attnviz.capture",
    "split_layer": "attnviz.split", "split_heads": "attnviz.split",
    "merge_heads": "attnviz.split", "HeadWeights": "attnviz.split",
    "render_matrix": "attnviz.render", "render_grid": "attnviz.render",
    "compose_grid": "attnviz.render", "build_report": "attnviz.report",
    "show": "attnviz.notebook", "inspect_checkpoint": "attnviz.inspection",
    "load_checkpoint": "attnviz.checkpoint",
}


def test_public_api_is_exported_lazily() -> None:
    script = (
        "import json, sys\n"
        "import attnviz\n"
        "heavy = [m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules]\n"
        f"names = {sorted(PUBLIC)!r}\n"
        "listed = all(n in attnviz.__all__ and n in dir(attnviz) for n in names)\n"
        "from attnviz import capture_attention, render_grid, show, split_layer\n"
        "print(json.dumps({'heavy': heavy, 'listed': listed}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert json.loads(done.stdout) == {"heavy": [], "listed": True}
    import importlib

    import attnviz

    for name, module in PUBLIC.items():
        assert getattr(attnviz, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        attnviz.nope  # noqa: B018


def test_report_to_json_keeps_override_out_of_unoverridden_layers() -> None:
    report = inspect_checkpoint(SAMPLES / "transformer_d64_h4.pth", heads=["encoder.*=4"])
    document = report_to_json(report)
    heads = {a["name"]: (a["num_heads"], a["num_heads_replaced"]) for a in document["attention"]}
    assert heads["encoder.layers.0.self_attn"] == (4, None)  # nothing else gave a count
    assert heads["decoder.layers.0.self_attn"] == (None, None)
