"""Before/after pictures of zero-shot editing (docs/editing.md), from the public API of cmkit.editing.

Takes a trained consistency model (a run directory or export) and held-out images: Fashion-MNIST test images by
default, or the images of a folder (``--images``, e.g. an RGB model's held-out images). Writes one PNG per task
into ``--out`` (images enlarged 4x, nearest neighbour), plus a JSON of the invariants measured on the float
outputs and the seconds each task took. Colorization runs on RGB models; a grayscale model records its refusal.
Usage: python bench/editing_figures.py MODEL [--images FOLDER] [--out docs/img/editing] [--n 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cmkit import editing
from cmkit.checkpoint import load_export
from cmkit.data import load_dataset, to_model_range
from cmkit.errors import CmkitError
from cmkit.images import grid, to_numpy_images
from cmkit.sampling import SeededNoise

ROOT = Path(__file__).resolve().parent.parent
SCALE = 4  # enlarge the images for the page
FACTOR = 4  # super-resolution: 7x7 -> 28x28, 8x8 -> 32x32
DENOISE_SIGMAS = (0.3, 1.0)
STROKE_LEVELS = (editing.STROKE_SIGMAS, (1.5, 0.5))  # the paper's (LSUN 256x256) levels, and milder ones

# Stroke paintings on a 28x28 canvas (scaled to the model's size): (background, [(fill, shape, points)]).
# Grayscale: flat garments on black, as in Fashion-MNIST. RGB: flat emoji-like shapes on white.
GARMENTS = (0, [
    (170, "polygon", [(6, 4), (22, 4), (22, 25), (16, 25), (14, 10), (12, 25), (6, 25)]),  # trousers
    (170, "polygon", [(9, 4), (19, 4), (26, 10), (22, 13), (20, 11), (20, 25), (8, 25), (8, 11), (6, 13),
                      (2, 10)]),  # T-shirt
    (170, "polygon", [(3, 11), (25, 11), (25, 25), (3, 25)]), (170, "handle", [(8, 3), (20, 19)]),  # bag
    (170, "polygon", [(2, 16), (12, 14), (18, 17), (26, 18), (26, 23), (2, 23)]),  # sneaker
    (170, "polygon", [(11, 3), (17, 3), (18, 10), (23, 25), (5, 25), (10, 10)]),  # dress
    (170, "polygon", [(9, 4), (19, 4), (26, 22), (23, 23), (20, 12), (20, 25), (8, 25), (8, 12), (5, 23),
                      (2, 22)]),  # pullover
])
EMOJI = ((255, 255, 255), [
    ((250, 200, 40), "ellipse", [(3, 3), (25, 25)]), ((90, 60, 30), "ellipse", [(9, 9), (12, 14)]),
    ((90, 60, 30), "ellipse", [(16, 9), (19, 14)]), ((90, 60, 30), "polygon", [(8, 17), (20, 17), (14, 22)]),  # face
    ((220, 40, 50), "ellipse", [(4, 6), (15, 16)]), ((220, 40, 50), "ellipse", [(13, 6), (24, 16)]),
    ((220, 40, 50), "polygon", [(5, 13), (23, 13), (14, 24)]),  # heart
    ((60, 160, 60), "polygon", [(14, 2), (24, 20), (4, 20)]), ((120, 80, 40), "polygon", [(12, 20), (16, 20),
                                                                                          (16, 26), (12, 26)]),  # tree
    ((60, 130, 220), "ellipse", [(4, 4), (24, 24)]),  # blue ball
    ((230, 50, 40), "ellipse", [(5, 8), (23, 26)]), ((60, 160, 60), "ellipse", [(13, 2), (20, 8)]),  # apple
    ((250, 150, 30), "polygon", [(14, 2), (17, 11), (26, 11), (19, 17), (22, 26), (14, 20), (6, 26), (9, 17),
                                 (2, 11), (11, 11)]),  # star
])
PAINTING_OF = {1: (GARMENTS, [[0], [1], [2, 3], [4], [5], [6]]),
               3: (EMOJI, [[0, 1, 2, 3], [4, 5, 6], [7, 8], [9], [10, 11], [12]])}


def save_rows(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of float [N, C, H, W] images in [-1, 1] (clipped here, at the uint8 conversion) as one PNG."""
    cols = rows[0].shape[0]
    arr = grid(np.concatenate([to_numpy_images(r) for r in rows]), nrow=cols)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    img.resize((img.width * SCALE, img.height * SCALE), Image.Resampling.NEAREST).save(path)


def shown_with_hole(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The input as the algorithm sees it: the pixels to generate drawn mid-gray."""
    return torch.where(mask, torch.zeros_like(x), x)


def stroke_paintings(resolution: int, channels: int) -> torch.Tensor:
    """Six hand-made stroke paintings of flat shapes for the model's data: float [6, C, R, R] in [-1, 1]."""
    (background, shapes), groups = PAINTING_OF[channels]
    mode, k = ("L" if channels == 1 else "RGB"), resolution / 28
    out = []
    for group in groups:
        img = Image.new(mode, (resolution, resolution), background)
        draw = ImageDraw.Draw(img)
        for fill, shape, points in (shapes[i] for i in group):
            xy = [(round(x * k), round(y * k)) for x, y in points]
            if shape == "polygon":
                draw.polygon(xy, fill=fill)
            elif shape == "ellipse":
                draw.ellipse(xy, fill=fill)
            else:  # a bag's handle: the upper half of an ellipse's outline
                draw.arc(xy, 180, 360, fill=fill, width=max(2, round(2 * k)))
        arr = np.asarray(img).copy()
        out.append(torch.from_numpy(arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()))
    return to_model_range(torch.stack(out))


def run_tasks(model: torch.nn.Module, x: torch.Tensor, out: Path) -> dict:
    """Every task on the held-out images ``x`` [N, C, R, R]; writes the pictures and returns the measurements."""
    n, r, seeds = len(x), model.resolution, list(range(len(x)))
    noise = SeededNoise(seeds, x.shape[1:])
    sigmas = editing.editing_sigmas(model)
    report: dict = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        result = fn()
        report[name] = {"seconds": round(time.perf_counter() - start, 2)}
        return result

    half, quarter = r // 2, r // 4
    masks = {"lower-half": editing.box_mask((0, half, r, r - half), resolution=r),
             "centre": editing.box_mask((quarter, quarter, half, half), resolution=r),
             "left": editing.box_mask((0, 0, half, r), resolution=r)}
    rows = [x]
    for name, mask in masks.items():
        filled = timed(f"inpaint-{name}", lambda m=mask: editing.inpaint(model, x, m, sigmas=sigmas, noise=noise))
        report[f"inpaint-{name}"]["max_change_of_known_pixels"] = float((filled - x)[:, :, ~mask].abs().max())
        rows += [shown_with_hole(x, mask), filled]
    save_rows(rows, out / "inpaint.png")

    low = editing.patch_means(x, FACTOR)
    up = timed("superres", lambda: editing.superres(model, low, factor=FACTOR, sigmas=sigmas, noise=noise))
    report["superres"]["max_patch_mean_error"] = float((editing.patch_means(up, FACTOR) - low).abs().max())
    replicated = low.repeat_interleave(FACTOR, 2).repeat_interleave(FACTOR, 3)
    save_rows([x, replicated, up], out / "superres.png")

    rows = [x]
    for sigma in DENOISE_SIGMAS:
        noisy = x + sigma * SeededNoise(seeds, x.shape[1:])()
        rows += [noisy, timed(f"denoise-{sigma}", lambda s=sigma, y=noisy: editing.denoise(model, y, sigma=s))]
    save_rows(rows, out / "denoise.png")

    strokes = stroke_paintings(r, model.channels)
    rows = [strokes]
    for levels in STROKE_LEVELS:
        for seed in range(2):
            z = SeededNoise(range(seed * 100, seed * 100 + len(strokes)), strokes.shape[1:])
            name = "stroke-" + ",".join(map(str, levels))
            rows.append(timed(name, lambda z=z, s=levels: editing.stroke(model, strokes, noise=z, sigmas=s)))
    save_rows(rows, out / "stroke.png")

    pairs = 6
    z0, z1 = SeededNoise(range(pairs), x.shape[1:])(), SeededNoise(range(100, 100 + pairs), x.shape[1:])()
    frames = timed("interpolate", lambda: editing.interpolate(model, z0, z1, frames=n))
    save_rows(list(frames), out / "interpolate.png")

    try:
        rows = [x, editing.luma(x).expand(-1, 3, -1, -1)]
        for seed in range(2):
            z = SeededNoise(range(seed * 100, seed * 100 + n), x.shape[1:])
            colored = timed(f"colorize-seed{seed}", lambda z=z: editing.colorize(model, x, sigmas=sigmas, noise=z))
            report[f"colorize-seed{seed}"]["max_luma_error"] = float((editing.luma(colored) - rows[1][:, :1])
                                                                     .abs().max())
            rows.append(colored)
        save_rows(rows, out / "colorize.png")
    except CmkitError as e:
        report["colorize"] = {"error": str(e)}
    return report


def held_out_images(model: torch.nn.Module, folder: str | None, n: int) -> tuple[torch.Tensor, str]:
    """``n`` evenly spaced images [n, C, R, R] in [-1, 1]: Fashion-MNIST test, or the images of ``folder``."""
    size = {"resolution": model.resolution, "channels": model.channels}
    data = load_dataset(folder, **size) if folder else load_dataset("fashion-mnist", split="test", **size)
    step = len(data) // n
    where = folder or "Fashion-MNIST test"
    return to_model_range(data.images[::step][:n]), f"{where}, every {step}th of {len(data)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a consistency model: run directory or export")
    parser.add_argument("--images", help="a folder of held-out images (default: Fashion-MNIST test images)")
    parser.add_argument("--out", default=str(ROOT / "docs/img/editing"))
    parser.add_argument("--n", type=int, default=8, help="images per picture (default 8)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, _, _ = load_export(args.model)
    x, where = held_out_images(model, args.images, args.n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "images": where, "torch": torch.__version__, "threads": torch.get_num_threads(),
              **run_tasks(model, x, out)}
    (out / "measurements.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
