"""Train the two *trained* sample checkpoints on synthetic shapes (seeded, CPU).

Run: python scripts/train_samples.py [--out DIR] [--jobs 2] [--quick]
(default: sample_checkpoints/; ``--jobs 2`` trains the two models side by side, one thread each)

- vit_shapes.pth: attnviz's own ``VisionTransformer`` (timm key names; 64x64, patch 8, dim 64,
  4 blocks, 4 heads, CLS token) classifying the shape, trained on 128x128 renders shrunk with PIL
  bicubic, as ``attnviz heatmap --image`` shrinks them. ``{'model', 'args': Namespace(num_heads,
  img_size, patch_size, class_names, ...)}``.
- detr_shapes.pth: attnviz's own ``DETR`` (official key names), see ``train_detr.py``.
  ``{'model', 'args': Namespace(nheads, hidden_dim, num_queries, pre_norm, dilation,
  class_names, ...), 'epoch'}``. DETR checkpoints are read at DETR's evaluation size (shorter
  side 800) unless ``--size`` is given: this model was trained at 96-128 pixels, so show it with
  ``--size 128``.
- shapes_demo.png (128x128, a triangle) and shapes_demo_2.png (96x128, a circle).

Every number is seeded and every schedule is a fixed number of steps, so a rerun writes the same
weights with the same libraries; the two models draw from separate seeded streams, so training
them apart (``--skip-vit``/``--skip-detr``, ``--jobs 2``) gives the same files as together.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

# OpenMP threads that spin while waiting crawl when other jobs share the cores: sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # samples_common, train_detr

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from PIL import Image
from samples_common import (
    CLASS_NAMES,
    SEED,
    Dataset,
    Sample,
    Shape,
    Timing,
    batches,
    make_dataset,
    normalise,
    render,
    train_loop,
)
from torch import nn
from train_detr import (
    DETR_FFN,
    DETR_HEADS,
    DETR_HIDDEN,
    DETR_QUERIES,
    DETR_SIZES,
    NO_OBJECT_WEIGHT,
    DetrRecipe,
    corners,
    giou,
    train_detr,
)

from attnviz.image_inputs import IMAGENET_MEAN, IMAGENET_STD, vit_image
from attnviz.models.vit import Block, VisionTransformer, ViTSpec

RENDER = 128  # the ViT's images are rendered at 128x128 and shrunk to 64x64 like attnviz does
VIT_SIZE, VIT_PATCH, VIT_DIM, VIT_DEPTH, VIT_HEADS = 64, 8, 64, 4, 4
VIT_STREAM, DETR_STREAM, DEMO_STREAM = 1, 2, 7  # each model's own numpy stream from SEED
DEMO_NAMES = ("shapes_demo.png", "shapes_demo_2.png")


# ----------------------------------------------------------------------------- ViT


def vit_spec() -> ViTSpec:
    grid = VIT_SIZE // VIT_PATCH
    return ViTSpec(dim=VIT_DIM, depth=VIT_DEPTH, heads=VIT_HEADS, patch=VIT_PATCH, channels=3,
                   mlp_hidden=4 * VIT_DIM, prefix_tokens=1, register_tokens=0, has_cls=True,
                   has_dist=False, pos_grid=(grid, grid), pos_includes_prefix=True,
                   layer_scale=False, qkv_bias=True, num_classes=len(CLASS_NAMES))


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
    steps: int = 4000
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 200
    patch_weight: float = 1.0  # the auxiliary per-patch loss (0: classification only)


def train_vit(rng: np.random.Generator, recipe: ViTRecipe
              ) -> tuple[VisionTransformer, Dataset, dict[str, float]]:
    """Classification on the CLS token, plus (``patch_weight``) an auxiliary per-patch loss
    during training: a throw-away linear layer on each final patch token says which class
    covers that patch (background where the shape covers under 30%). It gives every patch a
    signal, which a ViT this small needs to learn the task in minutes; it is not saved."""
    wall, cpu = time.perf_counter(), time.process_time()
    grid = (VIT_SIZE // VIT_PATCH, VIT_SIZE // VIT_PATCH)
    train = make_dataset(rng, recipe.train_images, (VIT_SIZE, VIT_SIZE), (RENDER, RENDER), grid)
    val = make_dataset(rng, recipe.val_images, (VIT_SIZE, VIT_SIZE), (RENDER, RENDER), grid)
    data = Timing.since(wall, cpu)
    print(f"ViT data: {len(train.labels)} train + {len(val.labels)} val images in "
          f"{data.wall_s:.0f}s", flush=True)
    torch.manual_seed(SEED)
    model = VisionTransformer(vit_spec())  # PyTorch's default init for the layers
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)
    patch_head = nn.Linear(model.spec.dim, len(CLASS_NAMES) + 1)
    stream = batches(train, recipe.batch, torch.Generator().manual_seed(SEED))

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

    trained = train_loop("ViT", nn.ModuleList([model, patch_head]), stream, loss_fn,
                         steps=recipe.steps, lr=recipe.lr, weight_decay=0.05, clip=1.0,
                         warmup=recipe.warmup)
    with torch.no_grad():
        images = normalise(val.images)
        accuracy = float((model(images).argmax(-1) == val.labels).float().mean())
        sub = slice(0, 50)
        attention = vit_cls_attention(model, images[sub])
        overlap = box_overlap(val.boxes[sub], grid)
        inside = (attention * overlap).sum(-1)
        area = overlap.sum(-1) / (grid[0] * grid[1])
    return model, val, {"accuracy": accuracy, "steps": recipe.steps, "data_s": data.wall_s,
                        "train_s": trained.wall_s, "cpu_s": Timing.since(wall, cpu).cpu_s,
                        "mass_in_box": float(inside.mean()), "box_area": float(area.mean()),
                        "ratio": float((inside / area).mean())}


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



# ----------------------------------------------------------------------------- main


def demo_images(out: Path) -> list[Sample]:
    """Fixed demo shapes on seeded backgrounds: a triangle (128x128), a circle (96x128)."""
    rng = np.random.default_rng(SEED + DEMO_STREAM)
    first = render(rng, 128, 128, Shape(2, 44.0, 50.0, 46.0, 0.25, (0.0, 0.0, 0.0)),
                   colour=(0.95, 0.85, 0.1))
    second = render(rng, 96, 128, Shape(0, 74.0, 56.0, 40.0, 0.0, (0.0, 0.0, 0.0)),
                    colour=(0.85, 0.15, 0.2))
    for name, sample in zip(DEMO_NAMES, (first, second), strict=True):
        Image.fromarray(sample.pixels).save(out / name)
    return [first, second]


def sample_tensor(sample: Sample) -> torch.Tensor:
    """(1, 3, H, W) normalised, at the sample's own size."""
    return normalise(torch.from_numpy(sample.pixels.copy()).permute(2, 0, 1)[None])


def timing_line(name: str, stats: dict[str, float], path: Path) -> str:
    return (f"{name}: {stats['steps']:.0f} steps, data {stats['data_s']:.0f}s + train "
            f"{stats['train_s']:.0f}s wall, {stats['cpu_s']:.0f}s CPU; {path.name} "
            f"{path.stat().st_size} bytes")


def vit_sample(out: Path, recipe: ViTRecipe, demos: list[Sample]) -> list[str]:
    vit, val, stats = train_vit(np.random.default_rng([SEED, VIT_STREAM]), recipe)
    gap = check_capture(vit, normalise(val.images[:4]))
    spec = vit.spec
    args = argparse.Namespace(
        model="attnviz_vit_shapes", img_size=VIT_SIZE, patch_size=VIT_PATCH,
        embed_dim=spec.dim, depth=spec.depth, num_heads=spec.heads, mlp_ratio=4.0,
        qkv_bias=True, num_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES),
        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), seed=SEED, steps=recipe.steps)
    path = out / "vit_shapes.pth"
    torch.save({"model": {k: v.detach().clone().contiguous()
                          for k, v in vit.state_dict().items()}, "args": args}, path)
    predicted = []
    for name in DEMO_NAMES:  # read, resized and centre-cropped as `attnviz heatmap` does
        pixels = vit_image(out / name, spec.image_size, None, spec.patch).tensor
        with torch.no_grad():
            probs = vit(pixels).softmax(-1)[0]  # (classes,)
        predicted.append(f"{CLASS_NAMES[int(probs.argmax())]} {float(probs.max()):.2f}")
    return [
        f"ViT: val accuracy {stats['accuracy']:.3f} on {recipe.val_images} images",
        timing_line("ViT", stats, path),
        f"ViT: last-block CLS attention (head mean) inside the shape's box "
        f"{stats['mass_in_box']:.3f} vs box area {stats['box_area']:.3f}: "
        f"mean ratio {stats['ratio']:.2f}x over 50 val images",
        f"ViT: attnviz capture vs hand-computed CLS row: max |diff| {gap:.2e}",
        f"ViT: demos {'; '.join(predicted)} (truth {[CLASS_NAMES[d.label] for d in demos]})"]


def detr_sample(out: Path, recipe: DetrRecipe, demos: list[Sample]) -> list[str]:
    detr, metrics = train_detr(np.random.default_rng([SEED, DETR_STREAM]), recipe)
    args = argparse.Namespace(
        lr=recipe.lr, backbone="resnet18-shapes", dilation=True, position_embedding="sine",
        enc_layers=2, dec_layers=2, dim_feedforward=DETR_FFN, hidden_dim=DETR_HIDDEN,
        dropout=0.0, nheads=DETR_HEADS, num_queries=DETR_QUERIES, pre_norm=False,
        masks=False, eos_coef=NO_OBJECT_WEIGHT, dataset_file="shapes",
        num_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES),
        train_sizes=[list(s) for s in DETR_SIZES], seed=SEED)
    path = out / "detr_shapes.pth"
    torch.save({"model": {k: v.detach().clone().contiguous()
                          for k, v in detr.state_dict().items()}, "args": args,
                "epoch": int(metrics["steps"])}, path)
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                        if k.startswith(("accuracy", "iou")))
    demo_lines = []
    with torch.no_grad():
        for demo in demos:
            result = detr(sample_tensor(demo))
            scores, labels = result.logits.softmax(-1)[0, :, :-1].max(-1)  # (Q,)
            top = int(scores.argmax())
            height, width = demo.pixels.shape[:2]
            x0, y0, x1, y1 = demo.box
            truth = torch.tensor([[(x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                                   (x1 - x0) / width, (y1 - y0) / height]])
            iou = float(giou(corners(result.boxes[0, top:top + 1]), corners(truth))[0][0])
            demo_lines.append(f"{CLASS_NAMES[int(labels[top])]} {float(scores[top]):.2f} "
                              f"IoU {iou:.2f}, next query {float(scores.sort()[0][-2]):.2f} "
                              f"(truth {CLASS_NAMES[demo.label]})")
    return [f"DETR: top query on val: {summary}", timing_line("DETR", metrics, path),
            f"DETR: trained-BN vs frozen-BN rebuild max |box diff| {metrics['frozen_gap']:.2e}",
            f"DETR: demos at their own size: {'; '.join(demo_lines)}"]


def side_by_side(options: argparse.Namespace) -> int:
    """Both models at once, one process and one thread each (their lines interleave), then
    the wall-clock and CPU time of the whole run."""
    wall = time.perf_counter()
    common = [sys.executable, str(Path(__file__).resolve()), "--out", str(options.out),
              "--threads", "1"] + (["--quick"] if options.quick else [])
    runs = [subprocess.Popen([*common, flag]) for flag in ("--skip-detr", "--skip-vit")]
    codes = [run.wait() for run in runs]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"both: {time.perf_counter() - wall:.0f}s wall, {cpu.ru_utime + cpu.ru_stime:.0f}s "
          f"CPU in all")
    return max(codes)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "sample_checkpoints")
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=1,
                        help="2: train the two models side by side, one thread each")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--skip-detr", action="store_true")
    options = parser.parse_args(argv)
    out: Path = options.out
    out.mkdir(parents=True, exist_ok=True)
    if options.jobs == 2 and not (options.skip_vit or options.skip_detr):
        return side_by_side(options)
    torch.set_num_threads(options.threads)
    demos = demo_images(out)
    lines = []
    if not options.skip_vit:
        vit_recipe = (ViTRecipe(train_images=2000, val_images=200, steps=60, warmup=20)
                      if options.quick else ViTRecipe())
        lines += vit_sample(out, vit_recipe, demos)
    if not options.skip_detr:
        detr_recipe = (DetrRecipe(per_size=300, val_images=100, body_steps=30, steps=30,
                                  warmup=10) if options.quick else DetrRecipe())
        lines += detr_sample(out, detr_recipe, demos)
    print("---\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
