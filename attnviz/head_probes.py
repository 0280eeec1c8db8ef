"""Token probes for head roles that need a known input: a block of T random tokens repeated
twice, after a BOS token where the model has one. In the second copy an induction head attends
to the token after the earlier occurrence of the current token, a duplicate-token head to that
earlier occurrence itself (``attnviz.head_stats.Diagonal``, ``attnviz.head_roles``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnviz.errors import UsageError, param
from attnviz.head_stats import Diagonal
from attnviz.models.sources import LoadedModel

PROBES = ("induction", "duplicate")
DEFAULT_BLOCK = 50
LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
VOCAB_KEYS = ("vocab_size", "d_vocab")  # HF configs; TransformerLens's HookedTransformerConfig


@dataclass(frozen=True)
class Probe:
    """``tokens``: [BOS] + block + block; the first copy starts at ``start``."""

    names: tuple[str, ...]
    tokens: tuple[int, ...]
    start: int
    block: int
    seed: int

    def diagonals(self) -> dict[str, Diagonal]:
        second = (self.start + self.block, self.start + 2 * self.block)
        offsets = {"induction": -(self.block - 1), "duplicate": -self.block}
        return {name: Diagonal(offsets[name], *second) for name in self.names}

    def as_json(self) -> dict[str, Any]:
        return {"probes": list(self.names), "block": self.block, "start": self.start,
                "seed": self.seed, "length": len(self.tokens), "tokens": list(self.tokens)}


def parse_probes(names: Iterable[str]) -> tuple[str, ...]:
    """'induction', 'duplicate' (comma lists too), checked before any model work."""
    chosen = [n.strip() for text in names for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in PROBES]
    if unknown:
        raise UsageError(f"unknown probe '{unknown[0]}': use {', '.join(PROBES)}",
                         param="probes")
    return tuple(dict.fromkeys(chosen))


def _embedding(model: nn.Module) -> nn.Embedding | None:
    get = getattr(model, "get_input_embeddings", None)
    found = get() if callable(get) else None
    if isinstance(found, nn.Embedding):
        return found
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _text_config(loaded: LoadedModel) -> Any:
    """The model's config: an HF ``config`` (its text part), or a TransformerLens-style
    ``cfg`` (``attnviz.models.lens``: ``d_vocab``, ``n_ctx``)."""
    config = getattr(loaded.model, "config", None)
    if config is None:
        config = getattr(loaded.model, "cfg", None)
    return getattr(config, "text_config", None) or config


def _refuse(loaded: LoadedModel, why: str) -> UsageError:
    return UsageError(f"token probes ({param('probes')}) need a model that takes token ids; "
                      f"{why}", param="probes", hint="probe an HF text model directory, or a "
                      f"{param('factory')} model with an embedding layer")


def _limit(loaded: LoadedModel) -> int | None:
    config = _text_config(loaded)
    for key in LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _specials(loaded: LoadedModel) -> tuple[set[int], int | None]:
    """Token ids a random block must avoid, and the BOS (or CLS) id to put first."""
    tokenizer, config = loaded.tokenizer, _text_config(loaded)
    specials = set(getattr(tokenizer, "all_special_ids", None) or ())
    bos = None
    for owner, key in ((tokenizer, "bos_token_id"), (tokenizer, "cls_token_id"),
                       (config, "bos_token_id")):
        value = getattr(owner, key, None)
        if isinstance(value, int) and bos is None:
            bos = value
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(config, key, None)
        specials |= {value} if isinstance(value, int) else set(value or ()) \
            if isinstance(value, list) else set()
    return specials, bos


def make_probe(loaded: LoadedModel, names: tuple[str, ...], *, block: int = DEFAULT_BLOCK,
               seed: int = 0) -> Probe:
    """The probe's token ids for this model: ``block`` distinct random ids (no special
    tokens), seeded, repeated twice, after the model's BOS/CLS id where it names one."""
    if not loaded.takes_tokens:
        raise _refuse(loaded, f"{loaded.description} takes embeddings")
    main = getattr(loaded.model, "main_input_name", "input_ids")
    text_tower = getattr(loaded.model, "text_model", None) is not None
    if loaded.kind == "hf" and main != "input_ids" and not text_tower:
        raise _refuse(loaded, f"{type(loaded.model).__name__} takes {main}")
    embedding = _embedding(loaded.model)
    config = _text_config(loaded)
    config_vocab = next((v for k in VOCAB_KEYS if isinstance(v := getattr(config, k, None), int)
                         and v > 0), None)
    vocab = config_vocab if config_vocab is not None else (
        embedding.num_embeddings if embedding is not None else None)
    if vocab is None:
        raise _refuse(loaded, f"{loaded.description} has no embedding layer")
    specials, bos = _specials(loaded) if loaded.kind == "hf" else (set(), None)
    bos = bos if bos is not None and 0 <= bos < vocab else None  # configs name absent ids
    start = 0 if bos is None else 1
    limit = _limit(loaded)
    if limit is not None:
        block = min(block, (limit - start - 2) // 2)  # 2 spare: RoBERTa's position offset
    candidates = torch.tensor([i for i in range(vocab) if i not in specials])
    block = min(block, candidates.numel())
    if block < 2:
        raise UsageError(f"the model takes too few tokens or positions for a probe of two "
                         f"copies of a block ({vocab} ids, {limit} positions)", param="probes")
    generator = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:block]]
    ids = chosen.tolist()
    tokens = ([] if bos is None else [bos]) + ids + ids
    return Probe(names, tuple(int(t) for t in tokens), start, block, seed)
