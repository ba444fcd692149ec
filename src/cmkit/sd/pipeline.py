"""A local diffusers text-to-image pipeline folder as the teacher: its UNet (``UNet2DConditionModel``, epsilon or v
prediction), its discrete noise schedule (``alphas_cumprod``), its VAE (the codec, with its scaling factor) and its
CLIP text encoder and tokenizer (the conditioning).

Only the ``StableDiffusionPipeline`` layout (SD 1.x/2.x: ``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) is read, with ``local_files_only`` and safetensors weights only;
anything else is refused in one line naming the file: a folder without ``model_index.json``, a layout cmkit does not
support yet (SDXL's ``text_encoder_2``, Flux's or SD3's transformer), a UNet that is not a
``UNet2DConditionModel``, a VAE whose latents do not fit the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cmkit.errors import CmkitError
from cmkit.files import read_json_object
from cmkit.sd.lcm import PREDICTIONS

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Layouts recognised and refused by name: a component only they have, and what it is.
UNSUPPORTED = {"text_encoder_2": "SDXL's second text encoder", "transformer": "a transformer denoiser (Flux, SD3, "
               "PixArt)", "prior": "a prior (Kandinsky, Wuerstchen)", "text_encoder_3": "SD3's third text encoder"}
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr")


@dataclass
class TextToImage:
    """A loaded teacher pipeline: frozen modules (eval mode, no gradients) on one device, and its schedule.

    ``alphas_cumprod`` float32 [T] (on the CPU); ``prediction`` epsilon or v_prediction; ``scaling_factor`` the
    VAE's (latents = scaling_factor * mean of q(z | x)); ``factor`` the VAE's downsampling; ``schedule`` the
    scheduler config's noise-schedule keys (what an exported LCMScheduler needs)."""

    folder: Path
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    alphas_cumprod: Tensor
    prediction: str
    scaling_factor: float
    factor: int
    schedule: dict[str, Any]

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """float32 [N, L, D]: the text encoder's last hidden states of ``texts`` padded to the tokenizer's
        model_max_length (as ``StableDiffusionPipeline.encode_prompt`` computes prompt_embeds)."""
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0].float()

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) float32 [N, C, h, w] of the VAE's q(z | x) for images float32 [N, 3, H, W] in [-1, 1],
        unscaled."""
        vae = self.vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images float32 [N, 3, H, W] in [-1, 1] (clamped) of scaled ``latents`` [N, C, h, w]."""
        vae = self.vae
        return vae.decode((latents / self.scaling_factor).to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)


def check_layout(folder: Path) -> dict[str, Any]:
    """The model_index.json of a supported pipeline folder; CmkitError naming the file otherwise."""
    index_file = folder / "model_index.json"
    if not folder.is_dir() or not index_file.is_file():
        raise CmkitError(f"--teacher {folder}: not a diffusers pipeline folder (no model_index.json); expected a "
                         f"local StableDiffusionPipeline folder with model_index.json and {', '.join(COMPONENTS)}")
    index = read_json_object(index_file, "a diffusers config file")
    kind = index.get("_class_name", "?")
    for name, what in UNSUPPORTED.items():
        if index.get(name) and index[name][0] is not None:
            raise CmkitError(f"{index_file}: a {kind} with {name} ({what}); cmkit distils the StableDiffusionPipeline "
                             "layout (SD 1.x/2.x: one CLIP text encoder and a UNet2DConditionModel) only")
    for name in COMPONENTS:
        if not index.get(name) or index[name][0] is None or not (folder / name).is_dir():
            raise CmkitError(f"{index_file}: a {kind} without {name}/; expected the StableDiffusionPipeline layout "
                             f"({', '.join(COMPONENTS)})")
    unet_kind = read_json_object(folder / "unet" / "config.json", "a diffusers config file").get("_class_name")
    if unet_kind != "UNet2DConditionModel":
        raise CmkitError(f"{folder / 'unet' / 'config.json'}: a {unet_kind}; expected a UNet2DConditionModel")
    return index


def _check_fit(folder: Path, unet: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]) -> None:
    """The VAE's latents are the UNet's input and output (config defaults: 4); the UNet is conditioned on text
    alone; the schedule's prediction is one cmkit reads."""
    unet_in, unet_out, latent = unet.get("in_channels", 4), unet.get("out_channels", 4), vae.get("latent_channels", 4)
    if not unet_in == unet_out == latent:
        raise CmkitError(f"{folder / 'vae' / 'config.json'}: a VAE of {latent} latent channels, but "
                         f"{folder / 'unet' / 'config.json'} takes {unet_in} and returns {unet_out}; expected a VAE "
                         "of the UNet's latent size")
    added = unet.get("addition_embed_type") or unet.get("class_embed_type")
    if added:
        raise CmkitError(f"{folder / 'unet' / 'config.json'}: a UNet with added conditioning ({added}); expected "
                         "SD 1.x/2.x's text-only UNet")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise CmkitError(f"{folder / 'scheduler' / 'scheduler_config.json'}: prediction_type={prediction}; expected "
                         f"one of {', '.join(PREDICTIONS)}")


def load_pipeline(folder: str | Path, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> TextToImage:
    """Load and check the pipeline folder (see the module docstring) onto ``device``: the UNet and the text encoder
    in ``dtype``, the VAE in float32 (it only fills the latent cache, once; in half precision it can overflow, as
    diffusers' LCM scripts note)."""
    from cmkit.nets.foreign import import_diffusers

    import_diffusers()
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    for library in (diffusers, transformers):  # their loading bars would bury cmkit's one-line messages
        library.utils.logging.disable_progress_bar()

    folder = Path(folder).resolve()
    check_layout(folder)
    scheduler_config = read_json_object(folder / "scheduler" / "scheduler_config.json", "a diffusers config file")
    unet_config, vae_config = (read_json_object(folder / part / "config.json", "a diffusers config file")
                               for part in ("unet", "vae"))
    _check_fit(folder, unet_config, vae_config, scheduler_config)
    schedule = {k: scheduler_config[k] for k in SCHEDULE_KEYS if k in scheduler_config}
    alphas = DDPMScheduler(**schedule).alphas_cumprod.float()
    kw = {"local_files_only": True, "use_safetensors": True, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw)
        vae = AutoencoderKL.from_pretrained(folder / "vae", **{**kw, "torch_dtype": torch.float32})
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                                     use_safetensors=True, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    except (OSError, ValueError) as e:
        raise CmkitError(f"--teacher {folder}: a component could not be loaded ({str(e).splitlines()[0]})") from None
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return TextToImage(folder=folder, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       alphas_cumprod=alphas, prediction=schedule.get("prediction_type", "epsilon"),
                       scaling_factor=float(vae.config.scaling_factor),
                       factor=2 ** (len(vae.config.block_out_channels) - 1), schedule=schedule)
