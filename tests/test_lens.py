"""TransformerLens-layout files: rebuilt from the file alone, checked against transformers' GPT-2.

The oracle converts a random HF GPT-2 into TransformerLens's layout the way TransformerLens's
``convert_gpt2_weights`` does (c_attn split into q|k|v along dim 1, each rearranged
"m (i h) -> i m h"; c_proj "(i h) m -> i h m"; LN weights as w/b; W_U = lm_head.weight.T), so
the reference numbers come from the transformers module, not from attnviz.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from attnviz.capture import capture_attention
from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.inspection import analyse
from attnviz.models.lens import LensModel, Norm
from attnviz.models.sources import load_model
from attnviz.models.torch_transformer import ModelBuildError
from attnviz.split import merge_heads, split_layer

from .conftest import SaveFn

HEADS, WIDTH, LAYERS, VOCAB, POSITIONS = 4, 32, 2, 50, 16
runner = CliRunner()


def hf_gpt2() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=WIDTH,
                                     n_layer=LAYERS, n_head=HEADS, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # LayerNorms away from 1/0, so w/b or eps mistakes show
        for name, param in model.named_parameters():
            if ".ln_" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if name.endswith("weight")
                                                             else 0.0))
            elif name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.1)
    return model


def to_lens(model: transformers.GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """TransformerLens's convert_gpt2_weights, with reshapes in place of einops."""
    gpt, d_head = model.transformer, WIDTH // HEADS
    sd = {"embed.W_E": gpt.wte.weight, "pos_embed.W_pos": gpt.wpe.weight}
    for index, block in enumerate(gpt.h):
        p = f"blocks.{index}."
        sd[p + "ln1.w"], sd[p + "ln1.b"] = block.ln_1.weight, block.ln_1.bias
        for name, flat in zip("QKV", torch.split(block.attn.c_attn.weight, WIDTH, dim=1),
                              strict=True):  # each (m, i*h): "m (i h) -> i m h"
            sd[p + f"attn.W_{name}"] = flat.reshape(WIDTH, HEADS, d_head).permute(1, 0, 2)
        biases = block.attn.c_attn.bias.view(3, HEADS, d_head)  # (3, i, h)
        for index_qkv, name in enumerate("QKV"):
            sd[p + f"attn.b_{name}"] = biases[index_qkv]
        sd[p + "attn.W_O"] = block.attn.c_proj.weight.reshape(HEADS, d_head, WIDTH)  # (i, h, m)
        sd[p + "attn.b_O"] = block.attn.c_proj.bias
        sd[p + "ln2.w"], sd[p + "ln2.b"] = block.ln_2.weight, block.ln_2.bias
        sd[p + "mlp.W_in"], sd[p + "mlp.b_in"] = block.mlp.c_fc.weight, block.mlp.c_fc.bias
        sd[p + "mlp.W_out"], sd[p + "mlp.b_out"] = block.mlp.c_proj.weight, block.mlp.c_proj.bias
    sd["unembed.W_U"] = model.lm_head.weight.T
    sd["ln_final.w"], sd["ln_final.b"] = gpt.ln_f.weight, gpt.ln_f.bias
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def rebuilt(path: Path) -> LensModel:
    checkpoint = load_checkpoint(path)
    loaded = load_model(path, checkpoint, analyse(checkpoint))
    assert loaded.kind == "lens" and loaded.takes_tokens
    assert isinstance(loaded.model, LensModel)
    return loaded.model


@pytest.mark.parametrize("buffers", [False, True], ids=["converted", "with-mask-buffers"])
def test_maps_and_logits_equal_hf_gpt2(save: SaveFn, buffers: bool) -> None:
    model = hf_gpt2()
    sd = to_lens(model)
    if buffers:  # what HookedTransformer.state_dict() also holds
        for index in range(LAYERS):
            sd[f"blocks.{index}.attn.mask"] = torch.tril(torch.ones(POSITIONS, POSITIONS)).bool()
            sd[f"blocks.{index}.attn.IGNORE"] = torch.tensor(-torch.inf)
    lens = rebuilt(save(sd, "gpt2_lens.safetensors"))
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        reference = model(ids, output_attentions=True)
        with capture_attention(lens) as maps:
            logits = lens(ids)
    assert list(maps) == [f"blocks.{i}.attn" for i in range(LAYERS)]
    for index, name in enumerate(maps):
        torch.testing.assert_close(maps[name], reference.attentions[index])
    torch.testing.assert_close(logits, reference.logits, rtol=1e-4, atol=1e-5)


def test_split_qkv_gives_each_heads_weights_transposed(tmp_path: Path, save: SaveFn) -> None:
    sd = to_lens(hf_gpt2())
    path = save(sd, "gpt2_lens.safetensors")
    hw = split_layer(load_checkpoint(path), "blocks.1.attn")
    assert (hw.num_heads, hw.num_kv_heads, hw.head_dim) == (HEADS, HEADS, WIDTH // HEADS)
    for head in range(HEADS):  # Linear orientation (d, E): TransformerLens's x @ W_Q[h]
        assert torch.equal(hw.q[head], sd["blocks.1.attn.W_Q"][head].T)
        assert torch.equal(hw.k[head], sd["blocks.1.attn.W_K"][head].T)
        assert torch.equal(hw.v[head], sd["blocks.1.attn.W_V"][head].T)
        assert torch.equal(hw.o[head], sd["blocks.1.attn.W_O"][head].T)  # (E, d)
    assert hw.q_bias is not None and torch.equal(hw.q_bias, sd["blocks.1.attn.b_Q"])
    merged = merge_heads(hw)
    for key, tensor in merged.items():
        assert torch.equal(tensor, sd[key]), key
    out = tmp_path / "heads.safetensors"
    result = runner.invoke(app, ["split-qkv", str(path), "-o", str(out), "--verify"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    written = load_file(out)
    assert torch.equal(written["blocks.0.attn.heads.2.q.weight"],
                       sd["blocks.0.attn.W_Q"][2].T)
    assert torch.equal(written["blocks.0.attn.heads.2.k.weight"],
                       sd["blocks.0.attn.W_K"][2].T)


def test_heatmap_takes_token_ids(tmp_path: Path, save: SaveFn) -> None:
    path = save(to_lens(hf_gpt2()), "gpt2_lens.safetensors")
    result = runner.invoke(app, ["heatmap", str(path), "--tokens", "3,1,4,1,5",
                                 "-o", str(tmp_path / "grid.png")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "TransformerLens model rebuilt" in result.output
    assert "gelu_new" in result.output  # the assumed activation is said, not hidden
    bad = runner.invoke(app, ["heatmap", str(path), "--tokens", f"1,{VOCAB}",
                              "-o", str(tmp_path / "bad.png")])
    assert bad.exit_code == 2
    assert f"0..{VOCAB - 1}" in bad.output


@pytest.mark.parametrize("kind", ["LN", "LNPre", "RMS", "RMSPre"])
def test_norms_equal_torchs(kind: str) -> None:
    x = torch.randn(2, 5, 8) * 3 + 1
    norm = Norm(8, kind, 1e-5)
    weight = torch.randn(8) if kind in ("LN", "RMS") else None
    bias = torch.randn(8) if kind == "LN" else None
    with torch.no_grad():
        for name, value in (("w", weight), ("b", bias)):
            if value is not None:
                getattr(norm, name).copy_(value)
        mine = norm(x)
    if kind.startswith("LN"):
        reference = torch.nn.functional.layer_norm(x, (8,), weight, bias, 1e-5)
    else:
        reference = torch.nn.functional.rms_norm(x, (8,), weight, 1e-5)
    torch.testing.assert_close(mine, reference)


def test_folded_norms_need_the_config_to_say_so(save: SaveFn) -> None:
    sd = {k: v for k, v in to_lens(hf_gpt2()).items() if ".ln" not in k and "ln_final" not in k}
    path = save(sd, "folded.safetensors")
    checkpoint = load_checkpoint(path)
    with pytest.raises(ModelBuildError, match=r"without norm weights.*normalization_type"):
        load_model(path, checkpoint, analyse(checkpoint))
    path = save(sd, "folded.safetensors", config={"normalization_type": "LNPre",
                                                  "act_fn": "gelu_new"})
    checkpoint = load_checkpoint(path)
    loaded = load_model(path, checkpoint, analyse(checkpoint))
    assert isinstance(loaded.model, LensModel)
    assert loaded.model.cfg.normalization_type == "LNPre" and not loaded.notes


def test_variants_it_cannot_rebuild_are_refused(save: SaveFn) -> None:
    sd = to_lens(hf_gpt2())
    sd["blocks.0.attn.rotary_sin"] = torch.zeros(POSITIONS, 8)
    path = save(sd, "rotary.safetensors")
    checkpoint = load_checkpoint(path)
    with pytest.raises(ModelBuildError, match=r"1 unexpected keys.*rotary_sin"):
        load_model(path, checkpoint, analyse(checkpoint))
    del sd["blocks.0.attn.rotary_sin"]
    path = save(sd, "shortformer.safetensors",
                config={"positional_embedding_type": "shortformer"})
    checkpoint = load_checkpoint(path)
    with pytest.raises(ModelBuildError, match="positional_embedding_type shortformer"):
        load_model(path, checkpoint, analyse(checkpoint))
