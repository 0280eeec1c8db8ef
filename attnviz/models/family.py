"""Which model family a checkpoint holds, for errors that say what it needs instead of a guess.

attnviz rebuilds a model from a bare file for ``nn.Transformer`` and the vision families of
``attnviz.models.vision_registry`` (timm ViT, DINO, DINOv2, torchvision ViT, CLIP, Swin, DETR,
...); everything else runs from an HF model directory or a user factory. When a command cannot
build the model, the family recognised from the vision registry, else the layout registry (and
the architecture a config or stored settings name), decides the next step the error names.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from attnviz.checkpoint import Checkpoint
from attnviz.errors import AttnvizError, NoAttentionError, UsageError, param
from attnviz.inspection import InspectReport
from attnviz.layouts.registry import LAYOUTS_BY_NAME
from attnviz.models.vision_registry import families, match


@dataclass(frozen=True)
class Family:
    """What the checkpoint was recognised as, and whether attention maps need an image."""

    description: str
    vision: bool = False


def recognise(checkpoint: Checkpoint, report: InspectReport) -> Family | None:
    """The family of a checkpoint from its signature tensors, architecture and layouts."""
    vision = match(checkpoint.tensors)
    if vision is not None:
        return Family(vision.description, True)
    if not report.layers:
        return None
    layout, count = Counter(item.layer.layout for item in report.layers).most_common(1)[0]
    spec = LAYOUTS_BY_NAME.get(layout)
    what = f"{spec.examples} ({layout} layout)" if spec is not None and spec.examples \
        else f"the {layout} layout"
    architecture = report.context.architecture
    named = f", architecture '{architecture}'" if architecture else ""
    return Family(f"recognised {count} attention layer(s) of {what}{named}")


def cannot_rebuild(checkpoint: Checkpoint, report: InspectReport) -> AttnvizError:
    """The error for a sequence input to a file attnviz cannot rebuild a model from."""
    family = recognise(checkpoint, report)
    if family is None:
        return NoAttentionError("no attention layers recognised, so there are no attention "
                                "maps to draw", path=checkpoint.path,
                                hint="run 'attnviz inspect' on it to see what it holds")
    if family.vision:
        return UsageError(f"{family.description}: its attention runs over image patches, not "
                          "a sequence", path=checkpoint.path,
                          hint=f"give an image with {param('image')} FILE")
    return UsageError(f"{family.description}, but no model to run: attnviz rebuilds one from a "
                      f"bare file only for nn.Transformer and vision models ({families()})",
                      path=checkpoint.path,
                      hint="use the HF model directory (the weights with their config.json), "
                           f"or pass {param('factory')} package.module:factory")
