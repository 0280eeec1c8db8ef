"""The families of the HF conformance zoo through ``attnviz heads --json``: a valid document
whose layers, head counts and statistics fit the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnviz.cli import app
from attnviz.head_roles import ROLES_BY_NAME
from attnviz.inspection import inspect_checkpoint

pytest.importorskip("transformers")

from .zoo.cases import CASES, build
from .zoo.maps import request_for

# one case per family and per path a map takes through the capture (the whole zoo runs in
# tests/zoo/test_zoo.py; here every family's maps must make a sound atlas, quickly)
CHOSEN = ("bert", "deberta_v2", "longformer", "gpt2", "gpt2_cross", "llama_gqa", "falcon_mqa",
          "falcon_rw_alibi", "gemma2", "mixtral", "t5", "bart_mixed_heads", "whisper", "vit",
          "swin", "detr", "clip", "siglip")
CASES_RUN = [case for case in CASES if case.name in CHOSEN]
CROSS = ("encoder_attn", "EncDecAttention", "crossattention", "cross_attn")


def _flags(case_request: object) -> list[str]:
    flags = []
    for name, flag in (("tokens", "--tokens"), ("tgt_tokens", "--tgt-tokens"),
                       ("seq_len", "--seq-len"), ("image", "--image")):
        value = getattr(case_request, name)
        if value is not None:
            flags += [flag, str(value)]
    return flags


@pytest.mark.parametrize("case", CASES_RUN, ids=[c.name for c in CASES if c.name in CHOSEN])
def test_zoo_family_through_heads(case, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / case.name
    build(case, directory)
    flags = _flags(request_for(case, directory, tmp_path))
    result = CliRunner().invoke(app, ["heads", str(directory), *flags, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert doc["schema"] == "attnviz.heads/1"
    report = inspect_checkpoint(directory)
    counts = {item.heads.num_heads for item in report.layers}
    assert 1 <= len(doc["layers"]) <= len(report.layers) + 1  # + 1: SigLIP's MHA pooling head
    indices = [layer["index"] for layer in doc["layers"]]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    for layer in doc["layers"]:
        assert layer["num_heads"] == len(layer["heads"]) and layer["rows"] >= 1
        assert layer["num_heads"] in counts or "head" in layer["name"], layer["name"]
        if any(marker in layer["name"] for marker in CROSS):
            assert layer["self_attention"] is False
        for head in layer["heads"]:
            stats = head["statistics"]
            assert 0.0 <= stats["first"] <= 1.0 + 1e-6 and stats["entropy_bits"] >= 0.0
            assert stats["entropy_norm"] is None or -1e-6 <= stats["entropy_norm"] <= 1 + 1e-6
            if layer["self_attention"]:
                assert stats["local"] + 1e-6 >= max(stats["self"], stats["previous"] or 0.0)
            else:
                assert stats["previous"] is None and stats["distance"] is None
            assert all(role in ROLES_BY_NAME for role in head["roles"])
            assert head["top_role"] in (None, *head["roles"])
            if head["top_role"] is not None:
                assert head["top_score"] >= ROLES_BY_NAME[head["top_role"]].threshold
            assert all(v is None or math.isfinite(v) for v in stats.values())
