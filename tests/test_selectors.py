"""One layer/head selector grammar everywhere (attnviz.selectors): index, range, name, glob,
list, 'all'/'mean'; the same index names the same layer in inspect, split-qkv, heatmap and
report (checked against torch's and transformers' own module order); a selector that matches
nothing is a usage error (exit 2) that lists the layers with their indices."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.errors import UsageError
from attnviz.heatmap import HeatmapOptions, capture_sequence, select_panels, sequence_heatmap
from attnviz.inspection import analyse, inspect_checkpoint, select_layers
from attnviz.selectors import (
    compact,
    natural_order,
    order_like,
    parse,
    select,
    select_among,
    select_heads,
)
from attnviz.sequence_inputs import SequenceRequest

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
TRANSFORMER = str(SAMPLES / "transformer_d64_h4.pth")  # 2+2 nn.Transformer, heads not stored
VIT = str(SAMPLES / "vit_shapes.pth")  # 4 timm blocks
DETR = str(SAMPLES / "detr_shapes.pth")  # 2+2 official DETR
PICTURE = str(SAMPLES / "shapes_demo.png")
# the sample transformer's layers as inspect lists them
SAMPLE_LAYERS = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn",
                 "decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn",
                 "decoder.layers.1.self_attn", "decoder.layers.1.multihead_attn"]
runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


# --- the grammar -----------------------------------------------------------------------------

NAMES = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "encoder.layers.2.self_attn",
         "decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn"]


@pytest.mark.parametrize(("text", "expected"), [
    ("all", [0, 1, 2, 3, 4]),
    (" ALL ", [0, 1, 2, 3, 4]),
    ("0", [0]),
    ("-1", [4]),
    ("1-3", [1, 2, 3]),
    ("-2--1", [3, 4]),
    ("1--1", [1, 2, 3, 4]),
    ("3,0,3,1-2", [3, 0, 1, 2]),  # the order given, each layer once
    (" 1 , 0 ", [1, 0]),
    ("decoder.layers.0.multihead_attn", [4]),
    ("encoder.*", [0, 1, 2]),
    ("*.layers.0.*", [0, 3, 4]),
    ("encoder.layers.[02].self_attn", [0, 2]),
    ("?ecoder.layers.0.self_attn", [3]),
    ("decoder.*,0", [3, 4, 0]),
])
def test_every_kind_of_term_selects(text: str, expected: list[int]) -> None:
    assert select(text, NAMES) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("2-1", r"range '2-1' is reversed: write '1-2'"),
    ("-1--3", r"range '-1--3' is reversed: write '-3--1'"),
    ("4--3", r"range '4--3' is reversed \(layer 4 to 2\): write '-3-4'"),
    ("5", r"layer 5 is out of range: there are 5 layers \(0-4, or -5 to -1\)"),
    ("-6", r"layer -6 is out of range: there are 5 layers"),
    ("1-7", r"layer 7 in '1-7' is out of range: there are 5 layers"),
    ("nothing*", r"'nothing\*' matches no layer \(layers: 0 encoder\.layers\.0\.self_attn, "
                 r"1 encoder.*, 4 decoder\.layers\.0\.multihead_attn\)"),
    ("encoder.layers.1.self_atn", r"no layer is named 'encoder\.layers\.1\.self_atn' \(did "
                                  r"you mean 'encoder\.layers\.1\.self_attn'"),
    ("", r"empty selection: layers are chosen by an index, a range like 0-3, a name"),
    ("0,,1", r"'0,,1' has an empty term between commas"),
    ("0,all", r"'all' stands alone, not in a list"),
    ("mean", r"'mean' is not a choice here"),
    ("3-", r"'3-' is not an index or a range like 0-3"),
])
def test_bad_selectors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        select(text, NAMES)
    error = caught.value
    assert error.param == "layer" and error.exit_code == 2
    assert not re.search(r"--[a-z]", error.message)  # no flag in library text: the CLI adds it
    assert error.describe("--layer").startswith("--layer: ")


def test_heads_are_indices_only() -> None:
    assert select_heads("mean", 4) is None
    assert select_heads("all", 3) == [0, 1, 2]
    assert select_heads("-1,0-1", 4) == [3, 0, 1]
    with pytest.raises(UsageError, match=r"'q' is not an index or a range like 0-3 \(heads "
                                         r"are chosen by an index"):
        select_heads("q", 4)
    with pytest.raises(UsageError, match=r"head 4 is out of range: there are 4 heads "
                                         r"\(0-3, or -4 to -1\)") as caught:
        select_heads("4", 4)
    assert caught.value.param == "head"


def test_a_long_list_of_layers_is_cut_in_the_middle() -> None:
    names = [f"blocks.{i}.attn" for i in range(40)]
    with pytest.raises(UsageError, match=r"\(layers: 0 blocks\.0\.attn, 1 blocks\.1\.attn, 2 "
                                         r".*4 blocks\.4\.attn, … \(40 in all\), 37 blocks\.37"
                                         r"\.attn, 38 .*, 39 blocks\.39\.attn\)$") as caught:
        select("head*", names)
    assert "blocks.20.attn" not in str(caught.value)


def test_nothing_to_select() -> None:
    with pytest.raises(UsageError, match="layer 0 is out of range: there are no layers"):
        select("0", [])
    with pytest.raises(UsageError, match="nothing to select: there are no layers"):
        select("all", [])


def test_a_figure_of_some_layers_keeps_the_indices_of_all() -> None:
    eligible = {"decoder.layers.0.multihead_attn"}
    assert select_among(None, NAMES, eligible, what="cross-attention layers") == [4]
    assert select_among("4", NAMES, eligible, what="cross-attention layers") == [4]
    assert select_among("*layers.0*", NAMES, eligible, what="cross-attention layers") == [4]
    with pytest.raises(UsageError, match=r"layer 3 \(decoder\.layers\.0\.self_attn\) is not one "
                                         r"of the cross-attention layers \(cross-attention "
                                         r"layers: 4 decoder\.layers\.0\.multihead_attn\)"):
        select_among("3", NAMES, eligible, what="cross-attention layers")


# hypothesis: names that are neither keywords, numbers nor globs
name_text = st.from_regex(r"[a-z_]{1,6}(\.[a-z0-9_]{1,4}){0,3}", fullmatch=True).filter(
    lambda n: n not in {"all", "mean"})


@given(st.lists(st.integers(0, 29), min_size=1, unique=True))
def test_compact_text_selects_the_same_indices(indices: list[int]) -> None:
    names = [f"layers.{i}" for i in range(30)]
    assert select(compact(indices), names) == indices


@given(st.lists(name_text, min_size=1, max_size=12, unique=True), st.data())
def test_any_spelling_of_a_list_round_trips(names: list[str], data: st.DataObject) -> None:
    count = len(names)
    picks = data.draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=8))
    terms = []
    for index in picks:
        spelling = data.draw(st.sampled_from(["index", "negative", "name", "range"]))
        terms.append({"index": str(index), "negative": str(index - count),
                      "name": names[index], "range": f"{index}-{index}"}[spelling])
    expected = list(dict.fromkeys(picks))  # the first time each was picked, in order
    assert select(",".join(terms), names) == expected


@given(st.text(max_size=30))
def test_any_text_selects_or_is_a_usage_error(text: str) -> None:
    try:
        chosen = select(text, NAMES, allow_mean=True)
    except UsageError as error:
        assert error.param == "layer"
        return
    assert chosen is None or (chosen and all(0 <= i < len(NAMES) for i in chosen))


@given(st.permutations(list(range(14))))
def test_natural_order_restores_numbers_only_for_text_sorted_names(order: list[int]) -> None:
    given_order = [f"blocks.{i}.attn" for i in order]
    listed = [given_order[i] for i in natural_order(given_order)]
    if given_order == sorted(given_order):  # sorted as text: numbers compare as numbers
        assert listed == [f"blocks.{i}.attn" for i in range(14)]
    else:  # the file's own order is the model's
        assert listed == given_order


def test_captured_names_follow_the_checkpoint_order() -> None:
    captured = ["encoder.0", "encoder.1", "decoder.0", "encoder.0#2", "extra"]
    names, aliases = order_like(captured, ["decoder.0", "encoder.0", "encoder.1"])
    assert names == ["decoder.0", "encoder.0", "encoder.0#2", "encoder.1", "extra"]
    assert aliases == ["decoder.0", "encoder.0", "encoder.0", "encoder.1", None]
    # a model loaded without the checkpoint's 'vit.' prefix
    names, aliases = order_like(["encoder.layer.1.a", "encoder.layer.0.a"],
                                ["vit.encoder.layer.0.a", "vit.encoder.layer.1.a"])
    assert names == ["encoder.layer.0.a", "encoder.layer.1.a"]
    assert select("vit.encoder.layer.1.a", names, aliases=aliases) == [1]


# --- one index, one layer: against torch's and transformers' own module order ------------------

def _transformer(encoder_layers: int) -> nn.Transformer:
    torch.manual_seed(0)
    return nn.Transformer(d_model=16, nhead=2, num_encoder_layers=encoder_layers,
                          num_decoder_layers=2, dim_feedforward=16)


def _attention_modules(model: nn.Module, kind: type | tuple[type, ...]) -> list[str]:
    """Attention modules in the order torch registers (and, for these models, runs) them."""
    return [name for name, module in model.named_modules() if isinstance(module, kind)]


def _rows(path: Path, request: SequenceRequest, selectors: list[str],
          heads: list[str] | None = None) -> list[list[str | None]]:
    """The layers heatmap draws for each selector, from one capture."""
    ckpt = load_checkpoint(path)
    report = analyse(ckpt, heads or ())
    maps, _, _ = capture_sequence(path, ckpt, report, request)
    reference = [item.layer.name for item in report.layers]
    return [select_panels(maps, HeatmapOptions(layer=text, head="0"), reference).layers
            for text in selectors]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_inspect_and_heatmap_count_layers_in_module_order(tmp_path: Path, suffix: str) -> None:
    model = _transformer(11)  # layers.10 sorts before layers.2 as text, decoder before encoder
    expected = _attention_modules(model, nn.MultiheadAttention)
    path = tmp_path / f"t{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))  # safetensors stores its keys sorted as text
    else:
        torch.save(state, path)
    report = inspect_checkpoint(path, heads=["2"])
    assert [item.layer.display_name for item in report.layers] == expected
    assert [item.index for item in report.layers] == list(range(len(expected)))
    request = SequenceRequest(seq_len=4, tgt_seq_len=3)
    assert _rows(path, request, ["all", "10", "-1", "2,10"], ["2"]) == [
        expected, [expected[10]], [expected[-1]], [expected[2], expected[10]]]
    result = sequence_heatmap(path, tmp_path / "h.png", request, heads=["2"],
                              options=HeatmapOptions(layer="10", head="0"))
    assert result.layers == [expected[10]]  # the command passes the checkpoint's order


def test_hf_layers_are_counted_in_the_models_own_order(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.bart.modeling_bart import BartAttention
    from transformers.models.bert.modeling_bert import BertSelfAttention

    torch.manual_seed(0)
    models = {
        "bert": (transformers.BertModel(transformers.BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=11, num_attention_heads=2,
            intermediate_size=16)), BertSelfAttention),
        "bart": (transformers.BartModel(transformers.BartConfig(
            vocab_size=40, d_model=16, encoder_layers=11, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
            decoder_ffn_dim=16, max_position_embeddings=32)), BartAttention),
    }
    for family, (model, kind) in models.items():
        directory = tmp_path / family
        model.save_pretrained(directory)
        expected = _attention_modules(model, kind)
        report = inspect_checkpoint(directory)
        assert [item.layer.display_name for item in report.layers] == expected, family
        rows = _rows(directory, SequenceRequest(tokens="5,6,7"), ["all", "10"])
        assert rows == [expected, [expected[10]]], family


# --- every command, through the CLI --------------------------------------------------------------

@pytest.mark.parametrize(("selector", "expected"), [
    ("3", [3]),
    ("1-2", [1, 2]),
    ("4,0", [0, 4]),  # the table lists layers by index
    ("decoder.layers.1.self_attn", [4]),
    ("*multihead_attn", [3, 5]),
])
def test_inspect_layer(selector: str, expected: list[int]) -> None:
    code, out, err = cli("inspect", TRANSFORMER, "--heads", "4", "--json", "--layer", selector)
    assert code == 0, err
    doc = json.loads(out)
    assert [(a["index"], a["name"]) for a in doc["attention"]] == [
        (i, SAMPLE_LAYERS[i]) for i in expected]
    tensors = {t["name"] for t in doc["tensors"]}
    assert tensors == {f"{SAMPLE_LAYERS[i]}.{part}" for i in expected
                       for part in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                    "out_proj.bias")}
    code, out, err = cli("inspect", TRANSFORMER, "--heads", "4", "--layer", selector)
    assert code == 0, err
    assert f"6 attention layers ({len(expected)} shown)" in out
    for index in expected:
        assert re.search(rf"│ {index} │ {re.escape(SAMPLE_LAYERS[index])} ", out), out


def test_inspect_old_filter_spelling_and_tensor_globs() -> None:
    code, out, err = cli("inspect", TRANSFORMER, "--heads", "4", "--json", "--filter",
                         "encoder.*")
    assert code == 0, err
    assert [a["index"] for a in json.loads(out)["attention"]] == [0, 1]
    code, out, err = cli("inspect", TRANSFORMER, "--heads", "4", "--json", "--layer", "*.bias")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["attention"] == []  # no layer is named like that, but tensors are
    assert doc["tensors"] and all(t["name"].endswith(".bias") for t in doc["tensors"])
    code, out, err = cli("inspect", TRANSFORMER, "--heads", "4", "--all", "--layer", "3")
    assert code == 0, err
    assert "in_proj_weight  [192, 64] float32" in out and "linear1" not in out
    code, _, err = cli("inspect", TRANSFORMER, "--layer", "0", "--filter", "1")
    assert code == 2 and "--layer and --filter (its old spelling) both given" in err


@pytest.mark.parametrize(("command", "flag"), [
    (["inspect", TRANSFORMER, "--heads", "4"], "--layer"),
    (["inspect", TRANSFORMER, "--heads", "4"], "--filter"),
    (["split-qkv", TRANSFORMER, "--heads", "4", "-o", "{tmp}/s.safetensors"], "--layer"),
    (["split-qkv", TRANSFORMER, "--heads", "4", "-o", "{tmp}/s.safetensors"], "--layers"),
    (["heatmap", TRANSFORMER, "--heads", "4", "--seq-len", "4", "-o", "{tmp}/h.png"],
     "--layer"),
    (["heatmap", VIT, "--image", PICTURE, "-o", "{tmp}/v.png"], "--layer"),
    (["report", VIT, "--image", PICTURE, "-o", "{tmp}/r.html"], "--layer"),
])
def test_bad_selectors_exit_2_in_every_command(tmp_path: Path, command: list[str],
                                               flag: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    code, _, err = cli(*args, flag, "nothing*")
    assert code == 2
    listed = "0 blocks.0.attn" if VIT in args else "0 encoder.layers.0.self_attn"
    # errors name the documented spelling, whichever was typed
    assert re.search(rf"--layer: 'nothing\*' matches no layer.*\(layers: {listed}, 1 ", err), \
        err
    code, _, err = cli(*args, flag, "2-1")
    assert code == 2 and "--layer: range '2-1' is reversed: write '1-2'" in err, err
    code, _, err = cli(*args, flag, "17")
    assert code == 2 and re.search(r"--layer: layer 17 is out of range: there are [46] layers",
                                   err), err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(("selector", "expected"), [
    ("3", [3]),
    ("0-1", [0, 1]),
    ("5,2", [2, 5]),  # written in checkpoint order
    ("decoder.layers.0.self_attn", [2]),
    ("decoder.*", [2, 3, 4, 5]),
])
def test_split_qkv_layer(tmp_path: Path, selector: str, expected: list[int]) -> None:
    out = tmp_path / "s.safetensors"
    code, _, err = cli("split-qkv", TRANSFORMER, "--heads", "4", "-o", str(out), "--layer",
                       selector)
    assert code == 0, err
    layers = {k.split(".heads.")[0] for k in load_file(str(out)) if ".heads." in k}
    assert layers == {SAMPLE_LAYERS[i] for i in expected}


@pytest.mark.parametrize(("selector", "rows"), [
    ("3", 1), ("0-1", 2), ("4,0,4", 2), ("decoder.layers.1.multihead_attn", 1),
    ("encoder.*", 2), ("mean", 1),
])
def test_heatmap_layer(tmp_path: Path, selector: str, rows: int) -> None:
    out = tmp_path / "h.png"
    code, stdout, err = cli("heatmap", TRANSFORMER, "--heads", "4", "--seq-len", "5",
                            "-o", str(out), "--layer", selector, "--show-heads", "0-1")
    assert code == 0, err
    assert f"{rows} layer row(s) x 2 head column(s)" in stdout


def test_heatmap_rows_are_the_selected_layers(tmp_path: Path) -> None:
    request = SequenceRequest(seq_len=5)
    for text, picked in [("4,0", [4, 0]), ("*.0.*", [0, 2, 3]), ("-2--1", [4, 5])]:
        result = sequence_heatmap(TRANSFORMER, tmp_path / "h.png", request, heads=["4"],
                                  force=True, options=HeatmapOptions(layer=text, head="0"))
        assert result.layers == [SAMPLE_LAYERS[i] for i in picked], text
    with pytest.raises(UsageError, match=r"'x' is not an index") as caught:
        sequence_heatmap(TRANSFORMER, tmp_path / "h.png", request, heads=["4"], force=True,
                         options=HeatmapOptions(head="x"))
    assert caught.value.param == "head"


@pytest.mark.parametrize(("selector", "rows"), [
    ("2", 1), ("1-3", 3), ("3,0", 2), ("blocks.1.attn", 1), ("blocks.[23].attn", 2),
])
def test_image_heatmap_layer(tmp_path: Path, selector: str, rows: int) -> None:
    code, stdout, err = cli("heatmap", VIT, "--image", PICTURE, "-o", str(tmp_path / "v.png"),
                            "--layer", selector, "--show-heads", "mean")
    assert code == 0, err
    assert f"({rows} row(s) x 1 panel(s))" in stdout


def test_detr_figures_take_the_checkpoint_index_of_their_layer(tmp_path: Path) -> None:
    base = ["heatmap", DETR, "--image", PICTURE, "--size", "128", "-o",
            str(tmp_path / "d.png"), "--force"]
    report = inspect_checkpoint(DETR)
    names = [item.layer.display_name for item in report.layers]
    cross = names.index("transformer.decoder.layers.0.multihead_attn")
    code, _, err = cli(*base, "--layer", str(cross))
    assert code == 0, err
    code, _, err = cli(*base, "--layer", "transformer.decoder.layers.0.self_attn")
    assert code == 2
    assert (f"is not one of the decoder cross-attention layers (decoder cross-attention "
            f"layers: {cross} transformer.decoder.layers.0.multihead_attn") in err, err
    code, _, err = cli(*base, "--layer", "*multihead_attn")
    assert code == 2 and "show one decoder cross-attention layer: select one" in err, err
    code, _, err = cli(*base, "--point", "40,60", "--layer", "transformer.encoder.layers.1.*")
    assert code == 0, err


def test_report_image_layers(tmp_path: Path) -> None:
    code, stdout, err = cli("report", VIT, "--image", PICTURE, "-o", str(tmp_path / "r.html"),
                            "--layer", "blocks.[12].attn")
    assert code == 0, err
    assert re.search(r"\b\d+ overlays", stdout), stdout


def test_library_selection_of_an_inspect_report() -> None:
    report = inspect_checkpoint(TRANSFORMER, heads=["4"])
    chosen = select_layers(report, "1,decoder.layers.1.*")
    assert chosen.selected == frozenset({1, 4, 5})
    assert [item.index for item in chosen.layers if chosen.shows_layer(item.index)] == [1, 4, 5]
    with pytest.raises(UsageError, match=r"transformer_d64_h4\.pth: layer: no layer or tensor "
                                         r"is named 'nope'"):
        select_layers(report, "nope")
    assert parse("mean", allow_mean=True).mean
