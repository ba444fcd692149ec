"""Tests for cmkit.data: tiny fixture files built in tmp_path; nothing is ever downloaded."""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import itertools
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit import readers
from cmkit.data import (
    KNOWN_DATASETS,
    ImageData,
    batch_indices,
    load_dataset,
    to_model_range,
    to_uint8,
)
from cmkit.errors import CmkitError
from conftest import missing_requirement

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
_REAL_DOWNLOAD = readers._download


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """No test may touch the network or the real cache: downloads are recorded and fail."""
    calls: list[str] = []

    def fake_download(url: str, dest: Path, *, md5: str) -> None:
        calls.append(url)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(readers, "_download", fake_download)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("CMKIT_DATA", raising=False)
    return calls


# ----------------------------------------------------------------------------------------------------------
# IDX fixtures


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write_idx(folder: Path, *, n: int = 5, size: int = 28, split: str = "train", gz: bool = True,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write an images/labels IDX pair for ``split``; returns (uint8 [n, size, size], uint8 [n])."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
        raw = _idx_bytes(array, magic)
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return images, labels


def _assert_roundtrip(ds: ImageData, images: np.ndarray, labels: np.ndarray) -> None:
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(images), 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels is not None and ds.labels.dtype == torch.int64
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    assert ds.num_classes == 10


@pytest.mark.parametrize("gz", [True, False])
def test_idx_via_cmkit_data_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool) -> None:
    images, labels = _write_idx(tmp_path / "store" / "mnist", gz=gz)
    monkeypatch.setenv("CMKIT_DATA", str(tmp_path / "store"))
    ds = load_dataset("mnist", resolution=28, channels=1)
    _assert_roundtrip(ds, images, labels)
    assert ds.name == "mnist"


def test_idx_via_cmkit_data_root_and_test_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _write_idx(tmp_path, n=3, split="test", gz=False, seed=1)
    _write_idx(tmp_path, n=4, split="train", seed=2)
    monkeypatch.setenv("CMKIT_DATA", str(tmp_path))
    monkeypatch.setitem(readers._SYSTEM_DIRS, "fashion-mnist", tmp_path / "absent")
    _assert_roundtrip(load_dataset("fashion-mnist", resolution=28, channels=1, split="test"), images, labels)
    assert len(load_dataset("fashion-mnist", resolution=28, channels=1)) == 4


def test_idx_found_in_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(readers._SYSTEM_DIRS, "mnist", tmp_path / "absent")
    images, labels = _write_idx(tmp_path / "xdg-cache" / "cmkit" / "mnist")
    _assert_roundtrip(load_dataset("mnist", resolution=28, channels=1), images, labels)


def test_idx_via_folder_path_with_resize_and_rgb(tmp_path: Path) -> None:
    images, labels = _write_idx(tmp_path / "idx")
    ds = load_dataset(str(tmp_path / "idx"), resolution=28, channels=1)
    _assert_roundtrip(ds, images, labels)
    assert ds.name == str(tmp_path / "idx")
    small = load_dataset(str(tmp_path / "idx"), resolution=14, channels=3)
    assert small.images.shape == (5, 3, 14, 14) and small.images.dtype == torch.uint8
    rgb = load_dataset(str(tmp_path / "idx"), resolution=28, channels=3)
    assert torch.equal(rgb.images, ds.images.repeat(1, 3, 1, 1))


def test_idx_wrong_magic_names_file(tmp_path: Path) -> None:
    _write_idx(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(struct.pack(">I", 1234) + bad.read_bytes()[4:])
    with pytest.raises(CmkitError, match=r"train-images-idx3-ubyte.*magic number 1234, expected 2051"):
        load_dataset(str(tmp_path), resolution=28, channels=1)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated_names_file(tmp_path: Path, gz: bool) -> None:
    _write_idx(tmp_path, gz=gz)
    bad = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    bad.write_bytes(bad.read_bytes()[:-50])
    with pytest.raises(CmkitError, match=str(bad)):
        load_dataset(str(tmp_path), resolution=28, channels=1)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    _write_idx(tmp_path, n=5)
    labels = np.zeros(4, dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels, 2049)))
    with pytest.raises(CmkitError, match="5 images but .* 4 labels"):
        load_dataset(str(tmp_path), resolution=28, channels=1)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_missing_known_dataset_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        _isolated: list[str], name: str) -> None:
    monkeypatch.setenv("CMKIT_DATA", str(tmp_path / "empty"))
    monkeypatch.setitem(readers._SYSTEM_DIRS, name, tmp_path / "absent")
    with pytest.raises(CmkitError) as info:
        load_dataset(name, resolution=28, channels=1)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and "CMKIT_DATA" in message and "\n" not in message
    assert str(tmp_path / "empty") in message and "network disabled" in message
    assert ("apt-get install dataset-fashion-mnist" in message) == (name == "fashion-mnist")
    assert len(_isolated) == 1  # one (fake) download attempt, never a real one


def test_download_is_atomic_and_checks_md5(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(b"payload" * 100)
    good = hashlib.md5(source.read_bytes()).hexdigest()
    real = _REAL_DOWNLOAD  # a file:// URL: exercises the temp-file + MD5 + rename path without a network
    dest = tmp_path / "cache" / "file.gz"
    with pytest.raises(CmkitError, match="MD5"):
        real(source.as_uri(), dest, md5="0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    real(source.as_uri(), dest, md5=good)
    assert dest.read_bytes() == source.read_bytes() and list(dest.parent.iterdir()) == [dest]


def test_real_fashion_mnist() -> None:
    if not SYSTEM_FASHION.is_dir():
        missing_requirement(f"{SYSTEM_FASHION} is not installed (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist", resolution=28, channels=1)
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels is not None and ds.labels.dtype == torch.int64
    assert torch.equal(ds.labels.unique(), torch.arange(10)) and ds.num_classes == 10


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 str opcodes, like the real CIFAR-10 batches (read with encoding='bytes')."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else
                   pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _cifar_batch(n: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {b"batch_label": f"batch {seed}".encode(), b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)]}


def _cifar_members(batches: dict[str, bytes], *, n: int = 2) -> dict[str, bytes]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    members = {name: _py2_pickle(_cifar_batch(n, seed)) for seed, name in enumerate(names)}
    members.update(batches)
    return {f"cifar-10-batches-py/{k}": v for k, v in members.items()}


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _expected_cifar(names: list[str], n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    order = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = [_cifar_batch(n, order.index(name)) for name in names]
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[b"labels"] for b in batches])
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def test_cifar_archive_path_train_and_test(tmp_path: Path) -> None:
    archive = _write_tar(tmp_path / "cifar-10-python.tar.gz", _cifar_members({}))
    ds = load_dataset(str(archive), resolution=32, channels=3)
    images, labels = _expected_cifar([f"data_batch_{i}" for i in range(1, 6)])
    assert ds.images.shape == (10, 3, 32, 32) and torch.equal(ds.images, images)
    assert ds.labels is not None and torch.equal(ds.labels, labels) and ds.num_classes == 10
    test = load_dataset(str(archive), resolution=16, channels=1, split="test")
    assert test.images.shape == (2, 1, 16, 16) and test.images.dtype == torch.uint8


def test_cifar_via_cmkit_data_and_extracted_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_tar(tmp_path / "store" / "cifar10" / "cifar-10-python.tar.gz", _cifar_members({}))
    monkeypatch.setenv("CMKIT_DATA", str(tmp_path / "store"))
    images, labels = _expected_cifar(["test_batch"])
    ds = load_dataset("cifar10", resolution=32, channels=3, split="test")
    assert torch.equal(ds.images, images) and ds.name == "cifar10"
    folder = tmp_path / "extracted"
    with tarfile.open(tmp_path / "store" / "cifar10" / "cifar-10-python.tar.gz") as tar:
        tar.extractall(folder, filter="data")
    for path in (folder, folder / "cifar-10-batches-py"):
        ds = load_dataset(str(path), resolution=32, channels=3, split="test")
        assert torch.equal(ds.images, images) and ds.labels is not None and torch.equal(ds.labels, labels)


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


class _EvilExec:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, ("open('PWNED_EXEC', 'w').close()",)


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_malicious_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           nested: bool) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    evil = _Evil(f"touch {marker}")
    payload = pickle.dumps({b"data": evil, b"labels": [0]} if nested else evil, protocol=4)
    archive = _write_tar(tmp_path / "evil.tar.gz", _cifar_members({"data_batch_1": payload}))
    with pytest.raises(CmkitError, match=r"refusing to load .*data_batch_1.*system"):
        load_dataset(str(archive), resolution=32, channels=3)
    assert not marker.exists()


def test_cifar_malicious_exec_is_refused_from_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(_EvilExec()))
    with pytest.raises(CmkitError, match="builtins.exec"):
        load_dataset(str(tmp_path), resolution=32, channels=3, split="test")
    assert not (tmp_path / "PWNED_EXEC").exists()


def test_cifar_missing_batch_and_corrupt_archive(tmp_path: Path) -> None:
    members = _cifar_members({})
    del members["cifar-10-batches-py/data_batch_3"]
    with pytest.raises(CmkitError, match="data_batch_3"):
        load_dataset(str(_write_tar(tmp_path / "a.tar.gz", members)), resolution=32, channels=3)
    broken = tmp_path / "b.tar.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CmkitError, match=str(broken)):
        load_dataset(str(broken), resolution=32, channels=3)


def test_cifar_missing_explains(tmp_path: Path, _isolated: list[str]) -> None:
    with pytest.raises(CmkitError, match=r"cifar-10-python.tar.gz.*CMKIT_DATA"):
        load_dataset("cifar10", resolution=32, channels=3)
    assert _isolated == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]


# ----------------------------------------------------------------------------------------------------------
# Folder of images


def _bands(width: int, height: int) -> Image.Image:
    """RGB image: red outer quarters, green centre half (left to right)."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, :, 0] = 255
    q = width // 4
    arr[:, q:width - q] = (0, 255, 0)
    return Image.fromarray(arr)


def test_folder_resize_crop_and_channels(tmp_path: Path) -> None:
    _bands(64, 32).save(tmp_path / "a_wide.png")
    Image.fromarray(np.full((50, 20), 77, dtype=np.uint8)).save(tmp_path / "b_tall.JPG", quality=100)
    Image.new("RGB", (7, 9), (10, 200, 30)).save(tmp_path / "c_small.bmp")
    ds = load_dataset(str(tmp_path), resolution=32, channels=3)
    assert ds.images.shape == (3, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels is None and ds.num_classes == 0 and ds.name == str(tmp_path)
    assert torch.all(ds.images[0, 1] == 255) and torch.all(ds.images[0, 0] == 0)  # centre crop = green
    assert torch.all((ds.images[1].int() - 77).abs() <= 2)  # JPEG at quality 100 is near-lossless
    assert torch.equal(ds.images[1, 0], ds.images[1, 1]) and torch.equal(ds.images[1, 0], ds.images[1, 2])
    assert torch.all(ds.images[2] == torch.tensor([10, 200, 30], dtype=torch.uint8).view(3, 1, 1))
    gray = load_dataset(str(tmp_path), resolution=16, channels=1)
    assert gray.images.shape == (3, 1, 16, 16)
    # ITU-R BT.601 luma, by hand: 0.299 * 10 + 0.587 * 200 + 0.114 * 30 = 123.81 -> 124, on every pixel
    assert torch.all((gray.images[2].int() - 124).abs() <= 1)


def test_a_folder_of_images_is_a_training_split_only(tmp_path: Path) -> None:
    Image.new("L", (28, 28), 9).save(tmp_path / "a.png")
    assert len(load_dataset(str(tmp_path), resolution=28, channels=1, split="train")) == 1
    with pytest.raises(CmkitError, match="a folder of images has no 'test' split"):
        load_dataset(str(tmp_path), resolution=28, channels=1, split="test")


def test_folder_unusual_modes(tmp_path: Path) -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "p.png")
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("LA", (8, 8), (40, 255)).save(tmp_path / "la.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.tif")
    Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)).save(tmp_path / "wide.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bilevel.gif")
    ds = load_dataset(str(tmp_path), resolution=8, channels=3)
    order = ["bilevel.gif", "cmyk.tif", "la.png", "p.png", "rgba.png", "wide.png"]
    white = (255, 255, 255)
    expected = [white, white, (40, 40, 40), (10, 20, 30), white, (100, 100, 100)]
    for i, (name, rgb) in enumerate(zip(order, expected, strict=True)):
        assert ds.images[i, :, 0, 0].tolist() == list(rgb), name


def test_sixteen_bit_grayscale_scaling(tmp_path: Path) -> None:
    ramp = np.array([[0, 257, 65535, 32768]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    ds = load_dataset(str(tmp_path), resolution=4, channels=1)
    assert ds.images[0, 0, 0].tolist() == [0, 1, 255, 128]


def _valid_png(path: Path) -> bytes:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.mark.parametrize("case", ["random_bytes.png", "truncated.png", "zero_bytes.jpg"])
def test_folder_corrupt_image_names_file(tmp_path: Path, case: str) -> None:
    good = _valid_png(tmp_path / "good.png")
    bad = tmp_path / case
    payloads = {"random_bytes.png": os.urandom(300), "truncated.png": good[: len(good) // 2],
                "zero_bytes.jpg": b""}
    bad.write_bytes(payloads[case])
    with pytest.raises(CmkitError, match=r"cannot read image .*" + case) as info:
        load_dataset(str(tmp_path), resolution=16, channels=3)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_empty_folder_and_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(CmkitError, match=r"no images found in folder .*\.png"):
        load_dataset(str(tmp_path), resolution=16, channels=3)
    with pytest.raises(CmkitError, match="neither a known name"):
        load_dataset(str(tmp_path / "missing"), resolution=16, channels=3)
    with pytest.raises(CmkitError, match="is a file"):
        load_dataset(str(tmp_path / "notes.txt"), resolution=16, channels=3)


def test_unknown_name_lists_known(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CmkitError) as info:
        load_dataset("imagenet", resolution=16, channels=3)
    assert all(name in str(info.value) for name in KNOWN_DATASETS)


BAD_OPTIONS = [({"resolution": 0, "channels": 3}, "resolution"),
               ({"resolution": 8, "channels": 2}, "channels"),
               ({"resolution": 8, "channels": 3, "split": "val"}, "split")]


@pytest.mark.parametrize(("kwargs", "pattern"), BAD_OPTIONS)
def test_bad_options(tmp_path: Path, kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(CmkitError, match=pattern):
        load_dataset(str(tmp_path), **kwargs)  # type: ignore[arg-type]


def test_subfolder_labels(tmp_path: Path) -> None:
    for cls, count in (("dog", 2), ("cat", 1), ("emu", 1)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            Image.new("L", (10, 12), 50 * i).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path), resolution=8, channels=1)
    assert ds.num_classes == 3 and ds.labels is not None
    assert ds.labels.tolist() == [0, 1, 1, 2]  # cat, dog, dog, emu


def test_no_labels_when_mixed_or_single_subfolder(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "only" / "a.png")
    assert load_dataset(str(tmp_path), resolution=4, channels=1).labels is None
    (tmp_path / "other").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "other" / "b.png")
    Image.new("L", (4, 4)).save(tmp_path / "root.png")
    ds = load_dataset(str(tmp_path), resolution=4, channels=1)
    assert ds.labels is None and ds.num_classes == 0 and len(ds) == 3


# ----------------------------------------------------------------------------------------------------------
# Sampler
#
# The index stream is an endless sequence of epochs, each a shuffle of range(n). These tests check properties
# any correct resumable shuffler has (each epoch a permutation, independence from how the stream is read,
# reshuffling, seed dependence, uniformity), never the expectation rebuilt from the code's own calls.


def _read(n: int, seed: int, start: int, sizes: list[int]) -> torch.Tensor:
    """The stream from position ``start`` on, read as consecutive batches of the given sizes."""
    parts, pos = [], start
    for size in sizes:
        parts.append(batch_indices(n, size, seed=seed, start=pos))
        pos += size
    return torch.cat(parts)


def _random_sizes(rng: random.Random, total: int, largest: int) -> list[int]:
    """Positive batch sizes in [1, largest] that add up to ``total``."""
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(min(rng.randint(1, largest), total - sum(sizes)))
    return sizes


def test_every_epoch_is_a_permutation_and_epochs_differ() -> None:
    n, epochs = 10, 6
    stream = batch_indices(n, epochs * n, seed=7, start=0)
    assert stream.dtype == torch.int64 and stream.shape == (epochs * n,)
    for epoch in stream.view(epochs, n):
        assert sorted(epoch.tolist()) == list(range(n))  # every index exactly once per epoch
    assert len({tuple(e.tolist()) for e in stream.view(epochs, n)}) == epochs  # reshuffled every epoch
    assert stream[:n].tolist() != list(range(n))  # and shuffled at all


@pytest.mark.parametrize("start", [0, 1, 6, 7, 13, 29])
def test_stream_is_the_same_however_it_is_read(start: int) -> None:
    """Pure in (seed, images seen): chunks of any size, from any start, give the stream read at once."""
    n, seed, total = 7, 3, 40
    at_once = batch_indices(n, total, seed=seed, start=start)
    assert torch.equal(batch_indices(n, start + total, seed=seed, start=0)[start:], at_once)
    assert torch.equal(_read(n, seed, start, [1] * total), at_once)  # one index at a time
    rng = random.Random(start)
    for largest in (2, n - 1, n + 1, 3 * n):  # batches smaller than, around and larger than an epoch
        sizes = _random_sizes(rng, total, largest)
        assert torch.equal(_read(n, seed, start, sizes), at_once), sizes


def test_epoch_boundary_inside_a_batch() -> None:
    n, seed = 7, 1
    head = batch_indices(n, 5, seed=seed, start=0)  # positions 0-4 of epoch 0
    across = batch_indices(n, 4, seed=seed, start=5)  # positions 5, 6 of epoch 0; 0, 1 of epoch 1
    tail = batch_indices(n, 5, seed=seed, start=9)  # positions 2-6 of epoch 1
    assert sorted(head.tolist() + across[:2].tolist()) == list(range(n))
    assert sorted(across[2:].tolist() + tail.tolist()) == list(range(n))
    # A batch of 3 n + 2 that starts 3 positions into epoch 0: the last 4 of epoch 0, all of epochs 1 and 2,
    # then the first 5 of epoch 3.
    big = batch_indices(n, 3 * n + 2, seed=seed, start=3)
    assert sorted(head[:3].tolist() + big[:4].tolist()) == list(range(n))
    for e in range(2):
        assert sorted(big[4 + e * n:4 + (e + 1) * n].tolist()) == list(range(n))
    assert len(set(big[4 + 2 * n:].tolist())) == 5


def test_seeds_differ_and_cache_is_safe() -> None:
    n = 100
    streams = [batch_indices(n, 3 * n, seed=s, start=0) for s in (0, 1, 2, 10**6)]
    for i, a in enumerate(streams):
        for b in streams[i + 1:]:
            for e in range(3):  # not only the first epoch: every epoch depends on the seed
                assert not torch.equal(a[e * n:(e + 1) * n], b[e * n:(e + 1) * n])
    a = batch_indices(n, n, seed=0, start=0)
    a[:] = 0  # mutating a returned batch must not corrupt the cached permutation
    assert torch.equal(batch_indices(n, n, seed=0, start=0), streams[0][:n])


def test_stream_ignores_global_rng_and_hash_seed() -> None:
    """A resumed run is a new process: the stream may depend on nothing but (seed, position)."""
    torch.manual_seed(0)
    a = batch_indices(9, 30, seed=5, start=11)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    assert torch.equal(batch_indices(9, 30, seed=5, start=11), a)
    assert torch.equal(torch.get_rng_state(), before)  # and it does not consume the global generator
    code = "from cmkit.data import batch_indices; print(batch_indices(9, 30, seed=5, start=11).tolist())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == a.tolist()


def test_shuffles_are_uniform() -> None:
    """Each of the 4! orders of 4 items is equally likely: across the epochs of one seed, and across seeds.

    Pearson's chi-square over the 24 orders (23 degrees of freedom) must stay below 49.73, its 99.9% quantile
    for a uniform shuffle; a biased shuffle (say, one that never moves some item) lands far above it.
    """
    orders = list(itertools.permutations(range(4)))
    rounds = 20 * len(orders)  # 20 expected per order
    epochs = batch_indices(4, 4 * rounds, seed=0, start=0).view(rounds, 4)
    first_epochs = torch.stack([batch_indices(4, 4, seed=s, start=0) for s in range(rounds)])
    for sample in (epochs, first_epochs):
        counts = collections.Counter(tuple(row.tolist()) for row in sample)
        assert set(counts) == set(orders)
        chi2 = sum((counts[o] - 20) ** 2 / 20 for o in orders)
        assert chi2 < 49.73, chi2


@pytest.mark.parametrize(("n", "b", "start"), [(0, 1, 0), (1, 0, 0), (5, 2, -1)])
def test_batch_indices_refuses_bad_arguments(n: int, b: int, start: int) -> None:
    with pytest.raises(ValueError, match="need num_items >= 1"):
        batch_indices(n, b, seed=0, start=start)


# ----------------------------------------------------------------------------------------------------------
# Pixel ranges and augmentation


def test_model_range_roundtrip_exact() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_range(pixels)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert x.flatten()[51].item() == pytest.approx(-0.6) and x.flatten()[204].item() == pytest.approx(0.6)
    assert torch.equal(to_uint8(x), pixels)
    assert to_uint8(torch.tensor([-3.0, 3.0, 0.0])).tolist() == [0, 255, 128]
    with pytest.raises(ValueError):
        to_model_range(x)
