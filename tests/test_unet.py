"""Tests for the DDPM++ U-Net backbone (tiny configurations, CPU)."""

from __future__ import annotations

import pytest
import torch

from cmkit.nets import UNet

TINY = {
    "resolution": 8,
    "in_channels": 3,
    "out_channels": 2,
    "model_channels": 16,
    "channel_mult": (1, 2),
    "num_blocks": 1,
    "attn_resolutions": (4,),
    "dropout": 0.0,
}


def _tiny(**overrides: object) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **overrides})


def _inputs(model: UNet, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, model.in_channels, model.resolution, model.resolution, generator=gen)
    return x, torch.randn(n, generator=gen)


def _bump_last_convs(model: UNet) -> None:
    """Replace the near-zero initialisation so that every path affects the output noticeably."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("conv1.weight", "proj.weight", "conv.weight")):  # conv: out_conv and the heads
                p.normal_(0.0, 0.05)


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
def test_output_shape_and_dtype(embedding: str) -> None:
    model = _tiny(embedding=embedding)
    x, sigma = _inputs(model)
    out = model(x, sigma)
    assert out.shape == (3, 2, 8, 8)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_fourier_frequencies_are_a_saved_buffer() -> None:
    model = _tiny(embedding="fourier", fourier_scale=16.0)
    assert "map_noise.freqs" in model.state_dict()
    assert all("freqs" not in name for name, _ in model.named_parameters())


def test_class_conditional_shape() -> None:
    model = _tiny(num_classes=5)
    x, sigma = _inputs(model)
    out = model(x, sigma, torch.tensor([0, 4, 2]))
    assert out.shape == (3, 2, 8, 8)


def test_odd_lowest_resolution() -> None:
    model = _tiny(resolution=28, in_channels=1, out_channels=1, channel_mult=(1, 1, 1), attn_resolutions=(7,))
    x, sigma = _inputs(model, n=2)
    assert model(x, sigma).shape == (2, 1, 28, 28)


def test_autocast_bfloat16_keeps_input_dtype() -> None:
    model = _tiny(num_classes=3)
    x, sigma = _inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, sigma, torch.tensor([0, 1, 2]))
    assert out.dtype == torch.float32
    assert out.shape == (3, 2, 8, 8)
    assert torch.isfinite(out).all()


def test_missing_class_labels_raises() -> None:
    model = _tiny(num_classes=5)
    x, sigma = _inputs(model)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, sigma)


def test_class_labels_for_unconditional_model_raise() -> None:
    model = _tiny()
    x, sigma = _inputs(model)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, sigma, torch.tensor([0, 1, 2]))


def test_unknown_embedding_raises() -> None:
    with pytest.raises(ValueError, match="'sinusoid'.*positional.*fourier"):
        _tiny(embedding="sinusoid")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"resolution": 10, "channel_mult": (1, 1, 1)}, "divisible"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"model_channels": 18}, "GroupNorm"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_blocks": 0}, "num_blocks"),
    ],
)
def test_bad_config_raises(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _tiny(**overrides)


def test_dropout_randomness_is_seeded() -> None:
    model = _tiny(dropout=0.5)
    _bump_last_convs(model)
    x, sigma = _inputs(model)
    model.train()
    assert not torch.equal(model(x, sigma), model(x, sigma))
    outs = []
    for _ in range(2):
        with torch.random.fork_rng():
            torch.manual_seed(123)
            outs.append(model(x, sigma))
    assert torch.equal(outs[0], outs[1])
    model.eval()
    assert torch.equal(model(x, sigma), model(x, sigma))


def test_output_depends_on_noise_and_class_labels() -> None:
    model = _tiny(num_classes=4).eval()
    _bump_last_convs(model)
    x, sigma = _inputs(model)
    labels = torch.tensor([0, 1, 2])
    base = model(x, sigma, labels)
    assert not torch.allclose(base, model(x, sigma + 0.5, labels))
    assert not torch.allclose(base, model(x, sigma, torch.tensor([3, 3, 3])))


@pytest.mark.parametrize(("embedding", "adaptive_scale"), [("positional", False), ("fourier", True)])
def test_every_parameter_gets_a_gradient(embedding: str, adaptive_scale: bool) -> None:
    model = _tiny(num_classes=3, dropout=0.1, embedding=embedding, adaptive_scale=adaptive_scale)
    x, sigma = _inputs(model)
    model(x, sigma, torch.tensor([0, 1, 2])).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_cifar_config_parameter_count() -> None:
    with torch.device("meta"):
        model = UNet(
            resolution=32,
            in_channels=3,
            out_channels=3,
            model_channels=128,
            channel_mult=(2, 2, 2),
            num_blocks=4,
            attn_resolutions=(16,),
            dropout=0.13,
        )
    count = sum(p.numel() for p in model.parameters())
    assert 52_000_000 <= count <= 60_000_000, count


def test_cpu_config_parameter_count() -> None:
    with torch.device("meta"):
        model = UNet(
            resolution=28,
            in_channels=1,
            out_channels=1,
            model_channels=32,
            channel_mult=(1, 2, 2),
            num_blocks=2,
            attn_resolutions=(7,),
        )
    count = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= count <= 2_000_000, count


@pytest.mark.parametrize(("attn_heads", "heads"), [(1, {1}), (4, {4}), (0, {1, 2})])
def test_attention_heads(attn_heads: int, heads: set[int]) -> None:
    """One head by default (EDM's SongUNet), attn_heads heads, or (0) cmkit's former 64-channel heads."""
    model = _tiny(model_channels=64, attn_resolutions=(8, 4), attn_heads=attn_heads)
    assert {m.heads for m in model.modules() if hasattr(m, "heads")} == heads
    x, sigma = _inputs(model, n=2)
    assert model(x, sigma).shape == (2, 2, 8, 8)


def test_attention_heads_must_divide_the_channels() -> None:
    with pytest.raises(ValueError, match="attn_heads=3"):
        _tiny(attn_heads=3)
