"""Option declarations shared by several commands, so that one flag means one thing everywhere,
and the helpers that turn a command's input flags into core requests."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from attnviz.errors import UsageError

if TYPE_CHECKING:
    from attnviz.image_heatmap import ImageOptions
    from attnviz.sequence_inputs import SequenceRequest

# help panels: which part of a run an option is about
INPUT, MODEL, VIEW, IMAGE_VIEW, OUTPUT = ("Input", "Model", "View",
                                          "Image views (ViT-like, DETR)", "Output")
SEED_MAX = 2**63 - 1  # torch seeds are 64-bit; the decoder side uses seed + 1


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def in_range(low: float, high: float | None = None, *, high_open: bool = False,
             integer: bool = True) -> Callable[[Any], Any]:
    """An option callback refusing, before anything runs, a number outside [low, high] (each
    item of a repeated option), with a one-line usage error that says the allowed range."""
    kind = "an integer" if integer else "a number"
    if high is None:
        allowed = f"{kind} >= {_number(low)}"
    else:
        allowed = f"{kind} in [{_number(low)}, {_number(high)}{')' if high_open else ']'}"

    def check(value: Any) -> Any:
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is None:
                continue
            fits = math.isfinite(item) and item >= low and (
                high is None or (item < high if high_open else item <= high))
            if not fits:
                raise typer.BadParameter(f"{_number(item)} is out of range; use {allowed}")
        return value
    return check


def existing_file(value: Path | None) -> Path | None:
    """Input files: a missing one and a directory are told apart up front."""
    if value is not None and not value.is_file():
        raise typer.BadParameter(f"{value}: " + (
            "is a directory, not a file" if value.is_dir() else "no such file"))
    return value


def image_size(value: str | None) -> str | None:
    """--size N or HxW, each side at least 1 pixel."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)(?:\s*[x,]\s*(\d+))?\s*", value.lower())
    if match is None or any(int(side) < 1 for side in match.groups() if side is not None):
        raise typer.BadParameter(f"'{value}' is not N or HxW with sides >= 1, e.g. 224 or "
                                 "480x640")
    return value


def grid_text(value: str | None) -> str | None:
    """--grid HxW (or N for N x N), each side at least 1 patch."""
    if value is not None:
        parse_grid(value)
    return value


def parse_grid(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)(?:\s*[x,]\s*(\d+))?\s*", text.lower())
    if match is None or any(int(side) < 1 for side in match.groups() if side is not None):
        raise typer.BadParameter(f"'{text}' is not HxW patches with sides >= 1, e.g. 14x14")
    rows = int(match.group(1))
    return rows, int(match.group(2) or rows)


def parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y) and x >= 0 and y >= 0):
        raise UsageError(f"--point '{text}': use x,y in image pixels, each >= 0, e.g. 320,240")
    return x, y


def query_texts(value: list[str] | None) -> list[str] | None:
    from attnviz.query_rows import parse_query_rows

    for text in value or ():
        parse_query_rows(text)  # refused before the model is built
    return value


def detr_queries(texts: list[str] | None) -> list[int] | None:
    """DETR's --query: decoder query indices (no 'last': DETR's queries are a set)."""
    from attnviz.query_rows import parse_query_rows

    chosen: list[int] = []
    for text in texts or ():
        for start, stop in parse_query_rows(text):
            if start < 0 or stop < 0:
                raise UsageError(f"--query '{text}': DETR queries are indices, each an integer "
                                 ">= 0 (there is no last query in a set)")
            chosen += range(start, stop + 1)
    return chosen or None


def points(value: list[str] | None) -> list[str] | None:
    for text in value or ():
        parse_point(text)  # refused before the model is built
    return value


CheckpointArg = Annotated[Path, typer.Argument(
    metavar="CHECKPOINT", help="Checkpoint file (.pth/.pt/.bin/.ckpt/.safetensors), "
    "*.index.json or model directory.")]
HeadsOpt = Annotated[list[str] | None, typer.Option(
    "--heads", metavar="N|GLOB=N", rich_help_panel=MODEL,
    help="Heads per layer: N, or 'glob=N' for matching layers (repeatable).")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", metavar="FILE", rich_help_panel=MODEL, callback=existing_file,
    help="config.json to read head counts from (default: one beside the file).")]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", metavar="PATH", rich_help_panel=MODEL,
    help="Dotted path of the mapping that holds the tensors, e.g. 'model' or 'ema'.")]
ForceOpt = Annotated[bool, typer.Option("--force", rich_help_panel=OUTPUT,
                                        help="Overwrite existing outputs.")]
LayoutOpt = Annotated[str | None, typer.Option(
    "--layout", metavar="NAME", rich_help_panel=MODEL,
    help="Layout NAME for tensors whose names and shapes fit several packings when no "
    "config.json model_type says which model wrote them (docs/layouts.md).")]
TitleOpt = Annotated[str | None, typer.Option("--title", metavar="TEXT", rich_help_panel=OUTPUT,
                                              help="Figure or page title.")]

# the forward pass: where the model comes from
ModelOpt = Annotated[str | None, typer.Option(
    "--model", metavar="MODULE:FACTORY", rich_help_panel=MODEL,
    help="package.module:factory returning the nn.Module to load the weights into (default: "
    "rebuild nn.Transformer models, or load an HF directory).")]
StrictOpt = Annotated[bool, typer.Option("--strict/--no-strict", rich_help_panel=MODEL,
                                         help="With --model: require an exact key match.")]
NormFirstOpt = Annotated[bool, typer.Option("--norm-first", rich_help_panel=MODEL,
                                            help="Rebuilt nn.Transformer layers are pre-norm.")]
ActivationOpt = Annotated[str, typer.Option(
    "--activation", metavar="relu|gelu|quick_gelu", rich_help_panel=MODEL,
    help="Rebuilt nn.Transformer activation: relu or gelu; with --image, a CLIP tower's MLP: "
    "quick_gelu or gelu (when the file does not say).")]

# sequence inputs
TextOpt = Annotated[str | None, typer.Option("--text", metavar="TEXT", rich_help_panel=INPUT,
                                             help="Text (HF directories with a tokenizer).")]
TokensOpt = Annotated[str | None, typer.Option("--tokens", metavar="IDS", rich_help_panel=INPUT,
                                               help="Token ids, e.g. 101,2023,102.")]
InputOpt = Annotated[Path | None, typer.Option(
    "--input", metavar="FILE", rich_help_panel=INPUT, callback=existing_file,
    help="Embeddings [L, E] or [B, L, E]: .npy, .safetensors or .pt.")]
SeqLenOpt = Annotated[int | None, typer.Option(
    "--seq-len", metavar="N", rich_help_panel=INPUT, callback=in_range(1),
    help="Random embeddings of this length, N >= 1 (untrained checks).")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", metavar="N", rich_help_panel=INPUT, callback=in_range(0, SEED_MAX),
    help="Seed for --seq-len and --tgt-seq-len, 0 <= N < 2^63.")]
TgtInputOpt = Annotated[Path | None, typer.Option(
    "--tgt-input", metavar="FILE", rich_help_panel=INPUT, callback=existing_file,
    help="Decoder-side embeddings (encoder-decoder / decoder models).")]
TgtSeqLenOpt = Annotated[int | None, typer.Option(
    "--tgt-seq-len", metavar="N", rich_help_panel=INPUT, callback=in_range(1),
    help="Random decoder-side embeddings of this length, N >= 1.")]
CausalOpt = Annotated[bool, typer.Option("--causal", rich_help_panel=INPUT,
                                         help="Causal mask (decoder self-attention, or the "
                                         "encoder of an encoder-only model).")]
PadOpt = Annotated[int, typer.Option("--pad", metavar="N", rich_help_panel=INPUT,
                                     callback=in_range(0),
                                     help="Treat the last N source positions as padding.")]

# image inputs
ImageOpt = Annotated[Path | None, typer.Option(
    "--image", metavar="FILE", rich_help_panel=INPUT, callback=existing_file,
    help="An image for a vision checkpoint (timm ViT, DINO, DINOv2, torchvision ViT, CLIP "
    "visual tower, timm Swin, DETR), an HF vision model directory, or a ViT-like --model "
    "factory.")]
SizeOpt = Annotated[str | None, typer.Option(
    "--size", metavar="N|HxW", rich_help_panel=INPUT, callback=image_size,
    help="Image size: N (ViT side / DETR shorter side) or HxW.")]
NormalizeOpt = Annotated[bool, typer.Option(
    "--normalize/--no-normalize", rich_help_panel=INPUT,
    help="Mean/std normalisation: ImageNet's (CLIP towers: CLIP's).")]
TopKOpt = Annotated[int, typer.Option("--top-k", metavar="K", rich_help_panel=IMAGE_VIEW,
                                      callback=in_range(1),
                                      help="DETR: objects to show, K >= 1.")]
ThresholdOpt = Annotated[float, typer.Option(
    "--threshold", metavar="P", rich_help_panel=IMAGE_VIEW,
    callback=in_range(0, 1, integer=False), help="DETR: minimum class score, in [0, 1].")]
QueryOpt = Annotated[list[str] | None, typer.Option(
    "--query", metavar="ROWS", rich_help_panel=VIEW, callback=query_texts,
    help="Query rows: sequences: last, N, a-b or a list, drawn as strips over every key "
    "(what the last token looks at); DETR: query indices (repeatable), instead of --top-k.")]
PointOpt = Annotated[list[str] | None, typer.Option(
    "--point", metavar="X,Y", rich_help_panel=IMAGE_VIEW, callback=points,
    help="Attention of the patch at image pixel x,y instead of CLS (Swin: over its window); "
    "DETR: encoder self-attention there (repeatable).")]
KeepMassOpt = Annotated[float | None, typer.Option(
    "--keep-mass", metavar="P", rich_help_panel=IMAGE_VIEW,
    callback=in_range(0, 1, integer=False),
    help="ViT-like: keep each map's smallest set of patches holding fraction P of its "
    "attention, as in the DINO paper (e.g. 0.6), P in (0, 1].")]
PrefixTokensOpt = Annotated[int | None, typer.Option(
    "--prefix-tokens", metavar="N", rich_help_panel=IMAGE_VIEW, callback=in_range(0),
    help="--model with --image: tokens before the patch grid (CLS, registers), N >= 0.")]
GridOpt = Annotated[str | None, typer.Option(
    "--grid", metavar="HxW", rich_help_panel=IMAGE_VIEW, callback=grid_text,
    help="--model with --image: the patch grid, rows x columns.")]
HeadFusionOpt = Annotated[str, typer.Option(
    "--head-fusion", metavar="mean|max|min", rich_help_panel=IMAGE_VIEW,
    help="Rollout: how heads are fused.")]
DiscardOpt = Annotated[float, typer.Option(
    "--discard-ratio", metavar="R", rich_help_panel=IMAGE_VIEW,
    callback=in_range(0, 1, high_open=True, integer=False),
    help="Rollout: zero this fraction of the lowest attentions, in [0, 1).")]
AlphaOpt = Annotated[float, typer.Option(
    "--alpha", metavar="A", rich_help_panel=IMAGE_VIEW, callback=in_range(0, 1, integer=False),
    help="Overlay opacity, in [0, 1].")]


def one_input(**given: object) -> None:
    """Refuse two inputs at once (``--text`` and ``--image``, ...)."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
    if len(named) > 1:
        raise UsageError(f"{' and '.join(named)} both give the input; pass one")


def check_model_flags(model: str | None, strict: bool, activation: str,
                      config: Path | None) -> None:
    if activation not in {"relu", "gelu"}:
        raise UsageError(f"--activation {activation}: use relu or gelu")
    if model is None and not strict:
        raise UsageError("--no-strict only applies with --model")
    if config is not None and not config.is_file():
        raise UsageError(f"--config {config}: no such file")


def sequence_request(*, text: str | None, tokens: str | None, input_file: Path | None,
                     seq_len: int | None, seed: int, tgt_input: Path | None,
                     tgt_seq_len: int | None, causal: bool, pad: int) -> SequenceRequest:
    from attnviz.sequence_inputs import SequenceRequest

    return SequenceRequest(text=text, tokens=tokens, input_file=input_file, seq_len=seq_len,
                           seed=seed, tgt_input=tgt_input, tgt_seq_len=tgt_seq_len,
                           causal=causal, pad=pad)


def image_options(image: Path, *, size: str | None, normalize: bool, layer: str | None,
                  head: str | None, view: str, top_k: int, threshold: float,
                  query: list[str] | None, point: list[str] | None, head_fusion: str,
                  discard_ratio: float, alpha: float, smooth: bool = False,
                  title: str | None = None, scale: str = "shared",
                  keep_mass: float | None = None, prefix_tokens: int | None = None,
                  grid: str | None = None, factory: str | None = None,
                  strict: bool = True, activation: str | None = None) -> ImageOptions:
    if query and point:
        raise UsageError("--query shows decoder attention, --point encoder attention: pick one")
    from attnviz.image_heatmap import ImageOptions

    return ImageOptions(image=image, size=size, normalize=normalize, layer=layer, head=head,
                        view=view, top_k=top_k, threshold=threshold,
                        queries=tuple(detr_queries(query) or ()),
                        points=tuple(parse_point(p) for p in point or ()),
                        head_fusion=head_fusion, discard_ratio=discard_ratio, alpha=alpha,
                        smooth=smooth, title=title, scale=scale, keep_mass=keep_mass,
                        prefix_tokens=prefix_tokens,
                        grid=parse_grid(grid) if grid is not None else None,
                        factory=factory, strict=strict, activation=activation)


IMAGE_ONLY = ("size", "normalize", "top_k", "threshold", "point", "head_fusion",
              "discard_ratio", "alpha", "smooth", "keep_mass", "prefix_tokens", "grid")
IMAGE_FACTORY = ("model", "strict")  # heatmap draws a ViT-like --model factory's image maps
SEQUENCE_ONLY = ("model", "strict", "pool", "causal", "pad", "seed", "batch_index", "tgt_input",
                 "tgt_seq_len", "norm_first", "activation")
NOT_WITH_FACTORY = ("causal", "pad", "tgt_input", "tgt_seq_len", "norm_first", "activation")


def check_inputs(ctx: typer.Context, *, text: str | None, tokens: str | None,
                 input_file: Path | None, seq_len: int | None, image: Path | None,
                 model: str | None, image_only: tuple[str, ...] = (),
                 image_takes: tuple[str, ...] = ()) -> None:
    """One input, and no flag that this input would ignore (a command that declares
    ``--prefix-tokens`` draws images of a ``--model`` factory, so takes it with --image;
    ``image_takes``: sequence flags the command passes on with --image, e.g. ``activation``
    for CLIP towers)."""
    one_input(text=text, tokens=tokens, input=input_file, seq_len=seq_len, image=image)
    if image is None:
        reject_unused(ctx, (*IMAGE_ONLY, *image_only), "without --image")
    else:
        factories = any(p.name == "prefix_tokens" for p in ctx.command.params)
        unused = tuple(n for n in SEQUENCE_ONLY if not (factories and n in IMAGE_FACTORY)
                       and n not in image_takes)
        reject_unused(ctx, unused, "to --image (vision models are rebuilt from the file)")
    if model is not None:
        reject_unused(ctx, NOT_WITH_FACTORY, "to a --model factory (it builds its own inputs' "
                      "masks)")


def user_set(ctx: typer.Context, name: str) -> bool:
    """Whether the user set option ``name`` (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in {"COMMANDLINE", "ENVIRONMENT"}


def reject_unused(ctx: typer.Context, names: tuple[str, ...], why: str) -> None:
    """Refuse options the user set that would be silently ignored for this input."""
    given = []
    for param in ctx.command.params:
        if param.name in names:
            source = ctx.get_parameter_source(param.name)
            if source is not None and source.name in {"COMMANDLINE", "ENVIRONMENT"}:
                given.append(max(param.opts, key=len))
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply "
                         f"{why}; drop {'it' if len(given) == 1 else 'them'}")
