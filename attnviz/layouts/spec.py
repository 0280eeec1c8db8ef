"""Declared checkpoint layouts: what a layout record says, and what matching one yields.

A ``LayoutSpec`` is data: an anchor pattern naming the layer prefix, key templates for each
role, a packing, an orientation and a shape rule. ``{p}`` in a template is the layer prefix
(with its trailing dot, possibly empty) and ``{parent}`` the prefix one module up, for HF BERT
whose output projection sits beside ``attention.self`` rather than inside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum


class Packing(StrEnum):
    """How q, k and v rows are arranged in the stored tensors (Linear orientation)."""

    SEPARATE = "separate"  # q, k, v in their own tensors
    BLOCKED = "blocked"  # one tensor, rows [Q (Hq*d) | K (Hkv*d) | V (Hkv*d)]
    INTERLEAVED = "interleaved"  # one tensor, rows (H, 3, d): per head q, k, v
    GROUPED = "grouped"  # one tensor, rows (Hkv, H/Hkv + 2, d): a group's queries, then k, v
    SHARDED = "sharded"  # one tensor, rows (S, 3, E/S): model-parallel shards, each holding its
    #                      slice of q, k and v in the order the layout declares (CodeGen: q v k)
    KV_FUSED = "kv_fused"  # q in its own tensor, k and v in one tensor, rows [K | V]
    PER_HEAD = "per_head"  # q, k, v in their own tensors with a leading head axis, each head
    #                        stored (in, out): W_Q [H, E, d], W_O [H, d, E] (TransformerLens)


class ShapeRule(StrEnum):
    """Conditions on the fused tensor's (rows, cols), in stored orientation."""

    ANY = "any"
    ROWS_3X_COLS = "rows == 3 * cols"  # Linear [3E, E]
    COLS_3X_ROWS = "cols == 3 * rows"  # Conv1D [E, 3E]
    ROWS_NOT_3X_COLS = "rows != 3 * cols"  # grouped packings with fewer kv heads


class Evidence(StrEnum):
    """What an auxiliary tensor's shape says about heads."""

    NONE = "none"
    HEADS_LAST_DIM = "heads = last dim"  # relative position bias tables [..., H]
    HEAD_DIM_SIZE = "head_dim = size"  # q/k norms of size d


@dataclass(frozen=True)
class AuxTensor:
    """A non-projection tensor that belongs to the layer (norms, bias tables, mask buffers)."""

    role: str
    template: str
    evidence: Evidence = Evidence.NONE


@dataclass(frozen=True)
class LayoutSpec:
    """One checkpoint convention, declared as data."""

    name: str
    description: str
    anchor: str  # regex with group 'p' (layer prefix incl. trailing dot)
    packing: Packing
    q: str | None = None  # separate weights
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # fused weight
    kv: str | None = None  # fused k|v weight beside a separate q (GPT-2 cross-attention)
    out: tuple[str, ...] = ()  # output projection weight, first existing wins
    q_bias: str | None = None
    k_bias: str | None = None
    v_bias: str | None = None
    qkv_bias: str | None = None  # packed bias (fused, or torch MHA over separate weights)
    kv_bias: str | None = None
    out_bias: tuple[str, ...] = ()
    aux: tuple[AuxTensor, ...] = ()
    transposed: bool = False  # stored (in, out) like GPT-2 Conv1D
    shape_rule: ShapeRule = ShapeRule.ANY
    examples: str = ""
    # Which models write it (config.json model_type, or a training script's tag such as
    # 'nanogpt'). When key names and shapes fit several packings, the architecture decides.
    architectures: tuple[str, ...] = ()
    exclusive: bool = False  # only for those architectures (or when the architecture is unknown)
    not_for: tuple[str, ...] = ()  # architectures it must never be used for
    forbid: tuple[str, ...] = ()  # templates that must be absent (CodeGen's qkv_proj has no bias)
    shards: int = 1  # SHARDED: model-parallel blocks
    order: str = "qkv"  # SHARDED: order of q, k, v inside each block
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", re.compile(self.anchor))
        shapes = {
            "qkv": self.qkv is not None and self.q is None and self.kv is None,
            "q, k, v": None not in (self.q, self.k, self.v) and self.qkv is None,
            "q, kv": None not in (self.q, self.kv) and self.k is None and self.qkv is None,
        }
        if sum(shapes.values()) != 1:
            raise ValueError(f"layout {self.name}: declare qkv, or q, k and v, or q and kv")
        if sorted(self.order) != ["k", "q", "v"]:
            raise ValueError(f"layout {self.name}: order must be a permutation of 'qkv'")

    @property
    def semantics(self) -> tuple[object, ...]:
        """What decides the numbers a split yields: two layouts that share these agree."""
        return (self.packing, self.transposed, self.shards, self.order)


@dataclass(frozen=True)
class LayoutContext:
    """What is known about the model that wrote a checkpoint, beyond its keys and shapes."""

    architecture: str | None = None  # config.json model_type, or a tag like 'nanogpt'
    source: str = "unknown"  # where the architecture came from
    forced: str | None = None  # --layout NAME


def fill(template: str, prefix: str) -> str:
    """Expand ``{p}``/``{parent}`` for one layer prefix (prefix ends with '.' or is empty)."""
    parent = prefix[:-1].rsplit(".", 1)[0] + "." if prefix.count(".") > 1 else ""
    return template.format(p=prefix, parent=parent)


@dataclass(frozen=True)
class AttentionLayer:
    """An attention layer found in a checkpoint, before heads are known.

    Dims are in Linear orientation whatever the storage: ``q_rows`` = H*d, ``kv_rows`` =
    Hkv*d (None for grouped packings until H is known), ``embed_dim`` = input width of q.
    """

    name: str
    layout: str
    packing: Packing
    transposed: bool
    keys: dict[str, str]  # role -> tensor name (q, k, v, qkv, out, *_bias, aux roles)
    embed_dim: int
    kdim: int
    vdim: int
    q_rows: int
    kv_rows: int | None
    fused_rows: int | None
    out_features: int | None
    has_bias: bool
    dtype: str
    heads_evidence: tuple[tuple[str, int, str], ...] = ()  # (kind, value, tensor name)
    decided_by: str = "key names and shapes"  # what chose the layout among the candidates

    @property
    def display_name(self) -> str:
        return self.name or "(root)"


@dataclass(frozen=True)
class Unrecognised:
    """A tensor that looks like an attention projection but matches no layout."""

    name: str
    shape: tuple[int, ...]
    reason: str
