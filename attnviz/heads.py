"""Resolving the number of heads, which no weight tensor stores.

Order, first answer wins and its source is always reported: an override (``heads=``, global or
per-layer pattern), a config.json, training args stored in the checkpoint, shapes that carry it.
Otherwise "unknown": never a silent default. An override that differs from what the rest would
say is recorded (``HeadsInfo.replaced``: callers warn, and build models with it); one that the
layer's own tensor shapes contradict is refused.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from attnviz.errors import HeadsError, UsageError, param
from attnviz.formats.placeholders import ForeignObject
from attnviz.layouts.spec import AttentionLayer, Packing

# (layer-name regex, settings key). Scoped keys come first so that encoder/decoder stacks of
# different widths (BART, Whisper) each get their own count.
HEAD_KEYS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)decoder\.", "decoder_attention_heads"),
    (r"(^|\.)encoder\.", "encoder_attention_heads"),
    (r"(^|\.)decoder\.", "n_text_head"),  # OpenAI Whisper dims
    (r"(^|\.)encoder\.", "n_audio_head"),
    (r"(^|\.)(vision_model|visual)\.", "vision_config.num_attention_heads"),
    (r"(^|\.)text_model\.", "text_config.num_attention_heads"),
    ("", "num_attention_heads"),
    ("", "n_head"),
    ("", "n_heads"),
    ("", "num_heads"),
    ("", "nheads"),
    ("", "nhead"),
)
# model_type -> the setting that divides the configured head count (ConvBERT gives half its
# heads to span-based convolution: attention heads = num_attention_heads // head_ratio)
HEADS_DIVIDED_BY = {"convbert": "head_ratio"}
STAGE_PATTERN = r"(?:^|\.)(?:layers|stages)\.(\d+)\.(?:blocks|layers)\."  # Swin stage index
KV_HEAD_KEYS = ("num_key_value_heads", "n_head_kv", "num_kv_heads", "n_kv_heads",
                "multi_query_group_num")
HEAD_DIM_KEYS = ("head_dim",)
# Config classes whose defaults matter and that save_pretrained leaves out of config.json
# (it writes only values that differ from the class defaults).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "falcon": {"multi_query": True, "new_decoder_architecture": False},
    "gpt_bigcode": {"multi_query": True},
    "convbert": {"head_ratio": 2},
}
# Where training scripts keep their hyper-parameters inside a checkpoint.
CHECKPOINT_SETTINGS = ("args", "model_args", "config", "hyper_parameters", "hparams", "dims",
                       "cfg", "opt", "hyper_params")


@dataclass(frozen=True)
class HeadsOverride:
    """``--heads N`` (pattern None) or ``--heads 'glob=N'``."""

    pattern: str | None
    heads: int


def parse_heads_option(values: Iterable[str]) -> tuple[HeadsOverride, ...]:
    overrides = []
    for raw in values:
        pattern, _, count = raw.rpartition("=")
        if not count.strip().isdigit() or int(count) <= 0:
            raise UsageError(f"{param('heads')} '{raw}' is not N or 'pattern=N' with N a "
                             "positive integer", param="heads",
                             hint=f"e.g. {param('heads')} 8 or {param('heads')} 'decoder.*=16'")
        overrides.append(HeadsOverride(pattern.strip() or None, int(count)))
    return tuple(overrides)


@dataclass(frozen=True)
class Replaced:
    """The count a heads override replaced for one layer, and where that count came from."""

    count: int
    source: str  # what ``HeadsInfo.source`` would have said without the override
    settings: str | None = None  # "config.json" or "checkpoint <block>" when one gave it
    key: str | None = None  # that block's key: ``num_attention_heads``, ``num_heads[2]``,
    # ``head_dim`` (the count was E / head_dim), None when the key cannot be set (ConvBERT)


@dataclass(frozen=True)
class HeadsInfo:
    """A layer's resolved head geometry."""

    num_heads: int | None
    source: str
    num_kv_heads: int | None = None
    head_dim: int | None = None
    kv_source: str = "shapes"
    # an override set num_heads; ``replaced`` is the count settings or shapes would have given
    # (None when they give none): ``overrides_stored`` says whether the two differ
    overridden: bool = False
    replaced: Replaced | None = None

    @property
    def overrides_stored(self) -> bool:
        return self.replaced is not None and self.replaced.count != self.num_heads


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, ForeignObject):
            node = node.attribute(part)
        else:
            return None
    return node


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value
    return None


@dataclass(frozen=True)
class Settings:
    """A place hyper-parameters come from: a config.json or args inside the checkpoint."""

    label: str  # "config.json" or "checkpoint args"
    node: Any

    def lookup(self, keys: Iterable[str]) -> tuple[int, str] | None:
        for key in keys:
            value = _positive_int(_get(self.node, key))
            if value is not None:
                return value, key
        return None

    def value(self, key: str) -> Any:
        """A raw setting (``pre_norm``, ``dilation``...), or None."""
        return _get(self.node, key)

    def heads_for(self, layer_name: str) -> tuple[int, str] | None:
        for scope, key in HEAD_KEYS:
            if scope and not re.search(scope, layer_name):
                continue
            found = self.lookup([key]) or self._per_stage(key, layer_name)
            if found is not None:
                return self._divided(*found)
        return None

    def _divided(self, heads: int, key: str) -> tuple[int, str]:
        """Configs whose head count is shared with other mechanisms (ConvBERT: head_ratio)."""
        model_type = _get(self.node, "model_type")
        divisor_key = HEADS_DIVIDED_BY.get(model_type) if isinstance(model_type, str) else None
        divisor = _positive_int(self.setting(divisor_key)) if divisor_key else None
        if divisor is None or divisor == 1:
            return heads, key
        return max(heads // divisor, 1), f"{key} ({heads}) // {divisor_key} ({divisor})"

    def _per_stage(self, key: str, layer_name: str) -> tuple[int, str] | None:
        """Hierarchical models (Swin) list one count per stage: ``num_heads: [3, 6, 12, 24]``."""
        value = _get(self.node, key)
        stage = re.search(STAGE_PATTERN, layer_name)
        if not isinstance(value, list) or stage is None or int(stage.group(1)) >= len(value):
            return None
        count = _positive_int(value[int(stage.group(1))])
        return None if count is None else (count, f"{key}[{stage.group(1)}]")

    def setting(self, key: str) -> Any:
        """A raw setting, or the default its config class gives it when config.json omits it."""
        value = _get(self.node, key)
        if value is None and isinstance(model_type := _get(self.node, "model_type"), str):
            return MODEL_DEFAULTS.get(model_type, {}).get(key)
        return value

    def kv_heads(self) -> tuple[int, str] | None:
        """Declared key/value heads, with the semantics the model's own code gives the fields."""
        if _get(self.node, "model_type") == "falcon" and \
                self.setting("new_decoder_architecture") is not True:
            # Falcon's old architecture ignores num_kv_heads (transformers writes H there)
            if self.setting("multi_query") is True:
                return 1, ("multi_query=True with new_decoder_architecture=False: one key/value "
                           "head, num_kv_heads ignored as transformers does")
            return None  # multi_query=False: one key/value head per query head, from the shapes
        if self.setting("multi_query") is True and not self.lookup(KV_HEAD_KEYS):
            return 1, "multi_query=True"
        return self.lookup(KV_HEAD_KEYS)


def settings_from(config: Mapping[str, Any] | None, root: Any) -> list[Settings]:
    """The config.json (if any), then each hyper-parameter block found in the checkpoint."""
    sources = [Settings("config.json", config)] if config else []
    if isinstance(root, Mapping | ForeignObject):
        for key in CHECKPOINT_SETTINGS:
            node = _get(root, key)
            if isinstance(node, Mapping | ForeignObject):
                sources.append(Settings(f"checkpoint {key}", node))
    return sources


def _override_for(name: str, overrides: tuple[HeadsOverride, ...]) -> HeadsOverride | None:
    chosen = None
    for item in overrides:
        if item.pattern is None and chosen is None:
            chosen = item
        elif item.pattern is not None and fnmatch.fnmatchcase(name or "(root)", item.pattern):
            chosen = item  # patterns beat the global count; the last matching pattern wins
    return chosen


def _shape_heads(layer: AttentionLayer, peers: list[AttentionLayer]
                 ) -> tuple[int, str, bool] | None:
    """Heads from this layer's own shapes, else from same-width layers' shapes if they agree;
    the flag says whether the layer's own tensors gave it."""
    for own, candidates in ((True, [layer]), (False, [p for p in peers
                                                      if p.q_rows == layer.q_rows])):
        found = set()
        for item in candidates:
            for kind, value, tensor in item.heads_evidence:
                if kind == "num_heads":
                    found.add((value, tensor))
                elif kind == "head_dim" and item.q_rows % value == 0:
                    found.add((item.q_rows // value, tensor))
        if len({value for value, _ in found}) == 1:
            value, tensor = sorted(found)[0]
            return value, f"shape of {tensor}", own
    return None


def _natural(layer: AttentionLayer, settings: list[Settings], peers: list[AttentionLayer]
             ) -> tuple[Replaced, bool] | None:
    """The count without any override: settings, then shapes, then a head_dim setting; the
    flag says whether the layer's own tensor shapes fix it."""
    for item in settings:
        found = item.heads_for(layer.name)
        if found is not None:
            key = found[1] if " // " not in found[1] else None
            return Replaced(found[0], f"{item.label}: {found[1]}", item.label, key), False
    if (shaped := _shape_heads(layer, peers)) is not None:
        return Replaced(shaped[0], shaped[1]), shaped[2]
    for item in settings:  # a head_dim setting alone still fixes H
        if (dim := item.lookup(HEAD_DIM_KEYS)) is not None and layer.q_rows % dim[0] == 0:
            return Replaced(layer.q_rows // dim[0], f"{item.label}: {dim[1]} ({dim[0]})",
                            item.label, dim[1]), False
    return None


def resolve_heads(
    layer: AttentionLayer,
    *,
    overrides: tuple[HeadsOverride, ...] = (),
    settings: list[Settings] | None = None,
    peers: list[AttentionLayer] | None = None,
) -> HeadsInfo:
    """Resolve H (and Hkv, d) for one layer; raise ``HeadsError`` when they cannot fit.

    An override wins over settings and peers' shapes (``replaced`` keeps what they said) but
    never over the layer's own tensor shapes: a count they contradict is refused."""
    settings = settings or []
    where = f"layer '{layer.display_name}'"
    natural = _natural(layer, settings, peers or [])
    override = _override_for(layer.name, overrides)
    replaced = None
    if override is not None:
        heads = override.heads
        source = "--heads" if override.pattern is None else f"--heads '{override.pattern}'"
        replaced = natural[0] if natural is not None else None
        if natural is not None and natural[0].count != heads and natural[1]:
            raise HeadsError(f"{where}: an override of {heads} heads contradicts the "
                             f"{natural[0].source}, which gives {natural[0].count}",
                             param="heads",
                             hint=f"drop the override for this layer or give "
                                  f"{natural[0].count}")
    elif natural is not None:
        heads, source = natural[0].count, natural[0].source
    else:
        return HeadsInfo(None, "unknown (pass --heads N)", None, None)

    if layer.q_rows % heads:
        raise HeadsError(f"{where}: embed dim E={layer.q_rows} is not divisible by H={heads} "
                         f"heads (from {'the override' if override else source})",
                         param="heads",
                         hint="give a count that divides E")
    head_dim = layer.q_rows // heads
    kv_heads, kv_source = _kv_heads(layer, heads, head_dim, settings, where)
    return HeadsInfo(heads, source, kv_heads, head_dim, kv_source, override is not None,
                     replaced)


def _kv_heads(layer: AttentionLayer, heads: int, head_dim: int, settings: list[Settings],
              where: str) -> tuple[int, str]:
    if layer.kv_rows is None or layer.kv_rows % head_dim:
        raise HeadsError(f"{where}: k/v rows {layer.kv_rows} are not a multiple of head dim "
                         f"{head_dim} (E={layer.q_rows}, H={heads})", param="heads",
                         hint="give a count whose head dim divides them")
    kv_heads = layer.kv_rows // head_dim
    if kv_heads == 0 or heads % kv_heads:
        raise HeadsError(f"{where}: {kv_heads} key/value heads do not divide H={heads} "
                         f"(E={layer.q_rows})", param="heads",
                         hint="give a multiple of the key/value heads")
    for item in settings:
        declared = item.kv_heads()
        if declared is None:
            continue
        if layer.packing is not Packing.INTERLEAVED and (
            declared[0] != kv_heads and layer.kv_rows != layer.q_rows
        ):
            raise HeadsError(f"{where}: {item.label} says {declared[1]}={declared[0]} but the "
                             f"shapes give {kv_heads} key/value heads for H={heads}")
        if declared[0] == kv_heads:
            return kv_heads, f"{item.label}: {declared[1]}"
    return kv_heads, "shapes"
