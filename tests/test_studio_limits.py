"""The studio's limits (issue 24): the WebSocket message cap admits the largest legitimate request, a 256x256 RGB
inpaint, and not much more; larger models are refused; ``cmkit serve --device``."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from cmkit.checkpoint import build_model, save_export
from cmkit.cli import main
from cmkit.config import Config, DataConfig, NetConfig
from cmkit.errors import CmkitError
from cmkit.methods import ICTConfig
from cmkit.studio.engine import MAX_SEED, Models, Studio
from conftest import exit_status, import_or_missing

import_or_missing("starlette", "the studio extra is not installed: pip install -e '.[studio]'")
ws_client = import_or_missing("websockets.sync.client", "websockets is not installed: pip install websockets")
server = import_or_missing("cmkit.studio.server", "the studio extra is not installed: pip install -e '.[studio]'")

from test_studio import running  # noqa: E402 (after the extras are known to be there)


def _studio(resolution: int) -> Studio:
    net = NetConfig(model_channels=4, channel_mult=(1,) * 6, num_blocks=1, attn_resolutions=())  # 8x8 at the bottom
    config = Config(preset="tiny-big", net=net, data=DataConfig(resolution=resolution, channels=3), method=ICTConfig())
    torch.manual_seed(0)
    return Studio(Models(build_model(config).eval(), config))


def largest_request(resolution: int = 256) -> str:
    """The page's biggest message (studio.js ``run``: JSON.stringify of an inpaint with its image and mask as base64
    of raw bytes), every number at its longest."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
    mask = np.zeros((resolution, resolution), np.uint8)
    mask[: resolution // 2] = 1
    b64 = lambda a: base64.b64encode(a.tobytes()).decode()  # noqa: E731
    return json.dumps({"id": 2**53 - 1, "mode": "inpaint", "steps": 1, "seed": MAX_SEED, "label": 999,
                       "image": b64(image), "mask": b64(mask)}, separators=(",", ":"))


def test_the_cap_admits_a_256x256_rgb_inpaint_and_not_much_more():
    size = len(largest_request().encode())
    assert size > 349_000  # the 349,581 bytes, which the old 256 KiB cap closed
    assert size <= server.MAX_MESSAGE < 1.01 * size


def test_the_largest_request_is_answered_and_one_byte_over_the_cap_gets_an_error_naming_it():
    studio = _studio(256)
    with running(studio) as address, ws_client.connect(f"ws://{address}/ws", max_size=None) as ws:
        largest = largest_request().replace('"label":999,', "")  # an unconditional model: no label
        ws.send(largest)
        reply = json.loads(ws.recv(timeout=120))
        assert "images" in reply, reply
        ws.send(largest.replace("{", "{" + " " * (server.MAX_MESSAGE + 1 - len(largest)), 1))
        error = json.loads(ws.recv(timeout=30))["error"]
        assert error == (f"a message of {server.MAX_MESSAGE + 1:,} bytes: the studio accepts at most "
                         f"{server.MAX_MESSAGE:,} (a 256x256 RGB image with its mask)")
        ws.send(json.dumps({"id": 3, "mode": "generate"}))  # the socket still works
        assert "images" in json.loads(ws.recv(timeout=120))


def test_a_model_above_the_largest_resolution_is_refused():
    with pytest.raises(CmkitError, match="512x512 model: the studio serves models up to 256x256"):
        server.make_app(_studio(512), server.Access.listening("127.0.0.1", 8000))


def test_the_studio_computes_where_the_model_is():
    assert _studio(64).device == torch.device("cpu")


def test_serve_device_is_checked_before_anything_is_loaded(tmp_path, capsys):
    studio = _studio(64)
    save_export(studio.model, studio.models.config, tmp_path / "m.safetensors")
    assert exit_status(["serve", str(tmp_path / "m.safetensors"), "--device", "gpu"]) == 2
    assert exit_status(["serve", str(tmp_path / "m.safetensors"), "--device", "meta"]) == 2
    if not torch.cuda.is_available():
        assert main(["serve", str(tmp_path / "m.safetensors"), "--device", "cuda"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("cmkit: error: --device ") for line in lines) and len(lines) >= 2
