"""Re-randomise every floating parameter of a model so attention is peaked and no bias is zero.

Default ``transformers`` initialisation (std 0.02, zero biases, unit norms) gives near-uniform
attention and zero biases, so a checker that swaps heads or drops a bias could still pass. Here:
projection weights ~ N(0, 1/fan_in) (unit gain, so activations stay O(1) through the layers), the
attention input projections get an extra ``qk_gain`` (scores then have std ~ gain**2, i.e.
peaked), biases ~ N(0, 0.5**2), norm weights = their initial centre (1, or 0 for the
zero-centred Gemma-style RMSNorm) + 0.1 N(0, 1), norm biases ~ N(0, 0.1**2), embeddings and
learned tokens/tables ~ N(0, 1). Everything comes from one seeded generator in module order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Attribute names of modules (or bare parameters) that feed queries/keys of an attention.
# Packed projections (qkv, c_attn, query_key_value, Wqkv, in_proj) include v: a larger value
# gain only rescales the attention output, which the following norm absorbs.
QK_MODULES = frozenset({
    "query", "key", "q_proj", "k_proj", "q_lin", "k_lin", "q", "k", "qkv", "qkv_proj",
    "c_attn", "q_attn", "query_key_value", "Wqkv", "query_proj", "key_proj", "query_global",
    "key_global", "in_proj",
})
QK_PARAMS = frozenset({"in_proj_weight", "q_proj_weight", "k_proj_weight"})
# Bare parameters that are learned vectors/tables added to activations, not projections.
TABLE_HINTS = ("embed", "token", "position", "probe", "rel_", "relative")


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _fan_in(module: nn.Module, param: torch.Tensor) -> int:
    if type(module).__name__ == "Conv1D":  # GPT-2 Conv1D stores weights as (in, out)
        return int(param.shape[0])
    if isinstance(module, nn.modules.conv._ConvNd):  # (out, in / groups, *kernel)
        return int(math.prod(param.shape[1:]))
    return int(param.shape[-1])  # Linear (out, in); 3-D MoE experts (n, out, in)


def _draw(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


def _new_value(owner: str, module: nn.Module, name: str, param: torch.Tensor,
               generator: torch.Generator, qk_gain: float) -> torch.Tensor:
    if _is_norm(module):
        if name == "bias":
            return _draw(param.shape, 0.1, generator)
        # Gemma-style RMSNorms scale by (1 + weight) and initialise weight at 0: keep the centre.
        centre = float(param.detach().float().mean().round())
        return centre + _draw(param.shape, 0.1, generator)
    if isinstance(module, nn.Embedding) or any(h in name for h in TABLE_HINTS):
        return _draw(param.shape, 1.0, generator)
    if name.endswith("bias"):
        return _draw(param.shape, 0.5, generator)
    if param.dim() <= 1:
        # Learned scalars/vectors such as layer-scale lambdas and CLIP's logit_scale: jitter
        # around the initial value so its meaning (a scale, a temperature) is kept.
        return param.detach().float() + _draw(param.shape, 0.1, generator)
    gain = qk_gain if owner in QK_MODULES or name in QK_PARAMS else 1.0
    return _draw(param.shape, gain / math.sqrt(_fan_in(module, param)), generator)


@torch.no_grad()
def randomise(model: nn.Module, seed: int, *, qk_gain: float = 2.0) -> nn.Module:
    """Overwrite every floating parameter in place (tied parameters once); returns the model."""
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        owner = module_name.rsplit(".", 1)[-1]
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.is_floating_point() or not param.requires_grad:
                continue  # frozen tables (RoFormer's sinusoidal positions) are not weights
            seen.add(id(param))
            value = _new_value(owner, module, name, param, generator, qk_gain)
            param.copy_(value.to(param.dtype))
    return model
