"""Captioned image folders and their cache of latents and text embeddings.

A folder of images (.png, .jpg, .jpeg, .webp, .bmp) with captions either in a ``metadata.jsonl`` (one JSON object
a line with ``file_name`` and ``text``: the Hugging Face image-folder convention) or in a ``.txt`` file beside
each image (``cat.png`` and ``cat.txt``, UTF-8). Captions may be empty or hold any Unicode; an image without a
caption is refused in one line naming it. Images are converted to RGB, resized (shorter side, Lanczos) to the
resolution and centre-cropped.

The cache (``latents.safetensors`` in the run directory) holds, per image, the mean and standard deviation of the
VAE's q(z | x) and the index of its caption; the text encoder's embedding of each distinct caption once; and the
empty caption's (the unconditional embedding), all float32. It is computed once and reused on ``--resume`` when its
key (the image files' names, sizes and modification times, the captions, the resolution and the teacher's VAE, text
encoder and tokenizer files) matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from cmkit import data
from cmkit.errors import CmkitError
from cmkit.files import atomic_write

CACHE_NAME = "latents.safetensors"
CACHE_KEYS = ("caption", "mean", "null", "std", "text")  # what build_cache returns


def read_captions(folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a captioned folder, sorted by file name; CmkitError for a missing folder,
    a malformed metadata.jsonl, a row naming no image, or an image without a caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CmkitError(f"--data {folder}: no such folder; expected a folder of captioned images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in data.IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise CmkitError(f"--data {folder}: no images ({', '.join(data.IMAGE_EXTENSIONS)})")
    meta = folder / "metadata.jsonl"
    captions = _metadata(meta, folder) if meta.is_file() else {}
    pairs = []
    for image in images:
        if image.name in captions:
            pairs.append((image, captions[image.name]))
        elif image.with_suffix(".txt").is_file():
            pairs.append((image, image.with_suffix(".txt").read_text(encoding="utf-8").strip()))
        else:
            raise CmkitError(f"{image}: no caption (no row in {meta.name} and no {image.with_suffix('.txt').name}); "
                             "every image needs one (an empty caption is fine)")
    return pairs


def _metadata(path: Path, folder: Path) -> dict[str, str]:
    """file_name -> text of a metadata.jsonl."""
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (ValueError, KeyError, TypeError):
            raise CmkitError(f"{path}, line {n}: expected a JSON object with file_name and text") from None
        if not isinstance(name, str) or not isinstance(text, str):
            raise CmkitError(f"{path}, line {n}: file_name and text must be strings")
        if not (folder / name).is_file():
            raise CmkitError(f"{path}, line {n}: file_name {name!r} is not a file in {folder}")
        captions[name] = text
    return captions


def cache_key(pairs: list[tuple[Path, str]], resolution: int, teacher: Path) -> str:
    """sha256 over what the cache depends on (see the module docstring)."""
    h = hashlib.sha256(f"{resolution}".encode())
    for path, text in pairs:
        st = path.stat()
        h.update(json.dumps([path.name, st.st_size, st.st_mtime_ns, text]).encode())
    for part in ("vae", "text_encoder", "tokenizer"):
        for f in sorted((teacher / part).iterdir()):
            st = f.stat()
            h.update(json.dumps([part, f.name, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def read_cache(path: Path, key: str) -> dict[str, Tensor] | None:
    """The cached tensors when ``path`` holds a cache of ``key`` with :data:`CACHE_KEYS`, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key or tuple(sorted(f.keys())) != CACHE_KEYS:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError):
        return None


def build_cache(teacher, pairs: list[tuple[Path, str]], resolution: int, *, batch: int = 32) -> dict[str, Tensor]:
    """{"mean", "std": float32 [N, C, h, w], "caption": int64 [N] (an index into "text"), "text": float32 [U, L, D]
    (the U distinct captions' embeddings, in sorted order), "null": float32 [L, D]} of ``pairs`` through ``teacher``
    (:class:`cmkit.sd.pipeline.TextToImage`), in batches of ``batch``."""
    means, stds = [], []
    for i in range(0, len(pairs), batch):
        images = np.stack([data.read_image(p, channels=3, resolution=resolution) for p, _ in pairs[i:i + batch]])
        mean, std = teacher.encode_images(data.to_model_range(torch.from_numpy(images)))
        means.append(mean.cpu())
        stds.append(std.cpu())
    distinct = sorted({text for _, text in pairs})
    index = {text: i for i, text in enumerate(distinct)}
    texts = [teacher.encode_text(distinct[i:i + batch]).cpu() for i in range(0, len(distinct), batch)]
    return {"mean": torch.cat(means), "std": torch.cat(stds), "text": torch.cat(texts),
            "caption": torch.tensor([index[text] for _, text in pairs], dtype=torch.int64),
            "null": teacher.encode_text([""])[0].cpu()}


def write_cache(path: Path, tensors: dict[str, Tensor], key: str) -> None:
    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"key": key})
    with atomic_write(path) as tmp:
        tmp.write_bytes(blob)
