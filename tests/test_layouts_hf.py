"""Layouts that only the architecture can tell apart, proven against transformers' own modules.

Each case is a tiny random model built and saved by ``transformers``; the reference is what its
attention module computes (q, k, v read at its score product by ``attnviz.verify_hf``), never a
split compared with itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.errors import AmbiguousLayoutError, UsageError
from attnviz.inspection import analyse, inspect_checkpoint
from attnviz.split import source_keys, split_all
from attnviz.verify import verify_split
from attnviz.verify_hf import HfCheck, verify_model

transformers = pytest.importorskip("transformers")
runner = CliRunner()
SMALL = {"vocab_size": 100}

# case -> (model_type, config, layouts every attention layer must get)
HF_CASES: dict[str, tuple[str, dict[str, Any], set[str]]] = {
    "codegen": ("codegen", {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4},
                {"codegen_mp"}),
    "gpt_bigcode_mha": ("gpt_bigcode", {"n_embd": 32, "n_layer": 2, "n_head": 4,
                                        "multi_query": False}, {"gpt_bigcode_mha"}),
    "gpt_bigcode_mqa": ("gpt_bigcode", {"n_embd": 32, "n_layer": 2, "n_head": 4,
                                        "multi_query": True}, {"gpt_bigcode_mqa"}),
    "gpt2_cross": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4,
                            "add_cross_attention": True}, {"gpt2_conv1d", "gpt2_cross"}),
    "distilbert": ("distilbert", {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64},
                   {"distilbert_lin"}),
    "deberta_v2": ("deberta-v2", {"hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "intermediate_size": 64},
                   {"hf_query_proj"}),
    "falcon_multi_query": ("falcon", {"hidden_size": 32, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "multi_query": True,
                                      "new_decoder_architecture": False}, {"falcon_grouped"}),
    "falcon_mha": ("falcon", {"hidden_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "multi_query": False,
                              "new_decoder_architecture": False}, {"neox_interleaved"}),
    "falcon_new_gqa": ("falcon", {"hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_kv_heads": 2,
                                  "new_decoder_architecture": True}, {"falcon_grouped"}),
    "bloom": ("bloom", {"hidden_size": 32, "n_layer": 2, "n_head": 4}, {"neox_interleaved"}),
    "convbert": ("convbert", {"hidden_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "intermediate_size": 64,
                              "embedding_size": 32}, {"convbert_mixed"}),
    "llama_gqa": ("llama", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2},
                  {"hf_q_proj"}),
}
PROVEN_LAYOUTS = set().union(*(layouts for _, _, layouts in HF_CASES.values()))


def build_model(model_type: str, config: dict[str, Any], seed: int = 0) -> Any:
    """A tiny eager model with every parameter random (biases non-zero, attention peaked)."""
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **{**SMALL, **config})
    model = transformers.AutoModel.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return model


def save_model(model: Any, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def assert_exact(checks: list[HfCheck]) -> None:
    assert checks
    for check in checks:
        assert check.problem is None, check
        assert check.max_abs_error < 1e-5, check
        assert check.control > 1e-2 or check.control == float("inf"), check
        assert check.ok(), check


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_split_equals_what_the_hf_module_computes(case: str, tmp_path: Path) -> None:
    model_type, config, layouts = HF_CASES[case]
    model = build_model(model_type, config)
    report = inspect_checkpoint(save_model(model, tmp_path / case))
    assert {item.layer.layout for item in report.layers} == layouts
    assert all("architecture" in item.layer.decided_by or "key names" in item.layer.decided_by
               for item in report.layers)
    assert report.context.architecture == model_type
    splits = split_all(report)
    assert_exact(verify_model(model, splits))
    for hw in splits.values():  # and the layout's own reference agrees
        values = {k: report.checkpoint.read_tensor(k) for k in source_keys(hw.layer)}
        assert verify_split(hw, values).ok(1e-9)


def test_a_wrong_packing_passes_the_self_check_but_not_transformers(tmp_path: Path) -> None:
    """Why --verify needs the HF module: nanoGPT's blocked reading of GPT-BigCode's interleaved
    c_attn is self-consistent, so only the model's own code can refute it."""
    model = build_model("gpt_bigcode", {"n_embd": 32, "n_layer": 1, "n_head": 4,
                                        "multi_query": False})
    path = save_model(model, tmp_path / "bigcode")
    wrong = analyse(load_checkpoint(path), layout="nanogpt_c_attn")
    assert wrong.layers[0].layer.layout == "nanogpt_c_attn"
    assert wrong.layers[0].layer.decided_by == "--layout"
    hw = split_all(wrong)["h.0.attn"]
    values = {k: wrong.checkpoint.read_tensor(k) for k in source_keys(hw.layer)}
    assert verify_split(hw, values).ok(1e-9)  # the split agrees with itself...
    (check,) = verify_model(model, {"h.0.attn": hw})
    assert not check.ok() and check.max_abs_error > 0.1  # ...but not with GPT-BigCode


SaveBare = Callable[[str, dict[str, Any]], Path]


@pytest.fixture
def bare(tmp_path: Path) -> SaveBare:
    """The model's state_dict alone, as a .pth with no config.json beside it."""
    def write(model_type: str, config: dict[str, Any]) -> Path:
        model = build_model(model_type, config)
        path = tmp_path / model_type / "weights.pth"
        path.parent.mkdir(parents=True)
        torch.save(model.state_dict(), path)
        return path
    return write


@pytest.mark.parametrize(("model_type", "config", "candidates"), [
    ("codegen", HF_CASES["codegen"][1], ("codegen_mp", "fused_qkv_proj")),
    ("gpt_bigcode", HF_CASES["gpt_bigcode_mha"][1], ("gpt_bigcode_mha", "nanogpt_c_attn")),
])
def test_ambiguous_keys_without_a_config_ask_for_layout(
        bare: SaveBare, model_type: str, config: dict[str, Any],
        candidates: tuple[str, str]) -> None:
    path = bare(model_type, config)
    with pytest.raises(AmbiguousLayoutError, match="pass layout with") as caught:
        inspect_checkpoint(path)
    assert all(name in str(caught.value) for name in candidates)
    assert str(path) in str(caught.value)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    assert "--layout" in result.output and "Traceback" not in result.output
    chosen = inspect_checkpoint(path, layout=candidates[0], heads=["4"])
    assert {item.layer.layout for item in chosen.layers} == {candidates[0]}


def test_layout_flag_errors_name_what_is_known(bare: SaveBare) -> None:
    path = bare("codegen", HF_CASES["codegen"][1])
    with pytest.raises(UsageError, match="not a known layout"):
        inspect_checkpoint(path, layout="codegen")
    with pytest.raises(UsageError, match="fits no tensor"):
        inspect_checkpoint(path, layout="torch_mha")


def test_config_model_type_decides_for_a_bare_file(bare: SaveBare, tmp_path: Path) -> None:
    path = bare("codegen", HF_CASES["codegen"][1])
    config = tmp_path / "codegen.json"
    config.write_text(json.dumps({"model_type": "codegen", "n_head": 4}))
    report = inspect_checkpoint(path, config=config)
    assert {item.layer.layout for item in report.layers} == {"codegen_mp"}
    assert report.layers[0].layer.decided_by == "architecture 'codegen' (config.json " \
        "model_type 'codegen')"


def test_falcon_multi_query_config_means_one_kv_head(tmp_path: Path) -> None:
    model_type, config, _ = HF_CASES["falcon_multi_query"]
    path = save_model(build_model(model_type, config), tmp_path / "falcon")
    written = json.loads((path / "config.json").read_text())
    assert written.get("num_kv_heads") == 4  # transformers writes H there and ignores it
    item = inspect_checkpoint(path).layers[0]
    assert (item.heads.num_heads, item.heads.num_kv_heads, item.heads.head_dim) == (4, 1, 8)
    assert "multi_query=True" in item.heads.kv_source
    assert "num_kv_heads ignored" in item.heads.kv_source


def test_gpt2_cross_attention_layers_are_split_not_left_out(tmp_path: Path) -> None:
    model_type, config, _ = HF_CASES["gpt2_cross"]
    path = save_model(build_model(model_type, config), tmp_path / "gpt2")
    out = tmp_path / "split.safetensors"
    result = runner.invoke(app, ["split-qkv", str(path), "-o", str(out), "--verify"])
    assert result.exit_code == 0, result.output
    report = inspect_checkpoint(path)
    names = [item.layer.name for item in report.layers]
    assert names == ["h.0.attn", "h.0.crossattention", "h.1.attn", "h.1.crossattention"]
    assert not report.unrecognised
    written = load_checkpoint(out).tensors
    assert "h.0.crossattention.heads.3.k.weight" in written


def test_distilbert_is_recognised(tmp_path: Path) -> None:
    model_type, config, _ = HF_CASES["distilbert"]
    path = save_model(build_model(model_type, config), tmp_path / "distilbert")
    report = inspect_checkpoint(path)
    assert [item.layer.name for item in report.layers] == [
        "transformer.layer.0.attention", "transformer.layer.1.attention"]
    assert all(item.heads.source == "config.json: n_heads" for item in report.layers)


def test_convbert_attention_heads_are_half_the_configured_count(tmp_path: Path) -> None:
    """head_ratio gives the other half of the heads to span convolution: 4 configured heads are
    2 attention heads of d = 8, also when a hand-written config leaves out the default 2."""
    model_type, config, _ = HF_CASES["convbert"]
    path = save_model(build_model(model_type, config), tmp_path / "convbert")
    item = inspect_checkpoint(path).layers[0]
    assert (item.heads.num_heads, item.heads.head_dim) == (2, 8)
    assert item.heads.source == "config.json: num_attention_heads (4) // head_ratio (2)"
    written = json.loads((path / "config.json").read_text())
    del written["head_ratio"]
    (path / "config.json").write_text(json.dumps(written))
    item = inspect_checkpoint(path).layers[0]
    assert (item.heads.num_heads, item.heads.head_dim) == (2, 8)
