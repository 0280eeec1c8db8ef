"""Proving a split exact: attention from per-head weights vs the layout's own computation.

Per head: softmax(q_h k_h^T / sqrt(d)) v_h, concatenated through the output projection. The
reference is ``nn.MultiheadAttention`` itself for torch MHA layouts, and, for every other
layout, ``F.scaled_dot_product_attention`` on q/k/v sliced from the *stored* tensors the way
the originating library slices them (GPT-2 ``addmm`` on Conv1D, NeoX ``view(B, L, H, 3d)``,
Falcon ``view(B, L, Hkv, g + 2, d)``). Both run in float64 on seeded random inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from attnviz.layouts.spec import AttentionLayer, Packing
from attnviz.split import DEFAULT_TOLERANCE, HeadWeights, row_order

MHA_LAYOUTS = frozenset({"torch_mha", "torch_mha_kvdim"})


@dataclass(frozen=True)
class VerifyResult:
    layer: str
    reference: str
    max_abs_error: float  # layer output
    max_abs_error_weights: float  # per-head attention probabilities

    def ok(self, tolerance: float = DEFAULT_TOLERANCE) -> bool:
        return max(self.max_abs_error, self.max_abs_error_weights) <= tolerance


def per_head_attention(hw: HeadWeights, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention computed head by head from split weights: (output (B, L, E_out) or the
    concatenated heads (B, L, H*d) without an output projection, probs (B, H, L, S))."""
    d = hw.head_dim
    outputs, probs = [], []
    for h, j in enumerate(hw.kv_map):
        q = query @ hw.q[h].T  # (B, L, d)
        k = key @ hw.k[j].T  # (B, S, d)
        v = value @ hw.v[j].T  # (B, S, d)
        if hw.q_bias is not None:
            q = q + hw.q_bias[h]
        if hw.k_bias is not None:
            k = k + hw.k_bias[j]
        if hw.v_bias is not None:
            v = v + hw.v_bias[j]
        if "bias_k" in hw.carried:  # torch MHA add_bias_kv: one extra learned key/value
            extra_k = hw.carried["bias_k"].reshape(-1)[j * d:(j + 1) * d]  # (d,)
            extra_v = hw.carried["bias_v"].reshape(-1)[j * d:(j + 1) * d]
            k = torch.cat([k, extra_k.expand(k.shape[0], 1, d)], dim=1)  # (B, S+1, d)
            v = torch.cat([v, extra_v.expand(v.shape[0], 1, d)], dim=1)
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (B, L, S)
        probs.append(p)
        head_out = p @ v  # (B, L, d)
        outputs.append(head_out @ hw.o[h].T if hw.o is not None else head_out)
    weights = torch.stack(probs, dim=1)  # (B, H, L, S)
    if hw.o is None:
        return torch.cat(outputs, dim=-1), weights  # (B, L, H*d)
    out = torch.stack(outputs, dim=0).sum(dim=0)  # (B, L, E_out)
    return (out + hw.o_bias if hw.o_bias is not None else out), weights


def _mha_reference(layer: AttentionLayer, hw: HeadWeights, source: Mapping[str, torch.Tensor],
                   query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = f"{layer.name}." if layer.name else ""
    state = {name[len(prefix):]: tensor for name, tensor in source.items()
             if name.startswith(prefix)}
    module = nn.MultiheadAttention(
        layer.embed_dim, hw.num_heads, bias="in_proj_bias" in state,
        add_bias_kv="bias_k" in state, kdim=layer.kdim, vdim=layer.vdim, batch_first=True,
        dtype=torch.float64)
    module.load_state_dict(state, strict=True)
    module.eval()
    out, weights = module(query, key, value, need_weights=True, average_attn_weights=False)
    if weights is None:  # need_weights=True always returns them
        raise RuntimeError("nn.MultiheadAttention returned no weights")
    return out, weights


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             transposed: bool) -> torch.Tensor:
    if transposed:  # GPT-2 Conv1D: x @ W + b with W stored (in, out)
        out = x @ weight
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


def _sdpa_reference(layer: AttentionLayer, hw: HeadWeights, source: Mapping[str, torch.Tensor],
                    query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keys, heads, kv_heads, d = layer.keys, hw.num_heads, hw.num_kv_heads, hw.head_dim
    batch, length = query.shape[:2]
    if layer.packing is Packing.SEPARATE:
        def proj(role: str, x: torch.Tensor) -> torch.Tensor:
            bias = source[keys[f"{role}_bias"]] if f"{role}_bias" in keys else None
            return F.linear(x, source[keys[role]], bias)
        q, k, v = proj("q", query), proj("k", key), proj("v", value)  # (B, L|S, rows)
    elif layer.packing is Packing.PER_HEAD:  # TransformerLens: x @ W_Q[h] + b_Q[h]
        def per_head(role: str, x: torch.Tensor) -> torch.Tensor:
            out = torch.einsum("ble,hed->blhd", x, source[keys[role]])  # (B, L, H, d)
            if f"{role}_bias" in keys:
                out = out + source[keys[f"{role}_bias"]]
            return out.flatten(2)  # (B, L, H*d)
        q, k, v = per_head("q", query), per_head("k", key), per_head("v", value)
    elif layer.packing is Packing.KV_FUSED:  # GPT-2 cross-attention: split(E, dim=2) of k|v
        q = _project(query, source[keys["q"]], source.get(keys.get("q_bias", "")),
                     layer.transposed)  # (B, L, H*d)
        kv = _project(key, source[keys["kv"]], source.get(keys.get("kv_bias", "")),
                      layer.transposed)  # (B, S, 2*Hkv*d)
        k, v = torch.split(kv, kv_heads * d, dim=2)
    else:
        bias = source.get(keys.get("qkv_bias", ""))
        if bias is None and ("q_bias" in keys or "v_bias" in keys):  # BEiT: k has no bias
            zeros = torch.zeros(hw.num_kv_heads * d, dtype=query.dtype)
            bias = torch.cat([source.get(keys.get("q_bias", ""), torch.zeros(heads * d,
                              dtype=query.dtype)), zeros, source.get(keys.get("v_bias", ""),
                              zeros)])
        qkv = _project(query, source[keys["qkv"]], bias, layer.transposed)  # (B, L, rows)
        if layer.packing is Packing.BLOCKED:
            q, k, v = torch.split(qkv, [heads * d, kv_heads * d, kv_heads * d], dim=-1)
        elif layer.packing is Packing.SHARDED:  # CodeGen: view(B, L, mp, 3 * E/mp), q v k
            blocks = row_order(layer)
            local = heads * d // blocks.shards
            parts = torch.split(qkv.view(batch, length, blocks.shards, 3 * local), local,
                                dim=-1)
            named = dict(zip(blocks.order, parts, strict=True))  # each (B, L, mp, E/mp)
            q, k, v = (named[role].reshape(batch, length, heads * d) for role in "qkv")
        elif layer.packing is Packing.INTERLEAVED:  # GPT-NeoX / BLOOM
            q, k, v = torch.split(qkv.view(batch, length, heads, 3 * d), d, dim=-1)  # (B, L, H, d)
        else:  # Falcon / InternLM2 grouped
            group = heads // kv_heads
            grouped = qkv.view(batch, length, kv_heads, group + 2, d)  # (B, L, Hkv, g+2, d)
            q, k, v = grouped[..., :group, :], grouped[..., group, :], grouped[..., group + 1, :]
    q = q.reshape(batch, length, heads, d).transpose(1, 2)  # (B, H, L, d)
    k = k.reshape(batch, k.shape[1], kv_heads, d).transpose(1, 2)  # (B, Hkv, S, d)
    v = v.reshape(batch, v.shape[1], kv_heads, d).transpose(1, 2)
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, S, d): query head h -> h // g
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (B, H, L, S)
    merged = attn.transpose(1, 2).reshape(batch, length, heads * d)  # (B, L, H*d)
    if "out" in keys and hw.o is not None:
        out_bias = source[keys["out_bias"]] if "out_bias" in keys else None
        weight = source[keys["out"]]  # TransformerLens: (H, d, E_out) -> (H*d, E_out)
        weight = weight.flatten(0, 1) if layer.packing is Packing.PER_HEAD else weight
        merged = _project(merged, weight, out_bias, layer.transposed)
    return merged, weights


def _float64(hw: HeadWeights) -> HeadWeights:
    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(torch.float64)

    return dataclasses.replace(
        hw, q=hw.q.to(torch.float64), k=hw.k.to(torch.float64), v=hw.v.to(torch.float64),
        q_bias=cast(hw.q_bias), k_bias=cast(hw.k_bias), v_bias=cast(hw.v_bias), o=cast(hw.o),
        o_bias=cast(hw.o_bias), carried={k: v.to(torch.float64) for k, v in hw.carried.items()})


@torch.no_grad()
def verify_split(hw: HeadWeights, source: Mapping[str, torch.Tensor], *, seed: int = 0,
                 batch: int = 2, length: int = 5, source_length: int = 7) -> VerifyResult:
    """Compare per-head attention from ``hw`` with the reference on the stored ``source``."""
    layer = hw.layer
    generator = torch.Generator().manual_seed(seed)
    source64 = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in source.items()}
    hw64 = _float64(hw)
    query = torch.randn(batch, length, layer.embed_dim, generator=generator, dtype=torch.float64)
    if layer.packing in (Packing.SEPARATE, Packing.KV_FUSED, Packing.PER_HEAD):  # cross-attention
        key = torch.randn(batch, source_length, layer.kdim, generator=generator,
                          dtype=torch.float64)
        value = key if layer.packing is Packing.KV_FUSED else torch.randn(  # k|v read one input
            batch, source_length, layer.vdim, generator=generator, dtype=torch.float64)
    else:  # one fused projection reads one input
        key = value = query
    mine, my_weights = per_head_attention(hw64, query, key, value)
    if layer.layout in MHA_LAYOUTS and hw.o is not None:
        reference, ref_weights = _mha_reference(layer, hw64, source64, query, key, value)
        name = "nn.MultiheadAttention"
    else:
        reference, ref_weights = _sdpa_reference(layer, hw64, source64, query, key, value)
        name = "F.scaled_dot_product_attention"
    return VerifyResult(layer.display_name, name,
                        float((mine - reference).abs().max()),
                        float((my_weights - ref_weights).abs().max()))
