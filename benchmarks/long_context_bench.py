"""Long contexts: attnviz heatmap/report against plain transformers eager, side by side.

Run from the repository root::

    .venv/bin/python benchmarks/long_context_bench.py                  # 1k..16k tokens
    .venv/bin/python benchmarks/long_context_bench.py --lengths 1024 2048 --cap-gb 12

A random-weight LLaMA (hidden 512, 8 layers, 8 heads, 2 kv heads) is written with
``save_pretrained`` into a temp dir by a child process. For each length, every command runs as
its own child process and is measured whole: wall time and peak RSS (``os.wait4``'s
``ru_maxrss``). A watchdog kills a child whose RSS passes ``--cap-gb`` (reported as OOM) or
that runs past ``--timeout`` (too slow). This process never imports torch, so its own RSS
(printed) is the floor under every child's figure.

Measured: ``attnviz heatmap`` (full layer x head grid), ``attnviz heatmap --query last``,
``attnviz report``, the capture alone (``capture_attention`` keeping every map, around
``model(ids)``, no rendering), the streamed capture alone (pooled to the grid's cells) and plain
transformers eager ``output_attentions=True`` (no rendering). Targets: heatmap grid <= 1.3x the
capture-alone time; at 16k tokens ``--query last`` and report within 4 GB. Always exits 0.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 512, 8, 8, 2, 32000
GB = 1024 ** 3
BLOCK_MIB = 64  # attnviz.tiling.DEFAULT_BLOCK_VALUES float32 values
GRID_CELL = 160  # pixels per grid cell, what the streamed capture pools to

CHILD_CAPTURE = """
import sys, time, torch, transformers
from attnviz.capture import capture_attention
from attnviz.reducers import PooledMaps
path, ids_file, mode = sys.argv[1:4]
ids = torch.tensor([[int(t) for t in open(ids_file).read().split(",")]])
impl = "eager" if mode == "eager" else "sdpa"
model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()
start = time.perf_counter()
with torch.no_grad():
    if mode == "eager":
        out = model(ids, output_attentions=True)
        kept = sum(a.numel() for a in out.attentions)
    elif mode == "capture":
        with capture_attention(model) as maps:
            model(ids)
        kept = sum(m.numel() for m in maps.values())
    else:
        pooled = PooledMaps(CELL, CELL)
        with capture_attention(model, reduce=pooled):
            model(ids)
        kept = sum(m.numel() for m in pooled.maps.values())
print(f"forward {time.perf_counter() - start:.2f}s kept {kept * 4 / 2**20:.0f} MiB")
""".replace("CELL", str(GRID_CELL))


def build_model(out_dir: Path) -> None:
    """Write the random LLaMA (runs in a child process)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      intermediate_size=4 * HIDDEN, vocab_size=VOCAB,
                                      max_position_embeddings=32768)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir)


def run(cmd: list[str], cap_bytes: int, timeout: float) -> tuple[str, float, float]:
    """(status, wall seconds, peak RSS GiB) of one child, killed past the caps."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    verdict: list[str] = []

    def watch() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                rss = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                           if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                return
            if rss > cap_bytes:
                verdict.append("OOM")
                proc.kill()
                return
            if time.perf_counter() - start > timeout:
                verdict.append("too slow")
                proc.kill()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    watcher.join(1)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if verdict:
        return verdict[0], wall, usage.ru_maxrss / 1024 / 1024
    if status != 0:
        return "failed: " + (err.strip().splitlines() or ["?"])[-1][:80], wall, \
            usage.ru_maxrss / 1024 / 1024
    return "ok", wall, usage.ru_maxrss / 1024 / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--cap-gb", type=float, default=16.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--only", nargs="+", metavar="WORD",
                        help="run only the commands whose name holds one of these words "
                             "(e.g. --only query report eager)")
    parser.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_into:
        build_model(args.build_into)
        return
    attnviz = str(Path(sys.executable).with_name("attnviz"))
    cap = int(args.cap_gb * GB)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "llama"
        subprocess.run([sys.executable, __file__, "--build-into", str(model)], check=True)
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"LLaMA hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads ({KV_HEADS} kv), "
              f"random weights ({weights / 2**20:.0f} MiB); one layer's streamed work: a "
              f"score block and its probabilities, 2 x {BLOCK_MIB} MiB at most; "
              f"this process's own peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
              f"caps {args.cap_gb:g} GiB, {args.timeout:g} s\n")
        print(f"{'tokens':>6}  {'command':<34} {'status':<10} {'wall s':>7} {'peak GiB':>9} "
              f"{'vs capture':>10}")
        for length in args.lengths:
            ids_file = Path(tmp) / f"ids_{length}.txt"
            ids = [str((i * 7919 + 13) % VOCAB) for i in range(length)]
            ids_file.write_text(",".join(ids))
            tokens = ",".join(ids)
            out = Path(tmp) / "out"
            out.mkdir(exist_ok=True)
            commands = {
                "capture alone (all maps kept)": [sys.executable, "-c", CHILD_CAPTURE,
                                                  str(model), str(ids_file), "capture"],
                "capture alone (streamed, pooled)": [sys.executable, "-c", CHILD_CAPTURE,
                                                     str(model), str(ids_file), "stream"],
                "attnviz heatmap (grid)": [attnviz, "heatmap", str(model), "--tokens", tokens,
                                           "-o", str(out / "grid.png"), "--force"],
                "attnviz heatmap --query last": [attnviz, "heatmap", str(model), "--tokens",
                                                 tokens, "--query", "last",
                                                 "-o", str(out / "last.png"), "--force"],
                "attnviz report": [attnviz, "report", str(model), "--tokens", tokens,
                                   "-o", str(out / "report.html"), "--force"],
                "transformers eager attentions": [sys.executable, "-c", CHILD_CAPTURE,
                                                  str(model), str(ids_file), "eager"],
            }
            baseline: float | None = None
            for name, cmd in commands.items():
                if args.only and not any(word in name for word in args.only):
                    continue
                status, wall, peak = run(cmd, cap, args.timeout)
                if name.startswith("capture alone") and status == "ok" and baseline is None:
                    baseline = wall  # the full capture, or the streamed one where that died
                ratio = f"{wall / baseline:.2f}x" if baseline and status == "ok" else "-"
                print(f"{length:>6}  {name:<34} {status:<10} {wall:>7.1f} {peak:>9.2f} "
                      f"{ratio:>10}", flush=True)
            print()


if __name__ == "__main__":
    main()
