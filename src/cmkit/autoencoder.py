"""The KL-regularised convolutional autoencoder of latent models (``cmkit train-ae``), in latent diffusion's style.

Rombach et al. 2022 (LDM, arXiv 2112.10752, Sec. 3 and App. G): an encoder maps an image x to the mean and
log-variance of a diagonal Gaussian q(z | x); training decodes a draw z = mean + exp(logvar / 2) * eps and
minimises the reconstruction loss plus a small KL term towards N(0, I), ``||x - D(z)||_1 + kl_weight * KL``
(``ldm/modules/losses/contperceptual.py``: L1 summed over pixels, KL summed over latent values, both averaged over
the batch; ``kl_weight`` 1e-6 in its configs). No perceptual or adversarial term: LPIPS has no offline weights
here and the L1 autoencoder already reconstructs Fashion-MNIST close to the data (docs/latent.md gives its FID).

The latent is scaled so that its values have unit standard deviation over the training set (LDM's
``scale_factor`` = 1 / std of the latents, Sec. 4.3.2), the scale is computed from the training latents once
training ends and saved with the weights (the buffer ``scale``). A diffusion model then works on ``scale * mean``
(:class:`cmkit.codec.LatentCodec`).

The export (``autoencoder.safetensors``) holds the weights and the :class:`AEConfig` as JSON metadata; it never
executes code when loaded. Shapes: images float32 [N, C, H, W] in [-1, 1], latents float32 [N, z_channels, H / f,
W / f] with f = 2 ** (len(channel_mult) - 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from cmkit import data
from cmkit.errors import CmkitError
from cmkit.files import atomic_write
from cmkit.images import save_images, to_numpy_images
from cmkit.rng import derive_seed

EXPORT_NAME = "autoencoder.safetensors"
FORMAT = "cmkit-ae-1"
SCALE_IMAGES = 10_000  # training images whose latents set the scale (LDM: a batch; more is steadier)
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamps the log-variance to this range


@dataclass(frozen=True)
class AEConfig:
    """An autoencoder run: data, network and training loop (lengths in thousands of images, kimg).

    The encoder has ``len(channel_mult)`` levels of ``model_channels * mult`` channels, halving the resolution
    between levels, and ends in ``2 * z_channels`` maps (mean and log-variance); the decoder mirrors it,
    ``decoder_channels * mult`` channels wide (None: ``model_channels``; a narrower decoder decodes faster, and
    sampling a latent model decodes every image).
    """

    preset: str = "custom"
    source: str = "fashion-mnist"
    resolution: int = 28
    channels: int = 1
    z_channels: int = 4
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    decoder_channels: int | None = None
    kl_weight: float = 1e-6
    kimg: float = 120.0
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0
    log_kimg: float = 5.0

    @property
    def factor(self) -> int:
        """f, the downsampling factor from image to latent."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def decoder_width(self) -> int:
        """The decoder's ``model_channels``."""
        return self.model_channels if self.decoder_channels is None else self.decoder_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(z_channels, H / f, W / f)."""
        side = self.resolution // self.factor
        return (self.z_channels, side, side)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, where: str = "autoencoder config") -> AEConfig:
        """Inverse of :meth:`to_dict`, validated (CmkitError naming ``where`` and the field)."""
        from cmkit.config import _build  # the typed reader of every cmkit config

        config = _build(cls, values, where)
        problems = config.problems()
        if problems:
            raise CmkitError(f"{where}: {problems[0]}")
        return config

    def problems(self) -> list[str]:
        """What makes this config unusable, one message per problem."""
        checks = [
            (self.channels in (1, 3), f"channels: expected 1 or 3, got {self.channels}"),
            (min(self.z_channels, self.model_channels, self.batch, *self.channel_mult) > 0,
             "z_channels, model_channels, batch and channel_mult: expected positive integers"),
            (self.resolution > 0 and self.resolution % self.factor == 0,
             f"resolution {self.resolution}: expected a multiple of 2 ** (len(channel_mult) - 1) = {self.factor}"),
            (all(c * m % 8 == 0 and c > 0 for c in (self.model_channels, self.decoder_width)
                 for m in self.channel_mult),
             "model_channels and decoder_channels * channel_mult: expected positive multiples of 8 (GroupNorm groups "
             "of 8 channels)"),
            (self.kl_weight >= 0 and math.isfinite(self.kl_weight), f"kl_weight: expected >= 0, got {self.kl_weight}"),
            (self.kimg > 0 and self.lr > 0 and self.log_kimg > 0, "kimg, lr, log_kimg: expected positive numbers"),
        ]
        return [message for ok, message in checks if not ok]


# ----------------------------------------------------------------------------------------------- network

def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm in groups of 8 channels (:meth:`AEConfig.problems` checks that 8 divides every width)."""
    return nn.GroupNorm(channels // 8, channels, eps=1e-6)


class _ResBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 convolution when the width changes): LDM's ResnetBlock."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """Images [N, C, H, W] -> (mean, logvar), each [N, z_channels, H / f, W / f]; logvar clamped to
    :data:`LOGVAR_RANGE`."""

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        widths = [config.model_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            layers.append(_ResBlock(widths[max(i - 1, 0)], width))
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))  # halves the resolution
        layers += [_ResBlock(widths[-1], widths[-1]), _norm(widths[-1]), nn.SiLU(),
                   nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.body(self.conv_in(x)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)


class Decoder(nn.Module):
    """Latents [N, z_channels, h, w] -> images [N, C, h * f, w * f], not clamped."""

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        widths = [config.decoder_width * m for m in config.channel_mult][::-1]
        layers: list[nn.Module] = [nn.Conv2d(config.z_channels, widths[0], 3, padding=1),
                                   _ResBlock(widths[0], widths[0])]
        for i, width in enumerate(widths):
            layers.append(_ResBlock(widths[max(i - 1, 0)], width))
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        layers += [_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], config.channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)


class Autoencoder(nn.Module):
    """The encoder, the decoder and the latent ``scale`` (a buffer, 1 until :func:`latent_scale` sets it)."""

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: (reconstruction of the draw mean + exp(logvar / 2) * eps, mean, logvar); ``eps`` is
        standard normal of the latent's shape."""
        mean, logvar = self.encoder(x)
        return self.decoder(mean + (0.5 * logvar).exp() * eps), mean, logvar


def ae_loss(x: Tensor, recon: Tensor, mean: Tensor, logvar: Tensor, *, kl_weight: float) -> Tensor:
    """Per-sample loss [N]: ``sum |x - recon| + kl_weight * KL(N(mean, exp(logvar)) || N(0, I))``, divided by the
    image's value count D (LDM's weighting, per pixel). KL = 0.5 sum(mean^2 + exp(logvar) - 1 - logvar)."""
    rec = (x - recon).abs().flatten(1).sum(1)
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    return (rec + kl_weight * kl) / x[0].numel()


# ------------------------------------------------------------------------------------------------ training

def _batch_noise(config: AEConfig, step: int) -> Tensor:
    """eps [batch, *latent_shape] of step ``step``: a function of (seed, step) alone."""
    g = torch.Generator().manual_seed(derive_seed(config.seed, "ae-eps", step))
    return torch.randn((config.batch, *config.latent_shape), generator=g)


def train_autoencoder(config: AEConfig, out: Path, *, resume: bool = False, log=print) -> Path:
    """Train the autoencoder ``config`` describes into folder ``out``: Adam, a constant learning rate, batches drawn
    as :func:`cmkit.data.batch_indices`; a training state (weights, optimiser, step) in ``out/checkpoints`` at every
    log line (every ``log_kimg``, the newest two kept); then the latent scale, the export
    ``autoencoder.safetensors``, ``config.json``, ``metrics.jsonl`` and ``reconstructions.png`` (32 test images in
    8 rows: two rows of images, then their two rows of reconstructions, twice). Returns the export's path.

    ``resume`` continues from the newest training state (from the start when there is none), and ends bit-identical
    to an uninterrupted run: a step's batch and noise are functions of (seed, step) alone. Refused (CmkitError,
    nothing written): a folder with a finished autoencoder; without ``resume``, one holding a run; with it, a
    state of another config."""
    from cmkit.rundir import prepare_run_dir  # the run directory of cmkit train (it imports the codec, hence this)

    problems = config.problems()
    if problems:
        raise CmkitError(problems[0])
    dataset = data.load_dataset(config.source, resolution=config.resolution, channels=config.channels)
    path = out / EXPORT_NAME
    if path.exists():
        raise CmkitError(f"{out} already holds an autoencoder ({EXPORT_NAME}); choose another --out")
    torch.manual_seed(config.seed)
    model = Autoencoder(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    resume_from = prepare_run_dir(config, out, resume=resume)
    first = _load_training_state(resume_from, config, model, optimizer) if resume_from else 0
    seconds = _train_steps(config, model, optimizer, dataset, out, first=first)
    model.eval().requires_grad_(False)
    model.scale.fill_(latent_scale(model, data.to_model_range(dataset.images[:SCALE_IMAGES])))
    save_autoencoder(model, path)
    x = data.to_model_range(_grid_images(config, dataset))
    recon = model.decoder(model.encoder(x)[0]).clamp(-1, 1)
    save_images(to_numpy_images(torch.cat([x[:16], recon[:16], x[16:], recon[16:]])), out / "reconstructions.png")
    images = (_total_steps(config) - first) * config.batch
    log(f"trained {images:,} images in {seconds / 60:.1f} min ({images / max(seconds, 1e-9):.0f} images/s)"
        f"{f', resumed at step {first:,}' if first else ''}; latent {'x'.join(map(str, config.latent_shape))}, "
        f"scale {model.scale.item():.4g}")
    return path


def _total_steps(config: AEConfig) -> int:
    return math.ceil(config.kimg * 1000 / config.batch)


def _train_steps(config: AEConfig, model: Autoencoder, optimizer: torch.optim.Optimizer, dataset: data.ImageData,
                 out: Path, *, first: int) -> float:
    """Steps ``first`` .. the last, a metrics line and a training state every ``log_kimg``; returns the seconds."""
    from cmkit.checkpoint import save_state  # imports the codec, which imports this module
    from cmkit.rundir import MetricsLog

    total, every = _total_steps(config), max(1, round(config.log_kimg * 1000 / config.batch))
    metrics = MetricsLog(out, resume_step=first)
    losses, start, tick = [], time.perf_counter(), time.perf_counter()
    with tqdm(total=total, initial=first, unit="step", mininterval=1.0) as bar:
        for step in range(first, total):
            idx = data.batch_indices(len(dataset.images), config.batch, seed=config.seed, start=step * config.batch)
            x = data.to_model_range(dataset.images[idx])
            loss = ae_loss(x, *model(x, _batch_noise(config, step)), kl_weight=config.kl_weight).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            if (step + 1) % every == 0 or step + 1 == total:
                rate = len(losses) * config.batch / (time.perf_counter() - tick)
                record = {"step": step + 1, "kimg": (step + 1) * config.batch / 1000, "loss": float(np.mean(losses)),
                          "images_per_s": rate}
                save_state({"step": step + 1, "config": config.to_dict(), "model": model.state_dict(),
                            "optimizer": optimizer.state_dict()}, out, images_seen=(step + 1) * config.batch, keep=2)
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{rate:.0f}")
                losses, tick = [], time.perf_counter()
    return time.perf_counter() - start


def _load_training_state(path: Path, config: AEConfig, model: Autoencoder, optimizer: torch.optim.Optimizer) -> int:
    """Load the training state at ``path`` into ``model`` and ``optimizer``; returns its step. CmkitError when it
    was written by a run of another config."""
    from cmkit.checkpoint import load_state  # imports the codec, which imports this module
    from cmkit.train import config_diff

    state = load_state(path)
    if state.get("config") != config.to_dict():
        raise CmkitError(f"--resume: {path} was trained with a different config "
                         f"({config_diff(state.get('config') or {}, config.to_dict())}); resume with the same "
                         "options or choose another --out")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def _grid_images(config: AEConfig, train: data.ImageData) -> Tensor:
    """32 images for the reconstructions grid: the first of the test split, or of the training set without one."""
    try:
        return data.load_dataset(config.source, resolution=config.resolution, channels=config.channels,
                                 split="test").images[:32]
    except CmkitError:
        return train.images[:32]


@torch.no_grad()
def latent_scale(model: Autoencoder, images: Tensor, *, batch: int = 500) -> float:
    """LDM's scale factor: 1 / std of the latent means of ``images`` (float32 [N, C, H, W] in [-1, 1]), the std
    taken over every value of every latent."""
    means = torch.cat([model.encoder(images[i:i + batch])[0] for i in range(0, len(images), batch)])
    return 1.0 / means.double().std().item()


# -------------------------------------------------------------------------------------------------- files

def save_autoencoder(model: Autoencoder, path: Path) -> None:
    """Write ``model``'s weights (its scale included) and config to a safetensors file, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={"format": FORMAT, "config": json.dumps(model.config.to_dict())})
    with atomic_write(path) as tmp:
        tmp.write_bytes(blob)


def resolve_autoencoder_path(path: str | Path, *, what: str) -> Path:
    """A ``cmkit train-ae`` run directory means its ``autoencoder.safetensors``; anything else must be that file.
    Absolute. ``what`` names the option in the message (e.g. ``data.codec=...``)."""
    path = Path(path).resolve()
    if path.is_dir():
        path = path / EXPORT_NAME
    if not path.is_file():
        raise CmkitError(f"{what}: no autoencoder at {path}; expected identity, a run directory of "
                         f"'cmkit train-ae' or its {EXPORT_NAME}")
    return path


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_autoencoder(path: Path, *, what: str) -> Autoencoder:
    """The autoencoder saved at ``path`` (an ``autoencoder.safetensors``), in eval mode without gradients;
    CmkitError naming ``what`` when the file is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CmkitError(f"{what}: {path} is not a cmkit autoencoder ({e})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CmkitError(f"{what}: {path} is not a cmkit autoencoder (a model of 'cmkit train'?); expected "
                         f"the {EXPORT_NAME} of 'cmkit train-ae'")
    model = Autoencoder(AEConfig.from_dict(json.loads(metadata["config"]), where=str(path)))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CmkitError(f"{what}: {path}: weights do not match the config in its metadata: {e}") from None
    return model.eval().requires_grad_(False)
