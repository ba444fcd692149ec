"""cmkit: consistency models -- training (CT, iCT), distillation and tuning (CD, ECT), diffusion teachers (EDM),
one- and few-step sampling, zero-shot editing.

The public API:

- :class:`Config`, :func:`preset`, :func:`apply_overrides`, :func:`validate` -- run configuration and named
  presets (each method's own config in :mod:`cmkit.methods`);
- :func:`train` -- the training loop, writing a run directory;
- :func:`load_export`, :func:`build_model` -- models from ``model.safetensors`` (with their
  :class:`SamplingSpec`) or a config;
- :func:`consistency_sample`, :func:`heun_sample`, :func:`euler_sample`, :func:`default_sigmas`,
  :func:`generate` -- samplers with one signature ``(model, sigmas, noise, cond)``, returning the model's space;
- :class:`Cond`, :class:`ClassifierFree` -- the conditioning every model call takes, and classifier-free guidance;
- :func:`make_codec`, :class:`LatentCodec` -- the map between images and the model's space (``data.codec``): pixels, or
  the latent of an autoencoder ``cmkit train-ae`` trained (:mod:`cmkit.autoencoder`);
- :mod:`cmkit.methods` -- the method registry: one entry per method (config, loss, wrapper, sampling policy,
  teacher role, capabilities);
- :class:`ConsistencyFunction`, :class:`EDMDenoiser` -- the parameterisations;
- :func:`load_dataset` -- Fashion-MNIST, MNIST, CIFAR-10 and image folders;
- :mod:`cmkit.editing` -- zero-shot editing (CM paper, Alg. 4): inpaint, colorize, superres, stroke, denoise,
  interpolate.
"""

from cmkit.checkpoint import build_model, load_export
from cmkit.codec import LatentCodec, make_codec
from cmkit.cond import ClassifierFree, Cond
from cmkit.config import Config, apply_overrides, validate
from cmkit.data import load_dataset
from cmkit.errors import CmkitError
from cmkit.precond import ConsistencyFunction, EDMDenoiser
from cmkit.presets import preset
from cmkit.rng import SeededNoise
from cmkit.sampling import (
    SamplingSpec,
    consistency_sample,
    default_sigmas,
    euler_sample,
    generate,
    heun_sample,
)
from cmkit.train import train

__all__ = [
    "ClassifierFree", "CmkitError", "Cond", "Config", "ConsistencyFunction", "EDMDenoiser", "LatentCodec",
    "SamplingSpec", "SeededNoise", "apply_overrides", "build_model", "consistency_sample", "default_sigmas",
    "euler_sample", "generate", "heun_sample", "load_dataset", "load_export", "make_codec", "preset", "train",
    "validate",
]
__version__ = "0.2.0"
