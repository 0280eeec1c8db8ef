"""The trained sample with known heads (scripts/train_induction.py): a 2-layer attention-only
TransformerLens-layout model that grew a previous-token head in layer 0 and induction heads in
layer 1. The roles come from attnviz's own capture, statistics and role thresholds, on a probe
the model never saw: blocks of random tokens repeated twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnviz.capture import capture_attention
from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.head_roles import HeadRoles, assign_roles
from attnviz.head_stats import Diagonal, HeadStatistics
from attnviz.inspection import analyse, inspect_checkpoint
from attnviz.models.lens import Block, LensModel
from attnviz.models.sources import load_model

SAMPLE = Path(__file__).resolve().parent.parent / "sample_checkpoints" / \
    "induction_2l.safetensors"
LAYERS = ("blocks.0.attn", "blocks.1.attn")


def sample_model() -> LensModel:
    checkpoint = load_checkpoint(SAMPLE)
    loaded = load_model(SAMPLE, checkpoint, analyse(checkpoint))
    assert loaded.kind == "lens" and isinstance(loaded.model, LensModel)
    return loaded.model


def roles_on(model: LensModel, ids: torch.Tensor, span: int) -> dict[str, list[HeadRoles]]:
    """Roles of every head from statistics streamed out of the capture of ``ids`` (N, L),
    whose rows hold a block of ``span`` tokens at 0 repeated at ``span``."""
    stats = HeadStatistics(probes={"induction": Diagonal(-(span - 1), span, 2 * span),
                                   "duplicate": Diagonal(-span, span, 2 * span)})
    with torch.no_grad(), capture_attention(model, reduce=stats):
        model(ids)
    return {name: assign_roles(layer.values) for name, layer in stats.layers.items()}


def holders(roles: list[HeadRoles], role: str) -> list[int]:
    return [head for head, found in enumerate(roles) if role in found.held]


@pytest.mark.parametrize("span", [20, 50])
def test_previous_token_head_in_layer_0_and_induction_heads_in_layer_1(span: int) -> None:
    model = sample_model()
    block = torch.randint(0, model.cfg.d_vocab, (8, span),
                          generator=torch.Generator().manual_seed(span))
    roles = roles_on(model, torch.cat([block, block], dim=1), span)  # (8, 2 * span)
    assert list(roles) == list(LAYERS)
    first, second = roles[LAYERS[0]], roles[LAYERS[1]]
    assert holders(first, "previous-token"), [r.scores for r in first]
    assert holders(second, "induction"), [r.scores for r in second]
    # the circuit's order: one layer cannot do induction, and layer 1 is not a copy of layer 0
    assert not holders(first, "induction")
    assert not holders(second, "previous-token")
    for head in holders(second, "induction"):
        assert second[head].top == "induction"
    with torch.no_grad():  # and the model uses them: the second copy is predicted
        ids = torch.cat([block, block], dim=1)
        predicted = model(ids)[:, span:-1].argmax(-1)  # (8, span - 1)
    assert (predicted == ids[:, span + 1:]).float().mean() > 0.75


def test_previous_token_head_on_plain_random_tokens() -> None:
    model = sample_model()
    ids = torch.randint(0, model.cfg.d_vocab, (8, model.cfg.n_ctx),
                        generator=torch.Generator().manual_seed(3))
    stats = HeadStatistics()
    with torch.no_grad(), capture_attention(model, reduce=stats):
        model(ids)
    first = assign_roles(stats.layers[LAYERS[0]].values)
    assert holders(first, "previous-token")


def test_inspect_recognises_the_transformer_lens_layout() -> None:
    report = inspect_checkpoint(SAMPLE)
    assert [item.layer.name for item in report.layers] == list(LAYERS)
    for item in report.layers:
        assert item.layer.layout == "transformer_lens"
        assert (item.heads.num_heads, item.heads.head_dim) == (4, 16)
        assert item.heads.source == f"shape of {item.layer.name}.W_Q"
    result = CliRunner().invoke(app, ["inspect", str(SAMPLE)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "transformer_lens" in result.output
    assert "shape of blocks.1.attn.W_Q" in result.output


def test_sample_is_small_and_holds_what_hooked_transformer_saves() -> None:
    assert SAMPLE.stat().st_size < 1_000_000
    names = set(load_checkpoint(SAMPLE).tensors)
    assert {"embed.W_E", "pos_embed.W_pos", "unembed.W_U", "unembed.b_U", "ln_final.w",
            "blocks.1.attn.mask", "blocks.1.attn.IGNORE"} <= names
    assert not any(".mlp." in name for name in names)  # attention-only


def hand_patterns(model: LensModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities (1, H, L, L) by the definition: softmax over the
    causal scores q k^T / sqrt(d) of the per-head weights (not the rebuilt model's SDPA)."""
    length = ids.shape[1]
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
    x = model.embed.weight[ids] + model.pos_embed.weight[:length]  # (1, L, E)
    out = []
    with torch.no_grad():
        for block in model.blocks:
            assert isinstance(block, Block)
            attn, h = block.attn, block.ln1(x)
            q = torch.einsum("ble,hed->bhld", h, attn.W_Q) + attn.b_Q[:, None]  # (1, H, L, d)
            k = torch.einsum("ble,hed->bhld", h, attn.W_K) + attn.b_K[:, None]  # (1, H, L, d)
            scores = q @ k.transpose(-1, -2) / model.cfg.d_head ** 0.5  # (1, H, L, L)
            out.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1).double())
            x = block(x)
    return out


def test_heads_cli_finds_previous_token_and_induction_heads_with_their_scores() -> None:
    result = CliRunner().invoke(app, ["heads", str(SAMPLE), "--probe", "induction,duplicate",
                                      "--json"])
    assert result.exit_code == 0, result.output
    import json

    doc = json.loads(result.stdout)
    probe = doc["probe"]
    # the probe uses the model's own vocabulary (d_vocab 128) and fits its 128 positions
    assert probe["probes"] == ["induction", "duplicate"] and probe["start"] == 0
    assert probe["block"] == 50 and probe["length"] == 100 <= 128
    tokens = probe["tokens"]
    assert tokens[:50] == tokens[50:] and len(set(tokens)) == 50
    assert all(0 <= t < 128 for t in tokens)
    first, second = doc["layers"]
    assert [first["name"], second["name"]] == list(LAYERS)
    assert [h["head"] for h in first["heads"] if "previous-token" in h["roles"]] == [3]
    assert first["heads"][3]["top_role"] == "previous-token"
    inductive = [h["head"] for h in second["heads"] if "induction" in h["roles"]]
    assert inductive and all(second["heads"][h]["top_role"] == "induction" for h in inductive)
    assert not any("induction" in h["roles"] for h in first["heads"])
    # the scores in the JSON are the probabilities' own diagonals
    patterns = hand_patterns(sample_model(), torch.tensor([tokens]))
    rows = torch.arange(50, 100)  # the second copy
    for layer, maps in zip(doc["layers"], patterns, strict=True):
        p = maps[0]  # (H, L, L)
        expected = {"induction": p[:, rows, rows - 49].mean(-1),
                    "duplicate-token": p[:, rows, rows - 50].mean(-1),
                    "previous-token": p[:, torch.arange(1, 100), torch.arange(99)].mean(-1)}
        for role, values in expected.items():
            got = torch.tensor([h["scores"][role] for h in layer["heads"]], dtype=torch.float64)
            torch.testing.assert_close(got, values, rtol=0, atol=2e-6, msg=role)
        for head in layer["heads"]:
            assert head["top_score"] == (None if head["top_role"] is None
                                         else head["scores"][head["top_role"]])


def test_a_probe_block_longer_than_the_positions_is_shortened() -> None:
    from attnviz.head_atlas import head_atlas

    atlas = head_atlas(SAMPLE, probes=["induction"], block=100)
    assert atlas.probe is not None and atlas.probe.block == 63  # (128 - 2) // 2
    assert "probe block shortened from 100 to 63" in " ".join(atlas.notes)
