"""Finding the state_dict inside whatever object a checkpoint holds.

Training checkpoints wrap weights (``{'model': sd, 'optimizer': ..., 'args': Namespace}``),
Lightning nests them under ``state_dict`` with ``model.`` prefixes, DDP adds ``module.``,
``torch.compile`` adds ``_orig_mod.``, and ``torch.save(model)`` pickles the module itself.
Walks here are iterative and bounded (node count, depth, cycles) so hostile object graphs
cost bounded work.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnviz.errors import ContainerKeyError, LimitExceededError
from attnviz.formats.placeholders import ForeignCall, ForeignObject, NumpyScalar
from attnviz.formats.safe_pickle import TensorRef
from attnviz.limits import LIMITS

# Wrapper keys that usually hold the weights, best first; EMA copies come last.
WRAPPER_KEYS = (
    "state_dict", "model_state_dict", "model", "module", "net", "network", "params", "weights",
    "model_ema", "ema", "state_dict_ema", "ema_state_dict", "ema_model",
)
STRIPPABLE_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass(frozen=True)
class ForeignObjectInfo:
    """A global the pickle named, shown to the user; never called."""

    qualified_name: str
    names_code: bool
    where: str
    detail: str
    attributes: dict[str, str | int | float | bool | None] = field(default_factory=dict)


@dataclass
class TensorMapping:
    """The chosen mapping of tensors and how it was found."""

    tensors: dict[str, TensorRef]
    path: str | None
    alternatives: list[str] = field(default_factory=list)
    stripped_prefix: str | None = None
    foreign: list[ForeignObjectInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _children(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield str(key), value
    elif isinstance(node, list | tuple | set | frozenset):
        for index, value in enumerate(node):
            yield str(index), value
    elif isinstance(node, ForeignObject):
        for index, value in enumerate(node.args):
            yield f"<arg{index}>", value
        state = node.state
        if isinstance(state, Mapping):
            yield from ((str(k), v) for k, v in state.items())
        elif state is not None:
            yield "<state>", state
        for index, value in enumerate(node.items):
            yield f"<item{index}>", value


def walk(root: Any) -> Iterator[tuple[str, Any]]:
    """Yield (dotted path, node) once per object, breadth first, within the walk caps."""
    seen: set[int] = set()
    frontier: list[tuple[str, Any, int]] = [("", root, 0)]
    count = 0
    while frontier:
        next_frontier: list[tuple[str, Any, int]] = []
        for path, node, depth in frontier:
            if id(node) in seen:
                continue
            seen.add(id(node))
            count += 1
            if count > LIMITS.max_walk_nodes:
                raise LimitExceededError(f"object graph has over {LIMITS.max_walk_nodes} nodes")
            yield path, node
            if depth >= LIMITS.max_depth:
                continue
            for key, child in _children(node):
                if isinstance(child, str | bytes | int | float | bool | type(None)):
                    continue
                next_frontier.append((f"{path}.{key}" if path else key, child, depth + 1))
        frontier = next_frontier


def _module_tensors(module: ForeignObject) -> dict[str, TensorRef]:
    """Rebuild a state_dict from a pickled ``nn.Module`` placeholder's recorded state.

    Iterative, each module visited once (a shared-submodule DAG costs its size, not its paths),
    and buffers in ``_non_persistent_buffers_set`` skipped as ``state_dict()`` skips them.
    """
    out: dict[str, TensorRef] = {}
    seen: set[int] = set()
    stack: list[tuple[ForeignObject, str, int]] = [(module, "", 0)]
    while stack:
        node, prefix, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        state = node.state if isinstance(node.state, Mapping) else {}
        skipped = state.get("_non_persistent_buffers_set")
        skipped = skipped if isinstance(skipped, set | frozenset) else set()
        for slot in ("_parameters", "_buffers"):
            table = state.get(slot)
            if isinstance(table, Mapping):
                for name, value in table.items():
                    transient = slot == "_buffers" and name in skipped
                    if isinstance(value, TensorRef) and not transient:
                        out[f"{prefix}{name}"] = value
        if len(out) > LIMITS.max_tensors:
            raise LimitExceededError(f"pickled module holds over {LIMITS.max_tensors} tensors")
        children = state.get("_modules")
        if isinstance(children, Mapping) and depth < LIMITS.max_depth:
            for name, child in reversed(list(children.items())):
                if isinstance(child, ForeignObject):
                    stack.append((child, f"{prefix}{name}.", depth + 1))
    return out  # depth-first, own tensors before children's: state_dict() order


def _is_module(node: Any) -> bool:
    return isinstance(node, ForeignObject) and isinstance(node.state, Mapping) and (
        "_parameters" in node.state and "_modules" in node.state)


def _direct_tensors(node: Any) -> dict[str, TensorRef]:
    """Tensors of a mapping, nested plain dicts flattened with dots; of a module, its state.

    Each nested dict is visited once, so a shared-reference DAG costs its size, not its paths.
    """
    if _is_module(node):
        return _module_tensors(node)
    out: dict[str, TensorRef] = {}
    if not isinstance(node, Mapping):
        return out
    seen: set[int] = {id(node)}
    stack: list[tuple[str, Mapping[Any, Any], int]] = [("", node, 0)]
    while stack:
        prefix, mapping, depth = stack.pop()
        for key, value in mapping.items():
            if isinstance(value, TensorRef):
                out[f"{prefix}{key}"] = value
            elif isinstance(value, Mapping) and depth < 8 and id(value) not in seen:
                seen.add(id(value))
                stack.append((f"{prefix}{key}.", value, depth + 1))
        if len(out) > LIMITS.max_tensors:
            raise LimitExceededError(f"over {LIMITS.max_tensors} tensors")
    return out


def _is_tensor_tree(node: Any, memo: dict[int, bool], depth: int = 0) -> bool:
    """A mapping whose values are all tensors or (recursively) such mappings, with at least one
    tensor: a nested state_dict like ``{'encoder': {'w': ...}, 'decoder': {...}}``."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = False  # cycles are not trees
    result = isinstance(node, Mapping) and bool(node) and depth < 8 and all(
        isinstance(v, TensorRef) or _is_tensor_tree(v, memo, depth + 1) for v in node.values())
    memo[id(node)] = result
    return result


def _candidates(root: Any) -> list[tuple[str, dict[str, TensorRef]]]:
    """Every mapping with tensor values (or nested state_dict), and every pickled module."""
    found: list[tuple[str, dict[str, TensorRef]]] = []
    memo: dict[int, bool] = {}
    for path, node in walk(root):
        if _is_module(node) or (isinstance(node, Mapping) and (any(
                isinstance(v, TensorRef) for v in node.values())
                or _is_tensor_tree(node, memo))):
            tensors = _direct_tensors(node)
            if tensors:
                found.append((path, tensors))
    return found


def _choose(candidates: list[tuple[str, dict[str, TensorRef]]]) -> tuple[str, dict[str, TensorRef]]:
    """A wrapper key (``state_dict``, ``model``...) nearest the top wins; else the largest."""
    def wrapper_rank(path: str) -> tuple[int, int] | None:
        last = path.rsplit(".", 1)[-1] if path else ""
        if last not in WRAPPER_KEYS:
            return None
        return (path.count("."), WRAPPER_KEYS.index(last))

    wrapped = [(rank, c) for c in candidates if (rank := wrapper_rank(c[0])) is not None]
    if wrapped:
        return min(wrapped, key=lambda item: item[0])[1]
    return max(candidates, key=lambda c: (len(c[1]), -c[0].count(".") if c[0] else 1))


def _navigate(root: Any, key: str) -> Any:
    node = root
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, Mapping) and part.lstrip("-").isdigit() and int(part) in node:
            node = node[int(part)]  # optimizer state is keyed by parameter index
        elif isinstance(node, ForeignObject) and node.attribute(part) is not None:
            node = node.attribute(part)
        elif isinstance(node, list | tuple) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def strip_prefixes(tensors: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], str | None]:
    """Drop ``module.``/``_orig_mod.``/``model.`` while every key carries them."""
    stripped = ""
    while tensors:
        prefix = next((p for p in STRIPPABLE_PREFIXES if all(k.startswith(p) for k in tensors)),
                      None)
        if prefix is None or any(k == prefix for k in tensors):
            break
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
        stripped += prefix
    return tensors, stripped or None


def foreign_objects(root: Any, globals_named: list[type[ForeignObject]]) -> list[ForeignObjectInfo]:
    """One entry per foreign global: where its first instance sits and what it recorded."""
    first_seen: dict[str, ForeignObject] = {}
    where: dict[str, str] = {}
    calls: list[ForeignObjectInfo] = []
    for path, node in walk(root):
        if isinstance(node, ForeignCall):
            if len(calls) < 20:
                calls.append(ForeignObjectInfo(f"{type(node.callee).qualified_name()}(...)",
                                               node.calls_code, path or "<root>",
                                               node.describe_call()))
        elif isinstance(node, ForeignObject):
            name = type(node).qualified_name()
            if name not in first_seen:
                first_seen[name], where[name] = node, path or "<root>"
    infos = []
    for cls in globals_named:
        name = cls.qualified_name()
        node = first_seen.get(name)
        if node is None:
            infos.append(ForeignObjectInfo(name, cls.names_code, "<referenced only>", ""))
        else:
            infos.append(ForeignObjectInfo(name, cls.names_code, where[name], _describe(node),
                                           _plain_attributes(node)))
    return infos + calls


def _plain_attributes(node: ForeignObject) -> dict[str, str | int | float | bool | None]:
    """Scalar attributes recorded for a placeholder (``args.nheads``), for display and JSON."""
    if not isinstance(node.state, Mapping):
        return {}
    return {str(k): v for k, v in list(node.state.items())[:500]
            if isinstance(v, str | int | float | bool | type(None))}


def _describe(node: ForeignObject) -> str:
    if isinstance(node, NumpyScalar) and node.value is not None:
        return f"value={node.value!r}"
    if isinstance(node.state, Mapping):
        plain = _plain_attributes(node)
        return ", ".join(f"{k}={v!r}" for k, v in list(plain.items())[:8])[:200]
    if node.args:
        return ("args=" + ", ".join(repr(a) if isinstance(a, str | int | float | bytes)
                                    else type(a).__name__ for a in node.args[:4]))[:200]
    return ""


def find_tensor_mapping(
    root: Any,
    key: str | None,
    path: Path,
    globals_named: list[type[ForeignObject]] | None = None,
    *,
    strip: bool = True,
) -> TensorMapping:
    """Choose the mapping of tensors (or ``key``), strip wrapper prefixes, list foreign objects."""
    candidates = _candidates(root)
    paths = [p or "<root>" for p, _ in candidates]
    notes: list[str] = []
    if key is not None:
        node = _navigate(root, key)
        tensors = _direct_tensors(node) if node is not None else {}
        if not tensors:
            raise ContainerKeyError(f"--key '{key}' names no mapping of tensors", path=path,
                                    hint=f"mappings with tensors: {', '.join(paths[:10]) or 'none'}"
                                    + (", ..." if len(paths) > 10 else ""))
        chosen: str | None = key
    elif candidates:
        chosen_path, tensors = _choose(candidates)
        chosen = chosen_path or None
        if _is_module(_navigate(root, chosen_path) if chosen_path else root):
            notes.append("the file pickles a whole nn.Module; its weights were read from the "
                         "recorded state, its code was not run")
    else:
        tensors, chosen = {}, None
    stripped = None
    if strip:
        tensors, stripped = strip_prefixes(tensors)
    inside = f"{chosen}." if chosen else ""
    alternatives = [
        p for p, (raw, _) in zip(paths, candidates, strict=True)
        if p != (chosen or "<root>") and chosen is not None and raw != ""
        and not raw.startswith(inside) and not (chosen or "").startswith(f"{raw}.")
        and (raw.count(".") <= 1 or raw.rsplit(".", 1)[-1] in WRAPPER_KEYS)
    ]
    return TensorMapping(tensors, chosen, alternatives, stripped,
                         foreign_objects(root, globals_named or []), notes)
