"""The shape of one zoo case, and the seeded inputs every case is fed.

A case describes a tiny random-weight ``transformers`` model: how to build its config, which
class to instantiate, the forward kwargs of one small deterministic input, and the same input the
way a CLI user would type it (token ids are explicit and identical in both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

Family = Literal["encoder", "decoder", "encoder-decoder", "vision", "speech", "multimodal"]
Inputs = dict[str, torch.Tensor]

# Source ids avoid 0-3 (pad/bos/eos/decoder-start in every config here) so no model masks them.
TOKENS: tuple[int, ...] = (5, 17, 42, 8, 23, 61, 9)
# Decoder-side ids after the decoder start token: a different length (5 with the start) so a
# map with its axes swapped cannot pass for the right one.
TGT_TAIL: tuple[int, ...] = (11, 29, 47, 13)
IMAGE_SIZE = 32
PATCH = 8
INPUT_SEED = 1234


@dataclass(frozen=True, eq=False)  # eq=False: hashable although cli_inputs is a dict
class ZooCase:
    """One tiny architecture. ``unsupported`` is a reason when no static-weights attention tool
    can support it; such cases stay in the list (never dropped silently) and still build.
    ``eager_only``: transformers has no sdpa path for it (``_supports_sdpa`` is False)."""

    name: str
    model_type: str
    family: Family
    config: Callable[[], Any]  # () -> PretrainedConfig
    model_class: Callable[..., nn.Module]
    inputs: Callable[[nn.Module], Inputs]
    cli_inputs: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""
    unsupported: str | None = None
    eager_only: bool = False
    qk_gain: float = 2.0  # extra gain on attention input projections (see randomise)


def ids(tokens: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([list(tokens)], dtype=torch.long)  # (1, L)


def joined(tokens: tuple[int, ...]) -> str:
    return ",".join(str(t) for t in tokens)


def tgt_tokens(start: int) -> tuple[int, ...]:
    return (start, *TGT_TAIL)


def text_inputs(_model: nn.Module) -> Inputs:
    return {"input_ids": ids(TOKENS)}


def text_cli() -> dict[str, Any]:
    return {"tokens": joined(TOKENS)}


def seq2seq_inputs(start: int) -> Callable[[nn.Module], Inputs]:
    def make(_model: nn.Module) -> Inputs:
        return {"input_ids": ids(TOKENS), "decoder_input_ids": ids(tgt_tokens(start))}

    return make


def seq2seq_cli(start: int) -> dict[str, Any]:
    return {"tokens": joined(TOKENS), "tgt_tokens": joined(tgt_tokens(start))}


def seeded_randn(*shape: int, seed: int = INPUT_SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def pixel_values(size: int = IMAGE_SIZE) -> torch.Tensor:
    return seeded_randn(1, 3, size, size)  # (1, C, H, W)


def image_inputs(_model: nn.Module) -> Inputs:
    return {"pixel_values": pixel_values()}


def image_cli(size: int = IMAGE_SIZE) -> dict[str, Any]:
    # pixel_values in ``inputs`` are seeded N(0, 1); a CLI run gives an image file instead, so
    # the check compares against the eager model fed whatever pixels the CLI derived.
    return {"image": True, "image_size": size, "seed": INPUT_SEED}
