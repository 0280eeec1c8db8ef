"""torch zip checkpoints (torch >= 1.6): ``<prefix>/data.pkl`` plus stored storage records.

Only ``data.pkl`` is read and unpickled (restricted); storage records are located from their
local zip headers so values can later be read by offset, one tensor at a time.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

from attnviz.dtypes import DTYPE_SIZES
from attnviz.errors import (
    CheckpointError,
    CorruptCheckpointError,
    LimitExceededError,
    UnsupportedCheckpointError,
    with_path,
)
from attnviz.formats.base import LoadedFile, StorageSpan
from attnviz.formats.placeholders import ForeignObject
from attnviz.formats.safe_pickle import (
    RestrictedUnpickler,
    StorageRef,
    restricted_load,
    storage_from_pid,
)
from attnviz.limits import LIMITS

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes
HINT = "the file is damaged or truncated; download or save it again"


def open_zip(path: Path, source: IO[bytes] | None = None) -> zipfile.ZipFile:
    """The zip at ``path`` (or in ``source``, named ``path`` in messages)."""
    try:
        return zipfile.ZipFile(path if source is None else source)
    except zipfile.BadZipFile as exc:
        raise CorruptCheckpointError(f"broken zip container ({exc})", path=path, hint=HINT) from exc
    except (zipfile.LargeZipFile, ValueError, OSError, struct.error, NotImplementedError,
            EOFError, OverflowError, KeyError, IndexError) as exc:
        raise CorruptCheckpointError(f"unreadable zip container ({exc})", path=path,
                                     hint=HINT) from exc


def is_torchscript(names: list[str]) -> bool:
    """A TorchScript archive (``torch.jit.save``): it holds code beside its data.pkl."""
    return any(n.endswith(("/constants.pkl", "/model.json")) or "/code/" in n for n in names)


def _find_pickle(path: Path, names: list[str], torchscript: bool = False) -> str:
    if not torchscript and is_torchscript(names):  # nested payloads: never read as weights
        raise UnsupportedCheckpointError(
            "this is a TorchScript archive, which holds code; attnviz reads only weights",
            path=path, hint="save a state_dict with torch.save(model.state_dict(), 'model.pth')")
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    if not pickles:
        raise CorruptCheckpointError("zip holds no data.pkl, so it is not a torch checkpoint",
                                     path=path, hint=HINT)
    if len(pickles) > 1:
        raise CorruptCheckpointError(f"zip holds {len(pickles)} data.pkl records: {pickles[:3]}",
                                     path=path, hint=HINT)
    return pickles[0]


def data_offset(handle: IO[bytes], info: zipfile.ZipInfo, path: Path, file_size: int) -> int:
    if not 0 <= info.header_offset <= file_size - _LOCAL_HEADER.size:
        raise CorruptCheckpointError(f"record '{info.filename[:80]}' has a header offset "
                                     f"outside the file", path=path, hint=HINT)
    handle.seek(info.header_offset)
    raw = handle.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise CorruptCheckpointError(f"record '{info.filename[:80]}' is cut off", path=path,
                                     hint=HINT)
    fields = _LOCAL_HEADER.unpack(raw)
    if fields[0] != b"PK\x03\x04":
        raise CorruptCheckpointError(f"record '{info.filename[:80]}' has a bad local header",
                                     path=path, hint=HINT)
    return int(info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10])


def _read_small(archive: zipfile.ZipFile, name: str, path: Path, limit: int) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise LimitExceededError(f"record '{name}' declares {info.file_size} bytes, over the cap "
                                 f"of {limit}", path=path, hint="raise ATTNVIZ_MAX_PICKLE_BYTES")
    try:
        with archive.open(info) as stream:
            data = stream.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError,
            ValueError, struct.error, zlib.error) as exc:  # ValueError: bad names (Unicode)
        raise CorruptCheckpointError(f"record '{name}' cannot be read ({exc})", path=path,
                                     hint=HINT) from exc
    if len(data) > limit:
        raise LimitExceededError(f"record '{name}' inflates past {limit} bytes", path=path)
    return data


def load_zip_pickle(archive: zipfile.ZipFile, path: Path, file_size: int, *,
                    unpickler: type[RestrictedUnpickler] | None = None) -> tuple[
        Any, list[type[ForeignObject]], dict[str, StorageRef], str, str]:
    """Unpickle ``data.pkl``: (root, foreign globals, storages by key, byteorder, prefix).

    Each storage must be a stored record inside the file, holding what its pickle declares.
    Shared with nested payloads (``torch.storage._load_from_bytes``), read from memory, and
    with TorchScript archives (``unpickler``: the stricter reader their data.pkl gets).
    """
    names = archive.namelist()
    pkl_name = _find_pickle(path, names, torchscript=unpickler is not None)
    prefix = pkl_name[: -len("data.pkl")]
    if f"{prefix}version" in names:
        version = _read_small(archive, f"{prefix}version", path, 64).strip()
        if not version.isdigit():
            raise CorruptCheckpointError(f"bad version record {version[:20]!r}", path=path,
                                         hint=HINT)
    byteorder = "little"
    if f"{prefix}byteorder" in names:
        byteorder = _read_small(archive, f"{prefix}byteorder", path, 16).decode(
            "ascii", "replace").strip()
        if byteorder not in {"little", "big"}:
            raise CorruptCheckpointError(f"bad byteorder record {byteorder!r:.20}", path=path)
    pickle_bytes = _read_small(archive, pkl_name, path, LIMITS.max_pickle_bytes)
    infos = {info.filename: info for info in archive.infolist()}
    storages: dict[str, StorageRef] = {}

    def persistent_load(pid: Any) -> StorageRef:
        dtype, key, numel, location = storage_from_pid(pid)
        if key in storages:
            return storages[key]
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise CorruptCheckpointError(f"storage record 'data/{key[:60]}' is missing",
                                         path=path, hint=HINT)
        need = numel * DTYPE_SIZES[dtype]
        if info.file_size < need:
            raise CorruptCheckpointError(
                f"storage record 'data/{key[:60]}' holds {info.file_size} bytes, its tensors "
                f"need {need}", path=path, hint=HINT)
        if info.compress_type != zipfile.ZIP_STORED:
            raise UnsupportedCheckpointError(
                f"storage record 'data/{key[:60]}' is compressed; torch writes them stored",
                path=path, hint="re-save the file with torch.save")
        if not 0 <= info.header_offset <= info.header_offset + info.file_size <= file_size:
            raise CorruptCheckpointError(f"storage record 'data/{key[:60]}' runs past the end "
                                         f"of the file", path=path, hint=HINT)
        storages[key] = StorageRef(key, dtype, numel, location)
        return storages[key]

    try:
        root, foreign = restricted_load(pickle_bytes, persistent_load, unpickler=unpickler)
    except CheckpointError as exc:
        raise with_path(exc, path, HINT) from exc.__cause__
    return root, foreign, storages, byteorder, prefix


def storage_spans(path: Path, archive: zipfile.ZipFile, storages: dict[str, StorageRef],
                  prefix: str, byteorder: str, file_size: int) -> dict[str, StorageSpan]:
    """Where each storage record's bytes lie in the file, from its local zip header."""
    infos = {info.filename: info for info in archive.infolist()}
    spans: dict[str, StorageSpan] = {}
    with path.open("rb") as handle:
        for key in storages:
            info = infos[f"{prefix}data/{key}"]
            start = data_offset(handle, info, path, file_size)
            # the record's real length: every view is checked against it when it is read
            length = info.file_size
            if start + length > file_size:
                raise CorruptCheckpointError(f"storage record 'data/{key[:60]}' runs past the "
                                             f"end of the file", path=path, hint=HINT)
            spans[key] = StorageSpan(path, start, length, byteorder)
    return spans


def read_torch_zip(path: Path) -> LoadedFile:
    """A torch zip checkpoint; a TorchScript archive is handed to its own, stricter reader
    (the central directory tells them apart, the first bytes cannot)."""
    file_size = path.stat().st_size
    with open_zip(path) as archive:
        if is_torchscript(archive.namelist()):
            from attnviz.formats.torchscript import read_script_archive

            return read_script_archive(path, archive, file_size)
        root, foreign, storages, byteorder, prefix = load_zip_pickle(archive, path, file_size)
        spans = storage_spans(path, archive, storages, prefix, byteorder, file_size)
    return LoadedFile(path, "torch-zip", root, spans, foreign)
