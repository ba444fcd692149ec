"""The Stable Diffusion route: distil a local diffusers text-to-image pipeline (the ``StableDiffusionPipeline``
layout, SD 1.x/2.x) into an LCM student (Luo et al. 2023, arXiv 2310.04378) or an LCM-LoRA adapter (Luo et al. 2023,
arXiv 2311.05556), and write the result back as a diffusers folder.

An adapter at the edge (docs/sd.md): the pipeline's own UNet, VAE, text encoder and discrete noise schedule are used
as they are, in the pipeline's terms (integer timesteps, epsilon or v prediction, LCMScheduler's boundary
scalings), so what is trained loads into plain diffusers. Modules: :mod:`.config` (the run's frozen config and the
``sd-lcm`` / ``sd-lcm-lora`` presets), :mod:`.pipeline` (loading and checking the teacher folder), :mod:`.captions`
(captioned image folders and their latent cache), :mod:`.lcm` (the LCM formulas on a discrete schedule, torch
only), :mod:`.train` (the training loop) and :mod:`.export` (the diffusers folders). Everything but :mod:`.config`
and :mod:`.lcm` imports diffusers, transformers or peft (``pip install "cmkit[sd]"``), only when called.

A trained run as a model: ``load_sd_model(RUN).sample(prompts, latents, steps=4)`` (:mod:`.model`).
"""

from cmkit.sd.model import SDModel, load_sd_model

__all__ = ["SDModel", "load_sd_model"]
