"""Conditioning: what a network is told besides the noisy image and its noise level, as ONE object.

:class:`Cond` travels as the third argument of every denoiser call ``model(x, sigma, cond=None) -> x0`` (samplers,
editing, teachers, the studio, evaluation) and of the raw network call of losses that differentiate the
network (:meth:`cmkit.precond.TrigFlow.raw`); ``None`` means "nothing": an unconditional model at sampling.

- Class labels use :data:`NULL_LABEL` (-1) for "no class": the U-Net gives it a zero one-hot, so a model
  trained with label dropout (``train.p_uncond``) learns an unconditional branch, and existing checkpoints
  keep working (they never see -1).
- :class:`ClassifierFree` is classifier-free guidance (Ho and Salimans 2022) over any denoiser.
- :func:`check_labels` is the one check of user-given class labels (``cmkit sample``, ``eval``, ``edit``, the
  studio); :func:`seed_labels` the one rule deriving a sample's class from its seed;
  :func:`check_guidance` the one check of a guidance scale.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from cmkit.errors import CmkitError
from cmkit.rng import SeededNoise

NULL_LABEL = -1  # the class label meaning "no class" (classifier-free guidance's unconditional branch)

Labels = int | Tensor | None  # user-given classes: one for every image, int64 [N] (one per image), or None


@dataclass(frozen=True)
class Cond:
    """Conditioning of a batch of N samples; every field is None or has N rows.

    Attributes:
        labels: class labels int64 [N] in [0, num_classes), or :data:`NULL_LABEL` for "no class".
        augment: EDM's augmentation labels float [N, augment_dim] (training with ``data.augment > 0``).
        guidance: a guidance scale float [N] given to the network as an input (guidance-distilled models);
            classifier-free guidance at sampling is :class:`ClassifierFree`, not this field.
        time2: a second time float [N] for two-time networks (flow maps: MeanFlow's r).
        text: text embeddings float [N, L, D].
    """

    labels: Tensor | None = None
    augment: Tensor | None = None
    guidance: Tensor | None = None
    time2: Tensor | None = None
    text: Tensor | None = None

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def _map(self, fn: Any) -> Cond:
        return replace(self, **{name: fn(t) for name, t in self._tensors().items()})

    def rows(self, index: slice | Tensor) -> Cond:
        """The rows ``index`` (a slice, or an int64 / bool index tensor) of every field."""
        return self._map(lambda t: t[index])

    def pad(self, count: int) -> Cond:
        """Every field followed by ``count`` copies of its last row (:class:`cmkit.sampling.BatchInvariant`)."""
        return self._map(lambda t: pad_rows(t, count))

    def to(self, device: torch.device | str) -> Cond:
        """Every field on ``device``."""
        return self._map(lambda t: t.to(device))

    def unconditional(self) -> Cond:
        """The copy without a class: every label :data:`NULL_LABEL` (other fields kept)."""
        if self.labels is None:
            return self
        return replace(self, labels=torch.full_like(self.labels, NULL_LABEL))


def pad_rows(t: Tensor, count: int) -> Tensor:
    """``t`` [N, ...] followed by ``count`` copies of its last row."""
    return torch.cat([t, t[-1:].expand(count, *t.shape[1:])])


def of_labels(labels: Tensor | None) -> Cond | None:
    """The conditioning of class labels int64 [N] alone (None: no conditioning)."""
    return None if labels is None else Cond(labels=labels)


def drop_labels(labels: Tensor, drop: Tensor) -> Tensor:
    """Label dropout for classifier-free guidance: ``labels`` int64 [N] with :data:`NULL_LABEL` where the
    bool ``drop`` [N] is True (Ho and Salimans 2022, Alg. 1: train the unconditional model jointly)."""
    return torch.where(drop.to(labels.device), torch.full_like(labels, NULL_LABEL), labels)


# ------------------------------------------------------------------------------------------------ guidance

class ClassifierFree:
    """Classifier-free guidance over any denoiser ``model(x, sigma, cond) -> x0`` (Ho and Salimans 2022, eq. 6
    written on x0): ``D = D_uncond + w (D_cond - D_uncond)`` (``torch.lerp``), with ``w = scale``: 1 is the
    plain conditional model, 0 the unconditional one (diffusers' ``guidance_scale`` convention; LCM's omega is
    w - 1). ``scale`` is one number, or float [N], one scale per sample (LCM's teacher step). D_uncond is
    ``model`` at ``cond.unconditional()``. Every other attribute is ``model``'s."""

    def __init__(self, model: nn.Module, scale: float | Tensor) -> None:
        self.model = model
        self.scale = scale.view(-1, 1, 1, 1) if isinstance(scale, Tensor) else float(scale)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None) -> Tensor:
        if cond is None or cond.labels is None:
            raise CmkitError("classifier-free guidance: expected class labels to guide with")
        d_cond = self.model(x, sigma, cond)
        d_uncond = self.model(x, sigma, cond.unconditional())
        return torch.lerp(d_uncond, d_cond, self.scale)


def check_guidance(guidance: float | None, *, num_classes: int, p_uncond: float | None,
                   trained_range: tuple[float, float] | None = None) -> None:
    """A guidance scale needs a class-conditional model that learnt the null label: refuse it for an
    unconditional model (``num_classes`` 0) and for one trained with ``p_uncond`` 0 (None: not known, e.g. a
    plain module given to :func:`cmkit.sampling.generate`); and refuse a non-finite scale. A model that takes the
    scale as an input (LCM: ``trained_range`` = its [w_min, w_max]) needs no null label but a scale inside that
    range."""
    if guidance is None:
        return
    if not torch.isfinite(torch.tensor(float(guidance))):
        raise CmkitError(f"--guidance {guidance}: expected a finite guidance scale (1: no guidance)")
    if not num_classes:
        raise CmkitError(f"--guidance {guidance:g}: this model is not class-conditional, so it has nothing to "
                         "guide with")
    if trained_range is not None:
        lo, hi = trained_range
        if not lo <= guidance <= hi:
            raise CmkitError(f"--guidance {guidance:g}: this model was trained for guidance scales in [{lo:g}, "
                             f"{hi:g}] (its w input); expected a scale in that range")
        return
    if p_uncond == 0:
        raise CmkitError(f"--guidance {guidance:g}: this model was trained with train.p_uncond=0, so it never "
                         "learnt the unconditional branch guidance needs; train with train.p_uncond > 0 (e.g. 0.1)")


# ------------------------------------------------------------------------------------------------ labels

def check_labels(num_classes: int, labels: Labels, count: int | None = None, *, name: str = "--label") -> None:
    """The one check of user-given class labels: None, or for a class-conditional model (``num_classes`` > 0)
    an int or an integer tensor (shape [] or [``count``]) of classes in [0, num_classes). An unconditional
    model takes no labels. ``name`` is what the messages call the labels (the CLI's option by default)."""
    if labels is None:
        return
    values = torch.as_tensor(labels)
    text = ",".join(str(v) for v in values.flatten()[:4].tolist()) + ("..." if values.numel() > 4 else "")
    if not num_classes:
        raise CmkitError(f"{name} {text}: this model is not class-conditional (it was trained without labels)")
    if (values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool
            or values.numel() == 0 or int(values.min()) < 0 or int(values.max()) >= num_classes):
        raise CmkitError(f"{name} {text}: expected a class in [0, {num_classes}) for this model")
    if values.ndim > 1 or (values.ndim == 1 and count is not None and len(values) != count):
        raise CmkitError(f"labels of shape {tuple(values.shape)}: expected one class, or one per image "
                         f"[{count if count is not None else 'N'}]")


def seed_labels(noise: SeededNoise, num_classes: int, labels: Labels = None) -> Tensor | None:
    """The one seed -> class rule: the classes of a batch of seeds, int64 [N] on the noise's device (None for
    an unconditional model). A class is always drawn from each seed's generator first (so the noise that
    follows is the same with or without ``labels``), then replaced by ``labels`` (one class, or int64 [N])
    when given. ``labels`` must have passed :func:`check_labels`."""
    if not num_classes:
        return None
    drawn = noise.labels(num_classes)
    if labels is None:
        return drawn
    return torch.as_tensor(labels, dtype=torch.int64, device=drawn.device).expand(len(drawn)).clone()
