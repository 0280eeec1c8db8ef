"""Benchmark ``attnviz heatmap --image`` (DETR-R50, ViT-B/16) against plain forward + rendering.

Run from the repository root: ``.venv/bin/python benchmarks/image_bench.py [--repeat 5]
[--warmup 1] [--threads N] [--keep DIR]``.

Built in a temp dir (or ``--keep DIR``, reused on later runs), random weights, seeded:

* ``detr_r50.pth``: DETR-R50 in the official facebookresearch layout, ``{'model': sd, 'args':
  Namespace(nheads=8, hidden_dim=256, pre_norm=False, dilation=False)}``: ResNet-50 under
  ``backbone.0.body.`` (frozen BN: weight, bias, running_mean, running_var), ``input_proj``
  2048 -> 256, 6 + 6 transformer layers (hidden 256, 8 heads, feed-forward 2048),
  ``transformer.decoder.norm``, ``query_embed`` [100, 256], ``class_embed`` [92, 256],
  ``bbox_embed.layers.{0,1,2}``.
* ``vit_b16.pth``: ViT-B/16 at 224 in the timm layout (dim 768, depth 12, 12 heads, cls token,
  ``pos_embed`` [1, 197, 768], qkv bias, head 1000), ``{'model': sd, 'args':
  Namespace(num_heads=12)}``.
* ``street.jpg`` (800 x 1066, DETR's shorter side already 800) and ``patch.jpg`` (224 x 224).

Timed in-process, interleaved (the runs take turns so drift hits all alike), median of
``--repeat`` rounds after ``--warmup`` rounds, ``time.perf_counter``:

* heatmap: ``image_heatmap(ckpt, out.png, ImageOptions(image=..., threshold=0.0, top_k=3),
  force=True)``, end to end (read the checkpoint, rebuild the model, preprocess the image,
  forward under ``capture_attention``, build the overlays, render, write the PNG);
* forward: ``with torch.no_grad(): model(image.tensor)`` on the model rebuilt once outside the
  timing and the same preprocessed input;
* render: ``render.render_image_panels`` with exactly the panels, titles, boxes and colour bar
  that ``image_heatmap`` renders (taken once from its own figure builder);
* breakdown only: load (``load_checkpoint`` + ``analyse`` + ``load_detr``/``load_vit``),
  preprocess (``detr_image``/``vit_image``), capture (the forward inside ``capture_attention``).

Target (the issue's): end-to-end heatmap <= 1.5x (plain forward + rendering); the end-to-end
time includes the model load, the baseline does not. The ratio without the load is printed
beside it for information. Exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from attnviz import image_heatmap as ih
from attnviz import render
from attnviz.capture import capture_attention
from attnviz.checkpoint import Checkpoint, load_checkpoint
from attnviz.image_inputs import PreparedImage, detr_image, vit_image
from attnviz.inspection import InspectReport, analyse
from attnviz.models.detr import load_detr
from attnviz.models.vit import load_vit

TARGET = 1.5
SEED = 20261121
DETR_SIZE, VIT_SIZE = (800, 1066), (224, 224)  # (H, W)
State = dict[str, torch.Tensor]
Run = Callable[[], Any]
Loader = Callable[[Checkpoint, InspectReport], tuple[nn.Module, Any]]


class Weights:
    """Seeded random tensors: normal * std, Kaiming-scaled convs, near-identity frozen BN."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std

    def conv(self, sd: State, name: str, c_out: int, c_in: int, k: int) -> None:
        sd[name] = self.normal(c_out, c_in, k, k, std=(2.0 / (c_in * k * k)) ** 0.5)

    def frozen_bn(self, sd: State, prefix: str, channels: int, gain: float = 1.0) -> None:
        sd[f"{prefix}.weight"] = gain * (1 + self.normal(channels, std=0.1))
        sd[f"{prefix}.bias"] = self.normal(channels, std=0.1)
        sd[f"{prefix}.running_mean"] = self.normal(channels, std=0.1)
        sd[f"{prefix}.running_var"] = 1 + 0.1 * torch.rand(channels, generator=self.gen)

    def linear(self, sd: State, prefix: str, n_out: int, n_in: int) -> None:
        sd[f"{prefix}.weight"] = self.normal(n_out, n_in)
        sd[f"{prefix}.bias"] = torch.zeros(n_out)

    def layer_norm(self, sd: State, prefix: str, dim: int) -> None:
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = torch.ones(dim), torch.zeros(dim)


def resnet50(w: Weights, sd: State, body: str) -> int:
    """torchvision ResNet-50 (bottleneck, 3/4/6/3 blocks, expansion 4) under ``body``."""
    w.conv(sd, f"{body}.conv1.weight", 64, 3, 7)
    w.frozen_bn(sd, f"{body}.bn1", 64)
    c_in = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3),
                                                strict=True), start=1):
        for index in range(blocks):
            p = f"{body}.layer{stage}.{index}"
            w.conv(sd, f"{p}.conv1.weight", width, c_in, 1)
            w.frozen_bn(sd, f"{p}.bn1", width)
            w.conv(sd, f"{p}.conv2.weight", width, width, 3)
            w.frozen_bn(sd, f"{p}.bn2", width)
            w.conv(sd, f"{p}.conv3.weight", width * 4, width, 1)
            w.frozen_bn(sd, f"{p}.bn3", width * 4, gain=0.2)  # keeps the residual sum tame
            if index == 0:
                w.conv(sd, f"{p}.downsample.0.weight", width * 4, c_in, 1)
                w.frozen_bn(sd, f"{p}.downsample.1", width * 4)
            c_in = width * 4
    return c_in


def detr_r50_state_dict(hidden: int = 256, heads: int = 8, feedforward: int = 2048,
                        layers: int = 6, queries: int = 100, classes: int = 92) -> State:
    """Official facebookresearch/detr key names, full-size R50 model (random weights)."""
    w, sd = Weights(SEED), OrderedDict[str, torch.Tensor]()
    channels = resnet50(w, sd, "backbone.0.body")
    w.conv(sd, "input_proj.weight", hidden, channels, 1)
    sd["input_proj.bias"] = torch.zeros(hidden)
    torch.manual_seed(SEED)  # the nn layers' own initialisation
    for i in range(layers):
        encoder = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=feedforward)
        sd |= {f"transformer.encoder.layers.{i}.{k}": v for k, v in encoder.state_dict().items()}
    for i in range(layers):
        decoder = nn.TransformerDecoderLayer(hidden, heads, dim_feedforward=feedforward)
        sd |= {f"transformer.decoder.layers.{i}.{k}": v for k, v in decoder.state_dict().items()}
    w.layer_norm(sd, "transformer.decoder.norm", hidden)
    sd["query_embed.weight"] = w.normal(queries, hidden, std=1.0)
    w.linear(sd, "class_embed", classes, hidden)
    for i, n_out in enumerate((hidden, hidden, 4)):
        w.linear(sd, f"bbox_embed.layers.{i}", n_out, hidden)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def vit_b16_state_dict(dim: int = 768, depth: int = 12, patch: int = 16, side: int = 224,
                       classes: int = 1000) -> State:
    """timm ``vit_base_patch16_224`` key names and shapes (random weights)."""
    w, sd = Weights(SEED + 1), OrderedDict[str, torch.Tensor]()
    sd["cls_token"] = w.normal(1, 1, dim)
    sd["pos_embed"] = w.normal(1, (side // patch) ** 2 + 1, dim)
    sd["patch_embed.proj.weight"] = w.normal(dim, 3, patch, patch)
    sd["patch_embed.proj.bias"] = torch.zeros(dim)
    for i in range(depth):
        p = f"blocks.{i}"
        w.layer_norm(sd, f"{p}.norm1", dim)
        w.linear(sd, f"{p}.attn.qkv", 3 * dim, dim)
        w.linear(sd, f"{p}.attn.proj", dim, dim)
        w.layer_norm(sd, f"{p}.norm2", dim)
        w.linear(sd, f"{p}.mlp.fc1", 4 * dim, dim)
        w.linear(sd, f"{p}.mlp.fc2", dim, 4 * dim)
    w.layer_norm(sd, "norm", dim)
    w.linear(sd, "head", classes, dim)
    return dict(sd)


def test_image(path: Path, size: tuple[int, int], seed: int) -> None:
    """A structured RGB picture (gradient sky, ground, boxes, discs, noise) as a JPEG."""
    height, width = size
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    sky, ground = np.array([90, 150, 230], np.float32), np.array([70, 110, 50], np.float32)
    base = np.where(y < 0.55, sky * (1 - 0.4 * y) + 20 * x, ground * (0.6 + 0.6 * y))
    base = base + rng.normal(0.0, 6.0, (height, width, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0 = int(rng.integers(0, width * 17 // 20))
        y0 = int(rng.integers(height // 5, height * 17 // 20))
        bw, bh = int(rng.integers(width // 20, width // 5)), int(rng.integers(height // 20,
                                                                                height // 4))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=colour, outline=(0, 0, 0))
        else:
            draw.ellipse((x0, y0, x0 + bw, y0 + bw), fill=colour)
    image.save(path, quality=92)


def build(out_dir: Path) -> dict[str, Path]:
    paths = {name: out_dir / name for name in ("detr_r50.pth", "vit_b16.pth", "street.jpg",
                                                "patch.jpg")}
    if all(p.is_file() for p in paths.values()):
        print(f"reusing {', '.join(p.name for p in paths.values())} in {out_dir}")
        return paths
    print(f"building the checkpoints and images in {out_dir} ...", flush=True)
    for name, make, args in (
            ("detr_r50.pth", detr_r50_state_dict,
             argparse.Namespace(nheads=8, hidden_dim=256, pre_norm=False, dilation=False)),
            ("vit_b16.pth", vit_b16_state_dict, argparse.Namespace(num_heads=12))):
        start = time.perf_counter()
        sd = make()
        partial = paths[name].with_suffix(".partial")
        torch.save({"model": sd, "args": args}, partial)
        partial.rename(paths[name])  # only complete files are reused by --keep
        params = sum(t.numel() for t in sd.values())
        print(f"  {name}: {len(sd)} tensors, {params / 1e6:.1f} M values, "
              f"{paths[name].stat().st_size / 1e6:.0f} MB, {time.perf_counter() - start:.1f} s")
    test_image(paths["street.jpg"], DETR_SIZE, 1)
    test_image(paths["patch.jpg"], VIT_SIZE, 2)
    return paths


def interleaved(runs: dict[str, Run], repeat: int, warmup: int) -> dict[str, list[float]]:
    """Sorted seconds per named run; the runs take turns so drift hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t) for name, t in times.items()}


def bench_case(label: str, ckpt_path: Path, image_path: Path, out_dir: Path, repeat: int,
               warmup: int) -> tuple[float, float]:
    """Time one model; returns the ratios (with load, without load) to forward + render."""
    options = ih.ImageOptions(image=image_path, threshold=0.0, top_k=3)
    is_detr = label.startswith("DETR")
    loader: Loader = load_detr if is_detr else load_vit

    def load() -> tuple[Checkpoint, InspectReport, nn.Module, Any]:
        ckpt = load_checkpoint(ckpt_path)
        report = analyse(ckpt)
        model, spec = loader(ckpt, report)
        return ckpt, report, model, spec

    def preprocess(spec: Any) -> PreparedImage:
        if is_detr:
            return detr_image(image_path, None)
        return vit_image(image_path, spec.image_size, None, spec.patch)

    ckpt, report, model, spec = load()
    image = preprocess(spec)
    figure, maps, description = ih.image_figure(ckpt_path, ckpt, report, options)  # as heatmap
    rows, cols = len(figure.panels), len(figure.panels[0])
    ph, pw = figure.panels[0][0].shape[:2]
    heat_out, render_out = out_dir / f"{ckpt_path.stem}.png", out_dir / f"{ckpt_path.stem}_r.png"

    def heatmap() -> None:
        ih.image_heatmap(ckpt_path, heat_out, options, force=True)

    def forward() -> None:
        with torch.no_grad():
            model(image.tensor)

    def render_only() -> None:
        render.render_image_panels(figure.panels, render_out, "png",
                                   title=options.title or figure.title,
                                   panel_titles=figure.titles, boxes=figure.boxes,
                                   points=figure.points, colorbar=(figure.vmax, "attention"))

    def captured() -> None:
        with torch.no_grad(), capture_attention(model):
            model(image.tensor)

    runs: dict[str, Run] = {"heatmap": heatmap, "forward": forward, "render": render_only,
                            "load": load, "preprocess": lambda: preprocess(spec),
                            "capture": captured}
    times = interleaved(runs, repeat, warmup)
    med = {name: statistics.median(t) for name, t in times.items()}
    low = {name: t[0] for name, t in times.items()}
    base, base_low = med["forward"] + med["render"], low["forward"] + low["render"]
    with_load, without_load = med["heatmap"] / base, (med["heatmap"] - med["load"]) / base
    rest = med["heatmap"] - med["load"] - med["preprocess"] - med["capture"] - med["render"]
    with Image.open(heat_out) as shown:
        out_size = f"{shown.size[0]}x{shown.size[1]} px, {heat_out.stat().st_size / 1e6:.2f} MB"

    print(f"\n{label}: {ckpt_path.name} ({ckpt_path.stat().st_size / 1e6:.0f} MB), "
          f"{image_path.name} -> model input {tuple(image.tensor.shape[-2:])}")
    print(f"  {description}; {len(maps)} maps captured")
    print(f"  figure: {rows} x {cols} panels of {ph}x{pw}; heatmap PNG {out_size}")
    print(f"  {'run':<58} {'median s':>9} {'min s':>8}")
    for name, text in (
            ("heatmap", "heatmap: image_heatmap(...) end to end"),
            ("forward", "forward: plain no_grad forward (baseline)"),
            ("render", "render: render_image_panels, same panels (baseline)"),
            ("load", "  load: load_checkpoint + analyse + load_model"),
            ("preprocess", "  preprocess: read + resize + normalise the image"),
            ("capture", "  capture: forward inside capture_attention")):
        print(f"  {text:<58} {med[name]:>9.3f} {low[name]:>8.3f}")
    print(f"  {'  rest of heatmap (overlays, figure, atomic write; by diff)':<58} {rest:>9.3f}")
    print(f"  {'baseline: forward + render':<58} {base:>9.3f} {base_low:>8.3f}")
    print(f"  heatmap / (forward + render): {with_load:.2f}x with load (target), "
          f"{without_load:.2f}x without load; of mins {low['heatmap'] / base_low:.2f}x; "
          f"capture / forward {med['capture'] / med['forward']:.2f}x")
    return with_load, without_load


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--keep", type=Path, help="write/reuse the files in this directory")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="attnviz-bench-") as tmp:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = build(out_dir)
        print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; median of "
              f"{args.repeat} interleaved rounds after {args.warmup} warm-up; load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at start")
        if os.getloadavg()[0] >= 1.0:
            hint = "; try --threads 1" if torch.get_num_threads() > 1 else ""
            print(f"  (busy machine: with every core in use, timings swing{hint})")
        results = [(label, *bench_case(label, paths[ckpt], paths[image], Path(tmp), args.repeat,
                                       args.warmup))
                   for label, ckpt, image in (("DETR-R50 800x1066", "detr_r50.pth", "street.jpg"),
                                              ("ViT-B/16 224", "vit_b16.pth", "patch.jpg"))]
    print(f"\ntargets (end-to-end heatmap, model load included, vs plain forward + rendering; "
          f"<= {TARGET}x):")
    for label, with_load, without_load in results:
        print(f"  {verdict(with_load <= TARGET)}  {label}: heatmap {with_load:.2f}x "
              f"(forward + render) <= {TARGET}x   [info: {without_load:.2f}x without the load]")


if __name__ == "__main__":
    main()
