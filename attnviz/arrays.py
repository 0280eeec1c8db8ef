"""numpy views of checkpoint tensors, for paths that move bytes and must not import torch.

``split-qkv`` only reshapes, slices and concatenates, so it works on numpy views whatever the
dtype: bfloat16/float8 are carried as a structured dtype whose one field names the real dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from attnviz.dtypes import DTYPE_SIZES, NUMPY_NATIVE
from attnviz.errors import CorruptCheckpointError, LimitExceededError
from attnviz.formats.safe_pickle import check_view
from attnviz.limits import LIMITS

if TYPE_CHECKING:
    import torch

    from attnviz.checkpoint import TensorInfo


def numpy_dtype(name: str) -> np.dtype[Any]:
    if name in NUMPY_NATIVE:
        return np.dtype(NUMPY_NATIVE[name])
    return np.dtype([(name, f"<u{DTYPE_SIZES[name]}")])


def dtype_of(array: np.ndarray[Any, Any]) -> str:
    """The checkpoint dtype name of a numpy array made by ``numpy_dtype``."""
    if array.dtype.names:
        return str(array.dtype.names[0])
    for name, code in NUMPY_NATIVE.items():
        if np.dtype(code) == array.dtype:
            return name
    raise TypeError(f"unsupported numpy dtype {array.dtype}")


def placeholder(shape: tuple[int, ...], dtype: str) -> np.ndarray[Any, Any]:
    """A zero-stride array of ``shape``: costs no memory, reshapes and slices like the real one."""
    return np.broadcast_to(np.zeros((), dtype=numpy_dtype(dtype)), shape)


@dataclass
class ReadBudget:
    """What reads from one checkpoint may materialise in total.

    Views that repeat storage bytes (stride 0, overlapping strides) produce more than they read:
    at most ``max_view_expansion_bytes`` over all reads. Storages shared by many tensors are read
    once per tensor: at most ``max_read_factor`` times the checkpoint's files, plus that.
    """

    file_bytes: int
    read: int = 0
    expanded: int = 0

    def charge(self, name: str, path: Path, read: int, produced: int) -> None:
        expanded = self.expanded + max(0, produced - read)
        total = self.read + produced
        cap = LIMITS.max_view_expansion_bytes
        if expanded > cap:
            raise LimitExceededError(
                f"tensor '{name[:200]}' is a view that repeats its storage: its values would "
                f"take {produced} bytes from {read} stored, over the cap of {cap} bytes of "
                "repeated values per checkpoint", path=path,
                hint="raise ATTNVIZ_MAX_VIEW_EXPANSION_BYTES if the file is real")
        if total > LIMITS.max_read_factor * self.file_bytes + cap:
            raise LimitExceededError(
                f"reading tensor '{name[:200]}' would bring the values read to {total} bytes, "
                f"over {LIMITS.max_read_factor} times the checkpoint's {self.file_bytes}",
                path=path, hint="raise ATTNVIZ_MAX_READ_FACTOR if the file is real")
        self.expanded, self.read = expanded, total


def read_array(info: TensorInfo, budget: ReadBudget | None = None) -> np.ndarray[Any, Any]:
    """Read only the bytes this tensor's view spans; return a numpy view with its shape.

    The one path by which tensor bytes are read: the view (offset, shape, stride, dtype) is
    checked here, at the moment of reading, against the storage's real byte length, whatever
    happened to the records since the file was parsed.
    """
    ref, span = info.ref, info.span
    dtype_name = ref.storage.dtype
    numel, end = check_view(ref.shape, ref.stride, ref.offset, dtype_name)
    size = DTYPE_SIZES[dtype_name]
    if info.dtype != dtype_name or tuple(info.shape) != ref.shape:
        raise CorruptCheckpointError(f"tensor '{info.name[:200]}' changed its dtype or shape "
                                     "after it was read", path=span.path)
    if (not isinstance(span.length, int) or not isinstance(span.offset, int)
            or span.length < 0 or span.offset < 0):
        raise CorruptCheckpointError(f"tensor '{info.name[:200]}' has a bad storage span",
                                     path=span.path)
    start, stop = ref.offset * size, end * size  # bytes [start, stop) of the storage
    if numel and stop > span.length:
        raise CorruptCheckpointError(
            f"tensor '{info.name[:200]}' runs past its storage ({stop} bytes of {span.length})",
            path=span.path, hint="the file is damaged; download it again")
    if budget is not None:
        budget.charge(info.name, span.path, stop - start, numel * size)
    dtype = numpy_dtype(dtype_name)
    if numel == 0:
        try:
            return np.zeros(ref.shape, dtype=dtype)
        except ValueError as exc:  # (0, 2**62): numpy refuses the other dimensions
            raise CorruptCheckpointError(f"tensor '{info.name[:200]}' is empty but has a "
                                         f"dimension numpy cannot hold ({exc})",
                                         path=span.path) from exc
    length = stop - start
    buffer = np.empty(length, np.uint8)  # not zero-filled: every byte is read into
    with span.path.open("rb") as handle:
        handle.seek(span.offset + start)
        if handle.readinto(buffer.data) != length:
            raise CorruptCheckpointError(f"tensor '{info.name[:200]}' is cut off (file "
                                         "truncated)", path=span.path,
                                         hint="download the file again")
    flat = buffer.view(dtype)  # (span elements,)
    if span.byteorder == "big" and size > 1:
        flat = flat.view(f"u{size}").byteswap().view(dtype)
    view = np.lib.stride_tricks.as_strided(flat, ref.shape, [s * size for s in ref.stride])
    return view if length == numel * size and view.flags.c_contiguous else view.copy()


def to_torch(array: np.ndarray[Any, Any]) -> torch.Tensor:
    """A torch tensor sharing the array's bytes, with the real dtype (bfloat16 included)."""
    import torch

    name = dtype_of(array)
    data = array if array.flags.c_contiguous else array.copy()  # keeps 0-d arrays 0-d
    if data.dtype.names:
        data = data.view(f"<u{DTYPE_SIZES[name]}")
        raw = torch.from_numpy(data.copy() if not data.flags.writeable else data)
        return raw.view(getattr(torch, name))
    return torch.from_numpy(data.copy() if not data.flags.writeable else data)


def from_torch(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    name = str(tensor.dtype).removeprefix("torch.")
    data = tensor.detach().contiguous()
    if name in NUMPY_NATIVE:
        return data.numpy()
    raw = data.view(getattr(__import__("torch"), f"uint{8 * DTYPE_SIZES[name]}")).numpy()
    return raw.view(numpy_dtype(name))
