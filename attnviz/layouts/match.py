"""Matching the registry's layouts against a checkpoint's tensor names and shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol

from attnviz.errors import AmbiguousLayoutError, UsageError, param
from attnviz.layouts.registry import LAYOUTS, PROJECTION_LEAVES, PROJECTION_NAMES
from attnviz.layouts.spec import (
    AttentionLayer,
    Evidence,
    LayoutContext,
    LayoutSpec,
    Packing,
    ShapeRule,
    Unrecognised,
    fill,
)


class HasShape(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> str: ...


class NoMatch(Exception):
    """This spec does not fit this layer; the message says why (kept for 'unrecognised')."""


def _linear(shape: tuple[int, ...], transposed: bool, what: str) -> tuple[int, int]:
    """(out_features, in_features) of a stored 2-D weight."""
    if len(shape) != 2:
        raise NoMatch(f"{what} has shape {list(shape)}, expected 2-D")
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def _rule_holds(rule: ShapeRule, rows: int, cols: int) -> bool:
    return {
        ShapeRule.ANY: True,
        ShapeRule.ROWS_3X_COLS: rows == 3 * cols,
        ShapeRule.COLS_3X_ROWS: cols == 3 * rows,
        ShapeRule.ROWS_NOT_3X_COLS: rows != 3 * cols,
    }[rule]


class _Layer:
    """Lookups for one candidate prefix: existing, unclaimed tensors by template."""

    def __init__(self, prefix: str, tensors: Mapping[str, HasShape], claimed: set[str]):
        self.prefix = prefix
        self.tensors = tensors
        self.claimed = claimed
        self.keys: dict[str, str] = {}

    def find(self, role: str, templates: tuple[str, ...] | str | None) -> str | None:
        if templates is None:
            return None
        for template in (templates,) if isinstance(templates, str) else templates:
            name = fill(template, self.prefix)
            if name in self.tensors and name not in self.claimed:
                self.keys[role] = name
                return name
        return None

    def shape(self, role: str) -> tuple[int, ...]:
        return tuple(self.tensors[self.keys[role]].shape)

    def check_vector(self, role: str, size: int) -> None:
        if role in self.keys and self.shape(role) != (size,):
            shape = list(self.shape(role))
            raise NoMatch(f"{self.keys[role]} has shape {shape}, expected [{size}]")


def _head_shape(layer: _Layer, role: str) -> tuple[int, ...]:
    shape = layer.shape(role)
    if len(shape) != 3:
        raise NoMatch(f"{layer.keys[role]} has shape {list(shape)}, expected 3-D [H, in, out]")
    return shape


def _match_per_head(spec: LayoutSpec, prefix: str, tensors: Mapping[str, HasShape],
                    claimed: set[str]) -> AttentionLayer:
    """TransformerLens: W_Q/W_K/W_V [H, E, d], W_O [H, d, E], biases [H, d]; H is in the
    shapes, so the layer carries its own head count."""
    layer = _Layer(prefix, tensors, claimed)
    for role, template in (("q", spec.q), ("k", spec.k), ("v", spec.v)):
        if template is None or layer.find(role, template) is None:
            raise NoMatch(f"no {role} projection ({fill(str(template), prefix)})")
    (heads, embed, d), (kv_heads, kdim, k_d), (v_heads, vdim, v_d) = (
        _head_shape(layer, role) for role in ("q", "k", "v"))
    if (k_d, v_d, v_heads) != (d, d, kv_heads) or heads % kv_heads:
        raise NoMatch(f"q/k/v shapes {[heads, embed, d]}/{[kv_heads, kdim, k_d]}/"
                      f"{[v_heads, vdim, v_d]} fit no head split")
    out_features = None
    if layer.find("out", spec.out) is not None:
        out_heads, out_d, out_features = _head_shape(layer, "out")
        if (out_heads, out_d) != (heads, d):
            raise NoMatch(f"{layer.keys['out']} has shape {list(layer.shape('out'))}, expected "
                          f"[{heads}, {d}, E]")
        layer.find("out_bias", spec.out_bias)
        layer.check_vector("out_bias", out_features)
    for role, template, count in (("q_bias", spec.q_bias, heads), ("k_bias", spec.k_bias,
                                  kv_heads), ("v_bias", spec.v_bias, kv_heads)):
        if layer.find(role, template) is not None and layer.shape(role) != (count, d):
            raise NoMatch(f"{layer.keys[role]} has shape {list(layer.shape(role))}, expected "
                          f"[{count}, {d}]")
    for aux in spec.aux:
        layer.find(aux.role, aux.template)
    return AttentionLayer(
        name=prefix[:-1] if prefix.endswith(".") else prefix, layout=spec.name,
        packing=spec.packing, transposed=spec.transposed, keys=dict(layer.keys),
        embed_dim=embed, kdim=kdim, vdim=vdim, q_rows=heads * d, kv_rows=kv_heads * d,
        fused_rows=None, out_features=out_features,
        has_bias=any(r.endswith("bias") for r in layer.keys), dtype=tensors[layer.keys["q"]].dtype,
        heads_evidence=(("num_heads", heads, layer.keys["q"]),))


def _match_one(spec: LayoutSpec, prefix: str, tensors: Mapping[str, HasShape],
               claimed: set[str]) -> AttentionLayer:
    if spec.packing is Packing.PER_HEAD:
        return _match_per_head(spec, prefix, tensors, claimed)
    layer = _Layer(prefix, tensors, claimed)
    for absent in spec.forbid:
        if fill(absent, prefix) in tensors:
            raise NoMatch(f"{fill(absent, prefix)} exists; {spec.name} has none")
    out_name = layer.find("out", spec.out)
    out_features = out_in = None
    if out_name is not None:
        out_features, out_in = _linear(layer.shape("out"), spec.transposed, out_name)

    fused_rows: int | None = None
    if spec.qkv is not None:
        qkv = layer.find("qkv", spec.qkv)
        if qkv is None:
            raise NoMatch("no fused qkv tensor")
        stored = layer.shape("qkv")
        if len(stored) != 2 or not _rule_holds(spec.shape_rule, stored[0], stored[1]):
            raise NoMatch(f"{qkv} has shape {list(stored)}; {spec.name} needs "
                          f"{spec.shape_rule.value}")
        rows, embed = _linear(stored, spec.transposed, qkv)
        fused_rows = rows
        if spec.packing is Packing.INTERLEAVED or out_in is None:
            if spec.packing is Packing.GROUPED and out_in is None:
                q_rows = embed  # without an output projection assume H*d == E
            elif rows % 3:
                raise NoMatch(f"{qkv} has {rows} rows, not divisible by 3")
            else:
                q_rows = rows // 3
        else:
            q_rows = out_in
        kv_rows: int | None = (rows - q_rows) // 2
        if kv_rows is None or kv_rows <= 0 or q_rows + 2 * kv_rows != rows or kv_rows > q_rows:
            raise NoMatch(f"{qkv} has {rows} rows, which do not split into q={q_rows} + 2 k/v")
        if spec.packing is Packing.SHARDED and (q_rows != kv_rows or rows % (3 * spec.shards)):
            raise NoMatch(f"{qkv} has {rows} rows, which do not split into {spec.shards} "
                          "blocks of q, k and v")
        kdim = vdim = embed
    elif spec.kv is not None:
        for role, wanted in (("q", spec.q), ("kv", spec.kv)):
            if wanted is None or layer.find(role, wanted) is None:
                raise NoMatch(f"no {role} projection ({fill(str(wanted), prefix)})")
        q_rows, embed = _linear(layer.shape("q"), spec.transposed, layer.keys["q"])
        kv_fused, kdim = _linear(layer.shape("kv"), spec.transposed, layer.keys["kv"])
        vdim = kdim
        if kv_fused % 2 or q_rows % (kv_fused // 2 or 1):
            raise NoMatch(f"{layer.keys['kv']} has {kv_fused} rows, which do not split into "
                          "k and v")
        kv_rows, fused_rows = kv_fused // 2, kv_fused
    else:
        for role, template in (("q", spec.q), ("k", spec.k), ("v", spec.v)):
            if template is None or layer.find(role, template) is None:
                raise NoMatch(f"no {role} projection ({fill(str(template), prefix)})")
        q_rows, embed = _linear(layer.shape("q"), False, layer.keys["q"])
        k_rows, kdim = _linear(layer.shape("k"), False, layer.keys["k"])
        v_rows, vdim = _linear(layer.shape("v"), False, layer.keys["v"])
        if k_rows != v_rows or q_rows % k_rows:
            raise NoMatch(f"q/k/v rows {q_rows}/{k_rows}/{v_rows} fit no head split")
        kv_rows = k_rows
    if out_in is not None and spec.packing in (Packing.SEPARATE, Packing.KV_FUSED) and \
            out_in != q_rows:
        raise NoMatch(f"{out_name} takes {out_in} inputs but q has {q_rows} rows")

    layer.find("qkv_bias", spec.qkv_bias)
    layer.find("kv_bias", spec.kv_bias)
    layer.find("q_bias", spec.q_bias)
    layer.find("k_bias", spec.k_bias)
    layer.find("v_bias", spec.v_bias)
    layer.find("out_bias", spec.out_bias)
    layer.check_vector("qkv_bias", fused_rows or q_rows + 2 * kv_rows)
    layer.check_vector("kv_bias", 2 * kv_rows)
    layer.check_vector("q_bias", q_rows)
    layer.check_vector("k_bias", kv_rows)
    layer.check_vector("v_bias", kv_rows)
    if out_features is not None:
        layer.check_vector("out_bias", out_features)

    evidence: list[tuple[str, int, str]] = []
    for aux in spec.aux:
        name = layer.find(aux.role, aux.template)
        if name is None:
            continue
        shape = layer.shape(aux.role)
        if aux.evidence is Evidence.HEADS_LAST_DIM and len(shape) >= 2 and shape[-1] > 0:
            evidence.append(("num_heads", shape[-1], name))
        elif aux.evidence is Evidence.HEAD_DIM_SIZE and len(shape) == 1 and 0 < shape[0] < q_rows:
            evidence.append(("head_dim", shape[0], name))

    main = layer.keys.get("qkv") or layer.keys["q"]
    return AttentionLayer(
        name=prefix[:-1] if prefix.endswith(".") else prefix,
        layout=spec.name,
        packing=spec.packing,
        transposed=spec.transposed,
        keys=dict(layer.keys),
        embed_dim=embed,
        kdim=kdim,
        vdim=vdim,
        q_rows=q_rows,
        kv_rows=kv_rows,
        fused_rows=fused_rows,
        out_features=out_features,
        has_bias=any(r.endswith("bias") and not r.startswith("bias_") for r in layer.keys),
        dtype=tensors[main].dtype,
        heads_evidence=tuple(evidence),
    )


def _looks_like_projection(name: str) -> bool:
    parts = name.split(".")
    if parts[-1] in PROJECTION_LEAVES:
        return True
    return len(parts) >= 2 and parts[-1] in {"weight", "bias"} and parts[-2] in PROJECTION_NAMES


def _describe(spec: LayoutSpec) -> str:
    writers = f", {'/'.join(spec.architectures)}" if spec.architectures else ""
    return f"{spec.name} ({spec.packing.value}{writers})"


def _resolve(name: str, matched: list[tuple[LayoutSpec, AttentionLayer]],
             context: LayoutContext, strict: bool) -> AttentionLayer | None:
    """Choose among the layouts whose keys and shapes all fit one tensor, or say it cannot."""
    arch = context.architecture
    fits = [(s, lay) for s, lay in matched
            if arch is None or (arch not in s.not_for and (not s.exclusive or
                                                           arch in s.architectures))]
    decided = "key names and shapes"
    if arch is not None and (known := [(s, lay) for s, lay in fits if arch in s.architectures]):
        fits, decided = known, f"architecture '{arch}' ({context.source})"
    if not fits:
        return None
    if len({s.semantics for s, _ in fits}) > 1:
        if strict:
            candidates = " or ".join(_describe(s) for s, _ in fits)
            layer = fits[0][1].display_name
            raise AmbiguousLayoutError(
                f"layer '{layer}' ({name}) fits {candidates}, which split it differently, and "
                f"nothing says which model wrote the file ({context.source})",
                hint=f"pass {param('layout')} with one of them, or {param('config')} with the "
                     "model's config.json")
        decided = "first of several candidates (names only)"
    return dataclasses.replace(fits[0][1], decided_by=decided)


def find_attention_layers(
    tensors: Mapping[str, HasShape], layouts: tuple[LayoutSpec, ...] = LAYOUTS, *,
    context: LayoutContext | None = None, strict: bool = True,
) -> tuple[list[AttentionLayer], list[Unrecognised]]:
    """Every attention layer the registry recognises, in checkpoint order, and the leftovers.

    When a tensor fits several layouts that would split it differently, the architecture in
    ``context`` decides; without one, ``strict`` raises ``AmbiguousLayoutError`` listing the
    candidates (``strict=False`` takes the first: for finding module names, not for numbers).
    ``context.forced`` (``--layout``) is the only candidate for tensors its anchor names.
    """
    context = context or LayoutContext()
    if context.forced is not None:
        forced = next((s for s in layouts if s.name == context.forced), None)
        if forced is None:
            raise UsageError(f"{param('layout')} {context.forced} is not a known layout",
                             hint="known: " + ", ".join(s.name for s in layouts), param="layout")
        if not any(forced.pattern.match(name) for name in tensors):
            needs = forced.anchor.split(")")[-1].replace("\\", "").rstrip("$")
            raise UsageError(f"{param('layout')} {context.forced} fits no tensor of this "
                             f"checkpoint (it needs a tensor named like *{needs})",
                             hint=f"run 'attnviz inspect' without {param('layout')} to see what "
                                  "it holds", param="layout")
    order = {name: index for index, name in enumerate(tensors)}
    claimed: set[str] = set()
    decided: set[str] = set()
    layers: list[AttentionLayer] = []
    reasons: dict[str, str] = {}
    forced_used = False
    for spec in layouts:
        for name in tensors:
            if name in claimed or name in decided or spec.pattern.match(name) is None:
                continue
            decided.add(name)
            rivals = [s for s in layouts if s.pattern.match(name)]
            if context.forced is not None and any(s.name == context.forced for s in rivals):
                rivals = [s for s in rivals if s.name == context.forced]
            matched: list[tuple[LayoutSpec, AttentionLayer]] = []
            for rival in rivals:
                match = rival.pattern.match(name)
                assert match is not None
                try:
                    matched.append((rival, _match_one(rival, match.group("p"), tensors,
                                                      claimed)))
                except NoMatch as why:
                    reasons.setdefault(name, f"{rival.name}: {why}")
            if context.forced is not None and rivals[0].name == context.forced:
                if not matched:
                    raise UsageError(f"{param('layout')} {context.forced} does not fit {name}: "
                                     f"{reasons.get(name, 'no match')}", param="layout")
                forced_used = True
                chosen: AttentionLayer | None = dataclasses.replace(matched[0][1],
                                                                    decided_by="--layout")
            else:
                chosen = _resolve(name, matched, context, strict)
            if chosen is None:
                reasons.setdefault(name, f"no layout fits architecture '{context.architecture}'")
                continue
            layers.append(chosen)
            claimed.update(chosen.keys.values())
    if context.forced is not None and not forced_used:
        raise UsageError(f"{param('layout')} {context.forced} fits no tensor of this checkpoint",
                         hint=f"run 'attnviz inspect' without {param('layout')} to see what it "
                              "holds", param="layout")
    layers.sort(key=lambda item: order[item.keys.get("qkv") or item.keys["q"]])
    unrecognised = [
        Unrecognised(name, tuple(info.shape), reasons.get(name, "no layout uses these key names"))
        for name, info in tensors.items()
        if name not in claimed and _looks_like_projection(name)
    ]
    return layers, unrecognised
