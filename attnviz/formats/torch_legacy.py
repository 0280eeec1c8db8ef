"""Legacy torch checkpoints (torch < 1.6): several pickles in a row, then raw storages.

Layout: magic number, protocol version, sys info, the object (storages as persistent ids),
the list of storage keys, then per key an int64 element count followed by the raw bytes.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import IO, Any

from attnviz.dtypes import DTYPE_SIZES
from attnviz.errors import CheckpointError, CorruptCheckpointError, LimitExceededError, with_path
from attnviz.formats.base import LoadedFile, StorageSpan
from attnviz.formats.pickle_scan import read_pickle
from attnviz.formats.placeholders import ForeignObject
from attnviz.formats.safe_pickle import StorageRef, restricted_load, storage_from_pid
from attnviz.limits import LIMITS
from attnviz.text_safety import safe_repr

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
HINT = "the file is damaged or not a torch checkpoint"


class BoundedReader(io.RawIOBase):
    """A file whose reads never ask for more than what is left in it.

    A pickle opcode declares its payload length (``BINUNICODE4``, ``BINBYTES8``): a damaged or
    hostile length must not make ``read(n)`` allocate n bytes before finding the file short.
    """

    def __init__(self, handle: IO[bytes], size: int) -> None:
        super().__init__()
        self._handle, self._size = handle, size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._handle.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def read(self, size: int | None = -1) -> bytes:
        left = max(0, self._size - self._handle.tell())
        return self._handle.read(left if size is None or size < 0 else min(size, left))

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        left = max(0, self._size - self._handle.tell())
        return self._handle.readline(left if size is None or size < 0 else min(size, left))


def _plain_pickle(handle: IO[bytes], path: Path, what: str, max_bytes: int = 1 << 20) -> Any:
    """Load one of the small header pickles, allowing no globals at all, within the same caps
    (operations, bytes, memo, nesting) as the main pickle."""

    class NoGlobals(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise CorruptCheckpointError(f"{what} names a global", path=path)

    try:
        return NoGlobals(io.BytesIO(read_pickle(handle, max_bytes))).load()
    except CheckpointError as exc:
        raise CorruptCheckpointError(f"cannot read the {what} ({exc.message})", path=path,
                                     hint=HINT) from exc
    except Exception as exc:
        raise CorruptCheckpointError(f"cannot read the {what} ({str(exc)[:200]})", path=path,
                                     hint=HINT) from exc


def load_legacy_pickles(handle: IO[bytes], path: Path) -> tuple[
        Any, list[type[ForeignObject]], dict[str, StorageRef], str]:
    """Magic, protocol, system info and the object: (root, foreign globals, storages, byteorder).

    Shared with nested payloads (``torch.storage._load_from_bytes``), read from memory.
    """
    magic = _plain_pickle(handle, path, "magic number")
    if magic != LEGACY_MAGIC:
        raise CorruptCheckpointError("a pickle, but without the torch magic number", path=path,
                                     hint="attnviz reads torch checkpoints, not any pickle")
    protocol = _plain_pickle(handle, path, "protocol version")
    if protocol != 1001:
        raise CorruptCheckpointError(f"unsupported legacy protocol {safe_repr(protocol, 20)}",
                                     path=path)
    sys_info = _plain_pickle(handle, path, "system info")
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        byteorder = "big"
    else:
        byteorder = "little"

    storages: dict[str, StorageRef] = {}

    def persistent_load(pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "module":
            return pid[1]  # (module, class, file, source): the class (a placeholder here)
        dtype, key, numel, location = storage_from_pid(pid)
        if key not in storages:
            storages[key] = StorageRef(key, dtype, numel, location)
        return storages[key]

    try:
        root, foreign = restricted_load(handle, persistent_load)
    except CheckpointError as exc:
        raise with_path(exc, path, HINT) from exc.__cause__
    return root, foreign, storages, byteorder


def read_torch_legacy(path: Path) -> LoadedFile:
    file_size = path.stat().st_size
    with path.open("rb") as raw_handle:
        handle: IO[bytes] = BoundedReader(raw_handle, file_size)  # type: ignore[assignment]
        root, foreign, storages, byteorder = load_legacy_pickles(handle, path)
        keys = _plain_pickle(handle, path, "storage key list", LIMITS.max_pickle_bytes)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CorruptCheckpointError("storage key list is not a list of strings", path=path)
        spans: dict[str, StorageSpan] = {}
        offset = handle.tell()
        for key in keys:
            handle.seek(offset)
            raw = handle.read(8)
            if len(raw) != 8:
                raise CorruptCheckpointError(f"storage '{key[:60]}' is cut off", path=path,
                                             hint=HINT)
            (count,) = struct.unpack("<q" if byteorder == "little" else ">q", raw)
            ref = storages.get(key)
            if ref is None:
                raise CorruptCheckpointError(f"storage '{key[:60]}' is listed but never used",
                                             path=path, hint=HINT)
            length = count * DTYPE_SIZES[ref.dtype]
            if count < 0:
                raise CorruptCheckpointError(f"storage '{key[:60]}' declares {count} elements",
                                             path=path, hint=HINT)
            if length > LIMITS.max_tensor_bytes:
                raise LimitExceededError(f"storage '{key[:60]}' declares {count} elements",
                                         path=path)
            if count < ref.numel or offset + 8 + length > file_size:
                raise CorruptCheckpointError(f"storage '{key[:60]}' is shorter than declared",
                                             path=path, hint=HINT)
            spans[key] = StorageSpan(path, offset + 8, length, byteorder)
            offset += 8 + length
        missing = set(storages) - set(spans)
        if missing:
            raise CorruptCheckpointError(f"storages {sorted(missing)[:3]} have no data",
                                         path=path, hint=HINT)
    return LoadedFile(path, "torch-legacy", root, spans, foreign)
