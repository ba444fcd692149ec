"""Command-line front end: parses arguments, builds a config, calls the library.

User errors (:class:`cmkit.errors.CmkitError`) print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import numpy as np

from cmkit.cli_train import cmd_train, cmd_train_ae
from cmkit.errors import CmkitError
from cmkit.presets import PRESETS


def parse_sigmas(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CmkitError(f"--sigmas {text}: expected comma-separated numbers, e.g. 80,0.821") from None


def check_output(path: Path, suffixes: tuple[str, ...], *, flag: str = "--out") -> None:
    if path.suffix not in suffixes:
        raise CmkitError(f"{flag} {path}: expected a file name ending in {' or '.join(suffixes)}")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise CmkitError(f"{flag} {path}: folder {path.parent} does not exist or is not writable")


def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cmkit import dist
    from cmkit.checkpoint import load_export
    from cmkit.codec import data_codec
    from cmkit.images import save_images, to_numpy_images
    from cmkit.sampling import check_sigmas, default_sigmas, generate

    out = Path(args.out)
    check_output(out, (".png", ".npz"))
    model, config, spec = load_export(args.model, device=dist.init())
    if args.sampler is not None and args.sampler not in spec.samplers:
        raise CmkitError(f"--sampler {args.sampler}: this {config.method.name} model samples with "
                         f"{' or '.join(spec.samplers)}")
    sampler = args.sampler or spec.sampler
    steps = spec.steps if args.steps is None else args.steps
    sigmas = parse_sigmas(args.sigmas) if args.sigmas is not None else default_sigmas(spec, steps)
    check_sigmas(sigmas, sigma_min=model.sigma_min, sigma_max=model.sigma_max)
    codec = data_codec(config.data)
    seeds = dist.shard(range(args.seed, args.seed + args.n))  # under torchrun each rank samples its block
    batches = generate(model, seeds, sigmas=sigmas, sampler=sampler, batch_size=args.batch, label=args.label,
                       guidance=args.guidance, p_uncond=config.train.p_uncond)  # checks label, guidance, sigmas
    empty = np.zeros((0, config.data.resolution, config.data.resolution, config.data.channels), np.uint8)
    bar = tqdm(batches, total=-(-len(seeds) // args.batch), unit="batch", disable=not dist.is_main())
    images = dist.gather_in_order(np.concatenate([empty, *(to_numpy_images(codec.to_images(b)) for b in bar)]))
    if dist.is_main():
        save_images(images, out)
        print(f"wrote {args.n} samples to {out}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from cmkit import dist, editing
    from cmkit.checkpoint import load_export

    _check_edit_options(args)
    box = _ints(args.box, "--box", 4) if args.box is not None else None
    sigmas = parse_sigmas(args.sigmas) if args.sigmas is not None else None
    model, config, _ = load_export(args.model, device=dist.init())
    editing.check_codec(config.data.codec)
    if args.task == "interpolate":
        seeds, frames = _ints(args.seeds or "0,1", "--seeds", 2), 8 if args.frames is None else args.frames
        editing.interpolate_file(model, Path(args.out), seeds=(seeds[0], seeds[1]), frames=frames,
                                 labels=args.label)
        print(f"wrote {frames} frames from seed {seeds[0]} to seed {seeds[1]} to {args.out}")
        return 0
    mask = None
    if args.mask is not None:
        mask = editing.load_mask(Path(args.mask), resolution=model.resolution)
    elif box is not None:
        mask = editing.box_mask(box, resolution=model.resolution)
    written = editing.edit_files(args.task, model, Path(args.image), Path(args.out), seed=args.seed,
                                 batch=args.batch, mask=mask, factor=args.factor, sigmas=sigmas, sigma=args.sigma,
                                 labels=args.label, warn=lambda m: print(f"cmkit: warning: {m}", file=sys.stderr))
    print(f"wrote {len(written)} edited image(s) to {args.out}")
    return 0


_EDIT_ONLY = {"--mask": ("inpaint",), "--box": ("inpaint",), "--factor": ("superres",), "--sigma": ("denoise",),
              "--sigmas": ("inpaint", "colorize", "superres", "stroke"), "--seeds": ("interpolate",),
              "--frames": ("interpolate",)}


def _check_edit_options(args: argparse.Namespace) -> None:
    """Refuse options the task does not use, and a missing or needless --image."""
    for flag, tasks in _EDIT_ONLY.items():
        value = getattr(args, flag[2:])
        if value is not None and args.task not in tasks:
            raise CmkitError(f"{flag}: not an option of 'edit {args.task}' (only of {', '.join(tasks)})")
    if args.mask is not None and args.box is not None:
        raise CmkitError("--mask and --box: give one of them")
    if (args.image is None) != (args.task == "interpolate"):
        raise CmkitError(f"--image: {'not used by' if args.task == 'interpolate' else 'required by'} "
                         f"'edit {args.task}'")


def _ints(text: str, flag: str, count: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise CmkitError(f"{flag} {text}: expected {count} comma-separated integers")
    return values


def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CmkitError(f"--steps {text}: expected comma-separated step counts, e.g. 1,2,4") from None
    if not steps or min(steps) < 1:
        raise CmkitError(f"--steps {text}: expected positive step counts, e.g. 1,2,4")
    return steps


def _scorer(args: argparse.Namespace, resolution: int, channels: int, ref: str | None):
    """(extractor, reference features) for --metric/--ref/--weights, checking --n against the metric."""
    from cmkit.eval.evaluate import default_metric, reference_features
    from cmkit.eval.features import get_extractor

    if ref is None:
        raise CmkitError("--ref: expected a dataset name, a folder or a features .npz to compare with")
    extractor = get_extractor(args.metric or default_metric(resolution, channels), weights=args.weights)
    if args.n < extractor.min_count:
        raise CmkitError(f"--n {args.n}: {extractor.name} needs at least {extractor.min_count} images")
    return extractor, reference_features(ref, extractor, n=args.n, resolution=resolution, channels=channels)


def cmd_eval(args: argparse.Namespace) -> int:
    """Under torchrun every process samples and featurises its share; rank 0 alone prints and writes."""
    from cmkit import dist
    from cmkit.checkpoint import EXPORT_NAME, load_export
    from cmkit.codec import data_codec
    from cmkit.cond import check_guidance
    from cmkit.eval.evaluate import evaluate_model, image_features, load_images, plot_quality
    from cmkit.eval.metrics import compute_metrics

    for flag, path, suffixes in (("--out", args.out, (".json",)), ("--plot", args.plot, (".png",))):
        if path is not None:
            check_output(Path(path), suffixes, flag=flag)
    source = Path(args.model)
    if source.suffix == ".npz" or (source.is_dir() and not (source / EXPORT_NAME).exists()):
        if args.guidance is not None:
            raise CmkitError(f"--guidance: {source} holds images, not a model to sample with guidance")
        images = load_images(source)
        extractor, reference = _scorer(args, images.shape[2], images.shape[1], args.ref)
        fake = image_features(images, extractor, batch=args.batch, desc=source.name)
        rows = [{"images": len(images), **compute_metrics(reference, fake)}]
    else:
        model, config, spec = load_export(source, device=dist.init())
        check_guidance(args.guidance, num_classes=model.num_classes, p_uncond=config.train.p_uncond,
                       trained_range=model.guidance_range)
        steps = _parse_steps(args.steps) if args.steps else list(spec.eval_steps)
        d = config.data  # the decoded images are scored
        extractor, reference = _scorer(args, d.resolution, d.channels, args.ref or d.source)
        rows = evaluate_model(model, spec, steps=steps, n=args.n, extractor=extractor, reference=reference,
                              batch=args.batch, codec=data_codec(config.data), guidance=args.guidance)
    report = {"model": str(source), "metric": extractor.name, "reference": args.ref, "n": args.n, "results": rows}
    if not dist.is_main():
        return 0
    _print_report(report)
    if args.out:
        _write_json(report, Path(args.out))
    if args.plot:
        points = [(r["nfe"], r["fid"]) for r in rows if "nfe" in r]
        plot_quality({source.name: points}, Path(args.plot), metric=extractor.name)
    return 0


def cmd_tune_steps(args: argparse.Namespace) -> int:
    """Under torchrun every process samples its share of each candidate; rank 0 alone writes and prints."""
    from cmkit import dist
    from cmkit.checkpoint import load_export, resolve_model_path, save_export
    from cmkit.codec import data_codec
    from cmkit.eval.evaluate import tune_two_step_sigma
    from cmkit.methods import Capability, method_entry, require

    if args.steps != 2:
        raise CmkitError(f"--steps {args.steps}: only the 2-step intermediate sigma is searched; expected 2")
    if args.iters < 0:
        raise CmkitError(f"--iters {args.iters}: expected a number of search iterations >= 0")
    path = resolve_model_path(args.model)
    model, config, spec = load_export(path, device=dist.init())
    require(method_entry(config.method.name), Capability.TUNE_STEPS, f"{path}: tune-steps")
    d = config.data  # the decoded images are scored
    extractor, reference = _scorer(args, d.resolution, d.channels, args.ref or d.source)
    best, history = tune_two_step_sigma(model, n=args.n, extractor=extractor, reference=reference,
                                        batch=args.batch, iters=args.iters, codec=data_codec(d))
    tuned = spec.with_tuned(2, [spec.sigma_max, best])
    dist.on_main(lambda: save_export(model, config, path, spec=tuned))
    if not dist.is_main():
        return 0
    for point in history:
        print(f"sigma {point['sigma']:10.4f}  FID {point['fid']:8.3f}  (n={point['n']})")
    final = min((p for p in history if p["n"] == args.n), key=lambda p: p["fid"])
    print(f"best 2-step sigma: {best:.4g} (FID {final['fid']:.3f}, {extractor.name}, n={args.n}); the published "
          f"value: {spec.two_step_sigma:.4g}. Stored in {path}.")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cmkit.sd.model import is_sd_run

    if is_sd_run(args.model):  # an SD-route run: a LoRA folder or an LCM pipeline (cmkit.sd.export)
        from cmkit.sd.cli import cmd_export_sd

        return cmd_export_sd(args)
    from cmkit.checkpoint import load_export
    from cmkit.codec import check_codec
    from cmkit.export import export_diffusers, tuned_schedules  # imports diffusers: only this command needs it

    model, config, spec = load_export(args.model)
    check_codec(config.data.codec, ("identity",), what="cmkit export --diffusers (a ConsistencyModelPipeline has no "
                "autoencoder)")
    out = export_diffusers(model, config, args.diffusers, spec=spec)
    print(f"wrote a diffusers ConsistencyModelPipeline to {out}; load it with diffusers alone (no cmkit needed):")
    print("    from diffusers import ConsistencyModelPipeline")
    print(f"    pipe = ConsistencyModelPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)")
    print("    images = pipe(num_inference_steps=1).images")
    print(f"trust_remote_code=True runs the network's code shipped in {out / 'unet'} (cmkit_unet2d.py, unet.py)")
    for tuned in tuned_schedules(out):
        print(tuned.describe())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cmkit.checkpoint import load_export
    from cmkit.studio.engine import Models, Studio, check_models

    device = _device(args.device)
    model, config, spec = load_export(args.model, device=device)
    check_models(Models(model, config))  # before the teacher is read: the served model is the usual mistake
    teacher, teacher_config, _ = load_export(args.teacher, device=device) if args.teacher else (None, None, None)
    studio = Studio(Models(model, config, teacher, teacher_config, spec), data=args.data, precision=args.precision,
                    threads=args.threads)
    from cmkit.studio.server import serve  # imports the studio extra (Starlette, uvicorn)

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn has closed the connections
        serve(studio, host=args.host, port=args.port, token=args.token, max_clients=args.max_clients)
    print("cmkit studio: stopped", file=sys.stderr)
    return 0


def _device(name: str | None):
    """The torch device ``--device`` names (default: cuda where available, else cpu); CmkitError for one that
    is unknown or not available here."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise CmkitError(f"--device {name}: not a device available here ({str(e).splitlines()[0]})") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise CmkitError(f"--device {name}: expected a device that computes: cpu, cuda, mps or xpu")
    return device


def _print_report(report: dict) -> None:
    print(f"{report['metric']} against {report['reference'] or 'the training data'}, {report['n']} images")
    for row in report["results"]:
        what = f"{row['steps']} step(s), {row['nfe']} NFE" if "nfe" in row else f"{row['images']} images"
        print(f"  {what:>22}: FID {row['fid']:8.3f}  KID {row['kid']:.4f}  precision {row['precision']:.3f}"
              f"  recall {row['recall']:.3f}")


def _write_json(obj: dict, path: Path) -> None:
    from cmkit.files import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _guidance_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance", type=float, metavar="W",
                   help="classifier-free guidance scale (1: none, the default; models trained with "
                        "train.p_uncond > 0); an lcm model takes it as its w input, inside its trained range "
                        "(default: its method.w_default)")


def cmd_presets(args: argparse.Namespace) -> int:
    from cmkit.presets import AE_PRESETS
    from cmkit.sd.config import SD_PRESETS

    width = max(map(len, {**PRESETS, **AE_PRESETS, **SD_PRESETS}))
    for name, (description, _) in PRESETS.items():
        print(f"{name:<{width}}  {description}")
    for name, (description, _) in AE_PRESETS.items():
        print(f"{name:<{width}}  {description} (cmkit train-ae)")
    for name, (description, _) in SD_PRESETS.items():
        print(f"{name:<{width}}  {description}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as every cmkit user error: one line 'cmkit: error: ...' and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cmkit: error: {message}\n")


class _Positive(argparse.Action):
    """An option's number (``type`` int unless given), refused unless > 0: for counts, sizes, lengths and
    levels, where 0 or less means nothing (seeds and labels, where 0 is meaningful, do not use it)."""

    def __init__(self, *args, type=int, **kwargs) -> None:  # "type": the keyword argparse passes
        super().__init__(*args, type=type, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: float,
                 option_string: str | None = None) -> None:
        if value <= 0:
            kind = "integer" if isinstance(value, int) else "number"
            parser.error(f"{option_string} {value:g}: expected a positive {kind}")
        setattr(namespace, self.dest, value)


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cmkit", description="Consistency models: train, sample, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a preset")
    p.add_argument("--preset", required=True, help="a name from 'cmkit presets'")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--data", help="fashion-mnist, mnist, cifar10, or a folder of images")
    p.add_argument("--teacher", metavar="MODEL",
                   help="diffusion model to distil (cd, scd), tune (ect) or start from (sct, optional): an *-edm "
                        "run, or for cd and scd also a diffusers UNet folder")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--kimg", action=_Positive, type=float, help="training length in thousands of images")
    length.add_argument("--minutes", action=_Positive, type=float, metavar="M",
                        help="train for about M minutes: a few timed steps at the start set train.kimg (stored in "
                             "the run's config; --resume keeps it)")
    p.add_argument("--ckpt-kimg", action=_Positive, type=float, help="checkpoint interval in thousands of images")
    p.add_argument("--keep", action=_Positive, metavar="K", help="keep the newest K training checkpoints (default 3)")
    p.add_argument("--seed", type=int, help="run seed (default: the preset's, 0)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision (train.precision; auto: bf16 where the hardware computes it, else fp32)")
    p.add_argument("--accum", action=_Positive, metavar="K", help="gradient accumulation steps per optimiser step")
    p.add_argument("--until-fid", action=_Positive, type=float, metavar="X",
                   help="stop once an evaluation's FID (1-step; diffusion models: Heun) is at most X "
                        "(train.until_fid; evaluates every tenth of the run unless train.eval_kimg is set)")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. train.lr=2e-4 net.dropout=0.1")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-ae", help="train the autoencoder of latent models (a codec: --set data.codec=RUN)")
    p.add_argument("--preset", required=True, help="an autoencoder preset: fmnist-ae or cifar10-ae")
    p.add_argument("--out", required=True, help="run directory (new, or the run to --resume)")
    p.add_argument("--kimg", action=_Positive, type=float, help="training length in thousands of images")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="override fields of the autoencoder config, e.g. kl_weight=1e-5 model_channels=64")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train_ae)

    p = sub.add_parser("sample", help="sample images from a trained model")
    p.add_argument("model", help="a run directory or a .safetensors export")
    p.add_argument("--out", required=True, help="a .png (grid) or .npz (images, uint8 N x H x W x C)")
    p.add_argument("--n", action=_Positive, default=64, help="number of images (default 64)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", action=_Positive, help="sampling steps (default: 1 for consistency, 18 Heun for EDM)")
    steps.add_argument("--sigmas", help="descending noise levels, e.g. 80,0.821")
    p.add_argument("--sampler", choices=("consistency", "heun", "euler", "meanflow"),
                   help="default: consistency for consistency models, heun for diffusion models, meanflow for "
                        "MeanFlow models")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed S + i (default 0)")
    p.add_argument("--batch", action=_Positive, default=256, help="images per forward pass (default 256)")
    p.add_argument("--label", type=int, help="class label for class-conditional models (default: per seed)")
    _guidance_option(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("edit", help="zero-shot editing: inpaint, colorize, superres, stroke, denoise, interpolate")
    p.add_argument("task", choices=("inpaint", "colorize", "superres", "stroke", "denoise", "interpolate"))
    p.add_argument("model", help="a run directory or a .safetensors export of a consistency model")
    p.add_argument("--image", help="input image or folder of images (stroke: the stroke painting)")
    p.add_argument("--out", required=True, help="output .png, or a folder when --image is a folder")
    p.add_argument("--mask", help="inpaint: a PNG at the model's size, white = generate, black = keep")
    p.add_argument("--box", help="inpaint: generate inside the box x,y,w,h (pixels)")
    p.add_argument("--factor", action=_Positive, help="superres: the upsampling factor p (divides the resolution)")
    p.add_argument("--sigmas", help="descending noise levels (default: 40 Karras levels; stroke: 5.38,2.24)")
    p.add_argument("--sigma", action=_Positive, type=float,
                   help="denoise: the noise level added to the image and removed")
    p.add_argument("--seeds", help="interpolate: the two noise seeds a,b (default 0,1)")
    p.add_argument("--frames", action=_Positive, help="interpolate: number of images from a to b (default 8)")
    p.add_argument("--seed", type=int, default=0, help="input image i uses seed S + i (default 0)")
    p.add_argument("--batch", action=_Positive, default=64, help="images per forward pass (default 64)")
    p.add_argument("--label", type=int, metavar="K",
                   help="class-conditional models: the class of every image (default: drawn from each image's seed)")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("eval", help="FID, KID, precision and recall of a model, an .npz or a folder")
    p.add_argument("model", help="a run directory, a .safetensors export, an .npz of images or a folder")
    p.add_argument("--n", action=_Positive, default=10_000, help="samples per step count and reference images")
    p.add_argument("--steps", help="step counts, e.g. 1,2,4 (default 1,2,4; diffusion models: 18 Heun = 35 NFE)")
    _scoring_options(p)
    p.add_argument("--out", help="write the report as JSON")
    p.add_argument("--plot", help="write FID against network evaluations as a PNG")
    _guidance_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tune-steps", help="search the best intermediate sigma for 2-step sampling")
    p.add_argument("model", help="a run directory or a .safetensors export (updated in place)")
    p.add_argument("--steps", type=int, default=2, help="number of steps (2)")
    p.add_argument("--n", action=_Positive, default=800,
                   help="samples per FID of the final round (default 800); the search's FIDs take a quarter")
    p.add_argument("--iters", type=int, default=5,
                   help="golden-section iterations, one FID each after the first two (default 5); then the "
                        "search's best sigmas are scored again on --n samples")
    _scoring_options(p)
    p.set_defaults(func=cmd_tune_steps)

    p = sub.add_parser("export", help="write a consistency model as a diffusers ConsistencyModelPipeline folder")
    p.add_argument("model", help="a run directory or a .safetensors export of a consistency model")
    p.add_argument("--diffusers", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="the studio: generate and edit in the browser, live (a local web page)")
    p.add_argument("model", help="a run directory or a .safetensors export of a consistency model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--token", help="a token every request must carry (?token=...); off 127.0.0.1 a random one is "
                                   "made when none is given, and printed in the URL")
    p.add_argument("--teacher", metavar="MODEL",
                   help="a diffusion model (an *-edm run) whose samples of the same seeds are shown beside")
    p.add_argument("--data", help="dataset whose images the page offers for editing (default: the model's)")
    p.add_argument("--max-clients", action=_Positive, default=16, help="browser tabs served at once (default 16)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: bfloat16 autocast, faster on CPUs with bf16 arithmetic (default fp32: the images "
                        "'cmkit sample' writes)")
    p.add_argument("--device", help="torch device to compute on, e.g. cuda, cuda:1, cpu (default: cuda where "
                                    "available, else cpu)")
    p.add_argument("--threads", action=_Positive,
                   help="torch threads for a grid (default: torch's); one image is computed on one fewer, leaving "
                        "a core to the browser")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=cmd_presets)
    return parser


def _scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", choices=("fid-fmnist", "fid-inception"),
                   help="feature space (default: fid-fmnist for 28x28 grayscale, else fid-inception)")
    p.add_argument("--ref", help="reference: a dataset name or path, or a features .npz (default: the training data)")
    p.add_argument("--weights", help="feature network weights (default: the cached or installed ones)")
    p.add_argument("--batch", action=_Positive, default=500, help="images per batch (default 500)")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):  # on a line of its own, not inside a progress bar
        print(f"cmkit: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line, without the source location
            return args.func(args)
    except CmkitError as e:
        print(f"cmkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmkit: interrupted", file=sys.stderr)
        return 130
    finally:
        if "cmkit.dist" in sys.modules:  # leave a torchrun process group (not imported by commands without one)
            sys.modules["cmkit.dist"].shutdown()
