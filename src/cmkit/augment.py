"""EDM's non-leaking augmentation of training images, with augment labels for the network.

Karras et al. 2022 (EDM), App. F.2, after Karras et al. 2020 (ADA); the reference is EDM's
``training/augment.py`` (``AugmentPipe``). Each enabled transform is applied to an image with probability
``multiplier * p`` (capped at 1); its parameters become the image's *augment labels*, an extra conditioning
input of the denoiser, so the network learns the augmented distribution as a separate, labelled one and
samples with all-zero labels (no augmentation) show no trace of it: the augmentation does not leak.

The geometric transforms, in EDM's order, with EDM's parameter conventions and label entries:

| transform | parameter | label entries |
|---|---|---|
| xflip | w in {0, 1}: mirror left-right | w |
| yflip | w in {0, 1}: mirror top-bottom | w |
| rotate_int | k in {0, 1, 2, 3} quarter turns (``torch.rot90(x, k, (2, 3))``) | [k in {1, 2}, k in {2, 3}] |
| translate_int | integer shift up to ``translate_int_max`` of the size, edges mirrored | shift / (size * max) |
| scale | w ~ N(0, 1): magnify by 2^(w scale_std) | w |
| rotate_frac | angle w uniform in [-pi, pi] * rotate_frac_max | [cos w - 1, sin w] |
| aniso | w ~ N(0, 1), axis angle r (else 0): stretch by 2^(w aniso_std) | [w cos r, w sin r] |
| translate_frac | w ~ N(0, 1)^2: shift by w * translate_frac_std * size | [w_x, w_y] |

Only enabled transforms (multiplier > 0) draw numbers and contribute label entries, so the label width
depends on the :class:`Pipeline`; EDM's CIFAR-10 setting (:data:`EDM_CIFAR10`) has :data:`AUGMENT_DIM` = 9:
[xflip, yflip, scale, rotate_frac (2), aniso (2), translate_frac (2)]. An image drawn with no transform has
all-zero labels. EDM's colour transforms (brightness, contrast, lumaflip, hue, saturation) are not implemented.

Randomness is an argument: a :data:`cmkit.rng.RowNoise` (training: the step's :class:`cmkit.rng.BatchNoise`,
so an image's augmentation is the same at any world size and on a resume). Every number is drawn on the CPU,
so the augmentation does not depend on the device either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cmkit.rng import RowNoise


@dataclass(frozen=True)
class Pipeline:
    """Probability multipliers of the transforms (0: off) and their ranges, as EDM's ``AugmentPipe`` names them.

    A transform is applied to an image with probability ``min(1, multiplier * p)``; ranges are relative to
    the image size (translations) or log2 standard deviations (scalings); ``rotate_frac_max = 1`` is a full
    circle.
    """

    xflip: float = 0.0
    yflip: float = 0.0
    rotate_int: float = 0.0
    translate_int: float = 0.0
    scale: float = 0.0
    rotate_frac: float = 0.0
    aniso: float = 0.0
    translate_frac: float = 0.0
    translate_int_max: float = 0.125
    scale_std: float = 0.2
    rotate_frac_max: float = 1.0
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_frac_std: float = 0.125


# EDM's CIFAR-10 setting (EDM train.py, --augment): the x-flip multiplier 1e8 makes every image's x-flip a fair
# coin whatever p > 0 is (the labelled replacement of plain dataset flips); the other transforms act with p.
EDM_CIFAR10 = Pipeline(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

_LABEL_WIDTHS = {"xflip": 1, "yflip": 1, "rotate_int": 2, "translate_int": 2, "scale": 1, "rotate_frac": 2,
                 "aniso": 2, "translate_frac": 2}


def label_dim(pipe: Pipeline) -> int:
    """The number of augment-label entries ``pipe`` produces per image (its enabled transforms')."""
    return sum(width for name, width in _LABEL_WIDTHS.items() if getattr(pipe, name) > 0)


AUGMENT_DIM = label_dim(EDM_CIFAR10)  # 9: the network's augment-label input (EDM's augment_dim)


@dataclass(frozen=True)
class Augmentation:
    """One draw of a pipeline for N images of size H x W (CPU tensors): what :func:`apply` does to each image.

    ``xflip``, ``yflip``: bool [N]; ``quarter_turns``: int64 [N] in 0..3 (counter-clockwise in array view, as
    ``torch.rot90`` over dims (2, 3)); ``shift``: int64 [N, 2] pixels (right, up), edges reflected; ``matrix``:
    float32 [N, 3, 3] mapping output to input pixel coordinates (origin at the image centre, x right, y down),
    the identity where no fractional transform was drawn; ``labels``: float32 [N, label_dim(pipe)].
    """

    xflip: Tensor
    yflip: Tensor
    quarter_turns: Tensor
    shift: Tensor
    matrix: Tensor
    labels: Tensor


def augment(images: Tensor, noise: RowNoise, *, p: float, pipe: Pipeline = EDM_CIFAR10) -> tuple[Tensor, Tensor]:
    """Augment ``images`` [N, C, H, W] (square when rotate_int is on) with probability ``p`` in [0, 1].

    Returns (augmented float32 [N, C, H, W] on the images' device, labels float32 [N, label_dim(pipe)] there).
    With ``p = 0`` the images come back unchanged and the labels are all zero (the numbers are still drawn).
    """
    aug = draw(noise, images.shape, p=p, pipe=pipe)
    return apply(images, aug), aug.labels.to(images.device)


def draw(noise: RowNoise, shape: tuple[int, ...] | torch.Size, *, p: float, pipe: Pipeline) -> Augmentation:
    """Draw every enabled transform's parameters for a batch of ``shape`` [N, C, H, W], in EDM's order.

    Each enabled transform draws its values and then a uniform gate (``gate < multiplier * p``) for every
    image, applied or not, so an image's numbers do not depend on the others'.
    """
    with torch.autocast("cpu", enabled=False):  # the matrices in float32 even inside a CPU autocast region
        return _draw(noise, shape, p=p, pipe=pipe)


def _draw(noise: RowNoise, shape: tuple[int, ...] | torch.Size, *, p: float, pipe: Pipeline) -> Augmentation:
    n, _, h, w = shape
    labels: list[Tensor] = []
    xflip = _coin(noise, n, 2, pipe.xflip * p, labels) if pipe.xflip > 0 else torch.zeros(n, dtype=torch.int64)
    yflip = _coin(noise, n, 2, pipe.yflip * p, labels) if pipe.yflip > 0 else torch.zeros(n, dtype=torch.int64)
    turns = torch.zeros(n, dtype=torch.int64)
    if pipe.rotate_int > 0:
        turns = _coin(noise, n, 4, pipe.rotate_int * p, [])
        labels += [((turns == 1) | (turns == 2)).view(n, 1), ((turns == 2) | (turns == 3)).view(n, 1)]
    shift = torch.zeros(n, 2, dtype=torch.int64)
    if pipe.translate_int > 0:
        shift = _integer_shift(noise, n, (w, h), pipe.translate_int * p, pipe.translate_int_max, labels)
    matrix = torch.eye(3).expand(n, 3, 3)
    for enabled, part in ((pipe.scale, _scale), (pipe.rotate_frac, _rotate), (pipe.aniso, _aniso),
                          (pipe.translate_frac, _translate)):
        if enabled > 0:
            matrix = matrix @ part(noise, n, (w, h), p, pipe, labels)
    flat = torch.cat([x.to(torch.float32).view(n, -1) for x in labels], dim=1) if labels else torch.zeros(n, 0)
    return Augmentation(xflip.bool(), yflip.bool(), turns, shift, matrix, flat)


# ------------------------------------------------------------------- drawing: each transform's parameters

def _gated(noise: RowNoise, value: Tensor, prob: float) -> Tensor:
    """``value`` [n, ...] where each image's gate opens (a uniform draw below ``prob``: probability min(1, prob)),
    else 0; the gates are drawn after the value."""
    gate = noise.rand(len(value)) < prob
    return torch.where(gate.view(-1, *(1,) * (value.ndim - 1)), value, torch.zeros_like(value))


def _coin(noise: RowNoise, n: int, high: int, prob: float, labels: list[Tensor]) -> Tensor:
    """int64 [n]: uniform in [0, high) where the gate opens, else 0; appended to ``labels`` (one entry)."""
    value = _gated(noise, noise.randint(high, n), prob)
    labels.append(value.view(n, 1))
    return value


def _integer_shift(noise: RowNoise, n: int, size: tuple[int, int], prob: float, most: float,
                   labels: list[Tensor]) -> Tensor:
    """int64 [n, 2] shifts (right, up) of up to ``most`` of the (width, height), rounded; labels shift / range."""
    u = _gated(noise, torch.stack([noise.rand(n), noise.rand(n)], dim=1) * 2 - 1, prob)  # each image's x, then y
    span = torch.tensor(size, dtype=torch.float32) * most
    shift = (u * span).round()
    labels.append(shift / span)
    return shift.to(torch.int64)


def _scale(noise: RowNoise, n: int, size: tuple[int, int], p: float, pipe: Pipeline,
           labels: list[Tensor]) -> Tensor:
    """Isotropic magnification by 2^(w scale_std), w ~ N(0, 1); label w."""
    w = _gated(noise, noise.randn(n), pipe.scale * p)
    labels.append(w)
    s = torch.exp2(w * pipe.scale_std)
    return _diag(1 / s, 1 / s)


def _rotate(noise: RowNoise, n: int, size: tuple[int, int], p: float, pipe: Pipeline,
            labels: list[Tensor]) -> Tensor:
    """Rotation by w uniform in [-pi, pi] * rotate_frac_max; labels cos w - 1, sin w."""
    w = _gated(noise, (noise.rand(n) * 2 - 1) * (math.pi * pipe.rotate_frac_max), pipe.rotate_frac * p)
    labels += [w.cos() - 1, w.sin()]
    return _rotation(w)


def _aniso(noise: RowNoise, n: int, size: tuple[int, int], p: float, pipe: Pipeline,
           labels: list[Tensor]) -> Tensor:
    """Stretch by 2^(w aniso_std) along an axis at angle r (and shrink across it); labels w cos r, w sin r.

    As in EDM, the labels of (w, r) and (-w, r + pi) coincide although the stretches differ (one is the other
    turned by a quarter): EDM's convention, kept so the labels mean what they mean there.
    """
    w = noise.randn(n)
    r = (noise.rand(n) * 2 - 1) * math.pi
    w = _gated(noise, w, pipe.aniso * p)
    r = _gated(noise, r, pipe.aniso_rotate_prob)
    labels += [w * r.cos(), w * r.sin()]
    s = torch.exp2(w * pipe.aniso_std)
    return _stretch(1 / s, s, torch.stack([r.cos(), -r.sin()], 1))  # EDM's R(-r) diag(1 / s, s) R(r)


def _translate(noise: RowNoise, n: int, size: tuple[int, int], p: float, pipe: Pipeline,
               labels: list[Tensor]) -> Tensor:
    """Shift by w * translate_frac_std * (width, height), w ~ N(0, I_2); labels w_x, w_y."""
    w = _gated(noise, noise.randn(n, 2), pipe.translate_frac * p)
    labels.append(w)
    shift = w * torch.tensor(size, dtype=torch.float32) * pipe.translate_frac_std
    return _offset(-shift[:, 0], -shift[:, 1])


def _diag(sx: Tensor, sy: Tensor) -> Tensor:
    """[n, 3, 3] scaling matrices."""
    out = torch.eye(3).repeat(len(sx), 1, 1)
    out[:, 0, 0], out[:, 1, 1] = sx, sy
    return out


def _stretch(along: Tensor, across: Tensor, u: Tensor) -> Tensor:
    """[n, 3, 3] scalings by ``along`` in the unit direction ``u`` [n, 2] and ``across`` perpendicular to it,
    written ``across I + (along - across) u u^T`` so that equal factors give exactly ``across I``."""
    out = _diag(across, across)
    out[:, :2, :2] += (along - across).view(-1, 1, 1) * u[:, :, None] * u[:, None, :]
    return out


def _rotation(theta: Tensor) -> Tensor:
    """[n, 3, 3] rotations by ``theta``: (x, y) -> (x cos - y sin, x sin + y cos)."""
    out = torch.eye(3).repeat(len(theta), 1, 1)
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    return out


def _offset(tx: Tensor, ty: Tensor) -> Tensor:
    """[n, 3, 3] translations by (tx, ty)."""
    out = torch.eye(3).repeat(len(tx), 1, 1)
    out[:, 0, 2], out[:, 1, 2] = tx, ty
    return out


# ---------------------------------------------------------------------------------- applying a draw

def apply(images: Tensor, aug: Augmentation) -> Tensor:
    """The images [N, C, H, W] transformed as ``aug`` says, float32 (computed in float32, outside autocast).

    Flips, quarter turns and integer shifts move pixels, so values stay in the input's range. Fractional
    transforms resample (:func:`resample`) only the images that drew one; the others come back exactly (EDM
    resamples the whole batch, which leaves those images unchanged up to rounding).
    """
    with torch.autocast(images.device.type, enabled=False):
        x = images.to(torch.float32)
        x = torch.where(_rows(aug.xflip, x), x.flip(3), x)
        x = torch.where(_rows(aug.yflip, x), x.flip(2), x)
        x = _quarter_turns(x, aug.quarter_turns.to(x.device))
        if bool(aug.shift.any()):
            x = _reflect_shift(x, aug.shift.to(x.device))
        moved = (aug.matrix != torch.eye(3)).flatten(1).any(1)
        if bool(moved.any()):
            index = moved.nonzero().flatten().to(x.device)
            x = x.index_copy(0, index, resample(x[index], aug.matrix[moved].to(x.device)))
        return x


def _rows(mask: Tensor, x: Tensor) -> Tensor:
    """A per-image mask [N] on x's device, shaped [N, 1, 1, 1] to select whole images."""
    return mask.to(x.device).view(-1, 1, 1, 1)


def _quarter_turns(x: Tensor, k: Tensor) -> Tensor:
    """Turn image i by k[i] quarter turns (as torch.rot90(x[i], k[i], (1, 2))): flips and a transpose, EDM's way."""
    x = torch.where(_rows((k == 1) | (k == 2), x), x.flip(3), x)
    x = torch.where(_rows((k == 2) | (k == 3), x), x.flip(2), x)
    return torch.where(_rows((k == 1) | (k == 3), x), x.transpose(2, 3), x)


def _reflect_shift(x: Tensor, shift: Tensor) -> Tensor:
    """Shift image i right by shift[i, 0] and up by shift[i, 1] pixels, mirroring at the edges (no edge repeat)."""
    n, c, h, w = x.shape
    cols = _reflect(torch.arange(w, device=x.device) - shift[:, :1], w)  # [n, w] source column of each column
    rows = _reflect(torch.arange(h, device=x.device) + shift[:, 1:], h)  # [n, h] source row of each row
    x = x.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w))
    return x.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def _reflect(index: Tensor, size: int) -> Tensor:
    """Indices folded into [0, size) by mirroring about the first and last pixel."""
    if size == 1:
        return torch.zeros_like(index)
    return size - 1 - (size - 1 - index % (2 * size - 2)).abs()


# Daubechies' least-asymmetric wavelet with 6 vanishing moments (sym6), its low-pass decomposition filter:
# EDM's (and ADA's) resampling filter, an orthonormal one, so upsampling then downsampling with it is the identity.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
_MARGIN = len(SYM6) // 4  # 3: pixels of border the output keeps while filtering, cropped at the end


def resample(images: Tensor, matrix: Tensor) -> Tensor:
    """Warp images [N, C, H, W] float32: output pixel q takes the input at ``matrix[i] @ q`` (centred pixel
    coordinates), EDM's way: reflect-pad, upsample 2x with sym6, bilinear sampling, downsample 2x with sym6.

    Points beyond the padding read zeros. EDM pads each batch by the margin its most displaced image needs,
    capped at the size minus one; this pads every batch by that cap, so an image's result does not depend on
    the batch it is in (the pixels an image reads lie within its own margin, so the results agree). The sym6
    filter has negative taps: a warped image can overshoot [-1, 1] slightly near sharp edges, as in EDM.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, [w - 1, w - 1, h - 1, h - 1], mode="reflect")
    up = _upsample(padded)
    out_h, out_w = 2 * (h + 2 * _MARGIN), 2 * (w + 2 * _MARGIN)
    theta = _normalised(matrix, up.shape[2:], (out_h, out_w))
    grid = F.affine_grid(theta[:, :2], [n, c, out_h, out_w], align_corners=False)
    sampled = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample(sampled)[:, :, _MARGIN:-_MARGIN, _MARGIN:-_MARGIN]


def _normalised(matrix: Tensor, up_size: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
    """``matrix`` (centred pixels of the original grid) as the map affine_grid takes: from [-1, 1] coordinates of
    the 2x output grid to those of the 2x upsampled input. A centred pixel x of the original grid is the centred
    pixel ``2 x - 1/2`` of the 2x grids (the half-pixel phase of the filters)."""
    (up_h, up_w), (out_h, out_w) = up_size, out_size
    to_input = _const([[2 / up_w, 0, 0], [0, 2 / up_h, 0], [0, 0, 1]], matrix)
    from_output = _const([[out_w / 2, 0, 0], [0, out_h / 2, 0], [0, 0, 1]], matrix)
    to_fine = _const([[2, 0, -0.5], [0, 2, -0.5], [0, 0, 1]], matrix)
    to_coarse = _const([[0.5, 0, 0.25], [0, 0.5, 0.25], [0, 0, 1]], matrix)  # the inverse of to_fine
    return to_input @ to_fine @ matrix @ to_coarse @ from_output


def _const(rows: list[list[float]], like: Tensor) -> Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _filter(x: Tensor) -> Tensor:
    """sym6 as a depthwise kernel [C, 1, 1, 12] in the images' dtype and device."""
    return torch.tensor(SYM6, dtype=x.dtype, device=x.device).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)


def _upsample(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, C, 2H, 2W]: zeros inserted after each pixel, filtered with sym6 (each axis)."""
    k, pad = _filter(x), len(SYM6) // 2 - 1
    x = F.conv_transpose2d(x, k, stride=(1, 2), padding=(0, pad), groups=x.shape[1])
    return F.conv_transpose2d(x, k.transpose(2, 3), stride=(2, 1), padding=(pad, 0), groups=x.shape[1])


def _downsample(x: Tensor) -> Tensor:
    """[N, C, 2H', 2W'] -> [N, C, H', W']: filtered with sym6 and every other sample kept (each axis)."""
    k, pad = _filter(x), len(SYM6) // 2 - 1
    x = F.conv2d(x, k, stride=(1, 2), padding=(0, pad), groups=x.shape[1])
    return F.conv2d(x, k.transpose(2, 3), stride=(2, 1), padding=(pad, 0), groups=x.shape[1])
