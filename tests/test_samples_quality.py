"""The trained samples are right on images they never saw: fresh shapes (a seed the training
never used), written as PNG files and read back through attnviz's own image loading and its
rebuild of each checkpoint from the file alone, as `attnviz heatmap --image` and the demo do."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from attnviz.checkpoint import load_checkpoint
from attnviz.image_heatmap import ImageOptions, image_figure
from attnviz.image_inputs import detr_image, vit_image
from attnviz.inspection import analyse
from attnviz.models.detr import load_detr
from attnviz.models.vit import load_vit

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
HELD_OUT_SEED = 20270613  # the training's numpy streams are all seeded from SEED = 20261121
IMAGES = 200


def _training_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_samples",
                                                  ROOT / "scripts" / "train_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_samples"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


train: Any = _training_script()


def _write_images(folder: Path, count: int, size: tuple[int, int], seed: int
                  ) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """``count`` fresh shape images as PNG files: (paths, labels (N,), boxes (N, 4) cx, cy, w,
    h as fractions of the image)."""
    assert seed != train.SEED
    rng = np.random.default_rng(seed)
    height, width = size
    paths, labels, boxes = [], [], []
    for index in range(count):
        sample = train.render(rng, height, width)
        path = folder / f"shape_{height}x{width}_{index:03d}.png"
        Image.fromarray(sample.pixels).save(path)
        x0, y0, x1, y1 = sample.box
        paths.append(path)
        labels.append(sample.label)
        boxes.append(((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width,
                      (y1 - y0) / height))
    return paths, torch.tensor(labels), torch.tensor(boxes)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of (N, 4) cx, cy, w, h boxes, computed here rather than with the script's helper."""
    a0, a1 = a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2
    b0, b1 = b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2
    inter = (torch.minimum(a1, b1) - torch.maximum(a0, b0)).clamp(min=0).prod(-1)
    union = a[:, 2:].prod(-1) + b[:, 2:].prod(-1) - inter
    return inter / union


def vit_accuracy(samples: Path, folder: Path) -> float:
    """The ViT sample's accuracy on IMAGES fresh 128x128 images, shrunk as the CLI does."""
    ckpt = load_checkpoint(samples / "vit_shapes.pth")
    model, spec = load_vit(ckpt, analyse(ckpt))
    paths, labels, _ = _write_images(folder, IMAGES, (train.RENDER, train.RENDER),
                                     HELD_OUT_SEED)
    assert set(labels.tolist()) == {0, 1, 2}
    images = torch.cat([vit_image(p, spec.image_size, None, spec.patch).tensor for p in paths])
    assert images.shape == (IMAGES, 3, *spec.image_size)
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    return float((predicted == labels).float().mean())


def detr_figures(samples: Path, folder: Path, size: tuple[int, int]) -> tuple[float, float]:
    """(accuracy, mean IoU) of the DETR sample's best query (highest score over the real
    classes, as the pictures rank queries) on IMAGES // 2 fresh images of ``size``."""
    ckpt = load_checkpoint(samples / "detr_shapes.pth")
    model, _ = load_detr(ckpt, analyse(ckpt))
    paths, labels, boxes = _write_images(folder, IMAGES // 2, size, HELD_OUT_SEED + size[0])
    assert set(labels.tolist()) == {0, 1, 2}
    images = torch.cat([detr_image(p, size).tensor for p in paths])  # (N, 3, H, W)
    with torch.no_grad():
        out = model(images)
    scores, classes = out.logits.softmax(-1)[..., :-1].max(-1)  # (N, Q): drop "no object"
    best = scores.argmax(-1)  # (N,)
    rows = torch.arange(len(best))
    accuracy = float((classes[rows, best] == labels).float().mean())
    return accuracy, float(_iou(out.boxes[rows, best], boxes).mean())


def test_vit_sample_classifies_held_out_shapes(tmp_path: Path) -> None:
    accuracy = vit_accuracy(SAMPLES, tmp_path)
    assert accuracy >= 0.95, f"ViT accuracy {accuracy:.3f} on {IMAGES} held-out images"


@pytest.mark.parametrize("size", [(128, 128), (96, 128)])
def test_detr_sample_best_query_finds_held_out_shapes(tmp_path: Path,
                                                      size: tuple[int, int]) -> None:
    """The best query names the right shape on >= 90% of the images, mean IoU >= 0.7."""
    accuracy, iou = detr_figures(SAMPLES, tmp_path, size)
    assert accuracy >= 0.9, f"DETR best-query accuracy {accuracy:.3f} at {size}"
    assert iou >= 0.7, f"DETR best-query mean IoU {iou:.3f} at {size}"


@pytest.mark.parametrize(("picture", "truth"), [("shapes_demo.png", "triangle"),
                                                ("shapes_demo_2.png", "circle")])
def test_demo_detr_picture_labels_the_shape_it_shows(picture: str, truth: str) -> None:
    """The demo's DETR figure (``--size 128 --top-k 2 --threshold 0.3``) labels every query it
    draws with the shape that is in the picture."""
    path = SAMPLES / "detr_shapes.pth"
    ckpt = load_checkpoint(path)
    options = ImageOptions(SAMPLES / picture, size="128", top_k=2, threshold=0.3)
    figure, _, _ = image_figure(path, ckpt, analyse(ckpt), options)
    assert figure.metadata is not None
    with torch.serialization.safe_globals([argparse.Namespace]):
        names = torch.load(path, weights_only=True)["args"].class_names
    queries = json.loads(figure.metadata["queries"])
    labels = json.loads(figure.metadata["labels"])
    scores = json.loads(figure.metadata["scores"])
    assert queries, "the figure draws no query"
    assert [names[labels[q]] for q in queries] == [truth] * len(queries)
    assert all(scores[q] >= 0.3 for q in queries)  # drawn because it passed the threshold
