"""Render docs/layouts.md from the layout registry (a test checks it is up to date).

Run: python scripts/make_layout_docs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from attnviz.heads import CHECKPOINT_SETTINGS, HEAD_KEYS, KV_HEAD_KEYS
from attnviz.layouts.registry import LAYOUTS
from attnviz.layouts.spec import LayoutSpec

DOC = Path(__file__).resolve().parent.parent / "docs" / "layouts.md"


def _keys(spec: LayoutSpec) -> str:
    parts = [t for t in (spec.qkv, spec.q, spec.k, spec.v, spec.kv) if t]
    parts += [" or ".join(spec.out)] if spec.out else []
    return ", ".join(f"`{p}`" for p in parts)


def _architectures(spec: LayoutSpec) -> str:
    text = ", ".join(f"`{a}`" for a in spec.architectures) or "any"
    if spec.exclusive:
        text = f"only {text}"
    if spec.not_for:
        text += "; never for " + ", ".join(f"`{a}`" for a in spec.not_for)
    return text


def render() -> str:
    lines = [
        "# Supported checkpoint layouts",
        "",
        "Generated from `attnviz/layouts/registry.py` by `scripts/make_layout_docs.py`.",
        "`{p}` is the layer prefix, `{parent}` the module above it. Packings (Linear",
        "orientation, rows = outputs): `separate` q/k/v tensors; `blocked` rows",
        "[Q (H*d) | K (Hkv*d) | V (Hkv*d)]; `interleaved` rows (H, 3, d); `grouped` rows",
        "(Hkv, H/Hkv + 2, d); `sharded` rows (S, 3, E/S) with the order of q, k, v inside each",
        "model-parallel block given in the description; `kv_fused` q in its own tensor, k and v",
        "in one, rows [K | V]; `per_head` q/k/v/out tensors with a leading head axis, each",
        "head stored (in, out) (TransformerLens: `W_Q [H, E, d]`, `W_O [H, d, E]`).",
        "",
        "## Which layout claims a tensor",
        "",
        "Every layout whose anchor, sibling tensors and shape rule fit is a candidate. Key names",
        "and shapes alone can fit packings that split the same tensor differently (`c_attn`",
        "`[3E, E]` is nanoGPT's blocked q|k|v and GPT-BigCode's per-head interleaved rows;",
        "`qkv_proj` `[3E, E]` without a bias is blocked in custom encoders and four",
        "model-parallel blocks in CodeGen). Then the architecture decides: config.json",
        "`model_type` (beside the file, or `--config`), or a training script's settings stored",
        "in the checkpoint (`model_args`: nanoGPT). A layout marked *only* applies just to the",
        "architectures it names; *never for* lists architectures it must not be used for; a",
        "layout that names the architecture wins over generic ones. When candidates still",
        "disagree, attnviz stops with an error that lists them and asks for `--layout NAME`",
        "(inspect, split-qkv, heatmap, report): it never guesses. `--verify` on an HF model",
        "directory also compares every head's q, k and v with what the transformers module",
        "computes, so a wrong packing cannot pass.",
        "",
        "| layout | description | examples | architectures | keys | packing | stored | "
        "shape rule |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in LAYOUTS:
        description = spec.description.replace("|", "\\|")  # a bare '|' would split the cell
        lines.append(
            f"| `{spec.name}` | {description} | {spec.examples} | {_architectures(spec)} | "
            f"{_keys(spec)} | "
            f"{spec.packing.value} | {'(in, out)' if spec.transposed else '(out, in)'} | "
            f"{spec.shape_rule.value} |"
        )
    lines += [
        "",
        "## Where the number of heads comes from",
        "",
        "First answer wins; the source is always reported.",
        "",
        "1. `--heads N`, or `--heads 'glob=N'` for matching layer names (patterns beat N).",
        "2. `config.json` beside the checkpoint, or `--config`; keys tried, scoped by layer name:",
    ]
    lines += [f"   - `{key}`" + (f" for layers matching `{scope}`" if scope else "")
              for scope, key in HEAD_KEYS]
    lines += [
        "3. The same keys inside the checkpoint, under "
        + ", ".join(f"`{k}`" for k in CHECKPOINT_SETTINGS) + " (DETR `args.nheads`).",
        "4. Shapes: relative position bias tables `[..., H]`, T5 `relative_attention_bias`"
        " `[buckets, H]`, q/k norms of size d (H = q rows / d); a layer without such a tensor"
        " takes the value of same-width layers when they all agree.",
        "5. A `head_dim` setting (H = q rows / head_dim).",
        "",
        "Key/value heads follow from the shapes once H is known (Hkv = k rows / d); "
        + ", ".join(f"`{k}`" for k in KV_HEAD_KEYS)
        + " and `multi_query` are checked against them. E % H != 0, or Hkv not dividing H, is"
        " an error naming the layer, E and H.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    DOC.write_text(render())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
