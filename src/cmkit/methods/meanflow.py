"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447): a one-step
generator trained from scratch on the average velocity of the linear path, with the MeanFlow identity."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from cmkit.augment import augment as augment_images
from cmkit.cond import NULL_LABEL, Cond
from cmkit.losses import JVP, JVP_MODES, raw_call, replayed_randomness
from cmkit.methods.base import (
    Capability,
    MethodConfig,
    MethodEntry,
    TeacherRole,
    jvp_step,
    shared_dropout,
)
from cmkit.precond import MeanFlow
from cmkit.rng import GlobalNoise, RowNoise
from cmkit.sampling import SamplingPolicy

if TYPE_CHECKING:
    from cmkit.config import Config

# How r and t are made from two logit-normal draws (Gsunshine/py-meanflow, models/time_sampler.py): "sorted" (the
# paper's, "v0"): t the larger draw, r the smaller, then r = t for a share 1 - ratio of the rows; "clipped" (the
# repository's later default, "v1"): r = t for a share 1 - ratio first, then r = min(r, t).
PAIRINGS = ("sorted", "clipped")


@dataclass(frozen=True)
class MeanFlowConfig(MethodConfig):
    """MeanFlow's training (Geng et al. 2025, Alg. 1). Defaults: the paper's CIFAR-10 run (Gsunshine/py-meanflow,
    scripts/cifar10_v0.sh).

    ``t = sigmoid(N(t_mean, t_std^2))`` and ``r = sigmoid(N(r_mean, r_std^2))`` paired as ``pairing`` says
    (:data:`PAIRINGS`), ``ratio`` the share of rows with ``r != t`` before the pairing; the adaptive loss weight
    ``1 / stopgrad(||delta||^2 + norm_c)^norm_p`` (the paper's adaptive weighting; p = 0.75 and c = 1e-3 on
    CIFAR-10). ``jvp``, ``jvp_step``: how the JVP is computed, as sCM's (:class:`cmkit.methods.scm.SCMConfig`).
    The noise range only places the model in EDM's sigma scale for sampling
    (:class:`cmkit.precond.MeanFlow`); training draws t in (0, 1) directly.

    Guidance in training (the class-conditional form, Geng et al. 2025, Sec. 4.2 and App. B.1): ``guidance`` w and
    ``guidance_mix`` kappa replace v by ``w v + (1 - w - kappa) u(z, t, t | null) + kappa u(z, t, t | c)`` on the
    labelled rows with t in [``guidance_t_min``, ``guidance_t_max``] (w = 1, kappa = 0: plain v); the model learns
    the guided field, so it samples guided in one step. It needs a class-conditional network trained with label
    dropout (``train.p_uncond``: 0.1 in the paper), whose dropped rows keep plain v.
    """

    name: str = field(default="meanflow", init=False)
    t_mean: float = -2.0
    t_std: float = 2.0
    r_mean: float = -2.0
    r_std: float = 2.0
    ratio: float = 0.75
    pairing: str = "sorted"
    norm_p: float = 0.75
    norm_c: float = 1e-3
    jvp: str = "forward"
    jvp_step: float = 1e-3
    guidance: float = 1.0
    guidance_mix: float = 0.0
    guidance_t_min: float = 0.0
    guidance_t_max: float = 1.0

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"pairing": PAIRINGS, "jvp": JVP_MODES}

    @property
    def loss_averages_values(self) -> bool:
        """The loss of a sample is a function of its squared norm (a sum over its values), not a mean."""
        return False

    def _positive(self) -> tuple[str, ...]:
        return ("t_std", "r_std", "norm_c")

    def _checks(self) -> list[tuple[bool, str]]:
        return [(0 <= self.ratio <= 1, f"method.ratio: expected a share in [0, 1], got {self.ratio}"),
                (self.norm_p >= 0 and math.isfinite(self.norm_p), f"method.norm_p: expected >= 0, got {self.norm_p}"),
                (math.isfinite(self.t_mean) and math.isfinite(self.r_mean),
                 f"method.t_mean/r_mean: expected finite numbers, got {self.t_mean}, {self.r_mean}"),
                jvp_step(self.jvp_step),
                (math.isfinite(self.guidance) and math.isfinite(self.guidance_mix),
                 f"method.guidance/guidance_mix: expected finite numbers, got {self.guidance}, {self.guidance_mix}"),
                (0 <= self.guidance_t_min < self.guidance_t_max <= 1, "method.guidance_t_min/guidance_t_max: expected "
                 f"0 <= t_min < t_max <= 1, got {self.guidance_t_min}, {self.guidance_t_max}")]

    @property
    def guided(self) -> bool:
        """True when training replaces v by the guided velocity (w != 1 or kappa != 0)."""
        return self.guidance != 1 or self.guidance_mix != 0


def guidable(config: Config) -> tuple[bool, str]:
    """MeanFlow's guidance in training needs the unconditional branch: a class-conditional network with label
    dropout."""
    m, classes, drop = config.method, config.net.num_classes, config.train.p_uncond
    return (not m.guided or (classes > 0 and drop > 0),
            f"method.guidance={m.guidance:g}, guidance_mix={m.guidance_mix:g}: guidance in training needs a class-"
            f"conditional model trained with label dropout (net.num_classes > 0, train.p_uncond > 0, 0.1 in the "
            f"paper); this one has net.num_classes={classes}, train.p_uncond={drop:g}")


class TimePairs:
    """(r, t) float32 [n] each, ``0 < r <= t < 1``, from two logit-normal draws (see :class:`MeanFlowConfig`)."""

    def __init__(self, *, t_mean: float, t_std: float, r_mean: float, r_std: float, ratio: float,
                 pairing: str) -> None:
        self.t_mean, self.t_std, self.r_mean, self.r_std = t_mean, t_std, r_mean, r_std
        self.ratio, self.pairing = ratio, pairing

    def __call__(self, n: int, noise: RowNoise, device: torch.device) -> tuple[Tensor, Tensor]:
        t = torch.sigmoid(noise.randn(n, device=device) * self.t_std + self.t_mean)
        r = torch.sigmoid(noise.randn(n, device=device) * self.r_std + self.r_mean)
        same = noise.rand(n, device=device) < 1 - self.ratio
        if self.pairing == "sorted":
            t, r = torch.maximum(t, r), torch.minimum(t, r)
            return torch.where(same, t, r), t
        return torch.minimum(torch.where(same, t, r), t), t


class MeanFlowLoss:
    """The MeanFlow loss (Geng et al. 2025, Alg. 1) of a :class:`cmkit.precond.MeanFlow` model.

    For (r, t) from ``times`` and ``e ~ N(0, I)``: ``z = (1 - t) x0 + t e``, ``v = e - x0``. One JVP (``jvp``,
    :class:`cmkit.losses.JVP`: forward mode by default) of the unwrapped network (no gradients, fp32, the same
    dropout mask as the gradient pass) gives the total derivative ``du/dt = v . d_z u + d_t u`` with tangent
    ``(v, 0, 1)`` on ``(z, r, t)`` (the network sees ``t - r``, which moves with t). The target
    ``u_tgt = v - (t - r) du/dt`` carries no gradient; the gradient pass through ``model`` (DDP-wrapped or not)
    gives ``u``, and the loss per sample is ``||delta||^2 / stopgrad((||delta||^2 + c)^p)`` with
    ``delta = u - u_tgt`` (the squared norm a sum over the sample's values, as the paper's code). Rows with
    ``r = t`` are plain flow matching (``u_tgt = v``).

    ``augment = p > 0``: the clean images first go through EDM's augmentation pipeline (:mod:`cmkit.augment`, as
    the paper's CIFAR-10 run) and the network gets its labels. ``guidance = (w, kappa, t_min, t_max)``: v becomes
    the guided velocity :meth:`guided_velocity` (see :class:`MeanFlowConfig`) in the target and the JVP's tangent.
    """

    def __init__(self, times: TimePairs, *, norm_p: float, norm_c: float, augment: float = 0.0,
                 jvp: JVP | None = None, guidance: tuple[float, float, float, float] | None = None) -> None:
        self.times, self.norm_p, self.norm_c, self.augment = times, norm_p, norm_c, augment
        self.jvp, self.guidance = jvp or JVP(), guidance

    @torch.no_grad()
    def guided_velocity(self, net: nn.Module, z: Tensor, t: Tensor, v: Tensor, cond: Cond | None) -> Tensor:
        """``w v + (1 - w - kappa) u(z, t, t | null) + kappa u(z, t, t | c)`` [N, C, H, W] float32 (no gradients;
        MeanFlow, Sec. 4.2) on the labelled rows (label not :data:`cmkit.cond.NULL_LABEL`) with t in the guidance
        interval, ``v`` elsewhere; each forward pass replays the gradient pass's dropout mask."""
        w, kappa, t_min, t_max = self.guidance
        if cond is None or cond.labels is None:
            return v
        with torch.autocast(z.device.type, enabled=False), replayed_randomness(z.device):
            u_c = net.raw(z, t, t, cond).float()
        with torch.autocast(z.device.type, enabled=False), replayed_randomness(z.device):
            u_null = net.raw(z, t, t, cond.unconditional()).float()
        rows = (cond.labels != NULL_LABEL) & (t >= t_min) & (t <= t_max)
        guided = w * v + (1 - w - kappa) * u_null + kappa * u_c
        return torch.where(rows.view(-1, 1, 1, 1), guided, v)

    def target(self, net: nn.Module, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Cond | None) -> Tensor:
        """``u_tgt = v - (t - r) du/dt`` [N, C, H, W] float32 (no gradients) from the unwrapped ``net``."""

        def u(y: Tensor, time: Tensor) -> Tensor:
            return net.raw(y, r, time, cond)

        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            _, dudt = self.jvp(u, (z, t), (v, torch.ones_like(t)))
        return v - (t - r).view(-1, 1, 1, 1) * dudt

    def __call__(self, model: nn.Module, x0: Tensor, cond: Cond | None, *, images_seen: int,
                 target: nn.Module | None = None, noise: RowNoise | None = None) -> Tensor:
        noise, n = noise or GlobalNoise(), x0.shape[0]
        if self.augment > 0:
            x0, labels = augment_images(x0, noise, p=self.augment)
            cond = replace(cond or Cond(), augment=labels)
        r, t = self.times(n, noise, x0.device)
        e = noise.randn(*x0.shape, device=x0.device)
        t4 = t.view(-1, 1, 1, 1)
        z, v = (1 - t4) * x0 + t4 * e, e - x0
        net = getattr(model, "module", model)
        if self.guidance is not None:
            v = self.guided_velocity(net, z, t, v, cond)
        with replayed_randomness(x0.device):  # the JVP pass and the gradient pass draw one dropout mask
            goal = self.target(net, z, r, t, v, cond)
        squared = (raw_call(model, z, r, t, cond) - goal).flatten(1).pow(2).sum(1)
        return squared / (squared.detach() + self.norm_c) ** self.norm_p

    def target_decay(self, images_seen: int) -> float | None:
        return None

    def stats(self, images_seen: int) -> dict[str, float]:
        return {}


def build_loss(method: MeanFlowConfig, *, augment: float = 0.0, **_) -> MeanFlowLoss:
    """MeanFlow (Geng et al. 2025)."""
    times = TimePairs(t_mean=method.t_mean, t_std=method.t_std, r_mean=method.r_mean, r_std=method.r_std,
                      ratio=method.ratio, pairing=method.pairing)
    guidance = ((method.guidance, method.guidance_mix, method.guidance_t_min, method.guidance_t_max)
                if method.guided else None)
    return MeanFlowLoss(times, norm_p=method.norm_p, norm_c=method.norm_c, augment=augment,
                        jvp=JVP(method.jvp, method.jvp_step), guidance=guidance)


# One step from t = 1 (the paper's 1-NFE); 2 steps through t = 1/2 (sigma = 1, cmkit's choice: the midpoint of the
# path's time); the consistency sampler (a jump to the data, then fresh noise) also applies.
MEANFLOW_POLICY = SamplingPolicy("meanflow", 1, (1, 2, 4), ("meanflow", "consistency"), lambda sigma_data: 1.0)

ENTRY = MethodEntry(MeanFlowConfig, build_loss, MeanFlow, MEANFLOW_POLICY, TeacherRole.NONE,
                    frozenset({Capability.EDIT, Capability.SERVE, Capability.AUGMENT}), time2_embedding=True,
                    checks=(shared_dropout, guidable))
