"""A restricted unpickler that builds tensor references and plain containers, nothing else.

Checkpoints are pickles, and a pickle is a program: ``GLOBAL`` fetches any callable and
``REDUCE`` calls it. Here ``find_class`` never hands out a real callable that could touch the
system. It returns either our own pure builders (tensor rebuild functions, which only record
storage, offset, shape and stride) or a freshly made ``ForeignObject`` subclass that records what
the file asked for and is never executed. So a hostile ``os.system`` reduce becomes an inert
record naming ``os.system`` and its arguments, which ``inspect`` reports.

Before the load, ``scan_pickle`` dry-runs the opcodes (operation, byte, memo and nesting caps);
during it, ``find_class`` caps the number of distinct globals. The records built here refuse
BUILD (``__setstate__``), so a pickle cannot rewrite a view's offset, shape or stride after it
was checked; ``attnviz.arrays.read_array`` checks every view again when its bytes are read.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, NoReturn

from attnviz.dtypes import DTYPE_SIZES, TORCH_DTYPE_NAMES, TORCH_STORAGE_DTYPES
from attnviz.errors import CheckpointError, CorruptCheckpointError, LimitExceededError
from attnviz.formats.pickle_scan import read_pickle, scan_pickle
from attnviz.formats.placeholders import ForeignObject, NumpyScalar, foreign_class
from attnviz.limits import LIMITS, MAX_DIM, MAX_RANK
from attnviz.text_safety import int_text, safe_repr


class _Sealed:
    """Refuses pickle's BUILD: a record's fields are checked once, when it is made.

    (Not ``slots=True`` dataclasses: those get a generated ``__setstate__`` that sets fields
    from whatever the pickle gives, the very rewrite this refuses.)
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> NoReturn:
        raise CorruptCheckpointError(f"the pickle rewrites a {type(self).__name__} after it "
                                     "was built")


@dataclass(frozen=True)
class StorageRef(_Sealed):
    """A storage record named by a persistent id: where a tensor's bytes are."""

    key: str
    dtype: str
    numel: int
    location: str


@dataclass(frozen=True)
class TensorRef(_Sealed):
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
class StorageType(_Sealed):
    """Stand-in for ``torch.FloatStorage`` and friends: only its dtype matters."""

    dtype: str


@dataclass(frozen=True)
class DtypeMarker(_Sealed):
    """Stand-in for a pickled ``torch.float32``."""

    dtype: str


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or len(value) > MAX_RANK or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise CorruptCheckpointError(f"tensor {what} is not a tuple of at most {MAX_RANK} "
                                     f"integers: {safe_repr(value)}")
    return tuple(value)


def check_view(shape: Any, stride: Any, offset: Any, dtype: Any) -> tuple[int, int]:
    """Validate a strided view; return (elements, first element past the last one reached).

    Shared by the rebuild below and by ``read_array``, which runs it again on the record it is
    about to read, whatever happened to that record in between.
    """
    if dtype not in DTYPE_SIZES:
        raise CorruptCheckpointError(f"tensor has unknown dtype {safe_repr(dtype)}")
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_DIM:
        raise CorruptCheckpointError(f"tensor has a negative or non-integer offset "
                                     f"{safe_repr(offset, 40)}")
    sizes, strides = _int_tuple(shape, "shape"), _int_tuple(stride, "stride")
    if len(sizes) != len(strides):
        raise CorruptCheckpointError(f"tensor shape {safe_repr(sizes)} and stride "
                                     f"{safe_repr(strides)} differ in rank")
    if any(not 0 <= v <= MAX_DIM for v in (*sizes, *strides)):
        raise CorruptCheckpointError(f"tensor has a negative size or stride (or one over "
                                     f"2**63): {safe_repr(sizes)} / {safe_repr(strides)}")
    numel = 1
    for size in sizes:
        numel *= size
    nbytes = numel * DTYPE_SIZES[dtype]
    if nbytes > LIMITS.max_tensor_bytes:
        raise LimitExceededError(
            f"tensor view {safe_repr(sizes)} declares {int_text(nbytes)} bytes, over the cap "
            f"of {LIMITS.max_tensor_bytes}", hint="raise ATTNVIZ_MAX_TENSOR_BYTES if it is real")
    if numel == 0:
        return 0, offset
    return numel, offset + 1 + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True))


def make_tensor_ref(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    """Validate a rebuild call's arguments against its storage before anything trusts them."""
    if not isinstance(storage, StorageRef):
        raise CorruptCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    shape, strides = _int_tuple(size, "shape"), _int_tuple(stride, "stride")
    numel, end = check_view(shape, strides, offset, storage.dtype)
    if numel and end > storage.numel:
        raise CorruptCheckpointError(
            f"tensor view {shape} at offset {offset} runs past its storage "
            f"'{storage.key[:60]}' of {storage.numel} elements")
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
    if not isinstance(dims, tuple | list):
        raise CorruptCheckpointError(f"torch.Size built from {type(dims).__name__}")
    return _int_tuple(tuple(dims), "size")


def _bytearray(source: Any = b"", encoding: Any = None) -> bytearray:
    """``bytearray`` as pickle writes it: from bytes, or from latin-1 text (protocol 2).

    Never from a size: ``bytearray(3_000_000_000)`` is 3 GB of zeros from a 60-byte pickle.
    """
    if isinstance(source, bytes | bytearray) and encoding is None:
        return bytearray(source)
    if isinstance(source, str) and encoding in {"latin1", "latin-1"}:
        return bytearray(source.encode("latin1"))
    raise CorruptCheckpointError(f"bytearray built from {type(source).__name__}, not from "
                                 "bytes: pickle never writes that")


SAFE_BUILDERS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): _torch_size,
    ("builtins", "bytearray"): _bytearray,
}
# Real types, safe to call with whatever the pickle holds (they only store what they get).
SAFE_TYPES: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
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
        return self.placeholder(key, lambda: NumpyScalar if key in NUMPY_SCALAR
                                else foreign_class(module, name))

    def placeholder(self, key: tuple[str, str],
                    make: Callable[[], type[ForeignObject]]) -> type[ForeignObject]:
        """The placeholder class for global ``key``, made once by ``make``, within the cap."""
        if key not in self._foreign:
            if len(self._foreign) >= LIMITS.max_globals:  # each one is a class: about 1 KB
                raise LimitExceededError(f"pickle names over {LIMITS.max_globals} distinct "
                                         "globals", hint="raise ATTNVIZ_MAX_GLOBALS if it is real")
            self._foreign[key] = make()
        return self._foreign[key]

    @property
    def foreign_globals(self) -> list[type[ForeignObject]]:
        return list(self._foreign.values())


def storage_from_pid(pid: Any) -> tuple[str, str, int, str]:
    """Check a ``('storage', type, key, location, numel[, view])`` persistent id."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        raise CorruptCheckpointError(f"unexpected persistent id {safe_repr(pid)}")
    storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
    if isinstance(storage_type, StorageType):
        dtype = storage_type.dtype
    else:
        raise CorruptCheckpointError(f"storage of unknown type {safe_repr(storage_type, 60)}")
    if (not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool)
            or not 0 <= numel <= MAX_DIM):
        raise CorruptCheckpointError(f"storage record with bad key or size {safe_repr(pid)}")
    return dtype, key, numel, location if isinstance(location, str) else safe_repr(location)


def restricted_load(
    data: bytes | IO[bytes], persistent_load: Callable[[Any], Any],
    max_bytes: int | None = None, *,
    unpickler: type[RestrictedUnpickler] | None = None,
) -> tuple[Any, list[type[ForeignObject]]]:
    """Unpickle ``data`` (bytes, or a stream positioned at a pickle) safely; return the object
    and the foreign globals it named. A stream is left just after the pickle's STOP.
    ``unpickler``: a stricter subclass (TorchScript's data.pkl names fewer globals)."""
    cap = LIMITS.max_pickle_bytes if max_bytes is None else max_bytes
    if isinstance(data, bytes | bytearray):
        scan_pickle(data, cap)
        source = io.BytesIO(data)
    else:  # a file: read, checked as it is read, exactly the pickle's bytes
        source = io.BytesIO(read_pickle(data, cap))
    reader = (unpickler or RestrictedUnpickler)(source, persistent_load)
    try:
        obj = reader.load()
    except CheckpointError:  # the reader's own refusals, already explained
        raise
    except RecursionError as exc:
        raise CorruptCheckpointError("pickle nests too deeply") from exc
    except MemoryError as exc:
        raise CorruptCheckpointError("pickle asks for more memory than allowed") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise CorruptCheckpointError(f"pickle stream is damaged: {str(exc)[:200]}") from exc
    return obj, reader.foreign_globals
