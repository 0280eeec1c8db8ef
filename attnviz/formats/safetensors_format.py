"""safetensors header parsing in pure Python, with the reference implementation's checks."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from attnviz.dtypes import DTYPE_SIZES, SAFETENSORS_DTYPES
from attnviz.errors import CorruptCheckpointError, LimitExceededError
from attnviz.formats.base import LoadedFile, StorageSpan
from attnviz.formats.json_text import JsonTextError, parse_json
from attnviz.formats.safe_pickle import StorageRef, TensorRef
from attnviz.limits import LIMITS, MAX_DIM, MAX_RANK
from attnviz.text_safety import int_text, safe_repr

HINT = "the file is damaged or not safetensors; download it again"


def _fail(path: Path, message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"corrupt safetensors header: {message}", path=path, hint=HINT)


def _shape(path: Path, name: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_RANK or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in raw
    ):
        raise _fail(path, f"tensor '{name[:200]}' has shape {safe_repr(raw, 60)}, not a list "
                    f"of at most {MAX_RANK} sizes")
    return tuple(raw)


def _strict_pairs(path: Path) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise _fail(path, f"duplicate tensor name '{key[:200]}'")
            result[key] = value
        return result

    return hook


def read_safetensors(path: Path) -> LoadedFile:
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _fail(path, f"file is {file_size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > LIMITS.max_header_bytes:
            raise LimitExceededError(
                f"safetensors header declares {header_len} bytes, over the cap of "
                f"{LIMITS.max_header_bytes}", path=path, hint=HINT)
        if 8 + header_len > file_size:
            raise _fail(path, f"header of {header_len} bytes runs past the end of the file")
        raw = handle.read(header_len)
    try:
        header = parse_json(raw.decode("utf-8"), object_pairs_hook=_strict_pairs(path))
    except UnicodeDecodeError as exc:
        raise _fail(path, "header is not UTF-8") from exc
    except JsonTextError as exc:
        raise _fail(path, f"header {exc}") from exc
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    if len(header) > LIMITS.max_tensors:
        raise LimitExceededError(f"{len(header)} tensors, over the cap of {LIMITS.max_tensors}",
                                 path=path)

    data_start = 8 + header_len
    data_size = file_size - data_start
    root: dict[str, TensorRef] = {}
    spans: dict[str, StorageSpan] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        shown = name[:200]
        if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"entry '{shown}' is not {{dtype, shape, data_offsets}}")
        code = entry.get("dtype")
        dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise _fail(path, f"tensor '{shown}' has unknown dtype {safe_repr(code, 20)}")
        shape = _shape(path, name, entry.get("shape"))
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _fail(path, f"tensor '{shown}' has bad data_offsets {safe_repr(offsets, 60)}")
        begin, end = offsets
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * DTYPE_SIZES[dtype]
        if nbytes > LIMITS.max_tensor_bytes:
            raise LimitExceededError(f"tensor '{shown}' declares {int_text(nbytes)} bytes, over "
                                     f"the cap", path=path)
        if begin < 0 or end < begin:
            raise _fail(path, f"tensor '{shown}' has offsets [{begin}, {end}]")
        if end - begin != nbytes:
            raise _fail(path, f"tensor '{shown}' {list(shape)} {dtype} needs {nbytes} bytes but "
                        f"its offsets hold {end - begin}")
        ranges.append((begin, end, name))
        storage = StorageRef(key=name, dtype=dtype, numel=numel, location="cpu")
        stride = tuple(_contiguous_strides(shape))
        root[name] = TensorRef(storage, 0, shape, stride)
        spans[name] = StorageSpan(path, data_start + begin, end - begin)

    ranges.sort()
    cursor = 0
    for begin, end, name in ranges:
        if begin != cursor:
            kind = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            raise _fail(path, f"tensor '{name[:200]}' at byte {begin} {kind}")
        cursor = end
    if cursor != data_size:
        what = "trailing bytes after" if cursor < data_size else "missing bytes: data ends before"
        raise _fail(path, f"{what} the last tensor (data {data_size} bytes, tensors {cursor})")
    return LoadedFile(path, "safetensors", root, spans, metadata=dict(metadata))


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return strides
