"""Finding the state_dict inside whatever object a checkpoint holds.

Training checkpoints wrap weights (``{'model': sd, 'optimizer': ..., 'args': Namespace}``),
Lightning nests them under ``state_dict`` with ``model.`` prefixes, DDP adds ``module.``,
``torch.compile`` adds ``_orig_mod.``, and ``torch.save(model)`` pickles the module itself.
Everything here is linear in the size of the object graph, whatever its shape: the walk visits
each object once (attnviz.formats.walk), candidates are ranked by tensor counts computed once
per object, only the chosen mapping's names are built, and prefixes are stripped in one pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnviz.errors import ContainerKeyError, LimitExceededError, param
from attnviz.formats.foreign import ForeignObjectInfo, foreign_objects
from attnviz.formats.placeholders import ForeignObject
from attnviz.formats.safe_pickle import TensorRef
from attnviz.formats.walk import Where, key_text, walk
from attnviz.limits import LIMITS

__all__ = ["ForeignObjectInfo", "TensorMapping", "find_tensor_mapping", "strip_prefixes"]

# Wrapper keys that usually hold the weights, best first; EMA copies come last.
WRAPPER_KEYS = (
    "state_dict", "model_state_dict", "model", "module", "net", "network", "params", "weights",
    "model_ema", "ema", "state_dict_ema", "ema_state_dict", "ema_model",
)
STRIPPABLE_PREFIXES = ("module.", "_orig_mod.", "model.")
MAX_NESTED_DICT_DEPTH = 8  # nested state_dicts flattened with dots, this deep at most
MAX_ALTERNATIVES = 20


@dataclass
class TensorMapping:
    """The chosen mapping of tensors and how it was found."""

    tensors: dict[str, TensorRef]
    path: str | None
    alternatives: list[str] = field(default_factory=list)
    stripped_prefix: str | None = None
    foreign: list[ForeignObjectInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _is_module(node: Any) -> bool:
    return isinstance(node, ForeignObject) and isinstance(node.state, Mapping) and (
        "_parameters" in node.state and "_modules" in node.state)


class _Names:
    """Tensor names built so far, within the name-bytes and tensor-count caps."""

    def __init__(self) -> None:
        self.out: dict[str, TensorRef] = {}
        self.chars = 0

    def add(self, prefix: str, key: Any, ref: TensorRef) -> None:
        name = f"{prefix}{key_text(key)}"
        self.chars += len(name)
        if self.chars > LIMITS.max_name_bytes:
            raise LimitExceededError(f"tensor names total over {LIMITS.max_name_bytes} "
                                     "characters", hint="raise ATTNVIZ_MAX_NAME_BYTES")
        self.out[name] = ref
        if len(self.out) > LIMITS.max_tensors:
            raise LimitExceededError(f"over {LIMITS.max_tensors} tensors")


def _module_tensors(module: ForeignObject) -> dict[str, TensorRef]:
    """Rebuild a state_dict from a pickled ``nn.Module`` placeholder's recorded state.

    Iterative, each module visited once (a shared-submodule DAG costs its size, not its paths),
    and buffers in ``_non_persistent_buffers_set`` skipped as ``state_dict()`` skips them.
    """
    names = _Names()
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
                        names.add(prefix, name, value)
        children = state.get("_modules")
        if isinstance(children, Mapping) and depth < LIMITS.max_depth:
            for name, child in reversed(list(children.items())):
                if isinstance(child, ForeignObject):
                    stack.append((child, f"{prefix}{key_text(name)}.", depth + 1))
    return names.out  # depth-first, own tensors before children's: state_dict() order


def _direct_tensors(node: Any) -> dict[str, TensorRef]:
    """Tensors of a mapping, nested plain dicts flattened with dots; of a module, its state.

    Each nested dict is visited once, so a shared-reference DAG costs its size, not its paths.
    """
    if _is_module(node):
        return _module_tensors(node)
    names = _Names()
    if not isinstance(node, Mapping):
        return names.out
    seen: set[int] = {id(node)}
    stack: list[tuple[str, Mapping[Any, Any], int]] = [("", node, 0)]
    while stack:
        prefix, mapping, depth = stack.pop()
        for key, value in mapping.items():
            if isinstance(value, TensorRef):
                names.add(prefix, key, value)
            elif (isinstance(value, Mapping) and depth < MAX_NESTED_DICT_DEPTH
                  and id(value) not in seen):
                seen.add(id(value))
                stack.append((f"{prefix}{key_text(key)}.", value, depth + 1))
    return names.out


class _Counts:
    """Tensors under each mapping or module, each object counted once (memoised by id), so
    ranking every candidate costs the size of the graph, not candidates x subtree."""

    def __init__(self) -> None:
        self.memo: dict[int, int] = {}

    def of(self, node: Any, depth: int = 0) -> int:
        if id(node) in self.memo:
            return self.memo[id(node)]
        self.memo[id(node)] = 0  # a cycle adds nothing
        total = 0
        if _is_module(node):
            for slot in ("_parameters", "_buffers"):
                table = node.state.get(slot)
                if isinstance(table, Mapping):
                    total += sum(isinstance(v, TensorRef) for v in table.values())
            children = node.state.get("_modules")
            if isinstance(children, Mapping) and depth < LIMITS.max_depth:
                total += sum(self.of(c, depth + 1) for c in children.values()
                             if isinstance(c, ForeignObject))
        elif isinstance(node, Mapping):
            memo = self.memo
            for value in node.values():
                if isinstance(value, TensorRef):
                    total += 1
                elif isinstance(value, Mapping) and depth < MAX_NESTED_DICT_DEPTH:
                    known = memo.get(id(value))
                    total += known if known is not None else self.of(value, depth + 1)
        self.memo[id(node)] = total
        return total


def _is_tensor_tree(node: Any, memo: dict[int, bool], depth: int = 0) -> bool:
    """A mapping whose values are all tensors or (recursively) such mappings, with at least one
    tensor: a nested state_dict like ``{'encoder': {'w': ...}, 'decoder': {...}}``."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = False  # cycles are not trees
    result = isinstance(node, Mapping) and bool(node) and depth < MAX_NESTED_DICT_DEPTH and all(
        isinstance(v, TensorRef) or _is_tensor_tree(v, memo, depth + 1) for v in node.values())
    memo[id(node)] = result
    return result


@dataclass(frozen=True)
class _Candidate:
    where: Where
    node: Any
    count: int


def _candidates(root: Any) -> list[_Candidate]:
    """Every mapping with tensor values (or nested state_dict), and every pickled module."""
    found: list[_Candidate] = []
    trees: dict[int, bool] = {}
    counts = _Counts()
    for where, node in walk(root):
        if _is_module(node) or (isinstance(node, Mapping) and (any(
                isinstance(v, TensorRef) for v in node.values())
                or _is_tensor_tree(node, trees))):
            count = counts.of(node)
            if count:
                found.append(_Candidate(where, node, count))
    return found


def _choose(candidates: list[_Candidate]) -> _Candidate:
    """A wrapper key (``state_dict``, ``model``...) nearest the top wins; else the largest."""
    wrapped = [((c.where.depth, WRAPPER_KEYS.index(c.where.last)), c) for c in candidates
               if c.where.depth and c.where.last in WRAPPER_KEYS]
    if wrapped:
        return min(wrapped, key=lambda item: item[0])[1]
    return max(candidates, key=lambda c: (c.count, -(c.where.depth - 1) if c.where.depth else 1))


def _navigate(root: Any, key: str) -> Any:
    node = root
    for part in key.split("."):
        number = int(part) if part.lstrip("-").isdigit() and len(part) < 20 else None
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, Mapping) and number is not None and number in node:
            node = node[number]  # optimizer state is keyed by parameter index
        elif isinstance(node, ForeignObject) and node.attribute(part) is not None:
            node = node.attribute(part)
        elif isinstance(node, list | tuple) and number is not None and 0 <= number < len(node):
            node = node[number]
        else:
            return None
    return node


def strip_prefixes(tensors: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], str | None]:
    """Drop ``module.``/``_orig_mod.``/``model.`` while every key carries them.

    The prefixes shared by every key are found by moving one offset along the keys (no string
    is copied until the end), so a key of a million ``module.`` costs its length, not its square.
    """
    names = list(tensors)
    stripped: list[str] = []
    position = 0
    while names:
        prefix = next((p for p in STRIPPABLE_PREFIXES
                       if all(n.startswith(p, position) for n in names)), None)
        if prefix is None or any(len(n) == position + len(prefix) for n in names):
            break
        stripped.append(prefix)
        position += len(prefix)
    if not position:
        return tensors, None
    return {name[position:]: ref for name, ref in tensors.items()}, "".join(stripped)


def _alternatives(candidates: list[_Candidate], chosen: str | None) -> list[str]:
    """Other top-level or wrapper-named mappings the user could pick with --key."""
    if chosen is None:
        return []
    out: list[str] = []
    for candidate in candidates:
        where = candidate.where
        if where.depth == 0 or not (where.depth <= 2 or where.last in WRAPPER_KEYS):
            continue
        raw = where.text()
        if raw == chosen or raw.startswith(f"{chosen}.") or chosen.startswith(f"{raw}."):
            continue
        out.append(raw)
        if len(out) >= MAX_ALTERNATIVES:
            break
    return out


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
    notes: list[str] = []
    if key is not None:
        node = _navigate(root, key)
        tensors = _direct_tensors(node) if node is not None else {}
        if not tensors:
            paths = [c.where.text() or "<root>" for c in candidates[:11]]
            raise ContainerKeyError(f"{param('key')} '{key}' names no mapping of tensors",
                                    path=path,
                                    hint=f"mappings with tensors: {', '.join(paths[:10]) or 'none'}"
                                    + (", ..." if len(paths) > 10 else ""), param="key")
        chosen_path: str | None = key
    elif candidates:
        chosen = _choose(candidates)
        tensors = _direct_tensors(chosen.node)
        chosen_path = chosen.where.text() or None
        if _is_module(chosen.node):
            notes.append("the file pickles a whole nn.Module; its weights were read from the "
                         "recorded state, its code was not run")
    else:
        tensors, chosen_path = {}, None
    stripped = None
    if strip:
        tensors, stripped = strip_prefixes(tensors)
    alternatives = _alternatives(candidates, chosen_path)
    return TensorMapping(tensors, chosen_path, alternatives, stripped,
                         foreign_objects(root, globals_named or []), notes)
