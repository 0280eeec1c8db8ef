"""Hostile-input matrix: every damaged or hostile file is refused with the exact error class and
a one-line message (exit code 2), every odd-but-valid file is read correctly.

Each error case is checked twice: through the library (``load_checkpoint`` and
``inspect_checkpoint`` raise exactly ``case.error`` whose message matches ``case.match``) and
through ``attnviz inspect`` (exit code 2, nothing on stdout, exactly one non-empty stderr line
that starts with ``attnviz: error: ``, names the file and matches ``case.match``, no traceback).
Inputs are real ``torch.save`` / ``safetensors`` files damaged programmatically, all under
``tmp_path``. The issue-12 classes are here too, one case each (views rewritten by BUILD, a deep
tuple key, a memo index of 2**28, ``bytearray`` from a size, too many globals, the legacy byte
cap, negative zip header offsets, FIFOs and devices, 5000-digit integers, a list as dtype);
their budget (memory, time) is measured in tests/test_hostile_budget.py, outputs in
tests/test_hostile_outputs.py, printed text in tests/test_hostile_text.py, merge-qkv metadata in
tests/test_hostile_merge.py and the rest of the pickle classes in tests/test_hostile_pickles.py.

Already covered elsewhere, so not repeated here:

- tests/test_pickle_safety.py::test_damaged_input_* -- ``empty`` file, ``5-random-bytes``,
  ``truncated-torch-zip`` (cut in half: no central directory), ``no-data-pkl``,
  ``git-lfs-pointer``, ``html``, ``safetensors-overlap``, ``safetensors-trailing-bytes``,
  ``view-past-storage`` (tensor view out of bounds), ``offset-past-storage``,
  ``storage-bigger-than-record`` (data.pkl declares more elements than the record holds),
  ``safetensors-header-beyond-file`` (with a loose ``unrecognised format|runs past the end``
  match; the strict expectation is ``st-header-beyond-file`` below, an xfail).
- tests/test_pickle_safety.py::test_hostile_payload_is_listed_and_never_run -- called
  ``importlib.import_module`` inside getattr / methodcaller chains (here: a direct call that
  would import a marker module, and a bare reference).
- tests/test_reader_formats.py::test_safetensors_named_pth_is_read_as_safetensors and
  ::test_torch_zip_named_safetensors_is_read_as_torch_zip -- a ``.pt`` that is really
  safetensors and the reverse (succeed; format asserted there).
- tests/test_reader_formats.py::test_torch_formats_keep_views_into_one_storage -- views
  sharing a storage (here: the same tensor under two keys).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import io
import json
import math
import os
import pickletools
import pkgutil
import random
import re
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import attnviz.limits
from attnviz import tensor_writers
from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.errors import (
    CheckpointError,
    CorruptCheckpointError,
    LimitExceededError,
    UnknownFormatError,
    UnsupportedCheckpointError,
)
from attnviz.inspection import inspect_checkpoint

from .torch_pickles import (
    PidStub,
    StorageStub,
    TensorStub,
    dumps,
    op_call,
    op_global,
    op_int,
    op_str,
    with_entry,
)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
Build = Callable[[Path], Path]

# ---------------------------------------------------------------------------------------------
# helpers: limits, CLI


def _set_limits(monkeypatch: pytest.MonkeyPatch, **caps: int) -> None:
    """Replace ``LIMITS`` in attnviz.limits and in every attnviz module that imported it by name
    (formats.safetensors_format, formats.torch_zip, formats.torch_legacy, formats.safe_pickle
    when it has one, containers)."""
    original = attnviz.limits.LIMITS
    patched = dataclasses.replace(original, **caps)
    holders = [name for name, module in sys.modules.items()
               if name.startswith("attnviz") and getattr(module, "LIMITS", None) is original]
    assert {"attnviz.limits", "attnviz.formats.safetensors_format", "attnviz.formats.torch_zip",
            "attnviz.formats.torch_legacy", "attnviz.containers"} <= set(holders), holders
    for name in holders:
        monkeypatch.setattr(sys.modules[name], "LIMITS", patched)


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def _assert_one_error_line(result: Any, must_contain: str, match: str | None = None) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("attnviz: error: "), line
    assert must_contain in line, line
    if match is not None:
        assert re.search(match, line), line
    return line


# ---------------------------------------------------------------------------------------------
# helpers: building real files


def _weight() -> torch.Tensor:
    return torch.arange(12, dtype=torch.float32).reshape(4, 3)


def _torch_file(tmp_path: Path, obj: Any = None, name: str = "base.pth", **kwargs: Any) -> Path:
    """``torch.save`` into ``tmp_path/src`` (kept apart from the hostile files)."""
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    path = folder / name
    torch.save({"w": _weight()} if obj is None else obj, path, **kwargs)
    return path


def _safetensors_file(tmp_path: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    path = folder / "base.safetensors"
    save_file(tensors or {"a": torch.ones(2), "b": torch.zeros(3)}, str(path))
    return path


def _rewrite_zip(src: Path, dst: Path, *, replace: dict[str, bytes | None] | None = None,
                 rename: Callable[[str], str] | None = None, deflate: tuple[str, ...] = (),
                 extra: dict[str, bytes] | None = None) -> Path:
    """Copy a torch zip record by record. Keys of ``replace``/``deflate`` are names below the
    archive prefix (``data.pkl``, ``data/0``, ``version``); ``None`` drops the record."""
    replace = replace or {}
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            inner = info.filename.split("/", 1)[1]
            data = replace[inner] if inner in replace else source.read(info)
            if data is None:
                continue
            method = zipfile.ZIP_DEFLATED if inner in deflate else zipfile.ZIP_STORED
            out.writestr(rename(info.filename) if rename else info.filename, data,
                         compress_type=method)
        for name, data in (extra or {}).items():
            out.writestr(name, data)
    return dst


def _central_entries(raw: bytes) -> list[tuple[int, str]]:
    """(offset, name) of each central-directory header, walked from the end record."""
    end = raw.rfind(b"PK\x05\x06")
    count, _, start = struct.unpack_from("<HII", raw, end + 10)
    entries, pos = [], start
    for _ in range(count):
        assert raw[pos:pos + 4] == b"PK\x01\x02"
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw, pos + 28)
        entries.append((pos, raw[pos + 46:pos + 46 + name_len].decode()))
        pos += 46 + name_len + extra_len + comment_len
    return entries


def _patch_zip(path: Path, member: str, *, central: dict[int, int] | None = None,
               local: dict[int, tuple[str, int]] | None = None) -> Path:
    """Overwrite little-endian uint32 fields (by byte offset) of ``member``'s central-directory
    header, and ``(struct format, value)`` fields of its local header."""
    raw = bytearray(path.read_bytes())
    (pos, _), = [(p, n) for p, n in _central_entries(bytes(raw)) if n.endswith(member)]
    for offset, value in (central or {}).items():
        struct.pack_into("<I", raw, pos + offset, value)
    (local_pos,) = struct.unpack_from("<I", raw, pos + 42)
    for offset, (fmt, value) in (local or {}).items():
        struct.pack_into(fmt, raw, local_pos + offset, value)
    path.write_bytes(bytes(raw))
    return path


CD_COMPRESSED_SIZE, CD_FILE_SIZE, LOCAL_EXTRA_LEN = 20, 24, 28


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def _zip_with_pickle(name: str, make: Callable[[Path], bytes]) -> Build:
    """A real torch zip of ``{'w': (4, 3) float32}`` whose data.pkl is replaced."""
    def build(tmp_path: Path) -> Path:
        base = _torch_file(tmp_path)
        return _rewrite_zip(base, tmp_path / name, replace={"data.pkl": make(base)})

    return build


def _bytes(name: str, make: Callable[[Path], bytes]) -> Build:
    def build(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(make(tmp_path))
        return path

    return build


def _prefix(kind: str, length: int) -> Build:
    """The first ``length`` bytes of a real file of ``kind``."""
    def build(tmp_path: Path) -> Path:
        if kind == "torch-zip":
            source = _torch_file(tmp_path)
        elif kind == "torch-legacy":
            source = _torch_file(tmp_path, _use_new_zipfile_serialization=False)
        else:
            source = _safetensors_file(tmp_path)
        path = tmp_path / f"{kind}-{length}.bin"
        path.write_bytes(source.read_bytes()[:length])
        return path

    return build


# ---------------------------------------------------------------------------------------------
# containers


def _random_bytes(seed: int, size: int, lead: bytes = b"") -> Build:
    return _bytes(f"random-{seed}.pth",
                  lambda _: lead + random.Random(seed).randbytes(size - len(lead)))


def _cut_zip(keep: Callable[[bytes], int], name: str) -> Build:
    def build(tmp_path: Path) -> Path:
        raw = _torch_file(tmp_path).read_bytes()
        path = tmp_path / name
        path.write_bytes(raw[:keep(raw)])
        return path

    return build


def _two_data_pkl(tmp_path: Path) -> Path:
    base = _torch_file(tmp_path)
    return _rewrite_zip(base, tmp_path / "two.pth", rename=lambda n: "a/" + n.split("/", 1)[1],
                        extra={"b/data.pkl": _data_pkl(base)})


def _deflated_storage(tmp_path: Path) -> Path:
    return _rewrite_zip(_torch_file(tmp_path), tmp_path / "deflated.pth", deflate=("data/0",))


def _storage_size_beyond_file(tmp_path: Path) -> Path:
    path = _rewrite_zip(_torch_file(tmp_path), tmp_path / "cd-size.pth")
    return _patch_zip(path, "/data/0", central={CD_COMPRESSED_SIZE: 10**9, CD_FILE_SIZE: 10**9})


def _local_extra_beyond_file(tmp_path: Path) -> Path:
    path = _rewrite_zip(_torch_file(tmp_path), tmp_path / "local-extra.pth")
    return _patch_zip(path, "/data/0", local={LOCAL_EXTRA_LEN: ("<H", 0xFFFF)})


def _big_pickle(tmp_path: Path) -> Path:
    """data.pkl of about 1 MB that deflates to about 1 KB."""
    return _torch_file(tmp_path, {"w": _weight(), "pad": "0" * 1_000_000})


def _zip_bomb(tmp_path: Path) -> Path:
    path = _rewrite_zip(_big_pickle(tmp_path), tmp_path / "bomb.pth", deflate=("data.pkl",))
    with zipfile.ZipFile(path) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
    assert info.file_size > 1_000_000 > 100 * info.compress_size  # a real bomb
    return path


def _zip_bomb_lying(tmp_path: Path) -> Path:
    """The bomb with its central directory claiming data.pkl inflates to 100 bytes only."""
    return _patch_zip(_zip_bomb(tmp_path), "/data.pkl", central={CD_FILE_SIZE: 100})


def _pickle_declared_over_default_cap(tmp_path: Path) -> Path:
    path = _rewrite_zip(_torch_file(tmp_path), tmp_path / "huge-pkl.pth")
    return _patch_zip(path, "/data.pkl", central={CD_FILE_SIZE: 0xFFFF_FFF0})


def _record(name: str, inner: str, value: bytes) -> Build:
    def build(tmp_path: Path) -> Path:
        return _rewrite_zip(_torch_file(tmp_path), tmp_path / name, replace={inner: value})

    return build


# ---------------------------------------------------------------------------------------------
# legacy (torch < 1.6) files


def _legacy_count_offset(raw: bytes) -> int:
    """Offset of the first storage's int64 element count: after 5 pickles (magic, protocol,
    sys info, object, storage keys)."""
    stream = io.BytesIO(raw)
    for _ in range(5):
        for _ in pickletools.genops(stream):
            pass
    return stream.tell()


def _legacy(name: str, damage: Callable[[bytearray], None]) -> Build:
    def build(tmp_path: Path) -> Path:
        raw = bytearray(_torch_file(tmp_path, _use_new_zipfile_serialization=False).read_bytes())
        damage(raw)
        path = tmp_path / name
        path.write_bytes(bytes(raw))
        return path

    return build


def _bad_magic(raw: bytearray) -> None:
    assert raw[:4] == b"\x80\x02\x8a\x0a"  # PROTO 2, LONG1 of 10 bytes: the magic number
    raw[4] ^= 0xFF


def _set_count(count: int) -> Callable[[bytearray], None]:
    def damage(raw: bytearray) -> None:
        offset = _legacy_count_offset(bytes(raw))
        assert struct.unpack_from("<q", raw, offset) == (12,)  # the (4, 3) float32 storage
        struct.pack_into("<q", raw, offset, count)

    return damage


def _truncate_legacy(raw: bytearray) -> None:
    del raw[_legacy_count_offset(bytes(raw)) + 8 + 20:]  # inside the storage bytes


# ---------------------------------------------------------------------------------------------
# safetensors


def _st_raw(header: bytes, data: bytes, declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


def _st(name: str, header: Any, data: bytes) -> Build:
    return _bytes(name, lambda _: _st_raw(json.dumps(header).encode(), data))


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _st_header_over_cap_sparse(tmp_path: Path) -> Path:
    """A (sparse) file long enough to hold the declared 100,000,001-byte header."""
    path = tmp_path / "huge-header.safetensors"
    declared = 100_000_001
    with path.open("wb") as handle:
        handle.write(_st_raw(b'{"a": ', b"", declared=declared))
        handle.truncate(8 + declared + 8)
    return path


def _st_truncated_in_data(tmp_path: Path) -> Path:
    raw = _safetensors_file(tmp_path).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[:-4])
    return path


_ENTRY = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'


# ---------------------------------------------------------------------------------------------
# issue 12: hand-written pickles, special files, hostile numbers


def _plain_pickle() -> bytes:
    return dumps({"w": TensorStub(StorageStub(), 0, (4, 3), (3, 1))})


def _storage_rewrite(base: Path) -> bytes:
    data = _plain_pickle()
    (persid,) = [pos for op, _, pos in pickletools.genops(data) if op.name == "BINPERSID"]
    build = b"}" + op_str("numel") + op_int(10**9) + b"sb"  # BUILD the storage record
    return data[:persid + 1] + build + data[persid + 1:]


def _globals_pickle(count: int) -> bytes:
    ops = b"".join(op_global("m", f"g{i}") + b"0" for i in range(count))
    return _plain_pickle()[:-1] + ops + b"."


def _special(name: str, make: Callable[[Path], None]) -> Build:
    def build(tmp_path: Path) -> Path:
        path = tmp_path / name
        make(path)
        return path

    return build


def _negative_header_offsets(tmp_path: Path) -> Path:
    """The end record claims the central directory starts 1 MB later than it does: zipfile
    shifts every local header offset by the difference, to below zero."""
    raw = bytearray(_torch_file(tmp_path).read_bytes())
    end = raw.rfind(b"PK\x05\x06")
    (offset,) = struct.unpack_from("<I", raw, end + 16)
    struct.pack_into("<I", raw, end + 16, offset + 10**6)
    end64 = raw.rfind(b"PK\x06\x06")  # torch writes zip64 records: the offset is there too
    if end64 >= 0:
        (offset,) = struct.unpack_from("<Q", raw, end64 + 48)
        struct.pack_into("<Q", raw, end64 + 48, offset + 10**6)
    path = tmp_path / "negative.pth"
    path.write_bytes(bytes(raw))
    return path


def _legacy_big_pickle(tmp_path: Path) -> Path:
    return _torch_file(tmp_path, {"w": _weight(), "pad": b"x" * 200_000}, name="big.pth",
                       _use_new_zipfile_serialization=False)



# ---------------------------------------------------------------------------------------------
# the matrix


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    build: Build
    error: type[CheckpointError]
    match: str
    limits: dict[str, int] = dataclasses.field(default_factory=dict)

    def param(self, cli: bool = False) -> Any:
        return pytest.param(self, id=self.id)


CASES: list[Case] = [
    # ---- containers: tiny files (prefixes of real files), random bytes, text files
    *(Case(f"{kind}-first-{n}-bytes", _prefix(kind, n), UnknownFormatError,
           rf"unrecognised format \(first bytes [0-9a-f]+, {n} bytes\)")
      for kind in ("safetensors", "torch-zip", "torch-legacy") for n in range(1, 8)
      if not (kind == "torch-zip" and n >= 4) and not (kind == "torch-legacy" and n >= 2)),
    *(Case(f"torch-zip-first-{n}-bytes", _prefix("torch-zip", n), CorruptCheckpointError,
           r"broken zip container") for n in range(4, 8)),
    *(Case(f"torch-legacy-first-{n}-bytes", _prefix("torch-legacy", n), CorruptCheckpointError,
           r"cannot read the magic number") for n in range(2, 8)),
    *(Case(f"random-4k-seed{seed}", _random_bytes(seed, 4096), UnknownFormatError,
           r"unrecognised format \(first bytes [0-9a-f]{16}, 4096 bytes\)") for seed in (0, 1, 2)),
    Case("random-after-zip-magic", _random_bytes(3, 4096, b"PK\x03\x04"), CorruptCheckpointError,
         "broken zip container"),
    Case("random-after-pickle-proto", _random_bytes(4, 4096, b"\x80\x02"),
         CorruptCheckpointError, "cannot read the magic number"),
    Case("git-lfs-pointer-leading-blank-line", _bytes("model.pth", lambda _: (
        b"\n  version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32
        + b"\nsize 1234\n")), UnknownFormatError, r"Git LFS pointer.*git lfs pull"),
    Case("html-lowercase-html-tag", _bytes("model.bin", lambda _: (
        b"  <html><body>rate limited</body></html>")), UnknownFormatError, "HTML page"),
    Case("json-non-index", _bytes("model.bin", lambda _: b'{"architectures": ["Bert"]}'),
         UnknownFormatError, r"JSON file, not a checkpoint"),
    # ---- torch zip containers
    Case("zip-without-end-record", _cut_zip(lambda raw: len(raw) - 22, "no-eocd.pth"),
         CorruptCheckpointError, r"broken zip container"),
    Case("zip-cut-before-central-directory",
         _cut_zip(lambda raw: _central_entries(raw)[0][0], "no-cd.pth"),
         CorruptCheckpointError, r"broken zip container"),
    Case("zip-two-data-pkl", _two_data_pkl, CorruptCheckpointError,
         r"zip holds 2 data\.pkl records: \['a/data\.pkl', 'b/data\.pkl'\]"),
    Case("storage-record-deflated", _deflated_storage, UnsupportedCheckpointError,
         r"storage record 'data/0' is compressed"),
    Case("storage-record-sizes-beyond-file", _storage_size_beyond_file, CorruptCheckpointError,
         r"storage record 'data/0' runs past the end of the file"),
    Case("storage-local-extra-beyond-file", _local_extra_beyond_file, CorruptCheckpointError,
         r"storage record 'data/0' runs past the end of the file"),
    Case("zip-bomb-data-pkl", _zip_bomb, LimitExceededError,
         r"record '[^']*data\.pkl' declares \d+ bytes, over the cap of 65536",
         limits={"max_pickle_bytes": 65536}),
    Case("zip-bomb-data-pkl-lying-size", _zip_bomb_lying, CorruptCheckpointError,
         r"record '[^']*data\.pkl' cannot be read \(Bad CRC-32",
         limits={"max_pickle_bytes": 65536}),
    Case("data-pkl-declared-over-default-cap", _pickle_declared_over_default_cap,
         LimitExceededError, r"data\.pkl' declares 4294967280 bytes, over the cap"),
    Case("bad-version-record", _record("version.pth", "version", b"abc\n"),
         CorruptCheckpointError, r"bad version record b'abc'"),
    Case("bad-byteorder-record", _record("byteorder.pth", "byteorder", b"middle"),
         CorruptCheckpointError, r"bad byteorder record 'middle'"),
    # ---- pickle streams (data.pkl of a real torch zip)
    Case("pickle-empty", _zip_with_pickle("empty-pkl.pth", lambda b: b""),
         CorruptCheckpointError, r"pickle stream is damaged"),
    Case("pickle-truncated", _zip_with_pickle(
        "half-pkl.pth", lambda b: _data_pkl(b)[: len(_data_pkl(b)) // 2]),
        CorruptCheckpointError, r"pickle stream is damaged"),
    Case("pickle-tuple-without-mark", _zip_with_pickle("nomark.pth", lambda b: b"\x80\x02t."),
         CorruptCheckpointError, r"pickle stream is damaged.*MARK"),
    Case("pickle-pop-empty-stack", _zip_with_pickle("pop.pth", lambda b: b"\x80\x020."),
         CorruptCheckpointError, r"pickle stream is damaged.*stack underflow"),
    Case("pickle-dangling-memo-get", _zip_with_pickle("memo.pth", lambda b: b"\x80\x02h\x05."),
         CorruptCheckpointError, r"pickle stream is damaged.*[Mm]emo"),
    Case("pickle-unexpected-persistent-id", _zip_with_pickle(
        "pid.pth", lambda b: dumps({"w": TensorStub(PidStub(("module", "x")), 0, (4, 3), (3, 1))})),
        CorruptCheckpointError, r"unexpected persistent id"),
    Case("storage-record-smaller-than-tensor",
         _record("short-record.pth", "data/0", b"\x00" * 8), CorruptCheckpointError,
         r"storage record 'data/0' holds 8 bytes, its tensors need 48"),
    Case("negative-storage-offset", _zip_with_pickle(
        "negoffset.pth", lambda b: dumps({"w": TensorStub(StorageStub(), -1, (4, 3), (3, 1))})),
        CorruptCheckpointError, r"negative or non-integer offset -1"),
    Case("negative-stride", _zip_with_pickle(
        "negstride.pth", lambda b: dumps({"w": TensorStub(StorageStub(), 11, (4, 3), (-3, 1))})),
        CorruptCheckpointError, r"negative size or stride"),
    Case("stride-0-giant-view", _zip_with_pickle(
        "stride0.pth",
        lambda b: dumps({"w": TensorStub(StorageStub(numel=1), 0, (10**12,), (0,))})),
        LimitExceededError, r"declares 4000000000000 bytes, over the cap"),
    # ---- legacy (torch < 1.6) files
    Case("legacy-wrong-magic", _legacy("magic.pth", _bad_magic), CorruptCheckpointError,
         r"without the torch magic number"),
    Case("legacy-huge-element-count", _legacy("count.pth", _set_count(2**62)),
         LimitExceededError, r"storage '\d+' declares 4611686018427387904 elements"),
    Case("legacy-count-past-end", _legacy("count-eof.pth", _set_count(10**6)),
         CorruptCheckpointError, r"storage '\d+' is shorter than declared"),
    Case("legacy-negative-count", _legacy("count-neg.pth", _set_count(-1)),
         CorruptCheckpointError, r"storage '\d+'.*-1"),
    Case("legacy-truncated-in-storage", _legacy("cut.pth", _truncate_legacy),
         CorruptCheckpointError, r"storage '\d+' is shorter than declared"),
    # ---- safetensors headers
    Case("st-header-over-cap", _st_header_over_cap_sparse, LimitExceededError,
         r"header declares 100000001 bytes, over the cap of 100000000"),
    Case("st-header-over-cap-small-file", _bytes("cap.safetensors", lambda _: _st_raw(
        b'{"a": 1}', b"", declared=100_000_001)), LimitExceededError,
        r"header declares 100000001 bytes, over the cap"),
    Case("st-header-beyond-file", _bytes("beyond.safetensors", lambda _: _st_raw(
        b'{"a": {"dtype": "F32", ', b"", declared=10_000)), CorruptCheckpointError,
        r"header of 10000 bytes runs past the end of the file"),
    Case("st-header-json-array", _bytes("array.safetensors", lambda _: _st_raw(
        b'[{"a": 1}]', b"")), CorruptCheckpointError, r"header is not a JSON object",),
    Case("st-header-not-utf8", _bytes("latin.safetensors", lambda _: _st_raw(
        b'{"caf\xe9": ' + _ENTRY.encode() + b"}", bytes(8))), CorruptCheckpointError,
        r"header is not UTF-8"),
    Case("st-header-not-json", _bytes("notjson.safetensors", lambda _: _st_raw(
        b'{"a": nope}', bytes(8))), CorruptCheckpointError, r"header is not JSON"),
    Case("st-header-nested-deeply", _bytes("deep.safetensors", lambda _: _st_raw(
        b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", b"")), CorruptCheckpointError,
        r"header (nests too deeply|is not JSON)"),
    Case("st-metadata-not-string", _st("meta.safetensors",
                                       {"__metadata__": {"epoch": 3}, "a": F32x2}, bytes(8)),
         CorruptCheckpointError, r"__metadata__ must map strings to strings"),
    Case("st-unknown-dtype", _st("f99.safetensors",
                                 {"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}},
                                 bytes(8)),
         CorruptCheckpointError, r"tensor 'a' has unknown dtype 'F99'"),
    Case("st-shape-dtype-vs-offsets", _st("mismatch.safetensors",
                                          {"a": {"dtype": "F32", "shape": [3],
                                                 "data_offsets": [0, 8]}}, bytes(8)),
         CorruptCheckpointError, r"tensor 'a' \[3\] float32 needs 12 bytes but its offsets hold 8"),
    Case("st-overflowing-shape", _st("overflow.safetensors",
                                     {"a": {"dtype": "F32", "shape": [2**40, 2**40],
                                            "data_offsets": [0, 8]}}, bytes(8)),
         LimitExceededError, rf"tensor 'a' declares {4 * 2**80} bytes, over the cap"),
    Case("st-negative-offsets", _st("negative.safetensors",
                                    {"a": {"dtype": "F32", "shape": [2],
                                           "data_offsets": [-8, 0]}}, bytes(8)),
         CorruptCheckpointError, r"tensor 'a' has offsets \[-8, 0\]"),
    Case("st-gapped-offsets", _st("gap.safetensors",
                                  {"a": F32x2, "b": {"dtype": "F32", "shape": [2],
                                                     "data_offsets": [12, 20]}}, bytes(20)),
         CorruptCheckpointError, r"tensor 'b' at byte 12 leaves a gap before it"),
    Case("st-truncated-in-data", _st_truncated_in_data, CorruptCheckpointError,
         r"missing bytes: data ends before the last tensor \(data 16 bytes, tensors 20\)"),
    Case("st-duplicate-names", _bytes("dup.safetensors", lambda _: _st_raw(
        f'{{"a": {_ENTRY}, "a": {_ENTRY}}}'.encode(), bytes(8))),
        CorruptCheckpointError, r"duplicate tensor name 'a'"),
    # ---- issue 12: views rewritten after their check; pickles that cost unbounded memory
    Case("view-rewritten-by-build", _zip_with_pickle("rewrite.pth", lambda b: dumps(
        {"w": TensorStub(StorageStub(), 0, (4, 3), (3, 1), state={"offset": 10**6})})),
        CorruptCheckpointError, r"the pickle rewrites a TensorRef after it was built"),
    Case("storage-rewritten-by-build", _zip_with_pickle("storage.pth", _storage_rewrite),
         CorruptCheckpointError, r"the pickle rewrites a StorageRef after it was built"),
    Case("deep-tuple-dict-key", _zip_with_pickle(
        "deep.pth", lambda b: _plain_pickle()[:-1] + b"N" + b"\x85" * 100 + b"K\x01s."),
        LimitExceededError, r"pickle nests containers over 50 deep",
        limits={"max_pickle_nesting": 50}),
    Case("memo-index-2**28", _zip_with_pickle(
        "memo.pth", lambda b: b"\x80\x02}r" + struct.pack("<I", 2**28) + b"."),
        CorruptCheckpointError, r"memo index 268435456 skips past the 0 entries"),
    Case("bytearray-from-a-size", _zip_with_pickle("bytearray.pth", lambda b: with_entry(
        _plain_pickle(), "x", op_call(op_global("__builtin__", "bytearray"),
                                      op_int(3 * 10**9)))),
        CorruptCheckpointError, r"bytearray built from int, not from bytes"),
    Case("distinct-globals-over-cap", _zip_with_pickle(
        "globals.pth", lambda b: _globals_pickle(101)), LimitExceededError,
        r"pickle names over 100 distinct globals", limits={"max_globals": 100}),
    Case("legacy-pickle-over-byte-cap", _legacy_big_pickle, LimitExceededError,
         r"pickle is over 65536 bytes", limits={"max_pickle_bytes": 65536}),
    Case("zip-negative-header-offsets", _negative_header_offsets, CorruptCheckpointError,
         r"record 'base/version' cannot be read \(\[Errno 22\] Invalid argument\)"),
    # ---- issue 12: special files and hostile numbers
    Case("fifo-as-checkpoint", _special("pipe.pth", os.mkfifo), CheckpointError,
         r"the checkpoint is a FIFO \(named pipe\), not a regular file"),
    Case("symlink-to-a-device", _special("zero.pth", lambda p: p.symlink_to("/dev/zero")),
         CheckpointError, r"the checkpoint is a character device, not a regular file"),
    Case("st-5000-digit-integer", _bytes("digits.safetensors", lambda _: _st_raw(
        b'{"a": {"dtype": "F32", "shape": [' + b"2" * 5000 + b'], "data_offsets": [0, 8]}}',
        bytes(8))), CorruptCheckpointError, r"header holds an integer of 5000 digits"),
    Case("st-dtype-a-list", _st("list.safetensors", {"a": {"dtype": ["F32"], "shape": [2],
                                                           "data_offsets": [0, 8]}}, bytes(8)),
         CorruptCheckpointError, r"tensor 'a' has unknown dtype \['F32'\]"),
    Case("st-name-5000-chars-of-markup", _st("markup.safetensors", {
        "[/]" * 2000: {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
        CorruptCheckpointError, r"tensor '(\[/\]){66}\[/' \[3\] float32 needs 12 bytes"),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_library_raises_the_exact_error(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_limits(monkeypatch, **case.limits)
    path = case.build(tmp_path)

    for load in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=case.match) as caught:
            load(path)
        assert type(caught.value) is case.error, (type(caught.value), caught.value)
        assert caught.value.exit_code == 2
        assert str(path) in str(caught.value)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("case", [c.param(cli=True) for c in CASES])
def test_cli_inspect_prints_one_error_line_and_exits_2(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_limits(monkeypatch, **case.limits)
    path = case.build(tmp_path)

    result = _cli("inspect", str(path))

    _assert_one_error_line(result, str(path), case.match)
    assert result.stdout == ""


def test_limits_helper_patches_every_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    import attnviz.containers
    import attnviz.formats.torch_zip

    _set_limits(monkeypatch, max_pickle_bytes=7)
    assert attnviz.formats.torch_zip.LIMITS.max_pickle_bytes == 7
    assert attnviz.containers.LIMITS.max_pickle_bytes == 7
    assert attnviz.limits.LIMITS.max_pickle_bytes == 7


# ---------------------------------------------------------------------------------------------
# odd but valid files: read correctly


def _assert_inspect_ok(path: Path) -> str:
    result = _cli("inspect", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.stdout


@pytest.mark.parametrize("protocol", [4, 5])
def test_torch_zip_with_framed_pickle_protocol(tmp_path: Path, protocol: int) -> None:
    state = {"enc.w": torch.randn(4, 3), "enc.b": torch.randn(3).half(),
             "step": torch.tensor(7, dtype=torch.int64)}
    path = _torch_file(tmp_path, state, pickle_protocol=protocol)
    assert _data_pkl(path)[:2] == bytes([0x80, protocol])

    ckpt = load_checkpoint(path)

    assert ckpt.format == "torch-zip"
    assert {n: t.shape for n, t in ckpt.tensors.items()} == {
        "enc.w": (4, 3), "enc.b": (3,), "step": ()}
    for name, tensor in state.items():
        assert torch.equal(ckpt.read_tensor(name), tensor), name
    doc = json.loads(_assert_inspect_ok(path))
    assert doc["format"] == "torch-zip" and doc["num_tensors"] == 3


def test_safetensors_empty_and_zero_rank_tensors(tmp_path: Path) -> None:
    state = {"empty": torch.zeros(0), "empty2d": torch.zeros(3, 0, dtype=torch.int32),
             "scalar": torch.tensor(3.5), "w": torch.arange(4.0)}
    path = _safetensors_file(tmp_path, state)

    ckpt = load_checkpoint(path)

    assert ckpt.format == "safetensors"
    assert {n: t.shape for n, t in ckpt.tensors.items()} == {
        "empty": (0,), "empty2d": (3, 0), "scalar": (), "w": (4,)}
    for name, tensor in state.items():
        value = ckpt.read_tensor(name)
        assert value.shape == tensor.shape and value.dtype == tensor.dtype, name
        assert torch.equal(value, tensor), name
    assert ckpt.read_tensor("scalar").item() == 3.5
    doc = json.loads(_assert_inspect_ok(path))
    assert {t["name"]: t["shape"] for t in doc["tensors"]}["scalar"] == []


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
def test_nan_and_inf_values_are_not_errors(tmp_path: Path, fmt: str) -> None:
    values = torch.tensor([math.nan, math.inf, -math.inf, 1.0, -0.0])
    state = {"w": values, "b": torch.full((2, 2), math.nan)}
    path = _safetensors_file(tmp_path, state) if fmt == "safetensors" else \
        _torch_file(tmp_path, state)

    ckpt = load_checkpoint(path)

    assert torch.equal(ckpt.read_tensor("w").isnan(), values.isnan())
    assert torch.equal(torch.nan_to_num(ckpt.read_tensor("w")), torch.nan_to_num(values))
    assert ckpt.read_tensor("b").isnan().all()
    _assert_inspect_ok(path)


def test_non_tensor_values_mixed_into_the_state_dict(tmp_path: Path) -> None:
    state = {"w": _weight(), "step": 3, "name": "run-1", "none": None, "lr": 1e-4,
             "flags": [True, False], "b": torch.ones(3)}
    path = _torch_file(tmp_path, state)

    ckpt = load_checkpoint(path)

    assert sorted(ckpt.tensors) == ["b", "w"]
    assert torch.equal(ckpt.read_tensor("w"), _weight())
    assert ckpt.foreign_objects == []
    doc = json.loads(_assert_inspect_ok(path))
    assert sorted(t["name"] for t in doc["tensors"]) == ["b", "w"]


def test_nested_dicts_beside_a_tensor_get_dotted_names(tmp_path: Path) -> None:
    state = {"head": torch.ones(2), "encoder": {"layer0": {"w": _weight()}, "norm": torch.ones(3)}}
    path = _torch_file(tmp_path, state)

    ckpt = load_checkpoint(path)

    assert sorted(ckpt.tensors) == ["encoder.layer0.w", "encoder.norm", "head"]
    assert torch.equal(ckpt.read_tensor("encoder.layer0.w"), _weight())
    _assert_inspect_ok(path)


def test_dict_of_dicts_of_tensors_gets_dotted_names(tmp_path: Path) -> None:
    state = {"encoder": {"layer0": {"w": _weight()}, "norm": torch.ones(3)},
             "decoder": {"w": torch.zeros(2)}}
    path = _torch_file(tmp_path, state)

    ckpt = load_checkpoint(path)

    assert sorted(ckpt.tensors) == ["decoder.w", "encoder.layer0.w", "encoder.norm"]


def test_tied_weights_are_both_listed_and_equal(tmp_path: Path) -> None:
    shared = torch.randn(5, 4)
    path = _torch_file(tmp_path, {"embed.weight": shared, "lm_head.weight": shared})

    ckpt = load_checkpoint(path)

    assert sorted(ckpt.tensors) == ["embed.weight", "lm_head.weight"]
    a, b = ckpt.tensors["embed.weight"], ckpt.tensors["lm_head.weight"]
    assert a.span == b.span and a.ref == b.ref
    assert torch.equal(ckpt.read_tensor("embed.weight"), shared)
    assert torch.equal(ckpt.read_tensor("lm_head.weight"), shared)
    _assert_inspect_ok(path)


# ---------------------------------------------------------------------------------------------
# import-machinery globals: listed as code, never called


class _Call:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


_MARKER_MODULE = "attnviz_hostile_marker_module"


@pytest.mark.parametrize(("payload", "names"), [
    (lambda: _Call(pkgutil.resolve_name, f"{_MARKER_MODULE}:VALUE"), {"pkgutil.resolve_name"}),
    (lambda: _Call(importlib.import_module, _MARKER_MODULE), {"importlib.import_module"}),
    (lambda: [pkgutil.resolve_name, importlib.import_module],
     {"pkgutil.resolve_name", "importlib.import_module"}),
], ids=["pkgutil.resolve_name-called", "importlib.import_module-called", "referenced-only"])
def test_import_machinery_globals_are_listed_and_never_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: Callable[[], Any], names: set[str],
) -> None:
    marker = tmp_path / "imported"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / f"{_MARKER_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nVALUE = 1\n")
    path = _torch_file(tmp_path, {"w": _weight(), "extra": payload()})
    monkeypatch.syspath_prepend(str(modules))
    monkeypatch.delitem(sys.modules, _MARKER_MODULE, raising=False)

    report = inspect_checkpoint(path)

    found = {f.qualified_name: f for f in report.checkpoint.foreign_objects}
    for name in names:
        assert found[name].names_code is True, found[name]
        assert any(w.startswith("DANGER") and f"'{name}'" in w for w in report.warnings)
    assert sorted(report.checkpoint.tensors) == ["w"]
    stdout = _assert_inspect_ok(path)
    listed = {f["name"]: f["names_code"] for f in json.loads(stdout)["foreign_objects"]}
    assert all(listed[name] is True for name in names)
    assert not marker.exists()
    assert _MARKER_MODULE not in sys.modules
    # control: the payload is live, torch.load(weights_only=False) does call it
    try:
        torch.load(path, weights_only=False)
        assert marker.exists() == (names != {"pkgutil.resolve_name", "importlib.import_module"})
    finally:
        sys.modules.pop(_MARKER_MODULE, None)


# ---------------------------------------------------------------------------------------------
# outputs: split-qkv when the disk fills up


def _fill_disk_after(monkeypatch: pytest.MonkeyPatch, tensors: int) -> list[str]:
    written: list[str] = []
    real = tensor_writers.SafetensorsStreamWriter.write

    def write(self: Any, name: str, array: Any) -> None:
        if len(written) >= tensors:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, name, array)
        written.append(name)

    monkeypatch.setattr(tensor_writers.SafetensorsStreamWriter, "write", write)
    return written


def _detr_copy(tmp_path: Path) -> Path:
    source = tmp_path / "in" / "detr_tiny.pth"
    source.parent.mkdir()
    shutil.copyfile(SAMPLES / "detr_tiny.pth", source)
    return source


def test_split_qkv_disk_full_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _detr_copy(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "heads.safetensors"
    written = _fill_disk_after(monkeypatch, 5)

    result = _cli("split-qkv", str(source), "-o", str(output))

    assert len(written) == 5
    _assert_one_error_line(result, str(output), r"No space left on device")
    assert list(out_dir.iterdir()) == []
    assert (tmp_path / "in").exists() and list((tmp_path / "in").iterdir()) == [source]


def test_split_qkv_disk_full_with_force_keeps_the_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _detr_copy(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "heads.safetensors"
    assert _cli("split-qkv", str(source), "-o", str(output)).exit_code == 0
    previous = output.read_bytes()
    _fill_disk_after(monkeypatch, 3)

    result = _cli("split-qkv", str(source), "-o", str(output), "--force")

    _assert_one_error_line(result, str(output), r"No space left on device")
    assert output.read_bytes() == previous
    assert list(out_dir.iterdir()) == [output]
    assert len(load_checkpoint(output).tensors) == 174
