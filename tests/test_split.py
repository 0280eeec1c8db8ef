"""split-qkv / merge-qkv: exact per-head weights for every layout, proven numerically."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from attnviz import tensor_writers
from attnviz.cli import app
from attnviz.errors import HeadsError, OutputError, UsageError
from attnviz.heads import HeadsOverride, resolve_heads
from attnviz.layouts import find_attention_layers
from attnviz.layouts.spec import LayoutContext
from attnviz.split import merge_heads, source_keys, split_heads
from attnviz.split_export import merge_split, split_checkpoint
from attnviz.verify import per_head_attention, verify_split

from .layout_builders import ARCHITECTURES, BUILDERS, GQA_LAYOUTS, build, geometry, layout_of

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
runner = CliRunner()


def split_in_memory(case: str, heads: int, kv_heads: int, head_dim: int, kdim: int = 5,
                    vdim: int = 7, bias: bool = True):  # type: ignore[no-untyped-def]
    sd, name = build(case, heads, kv_heads, head_dim, kdim, vdim, bias)
    context = LayoutContext(ARCHITECTURES.get(layout_of(case)), "test")
    layers, _ = find_attention_layers(sd, context=context)
    layer = next(item for item in layers if item.name == name)
    info = resolve_heads(layer, overrides=(HeadsOverride(None, heads),))
    return sd, layer, info, split_heads(layer, info, sd)


def test_default_transformer_per_head_exports_reproduce_the_modules(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Transformer().eval()  # 6 + 6 layers, d_model 512, 8 heads
    source = tmp_path / "transformer.pth"
    torch.save(model.state_dict(), source)
    out = tmp_path / "heads.safetensors"
    result = split_checkpoint(source, out, heads=["8"])
    assert len(result.layers) == 18
    split = load_file(str(out))  # read back with the reference safetensors library
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(modules) == 18
    x, memory = torch.randn(5, 2, 512), torch.randn(7, 2, 512)  # (L, N, E): sequence first
    for name, module in modules:
        assert module.in_proj_weight.shape == (1536, 512)
        kv_in = memory if name.endswith("multihead_attn") else x
        with torch.no_grad():
            ref_out, ref_weights = module(x, kv_in, kv_in, need_weights=True,
                                          average_attn_weights=False)
        assert ref_weights is not None
        probs, out = [], split[f"{name}.o.bias"].clone()
        for h in range(8):
            wq, wk, wv = (split[f"{name}.heads.{h}.{r}.weight"] for r in "qkv")
            bq, bk, bv = (split[f"{name}.heads.{h}.{r}.bias"] for r in "qkv")
            assert wq.shape == wk.shape == wv.shape == (64, 512)
            q = x.transpose(0, 1) @ wq.T + bq  # (N, L, 64)
            k = kv_in.transpose(0, 1) @ wk.T + bk  # (N, S, 64)
            v = kv_in.transpose(0, 1) @ wv.T + bv
            p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(64), dim=-1)  # (N, L, S)
            probs.append(p)
            out = out + (p @ v) @ split[f"{name}.heads.{h}.o.weight"].T  # (N, L, E)
        torch.testing.assert_close(torch.stack(probs, dim=1), ref_weights, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, ref_out.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_more_heads_change_the_split_not_the_parameter_count(tmp_path: Path) -> None:
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 32), 1,
                                  enable_nested_tensor=False)
    source = tmp_path / "enc.pth"
    torch.save(model.state_dict(), source)
    totals, shapes = {}, {}
    for heads in (2, 4, 16):
        out = tmp_path / f"h{heads}.safetensors"
        split_checkpoint(source, out, heads=[str(heads)])
        tensors = load_file(str(out))
        totals[heads] = sum(t.numel() for t in tensors.values())
        shapes[heads] = tensors["layers.0.self_attn.heads.0.q.weight"].shape
    assert shapes == {2: (32, 64), 4: (16, 64), 16: (4, 64)}  # the split changes...
    assert len(set(totals.values())) == 1  # ...the number of parameters does not
    params = model.layers[0].self_attn
    assert totals[4] == params.in_proj_weight.numel() + params.in_proj_bias.numel() + \
        params.out_proj.weight.numel() + params.out_proj.bias.numel()


@settings(max_examples=150, deadline=None)
@given(
    case=st.sampled_from(sorted(BUILDERS)),
    kv_heads=st.integers(1, 4),
    group=st.integers(1, 3),
    head_dim=st.integers(1, 6),
    kdim=st.integers(1, 9),
    vdim=st.integers(1, 9),
    bias=st.booleans(),
)
def test_split_then_merge_is_the_identity(case: str, kv_heads: int, group: int, head_dim: int,
                                          kdim: int, vdim: int, bias: bool) -> None:
    heads = kv_heads * group
    sd, layer, _, hw = split_in_memory(case, heads, kv_heads, head_dim, kdim, vdim, bias)
    heads, kv_heads, head_dim = geometry(case, heads, kv_heads, head_dim)
    expected = layout_of(case)
    if expected == "falcon_grouped" and kv_heads == heads:
        expected = "neox_interleaved"  # grouped with Hkv = H is the interleaved packing
    if expected == "gpt_bigcode_mqa" and heads == 1:
        expected = "gpt_bigcode_mha"  # one head: [Q | K | V] is c_attn [3E, E]
    if expected == "torch_mha_kvdim" and kdim == vdim == heads * head_dim:
        expected = "torch_mha"  # nn.MultiheadAttention packs q/k/v when kdim == vdim == E
    assert layer.layout == expected
    assert hw.q.shape == (heads, head_dim, layer.embed_dim)
    assert hw.k.shape == (kv_heads, head_dim, layer.kdim)
    assert hw.v.shape == (kv_heads, head_dim, layer.vdim)
    assert hw.kv_map == tuple(h // (heads // kv_heads) for h in range(heads))
    merged = merge_heads(hw)
    assert set(merged) == set(source_keys(layer))
    for key, tensor in merged.items():
        assert tensor.shape == sd[key].shape, key
        assert torch.equal(tensor, sd[key]), key


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_every_layout_verifies_against_its_reference(case: str, bias: bool) -> None:
    kv = 2 if case in GQA_LAYOUTS else 4
    sd, _, _, hw = split_in_memory(case, 4, kv, 3, bias=bias)
    result = verify_split(hw, sd)
    assert result.ok(1e-9), result
    expected = "nn.MultiheadAttention" if case.startswith("torch_mha") else "scaled_dot_product"
    assert expected in result.reference


@pytest.mark.parametrize("case", ["torch_mha", "gpt2_conv1d", "neox_interleaved",
                                  "falcon_grouped", "hf_q_proj"])
def test_verify_catches_a_wrong_split(case: str) -> None:
    sd, _, _, hw = split_in_memory(case, 4, 2, 3)
    swapped = hw.q.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # two query heads exchanged
    wrong = type(hw)(**{**hw.__dict__, "q": swapped})
    assert not verify_split(wrong, sd).ok()


def test_per_head_attention_matches_sdpa_with_gqa() -> None:
    sd, _, _, hw = split_in_memory("hf_q_proj", 6, 2, 4, bias=False)
    x = torch.randn(1, 5, 24)
    out, probs = per_head_attention(hw, x, x, x)
    assert probs.shape == (1, 6, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 6, 5))
    q = (x @ sd["model.layers.0.self_attn.q_proj.weight"].T).view(1, 5, 6, 4).transpose(1, 2)
    k = (x @ sd["model.layers.0.self_attn.k_proj.weight"].T).view(1, 5, 2, 4).transpose(1, 2)
    v = (x @ sd["model.layers.0.self_attn.v_proj.weight"].T).view(1, 5, 2, 4).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(1, 5, 24) @ sd["model.layers.0.self_attn.o_proj.weight"].T
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --- CLI -------------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_cli_split_verify_and_merge_round_trip_bit_exact(tmp_path: Path) -> None:
    source = SAMPLES / "detr_tiny.pth"
    out = tmp_path / "heads.safetensors"
    code, stdout, err = cli("split-qkv", str(source), "-o", str(out), "--verify")
    assert code == 0, err
    assert stdout.count(" ok") == 6 and "MISMATCH" not in stdout
    assert "nn.MultiheadAttention" in stdout
    split = load_file(str(out))
    name = "transformer.decoder.layers.1.multihead_attn"
    assert split[f"{name}.heads.3.q.weight"].shape == (16, 64)
    assert split[f"{name}.heads.3.o.weight"].shape == (64, 16)
    packed = tmp_path / "packed.safetensors"
    code, _, err = cli("merge-qkv", str(out), "-o", str(packed))
    assert code == 0, err
    rebuilt = load_file(str(packed))
    with torch.serialization.safe_globals([argparse.Namespace]):
        original = torch.load(source, weights_only=True)["model"]
    assert len(rebuilt) == 24
    for key, tensor in rebuilt.items():
        assert torch.equal(tensor, original[key]), key


def test_verify_failure_exits_1_and_writes_nothing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import attnviz.split_export as split_export

    real = split_export.split_heads

    def wrong_split(*args: object, **kwargs: object) -> object:
        hw = real(*args, **kwargs)  # type: ignore[arg-type]
        swapped = hw.q[[1, 0, *range(2, hw.q.shape[0])]]  # numpy or torch: heads 0, 1 exchanged
        return type(hw)(**{**hw.__dict__, "q": swapped})

    monkeypatch.setattr(split_export, "split_heads", wrong_split)
    out = tmp_path / "heads.safetensors"
    code, stdout, err = cli("split-qkv", str(SAMPLES / "detr_tiny.pth"), "-o", str(out),
                            "--verify")
    assert code == 1
    assert "verify mismatch" in stdout and "no output written" in err
    assert list(tmp_path.iterdir()) == []


def test_split_metadata_traces_every_tensor(tmp_path: Path) -> None:
    out = tmp_path / "heads.safetensors"
    split_checkpoint(SAMPLES / "qkv_encoder", out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "attnviz-split" and meta["source_file"] == "qkv_encoder"
    assert len(json.loads(meta["source_sha256"])["model.safetensors"]) == 64
    layers = json.loads(meta["layers"])
    assert [r["name"] for r in layers] == ["layers.0.attn", "layers.1.attn"]
    assert layers[0]["keys"]["qkv"] == "layers.0.attn.qkv_proj.weight"
    assert layers[0]["heads_source"] == "config.json: num_attention_heads"
    assert layers[0]["kv_map"] == [0, 1, 2, 3]


@pytest.mark.parametrize("fmt", ["pt", "npz"])
def test_other_formats_with_sidecar_and_merge(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"heads.{fmt}"
    code, _, err = cli("split-qkv", str(SAMPLES / "mha_kvdim.pth"), "-o", str(out), "--heads",
                       "4", "--stacked")
    assert code == 0, err
    sidecar = json.loads((tmp_path / f"heads.{fmt}.json").read_text())
    assert json.loads(sidecar["layers"])[0]["layout"] == "torch_mha_kvdim"
    merged = tmp_path / "merged.pt"
    assert cli("merge-qkv", str(out), "-o", str(merged))[0] == 0
    original = torch.load(SAMPLES / "mha_kvdim.pth", weights_only=True)
    rebuilt = torch.load(merged, weights_only=True)
    assert set(rebuilt) == set(original)
    for key in original:
        assert torch.equal(rebuilt[key], original[key]), key


def test_stacked_gqa_layout_and_flags(tmp_path: Path) -> None:
    sd, _ = build("falcon_grouped", 8, 2, 4, 0, 0, False)
    source = tmp_path / "falcon.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(source))
    out = tmp_path / "s.safetensors"
    assert cli("split-qkv", str(source), "-o", str(out), "--heads", "8", "--stacked",
               "--no-out-proj", "--verify")[0] == 0
    stacked = load_file(str(out))
    prefix = "transformer.h.0.self_attention"
    assert stacked[f"{prefix}.q.weight"].shape == (8, 4, 32)
    assert stacked[f"{prefix}.k.weight"].shape == (2, 4, 32)
    assert f"{prefix}.o.weight" not in stacked
    unstacked = tmp_path / "u.safetensors"
    assert cli("split-qkv", str(source), "-o", str(unstacked), "--heads", "8")[0] == 0
    names = set(load_file(str(unstacked)))
    assert f"{prefix}.kv_heads.1.k.weight" in names and f"{prefix}.kv_heads.2.k.weight" not in names
    assert f"{prefix}.heads.7.q.weight" in names


def test_layers_glob_selects(tmp_path: Path) -> None:
    out = tmp_path / "dec.safetensors"
    assert cli("split-qkv", str(SAMPLES / "detr_tiny.pth"), "-o", str(out), "--layers",
               "*decoder*multihead*")[0] == 0
    layers = {k.split(".heads.")[0] for k in load_file(str(out)) if ".heads." in k}
    assert layers == {"transformer.decoder.layers.0.multihead_attn",
                      "transformer.decoder.layers.1.multihead_attn"}
    code, _, err = cli("split-qkv", str(SAMPLES / "detr_tiny.pth"), "-o", str(out), "--force",
                       "--layers", "nope*")
    assert code == 2 and "'nope*' matches no layer (layers: 0 transformer.encoder" in err


# --- failures --------------------------------------------------------------------------------


def test_unknown_heads_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HeadsError, match=r"heads unknown.*pass heads N"):
        split_checkpoint(SAMPLES / "transformer_d64_h4.pth", tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_output_equal_to_input_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    source.write_bytes((SAMPLES / "qkv_encoder" / "model.safetensors").read_bytes())
    before = source.read_bytes()
    code, _, err = cli("split-qkv", str(source), "-o", str(source), "--heads", "4", "--force")
    assert code == 2 and "output is the input" in err
    assert source.read_bytes() == before


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match=r"output exists.*force=True"):
        split_checkpoint(SAMPLES / "detr_tiny.pth", out)
    assert out.read_bytes() == b"keep me"
    split_checkpoint(SAMPLES / "detr_tiny.pth", out, force=True)
    assert len(load_file(str(out))) == 174


def test_unwritable_folder(tmp_path: Path) -> None:
    code, _, err = cli("split-qkv", str(SAMPLES / "detr_tiny.pth"), "-o", "/sys/heads.safetensors")
    assert code == 2
    assert "/sys/heads.safetensors" in err
    code, _, err = cli("split-qkv", str(SAMPLES / "detr_tiny.pth"), "-o",
                       str(tmp_path / "missing" / "h.safetensors"))
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_previous_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"previous")
    real_write = tensor_writers.SafetensorsStreamWriter.write
    calls = {"n": 0}

    def failing_write(self: tensor_writers.SafetensorsStreamWriter, name: str,
                      tensor: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == 40:
            raise error
        real_write(self, name, tensor)

    monkeypatch.setattr(tensor_writers.SafetensorsStreamWriter, "write", failing_write)
    with pytest.raises(type(error)):
        split_checkpoint(SAMPLES / "detr_tiny.pth", out, force=True)
    assert calls["n"] == 40
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_format_flag_contradicting_suffix_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="contradicts"):
        split_checkpoint(SAMPLES / "detr_tiny.pth", tmp_path / "x.pt", fmt="npz")


def test_merge_rejects_a_file_that_is_not_a_split(tmp_path: Path) -> None:
    code, _, err = cli("merge-qkv", str(SAMPLES / "detr_tiny.pth"), "-o",
                       str(tmp_path / "m.safetensors"))
    assert code == 2 and "not an attnviz split file" in err
    with pytest.raises(UsageError, match=r"not \.npz"):
        merge_split(SAMPLES / "detr_tiny.pth", tmp_path / "m.npz")


def test_bfloat16_split_and_merge_are_bit_exact_without_torch_arithmetic(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd, _ = build("hf_q_proj", 4, 2, 8, 0, 0, True)
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    source = tmp_path / "bf16.safetensors"
    save_file(sd, str(source))
    out = tmp_path / "heads.safetensors"
    split_checkpoint(source, out, heads=["4"], verify=True)
    split = load_file(str(out))
    prefix = "model.layers.0.self_attn"
    assert split[f"{prefix}.heads.1.q.weight"].dtype == torch.bfloat16
    assert torch.equal(split[f"{prefix}.heads.1.q.weight"],
                       sd[f"{prefix}.q_proj.weight"][8:16])
    assert torch.equal(split[f"{prefix}.kv_heads.1.v.bias"], sd[f"{prefix}.v_proj.bias"][8:16])
    merged = tmp_path / "merged.safetensors"
    merge_split(out, merged)
    for key, tensor in load_file(str(merged)).items():
        assert torch.equal(tensor, sd[key]), key
    npz = tmp_path / "heads.npz"
    result = split_checkpoint(source, npz, heads=["4"])
    assert len(result.upcast) == result.tensors_written  # numpy has no bfloat16
    assert "upcast_to_float32" in json.loads((tmp_path / "heads.npz.json").read_text())


def test_split_without_verify_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    probe = (
        "import sys, runpy\n"
        "sys.argv = ['attnviz'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('attnviz', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    out = tmp_path / "h.safetensors"
    done = subprocess.run([sys.executable, "-c", probe, "split-qkv", str(SAMPLES / "detr_tiny.pth"),
                           "-o", str(out)], capture_output=True, text=True, check=False)
    assert "TORCH False" in done.stderr, done.stderr[-2000:]
    assert len(load_file(str(out))) == 174


def test_layers_typo_gets_a_did_you_mean(tmp_path: Path) -> None:
    code, _, err = cli("split-qkv", str(SAMPLES / "detr_tiny.pth"), "-o",
                       str(tmp_path / "x.safetensors"), "--layers",
                       "transformer.decoder.layers.1.multihead_atn")
    assert code == 2
    assert "did you mean 'transformer.decoder.layers.1.multihead_attn'" in err
