"""Parameterisations wrapped around a plain backbone.

``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))``

Every wrapper follows one denoiser contract, ``(x, sigma, cond=None) -> x0`` (``cond`` a
:class:`cmkit.cond.Cond`), and knows its own noise
range, resolution, channels and class count, so samplers need no side information. The coefficients do
not depend on ``self.training``: the consistency boundary condition (``f(x, sigma_min) = x``, or
``f(x, 0) = x`` for TrigFlow) holds exactly in train and eval mode alike.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from cmkit.cond import Cond
from cmkit.errors import CmkitError


class Preconditioned(nn.Module):
    """Base wrapper: subclasses define :meth:`coefficients`.

    Args:
        net: backbone called as ``net(x_in, c_noise, class_labels)`` returning a tensor shaped like x_in (with
            ``augment_labels=`` too when the conditioning has augmentation labels: :class:`cmkit.nets.UNet`);
            class labels may hold :data:`cmkit.cond.NULL_LABEL` ("no class").
        resolution, channels, num_classes: what the backbone accepts (num_classes 0 = unconditional).
        sigma_min, sigma_max, sigma_data: the noise range and data standard deviation (x0 in [-1, 1]).

    ``method_name`` names the training method whose registry entry (:mod:`cmkit.methods`) says what the model
    can do; :func:`cmkit.checkpoint.build_model` sets it ("" for a wrapper built by hand).
    """

    method_name = ""
    guidance_range: tuple[float, float] | None = None  # [w_min, w_max] of a model that takes w (GuidedConsistency)

    def __init__(self, net: nn.Module, *, resolution: int, channels: int, num_classes: int = 0,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape [N], in sigma's dtype."""
        raise NotImplementedError

    def adopt_backbone(self, teacher: EDMDenoiser) -> None:
        """Start from an EDM ``teacher``'s backbone weights (CD, ECT, sCT, sCD, LCM students); a log-variance head
        or a guidance embedding (``map_guidance``) the teacher lacks starts at zero."""
        self._load_backbone(teacher.net.state_dict())

    def _load_backbone(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if unexpected or any(not key.startswith(("map_logvar.", "map_guidance.")) for key in missing):
            raise CmkitError(f"the teacher's network does not match the student's (missing {missing}, "
                             f"unexpected {unexpected})")

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None) -> Tensor:
        """Denoise. x: [N, C, H, W] float; sigma: [N] or scalar > 0; cond: the class labels (int64 [N], required
        by a class-conditional model), EDM's augmentation labels ([N, augment_dim] float, for a backbone built
        with augment_dim > 0; none at sampling) and the guidance scale (float [N], for a backbone built with
        guidance_dim > 0: :class:`GuidedConsistency`), or None.

        Returns the estimate of x0, [N, C, H, W] float32. The coefficients are computed in float32 even
        under autocast.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in self.coefficients(sigma))
        x = x.to(torch.float32)
        out = self._net(x * c_in, c_noise.flatten(), cond)
        return c_skip * x + c_out * out.to(torch.float32)

    def _net(self, x: Tensor, c_noise: Tensor, cond: Cond | None, time2: Tensor | None = None) -> Tensor:
        """The backbone; augmentation labels, the guidance scale and a second time input (``time2`` [N],
        :class:`MeanFlow`) reach it as keywords only when given, so a backbone without them keeps the plain
        ``net(x, c_noise, labels)`` signature."""
        if cond is None:
            cond = Cond()
        elif not isinstance(cond, Cond):
            raise TypeError(f"cond: expected a cmkit.cond.Cond or None, got {type(cond).__name__}")
        extra = {name: value for name, value in (("augment_labels", cond.augment), ("guidance", cond.guidance),
                                                 ("time2_labels", time2))
                 if value is not None}
        return self.net(x, c_noise, cond.labels, **extra)


class EDMDenoiser(Preconditioned):
    """EDM's diffusion denoiser D(x, sigma) (Karras et al. 2022, Table 1)."""

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


class ConsistencyFunction(Preconditioned):
    """Consistency model f(x, sigma) (CM paper, App. C): c_skip(eps) = 1 and c_out(eps) = 0 exactly."""

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd, eps = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma - eps) ** 2 + sd**2)
        c_out = sd * (sigma - eps) / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


class GuidedConsistency(ConsistencyFunction):
    """A consistency function that takes the guidance scale w as an input (LCM, Luo et al. 2023): ``f(x, w, c,
    sigma)``, the CM paper's parameterisation (:class:`ConsistencyFunction`) around a backbone built with
    ``guidance_dim > 0``; w arrives as ``cond.guidance`` (float [N]).

    ``guidance_range``: the [w_min, w_max] it was trained on (what :func:`cmkit.sampling.generate` accepts);
    ``guidance_default``: the w a call without ``cond.guidance`` uses (training snapshots, evaluations during
    training, ``cmkit sample`` without ``--guidance``, editing).
    """

    def __init__(self, net: nn.Module, *, guidance_range: tuple[float, float], guidance_default: float,
                 **kw) -> None:
        super().__init__(net, **kw)
        self.guidance_range = (float(guidance_range[0]), float(guidance_range[1]))
        self.guidance_default = float(guidance_default)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None) -> Tensor:
        if cond is None or cond.guidance is None:
            w = torch.full((x.shape[0],), self.guidance_default, dtype=torch.float32, device=x.device)
            cond = replace(cond or Cond(), guidance=w)
        return super().forward(x, sigma, cond)


C_NOISE = ("t", "log-sigma")


class TrigFlow(Preconditioned):
    """A continuous-time consistency model in TrigFlow form (Lu and Song 2024, sCM section 3).

    TrigFlow writes ``x_t = cos t x0 + sin t z`` with ``z ~ N(0, sigma_data^2 I)`` and ``t in [0, pi/2]``; the
    model is ``f(x_t, t) = cos t x_t - sin t sigma_data F(x_t / sigma_data, c_noise(t))``, where ``sigma_data F``
    is the velocity ``dx_t/dt`` of the probability-flow ODE. With ``sigma = sigma_data tan t`` the EDM-scaled
    input ``x = x0 + sigma eps`` is ``x_t / cos t``, so in the denoiser contract
    ``c_skip = cos^2 t``, ``c_out = -sigma_data sin t``, ``c_in = cos t / sigma_data``: ``f(x, 0) = x`` exactly.

    ``c_noise`` is ``"t"`` (the paper's time input) or ``"log-sigma"`` (EDM's ``ln(sigma) / 4`` at the matching
    sigma): with it, the network of an EDM denoiser whose last layer changes sign is this model exactly
    (:func:`edm_backbone_to_trigflow`), which is how a cmkit EDM teacher seeds sCT and sCD students.
    The backbone's log-variance head (``net.logvar(c_noise)``, :class:`cmkit.nets.UNet`) is the adaptive weight
    ``w(t)`` of the sCM loss; :meth:`raw` returns ``(F, w)`` at TrigFlow inputs ``(x_t / sigma_data, t)``.
    """

    def __init__(self, net: nn.Module, *, c_noise: str = "t", **kw) -> None:
        super().__init__(net, **kw)
        if c_noise not in C_NOISE:
            raise ValueError(f"TrigFlow: c_noise must be one of {', '.join(C_NOISE)}, got {c_noise!r}")
        self.c_noise = c_noise

    def adopt_backbone(self, teacher: EDMDenoiser) -> None:
        """Become the EDM ``teacher`` exactly (:func:`edm_backbone_to_trigflow`); needs ``c_noise="log-sigma"``."""
        if self.c_noise != "log-sigma":
            raise CmkitError(f"method.c_noise={self.c_noise}: a student that starts from an EDM teacher's weights "
                             "must see the teacher's time input; set method.c_noise=log-sigma (c_noise=t suits sct "
                             "trained from scratch, without --teacher)")
        self._load_backbone(edm_backbone_to_trigflow(teacher.net.state_dict(), *teacher.net.output_layers))

    def time_input(self, t: Tensor, sigma: Tensor | None = None) -> Tensor:
        """c_noise(t) for t of shape [N] (float32); differentiable in t (forward mode too). ``sigma`` (= sigma_d
        tan t), when the caller has it, is used as it is: in float32 tan(atan(sigma / sd)) is off by 2e-6 at
        sigma = 80, enough to move a Fourier embedding's output by 1e-4, and EDM's c_noise takes sigma itself."""
        if self.c_noise == "t":
            return t
        sigma = self.sigma_data * t.tan() if sigma is None else sigma
        return sigma.clamp(min=1e-20).log() / 4

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd = self.sigma_data
        t = torch.atan(sigma / sd)
        return t.cos() ** 2, -sd * t.sin(), t.cos() / sd, self.time_input(t, sigma)

    def raw(self, x_in: Tensor, t: Tensor, cond: Cond | None = None) -> tuple[Tensor, Tensor]:
        """The raw network at TrigFlow inputs, for losses that differentiate it: ``x_in = x_t / sigma_data``
        [N, C, H, W] and t [N]; returns ``(F [N, C, H, W] float32, w [N] float32)``, w the log-variance head's
        output (0 without the head). ``cond`` as in :meth:`Preconditioned.forward`. Losses call it through
        :func:`cmkit.losses.raw_call` (so DDP sees the call)."""
        c_noise = self.time_input(t)
        return self._net(x_in, c_noise, cond).to(torch.float32), self.net.logvar(c_noise)


def edm_backbone_to_trigflow(state: dict[str, Tensor], *output_layers: str) -> dict[str, Tensor]:
    """The backbone weights of an EDM denoiser as those of a TrigFlow model with ``c_noise="log-sigma"``.

    EDM's ``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2) = sigma_data sin t`` and TrigFlow's
    ``-sigma_data sin t`` differ in sign only (c_skip and c_in agree), so negating the last layers
    (every ``output_layers``' weight and bias: the layers whose outputs sum to the network's output,
    :attr:`cmkit.nets.UNet.output_layers`) makes the two models give the same x0 at every noise level.
    """
    out = dict(state)
    for layer in output_layers:
        for key in (f"{layer}.weight", f"{layer}.bias"):
            out[key] = -state[key]
    return out


def trigflow_velocity(denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: Cond | None = None, *,
                      sigma_data: float) -> Tensor:
    """The TrigFlow velocity ``dx_t/dt = sigma_data F`` of any diffusion denoiser ``(x, sigma, cond) -> x0``.

    From ``x_t = cos t x0 + sin t z`` and ``v = cos t z - sin t x0``: ``v = (cos t x_t - D(x_t / cos t,
    sigma_data tan t)) / sin t``, for t in (0, pi/2) [N], with the TrigFlow model's ``sigma_data``. This is how
    an EDM teacher serves sCD.
    """
    sd = sigma_data
    cos, sin = (v.view(-1, 1, 1, 1) for v in (t.cos(), t.sin()))
    x0 = denoiser(x_t / cos, sd * t.tan(), cond)
    return (cos * x_t - x0) / sin


class MeanFlow(Preconditioned):
    """A MeanFlow model (Geng et al. 2025, arXiv 2505.13447): the average velocity ``u(z_t, r, t)`` of the linear
    path ``z_t = (1 - t) x0 + t e`` (t = 1 is noise) over [r, t], as a denoiser.

    The backbone is fed ``(t, t - r)`` (the best time input of the paper's ablation, Table 1): ``net(z_t, t, labels,
    time2_labels=t - r)``, a network built with ``time2_embedding=True``. :meth:`raw` is ``u`` itself.

    In the denoiser contract, the EDM-scaled ``x = x0 + sigma e`` is ``z_t (1 + sigma)`` with ``t = sigma / (1 +
    sigma)``, and the model returns the endpoint of the straight line its average velocity draws:
    ``x0_hat = z_t - t u(z_t, r, t)``, with ``r`` the time of ``cond.time2`` (an EDM sigma: the level the sampler
    steps to, :func:`cmkit.sampling.meanflow_sample`) or 0 when ``cond.time2`` is None (a one-step jump to the
    data, what editing and the consistency sampler ask for).

    ``t = 1`` (pure noise) has no finite sigma: the top of the noise range, ``sigma >= sigma_max``, stands for it.
    Samplers start there from ``sigma_max e``, which carries no data (every consistency model's convention), so
    the model reads it as ``z_1 = x / sigma = e`` at ``t = 1``: the one-step sample is exactly the paper's
    ``e - u(e, 0, 1)``. Below ``sigma_max`` (t < sigma_max / (1 + sigma_max), 0.988 at 80) the map is exact.
    """

    def raw(self, z: Tensor, r: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """``u(z, r, t)``: ``z`` [N, C, H, W] on the linear path, times ``0 <= r <= t <= 1`` [N]; returns float32
        [N, C, H, W]. Differentiable in all three (forward mode too). Losses call it through
        :func:`cmkit.losses.raw_call` (so DDP sees the call)."""
        return self._net(z, t, cond, time2=t - r).to(torch.float32)

    def path_time(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(t, scale) [N] float32 for EDM levels ``sigma`` [N]: ``z_t = scale x``; ``t = 1`` and ``scale = 1 /
        sigma`` at and above ``sigma_max``, else ``t = sigma / (1 + sigma)`` and ``scale = 1 / (1 + sigma)``."""
        top = sigma >= self.sigma_max
        t = torch.where(top, torch.ones_like(sigma), sigma / (1 + sigma))
        return t, torch.where(top, 1 / sigma, 1 / (1 + sigma))

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None) -> Tensor:
        """``x0_hat = z_t - t u(z_t, r, t)`` [N, C, H, W] float32 (see the class docstring); ``cond.time2`` [N],
        when given, is the EDM level of r (0 <= it <= sigma)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        t, scale = self.path_time(sigma)
        r = torch.zeros_like(t)
        if cond is not None and cond.time2 is not None:
            r = torch.minimum(self.path_time(cond.time2.to(t))[0], t)
        z = x.to(torch.float32) * scale.view(-1, 1, 1, 1)
        return z - t.view(-1, 1, 1, 1) * self.raw(z, r, t, cond)
