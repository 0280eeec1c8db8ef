"""A heads override applied everywhere or refused: what it does beyond splitting the weights.

``resolve_heads`` lets an override win over a config.json or stored training args (never over the
layer's own shapes) and records what it replaced. From those records:

- ``override_warnings``: one line per replaced count, which every command shows (inspect's
  warnings and JSON, heatmap/report/split results), since the file said otherwise;
- ``config_edits`` / ``apply_config_edits``: the settings of an HF config that build the model
  with the override (the heads key, and the head_dim / key-value head counts transformers
  derived from the old count), or the reason the config cannot say it;
- ``check_captured_heads``: after a forward pass, that the model which ran has the override's
  heads (a user factory builds its own modules: an override it ignores is refused, not drawn).

Pure: no torch, no transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from attnviz.errors import HeadsError, UsageError
from attnviz.heads import HEAD_DIM_KEYS, KV_HEAD_KEYS, HeadsInfo
from attnviz.layouts.spec import AttentionLayer

CONFIG_LABEL = "config.json"
_STAGE_KEY = re.compile(r"^(?P<key>[\w.]+)\[(?P<index>\d+)\]$")  # Swin: num_heads[2]


class LayerHeads(Protocol):
    """A layer and its resolved heads (``inspection.LayerReport``)."""

    @property
    def layer(self) -> AttentionLayer: ...

    @property
    def heads(self) -> HeadsInfo: ...


@dataclass(frozen=True)
class ConfigEdit:
    """One config setting to change so that transformers builds the override's heads."""

    key: str  # dotted attribute path in the config, ``[i]`` for one stage of a per-stage list
    heads: int
    kv_heads: int
    head_dim: int
    layers: tuple[str, ...]


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def override_warnings(layers: Iterable[LayerHeads]) -> list[str]:
    """One warning per (override, replaced count and source) for layers where they differ."""
    groups: dict[tuple[int, int, str], list[str]] = {}
    for item in layers:
        heads = item.heads
        if heads.replaced is not None and heads.overrides_stored and heads.num_heads:
            group = (heads.num_heads, heads.replaced.count, heads.replaced.source)
            groups.setdefault(group, []).append(item.layer.display_name)
    return [f"heads override: {new} heads instead of the {old} from {source}, in "
            f"{len(names)} layer(s) ({_names(names)})"
            for (new, old, source), names in groups.items()]


def _config_key(heads: HeadsInfo) -> str | None:
    """The config.json key a layer's count comes from (with or without an override)."""
    if heads.overridden:
        stored = heads.replaced
        return stored.key if stored is not None and stored.settings == CONFIG_LABEL else None
    prefix = f"{CONFIG_LABEL}: "
    if heads.source.startswith(prefix) and " " not in heads.source[len(prefix):]:
        return heads.source[len(prefix):]
    return None


def config_edits(layers: Iterable[LayerHeads]) -> list[ConfigEdit]:
    """The config changes that build an HF model with every override that differs from what
    its config.json says; ``HeadsError`` when the config cannot express them."""
    layers = list(layers)
    wanted: dict[str, list[LayerHeads]] = {}
    for item in layers:
        heads = item.heads
        if not heads.overrides_stored:
            continue
        key = _config_key(heads)
        if key is None:
            stored = heads.replaced
            raise HeadsError(f"layer '{item.layer.display_name}': the model is built from "
                             f"config.json, and its {stored.count if stored else '?'} heads "
                             f"come from {stored.source if stored else '?'}, no setting "
                             f"attnviz can change to {heads.num_heads}", param="heads",
                             hint="drop the override for this model directory")
        wanted.setdefault(key, [])
    for item in layers:
        key = _config_key(item.heads)
        if key in wanted:
            wanted[key].append(item)
    edits = []
    for key, sharing in wanted.items():
        geometry = {(i.heads.num_heads, i.heads.num_kv_heads, i.heads.head_dim) for i in sharing}
        if key.rsplit(".", 1)[-1] in HEAD_DIM_KEYS:  # H = E / head_dim: layers share only d
            geometry = {next(iter(geometry))} if len({g[2] for g in geometry}) == 1 else geometry
        if len(geometry) > 1:
            counts = sorted({f"{i.heads.num_heads}" for i in sharing})
            raise HeadsError(f"config.json has one {key} for {len(sharing)} layers "
                             f"({_names([i.layer.display_name for i in sharing])}); the "
                             f"override leaves them at different counts ({', '.join(counts)})",
                             param="heads",
                             hint="give every layer that shares the setting the same count")
        count, kv_heads, head_dim = geometry.pop()
        if count is None or kv_heads is None or head_dim is None:
            continue
        edits.append(ConfigEdit(key, count, kv_heads, head_dim,
                                tuple(i.layer.display_name for i in sharing)))
    return edits


def _node(config: Any, dotted: str) -> tuple[Any, str]:
    node = config
    *parents, attribute = dotted.split(".")
    for part in parents:
        node = getattr(node, part)
    return node, attribute


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def apply_config_edits(config: Any, edits: Iterable[ConfigEdit]) -> None:
    """Set the edits on a transformers config object (before the model is built), with the
    values its ``__init__`` derived from the old count: ``head_dim``, key/value heads."""
    for edit in edits:
        stage = _STAGE_KEY.match(edit.key)
        node, attribute = _node(config, stage.group("key") if stage else edit.key)
        if stage is not None:
            values = list(getattr(node, attribute))
            values[int(stage.group("index"))] = edit.heads
            setattr(node, attribute, type(getattr(node, attribute))(values))
            continue
        setattr(node, attribute, edit.head_dim if attribute == "head_dim" else edit.heads)
        if attribute != "head_dim" and _is_count(getattr(node, "head_dim", None)):
            node.head_dim = edit.head_dim
        for key in KV_HEAD_KEYS:
            if _is_count(getattr(node, key, None)):
                setattr(node, key, edit.kv_heads)


def _captured_layer(name: str, layers: dict[str, int]) -> str | None:
    """The checkpoint layer a captured module is (names may differ by a model prefix)."""
    if name in layers:
        return name
    found = [layer for layer in layers
             if layer.endswith(f".{name}") or name.endswith(f".{layer}")]
    return found[0] if len(found) == 1 else None


def check_captured_heads(maps: Mapping[str, Any], layers: Iterable[LayerHeads],
                         model: str) -> None:
    """Refuse maps whose head count is not the override's (the model ignored it)."""
    wanted: dict[str, int] = {}
    for item in layers:
        if item.heads.overridden and item.heads.num_heads:
            wanted[item.layer.name] = item.heads.num_heads
    if not wanted:
        return
    shapes = getattr(maps, "shapes", None) or {n: tuple(t.shape) for n, t in maps.items()}
    for name, shape in shapes.items():  # a streamed capture keeps shapes, not maps
        layer = _captured_layer(name.split("#")[0], wanted)
        if layer is None or len(shape) != 4:
            continue
        got = int(shape[1])  # (B, H, Lq, Lk)
        if got != wanted[layer]:
            raise UsageError(f"{model} computes {got} heads in '{name}', not the "
                             f"{wanted[layer]} of the override: this model decides its own "
                             "head count", param="heads",
                             hint="drop the override, or build the model with that count")
