"""``attnviz heatmap``: per-head attention maps of one forward pass, drawn to an image file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from attnviz.cli import app
from attnviz.cli.command import AttnvizCommand
from attnviz.cli.options import (
    IMAGE_VIEW,
    INPUT,
    MODEL,
    OUTPUT,
    VIEW,
    ActivationOpt,
    AlphaOpt,
    CausalOpt,
    CheckpointArg,
    ConfigOpt,
    DiscardOpt,
    ForceOpt,
    GridOpt,
    HeadFusionOpt,
    HeadsOpt,
    ImageOpt,
    InputOpt,
    KeepMassOpt,
    KeyOpt,
    LayoutOpt,
    ModelOpt,
    NormalizeOpt,
    NormFirstOpt,
    PadOpt,
    PointOpt,
    PrefixTokensOpt,
    QueryOpt,
    SeedOpt,
    SeqLenOpt,
    SizeOpt,
    StrictOpt,
    TextOpt,
    TgtInputOpt,
    TgtSeqLenOpt,
    ThresholdOpt,
    TitleOpt,
    TokensOpt,
    TopKOpt,
    check_inputs,
    check_model_flags,
    existing_file,
    image_options,
    in_range,
    sequence_request,
)
from attnviz.cli.state import state
from attnviz.errors import UsageError

# HF directories (these belong in cli/options.py beside the other shared flags)
AttnImplOpt = Annotated[str, typer.Option(
    "--attn-implementation", metavar="auto|eager|sdpa", rich_help_panel=MODEL,
    help="HF directories: auto (sdpa where the architecture has it, else eager), eager or "
    "sdpa.")]
TgtTokensOpt = Annotated[str | None, typer.Option(
    "--tgt-tokens", metavar="IDS", rich_help_panel=INPUT,
    help="HF encoder-decoders: decoder input ids, e.g. 0,37,5 (default: "
    "decoder_start_token_id).")]
TgtTextOpt = Annotated[str | None, typer.Option(
    "--tgt-text", metavar="TEXT", rich_help_panel=INPUT,
    help="HF encoder-decoders: decoder text, tokenised, decoder_start_token_id first.")]
AudioOpt = Annotated[Path | None, typer.Option(
    "--audio", metavar="FILE", rich_help_panel=INPUT, callback=existing_file,
    help="HF speech models (Whisper): a PCM WAV file, resampled to the feature extractor's "
    "rate.")]
HF_SEQUENCE_ONLY = ("tgt_tokens", "tgt_text", "audio")


def window_text(value: str | None) -> str | None:
    """--window is parsed before the model is built (its range is checked after)."""
    if value is not None:
        from attnviz.window import parse_window

        parse_window(value)
    return value


def check_hf_inputs(ctx: typer.Context, checkpoint: Path, *, text: str | None,
                    tokens: str | None,
                    input_file: Path | None, seq_len: int | None, image: Path | None,
                    audio: Path | None, model: str | None,
                    image_only: tuple[str, ...] = (), image_takes: tuple[str, ...] = ()) -> None:
    """``check_inputs``, plus: --text/--tokens may come with --image (multi-tower models such
    as CLIP), --audio is an input of its own."""
    from attnviz.cli.options import one_input, reject_unused
    from attnviz.models.sources import is_hf_directory

    if image is not None and not is_hf_directory(checkpoint):
        one_input(text=text, tokens=tokens, image=image)
    if audio is not None:
        one_input(audio=audio, text=text, tokens=tokens, input=input_file, image=image)
    if image is not None:
        one_input(tokens=tokens, text=text)
        reject_unused(ctx, HF_SEQUENCE_ONLY, "to --image")
        text = tokens = None  # both towers: checked by the model
    check_inputs(ctx, text=text, tokens=tokens, input_file=input_file,
                 seq_len=None if audio is not None else seq_len, image=image, model=model,
                 image_only=image_only, image_takes=image_takes)


@app.command(cls=AttnvizCommand)
def heatmap(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", rich_help_panel=OUTPUT,
                                         help="Image file: .png, .svg or .pdf.")],
    model: ModelOpt = None,
    strict: StrictOpt = True,
    heads: HeadsOpt = None,
    config: ConfigOpt = None,
    key: KeyOpt = None,
    text: TextOpt = None,
    tokens: TokensOpt = None,
    input_file: InputOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = 0,
    tgt_input: TgtInputOpt = None,
    tgt_seq_len: TgtSeqLenOpt = None,
    causal: CausalOpt = False,
    pad: PadOpt = 0,
    image: ImageOpt = None,
    size: SizeOpt = None,
    normalize: NormalizeOpt = True,
    top_k: TopKOpt = 3,
    threshold: ThresholdOpt = 0.7,
    query: QueryOpt = None,
    point: PointOpt = None,
    head_fusion: HeadFusionOpt = "mean",
    discard_ratio: DiscardOpt = 0.0,
    keep_mass: KeepMassOpt = None,
    prefix_tokens: PrefixTokensOpt = None,
    grid: GridOpt = None,
    alpha: AlphaOpt = 0.55,
    smooth: Annotated[bool, typer.Option("--smooth", rich_help_panel=IMAGE_VIEW,
                                         help="Bilinear instead of per-patch upsampling.")]
    = False,
    layer: Annotated[str | None, typer.Option(
        "--layer", metavar="LAYERS", rich_help_panel=VIEW,
        help="Layers: index (as in inspect's # column), range 0-3, name, glob, comma list, "
        "all, mean (default: all; images: the last).")] = None,
    show_heads: Annotated[str | None, typer.Option(
        "--show-heads", metavar="HEADS", rich_help_panel=VIEW,
        help="Heads to draw: index, range, list, all, mean (default: all; DETR: mean).")]
    = None,
    head: Annotated[str | None, typer.Option(
        "--head", hidden=True, help="The old spelling of --show-heads.")] = None,
    view: Annotated[str, typer.Option(
        "--view", metavar="VIEW", rich_help_panel=VIEW, help="auto, matrix (one map with token "
        "labels), grid (layer x head); images: overlay, rollout, registers.")] = "auto",
    scale: Annotated[str, typer.Option("--scale", metavar="shared|panel", rich_help_panel=VIEW,
                                       help="One colour scale for all panels, or one each.")]
    = "shared",
    pool: Annotated[str, typer.Option(
        "--pool", metavar="max|mean", rich_help_panel=VIEW, help="Sequences: how maps larger "
        "than their pixels are reduced (max keeps one attended token visible).")] = "max",
    window: Annotated[str | None, typer.Option(
        "--window", metavar="RANGE", rich_help_panel=VIEW, callback=window_text,
        help="Sequences: zoom into positions A-B (queries and keys), or qA-B,kC-D, at full "
        "resolution; only those cells are captured.")] = None,
    batch_index: Annotated[int, typer.Option(
        "--batch-index", metavar="I", rich_help_panel=VIEW, callback=in_range(0),
        help="Batch item to draw, I >= 0.")] = 0,
    title: TitleOpt = None,
    save_maps: Annotated[Path | None, typer.Option(
        "--save-maps", metavar="FILE", rich_help_panel=OUTPUT,
        help="Also write the raw maps (B, H, Lq, Lk) to this .safetensors.")] = None,
    norm_first: NormFirstOpt = False,
    activation: ActivationOpt = "relu",
    force: ForceOpt = False,
    attn_implementation: AttnImplOpt = "auto",
    tgt_tokens: TgtTokensOpt = None,
    tgt_text: TgtTextOpt = None,
    audio: AudioOpt = None,
    layout: LayoutOpt = None,
) -> None:
    """Per-head attention maps of a forward pass, drawn as heatmaps (sequences or images)."""
    if show_heads is not None and head is not None:
        raise UsageError("--show-heads and --head (its old spelling) both given; pass one")
    head = show_heads if show_heads is not None else head
    check_hf_inputs(ctx, checkpoint, text=text, tokens=tokens, input_file=input_file,
                    seq_len=seq_len,
                    image=image, audio=audio, model=model, image_takes=("activation",))
    st = state(ctx)
    if save_maps is not None and save_maps.suffix != ".safetensors":
        raise UsageError("--save-maps writes safetensors: use a .safetensors file name")
    if image is not None:
        from attnviz.cli.options import reject_unused, user_set
        from attnviz.image_heatmap import image_heatmap

        reject_unused(ctx, ("window",), "to --image")

        options = image_options(image, size=size, normalize=normalize, layer=layer, head=head,
                                view=view, top_k=top_k, threshold=threshold, query=query,
                                point=point, head_fusion=head_fusion,
                                discard_ratio=discard_ratio, alpha=alpha, smooth=smooth,
                                title=title, scale=scale, keep_mass=keep_mass,
                                prefix_tokens=prefix_tokens, grid=grid, factory=model,
                                strict=strict,
                                activation=activation if user_set(ctx, "activation") else None)
        options = replace(options, text=text, tokens=tokens,
                          attn_implementation=attn_implementation)
        with st.step("rebuilt the model, captured and rendered"):
            result = image_heatmap(checkpoint, output, options, heads=tuple(heads or ()),
                                   config=config, key=key, save_maps=save_maps, force=force,
                                   layout=layout)
        st.say(f"model: {result.model}")
        for warning in result.warnings:
            st.warn(warning)
        for note in result.notes:
            st.say(f"note: {note}")
        st.say(f"wrote {result.output} ({len(result.layers)} row(s) x {len(result.heads)} "
               "panel(s))" + (f" and {result.maps_file}" if result.maps_file else ""))
        return
    check_model_flags(model, strict, activation, config)
    from attnviz.heatmap import HeatmapOptions, sequence_heatmap

    request = sequence_request(text=text, tokens=tokens, input_file=input_file,
                               seq_len=seq_len, seed=seed, tgt_input=tgt_input,
                               tgt_seq_len=tgt_seq_len, causal=causal, pad=pad)
    request = replace(request, tgt_tokens=tgt_tokens, tgt_text=tgt_text, audio=audio)
    heat_options = HeatmapOptions(layer=layer or "all", head=head or "all", view=view,
                                  scale=scale, batch_index=batch_index, title=title,
                                  pool=pool, query=",".join(query) if query else None,
                                  window=window)
    with st.step("loaded the model, captured and rendered"):
        seq = sequence_heatmap(checkpoint, output, request, options=heat_options, factory=model,
                               strict=strict, heads=heads or (), config=config, key=key,
                               save_maps=save_maps, force=force, norm_first=norm_first,
                               activation=activation, attn_implementation=attn_implementation,
                               layout=layout)
    st.say(f"model: {seq.model}")
    for warning in seq.warnings:
        st.warn(warning)
    for note in seq.notes:
        st.say(f"note: {note}")
    st.say(f"wrote {seq.output} ({seq.view}: {len(seq.layers)} layer row(s) x "
           f"{len(seq.heads)} head column(s))"
           + (f" and {seq.maps_file}" if seq.maps_file else ""))
