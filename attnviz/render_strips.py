"""What chosen query rows attend to over a long context: one strip per layer and head.

Each strip is one query row's probabilities over every key, block-pooled (max by default) to the
figure's pixel width, so a single attended token far away still shows. Strips are grouped by
layer; the keys' tokens label the axis where they fit, and each strip lists, at the right, its
top-k keys computed from the full-resolution row (never from the pooled pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnviz.pooling import pool_map
from attnviz.render import MASKED_RGB, PLAIN_TEXT, _label_step, wrap_title

Matrix = np.ndarray[Any, Any]
GROUP_GAP_PX, MAX_WIDTH_PX = 6, 1600


@dataclass(frozen=True)
class Strip:
    """One query row of one head: ``values`` (S,) at full resolution."""

    layer: str
    head: str
    query: str
    values: torch.Tensor


def top_keys(values: torch.Tensor, labels: Sequence[str], k: int) -> list[tuple[int, str, float]]:
    """The ``k`` most attended keys of a row as (position, token, probability)."""
    clean = torch.nan_to_num(values.float(), nan=-1.0)
    count = min(k, clean.numel())
    probs, where = torch.topk(clean, count)
    return [(int(i), labels[int(i)] if int(i) < len(labels) else str(int(i)), float(p))
            for p, i in zip(probs, where, strict=True) if p > 0]


def short_layer_names(names: Sequence[str]) -> list[str]:
    """Layer names without the prefix and suffix they all share ('model.layers.3.self_attn'
    -> '3'), when what is left still tells them apart."""
    if len(names) < 2:
        return list(names)
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middles = [".".join(p[head:len(p) - tail]) for p in parts]
    if any(not m for m in middles) or len(set(middles)) < len(middles):
        return list(names)
    return middles


def _short(token: str, width: int = 12) -> str:
    token = " ".join(token.split()) or "·"
    return token if len(token) <= width else token[:width - 1] + "…"


def render_strips(strips: Sequence[Strip], key_labels: Sequence[str], output: Path, fmt: str, *,
                  title: str, pool: str = "max", top_k: int = 5, cmap: str = "viridis",
                  shared_scale: bool = True, dpi: int = 100) -> list[str]:
    """Draw the strips; returns notes (how keys were pooled)."""
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    source = strips[0].values.numel()
    rows = torch.stack([s.values.float() for s in strips])  # (N, S)
    pooled, info = pool_map(rows[:, None], 1, min(source, MAX_WIDTH_PX), pool)  # (N, 1, W)
    pixels = pooled[:, 0].numpy()  # (N, W)
    finite = np.isfinite(pixels)
    clean = np.where(finite, pixels, 0.0)
    vmax = float(clean.max()) or 1.0
    top = vmax if shared_scale else np.maximum(clean.max(axis=1, keepdims=True), 1e-30)
    table = colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3]  # (256, 3)
    rgb = table[np.clip(clean / top * 255.0 + 0.5, 0, 255).astype(np.int64)]  # (N, W, 3)
    rgb[~finite] = MASKED_RGB
    layers = list(dict.fromkeys(s.layer for s in strips))
    short = {name: f"layer {s}" if s.isdigit() else s
             for name, s in zip(layers, short_layer_names(layers), strict=True)}
    width = pixels.shape[1]
    strip_px = max(9, min(36, 640 // len(strips)))
    height = len(strips) * (strip_px + 1) + (len(layers) - 1) * GROUP_GAP_PX
    canvas = np.ones((height, width, 3))
    centres: list[float] = []
    names: list[str] = []
    y = 0
    for index, strip in enumerate(strips):
        first = not index or strip.layer != strips[index - 1].layer
        if index and first:
            y += GROUP_GAP_PX
        canvas[y:y + strip_px] = rgb[index][None]
        centres.append(y + strip_px / 2)
        names.append(f"{short[strip.layer]}  {strip.head}" if first else strip.head)
        y += strip_px + 1
    texts = ["  ".join(f"{_short(t, 8)}@{i} {p:.2g}" for i, t, p in top_keys(s.values,
                                                                             key_labels, top_k))
             for s in strips] if top_k else []
    label_size = 7 if strip_px >= 12 else 5
    left = 0.25 + 0.06 * max(len(n) for n in names)
    text_w = 0.05 * max((len(t) for t in texts), default=0) + 0.2
    right = text_w + 1.0
    fig_w, fig_h = left + width / dpi + right, 1.1 + height / dpi + 1.0
    with plt.rc_context(PLAIN_TEXT):
        fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
        ax = fig.add_axes((left / fig_w, 1.0 / fig_h, width / dpi / fig_w, height / dpi / fig_h))
        ax.imshow(canvas, interpolation="nearest", aspect="auto",
                  extent=(-0.5, width - 0.5, height, 0))
        ax.set_yticks(centres, names, fontsize=label_size)
        step = _label_step(source)
        ticks = list(range(0, source, step))
        ax.set_xticks([(t + 0.5) * width / source - 0.5 for t in ticks],
                      [_short(key_labels[t]) if t < len(key_labels) else str(t) for t in ticks],
                      fontsize=6, rotation=90)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        for centre, text in zip(centres, texts, strict=False):
            ax.text(1.005, centre, text, transform=ax.get_yaxis_transform(), ha="left",
                    va="center", fontsize=label_size - 1, family="monospace")
        pooled_note = (f"keys pooled {info.factor[1]:.1f}:1 ({pool})" if not info.exact
                       else "every key drawn")
        fig.suptitle(wrap_title(f"{title} · {pooled_note}; right: top {top_k} keys of the full "
                                "row", fig_w - 0.3, 10),
                     fontsize=10, y=1 - 0.1 / fig_h, va="top")
        bar = fig.add_axes(((fig_w - 0.75) / fig_w, 1.0 / fig_h + 0.2 * height / dpi / fig_h,
                            0.15 / fig_w, 0.6 * height / dpi / fig_h))
        label = "attention probability" if shared_scale else "fraction of each strip's maximum"
        fig.colorbar(ScalarMappable(Normalize(0.0, vmax if shared_scale else 1.0),
                                    colormaps[cmap]), cax=bar, label=label)
        fig.savefig(output, format=fmt)
        plt.close(fig)
    return [] if info.exact else [f"keys pooled {info.factor[1]:.1f}:1 by {pool} to "
                                  f"{width} pixels"]
