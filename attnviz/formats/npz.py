"""``.npz`` archives (split-qkv's npz output, read back by merge-qkv), parsed like torch zips:
each member's ``.npy`` header is read, its bytes located in the file, and nothing else.

``numpy.load`` would inflate a deflated member to whatever size its header claims (a deflate bomb
is a few KB) and refuse object arrays only by raising a ValueError; here members must be stored
(split-qkv writes them so), hold a plain numeric dtype, and contain exactly the bytes their
header declares. Values are then read through the one checked path, ``attnviz.arrays``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from attnviz.dtypes import DTYPE_SIZES
from attnviz.errors import CorruptCheckpointError, LimitExceededError, UnsupportedCheckpointError
from attnviz.formats.base import LoadedFile, StorageSpan
from attnviz.formats.safe_pickle import StorageRef, TensorRef, check_view
from attnviz.formats.torch_zip import data_offset, open_zip
from attnviz.limits import LIMITS

NPY_DTYPES = {"<f8": "float64", "<f4": "float32", "<f2": "float16", "<i8": "int64",
              "<i4": "int32", "<i2": "int16", "|i1": "int8", "<u8": "uint64", "<u4": "uint32",
              "<u2": "uint16", "|u1": "uint8", "|b1": "bool", "<c8": "complex64",
              "<c16": "complex128"}
HINT = "merge-qkv reads the .npz that split-qkv wrote; write it again with split-qkv"


def _header(handle: IO[bytes], name: str, path: Path) -> tuple[tuple[int, ...], bool, str]:
    """(shape, fortran_order, dtype name) of the .npy member at the handle's position."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version in {(2, 0), (3, 0)}:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"npy version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, KeyError, RecursionError,
            MemoryError) as exc:
        raise CorruptCheckpointError(f"npz member '{name[:200]}' has a bad .npy header "
                                     f"({str(exc)[:120]})", path=path, hint=HINT) from exc
    code = dtype.str if not dtype.hasobject and dtype.names is None else None
    if code not in NPY_DTYPES:
        raise UnsupportedCheckpointError(
            f"npz member '{name[:200]}' holds {'objects' if dtype.hasobject else dtype.str}, "
            "not plain numbers", path=path, hint=HINT)
    return tuple(shape), bool(fortran), NPY_DTYPES[str(code)]


def read_npz(path: Path) -> LoadedFile:
    file_size = path.stat().st_size
    root: dict[str, TensorRef] = {}
    spans: dict[str, StorageSpan] = {}
    with open_zip(path) as archive, path.open("rb") as handle:
        infos = archive.infolist()
        if len(infos) > LIMITS.max_tensors:
            raise LimitExceededError(f"{len(infos)} npz members, over the cap", path=path)
        for info in infos:
            name = info.filename
            if not name.endswith(".npy") or name[:-4] in root:
                raise CorruptCheckpointError(f"npz member '{name[:200]}' is not a new .npy "
                                             "array", path=path, hint=HINT)
            if info.compress_type != zipfile.ZIP_STORED:
                raise UnsupportedCheckpointError(
                    f"npz member '{name[:200]}' is compressed; split-qkv writes stored members",
                    path=path, hint=HINT)
            start = data_offset(handle, info, path, file_size)
            if start + info.file_size > file_size:
                raise CorruptCheckpointError(f"npz member '{name[:200]}' runs past the end of "
                                             "the file", path=path, hint=HINT)
            handle.seek(start)
            shape, fortran, dtype = _header(handle, name, path)
            strides = _strides(shape, fortran)
            numel, _ = check_view(shape, strides, 0, dtype)
            header = handle.tell() - start
            nbytes = numel * DTYPE_SIZES[dtype]
            if header + nbytes != info.file_size:
                raise CorruptCheckpointError(
                    f"npz member '{name[:200]}' holds {info.file_size - header} bytes, its "
                    f"header declares {nbytes}", path=path, hint=HINT)
            key = name[:-4]
            root[key] = TensorRef(StorageRef(key, dtype, numel, "cpu"), 0, shape, strides)
            spans[key] = StorageSpan(path, start + header, nbytes)
    return LoadedFile(path, "npz", root, spans)


def _strides(shape: tuple[int, ...], fortran: bool) -> tuple[int, ...]:
    """Element strides of a C-ordered (or Fortran-ordered) array of ``shape``."""
    order = list(range(len(shape)))
    strides = [0] * len(shape)
    step = 1
    for axis in (order if fortran else reversed(order)):
        strides[axis] = step
        step *= max(shape[axis], 1)
    return tuple(strides)
