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
from attnviz.errors import UsageError
from attnviz.models.sources import LoadedModel


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


@dataclass
class PreparedCall:
    """A ready forward pass and the labels of the sequences it attends over."""

    run: Callable[[], Any]
    source_labels: list[str]
    target_labels: list[str] = field(default_factory=list)
    padded: int = 0


def read_embeddings(path: Path) -> torch.Tensor:
    """[L, E] or [B, L, E] embeddings from .npy, .safetensors or a torch file (one tensor)."""
    if not path.is_file():
        raise UsageError(f"--input {path}: no such file")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UsageError(f"--input {path}: not a plain .npy array ({exc})") from exc
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    else:
        checkpoint = load_checkpoint(path)
        if len(checkpoint.tensors) != 1:
            raise UsageError(f"--input {path}: holds {len(checkpoint.tensors)} tensors, "
                             "expected exactly one")
        tensor = checkpoint.read_tensor(next(iter(checkpoint.tensors)))
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)  # (1, L, E)
    if tensor.dim() != 3 or not tensor.is_floating_point():
        raise UsageError(f"--input {path}: expected float [L, E] or [B, L, E], got "
                         f"{tensor.dtype} {list(tensor.shape)}")
    return tensor.float()


def _embeddings(path: Path | None, length: int | None, d_model: int | None, seed: int,
                what: str) -> torch.Tensor:
    if path is not None:
        x = read_embeddings(path)
    else:
        if length is None or d_model is None:
            raise UsageError(f"give the {what} with --input FILE or --seq-len N"
                             if what == "source" else
                             "give the decoder input with --tgt-input FILE or --tgt-seq-len N")
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
        raise UsageError(f"--pad {pad} would mask every one of {x.shape[1]} positions")
    mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
    mask[:, -pad:] = True  # nn.MultiheadAttention: True = masked out
    return mask


def prepare(loaded: LoadedModel, request: SequenceRequest) -> PreparedCall:
    """Turn the user's flags into one forward call of ``loaded.model``."""
    if loaded.kind == "hf":
        return _prepare_hf(loaded, request)
    if request.text is not None:
        raise UsageError("--text needs a tokenizer, which only an HF model directory provides",
                         hint="use --tokens, --input or --seq-len")
    if loaded.kind == "factory":
        return _prepare_factory(loaded, request)
    if request.tokens is not None:
        raise UsageError("--tokens needs a model with an embedding layer; nn.Transformer "
                         "checkpoints take embeddings", hint="use --input FILE or --seq-len N")
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
        raise UsageError(f"--tokens '{request.tokens}' is not a comma-separated list of ids") \
            from exc
    if not ids:
        raise UsageError("--tokens is empty")
    return torch.tensor([ids])


def _prepare_factory(loaded: LoadedModel, request: SequenceRequest) -> PreparedCall:
    model = loaded.model
    if request.tokens is not None:
        ids = _token_ids(request)
        return PreparedCall(lambda: model(ids), [str(i) for i in ids[0].tolist()])
    x = _embeddings(request.input_file, request.seq_len, loaded.d_model, request.seed, "source")
    return PreparedCall(lambda: model(x), [str(i) for i in range(x.shape[1])])


def _prepare_hf(loaded: LoadedModel, request: SequenceRequest) -> PreparedCall:
    model, tokenizer = loaded.model, loaded.tokenizer
    if request.text is not None:
        if tokenizer is None:
            raise UsageError("this model directory has no tokenizer for --text",
                             hint="use --tokens 101,2023,102")
        batch = tokenizer([request.text], return_tensors="pt")
        ids, attention = batch["input_ids"], batch["attention_mask"]
    elif request.tokens is not None:
        ids = _token_ids(request)
        attention = torch.ones_like(ids)
    else:
        raise UsageError("an HF model needs --text or --tokens")
    if request.pad:
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        ids = torch.cat([ids, torch.full((1, request.pad), pad_id)], dim=1)  # (1, L + pad)
        attention = torch.cat([attention, torch.zeros(1, request.pad, dtype=attention.dtype)],
                              dim=1)
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and ids.shape[1] > limit:
        raise UsageError(f"the input is {ids.shape[1]} tokens; this model takes at most {limit} "
                         "(config.json max_position_embeddings)", hint="shorten --text")
    labels = (tokenizer.convert_ids_to_tokens(ids[0].tolist()) if tokenizer is not None
              else [str(i) for i in ids[0].tolist()])
    return PreparedCall(lambda: model(input_ids=ids, attention_mask=attention), labels,
                        padded=request.pad)
