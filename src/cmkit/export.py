"""Export a cmkit consistency model as a diffusers ``ConsistencyModelPipeline`` folder that diffusers alone loads.

cmkit's DDPM++ network is not exactly representable as diffusers' ``UNet2DModel`` (1/sqrt(2) skip scaling in
every residual and attention block, 1x1 projections in the resample blocks, decoder attention only on a
level's last block, GroupNorm groups ``min(32, channels // 4)``), so the folder carries cmkit's own network
as a diffusers *custom component*, by the convention diffusers documents for one: its module files ship in
the component's folder (``unet/cmkit_unet2d.py``, :mod:`cmkit.nets.cmkit_unet2d`, and ``unet/unet.py``,
:mod:`cmkit.nets.unet`, both copied verbatim), ``model_index.json`` names the unet
``["cmkit_unet2d", "CmkitUNet2DModel"]``, and diffusers imports them when asked to::

    from diffusers import ConsistencyModelPipeline
    pipe = ConsistencyModelPipeline.from_pretrained("out_dir", trust_remote_code=True)

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

import json
import os
import shutil
import tempfile
from pathlib import Path

from cmkit.config import Config
from cmkit.errors import CmkitError
from cmkit.nets import unet as unet_module
from cmkit.nets.foreign import import_diffusers
from cmkit.precond import Preconditioned

import_diffusers()

# ModelMixin must stay a name of this module: folders written by cmkit before the custom-component layout
# name their unet ["cmkit.export", "CmkitUNet2DModel"], which diffusers resolves (after `import cmkit.export`)
# by matching the class against this module's ModelMixin.
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, ModelMixin  # noqa: E402

from cmkit.nets import cmkit_unet2d  # noqa: E402
from cmkit.nets.cmkit_unet2d import CmkitUNet2DModel  # noqa: E402

__all__ = ["CmkitUNet2DModel", "ModelMixin", "export_diffusers", "module_files"]

# Discrete training steps the scheduler's default timesteps are spaced over (diffusers' default).
NUM_TRAIN_TIMESTEPS = 40


def module_files() -> list[Path]:
    """The custom component's module files, shipped verbatim in ``unet/``: the diffusers model (named first, as
    ``model_index.json`` names it) and the network it imports relatively. Neither imports cmkit."""
    return [Path(cmkit_unet2d.__file__), Path(unet_module.__file__)]


def _karras_rho(config: Config) -> float:
    """The rho of the Karras grids the model was trained on (the one place the export reads a method field)."""
    return config.method.rho


def _unet(model: Preconditioned, config: Config) -> CmkitUNet2DModel:
    n, d = config.net, config.data
    unet = CmkitUNet2DModel(sample_size=d.resolution, in_channels=d.channels, num_class_embeds=n.num_classes or None,
                            model_channels=n.model_channels, channel_mult=list(n.channel_mult),
                            num_blocks=n.num_blocks, attn_resolutions=list(n.attn_resolutions), dropout=n.dropout,
                            embedding=n.embedding, fourier_scale=n.fourier_scale)
    unet.net.load_state_dict(model.net.state_dict())
    return unet.eval()


def _scheduler(model: Preconditioned, config: Config) -> CMStochasticIterativeScheduler:
    """The scheduler with the model's noise range and data scale (so its scalings are the model's)."""
    return CMStochasticIterativeScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, sigma_min=model.sigma_min,
                                          sigma_max=model.sigma_max, sigma_data=model.sigma_data,
                                          rho=_karras_rho(config), s_noise=1.0, clip_denoised=False)


# ----------------------------------------------------------------------------------------------- the folder

def _write(pipe: ConsistencyModelPipeline, folder: Path) -> None:
    """save_pretrained, then ship the unet's module files and name them in model_index.json."""
    pipe.save_pretrained(folder, safe_serialization=True)
    files = module_files()
    for path in files:
        shutil.copyfile(path, folder / "unet" / path.name)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["unet"] = [files[0].stem, CmkitUNet2DModel.__name__]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_diffusers(model: Preconditioned, config: Config, out_dir: str | Path) -> Path:
    """Write ``model`` (a cmkit consistency model and its config) as a ConsistencyModelPipeline folder that
    loads with diffusers alone (``trust_remote_code=True``).

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
        _write(ConsistencyModelPipeline(unet=_unet(model, config), scheduler=_scheduler(model, config)), tmp)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
