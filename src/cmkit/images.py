"""Writing images: sample grids (PNG) and sample archives (NPZ), atomically."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmkit.data import to_uint8
from cmkit.errors import CmkitError


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


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path`` (same folder and suffix) to write before renaming over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is renamed over ``path``, on any failure
    removed. An OSError (a full disk, a folder that cannot be written) becomes a CmkitError naming ``path``."""
    try:
        tmp = atomic_path(path)
    except OSError as e:
        raise CmkitError(f"{path}: cannot be written ({e.strerror or e})") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise CmkitError(f"{path}: cannot be written ({e.strerror or e}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)


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
