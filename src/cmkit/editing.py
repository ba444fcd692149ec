"""Zero-shot image editing with a consistency model (CM paper, Alg. 4 and App. D).

- :func:`edit` is Alg. 4, once, for any orthogonal linear map A and binary mask Omega. A is a small object:
  ``transform(x)`` gives the coordinates A x and ``transform.inverse(a)`` gives A^-1 a = A^T a, both laid out
  like the image, float [N, C, H, W]; Omega is a bool tensor in those coordinates, True = generate.
- :class:`Identity`, :class:`LumaChroma` and :class:`PatchBasis` (:mod:`cmkit.transforms`) are the three maps the
  tasks use.
- :func:`inpaint`, :func:`colorize`, :func:`superres`, :func:`stroke`, :func:`denoise` and :func:`interpolate`
  are the six tasks; :func:`edit_files` and :func:`interpolate_file` are what ``cmkit edit`` calls.
- Each check of an editing input is one ``check_*`` function, called by the task functions and (composed in
  :func:`check_task`) by :func:`run_task`, :func:`edit_files` and :func:`interpolate_file`.

Editing works on models whose codec is the identity (:func:`check_codec`): images are the model's space.
Images are float32 [N, C, H, W] in model range [-1, 1], and so are results: each denoised estimate is clamped
to [-1, 1] (as the CM reference code does), and the last replacement of Alg. 4 is a projection onto the kept
coordinates *within* [-1, 1] (``transform.project``). So what a task keeps survives the uint8 conversion up to
its rounding: known pixels exactly, a patch mean or a pixel's luma within half a level, wherever the box
allows it (it always does when the reference itself lies in [-1, 1]).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from cmkit import codec
from cmkit.cond import Labels, check_labels, of_labels, seed_labels
from cmkit.data import IMAGE_EXTENSIONS, list_images, read_image, to_model_range
from cmkit.errors import CmkitError
from cmkit.images import grid, save_png, to_numpy_images
from cmkit.methods import Capability, model_entry, model_spec, require
from cmkit.rng import NoiseSource, SeededNoise
from cmkit.sampling import BatchInvariant, check_sigmas, default_sigmas
from cmkit.transforms import LUMA, Identity, LumaChroma, PatchBasis, Transform

TASKS: tuple[str, ...] = ("inpaint", "colorize", "superres", "stroke", "denoise", "interpolate")
IMAGE_TASKS: tuple[str, ...] = TASKS[:-1]  # the tasks that edit input images (run_task, edit_files)
EDIT_STEPS = 40  # the paper edits with N = 40 Karras-spaced levels (App. D)
STROKE_SIGMAS: tuple[float, ...] = (5.38, 2.24)  # the paper's two levels for stroke-guided generation (App. D)
CODECS: tuple[str, ...] = ("identity",)  # the codec kinds (cmkit.codec.codec_kind) editing works on: pixels


# ---------------------------------------------------------------------------------------------- Alg. 4

def edit(model: nn.Module, y: Tensor, *, transform: Transform, mask: Tensor, sigmas: Sequence[float] | Tensor,
         noise: NoiseSource, labels: Labels = None, start: Tensor | None = None) -> Tensor:
    """Zero-shot editing (CM paper, Alg. 4).

    y: reference, float32 [N, C, H, W] in [-1, 1] at the model's size; transform: an orthogonal map A; mask:
    bool Omega in A's coordinates, broadcastable to y, True = generate; sigmas: DESCENDING taus within
    [sigma_min, sigma_max]; noise(): a fresh standard-normal batch shaped like y on each call; labels: the
    class of every image (int) or of each (int64 [N]), required by a class-conditional model and refused by
    an unconditional one.

    Line 2: y <- A^-1[(A y)(1 - Omega)]; x = f(y + tau_1 z, tau_1), then x <- A^-1[(A y)(1 - Omega) + (A x) Omega];
    each later tau: x = f(x + sqrt(tau^2 - eps^2) z, tau) and the same replacement. ``start`` replaces line 2's
    y as the point noised at tau_1 (stroke-guided generation starts from the painting itself). Each f is
    clamped to [-1, 1] (as in the CM reference code), and the last replacement is ``transform.project``: the
    nearest point of [-1, 1] whose A x equals A y wherever Omega is False (:func:`cmkit.transforms.box_projection`).
    Returns float32 [N, C, H, W] in [-1, 1].
    """
    check_editable(model)
    check_images(model, y)
    s = check_sigmas(sigmas, sigma_min=model.sigma_min, sigma_max=model.sigma_max).tolist()
    cond = of_labels(class_labels(model, labels, len(y), y.device))
    known = transform(y)

    def replace(x: Tensor) -> Tensor:
        return transform.inverse(torch.where(mask, transform(x), known))

    if start is None:
        start = transform.inverse(torch.where(mask, torch.zeros_like(known), known))
    x = start + s[0] * noise()
    for i, tau in enumerate(s):
        if i:
            x = x + (tau**2 - model.sigma_min**2) ** 0.5 * noise()
        x = model(x, tau, cond).clamp(-1, 1)
        x = replace(x) if i < len(s) - 1 else transform.project(x, known, ~mask)
    return x


# ---------------------------------------------------------------------------------------------- checks
# Each check of an editing input exists once, here. The task functions (the API) call the ones their inputs
# need; check_task composes them for run_task, edit_files and interpolate_file (the CLI), which check every
# option before any image is read or written.

def check_editable(model: nn.Module) -> None:
    """Editing (Alg. 4) needs a consistency function: the model's method must have the 'edit' capability."""
    require(model_entry(model), Capability.EDIT, "zero-shot editing")


def check_codec(name: str) -> None:
    """Editing needs a model whose codec (``data.codec``) is of a kind in :data:`CODECS`: it edits pixels."""
    codec.check_codec(name, CODECS, what="zero-shot editing")


def check_images(model: nn.Module, x: Tensor, *, resolution: int | None = None) -> None:
    """Images must be [N, C, r, r] with the model's C, and r = ``resolution`` (default: the model's)."""
    want = (model.channels, resolution or model.resolution, resolution or model.resolution)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise CmkitError(f"images of shape {tuple(x.shape)}: expected [N, {want[0]}, {want[1]}, {want[2]}] "
                         "for this model")


def check_rgb(model: nn.Module) -> None:
    """Colorization needs a 3-channel model."""
    if model.channels != 3:
        raise CmkitError(f"colorize: colorization needs an RGB (3-channel) model; this model has "
                         f"{model.channels} channel(s)")


def check_mask(model: nn.Module, mask: Tensor | None) -> None:
    """An inpainting mask must be given, with a shape broadcastable to the images [N, C, R, R]."""
    if mask is None:
        raise CmkitError("inpaint: expected --mask M.png or --box x,y,w,h (the pixels to generate)")
    want = (model.channels, model.resolution, model.resolution)
    shape = tuple(torch.as_tensor(mask).shape)
    try:
        ok = len(shape) <= 4 and torch.broadcast_shapes(shape, (1, *want))[1:] == want
    except RuntimeError:
        ok = False
    if not ok:
        raise CmkitError(f"mask of shape {shape}: expected [{want[1]}, {want[2]}] (True = generate), or a shape "
                         f"broadcastable to the images [N, {want[0]}, {want[1]}, {want[2]}]")


def check_factor(model: nn.Module, factor: int | None) -> None:
    """A super-resolution factor must be given, be >= 2 and divide the model's resolution."""
    if factor is None:
        raise CmkitError("superres: expected --factor p, the upsampling factor")
    if factor < 2 or model.resolution % factor:
        raise CmkitError(f"factor {factor}: expected an integer >= 2 that divides the model's resolution "
                         f"{model.resolution}")


def check_sigma(model: nn.Module, sigma: float | None) -> None:
    """A denoising level must be given and lie in (sigma_min, sigma_max]."""
    if sigma is None:
        raise CmkitError("denoise: expected --sigma s, the noise level to add and remove")
    if not model.sigma_min < sigma <= model.sigma_max:
        raise CmkitError(f"sigma {sigma:g}: expected a noise level in ({model.sigma_min:g}, {model.sigma_max:g}]")


def class_labels(model: nn.Module, labels: Labels, count: int, device: torch.device | str) -> Tensor | None:
    """The labels the network gets for ``count`` images: int64 [count] on ``device`` for a class-conditional
    model (which needs them), None for an unconditional one. Checked by :func:`cmkit.cond.check_labels`."""
    check_labels(model.num_classes, labels, count)
    if labels is None:
        if model.num_classes:
            raise CmkitError(f"this model is class-conditional: expected labels (a class in "
                             f"[0, {model.num_classes}) for every image, or one per image)")
        return None
    return torch.as_tensor(labels, dtype=torch.int64, device=device).expand(count)


def check_frames(frames: int | None) -> None:
    """An interpolation needs a number of frames, at least its two endpoints."""
    if frames is None:
        raise CmkitError("interpolate: expected --frames n, the number of images from a to b")
    if frames < 2:
        raise CmkitError(f"frames {frames}: expected at least 2 (the two endpoints)")


def check_batch(batch: int) -> None:
    """Images per forward pass: at least 1."""
    if batch < 1:
        raise CmkitError(f"batch {batch}: expected a positive number of images per batch")


def check_task(task: str, model: nn.Module, *, among: Sequence[str] = TASKS, mask: Tensor | None = None,
               factor: int | None = None, sigmas: Sequence[float] | Tensor | None = None, sigma: float | None = None,
               frames: int | None = None, batch: int | None = None, labels: Labels = None,
               count: int | None = None) -> None:
    """Every check of ``task`` (one of ``among``) and its options that needs only the model, composed of the
    checks above; ``batch`` is checked when given, a labels tensor against ``count`` images when given."""
    if task not in among:
        raise CmkitError(f"task {task!r}: expected one of {', '.join(among)}")
    check_editable(model)
    if task == "inpaint":
        check_mask(model, mask)
    if task == "colorize":
        check_rgb(model)
    if task == "superres":
        check_factor(model, factor)
    if task == "denoise":
        check_sigma(model, sigma)
    if task == "interpolate":
        check_frames(frames)
    if sigmas is not None:
        check_sigmas(sigmas, sigma_min=model.sigma_min, sigma_max=model.sigma_max)
    if batch is not None:
        check_batch(batch)
    check_labels(model.num_classes, labels, count)


def editing_sigmas(model: nn.Module) -> Tensor:
    """The default editing schedule: EDIT_STEPS Karras-spaced levels (rho 7) from sigma_max, DESCENDING."""
    return default_sigmas(model_spec(model), EDIT_STEPS)


# ------------------------------------------------------------------------------------------------ tasks

def inpaint(model: nn.Module, images: Tensor, mask: Tensor, *, sigmas: Sequence[float] | Tensor, noise: NoiseSource,
            labels: Labels = None) -> Tensor:
    """Fill the pixels where ``mask`` is True (bool [H, W] or broadcastable to images); A = I.

    images: float32 [N, C, H, W] in [-1, 1]. The other pixels of the result equal the input's exactly (bit for
    bit, and so in uint8 after a round trip); the result lies in [-1, 1].
    """
    check_mask(model, mask)
    mask = torch.as_tensor(mask, dtype=torch.bool, device=images.device)
    return edit(model, images, transform=Identity(), mask=mask, sigmas=sigmas, noise=noise, labels=labels)


def luma(images: Tensor) -> Tensor:
    """Gray value w.x / sum(w) of RGB images float [N, 3, H, W] -> [N, 1, H, W] (w = LUMA)."""
    w = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
    return (images * (w / w.sum()).view(1, 3, 1, 1)).sum(1, keepdim=True)


def colorize(model: nn.Module, images: Tensor, *, sigmas: Sequence[float] | Tensor, noise: NoiseSource,
             labels: Labels = None) -> Tensor:
    """Colour RGB (or gray-on-3-channel) images float32 [N, 3, H, W] in [-1, 1] from their gray values.

    y is the gray image :func:`luma` on 3 channels; A = :class:`LumaChroma`, Omega = the two chroma coordinates.
    The result lies in [-1, 1] and has the input's luma, w.x_out = w.x_in (to float rounding), since the gray
    value of [-1, 1] images is always reachable.
    """
    check_rgb(model)
    check_images(model, images)
    y = luma(images).expand(-1, 3, -1, -1)
    mask = torch.tensor([False, True, True], device=images.device).view(1, 3, 1, 1)
    return edit(model, y, transform=LumaChroma(), mask=mask, sigmas=sigmas, noise=noise, labels=labels)


def patch_means(images: Tensor, factor: int) -> Tensor:
    """The mean of each factor x factor patch: float [N, C, H, W] -> [N, C, H / factor, W / factor]."""
    return torch.nn.functional.avg_pool2d(images, factor)


def superres(model: nn.Module, low: Tensor, *, factor: int, sigmas: Sequence[float] | Tensor, noise: NoiseSource,
             labels: Labels = None) -> Tensor:
    """Upsample low-resolution images float32 [N, C, H / p, W / p] in [-1, 1] by p = ``factor``.

    y is ``low`` upsampled by pixel replication; A = :class:`PatchBasis`, Omega = every coordinate but the
    patch mean. The result [N, C, H, W] lies in [-1, 1], and each p x p patch mean equals its low-resolution
    pixel (to float rounding; low must lie in [-1, 1]).
    """
    check_factor(model, factor)
    check_images(model, low, resolution=model.resolution // factor)
    y = low.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    mask = torch.ones(factor, factor, dtype=torch.bool, device=low.device)
    mask[0, 0] = False
    mask = mask.repeat(y.shape[2] // factor, y.shape[3] // factor)
    return edit(model, y, transform=PatchBasis(factor), mask=mask, sigmas=sigmas, noise=noise, labels=labels)


def stroke(model: nn.Module, strokes: Tensor, *, noise: NoiseSource, sigmas: Sequence[float] | Tensor = STROKE_SIGMAS,
           labels: Labels = None) -> Tensor:
    """Stroke-guided generation (SDEdit; CM paper App. D): images from stroke paintings float32 [N, C, H, W].

    Alg. 4 with A = I and Omega all ones, noised from the painting itself (with Omega = 1, line 2 would
    erase it), so: x = f(y + tau_1 z, tau_1), then x = f(x + sqrt(tau_2^2 - eps^2) z, tau_2), each clamped to
    [-1, 1].
    """
    everything = torch.ones((), dtype=torch.bool, device=strokes.device)
    return edit(model, strokes, transform=Identity(), mask=everything, sigmas=sigmas, noise=noise, labels=labels,
                start=strokes)


def denoise(model: nn.Module, noisy: Tensor, *, sigma: float, labels: Labels = None) -> Tensor:
    """One call f(x_noisy, sigma) (CM paper, Sec. 6), clamped to [-1, 1]: noisy = x + sigma z, float32
    [N, C, H, W]; labels as for :func:`edit`."""
    check_editable(model)
    check_images(model, noisy)
    check_sigma(model, sigma)
    return model(noisy, sigma, of_labels(class_labels(model, labels, len(noisy), noisy.device))).clamp(-1, 1)


def slerp(z0: Tensor, z1: Tensor, t: float | Tensor) -> Tensor:
    """Spherical interpolation of each pair (z0[i], z1[i]), [N, ...], at t (a float or [N]) in [0, 1].

    The angle is each pair's own, theta_i = arccos(<z0_i, z1_i> / |z0_i| |z1_i|);
    slerp = sin((1 - t) theta) / sin(theta) z0 + sin(t theta) / sin(theta) z1 (linear where sin(theta) ~ 0).
    Returns z0 at t = 0 and z1 at t = 1 exactly.
    """
    a, b = z0.flatten(1), z1.flatten(1)
    theta = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1).acos()
    t = torch.as_tensor(t, dtype=z0.dtype, device=z0.device).expand(z0.shape[0])
    sin = theta.sin()
    curved = sin > 1e-6
    w0 = torch.where(curved, ((1 - t) * theta).sin() / sin, 1 - t)
    w1 = torch.where(curved, (t * theta).sin() / sin, t)
    shape = (-1,) + (1,) * (z0.ndim - 1)
    return w0.view(shape) * z0 + w1.view(shape) * z1


def interpolate(model: nn.Module, z0: Tensor, z1: Tensor, *, frames: int, labels: Labels = None) -> Tensor:
    """Images along the slerp between standard-normal noises z0, z1 float32 [N, C, H, W] (CM paper, App. D).

    Frame j is f(T slerp(z0, z1, t_j), T) with t_j = j / (frames - 1) and T = sigma_max, clamped to [-1, 1];
    labels as for :func:`edit`. Returns float32 [N, frames, C, H, W].
    """
    check_editable(model)
    check_images(model, z0)
    check_images(model, z1)
    check_frames(frames)
    cond = of_labels(class_labels(model, labels, len(z0), z0.device))
    big_t = model.sigma_max
    ts = torch.linspace(0, 1, frames).tolist()
    return torch.stack([model(big_t * slerp(z0, z1, t), big_t, cond).clamp(-1, 1) for t in ts], 1)


# ------------------------------------------------------------------------------------------------- files

Warn = Callable[[str], None]


def load_mask(path: Path, *, resolution: int) -> Tensor:
    """A mask image -> bool [resolution, resolution]: white (255) = generate, black (0) = keep.

    Refuses another size and any gray value other than 0 and 255.
    """
    arr = read_image(Path(path), channels=1)[0]
    if arr.shape != (resolution, resolution):
        raise CmkitError(f"mask {path}: {arr.shape[1]}x{arr.shape[0]} pixels; expected the model's "
                         f"{resolution}x{resolution}")
    values = np.unique(arr)
    if not set(values.tolist()) <= {0, 255}:
        raise CmkitError(f"mask {path}: holds gray values other than 0 and 255 (e.g. {values[values % 255 != 0][0]}); "
                         "expected black (0, keep) and white (255, generate) only")
    return torch.from_numpy(arr == 255)


def box_mask(box: Sequence[int], *, resolution: int) -> Tensor:
    """bool [resolution, resolution], True inside the box (x, y, w, h) in pixels, which must lie in the image."""
    x, y, w, h = box
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > resolution or y + h > resolution:
        raise CmkitError(f"box {x},{y},{w},{h}: expected x,y,w,h with w, h >= 1 inside the "
                         f"{resolution}x{resolution} image")
    mask = torch.zeros(resolution, resolution, dtype=torch.bool)
    mask[y:y + h, x:x + w] = True
    return mask


def pair_files(image: Path, out: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a file gives ``out`` (a .png); a folder gives ``out/<same relative path>.png``."""
    image, out = Path(image), Path(out)
    if image.is_file():
        check_png_out(out)
        return [(image, out)]
    if not image.is_dir():
        raise CmkitError(f"--image {image}: no such file or folder")
    _check_folder(out.parent)
    if (out.exists() and not out.is_dir()) or out.suffix.lower() in IMAGE_EXTENSIONS:
        raise CmkitError(f"--out {out}: a folder of input images needs an output folder, not an image file")
    files = list_images(image)
    if not files:
        raise CmkitError(f"--image {image}: no images found; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    pairs = [(f, out / f.relative_to(image).with_suffix(".png")) for f in files]
    targets = [o for _, o in pairs]
    if len(set(targets)) < len(targets):
        raise CmkitError(f"--image {image}: two inputs differ only in extension and would both write the same .png")
    return pairs


def check_png_out(out: Path) -> None:
    """One output image: a .png file name (not a folder) in an existing, writable folder."""
    out = Path(out)
    if out.suffix != ".png" or out.is_dir():
        raise CmkitError(f"--out {out}: expected a .png file name")
    _check_folder(out.parent)


def _check_folder(folder: Path) -> None:
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise CmkitError(f"--out: folder {folder} does not exist or is not writable")


def read_inputs(task: str, model: nn.Module, files: Sequence[Path], *, factor: int | None,
                warn: Warn = warnings.warn) -> Tensor:
    """Read every input image -> float32 [N, C, h, w] in [-1, 1], ready for ``task`` (options already checked).

    Inpainting needs the model's size exactly (mask coordinates are pixels). Super-resolution takes the low-
    resolution size (resolution / factor) or the model's size (then reduced to its patch means); other sizes
    are refused. Colorization, stroke and denoising resize and centre-crop another size, with a warning.
    """
    res, ch = model.resolution, model.channels
    low = res // factor if task == "superres" else None
    out = []
    for path in files:
        arr = read_image(path, channels=ch)
        size = arr.shape[1:]
        if task == "superres" and size == (low, low):
            out.append(to_model_range(torch.from_numpy(arr)))
            continue
        if size != (res, res):
            if task in ("inpaint", "superres"):
                wanted = f"{low}x{low} (low resolution) or {res}x{res}" if task == "superres" else f"{res}x{res}"
                raise CmkitError(f"image {path}: {size[1]}x{size[0]} pixels; {task} expects {wanted}")
            warn(f"image {path}: {size[1]}x{size[0]} pixels, resized and centre-cropped to {res}x{res}")
            arr = read_image(path, channels=ch, resolution=res)
        x = to_model_range(torch.from_numpy(arr))
        out.append(patch_means(x[None], factor)[0] if task == "superres" else x)
    return torch.stack(out)


def run_task(task: str, model: nn.Module, images: Tensor, seeds: Sequence[int], *, batch: int,
             mask: Tensor | None = None, factor: int | None = None, sigmas: Sequence[float] | Tensor | None = None,
             sigma: float | None = None, labels: Labels = None) -> Iterator[Tensor]:
    """Apply ``task`` (one of IMAGE_TASKS) to images float32 [N, C, h, w], image i with seed seeds[i], ``batch``
    at a time. ``sigmas`` defaults to :func:`editing_sigmas` (stroke: STROKE_SIGMAS).

    Checks the options at once (:func:`check_task`), then yields float32 [B, C, H, W] results in [-1, 1]. The
    noise of image i comes from its own seed, and so does its class on a class-conditional model unless
    ``labels`` (one class, or int64 [N]) is given; so results do not depend on ``batch``
    (:class:`cmkit.sampling.BatchInvariant`).
    """
    check_task(task, model, among=IMAGE_TASKS, mask=mask, factor=factor, sigmas=sigmas, sigma=sigma, batch=batch,
               labels=labels, count=len(images))
    return _batches(task, model, images, seeds, batch=batch, mask=mask, factor=factor, sigmas=sigmas, sigma=sigma,
                    labels=labels)


def _batches(task: str, model: nn.Module, images: Tensor, seeds: Sequence[int], *, batch: int,
             mask: Tensor | None, factor: int | None, sigmas: Sequence[float] | Tensor | None,
             sigma: float | None, labels: Labels) -> Iterator[Tensor]:
    """:func:`run_task` after its checks."""
    device = next(model.parameters()).device
    shape = (model.channels, model.resolution, model.resolution)
    net = BatchInvariant(model)
    for start in range(0, len(images), batch):
        x = images[start:start + batch].to(device)
        noise = SeededNoise(seeds[start:start + batch], shape, device)
        yield _apply(task, net, x, noise, seed_labels(noise, model.num_classes, _rows(labels, start, batch)),
                     mask=mask, factor=factor, sigmas=sigmas, sigma=sigma)


def _rows(labels: Labels, start: int, batch: int) -> Labels:
    """A batch's labels: one class as it is, else the rows ``start`` .. ``start + batch`` of [N]."""
    return labels if labels is None or torch.as_tensor(labels).ndim == 0 else labels[start:start + batch]


def _apply(task: str, model: nn.Module, x: Tensor, noise: SeededNoise, labels: Labels, *,
           mask: Tensor | None, factor: int | None, sigmas: Sequence[float] | Tensor | None,
           sigma: float | None) -> Tensor:
    if sigmas is None:
        sigmas = STROKE_SIGMAS if task == "stroke" else editing_sigmas(model)
    if task == "inpaint":
        return inpaint(model, x, mask.to(x.device), sigmas=sigmas, noise=noise, labels=labels)
    if task == "colorize":
        return colorize(model, x, sigmas=sigmas, noise=noise, labels=labels)
    if task == "superres":
        return superres(model, x, factor=factor, sigmas=sigmas, noise=noise, labels=labels)
    if task == "stroke":
        return stroke(model, x, sigmas=sigmas, noise=noise, labels=labels)
    return denoise(model, x + sigma * noise(), sigma=sigma, labels=labels)


@torch.no_grad()
def edit_files(task: str, model: nn.Module, image: Path, out: Path, *, seed: int = 0, batch: int = 64,
               mask: Tensor | None = None, factor: int | None = None,
               sigmas: Sequence[float] | Tensor | None = None, sigma: float | None = None, labels: Labels = None,
               warn: Warn = warnings.warn) -> list[Path]:
    """Edit one image file, or every image in a folder (into a folder), and write PNGs atomically.

    Input i (sorted path order) uses seed ``seed + i``. Everything is read and checked before the first file
    is written. Returns the written paths. ``sigmas`` defaults to :func:`editing_sigmas` (stroke:
    STROKE_SIGMAS); ``mask`` is bool [H, W] (inpaint); ``factor`` is p (superres); ``sigma`` is the noise
    level added and removed (denoise); ``labels`` is the class of every image (or int64 [N], one per input in
    sorted order) for a class-conditional model, default: drawn from each image's seed.
    """
    check_task(task, model, among=IMAGE_TASKS, mask=mask, factor=factor, sigmas=sigmas, sigma=sigma, batch=batch,
               labels=labels)
    pairs = pair_files(image, out)
    images = read_inputs(task, model, [i for i, _ in pairs], factor=factor, warn=warn)
    seeds = list(range(seed, seed + len(pairs)))
    results = run_task(task, model, images, seeds, batch=batch, mask=mask, factor=factor, sigmas=sigmas,
                       sigma=sigma, labels=labels)
    bar = tqdm(results, total=-(-len(pairs) // batch), unit="batch", desc=task, disable=len(pairs) == 1)
    outputs = iter(o for _, o in pairs)
    for x in bar:
        for img in to_numpy_images(x):
            path = next(outputs)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(img, path)
    return [o for _, o in pairs]


@torch.no_grad()
def interpolate_file(model: nn.Module, out: Path, *, seeds: tuple[int, int], frames: int,
                     labels: Labels = None) -> None:
    """Write the interpolation between the noises of seeds a and b as a one-row strip of ``frames`` PNG images.

    A class-conditional model uses the class ``labels`` (an int), default: drawn from seed a.
    """
    check_task("interpolate", model, frames=frames, labels=labels, count=1)
    check_png_out(out)
    device = next(model.parameters()).device
    shape = (model.channels, model.resolution, model.resolution)
    ends = [SeededNoise([s], shape, device) for s in seeds]
    labels = seed_labels(ends[0], model.num_classes, labels)
    x = interpolate(BatchInvariant(model), ends[0](), ends[1](), frames=frames, labels=labels)[0]
    save_png(grid(to_numpy_images(x), nrow=frames), Path(out))
