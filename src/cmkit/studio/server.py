"""The studio's web server: a Starlette app on uvicorn, one WebSocket per browser tab.

- Each tab's requests go through a :class:`Slot` holding only its newest pending request: a request that
  arrives before the previous one was computed replaces it (the replaced one is answered ``superseded``), so a
  tab never waits for answers it no longer wants, and each tab holds at most one request in the queue.
- One model computation runs at a time (``Hub.compute``, a FIFO lock, then one worker thread), so tabs take
  turns; at most ``max_clients`` tabs are connected, later ones are told to try again.
- A tab that closes takes its work with it: its pending request is dropped and the running one stops at its next
  network call (:meth:`Slot.close`).
- HTTP serves the page and its assets from the package (nothing else), the model's description, uploads (at
  most :data:`MAX_UPLOAD` bytes, :data:`MAX_UPLOADS` read and decoded at once, others answered 503) and dataset
  images. A WebSocket message over :data:`MAX_MESSAGE` bytes is answered with an error; a frame over
  :data:`MAX_FRAME` closes its socket (1009).
- Every request passes :class:`Guard` first: the Host, Origin and token checks of :mod:`cmkit.studio.access`.
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
from string import Template
from typing import Any

from cmkit.errors import CmkitError
from cmkit.studio.access import LOOPBACK, Access, check_token
from cmkit.studio.engine import Studio

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
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
MAX_FRAME = 4 * MAX_MESSAGE  # bytes of a frame the server reads at all; a larger one closes its socket
MAX_UPLOAD = 16 * 1024 * 1024  # bytes of one uploaded image file
MAX_UPLOADS = 2  # uploads read and decoded at once
MAX_ID = 2**53 - 1  # the largest request id (the page's ids are JavaScript numbers)
MAX_CLIENTS = 16  # connected tabs
log = logging.getLogger("cmkit.studio")


class Slot:
    """A client's newest pending request (or None), until the client goes away (:meth:`close`)."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None
        self.closed = False
        self.ready = asyncio.Event()

    def offer(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Hold ``request``; return the request it replaces, if one was pending."""
        replaced, self.pending = self.pending, request
        self.ready.set()
        return replaced

    def take(self) -> dict[str, Any] | None:
        request, self.pending = self.pending, None
        if not self.closed:
            self.ready.clear()
        return request

    def close(self) -> None:
        """The client went away: drop its pending request; the running one becomes :meth:`stale`."""
        self.closed, self.pending = True, None
        self.ready.set()

    def stale(self) -> bool:
        """A newer request is pending or the client went away (read from the worker thread: plain attribute
        reads), so the running request's answer is no longer wanted."""
        return self.closed or self.pending is not None


class Hub:
    """What the connections share: the studio, the compute lock and worker thread, the client count."""

    def __init__(self, studio: Studio, *, max_clients: int) -> None:
        self.studio, self.max_clients = studio, max_clients
        self.clients = 0
        self.compute = asyncio.Lock()
        self.uploads = asyncio.Semaphore(MAX_UPLOADS)
        self.closing: set[asyncio.Task] = set()  # closed tabs' computing loops, until they end
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
        """Fill the slot until the client disconnects; a bad message is answered with an error."""
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
        """Answer the slot's requests one at a time, until the slot is closed."""
        while not self.slot.closed:
            await self.slot.ready.wait()
            async with self.hub.compute:  # FIFO: tabs take turns
                request = self.slot.take()
                if request is None:
                    continue
                reply = await self.hub.answer(request, self.slot)
            if self.slot.closed:
                return
            try:
                await self.send(reply)
            except (WebSocketDisconnect, RuntimeError):  # the tab went away while its answer was computed
                return


def parse_message(text: str | None) -> dict[str, Any]:
    """A WebSocket text message -> a request object with an integer ``id`` in [0, :data:`MAX_ID`]; CmkitError
    otherwise (binary, over :data:`MAX_MESSAGE` bytes, not JSON, NaN or Infinity, nested too deeply, numbers
    too long)."""
    if text is None:
        raise CmkitError("expected a JSON text message, got a binary one")
    size = len(text.encode())
    if size > MAX_MESSAGE:
        raise CmkitError(f"a message of {size:,} bytes: the studio accepts at most {MAX_MESSAGE:,} "
                         f"(a {MAX_RESOLUTION}x{MAX_RESOLUTION} RGB image with its mask)")
    try:
        request = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a number too long to convert, deep nesting
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CmkitError(f"malformed request: {reason}") from None
    rid = request.get("id") if isinstance(request, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid <= MAX_ID:
        raise CmkitError(f"malformed request: expected a JSON object with an integer 'id' in [0, {MAX_ID}]")
    return request


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a request may hold")


# ----------------------------------------------------------------------------------------------- routes

async def socket_route(ws: WebSocket) -> None:
    hub: Hub = ws.app.state.hub
    await ws.accept()
    if hub.clients >= hub.max_clients:
        await ws.close(code=1013, reason=f"the studio serves at most {hub.max_clients} tabs; close one and reload")
        return
    hub.clients += 1
    connection = Connection(ws, hub)
    computing = asyncio.create_task(connection.compute())  # ends by itself once the slot is closed
    try:
        await connection.receive()
    except WebSocketDisconnect:
        pass
    finally:
        connection.slot.close()
        hub.clients -= 1
        hub.closing.add(computing)  # a reference until it ends (asyncio keeps only weak ones)
        computing.add_done_callback(hub.closing.discard)


async def index(request: Request) -> HTMLResponse:
    """The page, its asset links carrying the token when the studio has one."""
    return HTMLResponse(request.app.state.page)


async def info(request: Request) -> JSONResponse:
    return JSONResponse({**request.app.state.hub.studio.info(), "max_upload": MAX_UPLOAD, "max_message": MAX_MESSAGE})


async def upload(request: Request) -> JSONResponse:
    """POST the raw bytes of an image file: the editing source at the model's size, or a 400/413 error, or 503
    while :data:`MAX_UPLOADS` others are read and decoded."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_UPLOAD:
        return _error(f"the upload has {int(declared):,} bytes; at most {MAX_UPLOAD:,} are accepted", 413)
    uploads = request.app.state.hub.uploads
    if uploads.locked():
        return _error(f"the studio is reading {MAX_UPLOADS} other uploads; try again", 503)
    async with uploads:
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


class Guard:
    """ASGI middleware: every HTTP request and WebSocket handshake that ``access`` refuses
    (:meth:`cmkit.studio.access.Access.refusal`) is answered with its status and reason (a WebSocket handshake
    gets the same HTTP answer) and logged in one line; the rest go on to ``app``."""

    def __init__(self, app, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refusal = self.access.refusal(headers, scope["query_string"].decode("latin-1"))
            if refusal is not None:
                status, reason = refusal
                client = "%s:%s" % tuple(scope["client"] or ("?", "?"))  # noqa: UP031 (a pair)
                log.warning("cmkit studio: refused %s %s from %s (%d): %s", scope["type"], scope["path"], client,
                            status, reason)
                return await self._refuse(scope, receive, send, status, reason)
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send, status: int, reason: str) -> None:
        response = _error(reason, status)
        if scope["type"] == "http":
            await response(scope, receive, send)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await WebSocket(scope, receive, send).send_denial_response(response)
        else:  # a server without the denial extension answers a handshake closed before it is accepted with 403
            await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})


def make_app(studio: Studio, access: Access, *, max_clients: int = MAX_CLIENTS) -> Starlette:
    """The studio's ASGI app for ``studio`` behind ``access``'s checks; CmkitError for a model above
    :data:`MAX_RESOLUTION`."""
    if studio.shape[0] > MAX_RESOLUTION:
        raise CmkitError(f"a {studio.shape[0]}x{studio.shape[0]} model: the studio serves models up to "
                         f"{MAX_RESOLUTION}x{MAX_RESOLUTION} (its messages are capped at {MAX_MESSAGE:,} bytes)")
    routes = [Route("/", index), Route("/api/info", info), Route("/api/upload", upload, methods=["POST"]),
              Route("/api/dataset", dataset), WebSocketRoute("/ws", socket_route),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, access=access)])
    app.state.hub = Hub(studio, max_clients=max_clients)
    app.state.page = Template((STATIC / "index.html").read_text()).substitute(query=access.query())
    return app


def make_server(studio: Studio, sock: socket.socket, access: Access | None = None, **options: int) -> uvicorn.Server:
    """A uvicorn server of :func:`make_app` (``options``: its keywords) for the listening socket ``sock``, behind
    ``access`` (default: the rules of a studio listening on ``sock``'s address without a token);
    ``.run(sockets=[sock])`` serves."""
    access = access or Access.listening(*sock.getsockname()[:2])
    config = uvicorn.Config(make_app(studio, access, **options), ws_max_size=MAX_FRAME,
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


def serve(studio: Studio, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          **options: int) -> None:
    """Serve ``studio`` on http://host:port (port 0: a free one) until Ctrl-C; prints the URL (with the token,
    when the studio has one: :meth:`Access.listening`) once listening. ``options``: the keywords of
    :func:`make_app`."""
    if not 0 <= port <= 65535:
        raise CmkitError(f"--port {port}: expected a port number in [0, 65535]")
    check_token(token)
    sock = listen(host, port)
    access = Access.listening(host, sock.getsockname()[1], token)
    print(f"cmkit studio: {access.url(host, sock.getsockname()[1])} (Ctrl-C stops)", flush=True)
    if host not in LOOPBACK:
        print(f"cmkit: warning: listening on {host}: anyone who can reach this port and has the URL's token can "
              "use the studio", file=sys.stderr, flush=True)
    make_server(studio, sock, access, **options).run(sockets=[sock])
