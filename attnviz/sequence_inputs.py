"""Inputs for sequence heatmaps: text, token ids, embeddings from a file, or seeded random
embeddings; masks for padding and causality. Files are read with the safe readers only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attnviz.checkpoint import load_checkpoint
from attnviz.errors import AttnvizError, UsageError, param
from attnviz.models.sources import LoadedModel
from attnviz.models.torch_transformer import ModelBuildError


@dataclass(frozen=True)
class SequenceRequest:
    text: str | None = None
    tokens: str | None = None
    input_file: Path | None = None
    seq_len: int | None = None
    seed: int = 0
    tgt_input: Path | None = None
    tgt_seq_len: int | None = None
    causal: bool = False
    pad: int = 0
    tgt_tokens: str | None = None  # HF encoder-decoders: decoder_input_ids
    tgt_text: str | None = None  # HF encoder-decoders: tokenised, shifted right
    audio: Path | None = None  # HF speech models: a WAV file
    image: Path | None = None  # HF multi-tower models (CLIP): the vision tower's input


@dataclass
class PreparedCall:
    """A ready forward pass and the labels of the sequences it attends over.

    HF models also carry ``inputs``, the exact kwargs given to ``module`` of the model ('' =
    the model itself), the labels of each side (``sides``: 'source', 'target', 'image') and
    ``layer_sides``, which says which sides a layer's rows and columns are."""

    run: Callable[[], Any]
    source_labels: list[str]
    target_labels: list[str] = field(default_factory=list)
    padded: int = 0
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    module: str = ""
    sides: dict[str, list[str]] = field(default_factory=dict)
    layer_sides: Callable[[str], tuple[str, str]] | None = None
    notes: list[str] = field(default_factory=list)

    def labels_for(self, name: str, rows: int, cols: int) -> tuple[list[str], list[str]]:
        """Labels of a layer's query rows and key columns."""
        if self.layer_sides is None:
            return (token_labels(rows, self.source_labels, self.target_labels),
                    token_labels(cols, self.source_labels, self.target_labels))
        row_side, col_side = self.layer_sides(name.split("#")[0])
        return (_fit(self.sides.get(row_side, []), rows),
                _fit(self.sides.get(col_side, []), cols))


def run_forward(prepared: PreparedCall, description: str, *, path: Path | None = None,
                hint: str = "check that the inputs fit the model") -> None:
    """Run the prepared forward pass; an exception the model raises on these inputs is a
    usage problem (one line naming the model), not an attnviz bug."""
    try:
        prepared.run()
    except AttnvizError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelBuildError(f"the forward pass of {description} failed: "
                              f"{type(exc).__name__}: {first}", path=path, hint=hint) from exc


def _fit(labels: list[str], length: int) -> list[str]:
    return labels if len(labels) == length else [str(i) for i in range(length)]


def token_labels(length: int, source: list[str], target: list[str]) -> list[str]:
    """Labels of a map side of ``length`` when only the lengths tell the sides apart."""
    if target and length == len(target) and length != len(source):
        return target
    if length == len(source):
        return source
    if target and length == len(target):
        return target
    return [str(i) for i in range(length)]


def read_embeddings(path: Path) -> torch.Tensor:
    """[L, E] or [B, L, E] embeddings from .npy, .safetensors or a torch file (one tensor)."""
    if not path.is_file():
        raise UsageError(f"{param('input_file')} {path}: no such file", param="input_file")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UsageError(f"{param('input_file')} {path}: not a plain .npy array ({exc})",
                             param="input_file") from exc
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    else:
        checkpoint = load_checkpoint(path)
        if len(checkpoint.tensors) != 1:
            raise UsageError(f"{param('input_file')} {path}: holds {len(checkpoint.tensors)} "
                             "tensors, expected exactly one", param="input_file")
        tensor = checkpoint.read_tensor(next(iter(checkpoint.tensors)))
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)  # (1, L, E)
    if tensor.dim() != 3 or not tensor.is_floating_point():
        raise UsageError(f"{param('input_file')} {path}: expected float [L, E] or [B, L, E], got "
                         f"{tensor.dtype} {list(tensor.shape)}", param="input_file")
    return tensor.float()


def _embeddings(path: Path | None, length: int | None, d_model: int | None, seed: int,
                what: str) -> torch.Tensor:
    if path is not None:
        x = read_embeddings(path)
    else:
        if length is None or d_model is None:
            raise UsageError(f"give the {what} with {param('input_file')} FILE or "
                             f"{param('seq_len')} N"
                             if what == "source" else
                             f"give the decoder input with {param('tgt_input')} FILE or "
                             f"{param('tgt_seq_len')} N")
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(1, length, d_model, generator=generator)  # (1, L, E)
    if d_model is not None and x.shape[-1] != d_model:
        raise UsageError(f"{what} embeddings have width {x.shape[-1]}, the model expects "
                         f"{d_model}")
    return x


def _padding_mask(x: torch.Tensor, pad: int) -> torch.Tensor | None:
    if not pad:
        return None
    if pad >= x.shape[1]:
        raise UsageError(f"{param('pad')} {pad} would mask every one of {x.shape[1]} positions",
                         param="pad")
    mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
    mask[:, -pad:] = True  # nn.MultiheadAttention: True = masked out
    return mask


def prepare(loaded: LoadedModel, request: SequenceRequest) -> PreparedCall:
    """Turn the user's flags into one forward call of ``loaded.model``."""
    if loaded.kind == "hf":
        return _prepare_hf(loaded, request)
    hf_only = [param(name) for name, value in (("tgt_tokens", request.tgt_tokens),
                                               ("tgt_text", request.tgt_text),
                                               ("audio", request.audio), ("image", request.image))
               if value is not None]
    if hf_only:
        raise UsageError(f"{', '.join(hf_only)} need an HF model directory",
                         hint="rebuilt nn.Transformer models take "
                              f"{param('input_file')}/{param('seq_len')} and "
                              f"{param('tgt_input')}/{param('tgt_seq_len')}")
    if request.text is not None:
        raise UsageError(f"{param('text')} needs a tokenizer, which only an HF model directory "
                         "provides",
                         hint=f"use {param('tokens')}, {param('input_file')} or "
                              f"{param('seq_len')}", param="text")
    if loaded.kind in ("factory", "lens"):  # token ids, or embeddings of the model's width
        return _prepare_factory(loaded, request)
    if request.tokens is not None:
        raise UsageError(f"{param('tokens')} needs a model with an embedding layer; nn.Transformer "
                         "checkpoints take embeddings",
                         hint=f"use {param('input_file')} FILE or {param('seq_len')} N",
                         param="tokens")
    model = loaded.model
    src = _embeddings(request.input_file, request.seq_len, loaded.d_model, request.seed,
                      "source")
    positions = [str(i) for i in range(src.shape[1])]
    if loaded.kind == "encoder":
        mask = nn.Transformer.generate_square_subsequent_mask(src.shape[1]) \
            if request.causal else None
        padding = _padding_mask(src, request.pad)
        return PreparedCall(lambda: model(src, mask=mask, src_key_padding_mask=padding),
                            positions, padded=request.pad)
    tgt_len = request.tgt_seq_len or (None if request.tgt_input else src.shape[1])
    tgt = _embeddings(request.tgt_input, tgt_len, loaded.d_model, request.seed + 1, "target")
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1]) \
        if request.causal else None
    padding = _padding_mask(src, request.pad)
    targets = [str(i) for i in range(tgt.shape[1])]
    if loaded.kind == "decoder":  # the source is the encoder memory
        return PreparedCall(lambda: model(tgt, src, tgt_mask=tgt_mask,
                                          memory_key_padding_mask=padding),
                            positions, targets, request.pad)
    return PreparedCall(lambda: model(src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=padding,
                                      memory_key_padding_mask=padding),
                        positions, targets, request.pad)


def _token_ids(request: SequenceRequest) -> torch.Tensor:
    try:
        ids = [int(t) for t in str(request.tokens).split(",") if t.strip()]
    except ValueError as exc:
        raise UsageError(f"{param('tokens')} '{request.tokens}' is not a comma-separated list of "
                         "ids", param="tokens") \
            from exc
    if not ids:
        raise UsageError(f"{param('tokens')} is empty", param="tokens")
    return torch.tensor([ids])


def _prepare_factory(loaded: LoadedModel, request: SequenceRequest) -> PreparedCall:
    model = loaded.model
    if request.tokens is not None:
        ids = _token_ids(request)
        return PreparedCall(lambda: model(ids), [str(i) for i in ids[0].tolist()])
    x = _embeddings(request.input_file, request.seq_len, loaded.d_model, request.seed, "source")
    return PreparedCall(lambda: model(x), [str(i) for i in range(x.shape[1])])


def _prepare_hf(loaded: LoadedModel, request: SequenceRequest) -> PreparedCall:
    from attnviz.models.hf_inputs import prepare_hf

    return prepare_hf(loaded, request)
