"""The ``attnviz`` command line: parse, call the core, print. Only this package imports typer/rich.

Errors are caught once, in ``AttnvizGroup.invoke``: an ``AttnvizError`` becomes one line on
stderr and its exit code; anything else is an internal error. ``--debug`` or
``ATTNVIZ_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from attnviz import __version__
from attnviz.cli import tables
from attnviz.errors import EXIT_FAILURE, AttnvizError, UsageError


def _debug_enabled() -> bool:
    return os.environ.get("ATTNVIZ_DEBUG", "") not in {"", "0"} or "--debug" in sys.argv


class AttnvizGroup(TyperGroup):
    """Typer group whose ``invoke`` turns every failure into one line and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except AttnvizError as error:
            if _debug_enabled() or ctx.obj == "debug":
                raise
            typer.echo(f"attnviz: error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as error:
            if _debug_enabled() or ctx.obj == "debug":
                raise
            if type(error).__module__.startswith(("typer", "click")):
                raise
            typer.echo(f"attnviz: internal error: {type(error).__name__}: {error} "
                       "(rerun with --debug for a traceback and please report it)", err=True)
            raise typer.Exit(EXIT_FAILURE) from None


app = typer.Typer(
    cls=AttnvizGroup,
    help="Open transformer checkpoints and show what is inside their attention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attnviz {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """attnviz: attention layers, per-head weights and attention maps from checkpoints."""
    ctx.obj = "debug" if debug else None


CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint file (.pth/.pt/.bin/.ckpt/"
                                               ".safetensors), *.index.json or model directory.")]
HeadsOpt = Annotated[list[str] | None, typer.Option(
    "--heads", help="Heads per layer: N, or 'glob=N' for matching layers (repeatable).")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="config.json to read head counts from (default: one beside the file).")]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", help="Dotted path of the mapping that holds the tensors, e.g. 'model' or 'ema'.")]


@app.command()
def inspect(
    checkpoint: CheckpointArg,
    heads: HeadsOpt = None,
    config: ConfigOpt = None,
    key: KeyOpt = None,
    show_all: Annotated[bool, typer.Option(
        "--all", help="Also show every tensor as a tree.")] = False,
    filter_glob: Annotated[str | None, typer.Option(
        "--filter", help="Only layers/tensors whose name matches this glob.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document "
                                          "(docs/json-schema.md).")] = False,
    stats: Annotated[bool, typer.Option(
        "--stats", help="Also read the values: min/max/mean/std and NaN/Inf counts per tensor."
    )] = False,
) -> None:
    """Show every attention layer: layout, dims, heads and where that count came from."""
    from attnviz.inspection import inspect_checkpoint, report_to_json

    if as_json and show_all:
        raise UsageError("--json already lists every tensor; drop --all")
    if config is not None and not config.is_file():
        raise UsageError(f"--config {config}: no such file")
    report = inspect_checkpoint(checkpoint, heads=heads or (), config=config, key=key)
    value_stats = None
    if stats:
        import fnmatch

        from attnviz.tensor_stats import tensor_stats

        value_stats = tensor_stats(report.checkpoint, [
            n for n in report.checkpoint.tensors
            if filter_glob is None or fnmatch.fnmatchcase(n, filter_glob)])
        for item in value_stats:
            if item.nan or item.inf:
                report.warnings.append(f"tensor '{item.name}' holds {item.nan} NaN and "
                                       f"{item.inf} Inf values")
    if as_json:
        document = report_to_json(report, tensor_filter=filter_glob)
        if value_stats is not None:
            document["stats"] = [vars(item) for item in value_stats]
        typer.echo(json.dumps(document, indent=2))
        return
    tables.print_inspect(report, show_all=show_all, tensor_filter=filter_glob)
    if value_stats is not None:
        tables.print_stats(value_stats)


@app.command("split-qkv")
def split_qkv(
    checkpoint: CheckpointArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file "
                                         "(.safetensors, .pt or .npz).")],
    heads: HeadsOpt = None,
    config: ConfigOpt = None,
    key: KeyOpt = None,
    layers: Annotated[str | None, typer.Option(
        "--layers", help="Only layers whose name matches this glob.")] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", help="safetensors, pt or npz (default: from the output suffix).")] = None,
    stacked: Annotated[bool, typer.Option(
        "--stacked", help="Write {layer}.q.weight [H, d, E] instead of one tensor per head.")]
    = False,
    out_proj: Annotated[bool, typer.Option(
        "--out-proj/--no-out-proj", help="Also write each head's columns of the output "
        "projection.")] = True,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check per-head attention against the layout's reference; exit 1 on "
        "a mismatch.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
) -> None:
    """Export each attention layer's Wq/Wk/Wv/Wo per head, in Linear (out, in) orientation."""
    if config is not None and not config.is_file():
        raise UsageError(f"--config {config}: no such file")
    from attnviz.source_hash import BackgroundHash

    # the source sha256 is a full read: start it before the heavier imports below
    hashing = BackgroundHash([checkpoint] if checkpoint.is_file() else [])
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from attnviz.split_export import LayerDone, split_checkpoint

    console = Console(highlight=False)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
        "{task.completed}/{task.total} layers"), TimeRemainingColumn(), transient=True,
        console=Console(stderr=True), disable=not sys.stderr.isatty())
    task = progress.add_task("splitting", total=None)

    def on_layer(done: LayerDone) -> None:
        progress.update(task, total=done.total, completed=done.index + 1,
                        description=done.layer[-40:])
        if done.verify is not None and not done.verify.ok():
            check = done.verify
            console.print(f"[bold red]verify mismatch[/] {done.layer}: max abs error "
                          f"{check.max_abs_error:.2e} (weights {check.max_abs_error_weights:.2e})"
                          f" vs {check.reference}")

    with progress:
        result = split_checkpoint(checkpoint, output, heads=heads or (), config=config, key=key,
                                  layers=layers, fmt=fmt, stacked=stacked, out_proj=out_proj,
                                  verify=verify, force=force, on_layer=on_layer,
                                  hashing=hashing)
    console.print(tables.split_table(result))
    console.print(f"wrote {result.output} ({result.format}, {result.tensors_written} tensors, "
                  f"{tables.size(result.bytes_written)})"
                  + (f" and {result.sidecar}" if result.sidecar else ""))
    if result.upcast:
        console.print(f"[yellow]note:[/] {len(result.upcast)} tensors upcast to float32 (numpy "
                      "has no bfloat16/float8)")


@app.command("merge-qkv")
def merge_qkv(
    split: Annotated[Path, typer.Argument(help="A file written by 'attnviz split-qkv'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file "
                                         "(.safetensors or .pt).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
) -> None:
    """Rebuild the original packed tensors from a split-qkv file, bit for bit."""
    from attnviz.split_export import merge_split

    result = merge_split(split, output, force=force)
    typer.echo(f"wrote {result.output} ({result.layers} layers, {result.tensors} tensors)")


@app.command()
def heatmap(
    checkpoint: CheckpointArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Image file: .png, .svg or "
                                         ".pdf.")],
    model: Annotated[str | None, typer.Option(
        "--model", help="package.module:factory returning the nn.Module to load the weights "
        "into (default: rebuild nn.Transformer models, or load an HF directory).")] = None,
    strict: Annotated[bool, typer.Option("--strict/--no-strict", help="With --model: require "
                                         "an exact key match.")] = True,
    heads: HeadsOpt = None,
    config: ConfigOpt = None,
    key: KeyOpt = None,
    text: Annotated[str | None, typer.Option("--text", help="Text (HF directories with a "
                                             "tokenizer).")] = None,
    tokens: Annotated[str | None, typer.Option("--tokens", help="Token ids, e.g. 101,2023,102."
                                               )] = None,
    input_file: Annotated[Path | None, typer.Option(
        "--input", help="Embeddings [L, E] or [B, L, E]: .npy, .safetensors or .pt.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Random embeddings of this "
                                                "length (untrained checks).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --seq-len.")] = 0,
    tgt_input: Annotated[Path | None, typer.Option(
        "--tgt-input", help="Decoder-side embeddings (encoder-decoder / decoder models).")] = None,
    tgt_seq_len: Annotated[int | None, typer.Option(
        "--tgt-seq-len", help="Random decoder-side embeddings of this length.")] = None,
    causal: Annotated[bool, typer.Option("--causal", help="Causal mask (decoder self-attention,"
                                         " or the encoder of an encoder-only model).")] = False,
    pad: Annotated[int, typer.Option("--pad", help="Treat the last N source positions as "
                                     "padding.")] = 0,
    image: Annotated[Path | None, typer.Option(
        "--image", help="An image for a ViT (timm layout) or DETR (official layout) checkpoint."
    )] = None,
    size: Annotated[str | None, typer.Option(
        "--size", help="Image size: N (ViT side / DETR shorter side) or HxW.")] = None,
    normalize: Annotated[bool, typer.Option(
        "--normalize/--no-normalize", help="ImageNet mean/std normalisation.")] = True,
    top_k: Annotated[int, typer.Option("--top-k", help="DETR: objects to show.")] = 3,
    threshold: Annotated[float, typer.Option("--threshold", help="DETR: minimum class score."
                                             )] = 0.7,
    query: Annotated[list[int] | None, typer.Option(
        "--query", help="DETR: query indices to show (repeatable), instead of --top-k.")] = None,
    point: Annotated[list[str] | None, typer.Option(
        "--point", help="DETR: encoder self-attention at image pixel x,y (repeatable).")] = None,
    head_fusion: Annotated[str, typer.Option(
        "--head-fusion", help="Rollout: mean, max or min over heads.")] = "mean",
    discard_ratio: Annotated[float, typer.Option(
        "--discard-ratio", help="Rollout: zero this fraction of the lowest attentions.")] = 0.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Overlay opacity.")] = 0.55,
    smooth: Annotated[bool, typer.Option("--smooth", help="Bilinear instead of per-patch "
                                         "upsampling.")] = False,
    layer: Annotated[str | None, typer.Option(
        "--layer", help="Layers: index, range 0-3, list, all, mean (default: all; images: the "
        "last).")] = None,
    head: Annotated[str | None, typer.Option(
        "--head", help="Heads: index, range, list, all, mean (default: all; DETR: mean).")]
    = None,
    view: Annotated[str, typer.Option("--view", help="auto, matrix (one map with token "
                                      "labels), grid (layer x head); images: overlay or "
                                      "rollout.")] = "auto",
    scale: Annotated[str, typer.Option("--scale", help="Colour scale: shared or panel.")]
    = "shared",
    batch_index: Annotated[int, typer.Option("--batch-index", help="Batch item to draw.")] = 0,
    title: Annotated[str | None, typer.Option("--title", help="Figure title.")] = None,
    save_maps: Annotated[Path | None, typer.Option(
        "--save-maps", help="Also write the raw maps (B, H, Lq, Lk) to this .safetensors.")]
    = None,
    norm_first: Annotated[bool, typer.Option("--norm-first", help="Rebuilt nn.Transformer "
                                             "layers are pre-norm.")] = False,
    activation: Annotated[str, typer.Option("--activation", help="Rebuilt nn.Transformer "
                                            "activation: relu or gelu.")] = "relu",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
) -> None:
    """Per-head attention maps of a forward pass, drawn as heatmaps (sequences or images)."""
    given = [name for name, value in (("--text", text), ("--tokens", tokens),
                                      ("--input", input_file), ("--seq-len", seq_len),
                                      ("--image", image)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} both give the input; pass one")
    if image is not None:
        _image_heatmap(checkpoint, output, image, heads=heads, config=config, key=key,
                       save_maps=save_maps, force=force, size=size, normalize=normalize,
                       layer=layer, head=head, view=view, top_k=top_k, threshold=threshold,
                       query=query, point=point, head_fusion=head_fusion,
                       discard_ratio=discard_ratio, alpha=alpha, smooth=smooth, title=title,
                       model=model)
        return
    if activation not in {"relu", "gelu"}:
        raise UsageError(f"--activation {activation}: use relu or gelu")
    if model is None and not strict:
        raise UsageError("--no-strict only applies with --model")
    if save_maps is not None and save_maps.suffix != ".safetensors":
        raise UsageError("--save-maps writes safetensors: use a .safetensors file name")
    if config is not None and not config.is_file():
        raise UsageError(f"--config {config}: no such file")
    from attnviz.heatmap import HeatmapOptions, sequence_heatmap
    from attnviz.sequence_inputs import SequenceRequest

    request = SequenceRequest(text=text, tokens=tokens, input_file=input_file, seq_len=seq_len,
                              seed=seed, tgt_input=tgt_input, tgt_seq_len=tgt_seq_len,
                              causal=causal, pad=pad)
    options = HeatmapOptions(layer=layer or "all", head=head or "all", view=view, scale=scale,
                             batch_index=batch_index, title=title)
    result = sequence_heatmap(checkpoint, output, request, options=options, factory=model,
                              strict=strict, heads=heads or (), config=config, key=key,
                              save_maps=save_maps, force=force, norm_first=norm_first,
                              activation=activation)
    typer.echo(f"model: {result.model}")
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {result.output} ({result.view}: {len(result.layers)} layer row(s) x "
               f"{len(result.heads)} head column(s))"
               + (f" and {result.maps_file}" if result.maps_file else ""))


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"--point '{text}': use x,y in image pixels, e.g. 320,240") from exc
    return x, y


def _image_heatmap(checkpoint: Path, output: Path, image: Path, *, heads: list[str] | None,
                   config: Path | None, key: str | None, save_maps: Path | None, force: bool,
                   size: str | None, normalize: bool, layer: str | None, head: str | None,
                   view: str, top_k: int, threshold: float, query: list[int] | None,
                   point: list[str] | None, head_fusion: str, discard_ratio: float,
                   alpha: float, smooth: bool, title: str | None, model: str | None) -> None:
    if model is not None:
        raise UsageError("--image rebuilds ViT/DETR from the checkpoint; drop --model")
    if query and point:
        raise UsageError("--query shows decoder attention, --point encoder attention: pick one")
    if top_k < 1 or not 0.0 <= alpha <= 1.0:
        raise UsageError("--top-k must be >= 1 and --alpha in [0, 1]")
    from attnviz.image_heatmap import ImageOptions, image_heatmap

    options = ImageOptions(image=image, size=size, normalize=normalize, layer=layer, head=head,
                           view=view, top_k=top_k, threshold=threshold,
                           queries=tuple(query or ()), points=tuple(_point(p) for p in point or ()),
                           head_fusion=head_fusion, discard_ratio=discard_ratio, alpha=alpha,
                           smooth=smooth, title=title)
    result = image_heatmap(checkpoint, output, options, heads=tuple(heads or ()), config=config,
                           key=key, save_maps=save_maps, force=force)
    typer.echo(f"model: {result.model}")
    typer.echo(f"wrote {result.output} ({len(result.layers)} row(s) x {len(result.heads)} "
               "panel(s))" + (f" and {result.maps_file}" if result.maps_file else ""))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="attnviz")


if __name__ == "__main__":
    main()
