"""Writing data.pkl streams the way torch.save does, with storages and views we choose."""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any

import torch


class StorageStub:
    """Pickled as torch's persistent id ``('storage', FloatStorage, key, 'cpu', numel)``."""

    def __init__(self, key: str = "0", numel: int = 12) -> None:
        self.key, self.numel = key, numel


class PidStub:
    """Pickled as an arbitrary persistent id."""

    def __init__(self, pid: Any) -> None:
        self.pid = pid


class TensorStub:
    """Pickled exactly as torch pickles a tensor: ``_rebuild_tensor_v2(storage, ...)``; with
    ``state``, followed by a BUILD of that state (as a pickle may, after the rebuild)."""

    def __init__(self, storage: Any, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...], state: Any = None) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        if self.state is not None:
            return (torch._utils._rebuild_tensor_v2, self.args, self.state)
        return (torch._utils._rebuild_tensor_v2, self.args)


class TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageStub):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        if isinstance(obj, PidStub):
            return obj.pid
        return None


def dumps(obj: Any, *, fix_imports: bool = True) -> bytes:
    """Protocol 2 like torch.save; fix_imports=True writes Python 2 names (``__builtin__``)."""
    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=2, fix_imports=fix_imports).dump(obj)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# hand-written opcodes, for pickles no pickler would write

def op_global(module: str, name: str) -> bytes:
    """GLOBAL: push ``module.name`` (protocol 0 text form, names without newlines)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_stack_global(module: str, name: str) -> bytes:
    """STACK_GLOBAL: names from the stack, so they may hold any character."""
    return op_str(module) + op_str(name) + b"\x93"


def op_str(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + len(raw).to_bytes(4, "little") + raw


def op_int(value: int) -> bytes:
    """BININT for 32-bit values, LONG4 (two's complement, little-endian) for anything else."""
    if -(2**31) <= value < 2**31:
        return b"J" + value.to_bytes(4, "little", signed=True)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + len(raw).to_bytes(4, "little") + raw


def op_call(callable_ops: bytes, *args: bytes) -> bytes:
    """``callable(*args)``: MARK, the arguments, TUPLE, REDUCE."""
    return callable_ops + b"(" + b"".join(args) + b"tR"


def with_entry(pickled_dict: bytes, key: str, value_ops: bytes) -> bytes:
    """A protocol-2 pickle of a dict (as ``dumps`` writes it) with one more entry, whose value
    is raw opcodes (which must not write to the memo)."""
    assert pickled_dict[:2] == b"\x80\x02" and pickled_dict[-1:] == b"."
    return pickled_dict[:-1] + op_str(key) + value_ops + b"s."
