"""``cmkit export RUN --diffusers DIR`` for SD-route runs: what the run trained, as a folder plain diffusers loads.

* LCM-LoRA (``sd-lcm-lora``): the adapter in diffusers' LoRA format (``pytorch_lora_weights.safetensors``, keys
  ``unet.<module>.lora_A/B.weight``, with its peft config as metadata), loaded into the teacher's pipeline (or any
  fine-tune of it) by ``pipe.load_lora_weights(DIR)``; beside it ``scheduler/`` holds the LCMScheduler to sample
  it with (the teacher's noise schedule, ``original_inference_steps`` = method.ddim_steps, ``timestep_scaling``).
* Full LCM (``sd-lcm``): a complete ``LatentConsistencyModelPipeline`` folder (the student UNet with its guidance
  input, the teacher's VAE, text encoder and tokenizer, that LCMScheduler), loaded by
  ``DiffusionPipeline.from_pretrained(DIR)``.

The folder is built as a temporary sibling and renamed into place: complete or absent.
"""

from __future__ import annotations

from pathlib import Path

from cmkit.files import new_folder
from cmkit.sd.model import SDModel


def lcm_scheduler(model: SDModel):
    """The LCMScheduler that samples ``model`` as :meth:`SDModel.sample` does (no clipping or thresholding)."""
    from diffusers import LCMScheduler

    m = model.config.method
    return LCMScheduler(**model.pipeline.schedule, original_inference_steps=m.ddim_steps,
                        timestep_scaling=m.timestep_scaling, clip_sample=False, thresholding=False)


def _write_lora(model: SDModel, folder: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model.student)  # peft's key names, which load_lora_weights reads as they are
    metadata = model.student.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    lcm_scheduler(model).save_pretrained(folder / "scheduler")


def _write_pipeline(model: SDModel, folder: Path) -> None:
    from diffusers import LatentConsistencyModelPipeline

    p = model.pipeline
    pipe = LatentConsistencyModelPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                                          unet=model.student, scheduler=lcm_scheduler(model), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def export_sd(model: SDModel, out_dir: str | Path) -> Path:
    """Write ``model`` (:func:`cmkit.sd.model.load_sd_model`) to ``out_dir`` (new or empty): the LoRA folder or
    the full pipeline, whichever the run trained. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    with new_folder(out_dir) as tmp:
        (_write_lora if model.config.lora else _write_pipeline)(model, tmp)
    return out_dir


def usage(model: SDModel, out: Path) -> list[str]:
    """How to load and sample the export with diffusers alone (printed by ``cmkit export``)."""
    if model.config.lora:
        return ["from diffusers import LCMScheduler, StableDiffusionPipeline",
                f"pipe = StableDiffusionPipeline.from_pretrained({str(model.pipeline.folder)!r})  # or a fine-tune",
                f"pipe.scheduler = LCMScheduler.from_pretrained({str(out)!r}, subfolder='scheduler')",
                f"pipe.load_lora_weights({str(out)!r})",
                "images = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).images"]
    return ["from diffusers import DiffusionPipeline",
            f"pipe = DiffusionPipeline.from_pretrained({str(out)!r})",
            f"images = pipe(prompt, num_inference_steps=4, guidance_scale={model.config.method.w_default:g}).images"]
