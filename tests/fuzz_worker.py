"""Fuzz worker: reads inputs from stdin, runs attnviz on each, reports one JSON line per input.

Run by tests/fuzzing.py as ``python -m tests.fuzz_worker``. Each input runs in a forked child
(attnviz already imported), so that the worker can measure that input alone: its peak resident
memory (``wait4``'s ``ru_maxrss``) and its wall time, kill it past the timeout (a hang), and
survive a crash or a memory blow-up past the child's address-space limit.
Protocol: 1 byte target, 4 bytes little-endian length, payload.

Targets: ``i`` inspect (library), ``c`` ``inspect --json`` (CLI), ``s`` split-qkv (CLI), and
``b`` a bundle: several files (regular files, symlinks, FIFOs) and the CLI arguments to run on
them, for inputs that are more than one file (HF directories, shard indexes, split files with
sidecars); see ``tests.fuzzing.bundle``. ``p`` (probe) only proves the supervision works: it
allocates and sleeps as its JSON payload says.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

MEMORY_LIMIT = int(os.environ.get("ATTNVIZ_FUZZ_MEMORY", str(3 << 30)))
# a hang is whatever passes 45 s: inside the 60 s budget, with room for a loaded machine
TIMEOUT = float(os.environ.get("ATTNVIZ_FUZZ_TIMEOUT", "45"))
TARGETS = {b"i": "inspect", b"c": "cli", b"s": "split", b"b": "bundle", b"p": "probe"}
KEPT = {"input.pth", "out.safetensors"}


def _materialise(payload: bytes, work: Path) -> tuple[list[str], dict[str, int], set[str]]:
    """Write a bundle's files into ``work``; its CLI arguments, limits and file names."""
    (size,) = struct.unpack("<I", payload[:4])
    manifest = json.loads(payload[4:4 + size])
    blob = payload[4 + size:]
    names: set[str] = set()
    for name, kind, start, value in manifest["files"]:
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        names.add(name.split("/")[0])
        if kind == "file":
            path.write_bytes(blob[start:start + value])
        elif kind == "symlink":
            path.symlink_to(value)
        elif kind == "fifo":
            os.mkfifo(path)
    argv = [a.replace("{dir}", str(work)) for a in manifest["argv"]]
    return argv, dict(manifest.get("limits", {})), names


def run_one(target: str, payload: bytes, work: Path) -> dict[str, Any]:
    from typer.testing import CliRunner

    from attnviz.cli import app
    from attnviz.errors import AttnvizError
    from attnviz.inspection import inspect_checkpoint, report_to_json

    kept = set(KEPT)
    path = work / "input.pth"
    args: list[str] = []
    if target == "probe":
        probe = json.loads(payload)
        held = bytearray(int(probe.get("allocate", 0)))
        held[::4096] = b"x" * len(held[::4096])  # touch every page: resident, not just mapped
        time.sleep(float(probe.get("sleep", 0)))
        return {"outcome": "ok", "held": len(held)}
    try:
        if target == "bundle":
            args, limits, names = _materialise(payload, work)
            kept |= names
            if limits:
                _set_limits(limits)
        else:
            path.write_bytes(payload)
        if target == "inspect":
            json.dumps(report_to_json(inspect_checkpoint(path, heads=["4"])))
            return {"outcome": "ok"}
        if target == "cli":
            args = ["inspect", str(path), "--json"]
        elif target == "split":
            args = ["split-qkv", str(path), "-o", str(work / "out.safetensors"), "--heads", "4",
                    "--force"]
        result = CliRunner().invoke(app, args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        leftovers = sorted(p.name for p in work.iterdir() if p.name not in kept)
        report: dict[str, Any] = {"exit": result.exit_code, "leftovers": leftovers}
        if result.exit_code == 0:
            return {"outcome": "ok", **report}
        clean = (result.exit_code == 2 and len(lines) == 1
                 and lines[0].startswith("attnviz: error: ") and "Traceback" not in result.output)
        return {"outcome": "error" if clean else "crash", "error": lines[0][:300] if lines else "",
                "output": "" if clean else result.output[-2000:], **report}
    except AttnvizError as error:
        return {"outcome": "error", "error": type(error).__name__, "message": str(error)[:300]}
    except Exception:  # noqa: BLE001 - anything else is exactly what fuzzing looks for
        return {"outcome": "crash", "traceback": traceback.format_exc()[-3000:]}


def _set_limits(caps: dict[str, int]) -> None:
    """Lower caps for one input (the child is thrown away afterwards)."""
    import dataclasses

    import attnviz.limits

    original = attnviz.limits.LIMITS
    patched = dataclasses.replace(original, **caps)
    for module in list(sys.modules.values()):
        if getattr(module, "LIMITS", None) is original:
            module.LIMITS = patched  # type: ignore[attr-defined]


def _child(target: str, payload: bytes, work: Path, write_end: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    try:
        try:
            report = run_one(target, payload, work)
        except MemoryError:
            report = {"outcome": "crash", "traceback": "MemoryError (memory blow-up)"}
        os.write(write_end, (json.dumps(report) + "\n").encode())
    finally:
        os._exit(0)


def supervise(target: str, payload: bytes) -> dict[str, Any]:
    """Run one input in a forked child; add its peak memory and time; catch hangs and crashes."""
    work = Path(tempfile.mkdtemp(prefix="attnviz-fuzz-"))
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(target, payload, work, write_end)
    os.close(write_end)
    chunks: list[bytes] = []
    report: dict[str, Any] | None = None
    try:
        while True:
            left = TIMEOUT - (time.monotonic() - started)
            ready, _, _ = select.select([read_end], [], [], max(left, 0))
            if not ready:
                os.kill(pid, 9)
                report = {"outcome": "hang", "timeout_s": TIMEOUT}
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        _, status, usage = os.wait4(pid, 0)
    finally:
        os.close(read_end)
        shutil.rmtree(work, ignore_errors=True)
    if report is None:
        text = b"".join(chunks).decode()
        report = json.loads(text) if text.strip() else {
            "outcome": "crash", "traceback": f"child died (status {status}: signal or memory)"}
    report["seconds"] = round(time.monotonic() - started, 3)
    report["peak_rss"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return report


def main() -> None:
    # imported once, here, so that every forked child starts with them loaded
    import attnviz.cli
    import attnviz.inspection

    assert attnviz.cli.app is not None and attnviz.inspection.inspect_checkpoint is not None

    stdin, stdout = sys.stdin.buffer, sys.stdout
    while True:
        head = stdin.read(5)
        if len(head) < 5:
            return
        target = TARGETS[head[:1]]
        (length,) = struct.unpack("<I", head[1:])
        payload = stdin.read(length)
        stdout.write(json.dumps(supervise(target, payload)) + "\n")
        stdout.flush()


if __name__ == "__main__":
    main()
