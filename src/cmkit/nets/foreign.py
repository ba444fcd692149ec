"""Foreign teachers: a diffusers ``UNet2DModel`` folder on local disk behind cmkit's denoiser contract.

``teacher(x, sigma, cond=None) -> x0`` (``cond`` a :class:`cmkit.cond.Cond`) with x in the variance-exploding
sense (``x = x0 + sigma z``), like :class:`cmkit.precond.EDMDenoiser`. Only discrete-time DDPM-family models
are accepted (DDPM, Ho et al. 2020, and every scheduler sharing its training parameters:
``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``). Conversions (Karras et al. 2022,
EDM, Table 1 "VP" column; Kingma et al. 2021, VDM):

* ``abar_t = prod_{s<=t} (1 - beta_s)``, ``sigma_t = sqrt((1 - abar_t) / abar_t)``;
* VP input ``x_vp = sqrt(abar) x = x / sqrt(1 + sigma^2)`` with ``abar = 1 / (1 + sigma^2)``;
* a continuous timestep for any sigma: linear interpolation of t in ``log sigma_t`` between the two
  neighbouring discrete timesteps, clamped to the table's ends (k-diffusion's ``DiscreteSchedule.sigma_to_t``).

Nothing here imports diffusers until a folder is loaded, so ``import cmkit`` never needs it.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from cmkit.cond import Cond
from cmkit.errors import CmkitError
from cmkit.files import read_json_object

__all__ = ["DiffusersTeacher", "MissingDiffusersError", "check_noise_range", "import_diffusers",
           "is_diffusers_folder", "load_diffusers_teacher"]

# safetensors only: a pickled .bin file could execute code when loaded.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
CONSISTENCY_SCHEDULERS = ("CMStochasticIterativeScheduler", "LCMScheduler", "TCDScheduler")


class MissingDiffusersError(CmkitError, ImportError):
    """diffusers is not installed: a user error for the CLI and an ImportError for Python callers."""


def import_diffusers() -> ModuleType:
    """The ``diffusers`` module, or :class:`MissingDiffusersError` saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise MissingDiffusersError('this needs the diffusers package: pip install "cmkit[diffusers]"') from None
    return diffusers


# ------------------------------------------------------------------------------------------- the folder

def _layout(path: Path) -> tuple[Path, Path]:
    """(unet folder, scheduler config file) of a pipeline folder or a bare-unet folder."""
    if (path / "model_index.json").is_file():
        if not (path / "unet" / "config.json").is_file():
            raise CmkitError(f"{path}: a diffusers pipeline without unet/config.json; expected a pipeline with a "
                             "UNet2DModel in unet/")
        return path / "unet", path / "scheduler" / "scheduler_config.json"
    if (path / "config.json").is_file():
        return path, path / "scheduler_config.json"
    raise CmkitError(f"{path}: not a diffusers UNet folder; expected model_index.json with a unet/ subfolder, "
                     "or config.json of a UNet2DModel with its weights")


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a diffusers UNet: a pipeline folder (``model_index.json`` and ``unet/``), or a
    folder with a ``config.json`` whose ``_class_name`` is ``UNet2DModel`` next to its weights. Reads only
    JSON; says nothing about whether the model is usable as a teacher (:func:`load_diffusers_teacher` does).
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        return (path / "unet").is_dir()
    config = path / "config.json"
    if not config.is_file() or not any((path / name).is_file() for name in WEIGHT_FILES):
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "UNet2DModel"
    except (OSError, ValueError, AttributeError):
        return False


def _check_scheduler(config: dict[str, Any], path: Path) -> str:
    """Refuse anything but a discrete-time DDPM-family scheduler; return its prediction type."""
    name = config.get("_class_name", "an unnamed scheduler")
    if name in CONSISTENCY_SCHEDULERS:
        raise CmkitError(f"{path}: {name} means this is a consistency model; a teacher must be a diffusion model")
    missing = [k for k in ("num_train_timesteps", "beta_start", "beta_end") if k not in config]
    if missing:
        raise CmkitError(f"{path}: {name} lacks {', '.join(missing)}; expected a discrete-time DDPM-family "
                         "scheduler (DDPMScheduler, DDIMScheduler, ...)")
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is None and schedule not in BETA_SCHEDULES:
        raise CmkitError(f"{path}: beta_schedule {schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")
    if config.get("rescale_betas_zero_snr"):
        raise CmkitError(f"{path}: rescale_betas_zero_snr makes the last sigma infinite; expected a finite schedule")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise CmkitError(f"{path}: prediction_type {prediction!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return prediction


def _check_unet(config: dict[str, Any], folder: Path) -> None:
    name = config.get("_class_name")
    if name != "UNet2DModel":
        raise CmkitError(f"{folder / 'config.json'}: _class_name {name!r}; expected a diffusers UNet2DModel")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise CmkitError(f"{folder}: no safetensors UNet weights; expected one of {', '.join(WEIGHT_FILES)} "
                         "(pickled .bin weights are refused: loading them could execute code)")
    if not isinstance(config.get("sample_size"), int):
        raise CmkitError(f"{folder / 'config.json'}: sample_size {config.get('sample_size')!r}; expected one "
                         "integer (square images)")
    if config.get("out_channels", 3) not in (config.get("in_channels", 3), 2 * config.get("in_channels", 3)):
        raise CmkitError(f"{folder / 'config.json'}: out_channels must equal in_channels (or twice it, for a "
                         "learned variance)")


def alphas_cumprod(config: dict[str, Any]) -> Tensor:
    """``abar_t`` for t = 0..T-1, float32 [T], as diffusers' DDPM-family schedulers build it in float32.

    linear: ``beta_t`` evenly spaced in [beta_start, beta_end] (Ho et al. 2020); scaled_linear: evenly spaced
    in sqrt(beta) (Stable Diffusion); squaredcos_cap_v2: ``beta_t = min(1 - abar(t+1)/abar(t), 0.999)`` with
    ``abar(t) = cos^2(((t/T) + 0.008) / 1.008 * pi/2)`` (Nichol & Dhariwal 2021, eq. 17). ``trained_betas``
    wins when given.
    """
    n, lo, hi = int(config["num_train_timesteps"]), float(config["beta_start"]), float(config["beta_end"])
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(lo, hi, n, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(lo**0.5, hi**0.5, n, dtype=torch.float32) ** 2
    else:
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                             dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


# ------------------------------------------------------------------------------------------ the teacher

class DiffusersTeacher(nn.Module):
    """A diffusers ``UNet2DModel`` trained as a discrete-time VP diffusion model, as a cmkit denoiser.

    Args:
        unet: the diffusers UNet2DModel, called as ``unet(x_vp, t, class_labels).sample``.
        alphas_cumprod: ``abar_t`` of its training schedule, float [T], decreasing.
        prediction_type: what the unet predicts: ``epsilon``, ``v_prediction`` or ``sample``.

    ``sigma_min``/``sigma_max`` are ``sigma_0``/``sigma_{T-1}`` of the schedule; ``kind`` is ``"edm"`` (a
    diffusion denoiser) so samplers and losses treat it like a cmkit EDM teacher.
    """

    kind = "edm"

    def __init__(self, unet: nn.Module, *, alphas_cumprod: Tensor, prediction_type: str) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise CmkitError(f"prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
        self.unet, self.prediction_type = unet, prediction_type
        config = unet.config
        self.resolution, self.channels = int(config.sample_size), int(config.in_channels)
        self.num_classes = int(config.num_class_embeds or 0)
        abar = alphas_cumprod.to(torch.float32)
        self.register_buffer("log_sigmas", ((1 - abar) / abar).sqrt().log(), persistent=False)
        self.sigma_min, self.sigma_max = (float(self.log_sigmas[i].exp()) for i in (0, -1))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timesteps [N] float32 for sigmas [N]: t linear in log sigma between the neighbouring
        discrete timesteps, clamped to [0, T-1]; exactly the integer t at a sigma of the table."""
        log_sigmas = self.log_sigmas
        log_sigma = sigma.log().clamp(log_sigmas[0], log_sigmas[-1])
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lo = hi - 1
        w = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return lo.to(torch.float32) + w

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None) -> Tensor:
        """Denoise. x: [N, C, H, W] float, ``x = x0 + sigma z``; sigma: [N] or scalar > 0; cond: its class labels
        int64 [N] (the only conditioning a diffusers UNet2DModel takes; no null label: a run with label
        dropout is refused such a teacher, :func:`cmkit.teacher.load_teacher`), or None. Returns the
        estimate of x0, float32 [N, C, H, W].

        With ``abar = 1 / (1 + sigma^2)`` and ``x_vp = sqrt(abar) x``: epsilon: ``x0 = x - sigma eps``
        (Ho et al. 2020, eq. 4 rearranged); v: ``x0 = sqrt(abar) x_vp - sqrt(1 - abar) v`` (Salimans & Ho
        2022, Progressive Distillation, sec. 4); sample: the output itself.
        """
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        s = sigma.view(-1, 1, 1, 1)
        root = (1 + s**2).sqrt()  # 1 / sqrt(abar)
        x_vp = x / root
        labels = cond.labels if cond is not None and self.num_classes else None
        out = self.unet(x_vp, self.sigma_to_t(sigma), class_labels=labels).sample
        out = out[:, : self.channels].to(torch.float32)  # drop a learned variance's channels
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return (x_vp - s * out) / root
        return out


def load_diffusers_teacher(path: str | Path, *, device: torch.device | str = "cpu") -> DiffusersTeacher:
    """Load a local diffusers UNet2DModel folder (pipeline or bare unet) as a frozen teacher in eval mode.

    The scheduler config is ``scheduler/scheduler_config.json`` in a pipeline folder, else
    ``scheduler_config.json`` next to the unet's ``config.json``. Never contacts the Hugging Face Hub.
    Raises CmkitError naming the file for anything but a DDPM-family diffusion UNet2DModel.
    """
    path = Path(path)
    if not path.is_dir():
        raise CmkitError(f"{path}: no such folder; expected a diffusers pipeline or UNet2DModel folder")
    unet_dir, scheduler_file = _layout(path)
    if not scheduler_file.is_file():
        raise CmkitError(f"{path}: no scheduler config; expected {scheduler_file} (a DDPMScheduler or DDIMScheduler "
                         "config, which says how timesteps map to noise levels)")
    scheduler = read_json_object(scheduler_file, "a diffusers config file")
    prediction = _check_scheduler(scheduler, scheduler_file)
    _check_unet(read_json_object(unet_dir / "config.json", "a diffusers config file"), unet_dir)
    diffusers = import_diffusers()
    try:
        unet = diffusers.UNet2DModel.from_pretrained(unet_dir, torch_dtype=torch.float32, local_files_only=True,
                                                     use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise CmkitError(f"{unet_dir}: the UNet2DModel does not load ({str(e).splitlines()[0]})") from None
    teacher = DiffusersTeacher(unet, alphas_cumprod=alphas_cumprod(scheduler), prediction_type=prediction)
    return teacher.to(device).eval().requires_grad_(False)


def _round_sig(value: float, *, up: bool) -> float:
    """``value`` rounded to 4 significant digits, up or down: a value to suggest that is on the safe side."""
    scale = 10.0 ** (math.floor(math.log10(value)) - 3)
    return float(f"{(math.ceil if up else math.floor)(value / scale) * scale:.4g}")


def check_noise_range(teacher: DiffusersTeacher, *, sigma_min: float, sigma_max: float, where: str) -> None:
    """Check that the noise levels [sigma_min, sigma_max] a method evaluates ``teacher`` at lie in its table.

    Outside ``[teacher.sigma_min, teacher.sigma_max]`` the teacher is evaluated at its first or last timestep
    (:meth:`DiffusersTeacher.sigma_to_t` clamps), a noise level it was not trained at. Below the table the x0
    estimate is off by at most about the sigma itself (x0 = x - sigma eps), so this warns; above it the eps
    error is large and multiplied by sigma, so this raises CmkitError. Both name the two values and the
    ``--set`` that fits the grid into the table; ``where`` starts the message.
    """
    lo, hi = teacher.sigma_min, teacher.sigma_max
    if hi < sigma_max * (1 - 1e-6):
        raise CmkitError(f"{where}: its noise table ends at sigma {hi:.4g}, below the grid's highest level "
                         f"method.sigma_max={sigma_max:g}; above {hi:.4g} the teacher would be evaluated at its last "
                         "timestep and its x0 estimates would be far off; expected --set "
                         f"method.sigma_max={_round_sig(hi, up=False):g} (or less)")
    if lo > sigma_min * (1 + 1e-6):
        warnings.warn(f"{where}: its noise table starts at sigma {lo:.4g}, above the grid's lowest level "
                      f"method.sigma_min={sigma_min:g}; below {lo:.4g} the teacher is evaluated at its first timestep, "
                      f"so its x0 estimates there are off by up to about {lo:.2g} (images in [-1, 1]). To keep the "
                      f"grid inside the teacher's range: --set method.sigma_min={_round_sig(lo, up=True):g}",
                      stacklevel=2)
