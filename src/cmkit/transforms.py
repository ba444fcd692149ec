"""The orthogonal linear maps of zero-shot editing (CM paper, Alg. 4 and App. D), and the projection onto a
map's kept coordinates within the valid pixel box [-1, 1].

A map is a small object: ``transform(x)`` gives the coordinates A x and ``transform.inverse(a)`` gives
A^-1 a = A^T a, both laid out like the image, float [N, C, H, W].
"""

from __future__ import annotations

import torch
from torch import Tensor

LUMA: tuple[float, float, float] = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luma weights (App. D)


def orthogonal_completion(v: Tensor) -> Tensor:
    """An orthogonal float64 [n, n] matrix Q whose first column is v / |v|.

    QR of [v / |v|, e_2, ..., e_n] (full rank when v[0] != 0), with column signs chosen so that R has a
    positive diagonal; the first column is then v / |v| itself.
    """
    v = v.to(torch.float64).flatten()
    m = torch.eye(v.numel(), dtype=torch.float64)
    m[:, 0] = v / v.norm()
    q, r = torch.linalg.qr(m)
    return q * torch.sign(torch.diagonal(r))


class Identity:
    """A = I: inpainting and stroke-guided generation work on pixels."""

    def __call__(self, x: Tensor) -> Tensor:
        return x

    def inverse(self, a: Tensor) -> Tensor:
        return a

    def project(self, x: Tensor, known: Tensor, keep: Tensor) -> Tensor:
        """The point of [-1, 1] nearest to x whose kept pixels (``keep`` True) equal ``known``: a copy of them."""
        return torch.where(keep, known.clamp(-1, 1), x.clamp(-1, 1))


class LumaChroma:
    """Per pixel, the 3 x 3 orthogonal Q whose first column is proportional to the luma weights (App. D).

    Coordinates ``a = Q^T x`` of each RGB pixel, [N, 3, H, W]: channel 0 is luma / |w| (w = LUMA), channels 1
    and 2 span the chroma plane orthogonal to it.
    """

    def __init__(self) -> None:
        self.q = orthogonal_completion(torch.tensor(LUMA, dtype=torch.float64))

    def __call__(self, x: Tensor) -> Tensor:
        return _times(x.movedim(1, -1), self.q).movedim(-1, 1)

    def inverse(self, a: Tensor) -> Tensor:
        return _times(a.movedim(1, -1), self.q.T).movedim(-1, 1)

    def groups(self, t: Tensor) -> Tensor:
        """Sum over each pixel's 3 coordinates (or channels): [N, 3, H, W] -> [N, 1, H, W]."""
        return t.sum(1, keepdim=True)

    def spread(self, g: Tensor) -> Tensor:
        """A value per pixel [N, 1, H, W] onto its 3 channels."""
        return g.expand(-1, 3, -1, -1)

    def project(self, x: Tensor, known: Tensor, keep: Tensor) -> Tensor:
        """See :func:`box_projection`."""
        return box_projection(self, x, known, keep)


class PatchBasis:
    """Per p x p patch, the orthogonal p^2 x p^2 Q whose first column is the normalised all-ones vector (App. D).

    Coordinates are laid out like the image: coefficient k of a patch sits on the patch's k-th pixel (row
    major), so coefficient 0, which is p times the patch mean, sits on its top-left pixel. H and W must be
    multiples of p.
    """

    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.q = orthogonal_completion(torch.ones(factor * factor))

    def __call__(self, x: Tensor) -> Tensor:
        return _per_patch(x, self.q, self.factor)

    def inverse(self, a: Tensor) -> Tensor:
        return _per_patch(a, self.q.T, self.factor)

    def groups(self, t: Tensor) -> Tensor:
        """Sum over each p x p patch (per channel): [N, C, H, W] -> [N, C, H / p, W / p]."""
        n, c, h, w, p = *t.shape, self.factor
        return t.reshape(n, c, h // p, p, w // p, p).sum((3, 5))

    def spread(self, g: Tensor) -> Tensor:
        """A value per patch [N, C, H / p, W / p] onto its p x p pixels."""
        return g.repeat_interleave(self.factor, 2).repeat_interleave(self.factor, 3)

    def project(self, x: Tensor, known: Tensor, keep: Tensor) -> Tensor:
        """See :func:`box_projection`."""
        return box_projection(self, x, known, keep)


def _per_patch(x: Tensor, m: Tensor, p: int) -> Tensor:
    """Multiply each p x p patch of x [N, C, H, W], flattened row-major to a row vector, by m [p^2, p^2]."""
    n, c, h, w = x.shape
    v = x.reshape(n, c, h // p, p, w // p, p).transpose(3, 4).reshape(n, c, h // p, w // p, p * p)
    return _times(v, m).reshape(n, c, h // p, w // p, p, p).transpose(3, 4).reshape(n, c, h, w)


def _times(v: Tensor, m: Tensor) -> Tensor:
    """Row vectors v [..., k] times m [k, k], as a product and a sum rather than a BLAS matmul, so that each
    entry is computed the same way whatever the batch size (results must not depend on it)."""
    return (v.unsqueeze(-1) * m.to(v)).sum(-2)


Transform = Identity | LumaChroma | PatchBasis
BISECT_RANGE, BISECT_STEPS = 1e4, 64  # lambda in [-1e4, 1e4], halved 64 times: to ~1e-15


def box_projection(transform: LumaChroma | PatchBasis, x: Tensor, known: Tensor, keep: Tensor) -> Tensor:
    """The point of [-1, 1]^D nearest to x whose kept coordinates (``keep`` True, in A's layout) equal ``known``.

    x: float [N, C, H, W] in [-1, 1]; known: A y, laid out like x; keep: bool, broadcastable to x. Exact (to
    ~1e-15 in float64, then x's dtype) when each group of ``transform`` (a pixel, a patch) has at most one kept
    coordinate: the kept coordinate k is the row q_k . x over its group's pixels alone, the nearest point is
    clip(x + lambda q_k) with q_k . clip(x + lambda q_k) = known_k, and that value is monotone in lambda, so
    lambda is found by bisection, for every group at once. A target outside the box's reach gets the nearest
    reachable value. With several kept coordinates in a group (rows sharing pixels) it falls back to Alg. 4's
    replacement followed by a clamp, which keeps the result in [-1, 1] but the kept coordinates only roughly.
    """
    keep = keep.expand_as(x)
    if transform.groups(keep.to(x.dtype)).max() > 1:
        return transform.inverse(torch.where(keep, known, transform(x))).clamp(-1, 1)
    x64 = x.to(torch.float64)
    row = transform.inverse(keep.to(torch.float64))  # each pixel's entry of its group's kept row (0: none)
    target = transform.groups(torch.where(keep, known.to(torch.float64), 0))
    lo, hi = torch.full_like(target, -BISECT_RANGE), torch.full_like(target, BISECT_RANGE)
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        below = transform.groups(row * (x64 + transform.spread(mid) * row).clamp(-1, 1)) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (x64 + transform.spread((lo + hi) / 2) * row).clamp(-1, 1).to(x.dtype)
