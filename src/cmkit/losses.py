"""Training losses: small classes returning one loss per sample, built from a method config by
:func:`cmkit.methods.make_loss` (each method's builder lives in its own module of :mod:`cmkit.methods`).

Every loss is called as ``loss(model, x0, cond, *, images_seen, target=None, noise=None)`` (x0 in model space
(:mod:`cmkit.codec`), ``cond`` a :class:`cmkit.cond.Cond` or None) and returns a float32 tensor [N]; training
progress is always the number of training images seen so far. Reduction, backward and the update of any
target network belong to the training loop: ``target_decay(images_seen)`` tells it the target network's EMA
rate (None: no target network, the target is the student under stop-grad) and ``stats(images_seen)`` the
schedule values worth logging.

The consistency methods (CT, iCT, CD, ECT) are one :class:`ConsistencyLoss` composed of parts: a pair sampler
(which two noise levels), a target point (where the target network looks), a weighting and a distance.
The continuous-time methods (sCT, sCD) are one :class:`SCMLoss` with a velocity source (the data or a teacher).
A method's config, loss builder and registry entry live in one module of :mod:`cmkit.methods`.

Per-sample randomness comes from ``noise`` (a :class:`cmkit.rng.BatchNoise` keyed by the global batch, so
samples get the same numbers at any world size; torch's global generators by default); dropout masks come
from torch's global generators, which the loop seeds per micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from cmkit import schedules
from cmkit.augment import augment as augment_images
from cmkit.cond import ClassifierFree, Cond
from cmkit.distances import Distance
from cmkit.errors import CmkitError
from cmkit.nets import forward_mode
from cmkit.precond import trigflow_velocity
from cmkit.rng import GlobalNoise, RowNoise
from cmkit.sampling import ode_step

Weighting = Callable[[Tensor, Tensor], Tensor]
PairSampler = Callable[[int, int, RowNoise, torch.device], tuple[Tensor, Tensor]]
TargetPoint = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, "Cond | None"], Tensor]


@contextlib.contextmanager
def replayed_randomness(device: torch.device) -> Iterator[None]:
    """Run a block, then rewind the CPU and ``device`` generators, so the next block draws the same numbers.

    Used so student and target see the same dropout mask: saving only the CPU state would do nothing on
    a GPU, so the accelerator's generator is forked too.
    """
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield


JVP_MODES = ("forward", "finite-difference")


class JVP:
    """Jacobian-vector products of a network function, the way a run asks for them (``method.jvp``).

    ``forward``: one forward-mode pass (``torch.func.jvp`` inside :func:`cmkit.nets.forward_mode`: the math
    attention path, which has a forward-mode rule). ``finite-difference``: central differences
    ``(fn(p + h t) - fn(p - h t)) / 2h`` at ``step`` h, for kernels without a forward-mode rule (fused attention,
    sharded parameters); truncation error O(h^2), rounding error about eps(float32) |fn| / h. Every call of ``fn``
    replays the random state it started with, so all of them draw the dropout mask of a plain forward pass at the
    same point. The caller sets no_grad and the precision.
    """

    def __init__(self, mode: str = "forward", step: float = 1e-3) -> None:
        if mode not in JVP_MODES:
            raise ValueError(f"JVP: mode must be one of {', '.join(JVP_MODES)}, got {mode!r}")
        self.mode, self.step = mode, step

    def __call__(self, fn: Callable[..., Tensor], primals: tuple[Tensor, ...],
                 tangents: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """(fn(*primals), the derivative of fn(primals + e tangents) in e at 0), each shaped like fn's output."""
        if self.mode == "forward":
            with forward_mode():
                return torch.func.jvp(fn, primals, tangents)
        device, h = primals[0].device, self.step
        values = []
        for shift in (0.0, h, -h):
            with replayed_randomness(device):
                values.append(fn(*(p + shift * t for p, t in zip(primals, tangents, strict=True))))
        return values[0], (values[1] - values[2]) / (2 * h)


def jvp_disagreement(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...], *,
                     step: float = 1e-3) -> float:
    """How far forward mode's JVP of ``fn`` lies from central differences at ``step``: the largest absolute
    difference over the largest absolute value of the differences (0: they agree; about 1: a tangent is lost).
    Central differences in float32 carry an error of about 1e-4 of that scale for a smooth network."""
    with torch.no_grad(), torch.autocast(primals[0].device.type, enabled=False):
        exact = JVP("forward")(fn, primals, tangents)[1]
        approx = JVP("finite-difference", step)(fn, primals, tangents)[1]
    return ((exact - approx).abs().max() / approx.abs().max().clamp(min=1e-12)).item()


def check_compiled_jvp(model: nn.Module, *, tolerance: float = 1e-2) -> None:
    """Refuse a compiled backbone whose forward-mode tangents are wrong (TorchInductor has silently dropped them):
    one probe of ``model``'s backbone (a :class:`cmkit.precond.Preconditioned` whose ``net`` is compiled) at two
    random inputs along ``(v, 1)`` on ``(x, c_noise)`` (and the second time input, when the network has one),
    against central differences; CmkitError when they disagree by more than ``tolerance``. The probe's shapes are
    not the run's, so a failure only at the run's shapes would pass; the JVP of the run's first step is then the
    first to see it."""
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    shape = (2, model.channels, model.resolution, model.resolution)
    x, v = (torch.randn(shape, generator=gen).to(device) for _ in range(2))
    c = torch.full((2,), 0.25, device=device)
    cond = Cond(labels=torch.zeros(2, dtype=torch.long, device=device)) if model.num_classes else None
    second = getattr(model.net, "map_time2", None) is not None

    def backbone(y: Tensor, c_noise: Tensor) -> Tensor:
        return model._net(y, c_noise, cond, time2=c_noise if second else None)

    error = jvp_disagreement(backbone, (x, c), (v, torch.ones_like(c)))
    if not error <= tolerance:
        raise CmkitError(f"train.compile=true: forward-mode JVP through the compiled network disagrees with finite "
                         f"differences (relative error {error:.2g} > {tolerance:g}); set method.jvp=finite-difference "
                         "(plain forward passes) or train.compile=false")


def raw_call(model: nn.Module, *args: Tensor | Cond | None) -> Any:
    """``raw(*args)`` of ``model`` (:meth:`cmkit.precond.TrigFlow.raw`, :meth:`cmkit.precond.MeanFlow.raw`),
    ``model`` DDP-wrapped or not.

    DDP averages the gradients of a pass only when the pass goes through its ``forward``, so for a wrapped
    model the call goes through DDP with the module's ``raw`` standing in for its ``forward`` for that call.
    """
    module = getattr(model, "module", None)
    if module is None:
        return model.raw(*args)
    module.forward = module.raw
    try:
        return model(*args)
    finally:
        del module.forward


class EDMLoss:
    """EDM denoising loss (Karras et al. 2022, eq. 8): ln sigma ~ N(P_mean, P_std^2), weight 1/c_out^2.

    With a ``teacher`` (a diffusion denoiser) the regression target is the teacher's output at the same noisy
    image instead of the clean one: a student's warm-start (:class:`WarmStarted`). With ``augment = p > 0`` the
    clean images first go through EDM's augmentation pipeline (:func:`cmkit.augment.augment`, EDM's CIFAR-10
    setting, numbers from ``noise`` before sigma's): the augmented image is the target and the model gets its
    labels, ``model(x, sigma, Cond(labels, augment=[N, 9] float32))`` (EDM training/loss.py, App. F.2).
    """

    def __init__(self, *, p_mean: float, p_std: float, sigma_data: float, teacher: nn.Module | None = None,
                 augment: float = 0.0) -> None:
        self.p_mean, self.p_std, self.sigma_data, self.teacher = p_mean, p_std, sigma_data, teacher
        self.augment = augment

    def __call__(self, model: nn.Module, x0: Tensor, cond: Cond | None, *, images_seen: int,
                 target: nn.Module | None = None, noise: RowNoise | None = None) -> Tensor:
        noise, n = noise or GlobalNoise(), x0.shape[0]
        student_cond = cond
        if self.augment > 0:
            x0, augment = augment_images(x0, noise, p=self.augment)
            student_cond = replace(cond or Cond(), augment=augment)
        sigma = (noise.randn(n, device=x0.device) * self.p_std + self.p_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        x = x0 + sigma.view(-1, 1, 1, 1) * noise.randn(*x0.shape, device=x0.device)
        goal = x0 if self.teacher is None else self._teacher(x, sigma, cond)
        return weight * (model(x, sigma, student_cond) - goal).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def _teacher(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        return self.teacher(x, sigma, cond).float()

    def target_decay(self, images_seen: int) -> float | None:
        return None

    def stats(self, images_seen: int) -> dict[str, float]:
        return {}


# ------------------------------------------------------------------ pair samplers: (n, images_seen) -> levels

class GridPairs:
    """Adjacent levels (sigma_i, sigma_{i+1}) of the ascending Karras grid of ``num_scales(images_seen)`` points
    (CM paper, Alg. 2 and 3); the index i is uniform, or drawn from ``index_probs(grid)`` (iCT's lognormal)."""

    def __init__(self, num_scales: Callable[[int], int], *, sigma_min: float, sigma_max: float, rho: float,
                 index_probs: Callable[[Tensor], Tensor] | None = None) -> None:
        self.num_scales, self.index_probs = num_scales, index_probs
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def __call__(self, n: int, images_seen: int, noise: RowNoise, device: torch.device) -> tuple[Tensor, Tensor]:
        """(sigma_lo, sigma_hi), float32 [n] each on ``device``."""
        size = self.num_scales(images_seen)
        grid = schedules.karras_sigmas(size, sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho)
        idx = noise.randint(size - 1, n) if self.index_probs is None else noise.multinomial(self.index_probs(grid), n)
        grid, idx = grid.float().to(device), idx.to(device)
        return grid[idx], grid[idx + 1]

    def stats(self, images_seen: int) -> dict[str, float]:
        return {"num_scales": self.num_scales(images_seen)}


class SkipPairs:
    """LCM's skipping-step pairs (Luo et al. 2023, Sec. 4.3): levels k points apart on the ascending Karras grid of
    ``num_scales`` points, the upper level on the grid's every k-th point counted down from sigma_max.

    As diffusers' ``train_lcm_distill_sd_wds.py`` (its DDIM timesteps ``T - 1, T - 1 - k, ...``, the lower
    timestep ``t - k`` clamped at 0): index ``hi = num_scales - 1 - m k`` with m uniform over the
    ``ceil((num_scales - 1) / k)`` such points above index 0, ``lo = max(hi - k, 0)`` (index 0 is sigma_min, the
    consistency boundary). When k divides ``num_scales - 1`` these are the adjacent pairs of the Karras grid of
    ``(num_scales - 1) / k + 1`` points (the grid is uniform in sigma^(1/rho)).
    """

    def __init__(self, *, num_scales: int, skip: int, sigma_min: float, sigma_max: float, rho: float) -> None:
        self.num_scales, self.skip = num_scales, skip
        self.grid = schedules.karras_sigmas(num_scales, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).float()

    @property
    def starts(self) -> int:
        """How many upper levels there are: ``ceil((num_scales - 1) / skip)``."""
        return -(-(self.num_scales - 1) // self.skip)

    def __call__(self, n: int, images_seen: int, noise: RowNoise, device: torch.device) -> tuple[Tensor, Tensor]:
        """(sigma_lo, sigma_hi), float32 [n] each on ``device``."""
        hi = self.num_scales - 1 - noise.randint(self.starts, n) * self.skip
        lo = (hi - self.skip).clamp(min=0)
        grid = self.grid.to(device)
        return grid[lo.to(device)], grid[hi.to(device)]

    def stats(self, images_seen: int) -> dict[str, float]:
        return {"num_scales": self.num_scales}


class ECTPairs:
    """ECT's continuous pairs (Geng et al. 2024): ln t ~ N(P_mean, P_std^2) clamped to [sigma_min, sigma_max],
    r = r(t) of the stage reached after ``images_seen`` images (:func:`cmkit.schedules.ect_r`; r may be 0)."""

    def __init__(self, *, p_mean: float, p_std: float, q: float, stage_kimg: float, sigma_min: float,
                 sigma_max: float) -> None:
        self.p_mean, self.p_std, self.q, self.stage_kimg = p_mean, p_std, q, stage_kimg
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, n: int, images_seen: int, noise: RowNoise, device: torch.device) -> tuple[Tensor, Tensor]:
        """(r, t), float32 [n] each on ``device``."""
        t = (noise.randn(n, device=device) * self.p_std + self.p_mean).exp().clamp(self.sigma_min, self.sigma_max)
        return schedules.ect_r(t, stage=self.stage(images_seen), q=self.q), t

    def stage(self, images_seen: int) -> int:
        return schedules.ect_stage(images_seen, stage_kimg=self.stage_kimg)

    def stats(self, images_seen: int) -> dict[str, float]:
        return {"stage": self.stage(images_seen)}


# ----------------------------------------------------------- target points: where the target network looks

def data_point(x0: Tensor, x_hi: Tensor, z: Tensor, sigma_lo: Tensor, sigma_hi: Tensor,
               cond: Cond | None) -> Tensor:
    """The unbiased estimate ``x0 + sigma_lo z`` of x at the lower level (CT, iCT, ECT)."""
    return x0 + sigma_lo.view(-1, 1, 1, 1) * z


class TeacherStep:
    """x at the lower level by one Euler or Heun step of the teacher's probability-flow ODE from ``x_hi``
    (CD, CM paper Alg. 2); the teacher is a diffusion denoiser ``(x, sigma, cond) -> x0``.

    ``guided``: the step of the guided (augmented) PF-ODE (LCM, Luo et al. 2023, eq. 9 and Alg. 1): the teacher's
    denoiser replaced by classifier-free guidance at each sample's scale w = ``cond.guidance`` (float [N]),
    ``D_w = D(x, sigma, uncond) + w (D(x, sigma, c) - D(x, sigma, uncond))`` (:class:`cmkit.cond.ClassifierFree`,
    LCM's omega = w - 1); the teacher itself sees ``cond`` without the scale. The Euler step in sigma is DDIM's
    (Karras et al. 2022, Sec. 3: DDIM is Euler's method on dx/dsigma = (x - D) / sigma), LCM's default solver."""

    def __init__(self, teacher: nn.Module, *, heun: bool, guided: bool = False) -> None:
        self.teacher, self.heun, self.guided = teacher, heun, guided

    @torch.no_grad()
    def __call__(self, x0: Tensor, x_hi: Tensor, z: Tensor, sigma_lo: Tensor, sigma_hi: Tensor,
                 cond: Cond | None) -> Tensor:
        if not self.guided:
            return ode_step(self.teacher, x_hi, sigma_hi, sigma_lo, cond, heun=self.heun)
        guided = ClassifierFree(self.teacher, cond.guidance)
        return ode_step(guided, x_hi, sigma_hi, sigma_lo, replace(cond, guidance=None), heun=self.heun)


# ------------------------------------------------------------------------- weightings lambda(lo, hi) [N]

def uniform_weight(sigma_lo: Tensor, sigma_hi: Tensor) -> Tensor:
    """lambda = 1 (CT, CD)."""
    return torch.ones_like(sigma_lo)


def inverse_gap_weight(sigma_lo: Tensor, sigma_hi: Tensor) -> Tensor:
    """lambda = 1 / (sigma_hi - sigma_lo) (iCT, ECT)."""
    return 1 / (sigma_hi - sigma_lo)


class ConsistencyLoss:
    """The consistency loss of CT, iCT, CD and ECT, composed of its parts.

    For levels sigma_lo < sigma_hi from ``pairs`` and one noise z, ``x_hi = x0 + sigma_hi z`` and
    ``x_lo = point(...)``: ``weight(lo, hi) d(f(x_hi, sigma_hi), stopgrad f_target(x_lo, sigma_lo))``. The
    target network is ``target`` when given (an EMA of the student), else the student under stop-grad; it
    is evaluated at max(sigma_lo, sigma_min), where f(x, sigma_min) = x exactly (so a pair with sigma_lo = 0
    targets x_lo itself). Both forward passes see the same dropout mask.
    """

    def __init__(self, *, pairs: GridPairs | SkipPairs | ECTPairs, point: TargetPoint, weight: Weighting,
                 distance: Distance, target_decay: Callable[[int], float | None], sigma_min: float) -> None:
        self.pairs, self.point, self.weight, self.distance = pairs, point, weight, distance
        self._target_decay, self.sigma_min = target_decay, sigma_min

    def __call__(self, model: nn.Module, x0: Tensor, cond: Cond | None, *, images_seen: int,
                 target: nn.Module | None = None, noise: RowNoise | None = None) -> Tensor:
        noise = noise or GlobalNoise()
        sigma_lo, sigma_hi = self.pairs(x0.shape[0], images_seen, noise, x0.device)
        z = noise.randn(*x0.shape, device=x0.device)
        x_hi = x0 + sigma_hi.view(-1, 1, 1, 1) * z
        x_lo = self.point(x0, x_hi, z, sigma_lo, sigma_hi, cond)
        with replayed_randomness(x0.device):
            prediction = model(x_hi, sigma_hi, cond)
        with torch.no_grad():
            goal = (model if target is None else target)(x_lo, sigma_lo.clamp(min=self.sigma_min), cond)
        return self.weight(sigma_lo, sigma_hi) * self.distance(prediction, goal)

    def target_decay(self, images_seen: int) -> float | None:
        """The target network's EMA rate mu after ``images_seen`` images, or None (no target network)."""
        return self._target_decay(images_seen)

    def stats(self, images_seen: int) -> dict[str, float]:
        return {**self.pairs.stats(images_seen), "target_decay": self.target_decay(images_seen) or 0.0}


class GuidanceDrawn:
    """LCM's loss (Luo et al. 2023, Alg. 1): ``loss`` (a :class:`ConsistencyLoss` with a guided teacher step)
    with a guidance scale ``w ~ U[w_min, w_max]`` drawn per sample (from ``noise``, before the loss's own numbers)
    and given to student, target and teacher step as ``cond.guidance`` (float [N])."""

    def __init__(self, loss: ConsistencyLoss, *, w_min: float, w_max: float) -> None:
        self.loss, self.w_min, self.w_max = loss, w_min, w_max

    def __call__(self, model: nn.Module, x0: Tensor, cond: Cond | None, *, images_seen: int,
                 target: nn.Module | None = None, noise: RowNoise | None = None) -> Tensor:
        noise = noise or GlobalNoise()
        w = self.w_min + (self.w_max - self.w_min) * noise.rand(x0.shape[0], device=x0.device)
        cond = replace(cond or Cond(), guidance=w)
        return self.loss(model, x0, cond, images_seen=images_seen, target=target, noise=noise)

    def target_decay(self, images_seen: int) -> float | None:
        return self.loss.target_decay(images_seen)

    def stats(self, images_seen: int) -> dict[str, float]:
        return self.loss.stats(images_seen)


# ------------------------------------------------------------------ continuous time: sCT and sCD (TrigFlow)

Velocity = Callable[[Tensor, Tensor, Tensor, Tensor, "Cond | None"], Tensor]


def data_velocity(x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
    """sCT's ``dx_t/dt = cos t z - sin t x0``, the velocity of the sample's own path."""
    return t.cos().view(-1, 1, 1, 1) * z - t.sin().view(-1, 1, 1, 1) * x0


class TeacherVelocity:
    """sCD's ``dx_t/dt``: the teacher denoiser's TrigFlow velocity (:func:`cmkit.precond.trigflow_velocity`)."""

    def __init__(self, teacher: nn.Module, *, sigma_data: float) -> None:
        self.teacher, self.sigma_data = teacher, sigma_data

    @torch.no_grad()
    def __call__(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        return trigflow_velocity(self.teacher, x_t, t, cond, sigma_data=self.sigma_data).float()


class SCMLoss:
    """The sCM loss (Lu and Song 2024, Alg. 1) of a :class:`cmkit.precond.TrigFlow` model, sCT and sCD alike.

    ``tau ~ N(p_mean, p_std^2)``, ``t = arctan(e^tau / sigma_d)`` clamped to ``[t_min, t_max]``,
    ``x_t = cos t x0 + sin t z`` with ``z ~ N(0, sigma_d^2 I)`` and ``dx_t/dt`` from ``velocity``. One forward-mode
    JVP of the unwrapped network (no gradients, fp32, plain math attention, the same dropout mask as the gradient
    pass) gives ``F-`` and ``cos t sin t dF-/dt`` with tangents ``(cos t sin t dx_t/dt / sigma_d, cos t sin t)``;
    then ``g = -cos^2 t (sigma_d F- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF-/dt)`` with the
    warm-up ``r = min(1, images_seen / warmup_images)``, normalised ``g / (||g|| + c)``. The gradient pass through
    ``model`` (DDP-wrapped or not) gives ``F`` and the log-variance ``w``; the loss per sample is
    ``e^w / D ||F - stopgrad(F) - g||^2 - w``, whose gradient moves F along ``g``. ``jvp`` computes the JVP
    (:class:`JVP`: forward mode by default, or central differences). A non-finite tangent makes
    the loss non-finite, and the training loop skips and counts that step.
    """

    def __init__(self, velocity: Velocity, *, p_mean: float, p_std: float, sigma_data: float, t_min: float,
                 t_max: float, warmup_images: float, tangent_c: float, jvp: JVP | None = None) -> None:
        self.velocity, self.p_mean, self.p_std, self.sigma_data = velocity, p_mean, p_std, sigma_data
        self.t_min, self.t_max, self.warmup_images, self.tangent_c = t_min, t_max, warmup_images, tangent_c
        self.jvp = jvp or JVP()

    def warmup(self, images_seen: int) -> float:
        """The tangent warm-up factor r after ``images_seen`` images."""
        return min(1.0, images_seen / self.warmup_images) if self.warmup_images > 0 else 1.0

    def times(self, n: int, noise: RowNoise, device: torch.device) -> Tensor:
        """t [n] float32 from the lognormal proposal on sigma = sigma_d tan t."""
        sigma = (noise.randn(n, device=device) * self.p_std + self.p_mean).exp()
        return torch.atan(sigma / self.sigma_data).clamp(self.t_min, self.t_max)

    def tangent(self, net: nn.Module, x_t: Tensor, t: Tensor, dxdt: Tensor, cond: Cond | None,
                images_seen: int) -> Tensor:
        """The normalised tangent g [N, C, H, W] float32 (no gradients)."""
        sd, cs = self.sigma_data, t.cos() * t.sin()
        cos, cs4 = t.cos().view(-1, 1, 1, 1), cs.view(-1, 1, 1, 1)

        def velocity_net(y: Tensor, time: Tensor) -> Tensor:
            return net.raw(y, time, cond)[0]

        with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):
            f_minus, cs_df_dt = self.jvp(velocity_net, (x_t / sd, t), (cs4 * dxdt / sd, cs))
        g = -cos**2 * (sd * f_minus - dxdt) - self.warmup(images_seen) * (cs4 * x_t + sd * cs_df_dt)
        return g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + self.tangent_c)

    def __call__(self, model: nn.Module, x0: Tensor, cond: Cond | None, *, images_seen: int,
                 target: nn.Module | None = None, noise: RowNoise | None = None) -> Tensor:
        noise, n, sd = noise or GlobalNoise(), x0.shape[0], self.sigma_data
        t = self.times(n, noise, x0.device)
        z = noise.randn(*x0.shape, device=x0.device) * sd
        x_t = t.cos().view(-1, 1, 1, 1) * x0 + t.sin().view(-1, 1, 1, 1) * z
        dxdt = self.velocity(x0, z, x_t, t, cond)
        with replayed_randomness(x0.device):  # the JVP pass and the gradient pass draw one dropout mask
            g = self.tangent(getattr(model, "module", model), x_t, t, dxdt, cond, images_seen)
        f, w = raw_call(model, x_t / sd, t, cond)
        diff = (f - f.detach() - g).flatten(1)
        return w.exp() * diff.pow(2).mean(1) - w

    def target_decay(self, images_seen: int) -> float | None:
        return None

    def stats(self, images_seen: int) -> dict[str, float]:
        return {"tangent_warmup": self.warmup(images_seen)}


class WarmStarted:
    """A student's ``loss`` after a warm-start: for its first ``images`` training images the student regresses
    the teacher's denoiser (``warm``, an :class:`EDMLoss` with a teacher); then ``loss`` takes over, its
    schedules (stages, tangent warm-up, target rate) counting the images seen since the warm-start ended."""

    def __init__(self, loss: ConsistencyLoss | SCMLoss | GuidanceDrawn, *, warm: EDMLoss, images: int) -> None:
        self.loss, self.warm, self.images = loss, warm, images

    def __call__(self, model: nn.Module, x0: Tensor, cond: Cond | None, *, images_seen: int,
                 target: nn.Module | None = None, noise: RowNoise | None = None) -> Tensor:
        if images_seen < self.images:
            return self.warm(model, x0, cond, images_seen=images_seen, noise=noise)
        return self.loss(model, x0, cond, images_seen=images_seen - self.images, target=target, noise=noise)

    def target_decay(self, images_seen: int) -> float | None:
        return self.loss.target_decay(self._after(images_seen))

    def stats(self, images_seen: int) -> dict[str, float]:
        return {"warm_start": float(images_seen < self.images), **self.loss.stats(self._after(images_seen))}

    def _after(self, images_seen: int) -> int:
        """Images seen by the method's own loss: those after the warm-start."""
        return max(0, images_seen - self.images)


Loss = EDMLoss | ConsistencyLoss | SCMLoss | GuidanceDrawn | WarmStarted

# A student's warm-start regresses its teacher at EDM's noise levels (Karras et al. 2022, Table 1),
# ln sigma ~ N(-1.2, 1.2^2).
WARM_START_LEVELS = {"p_mean": -1.2, "p_std": 1.2}
