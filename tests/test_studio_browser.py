"""The studio page in a real headless Chromium (Debian's package, driven by Playwright) against ``cmkit serve``:
generate, draw with mouse strokes, inpaint (pixels outside the mask kept in the image the browser received),
the interpolation slider, colorize / super-resolution / classes / teacher for an RGB model (served with a
token), bad uploads, and another site's page, which cannot reach the studio."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cmkit.checkpoint import load_export, save_export
from cmkit.errors import CmkitError
from conftest import import_or_missing, missing_requirement, studio_server

sync_api = import_or_missing("playwright.sync_api", "playwright is not installed: pip install playwright")
import_or_missing("starlette", "the studio extra is not installed: pip install -e '.[studio]'")
from cmkit.studio import browser as chromium  # noqa: E402 (after the requirement checks)

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    try:
        chromium.chromium_path()
    except CmkitError as e:
        missing_requirement(str(e))
    with sync_api.sync_playwright() as p:
        b = chromium.launch(p)
        yield b
        b.close()


@pytest.fixture(scope="module")
def gray_url(studio_files):
    with studio_server(studio_files["gray"], "--data", str(studio_files["gray_data"])) as (url, _):
        yield url


@pytest.fixture(scope="module")
def rgb_url(studio_files):
    """A studio with a token (as off loopback): the page passes the one in its URL on with every request."""
    with studio_server(studio_files["rgb"], "--teacher", str(studio_files["teacher"]),
                       "--data", str(studio_files["rgb_data"]), "--token", "page-token") as (url, _):
        assert url.endswith("?token=page-token")
        yield url


@pytest.fixture
def gray_page(browser, gray_url):
    yield from open_page(browser, gray_url)


@pytest.fixture
def rgb_page(browser, rgb_url):
    yield from open_page(browser, rgb_url)


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    settle(page, "generate")
    yield page
    assert not errors, errors
    assert page.evaluate("studio.stats.errors") == []
    page.close()


def settle(page, mode: str) -> None:
    """Wait until the answer to the newest request of ``mode`` is on the screen."""
    page.wait_for_function(f"studio.latest['{mode}'] !== undefined && studio.stats.shown['{mode}'] === "
                           f"studio.latest['{mode}']", timeout=TIMEOUT_MS)


def shown(page, mode: str, name: str = "result") -> np.ndarray:
    """The image the browser received for ``mode``: its PNG decoded here, checked against the page's own decoding
    (drawn on a canvas), uint8 [H, W, C]."""
    selector = f'img[data-out="{mode}-{name}"]'
    src = page.get_attribute(selector, "src")
    assert src.startswith("data:image/png;base64,")
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    rgba = page.evaluate("""(selector) => {
        const img = document.querySelector(selector);
        const ctx = new OffscreenCanvas(img.naturalWidth, img.naturalHeight).getContext("2d");
        ctx.drawImage(img, 0, 0);
        return Array.from(ctx.getImageData(0, 0, img.naturalWidth, img.naturalHeight).data);
    }""", selector)
    np.testing.assert_array_equal(np.array(rgba, np.uint8).reshape(*image.shape[:2], 4)[..., :3], image)
    return image


def stroke(page, canvas: str, points: list[tuple[float, float]]) -> None:
    """Press the mouse at the first point (fractions of the canvas), move through the others, release."""
    box = page.locator(canvas).bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for point in xy[1:]:
        page.mouse.move(*point, steps=3)
    page.mouse.up()


def test_generate_shows_a_grid_and_a_new_seed_changes_it(gray_page):
    first = shown(gray_page, "generate")
    assert first.shape == (4 * 30 + 2, 4 * 30 + 2, 3)  # 16 images of 28 x 28 with 2-pixel gaps
    gray_page.fill("#seed", "7")
    settle(gray_page, "generate")
    assert not np.array_equal(shown(gray_page, "generate"), first)
    assert "model" in gray_page.inner_text('[data-time="generate"]')


def test_drawing_strokes_changes_the_result(gray_page):
    gray_page.click('nav button[data-mode="draw"]')
    settle(gray_page, "draw")
    before = shown(gray_page, "draw")
    stroke(gray_page, "#draw-canvas", [(0.3, 0.2), (0.5, 0.5), (0.6, 0.8), (0.7, 0.3)])
    settle(gray_page, "draw")
    after = shown(gray_page, "draw")
    assert after.shape == (28, 28, 3) and not np.array_equal(after, before)
    assert gray_page.evaluate("studio.stats.painted.draw") >= 2


def test_inpainting_keeps_the_pixels_outside_the_mask(gray_page):
    gray_page.click('nav button[data-mode="inpaint"]')
    gray_page.wait_for_function("studio.source !== null", timeout=TIMEOUT_MS)
    stroke(gray_page, "#mask-canvas", [(0.2, 0.3), (0.5, 0.35), (0.8, 0.4)])
    settle(gray_page, "inpaint")
    result = shown(gray_page, "inpaint")[..., 0]
    source = np.array(gray_page.evaluate("Array.from(studio.source)"), np.uint8).reshape(28, 28)
    mask = np.array(gray_page.evaluate("Array.from(studio.mask)"), np.uint8).reshape(28, 28)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(result[mask == 0], source[mask == 0])
    assert not np.array_equal(result[mask == 1], source[mask == 1])


def test_the_interpolation_slider_moves_between_the_seeds(gray_page):
    gray_page.click('nav button[data-mode="interpolate"]')
    settle(gray_page, "interpolate")
    start = shown(gray_page, "interpolate")
    slider = gray_page.locator("#slider")
    box = slider.bounding_box()
    gray_page.mouse.click(box["x"] + 0.7 * box["width"], box["y"] + box["height"] / 2)
    settle(gray_page, "interpolate")
    assert int(slider.input_value()) > 50
    assert not np.array_equal(shown(gray_page, "interpolate"), start)


def test_a_gray_model_has_no_colorize_mode(gray_page):
    modes = gray_page.eval_on_selector_all("nav button", "buttons => buttons.map(b => b.dataset.mode)")
    assert modes == ["generate", "draw", "inpaint", "interpolate", "superres"]
    assert gray_page.locator("#class-control").is_hidden() and gray_page.locator("#teacher-figure").is_hidden()


def test_an_rgb_model_colorizes_upsamples_takes_a_class_and_shows_its_teacher(rgb_page):
    settle(rgb_page, "teacher")
    assert shown(rgb_page, "teacher").shape == shown(rgb_page, "generate").shape
    rgb_page.select_option("#label", "3")
    settle(rgb_page, "generate")
    rgb_page.click('nav button[data-mode="colorize"]')
    rgb_page.wait_for_function("studio.source !== null", timeout=TIMEOUT_MS)
    settle(rgb_page, "colorize")
    gray, color = shown(rgb_page, "colorize", "input"), shown(rgb_page, "colorize")
    assert color.shape == (32, 32, 3) and np.ptp(color.astype(int), axis=2).max() > 0  # not gray
    assert (gray[..., 0] == gray[..., 1]).all()
    rgb_page.click('nav button[data-mode="superres"]')
    rgb_page.select_option("#factor", "4")
    settle(rgb_page, "superres")
    assert shown(rgb_page, "superres", "input").shape == (8, 8, 3) and shown(rgb_page, "superres").shape == (32, 32, 3)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_bad_and_good(gray_page):
    gray_page.click('nav button[data-mode="inpaint"]')
    gray_page.set_input_files("#source-file", files=[{"name": "notes.png", "mimeType": "image/png",
                                                      "buffer": b"these are notes"}])
    gray_page.wait_for_selector("#source-status.error", timeout=TIMEOUT_MS)
    assert "not an image" in gray_page.inner_text("#source-status")
    picture = np.full((56, 56), 200, np.uint8)
    upload = {"name": "p.png", "mimeType": "image/png", "buffer": png(picture)}
    gray_page.set_input_files("#source-file", files=[upload])
    gray_page.wait_for_function("document.querySelector('#source-status').textContent === 'uploaded image'",
                                timeout=TIMEOUT_MS)
    assert gray_page.evaluate("Array.from(studio.source).every(v => v === 200)")
    settle(gray_page, "inpaint")
    assert (shown(gray_page, "inpaint") == 200).all()  # an empty mask keeps every pixel


def test_another_sites_page_cannot_use_the_studio(browser, gray_url, gray_page):
    """A page of another origin (localhost's port is not 127.0.0.1's origin) opens a WebSocket to the studio and
    fetches a training image: both refused, while the studio's own page keeps working."""
    address = gray_url.split("/")[2]
    other = browser.new_page()
    other.goto(gray_url.replace("127.0.0.1", "localhost") + "static/studio.css")
    outcome = other.evaluate("""async (address) => {
        const socket = await new Promise((done) => {
            const ws = new WebSocket(`ws://${address}/ws`);
            ws.onopen = () => done("open");
            ws.onerror = () => done("refused");
        });
        let data;
        try { data = await (await fetch(`http://${address}/api/dataset?index=0`)).text(); }
        catch (err) { data = "refused"; }
        return [socket, data];
    }""", address)
    other.close()
    assert outcome == ["refused", "refused"]
    gray_page.fill("#seed", "5")
    settle(gray_page, "generate")


def test_a_guided_model_has_a_guidance_slider_that_changes_the_grid(browser, studio_files, tmp_path):
    """A class-conditional model trained with label dropout: the page shows the guidance control at 1 (none);
    moving it sends the scale, and the grid is the guided one."""
    model, config, spec = load_export(studio_files["rgb"])
    guided = replace(config, train=replace(config.train, p_uncond=0.1))
    save_export(model, guided, tmp_path / "guided.safetensors", spec=spec)
    with studio_server(tmp_path / "guided.safetensors", "--data", str(studio_files["rgb_data"])) as (url, _):
        page = next(open_page(browser, url))
        assert page.locator("#guidance-control").is_visible() and page.input_value("#guidance") == "1"
        first = shown(page, "generate")
        page.fill("#guidance", "3")
        settle(page, "generate")
        assert page.inner_text("#guidance-value") == "3.0" and not np.array_equal(shown(page, "generate"), first)
        assert page.evaluate("studio.stats.errors") == []
        page.close()
