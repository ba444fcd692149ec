"""A trained SD-route run as a model: its teacher pipeline with the student UNet, and cmkit's own LCM sampler
(the reference the diffusers export must reproduce: tests/test_sd.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from cmkit.errors import CmkitError
from cmkit.sd import lcm
from cmkit.sd.config import SDConfig
from cmkit.sd.pipeline import TextToImage, load_pipeline

STUDENT_NAME = "student.safetensors"  # the trained weights: the full UNet, or the LoRA weights (peft names)
FORMAT = "cmkit-sd-1"


@dataclass
class SDModel:
    """A run's config, its teacher pipeline (VAE, text encoder, schedule) and the trained student UNet (eval mode,
    float32; a LoRA student keeps its adapters unmerged)."""

    config: SDConfig
    pipeline: TextToImage
    student: nn.Module

    @torch.no_grad()
    def sample(self, prompts: list[str], latents: Tensor, *, steps: int = 4, guidance_scale: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """LCM samples (scaled latents, float32 [N, C, h, w]) of ``prompts`` (N) from standard-normal ``latents``
        [N, C, h, w] in ``steps`` steps (:func:`cmkit.sd.lcm.lcm_sample`; ``generator`` draws the noise between
        steps). A full student is told ``guidance_scale`` (default ``method.w_default``); a LoRA student takes
        none (sampled, as LCM-LoRA, without classifier-free guidance)."""
        m, p = self.config.method, self.pipeline
        text = p.encode_text(prompts).to(latents.device)
        w_dim = None if self.config.lora else self.student.config.time_cond_proj_dim
        w = torch.full((len(prompts),), (guidance_scale or m.w_default) - 1.0, device=latents.device)
        w_emb = lcm.guidance_embedding(w, w_dim) if w_dim else None

        def predict(x: Tensor, t: Tensor) -> Tensor:
            return self.student(x, t, encoder_hidden_states=text, timestep_cond=w_emb).sample

        timesteps = lcm.lcm_timesteps(p.num_train_timesteps, m.ddim_steps, steps)
        return lcm.lcm_sample(predict, latents, timesteps, p.alphas_cumprod, p.prediction,
                              timestep_scaling=m.timestep_scaling, generator=generator)


def read_student(path: Path) -> tuple[SDConfig, dict[str, Tensor]]:
    """The config and weights of a ``student.safetensors``; CmkitError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise CmkitError(f"{path}: not a cmkit SD-route model ({e})") from None
    if metadata.get("format") != FORMAT:
        raise CmkitError(f"{path}: not a cmkit SD-route model (no {FORMAT} metadata)")
    return SDConfig.from_dict(json.loads(metadata["config"]), where=str(path)), tensors


def is_sd_run(path: str | Path) -> bool:
    """True for a run directory of the SD route (it holds ``student.safetensors``)."""
    return (Path(path) / STUDENT_NAME).is_file()


def load_sd_model(run: str | Path, *, device: torch.device | str = "cpu") -> SDModel:
    """The trained model of run directory ``run`` (its teacher pipeline folder must still be where it was)."""
    from cmkit.sd.train import build_student

    path = Path(run) / STUDENT_NAME
    if not path.is_file():
        raise CmkitError(f"{run}: not an SD-route run directory (no {STUDENT_NAME}); expected a run of "
                         "'cmkit train --preset sd-lcm' or 'sd-lcm-lora'")
    config, tensors = read_student(path)
    pipeline = load_pipeline(config.teacher, device=device)
    student = build_student(config, pipeline)
    result = student.load_state_dict(tensors, strict=not config.lora)
    if config.lora and result.unexpected_keys:
        raise CmkitError(f"{path}: LoRA weights that do not fit the teacher's UNet ({result.unexpected_keys[0]})")
    return SDModel(config, pipeline, student.to(device).eval().requires_grad_(False))
