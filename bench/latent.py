"""Latent models (docs/latent.md): the autoencoder's reconstruction FID, the guided latent teacher's FID at 35
evaluations with and without guidance, and sampling images/s in latent space (decode included) against pixel space.

Each part adds its rows to bench/results/latent.json (the other parts are kept; ``teacher`` keeps the rows of other
guidance scales of the same model):
    python bench/latent.py recon AE_RUN [--n 10000] [--n-inception 2000] [--key autoencoder-NAME]
    python bench/latent.py teacher LATENT_RUN [--n 2000] [--guidance 1 2] [--n-inception 500]
    python bench/latent.py speed AE_RUN [--batch 64] [--repeats 5] [--decoders AE_RUN ...] [--latent-channels 64 32]
    python bench/latent.py lcm LCM_RUN [--n 2000] [--n-inception 500] [--guidance 2]
    python bench/latent.py report        # the "Latent models" section of docs/benchmarks.md from the results
``recon`` scores decode(encode(x)) of the first N Fashion-MNIST test images against the training images;
``teacher`` runs Heun with 18 levels (35 network evaluations per scale, twice that with guidance w != 1);
``lcm`` scores an LCM student of the teacher at 1, 2 and 4 steps at one guidance scale (its w input), with its
ratios to the teacher's row of the same metric, n and scale; ``speed`` times fresh networks (speed does not
depend on the weights) interleaved, median of the repeats: 1 step
and Heun-35 of the fmnist-edm network on pixels against the fmnist-latent-edm network on the autoencoder's latent
plus the decoder, the 1-step sampling of `make demo`'s pixel network (fmnist-ict, 16 channels), and one training
step of each preset (batch 64; the latent one encodes its batch); with ``--decoders``, 1-step latent sampling
with each of those autoencoders' decoders (e.g. a narrower one, ``decoder_channels``) and each latent network width
of ``--latent-channels``, as ratios to the demo net.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from cmkit import data
from cmkit.autoencoder import EXPORT_NAME, load_autoencoder
from cmkit.checkpoint import build_model, load_export
from cmkit.codec import data_codec, resolve_codec
from cmkit.config import apply_overrides
from cmkit.eval.evaluate import evaluate_model, image_features, reference_features
from cmkit.eval.features import get_extractor
from cmkit.eval.metrics import compute_metrics
from cmkit.images import save_images, to_numpy_images
from cmkit.methods import model_spec
from cmkit.presets import preset
from cmkit.sampling import default_sigmas, generate
from cmkit.train import Run, load_training_data, local_batch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latent.json"
GRIDS = ROOT / "docs" / "img" / "latent"


def _update(key: str, value: dict) -> None:
    """Merge ``{key: value}`` into the results file, with the command, commit and date."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    results[key] = {**value, "command": "python bench/latent.py " + " ".join(sys.argv[1:]),
                    "commit": commit.stdout.strip(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def recon(args: argparse.Namespace) -> None:
    ae = load_autoencoder(Path(args.model) / EXPORT_NAME, what="recon")
    c = ae.config
    earlier = json.loads(RESULTS.read_text()).get("autoencoder", {}) if RESULTS.exists() else {}
    test = data.load_dataset(c.source, resolution=c.resolution, channels=c.channels, split="test").images
    rows = {}
    for metric, n in (("fid-fmnist", args.n), ("fid-inception", args.n_inception)):
        x = data.to_model_range(test[:n])
        with torch.no_grad():
            out = torch.cat([ae.decoder(ae.encoder(x[i:i + 500])[0]).clamp(-1, 1) for i in range(0, n, 500)])
        extractor = get_extractor(metric)
        reference = reference_features(c.source, extractor, n=n, resolution=c.resolution, channels=c.channels)
        fake = image_features(data.to_uint8(out), extractor, batch=500, desc=f"reconstructions, {metric}")
        if earlier.get(metric, {}).get("n") == n:  # the test images' scores do not depend on the autoencoder
            real = earlier[metric]["test_images"]
        else:
            real = compute_metrics(reference, image_features(test[:n], extractor, batch=500,
                                                             desc=f"test images, {metric}"))
        rows[metric] = {"n": n, "reconstructions": compute_metrics(reference, fake), "test_images": real}
        print(metric, rows[metric])
    _update(args.key, {"model": str(args.model), "latent": list(c.latent_shape),
                            "values": {"image": c.channels * c.resolution ** 2,
                                       "latent": c.latent_shape[0] * c.latent_shape[1] * c.latent_shape[2]},
                            "scale": ae.scale.item(), "config": c.to_dict(), **rows})


def teacher(args: argparse.Namespace) -> None:
    model, config, spec = load_export(args.model)
    codec, d = data_codec(config.data), config.data
    rows = []
    for metric, n in (("fid-fmnist", args.n), ("fid-inception", args.n_inception)):
        if n == 0:  # --n-inception 0: fid-fmnist alone
            continue
        extractor = get_extractor(metric)
        reference = reference_features(d.source, extractor, n=n, resolution=d.resolution, channels=d.channels)
        for w in args.guidance:
            start = time.perf_counter()
            row = evaluate_model(model, spec, steps=[18], n=n, extractor=extractor, reference=reference,
                                 batch=500, codec=codec, guidance=None if w == 1 else w)[0]
            rows.append({"metric": metric, "n": n, "guidance": w, **row, "seconds": time.perf_counter() - start,
                         "command": "python bench/latent.py " + " ".join(sys.argv[1:])})
            print(rows[-1])
    GRIDS.mkdir(parents=True, exist_ok=True)
    for w in args.guidance:
        x = torch.cat(list(generate(model, range(64), sigmas=default_sigmas(spec, 18), sampler="heun",
                                    batch_size=64, guidance=None if w == 1 else w)))
        save_images(to_numpy_images(codec.to_images(x)), GRIDS / f"teacher-w{w:g}.png")
    old = json.loads(RESULTS.read_text()).get("teacher", {}) if RESULTS.exists() else {}
    key = lambda r: (r["metric"], r["n"], r["guidance"])  # noqa: E731
    kept = [r for r in old.get("rows", []) if old.get("model") == str(args.model) and key(r) not in set(map(key, rows))]
    _update("teacher", {"model": str(args.model), "config": config.to_dict(),
                        "rows": sorted(kept + rows, key=lambda r: (r["metric"], r["guidance"]))})


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _training_step(config):
    """A function running one optimiser step of ``config`` (batch ``train.batch``), its batch's encoding included."""
    dataset, device = load_training_data(config), torch.device("cpu")
    run = Run(config, device)
    return lambda: run.optimizer_step(*local_batch(config, dataset, run.step, device))


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    latent_config = replace(preset("fmnist-latent-edm"), data=resolve_codec(
        replace(preset("fmnist-latent-edm").data, codec=str(args.model))))
    pixel = build_model(preset("fmnist-edm")).eval().requires_grad_(False)
    latent = build_model(latent_config).eval().requires_grad_(False)
    codec = data_codec(latent_config.data)
    n = args.batch
    variants = {}
    for name, model, decode in (("pixel", pixel, lambda x: x), ("latent", latent, codec.decode)):
        for steps, sampler in ((1, "euler"), (18, "heun")):
            sigmas = default_sigmas(model_spec(model), steps)

            def run(model=model, sigmas=sigmas, sampler=sampler, decode=decode):
                with torch.no_grad():
                    for x in generate(model, range(n), sigmas=sigmas, sampler=sampler, batch_size=n):
                        decode(x)

            variants[f"{name} {steps} step(s) {sampler}"] = run
    demo = build_model(apply_overrides(preset("fmnist-ict"), ["net.model_channels=16"])).eval().requires_grad_(False)
    sigmas = default_sigmas(model_spec(demo), 1)

    def run_demo():
        with torch.no_grad():
            list(generate(demo, range(n), sigmas=sigmas, sampler="consistency", batch_size=n))

    variants["pixel demo net (make demo) 1 step(s) consistency"] = run_demo
    with torch.no_grad():
        z = torch.randn(n, *codec.shape)
        variants["decode alone"] = lambda: codec.decode(z)
    lighter = _lighter_variants(args, latent_config, n)
    variants.update(lighter)
    for name, config in (("pixel", preset("fmnist-edm")), ("latent", latent_config)):
        variants[f"{name} training step"] = _training_step(config)
    seconds = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every variant alike
        for k, fn in variants.items():
            seconds[k].append(_timed(fn, 1))
    images = {k: 64 if "training" in k else n for k in seconds}  # the presets' training batch is 64
    rows = {k: {"seconds": statistics.median(v), "images_per_s": images[k] / statistics.median(v)}
            for k, v in seconds.items()}
    for k, v in rows.items():
        print(f"{k:>28}: {v['images_per_s']:8.1f} images/s")
    rows["ratios"] = {"latent/pixel 1 step": rows["latent 1 step(s) euler"]["images_per_s"]
                      / rows["pixel 1 step(s) euler"]["images_per_s"],
                      "latent/pixel demo net 1 step": rows["latent 1 step(s) euler"]["images_per_s"]
                      / rows["pixel demo net (make demo) 1 step(s) consistency"]["images_per_s"],
                      "latent/pixel heun-35": rows["latent 18 step(s) heun"]["images_per_s"]
                      / rows["pixel 18 step(s) heun"]["images_per_s"],
                      "latent/pixel training": rows["latent training step"]["images_per_s"]
                      / rows["pixel training step"]["images_per_s"]}
    rows["ratios"].update({f"latent/pixel demo net 1 step, {k.split(', ', 1)[1]}": rows[k]["images_per_s"]
                           / rows["pixel demo net (make demo) 1 step(s) consistency"]["images_per_s"]
                           for k in lighter if k.startswith("latent 1 step")})
    nets = {"pixel": pixel, "latent": latent, "pixel demo": demo, "decoder": codec.autoencoder.decoder}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    _update("speed", {"batch": n, "threads": torch.get_num_threads(), "parameters": params, "rows": rows})


def _lighter_variants(args: argparse.Namespace, latent_config, n: int) -> dict:
    """1-step latent sampling (decode included) with each decoder of ``--decoders`` and each latent network width
    of ``--latent-channels`` (fmnist-latent-edm with ``net.model_channels`` changed), and each decoder alone."""
    variants = {}
    for ae in args.decoders:
        codec = data_codec(resolve_codec(replace(latent_config.data, codec=str(ae))))
        width = codec.autoencoder.config.decoder_width
        with torch.no_grad():
            z = torch.randn(n, *codec.shape)
            variants[f"decode alone, decoder {width} ch"] = lambda codec=codec, z=z: codec.decode(z)
        for channels in args.latent_channels:
            config = apply_overrides(latent_config, [f"net.model_channels={channels}"])
            model = build_model(config).eval().requires_grad_(False)
            sigmas = default_sigmas(model_spec(model), 1)

            def run(model=model, sigmas=sigmas, codec=codec):
                with torch.no_grad():
                    for x in generate(model, range(n), sigmas=sigmas, sampler="euler", batch_size=n):
                        codec.decode(x)

            variants[f"latent 1 step(s) euler, decoder {width} ch, latent net {channels} ch"] = run
    return variants


PIXEL_TEACHER = ("teacher (EDM), fmnist-edm, 48k images: FID 30.44 at 35 NFE (fid-fmnist, 10,000 samples; "
                 "the quick ladder above)")


def lcm(args: argparse.Namespace) -> None:
    model, config, spec = load_export(args.model)
    codec, d = data_codec(config.data), config.data
    rows = []
    for metric, n in (("fid-fmnist", args.n), ("fid-inception", args.n_inception)):
        extractor = get_extractor(metric)
        reference = reference_features(d.source, extractor, n=n, resolution=d.resolution, channels=d.channels)
        start = time.perf_counter()
        for row in evaluate_model(model, spec, steps=[1, 2, 4], n=n, extractor=extractor, reference=reference,
                                  batch=500, codec=codec, guidance=args.guidance):
            rows.append({"metric": metric, "n": n, "guidance": args.guidance, **row})
            print(rows[-1])
        rows[-1]["seconds"] = time.perf_counter() - start
    GRIDS.mkdir(parents=True, exist_ok=True)
    for k in (1, 4):
        x = torch.cat(list(generate(model, range(64), sigmas=default_sigmas(spec, k), sampler=spec.sampler,
                                    batch_size=64, guidance=args.guidance)))
        save_images(to_numpy_images(codec.to_images(x)), GRIDS / f"lcm-w{args.guidance:g}-{k}step.png")
    _update("lcm", {"model": str(args.model), "config": config.to_dict(), "rows": rows})


def report(args: argparse.Namespace) -> None:
    """Render bench/results/latent.json as the "Latent models" section of docs/benchmarks.md."""
    from throughput import machine, write_docs_section

    r, m = json.loads(RESULTS.read_text()), machine()
    ae, t, sp = r["autoencoder"], r["teacher"], r["speed"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores shared with other sessions' jobs, torch {m['torch']}, "
             "1 torch thread per process (OMP_NUM_THREADS=1). Commands and commits: bench/results/latent.json.", "",
             f"**Autoencoder** `fmnist-ae` ({ae['config']['kimg']:g}k images): latent "
             f"{'x'.join(map(str, ae['latent']))} "
             f"({ae['values']['latent']} values for {ae['values']['image']} pixels), scale {ae['scale']:.4f}. "
             "Reconstructions decode(encode(x)) of the first n test images, and the test images themselves, against "
             "the training images:", "",
             "| autoencoder | metric | n | reconstructions FID | precision | recall | test images FID | precision "
             "| recall |", "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in r if k.startswith("autoencoder")):
        c = r[key]["config"]
        width = c.get("decoder_channels") or c["model_channels"]
        name = f"{c['preset']}, decoder {width} channels, {c['kimg']:g}k images"
        for metric in ("fid-fmnist", "fid-inception"):
            if metric in r[key]:
                row = r[key][metric]
                a, b = row["reconstructions"], row["test_images"]
                lines.append(f"| {name} | {metric} | {row['n']} | {a['fid']:.2f} | {a['precision']:.3f} | "
                             f"{a['recall']:.3f} | {b['fid']:.2f} | {b['precision']:.3f} | {b['recall']:.3f} |")
    c = t["config"]
    lines += ["", f"**Guided latent teacher** `fmnist-latent-edm` ({c['train']['kimg']:g}k images, p_uncond "
              f"{c['train']['p_uncond']:g}), Heun with 18 levels (35 network evaluations; twice that with "
              "guidance w != 1). Pixel-space reference: " + PIXEL_TEACHER + ".", "",
              "| metric | n | guidance w | NFE | FID | precision | recall | sampling wall |",
              "|---|---|---|---|---|---|---|---|"]
    for row in t["rows"]:
        nfe = row["nfe"] * (1 if row["guidance"] == 1 else 2)
        lines.append(f"| {row['metric']} | {row['n']} | {row['guidance']:g} | {nfe} | {row['fid']:.2f} | "
                     f"{row['precision']:.3f} | {row['recall']:.3f} | {row['seconds'] / 60:.1f} min |")
    lines += _lcm_lines(r["lcm"], t) if "lcm" in r else []
    rows, ratios = sp["rows"], sp["rows"]["ratios"]
    pm = {k: f"{v / 1e6:.2f}M" for k, v in sp["parameters"].items()}
    lines += ["", f"**Speed**, fresh networks (pixel fmnist-edm {pm['pixel']} parameters, make demo's pixel network "
              f"{pm['pixel demo']}, latent fmnist-latent-edm {pm['latent']} plus the decoder's {pm['decoder']}), batch "
              f"{sp['batch']} (training: 64), fp32, medians of interleaved repeats; latent sampling includes the "
              "decode:", "", "| variant | images/s |", "|---|---|"]
    lines += [f"| {k} | {v['images_per_s']:.1f} |" for k, v in rows.items() if k != "ratios"]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f}x |" for k, v in ratios.items()]
    lines += ["", "![autoencoder: test images (rows 1-2, 5-6) above their reconstructions (rows 3-4, 7-8)]"
              "(img/latent/ae-reconstructions.png)"]
    lines += [f"![latent teacher, Heun 35 NFE, guidance {w:g}](img/latent/teacher-w{w:g}.png)"
              for w in sorted({row["guidance"] for row in t["rows"]})]
    if "lcm" in r:
        w = r["lcm"]["rows"][0]["guidance"]
        lines += [f"![LCM, {k} step(s), w = {w:g}](img/latent/lcm-w{w:g}-{k}step.png)" for k in (1, 4)]
    write_docs_section("latent", "\n".join(lines), heading="## Latent models (`bench/latent.py`)\n\nThe "
                       "autoencoder's reconstruction FID, the guided latent teacher at 35 evaluations with and "
                       "without guidance, and latent against pixel speed (docs/latent.md).")


def _lcm_lines(lcm_result: dict, teacher_result: dict) -> list[str]:
    """The LCM table: each row's FID and its ratio to the teacher's at 35 evaluations (same metric, n, scale)."""
    c = lcm_result["config"]
    teacher = {(r["metric"], r["n"], r["guidance"]): r["fid"] for r in teacher_result["rows"]}
    lines = ["", f"**LCM** `fmnist-lcm` of that teacher ({c['train']['kimg']:g}k images, w in "
             f"[{c['method']['w_min']:g}, {c['method']['w_max']:g}], skip {c['method']['skip']}), sampled at the "
             "teacher's guidance scale given as its w input (one evaluation per step):", "",
             "| metric | n | w | steps | FID | / teacher at 35 NFE | precision | recall |",
             "|---|---|---|---|---|---|---|---|"]
    for row in lcm_result["rows"]:
        base = teacher.get((row["metric"], row["n"], row["guidance"]))
        ratio = f"{row['fid'] / base:.2f}x" if base else "-"
        lines.append(f"| {row['metric']} | {row['n']} | {row['guidance']:g} | {row['steps']} | {row['fid']:.2f} | "
                     f"{ratio} | {row['precision']:.3f} | {row['recall']:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("recon")
    p.add_argument("model")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--n-inception", type=int, default=2_000)
    p.add_argument("--key", default="autoencoder", help="the results' entry: autoencoder, or autoencoder-* for "
                   "another one (e.g. a narrower decoder), shown beside it")
    p.set_defaults(func=recon)
    p = sub.add_parser("teacher")
    p.add_argument("model")
    p.add_argument("--n", type=int, default=2_000)
    p.add_argument("--n-inception", type=int, default=500, help="0: no fid-inception rows")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    p.set_defaults(func=teacher)
    p = sub.add_parser("speed")
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decoders", nargs="*", default=[], metavar="AE_RUN",
                   help="autoencoders (of the same latent shape) whose decoders are timed too")
    p.add_argument("--latent-channels", type=int, nargs="*", default=[64], help="latent network widths with them")
    p.set_defaults(func=speed)
    p = sub.add_parser("lcm")
    p.add_argument("model")
    p.add_argument("--n", type=int, default=2_000)
    p.add_argument("--n-inception", type=int, default=500)
    p.add_argument("--guidance", type=float, default=2.0)
    p.set_defaults(func=lcm)
    sub.add_parser("report").set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
