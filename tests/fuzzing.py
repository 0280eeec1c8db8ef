"""Fuzz harness: mutations of real checkpoints, run in a supervised worker process.

Each input must end in success or a documented ``AttnvizError`` (exit 2, one line); anything
else (another exception, a hang past the per-input timeout, a memory blow-up past the worker's
address-space limit, a temp file left behind) is a failure, and the input is kept under
``tests/fuzz_regressions/`` so that it is replayed by every later test run.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
TIMEOUT = float(os.environ.get("ATTNVIZ_FUZZ_TIMEOUT", "20"))
TARGET_CODES = {"inspect": b"i", "cli": b"c", "split": b"s"}


class Worker:
    """One long-lived ``python -m tests.fuzz_worker``, restarted after a hang or a crash."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.stats: Counter[str] = Counter()

    def _start(self) -> subprocess.Popen[bytes]:
        if self.process is None or self.process.poll() is not None:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.fuzz_worker"], cwd=ROOT, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return self.process

    def run(self, target: str, payload: bytes) -> dict[str, Any]:
        process = self._start()
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(TARGET_CODES[target] + struct.pack("<I", len(payload)) + payload)
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], TIMEOUT)
        if not ready:
            self.stop()
            return {"outcome": "hang", "timeout_s": TIMEOUT}
        line = process.stdout.readline()
        if not line:
            self.stop()
            return {"outcome": "crash", "traceback": "worker died (memory limit or signal)"}
        return dict(json.loads(line))

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def check(worker: Worker, target: str, payload: bytes) -> dict[str, Any]:
    """Run one input; record statistics; keep a failing input as a regression case."""
    report = worker.run(target, payload)
    worker.stats["inputs"] += 1
    worker.stats[f"outcome:{report['outcome']}"] += 1
    if report["outcome"] == "error":
        worker.stats[f"error:{_error_kind(report)}"] += 1
    failed = report["outcome"] in {"crash", "hang"} or report.get("leftovers")
    if failed:
        REGRESSIONS.mkdir(exist_ok=True)
        digest = hashlib.sha256(payload).hexdigest()[:16]
        (REGRESSIONS / f"{target}-{digest}.bin").write_bytes(payload)
    return report


def _error_kind(report: dict[str, Any]) -> str:
    if "error" in report and str(report["error"]).startswith("attnviz: error: "):
        message = str(report["error"]).split(": ", 3)[-1]
        return " ".join(message.split()[:4])
    return str(report.get("error", "?"))


def mutate(data: bytes, kind: str, position: int, length: int, value: bytes) -> bytes:
    """One mutation of ``data``: bit flips, truncation, spliced or duplicated bytes."""
    position %= max(len(data), 1)
    if kind == "flip":
        out = bytearray(data)
        for offset, byte in enumerate(value or b"\x01"):
            index = (position + offset * 997) % len(out)
            out[index] ^= byte or 1
        return bytes(out)
    if kind == "truncate":
        return data[:position]
    if kind == "splice":
        return data[:position] + value + data[position + length:]
    if kind == "duplicate":
        return data[:position + length] + data[position:position + length] + data[position
                                                                                + length:]
    if kind == "header":  # the first bytes carry the magic, sizes and the header length
        head = min(len(data), 64)
        return data[:position % head] + value + data[position % head + len(value):]
    if kind == "tail":  # a zip's central directory and end record sit at the end
        start = max(0, len(data) - 1 - position % 256)
        return data[:start] + value + data[start + len(value):]
    raise ValueError(kind)
