"""State_dicts for every registered layout at any geometry, stored as each library stores them.

``build(layout, heads, kv_heads, head_dim, kdim, vdim, bias)`` returns (state_dict, layer name).
Layouts that have no GQA form ignore ``kv_heads``; only torch MHA layouts use kdim/vdim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Builder = Callable[[int, int, int, int, int, bool], tuple[dict[str, torch.Tensor], str]]


def _lin(sd: dict[str, torch.Tensor], name: str, n_out: int, n_in: int, bias: bool) -> None:
    sd[f"{name}.weight"] = torch.randn(n_out, n_in)
    if bias:
        sd[f"{name}.bias"] = torch.randn(n_out)


def torch_mha(h: int, _kv: int, d: int, _k: int, _v: int,
              bias: bool) -> tuple[dict[str, torch.Tensor], str]:
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(h * d, h, bias=bias)
    with torch.no_grad():
        for p in holder.parameters():
            p.normal_()  # MHA zero-initialises biases: make every number count
    return dict(holder.state_dict()), "attn"


def torch_mha_kvdim(h: int, _kv: int, d: int, kdim: int, vdim: int,
                    bias: bool) -> tuple[dict[str, torch.Tensor], str]:
    holder = nn.Module()
    holder.cross = nn.MultiheadAttention(h * d, h, bias=bias, kdim=kdim, vdim=vdim,
                                         add_bias_kv=bias)
    with torch.no_grad():
        for p in holder.parameters():
            p.normal_()
    return dict(holder.state_dict()), "cross"


def _fused(qkv: str, out: str, prefix: str, rows_fn: Callable[[int, int, int], int],
           gqa: bool) -> Builder:
    def build(h: int, kv: int, d: int, _k: int, _v: int,
              bias: bool) -> tuple[dict[str, torch.Tensor], str]:
        kv = kv if gqa else h
        e = h * d
        sd: dict[str, torch.Tensor] = {}
        _lin(sd, f"{prefix}.{qkv}", rows_fn(h, kv, d), e, bias)
        _lin(sd, f"{prefix}.{out}", e, e, bias)
        sd["head.weight"] = torch.randn(3, e)  # keeps 'model.'-style prefixes from being stripped
        return sd, prefix

    return build


def beit(h: int, _kv: int, d: int, _k: int, _v: int,
         bias: bool) -> tuple[dict[str, torch.Tensor], str]:
    e = h * d
    sd: dict[str, torch.Tensor] = {"blocks.0.attn.qkv.weight": torch.randn(3 * e, e)}
    if bias:
        sd["blocks.0.attn.q_bias"] = torch.randn(e)
        sd["blocks.0.attn.v_bias"] = torch.randn(e)
    _lin(sd, "blocks.0.attn.proj", e, e, bias)
    return sd, "blocks.0.attn"


def gpt2(h: int, _kv: int, d: int, _k: int, _v: int,
         bias: bool) -> tuple[dict[str, torch.Tensor], str]:
    e = h * d
    sd = {"h.0.attn.c_attn.weight": torch.randn(e, 3 * e),  # Conv1D: (in, out)
          "h.0.attn.c_proj.weight": torch.randn(e, e),
          "h.0.attn.bias": torch.tril(torch.ones(4, 4)).view(1, 1, 4, 4)}
    if bias:
        sd["h.0.attn.c_attn.bias"] = torch.randn(3 * e)
        sd["h.0.attn.c_proj.bias"] = torch.randn(e)
    return sd, "h.0.attn"


def gpt2_cross(h: int, _kv: int, d: int, kdim: int, _v: int,
               bias: bool) -> tuple[dict[str, torch.Tensor], str]:
    e = h * d
    sd = {"h.0.crossattention.q_attn.weight": torch.randn(e, e),  # Conv1D: (in, out)
          "h.0.crossattention.c_attn.weight": torch.randn(kdim, 2 * e),  # (kdim, 2E): k | v
          "h.0.crossattention.c_proj.weight": torch.randn(e, e)}
    if bias:
        sd["h.0.crossattention.q_attn.bias"] = torch.randn(e)
        sd["h.0.crossattention.c_attn.bias"] = torch.randn(2 * e)
        sd["h.0.crossattention.c_proj.bias"] = torch.randn(e)
    return sd, "h.0.crossattention"


def _separate(names: tuple[str, str, str, str], prefix: str, out_prefix: str | None = None,
              no_k_bias: bool = False) -> Builder:
    def build(h: int, kv: int, d: int, _k: int, _v: int,
              bias: bool) -> tuple[dict[str, torch.Tensor], str]:
        e = h * d
        sd: dict[str, torch.Tensor] = {}
        _lin(sd, f"{prefix}.{names[0]}", e, e, bias)
        _lin(sd, f"{prefix}.{names[1]}", kv * d, e, bias and not no_k_bias)
        _lin(sd, f"{prefix}.{names[2]}", kv * d, e, bias)
        _lin(sd, f"{out_prefix or prefix}.{names[3]}", e, e, bias)
        sd["lm_head.weight"] = torch.randn(5, e)
        return sd, prefix

    return build


def transformer_lens(h: int, _kv: int, d: int, _k: int, _v: int,
                     bias: bool) -> tuple[dict[str, torch.Tensor], str]:
    e = h * d
    sd = {f"blocks.0.attn.W_{n}": torch.randn(h, e, d) for n in "QKV"}  # per head (in, out)
    sd["blocks.0.attn.W_O"] = torch.randn(h, d, e)
    sd["blocks.0.attn.mask"] = torch.tril(torch.ones(4, 4)).bool()
    if bias:
        sd.update({f"blocks.0.attn.b_{n}": torch.randn(h, d) for n in "QKV"})
        sd["blocks.0.attn.b_O"] = torch.randn(e)
    return sd, "blocks.0.attn"


def _blocked(h: int, kv: int, d: int) -> int:
    return (h + 2 * kv) * d


BUILDERS: dict[str, Builder] = {
    "torch_mha": torch_mha,
    "torch_mha_kvdim": torch_mha_kvdim,
    "timm_qkv": _fused("qkv", "proj", "blocks.0.attn", _blocked, gqa=False),
    "timm_qkv(beit)": beit,
    "fused_qkv_proj": _fused("qkv_proj", "out_proj", "layers.0.attn", _blocked, gqa=False),
    "fused_qkv_proj(phi3)": _fused("qkv_proj", "o_proj", "model.layers.0.self_attn", _blocked,
                                   gqa=True),
    "mpt_wqkv": _fused("Wqkv", "out_proj", "transformer.blocks.0.attn", _blocked, gqa=False),
    "nanogpt_c_attn": _fused("c_attn", "c_proj", "transformer.h.0.attn", _blocked, gqa=False),
    "gpt_bigcode_mha": _fused("c_attn", "c_proj", "transformer.h.0.attn", _blocked, gqa=False),
    "gpt_bigcode_mqa": _fused("c_attn", "c_proj", "transformer.h.0.attn", _blocked, gqa=True),
    "codegen_mp": _fused("qkv_proj", "out_proj", "transformer.h.0.attn", _blocked, gqa=False),
    "gpt2_conv1d": gpt2,
    "gpt2_cross": gpt2_cross,
    "distilbert_lin": _separate(("q_lin", "k_lin", "v_lin", "out_lin"),
                                "transformer.layer.0.attention"),
    "hf_query_proj": _separate(("self.query_proj", "self.key_proj", "self.value_proj",
                                "output.dense"), "encoder.layer.0.attention"),
    "neox_interleaved": _fused("query_key_value", "dense", "gpt_neox.layers.0.attention",
                               _blocked, gqa=False),
    "falcon_grouped": _fused("query_key_value", "dense", "transformer.h.0.self_attention",
                             _blocked, gqa=True),
    "internlm2_wqkv": _fused("wqkv", "wo", "model.layers.0.attention", _blocked, gqa=True),
    "hf_q_proj": _separate(("q_proj", "k_proj", "v_proj", "o_proj"), "model.layers.0.self_attn"),
    "hf_query_key_value": _separate(("self.query", "self.key", "self.value", "output.dense"),
                                    "encoder.layer.0.attention"),
    "hf_query_key_value(whisper)": _separate(("query", "key", "value", "out"),
                                             "encoder.blocks.0.attn", no_k_bias=True),
    "meta_llama_wq": _separate(("wq", "wk", "wv", "wo"), "layers.0.attention"),
    "t5_qkvo": _separate(("q", "k", "v", "o"), "encoder.block.0.layer.0.SelfAttention"),
    "transformer_lens": transformer_lens,
}
# Layouts whose stored form can hold fewer key/value heads than query heads.
GQA_LAYOUTS = {"fused_qkv_proj(phi3)", "falcon_grouped", "internlm2_wqkv", "hf_q_proj",
               "meta_llama_wq", "t5_qkvo", "hf_query_key_value", "hf_query_key_value(whisper)"}


# The architecture a config.json would name, for layouts whose key names and shapes alone
# fit several packings (c_attn [3E, E]: nanoGPT blocked vs GPT-BigCode interleaved; qkv_proj
# without bias: blocked vs CodeGen's model-parallel blocks).
ARCHITECTURES = {"nanogpt_c_attn": "nanogpt", "gpt_bigcode_mha": "gpt_bigcode",
                 "gpt_bigcode_mqa": "gpt_bigcode", "codegen_mp": "codegen",
                 "fused_qkv_proj": "custom-encoder", "gpt2_cross": "gpt2"}
FIXED_KV_HEADS = {"gpt_bigcode_mqa": 1}  # multi-query: one key/value head whatever H is
SHARDS = {"codegen_mp": 4}  # E must split into this many model-parallel blocks


def layout_of(case: str) -> str:
    return case.split("(")[0]


def geometry(case: str, heads: int, kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(H, Hkv, d) the case can hold: GQA only where the layout has it, E divisible by shards."""
    kv_heads = FIXED_KV_HEADS.get(case, kv_heads if case in GQA_LAYOUTS else heads)
    return heads, kv_heads, head_dim * SHARDS.get(case, 1)


def build(case: str, heads: int, kv_heads: int, head_dim: int, kdim: int, vdim: int,
          bias: bool) -> tuple[dict[str, torch.Tensor], str]:
    heads, kv_heads, head_dim = geometry(case, heads, kv_heads, head_dim)
    sd, layer = BUILDERS[case](heads, kv_heads, head_dim, kdim, vdim, bias)
    if case in ("hf_query_key_value", "hf_query_proj"):  # BERT: out one module up
        layer = f"{layer}.self"
    if case == "codegen_mp":
        sd = {k: v for k, v in sd.items() if not k.endswith("qkv_proj.bias")}
    return sd, layer
