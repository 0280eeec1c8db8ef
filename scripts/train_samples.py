"""Train the two *trained* sample checkpoints on synthetic shapes (seeded, CPU, ~15 minutes).

Run: python scripts/train_samples.py [--out DIR] [--quick]   (default: sample_checkpoints/)

Every image holds one coloured shape (circle, square or triangle; random colour, size, position,
rotation) on a textured background (gradient, stripes, blotches, pixel noise).

- vit_shapes.pth: attnviz's own ``VisionTransformer`` (timm key names; 64x64, patch 8, dim 96,
  4 blocks, 4 heads, CLS token) classifying the shape. ``{'model', 'args': Namespace(num_heads,
  img_size, patch_size, class_names, ...)}``.
- detr_shapes.pth: attnviz's own ``DETR`` (official key names) with a small frozen-BN
  ResNet-18-style body (widths 16/32/64/128, two basic blocks per stage, dilated last stage),
  hidden 64, 4 heads, 2+2 layers, 8 queries, 3 classes + "no object", trained on 128x128 and
  96x128 images with DETR's set loss (one object per image, so the matching is an argmin).
  The body trains with ordinary batch norm, whose affine parameters and running statistics are
  then stored as the frozen-BN buffers (the same four names). ``{'model', 'args':
  Namespace(nheads, hidden_dim, num_queries, pre_norm, dilation, class_names, ...), 'epoch'}``.
- shapes_demo.png (128x128) and shapes_demo_2.png (96x128), one shape each.

Inputs are normalised with ImageNet mean/std exactly as ``attnviz.image_inputs`` does, and the ViT
trains on 128x128 renders shrunk with PIL bicubic, as ``attnviz heatmap --image`` shrinks them.
DETR checkpoints are read at DETR's evaluation size (shorter side 800) unless ``--size`` is given:
this model was trained at 96-128 pixels, so show it with ``--size 128`` (``--size 96x128``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

# OpenMP threads that spin while waiting crawl when other jobs share the cores: sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from PIL import Image
from torch import nn

from attnviz.image_inputs import IMAGENET_MEAN, IMAGENET_STD
from attnviz.models.detr import DETR, Backbone, DetrSpec, sine_positions
from attnviz.models.resnet import FrozenBatchNorm2d, ResNetBody
from attnviz.models.vit import Block, VisionTransformer, ViTSpec

SEED = 20261121
CLASS_NAMES = ["circle", "square", "triangle"]
RENDER = 128  # the ViT's images are rendered at 128x128 and shrunk to 64x64 like attnviz does
VIT_SIZE, VIT_PATCH, VIT_DIM, VIT_DEPTH, VIT_HEADS = 64, 8, 64, 4, 4
DETR_SIZES = ((128, 128), (96, 128), (128, 96))  # (H, W) of the DETR training batches
DETR_HIDDEN, DETR_HEADS, DETR_QUERIES, DETR_FFN = 64, 4, 8, 128
BODY_WIDTHS, BODY_BLOCKS = (16, 32, 64, 128), 2
SHAPE_SIZE = (0.22, 0.5)  # of the shorter side
EASY_SIZE = (0.3, 0.5)
ROTATION = math.radians(15)  # shapes turn by up to this either way (any turn: far slower ViT)
STRIPES = (0.75, 0.4, 0.05, 0.3)  # chance of stripes, of hard stripes, amplitude range
NO_OBJECT_WEIGHT = 0.1  # DETR's eos_coef
COST_CLASS, COST_L1, COST_GIOU = 1.0, 5.0, 2.0  # DETR's matcher and loss weights

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


# ----------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Shape:
    label: int  # index into CLASS_NAMES
    cx: float  # centre, pixels
    cy: float
    size: float  # circle diameter, square side, about a triangle's side
    angle: float  # radians
    colour: tuple[float, float, float]  # RGB in [0, 1]


@dataclass(frozen=True)
class Sample:
    pixels: ByteArray  # (H, W, 3)
    label: int
    box: Box
    coverage: FloatArray  # (H, W): how much of each pixel the shape covers


def _interp_matrix(n_out: int, n_in: int) -> FloatArray:
    """(n_out, n_in) linear interpolation weights (align_corners style)."""
    pos = np.linspace(0, n_in - 1, n_out)
    low = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - low
    out = np.zeros((n_out, n_in), dtype=np.float32)
    out[np.arange(n_out), low] = 1 - frac
    out[np.arange(n_out), low + 1] += frac
    return out


def background(rng: np.random.Generator, height: int, width: int, easy: bool = False
               ) -> FloatArray:
    """(H, W, 3) in roughly [0, 1]: a two-colour gradient, maybe stripes, soft blotches."""
    scale = max(height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) / scale
    c1, c2 = rng.uniform(0, 1, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / (t.max() - t.min() + 1e-6) * rng.uniform(0.3, 1.0)
    image = c1 * (1 - t)[..., None] + c2 * t[..., None]
    if not easy and rng.random() < STRIPES[0]:
        period = rng.uniform(0.04, 0.3)
        turn = rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * (xs * math.cos(turn) + ys * math.sin(turn)) / period
                      + rng.uniform(0, 2 * math.pi))
        if rng.random() < STRIPES[1]:
            wave = np.sign(wave)
        tint = rng.uniform(-1, 1, 3).astype(np.float32)
        image = image + rng.uniform(*STRIPES[2:]) * wave[..., None] * tint
    grid = int(rng.integers(3, 9))
    coarse = rng.normal(0, 1, (grid, grid, 3)).astype(np.float32)
    rows = np.tensordot(_interp_matrix(height, grid), coarse, axes=1)  # (H, grid, 3)
    blotches = np.tensordot(_interp_matrix(width, grid), rows, axes=([1], [1]))  # (W, H, 3)
    blotches = blotches.transpose(1, 0, 2)
    strength = rng.uniform(0.01, 0.04) if easy else rng.uniform(0.02, 0.15)
    result: FloatArray = (image + strength * blotches).astype(np.float32)
    return result


def _vertices(shape: Shape) -> FloatArray:
    """(V, 2) polygon corners (x, y), counter-clockwise on screen, for squares and triangles."""
    if shape.label == 1:
        half = shape.size / 2
        corners = [(-half, -half), (-half, half), (half, half), (half, -half)]
    else:
        radius = shape.size / math.sqrt(3)
        corners = [(radius * math.cos(a), radius * math.sin(a))
                   for a in (-math.pi / 2, 5 * math.pi / 6, math.pi / 6)]
    cos, sin = math.cos(shape.angle), math.sin(shape.angle)
    return np.array([(shape.cx + x * cos - y * sin, shape.cy + x * sin + y * cos)
                     for x, y in corners], dtype=np.float32)


def _extent(label: int, size: float, angle: float) -> Box:
    """The shape's box around its centre."""
    probe = Shape(label, 0.0, 0.0, size, angle, (0.0, 0.0, 0.0))
    if label == 0:
        return -size / 2, -size / 2, size / 2, size / 2
    corners = _vertices(probe)
    return (float(corners[:, 0].min()), float(corners[:, 1].min()),
            float(corners[:, 0].max()), float(corners[:, 1].max()))


def coverage(shape: Shape, height: int, width: int) -> tuple[FloatArray, Box]:
    """(H, W) anti-aliased coverage in [0, 1] (from a signed distance) and the tight box."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
    if shape.label == 0:
        radius = shape.size / 2
        inside = radius - np.hypot(xs - shape.cx, ys - shape.cy)
        box = (shape.cx - radius, shape.cy - radius, shape.cx + radius, shape.cy + radius)
    else:
        corners = _vertices(shape)
        inside = np.full((height, width), np.inf, dtype=np.float32)
        for start, end in zip(corners, np.roll(corners, -1, axis=0), strict=True):
            edge = end - start
            normal = np.array([-edge[1], edge[0]], dtype=np.float32) / np.hypot(*edge)
            if float((np.array([shape.cx, shape.cy]) - start) @ normal) < 0:
                normal = -normal  # point into the shape
            inside = np.minimum(inside, (xs - start[0]) * normal[0] + (ys - start[1]) * normal[1])
        box = (float(corners[:, 0].min()), float(corners[:, 1].min()),
               float(corners[:, 0].max()), float(corners[:, 1].max()))
    return np.clip(inside + 0.5, 0, 1).astype(np.float32), box


def random_shape(rng: np.random.Generator, height: int, width: int, label: int | None = None,
                 easy: bool = False) -> Shape:
    label = int(rng.integers(3)) if label is None else label
    size = rng.uniform(*EASY_SIZE if easy else SHAPE_SIZE) * min(height, width)
    angle = rng.uniform(-ROTATION, ROTATION)
    x0, y0, x1, y1 = _extent(label, size, angle)
    cx = rng.uniform(1 - x0, width - 1 - x1)
    cy = rng.uniform(1 - y0, height - 1 - y1)
    return Shape(label, float(cx), float(cy), float(size), float(angle), (0.0, 0.0, 0.0))


def render(rng: np.random.Generator, height: int, width: int, shape: Shape | None = None,
           colour: tuple[float, float, float] | None = None, easy: bool = False) -> Sample:
    """One image: background, the shape in a colour that stands out from what lies under it,
    pixel noise over everything."""
    image = background(rng, height, width, easy)
    shape = shape or random_shape(rng, height, width, easy=easy)
    alpha, box = coverage(shape, height, width)
    under = (image * alpha[..., None]).sum((0, 1)) / max(float(alpha.sum()), 1.0)  # (3,)
    if colour is None:
        candidate = rng.uniform(0, 1, 3)
        for _ in range(50):
            if np.linalg.norm(candidate - under) > 0.45:
                break
            candidate = rng.uniform(0, 1, 3)
        colour = (float(candidate[0]), float(candidate[1]), float(candidate[2]))
    paint = np.array(colour, dtype=np.float32)
    image = image * (1 - alpha[..., None]) + paint * alpha[..., None]
    sigma = rng.uniform(0.005, 0.02) if easy else rng.uniform(0.01, 0.07)
    image = image + rng.normal(0, sigma, image.shape).astype(np.float32)
    pixels = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    x0, y0, x1, y1 = box
    return Sample(pixels, shape.label, (max(0.0, x0), max(0.0, y0), min(float(width), x1),
                                        min(float(height), y1)), alpha)


def shrink(pixels: ByteArray, size: tuple[int, int]) -> ByteArray:
    """PIL bicubic resize to (H, W), as ``attnviz.image_inputs`` resizes."""
    height, width = size
    resized = Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


@dataclass
class Dataset:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    boxes: torch.Tensor  # (N, 4) float: cx, cy, w, h in [0, 1]
    cells: torch.Tensor  # (N, gh, gw) float: the shape's share of each grid cell (ViT patches)


def make_dataset(rng: np.random.Generator, count: int, size: tuple[int, int],
                 render_size: tuple[int, int] | None = None, grid: tuple[int, int] = (1, 1),
                 easy: float = 0.0) -> Dataset:
    """``count`` images of ``size``; rendered at ``render_size`` and shrunk when given; the
    fraction ``easy`` of them plain (no stripes, little noise, larger shapes)."""
    height, width = render_size or size
    images = np.empty((count, size[0], size[1], 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    boxes = np.empty((count, 4), dtype=np.float32)
    cells = np.empty((count, *grid), dtype=np.float32)
    for index in range(count):
        sample = render(rng, height, width, easy=bool(rng.random() < easy))
        images[index] = sample.pixels if render_size is None else shrink(sample.pixels, size)
        labels[index] = sample.label
        x0, y0, x1, y1 = sample.box
        boxes[index] = ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width,
                        (y1 - y0) / height)
        cells[index] = sample.coverage.reshape(grid[0], height // grid[0], grid[1],
                                               width // grid[1]).mean((1, 3))
    return Dataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                   torch.from_numpy(labels), torch.from_numpy(boxes), torch.from_numpy(cells))


MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, ImageNet-normalised exactly as attnviz.image_inputs."""
    return (images.float() / 255.0 - MEAN) / STD


def batches(data: Dataset, batch: int, generator: torch.Generator
            ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled batches, half of each flipped left-right: (images, labels, boxes,
    cells)."""
    while True:
        order = torch.randperm(len(data.labels), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start:start + batch]
            images, boxes = normalise(data.images[index]), data.boxes[index].clone()
            cells = data.cells[index].clone()
            flip = torch.rand(batch, generator=generator) < 0.5
            images[flip] = images[flip].flip(-1)
            boxes[flip, 0] = 1 - boxes[flip, 0]
            cells[flip] = cells[flip].flip(-1)
            yield images, data.labels[index], boxes, cells


# ----------------------------------------------------------------------------- training


class Plan:
    """A fixed number of steps, cut down (with a note) when the machine is too slow for the
    wall-clock budget: every 20 steps the recent speed projects the finish; the cosine
    schedule follows the shortened plan."""

    def __init__(self, name: str, steps: int, budget_s: float, warmup: int) -> None:
        self.name, self.steps, self.budget_s, self.warmup = name, steps, budget_s, warmup
        self.planned = steps
        self.start = time.perf_counter()
        self.mark = (0, self.start)  # (step, time) where the speed window starts

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check(self, step: int) -> None:
        if step % 20 or step < 40:
            return
        now = time.perf_counter()
        per_step = (now - self.mark[1]) / (step - self.mark[0])
        if step % 200 == 0:
            self.mark = (step, now)
        left = self.budget_s - (now - self.start)
        fits = min(self.planned, step + max(1, int(left / per_step)))
        if fits < self.steps and self.steps == self.planned:
            print(f"  {self.name}: {self.planned} steps do not fit {self.budget_s:.0f}s at "
                  f"{per_step:.2f}s/step: cutting the plan", flush=True)
        self.steps = max(step, fits)  # and back up, up to the plan, when the speed recovers

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on matrices and kernels only (not biases, norms, tokens, embeddings)."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.ndim >= 2 and "pos_embed" not in name and "query_embed" not in name:
            decay.append(param)
        else:
            plain.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def train_loop(name: str, model: nn.Module, data: Iterator[tuple[torch.Tensor, ...]],
               loss_fn: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], *, steps: int,
               budget_s: float, lr: float, weight_decay: float, clip: float,
               warmup: int) -> tuple[int, float]:
    """AdamW, linear warm-up then cosine; returns (steps run, seconds)."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    plan = Plan(name, steps, budget_s, warmup)
    model.train()
    step, running = 0, 0.0
    while step < plan.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr * plan.lr_factor(step)
        loss = loss_fn(next(data))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        value = float(loss.detach())
        running = 0.98 * running + 0.02 * value if step else value
        step += 1
        plan.check(step)
        if step % 200 == 0 or step == plan.steps:
            print(f"  {name} step {step}/{plan.steps}  loss {running:.3f}  "
                  f"{plan.elapsed():.0f}s", flush=True)
        if plan.elapsed() > 1.15 * budget_s:
            print(f"  {name}: wall-clock budget spent, stopping at step {step}")
            break
    model.eval()
    return step, plan.elapsed()


# ----------------------------------------------------------------------------- ViT


def vit_spec() -> ViTSpec:
    grid = VIT_SIZE // VIT_PATCH
    return ViTSpec(dim=VIT_DIM, depth=VIT_DEPTH, heads=VIT_HEADS, patch=VIT_PATCH, channels=3,
                   mlp_hidden=4 * VIT_DIM, prefix_tokens=1, register_tokens=0, has_cls=True,
                   has_dist=False, pos_grid=(grid, grid), pos_includes_prefix=True,
                   layer_scale=False, qkv_bias=True, num_classes=len(CLASS_NAMES))


def init_vit(model: VisionTransformer) -> None:
    """timm's init: truncated normal (std 0.02) for linears and position embedding."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)


def vit_cls_attention(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Last block, head mean, CLS -> patches, renormalised over patches: (B, gh*gw).
    Computed by hand (not through attnviz's capture) so it can check the capture."""
    x: torch.Tensor = model.tokens(images)
    blocks = [cast(Block, block) for block in model.blocks]
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    batch, tokens, dim = x.shape
    heads = model.spec.heads
    qkv: torch.Tensor = last.attn.qkv(last.norm1(x))
    q, k, _ = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(dim // heads)).softmax(-1)  # (B, H, T, T)
    rows = probs[:, :, 0, 1:].mean(1)  # (B, patches)
    return rows / rows.sum(-1, keepdim=True)


def box_overlap(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 4) cx, cy, w, h in [0, 1] -> (B, gh*gw) fraction of each cell inside the box."""
    gh, gw = grid
    x0, x1 = boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 0] + boxes[:, 2] / 2
    y0, y1 = boxes[:, 1] - boxes[:, 3] / 2, boxes[:, 1] + boxes[:, 3] / 2
    cells_x, cells_y = torch.arange(gw) / gw, torch.arange(gh) / gh  # cell starts

    def cover(lo: torch.Tensor, hi: torch.Tensor, starts: torch.Tensor, n: int) -> torch.Tensor:
        left = torch.maximum(lo[:, None], starts[None])
        right = torch.minimum(hi[:, None], starts[None] + 1 / n)
        return (right - left).clamp(min=0) * n  # (B, n)

    ox, oy = cover(x0, x1, cells_x, gw), cover(y0, y1, cells_y, gh)
    return (oy[:, :, None] * ox[:, None, :]).flatten(1)


@dataclass(frozen=True)
class ViTRecipe:
    train_images: int = 24000
    val_images: int = 1000
    steps: int = 3000
    budget_s: float = 420.0
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 200
    patch_weight: float = 1.0  # the auxiliary per-patch loss (0: classification only)
    init: str = "torch"  # or "timm" (truncated normal, std 0.02: slower to start at dim 64)
    easy: float = 0.0  # fraction of plain training images


def train_vit(rng: np.random.Generator, recipe: ViTRecipe
              ) -> tuple[VisionTransformer, Dataset, dict[str, float]]:
    """Classification on the CLS token, plus (``patch_weight``) an auxiliary per-patch loss
    during training: a throw-away linear layer on each final patch token says which class
    covers that patch (background where the shape covers under 30%). It gives every patch a
    signal, which a ViT this small needs to learn the task in minutes; it is not saved."""
    started = time.perf_counter()
    grid = (VIT_SIZE // VIT_PATCH, VIT_SIZE // VIT_PATCH)
    train = make_dataset(rng, recipe.train_images, (VIT_SIZE, VIT_SIZE), (RENDER, RENDER), grid,
                         recipe.easy)
    val = make_dataset(rng, recipe.val_images, (VIT_SIZE, VIT_SIZE), (RENDER, RENDER), grid)
    data_s = time.perf_counter() - started
    print(f"ViT data: {len(train.labels)} train + {len(val.labels)} val images in "
          f"{data_s:.0f}s", flush=True)
    model = VisionTransformer(vit_spec())
    if recipe.init == "timm":
        init_vit(model)
    else:  # PyTorch's default init for the layers
        nn.init.trunc_normal_(model.pos_embed, std=0.02)
        nn.init.normal_(model.cls_token, std=1e-6)
    patch_head = nn.Linear(model.spec.dim, len(CLASS_NAMES) + 1)
    generator = torch.Generator().manual_seed(SEED)
    stream = batches(train, recipe.batch, generator)

    def loss_fn(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, labels, _, cells = batch
        tokens = model.norm(model.blocks(model.tokens(images)))  # (B, 1 + patches, C)
        loss = F.cross_entropy(model.head(tokens[:, 0]), labels, label_smoothing=0.1)
        if recipe.patch_weight:
            wanted = torch.where(cells.flatten(1) >= 0.3, labels[:, None], len(CLASS_NAMES))
            patch_logits = patch_head(tokens[:, 1:])  # (B, patches, classes + 1)
            loss = loss + recipe.patch_weight * F.cross_entropy(
                patch_logits.flatten(0, 1), wanted.flatten())
        return loss

    steps, seconds = train_loop("ViT", nn.ModuleList([model, patch_head]), stream, loss_fn,
                                steps=recipe.steps, budget_s=recipe.budget_s, lr=recipe.lr,
                                weight_decay=0.05, clip=1.0, warmup=recipe.warmup)
    with torch.no_grad():
        images = normalise(val.images)
        accuracy = float((model(images).argmax(-1) == val.labels).float().mean())
        sub = slice(0, 50)
        attention = vit_cls_attention(model, images[sub])
        overlap = box_overlap(val.boxes[sub], grid)
        inside = (attention * overlap).sum(-1)
        area = overlap.sum(-1) / (grid[0] * grid[1])
    return model, val, {"accuracy": accuracy, "steps": steps, "train_s": seconds,
                        "data_s": data_s, "mass_in_box": float(inside.mean()),
                        "box_area": float(area.mean()), "ratio": float((inside / area).mean())}


def check_capture(model: VisionTransformer, images: torch.Tensor) -> float:
    """Largest difference between attnviz's captured last-block CLS row and ours."""
    from attnviz.capture import capture_attention

    with torch.no_grad(), capture_attention(model) as maps:
        model(images)
    names = [n for n in maps if n.startswith("blocks.")]
    rows = maps[names[-1]][:, :, 0, 1:].mean(1)
    rows = rows / rows.sum(-1, keepdim=True)
    with torch.no_grad():
        return float((rows - vit_cls_attention(model, images)).abs().max())


# ----------------------------------------------------------------------------- DETR


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


def detr_outputs(model: DETR, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``DETR.forward`` keeping every decoder layer's predictions (DETR's auxiliary losses):
    (L, B, Q, classes) logits and (L, B, Q, 4) boxes."""
    backbone = cast(Backbone, model.backbone[0])
    features = model.input_proj(backbone.body(images))  # (B, C, h, w)
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
    return model.class_embed(stacked), model.bbox_embed(stacked).sigmoid()


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


def mixed_batches(pools: list[Dataset], batch: int, generator: torch.Generator
                  ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches from each image size in turn."""
    streams = [batches(pool, batch, generator) for pool in pools]
    while True:
        for stream in streams:
            yield next(stream)


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
    per_size: int = 4000  # training images of each size in DETR_SIZES
    val_images: int = 300  # per size, for the first two sizes
    steps: int = 3000
    budget_s: float = 540.0
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 200
    easy: float = 0.0


def train_detr(rng: np.random.Generator, recipe: DetrRecipe
               ) -> tuple[DETR, int, dict[str, float]]:
    started = time.perf_counter()
    pools = [make_dataset(rng, recipe.per_size, size, easy=recipe.easy) for size in DETR_SIZES]
    vals = [make_dataset(rng, recipe.val_images, size) for size in DETR_SIZES[:2]]
    data_s = time.perf_counter() - started
    print(f"DETR data: {recipe.per_size} train images per size {DETR_SIZES} in {data_s:.0f}s",
          flush=True)
    model = build_detr()
    thaw_batch_norm(model.backbone)
    generator = torch.Generator().manual_seed(SEED + 1)
    stream = mixed_batches(pools, recipe.batch, generator)
    class_weight = torch.ones(len(CLASS_NAMES) + 1)
    class_weight[-1] = NO_OBJECT_WEIGHT

    def loss_fn(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, labels, boxes, _ = batch
        logits, predicted = detr_outputs(model, images)
        return sum((set_loss(logits[i], predicted[i], labels, boxes, class_weight)
                    for i in range(len(logits))), torch.zeros(()))

    steps, seconds = train_loop("DETR", model, stream, loss_fn, steps=recipe.steps,
                                budget_s=recipe.budget_s, lr=recipe.lr, weight_decay=1e-4,
                                clip=0.1, warmup=recipe.warmup)
    frozen = build_detr()  # the model attnviz will rebuild: frozen BN from the trained stats
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    frozen.load_state_dict(state, strict=True)
    frozen.eval()
    with torch.no_grad():
        probe = normalise(vals[0].images[:8])
        gap = float((frozen(probe).boxes - model(probe).boxes).abs().max())
    metrics = {"steps": steps, "train_s": seconds, "data_s": data_s, "frozen_gap": gap}
    for (height, width), val in zip(DETR_SIZES, vals, strict=False):
        accuracy, iou = detr_eval(frozen, val)
        metrics[f"accuracy_{height}x{width}"], metrics[f"iou_{height}x{width}"] = accuracy, iou
    return frozen, steps, metrics


# ----------------------------------------------------------------------------- main


def demo_images(out: Path) -> list[Sample]:
    """Fixed demo shapes on seeded backgrounds: a triangle (128x128), a circle (96x128)."""
    rng = np.random.default_rng(SEED + 7)
    first = render(rng, 128, 128, Shape(2, 44.0, 50.0, 46.0, 0.25, (0.0, 0.0, 0.0)),
                   colour=(0.95, 0.85, 0.1))
    second = render(rng, 96, 128, Shape(0, 74.0, 56.0, 40.0, 0.0, (0.0, 0.0, 0.0)),
                    colour=(0.85, 0.15, 0.2))
    Image.fromarray(first.pixels).save(out / "shapes_demo.png")
    Image.fromarray(second.pixels).save(out / "shapes_demo_2.png")
    return [first, second]


def sample_tensor(sample: Sample, size: tuple[int, int] | None = None) -> torch.Tensor:
    pixels = sample.pixels if size is None else shrink(sample.pixels, size)
    return normalise(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "sample_checkpoints")
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--skip-detr", action="store_true")
    options = parser.parse_args(argv)
    out: Path = options.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(options.threads)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    demos = demo_images(out)
    lines = []
    if not options.skip_vit:
        recipe = (ViTRecipe(train_images=2000, val_images=200, steps=60, budget_s=60, warmup=20)
                  if options.quick else ViTRecipe())
        vit, val, stats = train_vit(rng, recipe)
        gap = check_capture(vit, normalise(val.images[:4]))
        spec = vit.spec
        args = argparse.Namespace(
            model="attnviz_vit_shapes", img_size=VIT_SIZE, patch_size=VIT_PATCH,
            embed_dim=spec.dim, depth=spec.depth, num_heads=spec.heads, mlp_ratio=4.0,
            qkv_bias=True, num_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES),
            mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), seed=SEED, steps=stats["steps"])
        path = out / "vit_shapes.pth"
        torch.save({"model": {k: v.detach().clone().contiguous()
                              for k, v in vit.state_dict().items()}, "args": args}, path)
        with torch.no_grad():
            demo_pred = [CLASS_NAMES[int(vit(sample_tensor(d, (VIT_SIZE, VIT_SIZE)).float())
                                         .argmax())] for d in demos]
        lines += [
            f"ViT: val accuracy {stats['accuracy']:.3f} ({stats['steps']:.0f} steps, train "
            f"{stats['train_s']:.0f}s, data {stats['data_s']:.0f}s); {path.name} "
            f"{path.stat().st_size} bytes",
            f"ViT: last-block CLS attention (head mean) inside the shape's box "
            f"{stats['mass_in_box']:.3f} vs box area {stats['box_area']:.3f}: "
            f"mean ratio {stats['ratio']:.2f}x over 50 val images",
            f"ViT: attnviz capture vs hand-computed CLS row: max |diff| {gap:.2e}",
            f"ViT: demo predictions {demo_pred} (truth "
            f"{[CLASS_NAMES[d.label] for d in demos]})"]
    if not options.skip_detr:
        detr_recipe = (DetrRecipe(per_size=300, val_images=100, steps=60, budget_s=60,
                                  warmup=20) if options.quick else DetrRecipe())
        detr, steps, metrics = train_detr(rng, detr_recipe)
        args = argparse.Namespace(
            lr=5e-4, backbone="resnet18-shapes", dilation=True, position_embedding="sine",
            enc_layers=2, dec_layers=2, dim_feedforward=DETR_FFN, hidden_dim=DETR_HIDDEN,
            dropout=0.0, nheads=DETR_HEADS, num_queries=DETR_QUERIES, pre_norm=False,
            masks=False, eos_coef=NO_OBJECT_WEIGHT, dataset_file="shapes",
            num_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES),
            train_sizes=[list(s) for s in DETR_SIZES], seed=SEED)
        path = out / "detr_shapes.pth"
        torch.save({"model": {k: v.detach().clone().contiguous()
                              for k, v in detr.state_dict().items()}, "args": args,
                    "epoch": steps}, path)
        summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                            if k.startswith(("accuracy", "iou")))
        demo_lines = []
        with torch.no_grad():
            for demo in demos:
                result = detr(sample_tensor(demo))
                scores, labels = result.logits.softmax(-1)[0, :, :-1].max(-1)
                top = int(scores.argmax())
                height, width = demo.pixels.shape[:2]
                truth = torch.tensor([[(demo.box[0] + demo.box[2]) / 2 / width,
                                       (demo.box[1] + demo.box[3]) / 2 / height,
                                       (demo.box[2] - demo.box[0]) / width,
                                       (demo.box[3] - demo.box[1]) / height]])
                iou = float(giou(corners(result.boxes[0, top:top + 1]), corners(truth))[0][0])
                demo_lines.append(f"{CLASS_NAMES[int(labels[top])]} {float(scores[top]):.2f} "
                                  f"IoU {iou:.2f} (truth {CLASS_NAMES[demo.label]})")
        lines += [
            f"DETR: top query on val: {summary} ({steps} steps, train {metrics['train_s']:.0f}s,"
            f" data {metrics['data_s']:.0f}s); {path.name} {path.stat().st_size} bytes",
            f"DETR: trained-BN vs frozen-BN rebuild max |box diff| {metrics['frozen_gap']:.2e}",
            f"DETR: demos at their own size: {'; '.join(demo_lines)}"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
