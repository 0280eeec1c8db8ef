"""The conformance zoo: every case, and how to build, save and run one.

``build`` makes a tiny random-weight model on CPU in float32, eval mode, eager attention,
re-randomised by :func:`tests.zoo.randomise.randomise`, saved with ``save_pretrained``
(safetensors). ``save_state_dict`` writes the same weights as a bare ``torch.save`` file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cases_decoders import DECODER_CASES
from .cases_encoders import ENCODER_CASES
from .cases_other import MULTIMODAL_CASES, SEQ2SEQ_CASES, SPEECH_CASES, VISION_CASES
from .randomise import randomise
from .spec import ZooCase

CASES: list[ZooCase] = [*ENCODER_CASES, *DECODER_CASES, *SEQ2SEQ_CASES, *SPEECH_CASES,
                        *VISION_CASES, *MULTIMODAL_CASES]
BY_NAME: dict[str, ZooCase] = {case.name: case for case in CASES}
if len(BY_NAME) != len(CASES):
    raise RuntimeError("zoo case names must be unique")


def make_model(case: ZooCase, *, seed: int = 0) -> nn.Module:
    """The case's model, randomised, float32, eval, eager attention; nothing written.
    Unsupported cases build too, so a tool's refusal can be tested on a real directory."""
    config = case.config()
    with torch.random.fork_rng(devices=[]):
        # HF initialisation draws from the global generator; every value is overwritten below,
        # but forking keeps the caller's RNG state untouched.
        torch.manual_seed(seed)
        factory: Any = case.model_class
        model: nn.Module = factory._from_config(config, attn_implementation="eager",
                                                dtype=torch.float32)
    randomise(model, seed, qk_gain=case.qk_gain)
    return model.eval()


def build(case: ZooCase, directory: Path, *, seed: int = 0) -> nn.Module:
    """Build, randomise and ``save_pretrained`` (safetensors) into ``directory``."""
    model = make_model(case, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # type: ignore[operator]
    return model


def save_state_dict(case: ZooCase, model: nn.Module, path: Path) -> Path:
    """The "bare file" variant: the model's state_dict alone, written with ``torch.save``."""
    del case  # kept in the signature so a caller can record which case wrote the file
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    torch.save(state, path)
    return path


@torch.no_grad()
def eager_forward(case: ZooCase, model: nn.Module) -> Any:
    """One forward on the case's inputs with ``output_attentions=True``."""
    return model(**case.inputs(model), output_attentions=True)


def attention_maps(output: Any, prefix: str = "") -> dict[str, tuple[torch.Tensor, ...]]:
    """Every ``*attentions`` tuple in a (possibly nested) HF output, keyed by its path, e.g.
    ``encoder_attentions`` or ``vision_model_output.attentions``. Empty tuples are dropped."""
    found: dict[str, tuple[torch.Tensor, ...]] = {}
    items: Mapping[str, Any] = output if isinstance(output, Mapping) else {}
    for key, value in items.items():
        path = f"{prefix}{key}"
        if key.endswith("attentions") and isinstance(value, tuple) and value:
            found[path] = value
        elif isinstance(value, Mapping):
            found.update(attention_maps(value, prefix=f"{path}."))
    return found
