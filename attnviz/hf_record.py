"""Reading what a model's own attention code computes: the inputs of its q/k/v projections, the
q, k, v it hands to its score product, v at ``probs @ v``, and its output projection.

Used by ``verify_hf`` as the reference nobody here wrote. Nothing in the model is changed: forward
hooks read module inputs and outputs, and a ``TorchFunctionMode`` sees every ``matmul``/``bmm``/
``baddbmm``/``F.scaled_dot_product_attention`` call, attributed to the innermost running attention
module. torch's MHA fast path, which bypasses the Python forward, is off while recording.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn
from torch.overrides import TorchFunctionMode

SCORE_FUNCS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                         torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm})
SDPA = torch.nn.functional.scaled_dot_product_attention


@dataclass
class Captured:
    """What one attention module computed, first call only (ALBERT reuses a layer)."""

    module: nn.Module
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> (B, L, in)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # projection outputs
    q: torch.Tensor | None = None  # as the module had it at its score product: (..., Lq, d)
    k: torch.Tensor | None = None  # (..., S, d)
    v: torch.Tensor | None = None  # (..., S, dv)
    out_in: torch.Tensor | None = None  # what the output projection read: (B, Lq, H*d)
    out_out: torch.Tensor | None = None  # and wrote: (B, Lq, E_out)
    done: bool = False  # the module's first call has finished

    def length(self, role: str) -> int | None:
        x = self.inputs.get(role)
        return None if x is None else x.shape[1]


@dataclass(frozen=True)
class Projections:
    """Module names of one attention layer's projections in the model (roles -> module)."""

    attention: str
    roles: dict[str, tuple[str, ...]]  # module -> the roles its input feeds ("q", "k", "v")
    out: str | None = None


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    value = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
    return value if isinstance(value, torch.Tensor) else None


class _Recorder(TorchFunctionMode):
    def __init__(self, captured: dict[str, Captured], stack: list[str]) -> None:
        super().__init__()
        self.captured, self.stack = captured, stack

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.stack and (func in SCORE_FUNCS or func is SDPA):
            item = self.captured[self.stack[-1]]
            if not item.done:
                with torch.no_grad():
                    _record(item, func, args, kwargs)
        return out


def _record(item: Captured, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    lq, s = item.length("q"), item.length("k")
    if lq is None or s is None:
        return
    if func is SDPA:
        if item.q is None:
            item.q, item.k, item.v = (t.detach() for t in args[:3])
        return
    if func in (torch.baddbmm, torch.Tensor.baddbmm):  # (input, batch1, batch2)
        a = kwargs.get("batch1", args[1] if len(args) > 1 else None)
        b = kwargs.get("batch2", args[2] if len(args) > 2 else None)
    else:  # (input, other) / (input, mat2)
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 \
            or b.dim() < 2:
        return
    if item.q is None and a.shape[-2] == lq and b.shape[-1] == s and a.shape[-1] == b.shape[-2]:
        item.q, item.k = a.detach(), b.detach().transpose(-1, -2)  # k: (..., S, d)
    elif item.q is not None and item.v is None and a.shape[-1] == s and a.shape[-2] == lq \
            and b.shape[-2] == s:
        item.v = b.detach()


def _torch_mha_projections(item: Captured) -> None:
    """q, k, v of an ``nn.MultiheadAttention`` by torch's own in-projection code.

    ``F.multi_head_attention_forward`` hands itself to the torch-function mode whole, so its
    inner products are not seen; torch's in-projection helpers are the reference instead."""
    mha = item.module
    assert isinstance(mha, nn.MultiheadAttention)
    if not all(role in item.inputs for role in "qkv"):
        return
    query, key, value = (item.inputs[r].transpose(0, 1) for r in "qkv")  # (L, B, E)
    functional: Any = F  # private helpers, absent from torch's type stubs
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            q, k, v = functional._in_projection_packed(query, key, value, mha.in_proj_weight,
                                                       mha.in_proj_bias)
        else:
            b = mha.in_proj_bias
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            q, k, v = functional._in_projection(query, key, value, mha.q_proj_weight,
                                                mha.k_proj_weight, mha.v_proj_weight, bq, bk, bv)
    heads, batch = mha.num_heads, query.shape[1]
    for role, t in (("q", q), ("k", k), ("v", v)):  # torch's head split: view(L, B*H, d)
        per_head = t.reshape(t.shape[0], batch * heads, -1).transpose(0, 1)  # (B*H, L, d)
        setattr(item, role, per_head.detach())


@contextmanager
def record(model: nn.Module, layers: Sequence[Projections]) -> Iterator[dict[str, Captured]]:
    """``with record(model, layers) as got: model(**inputs)`` -> ``got[attention module]``."""
    captured = {p.attention: Captured(model.get_submodule(p.attention)) for p in layers}
    stack: list[str] = []

    def enter(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        item = captured[name]
        if isinstance(item.module, nn.MultiheadAttention) and not item.inputs:
            query = args[0] if args else kwargs.get("query")
            key = args[1] if len(args) > 1 else kwargs.get("key")
            value = args[2] if len(args) > 2 else kwargs.get("value")
            first = item.module.batch_first
            for role, x in (("q", query), ("k", key), ("v", value)):
                if isinstance(x, torch.Tensor):
                    item.inputs[role] = (x if first else x.transpose(0, 1)).detach()  # (B, L, E)
        stack.append(name)

    def leave(name: str) -> None:
        stack.pop()
        item = captured[name]
        if isinstance(item.module, nn.MultiheadAttention) and item.q is None and not item.done:
            _torch_mha_projections(item)
        item.done = True

    def projection(name: str, roles: tuple[str, ...], args: tuple[Any, ...],
                   kwargs: dict[str, Any], output: Any) -> None:
        item = captured[name]
        x = _first_tensor(args, kwargs)
        if item.done or x is None or not isinstance(output, torch.Tensor):
            return
        for role in roles:
            item.inputs.setdefault(role, x.detach())
        item.outputs.setdefault("".join(roles), output.detach())

    def out_projection(name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                       output: Any) -> None:
        item = captured[name]
        x = _first_tensor(args, kwargs)
        if item.out_in is None and x is not None and isinstance(output, torch.Tensor):
            item.out_in, item.out_out = x.detach(), output.detach()

    with ExitStack() as exits:
        for layer in layers:
            module = model.get_submodule(layer.attention)
            exits.callback(module.register_forward_pre_hook(
                lambda _m, a, k, n=layer.attention: enter(n, a, k), with_kwargs=True).remove)
            exits.callback(module.register_forward_hook(
                lambda _m, _a, _o, n=layer.attention: leave(n), always_call=True).remove)
            for proj, roles in layer.roles.items():
                exits.callback(model.get_submodule(proj).register_forward_hook(
                    lambda _m, a, k, o, n=layer.attention, r=roles: projection(n, r, a, k, o),
                    with_kwargs=True).remove)
            if layer.out is not None:
                exits.callback(model.get_submodule(layer.out).register_forward_hook(
                    lambda _m, a, k, o, n=layer.attention: out_projection(n, a, k, o),
                    with_kwargs=True).remove)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        exits.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
        exits.enter_context(_Recorder(captured, stack))
        yield captured
