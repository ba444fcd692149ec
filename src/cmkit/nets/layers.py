"""Layers and blocks of cmkit's U-Net (:mod:`.unet`), after EDM's ``training/networks.py`` (Karras et al. 2022).

* Convolutions and linear layers with the DDPM++ / EDM initialisation, and a convolution with a lean forward-mode
  rule inside :func:`forward_mode`;
* 2x resampling with a separable FIR filter (EDM's ``Conv2d`` with ``resample_filter``): ``(1, 1)`` is DDPM++'s
  box filter, ``(1, 3, 3, 1)`` NCSN++'s (Song et al. 2021, after StyleGAN2's upfirdn2d);
* noise embeddings: sinusoidal positional (Vaswani et al. 2017, EDM's ``endpoint=True`` variant) or random Fourier
  features (Tancik et al. 2020);
* residual blocks with GroupNorm, adaptive scale/shift from the embedding (optionally with sCM's adaptive double
  normalisation), dropout, a near-zero-initialised last convolution and ``(h + skip) / sqrt(2)`` merging;
* self-attention with a configurable head count;
* NCSN++'s progressive input paths (``encoder_type`` ``"skip"`` and ``"residual"``) and output heads.

Every layer supports forward-mode differentiation (``torch.func.jvp``, ``torch.autograd.forward_ad``);
differentiate inside :func:`forward_mode`: fused attention kernels on GPUs have no forward-mode rule, and
PyTorch's forward-mode rule for a convolution spends an extra convolution on the weights' (zero) tangent.

This file ships verbatim inside diffusers exports (with ``unet.py`` and ``cmkit_unet2d.py``): it imports torch only.
The written code is original; only the published architecture is followed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["LEGACY_HEADS", "SMALL_INIT", "AttentionBlock", "BlockOptions", "EncoderResidual", "EncoderSkip",
           "FourierEmbedding", "OutputHead", "PositionalEmbedding", "ResBlock", "Resample", "Stage", "check_taps",
           "fir_kernel", "forward_mode", "make_conv", "make_linear", "make_norm"]

_SKIP_SCALE = 1.0 / math.sqrt(2.0)
SMALL_INIT = 1e-5  # DDPM++ / EDM scale for "near zero" initialised layers
LEGACY_HEADS = 0  # the attention head count that means cmkit's rule before attn_heads (see AttentionBlock)


# ----------------------------------------------------------------------------- helpers


def _groups(channels: int) -> int:
    """GroupNorm group count ``min(32, channels // 4)``; raises ValueError if it does not divide."""
    groups = min(32, channels // 4)
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"UNet: {channels} channels cannot be split into GroupNorm groups "
            f"(groups = min(32, channels // 4) = {groups}); choose model_channels/channel_mult "
            "so that every channel count is a multiple of its group count (e.g. multiples of 32)"
        )
    return groups


def make_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with :func:`_groups` groups and eps 1e-6 (EDM's ``SongUNet``)."""
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6)


def _init(layer: nn.Conv2d | nn.Linear, *, scale: float = 1.0) -> None:
    """Xavier-uniform weights scaled by ``scale`` and zero bias (the DDPM++ / EDM convention)."""
    nn.init.xavier_uniform_(layer.weight, gain=scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def make_conv(in_ch: int, out_ch: int, *, kernel: int, scale: float = 1.0, padding: int | None = None) -> nn.Conv2d:
    """A ``kernel`` x ``kernel`` convolution (:class:`_Conv2d`) with :func:`_init`; ``padding`` defaults to
    ``kernel // 2`` (shape-preserving)."""
    conv = _Conv2d(in_ch, out_ch, kernel, padding=kernel // 2 if padding is None else padding)
    _init(conv, scale=scale)
    return conv


def make_linear(in_f: int, out_f: int, *, bias: bool = True, scale: float = 1.0) -> nn.Linear:
    """``nn.Linear`` with :func:`_init`."""
    lin = nn.Linear(in_f, out_f, bias=bias)
    _init(lin, scale=scale)
    return lin


# Set by forward_mode(); a plain global, which torch.compile reads without a graph break (a ContextVar breaks it).
_FORWARD_MODE = False


@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """Run the network for forward-mode differentiation: attention through PyTorch's plain math path (the fused
    flash / memory-efficient kernels have no forward-mode rule), and convolutions whose forward-mode rule skips
    the weights' and bias' tangents when they have none (PyTorch's own rule convolves the input with a zero
    weight tangent: a third convolution per layer). The same numbers up to rounding; no backward inside."""
    global _FORWARD_MODE
    previous, _FORWARD_MODE = _FORWARD_MODE, True
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        _FORWARD_MODE = previous


class _ConvJVP(torch.autograd.Function):
    """``conv2d(x, weight, bias)`` with a forward-mode rule that adds the weight's and bias' terms only when they
    have tangents (inside :func:`forward_mode` only: it has no backward)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 -- torch's signature
        x, weight, _, ctx.padding = inputs
        ctx.set_materialize_grads(False)  # absent tangents stay None instead of zeros
        ctx.save_for_forward(x, weight)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, _) -> Tensor:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        out = F.conv2d(torch.zeros_like(x) if dx is None else dx, weight, dbias, padding=ctx.padding)
        return out if dweight is None else out + F.conv2d(x, dweight, None, padding=ctx.padding)


class _Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (the same parameters and state_dict keys) with :class:`_ConvJVP` inside :func:`forward_mode`."""

    def forward(self, x: Tensor) -> Tensor:
        if _FORWARD_MODE:
            return _ConvJVP.apply(x, self.weight, self.bias, self.padding[0])
        return super().forward(x)


def _pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """``x / rms(x)`` over dim 1 (channels)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def fir_kernel(taps: tuple[int, ...]) -> Tensor:
    """The 2-D FIR kernel of 1-D ``taps``: the outer product ``f f^T / (sum f)^2``, ``[K, K]`` float32 (EDM's
    ``Conv2d``). ``taps`` must have an even length and a positive sum (see :class:`Resample`)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return torch.outer(f, f) / f.sum().square()


def check_taps(taps: tuple[int, ...]) -> None:
    """Raise ValueError unless ``taps`` is a usable resampling filter: an even number (>= 2) of integers >= 0 with a
    positive sum (an odd length would shift the grid by half a pixel and break the 2x shapes)."""
    if len(taps) < 2 or len(taps) % 2 or any(t < 0 for t in taps) or sum(taps) <= 0:
        raise ValueError(f"UNet: resample_filter must be an even number of integers >= 0 with a positive sum, "
                         f"such as (1, 1) or (1, 3, 3, 1); got {tuple(taps)}")


class Resample(nn.Module):
    """2x resampling of ``[N, C, H, W]`` with the separable FIR filter of ``taps`` (EDM's ``Conv2d`` with
    ``up``/``down`` and ``resample_filter``; Song et al. 2021's FIR resampling for NCSN++).

    ``"down"``: depthwise convolution with :func:`fir_kernel`, stride 2, zero padding ``pad`` (default
    ``(K - 1) // 2``): ``H -> H / 2`` for the default and even ``H``. ``"up"``: depthwise transposed convolution
    with ``4 * kernel``, stride 2, padding ``(K - 1) // 2``: ``H -> 2H``. ``"none"``: identity. ``taps=(1, 1)``
    (DDPM++) is 2x2 average pooling and nearest-neighbour upsampling exactly, which are computed as such.
    The kernel is a non-persistent buffer: no state_dict entry. Shape- and dtype-preserving in C and dtype.
    """

    def __init__(self, mode: str, taps: tuple[int, ...] = (1, 1), *, pad: int | None = None) -> None:
        super().__init__()
        check_taps(taps)
        self.mode = mode
        self.pad = (len(taps) - 1) // 2 if pad is None else pad
        self.box = tuple(taps) == (1, 1) and self.pad == 0
        self.register_buffer("kernel", fir_kernel(tuple(taps)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "none":
            return x
        if self.box:
            return F.avg_pool2d(x, 2) if self.mode == "down" else F.interpolate(x, scale_factor=2.0, mode="nearest")
        c = x.shape[1]
        kernel = self.kernel.to(x.dtype)[None, None].repeat(c, 1, 1, 1)
        if self.mode == "down":
            return F.conv2d(x, kernel, stride=2, padding=self.pad, groups=c)
        return F.conv_transpose2d(x, kernel * 4, stride=2, padding=(kernel.shape[-1] - 1) // 2, groups=c)


# ----------------------------------------------------------------------------- embeddings


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding (Vaswani et al. 2017) in EDM's form (``endpoint=True``).

    Frequencies ``f_k = (1 / max_positions) ** (k / (half - 1))`` for ``k = 0..half-1`` and
    output ``[cos(x f), sin(x f)]``. Maps ``[N]`` floats to ``[N, channels]`` float32.
    """

    def __init__(self, channels: int, *, max_positions: int = 10000) -> None:
        super().__init__()
        half = channels // 2
        if channels % 2 != 0 or half < 2:
            raise ValueError(f"UNet: positional embedding needs an even width >= 4, got {channels}")
        exponent = torch.arange(half, dtype=torch.float32) / (half - 1)
        self.register_buffer("freqs", (1.0 / max_positions) ** exponent, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        angles = x.float()[:, None] * self.freqs.float()[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (Tancik et al. 2020; Song et al. 2021 for NCSN++/DDPM++).

    Fixed frequencies ``f ~ N(0, scale^2)`` (a saved, non-trainable buffer); output
    ``[cos(2 pi x f), sin(2 pi x f)]``. Maps ``[N]`` floats to ``[N, channels]`` float32.
    """

    def __init__(self, channels: int, *, scale: float) -> None:
        super().__init__()
        if channels % 2 != 0:
            raise ValueError(f"UNet: Fourier embedding needs an even width, got {channels}")
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        angles = x.float()[:, None] * (2.0 * math.pi * self.freqs.float()[None, :])
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# ----------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockOptions:
    """What every residual/attention stage of one U-Net shares: the embedding width, dropout, the embedding's
    conditioning form (:class:`ResBlock`), the resampling filter taps (:class:`Resample`) and the attention head
    count (:class:`AttentionBlock`)."""

    emb_ch: int
    dropout: float
    adaptive_scale: bool = False
    double_norm: bool = False
    taps: tuple[int, ...] = (1, 1)
    heads: int = 1


class ResBlock(nn.Module):
    """DDPM++ residual block conditioned on the noise (and class) embedding (EDM's ``UNetBlock``).

    With ``g = conv0(resample(silu(norm0(x))))``:
    ``adaptive_scale=False`` (DDPM++ / EDM ``SongUNet``): ``h = silu(norm1(g + affine(emb)))``;
    ``adaptive_scale=True`` (ADM / EDM ``DhariwalUNet``): ``h = silu(norm1(g) * (1 + scale) + shift)``
    with ``(scale, shift) = affine(emb)``; ``double_norm=True`` (sCM's adaptive double normalisation, which
    the paper found stable where plain AdaGN diverged): ``h = silu(norm1(g) * pixelnorm(scale) +
    pixelnorm(shift))``. Then ``h = conv1(dropout(h))`` and
    ``out = (h + skip(resample(x))) / sqrt(2)``, ``resample`` with the FIR filter ``opts.taps`` (:class:`Resample`).
    Shapes: ``x`` ``[N, in_ch, H, W]``, ``emb`` ``[N, emb_ch]`` -> ``[N, out_ch, H', W']`` with
    ``H' = H/2`` (``resample="down"``), ``2H`` (``"up"``) or ``H`` (``"none"``).
    """

    def __init__(self, in_ch: int, out_ch: int, opts: BlockOptions, *, resample: str = "none") -> None:
        super().__init__()
        self.resample = Resample(resample, opts.taps)
        self.adaptive_scale, self.double_norm = opts.adaptive_scale or opts.double_norm, opts.double_norm
        self.norm0 = make_norm(in_ch)
        self.conv0 = make_conv(in_ch, out_ch, kernel=3)
        self.affine = make_linear(opts.emb_ch, 2 * out_ch if self.adaptive_scale else out_ch)
        self.norm1 = make_norm(out_ch)
        self.dropout = nn.Dropout(opts.dropout)
        self.conv1 = make_conv(out_ch, out_ch, kernel=3, scale=SMALL_INIT)
        needs_proj = in_ch != out_ch or resample != "none"
        self.skip = make_conv(in_ch, out_ch, kernel=1) if needs_proj else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        params = self.affine(emb)[:, :, None, None]
        if self.double_norm:
            scale, shift = params.chunk(2, dim=1)
            h = torch.addcmul(_pixel_norm(shift), self.norm1(h), _pixel_norm(scale))
        elif self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm1(h), scale + 1)
        else:
            h = self.norm1(h + params)
        h = self.conv1(self.dropout(F.silu(h)))
        skip = x if self.skip is None else self.skip(self.resample(x))
        return (h + skip) * _SKIP_SCALE


class AttentionBlock(nn.Module):
    """Self-attention with ``heads`` heads of ``channels / heads`` channels over the ``H*W`` positions, residual
    ``(x + attn) / sqrt(2)``. EDM's ``SongUNet`` uses one head for DDPM++ and NCSN++ alike. ``heads=0``
    (:data:`LEGACY_HEADS`) is cmkit's rule before the head count was an option, kept for networks saved then:
    64-channel heads where 64 divides ``channels``, else one head.
    Shape-preserving: ``[N, C, H, W]`` -> ``[N, C, H, W]``; ``heads`` must divide ``channels`` (ValueError).
    """

    def __init__(self, channels: int, *, heads: int = 1) -> None:
        super().__init__()
        if heads == LEGACY_HEADS:
            heads = channels // 64 if channels % 64 == 0 else 1
        if heads < 1 or channels % heads:
            raise ValueError(f"UNet: attn_heads={heads} must be a positive divisor of every attention level's "
                             f"channel count, which includes {channels}")
        self.heads = heads
        self.norm = make_norm(channels)
        self.qkv = make_conv(channels, 3 * channels, kernel=1, scale=math.sqrt(0.2))
        self.proj = make_conv(channels, channels, kernel=1, scale=SMALL_INIT)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [N, heads, HW, head_ch]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return (x + self.proj(out)) * _SKIP_SCALE


class Stage(nn.Module):
    """A residual block optionally followed by self-attention; the unit of encoder and decoder."""

    def __init__(self, in_ch: int, out_ch: int, opts: BlockOptions, *, attention: bool, resample: str = "none") -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, opts, resample=resample)
        self.attn = AttentionBlock(out_ch, heads=opts.heads) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


# ----------------------------------------------------------------------------- NCSN++ input and output paths


class EncoderSkip(nn.Module):
    """NCSN++'s ``"skip"`` input path at one encoder level (EDM's ``aux_down`` + ``aux_skip``): the image path is
    downsampled with the FIR filter and added through a 1x1 convolution to the level's first features.

    ``forward(h, aux)``: ``h`` ``[N, out_ch, H, W]`` (the output of the level's downsampling stage), ``aux``
    ``[N, in_ch, 2H, 2W]`` (the previous level's image path; the input image at the first) ->
    ``(h + conv(down(aux)), down(aux))``.
    """

    def __init__(self, in_ch: int, out_ch: int, taps: tuple[int, ...]) -> None:
        super().__init__()
        self.down = Resample("down", taps)
        self.conv = make_conv(in_ch, out_ch, kernel=1)

    def forward(self, h: Tensor, aux: Tensor) -> tuple[Tensor, Tensor]:
        aux = self.down(aux)
        return h + self.conv(aux), aux


class EncoderResidual(nn.Module):
    """NCSN++'s ``"residual"`` input path at one encoder level (EDM's ``aux_residual``, Song et al. 2021's
    progressive-growing input): a 3x3 convolution of the previous level's merged features followed by FIR
    downsampling, "fused" as in EDM (convolve with zero padding ``1 + (K - 1) // 2``, then downsample without
    padding), merged with the level's first features as ``(h + that) / sqrt(2)``.

    ``forward(h, aux)``: ``h`` ``[N, out_ch, H, W]``, ``aux`` ``[N, in_ch, 2H, 2W]`` -> ``(merged, merged)``: the
    merged features replace ``h`` (and its skip connection) and are the next level's ``aux``.
    """

    def __init__(self, in_ch: int, out_ch: int, taps: tuple[int, ...]) -> None:
        super().__init__()
        self.conv = make_conv(in_ch, out_ch, kernel=3, padding=1 + (len(taps) - 1) // 2)
        self.down = Resample("down", taps, pad=0)

    def forward(self, h: Tensor, aux: Tensor) -> tuple[Tensor, Tensor]:
        merged = (h + self.down(self.conv(aux))) * _SKIP_SCALE
        return merged, merged


class OutputHead(nn.Module):
    """``conv(silu(norm(h)))``: ``[N, ch, H, W]`` -> ``[N, out_ch, H, W]``, the convolution near-zero initialised
    (EDM's ``aux_norm`` + ``aux_conv``; every level of NCSN++'s ``"skip"`` decoder has one)."""

    def __init__(self, ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = make_norm(ch)
        self.conv = make_conv(ch, out_ch, kernel=3, scale=SMALL_INIT)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(F.silu(self.norm(h)))
