"""Fuzz harness: mutations of real checkpoints, run in a supervised worker process.

Each input must end in success or a documented ``AttnvizError`` (exit 2, one line); anything
else (another exception, a hang past the per-input timeout, a memory blow-up past the child's
address-space limit, a temp file left behind, or more than the budget of ``BUDGET_RSS`` peak
memory or ``BUDGET_SECONDS``) is a failure, and the input is kept under
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
# a hang is whatever passes 45 s: inside the 60 s budget, with room for a loaded machine
TIMEOUT = float(os.environ.get("ATTNVIZ_FUZZ_TIMEOUT", "45"))
TARGET_CODES = {"inspect": b"i", "cli": b"c", "split": b"s", "bundle": b"b", "probe": b"p"}
BUDGET_RSS = 1 << 30  # peak resident memory per hostile input (issue 12)
BUDGET_SECONDS = 60.0


def bundle(files: dict[str, bytes | tuple[str, ...]], argv: list[str],
           limits: dict[str, int] | None = None) -> bytes:
    """One worker input made of several files: ``bytes``, ``("symlink", target)`` or
    ``("fifo",)`` by name, and the CLI arguments to run (``{dir}`` is their folder)."""
    blob = bytearray()
    entries: list[list[Any]] = []
    for name, content in files.items():
        if isinstance(content, bytes):
            entries.append([name, "file", len(blob), len(content)])
            blob += content
        elif content[0] == "symlink":
            entries.append([name, "symlink", 0, content[1]])
        else:
            entries.append([name, "fifo", 0, 0])
    manifest = json.dumps({"files": entries, "argv": argv, "limits": limits or {}}).encode()
    return struct.pack("<I", len(manifest)) + manifest + bytes(blob)


def unbundle(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """The manifest and the file bytes of a bundle (to mutate one file and bundle it again)."""
    (size,) = struct.unpack("<I", payload[:4])
    return json.loads(payload[4:4 + size]), payload[4 + size:]


def over_budget(report: dict[str, Any]) -> bool:
    return (report.get("peak_rss", 0) > BUDGET_RSS
            or report.get("seconds", 0.0) > BUDGET_SECONDS)


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
        # the worker kills a child past TIMEOUT itself; this catches the worker hanging
        ready, _, _ = select.select([process.stdout], [], [], TIMEOUT * 1.5 + 5)
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
    if over_budget(report):
        worker.stats["over_budget"] += 1
    worker.stats["max_peak_rss_mb"] = max(worker.stats["max_peak_rss_mb"],
                                          report.get("peak_rss", 0) >> 20)
    worker.stats["max_seconds"] = max(worker.stats["max_seconds"],
                                      int(report.get("seconds", 0) + 0.999))
    failed = (report["outcome"] in {"crash", "hang"} or report.get("leftovers")
              or over_budget(report))
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


# values a JSON mutation puts in place of another: what a hostile config, index or split
# metadata would hold (huge and negative numbers, wrong types, markup, deep nesting)
HOSTILE_JSON: list[Any] = [
    10**30, -1, 0, 10**9, 2**63, 1.5, float("inf"), None, True, [], {}, [[[[[[[[[[1]]]]]]]]]],
    "", "[/]", "[bold red]x", "\x1b[2K", "../../etc/passwd", "a" * 5000, ["F32"], {"a": 1},
]


def mutate_json(data: bytes, position: int, choice: int, wrap: int = 0) -> bytes:
    """Replace one value (picked by ``position``) of a JSON document with a hostile one, or
    give a 5000-digit integer (``wrap == 1``) or invalid text (``wrap == 2``) instead."""
    try:
        document = json.loads(data)
    except ValueError:
        return data
    if wrap == 1:
        return data.replace(b"1", b"1" * 5000, 1) if b"1" in data else b"9" * 5000
    if wrap == 2:
        return data[: position % max(len(data), 1)]
    slots: list[tuple[Any, Any]] = []
    stack = [document]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        for key, value in items:
            slots.append((node, key))
            if isinstance(value, dict | list):
                stack.append(value)
    if not slots:
        return json.dumps(HOSTILE_JSON[choice % len(HOSTILE_JSON)]).encode()
    node, key = slots[position % len(slots)]
    node[key] = HOSTILE_JSON[choice % len(HOSTILE_JSON)]
    return json.dumps(document).encode()
