"""Latent consistency distillation on a discrete noise schedule, in the terms of a diffusers pipeline (torch only).

A pipeline's schedule is its ``alphas_cumprod`` abar[t], t = 0..T-1 (T = num_train_timesteps): ``x_t = sqrt(abar_t)
x0 + sqrt(1 - abar_t) eps``. The UNet predicts eps (``epsilon``) or ``v = sqrt(abar) eps - sqrt(1 - abar) x0``
(``v_prediction``). Formulas and their sources:

* the DDIM grid of n timesteps, ascending: ``(i + 1) * (T // n) - 1`` for i = 0..n-1 (LCM's skipping schedule;
  diffusers' ``LCMScheduler``, ``lcm_origin_timesteps``, and the DDIMSolver of ``train_lcm_distill_*``); the skipping
  interval is k = T // n (k = 20 for n = 50 of T = 1000, LCM Sec. 4.3);
* the DDIM step (Song et al. 2021, Eq. 12 with eta = 0) from t to ``s = max(t - k, 0)``:
  ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat``;
* classifier-free guidance at scale w (diffusers' ``guidance_scale``; Ho and Salimans 2022) on both estimates:
  ``x0_hat = x0_u + w (x0_c - x0_u)``, likewise eps (LCM Eq. 9 with omega = w - 1);
* the boundary scalings of diffusers' ``LCMScheduler.get_scalings_for_boundary_condition_discrete``:
  ``c_skip = sd^2 / ((s t)^2 + sd^2)``, ``c_out = s t / sqrt((s t)^2 + sd^2)`` with sd = sigma_data = 0.5 and
  s = timestep_scaling = 10 (LCM Eq. 7's form), and the consistency function ``f = c_skip x_t + c_out x0_hat``;
* the guidance-scale embedding of the full student (``time_cond_proj_dim`` wide): sinusoids of ``1000 w``
  (VDM's timestep embedding, diffusers' ``get_guidance_scale_embedding``), fed ``w - 1`` as diffusers' LCM pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

PREDICTIONS = ("epsilon", "v_prediction")
SIGMA_DATA = 0.5  # LCMScheduler's (a constant there: an exported scheduler cannot carry another)


def ddim_grid(num_train_timesteps: int, ddim_steps: int) -> Tensor:
    """int64 [ddim_steps] ASCENDING: the DDIM timesteps ``(i + 1) * k - 1``, k = T // ddim_steps."""
    k = num_train_timesteps // ddim_steps
    return torch.arange(1, ddim_steps + 1, dtype=torch.int64) * k - 1


def lcm_timesteps(num_train_timesteps: int, ddim_steps: int, steps: int) -> list[int]:
    """The DESCENDING timesteps of ``steps``-step LCM sampling, as ``LCMScheduler.set_timesteps(steps)`` with
    ``original_inference_steps=ddim_steps`` (diffusers 0.25+):
    entries ``floor(i * ddim_steps / steps)``, i = 0..steps-1,
    of the DDIM grid reversed."""
    grid = ddim_grid(num_train_timesteps, ddim_steps).flip(0)
    return [int(grid[math.floor(i * ddim_steps / steps)]) for i in range(steps)]


def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] float32 [N, 1, 1, 1] broadcastable against ``like`` [N, C, H, W]."""
    return values.to(like.device)[t.to(like.device)].float().view(-1, *[1] * (like.ndim - 1))


def x0_and_eps(output: Tensor, x: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
    """The (x0, eps) estimates, float32 [N, C, H, W] each, of a UNet ``output`` at ``x`` [N, C, H, W] and integer
    timesteps ``t`` [N] for ``prediction`` epsilon or v_prediction."""
    a, s = _at(alphas_cumprod, t, x).sqrt(), (1 - _at(alphas_cumprod, t, x)).sqrt()
    output, x = output.float(), x.float()
    if prediction == "epsilon":
        return (x - s * output) / a, output
    return a * x - s * output, a * output + s * x


def ddim_step(x0: Tensor, eps: Tensor, t_prev: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """DDIM (eta = 0) to timesteps ``t_prev`` [N]: ``sqrt(abar) x0 + sqrt(1 - abar) eps``, float32 [N, C, H, W]."""
    abar = _at(alphas_cumprod, t_prev, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def boundary_scalings(t: Tensor, *, timestep_scaling: float) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) float32 [N, 1, 1, 1] at integer timesteps ``t`` [N] (LCMScheduler's discrete form)."""
    st = timestep_scaling * t.float().view(-1, 1, 1, 1)
    sd = SIGMA_DATA
    return sd**2 / (st**2 + sd**2), st / (st**2 + sd**2).sqrt()


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """float32 [N, dim]: [sin(1000 w f), cos(1000 w f)] with f_j = 10000^(-j / (dim/2 - 1)), zero-padded to an odd
    ``dim`` (diffusers' ``get_guidance_scale_embedding``); ``w`` [N] is LCM's omega (guidance scale - 1)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


Predict = Callable[[Tensor, Tensor], Tensor]
"""A UNet call ``(x [N, C, H, W], t int64 [N]) -> output [N, C, H, W]`` with its conditioning bound."""


def consistency(predict: Predict, x: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction: str, *,
                timestep_scaling: float) -> Tensor:
    """The consistency function ``f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)``, float32 [N, C, H, W]."""
    c_skip, c_out = boundary_scalings(t, timestep_scaling=timestep_scaling)
    x0, _ = x0_and_eps(predict(x, t), x, t, alphas_cumprod, prediction)
    return c_skip * x.float() + c_out * x0


def lcm_sample(predict: Predict, latents: Tensor, timesteps: list[int], alphas_cumprod: Tensor, prediction: str, *,
               timestep_scaling: float, generator: torch.Generator | None = None) -> Tensor:
    """Multistep LCM sampling (LCM Alg. 3, as ``LCMScheduler.step``) from ``latents`` [N, C, H, W] (standard normal,
    the noise at the first timestep) over DESCENDING ``timesteps``: at each, ``x0 = f(x, t)``; before the next one
    ``x = sqrt(abar_next) x0 + sqrt(1 - abar_next) z`` with ``z = torch.randn(x.shape, generator=generator)`` drawn
    in order on ``latents``' device. Returns the last x0, float32 [N, C, H, W]."""
    x = latents.float()
    for i, t in enumerate(timesteps):
        ts = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        denoised = consistency(predict, x, ts, alphas_cumprod, prediction, timestep_scaling=timestep_scaling)
        if i == len(timesteps) - 1:
            return denoised
        nxt = torch.full_like(ts, timesteps[i + 1])
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = ddim_step(denoised, z, nxt, alphas_cumprod)
    raise ValueError("lcm_sample: expected at least one timestep")
