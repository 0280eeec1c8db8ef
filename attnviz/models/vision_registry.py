"""Vision rebuilds as data: which image models attnviz rebuilds from a bare checkpoint file.

One ``VisionRecord`` per family says four things:

* **how it is recognised**: ``keys`` (every one present), ``patterns`` (regexes, each matching
  at least one key: block layouts such as ``blocks\\.0\\.attn\\.qkv\\.weight``) and ``absent``
  (none present: what tells look-alikes apart, e.g. ``register_tokens`` keeps a DINOv2 file
  from being read as a plain timm ViT). When several records fit, the most specific one wins
  (most keys + patterns + absent), ties going to the earlier record, so a new record needs no
  particular place in ``RECORDS``.
* **how its heads are found**: as for every layer (``attnviz.heads``): ``--heads``, a
  config.json, training args stored in the file, tensor shapes. After those, the record's
  named default: ``width_heads`` (embed dim -> heads, the builders of the library that writes
  the files) or ``head_dim`` (heads = E / head_dim), E being dim ``width_axis`` of
  ``width_key``. ``inspect`` reports such a count as ``inferred (<short>, E=...)``, never
  silently, and ``--heads`` overrides it (with the usual warning). No default fits: heads are
  unknown and the user passes ``--heads N``. ``heads_key`` is the settings key the inferred
  count is stored under: ``num_heads`` reaches every layer, ``vision_config.num_attention_heads``
  only the layers under ``visual.`` / ``vision_model.`` (a file that also holds a text tower).
* **how it builds**: ``build`` = ``"package.module:function"``, imported only when an image is
  drawn (so ``inspect`` never imports torch), called as ``function(checkpoint, report)`` with
  the ``Checkpoint`` and its ``InspectReport``, returning a ``BuiltVision``: the eval-mode model
  (``forward(images)`` on a ``(1, 3, H, W)`` batch; its attention is captured by
  ``capture_attention``), its patch, native size and ``TokenLayout``. attnviz then draws the
  CLS figure (per head, rollout, ``--keep-mass``, registers). Families whose figure is not a
  CLS row over a patch grid give ``run`` instead: ``function(checkpoint, report, options)``
  with the ``image_heatmap.ImageOptions``, returning ``(Figure, AttentionMaps, description)``
  (DETR's per-object figure; Swin's windows). What the file cannot say and the user may
  (CLIP's MLP activation) reaches the hook as keyword arguments: ``options`` names the
  ``ImageOptions`` fields it takes (``options=("activation",)`` calls
  ``function(checkpoint, report, activation=...)``, None when not given); such a field given
  for a family whose record does not take it is refused, never ignored. ``unreported``: why
  the family's figure has no place in ``attnviz report`` (Swin's windows), which says so.
* **what its tokens are**: ``tokens``, in words, for docs and errors; the builder's
  ``TokenLayout`` says it exactly: [CLS] [extra prefix tokens] [registers] [patch grid].

Adding a family is one record, e.g. the OpenAI CLIP / open_clip visual tower's (in ``RECORDS``)::

    VisionRecord(
        name="clip_visual", title="OpenAI CLIP / open_clip visual tower", short="CLIP visual",
        keys=("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding"),
        patterns=(r"visual\\.transformer\\.resblocks\\.0\\.attn\\.in_proj_weight",),
        width_key="visual.conv1.weight", head_dim=64,
        heads_key="vision_config.num_attention_heads",
        build="attnviz.models.clip_visual:build_clip_visual", options=("activation",),
        tokens="CLS, then the patch grid"),

Pure: no torch. ``family.py`` (errors naming what a file holds), ``inspection.analyse`` (the
inferred heads) and ``image_heatmap`` (which rebuild runs) read it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnviz.heads import Settings

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class TokenLayout:
    """The token sequence the attention runs over: [CLS] [``extra`` prefix tokens, e.g.
    distillation] [``registers``] then the patch grid, row-major."""

    cls: bool = True
    extra: int = 0
    registers: int = 0

    @property
    def prefix(self) -> int:
        return int(self.cls) + self.extra + self.registers

    @property
    def register_slice(self) -> slice:
        return slice(self.prefix - self.registers, self.prefix)


@dataclass
class BuiltVision:
    """A vision model rebuilt from a file, and what its tokens are."""

    model: nn.Module  # eval mode; forward(images (1, 3, H, W))
    description: str  # one line: what was rebuilt, dims, heads
    patch: int
    native_size: tuple[int, int]  # (H, W) its position embedding was trained for
    tokens: TokenLayout
    blocks: str = ""  # captured layer names starting with this are the image blocks
    any_size: bool = True  # False: the model runs only at native_size (torchvision)
    mean: tuple[float, float, float] | None = None  # input normalisation; None: ImageNet's
    std: tuple[float, float, float] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VisionRecord:
    """One family of vision checkpoints, as data (see the module docstring)."""

    name: str
    title: str  # what the file is, in errors and descriptions
    short: str  # a few words, in inspect's heads source
    keys: tuple[str, ...]
    patterns: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    width_key: str | None = None
    width_axis: int = 0
    width_heads: tuple[tuple[int, int], ...] = ()
    head_dim: int | None = None
    heads_key: str = "num_heads"
    build: str = ""
    run: str = ""
    options: tuple[str, ...] = ()  # ImageOptions fields the hook takes as keyword arguments
    unreported: str = ""  # why attnviz report refuses the family; "": it draws it
    tokens: str = ""
    compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if bool(self.build) == bool(self.run):
            raise ValueError(f"vision record {self.name}: give build or run, not both")
        object.__setattr__(self, "compiled", tuple(re.compile(p) for p in self.patterns))

    @property
    def specificity(self) -> int:
        return len(self.keys) + len(self.patterns) + len(self.absent)

    def fits(self, names: Mapping[str, Any]) -> bool:
        return (all(k in names for k in self.keys)
                and not any(k in names for k in self.absent)
                and all(any(p.fullmatch(n) for n in names) for p in self.compiled))

    def width(self, tensors: Mapping[str, Any]) -> int | None:
        info = tensors.get(self.width_key) if self.width_key else None
        shape = tuple(getattr(info, "shape", ()))
        return int(shape[self.width_axis]) if len(shape) > self.width_axis else None

    def default_heads(self, width: int | None) -> int | None:
        """The record's named default for an embed dim, or None."""
        if width is None:
            return None
        table = dict(self.width_heads)
        if width in table:
            return table[width]
        if self.head_dim and width % self.head_dim == 0:
            return width // self.head_dim
        return None

    def heads_rule(self) -> str:
        """The named default in words (errors, docs)."""
        parts = [f"E={e}: {h}" for e, h in self.width_heads]
        if self.head_dim:
            parts.append(f"E / {self.head_dim}")
        return f"{self.short} defaults ({', '.join(parts)})" if parts else \
            f"{self.short} files carry no head count"


_TIMM_BLOCK = r"blocks\.0\.attn\.qkv\.weight"
_DINOV2_BLOCK = r"blocks\.(?:\d+\.)?\d+\.attn\.qkv\.weight"  # hub, or chunked blocks.C.N

RECORDS: tuple[VisionRecord, ...] = (
    VisionRecord(
        name="detr", title="a DETR checkpoint (official layout: query_embed, input_proj)",
        short="DETR", keys=("query_embed.weight", "input_proj.weight"),
        run="attnviz.models.vision_detr:run_detr",
        tokens="decoder queries over the backbone's feature map (stride 32)"),
    VisionRecord(
        name="timm_vit", title="a ViT checkpoint (timm layout: patch_embed, blocks.N.attn.qkv)",
        short="timm ViT", keys=("patch_embed.proj.weight", "pos_embed"),
        patterns=(_TIMM_BLOCK,), absent=("register_tokens",),
        build="attnviz.models.vit:build_timm_vit",
        tokens="[CLS] [distillation] [reg_token registers], then the patch grid"),
    VisionRecord(
        name="dino", title="a DINO (v1) hub checkpoint (facebookresearch/dino: a timm-style "
        "ViT without classifier head)", short="DINO hub",
        keys=("patch_embed.proj.weight", "pos_embed", "cls_token"), patterns=(_TIMM_BLOCK,),
        absent=("head.weight", "fc_norm.weight", "mask_token", "register_tokens", "reg_token",
                "dist_token", "blocks.0.ls1.gamma"),
        width_key="patch_embed.proj.weight", width_heads=((192, 3), (384, 6), (768, 12)),
        build="attnviz.models.dino:build_dino",
        tokens="CLS, then the patch grid (patch 8 or 16)"),
    VisionRecord(
        name="dinov2", title="a DINOv2 hub checkpoint (facebookresearch/dinov2)",
        short="DINOv2 hub",
        keys=("patch_embed.proj.weight", "pos_embed", "cls_token", "mask_token"),
        patterns=(_DINOV2_BLOCK,), absent=("register_tokens",),
        width_key="patch_embed.proj.weight",
        width_heads=((384, 6), (768, 12), (1024, 16), (1536, 24)),
        build="attnviz.models.dino:build_dino",
        tokens="CLS, then the patch grid (patch 14)"),
    VisionRecord(
        name="dinov2_reg", title="a DINOv2-with-registers hub checkpoint "
        "(facebookresearch/dinov2, *_reg4_pretrain.pth)", short="DINOv2 hub",
        keys=("patch_embed.proj.weight", "pos_embed", "cls_token", "register_tokens"),
        patterns=(_DINOV2_BLOCK,), width_key="patch_embed.proj.weight",
        width_heads=((384, 6), (768, 12), (1024, 16), (1536, 24)),
        build="attnviz.models.dino:build_dino",
        tokens="CLS, the register tokens, then the patch grid (patch 14)"),
    VisionRecord(
        name="torchvision_vit", title="a torchvision ViT checkpoint (conv_proj, "
        "encoder.layers.encoder_layer_N.self_attention)", short="torchvision ViT",
        keys=("conv_proj.weight", "class_token", "encoder.pos_embedding"),
        patterns=(r"encoder\.layers\.encoder_layer_0\.self_attention\.in_proj_weight",),
        width_key="conv_proj.weight", width_heads=((768, 12), (1024, 16), (1280, 16)),
        build="attnviz.models.tv_vit:build_tv_vit",
        tokens="CLS, then the patch grid; native size only"),
    VisionRecord(
        name="clip_visual", title="an OpenAI CLIP / open_clip checkpoint (visual.conv1, "
        "visual.transformer.resblocks.N.attn)", short="CLIP visual",
        keys=("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding"),
        patterns=(r"visual\.transformer\.resblocks\.0\.attn\.in_proj_weight",),
        width_key="visual.conv1.weight", head_dim=64,
        heads_key="vision_config.num_attention_heads",
        build="attnviz.models.clip_visual:build_clip_visual", options=("activation",),
        tokens="CLS, then the patch grid"),
    VisionRecord(
        name="clip_tower", title="a CLIP-style visual tower alone (conv1, class_embedding, "
        "transformer.resblocks.N.attn)", short="CLIP visual",
        keys=("conv1.weight", "class_embedding", "positional_embedding"),
        patterns=(r"transformer\.resblocks\.0\.attn\.in_proj_weight",),
        width_key="conv1.weight", head_dim=64, heads_key="num_heads",
        build="attnviz.models.clip_visual:build_clip_visual", options=("activation",),
        tokens="CLS, then the patch grid"),
    VisionRecord(
        name="swin", title="a Swin checkpoint (timm layout: layers.S.blocks.B.attn with a "
        "relative_position_bias_table)", short="timm Swin",
        keys=("patch_embed.proj.weight", "layers.0.blocks.0.attn.relative_position_bias_table"),
        patterns=(r"layers\.0\.blocks\.0\.attn\.qkv\.weight",),
        run="attnviz.models.vision_swin:run_swin",
        unreported="its windowed attention has no CLS row and no single token grid",
        tokens="windows of w x w patches per stage (shifted every other block), no CLS"),
)
HOOK_OPTIONS = ("activation",)  # every ImageOptions field some record's hook may take
RECORDS_BY_NAME = {record.name: record for record in RECORDS}


@dataclass(frozen=True)
class VisionMatch:
    """The record a checkpoint fits, its embed dim and the record's default heads for it."""

    record: VisionRecord
    width: int | None
    default_heads: int | None

    @property
    def description(self) -> str:
        width = f", embed dim {self.width}" if self.width else ""
        return f"{self.record.title}{width}"


def match(tensors: Mapping[str, Any]) -> VisionMatch | None:
    """The most specific record whose keys, patterns and absences fit ``tensors`` (names ->
    anything with a ``shape``), or None."""
    best: VisionRecord | None = None
    for record in RECORDS:
        if record.fits(tensors) and (best is None or record.specificity > best.specificity):
            best = record
    if best is None:
        return None
    width = best.width(tensors)
    return VisionMatch(best, width, best.default_heads(width))


def inferred_settings(tensors: Mapping[str, Any], layers: Iterable[Any] = ()) -> list[Settings]:
    """The recognised family's named head default, as the last settings source for
    ``attnviz.heads.resolve_heads`` (after config.json and stored args): [] when the file fits
    no record, the record has no default for its width, or a layer's shapes carry its heads
    (``layers``: the found ``AttentionLayer``s; shapes beat a default)."""
    found = match(tensors)
    if found is None or found.default_heads is None or \
            any(getattr(layer, "heads_evidence", ()) for layer in layers):
        return []
    node: dict[str, Any] = {}
    cursor = node
    *parents, last = found.record.heads_key.split(".")
    for part in parents:
        cursor = cursor.setdefault(part, {})
    cursor[last] = found.default_heads
    return [Settings(f"inferred ({found.record.short}, E={found.width})", node)]


def resolve(target: str) -> Any:
    """``"package.module:function"`` -> the function (a record's build or run)."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def taking(option: str) -> str:
    """The families whose hook takes ``option``, in a few words (errors)."""
    return ", ".join(dict.fromkeys(r.short for r in RECORDS if option in r.options)) or "none"


def families() -> str:
    """Every rebuilt family in a few words, for errors that say what ``--image`` takes."""
    return ", ".join(dict.fromkeys(record.short for record in RECORDS))
