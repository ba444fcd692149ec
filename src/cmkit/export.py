"""Export a cmkit consistency model as a diffusers ``ConsistencyModelPipeline`` folder.

cmkit's DDPM++ network is not exactly representable as diffusers' ``UNet2DModel`` (1/sqrt(2) skip scaling in
every residual and attention block, 1x1 projections in the resample blocks, decoder attention only on a
level's last block, GroupNorm groups ``min(32, channels // 4)``), so the folder carries cmkit's own network
wrapped as a diffusers model, :class:`CmkitUNet2DModel`. Loading it needs cmkit installed and imported:

    import cmkit.export  # registers CmkitUNet2DModel; diffusers resolves it from sys.modules
    from diffusers import ConsistencyModelPipeline
    pipe = ConsistencyModelPipeline.from_pretrained("out_dir")

Conventions of ``CMStochasticIterativeScheduler`` (diffusers 0.30-0.42), matched here so that the pipeline's
samples equal :func:`cmkit.sampling.consistency_sample` with the same noise and sigmas:

* ``latents * init_noise_sigma`` with ``init_noise_sigma = sigma_max``: cmkit's ``x_T = sigma_max z``;
* ``scale_model_input``: ``x / sqrt(sigma^2 + sigma_data^2)`` = cmkit's ``c_in x``;
* ``timestep = 1000 * 0.25 * ln(sigma + 1e-44)``, so cmkit's ``c_noise = ln(sigma) / 4 = timestep / 1000``;
* ``step``: ``c_skip x + c_out F`` with ``get_scalings_for_boundary_condition`` = cmkit's consistency
  coefficients (CM paper, App. C) when the scheduler's sigma_min and sigma_data are the model's; then adds
  ``sqrt(sigma_next^2 - sigma_min^2) z`` (CM paper, Alg. 1). ``clip_denoised`` is written as False because
  cmkit's sampler does not clamp; the pipeline's postprocessing still clamps ``x / 2 + 0.5`` to [0, 1].

This module imports diffusers (``import cmkit`` does not); without it, importing raises
:class:`cmkit.nets.foreign.MissingDiffusersError`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from cmkit.config import Config
from cmkit.errors import CmkitError
from cmkit.nets.foreign import import_diffusers
from cmkit.nets.unet import UNet
from cmkit.precond import Preconditioned

import_diffusers()

# ModelMixin must be a name of this module: diffusers matches the unet's class against it when loading.
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, ModelMixin  # noqa: E402
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402

__all__ = ["CmkitUNet2DModel", "ModelMixin", "export_diffusers"]

# Discrete training steps the scheduler's default timesteps are spaced over (diffusers' default).
NUM_TRAIN_TIMESTEPS = 40


class CmkitUNet2DModel(ModelMixin, ConfigMixin):
    """cmkit's DDPM++ :class:`~cmkit.nets.UNet` as a diffusers model, the raw network F of a consistency model.

    Config: ``sample_size`` (resolution), ``in_channels``, ``num_class_embeds`` (None: unconditional) -- the
    names ConsistencyModelPipeline reads -- and the remaining :class:`cmkit.config.NetConfig` fields.
    """

    @register_to_config
    def __init__(self, sample_size: int, in_channels: int, num_class_embeds: int | None, model_channels: int,
                 channel_mult: list[int], num_blocks: int, attn_resolutions: list[int], dropout: float,
                 embedding: str, fourier_scale: float) -> None:
        super().__init__()
        self.net = UNet(resolution=sample_size, in_channels=in_channels, out_channels=in_channels,
                        model_channels=model_channels, channel_mult=tuple(channel_mult), num_blocks=num_blocks,
                        attn_resolutions=tuple(attn_resolutions), dropout=dropout, embedding=embedding,
                        fourier_scale=fourier_scale, num_classes=num_class_embeds or 0)

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                return_dict: bool = True) -> UNet2DOutput | tuple[Tensor]:
        """F(c_in x, c_noise). sample: [N, C, H, W], already ``c_in x`` (the scheduler's scale_model_input);
        timestep: scalar or [N], ``250 ln sigma``; class_labels: [N] integers or None. Returns F, shaped like
        sample, in ``UNet2DOutput.sample`` (or a 1-tuple)."""
        c_noise = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1) / 1000
        labels = None if class_labels is None else class_labels.to(sample.device, torch.long)
        out = self.net(sample, c_noise.expand(sample.shape[0]), labels)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def _pipeline(model: Preconditioned, config: Config) -> ConsistencyModelPipeline:
    n, d = config.net, config.data
    unet = CmkitUNet2DModel(sample_size=d.resolution, in_channels=d.channels, num_class_embeds=n.num_classes or None,
                            model_channels=n.model_channels, channel_mult=list(n.channel_mult),
                            num_blocks=n.num_blocks, attn_resolutions=list(n.attn_resolutions), dropout=n.dropout,
                            embedding=n.embedding, fourier_scale=n.fourier_scale)
    unet.net.load_state_dict(model.net.state_dict())
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, sigma_min=model.sigma_min,
                                               sigma_max=model.sigma_max, sigma_data=model.sigma_data,
                                               rho=config.method.rho, s_noise=1.0, clip_denoised=False)
    return ConsistencyModelPipeline(unet=unet.eval(), scheduler=scheduler)


def export_diffusers(model: Preconditioned, config: Config, out_dir: str | Path) -> Path:
    """Write ``model`` (a cmkit consistency model and its config) as a ConsistencyModelPipeline folder.

    ``out_dir`` must not exist or be an empty folder; the folder is built as a temporary sibling and renamed
    into place, so it is either complete or absent. Returns ``out_dir``. Raises CmkitError for a diffusion
    (EDM) model: ConsistencyModelPipeline samples consistency models only.
    """
    out_dir = Path(out_dir)
    if model.kind != "consistency":
        raise CmkitError(f"a {model.kind or 'non-consistency'} model cannot be exported to diffusers: "
                         "ConsistencyModelPipeline samples consistency models only (ct, ict, cd or ect)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CmkitError(f"{out_dir}: already exists and is not an empty folder; expected a new folder name")
    if not out_dir.parent.is_dir():
        raise CmkitError(f"{out_dir}: folder {out_dir.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        _pipeline(model, config).save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
