"""The U-Net of the DDPM++ / NCSN++ family, as used by EDM and consistency models.

Architectures after Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations"
(DDPM++ and NCSN++), in the form Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models" (EDM) give them in one module with options, ``SongUNet`` (EDM's ``training/networks.py``):

* noise embedding (:mod:`.layers`) of width ``channel_mult_noise * model_channels``, plus EDM's augmentation
  labels through a bias-free linear layer, plus optionally a guidance scale's sinusoidal embedding through a
  bias-free, zero-initialised linear layer (LCM's ``w`` input, Luo et al. 2023), then a two-layer SiLU MLP; class
  labels are added after it;
* an encoder that keeps every intermediate output as a skip connection, optionally with NCSN++'s progressive
  input path (``encoder_type``), a middle pair at the lowest resolution, and a decoder that pops one skip per
  residual block, optionally with NCSN++'s progressive output path (``decoder_type``);
* residual blocks and self-attention (``attn_heads`` heads) from :mod:`.layers`, resampling with the FIR filter
  ``resample_filter``;
* optionally a log-variance head ``w(c_noise)`` (sCM's adaptive loss weighting, Lu and Song 2024);
* optionally a second time input (``time2_embedding``: MeanFlow's ``t - r``, Geng et al. 2025), embedded like the
  first and summed with it after its own first linear layer (a concatenation of the two embeddings into one linear
  layer, as MeanFlow's U-Net does).

Settings of the papers' CIFAR-10 networks (EDM's ``train.py``; parameter counts in tests/test_ncsnpp.py):
DDPM++ is the defaults; NCSN++ is ``embedding="fourier", channel_mult_noise=2, encoder_type="residual",
decoder_type="standard", resample_filter=(1, 3, 3, 1)``.

Every option supports forward-mode differentiation; differentiate inside :func:`forward_mode`.
This file ships verbatim inside diffusers exports: it imports torch and ``.layers`` only.
The written code is original; only the published architecture is followed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    SMALL_INIT,
    BlockOptions,
    EncoderResidual,
    EncoderSkip,
    FourierEmbedding,
    OutputHead,
    PositionalEmbedding,
    Resample,
    Stage,
    check_taps,
    forward_mode,
    make_conv,
    make_linear,
    make_norm,
)

__all__ = ["DECODER_TYPES", "EMBEDDINGS", "ENCODER_TYPES", "UNet", "forward_mode"]

EMBEDDINGS = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")
_ENCODER_PATHS = {"skip": EncoderSkip, "residual": EncoderResidual}


def _check_choices(*, embedding: str, encoder_type: str, decoder_type: str) -> None:
    """Raise ValueError naming the first option whose value is not one of its choices."""
    for name, value, choices in (("embedding", embedding, EMBEDDINGS), ("encoder_type", encoder_type, ENCODER_TYPES),
                                 ("decoder_type", decoder_type, DECODER_TYPES)):
        if value not in choices:
            raise ValueError(f"UNet: unknown {name} {value!r}; choose one of {', '.join(choices)}")


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
    channel_mult_noise: int,
    augment_dim: int,
    guidance_dim: int,
) -> None:
    """Raise ValueError naming the first bad constructor argument (the choices: :func:`_check_choices`)."""
    positives = {
        "resolution": resolution,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "model_channels": model_channels,
        "num_blocks": num_blocks,
        "channel_mult_noise": channel_mult_noise,
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
    if augment_dim < 0:
        raise ValueError(f"UNet: augment_dim must be >= 0 (0 = no augmentation labels), got {augment_dim}")
    if guidance_dim != 0 and (guidance_dim < 4 or guidance_dim % 2):
        raise ValueError(f"UNet: guidance_dim must be 0 (no guidance input) or even and >= 4, got {guidance_dim}")


class UNet(nn.Module):
    """DDPM++ / NCSN++ U-Net (Song et al. 2021; EDM's ``SongUNet``, Karras et al. 2022).

    Args (keyword-only):
        resolution: input height = width; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels, out_channels: image channels in and out.
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels and the MLP
            of the noise embedding ``4 * model_channels``.
        channel_mult: per-level width multipliers; each level after the first halves the resolution.
        num_blocks: residual blocks per level in the encoder (the decoder has ``num_blocks + 1``).
        attn_resolutions: resolutions that get self-attention (after every encoder block and after
            the last block of the decoder level, as in EDM); values matching no level are ignored.
        dropout: dropout probability inside residual blocks.
        embedding: ``"positional"`` (DDPM++) or ``"fourier"`` (NCSN++) noise embedding.
        fourier_scale: std of the Fourier frequencies (``embedding="fourier"`` only).
        num_classes: number of classes for class conditioning; 0 for unconditional.
        adaptive_scale: False (DDPM++ / EDM ``SongUNet``): the embedding is added to the features before the
            second GroupNorm. True: ``norm(h) * (1 + scale) + shift`` (ADM style, about 4.3M more parameters at
            the CIFAR-10 size).
        double_norm: sCM's adaptive double normalisation ``norm(h) * pixelnorm(scale) + pixelnorm(shift)``
            (the parameters of ``adaptive_scale=True``).
        logvar_head: add the log-variance head ``logvar(noise_labels)``: a linear layer on the noise
            embedding's features, zero at initialisation (sCM's adaptive weighting ``w(t)``).
        encoder_type: ``"standard"`` (DDPM++); ``"skip"``: the image, FIR-downsampled to each level, added through
            a 1x1 convolution (:class:`.layers.EncoderSkip`); ``"residual"`` (NCSN++): the progressive-growing input
            path (:class:`.layers.EncoderResidual`).
        decoder_type: ``"standard"`` (DDPM++ and EDM's NCSN++): one output head at the top level; ``"skip"``: an
            output head at every level, the sum upsampled level by level with the FIR filter (the progressive
            output path of Song et al. 2021's NCSN++).
        resample_filter: FIR taps of every 2x resampling (:class:`.layers.Resample`): ``(1, 1)`` box (DDPM++),
            ``(1, 3, 3, 1)`` (NCSN++); an even number of integers >= 0 with a positive sum.
        channel_mult_noise: the noise embedding has ``channel_mult_noise * model_channels`` features (DDPM++ 1,
            NCSN++ 2).
        attn_heads: attention heads; must divide the channel count of every attention level (EDM: 1). 0: the
            rule of networks saved before this option, 64-channel heads where 64 divides the channels, else one
            (:class:`.layers.AttentionBlock`).
        augment_dim: width of EDM's augmentation labels (0: none), mapped by a bias-free linear layer
            (``map_augment``) and added to the noise embedding's features, as in EDM's ``SongUNet``.
        guidance_dim: width of the guidance scale's sinusoidal embedding (0: the network takes no guidance scale).
            As LCM's ``w`` conditioning (Luo et al. 2023; diffusers' ``time_cond_proj_dim``): the scale ``w`` is
            embedded (:class:`.layers.PositionalEmbedding` of w itself, on the scale of the noise labels), mapped by a
            bias-free linear layer (``map_guidance``, zero at initialisation, so a network that adopts a teacher's
            weights starts as the teacher at every w) and added to the noise embedding's features.
        time2_embedding: take a second time ``time2_labels`` (MeanFlow's ``t - r``): the same sinusoidal or
            Fourier features, through a linear layer of its own (``map_time2``) added to ``map_layer0``'s output.
            Off by default: networks without it have the same parameters as before.

    ``forward(x, noise_labels, class_labels=None, augment_labels=None, guidance=None, time2_labels=None)``: ``x``
    ``[N, in_channels, R, R]`` float, ``noise_labels`` ``[N]`` float (EDM's ``c_noise = ln(sigma) / 4``),
    ``class_labels`` ``[N]`` int64 in ``[0, num_classes)`` or -1, "no class", a zero one-hot (required iff
    ``num_classes > 0``), ``augment_labels`` ``[N, augment_dim]`` float or None (only with ``augment_dim > 0``; None
    means zeros: no augmentation, as when sampling), ``guidance`` ``[N]`` float, the guidance scale w (required iff
    ``guidance_dim > 0``), ``time2_labels`` ``[N]`` float (required iff ``time2_embedding``). Returns
    ``[N, out_channels, R, R]`` in ``x``'s dtype (also under ``torch.autocast``).
    ``logvar(noise_labels)``: ``[N]`` float32, zeros without the head.
    ``output_layers``: the names of the last convolutions, whose outputs sum to the network's output.
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
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: tuple[int, ...] = (1, 1),
        channel_mult_noise: int = 1,
        attn_heads: int = 1,
        augment_dim: int = 0,
        guidance_dim: int = 0,
        time2_embedding: bool = False,
    ) -> None:
        super().__init__()
        channel_mult, resample_filter = tuple(channel_mult), tuple(resample_filter)
        _check_choices(embedding=embedding, encoder_type=encoder_type, decoder_type=decoder_type)
        _validate(resolution=resolution, in_channels=in_channels, out_channels=out_channels,
                  model_channels=model_channels, channel_mult=channel_mult, num_blocks=num_blocks, dropout=dropout,
                  embedding=embedding, fourier_scale=fourier_scale, num_classes=num_classes,
                  channel_mult_noise=channel_mult_noise, augment_dim=augment_dim, guidance_dim=guidance_dim)
        check_taps(resample_filter)
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.augment_dim = augment_dim
        self.guidance_dim = guidance_dim
        self._opts = BlockOptions(emb_ch=4 * model_channels, dropout=dropout, adaptive_scale=adaptive_scale,
                                  double_norm=double_norm, taps=resample_filter, heads=attn_heads)
        noise_ch = channel_mult_noise * model_channels
        self._build_embedding(noise_ch, embedding=embedding, fourier_scale=fourier_scale)
        self.map_time2 = make_linear(noise_ch, self._opts.emb_ch) if time2_embedding else None
        self.map_logvar = make_linear(noise_ch, 1, scale=0.0) if logvar_head else None
        attn = set(attn_resolutions)
        skips = self._build_encoder(model_channels, channel_mult=channel_mult, num_blocks=num_blocks, attn=attn,
                                    encoder_type=encoder_type)
        self._build_decoder(model_channels, skips, channel_mult=channel_mult, num_blocks=num_blocks, attn=attn,
                            decoder_type=decoder_type)

    # -- construction

    def _build_embedding(self, width: int, *, embedding: str, fourier_scale: float) -> None:
        emb_ch = self._opts.emb_ch
        if embedding == "positional":
            self.map_noise: nn.Module = PositionalEmbedding(width)
        else:
            self.map_noise = FourierEmbedding(width, scale=fourier_scale)
        self.map_augment = make_linear(self.augment_dim, width, bias=False) if self.augment_dim else None
        self.embed_guidance = PositionalEmbedding(self.guidance_dim) if self.guidance_dim else None
        self.map_guidance = make_linear(self.guidance_dim, width, bias=False, scale=0.0) if self.guidance_dim else None
        self.map_layer0 = make_linear(width, emb_ch)
        self.map_layer1 = make_linear(emb_ch, emb_ch)
        self.map_label = make_linear(self.num_classes, emb_ch, bias=False) if self.num_classes else None

    def _build_encoder(
        self, base: int, *, channel_mult: tuple[int, ...], num_blocks: int, attn: set[int], encoder_type: str
    ) -> list[int]:
        """Build the encoder (and its input path, ``enc_aux``: one module per level after the first); return the
        channel count of every skip it pushes, in push order."""
        self.enc_in = make_conv(self.in_channels, base, kernel=3)
        self.enc = nn.ModuleList()
        self.enc_aux = nn.ModuleList()
        path = _ENCODER_PATHS.get(encoder_type)
        skips, ch, aux_ch = [base], base, self.in_channels
        for level, mult in enumerate(channel_mult):
            res = self.resolution >> level
            if level > 0:
                self.enc.append(Stage(ch, ch, self._opts, attention=False, resample="down"))
                skips.append(ch)
                if path is not None:
                    self.enc_aux.append(path(aux_ch, ch, self._opts.taps))
                    aux_ch = ch if encoder_type == "residual" else aux_ch
            for _ in range(num_blocks):
                self.enc.append(Stage(ch, base * mult, self._opts, attention=res in attn))
                ch = base * mult
                skips.append(ch)
        return skips

    def _build_decoder(self, base: int, skips: list[int], *, channel_mult: tuple[int, ...], num_blocks: int,
                       attn: set[int], decoder_type: str) -> None:
        """Build the middle pair and the decoder, consuming ``skips`` (channel counts) from the end, and the output
        heads: ``out_norm``/``out_conv`` at the top level, and with ``decoder_type="skip"`` ``dec_heads`` after every
        other level (lowest resolution first).

        As in EDM's ``SongUNet``, only the last block of a decoder level gets self-attention.
        """
        ch = skips[-1]
        self.mid = nn.ModuleList([Stage(ch, ch, self._opts, attention=True),
                                  Stage(ch, ch, self._opts, attention=False)])
        self.dec = nn.ModuleList()
        self.dec_heads = nn.ModuleList()
        self._dec_pops: list[bool] = []  # whether each decoder stage consumes a skip
        self._head_after: list[int] = []  # indices of the decoder stages that dec_heads follow, in order
        for level in reversed(range(len(channel_mult))):
            res = self.resolution >> level
            if level < len(channel_mult) - 1:
                self.dec.append(Stage(ch, ch, self._opts, attention=False, resample="up"))
                self._dec_pops.append(False)
            for idx in range(num_blocks + 1):
                out = base * channel_mult[level]
                attention = idx == num_blocks and res in attn
                self.dec.append(Stage(ch + skips.pop(), out, self._opts, attention=attention))
                self._dec_pops.append(True)
                ch = out
            if decoder_type == "skip" and level > 0:
                self.dec_heads.append(OutputHead(ch, self.out_channels))
                self._head_after.append(len(self.dec) - 1)
        self.out_up = Resample("up", self._opts.taps) if decoder_type == "skip" else None
        self.out_norm = make_norm(ch)
        self.out_conv = make_conv(ch, self.out_channels, kernel=3, scale=SMALL_INIT)

    @property
    def output_layers(self) -> tuple[str, ...]:
        """The names of the convolutions whose outputs (upsampled) sum to the network's output: negating their
        weights and biases negates the output (:func:`cmkit.precond.edm_backbone_to_trigflow`)."""
        return ("out_conv", *(f"dec_heads.{i}.conv" for i in range(len(self.dec_heads))))

    # -- forward

    def _embed(self, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None,
               guidance: Tensor | None, time2_labels: Tensor | None) -> Tensor:
        """``[N]`` noise labels (+ ``[N]`` class ids, ``[N, augment_dim]`` augmentation labels, ``[N]`` guidance
        scales, ``[N]`` second times) -> ``[N, 4 * model_channels]`` embedding."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        if self.map_guidance is not None:
            emb = emb + self.map_guidance(self.embed_guidance(guidance).to(emb.dtype))
        emb = self.map_layer0(emb)
        if self.map_time2 is not None:
            emb = emb + self.map_time2(self.map_noise(time2_labels))
        emb = self.map_layer1(F.silu(emb))
        if self.map_label is not None:
            assert class_labels is not None
            # The null label (cmkit.cond.NULL_LABEL, < 0) means "no class": a zero one-hot.
            onehot = F.one_hot(class_labels.clamp(min=0), self.num_classes).to(emb.dtype)
            onehot = onehot * (class_labels >= 0).to(emb.dtype).unsqueeze(1)
            emb = emb + self.map_label(onehot)
        return F.silu(emb)

    def logvar(self, noise_labels: Tensor) -> Tensor:
        """The log-variance head ``w`` at ``[N]`` noise labels: ``[N]`` float32 (zeros without the head), computed in
        float32 under autocast too."""
        if self.map_logvar is None:
            return torch.zeros_like(noise_labels, dtype=torch.float32)
        with torch.autocast(noise_labels.device.type, enabled=False):
            return self.map_logvar(self.map_noise(noise_labels.float())).squeeze(1)

    def _check_inputs(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                      augment_labels: Tensor | None, guidance: Tensor | None, time2_labels: Tensor | None) -> None:
        n, expected = x.shape[0], (self.in_channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"UNet: x must have shape [N, {shape}], got {list(x.shape)}")
        if noise_labels.shape != (n,):
            raise ValueError(f"UNet: noise_labels must have shape [{n}], got {list(noise_labels.shape)}")
        if self.num_classes > 0:
            if class_labels is None:
                raise ValueError(f"UNet: class_labels are required (num_classes={self.num_classes})")
            if class_labels.shape != (n,) or class_labels.dtype.is_floating_point:
                raise ValueError(f"UNet: class_labels must be an integer tensor of shape [{n}], "
                                 f"got {class_labels.dtype} {list(class_labels.shape)}")
        elif class_labels is not None:
            raise ValueError("UNet: class_labels given but the model is unconditional (num_classes=0)")
        if augment_labels is not None and (self.augment_dim == 0 or augment_labels.shape != (n, self.augment_dim)):
            raise ValueError(f"UNet: augment_labels must have shape [{n}, augment_dim={self.augment_dim}] (and "
                             f"augment_dim > 0), got {list(augment_labels.shape)}")
        if self.guidance_dim > 0 and (guidance is None or guidance.shape != (n,)):
            got = "none" if guidance is None else list(guidance.shape)
            raise ValueError(f"UNet: guidance must have shape [{n}] (guidance_dim={self.guidance_dim}), got {got}")
        if self.guidance_dim == 0 and guidance is not None:
            raise ValueError("UNet: guidance given but the network takes no guidance scale (guidance_dim=0)")
        if (time2_labels is None) != (self.map_time2 is None) or (time2_labels is not None
                                                                  and time2_labels.shape != (n,)):
            got = "none" if time2_labels is None else list(time2_labels.shape)
            raise ValueError(f"UNet: time2_labels must have shape [{n}] exactly when the network has "
                             f"time2_embedding (it has {'one' if self.map_time2 is not None else 'none'}), got {got}")

    def _encode(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The encoder with its input path: the lowest-resolution features and every skip, in push order."""
        h = self.enc_in(x)
        skips, aux, paths = [h], x, iter(self.enc_aux)
        for stage in self.enc:
            h = stage(h, emb)
            if stage.res.resample.mode == "down" and len(self.enc_aux):
                h, aux = next(paths)(h, aux)
            skips.append(h)
        return h, skips

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None, guidance: Tensor | None = None,
                time2_labels: Tensor | None = None) -> Tensor:
        """See the class docstring for the shape and dtype contract."""
        self._check_inputs(x, noise_labels, class_labels, augment_labels, guidance, time2_labels)
        emb = self._embed(noise_labels, class_labels, augment_labels, guidance, time2_labels)
        h, skips = self._encode(x, emb)
        for stage in self.mid:
            h = stage(h, emb)
        out, heads = None, iter(self.dec_heads)
        for i, (stage, pops) in enumerate(zip(self.dec, self._dec_pops, strict=True)):
            h = stage(torch.cat([h, skips.pop()], dim=1) if pops else h, emb)
            if i in self._head_after:
                out = self._add_output(out, next(heads)(h))
        out = self._add_output(out, self.out_conv(F.silu(self.out_norm(h))))
        return out.to(x.dtype)

    def _add_output(self, out: Tensor | None, head: Tensor) -> Tensor:
        """The progressive output path: the running output upsampled to ``head``'s level, plus ``head``."""
        return head if out is None or self.out_up is None else self.out_up(out) + head
