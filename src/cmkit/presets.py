"""The named presets: every config ``cmkit train --preset NAME`` starts from, with a one-line description.

Fashion-MNIST presets are sized for 2 CPU cores; CIFAR-10 presets follow the papers and their official code (the
tables in docs/methods.md give every value with its source).
"""

from __future__ import annotations

from dataclasses import replace

from cmkit.augment import AUGMENT_DIM
from cmkit.autoencoder import AEConfig
from cmkit.config import Config, DataConfig, NetConfig, TrainConfig
from cmkit.errors import CmkitError
from cmkit.methods import (
    CDConfig,
    CTConfig,
    ECTConfig,
    EDMConfig,
    ICTConfig,
    LCMConfig,
    MeanFlowConfig,
    SCDConfig,
    SCTConfig,
    TCMConfig,
)

# ---------------------------------------------------------------------------------------------- presets

_FMNIST_NET = NetConfig(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(7,))
# The latent network of Fashion-MNIST (4x7x7 latents of fmnist-ae): one level, class-conditional.
_FMNIST_LATENT_NET = NetConfig(model_channels=64, channel_mult=(1,), num_blocks=2, attn_resolutions=(7,),
                               num_classes=10)
# DDPM++ as in EDM's CIFAR-10 setup (55.7M parameters), with the positional noise embedding.
_CIFAR_NET = NetConfig(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                       dropout=0.13)
# NCSN++ at the same size, with EDM's settings (EDM's train.py, --arch=ncsnpp; 56.4M parameters): Fourier noise
# embedding of scale 16 (NetConfig's default, as in EDM and in the CM paper's config, model.fourier_scale = 16, so
# cifar10-ct and cifar10-cd keep it; only cifar10-ict sets 0.02, iCT Sec. 3.2), a noise embedding twice as wide,
# the residual (progressive-growing) encoder input path, the standard decoder, FIR resampling (1, 3, 3, 1). EDM's
# CIFAR-10 runs also feed augmentation labels (augment_dim=9): cifar10-edm-ncsnpp adds them.
_CIFAR_NCSNPP = replace(_CIFAR_NET, embedding="fourier", channel_mult_noise=2, encoder_type="residual",
                        resample_filter=(1, 3, 3, 1))
# Random x-flips: the CM reference flips its CIFAR-10 images (openai/consistency_models_cifar10,
# configs/default_cifar10_configs.py). EDM and ECT flip only inside EDM's augmentation pipeline (their --xflip
# defaults to False).
_CIFAR_DATA = DataConfig(source="cifar10", resolution=32, channels=3, xflip=True)
# The small students: half the channels, a quarter of the parameters (Fashion-MNIST 0.44M against 1.75M,
# CIFAR-10 14.0M against 55.7M), the same layout otherwise.
_FMNIST_SMALL = replace(_FMNIST_NET, model_channels=16)
_CIFAR_SMALL = replace(_CIFAR_NET, model_channels=64, dropout=0.0)

_EDM = EDMConfig(p_mean=-1.2, p_std=1.2)
_CT = CTConfig(s0=2, s1=150, mu0=0.9, distance="l2")
_ICT = ICTConfig()
# CD (CM paper, Alg. 2 and Table 3): fixed N = 18 Karras levels, Heun teacher step, uniform pair index.
_CD = CDConfig(num_scales=18, mu=0.0, solver="heun", distance="l2")
# ECT (Geng et al. 2024): ln t ~ N(-1.1, 2^2), q = 2, weight 1 / (t - r), pseudo-Huber with a small c.
_ECT = ECTConfig(p_mean=-1.1, p_std=2.0, q=2.0, distance="pseudo-huber")
# sCM (Lu and Song 2024, CIFAR-10), the configs' defaults: tau ~ N(-1.0, 1.4^2), tangent warm-up over 10k
# iterations (at batch 512: 5,120 kimg), g / (||g|| + 0.1); log-sigma time input so that a cmkit EDM teacher seeds
# the student exactly.
_SCT, _SCD = SCTConfig(), SCDConfig()
# MeanFlow (Geng et al. 2025): MeanFlowConfig's defaults are the paper's CIFAR-10 run (Gsunshine/py-meanflow,
# scripts/cifar10_v0.sh: t, r ~ logit-normal(-2, 2), sorted, 75% with r != t, p = 0.75, c = 1e-3); "v1" is the
# repository's later default sampler (train_arg_parser.py, scripts/cifar10_v1.sh): t ~ LN(-0.6, 1.6), r ~ LN(-4, 1.6),
# clipped, the rest equal.
_MEANFLOW = MeanFlowConfig()
_MEANFLOW_V1 = replace(_MEANFLOW, t_mean=-0.6, t_std=1.6, r_mean=-4.0, r_std=1.6, pairing="clipped")

# The training loop of the Fashion-MNIST presets (batch 64, 150k images; RAdam 4e-4 unless a preset says otherwise),
# in bf16 where the machine computes it natively, else fp32 (cmkit.machine; emulated bf16 is ~5x slower).
_FMNIST_TRAIN = TrainConfig(kimg=150, batch=64, optimizer="radam", lr=4e-4, ema_halflife_kimg=10, ckpt_kimg=25,
                            snap_kimg=25, precision="auto")
# sCM at CPU size: the fmnist-ect schedule (RAdam 4e-4, batch 64) with the paper's betas (0.9, 0.99) and a tangent
# warm-up over the first 10k images.
_FMNIST_SCM_TRAIN = replace(_FMNIST_TRAIN, betas=(0.9, 0.99))
_FMNIST_SCT, _FMNIST_SCD = (replace(method, tangent_warmup_kimg=10) for method in (_SCT, _SCD))
# fmnist-cd's method (its target rate mu: the comment above fmnist-cd).
_FMNIST_CD = replace(_CD, distance="pseudo-huber", mu=0.95)
# CT and CD on CIFAR-10 (CM paper, Table 3; openai/consistency_models_cifar10 configs): 800k iterations at batch 512,
# RAdam 4e-4 warmed up over 10M images, EMA 0.9999 per iteration (a half-life of 6,931 iterations, 3,549 kimg).
_CM_CIFAR_NET = replace(_CIFAR_NCSNPP, dropout=0.0)  # their network (config model.name 'ncsnpp', dropout 0)
_CM_CIFAR_TRAIN = TrainConfig(kimg=409_600, batch=512, optimizer="radam", lr=4e-4, warmup_kimg=10_000,
                              ema_halflife_kimg=3_549, ema_rampup=0.0, ckpt_kimg=5_000, snap_kimg=5_000, log_kimg=100)
# sCT and sCD on CIFAR-10 (Lu and Song 2024, App. G.2; the comment above cifar10-sct gives the sources).
_SCM_CIFAR_TRAIN = TrainConfig(kimg=204_800, batch=512, optimizer="radam", lr=1e-4, betas=(0.9, 0.99),
                               ema_halflife_kimg=500, ckpt_kimg=5_000, snap_kimg=5_000, log_kimg=100)

# EDM on CIFAR-10 (Karras et al. 2022, Table 7; NVlabs/edm train.py): DDPM++, the non-leaking augmentation
# pipeline with p = 0.12 and its 9 labels fed to the network, no dataset x-flips (the pipeline flips), the loss summed
# over pixels (training/training_loop.py).
_CIFAR_EDM = Config(preset="cifar10-edm", net=replace(_CIFAR_NET, augment_dim=AUGMENT_DIM),
                    data=replace(_CIFAR_DATA, xflip=False, augment=0.12), method=_EDM,
                    train=TrainConfig(kimg=200_000, batch=512, optimizer="adam", lr=1e-3, warmup_kimg=10_000,
                                      ema_halflife_kimg=500, ckpt_kimg=2_500, snap_kimg=2_500, log_kimg=50,
                                      loss_reduction="sum"))



def _fmnist_small_student(method: CDConfig | SCDConfig, warm_start_kimg: float) -> CDConfig | SCDConfig:
    """``method`` distilled into the config's own, smaller network (fresh weights), after a warm-start of
    ``warm_start_kimg`` thousand images at fmnist-edm's rate, 1e-3 (docs/methods.md, "Smaller students")."""
    return replace(method, student_net="own", warm_start_kimg=warm_start_kimg, warm_start_lr=1e-3)


PRESETS: dict[str, tuple[str, Config]] = {
    "fmnist-edm": (
        "EDM diffusion teacher, 1.7M-parameter U-Net, Fashion-MNIST 28x28 (CPU size)",
        Config(preset="fmnist-edm", net=_FMNIST_NET, method=_EDM,
               train=replace(_FMNIST_TRAIN, optimizer="adam", lr=1e-3)),
    ),
    # mu0 = 0 (the target is the student under stop-gradient, still Alg. 3): the paper's EMA target (mu0 = 0.9) lags
    # a fifth of a 10-minute run behind and its one-step samples stay flat grey (docs/methods.md, CT).
    "fmnist-ct": (
        "Consistency training (CT, Song et al. 2023), sqrt curriculum to N=41, stop-gradient target, Fashion-MNIST",
        Config(preset="fmnist-ct", net=_FMNIST_NET, method=replace(_CT, s1=40, mu0=0.0),
               train=replace(_FMNIST_TRAIN, optimizer="adam")),
    ),
    "fmnist-ict": (
        "Improved consistency training (iCT), N 11->81, pseudo-Huber, Fashion-MNIST (CPU size)",
        Config(preset="fmnist-ict", net=_FMNIST_NET, method=replace(_ICT, s1=80),
               train=replace(_FMNIST_TRAIN, lr=1e-3)),
    ),
    # The EMA target (mu = 0.95, the paper's ImageNet-64/LSUN rate): with mu = 0 at batch 64, 1-step samples
    # turned into noise textures within 6k images (4e-4) or 12k (1e-4); mu = 0.95 or 0.9 stayed stable.
    "fmnist-cd": (
        "Consistency distillation (CD) from an fmnist-edm teacher (--teacher): N=18, Heun, mu=0.95, pseudo-Huber",
        Config(preset="fmnist-cd", net=_FMNIST_NET, method=_FMNIST_CD, train=_FMNIST_TRAIN),
    ),
    # LCM (Luo et al. 2023; diffusers' train_lcm_distill_sd_wds.py): N = 1000 grid points skipped k = 20 at a time,
    # the DDIM (Euler) step of the guided teacher, per-value pseudo-Huber c = 0.001, EMA target 0.95. The guidance
    # range is Fashion-MNIST's, not SD's [6, 16] (docs/methods.md); the student is the teacher's network plus a w input
    # of the noise embedding's width. The teacher: a class-conditional EDM model trained with label dropout.
    # LCM of fmnist-latent-edm: the student adopts the teacher's autoencoder and network (plus the w input) and,
    # like the teacher, takes the scaled latents' standard deviation, 1, as sigma_data.
    "fmnist-lcm": (
        "Latent consistency distillation (LCM) of a guided latent teacher (--teacher fmnist-latent-edm): w in [1, 3]",
        Config(preset="fmnist-lcm", net=replace(_FMNIST_NET, num_classes=10, guidance_dim=32),
               data=DataConfig(codec="latent"), method=LCMConfig(w_min=1.0, w_max=3.0, w_default=2.0, sigma_data=1.0),
               train=_FMNIST_TRAIN),
    ),
    # The small student: fmnist-cd's recipe on a network of a quarter the teacher's parameters. Its shape differs from
    # the teacher's, so it starts from fresh weights and first regresses the teacher's denoiser for 16k images (a third
    # of the quick ladder's 48k) at the teacher's own rate, 1e-3: at CD's 4e-4 the student never became a denoiser
    # (docs/methods.md, "Smaller students": 1-step fid-fmnist 393 against 590 at 4k images). Half-width beats a
    # 20-channel one-block net of the same size on latency (2.4x against 1.9x the full-size student's 1-image speed).
    "fmnist-cd-small": (
        "CD into a 4x smaller student (0.44M parameters) of an fmnist-edm teacher (--teacher), 16k-image warm-start",
        Config(preset="fmnist-cd-small", net=_FMNIST_SMALL,
               method=_fmnist_small_student(_FMNIST_CD, 16), train=_FMNIST_TRAIN),
    ),
    "fmnist-ect": (
        "Easy consistency tuning (ECT) of an fmnist-edm teacher (--teacher): q=2, a stage every 6k images",
        Config(preset="fmnist-ect", net=_FMNIST_NET, method=replace(_ECT, stage_kimg=6),
               train=_FMNIST_TRAIN),
    ),
    "fmnist-sct": (
        "Continuous-time consistency training (sCT) from an fmnist-edm teacher (--teacher), TrigFlow, Fashion-MNIST",
        Config(preset="fmnist-sct", net=_FMNIST_NET, method=_FMNIST_SCT, train=_FMNIST_SCM_TRAIN),
    ),
    "fmnist-scd": (
        "Continuous-time consistency distillation (sCD) from an fmnist-edm teacher (--teacher), TrigFlow",
        Config(preset="fmnist-scd", net=_FMNIST_NET, method=_FMNIST_SCD, train=_FMNIST_SCM_TRAIN),
    ),
    # sCD into the small student (issue 30): fmnist-scd's recipe on fmnist-cd-small's network, after a warm-start at
    # the teacher's rate twice fmnist-cd-small's. At the quick ladder's 48k images it is the best small distilled
    # student (1-step fid-fmnist 64.2, against 73.7 after a 16k warm-start and 107.8 for fmnist-cd-small), and sCD
    # needs at least 16k images after it (a 40k warm-start: 138.3): docs/methods.md, "Smaller students".
    "fmnist-scd-small": (
        "sCD into a 4x smaller student (0.44M parameters) of an fmnist-edm teacher (--teacher), 32k-image warm-start",
        Config(preset="fmnist-scd-small", net=_FMNIST_SMALL,
               method=_fmnist_small_student(_FMNIST_SCD, 32), train=_FMNIST_SCM_TRAIN),
    ),
    # The guided latent teacher (docs/latent.md): EDM on the 4x7x7 latents of an fmnist-ae autoencoder (data.codec),
    # class-conditional with 10% label dropout for classifier-free guidance (Ho and Salimans 2022: p_uncond 0.1-0.2).
    # The latent is 7x7, which does not halve evenly: a one-level U-Net of 64 channels with attention (0.93M
    # parameters; about a fifth of fmnist-edm's compute per sample). sigma_data = 1: the autoencoder scales its latents
    # to unit standard deviation (LDM's scale factor), and EDM's sigma_data is the data's standard deviation.
    "fmnist-latent-edm": (
        "Guided latent EDM teacher on an fmnist-ae latent (--set data.codec=AE_RUN), class-conditional, p_uncond 0.1",
        Config(preset="fmnist-latent-edm", net=_FMNIST_LATENT_NET, data=DataConfig(codec="latent"),
               method=replace(_EDM, sigma_data=1.0),
               train=replace(_FMNIST_TRAIN, optimizer="adam", lr=1e-3, p_uncond=0.1)),
    ),
    # MeanFlow at CPU size: the fmnist-* network and loop with the paper's optimiser (Adam 6e-4, betas (0.9, 0.999),
    # py-meanflow's train_arg_parser.py) and no warm-up (the paper's 200 epochs would be 10M images), the later "v1"
    # time sampler (cmkit's choice for short runs: it puts more of t near 1, where one-step sampling starts).
    "fmnist-meanflow": (
        "MeanFlow (Geng et al. 2025), one-step from scratch, average velocity by a JVP, Adam 6e-4, Fashion-MNIST",
        Config(preset="fmnist-meanflow", net=_FMNIST_NET, method=_MEANFLOW_V1,
               train=replace(_FMNIST_TRAIN, optimizer="adam", lr=6e-4)),
    ),
    # TCM's stage two at CPU size (Lee et al. 2025): the paper's truncation and time distribution (TCMConfig's
    # defaults), fmnist-ect's stage length and batch, half of stage one's learning rate (the paper: 1e-4 -> 5e-5).
    # Stage two continues stage one's ECT schedule: set method.start_stage to stage one's final stage (an fmnist-ect
    # run of K kimg ends at stage K / 6); stage one may be any consistency model of fmnist-ect's parameterisation.
    "fmnist-tcm": (
        "Truncated consistency model (TCM) stage two of a consistency model (--teacher, e.g. fmnist-ect): t' = 1",
        Config(preset="fmnist-tcm", net=_FMNIST_NET, method=TCMConfig(stage_kimg=6),
               train=replace(_FMNIST_TRAIN, lr=2e-4)),
    ),
    "cifar10-edm": (
        "EDM teacher as published: DDPM++ 56M, 200 Mimg, batch 512, Adam 1e-3, EDM's augmentation p=0.12, summed loss",
        _CIFAR_EDM,
    ),
    # EDM's NCSN++ configuration (EDM Table 2 config F: --arch=ncsnpp with EDM's preconditioning, the rest as
    # cifar10-edm), the network of the CM paper's CIFAR-10 teacher and students.
    "cifar10-edm-ncsnpp": (
        "EDM teacher on NCSN++ (56.4M, EDM's --arch=ncsnpp), otherwise cifar10-edm: the CD paper's teacher network",
        replace(_CIFAR_EDM, preset="cifar10-edm-ncsnpp", net=replace(_CIFAR_NCSNPP, augment_dim=AUGMENT_DIM)),
    ),
    # CT (CM paper, Alg. 3 and Table 3; openai/consistency_models_cifar10 configs/cifar10_ve_ct_adaptive.py): s0 = 2,
    # s1 = 150, mu0 = 0.9, 800k iterations at batch 512, RAdam, lr 4e-4 (the paper's Table 3; that config has 2e-4),
    # a linear warm-up over 10M images and EMA 0.9999 (both from the config), no dropout, NCSN++ (model.name 'ncsnpp'
    # in that config) with Fourier features of scale 16. LPIPS has no offline weights: l2 (the mean
    # squared difference, jcm/losses.py's l2), the closest distance cmkit has.
    "cifar10-ct": (
        "CT as published (l2: LPIPS has no offline weights): sqrt curriculum N 3->151, EMA target mu0=0.9, RAdam 4e-4",
        Config(preset="cifar10-ct", net=_CM_CIFAR_NET, data=_CIFAR_DATA, method=_CT,
               train=_CM_CIFAR_TRAIN),
    ),
    "cifar10-ict": (
        "iCT as published: NCSN++, 400k iterations at batch 1024, RAdam 1e-4, dropout 0.3, Fourier scale 0.02",
        Config(preset="cifar10-ict", net=replace(_CIFAR_NCSNPP, dropout=0.3, fourier_scale=0.02),
               data=_CIFAR_DATA, method=_ICT,
               # EMA 0.99993 per iteration at batch 1024 has a half-life of ~9.9k iterations (10,140 kimg).
               train=TrainConfig(kimg=409_600, batch=1024, optimizer="radam", lr=1e-4,
                                 ema_halflife_kimg=10_140, ema_rampup=0.0, ckpt_kimg=5_000,
                                 snap_kimg=5_000, log_kimg=100)),
    ),
    # CD (openai/consistency_models_cifar10 configs/cifar10_ve_cd.py): the learning rate warms up over 10M images;
    # the student is the teacher's network (student_net=teacher), NCSN++ in the paper (model.name 'ncsnpp', a VE EDM
    # teacher): distil a cifar10-edm-ncsnpp run for that; a cifar10-edm teacher gives a DDPM++ student.
    "cifar10-cd": (
        "CD as published (l2: LPIPS has no offline weights) of a cifar10-edm-ncsnpp teacher: N=18, Heun, mu=0, 800k it",
        Config(preset="cifar10-cd", net=_CM_CIFAR_NET, data=_CIFAR_DATA, method=_CD,
               train=_CM_CIFAR_TRAIN),
    ),
    # cifar10-cd on the half-width DDPM++ (14.0M parameters against 55.7M). The warm-start (20,480 kimg, 40k iterations
    # at batch 512, 5% of the run) is cmkit's choice: the CM paper distils into the teacher's own network only.
    "cifar10-cd-small": (
        "CD into a 4x smaller student (DDPM++ 14.0M) of a cifar10-edm teacher (--teacher), l2, 40k-it warm-start",
        Config(preset="cifar10-cd-small", net=_CIFAR_SMALL, data=_CIFAR_DATA,
               method=replace(_CD, student_net="own", warm_start_kimg=20_480),
               train=_CM_CIFAR_TRAIN),
    ),
    # ECT (locuslab/ect ct_train.py, run_ecm.sh): the l2 norm (-c 0.0: pseudo-Huber with c = 0), no x-flips
    # (--xflip false, --augment 0), a stage every 250 ticks of 12.8 kimg; 400k iterations is the paper's longest run
    # (run_ecm.sh runs 25.6 Mimg, 200k).
    "cifar10-ect": (
        "ECT as published: batch 128, RAdam 1e-4, dropout 0.2, l2 norm, no flips, q=2, a stage every 25k it, 400k it",
        Config(preset="cifar10-ect", net=replace(_CIFAR_EDM.net, dropout=0.2), data=replace(_CIFAR_DATA, xflip=False),
               method=replace(_ECT, stage_kimg=3_200, huber_c=0.0),
               # EMA 0.9999 per iteration at batch 128: a half-life of 6,931 iterations (887 kimg).
               train=TrainConfig(kimg=51_200, batch=128, optimizer="radam", lr=1e-4, ema_halflife_kimg=887,
                                 ema_rampup=0.0, ckpt_kimg=1_000, snap_kimg=1_000, log_kimg=25)),
    ),
    # sCT and sCD as Lu and Song 2024 (arXiv 2410.11081 v2) train them on CIFAR-10 (App. G.2), from a cifar10-edm
    # teacher (--teacher) whose EMA weights seed the student (App. G.2: "we always initialize the CM from the EMA
    # parameters of the teacher"). Batch 512: the teacher's batch (App. G.1; G.2 keeps the teacher's batch). RAdam,
    # lr 1e-4, betas (0.9, 0.99), eps 1e-8 (torch's default), no learning-rate schedule (App. G.2). EMA half-life
    # 0.5 Mimg (App. G.2, citing EDM; EDM's ramp-up ratio 0.05, cmkit's default, is kept). Dropout 0.20 for sCT,
    # 0 for sCD (App. G.2). tau ~ N(-1.0, 1.4^2), c = 0.1, tangent warm-up H = 10k iterations = 5,120 kimg at
    # batch 512 (App. G.2 and Sec. 4.2): _SCT / _SCD above. Training length: the paper gives none for CIFAR-10;
    # 400k iterations (204,800 kimg) is its sCT and sCD length on ImageNet 64x64 (Table 4), its CIFAR-10
    # teacher's length at the same batch (App. G.1), and the end of its CIFAR-10 sCT-vs-ECT comparison (App. E.3,
    # batch 128). sCD converges much sooner (Sec. 5.2: good 2-step samples after 20k iterations): shorten with
    # --kimg. Deviations, both forced by cmkit's EDM teacher: c_noise = log-sigma instead of the paper's t
    # (Sec. 4.1), so that the teacher's network is the TrigFlow student exactly; no adaptive double
    # normalisation (net.double_norm=false), which the teacher's network lacks. DDPM++ with positional time
    # embedding, as the paper's (Sec. 4.1) and EDM's.
    "cifar10-sct": (
        "sCT, the paper's CIFAR-10 recipe, from a cifar10-edm teacher (--teacher): batch 512, RAdam 1e-4, dropout 0.2",
        Config(preset="cifar10-sct", net=replace(_CIFAR_EDM.net, dropout=0.2), data=_CIFAR_DATA, method=_SCT,
               train=_SCM_CIFAR_TRAIN),
    ),
    "cifar10-scd": (
        "sCD, the paper's CIFAR-10 recipe, from a cifar10-edm teacher (--teacher): batch 512, RAdam 1e-4, no dropout",
        Config(preset="cifar10-scd", net=replace(_CIFAR_EDM.net, dropout=0.0), data=_CIFAR_DATA, method=_SCD,
               train=_SCM_CIFAR_TRAIN),
    ),
    # TCM's CIFAR-10 stage two (Lee et al. 2025; NVlabs/TCM README, "Stage-2 (CIFAR-10)"): DDPM++ (--arch=ddpmpp, the
    # stage-one network, taken from --teacher) with dropout 0.2, no augmentation, no x-flips (ct_train.py's default),
    # batch 1024, RAdam lr 5e-5 with betas (0.9, 0.999) and no ramp-up, EMA 0.9999 per iteration (ct_train.py's
    # default; a half-life of 6,931 iterations at batch 1024: 7,098 kimg), -c 1e-8 (the l2 norm: huber_c=0), t' = 1,
    # ln t ~ t_0.01(0, 0.2) on [ln 1, ln 80], boundary share 0.25 at weight 0.1, q = 2 every 25k iterations
    # (25,600 kimg), ratio limit 0.999; 3M iterations is the command's duration (an upper bound: the paper reports its
    # best checkpoint). The stage continues stage one's (--resume_tick): set method.start_stage. Stage one (the same
    # README): ECT of an EDM model at batch 512, RAdam 1e-4, dropout 0.2, a stage every 25k iterations, ln t ~ N(-1.1,
    # 2^2): cifar10-ect with --set train.batch=512 method.stage_kimg=12800.
    "cifar10-tcm": (
        "TCM stage two as published, of a cifar10-ect stage one (--teacher): t'=1, batch 1024, RAdam 5e-5, dropout 0.2",
        Config(preset="cifar10-tcm", net=replace(_CIFAR_EDM.net, dropout=0.2), data=replace(_CIFAR_DATA, xflip=False),
               method=TCMConfig(huber_c=0.0),
               train=TrainConfig(kimg=3_072_000, batch=1024, optimizer="radam", lr=5e-5, ema_halflife_kimg=7_098,
                                 ema_rampup=0.0, ckpt_kimg=5_000, snap_kimg=5_000, log_kimg=100)),
    ),
    # MeanFlow's CIFAR-10 run (Geng et al. 2025, App. A; Gsunshine/py-meanflow, scripts/cifar10_v0.sh and
    # models/model_configs.py): EDM's DDPM++ U-Net with channel_mult_noise 2 and FIR filter (1, 3, 3, 1) (its
    # model_configs.py; 55M), dropout 0.2, EDM's augmentation at p = 0.12 with its labels as a condition (train.py;
    # cmkit's pipeline is EDM's CIFAR-10 one, 9 labels, where the paper's turns y-flips and rotations off: 6 labels),
    # no dataset x-flips, batch 1024 (8 x 128), 16,000 epochs (800 Mimg, ~780k iterations), Adam lr 6e-4 with betas
    # (0.9, 0.999), a linear warm-up over 200 epochs (10 Mimg) then constant, EMA 0.9999 per iteration (a half-life of
    # 6,931 iterations at batch 1024: 7,098 kimg). The method: MeanFlowConfig's defaults (the paper's sampler "v0").
    "cifar10-meanflow": (
        "MeanFlow as published: DDPM++ 55M, batch 1024, Adam 6e-4, dropout 0.2, EDM augmentation p=0.12, 800 Mimg",
        Config(preset="cifar10-meanflow",
               net=replace(_CIFAR_NET, channel_mult_noise=2, resample_filter=(1, 3, 3, 1), dropout=0.2,
                           augment_dim=AUGMENT_DIM),
               data=replace(_CIFAR_DATA, xflip=False, augment=0.12), method=_MEANFLOW,
               train=TrainConfig(kimg=800_000, batch=1024, optimizer="adam", lr=6e-4, warmup_kimg=10_000,
                                 ema_halflife_kimg=7_098, ema_rampup=0.0, ckpt_kimg=5_000, snap_kimg=5_000,
                                 log_kimg=100)),
    ),
}


def preset(name: str) -> Config:
    """The named preset; an unknown name raises CmkitError listing the known ones."""
    if name in AE_PRESETS:
        raise CmkitError(f"--preset {name}: an autoencoder preset; train it with 'cmkit train-ae --preset {name}'")
    if name not in PRESETS:
        raise CmkitError(f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}")
    return PRESETS[name][1]



# ------------------------------------------------------------------------------------ autoencoder presets

# The autoencoders of latent models (cmkit train-ae, cmkit.autoencoder): LDM's KL autoencoder at CPU size, f = 4
# (two halvings), 4 latent channels (LDM's KL-f4 has 3; 4 as its f8 and Stable Diffusion's), kl_weight 1e-6 (LDM's
# configs), Adam 1e-3 (a CPU budget of a few epochs; LDM trains for far longer at 4.5e-6 x batch).
AE_PRESETS: dict[str, tuple[str, AEConfig]] = {
    "fmnist-ae": (
        "KL autoencoder (LDM style) for Fashion-MNIST: 28x28x1 -> latent 4x7x7, L1 + 1e-6 KL, 30k images",
        AEConfig(preset="fmnist-ae", model_channels=16, channel_mult=(1, 2, 4), kimg=30, batch=64, lr=1e-3),
    ),
    "cifar10-ae": (
        "KL autoencoder (LDM style) for CIFAR-10: 32x32x3 -> latent 4x8x8, L1 + 1e-6 KL, 1M images",
        AEConfig(preset="cifar10-ae", source="cifar10", resolution=32, channels=3, model_channels=64,
                 channel_mult=(1, 2, 2), kimg=1000, batch=128, lr=1e-3),
    ),
}


def ae_preset(name: str) -> AEConfig:
    """The named autoencoder preset; CmkitError listing the known ones otherwise (and pointing a model preset
    to ``cmkit train``)."""
    if name in PRESETS:
        raise CmkitError(f"--preset {name}: a model preset; train it with 'cmkit train --preset {name}' "
                         f"(autoencoder presets: {', '.join(AE_PRESETS)})")
    if name not in AE_PRESETS:
        raise CmkitError(f"unknown autoencoder preset '{name}'; known: {', '.join(AE_PRESETS)}")
    return AE_PRESETS[name][1]
