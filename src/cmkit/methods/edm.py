"""EDM diffusion training (Karras et al. 2022): the teachers of the consistency methods."""

from __future__ import annotations

from dataclasses import dataclass, field

from cmkit.losses import EDMLoss
from cmkit.methods.base import DIFFUSION_POLICY, Capability, MethodConfig, MethodEntry, TeacherRole
from cmkit.precond import EDMDenoiser


@dataclass(frozen=True)
class EDMConfig(MethodConfig):
    """EDM diffusion training (Karras et al. 2022): ln sigma ~ N(p_mean, p_std^2)."""

    name: str = field(default="edm", init=False)
    p_mean: float = -1.2
    p_std: float = 1.2

    def _positive(self) -> tuple[str, ...]:
        return ("p_std",)


def build_loss(method: EDMConfig, *, augment: float, **_) -> EDMLoss:
    """EDM's loss (eq. 8), with EDM's augmentation pipeline at probability ``augment``."""
    return EDMLoss(p_mean=method.p_mean, p_std=method.p_std, sigma_data=method.sigma_data, augment=augment)


ENTRY = MethodEntry(EDMConfig, build_loss, EDMDenoiser, DIFFUSION_POLICY, TeacherRole.NONE,
                    frozenset({Capability.TEACH, Capability.AUGMENT}))
