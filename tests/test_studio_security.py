"""The studio is safe from other web sites (issue 25), against a real server on 127.0.0.1: a rebinding Host is
refused on every route, a cross-site Origin cannot open the socket or upload, a studio with a token answers
nothing without it, closed tabs take their work with them, uploads are bounded, and junk messages get an error
reply on a socket that keeps working."""

from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np
import pytest

from cmkit.errors import CmkitError
from cmkit.studio.access import Access
from conftest import exit_status, import_or_missing, studio_server

import_or_missing("starlette", "the studio extra is not installed: pip install -e '.[studio]'")
ws_client = import_or_missing("websockets.sync.client", "websockets is not installed: pip install websockets")
ws_exceptions = import_or_missing("websockets.exceptions", "websockets is not installed: pip install websockets")
server = import_or_missing("cmkit.studio.server", "the studio extra is not installed: pip install -e '.[studio]'")

from test_studio import load_studio, png_bytes, running_app  # noqa: E402 (after the extras are known to be there)

ROUTES = [("GET", "/"), ("GET", "/api/info"), ("GET", "/api/dataset?index=0"), ("GET", "/static/studio.js"),
          ("POST", "/api/upload"), ("GET", "/ws")]
HANDSHAKE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.fixture(scope="module")
def gray(studio_files):
    return load_studio(studio_files, "gray")


@pytest.fixture(scope="module")
def rgb(studio_files):
    return load_studio(studio_files, "rgb", teacher=True)


def call(address: str, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, str]:
    """One request with exactly ``headers`` (Host included when given): (status, body). ``/ws`` is sent as a
    WebSocket handshake (status 101 when accepted)."""
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {**(HANDSHAKE if path.startswith("/ws") else {}), **(headers or {})}
    if method == "POST" and body is None:
        body = png_bytes(np.zeros((28, 28), np.uint8))
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    text = "" if response.status == 101 else response.read().decode()
    conn.close()
    return response.status, text


def accepted(status: int, path: str) -> bool:
    return status == (101 if path.startswith("/ws") else 200)


def test_a_rebinding_host_is_refused_on_every_route_with_one_log_line(gray, caplog):
    with running_app(gray) as (address, _):
        port = address.split(":")[1]
        for method, path in ROUTES:
            for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1:1", f"127.0.0.2:{port}", ""):
                caplog.clear()
                status, body = call(address, method, path, {"Host": host})
                assert status == 421, (method, path, host, status)
                assert f"Host {host!r}" in json.loads(body)["error"] or not host
                assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
                status, _ = call(address, method, path, {"Host": host})
                assert accepted(status, path), (method, path, host, status)


def test_a_cross_site_origin_cannot_open_the_socket_or_upload(gray):
    with running_app(gray) as (address, _):
        for origin in ("http://attacker.example", "null", f"https://{address}", f"http://localhost:{address[10:]}"):
            with pytest.raises(ws_exceptions.InvalidStatus) as refused:
                ws_client.connect(f"ws://{address}/ws", origin=origin)
            assert refused.value.response.status_code == 403
            status, body = call(address, "POST", "/api/upload", {"Origin": origin})
            assert status == 403 and f"Origin {origin!r} is not this studio's page" in json.loads(body)["error"]
        with ws_client.connect(f"ws://{address}/ws", origin=f"http://{address}") as ws:  # the page's own origin
            ws.send(json.dumps({"id": 1, "mode": "generate"}))
            assert "images" in json.loads(ws.recv(timeout=30))
        with ws_client.connect(f"ws://{address}/ws") as ws:  # no Origin: a script, not a web page
            ws.send(json.dumps({"id": 1, "mode": "generate"}))
            assert "images" in json.loads(ws.recv(timeout=30))


def test_a_studio_with_a_token_answers_nothing_without_it(gray):
    with running_app(gray, token="s3cret-t0ken") as (address, _):
        for method, path in ROUTES:
            sep = "&" if "?" in path else "?"
            for query in ("", f"{sep}token=wrong", f"{sep}token="):
                status, body = call(address, method, path + query)
                assert status == 403 and "needs its token" in json.loads(body)["error"], (path, query)
            assert accepted(call(address, method, f"{path}{sep}token=s3cret-t0ken")[0], path), path
            assert accepted(call(address, method, path, {"Authorization": "token s3cret-t0ken"})[0], path), path
        page = call(address, "GET", "/?token=s3cret-t0ken")[1]
        assert 'src="/static/studio.js?token=s3cret-t0ken"' in page  # the page's assets carry it
        with ws_client.connect(f"ws://{address}/ws?token=s3cret-t0ken") as ws:
            ws.send(json.dumps({"id": 1, "mode": "generate"}))
            assert "images" in json.loads(ws.recv(timeout=30))


def test_off_loopback_the_studio_makes_a_token_and_checks_the_host_it_listens_on():
    assert Access.listening("127.0.0.1", 8000).token is None
    assert Access.listening("::1", 8000).hosts == {"127.0.0.1:8000", "localhost:8000", "[::1]:8000"}
    lan = Access.listening("192.168.1.5", 8000)
    assert len(lan.token) == 32 and lan.token != Access.listening("192.168.1.5", 8000).token
    assert lan.hosts == {"127.0.0.1:8000", "localhost:8000", "[::1]:8000", "192.168.1.5:8000"}
    assert lan.url("192.168.1.5", 8000) == f"http://192.168.1.5:8000/?token={lan.token}"
    everywhere = Access.listening("0.0.0.0", 8000)  # noqa: S104 (the rules, not a bind)
    assert everywhere.hosts is None and everywhere.token
    assert everywhere.refusal({"host": "box.lan:8000"}, "")[0] == 403
    assert everywhere.refusal({"host": "box.lan:8000"}, f"token={everywhere.token}") is None
    assert Access.listening("127.0.0.1", 8000, "given").url("127.0.0.1", 8000) == "http://127.0.0.1:8000/?token=given"
    for bad in ("", " x", "a b"):
        with pytest.raises(CmkitError, match="--token .*: expected a non-empty string without spaces"):
            Access.listening("127.0.0.1", 8000, bad)


def test_cmkit_serve_token_is_in_the_printed_url_and_required(studio_files, capsys):
    with studio_server(studio_files["gray"], "--token", "abc123") as (url, _):
        assert url.endswith("/?token=abc123")
        address = url.split("/")[2]
        assert call(address, "GET", "/")[0] == 403
        assert call(address, "GET", "/?token=abc123")[0] == 200
    assert exit_status(["serve", str(studio_files["gray"]), "--token", ""]) == 2
    assert capsys.readouterr().err.strip() == ("cmkit: error: --token '': expected a non-empty string without "
                                               "spaces")


# ---------------------------------------------------------------------------------------------- bounded work

def wait_for(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_forty_tabs_opened_and_closed_leave_the_server_answering(gray):
    with running_app(gray) as (address, app):
        hub = app.state.hub
        for i in range(40):
            with ws_client.connect(f"ws://{address}/ws") as ws:
                if i % 2:  # half close with a request in flight
                    ws.send(json.dumps({"id": i, "mode": "generate", "seed": i}))
        wait_for(lambda: hub.clients == 0 and not hub.closing, "the closed tabs to be let go")
        assert not hub.compute.locked()
        with ws_client.connect(f"ws://{address}/ws") as ws:
            ws.send(json.dumps({"id": 1, "mode": "generate"}))
            assert "images" in json.loads(ws.recv(timeout=30))


def test_closing_a_tab_mid_request_frees_the_compute_lock_within_one_network_call(rgb, monkeypatch):
    """The teacher's 69 evaluations are held inside the first one until the tab has closed; then no second one
    runs, the compute lock is free and another tab is answered."""
    teacher, started, go, calls = rgb.models.teacher, threading.Event(), threading.Event(), []
    forward = teacher.forward

    def held(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            started.set()
            go.wait(30)
        return forward(*args, **kwargs)

    monkeypatch.setattr(teacher, "forward", held)
    with running_app(rgb) as (address, app):
        hub = app.state.hub
        with ws_client.connect(f"ws://{address}/ws") as ws:
            ws.send(json.dumps({"id": 1, "mode": "teacher", "seed": 0}))
            assert started.wait(30)
        wait_for(lambda: hub.clients == 0, "the server to see the tab close")
        go.set()
        wait_for(lambda: not hub.compute.locked() and not hub.closing, "the compute lock to be freed")
        assert len(calls) == 1
        with ws_client.connect(f"ws://{address}/ws") as ws:
            ws.send(json.dumps({"id": 2, "mode": "generate"}))
            assert "images" in json.loads(ws.recv(timeout=30))
        assert len(calls) == 1


def test_uploads_beyond_the_bound_wait_for_none_and_get_503(gray):
    with running_app(gray) as (address, app):
        hub = app.state.hub
        host, port = address.split(":")
        held = []
        for _ in range(server.MAX_UPLOADS):  # uploads whose bodies are still arriving
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.putrequest("POST", "/api/upload")
            conn.putheader("Content-Length", "1000")
            conn.endheaders(b"x" * 10)
            held.append(conn)
        wait_for(hub.uploads.locked, f"{server.MAX_UPLOADS} uploads to be read")
        status, body = call(address, "POST", "/api/upload")
        assert status == 503 and f"reading {server.MAX_UPLOADS} other uploads" in json.loads(body)["error"]
        for conn in held:
            conn.send(b"x" * 990)
            response = conn.getresponse()
            assert response.status == 400 and "not an image" in json.loads(response.read())["error"]
            conn.close()
        assert call(address, "POST", "/api/upload")[0] == 200


JUNK = ["{not json", "[1, 2]", "null", '"text"', '{"mode": "generate"}', '{"id": true}', '{"id": -1}',
        '{"id": 1.5}', f'{{"id": {2**53}}}', '{"id": NaN}', '{"id": 1, "mode": "generate", "seed": NaN}',
        '{"id": 1, "mode": "generate", "seed": Infinity}', '{"id": 1e999}', '{"id": ' + "9" * 5000 + "}",
        '{"id": 1, "mode": "generate", "seed": ' + "9" * 400 + "}", '{"id": 1, "mode": "generate", "seed": 1e308}',
        '{"id": 1, "mode": "generate", "steps": "2"}', '{"id": 1, "mode": ["generate"]}',
        '{"id": 1, "mode": "interpolate", "t": -1e308}', "[" * 100_000 + "]" * 100_000,
        '{"id": 1, "a": ' + "[" * 100_000 + "]" * 100_000 + "}", b"\x00\x01binary", "x" * (server.MAX_MESSAGE + 1)]


def test_junk_messages_each_get_an_error_reply_and_the_socket_stays_usable(gray):
    with running_app(gray) as (address, _), ws_client.connect(f"ws://{address}/ws", max_size=None) as ws:
        for k, message in enumerate(JUNK):
            ws.send(message)
            reply = json.loads(ws.recv(timeout=30))
            assert set(reply) == {"id", "error"} and reply["id"] in (None, 1), (k, reply)
            ws.send(json.dumps({"id": 7, "mode": "generate", "seed": k}))
            assert "images" in json.loads(ws.recv(timeout=30)), k
