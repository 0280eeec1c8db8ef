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

from attnviz.capture_math import bind_sdpa, mha_problem, mha_scores, sdpa_scores, to_bhls
from attnviz.errors import AttnvizError, UsageError, did_you_mean
from attnviz.layouts import find_attention_layers
from attnviz.reducers import MapReducer, feed_whole
from attnviz.tiling import AttentionProblem, attention_tiles, sdpa_problem, select_heads

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
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.maps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    def __repr__(self) -> str:  # the default prints every tensor
        from attnviz.notebook_tables import maps_repr

        return maps_repr(self)

    def _repr_html_(self) -> str:
        from attnviz.notebook_tables import maps_html

        return maps_html(self)

    def show(self, **kwargs: Any) -> None:
        """Draw the maps inline in a notebook as the report's head view
        (``attnviz.notebook.show``: ``tokens=``, ``target_tokens=``, ``static=``...)."""
        from attnviz.notebook import show

        show(self, **kwargs)


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
                 keep_scores: bool, reduce: MapReducer | None = None,
                 query_tile: int | None = None) -> None:
        self.model = model
        self.reduce = reduce
        self.query_tile = query_tile
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

    def _check_heads(self, name: str, count: int) -> None:
        if self.heads is not None and (max(self.heads) >= count or min(self.heads) < -count):
            raise UsageError(f"head index {max(self.heads)} out of range: layer '{name}' "
                             f"has {count} heads", param="heads")

    def _new_key(self, name: str, route: str, shape: tuple[int, ...]) -> str:
        key, count = name, 2
        while key in self.result.routes:  # the same module called again: name#2, name#3...
            key, count = f"{name}#{count}", count + 1
        self.result.routes[key] = route
        self.result.shapes[key] = shape
        return key

    def stream(self, name: str, problem: AttentionProblem, route: str) -> None:
        """Hand the reducer this call's probabilities tile by tile; keep nothing else."""
        assert self.reduce is not None
        self._check_heads(name, problem.shape[1])
        if self.heads is not None:
            problem = select_heads(problem, self.heads)
        key = self._new_key(name, route, problem.shape)
        self.reduce.begin(key, problem.shape)
        for tile in attention_tiles(problem, rows=self.reduce.rows_wanted(problem.shape[2]),
                                    query_tile=self.query_tile):
            self.reduce.add(key, tile)
        self.reduce.end(key)

    def stream_probs(self, name: str, probs: torch.Tensor, route: str) -> None:
        """Probabilities the model already built (B, H, L, S): handed over in row slabs."""
        assert self.reduce is not None
        self._check_heads(name, probs.shape[1])
        if self.heads is not None:
            probs = probs[:, self.heads]
        key = self._new_key(name, route, tuple(probs.shape))
        feed_whole(self.reduce, key, probs, self.query_tile)

    def store(self, name: str, probs: torch.Tensor, scores: torch.Tensor | None,
              route: str) -> None:
        module = self.model.get_submodule(name)
        hint = next((getattr(module, a) for a in HEAD_COUNT_ATTRS
                     if isinstance(getattr(module, a, None), int)), None)
        probs = to_bhls(probs.detach(), hint)
        if self.reduce is not None:
            self.stream_probs(name, probs, route)
            return
        self._check_heads(name, probs.shape[1])
        if self.heads is not None:
            probs = probs[:, self.heads]
        key = self._new_key(name, route, tuple(probs.shape))
        self.result.maps[key] = probs
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
        if self.reduce is not None:  # streamed: recomputed in tiles, the call is left alone
            return tuple(args), dict(kwargs)
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
        if self.reduce is not None:
            with torch.no_grad():
                self.stream(name, mha_problem(module, args, kwargs), "nn.MultiheadAttention")
            return output
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
        if self.reduce is not None:
            problem = sdpa_problem(call["query"].detach(), call["key"].detach(),
                                   call.get("attn_mask"), bool(call.get("is_causal", False)),
                                   call.get("scale"), bool(call.get("enable_gqa", False)))
            self.stream(name, problem, "F.scaled_dot_product_attention")
            return
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
                      heads: Sequence[int] | None = None, scores: bool = False,
                      reduce: MapReducer | None = None,
                      query_tile: int | None = None) -> Iterator[AttentionMaps]:
    """``with capture_attention(model) as maps: model(x)`` -> ``maps[layer]`` (B, H, Lq, Lk).

    ``layers``: names or globs of modules to capture (default: every attention module).
    ``heads``: head indices to keep. ``scores``: also keep pre-softmax scores (``maps.scores``).
    ``reduce``: stream instead of keeping maps: each call's probabilities go to this
    ``attnviz.reducers.MapReducer`` tile by tile (SDPA and ``nn.MultiheadAttention`` calls are
    recomputed in tiles of ``query_tile`` rows, so no (B, H, L, S) tensor is built) and
    ``maps`` stays empty; ``maps.routes`` and ``maps.shapes`` still name every call.
    Raises ``NothingCapturedError`` on exit if attention modules ran but nothing was captured.
    """
    if reduce is not None and scores:
        raise UsageError("scores are not kept by a streamed capture; capture without reduce",
                         param="scores")
    engine = _Engine(model, _select(model, layers), heads, scores, reduce, query_tile)
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
    captured = {key.split("#")[0] for key in engine.result.routes}
    missed = [n for n in sorted(engine.ran) if n not in captured
              and not any(c.startswith(f"{n}.") or n.startswith(f"{c}.") for c in captured)]
    engine.result.missed = missed
    if not engine.result.routes:
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
