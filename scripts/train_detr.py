"""The trained DETR sample (``detr_shapes.pth``): attnviz's own ``DETR`` (official key names)
with a small frozen-BN ResNet-18-style body (widths 16/32/64/128, two basic blocks per stage,
dilated last stage), hidden 64, 4 heads, 2+2 layers, 8 queries, 3 classes + "no object", trained
on 128x128, 96x128 and 128x96 images.

Two stages, as DETR itself starts from a pretrained backbone rather than from scratch:

1. the body alone learns the shapes: a throw-away linear classifier on its pooled features and a
   throw-away 1x1 convolution that says which class covers each feature cell (background where
   the shape covers under 30%);
2. the whole DETR trains with DETR's set loss on every decoder layer (one object per image, so
   the Hungarian matching is the cheapest query) and the per-cell loss kept on. The body keeps
   the full learning rate: boxes are fractions of the image, and in non-square images only
   the body can learn where the borders are (the sine positions are normalised per axis).

The body trains with ordinary batch norm, whose affine parameters and running statistics are then
stored as the frozen-BN buffers (the same four names).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from samples_common import (
    CLASS_NAMES,
    SEED,
    Dataset,
    Timing,
    make_dataset,
    mixed_batches,
    normalise,
    train_loop,
)
from torch import nn

from attnviz.models.detr import DETR, Backbone, DetrSpec, sine_positions
from attnviz.models.resnet import FrozenBatchNorm2d, ResNetBody

DETR_SIZES = ((128, 128), (96, 128), (128, 96))  # (H, W) of the training batches
DETR_HIDDEN, DETR_HEADS, DETR_QUERIES, DETR_FFN = 64, 4, 8, 128
BODY_WIDTHS, BODY_BLOCKS, BODY_STRIDE = (16, 32, 64, 128), 2, 16
NO_OBJECT_WEIGHT = 0.1  # DETR's eos_coef
COST_CLASS, COST_L1, COST_GIOU = 1.0, 5.0, 2.0  # DETR's matcher and loss weights
COVERED = 0.3  # a feature cell belongs to the shape when it covers this share of the cell


def body_shapes() -> dict[str, tuple[int, ...]]:
    """The conv shapes ``ResNetBody`` reads: a ResNet-18 layout at small widths."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (BODY_WIDTHS[0], 3, 7, 7)}
    c_in = BODY_WIDTHS[0]
    for stage, c_out in enumerate(BODY_WIDTHS, start=1):
        for block in range(BODY_BLOCKS):
            prefix = f"layer{stage}.{block}."
            shapes[f"{prefix}conv1.weight"] = (c_out, c_in, 3, 3)
            shapes[f"{prefix}conv2.weight"] = (c_out, c_out, 3, 3)
            if block == 0 and (stage > 1 or c_in != c_out):
                shapes[f"{prefix}downsample.0.weight"] = (c_out, c_in, 1, 1)
            c_in = c_out
    return shapes


def detr_spec() -> DetrSpec:
    return DetrSpec(hidden=DETR_HIDDEN, heads=DETR_HEADS, feedforward=DETR_FFN,
                    encoder_layers=2, decoder_layers=2, queries=DETR_QUERIES,
                    classes=len(CLASS_NAMES) + 1, pre_norm=False, dilation=True)


def build_detr() -> DETR:
    spec = detr_spec()
    return DETR(spec, ResNetBody(body_shapes(), dilation=spec.dilation))


def thaw_batch_norm(module: nn.Module) -> None:
    """Swap every FrozenBatchNorm2d for a trainable nn.BatchNorm2d (same state_dict names plus
    ``num_batches_tracked``), ResNet-style: He-initialised kernels, last BN of a block at 0."""
    for name, child in module.named_children():
        if isinstance(child, FrozenBatchNorm2d):
            norm = nn.BatchNorm2d(child.weight.shape[0], eps=child.eps)
            if name == "bn2" and not hasattr(module, "bn3"):  # end of a residual branch
                nn.init.zeros_(norm.weight)
            setattr(module, name, norm)
        elif isinstance(child, nn.Conv2d):
            nn.init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
        else:
            thaw_batch_norm(child)




def detr_outputs(model: DETR, images: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``DETR.forward`` keeping every decoder layer's predictions (DETR's auxiliary losses) and
    the body's features: (L, B, Q, classes) logits, (L, B, Q, 4) boxes, (B, C, h, w)."""
    backbone = cast(Backbone, model.backbone[0])
    body = backbone.body(images)  # (B, C_body, h, w)
    features = model.input_proj(body)  # (B, C, h, w)
    batch, channels, height, width = features.shape
    pos = sine_positions(height, width, channels // 2).to(features)
    pos = pos.flatten(1).T.unsqueeze(1).expand(-1, batch, -1)  # (hw, B, C)
    memory = features.flatten(2).permute(2, 0, 1)  # (hw, B, C)
    for layer in model.transformer.encoder.layers:
        memory = layer(memory, pos)
    query_pos = model.query_embed.weight.unsqueeze(1).expand(-1, batch, -1)  # (Q, B, C)
    target = torch.zeros_like(query_pos)
    norm = cast(nn.Module, model.transformer.decoder.norm)
    hidden = []
    for layer in model.transformer.decoder.layers:
        target = layer(target, memory, pos, query_pos)
        hidden.append(norm(target).transpose(0, 1))  # (B, Q, C)
    stacked = torch.stack(hidden)  # (L, B, Q, C)
    return model.class_embed(stacked), model.bbox_embed(stacked).sigmoid(), body


def cell_loss(head: nn.Module, body: torch.Tensor, labels: torch.Tensor,
              cells: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a per-cell classifier on the body's features (B, C, h, w): each cell is
    its image's class where the shape covers >= COVERED of it (``cells`` (B, h, w)), else
    background (the extra last class)."""
    wanted = torch.where(cells >= COVERED, labels[:, None, None], len(CLASS_NAMES))
    return F.cross_entropy(head(body), wanted)


def corners(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise (IoU, generalised IoU) of corner boxes (..., 4), broadcasting."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    low, high = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2]))
    hull_area = hull.clamp(min=0).prod(-1)
    return iou, iou - (hull_area - union) / hull_area.clamp(min=1e-9)


def set_loss(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
             targets: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    """DETR's loss for one object per image. logits (B, Q, C), boxes (B, Q, 4) cx,cy,w,h;
    labels (B,), targets (B, 4). The Hungarian matching of one object is the cheapest query."""
    batch, queries, classes = logits.shape
    rows = torch.arange(batch)
    with torch.no_grad():
        prob = logits.softmax(-1)[rows, :, labels]  # (B, Q)
        l1 = (boxes - targets[:, None]).abs().sum(-1)
        generalised = giou(corners(boxes), corners(targets)[:, None])[1]
        match = (-COST_CLASS * prob + COST_L1 * l1 - COST_GIOU * generalised).argmin(1)  # (B,)
    wanted = torch.full((batch, queries), classes - 1, dtype=torch.long)  # "no object"
    wanted[rows, match] = labels
    ce = F.cross_entropy(logits.reshape(-1, classes), wanted.flatten(), weight=class_weight)
    chosen = boxes[rows, match]  # (B, 4)
    box_l1 = (chosen - targets).abs().sum(-1).mean()
    box_giou = (1 - giou(corners(chosen), corners(targets))[1]).mean()
    return ce + COST_L1 * box_l1 + COST_GIOU * box_giou




def detr_eval(model: DETR, data: Dataset) -> tuple[float, float]:
    """(class accuracy, mean IoU) of each image's top-scoring query."""
    with torch.no_grad():
        out = model(normalise(data.images))
        scores, labels = out.logits.softmax(-1)[..., :-1].max(-1)  # (B, Q)
        top = scores.argmax(-1)  # (B,)
        rows = torch.arange(len(top))
        accuracy = float((labels[rows, top] == data.labels).float().mean())
        iou = giou(corners(out.boxes[rows, top]), corners(data.boxes))[0]
    return accuracy, float(iou.mean())



@dataclass(frozen=True)
class DetrRecipe:
    per_size: int = 3000  # training images of each size in DETR_SIZES
    val_images: int = 300  # per size, for the first two sizes
    batch: int = 32
    body_steps: int = 800  # stage 1: the body alone
    body_lr: float = 2e-3
    steps: int = 1500  # stage 2: the whole DETR
    lr: float = 5e-4
    warmup: int = 100


def pretrain_body(model: DETR, cell_head: nn.Module, stream: Iterator[tuple[torch.Tensor, ...]],
                  recipe: DetrRecipe) -> Timing:
    """Stage 1: the body with a pooled classifier and the per-cell classifier."""
    body = cast(Backbone, model.backbone[0]).body
    pooled = nn.Linear(BODY_WIDTHS[-1], len(CLASS_NAMES))

    def loss_fn(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, labels, _, cells = batch
        features = body(images)  # (B, C, h, w)
        return (F.cross_entropy(pooled(features.mean((2, 3))), labels)
                + cell_loss(cell_head, features, labels, cells))

    return train_loop("DETR body", nn.ModuleList([body, cell_head, pooled]), stream, loss_fn,
                      steps=recipe.body_steps, lr=recipe.body_lr, weight_decay=1e-4, clip=1.0,
                      warmup=recipe.warmup)


def train_detr(rng: np.random.Generator, recipe: DetrRecipe
               ) -> tuple[DETR, dict[str, float]]:
    """Both stages; returns the frozen-BN model attnviz will rebuild and its figures on
    held-out images."""
    wall, cpu = time.perf_counter(), time.process_time()
    grids = [(h // BODY_STRIDE, w // BODY_STRIDE) for h, w in DETR_SIZES]
    pools = [make_dataset(rng, recipe.per_size, size, grid=grid)
             for size, grid in zip(DETR_SIZES, grids, strict=True)]
    vals = [make_dataset(rng, recipe.val_images, size) for size in DETR_SIZES[:2]]
    data = Timing.since(wall, cpu)
    print(f"DETR data: {recipe.per_size} train images per size {DETR_SIZES} in "
          f"{data.wall_s:.0f}s", flush=True)
    torch.manual_seed(SEED + 1)
    model = build_detr()
    thaw_batch_norm(model.backbone)
    cell_head = nn.Conv2d(BODY_WIDTHS[-1], len(CLASS_NAMES) + 1, 1)
    stream = mixed_batches(pools, recipe.batch, torch.Generator().manual_seed(SEED + 1))
    stage1 = pretrain_body(model, cell_head, stream, recipe)
    class_weight = torch.ones(len(CLASS_NAMES) + 1)
    class_weight[-1] = NO_OBJECT_WEIGHT

    def loss_fn(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, labels, boxes, cells = batch
        logits, predicted, body = detr_outputs(model, images)
        return sum((set_loss(logits[i], predicted[i], labels, boxes, class_weight)
                    for i in range(len(logits))), cell_loss(cell_head, body, labels, cells))

    stage2 = train_loop("DETR", nn.ModuleList([model, cell_head]), stream, loss_fn,
                        steps=recipe.steps, lr=recipe.lr, weight_decay=1e-4, clip=0.1,
                        warmup=recipe.warmup)
    frozen = build_detr()  # the model attnviz will rebuild: frozen BN from the trained stats
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    frozen.load_state_dict(state, strict=True)
    frozen.eval()
    with torch.no_grad():
        probe = normalise(vals[0].images[:8])
        gap = float((frozen(probe).boxes - model(probe).boxes).abs().max())
    metrics = {"steps": recipe.body_steps + recipe.steps, "data_s": data.wall_s,
               "train_s": stage1.wall_s + stage2.wall_s, "cpu_s": Timing.since(wall, cpu).cpu_s,
               "frozen_gap": gap}
    for (height, width), val in zip(DETR_SIZES, vals, strict=False):
        accuracy, iou = detr_eval(frozen, val)
        metrics[f"accuracy_{height}x{width}"], metrics[f"iou_{height}x{width}"] = accuracy, iou
    return frozen, metrics
