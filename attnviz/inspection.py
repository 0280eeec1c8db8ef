"""``inspect_checkpoint``: the attention layers of a checkpoint, as data (and as JSON)."""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from attnviz import __version__
from attnviz.checkpoint import Checkpoint, load_checkpoint
from attnviz.containers import ForeignObjectInfo
from attnviz.errors import AttnvizError, with_path
from attnviz.heads import HeadsInfo, parse_heads_option, resolve_heads, settings_from
from attnviz.heads_override import override_warnings
from attnviz.layouts import AttentionLayer, Unrecognised, find_attention_layers
from attnviz.layouts.context import layout_context
from attnviz.layouts.spec import LayoutContext
from attnviz.models.vision_registry import inferred_settings
from attnviz.selectors import natural_order, parse, resolve

JSON_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerReport:
    """One attention layer with its resolved heads; ``index``: its place in the checkpoint's
    layer order, the number every layer selector (``--layer 3``) and inspect's table use."""

    layer: AttentionLayer
    heads: HeadsInfo
    index: int = 0


@dataclass
class InspectReport:
    checkpoint: Checkpoint
    layers: list[LayerReport]
    unrecognised: list[Unrecognised]
    warnings: list[str] = field(default_factory=list)
    context: LayoutContext = field(default_factory=LayoutContext)
    # what a layer selector keeps (``select_layers``): indices into ``layers`` and tensor
    # names; None: everything
    selected: frozenset[int] | None = None
    shown_tensors: frozenset[str] | None = None

    @property
    def dtypes(self) -> dict[str, int]:
        return dict(Counter(t.dtype for t in self.checkpoint.tensors.values()).most_common())

    @property
    def code_objects(self) -> list[ForeignObjectInfo]:
        return [f for f in self.checkpoint.foreign_objects if f.names_code]

    def shows_layer(self, index: int) -> bool:
        return self.selected is None or index in self.selected

    def shows_tensor(self, name: str) -> bool:
        return self.shown_tensors is None or name in self.shown_tensors

    def __repr__(self) -> str:  # the default lists every tensor of the checkpoint
        from attnviz.notebook_tables import inspect_repr

        return inspect_repr(self)

    def _repr_html_(self) -> str:
        from attnviz.notebook_tables import inspect_html

        return inspect_html(self)


def analyse(checkpoint: Checkpoint, heads: Iterable[str] = (),
            layout: str | None = None) -> InspectReport:
    """Find and resolve the attention layers of an already loaded checkpoint.

    ``layout`` (``--layout NAME``) decides for tensors whose names and shapes fit several
    packings when no config.json ``model_type`` or stored training settings do.
    """
    overrides = parse_heads_option(heads)
    context = layout_context(checkpoint.config, checkpoint.root, layout)
    try:
        layers, unrecognised = find_attention_layers(checkpoint.tensors, context=context)
    except AttnvizError as error:
        raise with_path(error, checkpoint.path) from None
    # file order is model order (torch.save), unless the file sorts its keys as text
    # (safetensors): then natural order, so that 'layers.2' comes before 'layers.10'
    layers = [layers[i] for i in natural_order([layer.name for layer in layers])]
    # last: a recognised vision family's named default (DINO hub widths), reported as inferred
    settings = settings_from(checkpoint.config, checkpoint.root) + \
        inferred_settings(checkpoint.tensors, layers)
    reports = [
        LayerReport(layer, resolve_heads(layer, overrides=overrides, settings=settings,
                                         peers=layers), index)
        for index, layer in enumerate(layers)
    ]
    warnings = list(checkpoint.warnings)
    for item in checkpoint.foreign_objects:
        if item.names_code:
            warnings.append(
                f"DANGER: the file names code '{item.qualified_name}' ({item.where}); "
                "torch.load(weights_only=False) would run it. attnviz did not.")
    if checkpoint.metadata.get("format") == "attnviz-split":
        warnings.append("this is an attnviz split-qkv output (per-head tensors); its layers are "
                        "listed in the metadata, 'attnviz merge-qkv' rebuilds the source tensors")
    if checkpoint.tensors and not layers:
        warnings.append("no attention layers recognised")
    unknown = [r.layer.display_name for r in reports if r.heads.num_heads is None]
    if unknown:
        warnings.append(f"heads unknown for {len(unknown)} layer(s); pass --heads N "
                        "(or --heads 'pattern=N') or --config config.json")
    for pattern in {o.pattern for o in overrides if o.pattern}:
        if not any(fnmatch.fnmatchcase(r.layer.display_name, pattern) for r in reports):
            warnings.append(f"--heads pattern '{pattern}' matches no attention layer")
    warnings += override_warnings(reports)  # a count the file states, replaced: say so
    return InspectReport(checkpoint, reports, unrecognised, warnings, context)


def inspect_checkpoint(
    path: str | Path,
    *,
    heads: Iterable[str] = (),
    config: str | Path | None = None,
    key: str | None = None,
    layout: str | None = None,
) -> InspectReport:
    """Load a checkpoint's metadata and report its attention layers; reads no tensor values."""
    return analyse(load_checkpoint(path, key=key, config=config), heads, layout)


def select_layers(report: InspectReport, selector: str, *, param: str = "layer"
                  ) -> InspectReport:
    """The report with ``selected``: the layers ``selector`` picks (attnviz.selectors grammar:
    index, range, name, glob, list), and ``shown_tensors``: the tensors of those layers plus
    every tensor a name or glob term matches (``'*.bias'`` lists tensors where it picks no
    layer). A term that matches no layer and no tensor raises ``UsageError`` listing the layers
    with their indices."""
    tensors = report.checkpoint.tensors
    names = [item.layer.display_name for item in report.layers]
    try:
        parsed = parse(selector, param=param)
        indices = resolve(parsed, names, param=param, also=tensors)
    except AttnvizError as error:
        raise with_path(error, report.checkpoint.path) from None
    if parsed.keyword is not None:
        return replace(report, selected=None, shown_tensors=None)
    chosen = [report.layers[i] for i in indices]
    shown = {key for item in chosen for key in item.layer.keys.values()}
    for term in parsed.terms:
        if term.kind == "name" and term.text in tensors:
            shown.add(term.text)
        elif term.kind == "glob":
            shown.update(n for n in tensors if fnmatch.fnmatchcase(n, term.text))
    return replace(report, selected=frozenset(indices), shown_tensors=frozenset(shown))


def report_to_json(report: InspectReport, *, tensor_filter: str | None = None) -> dict[str, Any]:
    """The documented ``--json`` document (docs/json-schema.md), schema version 1."""
    ckpt = report.checkpoint
    tensors = [
        {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "nbytes": t.nbytes}
        for t in ckpt.tensors.values()
        if (tensor_filter is None or fnmatch.fnmatchcase(t.name, tensor_filter))
        and report.shows_tensor(t.name)
    ]
    attention = []
    for item in report.layers:
        layer, heads = item.layer, item.heads
        if (tensor_filter and not fnmatch.fnmatchcase(layer.display_name, tensor_filter)) or \
                not report.shows_layer(item.index):
            continue
        keys = layer.keys
        attention.append({
            "index": item.index,
            "name": layer.name,
            "layout": layer.layout,
            "layout_decided_by": layer.decided_by,
            "packing": layer.packing.value,
            "transposed": layer.transposed,
            "embed_dim": layer.embed_dim,
            "kdim": layer.kdim,
            "vdim": layer.vdim,
            "q_dim": layer.q_rows,
            "kv_dim": layer.kv_rows,
            "num_heads": heads.num_heads,
            "num_heads_source": heads.source,
            "num_heads_replaced": None if heads.replaced is None or not heads.overridden else
            {"count": heads.replaced.count, "source": heads.replaced.source},
            "num_kv_heads": heads.num_kv_heads,
            "num_kv_heads_source": heads.kv_source,
            "head_dim": heads.head_dim,
            "has_bias": layer.has_bias,
            "dtype": layer.dtype,
            "tensors": {
                "q": keys.get("q", keys.get("qkv")),
                "k": keys.get("k", keys.get("kv", keys.get("qkv"))),
                "v": keys.get("v", keys.get("kv", keys.get("qkv"))),
                "out": keys.get("out"),
                "q_bias": keys.get("q_bias", keys.get("qkv_bias")),
                "k_bias": keys.get("k_bias", keys.get("kv_bias", keys.get("qkv_bias"))),
                "v_bias": keys.get("v_bias", keys.get("kv_bias", keys.get("qkv_bias"))),
                "out_bias": keys.get("out_bias"),
            },
            "other_tensors": {role: name for role, name in keys.items()
                              if role not in {"q", "k", "v", "qkv", "kv", "out", "q_bias",
                                              "k_bias", "v_bias", "qkv_bias", "kv_bias",
                                              "out_bias"}},
        })
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "attnviz_version": __version__,
        "path": str(ckpt.path),
        "format": ckpt.format,
        "files": [str(p) for p in ckpt.files],
        "container_key": ckpt.container_key,
        "other_containers": ckpt.other_containers,
        "stripped_prefix": ckpt.stripped_prefix,
        "config": str(ckpt.config_path) if ckpt.config_path else None,
        "architecture": report.context.architecture,
        "architecture_source": report.context.source,
        "num_tensors": len(ckpt.tensors),
        "num_parameters": ckpt.num_parameters,
        "total_bytes": ckpt.total_bytes,
        "dtypes": report.dtypes,
        "metadata": ckpt.metadata,
        "tensors": tensors,
        "attention": attention,
        "unrecognised": [{"name": u.name, "shape": list(u.shape), "reason": u.reason}
                         for u in report.unrecognised],
        "foreign_objects": [
            {"name": f.qualified_name, "names_code": f.names_code, "where": f.where,
             "detail": f.detail, "attributes": f.attributes}
            for f in ckpt.foreign_objects
        ],
        "warnings": report.warnings,
    }
