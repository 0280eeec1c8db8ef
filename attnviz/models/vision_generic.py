"""Any ViT-like model through ``--model package.module:factory --image``: the factory builds the
module, the checkpoint's weights are loaded into it (as for sequences), it runs on the image
under ``capture_attention``, and the CLS row (or a ``--point``'s patch row) of every attention
layer over T tokens is drawn on the patch grid.

T = prefix + h * w: the prefix tokens (CLS, registers, distillation) come first, then the patch
grid row-major. ``--grid HxW`` and ``--prefix-tokens N`` say it; without them the grid is
inferred from the image size: the grids (H // p, W // p) for every patch size p that leave
0..MAX_AUTO_PREFIX tokens over. Exactly one must fit, or the error says what to pass.
"""

from __future__ import annotations

from collections import Counter

import torch

from attnviz.capture import AttentionMaps, capture_attention
from attnviz.checkpoint import Checkpoint
from attnviz.errors import UsageError, param
from attnviz.image_heatmap import Figure, ImageOptions, _vit_figure
from attnviz.image_inputs import parse_size, vit_image

MAX_AUTO_PREFIX = 8  # CLS + distillation + a few registers; more needs --prefix-tokens
DEFAULT_SIZE = 224


def _factors(count: int, aspect: float) -> tuple[int, int] | None:
    """The (rows, cols) with rows * cols == count closest to ``aspect`` = rows / cols."""
    pairs = [(r, count // r) for r in range(1, count + 1) if count % r == 0]
    return min(pairs, key=lambda p: abs(p[0] / p[1] - aspect)) if pairs else None


def token_grid(tokens: int, size: tuple[int, int], *, prefix: int | None = None,
               grid: tuple[int, int] | None = None) -> tuple[int, tuple[int, int], str]:
    """(prefix tokens, patch grid, how they were found) for maps over ``tokens`` tokens of
    an image of ``size`` (H, W) pixels; ``UsageError`` when they cannot be told."""
    height, width = size
    say = f"pass {param('prefix_tokens')} N and/or {param('grid')} HxW"
    if grid is not None:
        rest = tokens - grid[0] * grid[1]
        if rest < 0 or (prefix is not None and rest != prefix):
            raise UsageError(f"{param('grid')} {grid[0]}x{grid[1]}"
                             + (f" with {prefix} prefix tokens" if prefix is not None else "")
                             + f" does not fit attention over {tokens} tokens", param="grid")
        return rest, grid, "given"
    if prefix is not None:
        found = _factors(tokens - prefix, height / width) if tokens > prefix else None
        if found is None:
            raise UsageError(f"{param('prefix_tokens')} {prefix} leaves no patch grid in "
                             f"{tokens} tokens", param="prefix_tokens")
        return prefix, found, f"{prefix} prefix tokens given"
    fits: dict[tuple[int, int], int] = {}
    for patch in range(1, min(height, width) + 1):
        shape = (height // patch, width // patch)
        if 0 <= tokens - shape[0] * shape[1] <= MAX_AUTO_PREFIX:
            fits.setdefault(shape, tokens - shape[0] * shape[1])
    if len(fits) != 1:
        seen = ", ".join(f"{g[0]}x{g[1]} + {n}" for g, n in fits.items())
        why = f"several grids fit ({seen})" if fits else \
            f"no patch grid of the {width}x{height} input plus 0..{MAX_AUTO_PREFIX} tokens fits"
        raise UsageError(f"attention over {tokens} tokens: {why}", hint=say,
                         param="prefix_tokens")
    (found_grid, rest), = fits.items()
    return rest, found_grid, "inferred from the image size"


def factory_figure(ckpt: Checkpoint, options: ImageOptions
                   ) -> tuple[Figure, AttentionMaps, str]:
    """Build the factory's model, load the weights, run it on the image and draw the CLS
    figure over the patch grid its token count gives."""
    from attnviz.models.sources import load_factory_model

    assert options.factory is not None
    loaded = load_factory_model(options.factory, ckpt, strict=options.strict)
    size = parse_size(options.size) or DEFAULT_SIZE
    target = size if isinstance(size, tuple) else (size, size)
    image = vit_image(options.image, target, size, 1, normalize=options.normalize)
    with torch.no_grad(), capture_attention(loaded.model) as maps:
        loaded.model(image.tensor)
    square = Counter(maps[n].shape[-1] for n in maps if maps[n].shape[-1] == maps[n].shape[-2])
    if not square:
        raise UsageError(f"{param('factory')} {options.factory}: no self-attention over image "
                         "tokens was captured", param="factory")
    tokens = square.most_common(1)[0][0]
    names = [n for n in maps if tuple(maps[n].shape[-2:]) == (tokens, tokens)]
    pixels = image.pixels.shape[:2]
    prefix, grid, how = token_grid(tokens, (pixels[0], pixels[1]), prefix=options.prefix_tokens,
                                   grid=options.grid)
    patch = max(1, pixels[0] // grid[0])
    figure = _vit_figure(maps, names, grid, prefix, prefix > 0, patch, image.pixels, options,
                         to_input=image.to_input)
    if prefix:
        figure.notes.append(f"token 0 is taken as CLS; the other {prefix - 1} prefix tokens are "
                            "not drawn" if prefix > 1 else "token 0 is taken as CLS")
    figure.notes += loaded.notes
    description = (f"{loaded.description}: {len(names)} attention layers over {tokens} tokens ="
                   f" {prefix} prefix + {grid[0]}x{grid[1]} patches ({how})")
    return figure, maps, description
