"""Option declarations shared by several commands, so that one flag means one thing everywhere,
and the helpers that turn a command's input flags into core requests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from attnviz.errors import UsageError

if TYPE_CHECKING:
    from attnviz.image_heatmap import ImageOptions
    from attnviz.sequence_inputs import SequenceRequest

CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint file (.pth/.pt/.bin/.ckpt/"
                                               ".safetensors), *.index.json or model directory.")]
HeadsOpt = Annotated[list[str] | None, typer.Option(
    "--heads", help="Heads per layer: N, or 'glob=N' for matching layers (repeatable).")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="config.json to read head counts from (default: one beside the file).")]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", help="Dotted path of the mapping that holds the tensors, e.g. 'model' or 'ema'.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
LayoutOpt = Annotated[str | None, typer.Option(
    "--layout", help="Layout NAME for tensors whose names and shapes fit several packings "
    "when no config.json model_type says which model wrote them (docs/layouts.md).")]
TitleOpt = Annotated[str | None, typer.Option("--title", help="Figure or page title.")]

# the forward pass: where the model comes from
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="package.module:factory returning the nn.Module to load the weights "
    "into (default: rebuild nn.Transformer models, or load an HF directory).")]
StrictOpt = Annotated[bool, typer.Option("--strict/--no-strict", help="With --model: require "
                                         "an exact key match.")]
NormFirstOpt = Annotated[bool, typer.Option("--norm-first", help="Rebuilt nn.Transformer "
                                            "layers are pre-norm.")]
ActivationOpt = Annotated[str, typer.Option("--activation", help="Rebuilt nn.Transformer "
                                            "activation: relu or gelu.")]

# sequence inputs
TextOpt = Annotated[str | None, typer.Option("--text", help="Text (HF directories with a "
                                             "tokenizer).")]
TokensOpt = Annotated[str | None, typer.Option("--tokens", help="Token ids, e.g. "
                                               "101,2023,102.")]
InputOpt = Annotated[Path | None, typer.Option(
    "--input", help="Embeddings [L, E] or [B, L, E]: .npy, .safetensors or .pt.")]
SeqLenOpt = Annotated[int | None, typer.Option("--seq-len", help="Random embeddings of this "
                                               "length (untrained checks).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for --seq-len.")]
TgtInputOpt = Annotated[Path | None, typer.Option(
    "--tgt-input", help="Decoder-side embeddings (encoder-decoder / decoder models).")]
TgtSeqLenOpt = Annotated[int | None, typer.Option(
    "--tgt-seq-len", help="Random decoder-side embeddings of this length.")]
CausalOpt = Annotated[bool, typer.Option("--causal", help="Causal mask (decoder "
                                         "self-attention, or the encoder of an encoder-only "
                                         "model).")]
PadOpt = Annotated[int, typer.Option("--pad", help="Treat the last N source positions as "
                                     "padding.")]

# image inputs
ImageOpt = Annotated[Path | None, typer.Option(
    "--image", help="An image for a ViT (timm layout) or DETR (official layout) checkpoint, "
    "or an HF vision model directory.")]
SizeOpt = Annotated[str | None, typer.Option(
    "--size", help="Image size: N (ViT side / DETR shorter side) or HxW.")]
NormalizeOpt = Annotated[bool, typer.Option(
    "--normalize/--no-normalize", help="ImageNet mean/std normalisation.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="DETR: objects to show.")]
ThresholdOpt = Annotated[float, typer.Option("--threshold", help="DETR: minimum class score.")]
QueryOpt = Annotated[list[int] | None, typer.Option(
    "--query", help="DETR: query indices to show (repeatable), instead of --top-k.")]
PointOpt = Annotated[list[str] | None, typer.Option(
    "--point", help="DETR: encoder self-attention at image pixel x,y (repeatable).")]
HeadFusionOpt = Annotated[str, typer.Option(
    "--head-fusion", help="Rollout: mean, max or min over heads.")]
DiscardOpt = Annotated[float, typer.Option(
    "--discard-ratio", help="Rollout: zero this fraction of the lowest attentions.")]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="Overlay opacity.")]


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


def parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"--point '{text}': use x,y in image pixels, e.g. 320,240") from exc
    return x, y


def sequence_request(*, text: str | None, tokens: str | None, input_file: Path | None,
                     seq_len: int | None, seed: int, tgt_input: Path | None,
                     tgt_seq_len: int | None, causal: bool, pad: int) -> SequenceRequest:
    from attnviz.sequence_inputs import SequenceRequest

    return SequenceRequest(text=text, tokens=tokens, input_file=input_file, seq_len=seq_len,
                           seed=seed, tgt_input=tgt_input, tgt_seq_len=tgt_seq_len,
                           causal=causal, pad=pad)


def image_options(image: Path, *, size: str | None, normalize: bool, layer: str | None,
                  head: str | None, view: str, top_k: int, threshold: float,
                  query: list[int] | None, point: list[str] | None, head_fusion: str,
                  discard_ratio: float, alpha: float, smooth: bool = False,
                  title: str | None = None) -> ImageOptions:
    if query and point:
        raise UsageError("--query shows decoder attention, --point encoder attention: pick one")
    if top_k < 1 or not 0.0 <= alpha <= 1.0:
        raise UsageError("--top-k must be >= 1 and --alpha in [0, 1]")
    from attnviz.image_heatmap import ImageOptions

    return ImageOptions(image=image, size=size, normalize=normalize, layer=layer, head=head,
                        view=view, top_k=top_k, threshold=threshold,
                        queries=tuple(query or ()),
                        points=tuple(parse_point(p) for p in point or ()),
                        head_fusion=head_fusion, discard_ratio=discard_ratio, alpha=alpha,
                        smooth=smooth, title=title)


IMAGE_ONLY = ("size", "normalize", "top_k", "threshold", "query", "point", "head_fusion",
              "discard_ratio", "alpha", "smooth")
SEQUENCE_ONLY = ("model", "strict", "scale", "causal", "pad", "seed", "batch_index", "tgt_input",
                 "tgt_seq_len", "norm_first", "activation")
NOT_WITH_FACTORY = ("causal", "pad", "tgt_input", "tgt_seq_len", "norm_first", "activation")


def check_inputs(ctx: typer.Context, *, text: str | None, tokens: str | None,
                 input_file: Path | None, seq_len: int | None, image: Path | None,
                 model: str | None, image_only: tuple[str, ...] = ()) -> None:
    """One input, and no flag that this input would ignore."""
    one_input(text=text, tokens=tokens, input=input_file, seq_len=seq_len, image=image)
    if image is None:
        reject_unused(ctx, (*IMAGE_ONLY, *image_only), "without --image")
    else:
        reject_unused(ctx, SEQUENCE_ONLY, "to --image (ViT/DETR are rebuilt from the file)")
    if model is not None:
        reject_unused(ctx, NOT_WITH_FACTORY, "to a --model factory (it builds its own inputs' "
                      "masks)")


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
