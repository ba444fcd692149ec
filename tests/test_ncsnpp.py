"""The NCSN++ options of the U-Net (EDM's SongUNet): FIR resampling, input/output paths, noise width, augmentation
labels, and their NetConfig fields. Forward-mode JVPs through them: tests/test_scm.py (OPTIONS "ncsnpp" and
"skip-paths")."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import Tensor

from cmkit.checkpoint import build_model
from cmkit.cond import Cond
from cmkit.config import Config, NetConfig, validate
from cmkit.errors import CmkitError
from cmkit.nets import UNet
from cmkit.nets.layers import Resample
from cmkit.presets import _CIFAR_DATA, _CIFAR_NCSNPP

TINY = {"resolution": 8, "in_channels": 3, "out_channels": 2, "model_channels": 16, "channel_mult": (1, 2),
        "num_blocks": 1, "attn_resolutions": (4,), "dropout": 0.0, "resample_filter": (1, 3, 3, 1)}


def _tiny(**overrides: object) -> UNet:
    torch.manual_seed(0)
    net = UNet(**{**TINY, **overrides})
    with torch.no_grad():  # redraw the near-zero layers so that every path shows in the output
        for name, p in net.named_parameters():
            if name.endswith(("conv1.weight", "proj.weight", "conv.weight")):
                p.normal_(0.0, 0.05)
    return net


# ------------------------------------------------------------------------------------------- FIR resampling

def _kernel(taps: tuple[int, ...]) -> Tensor:
    f = torch.tensor(taps, dtype=torch.float64)
    return torch.outer(f, f) / f.sum() ** 2


def _down_by_hand(x: Tensor, taps: tuple[int, ...]) -> Tensor:
    """out[i, j] = sum_ab k[a, b] x[2i + a - p, 2j + b - p] (zero outside), p = (K - 1) // 2, per channel."""
    k, size, p = _kernel(taps), len(taps), (len(taps) - 1) // 2
    n, c, h, w = x.shape
    out = torch.zeros(n, c, h // 2, w // 2, dtype=torch.float64)
    for i in range(h // 2):
        for j in range(w // 2):
            for a in range(size):
                for b in range(size):
                    r, s = 2 * i + a - p, 2 * j + b - p
                    if 0 <= r < h and 0 <= s < w:
                        out[:, :, i, j] += k[a, b] * x[:, :, r, s]
    return out


def _up_by_hand(x: Tensor, taps: tuple[int, ...]) -> Tensor:
    """Each input pixel spreads 4 k[a, b] x[i, j] to out[2i + a - p, 2j + b - p] (the adjoint of the stride-2
    filtering, times 4 so that a constant image stays constant), per channel."""
    k, size, p = 4 * _kernel(taps), len(taps), (len(taps) - 1) // 2
    n, c, h, w = x.shape
    out = torch.zeros(n, c, 2 * h, 2 * w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for a in range(size):
                for b in range(size):
                    r, s = 2 * i + a - p, 2 * j + b - p
                    if 0 <= r < 2 * h and 0 <= s < 2 * w:
                        out[:, :, r, s] += k[a, b] * x[:, :, i, j]
    return out


@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 1)])
def test_fir_resampling_matches_the_explicit_convolution(taps):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    down, up = Resample("down", taps).double(), Resample("up", taps).double()
    torch.testing.assert_close(down(x), _down_by_hand(x, taps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(up(x), _up_by_hand(x, taps), rtol=1e-12, atol=1e-12)
    ones = torch.ones(1, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(Resample("up", taps).double()(ones)[..., 1:-1, 1:-1], torch.ones(1, 1, 10, 10,
                                                                                               dtype=torch.float64))


def test_resampling_keeps_odd_sizes_in_step():
    """28 -> 14 -> 7 and back (Fashion-MNIST's levels) with the 4-tap filter."""
    x = torch.randn(1, 2, 14, 14)
    assert Resample("down", (1, 3, 3, 1))(x).shape[-1] == 7
    assert Resample("up", (1, 3, 3, 1))(x[..., :7, :7]).shape[-1] == 14


@pytest.mark.parametrize("taps", [(1, 3, 1), (), (0, 0), (1, -1)])
def test_bad_resample_filter_raises(taps):
    with pytest.raises(ValueError, match="resample_filter"):
        UNet(**{**TINY, "resample_filter": taps})


# ------------------------------------------------------------------------------------- parameter counts

def _count(**options: object) -> int:
    with torch.device("meta"):
        net = UNet(resolution=32, in_channels=3, out_channels=3, **options)
    return sum(p.numel() for p in net.parameters())


def test_cifar10_parameter_counts():
    """DDPM++ and NCSN++ at EDM's CIFAR-10 size (EDM's train.py: 128 channels, mult 2,2,2, 4 blocks, attention at
    16), with augmentation labels of width 9 as EDM trains them.

    DDPM++: 55.73M, EDM (Karras et al. 2022) Table 7, "Model capacity (Mparams)", VP configs B-F (EDM's own
    network; configuration A, the original DDPM++ with a 4x4 level, is larger). NCSN++ (EDM's --arch=ncsnpp,
    _CIFAR_NCSNPP) differs from it only in a noise embedding twice as wide (256 features into map_layer0 and out of
    map_augment) and the residual input path (3x3 convolutions 3 -> 256 into 16x16 and 256 -> 256 into 8x8, with
    biases): 56.40M."""
    ddpmpp = _count(augment_dim=9)
    with torch.device("meta"):
        net = build_model(Config(net=dataclasses.replace(_CIFAR_NCSNPP, augment_dim=9), data=_CIFAR_DATA)).net
    ncsnpp = sum(p.numel() for p in net.parameters())
    assert round(ddpmpp / 1e6, 2) == 55.73
    assert ncsnpp - ddpmpp == 128 * 512 + 9 * 128 + (3 * 256 * 9 + 256) + (256 * 256 * 9 + 256)
    assert round(ncsnpp / 1e6, 2) == 56.40
    assert _count() == ddpmpp - 9 * 128 == 55_732_739  # cmkit's CIFAR-10 presets: no augmentation labels


# ---------------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("decoder_type", ["standard", "skip"])
@pytest.mark.parametrize("encoder_type", ["standard", "skip", "residual"])
def test_shapes_dtypes_and_gradients_of_every_path(encoder_type, decoder_type):
    net = _tiny(encoder_type=encoder_type, decoder_type=decoder_type, channel_mult_noise=2, augment_dim=4)
    gen = torch.Generator().manual_seed(1)
    x, sigma, aug = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, generator=gen), torch.randn(3, 4)
    out = net(x, sigma, augment_labels=aug)
    assert out.shape == (3, 2, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    assert not [name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x, sigma).dtype == torch.float32
    assert len(net.enc_aux) == (encoder_type != "standard") and len(net.dec_heads) == (decoder_type == "skip")


def test_absent_augment_labels_are_zeros():
    net = _tiny(augment_dim=9).eval()
    gen = torch.Generator().manual_seed(3)
    x, sigma, aug = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, generator=gen), torch.randn(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), net(x, sigma, augment_labels=torch.zeros(2, 9)), rtol=0, atol=0)
        assert not torch.allclose(net(x, sigma, augment_labels=aug), net(x, sigma))
    assert "map_augment.weight" in net.state_dict() and "map_augment.bias" not in net.state_dict()


@pytest.mark.parametrize(("augment_dim", "shape"), [(9, (2, 8)), (0, (2, 9))])
def test_bad_augment_labels_raise(augment_dim, shape):
    net = _tiny(augment_dim=augment_dim)
    with pytest.raises(ValueError, match="augment_labels"):
        net(torch.randn(2, 3, 8, 8), torch.randn(2), augment_labels=torch.zeros(shape))


def test_preconditioning_passes_augment_labels():
    config = Config(net=NetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(14,),
                                  augment_dim=9))
    model = build_model(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # away from the near-zero initialisation, so the labels show
            param.add_(0.1 * torch.randn_like(param))
        x, aug = torch.randn(2, 1, 28, 28), torch.randn(2, 9)
        torch.testing.assert_close(model(x, 1.0), model(x, 1.0, Cond(augment=torch.zeros(2, 9))), rtol=0, atol=0)
        assert not torch.allclose(model(x, 1.0, Cond(augment=aug)), model(x, 1.0))


# -------------------------------------------------------------------------------------------- NetConfig

NCSNPP_FIELDS = {"encoder_type": "residual", "decoder_type": "skip", "resample_filter": (1, 3, 3, 1),
                 "channel_mult_noise": 2, "attn_heads": 2, "augment_dim": 9}


def test_netconfig_json_round_trip_of_the_family_fields():
    config = Config(net=NetConfig(**NCSNPP_FIELDS))
    text = json.dumps(config.to_dict())
    back = Config.from_dict(json.loads(text))
    assert back == config and back.net.resample_filter == (1, 3, 3, 1)
    assert build_model(back).net.augment_dim == 9


def test_configs_written_before_attn_heads_keep_their_heads():
    data = Config().to_dict()
    del data["net"]["attn_heads"]
    assert Config.from_dict(data).net.attn_heads == 0  # 64-channel heads, the rule those networks were built with
    assert Config().net.attn_heads == 1


@pytest.mark.parametrize(("field", "value"), [("encoder_type", "progressive"), ("decoder_type", "residual"),
                                              ("resample_filter", (1, 3, 1)), ("channel_mult_noise", 0),
                                              ("attn_heads", -1), ("augment_dim", -1)])
def test_bad_family_values_name_the_field(field, value):
    config = Config(net=NetConfig(**{field: value}))
    with pytest.raises(CmkitError, match=f"net.{field}"):
        validate(config)
    with pytest.raises(CmkitError, match=f"net.{field}"):
        Config.from_dict(json.loads(json.dumps(config.to_dict())))


def test_attention_heads_that_do_not_divide_fail_at_build_time():
    with pytest.raises(CmkitError, match="attn_heads=3"):
        build_model(Config(net=NetConfig(attn_heads=3)))
