"""One test per registered layout, with state_dicts laid out the way each library writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from attnviz.errors import HeadsError
from attnviz.inspection import InspectReport, LayerReport, inspect_checkpoint
from attnviz.layouts import LAYOUTS, Packing

from .conftest import SaveFn


def linear(sd: dict[str, torch.Tensor], name: str, n_out: int, n_in: int,
           bias: bool = True) -> None:
    sd[f"{name}.weight"] = torch.randn(n_out, n_in)
    if bias:
        sd[f"{name}.bias"] = torch.randn(n_out)


def by_name(report: InspectReport) -> dict[str, LayerReport]:
    return {item.layer.name: item for item in report.layers}


def geometry(item: LayerReport) -> tuple[Any, ...]:
    layer, heads = item.layer, item.heads
    return (layer.layout, layer.embed_dim, layer.kdim, layer.vdim, heads.num_heads,
            heads.num_kv_heads, heads.head_dim)


SEEN_LAYOUTS: set[str] = set()
# test_every_registered_layout_is_tested reads what the tests before it saw: under pytest-xdist
# (make test: --dist loadgroup) the whole module runs on one worker, in file order
pytestmark = pytest.mark.xdist_group("test_layouts")


def check(report: InspectReport, expected: dict[str, tuple[Any, ...]]) -> None:
    layers = by_name(report)
    assert set(layers) == set(expected)
    for name, want in expected.items():
        assert geometry(layers[name]) == want, name
        SEEN_LAYOUTS.add(layers[name].layer.layout)


def test_torch_mha_from_real_encoder(save: SaveFn) -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64), 2,
                                    enable_nested_tensor=False)
    report = inspect_checkpoint(save(encoder.state_dict(), "enc.pth"), heads=["4"])
    check(report, {f"layers.{i}.self_attn": ("torch_mha", 32, 32, 32, 4, 4, 8) for i in (0, 1)})
    layer = by_name(report)["layers.0.self_attn"]
    assert layer.heads.source == "--heads"
    assert layer.layer.keys["qkv"] == "layers.0.self_attn.in_proj_weight"
    assert layer.layer.keys["qkv_bias"] == "layers.0.self_attn.in_proj_bias"
    assert layer.layer.keys["out"] == "layers.0.self_attn.out_proj.weight"
    assert layer.layer.packing is Packing.BLOCKED


def test_default_nn_transformer_has_18_attention_modules(save: SaveFn) -> None:
    model = nn.Transformer()  # d_model 512, 8 heads, 6 + 6 layers
    path = save(model.state_dict(), "transformer.pth")
    report = inspect_checkpoint(path, heads=["8"])
    assert len(report.layers) == 18
    names = [item.layer.name for item in report.layers]
    assert sum(".self_attn" in n and n.startswith("encoder") for n in names) == 6
    assert sum(".self_attn" in n and n.startswith("decoder") for n in names) == 6
    assert sum(n.endswith("multihead_attn") for n in names) == 6
    for item in report.layers:
        qkv = report.checkpoint.tensors[item.layer.keys["qkv"]]
        assert qkv.shape == (1536, 512)
        assert geometry(item) == ("torch_mha", 512, 512, 512, 8, 8, 64)
    # the split is logical: the head count is not recoverable from the tensors alone
    unknown = inspect_checkpoint(path)
    assert {item.heads.num_heads for item in unknown.layers} == {None}
    assert unknown.checkpoint.num_parameters == report.checkpoint.num_parameters


def test_torch_mha_kvdim_with_bias_kv(save: SaveFn) -> None:
    holder = nn.Module()
    holder.cross = nn.MultiheadAttention(32, 4, kdim=16, vdim=24, add_bias_kv=True)
    report = inspect_checkpoint(save(holder.state_dict(), "mha.pth"), heads=["4"])
    check(report, {"cross": ("torch_mha_kvdim", 32, 16, 24, 4, 4, 8)})
    keys = by_name(report)["cross"].layer.keys
    assert keys["k"] == "cross.k_proj_weight" and keys["v"] == "cross.v_proj_weight"
    assert keys["qkv_bias"] == "cross.in_proj_bias"
    assert keys["bias_k"] == "cross.bias_k" and keys["bias_v"] == "cross.bias_v"


def test_torch_mha_without_bias(save: SaveFn) -> None:
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(16, 2, bias=False)
    report = inspect_checkpoint(save(holder.state_dict(), "m.pth"), heads=["2"])
    assert by_name(report)["attn"].layer.has_bias is False


def timm_vit(depth: int = 2, dim: int = 32) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {"cls_token": torch.zeros(1, 1, dim)}
    linear(sd, "patch_embed.proj", dim, 48)
    for i in range(depth):
        block = f"blocks.{i}"
        linear(sd, f"{block}.norm1", dim, 1)
        linear(sd, f"{block}.attn.qkv", 3 * dim, dim)
        linear(sd, f"{block}.attn.proj", dim, dim)
        linear(sd, f"{block}.mlp.fc1", 4 * dim, dim)
        linear(sd, f"{block}.mlp.fc2", dim, 4 * dim)
    return sd


def test_timm_qkv(save: SaveFn) -> None:
    report = inspect_checkpoint(save(timm_vit()), heads=["4"])
    check(report, {f"blocks.{i}.attn": ("timm_qkv", 32, 32, 32, 4, 4, 8) for i in (0, 1)})


def test_beit_q_bias_v_bias_and_heads_from_bias_table(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    linear(sd, "blocks.0.attn.qkv", 96, 32, bias=False)
    sd["blocks.0.attn.q_bias"] = torch.zeros(32)
    sd["blocks.0.attn.v_bias"] = torch.zeros(32)
    sd["blocks.0.attn.relative_position_bias_table"] = torch.zeros(13 * 13 + 3, 4)
    sd["blocks.0.attn.relative_position_index"] = torch.zeros(50, 50, dtype=torch.int64)
    linear(sd, "blocks.0.attn.proj", 32, 32)
    report = inspect_checkpoint(save(sd))
    check(report, {"blocks.0.attn": ("timm_qkv", 32, 32, 32, 4, 4, 8)})
    item = by_name(report)["blocks.0.attn"]
    assert "relative_position_bias_table" in item.heads.source
    assert item.layer.keys["q_bias"] == "blocks.0.attn.q_bias"
    assert "k_bias" not in item.layer.keys and item.layer.has_bias


def test_heads_from_qk_norm_of_head_dim(save: SaveFn) -> None:
    sd = timm_vit(depth=1)
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    sd["blocks.0.attn.k_norm.weight"] = torch.ones(16)
    item = by_name(inspect_checkpoint(save(sd)))["blocks.0.attn"]
    assert (item.heads.num_heads, item.heads.head_dim) == (2, 16)
    assert "q_norm" in item.heads.source or "k_norm" in item.heads.source


def test_custom_qkv_proj_encoder_and_phi3_gqa(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    linear(sd, "layers.0.attn.qkv_proj", 96, 32)
    linear(sd, "layers.0.attn.out_proj", 32, 32)
    report = inspect_checkpoint(save(sd, config={"num_attention_heads": 4}))
    check(report, {"layers.0.attn": ("fused_qkv_proj", 32, 32, 32, 4, 4, 8)})
    assert by_name(report)["layers.0.attn"].heads.source == "config.json: num_attention_heads"

    phi: dict[str, torch.Tensor] = {}  # Phi-3: [Q (8*8) | K (2*8) | V (2*8)]
    linear(phi, "model.layers.0.self_attn.qkv_proj", 64 + 2 * 16, 64, bias=False)
    linear(phi, "model.layers.0.self_attn.o_proj", 64, 64, bias=False)
    linear(phi, "lm_head", 10, 64, bias=False)
    config = {"num_attention_heads": 8, "num_key_value_heads": 2}
    report = inspect_checkpoint(save(phi, config=config))
    check(report, {"model.layers.0.self_attn": ("fused_qkv_proj", 64, 64, 64, 8, 2, 8)})
    assert by_name(report)["model.layers.0.self_attn"].layer.kv_rows == 16


def test_mpt_wqkv(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    linear(sd, "transformer.blocks.0.attn.Wqkv", 96, 32, bias=False)
    linear(sd, "transformer.blocks.0.attn.out_proj", 32, 32, bias=False)
    report = inspect_checkpoint(save(sd, config={"n_heads": 4}))
    check(report, {"transformer.blocks.0.attn": ("mpt_wqkv", 32, 32, 32, 4, 4, 8)})


def test_nanogpt_linear_c_attn_with_compile_prefix(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    linear(sd, "_orig_mod.transformer.h.0.attn.c_attn", 96, 32)
    linear(sd, "_orig_mod.transformer.h.0.attn.c_proj", 32, 32)
    sd["_orig_mod.transformer.h.0.attn.bias"] = torch.tril(torch.ones(8, 8)).view(1, 1, 8, 8)
    path = save({"model": sd, "model_args": {"n_head": 4, "n_embd": 32}}, "ckpt.pt")
    report = inspect_checkpoint(path)
    assert report.checkpoint.stripped_prefix == "_orig_mod."
    check(report, {"transformer.h.0.attn": ("nanogpt_c_attn", 32, 32, 32, 4, 4, 8)})
    item = by_name(report)["transformer.h.0.attn"]
    assert item.heads.source == "checkpoint model_args: n_head"
    assert item.layer.transposed is False
    assert item.layer.keys["causal_mask_buffer"] == "transformer.h.0.attn.bias"


def test_gpt2_conv1d_is_transposed_and_mask_buffer_is_not_a_bias(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    for i in range(2):
        sd[f"h.{i}.attn.c_attn.weight"] = torch.randn(32, 96)  # Conv1D: (in, out)
        sd[f"h.{i}.attn.c_attn.bias"] = torch.randn(96)
        sd[f"h.{i}.attn.c_proj.weight"] = torch.randn(32, 32)
        sd[f"h.{i}.attn.c_proj.bias"] = torch.randn(32)
        mask = torch.tril(torch.ones(16, 16, dtype=torch.uint8))
        sd[f"h.{i}.attn.bias"] = mask.view(1, 1, 16, 16)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    report = inspect_checkpoint(save(sd, config={"n_head": 4}))
    check(report, {f"h.{i}.attn": ("gpt2_conv1d", 32, 32, 32, 4, 4, 8) for i in (0, 1)})
    layer = by_name(report)["h.0.attn"].layer
    assert layer.transposed is True and layer.fused_rows == 96
    assert layer.keys["qkv_bias"] == "h.0.attn.c_attn.bias"
    assert layer.keys["causal_mask_buffer"] == "h.0.attn.bias"
    assert report.unrecognised == []


def test_neox_and_bloom_interleaved(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    linear(sd, "gpt_neox.layers.0.attention.query_key_value", 96, 32)
    linear(sd, "gpt_neox.layers.0.attention.dense", 32, 32)
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)  # rotary_pct 0.25
    report = inspect_checkpoint(save(sd, config={"num_attention_heads": 4}))
    check(report, {"gpt_neox.layers.0.attention": ("neox_interleaved", 32, 32, 32, 4, 4, 8)})
    assert by_name(report)["gpt_neox.layers.0.attention"].layer.packing is Packing.INTERLEAVED

    bloom: dict[str, torch.Tensor] = {}
    linear(bloom, "h.0.self_attention.query_key_value", 96, 32)
    linear(bloom, "h.0.self_attention.dense", 32, 32)
    report = inspect_checkpoint(save(bloom, config={"n_head": 2}))
    check(report, {"h.0.self_attention": ("neox_interleaved", 32, 32, 32, 2, 2, 16)})


def test_falcon_grouped_and_falcon7b_multi_query(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}  # new architecture: H=8, Hkv=2, d=8 -> (8 + 4) * 8 rows
    linear(sd, "transformer.h.0.self_attention.query_key_value", 96, 64, bias=False)
    linear(sd, "transformer.h.0.self_attention.dense", 64, 64, bias=False)
    config = {"num_attention_heads": 8, "num_kv_heads": 2, "new_decoder_architecture": True}
    report = inspect_checkpoint(save(sd, config=config))
    check(report, {"transformer.h.0.self_attention": ("falcon_grouped", 64, 64, 64, 8, 2, 8)})
    assert by_name(report)["transformer.h.0.self_attention"].layer.packing is Packing.GROUPED

    mqa: dict[str, torch.Tensor] = {}  # Falcon-7B: [Q (64) | K (8) | V (8)]
    linear(mqa, "transformer.h.0.self_attention.query_key_value", 64 + 16, 64, bias=False)
    linear(mqa, "transformer.h.0.self_attention.dense", 64, 64, bias=False)
    report = inspect_checkpoint(save(mqa, config={"n_head": 8, "multi_query": True}))
    check(report, {"transformer.h.0.self_attention": ("falcon_grouped", 64, 64, 64, 8, 1, 8)})


def test_internlm2_wqkv(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    linear(sd, "model.layers.0.attention.wqkv", 96, 64, bias=False)
    linear(sd, "model.layers.0.attention.wo", 64, 64, bias=False)
    linear(sd, "output", 100, 64, bias=False)
    config = {"num_attention_heads": 8, "num_key_value_heads": 2}
    report = inspect_checkpoint(save(sd, config=config))
    check(report, {"model.layers.0.attention": ("internlm2_wqkv", 64, 64, 64, 8, 2, 8)})


def test_llama_gqa_separate_projections(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    for i in range(2):
        prefix = f"model.layers.{i}.self_attn"
        linear(sd, f"{prefix}.q_proj", 64, 64, bias=False)
        linear(sd, f"{prefix}.k_proj", 16, 64, bias=False)
        linear(sd, f"{prefix}.v_proj", 16, 64, bias=False)
        linear(sd, f"{prefix}.o_proj", 64, 64, bias=False)
    linear(sd, "lm_head", 100, 64, bias=False)
    config = {"num_attention_heads": 8, "num_key_value_heads": 2}
    report = inspect_checkpoint(save(sd, config=config))
    check(report, {f"model.layers.{i}.self_attn": ("hf_q_proj", 64, 64, 64, 8, 2, 8)
                   for i in (0, 1)})
    assert report.checkpoint.stripped_prefix is None  # lm_head lacks 'model.'
    assert by_name(report)["model.layers.0.self_attn"].layer.has_bias is False


def test_hf_detr_encoder_decoder_heads_are_scoped(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    for stack, attns in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "encoder_attn"))):
        for attn in attns:
            prefix = f"model.{stack}.layers.0.{attn}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(sd, f"{prefix}.{proj}", 32, 32)
    sd["class_labels_classifier.weight"] = torch.randn(92, 32)
    config = {"encoder_attention_heads": 4, "decoder_attention_heads": 8, "d_model": 32}
    report = inspect_checkpoint(save(sd, config=config))
    check(report, {
        "model.encoder.layers.0.self_attn": ("hf_q_proj", 32, 32, 32, 4, 4, 8),
        "model.decoder.layers.0.self_attn": ("hf_q_proj", 32, 32, 32, 8, 8, 4),
        "model.decoder.layers.0.encoder_attn": ("hf_q_proj", 32, 32, 32, 8, 8, 4),
    })
    assert by_name(report)["model.encoder.layers.0.self_attn"].heads.source == (
        "config.json: encoder_attention_heads")


def test_bert_query_key_value_with_output_dense_one_module_up(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    prefix = "bert.encoder.layer.0.attention"
    for proj in ("query", "key", "value"):
        linear(sd, f"{prefix}.self.{proj}", 32, 32)
    linear(sd, f"{prefix}.output.dense", 32, 32)
    linear(sd, f"{prefix}.output.LayerNorm", 32, 1)
    report = inspect_checkpoint(save(sd, config={"num_attention_heads": 4}))
    check(report, {f"{prefix}.self": ("hf_query_key_value", 32, 32, 32, 4, 4, 8)})
    keys = by_name(report)[f"{prefix}.self"].layer.keys
    assert keys["out"] == f"{prefix}.output.dense.weight"
    assert keys["out_bias"] == f"{prefix}.output.dense.bias"


def test_openai_whisper_key_without_bias_heads_from_dims(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    for stack, attns, dim in (("encoder", ("attn",), 32), ("decoder", ("attn", "cross_attn"), 16)):
        for attn in attns:
            prefix = f"{stack}.blocks.0.{attn}"
            linear(sd, f"{prefix}.query", dim, dim)
            linear(sd, f"{prefix}.key", dim, dim, bias=False)
            linear(sd, f"{prefix}.value", dim, dim)
            linear(sd, f"{prefix}.out", dim, dim)
    dims = {"n_audio_head": 4, "n_text_head": 2, "n_audio_state": 32, "n_text_state": 16}
    report = inspect_checkpoint(save({"dims": dims, "model_state_dict": sd}, "whisper.pt"))
    check(report, {
        "encoder.blocks.0.attn": ("hf_query_key_value", 32, 32, 32, 4, 4, 8),
        "decoder.blocks.0.attn": ("hf_query_key_value", 16, 16, 16, 2, 2, 8),
        "decoder.blocks.0.cross_attn": ("hf_query_key_value", 16, 16, 16, 2, 2, 8),
    })
    layer = by_name(report)["encoder.blocks.0.attn"]
    assert "k_bias" not in layer.layer.keys and layer.layer.keys["q_bias"]
    assert layer.heads.source == "checkpoint dims: n_audio_head"


def test_meta_llama_wq_kv_heads_from_row_ratio(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    linear(sd, "layers.0.attention.wq", 64, 64, bias=False)
    linear(sd, "layers.0.attention.wk", 16, 64, bias=False)
    linear(sd, "layers.0.attention.wv", 16, 64, bias=False)
    linear(sd, "layers.0.attention.wo", 64, 64, bias=False)
    report = inspect_checkpoint(save(sd, "consolidated.00.pth"), heads=["8"])
    check(report, {"layers.0.attention": ("meta_llama_wq", 64, 64, 64, 8, 2, 8)})


def test_t5_heads_from_relative_attention_bias_shared_by_the_stack(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    for block in range(2):
        prefix = f"encoder.block.{block}.layer.0.SelfAttention"
        for proj in ("q", "k", "v", "o"):
            linear(sd, f"{prefix}.{proj}", 32, 32, bias=False)
    sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.randn(32, 4)
    report = inspect_checkpoint(save(sd))
    check(report, {f"encoder.block.{b}.layer.0.SelfAttention": ("t5_qkvo", 32, 32, 32, 4, 4, 8)
                   for b in (0, 1)})
    assert "relative_attention_bias" in by_name(report)[
        "encoder.block.1.layer.0.SelfAttention"].heads.source


def test_unrecognised_attention_tensors_are_listed_not_dropped(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    linear(sd, "vit.layers.0.attn.to_qkv", 96, 32, bias=False)  # lucidrains naming
    linear(sd, "vit.layers.0.attn.to_out.0", 32, 32)
    linear(sd, "blocks.0.attn.qkv", 100, 32)  # no q|k|v split fits
    linear(sd, "blocks.0.attn.proj", 32, 32)
    report = inspect_checkpoint(save(sd))
    assert report.layers == []
    odd = {u.name: u.reason for u in report.unrecognised}
    assert set(odd) == {"vit.layers.0.attn.to_qkv.weight", "blocks.0.attn.qkv.weight",
                        "blocks.0.attn.qkv.bias"}
    assert "do not split" in odd["blocks.0.attn.qkv.weight"]
    assert "no attention layers recognised" in report.warnings


def test_transformer_lens_heads_come_from_the_shapes(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {"embed.W_E": torch.randn(10, 32)}
    for index in range(2):  # HookedTransformer: per-head (in, out), mask buffer beside them
        p = f"blocks.{index}.attn."
        sd.update({f"{p}W_{n}": torch.randn(4, 32, 8) for n in "QKV"})
        sd.update({f"{p}b_{n}": torch.randn(4, 8) for n in "QKV"})
        sd[f"{p}W_O"], sd[f"{p}b_O"] = torch.randn(4, 8, 32), torch.randn(32)
        sd[f"{p}mask"] = torch.tril(torch.ones(6, 6)).bool()
    path = save(sd)
    report = inspect_checkpoint(path)
    check(report, {f"blocks.{i}.attn": ("transformer_lens", 32, 32, 32, 4, 4, 8) for i in (0, 1)})
    layer = by_name(report)["blocks.0.attn"]
    assert layer.heads.source == "shape of blocks.0.attn.W_Q"
    assert layer.layer.keys["causal_mask_buffer"] == "blocks.0.attn.mask"
    with pytest.raises(HeadsError, match="contradicts"):
        inspect_checkpoint(path, heads=["2"])


def test_every_registered_layout_is_tested() -> None:
    names = {spec.name for spec in LAYOUTS}
    assert len(names) == len(LAYOUTS), "layout names must be unique"
    # layouts proven against transformers' modules (test_layouts_hf asserts each case's layouts)
    from .test_layouts_hf import PROVEN_LAYOUTS

    missing = names - SEEN_LAYOUTS - PROVEN_LAYOUTS
    assert not missing, f"layouts without a test: {sorted(missing)}"


def test_heads_not_dividing_embed_dim_is_an_error_naming_layer(save: SaveFn) -> None:
    path = save(timm_vit(depth=1))
    with pytest.raises(HeadsError, match=r"blocks\.0\.attn.*E=32.*H=5"):
        inspect_checkpoint(path, heads=["5"])


def test_kv_heads_not_dividing_heads_is_an_error(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}  # grouped rows 64 + 2 * 24: with H=8 (d=8), Hkv=3
    linear(sd, "transformer.h.0.self_attention.query_key_value", 64 + 48, 64, bias=False)
    linear(sd, "transformer.h.0.self_attention.dense", 64, 64, bias=False)
    path = save(sd)
    with pytest.raises(HeadsError, match=r"self_attention.*3 key/value heads do not divide H=8"):
        inspect_checkpoint(path, heads=["8"])
    with pytest.raises(HeadsError, match="E=64 is not divisible by H=6"):
        inspect_checkpoint(path, heads=["6"])


def test_config_kv_heads_contradicting_shapes_is_an_error(save: SaveFn) -> None:
    sd: dict[str, torch.Tensor] = {}
    linear(sd, "model.layers.0.self_attn.q_proj", 64, 64, bias=False)
    linear(sd, "model.layers.0.self_attn.k_proj", 16, 64, bias=False)
    linear(sd, "model.layers.0.self_attn.v_proj", 16, 64, bias=False)
    path = save(sd, config={"num_attention_heads": 8, "num_key_value_heads": 4})
    with pytest.raises(HeadsError, match=r"num_key_value_heads=4.*2 key/value heads"):
        inspect_checkpoint(path)


def test_per_layer_head_patterns_beat_the_global_count(save: SaveFn) -> None:
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                           dim_feedforward=16)
    path = save(model.state_dict(), "t.pth")
    report = inspect_checkpoint(path, heads=["8", "encoder.*=2"])
    got = {item.layer.name: (item.heads.num_heads, item.heads.source) for item in report.layers}
    assert got["encoder.layers.0.self_attn"] == (2, "--heads 'encoder.*'")
    assert got["decoder.layers.0.self_attn"] == (8, "--heads")
    assert got["decoder.layers.0.multihead_attn"] == (8, "--heads")


def test_cli_heads_beat_config(save: SaveFn, tmp_path: Path) -> None:
    path = save(timm_vit(depth=1), config={"num_attention_heads": 4})
    assert by_name(inspect_checkpoint(path))["blocks.0.attn"].heads.num_heads == 4
    report = inspect_checkpoint(path, heads=["2"])
    assert by_name(report)["blocks.0.attn"].heads.num_heads == 2
    other = tmp_path / "other.json"
    other.write_text('{"num_heads": 8}')
    report = inspect_checkpoint(path, config=other)
    assert by_name(report)["blocks.0.attn"].heads.source == "config.json: num_heads"
