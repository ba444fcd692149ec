"""Studio latency: from the browser's input event to the new image painted, and a load test.

For each network (fmnist-ict's 1.75M parameters, the demo's 0.44M, and both at the 32x32 RGB size), ``cmkit
serve`` runs in its own process and a headless Chromium (Debian's, driven by Playwright) makes N interactions
per mode, one at a time, each a real input event: a key on the seed field (generate, colorize, super-resolution),
a mouse move on the painting (draw) or on the mask (inpaint), a key on the slider (interpolate); all at 1 step,
fp32 and (for the small network) bf16 autocast.
The page records each answer's time from the event to the frame after the image was painted, and the server's
model time. Browser and server share the machine's cores, as on a laptop; the server computes with its default
torch threads (a grid on torch's 2, one image on 1). The networks carry untrained weights
(built from the presets; the time does not depend on the weights). The load test connects K WebSocket clients
that each send their next request when the last is answered, for S seconds, and counts failures.
Writes bench/results/studio.json and the table in docs/benchmarks.md.
Usage: python bench/studio.py [--interactions 200] [--load-clients 8] [--load-seconds 30]
       python bench/studio.py --screenshot docs/img/studio.png --model RUN [--teacher RUN] (docs/studio.md)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from playwright.sync_api import sync_playwright
from websockets.asyncio.client import connect

from cmkit.checkpoint import build_model, save_export
from cmkit.presets import preset
from cmkit.studio import browser as chromium
from throughput import machine, write_docs_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "studio.json"
NETWORKS = {"fmnist-ict (1.75M)": 32, "demo (0.44M)": 16}  # model_channels
PRECISIONS = {"fmnist-ict (1.75M)": ("fp32",), "demo (0.44M)": ("fp32", "bf16")}
SIZES = {"28x28 gray": (28, 1), "32x32 RGB": (32, 3)}  # resolution, channels
WARM_UP = 5


def build_exports(folder: Path) -> dict[str, tuple[Path, Path, str]]:
    """Untrained exports of fmnist-ict's network at both widths and both image sizes, each with a folder of
    eight random images as its editing sources (so the server never conforms a whole dataset meanwhile) and a
    precision: fp32 for all, bf16 autocast (``--precision bf16``) too for the small network."""
    exports = {}
    rng = np.random.default_rng(0)
    for size_name, (resolution, channels) in SIZES.items():
        images = folder / f"images-{resolution}"
        images.mkdir()
        for i in range(8):
            pixels = rng.integers(0, 256, (resolution, resolution, channels), dtype=np.uint8)
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(images / f"{i}.png")
        for net_name, width in NETWORKS.items():
            base = preset("fmnist-ict")
            config = replace(base, preset=f"{net_name} {size_name}", net=replace(base.net, model_channels=width),
                             data=replace(base.data, resolution=resolution, channels=channels))
            path = folder / f"{width}-{resolution}.safetensors"
            torch.manual_seed(0)
            save_export(build_model(config), config, path)
            for precision in PRECISIONS[net_name]:
                exports[f"{net_name}, {size_name}, {precision}"] = (path, images, precision)
    return exports


@contextlib.contextmanager
def serving(model: Path, *args: str):
    """``cmkit serve MODEL --port 0 ARGS`` in its own process; yields the URL."""
    proc = subprocess.Popen([sys.executable, "-m", "cmkit", "serve", str(model), "--port", "0", *args],
                            stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().split()[2]
    finally:
        proc.terminate()
        proc.wait(30)


# Waits inside the page, so that no round trips between Playwright and the browser run while the server computes
# (on 2 cores they would slow down the model they are timing).
SETTLED = """(mode) => new Promise((resolve) => {
    const check = () => studio.latest[mode] !== undefined && studio.stats.shown[mode] === studio.latest[mode]
        ? resolve() : setTimeout(check, 5);
    check();
})"""


def settle(page, mode: str) -> None:
    """Until the answer to the newest request of ``mode`` is on the screen."""
    page.evaluate(SETTLED, mode)


def interact(page, mode: str, count: int) -> None:
    """``count`` input events of ``mode``, each waited for until its answer is on the screen."""
    page.click(f'nav button[data-mode="{mode}"]')
    settle(page, mode)
    if mode in ("draw", "inpaint"):
        canvas = page.locator("#draw-canvas" if mode == "draw" else "#mask-canvas").bounding_box()
        page.mouse.move(canvas["x"] + 20, canvas["y"] + 20)
        page.mouse.down()
    focus = {"interpolate": "#slider"}.get(mode, "#seed")
    for i in range(count):
        if mode in ("draw", "inpaint"):
            angle = i / 7
            page.mouse.move(canvas["x"] + canvas["width"] * (0.5 + 0.4 * np.cos(angle)),
                            canvas["y"] + canvas["height"] * (0.5 + 0.4 * np.sin(2 * angle)))
        else:
            page.focus(focus)
            page.keyboard.press("ArrowUp" if (i // 50) % 2 == 0 else "ArrowDown")
        settle(page, mode)
    if mode in ("draw", "inpaint"):
        page.mouse.up()


def percentiles(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}


def measure_model(browser, model: Path, images: Path, precision: str, interactions: int) -> dict:
    with serving(model, "--data", str(images), "--precision", precision) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        settle(page, "generate")
        page.wait_for_function("studio.source !== null")
        modes = [m for m in page.evaluate("studio.info.modes") if m != "teacher"]
        page.select_option("#steps", "1")
        for mode in modes:
            interact(page, mode, WARM_UP)
        page.evaluate("for (const k of ['latency', 'model', 'server']) studio.stats[k] = {}")
        for mode in modes:
            interact(page, mode, interactions)
        stats = page.evaluate("studio.stats")
        info = page.evaluate("studio.info")
        assert not stats["errors"], stats["errors"]
        page.close()
    return {"parameters": info["parameters"], "modes": {
        mode: {"latency_ms": percentiles(stats["latency"][mode]), "model_ms": percentiles(stats["model"][mode]),
               "server_ms": percentiles(stats["server"][mode])} for mode in modes}}


async def load_client(url: str, seconds: float, k: int, latencies: list[float], failures: list[str]) -> None:
    modes = [{"mode": "generate"}, {"mode": "interpolate", "seed_a": k, "seed_b": k + 1, "t": 0.5}]
    async with connect(url.replace("http://", "ws://") + "ws") as ws:
        end, i = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            i += 1
            start = time.perf_counter()
            await ws.send(json.dumps({"id": i, "seed": i, **modes[i % 2]}))
            reply = json.loads(await ws.recv())
            if reply.get("id") != i or "images" not in reply:
                failures.append(json.dumps(reply)[:200])
            latencies.append(1e3 * (time.perf_counter() - start))


def load_test(model: Path, clients: int, seconds: float) -> dict:
    """``clients`` WebSocket clients, each with one request in flight, for ``seconds``."""
    latencies: list[float] = []
    failures: list[str] = []

    async def run(url: str) -> None:
        await asyncio.gather(*(load_client(url, seconds, k, latencies, failures) for k in range(clients)))

    with serving(model) as url:
        asyncio.run(run(url))
    return {"clients": clients, "seconds": seconds, "requests": len(latencies), "failures": len(failures),
            "failure_examples": failures[:3], "requests_per_s": len(latencies) / seconds,
            "round_trip_ms": percentiles(latencies)}


def screenshot(out: Path, model: str, teacher: str | None) -> None:
    """docs/studio.md's screenshot: the generate page of a trained ``model`` (with ``teacher``'s samples beside it),
    after one press of Next so that the times shown are warm."""
    with serving(Path(model), *(["--teacher", teacher] if teacher else [])) as url, sync_playwright() as p:
        browser = chromium.launch(p)
        page = browser.new_page(viewport={"width": 1100, "height": 680})
        page.goto(url)
        mode = "teacher" if teacher else "generate"
        settle(page, mode)
        page.click("#generate-next")
        settle(page, "generate")
        settle(page, mode)
        page.screenshot(path=str(out))
        browser.close()


def table(result: dict) -> str:
    m, load = result["machine"], result["load"]
    lines = [f"Command: `{result['command']}` -- {m['date']}, commit {m['commit']}, {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']}; headless Chromium and the server on the same cores, the server computing with "
             f"its default threads (a grid on {m['threads']} torch threads, one image on one fewer); "
             f"{result['interactions']} interactions per mode, one at a time, 1 step; untrained networks of the "
             "presets' sizes.", "",
             "| network, images, precision | parameters | mode | input to screen p50 / p95 ms | model p50 / p95 ms | "
             "server p50 ms |", "|---|---|---|---|---|---|"]
    for name, r in result["models"].items():
        for mode, s in r["modes"].items():
            lat, mod = s["latency_ms"], s["model_ms"]
            lines.append(f"| {name} | {r['parameters']:,} | {mode} | {lat['p50']:.1f} / {lat['p95']:.1f} | "
                         f"{mod['p50']:.1f} / {mod['p95']:.1f} | {s['server_ms']['p50']:.1f} |")
    rt = load["round_trip_ms"]
    lines += ["", f"Load test ({load['model']}): {load['clients']} WebSocket clients for {load['seconds']:.0f} s, "
              f"each sending its next request (generate and interpolate in turn) when the last was answered: "
              f"{load['requests']} requests, {load['failures']} failed, {load['requests_per_s']:.1f} requests/s, "
              f"round trip p50 {rt['p50']:.1f} ms, p95 {rt['p95']:.1f} ms."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=200, help="measured interactions per mode")
    parser.add_argument("--load-clients", type=int, default=8)
    parser.add_argument("--load-seconds", type=float, default=30)
    parser.add_argument("--screenshot", metavar="PNG", help="only write a screenshot of --model's page to PNG")
    parser.add_argument("--model", default="runs/demo", help="the trained model of the screenshot")
    parser.add_argument("--teacher", help="the screenshot's diffusion teacher (optional)")
    args = parser.parse_args()
    if args.screenshot:
        screenshot(Path(args.screenshot), args.model, args.teacher)
        return
    with tempfile.TemporaryDirectory() as tmp:
        exports = build_exports(Path(tmp))
        with sync_playwright() as p:
            browser = chromium.launch(p)
            models = {name: measure_model(browser, *files, args.interactions) for name, files in exports.items()}
            browser.close()
        small = "demo (0.44M), 28x28 gray, fp32"
        load = {"model": small, **load_test(exports[small][0], args.load_clients, args.load_seconds)}
    result = {"command": f"python bench/studio.py --interactions {args.interactions} --load-clients "
                         f"{args.load_clients} --load-seconds {args.load_seconds:g}",
              "machine": machine(), "interactions": args.interactions, "models": models, "load": load}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_docs_section("studio", table(result), heading=(
        "## Studio latency (`bench/studio.py`)\n\nFrom the browser's input event to the new image painted on the "
        "page, for `cmkit serve` (target: p95 under 100 ms for one-step interactions with the small network on 2 "
        "cores)."))
    print(table(result))


if __name__ == "__main__":
    main()
