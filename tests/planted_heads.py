"""A one-layer HF GPT-2 whose four heads are planted by hand: head 0 attends to the previous
position, head 1 to the first, head 2 to itself, head 3 uniformly (over what the causal mask
lets it see).

Token embeddings are zero, so the block sees only the position embeddings. Position i is
``e_i - e_{P+i}`` (P = n_positions): every position has mean 0 and the same norm, so ln_1
scales each by the same factor s = 1/sqrt(2/E + eps) and its output is s (e_i - e_{P+i}),
plus ln_1's bias, set to 1 in the last dimension: a constant the first-token head queries with.
Each head's q/k read one-hot positions, so each score is a multiple of a 0/1 pattern."""

from __future__ import annotations

from pathlib import Path

import torch

POSITIONS = 16
EMBED = 64
HEADS = 4  # head dim 16 = POSITIONS
GAIN = 3.0  # q and k weights: the planted score is (GAIN * s)^2 / sqrt(d) = 72


def planted_maps(length: int) -> torch.Tensor:
    """The same four heads as probabilities (1, 4, L, L), for tests that feed maps directly:
    previous-token, first-token, self and uniform over the causal prefix."""
    maps = torch.zeros(1, 4, length, length)
    for i in range(length):
        maps[0, 0, i, max(0, i - 1)] = 1.0
        maps[0, 1, i, 0] = 1.0
        maps[0, 2, i, i] = 1.0
        maps[0, 3, i, :i + 1] = 1.0 / (i + 1)
    return maps


def planted_gpt2(directory: Path) -> Path:
    """Save the planted model with ``save_pretrained``; returns the directory."""
    transformers = __import__("transformers")
    config = transformers.GPT2Config(vocab_size=8, n_positions=POSITIONS, n_embd=EMBED,
                                     n_layer=1, n_head=HEADS, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    d = EMBED // HEADS
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for i in range(POSITIONS):
            model.wpe.weight[i, i] = 1.0
            model.wpe.weight[i, POSITIONS + i] = -1.0
        block = model.h[0]
        block.ln_1.weight.fill_(1.0)
        block.ln_1.bias[EMBED - 1] = 1.0
        block.ln_2.weight.fill_(1.0)
        model.ln_f.weight.fill_(1.0)
        qkv = block.attn.c_attn.weight  # Conv1D (in, 3E): x @ W; q | k | v blocked
        q, k = qkv[:, :EMBED], qkv[:, EMBED:2 * EMBED]  # views: (E_in, E_out)
        for i in range(POSITIONS):  # d = POSITIONS: one q/k dimension per position
            q[i, 0 * d + i] = GAIN  # head 0: position i asks for i - 1, which answers at i
            if i + 1 < POSITIONS:
                k[i, 0 * d + i + 1] = GAIN
            q[i, 2 * d + i] = GAIN  # head 2: position i asks for itself
            k[i, 2 * d + i] = GAIN
        q[EMBED - 1, 1 * d] = GAIN * 6  # head 1: a constant query, answered by position 0
        k[0, 1 * d] = GAIN
        # head 3: q = k = 0, every score equal: uniform over the keys it may see
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory
