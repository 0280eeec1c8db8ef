"""What both trained samples share: the synthetic shapes, their batches and the training loop.

Every image holds one coloured shape (circle, square or triangle; random colour, size, position,
rotation) on a textured background (gradient, stripes, blotches, pixel noise). Inputs are
normalised with ImageNet mean/std exactly as ``attnviz.image_inputs`` does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import nn

from attnviz.image_inputs import IMAGENET_MEAN, IMAGENET_STD

SEED = 20261121
CLASS_NAMES = ["circle", "square", "triangle"]
SHAPE_SIZE = (0.22, 0.5)  # of the shorter side
ROTATION = math.radians(15)  # shapes turn by up to this either way (any turn: far slower ViT)
STRIPES = (0.75, 0.4, 0.05, 0.3)  # chance of stripes, of hard stripes, amplitude range

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


def background(rng: np.random.Generator, height: int, width: int) -> FloatArray:
    """(H, W, 3) in roughly [0, 1]: a two-colour gradient, maybe stripes, soft blotches."""
    scale = max(height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) / scale
    c1, c2 = rng.uniform(0, 1, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / (t.max() - t.min() + 1e-6) * rng.uniform(0.3, 1.0)
    image = c1 * (1 - t)[..., None] + c2 * t[..., None]
    if rng.random() < STRIPES[0]:
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
    strength = rng.uniform(0.02, 0.15)
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


def random_shape(rng: np.random.Generator, height: int, width: int, label: int | None = None
                 ) -> Shape:
    label = int(rng.integers(3)) if label is None else label
    size = rng.uniform(*SHAPE_SIZE) * min(height, width)
    angle = rng.uniform(-ROTATION, ROTATION)
    x0, y0, x1, y1 = _extent(label, size, angle)
    cx = rng.uniform(1 - x0, width - 1 - x1)
    cy = rng.uniform(1 - y0, height - 1 - y1)
    return Shape(label, float(cx), float(cy), float(size), float(angle), (0.0, 0.0, 0.0))


def render(rng: np.random.Generator, height: int, width: int, shape: Shape | None = None,
           colour: tuple[float, float, float] | None = None) -> Sample:
    """One image: background, the shape in a colour that stands out from what lies under it,
    pixel noise over everything."""
    image = background(rng, height, width)
    shape = shape or random_shape(rng, height, width)
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
    sigma = rng.uniform(0.01, 0.07)
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
                 render_size: tuple[int, int] | None = None, grid: tuple[int, int] = (1, 1)
                 ) -> Dataset:
    """``count`` images of ``size``, rendered at ``render_size`` and shrunk when given, with
    the shape's share of each cell of a ``grid`` (ViT patches, DETR feature cells)."""
    height, width = render_size or size
    images = np.empty((count, size[0], size[1], 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    boxes = np.empty((count, 4), dtype=np.float32)
    cells = np.empty((count, *grid), dtype=np.float32)
    for index in range(count):
        sample = render(rng, height, width)
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


def mixed_batches(pools: list[Dataset], batch: int, generator: torch.Generator
                  ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches from each image size in turn."""
    streams = [batches(pool, batch, generator) for pool in pools]
    while True:
        for stream in streams:
            yield next(stream)


# ----------------------------------------------------------------------------- training


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine to zero over a fixed number of steps (no wall-clock cuts:
    the same seed gives the same file on any machine)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


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


@dataclass
class Timing:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process, every thread

    @classmethod
    def since(cls, wall: float, cpu: float) -> Timing:
        return cls(time.perf_counter() - wall, time.process_time() - cpu)


def train_loop(name: str, model: nn.Module, data: Iterator[tuple[torch.Tensor, ...]],
               loss_fn: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], *, steps: int,
               lr: float, weight_decay: float, clip: float, warmup: int) -> Timing:
    """AdamW, linear warm-up then cosine, a fixed number of steps."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    wall, cpu = time.perf_counter(), time.process_time()
    model.train()
    running = 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup)
        loss = loss_fn(next(data))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        value = float(loss.detach())
        running = 0.98 * running + 0.02 * value if step else value
        if (step + 1) % 200 == 0 or step + 1 == steps:
            spent = Timing.since(wall, cpu)
            print(f"  {name} step {step + 1}/{steps}  loss {running:.3f}  {spent.wall_s:.0f}s "
                  f"(cpu {spent.cpu_s:.0f}s)", flush=True)
    model.eval()
    return Timing.since(wall, cpu)
