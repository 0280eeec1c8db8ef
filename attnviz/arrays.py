"""numpy views of checkpoint tensors, for paths that move bytes and must not import torch.

``split-qkv`` only reshapes, slices and concatenates, so it works on numpy views whatever the
dtype: bfloat16/float8 are carried as a structured dtype whose one field names the real dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from attnviz.dtypes import DTYPE_SIZES, NUMPY_NATIVE
from attnviz.errors import CorruptCheckpointError

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


def read_array(info: TensorInfo) -> np.ndarray[Any, Any]:
    """Read only the bytes this tensor's view spans; return a numpy view with its shape."""
    dtype = numpy_dtype(info.dtype)
    ref = info.ref
    if ref.numel == 0:
        return np.zeros(ref.shape, dtype=dtype)
    size = DTYPE_SIZES[info.dtype]
    span_elems = 1 + sum((n - 1) * st for n, st in zip(ref.shape, ref.stride, strict=True))
    length = span_elems * size
    if ref.offset * size + length > info.span.length:
        raise CorruptCheckpointError(f"tensor '{info.name}' runs past its storage",
                                     path=info.span.path)
    buffer = np.empty(length, np.uint8)  # not zero-filled: every byte is read into
    with info.span.path.open("rb") as handle:
        handle.seek(info.span.offset + ref.offset * size)
        if handle.readinto(buffer.data) != length:
            raise CorruptCheckpointError(f"tensor '{info.name}' is cut off (file truncated)",
                                         path=info.span.path, hint="download the file again")
    flat = buffer.view(dtype)  # (span_elems,)
    if info.span.byteorder == "big" and size > 1:
        flat = flat.view(f"u{size}").byteswap().view(dtype)
    view = np.lib.stride_tricks.as_strided(flat, ref.shape, [s * size for s in ref.stride])
    return view if span_elems == ref.numel and view.flags.c_contiguous else view.copy()


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
