"""``--verify`` against the model's own code: transformers computes q, k and v, attnviz's split
must give the same numbers for every head.

The split is checked against the stored tensors by ``verify.py``; that cannot catch a packing
read the wrong way on both sides. Here the reference is the HF attention module itself: the model
runs (eager attention, seeded random inputs) and q, k and v are read where the module hands them
to its score product (``q @ k^T`` by ``matmul``/``bmm``/``baddbmm``, or the arguments of
``F.scaled_dot_product_attention``), and v at ``probs @ v``. Rotary embeddings are the identity at
position 0, so every token gets ``position_ids`` 0 where the model takes them. Query/key norms
that the module applies per head are applied to attnviz's projections with the module's own norm.
Each role may differ by one positive constant per layer (the 1/sqrt(d) some models fold into q or
k), which is reported; a control with the heads rotated by one must fail.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from attnviz.heads_override import LayerHeads
from attnviz.hf_record import Captured, Projections, record
from attnviz.layouts import AttentionLayer, find_attention_layers
from attnviz.split import HeadWeights

NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm",
              "key_layernorm")


@dataclass(frozen=True)
class HfCheck:
    """One layer against transformers: max abs error per role and the wrong-head control."""

    layer: str
    module: str  # the HF class that computed the reference
    errors: dict[str, float] = field(default_factory=dict)  # role -> max error / max |ref|
    scales: dict[str, float] = field(default_factory=dict)  # role -> constant HF applied
    control: float = math.inf  # error with heads rotated by one (inf: a single head)
    problem: str | None = None  # why no comparison was possible
    notes: tuple[str, ...] = ()  # where the reference was read

    @property
    def max_abs_error(self) -> float:
        return max(self.errors.values(), default=math.inf)

    def ok(self, tolerance: float = 1e-5) -> bool:
        return self.problem is None and self.max_abs_error <= tolerance < self.control


def resolve_module(model: nn.Module, name: str) -> str | None:
    """The model's module for a checkpoint layer name (a head model's prefix may be gone)."""
    modules = dict(model.named_modules())
    if name in modules:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(f"{prefix}.") and name[len(prefix) + 1:] in modules:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in modules:
        return f"{prefix}.{name}"
    return None


def _per_head(t: torch.Tensor, batch: int, length: int, d: int) -> torch.Tensor:
    """(B, H, L, d) from the module's (B, H, L, d), (B*H, L, d) or (B, L, H, d)."""
    if t.dim() == 4 and t.shape[0] == batch and t.shape[2] == length:
        return t  # (B, H, L, d)
    return t.reshape(batch, -1, length, d)  # (B, H, L, d)


def _mine(hw: HeadWeights, x: torch.Tensor, role: str) -> torch.Tensor:
    """attnviz's per-head projection of x: (B, H|Hkv, L, d)."""
    weight = {"q": hw.q, "k": hw.k, "v": hw.v}[role].to(x.dtype)  # (H, d, in)
    bias = {"q": hw.q_bias, "k": hw.k_bias, "v": hw.v_bias}[role]
    out = torch.einsum("bli,hdi->bhld", x, weight)  # (B, H, L, d)
    if bias is not None:
        out = out + bias.to(x.dtype)[None, :, None, :]  # (1, H, 1, d)
    return out


def _apply_norm(module: nn.Module, role: str, t: torch.Tensor) -> torch.Tensor:
    """The module's own q/k norm on attnviz's projection, if it has one."""
    for name in NORM_NAMES:
        norm = getattr(module, name, None)
        if not isinstance(norm, nn.Module) or name[0] != role:
            continue
        weight = getattr(norm, "weight", None)
        size = weight.shape[-1] if isinstance(weight, torch.Tensor) else t.shape[-1]
        if size == t.shape[-1]:
            normed: torch.Tensor = norm(t)  # per head, over d
            return normed
        b, h, length, d = t.shape
        flat = t.transpose(1, 2).reshape(b, length, h * d)  # (B, L, H*d)
        whole: torch.Tensor = norm(flat)
        return whole.reshape(b, length, h, d).transpose(1, 2)  # (B, H, L, d)
    return t


def _compare(ref: torch.Tensor, mine: torch.Tensor) -> tuple[float, float]:
    """(max |ref - scale * mine| over max(1, max |ref|), the best positive scale).

    Relative to the largest value because HF computes in float32: peaked random weights give
    q/k values in the tens, where float32 rounding alone is ~1e-6."""
    scale = float((ref * mine).sum() / (mine * mine).sum().clamp_min(1e-30))
    size = float(ref.abs().max().clamp_min(1.0))
    if not scale > 0:  # anti-correlated: certainly not the same numbers
        return float((ref - mine).abs().max()) / size, scale
    return float((ref - scale * mine).abs().max()) / size, scale


def _references(hw: HeadWeights, item: Captured) -> tuple[dict[str, torch.Tensor], str]:
    """Per-head (B, H, L, d) q, k, v as the module had them, and where they were read."""
    lq, s, d = item.length("q"), item.length("k"), hw.head_dim
    batch = item.inputs["q"].shape[0]
    assert lq is not None and s is not None
    if item.q is not None and item.k is not None and item.v is not None:
        return {"q": _per_head(item.q.double(), batch, lq, d),
                "k": _per_head(item.k.double(), batch, s, d),
                "v": _per_head(item.v.double(), batch, s, item.v.shape[-1])}, "score product"
    # no q @ k^T the recorder could read (Longformer's sliding-window einsum): the projections'
    # own outputs, split into heads of d the way every separate-projection model splits them
    refs = {}
    for role, length in (("q", lq), ("k", s), ("v", s)):
        out = item.outputs.get(role)
        if out is None:
            raise LookupError(role)
        refs[role] = out.double().reshape(batch, length, -1, d).transpose(1, 2)  # (B, H, L, d)
    return refs, "projection outputs"


def check_layer(hw: HeadWeights, item: Captured, name: str) -> HfCheck:
    """Compare one layer's split with what its module computed."""
    module = type(item.module).__name__
    if not all(role in item.inputs for role in "qkv"):
        return HfCheck(name, module, problem=f"{module} ran no q/k/v projection attnviz saw")
    try:
        refs, where = _references(hw, item)
    except LookupError:
        return HfCheck(name, module, problem=f"{module} computed no q @ k^T that attnviz could "
                       "read and has no separate projection outputs")
    if refs["q"].shape[1] != hw.num_heads:
        return HfCheck(name, module, problem=f"{module} computed {refs['q'].shape[1]} query "
                       f"heads, attnviz split {hw.num_heads}")
    errors, scales, controls = {}, {}, []
    kv_index = torch.tensor(hw.kv_map)
    notes = [where]
    for role in ("q", "k", "v"):
        mine = _mine(hw, item.inputs[role].double(), role)  # (B, H|Hkv, L, d)
        if role != "v" and where == "score product":
            with torch.no_grad():
                mine = _apply_norm(item.module, role, mine.to(item.inputs[role].dtype)).double()
        ref, distinct = refs[role], mine.shape[1]
        if role != "q" and ref.shape[1] != mine.shape[1]:
            if ref.shape[1] == hw.num_heads:  # the module repeated k/v per query head (GQA)
                mine = mine[:, kv_index]
            elif ref.shape[1] == 1:  # broadcast multi-query
                ref = ref.expand(-1, mine.shape[1], -1, -1)
        if ref.shape != mine.shape:
            return HfCheck(name, module, problem=f"{module}'s {role} has shape "
                           f"{list(ref.shape)}, attnviz's split gives {list(mine.shape)}")
        errors[role], scales[role] = _compare(ref, mine)
        if role != "v" and errors[role] > 1e-5 and ref.shape[2] > 1:
            # rotary inside the module at positions the caller cannot set (RoFormer): position
            # 0 is the only one where the rotation is the identity
            errors[role], scales[role] = _compare(ref[:, :, :1], mine[:, :, :1])
            notes.append(f"{role} at position 0 (rotary applied inside the module)")
        if distinct > 1:
            controls.append(_compare(ref, mine.roll(1, dims=1))[0])
    if hw.o is not None and item.out_in is not None and item.out_out is not None:
        heads_in = item.out_in.double().reshape(*item.out_in.shape[:-1], hw.num_heads, -1)
        o = hw.o.to(torch.float64)  # (H, E_out, d)
        if heads_in.shape[-1] == o.shape[-1]:
            mine_out = torch.einsum("blhd,hed->ble", heads_in, o)  # (B, Lq, E_out)
            if hw.o_bias is not None:
                mine_out = mine_out + hw.o_bias.to(torch.float64)
            errors["o"], scales["o"] = _compare(item.out_out.double(), mine_out)
            if hw.num_heads > 1:
                wrong = torch.einsum("blhd,hed->ble", heads_in, o.roll(1, dims=0))
                controls.append(_compare(item.out_out.double(), wrong)[0])
    control = min(controls) if controls else math.inf
    return HfCheck(name, module, errors, scales, control, notes=tuple(notes))


def dummy_inputs(model: nn.Module, *, batch: int = 2, length: int = 5, target_length: int = 3,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs for any HF model's forward, from its signature and config."""
    generator = torch.Generator().manual_seed(seed)
    params = inspect.signature(model.forward).parameters
    config = model.config
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None) or config
    inputs: dict[str, torch.Tensor] = {}

    def ids(n: int) -> torch.Tensor:
        vocab = int(getattr(text, "vocab_size", 100) or 100)
        return torch.randint(min(vocab, 1000), (batch, n), generator=generator)

    if "input_ids" in params:
        inputs["input_ids"] = ids(length)
        inputs["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
    if "position_ids" in params and "input_ids" in inputs:
        inputs["position_ids"] = torch.zeros(batch, length, dtype=torch.long)  # rotary = identity
    if "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = ids(target_length)
    if "pixel_values" in params:
        size = getattr(vision, "image_size", 32)
        size = size[0] if isinstance(size, list | tuple) else size
        channels = int(getattr(vision, "num_channels", 3))
        inputs["pixel_values"] = torch.randn(batch, channels, int(size), int(size),
                                             generator=generator)
    if "input_features" in params:
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        mels = int(getattr(config, "num_mel_bins", 80))
        inputs["input_features"] = torch.randn(batch, mels, frames, generator=generator)
    if getattr(config, "add_cross_attention", False) and "encoder_hidden_states" in params:
        width = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
        inputs["encoder_hidden_states"] = torch.randn(batch, length + 2, width,
                                                      generator=generator)
    return inputs


def model_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The attention layers of the model as it is in memory (names as its modules have them)."""
    shapes = {k: _Shape(tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
    return find_attention_layers(shapes, strict=False)[0]


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]
    dtype: str


def _module_of(model: nn.Module, key: str | None) -> str | None:
    """The module owning a weight key (``...q_proj.weight`` -> ``...q_proj``), if a module."""
    if not key or not key.endswith(".weight"):
        return None
    return resolve_module(model, key.removesuffix(".weight"))


def _projections(model: nn.Module, module: str, layer: AttentionLayer) -> Projections:
    """Which modules of the model feed q, k and v of one attention module."""
    roles: dict[str, tuple[str, ...]] = {}
    fused = {"qkv": ("q", "k", "v"), "kv": ("k", "v"), "q": ("q",), "k": ("k",), "v": ("v",)}
    for role, feeds in fused.items():
        owner = _module_of(model, layer.keys.get(role))
        if owner is not None:
            roles[owner] = feeds
    return Projections(module, roles, _module_of(model, layer.keys.get("out")))


def pair_modules(model: nn.Module, layers: Sequence[AttentionLayer]
                 ) -> tuple[dict[str, Projections], str]:
    """File layer -> the model's modules for it, and how the pairing was made.

    transformers renames some modules when it loads a file (ViT's ``attention.attention.query``
    becomes ``attention.q_proj``); then the layers are paired in order, which needs the same
    number of layers on both sides, and the model's own names are used for the projections."""
    by_name = {lay.name: resolve_module(model, lay.name) for lay in layers}
    if all(module is not None for module in by_name.values()):
        in_model = {lay.name: lay for lay in model_attention_layers(model)}
        paired = {}
        for lay in layers:
            module = by_name[lay.name]
            assert module is not None
            paired[lay.name] = _projections(model, module, in_model.get(module, lay))
        return paired, "by name"
    in_order = model_attention_layers(model)
    if len(in_order) == len(layers):
        return ({lay.name: _projections(model, mine.name, mine)
                 for lay, mine in zip(layers, in_order, strict=True)},
                "in order (transformers renamed the modules when loading)")
    return ({lay.name: _projections(model, module, lay) for lay in layers
             if (module := by_name[lay.name]) is not None}, "by name (some have no module)")


def verify_model(model: nn.Module, splits: Mapping[str, HeadWeights],
                 inputs: Mapping[str, torch.Tensor] | None = None) -> list[HfCheck]:
    """Run ``model`` once and check every split layer against what its module computed."""
    paired, _how = pair_modules(model, [hw.layer for hw in splits.values()])
    unique = {p.attention: p for p in paired.values()}
    with torch.no_grad(), record(model, list(unique.values())) as got:
        model(**(dict(inputs) if inputs is not None else dummy_inputs(model)))
    checks = []
    for layer, hw in splits.items():
        found = paired.get(layer)
        if found is None:
            checks.append(HfCheck(layer, "-", problem=f"the model has no module '{layer}'"))
        else:
            checks.append(check_layer(hw, got[found.attention], layer))
    return checks


def verify_directory(path: Path, splits: Mapping[str, HeadWeights], *,
                     heads_from: Iterable[LayerHeads] = ()) -> tuple[str, list[HfCheck]]:
    """Load an HF model directory (safely, eager attention) and check ``splits`` against it.

    ``heads_from``: resolved layers whose heads overrides the model is built with.
    Returns (a description of the reference, the checks)."""
    from attnviz.models.sources import load_hf_model

    loaded = load_hf_model(path, attn_implementation="eager",  # score products are matmuls
                           heads_from=heads_from)
    model = loaded.model
    converted = {name: hw.map(lambda a: a if isinstance(a, torch.Tensor)
                              else torch.from_numpy(a.copy()))
                 for name, hw in splits.items()}
    checks = verify_model(model, converted)
    return f"transformers {type(model).__name__} (q, k, v at its score product)", checks
