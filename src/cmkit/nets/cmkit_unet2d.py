"""cmkit's DDPM++ U-Net as a diffusers model: the custom component of an exported ConsistencyModelPipeline.

This file is shipped verbatim, with its siblings ``unet.py`` and ``layers.py``, inside every folder ``cmkit export
--diffusers`` writes (``unet/cmkit_unet2d.py``, ``unet/unet.py``, ``unet/layers.py``), and diffusers loads it from
there with ``trust_remote_code=True``. So it must stay self-contained: it imports torch, diffusers, ``.unet`` and
``.layers`` only, never cmkit (tests/test_diffusers.py checks the files and loads a folder where cmkit is not
importable). It imports ``.layers`` itself, although only ``unet.py`` uses it, because diffusers copies a local
folder's module files only as the model file's own relative imports name them (not recursively).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import Tensor

from .layers import forward_mode  # noqa: F401 -- names layers.py so that diffusers copies it (see above)
from .unet import UNet

__all__ = ["CmkitUNet2DModel"]

PARAMETERISATIONS, C_NOISE = ("consistency", "trigflow"), ("log-sigma", "t")
# TrigFlow outputs are not passed through where the scheduler's c_out vanishes: sigma within this relative
# distance of sigma_min (the nearest other level of a 1000-level grid is about 2.5% above it).
_AT_SIGMA_MIN = 1e-4


class CmkitUNet2DModel(UNet2DModel):
    """The network of a cmkit consistency model, called the way ConsistencyModelPipeline calls a unet.

    Config: ``sample_size`` (resolution), ``in_channels``, ``num_class_embeds`` (None: unconditional) -- the
    names the pipeline reads -- the DDPM++ / NCSN++ options of cmkit's ``NetConfig`` (``double_norm``,
    ``encoder_type``, ``decoder_type``, ``resample_filter``, ``channel_mult_noise``, ``attn_heads``, ``augment_dim``:
    sampling passes no augmentation labels, which means none; ``attn_heads`` 0, the default for folders written
    before it, is the head rule of those folders' networks) and
    ``logvar_head`` (sCM's log-variance head: unused when sampling, built so the weights load), and the
    parameterisation:

    * ``"consistency"`` (CM paper, App. C; cmkit's ``ConsistencyFunction``): the output is the raw network F,
      which the scheduler's ``c_skip x + c_out F`` turns into the model, because its scalings are the model's;
    * ``"trigflow"`` (sCM, Lu and Song 2024; cmkit's ``TrigFlow``): the model is ``f = cos^2 t x - sigma_data
      sin t F(c_in x, c_noise)`` with ``t = arctan(sigma / sigma_data)``, which the scheduler's consistency
      scalings cannot express; the output is the ``F'`` with ``c_skip x + c_out F' = f`` (:meth:`forward`).

    ``c_noise`` is the network's time input: ``"log-sigma"`` (``ln(sigma) / 4``) or ``"t"`` (TrigFlow's t);
    ``sigma_min`` and ``sigma_data`` are the scheduler's (the export writes the model's into both). Folders
    written before these fields existed load with the defaults, which describe their models.

    It subclasses ``UNet2DModel`` for its interface only, because ConsistencyModelPipeline annotates its unet
    as one and logs "Expected types for unet" for anything else; none of UNet2DModel's layers are built (its
    ``__init__`` is bypassed) and ``forward`` is this class's own.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, sample_size: int, in_channels: int, num_class_embeds: int | None, model_channels: int,
                 channel_mult: list[int], num_blocks: int, attn_resolutions: list[int], dropout: float,
                 embedding: str, fourier_scale: float, double_norm: bool = False, logvar_head: bool = False,
                 parameterisation: str = "consistency", c_noise: str = "log-sigma", sigma_min: float = 0.002,
                 sigma_data: float = 0.5, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: list[int] | None = None, channel_mult_noise: int = 1, attn_heads: int = 0,
                 augment_dim: int = 0) -> None:
        super(UNet2DModel, self).__init__()  # ModelMixin's, not UNet2DModel's: no diffusers layers
        if parameterisation not in PARAMETERISATIONS or c_noise not in C_NOISE:
            raise ValueError(f"CmkitUNet2DModel: parameterisation must be one of {PARAMETERISATIONS} and c_noise "
                             f"one of {C_NOISE}, got {parameterisation!r} and {c_noise!r}")
        if parameterisation == "consistency" and c_noise != "log-sigma":
            raise ValueError("CmkitUNet2DModel: a consistency model's time input is log-sigma")
        self.net = UNet(resolution=sample_size, in_channels=in_channels, out_channels=in_channels,
                        model_channels=model_channels, channel_mult=tuple(channel_mult), num_blocks=num_blocks,
                        attn_resolutions=tuple(attn_resolutions), dropout=dropout, embedding=embedding,
                        fourier_scale=fourier_scale, num_classes=num_class_embeds or 0, double_norm=double_norm,
                        logvar_head=logvar_head, encoder_type=encoder_type, decoder_type=decoder_type,
                        resample_filter=tuple(resample_filter or (1, 1)), channel_mult_noise=channel_mult_noise,
                        attn_heads=attn_heads, augment_dim=augment_dim)

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                return_dict: bool = True) -> UNet2DOutput | tuple[Tensor]:
        """What CMStochasticIterativeScheduler's ``step`` takes as the model output.

        sample: [N, C, H, W], already ``c_in x`` with ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` (the
        scheduler's scale_model_input, also TrigFlow's ``cos t / sigma_data``); timestep: scalar or [N],
        ``250 ln sigma`` (the scheduler's), so ``ln(sigma) / 4 = timestep / 1000``; class_labels: [N] integers
        or None. Returns, shaped like sample, in ``UNet2DOutput.sample`` (or a 1-tuple): F for a consistency
        model, F' (below) for a TrigFlow model.

        TrigFlow: ``F' = (f - c_skip_S x) / c_out_S = a sample + b F`` with ``x = sample / c_in``, the model's
        ``f = c_skip_T x + c_out_T F``, and the scheduler's consistency scalings ``c_skip_S``, ``c_out_S``:
        ``a = (c_skip_T - c_skip_S) / (c_in c_out_S)``, ``b = c_out_T / c_out_S`` (computed in float64 on the
        CPU). ``c_out_S`` is 0 at sigma_min, where the scheduler returns ``c_skip_S x = x`` whatever this
        returns; there (sigma within 1e-4 relative of sigma_min) F' is 0, so the step gives x where cmkit's
        TrigFlow model gives ``f(x, sigma_min)``, which differs from x by about sigma_min F. Sampling reaches
        sigma_min only through ``timesteps`` containing ``num_train_timesteps - 1`` (or as many steps).
        """
        labels = None if class_labels is None else class_labels.to(sample.device, torch.long)
        n, c = sample.shape[0], self.config
        if c.parameterisation == "consistency":
            c_noise = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1) / 1000
            out = self.net(sample, c_noise.expand(n), labels)
        else:
            a, b, c_noise = (v.to(sample.device, torch.float32).expand(n) for v in self._trigflow(timestep))
            out = self.net(sample, c_noise, labels)
            out = a.view(-1, 1, 1, 1) * sample + b.view(-1, 1, 1, 1) * out.to(torch.float32)
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def _trigflow(self, timestep: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b, c_noise) of :meth:`forward` for a TrigFlow model at ``timestep`` ([N] or [1]), float64."""
        c = self.config
        sd, eps = c.sigma_data, c.sigma_min
        sigma = (torch.as_tensor(timestep).detach().to("cpu", torch.float64).reshape(-1) / 250).exp()
        t = torch.atan2(sigma, torch.full_like(sigma, sd))
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_skip_t, c_out_t = t.cos() ** 2, -sd * t.sin()
        c_skip_s, c_out_s = sd**2 / ((sigma - eps) ** 2 + sd**2), (sigma - eps) * sd * c_in
        valid = (sigma - eps).abs() > _AT_SIGMA_MIN * eps
        safe = torch.where(valid, c_out_s, torch.ones_like(c_out_s))
        a = torch.where(valid, (c_skip_t - c_skip_s) / (c_in * safe), 0.0)
        b = torch.where(valid, c_out_t / safe, 0.0)
        c_noise = sigma.log() / 4 if c.c_noise == "log-sigma" else t
        return a, b, c_noise
