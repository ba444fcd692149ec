"""The studio's web server: a Starlette app on uvicorn, one WebSocket per browser tab.

- Each tab's requests go through a :class:`Slot` holding only its newest pending request: a request that
  arrives before the previous one was computed replaces it (the replaced one is answered ``superseded``), so a
  tab never waits for answers it no longer wants, and each tab holds at most one request in the queue.
- One model computation runs at a time (``Hub.compute``, a FIFO lock, then one worker thread), so tabs take
  turns; at most ``max_clients`` tabs are connected, later ones are told to try again.
- HTTP serves the page and its assets from the package (nothing else), the model's description, uploads (at
  most :data:`MAX_UPLOAD` bytes) and dataset images. WebSocket messages are capped at :data:`MAX_MESSAGE`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cmkit.errors import CmkitError
from cmkit.studio.engine import Studio

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route, WebSocketRoute
    from starlette.staticfiles import StaticFiles
    from starlette.websockets import WebSocket, WebSocketDisconnect
except ImportError as e:  # an optional extra
    raise CmkitError(f"cmkit serve needs the studio extra ({e.name} is missing): pip install 'cmkit[studio]'") from e

STATIC = Path(__file__).parent / "static"
MAX_RESOLUTION = 256  # the largest model the studio serves (its messages must fit MAX_MESSAGE)
FIELDS_ROOM = 512  # bytes of a request besides its pixels: keys, id, mode, seed, label, steps, strength...


def message_bytes(resolution: int, channels: int) -> int:
    """Bytes of the largest request for a ``resolution`` x ``resolution`` x ``channels`` model (an inpaint: the
    image and its mask as base64 of raw uint8 bytes, :func:`cmkit.studio.engine.pixels_field`), with
    :data:`FIELDS_ROOM` for its other fields."""
    pixels = resolution * resolution
    return _base64_bytes(pixels * channels) + _base64_bytes(pixels) + FIELDS_ROOM


def _base64_bytes(count: int) -> int:
    """Length of the base64 text of ``count`` bytes."""
    return 4 * math.ceil(count / 3)


MAX_MESSAGE = message_bytes(MAX_RESOLUTION, 3)  # bytes of one WebSocket message: 350,040
MAX_UPLOAD = 16 * 1024 * 1024  # bytes of one uploaded image file
MAX_CLIENTS = 16  # connected tabs
log = logging.getLogger("cmkit.studio")


class Slot:
    """A client's newest pending request (or None)."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None
        self.ready = asyncio.Event()

    def offer(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Hold ``request``; return the request it replaces, if one was pending."""
        replaced, self.pending = self.pending, request
        self.ready.set()
        return replaced

    def take(self) -> dict[str, Any] | None:
        request, self.pending = self.pending, None
        self.ready.clear()
        return request

    def stale(self) -> bool:
        """A newer request is pending (read from the worker thread: a plain attribute read)."""
        return self.pending is not None


class Hub:
    """What the connections share: the studio, the compute lock and worker thread, the client count."""

    def __init__(self, studio: Studio, *, max_clients: int) -> None:
        self.studio, self.max_clients = studio, max_clients
        self.clients = 0
        self.compute = asyncio.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmkit-studio")

    async def answer(self, request: dict[str, Any], slot: Slot) -> dict[str, Any]:
        """Compute ``request`` when its turn comes; a bug is logged and answered as an error."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.worker, self.studio.reply, request, slot.stale)
        except Exception as e:  # noqa: BLE001 (the server must keep serving; the traceback goes to the log)
            log.exception("request %s failed", request.get("id"))
            return {"id": request.get("id"), "error": f"internal error: {type(e).__name__}: {e}"}


class Connection:
    """One tab: a receiving loop that fills its :class:`Slot`, a computing loop that empties it."""

    def __init__(self, ws: WebSocket, hub: Hub) -> None:
        self.ws, self.hub = ws, hub
        self.slot = Slot()
        self.sending = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self.sending:
            await self.ws.send_text(json.dumps(message))

    async def receive(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                request = parse_message(message.get("text"))
            except CmkitError as e:
                await self.send({"id": None, "error": str(e)})
                continue
            replaced = self.slot.offer(request)
            if replaced is not None:
                await self.send({"id": replaced["id"], "status": "superseded"})

    async def compute(self) -> None:
        while True:
            await self.slot.ready.wait()
            async with self.hub.compute:  # FIFO: tabs take turns
                request = self.slot.take()
                if request is None:
                    continue
                reply = await self.hub.answer(request, self.slot)
            try:
                await self.send(reply)
            except (WebSocketDisconnect, RuntimeError):  # the tab went away while its answer was computed
                return


def parse_message(text: str | None) -> dict[str, Any]:
    """A WebSocket text message -> a request object with an integer ``id``; CmkitError otherwise."""
    if text is None:
        raise CmkitError("expected a JSON text message, got a binary one")
    try:
        request = json.loads(text)
    except json.JSONDecodeError as e:
        raise CmkitError(f"malformed request: {e}") from None
    if not isinstance(request, dict) or isinstance(request.get("id"), bool) or not isinstance(request.get("id"), int):
        raise CmkitError("malformed request: expected a JSON object with an integer 'id'")
    return request


# ----------------------------------------------------------------------------------------------- routes

async def socket_route(ws: WebSocket) -> None:
    hub: Hub = ws.app.state.hub
    await ws.accept()
    if hub.clients >= hub.max_clients:
        await ws.close(code=1013, reason=f"the studio serves at most {hub.max_clients} tabs; close one and reload")
        return
    hub.clients += 1
    connection = Connection(ws, hub)
    computing = asyncio.create_task(connection.compute())
    try:
        await connection.receive()
    except WebSocketDisconnect:
        pass
    finally:
        computing.cancel()
        hub.clients -= 1


async def index(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html")


async def info(request: Request) -> JSONResponse:
    return JSONResponse({**request.app.state.hub.studio.info(), "max_upload": MAX_UPLOAD})


async def upload(request: Request) -> JSONResponse:
    """POST the raw bytes of an image file: the editing source at the model's size, or a 400/413 error."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_UPLOAD:
        return _error(f"the upload has {int(declared):,} bytes; at most {MAX_UPLOAD:,} are accepted", 413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_UPLOAD:
            return _error(f"the upload has more than {MAX_UPLOAD:,} bytes, the most accepted", 413)
    try:
        return JSONResponse(await run_in_threadpool(request.app.state.hub.studio.upload, bytes(data)))
    except CmkitError as e:
        return _error(str(e), 400)


async def dataset(request: Request) -> JSONResponse:
    """GET ?index=N (or ?index=random): a training image as an editing source."""
    text = request.query_params.get("index", "random")
    if text != "random" and not text.isdigit():
        return _error(f"index {text!r}: expected a non-negative integer or 'random'", 400)
    index = None if text == "random" else int(text)
    try:
        return JSONResponse(await run_in_threadpool(request.app.state.hub.studio.dataset_image, index))
    except CmkitError as e:
        return _error(str(e), 400)


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def make_app(studio: Studio, *, max_clients: int = MAX_CLIENTS) -> Starlette:
    """The studio's ASGI app for ``studio``; CmkitError for a model above :data:`MAX_RESOLUTION`."""
    if studio.shape[0] > MAX_RESOLUTION:
        raise CmkitError(f"a {studio.shape[0]}x{studio.shape[0]} model: the studio serves models up to "
                         f"{MAX_RESOLUTION}x{MAX_RESOLUTION} (its messages are capped at {MAX_MESSAGE:,} bytes)")
    routes = [Route("/", index), Route("/api/info", info), Route("/api/upload", upload, methods=["POST"]),
              Route("/api/dataset", dataset), WebSocketRoute("/ws", socket_route),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    app = Starlette(routes=routes)
    app.state.hub = Hub(studio, max_clients=max_clients)
    return app


def make_server(studio: Studio, sock: socket.socket, **options: int) -> uvicorn.Server:
    """A uvicorn server of :func:`make_app` (``options``: its keywords) for the listening socket ``sock``;
    ``.run(sockets=[sock])`` serves."""
    config = uvicorn.Config(make_app(studio, **options), ws_max_size=MAX_MESSAGE,
                            log_level="warning", lifespan="off")
    return uvicorn.Server(config)


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free one); CmkitError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CmkitError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None
    sock.listen(128)  # connections made once the URL is printed wait for the server instead of failing
    return sock


def serve(studio: Studio, *, host: str = "127.0.0.1", port: int = 8000, **options: int) -> None:
    """Serve ``studio`` on http://host:port (port 0: a free one) until Ctrl-C; prints the URL once listening.
    ``options``: the keywords of :func:`make_app`."""
    if not 0 <= port <= 65535:
        raise CmkitError(f"--port {port}: expected a port number in [0, 65535]")
    sock = listen(host, port)
    name = f"[{host}]" if sock.family == socket.AF_INET6 else host
    print(f"cmkit studio: http://{name}:{sock.getsockname()[1]}/ (Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"cmkit: warning: listening on {host}: anyone who can reach this port can use the studio",
              file=sys.stderr, flush=True)
    make_server(studio, sock, **options).run(sockets=[sock])
