"""Dataset file readers: IDX and CIFAR-10 archives, lookup and checksummed downloads.

Readers return plain numpy arrays and labels; ``cmkit.data`` conforms them to the requested resolution and
channels and wraps them as ``ImageData``. Known datasets are looked up in $CMKIT_DATA, the system dataset
folder and the user cache, and downloaded into the cache (MD5-checked) when absent.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

from cmkit.errors import CmkitError
from cmkit.files import atomic_write

__all__ = [
    "CIFAR_CLASSES",
    "cifar_in",
    "find_idx_file",
    "idx_names",
    "locate_cifar",
    "locate_idx",
    "one_line",
    "read_cifar_split",
    "read_idx_split",
]

_IDX_URLS: dict[str, str] = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
_IDX_MD5: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}
_SYSTEM_DIRS: dict[str, Path] = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_CLASSES = 10
_IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"


# ----------------------------------------------------------------------------------------------------------
# IDX (fashion-mnist, mnist)


def idx_names(split: str) -> list[str]:
    prefix = "train" if split == "train" else "t10k"
    return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]


def find_idx_file(folder: Path, base: str) -> Path | None:
    """``folder/base`` or ``folder/base.gz``, whichever exists (raw first)."""
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _search_dirs(name: str) -> list[Path]:
    """Where a known dataset is looked for, in order: $CMKIT_DATA/<name>, $CMKIT_DATA, system, cache."""
    dirs: list[Path] = []
    env = os.environ.get("CMKIT_DATA")
    if env:
        dirs += [Path(env).expanduser() / name, Path(env).expanduser()]
    if name in _SYSTEM_DIRS:
        dirs.append(_SYSTEM_DIRS[name])
    return [*dirs, _cache_dir(name)]


def _cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "cmkit" / name


def locate_idx(name: str, split: str) -> Path:
    """The first search folder holding both IDX files of ``split``; downloads into the cache otherwise."""
    names = idx_names(split)
    dirs = _search_dirs(name)
    for folder in dirs:
        if all(find_idx_file(folder, base) for base in names):
            return folder
    cache = _cache_dir(name)
    files = [f"{base}.gz" for base in names]
    try:
        for file in files:
            _download(_IDX_URLS[name] + file, cache / file, md5=_IDX_MD5[name][file])
    except (OSError, CmkitError) as err:
        raise CmkitError(_missing_idx_message(name, names, dirs, err)) from err
    return cache


def _missing_idx_message(name: str, names: list[str], dirs: list[Path], err: Exception) -> str:
    looked = " and ".join(f"{base}[.gz]" for base in names)
    hint = f"set CMKIT_DATA to a folder holding these files (or a '{name}' subfolder with them)"
    if name == "fashion-mnist":
        hint += " or run `apt-get install dataset-fashion-mnist`"
    return (f"{name} not found: looked for {looked} in {', '.join(map(str, dirs))}, and downloading from "
            f"{_IDX_URLS[name]} failed ({one_line(err)}); {hint}")




def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, Path]:
    """``split`` of ``folder``'s IDX files -> (images uint8 [N, H, W], labels uint8 [N], labels file path).

    Checks both files exist, parse, hold at least one image and agree on the count.
    """
    paths = [find_idx_file(folder, base) for base in idx_names(split)]
    missing = [base for base, path in zip(idx_names(split), paths, strict=True) if path is None]
    if missing:
        raise CmkitError(f"IDX folder {folder} lacks {', '.join(f'{m}[.gz]' for m in missing)} "
                         f"needed for split {split!r}")
    images = _read_idx(paths[0], magic=_IDX_IMAGES_MAGIC, kind="images")
    labels = _read_idx(paths[1], magic=_IDX_LABELS_MAGIC, kind="labels")
    if len(images) == 0:
        raise CmkitError(f"{paths[0]} holds no images; expected at least one")
    if len(images) != len(labels):
        raise CmkitError(f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} "
                         f"labels; expected the same count")
    return images, labels, paths[1]


def _read_idx(path: Path, *, magic: int, kind: str) -> np.ndarray:
    """Parse an IDX file (gzip or raw) of unsigned bytes -> uint8 array [N, ...]; checks magic and size."""
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < 4 or struct.unpack(">I", data[:4])[0] != magic:
        found = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else "none (file too short)"
        raise CmkitError(f"{path} is not an IDX {kind} file: magic number {found}, expected {magic}")
    if len(data) < header:
        raise CmkitError(f"{path} is truncated: {len(data)} bytes, expected at least a {header}-byte header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise CmkitError(f"{path} has {len(data)} bytes, expected {expected} for {kind} of shape {dims} "
                         f"(truncated or corrupt file)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data
    except (OSError, EOFError, zlib.error) as err:
        raise CmkitError(f"cannot read {path}: {one_line(err)}; "
                         f"expected a complete (gzipped) IDX file") from err


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches, read through a restricted unpickler)


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


_PICKLE_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy names an ndarray needs; any other global is refused.

    Plain containers (dict, list, bytes, str, int) need no globals, so a CIFAR batch loads while a
    pickle that references os.system, builtins.eval, etc. fails before anything is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        factory = _PICKLE_ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return factory()


def _unpickle_batch(stream: IO[bytes], source: str) -> dict[Any, Any]:
    """A CIFAR batch dict from ``stream``; ``source`` names it in errors."""
    try:
        batch = _BatchUnpickler(stream, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise CmkitError(f"refusing to load {source}: {err}; expected a CIFAR-10 batch (dict of bytes, lists "
                         f"and numpy arrays only)") from err
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, zlib.error) as err:
        raise CmkitError(f"cannot read {source}: {one_line(err)}; expected a CIFAR-10 python batch") from err
    if not isinstance(batch, dict):
        raise CmkitError(f"{source} holds a {type(batch).__name__}; expected a CIFAR-10 batch dict")
    return batch


def _cifar_batch_names(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def cifar_in(folder: Path) -> Path | None:
    """The CIFAR-10 archive or batch folder inside ``folder`` (or ``folder`` itself), if any."""
    for candidate in (folder / _CIFAR_FOLDER, folder / _CIFAR_ARCHIVE):
        if candidate.exists():
            return candidate
    if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
        return folder
    return None


def locate_cifar() -> Path:
    """CIFAR-10 from $CMKIT_DATA(/cifar10) or the cache; downloads the archive into the cache otherwise."""
    dirs = _search_dirs("cifar10")
    for folder in dirs:
        found = cifar_in(folder) if folder.is_dir() else None
        if found is not None:
            return found
    dest = _cache_dir("cifar10") / _CIFAR_ARCHIVE
    try:
        _download(_CIFAR_URL, dest, md5=_CIFAR_MD5)
    except (OSError, CmkitError) as err:
        raise CmkitError(f"cifar10 not found: looked for {_CIFAR_ARCHIVE} or {_CIFAR_FOLDER}/ in "
                         f"{', '.join(map(str, dirs))}, and downloading {_CIFAR_URL} failed "
                         f"({one_line(err)}); "
                         f"set CMKIT_DATA to a folder holding {_CIFAR_ARCHIVE}") from err
    return dest



def read_cifar_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 ``split`` from an archive or batch folder -> (images uint8 [N, 3, 32, 32], labels int64 [N]).

    Batch data is uint8 [N, 3072] in CHW order.
    """
    wanted = _cifar_batch_names(split)
    batches = _cifar_tar_batches(source, wanted) if source.is_file() else _cifar_dir_batches(source, wanted)
    missing = [b for b in wanted if b not in batches]
    if missing:
        raise CmkitError(f"{source} lacks CIFAR-10 batch(es) {', '.join(missing)} needed for split {split!r}")
    parts = [_parse_cifar_batch(batches[b], f"{source}:{b}") for b in wanted]
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    return images, labels


def _cifar_dir_batches(folder: Path, wanted: Iterable[str]) -> dict[str, dict[Any, Any]]:
    out = {}
    for batch in wanted:
        path = folder / batch
        if path.is_file():
            with path.open("rb") as f:
                out[batch] = _unpickle_batch(f, str(path))
    return out


def _cifar_tar_batches(archive: Path, wanted: Iterable[str]) -> dict[str, dict[Any, Any]]:
    """Unpickle the wanted batches straight from the tar (one sequential pass, nothing extracted)."""
    wanted = set(wanted)
    out: dict[str, dict[Any, Any]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in out:
                    out[base] = _unpickle_batch(tar.extractfile(member), f"{archive}:{member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise CmkitError(f"cannot read archive {archive}: {one_line(err)}; expected "
                         f"{_CIFAR_ARCHIVE} (a gzipped tar of python batches)") from err
    return out


def _parse_cifar_batch(batch: dict[Any, Any], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Batch dict -> (uint8 [N, 3072], int64 [N]); checks the keys, dtype and shapes."""
    data, labels = _batch_field(batch, "data"), _batch_field(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise CmkitError(f"{source}: field 'data' is {shape}; expected a uint8 array [N, 3072]")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise CmkitError(f"{source}: field 'labels' is not a list of integers") from err
    if len(labels) != len(data):
        raise CmkitError(f"{source}: {len(data)} images but {len(labels)} labels; expected the same count")
    return data, labels


def _batch_field(batch: dict[Any, Any], key: str) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise CmkitError(f"CIFAR-10 batch lacks the field {key!r}; found keys {sorted(map(str, batch))}")


# ----------------------------------------------------------------------------------------------------------
# Downloads


def _download(url: str, dest: Path, *, md5: str) -> None:
    """Fetch ``url`` to ``dest`` via a temp file in the same folder, renamed only when the MD5 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            digest = _copy_hashing(response, out)
        if digest != md5:
            raise CmkitError(f"downloaded {url} has MD5 {digest}, expected {md5}")


def _copy_hashing(src: Any, dst: Any, *, chunk: int = 1 << 20) -> str:
    """Copy a byte stream, returning its MD5 hex digest."""
    digest = hashlib.md5(usedforsecurity=False)
    while block := src.read(chunk):
        digest.update(block)
        dst.write(block)
    return digest.hexdigest()


def one_line(err: BaseException) -> str:
    """The error's message on one line (its type name when the message is empty)."""
    return " ".join(str(err).split()) or type(err).__name__

