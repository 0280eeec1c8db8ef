"""What a pickle names besides tensors: one record per foreign global, for ``inspect``.

Nested pickles (``torch.storage._load_from_bytes(b)``, ``pickle.loads(b)``) are opened with the
same restricted reader and their globals listed too, located under the call that holds them.
Everything shown here is file text: it is kept as data and escaped where it is printed.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnviz.errors import CheckpointError
from attnviz.formats.placeholders import ForeignCall, ForeignObject, NestedPickle, NumpyScalar
from attnviz.formats.walk import walk
from attnviz.limits import LIMITS
from attnviz.text_safety import int_text, safe_repr, safe_str

MAX_CALLS = 20  # calls made on placeholders, listed
MAX_TEXT = 1000  # characters of one recorded string attribute
Plain = str | int | float | bool | None


@dataclass(frozen=True)
class ForeignObjectInfo:
    """A global the pickle named, shown to the user; never called."""

    qualified_name: str
    names_code: bool
    where: str
    detail: str
    attributes: dict[str, Plain] = field(default_factory=dict)


def _plain(value: Any) -> Plain:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -(1 << 63) <= value < 1 << 64 else int_text(value)  # JSON-safe
    if isinstance(value, str):
        return value[:MAX_TEXT]
    return value if isinstance(value, float | bool | type(None)) else None


def plain_attributes(node: ForeignObject) -> dict[str, Plain]:
    """Scalar attributes recorded for a placeholder (``args.nheads``), for display and JSON."""
    if not isinstance(node.state, Mapping):
        return {}
    return {safe_str(k, 200): _plain(v) for k, v in itertools.islice(node.state.items(), 500)
            if isinstance(v, str | int | float | bool | type(None))}


def _describe(node: ForeignObject) -> str:
    if isinstance(node, NumpyScalar) and node.value is not None:
        return f"value={safe_repr(node.value)}"
    if isinstance(node.state, Mapping):
        shown = itertools.islice(plain_attributes(node).items(), 8)
        return ", ".join(f"{k}={safe_repr(v)}" for k, v in shown)[:200]
    if node.args:
        return ("args=" + ", ".join(safe_repr(a) for a in node.args[:4]))[:200]
    return ""


class _Nested:
    """Which nested payloads to open for one file: each payload object once, at most
    ``LIMITS.max_nested_pickles`` in all, ``MAX_NESTING`` deep."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.opened = 0
        self.skipped = False

    def wants(self, node: NestedPickle) -> bool:
        data = node.args[0] if node.args else None
        if not isinstance(data, bytes | bytearray) or id(data) in self.seen:
            return False
        self.seen.add(id(data))
        return True

    def open(self, node: NestedPickle, where: str, depth: int) -> list[ForeignObjectInfo]:
        from attnviz.formats.nested import MAX_NESTING, read_nested

        name = f"{type(node).qualified_name()}(...)"
        if depth >= MAX_NESTING or self.opened >= LIMITS.max_nested_pickles:
            if self.skipped:
                return []
            self.skipped = True
            return [ForeignObjectInfo(name, True, where,
                                      "nested pickle not opened: too many or too deep")]
        self.opened += 1
        try:
            root, named = read_nested(node.payload or b"", Path(f"<nested pickle at {where}>"))
        except CheckpointError as exc:
            return [ForeignObjectInfo(name, True, where,
                                      f"nested pickle unreadable: {exc.message[:200]}")]
        return _list(root, named, f"{where}.<nested pickle>", depth + 1, self)


def _list(root: Any, globals_named: list[type[ForeignObject]], base: str, depth: int,
          nested: _Nested) -> list[ForeignObjectInfo]:
    first_seen: dict[type[ForeignObject], tuple[ForeignObject, str]] = {}
    calls: list[ForeignObjectInfo] = []
    inner: list[ForeignObjectInfo] = []
    for where, node in walk(root):
        if not isinstance(node, ForeignObject):
            continue
        if isinstance(node, ForeignCall):
            if len(calls) < MAX_CALLS:
                text = ".".join(p for p in (base, where.text()) if p) or "<root>"
                calls.append(ForeignObjectInfo(f"{type(node.callee).qualified_name()}(...)",
                                               node.calls_code, text, node.describe_call()))
            continue
        is_nested = isinstance(node, NestedPickle) and nested.wants(node)
        if type(node) in first_seen and not is_nested:
            continue  # the text of a path is built only when it is shown
        text = ".".join(p for p in (base, where.text()) if p) or "<root>"
        first_seen.setdefault(type(node), (node, text))
        if is_nested and isinstance(node, NestedPickle):
            inner += nested.open(node, text, depth)
    infos = []
    for cls in globals_named:
        if cls not in first_seen:
            infos.append(ForeignObjectInfo(cls.qualified_name(), cls.names_code,
                                           f"{base}.<referenced only>" if base else
                                           "<referenced only>", ""))
        else:
            node, text = first_seen[cls]
            infos.append(ForeignObjectInfo(cls.qualified_name(), cls.names_code, text,
                                           _describe(node), plain_attributes(node)))
    return infos + calls + inner


def foreign_objects(root: Any, globals_named: list[type[ForeignObject]]) -> list[ForeignObjectInfo]:
    """One entry per foreign global: where its first instance sits and what it recorded; then
    calls made on placeholders; then what nested pickles name."""
    if not globals_named:  # no global, so no placeholder anywhere: nothing to walk for
        return []
    return _list(root, globals_named, "", 0, _Nested())
