"""Parameterisations wrapped around a plain backbone.

``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))``

Both wrappers follow one denoiser contract, ``(x, sigma, labels=None) -> x0``, and know their own noise
range, resolution, channels and class count, so samplers need no side information. The coefficients do
not depend on ``self.training``: the consistency boundary condition ``f(x, sigma_min) = x`` holds exactly
in train and eval mode alike.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Preconditioned(nn.Module):
    """Base wrapper: subclasses define :meth:`coefficients`.

    Args:
        net: backbone called as ``net(x_in, c_noise, class_labels)`` returning a tensor shaped like x_in.
        resolution, channels, num_classes: what the backbone accepts (num_classes 0 = unconditional).
        sigma_min, sigma_max, sigma_data: the noise range and data standard deviation (x0 in [-1, 1]).

    ``tuned_sigmas`` maps a step count to the sampling schedule found for it by ``cmkit tune-steps``
    (stored in the export's metadata); empty until tuned.
    """

    kind = ""

    def __init__(self, net: nn.Module, *, resolution: int, channels: int, num_classes: int = 0,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.tuned_sigmas: dict[int, list[float]] = {}

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape [N], in sigma's dtype."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Denoise. x: [N, C, H, W] float; sigma: [N] or scalar > 0; labels: [N] int64 or None.

        Returns the estimate of x0, [N, C, H, W] float32. The coefficients are computed in float32 even
        under autocast.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in self.coefficients(sigma))
        x = x.to(torch.float32)
        out = self.net(x * c_in, c_noise.flatten(), labels)
        return c_skip * x + c_out * out.to(torch.float32)


class EDMDenoiser(Preconditioned):
    """EDM's diffusion denoiser D(x, sigma) (Karras et al. 2022, Table 1)."""

    kind = "edm"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


class ConsistencyFunction(Preconditioned):
    """Consistency model f(x, sigma) (CM paper, App. C): c_skip(eps) = 1 and c_out(eps) = 0 exactly."""

    kind = "consistency"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd, eps = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma - eps) ** 2 + sd**2)
        c_out = sd * (sigma - eps) / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4
