"""``capture_attention``: per-head attention maps from a forward pass of any PyTorch model.

Three routes, none of which needs a change to the model's code:

1. ``nn.MultiheadAttention``: a pre-hook asks for ``need_weights=True,
   average_attn_weights=False`` whatever the call site passed (``nn.TransformerEncoderLayer``
   passes ``need_weights=False``), a hook keeps the per-head weights and hands the caller back
   exactly what it asked for. The MHA/Transformer fast paths, which bypass the module's Python
   forward, are switched off with ``torch.backends.mha.set_fastpath_enabled(False)``.
2. ``F.scaled_dot_product_attention`` (HF sdpa, timm fused attention, nanoGPT): a
   ``TorchFunctionMode`` sees every call however the function was imported, lets the fused kernel
   compute the output, and recomputes the probabilities from the same q, k, attn_mask,
   is_causal, scale and enable_gqa.
3. Explicit softmax attention (``F.softmax``/``torch.softmax``/``Tensor.softmax``/``nn.Softmax``
   over the last dim inside an attention module): the softmax output is the map.

Calls are attributed to the innermost running attention module (tracked by forward hooks).
On exit, even on exception, hooks are removed and the mode and flags restored.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn
from torch.overrides import TorchFunctionMode

from attnviz.capture_math import bind_sdpa, mha_scores, sdpa_scores, to_bhls
from attnviz.errors import AttnvizError, UsageError, did_you_mean
from attnviz.layouts import find_attention_layers

SOFTMAX_FUNCS = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax})
SDPA_FUNCS = frozenset({F.scaled_dot_product_attention,
                        torch._C._nn.scaled_dot_product_attention})
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")


class NothingCapturedError(AttnvizError):
    """Attention modules ran but no map could be captured from any of them."""


@dataclass
class AttentionMaps(Mapping[str, torch.Tensor]):
    """Ordered mapping: layer name -> per-head maps (B, H, Lq, Lk), in call order.

    ``scores`` holds pre-softmax scores when asked for, ``routes`` how each map was captured,
    ``missed`` attention modules that ran but yielded nothing.
    """

    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.maps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)


def attention_module_names(model: nn.Module) -> list[str]:
    """Modules that are attention layers: every ``nn.MultiheadAttention``, plus the layer
    prefixes the layout registry recognises in the model's own state_dict."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    shapes = {k: _Shape(tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    for layer in find_attention_layers(shapes, strict=False)[0]:  # names only, not packings
        if layer.name in modules and layer.name not in names:
            names.append(layer.name)
    if not names:  # custom code with unregistered key names: fall back to class names
        names = [n for n, m in modules.items() if n and any(
            word in type(m).__name__.lower() for word in ("attention", "attn"))]
        names = [n for n in names if not any(o.startswith(f"{n}.") for o in names)]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(names, key=lambda n: order.get(n, 0))


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]
    dtype: str


class _Engine:
    def __init__(self, model: nn.Module, selected: set[str], heads: Sequence[int] | None,
                 keep_scores: bool) -> None:
        self.model = model
        self.selected = selected
        self.heads = list(heads) if heads is not None else None
        self.keep_scores = keep_scores
        self.result = AttentionMaps()
        self.stack: list[str] = []
        self.ran: set[str] = set()
        self.mha_calls: list[tuple[bool, bool]] = []

    def owner(self) -> str | None:
        for name in reversed(self.stack):
            if name in self.selected:
                return name
        return None

    def store(self, name: str, probs: torch.Tensor, scores: torch.Tensor | None,
              route: str) -> None:
        module = self.model.get_submodule(name)
        hint = next((getattr(module, a) for a in HEAD_COUNT_ATTRS
                     if isinstance(getattr(module, a, None), int)), None)
        probs = to_bhls(probs.detach(), hint)
        if self.heads is not None:
            if max(self.heads) >= probs.shape[1] or min(self.heads) < -probs.shape[1]:
                raise UsageError(f"head index {max(self.heads)} out of range: layer '{name}' "
                                 f"has {probs.shape[1]} heads")
            probs = probs[:, self.heads]
        key, count = name, 2
        while key in self.result.maps:  # the same module called again: name#2, name#3...
            key, count = f"{name}#{count}", count + 1
        self.result.maps[key] = probs
        self.result.routes[key] = route
        if scores is not None and self.keep_scores:
            scores = to_bhls(scores.detach(), hint)
            self.result.scores[key] = scores[:, self.heads] if self.heads is not None else scores

    # -- module hooks ---------------------------------------------------------------------
    def push(self, name: str) -> None:
        self.stack.append(name)
        if name in self.selected:
            self.ran.add(name)

    def pop(self) -> None:
        if self.stack:
            self.stack.pop()

    def mha_pre(self, _module: nn.Module, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = tuple(args), dict(kwargs)
        wants = [kwargs.get("need_weights", True), kwargs.get("average_attn_weights", True)]
        for index, (position, key) in enumerate(((4, "need_weights"),
                                                 (6, "average_attn_weights"))):
            if len(args) > position:
                wants[index] = args[position]
                args = (*args[:position], index == 0, *args[position + 1:])
            else:
                kwargs[key] = index == 0  # need_weights=True, average_attn_weights=False
        self.mha_calls.append((bool(wants[0]), bool(wants[1])))
        return args, kwargs

    def mha_post(self, name: str, module: nn.MultiheadAttention, args: tuple[Any, ...],
                 kwargs: dict[str, Any], output: Any) -> Any:
        need, average = self.mha_calls.pop() if self.mha_calls else (True, True)
        out, weights = output
        if weights is not None:
            scores = mha_scores(module, args, kwargs) if self.keep_scores else None
            self.store(name, weights, scores, "nn.MultiheadAttention")
        if not need:
            return out, None
        if average and weights is not None:
            return out, weights.mean(dim=-3)  # what MHA itself returns when averaging
        return out, weights

    # -- torch function intercepts --------------------------------------------------------
    def on_sdpa(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self.owner()
        if name is None:
            return
        call = bind_sdpa(args, kwargs)
        scores = sdpa_scores(call["query"], call["key"], call.get("attn_mask"),
                             bool(call.get("is_causal", False)), call.get("scale"),
                             bool(call.get("enable_gqa", False)))
        probs = torch.softmax(scores, dim=-1)  # (..., H, L, S)
        self.store(name, probs, scores, "F.scaled_dot_product_attention")

    def on_softmax(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                   out: torch.Tensor) -> None:
        name = self.owner()
        if name is None or not isinstance(out, torch.Tensor) or out.dim() < 2:
            return
        if isinstance(self.model.get_submodule(name), nn.MultiheadAttention):
            return  # captured by its hooks
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None or dim not in (-1, out.dim() - 1):
            return
        self.store(name, out, args[0] if isinstance(args[0], torch.Tensor) else None, "softmax")


class _InterceptMode(TorchFunctionMode):
    def __init__(self, engine: _Engine) -> None:
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SDPA_FUNCS:
            with torch.no_grad():
                self.engine.on_sdpa(args, kwargs)
        elif func in SOFTMAX_FUNCS:
            self.engine.on_softmax(args, kwargs, out)
        return out


def _select(model: nn.Module, layers: Sequence[str] | None) -> set[str]:
    candidates = attention_module_names(model)
    if layers is None:
        return set(candidates)
    def matches(name: str) -> bool:
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in layers)

    # a glob like 'layers.1.*' means the attention modules under it; any module only when no
    # attention module matches (custom attention the registry does not recognise)
    chosen = {n for n in candidates if matches(n)} or {
        n for n, _ in model.named_modules() if matches(n)}
    if not chosen:
        listing = f"attention modules: {', '.join(candidates[:6]) or 'none recognised'}"
        raise UsageError(f"layers {list(layers)} match no module of the model",
                         hint=did_you_mean(layers[0], candidates, listing))
    return chosen


@contextlib.contextmanager
def capture_attention(model: nn.Module, *, layers: Sequence[str] | None = None,
                      heads: Sequence[int] | None = None,
                      scores: bool = False) -> Iterator[AttentionMaps]:
    """``with capture_attention(model) as maps: model(x)`` -> ``maps[layer]`` (B, H, Lq, Lk).

    ``layers``: names or globs of modules to capture (default: every attention module).
    ``heads``: head indices to keep. ``scores``: also keep pre-softmax scores (``maps.scores``).
    Raises ``NothingCapturedError`` on exit if attention modules ran but nothing was captured.
    """
    engine = _Engine(model, _select(model, layers), heads, scores)
    with contextlib.ExitStack() as stack:
        for name, module in model.named_modules():
            pre = module.register_forward_pre_hook(lambda _m, _a, n=name: engine.push(n))
            post = module.register_forward_hook(lambda _m, _a, _o: engine.pop(),
                                                always_call=True)
            stack.callback(pre.remove)
            stack.callback(post.remove)
            if isinstance(module, nn.MultiheadAttention) and name in engine.selected:
                mha_pre = module.register_forward_pre_hook(engine.mha_pre, with_kwargs=True,
                                                            prepend=True)
                mha_post = module.register_forward_hook(
                    lambda m, a, k, o, n=name: engine.mha_post(n, m, a, k, o), with_kwargs=True,
                    prepend=True)
                stack.callback(mha_pre.remove)
                stack.callback(mha_post.remove)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # fast paths skip the Python forward
        stack.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
        stack.enter_context(_InterceptMode(engine))
        yield engine.result
    _report_missing(engine)


def _report_missing(engine: _Engine) -> None:
    captured = {key.split("#")[0] for key in engine.result.maps}
    missed = [n for n in sorted(engine.ran) if n not in captured
              and not any(c.startswith(f"{n}.") or n.startswith(f"{c}.") for c in captured)]
    engine.result.missed = missed
    if not engine.result.maps:
        if not engine.selected:
            raise NothingCapturedError("no attention module recognised in the model and none "
                                       "captured", hint="name the modules with layers=[...]")
        if not engine.ran:
            raise NothingCapturedError("no attention module ran inside the capture block",
                                       hint="call the model inside 'with capture_attention(...)'")
        raise NothingCapturedError(
            f"{len(engine.ran)} attention module(s) ran (e.g. '{sorted(engine.ran)[0]}') but no "
            "attention map could be captured from them",
            hint="they use neither nn.MultiheadAttention, F.scaled_dot_product_attention nor a "
                 "softmax over the last dim; see docs/why-is-my-attention-none.md")
    if missed:
        warnings.warn(f"attnviz: no attention captured from {len(missed)} module(s): "
                      f"{', '.join(missed[:5])}", stacklevel=3)
