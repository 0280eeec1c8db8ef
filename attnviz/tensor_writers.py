"""Writing arrays one at a time, so peak memory is one layer, not the whole output.

safetensors: the header is computed up front from the planned names, shapes and dtypes (known
from metadata alone), then each array's bytes are appended in plan order. npz: one stored
``.npy`` member per array. pt: ``torch.save`` needs the whole dict, so it holds the output in
memory (documented; safetensors is the default). Arrays are numpy (see ``attnviz.arrays``);
only the pt writer imports torch.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from attnviz.arrays import dtype_of, to_torch
from attnviz.dtypes import DTYPE_SIZES, SAFETENSORS_DTYPES
from attnviz.errors import AttnvizError, OutputError, UsageError, param

FORMATS = ("safetensors", "pt", "npz")
SAFETENSORS_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
NUMPY_LOSSLESS = {"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8",
                  "bool"}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * DTYPE_SIZES[self.dtype]


def format_for(path: Path, requested: str | None) -> str:
    """The output format: ``--format`` if given (and not contradicting the suffix), else suffix."""
    by_suffix = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt",
                 ".npz": "npz"}.get(path.suffix.lower())
    if requested is not None:
        if requested not in FORMATS:
            raise UsageError(f"{param('fmt')} {requested}: choose one of {', '.join(FORMATS)}",
                             param="fmt")
        if by_suffix is not None and by_suffix != requested:
            raise UsageError(f"{param('fmt')} {requested} contradicts the output name {path.name}",
                             hint=f"use a .{requested} file name or drop {param('fmt')}",
                             param="fmt")
        return requested
    return by_suffix or "safetensors"


class TensorWriter(Protocol):
    """``write`` each array, ``finish`` once all are written, ``close`` always (idempotent)."""

    def write(self, name: str, array: np.ndarray[Any, Any]) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


class SafetensorsStreamWriter:
    """Header first (from the plan), then tensor bytes in plan order."""

    def __init__(self, path: Path, plan: Sequence[PlannedTensor], metadata: dict[str, str]):
        self._plan = list(plan)
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for item in self._plan:
            if item.dtype not in SAFETENSORS_CODES:
                raise UsageError(f"dtype {item.dtype} cannot be stored in safetensors")
            header[item.name] = {"dtype": SAFETENSORS_CODES[item.dtype],
                                 "shape": list(item.shape),
                                 "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the reference implementation aligns data to 8 bytes
        self._header = raw
        self._handle: IO[bytes] = path.open("wb")
        self._handle.write(len(raw).to_bytes(8, "little"))
        self._handle.write(raw)

    def write(self, name: str, array: np.ndarray[Any, Any]) -> None:
        if self._next >= len(self._plan):
            raise AttnvizError(f"internal error: tensor '{name}' was not planned")
        item = self._plan[self._next]
        if (item.name, item.shape, item.dtype) != (name, tuple(array.shape), dtype_of(array)):
            raise AttnvizError(f"internal error: wrote '{name}' {tuple(array.shape)} where "
                               f"'{item.name}' {item.shape} was planned")
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # (nbytes,)
        self._handle.write(data.data)
        self._next += 1

    def patch_header(self, token: str, value: str) -> None:
        """Overwrite a same-length placeholder in the header (a digest known only later)."""
        old, new = token.encode(), value.encode()
        position = self._header.find(old)
        if len(old) != len(new) or position < 0:
            raise AttnvizError("internal error: header placeholder not found")
        self._header = self._header.replace(old, new, 1)
        here = self._handle.tell()
        self._handle.seek(8 + position)
        self._handle.write(new)
        self._handle.seek(here)

    def finish(self) -> None:
        if self._next != len(self._plan):
            raise AttnvizError(f"internal error: {len(self._plan) - self._next} planned tensors "
                               "were not written")
        self._handle.close()

    def close(self) -> None:
        self._handle.close()


class NpzWriter:
    """A stored (uncompressed) zip of ``.npy`` members, one tensor at a time."""

    def __init__(self, path: Path) -> None:
        self._zip = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.upcast: list[str] = []

    def write(self, name: str, array: np.ndarray[Any, Any]) -> None:
        if dtype_of(array) not in NUMPY_LOSSLESS:
            self.upcast.append(name)  # numpy has no bfloat16 / float8
            array = to_torch(array).float().numpy()
        array = np.ascontiguousarray(array)
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, array, allow_pickle=False)

    def finish(self) -> None:
        self._zip.close()

    def close(self) -> None:
        self._zip.close()


class PtWriter:
    """``torch.save`` of a flat dict: the whole output is held until ``close``."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._tensors: dict[str, Any] = {}

    def write(self, name: str, array: np.ndarray[Any, Any]) -> None:
        self._tensors[name] = to_torch(np.array(array))  # own copy: the source buffer is reused

    def finish(self) -> None:
        import torch

        # through a Python file, so a full disk is an OSError (ENOSPC) that atomic_output
        # reports as one line; torch's own writer reports it as a RuntimeError
        with self._path.open("wb") as handle:
            try:
                torch.save(self._tensors, handle)
            except RuntimeError as exc:
                raise OutputError(f"torch.save failed ({str(exc)[:200]})", path=self._path,
                                  hint="check free disk space and permissions") from exc

    def close(self) -> None:
        self._tensors = {}


def open_writer(fmt: str, path: Path, plan: Sequence[PlannedTensor],
                metadata: dict[str, str]) -> SafetensorsStreamWriter | NpzWriter | PtWriter:
    if fmt == "safetensors":
        return SafetensorsStreamWriter(path, plan, metadata)
    if fmt == "npz":
        return NpzWriter(path)
    return PtWriter(path)
