"""A U-Net backbone of the DDPM++ family, as used by EDM and consistency models.

Architecture after Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations" (DDPM++), in the form Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models" (EDM) call ``SongUNet``:

* noise embedding: sinusoidal positional (Vaswani et al. 2017, EDM's ``endpoint=True`` variant)
  or random Fourier features (Tancik et al. 2020), then a two-layer SiLU MLP;
* residual blocks with GroupNorm, adaptive scale/shift from the embedding (optionally with sCM's adaptive
  double normalisation), dropout, a near-zero-initialised last convolution and ``(h + skip) / sqrt(2)`` merging;
* multi-head self-attention blocks at chosen resolutions;
* an encoder that keeps every intermediate output as a skip connection, a middle pair at the
  lowest resolution, and a decoder that pops one skip per residual block;
* optionally a log-variance head ``w(c_noise)`` (sCM's adaptive loss weighting, Lu and Song 2024).

Every option supports forward-mode differentiation (``torch.func.jvp``, ``torch.autograd.forward_ad``);
differentiate inside :func:`forward_mode`: fused attention kernels on GPUs have no forward-mode rule, and
PyTorch's forward-mode rule for a convolution spends an extra convolution on the weights' (zero) tangent.

The written code is original; only the published architecture is followed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["UNet", "forward_mode"]

EMBEDDINGS = ("positional", "fourier")
_SKIP_SCALE = 1.0 / math.sqrt(2.0)
_SMALL_INIT = 1e-5  # DDPM++ / EDM scale for "near zero" initialised layers
_HEAD_CHANNELS = 64


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


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6)


def _init(layer: nn.Conv2d | nn.Linear, *, scale: float = 1.0) -> None:
    """Xavier-uniform weights scaled by ``scale`` and zero bias (the DDPM++ / EDM convention)."""
    nn.init.xavier_uniform_(layer.weight, gain=scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _conv(in_ch: int, out_ch: int, *, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    conv = _Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
    _init(conv, scale=scale)
    return conv


def _linear(in_f: int, out_f: int, *, bias: bool = True, scale: float = 1.0) -> nn.Linear:
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


def _resample(x: Tensor, mode: str) -> Tensor:
    """``"down"``: 2x2 average pool (needs even H, W); ``"up"``: nearest x2; ``"none"``: identity."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


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


class ResBlock(nn.Module):
    """DDPM++ residual block conditioned on the noise (and class) embedding.

    With ``g = conv0(resample(silu(norm0(x))))``:
    ``adaptive_scale=False`` (DDPM++ / EDM ``SongUNet``): ``h = silu(norm1(g + affine(emb)))``;
    ``adaptive_scale=True`` (ADM / EDM ``DhariwalUNet``): ``h = silu(norm1(g) * (1 + scale) + shift)``
    with ``(scale, shift) = affine(emb)``; ``double_norm=True`` (sCM's adaptive double normalisation, which
    the paper found stable where plain AdaGN diverged): ``h = silu(norm1(g) * pixelnorm(scale) +
    pixelnorm(shift))``. Then ``h = conv1(dropout(h))`` and
    ``out = (h + skip(resample(x))) / sqrt(2)``.
    Shapes: ``x`` ``[N, in_ch, H, W]``, ``emb`` ``[N, emb_ch]`` -> ``[N, out_ch, H', W']`` with
    ``H' = H/2`` (``resample="down"``), ``2H`` (``"up"``) or ``H`` (``"none"``).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        emb_ch: int,
        dropout: float,
        adaptive_scale: bool,
        double_norm: bool = False,
        resample: str = "none",
    ) -> None:
        super().__init__()
        self.resample = resample
        self.adaptive_scale, self.double_norm = adaptive_scale or double_norm, double_norm
        self.norm0 = _norm(in_ch)
        self.conv0 = _conv(in_ch, out_ch, kernel=3)
        self.affine = _linear(emb_ch, 2 * out_ch if self.adaptive_scale else out_ch)
        self.norm1 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(out_ch, out_ch, kernel=3, scale=_SMALL_INIT)
        needs_proj = in_ch != out_ch or resample != "none"
        self.skip = _conv(in_ch, out_ch, kernel=1) if needs_proj else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = _resample(F.silu(self.norm0(x)), self.resample)
        h = self.conv0(h)
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
        skip = x if self.skip is None else self.skip(_resample(x, self.resample))
        return (h + skip) * _SKIP_SCALE


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions, residual ``(x + attn) / sqrt(2)``.

    Heads have 64 channels when ``channels`` is a multiple of 64, else one head.
    Shape-preserving: ``[N, C, H, W]`` -> ``[N, C, H, W]``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.heads = channels // _HEAD_CHANNELS if channels % _HEAD_CHANNELS == 0 else 1
        self.norm = _norm(channels)
        self.qkv = _conv(channels, 3 * channels, kernel=1, scale=math.sqrt(0.2))
        self.proj = _conv(channels, channels, kernel=1, scale=_SMALL_INIT)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [N, heads, HW, head_ch]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return (x + self.proj(out)) * _SKIP_SCALE


class Stage(nn.Module):
    """A residual block optionally followed by self-attention; the unit of encoder and decoder."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        emb_ch: int,
        dropout: float,
        adaptive_scale: bool,
        double_norm: bool,
        attention: bool,
        resample: str = "none",
    ) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_ch=emb_ch, dropout=dropout, adaptive_scale=adaptive_scale,
                            double_norm=double_norm, resample=resample)
        self.attn = AttentionBlock(out_ch) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


# ----------------------------------------------------------------------------- U-Net


def _validate(
    *,
    resolution: int,
    in_channels: int,
    out_channels: int,
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_blocks: int,
    dropout: float,
    embedding: str,
    fourier_scale: float,
    num_classes: int,
) -> None:
    """Raise ValueError naming the first bad constructor argument."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"UNet: unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
    positives = {
        "resolution": resolution,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "model_channels": model_channels,
        "num_blocks": num_blocks,
    }
    for name, value in positives.items():
        if value < 1:
            raise ValueError(f"UNet: {name} must be a positive integer, got {value}")
    if len(channel_mult) == 0:
        raise ValueError("UNet: channel_mult must name at least one level, got ()")
    if any(m < 1 for m in channel_mult):
        raise ValueError(f"UNet: channel_mult entries must be positive integers, got {channel_mult}")
    factor = 2 ** (len(channel_mult) - 1)
    if resolution % factor != 0:
        raise ValueError(
            f"UNet: resolution {resolution} is not divisible by 2**(len(channel_mult)-1) = {factor}; "
            f"use fewer levels than {len(channel_mult)} or a resolution that halves evenly"
        )
    if model_channels % 2 != 0 or model_channels < 4:
        raise ValueError(f"UNet: model_channels must be even and >= 4, got {model_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
    if embedding == "fourier" and not fourier_scale > 0:
        raise ValueError(f"UNet: fourier_scale must be > 0, got {fourier_scale}")
    if num_classes < 0:
        raise ValueError(f"UNet: num_classes must be >= 0 (0 = unconditional), got {num_classes}")


class UNet(nn.Module):
    """DDPM++ U-Net (Song et al. 2021; EDM's ``SongUNet``, Karras et al. 2022).

    Args (keyword-only):
        resolution: input height = width; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels, out_channels: image channels in and out.
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels,
            the noise embedding has width ``model_channels`` and the MLP ``4 * model_channels``.
        channel_mult: per-level width multipliers; each level after the first halves the resolution.
        num_blocks: residual blocks per level in the encoder (the decoder has ``num_blocks + 1``).
        attn_resolutions: resolutions that get self-attention (after every encoder block and after
            the last block of the decoder level, as in EDM); values matching no level are ignored.
        dropout: dropout probability inside residual blocks.
        embedding: ``"positional"`` or ``"fourier"`` noise embedding.
        fourier_scale: std of the Fourier frequencies (``embedding="fourier"`` only).
        num_classes: number of classes for class conditioning; 0 for unconditional.
        adaptive_scale: False (default, DDPM++ / EDM ``SongUNet``): the embedding is added to the
            features before the second GroupNorm. True: ``norm(h) * (1 + scale) + shift`` (ADM style,
            about 4.3M more parameters at the CIFAR-10 size).
        double_norm: sCM's adaptive double normalisation ``norm(h) * pixelnorm(scale) + pixelnorm(shift)``
            (the parameters of ``adaptive_scale=True``).
        logvar_head: add the log-variance head ``logvar(noise_labels)``: a linear layer on the noise
            embedding's features, zero at initialisation (sCM's adaptive weighting ``w(t)``).

    ``forward(x, noise_labels, class_labels=None)``: ``x`` ``[N, in_channels, R, R]`` float,
    ``noise_labels`` ``[N]`` float (EDM's ``c_noise = ln(sigma) / 4``), ``class_labels`` ``[N]``
    int64 in ``[0, num_classes)`` (required iff ``num_classes > 0``). Returns
    ``[N, out_channels, R, R]`` in ``x``'s dtype (also under ``torch.autocast``).
    ``logvar(noise_labels)``: ``[N]`` float32, zeros without the head.
    """

    def __init__(
        self,
        *,
        resolution: int,
        in_channels: int,
        out_channels: int,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.10,
        embedding: str = "positional",
        fourier_scale: float = 16.0,
        num_classes: int = 0,
        adaptive_scale: bool = False,
        double_norm: bool = False,
        logvar_head: bool = False,
    ) -> None:
        super().__init__()
        channel_mult = tuple(channel_mult)
        _validate(
            resolution=resolution,
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=channel_mult,
            num_blocks=num_blocks,
            dropout=dropout,
            embedding=embedding,
            fourier_scale=fourier_scale,
            num_classes=num_classes,
        )
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self._emb_ch = 4 * model_channels
        self._dropout = dropout
        self._adaptive_scale, self._double_norm = adaptive_scale, double_norm
        self._build_embedding(model_channels, embedding=embedding, fourier_scale=fourier_scale)
        self.map_logvar = _linear(model_channels, 1, scale=0.0) if logvar_head else None
        attn = set(attn_resolutions)
        skips = self._build_encoder(
            model_channels, channel_mult=channel_mult, num_blocks=num_blocks, attn=attn
        )
        self._build_decoder(
            model_channels, skips, channel_mult=channel_mult, num_blocks=num_blocks, attn=attn
        )

    # -- construction

    def _stage(self, in_ch: int, out_ch: int, *, attention: bool, resample: str = "none") -> Stage:
        return Stage(
            in_ch,
            out_ch,
            emb_ch=self._emb_ch,
            dropout=self._dropout,
            adaptive_scale=self._adaptive_scale,
            double_norm=self._double_norm,
            attention=attention,
            resample=resample,
        )

    def _build_embedding(self, width: int, *, embedding: str, fourier_scale: float) -> None:
        emb_ch = self._emb_ch
        if embedding == "positional":
            self.map_noise: nn.Module = PositionalEmbedding(width)
        else:
            self.map_noise = FourierEmbedding(width, scale=fourier_scale)
        self.map_layer0 = _linear(width, emb_ch)
        self.map_layer1 = _linear(emb_ch, emb_ch)
        self.map_label = _linear(self.num_classes, emb_ch, bias=False) if self.num_classes else None

    def _build_encoder(
        self, base: int, *, channel_mult: tuple[int, ...], num_blocks: int, attn: set[int]
    ) -> list[int]:
        """Build the encoder; return the channel count of every skip it pushes, in push order."""
        self.enc_in = _conv(self.in_channels, base, kernel=3)
        self.enc = nn.ModuleList()
        skips, ch = [base], base
        for level, mult in enumerate(channel_mult):
            res = self.resolution >> level
            if level > 0:
                self.enc.append(self._stage(ch, ch, attention=False, resample="down"))
                skips.append(ch)
            for _ in range(num_blocks):
                self.enc.append(self._stage(ch, base * mult, attention=res in attn))
                ch = base * mult
                skips.append(ch)
        return skips

    def _build_decoder(
        self, base: int, skips: list[int], *, channel_mult: tuple[int, ...], num_blocks: int, attn: set[int]
    ) -> None:
        """Build the middle pair and the decoder, consuming ``skips`` (channel counts) from the end.

        As in EDM's ``SongUNet``, only the last block of a decoder level gets self-attention.
        """
        ch = skips[-1]
        self.mid = nn.ModuleList([self._stage(ch, ch, attention=True), self._stage(ch, ch, attention=False)])
        self.dec = nn.ModuleList()
        self._dec_pops: list[bool] = []  # whether each decoder stage consumes a skip
        for level in reversed(range(len(channel_mult))):
            res = self.resolution >> level
            if level < len(channel_mult) - 1:
                self.dec.append(self._stage(ch, ch, attention=False, resample="up"))
                self._dec_pops.append(False)
            for idx in range(num_blocks + 1):
                out = base * channel_mult[level]
                attention = idx == num_blocks and res in attn
                self.dec.append(self._stage(ch + skips.pop(), out, attention=attention))
                self._dec_pops.append(True)
                ch = out
        self.out_norm = _norm(ch)
        self.out_conv = _conv(ch, self.out_channels, kernel=3, scale=_SMALL_INIT)

    # -- forward

    def _embed(self, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        """``[N]`` noise labels (+ ``[N]`` class ids) -> ``[N, 4 * model_channels]`` embedding."""
        emb = F.silu(self.map_layer0(self.map_noise(noise_labels)))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            assert class_labels is not None
            onehot = F.one_hot(class_labels, self.num_classes).to(emb.dtype)
            emb = emb + self.map_label(onehot)
        return F.silu(emb)

    def logvar(self, noise_labels: Tensor) -> Tensor:
        """The log-variance head ``w`` at ``[N]`` noise labels: ``[N]`` float32 (zeros without the head), computed in
        float32 under autocast too."""
        if self.map_logvar is None:
            return torch.zeros_like(noise_labels, dtype=torch.float32)
        with torch.autocast(noise_labels.device.type, enabled=False):
            return self.map_logvar(self.map_noise(noise_labels.float())).squeeze(1)

    def _check_inputs(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"UNet: x must have shape [N, {shape}], got {list(x.shape)}")
        if noise_labels.shape != (x.shape[0],):
            got = list(noise_labels.shape)
            raise ValueError(f"UNet: noise_labels must have shape [{x.shape[0]}], got {got}")
        if self.num_classes > 0:
            if class_labels is None:
                raise ValueError(f"UNet: class_labels are required (num_classes={self.num_classes})")
            if class_labels.shape != (x.shape[0],) or class_labels.dtype.is_floating_point:
                raise ValueError(
                    f"UNet: class_labels must be an integer tensor of shape [{x.shape[0]}], "
                    f"got {class_labels.dtype} {list(class_labels.shape)}"
                )
        elif class_labels is not None:
            raise ValueError("UNet: class_labels given but the model is unconditional (num_classes=0)")

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """See the class docstring for the shape and dtype contract."""
        self._check_inputs(x, noise_labels, class_labels)
        emb = self._embed(noise_labels, class_labels)
        h = self.enc_in(x)
        skips = [h]
        for stage in self.enc:
            h = stage(h, emb)
            skips.append(h)
        for stage in self.mid:
            h = stage(h, emb)
        for stage, pops in zip(self.dec, self._dec_pops, strict=True):
            if pops:
                h = torch.cat([h, skips.pop()], dim=1)
            h = stage(h, emb)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return out.to(x.dtype)
