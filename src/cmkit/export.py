"""Export a cmkit consistency model as a diffusers ``ConsistencyModelPipeline`` folder that diffusers alone loads.

cmkit's DDPM++ network is not exactly representable as diffusers' ``UNet2DModel`` (1/sqrt(2) skip scaling in
every residual and attention block, 1x1 projections in the resample blocks, decoder attention only on a
level's last block, GroupNorm groups ``min(32, channels // 4)``), so the folder carries cmkit's own network
as a diffusers *custom component*, by the convention diffusers documents for one: its module files ship in
the component's folder (``unet/cmkit_unet2d.py``, :mod:`cmkit.nets.cmkit_unet2d`, ``unet/unet.py``,
:mod:`cmkit.nets.unet`, and ``unet/layers.py``, :mod:`cmkit.nets.layers`, copied verbatim), ``model_index.json``
names the unet ``["cmkit_unet2d", "CmkitUNet2DModel"]``, and diffusers imports them when asked to::

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
* TrigFlow models (sct, scd; :class:`cmkit.precond.TrigFlow`) share the input scaling but not ``c_skip`` and
  ``c_out``: the unet's config says ``parameterisation="trigflow"`` and it returns ``F'`` with ``c_skip x + c_out
  F' = f``, the TrigFlow model (:class:`CmkitUNet2DModel`); exact but at sigma_min, where the scheduler's
  ``c_out`` is 0 and its step returns x;
* sampling levels: ``set_timesteps(timesteps=[t_1 > ... > t_k])`` samples at ``karras(m / (N - 1))`` for ``m``
  in ``t_k, ..., t_1`` (the list reversed), ``karras(r) = (sigma_max^(1/rho) + r (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho``, ``N = num_train_timesteps``; only levels of that N-point grid can be sampled
  at (no config field or argument takes sigmas), and the first is sigma_max when the last timestep is 0.

Schedules tuned by ``cmkit tune-steps`` (in the model's :class:`cmkit.sampling.SamplingSpec`) are kept in the
scheduler config as ``_cmkit_tuned_sigmas`` ({steps: sigmas}, exact), with ``_cmkit_tuned_timesteps``
({steps: timesteps}): the ``timesteps=`` whose grid levels are nearest to them (:func:`grid_timesteps`).
diffusers keeps config keys starting with ``_`` when loading, without a warning and without passing them to the
scheduler. The grid has N = 1000 levels, so the nearest levels are within about 0.5% of any sigma (1.2% near
sigma_min; the 40 levels of diffusers' default would be up to 13% off).

This module imports diffusers (``import cmkit`` does not); without it, importing raises
:class:`cmkit.nets.foreign.MissingDiffusersError`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

from cmkit.config import Config
from cmkit.files import new_folder
from cmkit.methods import Capability, model_entry, model_spec, require
from cmkit.nets import layers as layers_module
from cmkit.nets import unet as unet_module
from cmkit.nets.foreign import import_diffusers
from cmkit.precond import Preconditioned, TrigFlow
from cmkit.sampling import SAMPLING_RHO, SamplingSpec

import_diffusers()

# ModelMixin must stay a name of this module: folders written by cmkit before the custom-component layout
# name their unet ["cmkit.export", "CmkitUNet2DModel"], which diffusers resolves (after `import cmkit.export`)
# by matching the class against this module's ModelMixin.
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, ModelMixin  # noqa: E402

from cmkit.nets import cmkit_unet2d  # noqa: E402
from cmkit.nets.cmkit_unet2d import CmkitUNet2DModel  # noqa: E402

__all__ = ["CmkitUNet2DModel", "ModelMixin", "TunedSchedule", "export_diffusers", "grid_sigmas", "grid_timesteps",
           "module_files", "tuned_schedules"]

# Levels of the scheduler's Karras grid, which timesteps= index (see the module docstring).
NUM_TRAIN_TIMESTEPS = 1000
TUNED_SIGMAS_KEY, TUNED_TIMESTEPS_KEY = "_cmkit_tuned_sigmas", "_cmkit_tuned_timesteps"


def module_files() -> list[Path]:
    """The custom component's module files, shipped verbatim in ``unet/``: the diffusers model (named first, as
    ``model_index.json`` names it) and the network's modules it imports relatively. None imports cmkit."""
    return [Path(cmkit_unet2d.__file__), Path(unet_module.__file__), Path(layers_module.__file__)]


def _unet(model: Preconditioned, config: Config) -> CmkitUNet2DModel:
    """The custom component: the model's network with its parameterisation (consistency or TrigFlow), time
    input and the scheduler's sigma_min and sigma_data (see :class:`CmkitUNet2DModel`)."""
    n, d = config.net, config.data
    trig = isinstance(model, TrigFlow)
    unet = CmkitUNet2DModel(sample_size=d.resolution, in_channels=d.channels, num_class_embeds=n.num_classes or None,
                            model_channels=n.model_channels, channel_mult=list(n.channel_mult),
                            num_blocks=n.num_blocks, attn_resolutions=list(n.attn_resolutions), dropout=n.dropout,
                            embedding=n.embedding, fourier_scale=n.fourier_scale, double_norm=n.double_norm,
                            logvar_head=getattr(model.net, "map_logvar", None) is not None,
                            parameterisation="trigflow" if trig else "consistency",
                            c_noise=model.c_noise if trig else "log-sigma", sigma_min=model.sigma_min,
                            sigma_data=model.sigma_data, **{**n.family_options(),
                                                            "resample_filter": list(n.resample_filter)})
    unet.net.load_state_dict(model.net.state_dict())
    return unet.eval()


# ------------------------------------------------------------------------------ tuned sigmas in the scheduler

def grid_timesteps(sigmas: list[float], scheduler: CMStochasticIterativeScheduler) -> list[int] | None:
    """The ``timesteps=`` (DESCENDING integers) whose levels in ``scheduler`` are nearest to ``sigmas``
    (DESCENDING), or None when its grid cannot represent them: two sigmas share a level, or the first is not
    at sigma_max's level (the pipeline always starts from ``sigma_max z``).

    Level of a sigma: ``m = round((T^(1/rho) - sigma^(1/rho)) / (T^(1/rho) - eps^(1/rho)) (N - 1))`` with the
    scheduler's sigma_max T, sigma_min eps, rho and N = num_train_timesteps; the timesteps are the m's reversed.
    """
    c = scheduler.config
    hi, lo = c.sigma_max ** (1 / c.rho), c.sigma_min ** (1 / c.rho)
    levels = [round((hi - s ** (1 / c.rho)) / (hi - lo) * (c.num_train_timesteps - 1)) for s in sigmas]
    levels = [min(max(m, 0), c.num_train_timesteps - 1) for m in levels]
    if levels[0] != 0 or any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
        return None
    return levels[::-1]


def grid_sigmas(timesteps: list[int], scheduler: CMStochasticIterativeScheduler) -> list[float]:
    """The levels (DESCENDING) that ``pipe(timesteps=timesteps)`` samples at, as ``scheduler`` computes them."""
    probe = CMStochasticIterativeScheduler.from_config(scheduler.config)
    probe.set_timesteps(timesteps=timesteps)
    return probe.sigmas[:-1].tolist()  # the last entry is the sigma_min the final step ends at


def _scheduler(model: Preconditioned, spec: SamplingSpec) -> CMStochasticIterativeScheduler:
    """The scheduler with the model's noise range and data scale (so its scalings are the model's), carrying
    ``spec.tuned`` and the timesteps that reproduce them (see the module docstring)."""
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, sigma_min=model.sigma_min,
                                               sigma_max=model.sigma_max, sigma_data=model.sigma_data,
                                               rho=SAMPLING_RHO, s_noise=1.0, clip_denoised=False)
    tuned = {str(k): [float(s) for s in v] for k, v in sorted(spec.tuned.items())}
    if tuned:
        timesteps = {k: grid_timesteps(v, scheduler) for k, v in tuned.items()}
        scheduler.register_to_config(**{TUNED_SIGMAS_KEY: tuned,
                                        TUNED_TIMESTEPS_KEY: {k: v for k, v in timesteps.items() if v}})
    return scheduler


class TunedSchedule(NamedTuple):
    """A tuned schedule in an exported folder: its step count, the tuned sigmas, and the ``timesteps=`` that
    come nearest with the sigmas they give (both None when the scheduler's grid cannot represent it)."""

    steps: int
    sigmas: list[float]
    timesteps: list[int] | None
    grid_sigmas: list[float] | None

    def describe(self) -> str:
        """One line for the user: the tuned sigmas and how to sample them with the exported pipeline."""
        head = (f"tuned {self.steps}-step sigmas {_fmt(self.sigmas)} (kept in scheduler/scheduler_config.json as "
                f"{TUNED_SIGMAS_KEY})")
        if self.timesteps is None:
            why = "two share a level of its grid, or the first is not sigma_max"
            return f"{head}: no timesteps= reproduces them ({why})"
        return f"{head}: pipe(timesteps={self.timesteps}) samples at {_fmt(self.grid_sigmas)}"


def _fmt(sigmas: list[float]) -> str:
    return ",".join(f"{s:.4g}" for s in sigmas)


def tuned_schedules(folder: str | Path) -> list[TunedSchedule]:
    """The tuned schedules an exported pipeline folder carries, by step count, read back through diffusers."""
    scheduler = CMStochasticIterativeScheduler.from_pretrained(Path(folder) / "scheduler")
    tuned, all_timesteps = (scheduler.config.get(key, {}) for key in (TUNED_SIGMAS_KEY, TUNED_TIMESTEPS_KEY))
    schedules = []
    for steps, sigmas in sorted(tuned.items(), key=lambda item: int(item[0])):
        timesteps = all_timesteps.get(steps)
        levels = grid_sigmas(timesteps, scheduler) if timesteps else None
        schedules.append(TunedSchedule(int(steps), sigmas, timesteps, levels))
    return schedules


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


def export_diffusers(model: Preconditioned, config: Config, out_dir: str | Path, *,
                     spec: SamplingSpec | None = None) -> Path:
    """Write ``model`` (a cmkit consistency model and its config) as a ConsistencyModelPipeline folder that
    loads with diffusers alone (``trust_remote_code=True``), keeping the schedules tuned in ``spec`` (the
    model's :func:`cmkit.checkpoint.load_export` spec; None: none tuned) in its scheduler config
    (:func:`tuned_schedules` reads them back).

    ``out_dir`` must not exist or be an empty folder; the folder is built as a temporary sibling and renamed
    into place, so it is either complete or absent. Returns ``out_dir``. Raises CmkitError for a model whose
    method lacks the 'export' capability (EDM: ConsistencyModelPipeline samples consistency models only).
    """
    out_dir = Path(out_dir)
    require(model_entry(model), Capability.EXPORT,
            "export to diffusers (ConsistencyModelPipeline samples consistency models only)")
    spec = spec or model_spec(model)
    with new_folder(out_dir) as tmp:
        _write(ConsistencyModelPipeline(unet=_unet(model, config), scheduler=_scheduler(model, spec)), tmp)
    return out_dir
