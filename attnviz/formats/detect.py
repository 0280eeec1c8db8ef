"""Format detection by magic bytes, never by file extension."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from attnviz.errors import CheckpointError, UnknownFormatError, UnsupportedCheckpointError
from attnviz.formats.base import require_regular

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
# a torch zip holding code/: its first bytes are a torch zip's, so the zip reader tells it
# apart from the central directory and reads it with attnviz.formats.torchscript
TORCHSCRIPT = "torchscript"
TORCH_LEGACY = "torch-legacy"
SHARD_INDEX = "shard-index"
DIRECTORY = "directory"


def detect_format(path: Path) -> str:
    """Name the container of ``path`` from its first bytes, or raise a one-line explanation."""
    try:
        if path.is_dir():
            return DIRECTORY
    except OSError as exc:  # a name too long, a loop of symlinks...
        raise CheckpointError(f"cannot be read ({exc.strerror})", path=path) from exc
    if not os.path.lexists(path):
        raise CheckpointError("no such file", path=path, hint="check the path")
    size = require_regular(path, "the checkpoint").st_size
    try:
        with path.open("rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        raise CheckpointError(f"cannot be read ({exc.strerror})", path=path) from exc
    if not head:
        raise UnknownFormatError("the file is empty", path=path, hint="download or save it again")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return TORCH_ZIP
    looks_json = head.lstrip()[:1] in (b"{", b"[") and b"\x00" not in head[:8]
    if len(head) >= 9 and head[8:9] in (b"{", b"[") and not looks_json:
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len < 1 << 32:  # plausible: the reader explains a cut-off or oversized header
            return SAFETENSORS
    if head.startswith(b"\x80") and len(head) >= 2 and 2 <= head[1] <= 5:
        return TORCH_LEGACY
    stripped = head.lstrip()
    if stripped.startswith(b"version https://git-lfs"):
        raise UnknownFormatError("this is a Git LFS pointer, not the weights", path=path,
                                 hint="run 'git lfs pull' to fetch the real file")
    lowered = stripped[:64].lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise UnknownFormatError("this is an HTML page, not a checkpoint", path=path,
                                 hint="the download probably failed; fetch the file again")
    if stripped.startswith(b"{"):
        if b"weight_map" in head or path.name.endswith(".index.json"):
            return SHARD_INDEX
        raise UnknownFormatError("this is a JSON file, not a checkpoint", path=path,
                                 hint="pass the weights file or the model directory")
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise UnsupportedCheckpointError("tar-based torch checkpoints (torch < 0.4) are not "
                                         "supported", path=path,
                                         hint="re-save the weights with a recent torch")
    if head.startswith(b"\x93NUMPY"):
        raise UnknownFormatError("this is a NumPy .npy array, not a checkpoint", path=path)
    raise UnknownFormatError(
        f"unrecognised format (first bytes {head[:8].hex()}, {size} bytes)", path=path,
        hint="attnviz reads torch .pth/.pt/.bin/.ckpt, safetensors and model directories")
