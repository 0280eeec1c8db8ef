"""Benchmark ``attnviz split-qkv`` against ``cp`` of the same torch-zip checkpoint.

Run from the repository root::

    .venv/bin/python benchmarks/split_bench.py                # 1.2 GB, 3 repeats, temp dir
    .venv/bin/python benchmarks/split_bench.py --size-gb 2 --repeat 5 --keep /tmp/bench

The checkpoint is built (or reused from ``--keep DIR``) by ``inspect_bench.py``'s builder, in a
child process: a GPT/ViT-like float32 state_dict (E=1024, timm-style
``blocks.{i}.attn.qkv.weight [3E, E]``, ``attn.proj``, ``mlp.fc1/fc2`` ...) saved as
``model.pth`` (torch zip) and ``model.safetensors`` (same tensors; only its header is read
here, for the layer sizes). ``--keep`` directories are shared with ``inspect_bench.py``.

Timed as child processes (one untimed warm-up each, so the page cache is warm, then the median
wall time of ``--repeat`` runs and the max peak RSS from ``os.wait4``; the output is deleted
before every run):

* ``python -m attnviz split-qkv model.pth -o split.safetensors --heads 16 --force``
* ``cp model.pth copy.pth`` (baseline)

Targets: split time <= 3x cp time; split peak RSS <= 300 MiB + the largest attention layer
(qkv weight+bias + proj weight+bias). Then the split output is opened with
``safetensors.safe_open(framework="numpy")`` (no torch in this process, whose peak RSS every
child inherits) and its tensor count checked. Always exits 0.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inspect_bench  # sibling script: checkpoint builder, child measurement

MIB = 1024 * 1024
HEADS = 16
TARGET_TIME_RATIO, TARGET_BASE_MIB = 3.0, 300.0
ATTN_SUFFIXES = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias")


def measure(cmd: list[str], repeat: int, output: Path) -> tuple[float, float]:
    """Median wall seconds and max peak RSS (MiB) of ``cmd``; ``output`` is removed before
    every run (warm-up included) and kept after the last one."""
    runs: list[tuple[float, float]] = []
    for attempt in range(repeat + 1):
        output.unlink(missing_ok=True)
        result = inspect_bench.run_once(cmd)
        if attempt:  # attempt 0 is the untimed warm-up
            runs.append(result)
    return statistics.median(t for t, _ in runs), max(r for _, r in runs)


def tensor_nbytes(path: Path) -> dict[str, int]:
    """Data size of every tensor, from a safetensors header (no tensor bytes read)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, dict[str, list[int]]] = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {name: entry["data_offsets"][1] - entry["data_offsets"][0]
            for name, entry in header.items()}


def attention_layers(st: Path) -> dict[str, int]:
    """Attention layer prefix (``blocks.3.``) -> bytes of its qkv + proj weights and biases."""
    sizes: dict[str, int] = {}
    for name, nbytes in tensor_nbytes(st).items():
        for suffix in ATTN_SUFFIXES:
            if name.endswith(suffix):
                prefix = name[: -len(suffix)]
                sizes[prefix] = sizes.get(prefix, 0) + nbytes
    return sizes


def check_split_output(path: Path, layers: int) -> None:
    """Count the tensors of the split file: per layer H*(q,k,v weight+bias, o weight) + o.bias."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        keys: list[str] = list(handle.keys())
        meta: dict[str, str] = handle.metadata() or {}
    expected = layers * (HEADS * 7 + 1)
    heads = {k.split(".heads.")[1].split(".")[0] for k in keys if ".heads." in k}
    print(f"  {inspect_bench.verdict(len(keys) == expected)}  {path.name}: {len(keys)} tensors "
          f"(expected {layers} layers x ({HEADS} heads x 7 + o.bias) = {expected}), "
          f"{len(heads)} distinct head indices, {path.stat().st_size / 1e9:.3f} GB, "
          f"metadata format={meta.get('format')!r}")


def bench(pth: Path, st: Path, work: Path, repeat: int) -> None:
    layers = attention_layers(st)
    largest = max(layers.values())
    out, copy = work / "split.safetensors", work / "copy.pth"
    split_cmd = [sys.executable, "-m", "attnviz", "split-qkv", str(pth), "-o", str(out),
                 "--heads", str(HEADS), "--force"]
    print(f"\n{len(layers)} attention layers, largest {largest / MIB:.2f} MiB "
          "(qkv weight+bias + proj weight+bias)")
    print(f"one untimed warm-up run per command first (warm page cache), then median wall time "
          f"of {repeat} runs and max peak RSS (ru_maxrss via os.wait4, MiB); outputs deleted "
          "before each run\n")
    split = measure(split_cmd, repeat, out)
    try:
        base = measure(["cp", str(pth), str(copy)], repeat, copy)
    finally:
        copy.unlink(missing_ok=True)
    print(f"{'command':<58} {'median s':>9} {'peak MiB':>9}")
    for name, (secs, mib) in ((f"attnviz split-qkv {pth.name} --heads {HEADS}", split),
                              (f"cp {pth.name} {copy.name}", base)):
        print(f"{name:<58} {secs:>9.3f} {mib:>9.1f}")
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(floor: this process peaked at {floor:.1f} MiB, which every child inherits)")
    ratio = split[0] / base[0]
    print(f"split / cp time: {ratio:.2f}x\n\ntargets:")
    print(f"  {inspect_bench.verdict(ratio <= TARGET_TIME_RATIO)}  split time {split[0]:.3f} s "
          f"<= {TARGET_TIME_RATIO:g}x cp ({TARGET_TIME_RATIO * base[0]:.3f} s): {ratio:.2f}x")
    limit = TARGET_BASE_MIB + largest / MIB
    print(f"  {inspect_bench.verdict(split[1] <= limit)}  split peak RSS {split[1]:.1f} MiB "
          f"<= {TARGET_BASE_MIB:g} + {largest / MIB:.2f} = {limit:.1f} MiB")
    print("\nsanity check (output of the last timed split run):")
    try:
        check_split_output(out, len(layers))
    finally:
        out.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.2, help="checkpoint size (1e9 bytes)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per command")
    parser.add_argument("--keep", type=Path, help="write/reuse the checkpoint in this directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="attnviz-split-bench-") as tmp:
        model_dir = args.keep or Path(tmp)
        model_dir.mkdir(parents=True, exist_ok=True)
        pth, st = inspect_bench.ensure_files(model_dir, args.size_gb)
        bench(pth, st, Path(tmp), max(1, args.repeat))


if __name__ == "__main__":
    main()
