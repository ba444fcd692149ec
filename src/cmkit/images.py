"""Writing images: sample grids (PNG) and sample archives (NPZ), atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmkit.data import to_uint8
from cmkit.files import atomic_write


def to_numpy_images(x: torch.Tensor) -> np.ndarray:
    """Model-range images float [N, C, H, W] in [-1, 1] -> uint8 numpy [N, H, W, C]."""
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, *, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 [N, H, W, C] images into one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
    n, h, w, c = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
    return out


def save_images(images: np.ndarray, path: Path) -> None:
    """Write uint8 [N, H, W, C] images as a ``.png`` grid or an ``.npz`` holding ``images``, atomically."""
    if path.suffix != ".npz":
        save_png(grid(images), path)
        return
    with atomic_write(path) as tmp:
        np.savez(tmp, images=images)


def save_png(image: np.ndarray, path: Path) -> None:
    """Write one uint8 [H, W, C] image (C in {1, 3}) as a PNG, atomically."""
    with atomic_write(path) as tmp:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
