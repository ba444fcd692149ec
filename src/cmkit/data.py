"""Datasets as uint8 tensors, a stateless resumable sampler, and the pixel <-> model range maps.

``load_dataset`` accepts a known name (fashion-mnist, mnist, cifar10) or a path (a CIFAR-10 python
archive or its folder, a folder of IDX files, or a folder of images) and returns every image conformed
to one square resolution and channel count. ``batch_indices`` is a pure function of (seed, position in
the item stream), so a run resumed at any images-seen count draws exactly the batches it would have.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from cmkit.errors import CmkitError
from cmkit.readers import (
    CIFAR_CLASSES,
    cifar_in,
    find_idx_file,
    idx_names,
    locate_cifar,
    locate_idx,
    one_line,
    read_cifar_split,
    read_idx_split,
)
from cmkit.rng import derive_seed

__all__ = [
    "KNOWN_DATASETS",
    "ImageData",
    "batch_indices",
    "list_images",
    "load_dataset",
    "read_image",
    "to_model_range",
    "to_uint8",
]

KNOWN_DATASETS: dict[str, tuple[int, int]] = {
    "fashion-mnist": (28, 1),
    "mnist": (28, 1),
    "cifar10": (32, 3),
}

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS: tuple[str, ...] = ("train", "test")
PROGRESS_THRESHOLD = 1000  # show a progress bar when converting more images than this


@dataclass(frozen=True)
class ImageData:
    """A whole dataset in memory.

    ``images`` is uint8 [N, C, H, W] with C in {1, 3}; ``labels`` is int64 [N] with values in
    [0, num_classes), or None (then ``num_classes`` is 0); ``name`` is the dataset name or source path.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N, 1|3, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels is None:
            if self.num_classes != 0:
                raise ValueError("num_classes must be 0 when there are no labels")
        elif self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Entry point


def load_dataset(source: str, *, resolution: int, channels: int, split: str = "train") -> ImageData:
    """Load ``source`` (a name in KNOWN_DATASETS, else a path) as uint8 [N, channels, resolution, resolution].

    Known names are looked up in $CMKIT_DATA, the system dataset folder, the user cache, and finally
    downloaded into the cache. A path may be a CIFAR-10 ``.tar.gz`` or its folder, a folder of IDX
    files, or a folder of images (all of it is the training split; any other ``split`` of one raises
    CmkitError). Images of another size are resized (shorter side to ``resolution``, LANCZOS) and
    centre-cropped; channels are converted with Pillow's L / RGB modes. Every problem with the input raises CmkitError.
    """
    _check_options(resolution=resolution, channels=channels, split=split)
    if source in KNOWN_DATASETS:
        return _load_known(source, resolution=resolution, channels=channels, split=split)
    path = Path(source).expanduser()
    if not path.exists():
        raise CmkitError(f"dataset {source!r} is neither a known name ({', '.join(KNOWN_DATASETS)}) "
                         f"nor an existing file or folder")
    return _load_path(path, resolution=resolution, channels=channels, split=split)


def _check_options(*, resolution: int, channels: int, split: str) -> None:
    if not isinstance(resolution, int) or resolution < 1:
        raise CmkitError(f"resolution must be a positive integer, got {resolution!r}")
    if channels not in (1, 3):
        raise CmkitError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if split not in SPLITS:
        raise CmkitError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def _load_known(name: str, *, resolution: int, channels: int, split: str) -> ImageData:
    if name == "cifar10":
        source = locate_cifar()
        return _load_cifar(source, resolution=resolution, channels=channels, split=split, name=name)
    folder = locate_idx(name, split)
    return _load_idx(folder, resolution=resolution, channels=channels, split=split, name=name)


def _load_path(path: Path, *, resolution: int, channels: int, split: str) -> ImageData:
    options: dict[str, Any] = {"resolution": resolution, "channels": channels}
    if path.is_file():
        if path.name.lower().endswith((".tar.gz", ".tgz")):
            return _load_cifar(path, split=split, name=str(path), **options)
        raise CmkitError(f"dataset path {path} is a file; expected a folder of images, a folder of IDX "
                         f"files, or a CIFAR-10 python archive (.tar.gz)")
    cifar = cifar_in(path)
    if cifar is not None:
        return _load_cifar(cifar, split=split, name=str(path), **options)
    if any(find_idx_file(path, base) for base in idx_names("train") + idx_names("test")):
        return _load_idx(path, split=split, name=str(path), **options)
    if split != "train":
        raise CmkitError(f"{path}: a folder of images has no '{split}' split (IDX folders and CIFAR-10 archives do)")
    return _load_image_folder(path, **options)


# ----------------------------------------------------------------------------------------------------------
# Shared conversion


def _conform_array(arr: np.ndarray, *, resolution: int, channels: int, desc: str) -> torch.Tensor:
    """uint8 [N, C, H, W] (C in {1, 3}) -> uint8 [N, channels, resolution, resolution].

    At native size and channels this only wraps the array (no per-image work); gray -> RGB at native
    size is a channel repeat (what Pillow's L -> RGB does); anything else goes through Pillow per image.
    """
    n, c, h, w = arr.shape
    if (h, w) == (resolution, resolution) and c == channels:
        return torch.from_numpy(np.ascontiguousarray(arr))
    if (h, w) == (resolution, resolution) and (c, channels) == (1, 3):
        return torch.from_numpy(np.ascontiguousarray(arr)).repeat(1, 3, 1, 1)
    out = torch.empty((n, channels, resolution, resolution), dtype=torch.uint8)
    for i in tqdm(range(n), desc=desc, unit="img", disable=n <= PROGRESS_THRESHOLD):
        img = Image.fromarray(arr[i, 0] if c == 1 else arr[i].transpose(1, 2, 0))
        img = _conform_image(img, resolution=resolution, channels=channels)
        out[i] = torch.from_numpy(_image_to_chw(img))
    return out


def _conform_image(img: Image.Image, *, resolution: int, channels: int) -> Image.Image:
    """Any Pillow image -> mode L (channels 1) or RGB (channels 3), resolution x resolution."""
    return _resize_crop(_to_mode(img, channels=channels), resolution=resolution)


def _to_mode(img: Image.Image, *, channels: int) -> Image.Image:
    """Convert to L or RGB: 16/32-bit gray scaled to 8 bits, alpha and palettes composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        img = _wide_gray_to_l(img)
    elif img.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
        img = _composite_on_white(img)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
    """16-bit ("I;16*") or 32-bit ("I") grayscale, read as 16-bit values, -> 8-bit L (v / 257, rounded)."""
    values = np.asarray(img).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Palette or alpha image -> RGB, transparent pixels over a white background."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _resize_crop(img: Image.Image, *, resolution: int) -> Image.Image:
    """Scale the shorter side to ``resolution`` (LANCZOS), then crop the centre square."""
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _image_to_chw(img: Image.Image) -> np.ndarray:
    """L or RGB image -> uint8 [C, H, W]."""
    arr = np.array(img, dtype=np.uint8)  # a writable copy, so torch.from_numpy is safe
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------
# Format readers (cmkit.readers) wrapped as ImageData


def _load_idx(folder: Path, *, resolution: int, channels: int, split: str, name: str) -> ImageData:
    """Images and labels of ``split`` in ``folder``'s IDX files; num_classes = max(10, top label + 1)."""
    images, labels, labels_path = read_idx_split(folder, split)
    num_classes = max(10, int(labels.max()) + 1)  # MNIST-family files have 10 classes; more if labels say so
    tensor = _conform_array(images[:, None], resolution=resolution, channels=channels,
                            desc=f"converting {name}")
    return ImageData(tensor, _check_labels(labels, num_classes, labels_path), num_classes, name)


def _load_cifar(source: Path, *, resolution: int, channels: int, split: str, name: str) -> ImageData:
    """CIFAR-10 ``split`` from an archive or batch folder."""
    images, labels = read_cifar_split(source, split)
    tensor = _conform_array(images, resolution=resolution, channels=channels, desc=f"converting {name}")
    return ImageData(tensor, _check_labels(labels, CIFAR_CLASSES, source), CIFAR_CLASSES, name)


def _check_labels(labels: np.ndarray, num_classes: int, source: Path | str) -> torch.Tensor:
    """uint8/int labels -> int64 [N], each in [0, num_classes)."""
    out = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if len(out) and (int(out.min()) < 0 or int(out.max()) >= num_classes):
        raise CmkitError(f"labels in {source} range over [{int(out.min())}, {int(out.max())}]; "
                         f"expected values in [0, {num_classes})")
    return out


# ----------------------------------------------------------------------------------------------------------
# Folder of images


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, in sorted path order; hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _folder_labels(root: Path, files: list[Path]) -> tuple[torch.Tensor | None, int]:
    """Class = index of the sorted first-level subfolder, when every image lies in one of >= 2 of them."""
    rel = [f.relative_to(root).parts for f in files]
    if any(len(parts) != 2 for parts in rel):
        return None, 0
    classes = sorted({parts[0] for parts in rel})
    if len(classes) < 2:
        return None, 0
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[parts[0]] for parts in rel], dtype=torch.int64), len(classes)


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


def read_image(path: Path, *, channels: int, resolution: int | None = None) -> np.ndarray:
    """Open and fully decode one image file -> uint8 [channels, H, W] (Pillow's L or RGB conversion).

    With ``resolution``, the image is also resized and centre-cropped to resolution x resolution;
    without, it keeps its own size. An unreadable file raises CmkitError naming it.
    """
    try:
        with Image.open(path) as img:
            return _decode(img, channels=channels, resolution=resolution)
    except _DECODE_ERRORS as err:
        raise CmkitError(f"cannot read image {path}: {one_line(err)}; expected a readable {_kinds()} image") from err


def conform_image_bytes(data: bytes, *, channels: int, resolution: int, max_pixels: int, name: str) -> np.ndarray:
    """An image file's bytes (an upload) -> uint8 [channels, resolution, resolution], as :func:`read_image`.

    An image of more than ``max_pixels`` pixels is refused before it is decoded; errors name it ``name``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise CmkitError(f"{name}: an image of {img.width} x {img.height} pixels is too large; expected "
                                 f"at most {max_pixels:,} pixels")
            return _decode(img, channels=channels, resolution=resolution)
    except UnidentifiedImageError:
        raise CmkitError(f"{name} is not an image (unrecognised format); expected a {_kinds()} image") from None
    except _DECODE_ERRORS as err:
        raise CmkitError(f"cannot read {name}: {one_line(err)}; expected a readable {_kinds()} image") from err


def _decode(img: Image.Image, *, channels: int, resolution: int | None) -> np.ndarray:
    img.load()
    oriented = _to_mode(ImageOps.exif_transpose(img), channels=channels)
    return _image_to_chw(oriented if resolution is None else _resize_crop(oriented, resolution=resolution))


def _kinds() -> str:
    return "/".join(e.lstrip(".").upper() for e in IMAGE_EXTENSIONS)


def _load_image_folder(root: Path, *, resolution: int, channels: int) -> ImageData:
    """Every image under ``root`` conformed to [channels, resolution, resolution]; labels from subfolders."""
    files = list_images(root)
    if not files:
        raise CmkitError(f"no images found in folder {root}; expected files with extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)} (case-insensitive, searched recursively)")
    labels, num_classes = _folder_labels(root, files)
    out = torch.empty((len(files), channels, resolution, resolution), dtype=torch.uint8)
    bar = tqdm(files, desc=f"loading {root}", unit="img", disable=len(files) <= PROGRESS_THRESHOLD)
    for i, path in enumerate(bar):
        out[i] = torch.from_numpy(read_image(path, resolution=resolution, channels=channels))
    return ImageData(out, labels, num_classes, str(root))


# ----------------------------------------------------------------------------------------------------------
# Sampler


def batch_indices(num_items: int, batch_size: int, *, seed: int, start: int) -> torch.Tensor:
    """int64 [batch_size] item indices at stream positions [start, start + batch_size).

    The stream is an endless sequence of epochs; epoch e is a permutation of range(num_items) drawn
    from a generator seeded by (seed, e). Pure: ``start = k * batch_size`` gives the k-th batch, so a
    resumed run continues exactly. A batch may span epoch boundaries.
    """
    if num_items < 1 or batch_size < 1 or start < 0:
        raise ValueError(f"need num_items >= 1, batch_size >= 1, start >= 0; got {num_items}, "
                         f"{batch_size}, {start}")
    parts, pos, end = [], start, start + batch_size
    while pos < end:
        epoch, offset = divmod(pos, num_items)
        take = min(end - pos, num_items - offset)
        parts.append(_epoch_permutation(num_items, seed, epoch)[offset:offset + take])
        pos += take
    return torch.cat(parts)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """int64 [num_items] permutation for one epoch; cached, so callers must not modify it."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(num_items, generator=generator)


# ----------------------------------------------------------------------------------------------------------
# Pixel ranges and augmentation


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] in [0, 255] -> float32 in [-1, 1] as ``x / 127.5 - 1``."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_model_range expects uint8 images, got {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] -> uint8 in [0, 255]: ``round((x + 1) * 127.5)`` clamped; NaN maps to 0.

    Exact inverse of ``to_model_range`` on all 256 uint8 values.
    """
    scaled = ((x.to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255)
    return torch.nan_to_num(scaled, nan=0.0).to(torch.uint8)
