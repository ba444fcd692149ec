"""cmkit's DDPM++ U-Net as a diffusers model: the custom component of an exported ConsistencyModelPipeline.

This file is shipped verbatim, with its sibling ``unet.py``, inside every folder ``cmkit export --diffusers``
writes (``unet/cmkit_unet2d.py`` and ``unet/unet.py``), and diffusers loads it from there with
``trust_remote_code=True``. So it must stay self-contained: it imports torch, diffusers and ``.unet`` only,
never cmkit (tests/test_diffusers.py checks both files and loads a folder where cmkit is not importable).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import Tensor

from .unet import UNet

__all__ = ["CmkitUNet2DModel"]


class CmkitUNet2DModel(UNet2DModel):
    """The raw network F of a cmkit consistency model, called the way ConsistencyModelPipeline calls a unet.

    Config: ``sample_size`` (resolution), ``in_channels``, ``num_class_embeds`` (None: unconditional) -- the
    names the pipeline reads -- and the DDPM++ options of cmkit's ``NetConfig``.

    It subclasses ``UNet2DModel`` for its interface only, because ConsistencyModelPipeline annotates its unet
    as one and logs "Expected types for unet" for anything else; none of UNet2DModel's layers are built (its
    ``__init__`` is bypassed) and ``forward`` is this class's own.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, sample_size: int, in_channels: int, num_class_embeds: int | None, model_channels: int,
                 channel_mult: list[int], num_blocks: int, attn_resolutions: list[int], dropout: float,
                 embedding: str, fourier_scale: float) -> None:
        super(UNet2DModel, self).__init__()  # ModelMixin's, not UNet2DModel's: no diffusers layers
        self.net = UNet(resolution=sample_size, in_channels=in_channels, out_channels=in_channels,
                        model_channels=model_channels, channel_mult=tuple(channel_mult), num_blocks=num_blocks,
                        attn_resolutions=tuple(attn_resolutions), dropout=dropout, embedding=embedding,
                        fourier_scale=fourier_scale, num_classes=num_class_embeds or 0)

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                return_dict: bool = True) -> UNet2DOutput | tuple[Tensor]:
        """F(c_in x, c_noise). sample: [N, C, H, W], already ``c_in x`` (the scheduler's scale_model_input);
        timestep: scalar or [N], ``250 ln sigma`` (CMStochasticIterativeScheduler's), so ``c_noise = ln(sigma)
        / 4 = timestep / 1000``; class_labels: [N] integers or None. Returns F, shaped like sample, in
        ``UNet2DOutput.sample`` (or a 1-tuple)."""
        c_noise = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1) / 1000
        labels = None if class_labels is None else class_labels.to(sample.device, torch.long)
        out = self.net(sample, c_noise.expand(sample.shape[0]), labels)
        return UNet2DOutput(sample=out) if return_dict else (out,)
