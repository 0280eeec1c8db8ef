"""The zoo's map check: what ``attnviz heatmap`` captures from a saved directory, against the
eager ``output_attentions`` of transformers on exactly the kwargs heatmap gave the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn

from attnviz.checkpoint import load_checkpoint
from attnviz.heatmap import capture_sequence
from attnviz.inspection import analyse
from attnviz.sequence_inputs import SequenceRequest

from .cases import attention_maps
from .conformance import MAP_TOLERANCE, match_maps
from .spec import ZooCase


def request_for(case: ZooCase, directory: Path, tmp_path: Path) -> SequenceRequest:
    """The CLI flags a user would give for the case's input (``cli_inputs``)."""
    flags = case.cli_inputs
    image = None
    if flags.get("image"):
        size = int(flags.get("image_size", 32))
        processor = transformers.ViTImageProcessor(size={"height": size, "width": size})
        processor.save_pretrained(directory)  # as hub directories ship one
        pixels = np.random.default_rng(int(flags.get("seed", 0))).integers(
            0, 256, (size, size, 3), dtype=np.uint8)
        image = tmp_path / "input.png"
        Image.fromarray(pixels).save(image)
    return SequenceRequest(tokens=flags.get("tokens"), tgt_tokens=flags.get("tgt_tokens"),
                           seq_len=flags.get("seq_len"), seed=int(flags.get("seed", 0)),
                           image=image)


@torch.no_grad()
def check_maps(case: ZooCase, model: nn.Module, directory: Path,
               tmp_path: Path) -> tuple[str, float | None]:
    """('exact', worst error); every eager map has one captured map with the same values."""
    ckpt = load_checkpoint(directory)
    maps, prepared, loaded = capture_sequence(directory, ckpt, analyse(ckpt),
                                              request_for(case, directory, tmp_path))
    target = model.get_submodule(prepared.module) if prepared.module else model
    eager = attention_maps(target(**prepared.inputs, output_attentions=True))
    reference = [m for group in eager.values() for m in group]
    # torch nn.MultiheadAttention modules (SigLIP's pooling head) have no eager map to match
    mha = {name for name, module in loaded.model.named_modules()
           if isinstance(module, nn.MultiheadAttention)}
    mine = {name: tensor for name, tensor in maps.items() if name.split("#")[0] not in mha}
    # transformers returns one map per Swin stage (the last block's); attnviz captures all
    extra_ok = case.model_type in ("swin",)
    errors = match_maps(reference, mine, allow_extra=extra_ok)
    worst = max(errors.values())
    assert worst <= MAP_TOLERANCE, f"maps differ from eager output_attentions by {worst:.2e}"
    implementation = getattr(loaded.model.config, "_attn_implementation", "?")
    return f"exact ({implementation})", worst
