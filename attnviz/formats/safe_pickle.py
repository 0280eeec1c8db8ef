"""A restricted unpickler that builds tensor references and plain containers, nothing else.

Checkpoints are pickles, and a pickle is a program: ``GLOBAL`` fetches any callable and
``REDUCE`` calls it. Here ``find_class`` never hands out a real callable that could touch the
system. It returns either our own pure builders (tensor rebuild functions, which only record
storage, offset, shape and stride) or a freshly made ``ForeignObject`` subclass that records what
the file asked for and is never executed. So a hostile ``os.system`` reduce becomes an inert
record naming ``os.system`` and its arguments, which ``inspect`` reports.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import pickletools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from attnviz.dtypes import DTYPE_SIZES, TORCH_DTYPE_NAMES, TORCH_STORAGE_DTYPES
from attnviz.errors import CorruptCheckpointError, LimitExceededError
from attnviz.formats.placeholders import ForeignObject, NumpyScalar, foreign_class
from attnviz.limits import LIMITS


@dataclass(frozen=True)
class StorageRef:
    """A storage record named by a persistent id: where a tensor's bytes are."""

    key: str
    dtype: str
    numel: int
    location: str


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it: a strided view into a storage. No bytes read."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only its dtype matters."""

    dtype: str


@dataclass(frozen=True)
class DtypeMarker:
    """Stand-in for a pickled ``torch.float32``."""

    dtype: str


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise CorruptCheckpointError(f"tensor {what} is not a tuple of integers: {value!r:.80}")
    return tuple(value)


def make_tensor_ref(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    """Validate a rebuild call's arguments against its storage before anything trusts them."""
    if not isinstance(storage, StorageRef):
        raise CorruptCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if not isinstance(offset, int) or offset < 0:
        raise CorruptCheckpointError(f"tensor has a negative or non-integer offset {offset!r:.40}")
    shape = _int_tuple(size, "shape")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise CorruptCheckpointError(f"tensor shape {shape} and stride {strides} differ in rank")
    if any(s < 0 for s in shape) or any(s < 0 for s in strides):
        raise CorruptCheckpointError(f"tensor has a negative size or stride: {shape} / {strides}")
    numel = 1
    for size in shape:
        numel *= size
    if numel * DTYPE_SIZES[storage.dtype] > LIMITS.max_tensor_bytes:
        raise LimitExceededError(
            f"tensor view {shape} declares {numel * DTYPE_SIZES[storage.dtype]} bytes, over the "
            f"cap of {LIMITS.max_tensor_bytes}",
            hint="raise ATTNVIZ_MAX_TENSOR_BYTES if it is real")
    if all(s > 0 for s in shape):
        last = offset + sum((n - 1) * st for n, st in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise CorruptCheckpointError(
                f"tensor view {shape} at offset {offset} runs past its storage "
                f"'{storage.key}' of {storage.numel} elements"
            )
    return TensorRef(storage, offset, shape, strides)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
    return make_tensor_ref(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any,
    *_: Any,
) -> TensorRef:
    if isinstance(dtype, DtypeMarker) and isinstance(storage, StorageRef):
        size_bytes = storage.numel * DTYPE_SIZES[storage.dtype]
        storage = StorageRef(storage.key, dtype.dtype, size_bytes // DTYPE_SIZES[dtype.dtype],
                             storage.location)
    return make_tensor_ref(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data  # a Parameter is its data for our purposes


def _rebuild_from_type_v2(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    if func not in _TENSOR_BUILDERS or not isinstance(args, tuple):
        raise CorruptCheckpointError("tensor subclass rebuilt with an unexpected function")
    return func(*args)


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """protocol-2 pickles of bytes go through ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in {"latin1", "latin-1"}:
        raise CorruptCheckpointError("_codecs.encode used with unexpected arguments")
    return text.encode("latin1")


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _int_tuple(tuple(dims), "size")


SAFE_BUILDERS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): _torch_size,
}
SAFE_TYPES: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
}
_TENSOR_BUILDERS = (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)
NUMPY_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are tensor builders, plain containers or inert placeholders."""

    def __init__(
        self,
        file: IO[bytes],
        persistent_load: Callable[[Any], Any],
    ) -> None:
        super().__init__(file, encoding="utf-8")
        self._persistent = persistent_load
        self._foreign: dict[tuple[str, str], type[ForeignObject]] = {}

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent(pid)

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 files (torch.save's default) use Python 2 names: '__builtin__.set'
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in SAFE_BUILDERS:
            return SAFE_BUILDERS[key]
        if key in SAFE_TYPES:
            return SAFE_TYPES[key]
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return StorageType(TORCH_STORAGE_DTYPES[name])
        if key == ("torch.storage", "UntypedStorage"):
            return StorageType("uint8")
        if module == "torch" and name in TORCH_DTYPE_NAMES:
            return DtypeMarker(TORCH_DTYPE_NAMES[name])
        if key not in self._foreign:
            self._foreign[key] = NumpyScalar if key in NUMPY_SCALAR else foreign_class(module, name)
        return self._foreign[key]

    @property
    def foreign_globals(self) -> list[type[ForeignObject]]:
        return list(self._foreign.values())


def storage_from_pid(pid: Any) -> tuple[str, str, int, str]:
    """Check a ``('storage', type, key, location, numel[, view])`` persistent id."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        raise CorruptCheckpointError(f"unexpected persistent id {pid!r:.80}")
    storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
    if isinstance(storage_type, StorageType):
        dtype = storage_type.dtype
    else:
        raise CorruptCheckpointError(f"storage of unknown type {storage_type!r:.60}")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
        raise CorruptCheckpointError(f"storage record with bad key or size {pid!r:.80}")
    return dtype, key, numel, str(location)


def count_ops(stream: IO[bytes]) -> int:
    """Walk the opcodes up to STOP without building anything; refuse past the op cap.

    Every object the unpickler builds costs at least one opcode, so this bounds the work and
    memory of the real load; it also rejects unknown opcodes and truncated streams early.
    """
    count = 0
    try:
        for _ in pickletools.genops(stream):
            count += 1
            if count > LIMITS.max_pickle_ops:
                raise LimitExceededError(f"pickle has over {LIMITS.max_pickle_ops} operations",
                                         hint="raise ATTNVIZ_MAX_PICKLE_OPS if the file is real")
    except (ValueError, EOFError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise CorruptCheckpointError(f"pickle stream is damaged: {exc}") from exc
    return count


def restricted_load(
    data: bytes | IO[bytes], persistent_load: Callable[[Any], Any]
) -> tuple[Any, list[type[ForeignObject]]]:
    """Unpickle ``data`` safely; return the object and the foreign globals it named."""
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    start = stream.tell()
    count_ops(stream)
    stream.seek(start)
    unpickler = RestrictedUnpickler(stream, persistent_load)
    try:
        obj = unpickler.load()
    except (CorruptCheckpointError, LimitExceededError):
        raise
    except RecursionError as exc:
        raise CorruptCheckpointError("pickle nests too deeply") from exc
    except MemoryError as exc:
        raise CorruptCheckpointError("pickle asks for more memory than allowed") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise CorruptCheckpointError(f"pickle stream is damaged: {exc}") from exc
    return obj, unpickler.foreign_globals
