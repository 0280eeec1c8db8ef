"""Train the 2-layer attention-only sample that grows induction heads (issue 15's known heads).

    .venv/bin/python scripts/train_induction.py [--out sample_checkpoints/induction_2l.safetensors]

A TransformerLens-layout model (``attnviz.models.lens``: attention-only, 2 layers, 4 heads of
16, width 64, LayerNorm, learned positions, vocabulary 128, 128 positions) trained seeded on
rows of random tokens in which a segment of random length (4 to 32 tokens) is repeated after
a random gap, from a random start. The loss is on the predictable tokens only (the second copy
after its first token). Lengths, gaps and starts all vary, so the copy can only be found by
content: a previous-token head in layer 0 and an induction head in layer 1, which such models
are known to grow (here around step 1100), never a fixed-offset positional shortcut.

The file is the model's ``state_dict`` as HookedTransformer would save it (mask and IGNORE
buffers included), in safetensors. Deterministic for a given torch build and ``--threads``
(default 1): the same build rewrites the file bit for bit. 3000 steps take about 7 minutes on
one free core (more on a busy machine); the heads' scores on a held-out probe are printed at
the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from safetensors.torch import save_file

from attnviz.capture import capture_attention
from attnviz.head_stats import Diagonal, HeadStatistics
from attnviz.models.lens import LensConfig, LensModel

VOCAB, LENGTH, WIDTH, HEADS, LAYERS = 128, 128, 64, 4, 2
SPANS = (4, 32)  # segment lengths, inclusive
CONFIG = LensConfig(n_layers=LAYERS, d_model=WIDTH, n_heads=HEADS, d_head=WIDTH // HEADS,
                    d_vocab=VOCAB, n_ctx=LENGTH, d_mlp=None, normalization_type="LN",
                    buffers=True)


def batch(gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, L) with one repeated segment each, and the loss weight of each target
    (N, L - 1): 1 where the token is predictable from the earlier copy.

    The segment's length, the gap to its copy and where it starts are all random, so no
    offset predicts the copy."""
    ids = torch.randint(0, VOCAB, (size, LENGTH), generator=gen)  # (N, L)
    weight = torch.zeros(size, LENGTH - 1)  # target t is ids[:, t + 1]

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    for row in range(size):
        span = draw(*SPANS)
        gap = draw(0, LENGTH - 2 * span)
        start = draw(0, LENGTH - 2 * span - gap)
        copy = start + span + gap
        ids[row, copy:copy + span] = ids[row, start:start + span]
        weight[row, copy:copy + span - 1] = 1.0  # predicting ids[copy + 1 .. copy + span - 1]
    return ids, weight


def probe(seed: int, size: int = 16, span: int = 40) -> torch.Tensor:
    """A block of ``span`` random tokens repeated twice (N, 2 * span)."""
    block = torch.randint(0, VOCAB, (size, span), generator=torch.Generator().manual_seed(seed))
    return torch.cat([block, block], dim=1)


def head_scores(model: LensModel, seed: int = 99, span: int = 40) -> dict[str, torch.Tensor]:
    """Per layer: previous-token mass and induction mass (H,) on the probe, as attnviz
    captures them."""
    ids = probe(seed, span=span)
    stats = HeadStatistics(probes={"induction": Diagonal(-(span - 1), span, 2 * span)})
    with torch.no_grad(), capture_attention(model, reduce=stats):
        model(ids)
    return {f"{name} {stat}": layer.values[stat] for name, layer in stats.layers.items()
            for stat in ("previous", "induction")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path,
                        default=Path("sample_checkpoints/induction_2l.safetensors"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    model = LensModel(CONFIG)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr,
                                                   total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(1)
    held_out, held_weight = batch(torch.Generator().manual_seed(2), 256)
    start = time.perf_counter()
    for step in range(args.steps):
        ids, weight = batch(gen, args.batch)
        logits = model(ids)[:, :-1]  # (N, L - 1, V): predictions of ids[:, 1:]
        losses = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                                 reduction="none").view_as(weight)
        loss = (losses * weight).sum() / weight.sum()
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps - 1:
            with torch.no_grad():
                right = model(held_out)[:, :-1].argmax(-1) == held_out[:, 1:]  # (N, L - 1)
                accuracy = (right.float() * held_weight).sum() / held_weight.sum()
            print(f"step {step:5d} loss {loss.item():.3f} copy accuracy {accuracy.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    for name, values in head_scores(model).items():
        print(f"{name:>24}: {[round(v, 3) for v in values.tolist()]}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for layer in range(LAYERS):  # HookedTransformer's masked-score constant, kept like its files
        state[f"blocks.{layer}.attn.IGNORE"] = torch.tensor(-torch.inf)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"format": "pt"})
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
