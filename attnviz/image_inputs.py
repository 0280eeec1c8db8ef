"""Loading images for the vision models: EXIF orientation, RGB conversion, the models' resizes,
ImageNet normalisation."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnviz.errors import UsageError, param

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PreparedImage:
    pixels: np.ndarray  # (H, W, 3) uint8, what the model saw (after resize/crop)
    tensor: torch.Tensor  # (1, 3, H, W) float, normalised
    original_size: tuple[int, int]  # (H, W) of the file, after EXIF orientation
    # original pixel (x, y) -> model input pixel: x * scale[1] - offset[1], y likewise
    scale: tuple[float, float] = (1.0, 1.0)  # (y, x) resize factors
    offset: tuple[int, int] = field(default=(0, 0))  # (top, left) of the centre crop

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """A pixel of the original image on the model's input (after resize and crop)."""
        return x * self.scale[1] - self.offset[1], y * self.scale[0] - self.offset[0]


def parse_size(text: str | None) -> tuple[int, int] | int | None:
    """'224' -> 224 (a side), '384x512' -> (384, 512) (height x width)."""
    if text is None:
        return None
    if re.fullmatch(r"\d+", text.strip()):
        return int(text)
    match = re.fullmatch(r"(\d+)[x,](\d+)", text.strip().lower())
    if not match:
        raise UsageError(f"{param('size')} '{text}': use N or HxW, e.g. 224 or 480x640",
                         param="size")
    return int(match.group(1)), int(match.group(2))


def open_rgb(path: Path) -> np.ndarray:
    """An (H, W, 3) uint8 array: EXIF orientation applied, grey/palette/RGBA made RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise UsageError(f"{param('image')} {path}: no such file", param="image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened)
                if image.mode in {"RGBA", "LA", "P", "PA"}:
                    image = image.convert("RGBA")
                    backdrop = Image.new("RGBA", image.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(backdrop, image)  # transparent -> white
                return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise UsageError(f"{param('image')} {path}: cannot be read as an image ({exc})",
                         param="image") from exc


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    height, width = size
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))


def _tensor(pixels: np.ndarray, normalize: bool,
            mean: tuple[float, float, float] | None = None,
            std: tuple[float, float, float] | None = None) -> torch.Tensor:
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    if normalize:
        x = (x - torch.tensor(mean or IMAGENET_MEAN)[:, None, None]) / torch.tensor(
            std or IMAGENET_STD)[:, None, None]
    return x.unsqueeze(0)  # (1, 3, H, W)


def vit_image(path: Path, model_size: tuple[int, int], size: tuple[int, int] | int | None,
              patch: int, *, normalize: bool = True,
              mean: tuple[float, float, float] | None = None,
              std: tuple[float, float, float] | None = None) -> PreparedImage:
    """Resize (shorter side) and centre-crop to the model's size, or to ``--size``
    (normalised with ``mean``/``std``, ImageNet's by default)."""
    pixels = open_rgb(path)
    original = pixels.shape[:2]
    if isinstance(size, tuple):
        target = size
    else:
        side = size or min(model_size)
        target = (side, side) if size else model_size
    target = (max(patch, target[0] // patch * patch), max(patch, target[1] // patch * patch))
    height, width = pixels.shape[:2]
    scale = max(target[0] / height, target[1] / width)  # cover the target, then crop
    resized = _resize(pixels, (max(target[0], round(height * scale)),
                               max(target[1], round(width * scale))))
    top = (resized.shape[0] - target[0]) // 2
    left = (resized.shape[1] - target[1]) // 2
    cropped = resized[top:top + target[0], left:left + target[1]]
    return PreparedImage(cropped, _tensor(cropped, normalize, mean, std),
                         (original[0], original[1]),
                         (resized.shape[0] / height, resized.shape[1] / width), (top, left))


def detr_image(path: Path, size: tuple[int, int] | int | None, *, normalize: bool = True,
               shorter: int = 800, longest: int = 1333) -> PreparedImage:
    """DETR's evaluation resize: shorter side 800, longer side at most 1333 (or ``--size``)."""
    pixels = open_rgb(path)
    height, width = pixels.shape[:2]
    if isinstance(size, tuple):
        target = size
    else:
        side = size or shorter
        short, long = min(height, width), max(height, width)
        if long / short * side > longest:
            side = round(longest * short / long)
        if width < height:
            target = (int(side * height / width), side)
        else:
            target = (side, int(side * width / height))
    resized = _resize(pixels, target)
    return PreparedImage(resized, _tensor(resized, normalize), (height, width),
                         (target[0] / height, target[1] / width))
