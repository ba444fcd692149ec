"""Continuous-time consistency models in TrigFlow form (sCM, Lu and Song 2024): sCT and sCD."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from cmkit.losses import JVP, JVP_MODES, SCMLoss, TeacherVelocity, Velocity, data_velocity
from cmkit.methods.base import (
    CONSISTENCY_CAPABILITIES,
    TRIGFLOW_POLICY,
    MethodEntry,
    TaughtConfig,
    TeacherRole,
    jvp_step,
    shared_dropout,
)
from cmkit.precond import C_NOISE, TrigFlow


@dataclass(frozen=True)
class SCMConfig(TaughtConfig):
    """Continuous-time consistency models in TrigFlow form (sCM, Lu and Song 2024, Alg. 1).

    ``tau ~ N(p_mean, p_std^2)``, ``t = arctan(e^tau / sigma_data)`` (kept within the model's
    [sigma_min, sigma_max]); the tangent ``g`` is warmed up over ``tangent_warmup_kimg`` thousand images and
    normalised as ``g / (||g|| + tangent_c)``; ``c_noise`` is the network's time input (:class:`TrigFlow`):
    ``log-sigma`` lets a cmkit EDM ``teacher`` seed the student exactly, ``t`` is the paper's. ``jvp``: how the
    JVP is computed (:class:`cmkit.losses.JVP`): ``forward`` mode, or ``finite-difference`` (central differences
    at step ``jvp_step``, three forward passes) for kernels without a forward-mode rule.
    """

    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_warmup_kimg: float = 5_120.0
    tangent_c: float = 0.1
    c_noise: str = "log-sigma"
    jvp: str = "forward"
    jvp_step: float = 1e-3

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"c_noise": C_NOISE, "jvp": JVP_MODES}

    def wrapper_options(self) -> dict[str, Any]:
        return {"c_noise": self.c_noise}

    def _positive(self) -> tuple[str, ...]:
        return ("p_std", "tangent_c")

    def _checks(self) -> list[tuple[bool, str]]:
        ok = self.tangent_warmup_kimg >= 0 and math.isfinite(self.tangent_warmup_kimg)
        return [(ok, f"method.tangent_warmup_kimg: expected >= 0, got {self.tangent_warmup_kimg}"),
                jvp_step(self.jvp_step)]


@dataclass(frozen=True)
class SCTConfig(SCMConfig):
    """sCT: the tangent's ``dx_t/dt = cos t z - sin t x0`` comes from the data. It starts from a ``teacher``'s
    weights where one is given (the paper's setting), else from scratch."""

    name: str = field(default="sct", init=False)


@dataclass(frozen=True)
class SCDConfig(SCMConfig):
    """sCD: the tangent's ``dx_t/dt`` is the ``teacher``'s TrigFlow velocity (an EDM denoiser converted by
    matching signal-to-noise ratios, :func:`cmkit.precond.trigflow_velocity`)."""

    name: str = field(default="scd", init=False)


def _loss(method: SCMConfig, velocity: Velocity) -> SCMLoss:
    sd = method.sigma_data
    return SCMLoss(velocity, p_mean=method.p_mean, p_std=method.p_std, sigma_data=sd,
                   t_min=math.atan(method.sigma_min / sd), t_max=math.atan(method.sigma_max / sd),
                   warmup_images=method.tangent_warmup_kimg * 1000, tangent_c=method.tangent_c,
                   jvp=JVP(method.jvp, method.jvp_step))


def build_sct_loss(method: SCTConfig, **_) -> SCMLoss:
    """sCT (Lu and Song 2024): the tangent from the data's own velocity."""
    return _loss(method, data_velocity)


def build_scd_loss(method: SCDConfig, *, teacher: nn.Module, **_) -> SCMLoss:
    """sCD (Lu and Song 2024): the tangent from the teacher's TrigFlow velocity."""
    return _loss(method, TeacherVelocity(teacher, sigma_data=method.sigma_data))


_CHECKS = (shared_dropout,)
SCT = MethodEntry(SCTConfig, build_sct_loss, TrigFlow, TRIGFLOW_POLICY, TeacherRole.INIT_OPTIONAL,
                  CONSISTENCY_CAPABILITIES, logvar_head=True, checks=_CHECKS)
SCD = MethodEntry(SCDConfig, build_scd_loss, TrigFlow, TRIGFLOW_POLICY, TeacherRole.TARGET,
                  CONSISTENCY_CAPABILITIES, logvar_head=True, checks=_CHECKS)
