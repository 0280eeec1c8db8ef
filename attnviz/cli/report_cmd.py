"""``attnviz report``: one self-contained HTML file to explore every head of a checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from attnviz.cli import app
from attnviz.cli.command import AttnvizCommand
from attnviz.cli.heatmap_cmd import (
    AttnImplOpt,
    AudioOpt,
    TgtTextOpt,
    TgtTokensOpt,
    check_hf_inputs,
)
from attnviz.cli.options import (
    OUTPUT,
    VIEW,
    ActivationOpt,
    AlphaOpt,
    CausalOpt,
    CheckpointArg,
    ConfigOpt,
    DiscardOpt,
    ForceOpt,
    HeadFusionOpt,
    HeadsOpt,
    ImageOpt,
    InputOpt,
    KeyOpt,
    LayoutOpt,
    ModelOpt,
    NormalizeOpt,
    NormFirstOpt,
    PadOpt,
    PointOpt,
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
    check_model_flags,
    image_options,
    in_range,
    sequence_request,
    user_set,
)
from attnviz.cli.state import state
from attnviz.formatting import size as human_size

MIN_MAX_TOKENS = 8  # the report's map pooling needs at least this many (report_data.py)


@app.command(cls=AttnvizCommand)
def report(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", rich_help_panel=OUTPUT,
                                         help="The HTML file to write.")],
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
    alpha: AlphaOpt = 0.55,
    layer: Annotated[str | None, typer.Option(
        "--layer", metavar="LAYERS", rich_help_panel=VIEW,
        help="Images: layers for the overlays, as index (inspect's # column), range, name, "
        "glob or list (default: every ViT block; DETR: the last decoder layer). The attention "
        "grid always shows every layer.")] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", metavar="N", rich_help_panel=VIEW, callback=in_range(MIN_MAX_TOKENS),
        help=f"Maps longer than this are pooled in k x k token blocks to fit (--pool; keeps "
        f"a 12x12-head, 512-token report small), N >= {MIN_MAX_TOKENS}.")] = 256,
    pool: Annotated[str, typer.Option(
        "--pool", metavar="mean|max", rich_help_panel=VIEW,
        help="Sequences: how a k x k block of a map longer than --max-tokens becomes one cell "
        "(max keeps one attended token visible).")] = "mean",
    probe: Annotated[list[str] | None, typer.Option(
        "--probe", metavar="NAMES", rich_help_panel=VIEW,
        help="Sequences: also score the head atlas's probe roles (induction, duplicate; comma "
        "list or repeated) on a seeded repeated block of random tokens, as attnviz heads "
        "--probe does.")] = None,
    norms: Annotated[bool, typer.Option("--norms/--no-norms", rich_help_panel=VIEW,
                                        help="Per-head weight norms (reads the attention "
                                        "weights).")] = True,
    title: TitleOpt = None,
    norm_first: NormFirstOpt = False,
    activation: ActivationOpt = "relu",
    force: ForceOpt = False,
    attn_implementation: AttnImplOpt = "auto",
    tgt_tokens: TgtTokensOpt = None,
    tgt_text: TgtTextOpt = None,
    audio: AudioOpt = None,
    layout: LayoutOpt = None,
) -> None:
    """One offline HTML page: summary, layer x head grid, token hover, overlays, weight norms."""
    check_hf_inputs(ctx, checkpoint, text=text, tokens=tokens, input_file=input_file,
                    seq_len=seq_len,
                    image=image, audio=audio, model=model, image_only=("layer",),
                    image_takes=("activation",))
    st = state(ctx)
    from attnviz.report import ReportOptions, build_report

    options = ReportOptions(max_tokens=max_tokens, title=title, norms=norms, alpha=alpha,
                            pool=pool, probes=tuple(probe or ()))
    if image is not None:
        vision = image_options(image, size=size, normalize=normalize, layer=layer, head="all",
                               view="overlay", top_k=top_k, threshold=threshold, query=query,
                               point=point, head_fusion=head_fusion,
                               discard_ratio=discard_ratio, alpha=alpha,
                               activation=activation if user_set(ctx, "activation") else None)
        vision = replace(vision, text=text, tokens=tokens)
        with st.step("captured and wrote the report"):
            result = build_report(checkpoint, output, image=vision, options=options,
                                  heads=heads or (), config=config, key=key, force=force,
                                  attn_implementation=attn_implementation, layout=layout)
    else:
        check_model_flags(model, strict, activation, config)
        given = any(v is not None for v in (text, tokens, input_file, seq_len, audio))
        request = sequence_request(text=text, tokens=tokens, input_file=input_file,
                                   seq_len=seq_len, seed=seed, tgt_input=tgt_input,
                                   tgt_seq_len=tgt_seq_len, causal=causal,
                                   pad=pad) if given else None
        if request is not None:
            request = replace(request, tgt_tokens=tgt_tokens, tgt_text=tgt_text, audio=audio)
        if query:  # sequences: rows kept at full resolution (DETR's --query picks objects)
            options = replace(options, query=",".join(query))
        with st.step("captured and wrote the report"):
            result = build_report(checkpoint, output, request=request, options=options,
                                  factory=model, strict=strict, heads=heads or (),
                                  config=config, key=key, force=force, norm_first=norm_first,
                                  activation=activation,
                                  attn_implementation=attn_implementation, layout=layout)
    if result.model:
        st.say(f"model: {result.model}")
    for warning in result.warnings:
        st.warn(warning)
    for note in result.notes:
        st.say(f"note: {note}")
    st.say(f"wrote {result.output} ({result.layers} layers, {result.heads} head maps"
           + (f", {result.overlays} overlays" if result.overlays else "")
           + f", {human_size(result.bytes_written)}); open it in a browser")
