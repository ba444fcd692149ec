"""``cmkit train --preset sd-lcm|sd-lcm-lora --teacher PIPELINE_DIR --data CAPTIONED_DIR`` and ``cmkit export RUN
--diffusers DIR`` for SD-route runs (:mod:`cmkit.cli_train` and :mod:`cmkit.cli` hand these over)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from cmkit.errors import CmkitError
from cmkit.sd.config import SD_PRESETS, SDConfig, apply_sd_overrides, sd_preset, validate

# The train options of the pixel and latent routes that have no meaning here.
_UNUSED = {"minutes": "--minutes", "until_fid": "--until-fid"}


def build_sd_config(args: argparse.Namespace) -> SDConfig:
    """Preset, then --data/--teacher (absolute), then --kimg/--ckpt-kimg/--seed/--keep/--precision/--accum, then
    --set; validated. CmkitError for an option this route does not take, or a missing --teacher or --data."""
    for key, flag in _UNUSED.items():
        if getattr(args, key, None) is not None:
            raise CmkitError(f"{flag}: not an option of the {args.preset} preset (the SD route trains for train.kimg)")
    config = sd_preset(args.preset)
    for flag, value in (("--teacher PIPELINE_DIR", args.teacher), ("--data CAPTIONED_DIR", args.data)):
        if value is None:
            raise CmkitError(f"--preset {args.preset}: {flag} is required")
    config = replace(config, teacher=str(Path(args.teacher).resolve()),
                     data=replace(config.data, source=str(Path(args.data).resolve())))
    train = {"kimg": args.kimg, "ckpt_kimg": args.ckpt_kimg, "seed": args.seed, "keep_ckpts": args.keep,
             "precision": args.precision, "accum": args.accum}
    config = replace(config, train=replace(config.train, **{k: v for k, v in train.items() if v is not None}))
    config = apply_sd_overrides(config, [kv for group in args.set for kv in group])
    validate(config)
    return config


def cmd_train_sd(args: argparse.Namespace) -> int:
    from cmkit import dist
    from cmkit.sd.pipeline import check_layout

    config = build_sd_config(args)
    check_layout(Path(config.teacher))
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from cmkit.sd.train import sd_train
    from cmkit.train import TrainingStopped

    out = Path(args.out)
    try:
        path = sd_train(config, out, resume=args.resume)
    except TrainingStopped as e:
        if dist.is_main():
            print(f"cmkit: {e}\ncmkit: to continue, run the same command with --resume", file=sys.stderr)
        return 128 + e.signum
    if dist.is_main():
        print(f"model: {path}")
        print(f"diffusers folder: cmkit export {out} --diffusers DIR")
    return 0


def cmd_export_sd(args: argparse.Namespace) -> int:
    from cmkit.sd.export import export_sd, usage
    from cmkit.sd.model import load_sd_model

    model = load_sd_model(args.model)
    out = export_sd(model, args.diffusers)
    kind = "an LCM-LoRA adapter (diffusers LoRA format)" if model.config.lora else "a LatentConsistencyModelPipeline"
    print(f"wrote {kind} to {out}; load it with diffusers alone (no cmkit needed):")
    for line in usage(model, out):
        print(f"    {line}")
    return 0


def is_sd_preset(name: str) -> bool:
    return name in SD_PRESETS
