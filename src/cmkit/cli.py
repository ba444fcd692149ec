"""Command-line front end: parses arguments, builds a config, calls the library.

User errors (:class:`cmkit.errors.CmkitError`) print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from cmkit.config import PRESETS, Config, apply_overrides, preset
from cmkit.errors import CmkitError


def build_config(args: argparse.Namespace) -> Config:
    """Preset, then --data (known datasets bring their native size), then --kimg/--ckpt-kimg/--seed, then --set."""
    from cmkit.data import KNOWN_DATASETS

    config = preset(args.preset)
    if args.data is not None:
        res, ch = KNOWN_DATASETS.get(args.data, (config.data.resolution, config.data.channels))
        config = replace(config, data=replace(config.data, source=args.data, resolution=res, channels=ch))
    train = {"kimg": args.kimg, "ckpt_kimg": args.ckpt_kimg, "seed": args.seed}
    train = {k: v for k, v in train.items() if v is not None}
    config = replace(config, train=replace(config.train, **train))
    return apply_overrides(config, [kv for group in args.set for kv in group])


def cmd_train(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from cmkit.train import train

    out = Path(args.out)
    export = train(config, out, resume=args.resume)
    grids = sorted((out / "samples").glob("*.png"))
    print(f"model: {export}")
    if grids:
        print(f"samples: {grids[-1]}")
    return 0


def parse_sigmas(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CmkitError(f"--sigmas {text}: expected comma-separated numbers, e.g. 80,0.821") from None


def check_output(path: Path, suffixes: tuple[str, ...]) -> None:
    if path.suffix not in suffixes:
        raise CmkitError(f"--out {path}: expected a file name ending in {' or '.join(suffixes)}")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise CmkitError(f"--out {path}: folder {path.parent} does not exist or is not writable")


def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cmkit.checkpoint import load_export
    from cmkit.images import save_images, to_numpy_images
    from cmkit.sampling import check_sigmas, default_sigmas, generate

    out = Path(args.out)
    check_output(out, (".png", ".npz"))
    if args.n < 1 or args.batch < 1:
        raise CmkitError(f"--n and --batch: expected positive counts, got {args.n} and {args.batch}")
    model, config = load_export(args.model, device="cuda" if _cuda() else "cpu")
    if config.is_consistency and args.sampler != "consistency" and args.sampler is not None:
        raise CmkitError(f"--sampler {args.sampler}: a consistency model samples with 'consistency'")
    sampler = args.sampler or ("consistency" if config.is_consistency else "heun")
    steps = _default_steps(config) if args.steps is None else args.steps
    sigmas = parse_sigmas(args.sigmas) if args.sigmas is not None else default_sigmas(model, steps)
    check_sigmas(sigmas, sigma_min=model.sigma_min, sigma_max=model.sigma_max)
    if args.label is not None and not 0 <= args.label < max(model.num_classes, 1):
        raise CmkitError(f"--label {args.label}: expected a class in [0, {model.num_classes}) for this model")
    seeds = list(range(args.seed, args.seed + args.n))
    batches = generate(model, seeds, sigmas=sigmas, sampler=sampler, batch_size=args.batch, label=args.label)
    total = -(-args.n // args.batch)
    save_images(np.concatenate([to_numpy_images(b) for b in tqdm(batches, total=total, unit="batch")]), out)
    print(f"wrote {args.n} samples to {out}")
    return 0


def _default_steps(config: Config) -> int:
    return 1 if config.is_consistency else 18


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_presets(args: argparse.Namespace) -> int:
    width = max(map(len, PRESETS))
    for name, (description, _) in PRESETS.items():
        print(f"{name:<{width}}  {description}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmkit", description="Consistency models: train, sample, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a preset")
    p.add_argument("--preset", required=True, help="a name from 'cmkit presets'")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--data", help="fashion-mnist, mnist, cifar10, or a folder of images")
    p.add_argument("--kimg", type=float, help="training length in thousands of images")
    p.add_argument("--ckpt-kimg", type=float, help="checkpoint interval in thousands of images")
    p.add_argument("--seed", type=int, help="run seed (default: the preset's, 0)")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. train.lr=2e-4 net.dropout=0.1")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images from a trained model")
    p.add_argument("model", help="a run directory or a .safetensors export")
    p.add_argument("--out", required=True, help="a .png (grid) or .npz (images, uint8 N x H x W x C)")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="sampling steps (default: 1 for consistency, 18 Heun for EDM)")
    steps.add_argument("--sigmas", help="descending noise levels, e.g. 80,0.821")
    p.add_argument("--sampler", choices=("consistency", "heun", "euler"),
                   help="default: consistency for consistency models, heun for diffusion models")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed S + i (default 0)")
    p.add_argument("--batch", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--label", type=int, help="class label for class-conditional models (default: per seed)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except CmkitError as e:
        print(f"cmkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmkit: interrupted", file=sys.stderr)
        return 130
