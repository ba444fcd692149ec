"""Training losses: small classes returning one loss per sample.

Every loss is called as ``loss(model, x0, labels, step=k, total_steps=K, target=None)`` and returns a
float32 tensor [N]. Reduction, backward and the update of any target network belong to the training loop;
``target_decay(k, K)`` tells the loop the target EMA rate (None: the loss needs no target network) and
``stats(k, K)`` the schedule values worth logging.
Per-sample randomness comes from ``noise`` (a :class:`cmkit.dist.BatchNoise` keyed by the global batch, so
samples get the same numbers at any world size; torch's global generators by default); dropout masks come
from torch's global generators, which the loop seeds per micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from cmkit import schedules
from cmkit.config import MethodConfig
from cmkit.dist import GlobalNoise, Noise
from cmkit.distances import Distance, make_distance
from cmkit.errors import CmkitError
from cmkit.sampling import ode_step


@contextlib.contextmanager
def replayed_randomness(device: torch.device) -> Iterator[None]:
    """Run a block, then rewind the CPU and ``device`` generators, so the next block draws the same numbers.

    Used so student and target see the same dropout mask: saving only the CPU state would do nothing on
    a GPU, so the accelerator's generator is forked too.
    """
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield


class EDMLoss:
    """EDM denoising loss (Karras et al. 2022, eq. 8): ln sigma ~ N(P_mean, P_std^2), weight 1/c_out^2."""

    def __init__(self, *, p_mean: float, p_std: float, sigma_data: float) -> None:
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def __call__(self, model: nn.Module, x0: Tensor, labels: Tensor | None, *, step: int, total_steps: int,
                 target: nn.Module | None = None, noise: Noise | None = None) -> Tensor:
        noise, n = noise or GlobalNoise(), x0.shape[0]
        sigma = (noise.randn(n, device=x0.device) * self.p_std + self.p_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        denoised = model(x0 + sigma.view(-1, 1, 1, 1) * noise.randn(*x0.shape, device=x0.device), sigma, labels)
        return weight * (denoised - x0).pow(2).flatten(1).mean(1)

    def target_decay(self, step: int, total_steps: int) -> float | None:
        return None

    def stats(self, step: int, total_steps: int) -> dict[str, float]:
        return {}


class ConsistencyLoss:
    """Consistency training (CT, CM paper Alg. 3; iCT, Song and Dhariwal 2023) and consistency distillation
    (CD, CM paper Alg. 2) as settings of one loss.

    For a pair of adjacent grid levels sigma_n < sigma_{n+1} and one noise z, ``x_next = x0 + sigma_{n+1} z``:
    ``lambda(sigma_n) d(f(x_next, sigma_{n+1}), stopgrad f_target(x_hat, sigma_n))``. Without a teacher
    (CT, iCT) ``x_hat = x0 + sigma_n z``; with one (CD) ``x_hat`` is one Euler or Heun step of the teacher's
    probability-flow ODE from ``x_next`` down to sigma_n. The target is ``target`` when given (an EMA of the
    student), else the student under stop-grad. Both forward passes see the same dropout mask.
    """

    def __init__(self, *, curriculum: str, s0: int, s1: int, mu0: float, index_sampling: str,
                 p_mean: float, p_std: float, distance: Distance, weighting: str,
                 sigma_min: float, sigma_max: float, rho: float, teacher: nn.Module | None = None,
                 heun: bool = True) -> None:
        self.curriculum, self.s0, self.s1, self.mu0 = curriculum, s0, s1, mu0
        self.index_sampling, self.p_mean, self.p_std = index_sampling, p_mean, p_std
        self.distance, self.weighting = distance, weighting
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.teacher, self.heun = teacher, heun

    def num_scales(self, step: int, total_steps: int) -> int:
        """N(k): the grid size at step k of K (CT: sqrt curriculum; iCT: exponential; CD: constant s1 + 1)."""
        if self.curriculum == "constant":
            return self.s1 + 1
        rule = schedules.ct_num_scales if self.curriculum == "sqrt" else schedules.ict_num_scales
        return rule(step, total_steps, s0=self.s0, s1=self.s1)

    def target_decay(self, step: int, total_steps: int) -> float | None:
        """mu(k) for the target network, or None when the target is the student itself (mu0 = 0)."""
        if self.mu0 == 0:
            return None
        if self.curriculum == "constant":
            return self.mu0
        return schedules.ct_target_decay(self.num_scales(step, total_steps), s0=self.s0, mu0=self.mu0)

    def stats(self, step: int, total_steps: int) -> dict[str, float]:
        return {"num_scales": self.num_scales(step, total_steps),
                "target_decay": self.target_decay(step, total_steps) or 0.0}

    def sample_pairs(self, n: int, num_scales: int, device: torch.device,
                     noise: Noise | None = None) -> tuple[Tensor, Tensor]:
        """Draw n adjacent pairs (sigma_i, sigma_{i+1}) of the N-point grid, float32 [n] each."""
        noise = noise or GlobalNoise()
        sigmas = schedules.karras_sigmas(num_scales, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                                         rho=self.rho)
        if self.index_sampling == "uniform":
            idx = noise.randint(num_scales - 1, n)
        else:
            probs = schedules.lognormal_index_probs(sigmas, p_mean=self.p_mean, p_std=self.p_std)
            idx = noise.multinomial(probs, n)
        sigmas = sigmas.float().to(device)
        return sigmas[idx.to(device)], sigmas[idx.to(device) + 1]

    def target_point(self, x0: Tensor, x_next: Tensor, z: Tensor, sigma_lo: Tensor, sigma_hi: Tensor,
                     labels: Tensor | None) -> Tensor:
        """x at sigma_n: the unbiased estimate x0 + sigma_n z (CT), or the teacher's ODE step (CD)."""
        if self.teacher is None:
            return x0 + sigma_lo.view(-1, 1, 1, 1) * z
        with torch.no_grad():
            return ode_step(self.teacher, x_next, sigma_hi, sigma_lo, labels, heun=self.heun)

    def __call__(self, model: nn.Module, x0: Tensor, labels: Tensor | None, *, step: int, total_steps: int,
                 target: nn.Module | None = None, noise: Noise | None = None) -> Tensor:
        noise = noise or GlobalNoise()
        sigma_lo, sigma_hi = self.sample_pairs(x0.shape[0], self.num_scales(step, total_steps), x0.device, noise)
        z = noise.randn(*x0.shape, device=x0.device)
        x_next = x0 + sigma_hi.view(-1, 1, 1, 1) * z
        x_hat = self.target_point(x0, x_next, z, sigma_lo, sigma_hi, labels)
        with replayed_randomness(x0.device):
            student = model(x_next, sigma_hi, labels)
        with torch.no_grad():
            teacher = (model if target is None else target)(x_hat, sigma_lo, labels)
        return gap_weight(self.weighting, sigma_lo, sigma_hi) * self.distance(student, teacher)


class EasyConsistencyTuningLoss:
    """Easy consistency tuning, ECT (Geng et al. 2024; recipes section 6), continuous time.

    ln t ~ N(P_mean, P_std^2) (clamped to [sigma_min, sigma_max]); r = r(t) of the current stage
    (:func:`cmkit.schedules.ect_r`); one z for ``x_t = x0 + t z`` and ``x_r = x0 + r z`` and one dropout mask
    for both passes; loss ``lambda d(f(x_t, t), stopgrad f(x_r, r))`` with lambda = 1 / (t - r) (``inverse-gap``).
    Where r <= sigma_min the target is the clean image x0 (f(x, eps) = x), so early ECT is diffusion training.
    """

    def __init__(self, *, p_mean: float, p_std: float, q: float, stage_kimg: float, batch: int,
                 distance: Distance, weighting: str, sigma_min: float, sigma_max: float) -> None:
        self.p_mean, self.p_std, self.q, self.stage_kimg, self.batch = p_mean, p_std, q, stage_kimg, batch
        self.distance, self.weighting = distance, weighting
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def stage(self, step: int) -> int:
        return schedules.ect_stage(step * self.batch, stage_kimg=self.stage_kimg)

    def target_decay(self, step: int, total_steps: int) -> float | None:
        return None

    def stats(self, step: int, total_steps: int) -> dict[str, float]:
        return {"stage": self.stage(step)}

    def __call__(self, model: nn.Module, x0: Tensor, labels: Tensor | None, *, step: int, total_steps: int,
                 target: nn.Module | None = None, noise: Noise | None = None) -> Tensor:
        noise = noise or GlobalNoise()
        t = (noise.randn(x0.shape[0], device=x0.device) * self.p_std + self.p_mean).exp()
        t = t.clamp(self.sigma_min, self.sigma_max)
        r = schedules.ect_r(t, stage=self.stage(step), q=self.q)
        weight = gap_weight(self.weighting, r, t)
        z = noise.randn(*x0.shape, device=x0.device)
        with replayed_randomness(x0.device):
            student = model(x0 + t.view(-1, 1, 1, 1) * z, t, labels)
        clean = (r <= self.sigma_min).view(-1, 1, 1, 1)
        r = r.clamp(min=self.sigma_min)
        with torch.no_grad():
            teacher = torch.where(clean, x0, model(x0 + r.view(-1, 1, 1, 1) * z, r, labels))
        return weight * self.distance(student, teacher)


def gap_weight(weighting: str, sigma_lo: Tensor, sigma_hi: Tensor) -> Tensor:
    """lambda: 1 (``uniform``: CT, CD) or 1 / (sigma_hi - sigma_lo) (``inverse-gap``: iCT, ECT), float32 [N]."""
    if weighting == "uniform":
        return torch.ones_like(sigma_lo)
    return 1 / (sigma_hi - sigma_lo)


Loss = EDMLoss | ConsistencyLoss | EasyConsistencyTuningLoss


def make_loss(method: MethodConfig, *, dim: int, batch: int, teacher: nn.Module | None = None) -> Loss:
    """The loss a method config describes.

    ``dim`` is D, the number of values in one sample; ``batch`` the images per step (ECT's stage clock);
    ``teacher`` the diffusion denoiser CD takes its ODE step with (required for ``cd``, unused otherwise).
    """
    distance = make_distance(method.distance, dim=dim, c=method.huber_c)
    if method.name == "edm":
        return EDMLoss(p_mean=method.p_mean, p_std=method.p_std, sigma_data=method.sigma_data)
    if method.name == "ect":
        return EasyConsistencyTuningLoss(p_mean=method.p_mean, p_std=method.p_std, q=method.ect_q,
                                         stage_kimg=method.ect_stage_kimg, batch=batch, distance=distance,
                                         weighting=method.weighting, sigma_min=method.sigma_min,
                                         sigma_max=method.sigma_max)
    if method.name == "cd" and teacher is None:
        raise CmkitError("method cd: a diffusion teacher is required; pass --teacher MODEL")
    return ConsistencyLoss(
        curriculum=method.curriculum, s0=method.s0, s1=method.s1, mu0=method.mu0,
        index_sampling=method.index_sampling, p_mean=method.p_mean, p_std=method.p_std, distance=distance,
        weighting=method.weighting, sigma_min=method.sigma_min, sigma_max=method.sigma_max, rho=method.rho,
        teacher=teacher if method.name == "cd" else None, heun=method.solver == "heun")
