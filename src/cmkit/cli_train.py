"""The training commands of the command line: ``cmkit train`` (the config from a preset and the options, in a fixed
precedence; ``--minutes``; ``--dry-run``) and ``cmkit train-ae``. User errors raise :class:`cmkit.errors.CmkitError`;
:mod:`cmkit.cli` prints them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from cmkit.config import Config, apply_overrides, override_fields, validate
from cmkit.errors import CmkitError
from cmkit.presets import preset


def build_config(args: argparse.Namespace) -> Config:
    """Preset, then --data (known datasets bring their native size), then --kimg/--ckpt-kimg/--seed/--keep/
    --precision/--accum/--until-fid, then --set, then --teacher (for the method --set chose; a cmkit teacher
    brings its network, on which the --set net.* values are applied again, so they still win and
    :func:`cmkit.teacher.load_teacher` refuses a student_net=teacher network that differs; a student whose codec is
    identity adopts a latent teacher's autoencoder); a data.codec naming an autoencoder is pinned by its absolute
    path and sha256 (:func:`cmkit.codec.resolve_codec`) before the teacher is read; validated once, at
    the end. The precedence is fixed, so the order of the options on the command line never matters. A data
    folder is stored as an absolute path. --until-fid turns evaluation on (:func:`default_eval_kimg`) when
    train.eval_kimg is still 0, and says so."""
    from cmkit.codec import resolve_codec
    from cmkit.data import KNOWN_DATASETS
    from cmkit.teacher import with_teacher

    config = preset(args.preset)
    if args.data is not None:
        res, ch = KNOWN_DATASETS.get(args.data, (config.data.resolution, config.data.channels))
        config = replace(config, data=replace(config.data, source=args.data, resolution=res, channels=ch))
    train = {"kimg": args.kimg, "ckpt_kimg": args.ckpt_kimg, "seed": args.seed, "keep_ckpts": args.keep,
             "precision": args.precision, "accum": args.accum, "until_fid": args.until_fid}
    train = {k: v for k, v in train.items() if v is not None}
    config = replace(config, train=replace(config.train, **train))
    overrides = [kv for group in args.set for kv in group]
    if args.minutes is not None and any(kv.partition("=")[0].strip() == "train.kimg" for kv in overrides):
        raise CmkitError(f"--minutes {args.minutes:g} sets the training length: drop --set train.kimg, or --minutes")
    config = apply_overrides(config, overrides)
    config = replace(config, data=resolve_codec(config.data))  # an autoencoder pinned by absolute path and sha256
    if args.teacher is not None:
        net_overrides = [kv for kv in overrides if kv.strip().startswith("net.")]
        config = apply_overrides(with_teacher(config, args.teacher), net_overrides)
    if args.minutes is None:  # else once the length is measured (cmd_train)
        config = until_fid_interval(config, args)
    if config.data.source not in KNOWN_DATASETS:
        config = replace(config, data=replace(config.data, source=str(Path(config.data.source).resolve())))
    validate(config)
    return config


def until_fid_interval(config: Config, args: argparse.Namespace) -> Config:
    """With --until-fid and no train.eval_kimg: ``config`` evaluating every :func:`default_eval_kimg`, said once."""
    if args.until_fid is None or config.train.eval_kimg != 0:
        return config
    config = replace(config, train=replace(config.train, eval_kimg=default_eval_kimg(config)))
    if os.environ.get("RANK", "0") == "0":  # once under torchrun (the process group may not exist yet)
        print(f"cmkit: --until-fid evaluates every {config.train.eval_kimg * 1000:,.0f} images (a tenth of "
              "the run; set train.eval_kimg to change)", file=sys.stderr)
    return config


def default_eval_kimg(config: Config) -> float:
    """The evaluation interval --until-fid sets when none is configured: a tenth of the run (in whole steps, so
    the interval printed is the one used), so the stop is found within a tenth of the training length at the
    cost of about ten evaluations, whatever the length."""
    t = config.train
    return max(1, round(t.total_steps / 10)) * t.batch / 1000


def cmd_train(args: argparse.Namespace) -> int:
    from cmkit import dist
    from cmkit.sd.cli import cmd_train_sd, is_sd_preset

    if is_sd_preset(args.preset):  # the SD route (diffusers pipelines): cmkit.sd
        return cmd_train_sd(args)
    from cmkit.machine import resolve_precision, run_config

    config = build_config(args)
    out = Path(args.out)
    stored = run_config(out) if args.resume else None
    device = dist.init()
    auto = config.train.precision == "auto"
    config = resolve_precision(config, device, stored=stored)
    chose = f"train.precision=auto: {_why_precision(config, device, stored)}" if auto else None
    if args.dry_run:
        for line in (chose, args.minutes and f"--minutes {args.minutes:g}: train.kimg is measured at the start"):
            if line:
                _say(line)
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if args.minutes is not None:  # says the precision chosen with what it measured
        config, chose = until_fid_interval(_fit_minutes(config, args.minutes, device, stored, chose), args), None
    from cmkit.train import TrainingStopped, train

    try:
        export = train(config, out, resume=args.resume)
    except TrainingStopped as e:
        if dist.is_main():
            print(f"cmkit: {e}\ncmkit: to continue, run the same command with --resume "
                  f"(cmkit train --preset {args.preset} --out {out} ... --resume)", file=sys.stderr)
        return 128 + e.signum
    if not dist.is_main():
        return 0
    if chose:  # said at the end, not before a refusal of the data or the teacher (one line for bad input)
        _say(chose)
    grids = sorted((out / "samples").glob("*.png"))
    print(f"model: {export}")
    if grids:
        print(f"samples: {grids[-1]}")
    return 0


def _say(message: str) -> None:
    """One line on stderr, from rank 0 alone."""
    if os.environ.get("RANK", "0") == "0":
        print(f"cmkit: {message}", file=sys.stderr)


def _why_precision(config: Config, device, stored: Config | None) -> str:
    """Why train.precision=auto resolved to ``config``'s precision, for the log."""
    from cmkit.machine import auto_precision

    if stored is not None:
        return f"{config.train.precision}, as the run being resumed began"
    return f"{config.train.precision}: {auto_precision(device)[1]}"


def _fit_minutes(config: Config, minutes: float, device, stored: Config | None, chose: str | None) -> Config:
    """``config`` with the train.kimg that ``minutes`` of training buy: measured by a few timed steps
    (:func:`cmkit.machine.measure_images_per_s`), or, on --resume, the length the run began with; said on stderr
    (with ``chose``, the precision auto chose) and stored in the run's config, so the schedules and a resumed run
    see a fixed length."""
    from cmkit.machine import kimg_for_minutes, measure_images_per_s

    t = config.train
    if stored is not None:
        kimg = stored.train.kimg
        _say(f"--minutes {minutes:g}: resuming with the length measured when the run began, {kimg:g} kimg")
    else:
        rate = measure_images_per_s(config, device)  # loads the data and any teacher first: bad input says so
        kimg = kimg_for_minutes(minutes, images_per_s=rate, batch=t.batch)
        steps = round(kimg * 1000 / t.batch)
        _say(f"--minutes {minutes:g}: measured {rate:.1f} images/s ({t.precision}, batch {t.batch}), so "
             f"train.kimg={kimg:g} ({steps:,} step{'s' * (steps > 1)}, about {kimg * 1000 / rate / 60:.1f} minutes "
             "of training)")
    if chose:
        _say(chose)
    return replace(config, train=replace(t, kimg=kimg))


def cmd_train_ae(args: argparse.Namespace) -> int:
    import typing

    from cmkit.autoencoder import AEConfig, train_autoencoder
    from cmkit.presets import ae_preset

    hints = {k: v for k, v in typing.get_type_hints(AEConfig).items() if k != "preset"}
    values = override_fields(ae_preset(args.preset).to_dict(), hints, [kv for group in args.set for kv in group])
    if args.kimg is not None:
        values["kimg"] = args.kimg
    config = AEConfig.from_dict(values, where="--set")
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    path = train_autoencoder(config, Path(args.out), resume=args.resume,
                             log=lambda m: print(f"cmkit: {m}", file=sys.stderr))
    print(f"autoencoder: {path}")
    print(f"use it as a codec: cmkit train --preset ... --set data.codec={path.parent}")
    return 0
