"""The studio's engine: one request of the page (a decoded JSON object) -> one reply, by calls of
:mod:`cmkit.sampling` and :mod:`cmkit.editing`. No server code here, so every mode is testable without one.

Pixels travel as base64 of raw uint8 bytes at the model's size: an image is [H, W, C] row-major, a mask [H, W]
(non-zero = generate). Replies carry PNG data URLs at the model's size (the page scales them up) and the
milliseconds the model took. Every field of a request is checked here; a bad one raises CmkitError naming it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from cmkit import editing
from cmkit.codec import Codec, check_codec, data_codec
from cmkit.cond import check_labels, seed_labels
from cmkit.config import Config
from cmkit.data import ImageData, conform_image_bytes, load_dataset, to_model_range
from cmkit.errors import CmkitError
from cmkit.images import grid, to_numpy_images
from cmkit.methods import Capability, method_entry, methods_that, require, sampling_spec
from cmkit.rng import SeededNoise
from cmkit.sampling import BatchInvariant, SamplingSpec, default_sigmas, generate

PRECISIONS = ("fp32", "bf16")
STEPS = (1, 2, 4, 8)  # the steps control: sampling steps, or editing levels (Alg. 4's N)
GRID = 16  # images in the generate grid (4 x 4)
GRID_MODES = ("generate", "teacher")  # the modes that compute a grid; the others compute one image
TEACHER_STEPS = 18  # the teacher samples with EDM's Heun at 18 levels (35 evaluations)
STROKE_RATIO = editing.STROKE_SIGMAS[1] / editing.STROKE_SIGMAS[0]  # the paper's second stroke level / first
MAX_SEED = 2**31 - 1
MAX_UPLOAD_PIXELS = 40_000_000  # an upload of more pixels is refused before it is decoded
CODECS = editing.CODECS  # the codec kinds (cmkit.codec.codec_kind) the studio serves: it edits pixels


CFG_RANGE = (1.0, 4.0)  # the classifier-free guidance scales offered for a model trained with label dropout


def guidance_control(model: nn.Module, config: Config | None) -> dict[str, float] | None:
    """The guidance scales the page may ask ``model`` (trained with ``config``) for: a model that takes the scale
    as its input (LCM: ``guidance_range``), its trained range and default; a class-conditional model trained with
    label dropout (``train.p_uncond > 0``), classifier-free guidance in :data:`CFG_RANGE` from 1 (none); else None."""
    trained = getattr(model, "guidance_range", None)
    if trained is not None:
        return {"min": trained[0], "max": trained[1], "default": model.guidance_default}
    if model.num_classes and config is not None and config.train.p_uncond > 0:
        return {"min": CFG_RANGE[0], "max": CFG_RANGE[1], "default": 1.0}
    return None


class Superseded(Exception):
    """A newer request of the same client arrived while this one was being computed."""


@dataclass(frozen=True)
class Models:
    """The consistency model the studio serves and, optionally, a diffusion teacher to compare with; ``spec``
    is how the served model samples (:func:`cmkit.checkpoint.load_export`'s; None: its method's untuned spec)."""

    model: nn.Module
    config: Config
    teacher: nn.Module | None = None
    teacher_config: Config | None = None
    spec: SamplingSpec | None = None


def check_models(models: Models) -> None:
    """The served model's method must have the 'serve' capability and its codec be one of :data:`CODECS`; a
    teacher's method the 'teach' capability, with the same data shape."""
    require(method_entry(models.config.method.name), Capability.SERVE, "the studio (cmkit serve)")
    check_codec(models.config.data.codec, CODECS, what="the studio")
    teacher = models.teacher
    if teacher is None:
        return
    name = models.teacher_config.method.name
    if not method_entry(name).can(Capability.TEACH):
        raise CmkitError(f"--teacher: a model trained with {name}; the studio shows a model with the 'teach' "
                         f"capability beside the served one (trained with {', '.join(methods_that(Capability.TEACH))}: "
                         "an *-edm run)")
    shape = [(m.resolution, m.channels, m.num_classes) for m in (models.model, teacher)]
    if shape[0] != shape[1]:
        raise CmkitError(f"--teacher: its images (resolution, channels, classes) {shape[1]} differ from the "
                         f"model's {shape[0]}")


# ---------------------------------------------------------------------------------------------- encoding

def png_data_url(image: np.ndarray) -> str:
    """uint8 [H, W, C] (C in {1, 3}) -> a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pixels_b64(image: np.ndarray) -> str:
    """uint8 [H, W, C] -> base64 of its raw bytes (the form the page sends images back in)."""
    return base64.b64encode(np.ascontiguousarray(image).tobytes()).decode("ascii")


def image_reply(image: np.ndarray) -> dict[str, str]:
    """An image the page keeps as an editing source: its PNG (to show) and its raw pixels (to send back)."""
    return {"image": png_data_url(image), "pixels": pixels_b64(image)}


# ----------------------------------------------------------------------------------------------- fields

def _field(request: dict[str, Any], key: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = request.get(key, default)
    if value is None and default is None and key not in request:
        raise CmkitError(f"request field {key!r}: missing")
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise CmkitError(f"request field {key!r}: expected {_kind_names(kinds)}, got {type(value).__name__}")
    return value


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list"}
    return " or ".join(names[k] for k in (kinds if isinstance(kinds, tuple) else (kinds,)))


def int_field(request: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    """An integer field in [lo, hi]."""
    value = _field(request, key, int, default)
    if not lo <= value <= hi:
        raise CmkitError(f"request field {key!r}: {value} outside [{lo}, {hi}]")
    return value


def float_field(request: dict[str, Any], key: str, lo: float, hi: float, default: float | None = None) -> float:
    """A finite number field in [lo, hi]."""
    value = float(_field(request, key, (int, float), default))
    if not lo <= value <= hi:  # NaN fails too
        raise CmkitError(f"request field {key!r}: {value:g} outside [{lo:g}, {hi:g}]")
    return value


def choice_field(request: dict[str, Any], key: str, choices: tuple[int, ...], default: int) -> int:
    """An integer field that must be one of ``choices``."""
    value = _field(request, key, int, default)
    if value not in choices:
        raise CmkitError(f"request field {key!r}: {value}; expected one of {', '.join(map(str, choices))}")
    return value


def pixels_field(request: dict[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Base64 of raw uint8 bytes -> uint8 array of ``shape`` (an image [H, W, C] or a mask [H, W])."""
    text = _field(request, key, str)
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise CmkitError(f"request field {key!r}: not base64") from None
    want = int(np.prod(shape))
    if len(raw) != want:
        raise CmkitError(f"request field {key!r}: {len(raw)} bytes; expected {want} (uint8 "
                         f"{' x '.join(map(str, shape))})")
    return np.frombuffer(raw, np.uint8).reshape(shape)


# ---------------------------------------------------------------------------------------------- the engine

@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch's intra-op thread count set to ``count`` in the calling thread, and restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Cancellable:
    """``model`` whose every call first checks ``stale()`` and raises :class:`Superseded` when it is true, so a
    long sampler (the teacher's 35 evaluations) stops at its next step once its answer is no longer wanted."""

    def __init__(self, model: nn.Module, stale: Callable[[], bool]) -> None:
        self.model, self.stale = model, stale

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs) -> Tensor:
        if self.stale():
            raise Superseded
        return self.model(*args, **kwargs)


class Studio:
    """Answers the page's requests for ``models`` (checked by :func:`check_models`).

    ``data``: the dataset whose images the page offers as editing sources (default: the model's training
    data), loaded on first use; when it cannot be read, the reason is in ``data_error``. ``precision="bf16"``
    runs the networks under bfloat16 autocast (faster on CPUs with bf16 arithmetic; the images then differ
    slightly from ``cmkit sample``'s fp32 ones). A grid is computed on ``threads`` torch threads (default:
    torch's), one image on one fewer: too little work to share every core well with the browser drawing the page
    on the same machine (bench/studio.py measured it on 2 cores). Everything is computed on the device the
    model's weights are on (``cmkit serve --device``); the teacher's must be the same.
    """

    def __init__(self, models: Models, *, data: str | None = None, precision: str = "fp32",
                 threads: int | None = None) -> None:
        check_models(models)
        if precision not in PRECISIONS:
            raise CmkitError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.models, self.precision = models, precision
        self.threads = threads or torch.get_num_threads()
        self.model = models.model
        self.denoiser = BatchInvariant(self.model)  # editing's as in cmkit edit: results do not depend on the batch
        self.codec: Codec = data_codec(models.config.data)
        self.spec = models.spec or sampling_spec(models.config.method)
        m = self.model
        self.device = next(m.parameters()).device
        self.shape = (m.resolution, m.resolution, m.channels)
        self.factors = tuple(f for f in range(2, m.resolution // 2 + 1) if m.resolution % f == 0)
        self.modes = ("generate", "draw", "inpaint", "interpolate", *(("colorize",) if m.channels == 3 else ()),
                      *(("superres",) if self.factors else ()), *(("teacher",) if models.teacher else ()))
        self.data_source = data or models.config.data.source
        self.guidance = guidance_control(m, models.config)
        self.teacher_guidance = (None if models.teacher is None
                                 else guidance_control(models.teacher, models.teacher_config))
        self._data: ImageData | None = None
        self.data_error = ""
        self._data_lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """What the page needs to build itself: the model's shape, modes and controls."""
        m, config = self.model, self.models.config
        info = {"preset": config.preset, "method": config.method.name, "resolution": m.resolution,
                "channels": m.channels, "classes": m.num_classes, "parameters": _count(m), "modes": self.modes,
                "steps": STEPS, "grid": GRID, "factors": self.factors, "sigma_min": m.sigma_min,
                "sigma_max": m.sigma_max, "stroke_sigma": editing.STROKE_SIGMAS[0], "max_seed": MAX_SEED,
                "data": self.data_source, "precision": self.precision, "guidance": self.guidance, "teacher": None}
        if self.models.teacher is not None:
            info["teacher"] = {"preset": self.models.teacher_config.preset,
                               "parameters": _count(self.models.teacher), "evaluations": 2 * TEACHER_STEPS - 1}
        return info

    # --------------------------------------------------------------------------------- requests

    def reply(self, request: Any, stale: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """The reply to one request: ``{"id", "mode", "images": {name: PNG data URL}, "model_ms", "server_ms"}``,
        or ``{"id", "error"}`` for a bad request, or ``{"id", "status": "superseded"}`` when ``stale()`` became
        true during a cancellable computation."""
        start = time.perf_counter()
        rid = request.get("id") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict):
                raise CmkitError(f"expected a JSON object, got {type(request).__name__}")
            mode = _field(request, "mode", str)
            if mode not in self.modes:
                raise CmkitError(f"request field 'mode': {mode!r}; this model offers {', '.join(self.modes)}")
            threads = self.threads if mode in GRID_MODES else max(1, self.threads - 1)
            with torch_threads(threads), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                        enabled=self.precision == "bf16"):
                images, model_s = getattr(self, f"_{mode}")(request, stale)
        except CmkitError as e:
            return {"id": rid, "error": str(e)}
        except Superseded:
            return {"id": rid, "status": "superseded"}
        encoded = {name: png_data_url(image) for name, image in images.items()}
        return {"id": rid, "mode": mode, "images": encoded, "model_ms": round(1e3 * model_s, 2),
                "server_ms": round(1e3 * (time.perf_counter() - start), 2)}

    def _common(self, request: dict[str, Any]) -> tuple[SeededNoise, Tensor | None, list[float]]:
        """:meth:`_seeded`, and the schedule for the request's ``steps``."""
        return *self._seeded(request), self._sigmas(request)

    def _seeded(self, request: dict[str, Any]) -> tuple[SeededNoise, Tensor | None]:
        """The noise of the request's ``seed`` for one image, and its class labels (the request's ``label``, else
        drawn from the seed)."""
        seed = int_field(request, "seed", 0, MAX_SEED, 0)
        noise = SeededNoise([seed], (self.model.channels, self.model.resolution, self.model.resolution), self.device)
        return noise, self._labels(request, noise)

    def _label(self, request: dict[str, Any]) -> int | None:
        """The request's ``label`` (a class of a class-conditional model, :func:`cmkit.cond.check_labels`), or None."""
        if request.get("label") is None:
            return None
        label = _field(request, "label", int)
        check_labels(self.model.num_classes, label, name="request field 'label'")
        return label

    def _labels(self, request: dict[str, Any], noise: SeededNoise) -> Tensor | None:
        """The label tensor of one image: the request's ``label``, else (class-conditional) drawn from the seed,
        by the rule ``cmkit edit`` and ``cmkit sample`` use (:func:`cmkit.cond.seed_labels`)."""
        return seed_labels(noise, self.model.num_classes, self._label(request))

    def _sigmas(self, request: dict[str, Any]) -> list[float]:
        return default_sigmas(self.spec, choice_field(request, "steps", STEPS, 1)).tolist()

    def _source(self, request: dict[str, Any]) -> Tensor:
        """The request's ``image`` as float32 [1, C, H, W] in [-1, 1]."""
        pixels = pixels_field(request, "image", self.shape)
        return to_model_range(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None]).to(self.device)

    # ------------------------------------------------------------------------------------ modes
    # Each returns ({name: uint8 [H, W, C]}, seconds spent in the model).

    def _generate(self, request: dict[str, Any], stale) -> tuple[dict[str, np.ndarray], float]:
        guidance = self._guidance(request, self.guidance)
        return self._grid(self.model, self.spec, request, steps=choice_field(request, "steps", STEPS, 1),
                          guidance=guidance)

    def _teacher(self, request: dict[str, Any], stale) -> tuple[dict[str, np.ndarray], float]:
        """The teacher's grid of the same seeds, guided at the request's scale where the teacher can be (one
        trained with label dropout; outside its range, or for an unguidable teacher, unguided)."""
        spec = sampling_spec(self.models.teacher_config.method)
        w, control = self._guidance(request, self.guidance), self.teacher_guidance
        guidance = w if control and w is not None and control["min"] <= w <= control["max"] else None
        return self._grid(Cancellable(self.models.teacher, stale), spec, request, steps=TEACHER_STEPS,
                          guidance=guidance)

    @staticmethod
    def _guidance(request: dict[str, Any], control: dict[str, float] | None) -> float | None:
        """The request's ``guidance`` scale, inside ``control``'s range (:func:`guidance_control`), or None."""
        if request.get("guidance") is None:
            return None
        if control is None:
            raise CmkitError("request field 'guidance': this model takes no guidance scale (it is not "
                             "class-conditional with label dropout, nor trained with a w input)")
        return float_field(request, "guidance", control["min"], control["max"])

    def _grid(self, model, spec: SamplingSpec, request: dict[str, Any], *, steps: int,
              guidance: float | None) -> tuple[dict, float]:
        """A grid of ``model``'s samples with ``spec``'s default sampler and schedule of ``steps`` steps, at the
        guidance scale ``guidance`` (None: the model's own default)."""
        seed = int_field(request, "seed", 0, MAX_SEED - GRID + 1, 0)
        label = self._label(request)
        start = time.perf_counter()
        sigmas = default_sigmas(spec, steps)
        x = next(generate(model, range(seed, seed + GRID), sigmas=sigmas, sampler=spec.sampler, batch_size=GRID,
                          label=label, guidance=guidance, precision=self.precision))
        return {"result": grid(to_numpy_images(self.codec.to_images(x)))}, time.perf_counter() - start

    @torch.no_grad()
    def _draw(self, request: dict[str, Any], stale) -> tuple[dict[str, np.ndarray], float]:
        strength = float_field(request, "strength", 1.01 * self.model.sigma_min, self.model.sigma_max,
                               editing.STROKE_SIGMAS[0])
        steps = choice_field(request, "steps", STEPS, 1)
        strokes = self._source(request)
        noise, labels = self._seeded(request)
        # The paper's two levels (5.38, 2.24) scaled to start at ``strength``, continued geometrically.
        sigmas = [s for s in (strength * STROKE_RATIO**i for i in range(steps)) if s > self.model.sigma_min]
        start = time.perf_counter()
        x = editing.stroke(self.denoiser, strokes, noise=noise, sigmas=sigmas, labels=labels)
        return {"result": to_numpy_images(x)[0]}, time.perf_counter() - start

    @torch.no_grad()
    def _inpaint(self, request: dict[str, Any], stale) -> tuple[dict[str, np.ndarray], float]:
        images = self._source(request)
        mask = torch.from_numpy(pixels_field(request, "mask", self.shape[:2]) > 0)
        noise, labels, sigmas = self._common(request)
        start = time.perf_counter()
        x = editing.inpaint(self.denoiser, images, mask, sigmas=sigmas, noise=noise, labels=labels)
        return {"result": to_numpy_images(x)[0]}, time.perf_counter() - start

    @torch.no_grad()
    def _colorize(self, request: dict[str, Any], stale) -> tuple[dict[str, np.ndarray], float]:
        images = self._source(request)
        noise, labels, sigmas = self._common(request)
        start = time.perf_counter()
        x = editing.colorize(self.denoiser, images, sigmas=sigmas, noise=noise, labels=labels)
        seconds = time.perf_counter() - start
        gray = to_numpy_images(editing.luma(images))[0]
        return {"result": to_numpy_images(x)[0], "input": gray}, seconds

    @torch.no_grad()
    def _superres(self, request: dict[str, Any], stale) -> tuple[dict[str, np.ndarray], float]:
        factor = choice_field(request, "factor", self.factors, self.factors[0])
        low = editing.patch_means(self._source(request), factor)
        noise, labels, sigmas = self._common(request)
        start = time.perf_counter()
        x = editing.superres(self.denoiser, low, factor=factor, sigmas=sigmas, noise=noise, labels=labels)
        return {"result": to_numpy_images(x)[0], "input": to_numpy_images(low)[0]}, time.perf_counter() - start

    @torch.no_grad()
    def _interpolate(self, request: dict[str, Any], stale) -> tuple[dict[str, np.ndarray], float]:
        seeds = [int_field(request, key, 0, MAX_SEED) for key in ("seed_a", "seed_b")]
        t = float_field(request, "t", 0.0, 1.0)
        shape = (self.model.channels, self.model.resolution, self.model.resolution)
        z0, z1 = (SeededNoise([s], shape, self.device)() for s in seeds)
        labels = self._labels(request, SeededNoise(seeds[:1], shape, self.device))
        big_t = self.model.sigma_max
        start = time.perf_counter()
        x = editing.denoise(self.denoiser, big_t * editing.slerp(z0, z1, t), sigma=big_t, labels=labels)
        return {"result": to_numpy_images(x)[0]}, time.perf_counter() - start

    # --------------------------------------------------------------------------------- sources

    def upload(self, data: bytes) -> dict[str, str]:
        """An uploaded image file -> the editing source at the model's size (:func:`image_reply`)."""
        image = conform_image_bytes(data, channels=self.model.channels, resolution=self.model.resolution,
                                    max_pixels=MAX_UPLOAD_PIXELS, name="the upload")
        return image_reply(image.transpose(1, 2, 0))

    def dataset_image(self, index: int | None) -> dict[str, Any]:
        """Image ``index`` of the dataset (a random one when None) as an editing source, with its index,
        the dataset's size and the image's class (or None)."""
        data = self._dataset()
        if index is None:
            index = int(torch.randint(len(data), ()))
        if not 0 <= index < len(data):
            raise CmkitError(f"index {index}: the dataset {data.name} has images 0 to {len(data) - 1}")
        label = None if data.labels is None else int(data.labels[index])
        image = data.images[index].permute(1, 2, 0).numpy()
        return {"index": index, "count": len(data), "label": label, **image_reply(image)}

    def _dataset(self) -> ImageData:
        with self._data_lock:
            if self._data is None and not self.data_error:
                try:
                    self._data = load_dataset(self.data_source, resolution=self.model.resolution,
                                              channels=self.model.channels)
                except CmkitError as e:
                    self.data_error = f"the training images cannot be read ({e}); upload an image instead"
            if self._data is None:
                raise CmkitError(self.data_error)
            return self._data


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
