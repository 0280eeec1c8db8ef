"""``attnviz heads``: what every head does, in numbers. One streamed forward pass per input
feeds ``HeadStatistics`` (so long inputs never hold a layer's full maps), token probes run as a
second pass, and ``head_roles`` turns the statistics into roles. ``atlas_to_json`` is the
versioned document (``SCHEMA``); ``atlas_from_maps`` builds the same atlas from maps that were
captured whole (the HTML report)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnviz import __version__
from attnviz.atomic import atomic_output, check_output_path
from attnviz.capture import capture_attention
from attnviz.checkpoint import load_checkpoint
from attnviz.errors import UsageError, param
from attnviz.head_probes import DEFAULT_BLOCK, Probe, make_probe, parse_probes
from attnviz.head_roles import ROLES, assign_roles, role_definitions
from attnviz.head_stats import DEFINITIONS, STATISTICS, HeadStatistics, LayerStats
from attnviz.heads_override import check_captured_heads, override_warnings
from attnviz.inspection import InspectReport, analyse
from attnviz.models.sources import LoadedModel, is_hf_directory, load_model
from attnviz.reducers import MapReducer, feed_whole, reduce_maps
from attnviz.selectors import order_like, parse, select
from attnviz.sequence_inputs import PreparedCall, SequenceRequest, prepare, run_forward

SCHEMA = "attnviz.heads/1"
FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
CROSS_NAMES = ("multihead_attn", "encoder_attn", "EncDecAttention", "crossattention",
               "cross_attn", "cross_attention")
MAX_PREFIX = 16  # CLS + registers an image model may put before its patches


@dataclass(frozen=True)
class HeadEntry:
    """One head: its top role, every role it holds, each role's score and every statistic
    (NaN where undefined: positional statistics of cross-attention, probes not run)."""

    head: int
    top: str | None
    held: tuple[str, ...]
    scores: dict[str, float]
    statistics: dict[str, float]


@dataclass
class LayerEntry:
    index: int  # the layer's place in inspect's order: what --layer N selects
    name: str
    rows: int  # query rows the statistics average over (every input and batch item)
    self_attention: bool
    heads: list[HeadEntry]
    prefix_tokens: int = 0  # CLS + registers before an image layer's patches (0: none)


@dataclass
class HeadAtlas:
    model: str
    checkpoint: str
    source: str  # the input in words
    window: int
    prefix_tokens: int  # CLS + register tokens of an image model (0: none / not an image)
    layers: list[LayerEntry]
    probe: Probe | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: Path | None = None  # the figure, when one was asked for


def build_layers(stats: Mapping[str, LayerStats], reference: Sequence[str] = (),
                 probe_stats: Mapping[str, LayerStats] | None = None, layer: str = "all",
                 prefixes: Mapping[str, int] | None = None) -> list[LayerEntry]:
    """Layers in inspect's order (``reference``: the checkpoint's layer names), the ones
    ``layer`` selects, each head with its roles; probe statistics joined in by layer name;
    ``prefixes``: the CLS + register count of image layers (others have no ``prefix``)."""
    names = list(dict.fromkeys([*stats, *(probe_stats or {})]))
    ordered, aliases = order_like(names, reference)
    shown = [name or "(root)" for name in ordered]
    chosen = select(layer, shown, aliases=[None if a is None else a or "(root)"
                                           for a in aliases])
    out = []
    for index in range(len(ordered)) if chosen is None else chosen:
        name = ordered[index]
        layer_stats = stats.get(name)
        probed = (probe_stats or {}).get(name)
        main = layer_stats or probed
        assert main is not None
        values = dict(layer_stats.values) if layer_stats is not None else {
            k: torch.full((main.heads,), math.nan) for k in STATISTICS}
        prefix = (prefixes or {}).get(name, 0)
        values["prefix"] = main.prefix_mass(prefix) if prefix else torch.full((main.heads,),
                                                                               math.nan)
        if probed is not None:
            values.update({k: v for k, v in probed.values.items() if k in probed.probes})
        heads = []
        for head, roles in enumerate(assign_roles(values)):
            heads.append(HeadEntry(head, roles.top, roles.held, roles.scores,
                                   {k: float(v[head]) for k, v in values.items()}))
        out.append(LayerEntry(index, name or "(root)", main.rows, main.self_attention, heads,
                              prefix))
    return out


def atlas_from_maps(maps: Mapping[str, torch.Tensor], *, reference: Sequence[str] = (),
                    window: int = 2, prefix_tokens: int = 0,
                    cross: Callable[[str], bool] = lambda name: False, model: str = "",
                    checkpoint: str = "", source: str = "") -> HeadAtlas:
    """The atlas of maps captured whole ({layer: (B, H, Lq, Lk)}), e.g. the report's.
    ``cross``: layers whose rows and keys are different tokens (see ``is_cross``)."""
    stats = HeadStatistics(window=window, leading=max(MAX_PREFIX, prefix_tokens))
    reduce_maps(dict(maps), stats)
    layers = {k: v.as_cross() if cross(k) else v for k, v in stats.layers.items()}
    return HeadAtlas(model, checkpoint, source, window, prefix_tokens, build_layers(
        layers, reference, prefixes=dict.fromkeys(layers, prefix_tokens)))


def atlas_data(atlas: HeadAtlas) -> dict[str, Any]:
    """Plain JSON-able data for pages: ``atlas_to_json`` (NaN as None)."""
    return atlas_to_json(atlas)


def _number(value: float) -> float | None:
    return None if not math.isfinite(value) else round(value, 6)


def atlas_to_json(atlas: HeadAtlas) -> dict[str, Any]:
    """The ``attnviz heads --json`` document (docs/json-schema.md, section heads)."""
    statistics = {name: DEFINITIONS[name] for name in STATISTICS}
    statistics["local"] += f" (w = {atlas.window})"
    layers = []
    for layer in atlas.layers:
        heads = [{"head": h.head, "top_role": h.top, "roles": list(h.held),
                  "top_score": None if h.top is None else _number(h.scores[h.top]),
                  "scores": {role.name: _number(h.scores.get(role.name, math.nan))
                             for role in ROLES},
                  "statistics": {k: _number(v) for k, v in h.statistics.items()}}
                 for h in layer.heads]
        layers.append({"index": layer.index, "name": layer.name, "rows": layer.rows,
                       "self_attention": layer.self_attention, "num_heads": len(layer.heads),
                       "prefix_tokens": layer.prefix_tokens, "heads": heads})
    return {"schema": SCHEMA, "attnviz_version": __version__, "checkpoint": atlas.checkpoint,
            "model": atlas.model, "input": atlas.source, "window": atlas.window,
            "prefix_tokens": atlas.prefix_tokens,
            "probe": None if atlas.probe is None else atlas.probe.as_json(),
            "statistics": statistics, "roles": role_definitions(), "layers": layers,
            "notes": list(atlas.notes), "warnings": list(atlas.warnings)}


def is_cross(name: str, prepared: PreparedCall | None = None) -> bool:
    """A cross-attention layer: rows and keys on different sides (HF), or a module name that
    says so (nn.TransformerDecoderLayer's and DETR's ``multihead_attn``)."""
    base = name.split("#")[0]
    if prepared is not None and prepared.layer_sides is not None:
        rows, cols = prepared.layer_sides(base)
        if rows != cols:
            return True
    return any(marker in base.rsplit(".", 1)[-1] for marker in CROSS_NAMES)


def run_streamed(loaded: LoadedModel, report: InspectReport, request: SequenceRequest,
                 reduce: MapReducer) -> tuple[PreparedCall, dict[str, tuple[int, ...]]]:
    """One forward pass of ``loaded`` on ``request``, each layer's maps streamed to
    ``reduce`` (banded models, whose maps are reshaped after the pass, captured whole first);
    returns the call and each layer's map shape (B, H, Lq, Lk)."""
    from attnviz.models.hf_maps import adapt_maps, is_banded

    prepared = prepare(loaded, request)
    model_type = getattr(getattr(loaded.model, "config", None), "model_type", None)
    banded = loaded.kind == "hf" and is_banded(model_type)
    with torch.no_grad(), capture_attention(loaded.model,
                                            reduce=None if banded else reduce) as maps:
        run_forward(prepared, loaded.description)
    check_captured_heads(maps, report.layers, loaded.description)
    if banded:
        adapt_maps(maps, loaded.model, prepared.inputs)
        for name, tensor in maps.maps.items():  # one layer's dense maps at a time
            if "banded" in maps.routes.get(name, ""):
                tensor = unband(tensor)
            feed_whole(reduce, name, tensor)
            maps.shapes[name] = tuple(tensor.shape)
    return prepared, dict(maps.shapes)


def unband(band: torch.Tensor) -> torch.Tensor:
    """Banded maps (B, H, L, 2w + 1), column j of row i being key i - w + j (Longformer), as
    the dense (B, H, L, L) maps they stand for: keys outside the band have probability 0."""
    batch, heads, length, width = band.shape
    w = (width - 1) // 2
    padded = band.new_zeros(batch, heads, length, length + width)  # key k at column k + w
    columns = torch.arange(length)[:, None] + torch.arange(width)[None, :]  # (L, 2w + 1)
    padded.scatter_(-1, columns.expand(batch, heads, length, width).to(band.device), band)
    return padded[..., w:w + length]  # (B, H, L, L)


def _has_input(request: SequenceRequest) -> bool:
    return any(v is not None for v in (request.text, request.tokens, request.input_file,
                                       request.seq_len, request.audio, request.image))


def _image_prefix(loaded: LoadedModel, prepared: PreparedCall,
                  shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """HF vision layers and their CLS + register count: tokens beyond the patch grid."""
    pixels = prepared.inputs.get("pixel_values")
    config = getattr(loaded.model, "config", None)
    config = getattr(config, "vision_config", None) or config
    patch = getattr(config, "patch_size", None)
    if pixels is None or not isinstance(patch, int) or patch < 1:
        return {}
    grid = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
    only_images = getattr(loaded.model, "main_input_name", "") == "pixel_values"
    side = prepared.layer_sides
    found = {}
    for key, shape in shapes.items():
        image = only_images or (side is not None and side(key.split("#")[0]) == ("image",
                                                                                  "image"))
        if image and shape[-1] == shape[-2] and 0 < shape[-1] - grid <= MAX_PREFIX:
            found[key] = shape[-1] - grid
    return found


def _rebuilt_image(path: Path, report: InspectReport, request: SequenceRequest, window: int
                   ) -> tuple[dict[str, LayerStats], dict[str, int], str, list[str]]:
    """A ViT or DETR rebuilt from the file (attnviz.image_heatmap): short maps, whole."""
    from attnviz.image_heatmap import ImageOptions, image_figure

    assert request.image is not None
    figure, maps, description = image_figure(path, report.checkpoint, report,
                                             ImageOptions(request.image))
    prefix = int((figure.metadata or {}).get("prefix_tokens", "0"))
    stats = HeadStatistics(window=window, leading=max(MAX_PREFIX, prefix))
    reduce_maps(maps.maps, stats)
    layers = {k: v.as_cross() if is_cross(k) else v for k, v in stats.layers.items()}
    return layers, dict.fromkeys(layers, prefix), description, list(figure.notes)


def head_atlas(checkpoint: str | Path, request: SequenceRequest | None = None, *,
               probes: Iterable[str] = (), layer: str = "all", window: int = 2,
               block: int = DEFAULT_BLOCK, output: str | Path | None = None,
               title: str | None = None, factory: str | None = None, strict: bool = True,
               heads: Iterable[str] = (), config: str | Path | None = None,
               key: str | None = None, force: bool = False, norm_first: bool = False,
               activation: str = "relu", attn_implementation: str = "auto",
               layout: str | None = None) -> HeadAtlas:
    """Per-head statistics and roles of the checkpoint's model on ``request`` (and on token
    probes: ``probes`` 'induction', 'duplicate'); the figure to ``output`` when given."""
    path = Path(checkpoint)
    request = request or SequenceRequest()
    chosen_probes = parse_probes(probes)
    parse(layer, allow_mean=False)
    if window < 1:
        raise UsageError(f"{param('window')} {window}: use a whole number >= 1", param="window")
    if not _has_input(request) and not chosen_probes:
        raise UsageError(f"give an input ({param('text')}, {param('tokens')}, "
                         f"{param('input_file')}, {param('seq_len')}, {param('image')}) or "
                         f"{param('probes')}", path=path)
    if attn_implementation != "auto" and not is_hf_directory(path):
        raise UsageError(f"{param('attn_implementation')} applies to HF model directories only",
                         param="attn_implementation")
    out = Path(output) if output is not None else None
    ckpt = load_checkpoint(path, key=key, config=config)
    if out is not None:
        if out.suffix.lower() not in FIGURE_SUFFIXES:
            raise UsageError(f"{param('output')} {out.name}: use a .png, .svg or .pdf file name",
                             param="output")
        reads = [p for p in (request.input_file, request.image, request.audio,
                             request.tgt_input) if p is not None]
        check_output_path(out, [path, *ckpt.inputs, *reads], force=force)
    report = analyse(ckpt, heads, layout=layout)
    reference = [item.layer.name for item in report.layers]
    if request.image is not None and not is_hf_directory(path):
        if chosen_probes:
            raise UsageError(f"token probes ({param('probes')}) need a model that takes token "
                             "ids; an image input has none", param="probes")
        found, counts, description, notes = _rebuilt_image(path, report, request, window)
        atlas = HeadAtlas(description, str(path), describe_input(request, None), window,
                          max(counts.values(), default=0),
                          build_layers(found, reference, layer=layer, prefixes=counts),
                          notes=notes)
        return _finish(atlas, report, out, title)
    loaded = load_model(path, ckpt, report, factory=factory, strict=strict,
                        norm_first=norm_first, activation=activation,
                        attn_implementation=attn_implementation)
    probe = make_probe(loaded, chosen_probes, block=block, seed=request.seed) \
        if chosen_probes else None
    notes = list(loaded.notes)
    if probe is not None and probe.block < block:
        notes.append(f"probe block shortened from {block} to {probe.block} tokens to fit the "
                     "model's positions and vocabulary")
    stats: dict[str, LayerStats] = {}
    prefixes: dict[str, int] = {}
    prepared = None
    if _has_input(request):
        reducer = HeadStatistics(window=window, leading=MAX_PREFIX)
        prepared, shapes = run_streamed(loaded, report, request, reducer)
        notes += prepared.notes
        prefixes = _image_prefix(loaded, prepared, shapes)
        stats = {k: v.as_cross() if is_cross(k, prepared) else v
                 for k, v in reducer.layers.items()}
    probe_stats: dict[str, LayerStats] | None = None
    if probe is not None:
        probe_stats, probe_prepared = probe_statistics(loaded, report, probe, window)
        if prepared is None:  # no input: the statistics are the probe's own
            stats, prepared = probe_stats, probe_prepared
            notes.append("no input given: every statistic is from the probe's tokens")
    atlas = HeadAtlas(loaded.description, str(path), describe_input(request, prepared), window,
                      max(prefixes.values(), default=0),
                      build_layers(stats, reference, probe_stats, layer, prefixes), probe,
                      notes=notes)
    return _finish(atlas, report, out, title)


def probe_statistics(loaded: LoadedModel, report: InspectReport, probe: Probe, window: int
                     ) -> tuple[dict[str, LayerStats], PreparedCall]:
    """The second pass: every statistic and the probe's diagonals on the probe's tokens."""
    probed = HeadStatistics(window=window, probes=probe.diagonals())
    prepared, _ = run_streamed(loaded, report, SequenceRequest(
        tokens=",".join(map(str, probe.tokens))), probed)
    return {k: v.as_cross() if is_cross(k, prepared) else v
            for k, v in probed.layers.items()}, prepared


def describe_input(request: SequenceRequest, prepared: PreparedCall | None) -> str:
    """The input in words, as the atlas (and the JSON's ``input``) names it."""
    from attnviz.captions import sequence_input

    if not _has_input(request):
        return "input: the probe's tokens"
    return sequence_input(request, prepared)


def _finish(atlas: HeadAtlas, report: InspectReport, output: Path | None,
            title: str | None) -> HeadAtlas:
    atlas.warnings = override_warnings(report.layers)
    if output is None:
        return atlas
    from attnviz.captions import model_label, title_block
    from attnviz.render import FORMATS
    from attnviz.render_atlas import render_atlas

    probe = atlas.probe
    probed = "" if probe is None else (f"probes: {', '.join(probe.names)} (block {probe.block}, "
                                       f"seed {probe.seed})")
    heading = title or title_block("head roles per layer and head", model_label(
        atlas.model, Path(atlas.checkpoint)), [atlas.source, probed])
    with atomic_output(output) as temp:
        render_atlas(atlas, temp, FORMATS[output.suffix.lower()], title=heading)
    atlas.output = output
    return atlas
