"""cmkit studio without a browser: every mode against sampling / editing and closed forms, bad requests, the
server's protocol (newest request only, bad messages, caps), a bounded load test, and ``cmkit serve``."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import math
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit import editing
from cmkit.checkpoint import build_model, load_export
from cmkit.data import read_image
from cmkit.errors import CmkitError
from cmkit.images import grid, to_numpy_images
from cmkit.methods import sampling_spec, switch_method
from cmkit.rng import SeededNoise
from cmkit.sampling import default_sigmas, generate
from cmkit.studio import engine
from cmkit.studio.engine import GRID, Models, Studio, check_models
from conftest import exit_status, import_or_missing, studio_server

import_or_missing("starlette", "the studio extra is not installed: pip install -e '.[studio]'")
ws_client = import_or_missing("websockets.sync.client", "websockets is not installed: pip install websockets")
server = import_or_missing("cmkit.studio.server", "the studio extra is not installed: pip install -e '.[studio]'")


def load_studio(files, name: str, *, teacher: bool = False) -> Studio:
    model, config, spec = load_export(files[name])
    t, tc, _ = load_export(files["teacher"]) if teacher else (None, None, None)
    return Studio(Models(model, config, t, tc, spec), data=str(files[f"{name}_data"]))


@pytest.fixture(scope="module")
def gray(studio_files) -> Studio:
    return load_studio(studio_files, "gray")


@pytest.fixture(scope="module")
def rgb(studio_files) -> Studio:
    return load_studio(studio_files, "rgb", teacher=True)


def decode(url: str) -> np.ndarray:
    """A PNG data URL -> uint8 [H, W, C]."""
    assert url.startswith("data:image/png;base64,")
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return image[..., None] if image.ndim == 2 else image


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).decode()


def source(studio: Studio, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, studio.shape, dtype=np.uint8)


def ask(studio: Studio, **request) -> dict[str, np.ndarray]:
    reply = studio.reply({"id": 1, **request})
    assert "error" not in reply, reply
    assert reply["id"] == 1 and reply["mode"] == request["mode"] and reply["model_ms"] >= 0
    return {name: decode(url) for name, url in reply["images"].items()}


def model_range(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1


# ------------------------------------------------------------------------------------------ the modes

@pytest.mark.parametrize("steps", [1, 2])
def test_generate_is_cmkit_sample_of_the_same_seeds(gray, steps):
    got = ask(gray, mode="generate", seed=5, steps=steps)["result"]
    x = next(generate(gray.model, range(5, 5 + GRID), sigmas=default_sigmas(gray.spec, steps),
                      sampler="consistency", batch_size=GRID))
    np.testing.assert_array_equal(got, grid(to_numpy_images(x)))


def test_bf16_autocast_is_generate_in_bf16_and_keeps_known_pixels(studio_files):
    model, config, spec = load_export(studio_files["gray"])
    studio = Studio(Models(model, config), precision="bf16")
    got = ask(studio, mode="generate", seed=1)["result"]
    x = next(generate(model, range(1, 1 + GRID), sigmas=default_sigmas(spec, 1), sampler="consistency",
                      batch_size=GRID, precision="bf16"))
    np.testing.assert_array_equal(got, grid(to_numpy_images(x)))
    image, mask = source(studio), np.zeros((28, 28), np.uint8)
    mask[:, :10] = 1
    inpainted = ask(studio, mode="inpaint", image=b64(image), mask=b64(mask), steps=2)["result"]
    np.testing.assert_array_equal(inpainted[mask == 0], image[mask == 0])
    with pytest.raises(CmkitError, match="precision 'fp16': expected one of fp32, bf16"):
        Studio(Models(model, config), precision="fp16")


def test_generate_class_label(rgb):
    got = ask(rgb, mode="generate", seed=0, label=3)["result"]
    x = next(generate(rgb.model, range(GRID), sigmas=default_sigmas(rgb.spec, 1), sampler="consistency",
                      batch_size=GRID, label=3))
    np.testing.assert_array_equal(got, grid(to_numpy_images(x)))
    assert not np.array_equal(got, ask(rgb, mode="generate", seed=0, label=4)["result"])


def test_a_model_trained_with_label_dropout_is_guided_as_cmkit_sample_guides_it(rgb):
    """Classifier-free guidance in the page's range [1, 4], the teacher guided alike; a model without label dropout
    offers no guidance control and refuses the field."""
    config = rgb.models.config
    guided = Studio(replace(rgb.models, config=replace(config, train=replace(config.train, p_uncond=0.1)),
                            teacher_config=replace(rgb.models.teacher_config, train=replace(
                                rgb.models.teacher_config.train, p_uncond=0.1))))
    assert guided.info()["guidance"] == {"min": 1.0, "max": 4.0, "default": 1.0} and rgb.info()["guidance"] is None
    got = ask(guided, mode="generate", seed=3, guidance=2.5)["result"]
    x = next(generate(rgb.model, range(3, 3 + GRID), sigmas=default_sigmas(rgb.spec, 1), sampler="consistency",
                      batch_size=GRID, guidance=2.5))
    np.testing.assert_array_equal(got, grid(to_numpy_images(x)))
    assert not np.array_equal(got, ask(guided, mode="generate", seed=3)["result"])
    teacher = ask(guided, mode="teacher", seed=3, guidance=2.5)["result"]
    spec = sampling_spec(rgb.models.teacher_config.method)
    x = next(generate(rgb.models.teacher, range(3, 3 + GRID), sigmas=default_sigmas(spec, engine.TEACHER_STEPS),
                      sampler="heun", batch_size=GRID, guidance=2.5))
    np.testing.assert_array_equal(teacher, grid(to_numpy_images(x)))
    assert guided.reply({"id": 1, "mode": "generate", "guidance": 4.5})["error"] == (
        "request field 'guidance': 4.5 outside [1, 4]")
    assert "this model takes no guidance scale" in rgb.reply({"id": 1, "mode": "generate", "guidance": 2})["error"]


def test_an_lcm_model_takes_the_pages_scale_as_its_w_input(tiny_config):
    config = replace(tiny_config, method=replace(switch_method(tiny_config.method, "lcm"), w_min=1.0, w_max=3.0,
                                                 w_default=2.0), net=replace(tiny_config.net, num_classes=10,
                                                                             guidance_dim=8))
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():  # as if trained: the w input and the output layer start at zero
        for parameter in model.net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    studio = Studio(Models(model, config))
    assert studio.info()["guidance"] == {"min": 1.0, "max": 3.0, "default": 2.0}
    got = ask(studio, mode="generate", seed=0, guidance=1.5)["result"]
    x = next(generate(model, range(GRID), sigmas=default_sigmas(studio.spec, 1), sampler="consistency",
                      batch_size=GRID, guidance=1.5))
    np.testing.assert_array_equal(got, grid(to_numpy_images(x)))
    np.testing.assert_array_equal(ask(studio, mode="generate", seed=0)["result"],
                                  ask(studio, mode="generate", seed=0, guidance=2.0)["result"])  # the default w
    assert not np.array_equal(got, ask(studio, mode="generate", seed=0, guidance=2.0)["result"])
    assert "outside [1, 3]" in studio.reply({"id": 1, "mode": "generate", "guidance": 3.5})["error"]


def test_teacher_samples_the_same_seeds_with_heun(rgb):
    got = ask(rgb, mode="teacher", seed=2)["result"]
    teacher = rgb.models.teacher
    spec = sampling_spec(rgb.models.teacher_config.method)
    x = next(generate(teacher, range(2, 2 + GRID), sigmas=default_sigmas(spec, engine.TEACHER_STEPS),
                      sampler="heun", batch_size=GRID))
    np.testing.assert_array_equal(got, grid(to_numpy_images(x)))


def test_a_stale_teacher_request_stops_at_its_next_evaluation(rgb):
    calls = []

    def stale() -> bool:
        calls.append(1)
        return len(calls) > 3

    assert rgb.reply({"id": 7, "mode": "teacher", "seed": 0}, stale) == {"id": 7, "status": "superseded"}
    assert len(calls) == 4  # three evaluations of 35 ran


@pytest.mark.parametrize("steps", [1, 4])
def test_inpaint_keeps_every_pixel_outside_the_mask(gray, steps):
    image = source(gray)
    mask = np.zeros(gray.shape[:2], np.uint8)
    mask[5:15, 8:20] = 1
    got = ask(gray, mode="inpaint", image=b64(image), mask=b64(mask), steps=steps, seed=3)["result"]
    np.testing.assert_array_equal(got[mask == 0], image[mask == 0])
    assert not np.array_equal(got[mask == 1], image[mask == 1])
    untouched = ask(gray, mode="inpaint", image=b64(image), mask=b64(np.zeros_like(mask)), steps=steps)["result"]
    np.testing.assert_array_equal(untouched, image)


@pytest.mark.parametrize("label", [3, None])
def test_studio_inpaint_is_cmkit_edit_bit_for_bit(rgb, studio_files, tmp_path, label):
    """Issue 24: the studio's inpaint with seed 5, 2 steps and label 3 differed from `cmkit edit --label 3` of the
    same seed by up to 255 levels (the studio drew no class from the seed when given one, so its noise differed).
    One seed -> class rule and the same batch padding: the same image, bit for bit, with a label and without."""
    from cmkit.cli import main

    image = source(rgb, seed=4)
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[:, :14] = 255
    request = {"mode": "inpaint", "image": b64(image), "mask": b64(mask), "seed": 5, "steps": 2}
    got = ask(rgb, **request, **({"label": label} if label is not None else {}))["result"]
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    sigmas = ",".join(repr(s) for s in default_sigmas(rgb.spec, 2).tolist())
    options = ["--label", str(label)] if label is not None else []
    assert main(["edit", "inpaint", str(studio_files["rgb"]), "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--seed", "5", "--sigmas", sigmas, "--out", str(tmp_path / "out.png"),
                 *options]) == 0
    np.testing.assert_array_equal(got, read_image(tmp_path / "out.png", channels=3).transpose(1, 2, 0))
    assert not np.array_equal(got[:, :14], image[:, :14])


def test_colorize_keeps_the_gray_values(rgb):
    image = source(rgb)
    got = ask(rgb, mode="colorize", image=b64(image), steps=2, seed=1)
    gray = editing.luma(model_range(image))
    np.testing.assert_array_equal(got["input"], to_numpy_images(gray)[0])
    luma_out = editing.luma(model_range(got["result"]))
    assert (luma_out - gray).abs().max() <= 1 / 127.5  # within one level after the uint8 rounding


@pytest.mark.parametrize("factor", [2, 4])
def test_superres_keeps_every_patch_mean(gray, factor):
    image = source(gray)
    got = ask(gray, mode="superres", image=b64(image), factor=factor, steps=2)
    low = editing.patch_means(model_range(image), factor)
    np.testing.assert_array_equal(got["input"], to_numpy_images(low)[0])
    means = editing.patch_means(model_range(got["result"]), factor)
    assert (means - low).abs().max() <= 1 / 127.5
    assert got["result"].shape == image.shape


def test_interpolate_ends_at_the_one_step_samples_of_both_seeds(gray):
    m = gray.model
    shape = (m.channels, m.resolution, m.resolution)
    for t, seed in [(0.0, 11), (1.0, 12)]:
        got = ask(gray, mode="interpolate", seed_a=11, seed_b=12, t=t)["result"]
        with torch.no_grad():
            direct = m(m.sigma_max * SeededNoise([seed], shape)(), m.sigma_max).clamp(-1, 1)
        np.testing.assert_array_equal(got, to_numpy_images(direct)[0])
    middle = ask(gray, mode="interpolate", seed_a=11, seed_b=12, t=0.5)["result"]
    assert not np.array_equal(middle, got)


def test_draw_at_the_lowest_strength_returns_the_painting(gray):
    # f(x, sigma) -> x as sigma -> sigma_min (the boundary condition), so the painting comes back.
    painting = source(gray)
    lowest = 1.01 * gray.model.sigma_min
    got = ask(gray, mode="draw", image=b64(painting), strength=lowest, steps=2)["result"]
    assert np.abs(got.astype(int) - painting).max() <= 2
    strong = ask(gray, mode="draw", image=b64(painting), strength=5.38, steps=2)["result"]
    assert np.abs(strong.astype(int) - painting).mean() > 20


def test_draw_two_steps_are_the_papers_levels(gray):
    painting = source(gray)
    got = ask(gray, mode="draw", image=b64(painting), strength=5.38, steps=2, seed=4)["result"]
    with torch.no_grad():
        x = editing.stroke(gray.model, model_range(painting), noise=SeededNoise([4], painting.shape[::-1]),
                           sigmas=[5.38, 5.38 * 2.24 / 5.38])
    np.testing.assert_array_equal(got, to_numpy_images(x)[0])


def test_a_grid_uses_every_thread_one_image_one_fewer_and_both_restore_the_count(studio_files):
    """The thread count the model runs under, read inside its forward: ``threads`` for a grid, one fewer for
    one image; the caller's count is back after each reply."""
    model, config, _ = load_export(studio_files["gray"])
    before, seen = torch.get_num_threads(), []
    studio = Studio(Models(model, config), threads=before + 2)
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        ask(studio, mode="generate")
        assert set(seen) == {before + 2} and torch.get_num_threads() == before
        seen.clear()
        ask(studio, mode="interpolate", seed_a=0, seed_b=1, t=0.5)
        assert set(seen) == {before + 1} and torch.get_num_threads() == before
    finally:
        hook.remove()


def test_modes_follow_the_model(gray, rgb):
    assert "colorize" not in gray.modes and "teacher" not in gray.modes and "superres" in gray.modes
    assert {"colorize", "superres", "teacher"} <= set(rgb.modes)
    assert gray.factors == (2, 4, 7, 14) and rgb.info()["teacher"]["evaluations"] == 35
    info = json.loads(json.dumps(gray.info()))
    assert info["resolution"] == 28 and info["channels"] == 1 and info["classes"] == 0


# ---------------------------------------------------------------------------------------- bad input

BAD = [
    ([], "expected a JSON object"),
    ({"id": 1}, "'mode': missing"),
    ({"id": 1, "mode": "paint"}, "'mode': 'paint'"),
    ({"id": 1, "mode": "colorize"}, "'mode': 'colorize'"),
    ({"id": 1, "mode": "generate", "steps": 3}, "'steps': 3; expected one of 1, 2, 4, 8"),
    ({"id": 1, "mode": "generate", "seed": -1}, "'seed': -1 outside"),
    ({"id": 1, "mode": "generate", "seed": "7"}, "'seed': expected an integer, got str"),
    ({"id": 1, "mode": "generate", "label": 1}, "not class-conditional"),
    ({"id": 1, "mode": "generate", "steps": True}, "'steps': expected an integer, got bool"),
    ({"id": 1, "mode": "draw", "image": "AAAA"}, "'image': 3 bytes; expected 784"),
    ({"id": 1, "mode": "draw", "image": "%%%"}, "'image': not base64"),
    ({"id": 1, "mode": "inpaint", "image": b64(np.zeros((28, 28, 1)))}, "'mask': missing"),
    ({"id": 1, "mode": "superres", "image": b64(np.zeros((28, 28, 1))), "factor": 3}, "'factor': 3"),
    ({"id": 1, "mode": "interpolate", "seed_a": 0, "seed_b": 1, "t": 1.5}, "'t': 1.5 outside [0, 1]"),
    ({"id": 1, "mode": "interpolate", "seed_a": 0, "seed_b": 1, "t": math.nan}, "'t': nan outside"),
    ({"id": 1, "mode": "draw", "image": b64(np.zeros((28, 28, 1))), "strength": 500}, "'strength': 500"),
]


@pytest.mark.parametrize(("request_", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_requests_are_answered_with_an_error_naming_the_field(gray, request_, message):
    reply = gray.reply(request_)
    assert message in reply["error"] and set(reply) == {"id", "error"}


def test_a_class_conditional_model_rejects_a_label_out_of_range(rgb):
    assert "'label' 10: expected a class in [0, 10)" in rgb.reply({"id": 1, "mode": "generate", "label": 10})["error"]


def test_only_a_consistency_model_is_served_and_only_an_edm_teacher_beside_it(studio_files):
    model, config, _ = load_export(studio_files["rgb"])
    teacher, teacher_config, _ = load_export(studio_files["teacher"])
    with pytest.raises(CmkitError, match=r"the studio \(cmkit serve\) needs a model with the 'serve' capability "
                                         r"\(one trained with ct, ict, cd, ect, sct, scd, lcm, meanflow, tcm\); "
                                         "this model was trained with edm"):
        check_models(Models(teacher, teacher_config))
    with pytest.raises(CmkitError, match="--teacher: a model trained with ict; the studio shows a model with the"):
        check_models(Models(teacher=model, teacher_config=config, model=model, config=config))
    gray, gray_config, _ = load_export(studio_files["gray"])
    with pytest.raises(CmkitError, match=r"differ from the model's \(28, 1, 0\)"):
        check_models(Models(gray, gray_config, teacher, teacher_config))


# --------------------------------------------------------------------------------------------- sources

def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_upload_is_conformed_like_a_training_image(rgb, tmp_path):
    picture = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    (tmp_path / "p.png").write_bytes(png_bytes(picture))
    got = rgb.upload(png_bytes(picture))
    want = read_image(tmp_path / "p.png", channels=3, resolution=32).transpose(1, 2, 0)
    np.testing.assert_array_equal(decode(got["image"]), want)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(got["pixels"]), np.uint8).reshape(want.shape), want)


def test_bad_uploads_are_refused_with_a_message(gray, monkeypatch):
    with pytest.raises(CmkitError, match="the upload is not an image"):
        gray.upload(b"%PDF-1.4 not an image")
    with pytest.raises(CmkitError, match="cannot read the upload"):
        noisy = png_bytes(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8))
        gray.upload(noisy[:len(noisy) // 2])
    monkeypatch.setattr(engine, "MAX_UPLOAD_PIXELS", 1000)
    with pytest.raises(CmkitError, match="an image of 40 x 40 pixels is too large; expected at most 1,000"):
        gray.upload(png_bytes(np.zeros((40, 40), np.uint8)))


def test_training_images_as_sources(gray, studio_files):
    got = gray.dataset_image(2)
    assert got["index"] == 2 and got["count"] == 4 and got["label"] is None
    want = read_image(studio_files["gray_data"] / "2.png", channels=1).transpose(1, 2, 0)
    np.testing.assert_array_equal(decode(got["image"]), want)
    with pytest.raises(CmkitError, match="has images 0 to 3"):
        gray.dataset_image(4)
    assert 0 <= gray.dataset_image(None)["index"] < 4


def test_unreadable_training_data_points_to_the_upload(studio_files, tmp_path):
    model, config, _ = load_export(studio_files["gray"])
    studio = Studio(Models(model, config), data=str(tmp_path / "missing"))
    with pytest.raises(CmkitError, match="cannot be read .*; upload an image instead"):
        studio.dataset_image(0)


# ---------------------------------------------------------------------------------------------- server

@contextlib.contextmanager
def running_app(studio: Studio, *, token: str | None = None, max_clients: int = 16):
    """The studio's server on a free port of 127.0.0.1 in a thread (with ``token`` as ``cmkit serve --token``);
    yields (host:port, the app)."""
    sock = server.listen("127.0.0.1", 0)
    access = server.Access.listening("127.0.0.1", sock.getsockname()[1], token)
    uv = server.make_server(studio, sock, access, max_clients=max_clients)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}", uv.config.app
    finally:
        uv.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def running(studio: Studio, *, max_clients: int = 16):
    """:func:`running_app` without a token; yields host:port."""
    with running_app(studio, max_clients=max_clients) as (address, _):
        yield address


def answers(ws, count: int) -> dict[int | None, dict]:
    replies = {}
    for _ in range(count):
        reply = json.loads(ws.recv(timeout=30))
        assert reply["id"] not in replies
        replies[reply["id"]] = reply
    return replies


def test_a_client_gets_only_its_newest_request_computed(rgb):
    with running(rgb) as address, ws_client.connect(f"ws://{address}/ws") as ws:
        ws.send(json.dumps({"id": 0, "mode": "teacher", "seed": 0}))  # 35 evaluations: the rest arrive meanwhile
        for i in range(1, 11):
            ws.send(json.dumps({"id": i, "mode": "generate", "seed": i}))
        replies = answers(ws, 11)
    assert set(replies) == set(range(11))  # every request answered once
    computed = [i for i, r in replies.items() if "images" in r]
    assert 10 in computed and len(computed) <= 3, replies
    assert all(r.get("status") == "superseded" for i, r in replies.items() if i not in computed)


def test_bad_messages_are_answered_and_the_connection_keeps_working(gray):
    with running(gray) as address, ws_client.connect(f"ws://{address}/ws") as ws:
        for message in ["{not json", json.dumps([1, 2]), json.dumps({"mode": "generate"}), b"\x00\x01"]:
            ws.send(message)
            reply = json.loads(ws.recv(timeout=10))
            assert reply["id"] is None and ("malformed request" in reply["error"] or "binary" in reply["error"])
        ws.send(json.dumps({"id": 5, "mode": "generate", "steps": 9}))
        assert "'steps': 9" in json.loads(ws.recv(timeout=10))["error"]
        ws.send(json.dumps({"id": 6, "mode": "generate"}))
        assert "images" in json.loads(ws.recv(timeout=30))


def test_a_frame_beyond_the_servers_bound_closes_only_its_own_connection(gray):
    with running(gray) as address, ws_client.connect(f"ws://{address}/ws") as other:
        with ws_client.connect(f"ws://{address}/ws", max_size=None) as ws:
            ws.send("x" * (server.MAX_FRAME + 1))
            with pytest.raises(Exception) as closed:  # noqa: PT011 (websockets' ConnectionClosed family)
                ws.recv(timeout=10)
            assert ws.protocol.close_code == 1009, closed.value
        other.send(json.dumps({"id": 1, "mode": "generate"}))
        assert "images" in json.loads(other.recv(timeout=30))


def test_clients_beyond_the_cap_are_told_to_come_back(gray):
    with running(gray, max_clients=2) as address, ws_client.connect(f"ws://{address}/ws") as a, \
            ws_client.connect(f"ws://{address}/ws") as b, ws_client.connect(f"ws://{address}/ws") as c:
        with pytest.raises(Exception):  # noqa: B017, PT011 (closed by the server)
            c.recv(timeout=10)
        assert c.protocol.close_code == 1013 and "at most 2 tabs" in c.protocol.close_reason
        for ws in (a, b):
            ws.send(json.dumps({"id": 1, "mode": "generate"}))
            assert "images" in json.loads(ws.recv(timeout=30))


def get(address: str, path: str, data: bytes | None = None) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://{address}{path}", data=data), timeout=30) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    return status, json.loads(body) if body.startswith("{") else body


def too_large_upload(address: str) -> tuple[int, str]:
    """Announce an upload one byte over the cap and read the answer, which comes before any byte is sent."""
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/api/upload")
    conn.putheader("Content-Length", str(server.MAX_UPLOAD + 1))
    conn.endheaders()
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    conn.close()
    return response.status, error[error.index("at most"):]


def test_http_routes_serve_the_page_uploads_and_nothing_else(gray):
    with running(gray) as address:
        assert "cmkit studio" in get(address, "/")[1]
        assert "WebSocket" in get(address, "/static/studio.js")[1]
        assert get(address, "/static/../engine.py")[0] == 404
        assert get(address, "/static/%2e%2e/engine.py")[0] == 404
        assert get(address, "/api/info")[1]["resolution"] == 28
        status, body = get(address, "/api/upload", b"not an image")
        assert status == 400 and "the upload is not an image" in body["error"]
        assert too_large_upload(address) == (413, f"at most {server.MAX_UPLOAD:,} are accepted")
        status, body = get(address, "/api/upload", png_bytes(np.zeros((56, 56), np.uint8)))
        assert status == 200 and decode(body["image"]).shape == (28, 28, 1)
        assert get(address, "/api/dataset?index=x")[0] == 400
        assert get(address, "/api/dataset?index=9")[1]["error"].endswith("has images 0 to 3")
        assert get(address, "/api/dataset?index=1")[1]["index"] == 1


def test_load_several_clients_for_a_bounded_time(gray):
    """Four clients, each sending its next request when the last was answered, for three seconds: every client
    finishes, every request gets its own answer (id and image), at least three each, and an answer under load is
    the one the same request gets alone."""
    answered: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(4)]
    failures: list[str] = []

    def client(k: int, address: str) -> None:
        with ws_client.connect(f"ws://{address}/ws") as ws:
            end, i = time.monotonic() + 3, 0
            while time.monotonic() < end:
                i += 1
                ws.send(json.dumps({"id": i, "mode": "interpolate", "seed_a": k, "seed_b": i, "t": 0.5}))
                reply = json.loads(ws.recv(timeout=30))
                if reply.get("id") != i or "images" not in reply:
                    failures.append(str(reply)[:200])
                else:
                    answered[k].append((i, decode(reply["images"]["result"])))

    with running(gray) as address:
        threads = [threading.Thread(target=client, args=(k, address)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads), "a client was still waiting after 60 s"
    assert not failures and all(len(replies) >= 3 for replies in answered), (failures, [len(a) for a in answered])
    for k, replies in enumerate(answered):
        for i, image in replies[:2]:
            alone = ask(gray, mode="interpolate", seed_a=k, seed_b=i, t=0.5)["result"]
            np.testing.assert_array_equal(image, alone)


# ---------------------------------------------------------------------------------------------- cmkit serve

def test_cmkit_serve_prints_its_url_serves_the_page_and_stops_on_ctrl_c(studio_files):
    with studio_server(studio_files["gray"], "--data", str(studio_files["gray_data"])) as (url, proc):
        assert url.startswith("http://127.0.0.1:")
        assert "cmkit studio" in urllib.request.urlopen(url, timeout=30).read().decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert "cmkit studio: stopped" in proc.stderr.read()


def test_cmkit_serve_refuses_a_diffusion_model_and_a_taken_port(studio_files, capsys):
    """Refused in-process before anything is served: status 2 and one line naming the problem."""
    assert exit_status(["serve", str(studio_files["teacher"])]) == 2
    err = capsys.readouterr().err
    assert "needs a model with the 'serve' capability" in err and len(err.splitlines()) == 1, err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert exit_status(["serve", str(studio_files["gray"]), "--port", port]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.splitlines()) == 1, err
