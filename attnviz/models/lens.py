"""Rebuilding a TransformerLens ``HookedTransformer`` from its state_dict alone.

TransformerLens keeps weights per head and multiplies on the right (``x @ W``):
``embed.W_E [V, E]``, ``pos_embed.W_pos [n_ctx, E]``, ``blocks.N.ln1.w/.b``,
``blocks.N.attn.W_Q/W_K/W_V [H, E, d]``, ``b_Q/b_K/b_V [H, d]``, ``W_O [H, d, E]``,
``b_O [E]`` (and the buffers ``mask [n_ctx, n_ctx]``, True = may attend, and ``IGNORE``),
``blocks.N.ln2.*`` and ``blocks.N.mlp.W_in [E, d_mlp]/b_in/W_out [d_mlp, E]/b_out`` unless
the model is attention-only, ``ln_final.w/.b``, ``unembed.W_U [E, V]``, ``unembed.b_U``.

Every dimension comes from the shapes (H and d from W_Q's, so there is nothing to guess); the
norm is LayerNorm when ``.w`` and ``.b`` are stored, RMSNorm when only ``.w`` is. What shapes
cannot tell comes from TransformerLens config fields in a config.json beside the file
(``normalization_type`` when a folded model stores no norm weights, ``act_fn``, ``eps``,
``attention_dir``, ``positional_embedding_type``); without one the MLP activation is GPT-2's
``gelu_new`` and the run says so. Rebuilt: pre-norm blocks, learned absolute positions added
to the residual stream, causal attention (the stored mask when there is one) scaled by
1/sqrt(d) through ``F.scaled_dot_product_attention``, so capture sees every call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from attnviz.checkpoint import Checkpoint
from attnviz.models.torch_transformer import ModelBuildError

ANCHORS = ("embed.W_E", "blocks.0.attn.W_Q")  # what makes a file a TransformerLens state_dict
NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)
ACTIVATIONS = {"gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh",
               "gelu": "none", "relu": "relu", "silu": "silu"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
IGNORED = re.compile(r"^blocks\.\d+\.attn\.IGNORE$")  # the masked-score constant: not needed


def is_lens_state_dict(names: Any) -> bool:
    """Whether tensor names are a TransformerLens HookedTransformer's."""
    return all(anchor in names for anchor in ANCHORS)


@dataclass(frozen=True)
class LensConfig:
    """The HookedTransformerConfig fields the rebuild needs (TransformerLens's names)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    d_mlp: int | None = None  # None: attention-only
    normalization_type: str | None = "LN"
    act_fn: str = "gelu_new"
    eps: float = 1e-5
    causal: bool = True
    final_norm: bool = True
    unembed: bool = True
    unembed_bias: bool = True
    buffers: bool = False  # the attention modules hold TransformerLens's mask buffer
    notes: tuple[str, ...] = field(default=(), compare=False)


class Norm(nn.Module):
    """TransformerLens LN / LNPre / RMS / RMSPre (``w``, ``b`` as it names them)."""

    def __init__(self, width: int, kind: str | None, eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        if kind in ("LN", "RMS"):
            self.w = nn.Parameter(torch.ones(width))
        if kind == "LN":
            self.b = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind is None:
            return x
        if self.kind in ("LN", "LNPre"):
            x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "LN":
            return x * self.w + self.b
        return x * self.w if self.kind == "RMS" else x


class Attention(nn.Module):
    """One TransformerLens attention layer; its map comes from F.scaled_dot_product_attention."""

    def __init__(self, cfg: LensConfig) -> None:
        super().__init__()
        heads, width, d = cfg.n_heads, cfg.d_model, cfg.d_head
        self.n_heads, self.causal = heads, cfg.causal
        def weight(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape) / math.sqrt(shape[1]))  # ~unit outputs

        self.W_Q, self.W_K, self.W_V = weight(heads, width, d), weight(heads, width, d), \
            weight(heads, width, d)
        self.W_O = nn.Parameter(torch.randn(heads, d, width) / math.sqrt(heads * d))
        self.b_Q, self.b_K, self.b_V = (nn.Parameter(torch.zeros(heads, d)) for _ in range(3))
        self.b_O = nn.Parameter(torch.zeros(width))
        mask = torch.tril(torch.ones(cfg.n_ctx, cfg.n_ctx)).bool() if cfg.buffers else None
        self.register_buffer("mask", mask)  # as HookedTransformer registers it (persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def heads(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return torch.einsum("ble,hed->bhld", x, weight) + bias[:, None, :]  # (B, H, L, d)

        q, k, v = heads(self.W_Q, self.b_Q), heads(self.W_K, self.b_K), heads(self.W_V, self.b_V)
        length = x.shape[1]
        allowed = None
        mask = self.mask
        if self.causal and isinstance(mask, torch.Tensor):  # stored: causal, or banded (local)
            allowed = mask[:length, :length]  # (L, L), True = may attend, as SDPA reads it
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           is_causal=self.causal and allowed is None)
        return torch.einsum("bhld,hde->ble", z, self.W_O) + self.b_O  # (B, L, E)


class MLP(nn.Module):
    def __init__(self, cfg: LensConfig) -> None:
        super().__init__()
        assert cfg.d_mlp is not None
        self.W_in = nn.Parameter(torch.randn(cfg.d_model, cfg.d_mlp) / math.sqrt(cfg.d_model))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.randn(cfg.d_mlp, cfg.d_model) / math.sqrt(cfg.d_mlp))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act_fn = cfg.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_in + self.b_in  # (B, L, d_mlp)
        kind = ACTIVATIONS[self.act_fn]
        if kind == "relu":
            post = F.relu(pre)
        elif kind == "silu":
            post = F.silu(pre)
        else:
            post = F.gelu(pre, approximate=kind)
        return post @ self.W_out + self.b_out


class Block(nn.Module):
    def __init__(self, cfg: LensConfig) -> None:
        super().__init__()
        self.ln1 = Norm(cfg.d_model, cfg.normalization_type, cfg.eps)
        self.attn = Attention(cfg)
        self.mlp: MLP | None = None
        if cfg.d_mlp is not None:
            self.ln2 = Norm(cfg.d_model, cfg.normalization_type, cfg.eps)
            self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class Embed(nn.Module):
    def __init__(self, rows: int, width: int, name: str) -> None:
        super().__init__()
        self.name = name
        self.register_parameter(name, nn.Parameter(torch.randn(rows, width) * 0.02))

    @property
    def weight(self) -> torch.Tensor:
        value = getattr(self, self.name)
        assert isinstance(value, torch.Tensor)
        return value


class Unembed(nn.Module):
    def __init__(self, cfg: LensConfig) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.randn(cfg.d_model, cfg.d_vocab) / math.sqrt(cfg.d_model))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab)) if cfg.unembed_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.W_U  # (B, L, V)
        return logits + self.b_U if self.b_U is not None else logits


class LensModel(nn.Module):
    """``model(tokens)`` -> logits (B, L, V); tokens are ids (B, L), or float token embeddings
    (B, L, E) in place of the ``W_E`` lookup (positions are added either way)."""

    def __init__(self, cfg: LensConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg.d_vocab, cfg.d_model, "W_E")
        self.pos_embed = Embed(cfg.n_ctx, cfg.d_model, "W_pos")
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = Norm(cfg.d_model, cfg.normalization_type if cfg.final_norm else None,
                             cfg.eps)
        self.unembed = Unembed(cfg) if cfg.unembed else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() == 1:
            tokens = tokens[None]  # (1, L)
        length = tokens.shape[1]
        if length > self.cfg.n_ctx:
            raise ValueError(f"{length} tokens, but the model has {self.cfg.n_ctx} positions")
        if not tokens.is_floating_point() and tokens.numel() and (
                int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
            raise ValueError(f"token ids must be in 0..{self.cfg.d_vocab - 1}")
        x = tokens if tokens.is_floating_point() else self.embed.weight[tokens]  # (B, L, E)
        x = x + self.pos_embed.weight[:length]
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        return self.unembed(x) if self.unembed is not None else x


def _settings(checkpoint: Checkpoint) -> dict[str, Any]:
    """TransformerLens config fields from a config.json beside the file (HookedTransformerConfig
    .to_dict() names); other keys are ignored."""
    config = checkpoint.config if isinstance(checkpoint.config, dict) else {}
    wanted = ("normalization_type", "act_fn", "eps", "attention_dir",
              "positional_embedding_type", "use_attn_scale", "attn_scale",
              "scale_attn_by_inverse_layer_idx")
    return {key: config[key] for key in wanted if key in config}


def _refuse_settings(settings: dict[str, Any], d_head: int, where: Checkpoint) -> None:
    unsupported = []
    if settings.get("positional_embedding_type", "standard") != "standard":
        unsupported.append(f"positional_embedding_type {settings['positional_embedding_type']}")
    if settings.get("use_attn_scale") is False or settings.get("scale_attn_by_inverse_layer_idx"):
        unsupported.append("an attention scale other than sqrt(d_head)")
    scale = settings.get("attn_scale")
    if isinstance(scale, int | float) and not math.isclose(scale, math.sqrt(d_head)):
        unsupported.append(f"attn_scale {scale}")
    if settings.get("normalization_type", "LN") not in NORMS:
        unsupported.append(f"normalization_type {settings['normalization_type']}")
    if settings.get("act_fn", "gelu_new") not in ACTIVATIONS:
        unsupported.append(f"act_fn {settings['act_fn']}")
    if unsupported:
        raise ModelBuildError(f"a TransformerLens model with {', '.join(unsupported)}, which "
                              "attnviz does not rebuild", path=where.path,
                              hint="capture it in Python with attnviz.capture_attention")


def infer_config(checkpoint: Checkpoint) -> LensConfig:
    """Every dimension from the shapes; what they cannot tell from the config.json fields."""
    shapes = {name: tuple(info.shape) for name, info in checkpoint.tensors.items()}
    layers = sorted({int(m.group(1)) for name in shapes if (m := _BLOCK.match(name))})
    if layers != list(range(len(layers))):
        raise ModelBuildError(f"TransformerLens block indices {layers} are not 0..N-1",
                              path=checkpoint.path)
    vocab, width = shapes["embed.W_E"]
    heads, _, d_head = shapes["blocks.0.attn.W_Q"]
    settings = _settings(checkpoint)
    _refuse_settings(settings, d_head, checkpoint)
    notes = []
    if "pos_embed.W_pos" not in shapes:
        raise ModelBuildError("a TransformerLens state_dict without pos_embed.W_pos (rotary, "
                              "ALiBi or shortformer positions), which attnviz does not rebuild",
                              path=checkpoint.path,
                              hint="capture it in Python with attnviz.capture_attention")
    if "blocks.0.ln1.w" in shapes:
        norm: str | None = "LN" if "blocks.0.ln1.b" in shapes else "RMS"
    elif "normalization_type" in settings:
        norm = settings["normalization_type"]
    else:
        raise ModelBuildError("a TransformerLens state_dict without norm weights: LayerNorm "
                              "folded into the weights (LNPre) or no norm at all, which the "
                              "file cannot tell", path=checkpoint.path,
                              hint="put a config.json with \"normalization_type\": \"LNPre\" "
                                   "(or null, RMSPre) beside it")
    mlp = shapes.get("blocks.0.mlp.W_in")
    act_fn = settings.get("act_fn", "gelu_new")
    if mlp is not None and "act_fn" not in settings:
        notes.append("MLP activation assumed gelu_new (GPT-2's); a config.json with act_fn "
                     "beside the file says otherwise")
    return LensConfig(
        n_layers=len(layers), d_model=width, n_heads=heads, d_head=d_head, d_vocab=vocab,
        n_ctx=shapes["pos_embed.W_pos"][0], d_mlp=None if mlp is None else mlp[1],
        normalization_type=norm, act_fn=act_fn, eps=float(settings.get("eps", 1e-5)),
        causal=settings.get("attention_dir", "causal") != "bidirectional",
        final_norm="ln_final.w" in shapes or norm in ("LNPre", "RMSPre"),
        unembed="unembed.W_U" in shapes, unembed_bias="unembed.b_U" in shapes,
        buffers="blocks.0.attn.mask" in shapes, notes=tuple(notes))


def load_lens(checkpoint: Checkpoint) -> LensModel:
    """The rebuilt model with the file's weights (float32), in eval mode."""
    cfg = infer_config(checkpoint)
    model = LensModel(cfg)
    expected = model.state_dict()
    stored = {name for name in checkpoint.tensors if not IGNORED.match(name)}
    missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or unexpected:
        raise ModelBuildError(
            f"not the TransformerLens model attnviz rebuilds (standard positions, "
            f"{cfg.normalization_type} norms, {'attention-only' if cfg.d_mlp is None else 'MLPs'}"
            f"): {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}", path=checkpoint.path,
            hint="capture it in Python with attnviz.capture_attention")
    state = {}
    for name, want in expected.items():
        tensor = checkpoint.read_tensor(name)
        if tuple(tensor.shape) != tuple(want.shape):
            raise ModelBuildError(f"{name} has shape {list(tensor.shape)}, the other tensors "
                                  f"imply {list(want.shape)}", path=checkpoint.path)
        state[name] = tensor.to(want.dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def describe(cfg: LensConfig) -> str:
    body = "attention-only" if cfg.d_mlp is None else f"MLP {cfg.d_mlp} ({cfg.act_fn})"
    return (f"TransformerLens model rebuilt from the checkpoint: {cfg.n_layers} layers, d_model "
            f"{cfg.d_model}, {cfg.n_heads} heads of {cfg.d_head}, {body}, "
            f"{cfg.normalization_type or 'no'} norm, vocabulary {cfg.d_vocab}, {cfg.n_ctx} "
            "positions")
