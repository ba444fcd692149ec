"""Before/after pictures of zero-shot editing (docs/editing.md), from the public API of cmkit.editing.

Takes a trained Fashion-MNIST consistency model (a run directory or export) and real Fashion-MNIST test
images, and writes one PNG per task into docs/img/editing/ (images enlarged 4x, nearest neighbour), plus a
JSON of the invariants measured on the float outputs and the seconds each task took.
Usage: python bench/editing_figures.py MODEL [--out docs/img/editing] [--n 8]
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
SCALE = 4  # enlarge the 28x28 images for the page
FACTOR = 4  # super-resolution 7x7 -> 28x28
DENOISE_SIGMAS = (0.3, 1.0)
STROKE_LEVELS = (editing.STROKE_SIGMAS, (1.5, 0.5))  # the paper's (LSUN 256x256) levels, and milder ones


def save_rows(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of float [N, C, H, W] images in [-1, 1] (clipped here, at the uint8 conversion) as one PNG."""
    cols = rows[0].shape[0]
    arr = grid(np.concatenate([to_numpy_images(r) for r in rows]), nrow=cols)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    img.resize((img.width * SCALE, img.height * SCALE), Image.Resampling.NEAREST).save(path)


def shown_with_hole(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The input as the algorithm sees it: the pixels to generate drawn mid-gray."""
    return torch.where(mask, torch.zeros_like(x), x)


def stroke_paintings() -> torch.Tensor:
    """Six hand-made stroke paintings (flat gray shapes on black, 28x28): float [6, 1, 28, 28] in [-1, 1]."""
    shapes = [
        [(6, 4), (22, 4), (22, 25), (16, 25), (14, 10), (12, 25), (6, 25)],  # trousers
        [(9, 4), (19, 4), (26, 10), (22, 13), (20, 11), (20, 25), (8, 25), (8, 11), (6, 13), (2, 10)],  # T-shirt
        [(3, 11), (25, 11), (25, 25), (3, 25)],  # bag body (handle drawn below)
        [(2, 16), (12, 14), (18, 17), (26, 18), (26, 23), (2, 23)],  # sneaker
        [(11, 3), (17, 3), (18, 10), (23, 25), (5, 25), (10, 10)],  # dress
        [(9, 4), (19, 4), (26, 22), (23, 23), (20, 12), (20, 25), (8, 25), (8, 12), (5, 23), (2, 22)],  # pullover
    ]
    out = []
    for i, points in enumerate(shapes):
        img = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(img)
        draw.polygon(points, fill=170)
        if i == 2:
            draw.arc((8, 3, 20, 19), 180, 360, fill=170, width=2)
        out.append(torch.from_numpy(np.asarray(img).copy())[None])
    return to_model_range(torch.stack(out))


def run_tasks(model: torch.nn.Module, x: torch.Tensor, out: Path) -> dict:
    """Every task on the test images ``x`` [N, 1, 28, 28]; writes the pictures and returns the measurements."""
    n, seeds = len(x), list(range(len(x)))
    noise = SeededNoise(seeds, x.shape[1:])
    sigmas = editing.editing_sigmas(model)
    report: dict = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        result = fn()
        report[name] = {"seconds": round(time.perf_counter() - start, 2)}
        return result

    masks = {"lower-half": editing.box_mask((0, 14, 28, 14), resolution=28),
             "centre": editing.box_mask((7, 7, 14, 14), resolution=28),
             "left": editing.box_mask((0, 0, 14, 28), resolution=28)}
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

    strokes = stroke_paintings()
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
        editing.colorize(model, x.expand(-1, 3, -1, -1), sigmas=sigmas, noise=noise)
    except CmkitError as e:
        report["colorize"] = {"error": str(e)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Fashion-MNIST consistency model: run directory or export")
    parser.add_argument("--out", default=str(ROOT / "docs/img/editing"))
    parser.add_argument("--n", type=int, default=8, help="test images per picture (default 8)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, _ = load_export(args.model)
    data = load_dataset("fashion-mnist", resolution=28, channels=1, split="test")
    x = to_model_range(data.images[:: len(data) // args.n][: args.n])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "images": f"Fashion-MNIST test, every {len(data) // args.n}th",
              "torch": torch.__version__, "threads": torch.get_num_threads(), **run_tasks(model, x, out)}
    (out / "measurements.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
