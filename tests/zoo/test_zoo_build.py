"""Smoke test of the zoo itself: every case builds, saves, reloads as a bare file, and its eager
``output_attentions`` are finite, row-stochastic and peaked (so the conformance checks that use
these models can tell one head, one key or one bias from another)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from .cases import CASES, attention_maps, build, eager_forward, make_model, save_state_dict
from .spec import ZooCase

pytest.importorskip("transformers")  # the ``hf`` extra; installed in CI

# A uniform row over its n allowed keys has max * n == 1; the zoo promises much more.
MIN_PEAK = 1.5
FAMILY_INPUTS = {
    "encoder": {"input_ids"},
    "decoder": {"input_ids"},
    "encoder-decoder": {"input_ids", "decoder_input_ids"},
    "vision": {"pixel_values"},
    "speech": {"input_features", "decoder_input_ids"},
    "multimodal": {"input_ids", "pixel_values"},
}
FAMILY_MAPS = {
    "encoder-decoder": {"encoder_attentions", "decoder_attentions", "cross_attentions"},
    "speech": {"encoder_attentions", "decoder_attentions", "cross_attentions"},
    "multimodal": {"text_model_output.attentions", "vision_model_output.attentions"},
}


def _peak(probs: torch.Tensor) -> float:
    """Mean over rows with more than one allowed key of max(p) * (number of keys with p > 0)."""
    support = (probs > 0).sum(-1)  # (..., Lq)
    ratio = probs.amax(-1) * support
    return float(ratio[support > 1].mean())


def _check_cli_inputs(case: ZooCase, inputs: dict[str, torch.Tensor]) -> None:
    for cli_key, kwarg in (("tokens", "input_ids"), ("tgt_tokens", "decoder_input_ids")):
        if cli_key in case.cli_inputs:
            typed = [int(t) for t in str(case.cli_inputs[cli_key]).split(",")]
            assert inputs[kwarg].tolist() == [typed], f"{cli_key} differs from {kwarg}"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case_builds_saves_and_attends(case: ZooCase, tmp_path: Path) -> None:
    directory = tmp_path / case.name
    model = build(case, directory)
    saved = json.loads((directory / "config.json").read_text())
    assert saved["model_type"] == case.model_type
    assert (directory / "model.safetensors").is_file()
    if case.unsupported is not None:
        assert case.unsupported.strip(), "an unsupported case must say why"
        output = eager_forward(case, model)
        assert bool(torch.isfinite(output[0]).all())
        assert not attention_maps(output), "maps exist: say why this case is unsupported"
        return
    assert not model.training
    assert cast(Any, model).config._attn_implementation == "eager"
    assert case.eager_only == (not case.model_class._supports_sdpa)  # type: ignore[attr-defined]

    named = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in named.values())
    zero_biases = [n for n, p in named.items() if n.endswith("bias") and bool((p == 0).any())]
    assert not zero_biases, f"biases with zeros after randomise: {zero_biases}"
    again = make_model(case)
    for name, tensor in again.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0,
                                   msg=f"{name} differs between two builds with one seed")

    bare = torch.load(save_state_dict(case, model, tmp_path / "bare.pt"), weights_only=True)
    assert bare.keys() == model.state_dict().keys()

    inputs = case.inputs(model)
    assert FAMILY_INPUTS[case.family] <= inputs.keys()
    _check_cli_inputs(case, inputs)

    maps = attention_maps(eager_forward(case, model))
    assert FAMILY_MAPS.get(case.family, {"attentions"}) <= maps.keys() or case.name == "detr"
    assert maps, "no attention maps in the eager output"
    for key, layers in maps.items():
        for index, probs in enumerate(layers):
            where = f"{key}[{index}] {tuple(probs.shape)}"
            assert bool(torch.isfinite(probs).all()), f"{where}: not finite"
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]),
                                       rtol=0, atol=1e-5, msg=f"{where}: rows do not sum to 1")
            assert _peak(probs) >= MIN_PEAK, f"{where}: attention is close to uniform"
