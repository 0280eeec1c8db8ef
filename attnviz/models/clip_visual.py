"""OpenAI CLIP and open_clip ViT visual towers, rebuilt from the file alone (no clip, no
open_clip).

Keys (``visual.`` prefixed in whole-model files): ``conv1`` (no bias), ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc,
mlp.c_proj}`` with ``attn`` an ``nn.MultiheadAttention`` (packed ``in_proj_weight``),
optional open_clip LayerScale ``ls_1/ls_2.gamma``, ``ln_post``, ``proj``. Tokens are
[CLS, patches]. What the tensors cannot say:

- heads: ``nn.MultiheadAttention`` packs q|k|v whatever H is. Both libraries derive it from the
  width: OpenAI ``vision_heads = vision_width // 64`` (clip/model.py, ``CLIP.__init__``),
  open_clip ``vision_cfg.width // vision_cfg.head_width`` (head_width 64 unless its config
  says otherwise). Used unless ``heads`` is given or ``open_clip_config.json`` names
  ``head_width``.
- the MLP activation: OpenAI weights use QuickGELU, open_clip picks ``QuickGELU if quick_gelu
  else nn.GELU`` from the model name (``ViT-B-32`` vs ``ViT-B-32-quickgelu``). Evidence, in
  order: the ``activation`` argument; a TorchScript archive's class for ``mlp.gelu`` (its
  name, never its code); ``open_clip_config.json`` beside the file (``quick_gelu``); the
  ``input_resolution``/``context_length``/``vocab_size`` tensors only OpenAI's TorchScript
  release holds (clip/model.py ``build_model`` deletes exactly these). Otherwise the caller
  must say.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnviz.capture import AttentionMaps, capture_attention
from attnviz.checkpoint import Checkpoint, read_json
from attnviz.errors import ConfigError, HeadsError, UsageError, param
from attnviz.formats.detect import TORCHSCRIPT
from attnviz.inspection import InspectReport
from attnviz.models.torch_transformer import ModelBuildError
from attnviz.models.vision_registry import BuiltVision, TokenLayout
from attnviz.models.vit_parts import LayerScale, rebuild, resize_positions, square_side

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's own normalisation, not ImageNet's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("quick_gelu", "gelu")
PREFIXES = ("visual.", "")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_REFUSED = {"attn.logit_scale": "scaled cosine attention", "attn.head_scale": "head scaling",
            "attn.ln_inner": "an inner attention norm", "ln_attn": "an attention output norm",
            "mlp.ln": "an MLP norm"}


@dataclass(frozen=True)
class ClipVisionSpec:
    prefix: str  # 'visual.' or '' (a file holding the tower alone)
    width: int
    layers: int
    heads: int
    heads_source: str
    patch: int
    pos_grid: tuple[int, int]  # the grid positional_embedding was trained for
    mlp_hidden: int
    output_dim: int | None  # proj's columns; None without proj
    activation: str  # 'quick_gelu' or 'gelu'
    activation_source: str
    layer_scale: bool
    ln_pre: bool
    eps: float = 1e-5
    prefix_tokens: int = 1  # [CLS, patches]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.pos_grid[0] * self.patch, self.pos_grid[1] * self.patch

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return image_size[0] // self.patch, image_size[1] // self.patch


def recognise_clip_visual(names: Collection[str]) -> str | None:
    """The key prefix of a CLIP-style ViT tower (``'visual.'`` or ``''``), or None."""
    for prefix in PREFIXES:
        needed = ("conv1.weight", "class_embedding", "positional_embedding",
                  "transformer.resblocks.0.attn.in_proj_weight")
        if all(f"{prefix}{key}" in names for key in needed):
            return prefix
    return None


def _count(names: Collection[str], prefix: str) -> int:
    blocks = {n[len(prefix):].split(".", 1)[0] for n in names if n.startswith(prefix)}
    return sum(1 for b in blocks if b.isdigit())


def _open_clip_config(checkpoint: Checkpoint) -> dict[str, Any] | None:
    path = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    found = path / OPEN_CLIP_CONFIG
    if not found.is_file():
        return None
    document = read_json(found, OPEN_CLIP_CONFIG)
    model = document.get("model_cfg") if isinstance(document, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"{OPEN_CLIP_CONFIG} has no model_cfg object", path=found)
    return model


def _heads(width: int, heads: int | None, open_clip: dict[str, Any] | None,
           path: Path) -> tuple[int, str]:
    if heads is not None:
        count, source = heads, "given"
    else:
        vision = open_clip.get("vision_cfg") if open_clip else None
        head_width = vision.get("head_width", 64) if isinstance(vision, dict) else 64
        if not isinstance(head_width, int) or isinstance(head_width, bool) or head_width <= 0:
            raise ConfigError(f"{OPEN_CLIP_CONFIG} vision_cfg.head_width is not a positive "
                              f"integer: {head_width!r:.40}", path=path)
        source = (f"{OPEN_CLIP_CONFIG}: width {width} // head_width {head_width}"
                  if head_width != 64 else
                  f"CLIP's convention: width {width} // 64 (OpenAI clip/model.py, open_clip)")
        if width % head_width:
            raise HeadsError(f"width {width} is not a multiple of {head_width}, so CLIP's "
                             "heads = width // head_width does not apply", path=path,
                             hint=f"pass {param('heads')} N")
        count = width // head_width
    if count <= 0 or width % count:
        raise HeadsError(f"{count} heads do not divide the width {width}", path=path,
                         param="heads")
    return count, source


def _activation(checkpoint: Checkpoint, prefix: str, given: str | None,
                open_clip: dict[str, Any] | None) -> tuple[str, str]:
    if given is not None:
        if given not in ACTIVATIONS:
            raise UsageError(f"'{given}' is not a CLIP MLP activation: use "
                             f"{' or '.join(ACTIVATIONS)}", param="activation")
        return given, "given"
    if checkpoint.format == TORCHSCRIPT:
        from attnviz.formats.torchscript import script_classes

        where = f"{prefix}transformer.resblocks.0.mlp.gelu"
        found = script_classes(checkpoint.root).get(checkpoint_path(checkpoint, where))
        if found is not None and found.rsplit(".", 1)[-1] in {"QuickGELU", "GELU"}:
            kind = "quick_gelu" if found.endswith("QuickGELU") else "gelu"
            return kind, f"TorchScript class of {where}: {found}"
    if open_clip is not None:
        quick = open_clip.get("quick_gelu", False)  # open_clip's CLIP default
        return ("quick_gelu" if quick is True else "gelu"), f"{OPEN_CLIP_CONFIG} quick_gelu"
    if all(key in checkpoint.tensors for key in OPENAI_EXTRAS):
        return "quick_gelu", ("OpenAI's TorchScript release (input_resolution, context_length, "
                              "vocab_size tensors)")
    raise UsageError("the file does not say which MLP activation this CLIP tower uses: "
                     "OpenAI weights and open_clip '-quickgelu' models use QuickGELU, other "
                     "open_clip models GELU", path=checkpoint.path, param="activation",
                     hint=f"pass {param('activation')} quick_gelu or gelu")


def checkpoint_path(checkpoint: Checkpoint, name: str) -> str:
    """A module path as the archive names it: the prefix load_checkpoint stripped put back."""
    return f"{checkpoint.stripped_prefix or ''}{name}"


def detect_clip_visual(checkpoint: Checkpoint, *, heads: int | None = None,
                       activation: str | None = None) -> ClipVisionSpec:
    """What the tensors (and the evidence above) say about a CLIP-style ViT tower."""
    t, path = checkpoint.tensors, checkpoint.path
    prefix = recognise_clip_visual(t)
    if prefix is None:
        raise ModelBuildError("not an OpenAI CLIP / open_clip ViT tower: no "
                              "'visual.conv1.weight' with 'visual.transformer.resblocks'",
                              path=path, hint=f"pass {param('factory')} package.module:factory "
                                              "for other models")
    blocks = f"{prefix}transformer.resblocks."
    refused = [(n, why) for n in t if n.startswith(blocks) and "." in n[len(blocks):]
               for key, why in _REFUSED.items()
               if n[len(blocks):].split(".", 1)[1].startswith(f"{key}.")
               or n[len(blocks):].split(".", 1)[1] == key]
    if refused:
        raise ModelBuildError(f"open_clip's {refused[0][1]} ('{refused[0][0]}') is not rebuilt",
                              path=path)
    width, channels, patch, patch_w = t[f"{prefix}conv1.weight"].shape
    if patch != patch_w or channels != 3:
        raise ModelBuildError(f"conv1 of shape {list(t[f'{prefix}conv1.weight'].shape)} is not "
                              "a square RGB patch embedding", path=path)
    side = square_side(t[f"{prefix}positional_embedding"].shape[0] - 1,  # the first is CLS's
                       "positional_embedding", path)
    open_clip = _open_clip_config(checkpoint)
    count, source = _heads(width, heads, open_clip, path)
    act, act_source = _activation(checkpoint, prefix, activation, open_clip)
    proj = t.get(f"{prefix}proj")
    block = f"{prefix}transformer.resblocks.0."
    return ClipVisionSpec(
        prefix=prefix, width=width, layers=_count(t, f"{prefix}transformer.resblocks."),
        heads=count, heads_source=source, patch=patch, pos_grid=(side, side),
        mlp_hidden=t[f"{block}mlp.c_fc.weight"].shape[0],
        output_dim=proj.shape[1] if proj is not None else None, activation=act,
        activation_source=act_source, layer_scale=f"{block}ls_1.gamma" in t,
        ln_pre=f"{prefix}ln_pre.weight" in t)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, spec: ClipVisionSpec) -> None:
        super().__init__()
        width = spec.width
        self.ln_1 = nn.LayerNorm(width, eps=spec.eps)
        self.attn = nn.MultiheadAttention(width, spec.heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=spec.eps)
        act: nn.Module = QuickGELU() if spec.activation == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, spec.mlp_hidden)),
                                              ("gelu", act),
                                              ("c_proj", nn.Linear(spec.mlp_hidden, width))]))
        self.ls_1: nn.Module = LayerScale(width) if spec.layer_scale else nn.Identity()
        self.ls_2: nn.Module = LayerScale(width) if spec.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.ls_1(self.attn(y, y, y, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, spec: ClipVisionSpec) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(spec)
                                         for _ in range(spec.layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.resblocks(x)
        return out


class ClipVisionTower(nn.Module):
    """CLIP's VisionTransformer forward: [CLS, patches] + positions, ln_pre, blocks, ln_post
    on CLS, @ proj. Batch-first where OpenAI runs (L, N, D): the same numbers."""

    def __init__(self, spec: ClipVisionSpec) -> None:
        super().__init__()
        self.spec = spec
        width = spec.width
        self.conv1 = nn.Conv2d(3, width, spec.patch, spec.patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(
            torch.zeros(spec.pos_grid[0] * spec.pos_grid[1] + 1, width))
        self.ln_pre: nn.Module = nn.LayerNorm(width, eps=spec.eps) if spec.ln_pre \
            else nn.Identity()
        self.transformer = Transformer(spec)
        self.ln_post = nn.LayerNorm(width, eps=spec.eps)
        if spec.output_dim is not None:
            self.proj = nn.Parameter(torch.zeros(width, spec.output_dim))

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1 + gh*gw, D): bicubic for another grid (align_corners=False, no antialias, as HF's
        CLIP interpolate_pos_encoding; open_clip antialiases when it shrinks)."""
        spec = self.spec
        table = self.positional_embedding
        if grid == spec.pos_grid:
            return table
        patches = resize_positions(table[None, 1:], spec.pos_grid, grid, size=grid)  # (1,gh*gw,D)
        return torch.cat([table[:1], patches[0]])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)  # (B, D, gh, gw)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positions(grid)  # (B, 1 + gh*gw, D)
        x = self.transformer(self.ln_pre(x))
        pooled: torch.Tensor = self.ln_post(x[:, 0])  # (B, D)
        return pooled @ self.proj if self.spec.output_dim is not None else pooled


class _Visual(nn.Module):
    """Holds the tower as ``visual`` so module names are the file's (``visual.transformer.
    resblocks.3.attn``), never those of a text tower's ``transformer.resblocks.3.attn``."""

    def __init__(self, tower: ClipVisionTower) -> None:
        super().__init__()
        self.visual = tower

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.visual(images)
        return out


def load_clip_visual(checkpoint: Checkpoint, *, heads: int | None = None,
                     activation: str | None = None) -> tuple[nn.Module, ClipVisionSpec]:
    """The tower with the file's weights (float32), named as in the file, and its spec."""
    spec = detect_clip_visual(checkpoint, heads=heads, activation=activation)

    def build() -> nn.Module:
        tower = ClipVisionTower(spec)
        return _Visual(tower) if spec.prefix else tower

    return rebuild(build, checkpoint, float32=True), spec


def clip_attention_maps(checkpoint: Checkpoint, images: torch.Tensor, *,
                        heads: int | None = None, activation: str | None = None
                        ) -> tuple[AttentionMaps, torch.Tensor, ClipVisionSpec]:
    """Per-head maps (B, H, 1 + gh*gw, 1 + gh*gw) of every block for ``images`` (B, 3, H, W),
    already CLIP-normalised (``CLIP_MEAN``/``CLIP_STD``); with the tower's output."""
    model, spec = load_clip_visual(checkpoint, heads=heads, activation=activation)
    if images.shape[-2] % spec.patch or images.shape[-1] % spec.patch:
        raise UsageError(f"image size {tuple(images.shape[-2:])} is not a multiple of the "
                         f"patch {spec.patch}", param="size")
    with torch.no_grad(), capture_attention(model) as maps:
        output = model(images)
    return maps, output, spec


def _report_heads(checkpoint: Checkpoint, report: InspectReport, prefix: str
                  ) -> tuple[int | None, str]:
    """The heads the report resolved for the tower's blocks: (count, source), or (None, why)
    when they are the record's inferred width // 64 (then detect_clip_visual applies CLIP's
    own rule, which also reads open_clip_config.json's head_width)."""
    blocks = f"{prefix}transformer.resblocks."
    found = {(i.heads.num_heads, i.heads.source) for i in report.layers
             if i.layer.name.startswith(blocks)}
    counts = {count for count, _ in found}
    if len(counts) > 1:
        raise HeadsError(f"the tower's blocks disagree on heads: {sorted(c or 0 for c in counts)}",
                         path=checkpoint.path, hint=f"pass {param('heads')} N")
    if not found or None in counts:
        return None, "unknown"
    count, source = min(found, key=lambda item: item[1])
    return (None, source) if str(source).startswith("inferred (") else (count, source)


def build_clip_visual(checkpoint: Checkpoint, report: InspectReport, *,
                      activation: str | None = None) -> BuiltVision:
    """The vision registry's ``clip_visual`` / ``clip_tower`` records: the tower as a
    ``BuiltVision`` (CLIP's own normalisation; heads and activation sources in its notes)."""
    prefix = recognise_clip_visual(checkpoint.tensors) or ""
    heads, heads_from = _report_heads(checkpoint, report, prefix)
    model, spec = load_clip_visual(checkpoint, heads=heads, activation=activation)
    source = heads_from if heads is not None else spec.heads_source
    act = "QuickGELU" if spec.activation == "quick_gelu" else "GELU"
    description = (f"CLIP visual tower rebuilt from the checkpoint: {spec.layers} blocks, width "
                   f"{spec.width}, {spec.heads} heads [{source}], patch {spec.patch}, {act}")
    notes = [f"heads: {spec.heads} ({source})",
             f"MLP activation: {act} ({spec.activation_source})",
             "images normalised with CLIP's mean/std, not ImageNet's"]
    if checkpoint.format == TORCHSCRIPT:
        notes.append("TorchScript archive: weights read from its data, its code was not run")
    return BuiltVision(model=model, description=description, patch=spec.patch,
                       native_size=spec.image_size, tokens=TokenLayout(cls=True),
                       blocks=f"{prefix}transformer.resblocks.", mean=CLIP_MEAN, std=CLIP_STD,
                       notes=notes)
