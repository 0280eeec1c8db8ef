"""A dry run of a pickle's opcodes that builds nothing, run before the real (restricted) load.

It follows the unpickler's stack with one small record per object, so it can refuse what would
cost the real load unbounded memory or crash it, before anything is allocated:

- more operations than ``max_pickle_ops``, or more bytes than the caller's cap (a declared
  payload length past the cap is refused before it is read);
- more memory in built objects than ``max_pickle_memory``, estimated per opcode (a 20 MB
  pickle of empty lists, dicts or placeholder calls would otherwise build gigabytes);
- a memo index beyond the entries stored so far (the C unpickler sizes its memo array by the
  largest index: one 616-byte pickle asking for index 2**28 costs 4 GB);
- containers nested deeper than ``max_pickle_nesting`` (hashing a tuple key, in C, recurses once
  per level: a deep enough tuple used as a dict key overflows the C stack);
- unknown opcodes, truncated streams, a missing MARK, stack underflow, a missing memo entry.

Opcodes are decoded here (not with ``pickletools.genops``, three times slower): only their
lengths and the memo indices are read; the real load checks every value again. The simulated
stack and memo hold one small integer per object (the depth of its nesting), in arrays.

Depths are exact for what C code recurses into when hashing (tuples and frozensets, built in
one step from their items). A list or dict filled after it was memoised keeps the depth it had
then in the memo: their nesting is only walked by attnviz's own iterative code.
"""

from __future__ import annotations

import pickletools
from array import array
from typing import IO

from attnviz.errors import CorruptCheckpointError, LimitExceededError
from attnviz.limits import LIMITS

# What each opcode does to the stack (opcodes not named here leave it alone).
_LEAF, _FROM_MARK, _POP_N, _EXTEND_FROM_MARK, _MODIFY, _OTHER = range(6)
_EFFECT: dict[str, tuple[int, int]] = {
    **{name: (_LEAF, 0) for name in (
        "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
        "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE",
        "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BYTEARRAY8", "FLOAT", "BINFLOAT",
        "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET",
        "GLOBAL", "EXT1", "EXT2", "EXT4", "PERSID", "NEXT_BUFFER")},
    **{name: (_FROM_MARK, 0) for name in ("LIST", "TUPLE", "DICT", "FROZENSET", "INST", "OBJ")},
    "TUPLE1": (_POP_N, 1), "TUPLE2": (_POP_N, 2), "TUPLE3": (_POP_N, 3),
    "STACK_GLOBAL": (_POP_N, 2), "REDUCE": (_POP_N, 2), "NEWOBJ": (_POP_N, 2),
    "NEWOBJ_EX": (_POP_N, 3), "BINPERSID": (_POP_N, 1), "READONLY_BUFFER": (_POP_N, 1),
    **{name: (_EXTEND_FROM_MARK, 0) for name in ("APPENDS", "SETITEMS", "ADDITEMS")},
    "APPEND": (_MODIFY, 1), "BUILD": (_MODIFY, 1), "SETITEM": (_MODIFY, 2),
}
# How each opcode's argument is laid out: a fixed size, a line (or two), or a length prefix.
_FIXED, _LINE, _TWO_LINES, _LEN1, _LEN4, _LEN4U, _LEN8U = range(7)
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET"}
# Bytes the real load spends per opcode, about (with the 16-byte header of tracked objects):
# (for the object, per item it takes); opcodes that carry data (strings, bytes, big integers)
# add their payload's length.
_COST: dict[str, tuple[int, int]] = {
    **{name: (32, 0) for name in ("INT", "BININT", "BININT2", "LONG", "LONG1", "LONG4")},
    **{name: (24, 0) for name in ("FLOAT", "BINFLOAT")},
    **{name: (56, 0) for name in (
        "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
        "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BYTEARRAY8", "PERSID")},
    "EMPTY_LIST": (72, 0), "EMPTY_DICT": (80, 0), "EMPTY_SET": (232, 0),
    "TUPLE1": (64, 8), "TUPLE2": (64, 8), "TUPLE3": (64, 8), "TUPLE": (64, 8),
    "LIST": (72, 8), "DICT": (200, 50), "FROZENSET": (232, 50),
    # a call builds a placeholder (or a record) and copies its arguments
    **{name: (180, 0) for name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BINPERSID")},
    # a dict's first item allocates its table
    "APPEND": (8, 0), "APPENDS": (0, 8), "SETITEM": (150, 0), "SETITEMS": (120, 50),
    "ADDITEMS": (0, 50), "BUILD": (120, 0),
}


def _layout(op: pickletools.OpcodeInfo) -> tuple[int, int]:
    n = op.arg.n if op.arg is not None else 0
    if n >= 0:
        return _FIXED, n
    if n == pickletools.UP_TO_NEWLINE:
        return (_TWO_LINES if op.name in {"GLOBAL", "INST"} else _LINE), 0
    return {pickletools.TAKEN_FROM_ARGUMENT1: (_LEN1, 1),
            pickletools.TAKEN_FROM_ARGUMENT4: (_LEN4, 4),
            pickletools.TAKEN_FROM_ARGUMENT4U: (_LEN4U, 4),
            pickletools.TAKEN_FROM_ARGUMENT8U: (_LEN8U, 8)}[n]


# by opcode byte: (name, argument layout, its size, stack effect, count, cost, cost per item)
_TABLE: list[tuple[str, int, int, int, int, int, int] | None] = [None] * 256
for _op in pickletools.opcodes:
    _TABLE[ord(_op.code)] = (_op.name, *_layout(_op), *_EFFECT.get(_op.name, (_OTHER, 0)),
                             *_COST.get(_op.name, (0, 0)))
_STOP = ord(".")


def _damaged(message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"pickle stream is damaged: {message}")


class _Incomplete(Exception):
    """The buffer ends inside an opcode: more bytes are needed (or the stream is cut off)."""


class _Scan:
    """The simulated unpickler: a depth per object on the stack, MARK positions, the memo."""

    def __init__(self, max_bytes: int) -> None:
        self.items = array("I")  # nesting depth of each object on the stack
        self.marks = array("Q")  # stack heights at each MARK
        self.memo = array("I")  # depth of each memo entry (indices are dense: see _memo)
        self.count = 0
        self.memory = 0  # estimated bytes of the objects the real load would build
        self.max_bytes = max_bytes
        self.resume = 0

    def _pop(self, n: int) -> tuple[int, int]:
        """Pop ``n`` objects (n < 0: down to the last MARK); (how many, the deepest depth)."""
        items, marks = self.items, self.marks
        if n < 0:
            if not marks:
                raise _damaged("could not find MARK")
            floor = marks.pop()
        else:
            floor = len(items) - n
            if floor < (marks[-1] if marks else 0):
                raise _damaged("unpickling stack underflow")
        taken = items[floor:]
        del items[floor:]
        return len(taken), max(taken, default=0)

    def _top(self) -> int:
        if len(self.items) <= (self.marks[-1] if self.marks else 0):
            raise _damaged("unpickling stack underflow")
        return self.items[-1]

    def _memo(self, name: str, arg: bytes) -> None:
        memo = self.memo
        if name == "MEMOIZE":
            index = len(memo)
        else:
            try:
                index = int(arg) if name in {"PUT", "GET"} else int.from_bytes(arg, "little")
            except ValueError as exc:
                raise _damaged(f"bad memo index {arg[:30]!r}") from exc
        if name in {"GET", "BINGET", "LONG_BINGET"}:
            if not 0 <= index < len(memo):
                raise _damaged(f"memo value not found at index {index}")
            self.items.append(memo[index])
        elif not 0 <= index <= len(memo):
            raise _damaged(f"memo index {index} skips past the {len(memo)} entries stored so far")
        elif index == len(memo):
            memo.append(self._top())
            self.memory += 8  # a slot of the unpickler's memo array
        else:
            memo[index] = self._top()

    def run(self, buf: bytes | bytearray, pos: int) -> int:
        """Scan from ``pos``; the position just after STOP. Raises _Incomplete with the start
        of an opcode the buffer cuts off (``self.resume``)."""
        size, table, items = len(buf), _TABLE, self.items
        ops_cap, cap = LIMITS.max_pickle_ops, LIMITS.max_pickle_nesting
        memory_cap = LIMITS.max_pickle_memory
        while True:
            if pos >= size:
                self.resume = pos
                raise _Incomplete
            code = buf[pos]
            entry = table[code]
            if entry is None:
                raise _damaged(f"unknown opcode {bytes([code])!r} at byte {pos}")
            name, layout, width, effect, n, cost, per_item = entry
            start = pos + 1
            if layout == _FIXED:
                end = start + width
            elif layout in (_LINE, _TWO_LINES):
                end = buf.find(b"\n", start) + 1
                if end and layout == _TWO_LINES:
                    end = buf.find(b"\n", end) + 1
                if not end:
                    self.resume = pos
                    raise _Incomplete
            else:
                if start + width > size:
                    self.resume = pos
                    raise _Incomplete
                length = int.from_bytes(buf[start:start + width], "little",
                                        signed=layout == _LEN4)
                if length < 0:
                    raise _damaged(f"{name} declares a negative length {length}")
                if start + width + length > self.max_bytes:  # before reading a byte of it
                    raise LimitExceededError(f"pickle is over {self.max_bytes} bytes",
                                             hint="raise ATTNVIZ_MAX_PICKLE_BYTES if the file "
                                                  "is real")
                end = start + width + length
            if end > size:
                self.resume = pos
                raise _Incomplete
            self.count += 1
            if self.count > ops_cap:
                raise LimitExceededError(f"pickle has over {ops_cap} operations",
                                         hint="raise ATTNVIZ_MAX_PICKLE_OPS if the file is real")
            if effect == _LEAF:
                items.append(0)
                if cost:
                    self.memory += cost + end - start
            elif effect != _OTHER:
                taken, deepest = self._pop(-1 if effect in (_FROM_MARK, _EXTEND_FROM_MARK)
                                           else n)
                self.memory += cost + per_item * taken
                if deepest >= cap:
                    raise LimitExceededError(f"pickle nests containers over {cap} deep",
                                             hint="raise ATTNVIZ_MAX_PICKLE_NESTING if the file "
                                                  "is real")
                if effect in (_FROM_MARK, _POP_N):
                    items.append(deepest + 1)
                else:  # the object below gains items: it now nests as deep as they do
                    items[-1] = max(self._top(), deepest + 1)
            elif name in _MEMO_OPS:
                self._memo(name, bytes(buf[start:end - (name in {"PUT", "GET"})]))
            elif name == "MARK":
                self.marks.append(len(items))
            elif name == "POP":
                if self.marks and len(items) == self.marks[-1]:
                    self.marks.pop()  # POP of a MARK, as the unpickler allows
                else:
                    self._pop(1)
            elif name == "POP_MARK":
                self._pop(-1)
            elif name == "DUP":
                items.append(self._top())
            if self.memory > memory_cap:
                raise LimitExceededError(
                    f"pickle would build about {self.memory >> 20} MB of objects, over the cap "
                    f"of {memory_cap >> 20} MB", hint="raise ATTNVIZ_MAX_PICKLE_MEMORY if the "
                    "file is real")
            if code == _STOP:
                return end
            pos = end


def scan_pickle(data: bytes | bytearray, max_bytes: int) -> int:
    """Dry-run the pickle at the start of ``data``; the number of bytes up to its STOP."""
    scan = _Scan(max_bytes)
    try:
        end = scan.run(data, 0)
    except _Incomplete:
        raise _damaged("pickle exhausted before seeing STOP") from None
    if end > max_bytes:
        raise LimitExceededError(f"pickle is over {max_bytes} bytes",
                                 hint="raise ATTNVIZ_MAX_PICKLE_BYTES if the file is real")
    return end


def read_pickle(stream: IO[bytes], max_bytes: int) -> bytes:
    """Read one pickle from ``stream`` (checked as it is read, never more than ``max_bytes``),
    leave the stream just after its STOP and return exactly its bytes."""
    start = stream.tell()
    buf = bytearray()
    scan = _Scan(max_bytes)
    position, chunk = 0, 1 << 16
    while True:
        more = stream.read(min(chunk, max_bytes + 1 - len(buf)))
        buf += more
        try:
            end = scan.run(buf, position)
            break
        except _Incomplete:
            position = scan.resume
            if len(buf) > max_bytes:
                raise LimitExceededError(f"pickle is over {max_bytes} bytes",
                                         hint="raise ATTNVIZ_MAX_PICKLE_BYTES if the file is "
                                              "real") from None
            if not more:
                raise _damaged("pickle exhausted before seeing STOP") from None
            chunk *= 2
    stream.seek(start + end)
    return bytes(buf[:end])


__all__ = ["read_pickle", "scan_pickle"]
