"""Walking an unpickled object graph: iterative, bounded, each object once.

Hostile graphs are cyclic, share references (a "billion laughs" DAG has 10**30 paths and a few
dozen objects) and carry megabyte-long keys. So the walk visits each object once (by id),
stops at ``LIMITS.max_depth`` and ``LIMITS.max_walk_nodes``, and never builds a dotted path
string until one is asked for (``Where.text``), which is then capped in length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from attnviz.errors import LimitExceededError
from attnviz.formats.placeholders import ForeignObject
from attnviz.limits import LIMITS
from attnviz.text_safety import safe_str

MAX_PATH_CHARS = 400  # a shown path; legitimate ones are far shorter
_WALKED = (dict, list, tuple, set, frozenset, ForeignObject)  # what can hold what is looked for


class Where:
    """Where an object sits: its parent's ``Where`` and its key, joined only on demand."""

    __slots__ = ("depth", "key", "parent")
    depth: int

    def __init__(self, parent: Where | None, key: Any) -> None:
        self.parent, self.key = parent, key
        self.depth = 0 if parent is None else parent.depth + 1

    @property
    def last(self) -> str:
        return key_text(self.key) if self.parent is not None else ""

    def text(self, limit: int = MAX_PATH_CHARS) -> str:
        """The dotted path ('' for the root), elided in the middle past ``limit`` characters."""
        parts: list[str] = []
        node: Where | None = self
        while node is not None and node.parent is not None:
            parts.append(key_text(node.key, limit))
            node = node.parent
        text = ".".join(reversed(parts))
        return text if len(text) <= limit else f"{text[:limit // 2]}…{text[-limit // 2:]}"


def key_text(key: Any, limit: int | None = None) -> str:
    """A key as a path segment, never raising (5000-digit integers, tuples nested deep)."""
    return safe_str(key, limit)


def children(node: Any) -> Iterable[tuple[Any, Any]]:
    """(key, child) pairs of a container or placeholder; keys are shown with ``key_text``."""
    if isinstance(node, dict):
        return node.items()
    if isinstance(node, list | tuple | set | frozenset):
        return enumerate(node)
    if isinstance(node, ForeignObject):
        return _placeholder_children(node)
    return ()


def _placeholder_children(node: ForeignObject) -> Iterator[tuple[Any, Any]]:
    for index, value in enumerate(node.args):
        yield f"<arg{index}>", value
    state = node.state
    if isinstance(state, dict):
        yield from state.items()
    elif state is not None:
        yield "<state>", state
    for index, value in enumerate(node.items):
        yield f"<item{index}>", value


def walk(root: Any) -> Iterator[tuple[Where, Any]]:
    """Yield (where, node) once per container or placeholder, breadth first, within the caps.

    Leaves (tensors, strings, numbers) are not yielded: nothing looks for them. An object is
    marked seen when it is first queued, so a DAG costs one queue entry per object, not one per
    reference."""
    seen: set[int] = {id(root)}
    frontier: list[tuple[Where, Any]] = [(Where(None, ""), root)]
    cap, max_depth = LIMITS.max_walk_nodes, LIMITS.max_depth
    while frontier:
        next_frontier: list[tuple[Where, Any]] = []
        for where, node in frontier:
            yield where, node
            if where.depth >= max_depth:
                continue
            for key, child in children(node):
                if isinstance(child, _WALKED) and id(child) not in seen:
                    seen.add(id(child))  # counted when queued: a list of 10M lists stops here
                    if len(seen) > cap:
                        raise LimitExceededError(f"object graph has over {cap} containers",
                                                 hint="raise ATTNVIZ_MAX_WALK_NODES if it is "
                                                      "real")
                    next_frontier.append((Where(where, key), child))
        frontier = next_frontier
