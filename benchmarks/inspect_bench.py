"""Benchmark ``attnviz inspect --json`` against loading the same checkpoint with torch/safetensors.

Run from the repository root::

    .venv/bin/python benchmarks/inspect_bench.py                # 1.2 GB, 3 repeats, temp dir
    .venv/bin/python benchmarks/inspect_bench.py --size-gb 2 --repeat 5 --keep /tmp/bench

It writes a GPT/ViT-like float32 state_dict (E=1024, ``blocks.{i}.attn.qkv`` ...) of at least
``--size-gb`` GB (10**9 bytes of tensor data) twice: as a torch zip (``torch.save``) and as
safetensors. ``--keep DIR`` writes them into DIR and reuses them on later runs. Then it times
every command as a child process (median of ``--repeat`` runs after one warm-up run each, so
the page cache is warm for all of them) and reads each child's peak RSS from ``os.wait4``.

Linux folds the parent's RSS high-water mark into a child's ``ru_maxrss`` at exec, so this
process never imports torch: the files are built by a child (``--build-into``), and the
parent's own peak RSS is printed as the floor under every child number. Always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMBED, VOCAB, CONTEXT = 1024, 50257, 1024
MIB = 1024 * 1024
TORCH_LOAD = "import torch; torch.load(p, mmap=True, weights_only=True)"
ST_LOAD = "from safetensors.torch import load_file; load_file(p)"
TARGET_S, TARGET_MIB, TARGET_SPEEDUP, TARGET_HELP_S = 0.5, 100.0, 4.0, 0.3


def build_files(out_dir: Path, size_gb: float) -> None:
    """Write model.pth and model.safetensors of >= size_gb GB (runs in a child process)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    e = EMBED
    state: dict[str, torch.Tensor] = {"tok_embed.weight": rand(VOCAB, e),
                                      "pos_embed.weight": rand(CONTEXT, e)}
    layer = 0
    while sum(t.nbytes for t in state.values()) + 2 * e * 4 < size_gb * 1e9:
        p = f"blocks.{layer}."
        state |= {
            p + "norm1.weight": torch.ones(e), p + "norm1.bias": torch.zeros(e),
            p + "attn.qkv.weight": rand(3 * e, e), p + "attn.qkv.bias": torch.zeros(3 * e),
            p + "attn.proj.weight": rand(e, e), p + "attn.proj.bias": torch.zeros(e),
            p + "norm2.weight": torch.ones(e), p + "norm2.bias": torch.zeros(e),
            p + "mlp.fc1.weight": rand(4 * e, e), p + "mlp.fc1.bias": torch.zeros(4 * e),
            p + "mlp.fc2.weight": rand(e, 4 * e), p + "mlp.fc2.bias": torch.zeros(e),
        }
        layer += 1
    state |= {"norm.weight": torch.ones(e), "norm.bias": torch.zeros(e)}
    total = sum(t.nbytes for t in state.values())
    print(f"built {layer} blocks, {len(state)} tensors, {total / 1e9:.3f} GB float32", flush=True)
    for name, save in (("model.pth", torch.save), ("model.safetensors", save_file)):
        tmp = out_dir / (name + ".partial")
        start = time.perf_counter()
        save(state, str(tmp))
        tmp.rename(out_dir / name)  # only complete files are reused by --keep
        print(f"wrote {name} in {time.perf_counter() - start:.1f} s", flush=True)


def ensure_files(out_dir: Path, size_gb: float) -> tuple[Path, Path]:
    pth, st = out_dir / "model.pth", out_dir / "model.safetensors"
    marker = out_dir / "size_gb.txt"
    fresh = marker.is_file() and marker.read_text().strip() == repr(size_gb)
    if fresh and pth.is_file() and st.is_file():
        print(f"reusing {pth} and {st}")
    else:
        print(f"building {size_gb} GB checkpoints in {out_dir} (takes a few minutes) ...",
              flush=True)
        cmd = [sys.executable, __file__, "--build-into", str(out_dir), "--size-gb", str(size_gb)]
        subprocess.run(cmd, check=True)
        marker.write_text(repr(size_gb))
    for path in (pth, st):
        print(f"  {path.name}: {path.stat().st_size / 1e9:.3f} GB")
    return pth, st


def run_once(cmd: list[str], stdout_file: int = subprocess.DEVNULL) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child run; exits loudly if the child fails."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout_file, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"command failed ({proc.returncode}): {cmd}\n{err.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def measure(cmd: list[str], repeat: int) -> tuple[float, float]:
    run_once(cmd)  # warm-up: page cache and .pyc files
    runs = [run_once(cmd) for _ in range(repeat)]
    return statistics.median(t for t, _ in runs), max(r for _, r in runs)


def check_inspect_output(path: Path) -> None:
    """Run inspect once with output kept, to show it really parsed the file."""
    with tempfile.TemporaryFile() as out:
        run_once([sys.executable, "-m", "attnviz", "inspect", str(path), "--json"], out.fileno())
        out.seek(0)
        doc = json.loads(out.read())
    print(f"  inspect {path.name}: format={doc['format']} tensors={doc['num_tensors']} "
          f"bytes={doc['total_bytes']} attention layers={len(doc['attention'])} "
          f"warnings={doc['warnings']}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.2, help="checkpoint size (1e9 bytes)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per command")
    parser.add_argument("--keep", type=Path, help="write/reuse the files in this directory")
    parser.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_into is not None:
        build_files(args.build_into, args.size_gb)
        return
    with tempfile.TemporaryDirectory(prefix="attnviz-bench-") as tmp:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        bench(*ensure_files(out_dir, args.size_gb), repeat=args.repeat)


def bench(pth: Path, st: Path, *, repeat: int) -> None:
    py = sys.executable
    print("\nsanity check (one run each, output parsed):")
    for path in (pth, st):
        check_inspect_output(path)
    print(f"\nbaselines: torch zip -> `{TORCH_LOAD}`\n"
          f"           safetensors -> `{ST_LOAD}`  (p = the file path, from sys.argv[1])")
    print(f"one untimed warm-up run per command first (warm page cache for all), then median "
          f"wall time of {repeat} runs and max peak RSS (ru_maxrss via os.wait4, MiB)\n")
    rows: list[tuple[str, float, float, str]] = []
    results: dict[str, tuple[float, float]] = {}
    for fmt, path, code in (("torch-zip", pth, TORCH_LOAD), ("safetensors", st, ST_LOAD)):
        ours = measure([py, "-m", "attnviz", "inspect", str(path), "--json"], repeat)
        base = measure([py, "-c", "import sys; p = sys.argv[1]; " + code, str(path)], repeat)
        results[fmt], results[fmt + " baseline"] = ours, base
        ratio = f"{base[0] / ours[0]:6.1f}x {base[1] / ours[1]:6.1f}x"
        rows += [(f"attnviz inspect {path.name} --json", *ours, ""),
                 (f"baseline {code.split(';')[-1].strip()[:44]}", *base, ratio)]
    help_run = measure([py, "-m", "attnviz", "--help"], repeat)
    rows.append(("attnviz --help", *help_run, ""))
    print(f"{'command':<58} {'median s':>9} {'peak MiB':>9}  {'base/attnviz time, RSS':>22}")
    for name, secs, mib, ratio in rows:
        print(f"{name:<58} {secs:>9.3f} {mib:>9.1f}  {ratio:>22}")
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(floor: this process peaked at {floor:.1f} MiB, which every child inherits)\n")

    print("targets:")
    for fmt in ("torch-zip", "safetensors"):
        secs, mib = results[fmt]
        print(f"  {verdict(secs <= TARGET_S)}  inspect {fmt}: {secs:.3f} s <= {TARGET_S} s")
        print(f"  {verdict(mib <= TARGET_MIB)}  inspect {fmt}: {mib:.1f} MiB <= {TARGET_MIB} MiB")
    speedup = results["torch-zip baseline"][0] / results["torch-zip"][0]
    print(f"  {verdict(speedup >= TARGET_SPEEDUP)}  inspect torch-zip {speedup:.1f}x faster than "
          f"torch.load(mmap=True, weights_only=True) (>= {TARGET_SPEEDUP}x)")
    print(f"  {verdict(help_run[0] <= TARGET_HELP_S)}  attnviz --help: {help_run[0]:.3f} s "
          f"<= {TARGET_HELP_S} s")


if __name__ == "__main__":
    main()
