"""Diffusion teachers for consistency distillation (CD) and easy consistency tuning (ECT), and the stage-one
consistency models of TCM's stage two.

A teacher is a diffusion denoiser ``(x, sigma, cond) -> x0``: a cmkit EDM export (or run directory), or a
diffusers ``UNet2DModel`` folder through :mod:`cmkit.nets.foreign`. By default the student takes a cmkit
teacher's network and starts from its weights; with ``method.student_net=own`` it keeps the config's network,
which may be smaller: it starts from the teacher's weights only where the two networks are equal, else from
fresh weights, warm-started on the teacher's denoiser for ``method.warm_start_kimg`` (:mod:`cmkit.losses`).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from cmkit import checkpoint
from cmkit.codec import IDENTITY, KINDS, LATENT, codec_kind, data_codec
from cmkit.config import Config, DataConfig
from cmkit.errors import CmkitError
from cmkit.methods import REGISTRY, Capability, TeacherRole, method_entry, methods_that, teacher_methods
from cmkit.precond import ConsistencyFunction, EDMDenoiser


def is_cmkit_model(path: Path) -> bool:
    """True for a .safetensors file or a run directory holding one (what :func:`checkpoint.load_export` reads)."""
    return path.is_file() or (path / checkpoint.EXPORT_NAME).is_file()


def with_teacher(config: Config, teacher: str | Path) -> Config:
    """``config`` distilling/tuning ``teacher``: the path made absolute (so resuming works from anywhere),
    the teacher's codec (:func:`adopt_codec`) and, for a cmkit teacher and ``method.student_net=teacher``, the
    teacher's network (the student's dropout and guidance input, ``net.guidance_dim``, are kept: an LCM student is
    the teacher's network plus the w input)."""
    path = Path(teacher).resolve()
    if not method_entry(config.method.name).teacher.takes_teacher:
        raise CmkitError(f"--teacher: the {config.method.name} method trains without a teacher; "
                         f"teachers are for {', '.join(teacher_methods())}")
    if not path.exists():
        raise CmkitError(f"--teacher {teacher}: no such file or directory")
    config = replace(config, method=replace(config.method, teacher=str(path)))
    if not is_cmkit_model(path):
        _check_codec(config.data, DataConfig(), path)  # a diffusers UNet works on pixels
        return config
    stored = checkpoint.export_config(path)
    config = replace(config, data=adopt_codec(config.data, stored.data, path))
    if config.method.student_net == "teacher":
        config = replace(config, net=replace(stored.net, dropout=config.net.dropout,
                                             guidance_dim=config.net.guidance_dim))
    return config


def adopt_codec(student: DataConfig, teacher: DataConfig, path: Path) -> DataConfig:
    """The student's data with its teacher's codec: a student whose codec is the default identity, or the
    placeholder "latent", takes a latent teacher's autoencoder (a student works in its teacher's space); any other
    pair must already agree (:func:`_check_codec`)."""
    if student.codec in KINDS and codec_kind(teacher.codec) == LATENT and teacher.codec != LATENT:
        return replace(student, codec=teacher.codec, codec_digest=teacher.codec_digest)
    _check_codec(student, teacher, path)
    return student


def _check_codec(student: DataConfig, teacher: DataConfig, path: Path) -> None:
    """A student and its teacher work in one space: the same codec, pinned to the same file."""
    ours, theirs = (student.codec, student.codec_digest), (teacher.codec, teacher.codec_digest)
    if ours == theirs:
        return
    where = {IDENTITY: "pixel space", LATENT: "an autoencoder's latent space"}
    raise CmkitError(f"--teacher {path}: the teacher works in {where[codec_kind(teacher.codec)]} (data.codec="
                     f"{teacher.codec}), the student in {where[codec_kind(student.codec)]} (data.codec={student.codec})"
                     "; a student must work in its teacher's space: leave data.codec at identity to adopt the "
                     "teacher's, or choose a teacher trained with the same autoencoder")


def load_teacher(config: Config, *, device: torch.device) -> nn.Module | None:
    """The frozen teacher ``config.method.teacher`` names, checked against the data; None for methods
    without one. Raises CmkitError for a missing teacher, a consistency model or a mismatched shape."""
    m = config.method
    role = method_entry(m.name).teacher
    if not role.takes_teacher:
        return None
    if not m.teacher:
        if role is TeacherRole.INIT_OPTIONAL:
            return None
        if role is TeacherRole.STAGE_ONE:
            raise CmkitError(f"method {m.name} is the second stage of a trained consistency model: pass --teacher "
                             "MODEL (a run of fmnist-ect, fmnist-ict or another consistency preset)")
        raise CmkitError(f"method {m.name} starts from a trained diffusion model: pass --teacher MODEL "
                         "(a run of an *-edm preset, or a diffusers UNet folder)")
    path = Path(m.teacher)
    if is_cmkit_model(path):
        teacher, stored, _ = checkpoint.load_export(path, device=device)
        if role is TeacherRole.STAGE_ONE:
            _check_stage_one(stored, m.name, path)
        elif not method_entry(stored.method.name).can(Capability.TEACH):
            raise CmkitError(f"--teacher {path}: a model trained with {stored.method.name}; a teacher must have the "
                             f"'teach' capability (trained with {', '.join(methods_that(Capability.TEACH))}: a "
                             "diffusion model, an *-edm preset)")
        _check_codec(config.data, stored.data, path)
        if m.student_net == "teacher":
            _check_same_net(stored, config, path)
        if m.guidance_range is not None:
            _check_guidable(stored, path)
    elif path.is_dir():
        from cmkit.nets.foreign import check_noise_range, is_diffusers_folder, load_diffusers_teacher

        _check_codec(config.data, DataConfig(), path)
        if not is_diffusers_folder(path):
            raise CmkitError(f"--teacher {path}: neither a cmkit run directory (no {checkpoint.EXPORT_NAME}) "
                             "nor a diffusers UNet2DModel folder")
        if role is TeacherRole.STAGE_ONE:
            raise CmkitError(f"--teacher {path}: {m.name.upper()}'s stage one must be a cmkit consistency model (a "
                             "diffusers UNet is a diffusion model); train one with fmnist-ect or fmnist-ict first")
        if role.seeds_only or m.guidance_range is not None:
            why = "starts from the teacher's own weights" if role.seeds_only else "guides its teacher's labels"
            raise CmkitError(f"--teacher {path}: {m.name.upper()} {why}, which needs a cmkit EDM model; a diffusers "
                             "teacher can be distilled with a cd or scd preset instead")
        if config.train.p_uncond > 0:  # CD hands the student's labels to the teacher, null labels included
            raise CmkitError(f"--teacher {path}: a diffusers UNet has no null class label for the labels that "
                             f"train.p_uncond={config.train.p_uncond:g} drops; distil it with train.p_uncond=0")
        teacher = load_diffusers_teacher(path, device=device)
        lowest, highest = _grid_range(config)
        check_noise_range(teacher, sigma_min=lowest, sigma_max=highest, where=f"--teacher {path}")
    else:
        raise CmkitError(f"--teacher {path}: no such file or directory")
    _check_fit(teacher, config, path)
    return teacher


def _check_stage_one(stored: Config, method: str, path: Path) -> None:
    """A stage-one model (TCM) seeds the student and is its target below the truncation time, so it must be a model
    of the student's parameterisation (:class:`cmkit.precond.ConsistencyFunction`: CT, iCT, CD, ECT, TCM)."""
    wrapper = method_entry(method).wrapper
    if method_entry(stored.method.name).wrapper is not wrapper:
        same = [name for name, entry in REGISTRY.items() if entry.wrapper is wrapper]
        raise CmkitError(f"--teacher {path}: a model trained with {stored.method.name}; {method.upper()}'s stage one "
                         f"must be a consistency model of its parameterisation (trained with {', '.join(same)})")


def _check_guidable(stored: Config, path: Path) -> None:
    """A teacher sampled with classifier-free guidance (LCM) must be class-conditional and have learnt the null
    label (``train.p_uncond > 0``)."""
    if stored.net.num_classes == 0 or stored.train.p_uncond == 0:
        raise CmkitError(f"--teacher {path}: LCM samples its teacher with classifier-free guidance, which needs a "
                         f"class-conditional teacher trained with label dropout; this one has net.num_classes="
                         f"{stored.net.num_classes} and train.p_uncond={stored.train.p_uncond:g} (train it with "
                         "--set net.num_classes=10 train.p_uncond=0.1)")


def _grid_range(config: Config) -> tuple[float, float]:
    """The lowest and highest noise levels of the grid the method evaluates its teacher at (CD's Karras grid)."""
    return config.method.sigma_min, config.method.sigma_max


def _check_fit(teacher: nn.Module, config: Config, path: Path) -> None:
    """The teacher's model space (its resolution and channels) is the student's (the codec's shape)."""
    classes = config.net.num_classes
    channels, resolution, _ = data_codec(config.data).shape
    got = (teacher.resolution, teacher.channels, teacher.num_classes)
    if got != (resolution, channels, classes):
        raise CmkitError(f"--teacher {path}: a {got[0]}x{got[0]} model with {got[1]} channel(s) and {got[2]} "
                         f"classes does not fit the data ({resolution}x{resolution}, {channels} channel(s) in model "
                         f"space) and net.num_classes={classes}")


def _check_same_net(stored: Config, config: Config, path: Path) -> None:
    """With ``method.student_net=teacher`` the student's network must be the teacher's (dropout aside)."""
    diff = _net_diff(stored, config)
    if diff:
        raise CmkitError(f"--teacher {path}: with method.student_net=teacher the student is the teacher's network "
                         f"({diff}); drop those net.* settings, or set method.student_net=own for a student of its "
                         "own shape (fresh weights; see method.warm_start_kimg)")


def _net_diff(stored: Config, config: Config) -> str:
    """``net.key: teacher's (teacher) vs student's`` for each field where the networks differ, dropout and the
    guidance input aside."""
    theirs = asdict(replace(stored.net, dropout=config.net.dropout, guidance_dim=config.net.guidance_dim))
    ours = asdict(config.net)
    return ", ".join(f"net.{k}: {theirs[k]} (teacher) vs {ours[k]}" for k in ours if ours[k] != theirs[k])


def same_net(config: Config) -> bool:
    """True when the student's network (``config.net``) is its cmkit teacher's, dropout aside (False for a teacher
    passed in memory, with no file to compare with)."""
    return bool(config.method.teacher) and not _net_diff(checkpoint.export_config(config.method.teacher), config)


def init_student(student: nn.Module, teacher: nn.Module | None, config: Config) -> None:
    """Start the student from a cmkit teacher's backbone weights (CD, ECT, sCT, sCD; TCM from its stage-one model)
    when its network is the teacher's (``student_net=teacher``, or an ``own`` network equal to it); otherwise it
    keeps its fresh weights
    (a warning when no warm-start follows). A diffusers teacher cannot seed a cmkit student (ECT and sCT refuse
    one in :func:`load_teacher`)."""
    if teacher is None:
        return
    seeds = isinstance(teacher, EDMDenoiser) or type(teacher) is ConsistencyFunction  # TCM's stage one
    if seeds and (config.method.student_net == "teacher" or same_net(config)):
        student.adopt_backbone(teacher)
        return
    if config.method.warm_start_kimg == 0:
        why = "a diffusers teacher" if not isinstance(teacher, EDMDenoiser) else "the student's own network"
        warnings.warn(f"{why} cannot seed the student: it starts from fresh weights with no warm-start "
                      "(method.warm_start_kimg=0)", stacklevel=2)
