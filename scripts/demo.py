"""The main job (`make demo`): run attnviz on every bundled sample checkpoint.

Writes into the output folder (default: demo_output/), and prints where everything went:
- per sample, the `inspect` table (`*.inspect.txt`) and JSON (`*.inspect.json`);
- per sample, `split-qkv --verify` per-head weights (`*.heads.safetensors`), and
  `merge-qkv` of them back to the packed tensors (`*.merged.safetensors`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"

# sample -> extra flags (the nn.Transformer state_dict does not carry its head count)
RUNS: dict[str, list[str]] = {
    "transformer_d64_h4.pth": ["--heads", "4"],
    "detr_tiny.pth": [],
    "qkv_encoder": [],
    "mha_kvdim.pth": ["--heads", "4"],
}


def attnviz(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "160"}
    done = subprocess.run([sys.executable, "-m", "attnviz", *args], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"attnviz {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "demo_output"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for sample, flags in RUNS.items():
        path = str(SAMPLES / sample)
        stem = Path(sample).stem
        table = attnviz("inspect", path, *flags)
        print(table)
        (out / f"{stem}.inspect.txt").write_text(table)
        (out / f"{stem}.inspect.json").write_text(attnviz("inspect", path, "--json", *flags))
        written += [out / f"{stem}.inspect.txt", out / f"{stem}.inspect.json"]
        heads_file = out / f"{stem}.heads.safetensors"
        merged_file = out / f"{stem}.merged.safetensors"
        print(attnviz("split-qkv", path, "-o", str(heads_file), "--verify", "--force", *flags))
        print(attnviz("merge-qkv", str(heads_file), "-o", str(merged_file), "--force"))
        written += [heads_file, merged_file]
    print(f"attnviz demo: wrote {len(written)} files to {out.resolve()}/")
    for output in written:
        print(f"  {output.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
