"""``attnviz heads``: per-head statistics and roles (attnviz.head_atlas) as a table, JSON or a
figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
    CausalOpt,
    CheckpointArg,
    ConfigOpt,
    ForceOpt,
    HeadsOpt,
    ImageOpt,
    InputOpt,
    KeyOpt,
    LayoutOpt,
    ModelOpt,
    NormFirstOpt,
    PadOpt,
    SeedOpt,
    SeqLenOpt,
    StrictOpt,
    TextOpt,
    TgtInputOpt,
    TgtSeqLenOpt,
    TitleOpt,
    TokensOpt,
    check_model_flags,
    in_range,
    reject_unused,
    sequence_request,
)
from attnviz.cli.state import QUIET, state

if TYPE_CHECKING:
    from rich.console import Console

    from attnviz.head_atlas import HeadAtlas

HEAD_CELL = 8  # 'prv 0.98'


@app.command(cls=AttnvizCommand)
def heads(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
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
    tgt_tokens: TgtTokensOpt = None,
    tgt_text: TgtTextOpt = None,
    audio: AudioOpt = None,
    probe: Annotated[list[str] | None, typer.Option(
        "--probe", metavar="NAMES", rich_help_panel=VIEW,
        help="Token probes: induction, duplicate (comma list or repeated): a seeded block of "
        "random tokens repeated twice, run as a second pass (--seed).")] = None,
    block: Annotated[int, typer.Option(
        "--block", metavar="T", rich_help_panel=VIEW, callback=in_range(2),
        help="Probe block length T >= 2 (shortened to fit the model's positions).")] = 50,
    window: Annotated[int, typer.Option(
        "--window", metavar="W", rich_help_panel=VIEW, callback=in_range(1),
        help="The local window +-W of the 'local' statistic, W >= 1.")] = 2,
    layer: Annotated[str, typer.Option(
        "--layer", metavar="LAYERS", rich_help_panel=VIEW,
        help="Layers: index (as in inspect's # column), range 0-3, name, glob, comma list, "
        "all.")] = "all",
    as_json: Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT, help="Print one "
                                          "JSON document (docs/json-schema.md).")] = False,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", metavar="FILE", rich_help_panel=OUTPUT,
        help="Also draw the layer x head atlas: .png, .svg or .pdf.")] = None,
    title: TitleOpt = None,
    model: ModelOpt = None,
    strict: StrictOpt = True,
    heads_flag: HeadsOpt = None,
    config: ConfigOpt = None,
    key: KeyOpt = None,
    layout: LayoutOpt = None,
    attn_implementation: AttnImplOpt = "auto",
    norm_first: NormFirstOpt = False,
    activation: ActivationOpt = "relu",
    force: ForceOpt = False,
) -> None:
    """What every head does: attention statistics and roles per layer and head."""
    from dataclasses import replace

    from attnviz.head_atlas import atlas_to_json, head_atlas

    check_hf_inputs(ctx, checkpoint, text=text, tokens=tokens, input_file=input_file,
                    seq_len=seq_len, image=image, audio=audio, model=model)
    check_model_flags(model, strict, activation, config)
    if not probe:
        reject_unused(ctx, ("block",), "without --probe")
    if output is None:
        reject_unused(ctx, ("title", "force"), "without -o")
    st = state(ctx)
    request = sequence_request(text=text, tokens=tokens, input_file=input_file, seq_len=seq_len,
                               seed=seed, tgt_input=tgt_input, tgt_seq_len=tgt_seq_len,
                               causal=causal, pad=pad)
    request = replace(request, tgt_tokens=tgt_tokens, tgt_text=tgt_text, audio=audio,
                      image=image)
    with st.step("loaded the model, captured and scored the heads"):
        atlas = head_atlas(checkpoint, request, probes=probe or (), layer=layer, window=window,
                           block=block, output=output, title=title, factory=model,
                           strict=strict, heads=heads_flag or (), config=config, key=key,
                           force=force, norm_first=norm_first, activation=activation,
                           attn_implementation=attn_implementation, layout=layout)
    for warning in atlas.warnings:
        st.warn(warning)
    if as_json:
        typer.echo(json.dumps(atlas_to_json(atlas), indent=2, allow_nan=False))
        return
    from attnviz.cli.tables import console_for

    print_atlas(atlas, console_for())
    if st.verbosity == QUIET:
        return
    st.say(f"model: {atlas.model}")
    for note in atlas.notes:
        st.say(f"note: {note}")
    if atlas.output is not None:
        st.say(f"wrote {atlas.output} ({len(atlas.layers)} layers x "
               f"{max((len(a.heads) for a in atlas.layers), default=0)} heads)")


def print_atlas(atlas: HeadAtlas, console: Console) -> None:
    """Layer x head: each head's top role (three letters) and score; heads in column blocks
    that fit the terminal."""
    from rich.table import Table
    from rich.text import Text

    from attnviz.head_roles import ROLE_COLOURS, ROLES, ROLES_BY_NAME
    from attnviz.text_safety import terminal

    count = max((len(layer.heads) for layer in atlas.layers), default=0)
    names = [terminal(layer.name, 48) for layer in atlas.layers]
    name_width = max((len(n) for n in names), default=5)
    fits = max(1, (console.width - name_width - 10) // (HEAD_CELL + 3))
    blocks = -(-max(count, 1) // fits)
    per_block = -(-max(count, 1) // blocks)  # blocks of equal width: 12 heads as 6 + 6
    for start in range(0, max(count, 1), per_block):
        heads = range(start, min(count, start + per_block))
        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        table.add_column("#", justify="right")
        table.add_column("layer", overflow="fold")
        for head in heads:
            table.add_column(f"h{head}", justify="left", no_wrap=True)
        for layer, name in zip(atlas.layers, names, strict=True):
            cells: list[Text | str] = [str(layer.index), Text(name)]
            for head in heads:
                entry = layer.heads[head] if head < len(layer.heads) else None
                if entry is None or entry.top is None:
                    cells.append(Text("" if entry is None else "-", style="dim"))
                    continue
                score = entry.scores[entry.top]
                cells.append(Text(f"{ROLES_BY_NAME[entry.top].short} {score:.2f}",
                                  style=ROLE_COLOURS[entry.top]))
            table.add_row(*cells)
        console.print(table)
    legend = ", ".join(f"{role.short} {role.name} (>= {role.threshold:g}: {role.statistic})"
                       for role in ROLES)
    console.print(Text(f"top role and its score per head; - none. {legend}", style="dim"))
