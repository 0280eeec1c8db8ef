"""Fuzz worker: reads inputs from stdin, runs attnviz on each, reports one JSON line per input.

Run by tests/fuzzing.py as ``python -m tests.fuzz_worker`` in its own process, under an
address-space limit, so that a hang or a memory blow-up is caught by the parent instead of
taking the test run down. Protocol: 1 byte target, 4 bytes little-endian length, payload.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import sys
import tempfile
import traceback
from pathlib import Path

MEMORY_LIMIT = int(os.environ.get("ATTNVIZ_FUZZ_MEMORY", str(3 << 30)))
TARGETS = {b"i": "inspect", b"c": "cli", b"s": "split"}


def run_one(target: str, payload: bytes, work: Path) -> dict[str, object]:
    from typer.testing import CliRunner

    from attnviz.cli import app
    from attnviz.errors import AttnvizError
    from attnviz.inspection import inspect_checkpoint, report_to_json

    path = work / "input.pth"
    path.write_bytes(payload)
    try:
        if target == "inspect":
            json.dumps(report_to_json(inspect_checkpoint(path, heads=["4"])))
            return {"outcome": "ok"}
        args = (["inspect", str(path), "--json"] if target == "cli" else
                ["split-qkv", str(path), "-o", str(work / "out.safetensors"), "--heads", "4",
                 "--force"])
        result = CliRunner().invoke(app, args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        leftovers = sorted(p.name for p in work.iterdir() if p.name not in {"input.pth",
                                                                            "out.safetensors"})
        if result.exit_code == 0:
            return {"outcome": "ok", "leftovers": leftovers}
        clean = (result.exit_code == 2 and len(lines) == 1
                 and lines[0].startswith("attnviz: error: ") and "Traceback" not in result.output)
        return {"outcome": "error" if clean else "crash", "exit": result.exit_code,
                "error": lines[0][:300] if lines else "", "leftovers": leftovers}
    except AttnvizError as error:
        return {"outcome": "error", "error": type(error).__name__, "message": str(error)[:300]}
    except Exception:  # noqa: BLE001 - anything else is exactly what fuzzing looks for
        return {"outcome": "crash", "traceback": traceback.format_exc()[-3000:]}


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    stdin, stdout = sys.stdin.buffer, sys.stdout
    while True:
        head = stdin.read(5)
        if len(head) < 5:
            return
        target = TARGETS[head[:1]]
        (length,) = struct.unpack("<I", head[1:])
        payload = stdin.read(length)
        work = Path(tempfile.mkdtemp(prefix="attnviz-fuzz-"))
        try:
            try:
                report = run_one(target, payload, work)
            except MemoryError:
                report = {"outcome": "crash", "traceback": "MemoryError (memory blow-up)"}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        stdout.write(json.dumps(report) + "\n")
        stdout.flush()


if __name__ == "__main__":
    main()
