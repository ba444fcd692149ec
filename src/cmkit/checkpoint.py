"""Models from configs, the resumable training state and the safetensors inference export.

- Training state (``checkpoints/state-<images>.pt``): state_dicts and plain values only, written
  atomically, loaded with ``weights_only=True`` so a file can never execute code.
- Export (``model.safetensors``): the EMA weights of the wrapped network, with the resolved config and the
  model's :class:`cmkit.sampling.SamplingSpec` as JSON in the metadata (``config``, ``sampling``); enough to
  rebuild and sample the model anywhere. Exports written before the spec existed kept tuned schedules as
  ``tuned_sigmas``: they load with their method's spec and those schedules.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from cmkit.codec import data_codec
from cmkit.config import Config
from cmkit.errors import CmkitError
from cmkit.files import atomic_write
from cmkit.methods import method_entry, sampling_spec
from cmkit.nets import UNet
from cmkit.precond import Preconditioned
from cmkit.sampling import SamplingSpec, parse_tuned

EXPORT_NAME = "model.safetensors"
BEST_NAME = "model-best.safetensors"  # the EMA export of the best evaluation (cmkit.monitor)
FORMAT = "cmkit-1"
_STATE = re.compile(r"state-(\d+)\.pt")
_PARTIAL = re.compile(r"\.(state-\d+|model|model-best)\.\w+\.(pt|safetensors)")  # atomic_path's temporaries


def build_model(config: Config) -> Preconditioned:
    """The wrapped network a config describes: the method's wrapper (:attr:`cmkit.methods.MethodEntry.wrapper`)
    around the U-Net of ``config.net``, naming the method (``method_name``) so callers can ask its entry. Its
    input and output have the shape of the model space (:attr:`cmkit.codec.Codec.shape` of ``data.codec``: a
    latent model's network is sized by its autoencoder's latent, which is loaded and checked)."""
    n, m = config.net, config.method
    entry = method_entry(m.name)
    channels, resolution, _ = data_codec(config.data).shape
    try:
        net = UNet(resolution=resolution, in_channels=channels, out_channels=channels,
                   model_channels=n.model_channels, channel_mult=n.channel_mult, num_blocks=n.num_blocks,
                   attn_resolutions=n.attn_resolutions, dropout=n.dropout, embedding=n.embedding,
                   fourier_scale=n.fourier_scale, num_classes=n.num_classes, double_norm=n.double_norm,
                   logvar_head=entry.logvar_head, guidance_dim=n.guidance_dim,
                   time2_embedding=entry.time2_embedding, **n.family_options())
    except ValueError as e:
        raise CmkitError(f"net: {e}") from None
    model = entry.wrapper(net, resolution=resolution, channels=channels, num_classes=n.num_classes,
                          sigma_min=m.sigma_min, sigma_max=m.sigma_max, sigma_data=m.sigma_data,
                          **m.wrapper_options())
    model.method_name = m.name
    return model


# -------------------------------------------------------------------------------------- inference export

class Export(NamedTuple):
    """A loaded export: the model (eval mode, no gradients), its config and how it samples by default."""

    model: Preconditioned
    config: Config
    spec: SamplingSpec


def save_export(model: nn.Module, config: Config, path: Path, *, spec: SamplingSpec | None = None) -> None:
    """Write ``model``'s weights, ``config`` and its sampling ``spec`` (None: its method's untuned spec,
    :func:`cmkit.methods.sampling_spec`) to a safetensors file, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    spec = sampling_spec(config.method) if spec is None else spec
    metadata = {"format": FORMAT, "config": json.dumps(config.to_dict()), "sampling": spec.to_json()}
    blob = save(tensors, metadata=metadata)
    with atomic_write(path) as tmp:
        tmp.write_bytes(blob)


def resolve_model_path(path: str | Path) -> Path:
    """A run directory means its ``model.safetensors``; anything else must be that file itself."""
    path = Path(path)
    if path.is_dir():
        if not (path / EXPORT_NAME).is_file():
            raise CmkitError(f"{path}: not a cmkit run directory (no {EXPORT_NAME}); expected a run "
                             "directory written by 'cmkit train' or a .safetensors export")
        return path / EXPORT_NAME
    if not path.is_file():
        raise CmkitError(f"{path}: no such file or directory; expected a run directory or a .safetensors export")
    return path


def _read_export(path: Path, *, weights: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata of a cmkit export, and its tensors when ``weights``; CmkitError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if weights else {}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CmkitError(f"{path}: not a cmkit model ({e}); expected a .safetensors export") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CmkitError(f"{path}: safetensors file without cmkit metadata; expected an export of 'cmkit train'")
    return metadata, tensors


def _config_and_spec(metadata: dict[str, str], path: Path) -> tuple[Config, SamplingSpec]:
    """The config and sampling spec of an export's metadata; an export without a spec (written before it
    existed) gets its method's spec with the schedules it stored as ``tuned_sigmas``."""
    config = Config.from_dict(json.loads(metadata["config"]), where=str(path))
    if "sampling" in metadata:
        return config, SamplingSpec.from_json(metadata["sampling"], where=str(path))
    try:
        tuned = parse_tuned(json.loads(metadata.get("tuned_sigmas", "{}")))
    except (ValueError, TypeError, AttributeError):
        raise CmkitError(f"{path}: metadata 'tuned_sigmas' is not a JSON object of sigma lists") from None
    spec = sampling_spec(config.method)
    for steps, sigmas in tuned.items():
        spec = spec.with_tuned(steps, sigmas)
    return config, spec


def export_config(path: str | Path) -> Config:
    """The config stored in an export (or a run directory's export), without loading the weights."""
    path = resolve_model_path(path)
    metadata, _ = _read_export(path, weights=False)
    return Config.from_dict(json.loads(metadata["config"]), where=str(path))


def export_spec(path: str | Path) -> SamplingSpec:
    """The sampling spec stored in an export (with the schedules ``cmkit tune-steps`` found), without loading
    the weights."""
    path = resolve_model_path(path)
    metadata, _ = _read_export(path, weights=False)
    return _config_and_spec(metadata, path)[1]


def load_export(path: str | Path, *, device: torch.device | str = "cpu") -> Export:
    """Load an export (or a run directory's export) in eval mode: (model, config, sampling spec)."""
    path = resolve_model_path(path)
    metadata, tensors = _read_export(path, weights=True)
    config, spec = _config_and_spec(metadata, path)
    model = build_model(config)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CmkitError(f"{path}: weights do not match the config in its metadata: {e}") from None
    return Export(model.to(device).eval().requires_grad_(False), config, spec)


# ----------------------------------------------------------------------------------------- training state

def save_state(state: dict[str, Any], run_dir: Path, *, images_seen: int, keep: int) -> Path:
    """Write a training state atomically as ``checkpoints/state-<images_seen>.pt``; keep the newest ``keep``.

    Warns first when the disk has less than twice the state's size free. A failed write (a full disk) leaves
    no partial file and the earlier checkpoints untouched, and raises CmkitError (:func:`atomic_write`).
    """
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"state-{images_seen:010d}.pt"
    warn_if_low_disk(folder, _nbytes(state))
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    for old in list_states(run_dir)[:-keep]:
        old.unlink()
    return path


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested structure of dicts, lists and tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


def warn_if_low_disk(folder: Path, nbytes: int) -> None:
    """Warn when ``folder``'s disk has less than twice ``nbytes`` free (a file of that size is about to land)."""
    free = shutil.disk_usage(folder).free
    if free < 2 * nbytes:
        warnings.warn(f"low disk space: {free / 2**20:.0f} MiB free in {folder}, and a checkpoint needs about "
                      f"{nbytes / 2**20:.0f} MiB; free some space or lower train.keep_ckpts", stacklevel=2)


def list_states(run_dir: Path) -> list[Path]:
    """The run's training states, oldest first."""
    folder = run_dir / "checkpoints"
    found = [p for p in folder.glob("state-*.pt") if _STATE.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_STATE.fullmatch(p.name).group(1)))


def remove_partial_writes(run_dir: Path) -> None:
    """Delete the temporary files of checkpoint and export writes that a killed process left in ``run_dir``."""
    found = [p for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir()
             for p in folder.glob(".*") if _PARTIAL.fullmatch(p.name)]
    for path in found:
        path.unlink()


def load_state(path: Path) -> dict[str, Any]:
    """Load a training state without executing code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure means the file is unusable; say which and why
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CmkitError(f"{path}: not a loadable cmkit training state ({reason})") from None
