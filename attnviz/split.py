"""Per-head Wq/Wk/Wv/Wo from any registered layout, and the exact inverse.

Pure functions over torch tensors or numpy arrays; everything is brought to PyTorch Linear
orientation (out, in): Conv1D sources are transposed, interleaved and grouped packings
de-interleaved. The split is logical: it is a reshape of the same numbers, so the parameter
count never depends on the head count, and ``merge_heads(split_heads(...))`` rebuilds the
stored tensors bit for bit.

Example (a notebook)::

    from attnviz import load_checkpoint
    from attnviz.split import split_layer, merge_heads
    ckpt = load_checkpoint("detr-r50.pth")
    hw = split_layer(ckpt, "transformer.encoder.layers.0.self_attn")   # heads from args.nheads
    hw.q.shape            # (8, 32, 256): Wq per head, (H, d, E)
    hw.o.shape            # (8, 256, 32): head h's columns of out_proj, (H, E, d)
    packed = merge_heads(hw)   # {'...in_proj_weight': tensor [768, 256], ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from attnviz.errors import CheckpointError, HeadsError, UsageError, param
from attnviz.heads import HeadsInfo
from attnviz.layouts.spec import AttentionLayer, Packing

if TYPE_CHECKING:
    from collections.abc import Mapping

    from attnviz.checkpoint import Checkpoint
    from attnviz.inspection import InspectReport

# A torch.Tensor or a numpy array: the split only reshapes, slices and concatenates, so
# ``split-qkv`` runs it on numpy views without importing torch, and notebooks on tensors.
Array = Any


class _Ops:
    """The handful of array operations the split needs, for numpy or torch."""

    def __init__(self, sample: Array) -> None:
        self.numpy = isinstance(sample, np.ndarray)

    def split_rows(self, array: Array, sizes: Sequence[int]) -> list[Array]:
        if self.numpy:
            return list(np.split(array, np.cumsum(sizes)[:-1].tolist(), axis=0))
        import torch

        return list(torch.split(array, list(sizes), dim=0))

    def cat(self, arrays: Sequence[Array], dim: int = 0) -> Array:
        if self.numpy:
            return np.concatenate(arrays, axis=dim)
        import torch

        return torch.cat(list(arrays), dim=dim)

    def stack(self, arrays: Sequence[Array], dim: int = 0) -> Array:
        if self.numpy:
            return np.stack(arrays, axis=dim)
        import torch

        return torch.stack(list(arrays), dim=dim)

    def permute(self, array: Array, dims: tuple[int, ...]) -> Array:
        return array.transpose(dims) if self.numpy else array.permute(dims)

    def contiguous(self, array: Array) -> Array:
        if self.numpy:
            return array if array.flags.c_contiguous else array.copy()
        return array.contiguous()

DEFAULT_TOLERANCE = 1e-6  # --verify: float64 agreement; a wrong split errs by O(1)
# Layer tensors carried through a split unchanged (not projections, but needed to rebuild MHA).
CARRIED_ROLES = ("bias_k", "bias_v")


@dataclass(frozen=True)
class HeadWeights:
    """One attention layer's weights per head, in Linear orientation.

    ``q`` (H, d, E), ``k`` (Hkv, d, kdim), ``v`` (Hkv, d, vdim), biases (H|Hkv, d),
    ``o`` (H, E_out, d): head h's columns of the output projection, ``o_bias`` (E_out,).
    Query head h reads key/value head ``kv_map[h]``.
    """

    layer: AttentionLayer
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: Array
    k: Array
    v: Array
    q_bias: Array | None = None
    k_bias: Array | None = None
    v_bias: Array | None = None
    o: Array | None = None
    o_bias: Array | None = None
    carried: dict[str, Array] = field(default_factory=dict)

    @property
    def kv_map(self) -> tuple[int, ...]:
        group = self.num_heads // self.num_kv_heads
        return tuple(h // group for h in range(self.num_heads))

    @property
    def num_parameters(self) -> int:
        parts = [self.q, self.k, self.v, self.q_bias, self.k_bias, self.v_bias, self.o,
                 self.o_bias]
        return sum(int(np.prod(p.shape)) for p in parts if p is not None)

    def __repr__(self) -> str:  # the default prints every weight
        from attnviz.notebook_tables import head_weights_repr

        return head_weights_repr(self)

    def _repr_html_(self) -> str:
        from attnviz.notebook_tables import head_weights_html

        return head_weights_html(self)

    def map(self, convert: Any) -> HeadWeights:
        """The same weights with ``convert`` applied to every array (numpy <-> torch)."""
        def opt(array: Array | None) -> Array | None:
            return None if array is None else convert(array)

        return HeadWeights(self.layer, self.num_heads, self.num_kv_heads, self.head_dim,
                           convert(self.q), convert(self.k), convert(self.v), opt(self.q_bias),
                           opt(self.k_bias), opt(self.v_bias), opt(self.o), opt(self.o_bias),
                           {k: convert(v) for k, v in self.carried.items()})


def _linear(tensor: Array, transposed: bool) -> Array:
    return tensor.T if transposed and len(tensor.shape) == 2 else tensor


def _head_rows(tensor: Array) -> Array:
    heads, width, d = tensor.shape
    return _Ops(tensor).permute(tensor, (0, 2, 1)).reshape(heads * d, width)  # (H*d, in)


@dataclass(frozen=True)
class RowOrder:
    """SHARDED packings: model-parallel blocks and the order of q, k, v inside each."""

    shards: int = 1
    order: str = "qkv"


def row_order(layer: AttentionLayer) -> RowOrder:
    """The layer's block structure, declared by its layout record."""
    if layer.packing is not Packing.SHARDED:
        return RowOrder()
    from attnviz.layouts.registry import LAYOUTS_BY_NAME

    spec = LAYOUTS_BY_NAME.get(layer.layout)
    if spec is None:
        raise CheckpointError(f"layer '{layer.display_name}': unknown sharded layout "
                              f"'{layer.layout}'")
    return RowOrder(spec.shards, spec.order)


def unpack_rows(packed: Array, packing: Packing, heads: int, kv_heads: int,
                head_dim: int, blocks: RowOrder = RowOrder()) -> tuple[Array, Array, Array]:
    """Split fused rows (dim 0) into q (H*d, ...), k (Hkv*d, ...), v (Hkv*d, ...)."""
    rest = packed.shape[1:]
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    if packed.shape[0] != q_rows + 2 * kv_rows:
        raise HeadsError(f"{packed.shape[0]} fused rows do not hold H={heads}, Hkv={kv_heads}, "
                         f"d={head_dim}")
    if packing in (Packing.BLOCKED, Packing.SEPARATE):  # SEPARATE: torch MHA's packed bias
        q, k, v = _Ops(packed).split_rows(packed, [q_rows, kv_rows, kv_rows])
        return q, k, v
    if packing is Packing.SHARDED:
        shards = blocks.shards
        if kv_heads != heads or q_rows % shards:
            raise HeadsError(f"{shards} model-parallel blocks need H == Hkv and E={q_rows} "
                             f"divisible by {shards}")
        sharded = packed.reshape(shards, 3, q_rows // shards, *rest)  # (S, 3, E/S, ...)
        q, k, v = (sharded[:, blocks.order.index(role)].reshape(q_rows, *rest)  # (E, ...)
                   for role in "qkv")
        return q, k, v
    if packing is Packing.INTERLEAVED:
        per_head = packed.reshape(heads, 3, head_dim, *rest)  # (H, 3, d, ...)
        return (per_head[:, 0].reshape(q_rows, *rest), per_head[:, 1].reshape(kv_rows, *rest),
                per_head[:, 2].reshape(kv_rows, *rest))
    group = heads // kv_heads
    grouped = packed.reshape(kv_heads, group + 2, head_dim, *rest)  # (Hkv, H/Hkv + 2, d, ...)
    return (grouped[:, :group].reshape(q_rows, *rest),  # (H*d, ...)
            grouped[:, group].reshape(kv_rows, *rest),  # (Hkv*d, ...)
            grouped[:, group + 1].reshape(kv_rows, *rest))


def pack_rows(q: Array, k: Array, v: Array, packing: Packing, heads: int, kv_heads: int,
              head_dim: int, blocks: RowOrder = RowOrder()) -> Array:
    """Inverse of ``unpack_rows``."""
    ops, rest = _Ops(q), q.shape[1:]
    if packing in (Packing.BLOCKED, Packing.SEPARATE):
        return ops.cat([q, k, v])
    if packing is Packing.SHARDED:
        by_role = {"q": q, "k": k, "v": v}
        shards, rows = blocks.shards, q.shape[0]
        sharded = ops.stack([by_role[role].reshape(shards, rows // shards, *rest)  # (S, E/S, .)
                             for role in blocks.order], dim=1)  # (S, 3, E/S, ...)
        return sharded.reshape(3 * rows, *rest)
    if packing is Packing.INTERLEAVED:
        parts = [t.reshape(heads, head_dim, *rest) for t in (q, k, v)]  # each (H, d, ...)
        return ops.stack(parts, dim=1).reshape(3 * heads * head_dim, *rest)  # (H*3*d, ...)
    group = heads // kv_heads
    grouped = ops.cat([
        q.reshape(kv_heads, group, head_dim, *rest),  # (Hkv, g, d, ...)
        k.reshape(kv_heads, 1, head_dim, *rest),
        v.reshape(kv_heads, 1, head_dim, *rest),
    ], dim=1)  # (Hkv, g + 2, d, ...)
    return grouped.reshape((heads + 2 * kv_heads) * head_dim, *rest)


def _geometry(layer: AttentionLayer, heads: HeadsInfo) -> tuple[int, int, int]:
    if heads.num_heads is None or heads.num_kv_heads is None or heads.head_dim is None:
        raise HeadsError(f"layer '{layer.display_name}': number of heads unknown",
                         hint=f"pass {param('heads')} N (or {param('heads')} 'pattern=N') or "
                              f"{param('config')}")
    return heads.num_heads, heads.num_kv_heads, heads.head_dim


def split_heads(layer: AttentionLayer, heads: HeadsInfo,
                tensors: Mapping[str, Array]) -> HeadWeights:
    """Split one layer's stored tensors (by source key) into per-head weights."""
    num_heads, kv_heads, d = _geometry(layer, heads)
    keys, blocks = layer.keys, row_order(layer)
    if layer.packing is Packing.SEPARATE:
        wq, wk, wv = (tensors[keys[r]] for r in ("q", "k", "v"))
    elif layer.packing is Packing.PER_HEAD:  # TransformerLens: each head stored (in, d)
        wq, wk, wv = (_head_rows(tensors[keys[r]]) for r in ("q", "k", "v"))  # (H*d, in)
    elif layer.packing is Packing.KV_FUSED:
        wq = _linear(tensors[keys["q"]], layer.transposed)  # (H*d, E)
        kv = _linear(tensors[keys["kv"]], layer.transposed)  # (2*Hkv*d, kdim)
        wk, wv = _Ops(kv).split_rows(kv, [kv_heads * d, kv_heads * d])
    else:
        fused = _linear(tensors[keys["qkv"]], layer.transposed)  # (rows, E)
        wq, wk, wv = unpack_rows(fused, layer.packing, num_heads, kv_heads, d, blocks)
    if "qkv_bias" in keys:
        bq, bk, bv = unpack_rows(tensors[keys["qkv_bias"]], layer.packing, num_heads, kv_heads, d,
                                 blocks)
        biases: list[Array | None] = [bq, bk, bv]
    elif "kv_bias" in keys:
        kv_bias = tensors[keys["kv_bias"]]
        bk, bv = _Ops(kv_bias).split_rows(kv_bias, [kv_heads * d, kv_heads * d])
        biases = [tensors[keys["q_bias"]] if "q_bias" in keys else None, bk, bv]
    else:
        biases = [tensors[keys[r]] if r in keys else None for r in ("q_bias", "k_bias", "v_bias")]
    o = o_bias = None
    if "out" in keys and keys["out"] in tensors:  # absent when the caller skips the out projection
        wo = _linear(tensors[keys["out"]], layer.transposed)  # (E_out, H*d); per head (H, d, E)
        o = _Ops(wo).permute(wo, (0, 2, 1)) if layer.packing is Packing.PER_HEAD else \
            _Ops(wo).permute(wo.reshape(wo.shape[0], num_heads, d), (1, 0, 2))  # (H, E_out, d)
        o_bias = tensors.get(keys["out_bias"]) if "out_bias" in keys else None
    return HeadWeights(
        layer=layer, num_heads=num_heads, num_kv_heads=kv_heads, head_dim=d,
        q=wq.reshape(num_heads, d, wq.shape[1]),  # (H, d, E)
        k=wk.reshape(kv_heads, d, wk.shape[1]),  # (Hkv, d, kdim)
        v=wv.reshape(kv_heads, d, wv.shape[1]),  # (Hkv, d, vdim)
        q_bias=None if biases[0] is None else biases[0].reshape(num_heads, d),  # (H, d)
        k_bias=None if biases[1] is None else biases[1].reshape(kv_heads, d),  # (Hkv, d)
        v_bias=None if biases[2] is None else biases[2].reshape(kv_heads, d),
        o=o, o_bias=o_bias,
        carried={r: tensors[keys[r]] for r in CARRIED_ROLES if r in keys},
    )


def merge_heads(hw: HeadWeights) -> dict[str, Array]:
    """Rebuild the layer's stored tensors, under their source keys, bit for bit."""
    layer, keys = hw.layer, hw.layer.keys
    heads, kv_heads, d = hw.num_heads, hw.num_kv_heads, hw.head_dim
    wq = hw.q.reshape(heads * d, -1)  # (H*d, E)
    wk = hw.k.reshape(kv_heads * d, -1)  # (Hkv*d, kdim)
    wv = hw.v.reshape(kv_heads * d, -1)
    out: dict[str, Array] = {}
    ops, blocks = _Ops(hw.q), row_order(layer)
    if layer.packing is Packing.SEPARATE:
        out.update({keys["q"]: wq, keys["k"]: wk, keys["v"]: wv})
    elif layer.packing is Packing.PER_HEAD:  # back to (H, in, d) per head
        out.update({keys[r]: ops.permute(w, (0, 2, 1)) for r, w in zip("qkv", (hw.q, hw.k, hw.v),
                                                                         strict=True)})
    elif layer.packing is Packing.KV_FUSED:
        out[keys["q"]] = _linear(wq, layer.transposed)
        out[keys["kv"]] = _linear(ops.cat([wk, wv]), layer.transposed)  # (2*Hkv*d, kdim)
    else:
        fused = pack_rows(wq, wk, wv, layer.packing, heads, kv_heads, d, blocks)  # (rows, E)
        out[keys["qkv"]] = _linear(fused, layer.transposed)
    flat = [None if b is None else b.reshape(-1) for b in (hw.q_bias, hw.k_bias, hw.v_bias)]
    for packed_role, roles in (("qkv_bias", (0, 1, 2)), ("kv_bias", (1, 2))):
        if packed_role not in keys:
            continue
        parts = [flat[i] for i in roles]
        if any(b is None for b in parts):
            raise CheckpointError(f"layer '{layer.display_name}': the packed bias needs "
                                  f"{' and '.join('qkv'[i] for i in roles)} biases")
        if packed_role == "kv_bias":
            out[keys["kv_bias"]] = ops.cat(parts)
        else:
            bq, bk, bv = parts
            out[keys["qkv_bias"]] = pack_rows(bq, bk, bv, layer.packing, heads, kv_heads, d,
                                              blocks)
    if layer.packing is Packing.PER_HEAD:  # biases stay (H, d)
        flat = [hw.q_bias, hw.k_bias, hw.v_bias]
    for role, bias in zip(("q_bias", "k_bias", "v_bias"), flat, strict=True):
        if role in keys and bias is not None:
            out[keys[role]] = bias
    if "out" in keys and hw.o is not None and layer.packing is Packing.PER_HEAD:
        out[keys["out"]] = ops.permute(hw.o, (0, 2, 1))  # (H, d, E_out)
    elif "out" in keys and hw.o is not None:
        wo = ops.permute(hw.o, (1, 0, 2)).reshape(hw.o.shape[1], heads * d)  # (E_out, H*d)
        out[keys["out"]] = _linear(wo, layer.transposed)
    if "out_bias" in keys and hw.o_bias is not None:
        out[keys["out_bias"]] = hw.o_bias
    for role, tensor in hw.carried.items():
        out[keys[role]] = tensor
    return {name: ops.contiguous(tensor) for name, tensor in out.items()}


def source_keys(layer: AttentionLayer, *, out_proj: bool = True) -> list[str]:
    """The stored tensors ``split_heads`` reads for a layer."""
    roles = ["q", "k", "v", "qkv", "kv", "qkv_bias", "kv_bias", "q_bias", "k_bias", "v_bias",
             *CARRIED_ROLES]
    if out_proj:
        roles += ["out", "out_bias"]
    return [layer.keys[r] for r in roles if r in layer.keys]


def split_all(report: InspectReport) -> dict[str, HeadWeights]:
    """Every layer of an inspect report, split (torch tensors), by layer name."""
    ckpt = report.checkpoint
    return {item.layer.name: split_heads(item.layer, item.heads,
                                         {key: ckpt.read_tensor(key)
                                          for key in source_keys(item.layer)})
            for item in report.layers}


def split_layer(checkpoint: Checkpoint, name: str, heads: int | None = None) -> HeadWeights:
    """Notebook helper: split one layer of a loaded checkpoint (heads resolved as inspect does)."""
    from attnviz.inspection import analyse

    report = analyse(checkpoint, [f"{name}={heads}"] if heads else ())
    for item in report.layers:
        if item.layer.name == name:
            values = {key: checkpoint.read_tensor(key) for key in source_keys(item.layer)}
            return split_heads(item.layer, item.heads, values)
    names = ", ".join(r.layer.display_name for r in report.layers[:8])
    raise UsageError(f"no attention layer named '{name}'", path=checkpoint.path,
                     hint=f"layers: {names}")
