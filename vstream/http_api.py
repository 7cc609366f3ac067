"""An HTTP API and a web page beside the ZeroMQ stream server (``vstream serve --http``).

A thin layer: every handler is a ``vstream.client.Client`` call to the server in the
same process, so HTTP requests meet the same streams, token, limits and errors as ZeroMQ
ones. Starlette routes, uvicorn serves, on a thread of their own.

- ``/`` is the page (``vstream/web/``: plain HTML, CSS and JavaScript, no build step, no
  CDN); ``/openapi.json`` describes the API.
- ``/api/...``: streams (list, open, stats, close), uploads (the body streamed to a file
  under ``uploads_dir``, never whole in memory, up to ``max_upload_bytes``; then probed and
  fed into a new stream on a thread, lossless), questions (server-sent events: ``token``
  events as the answer is generated, then ``answer`` with the JSON ``vstream ask --json``
  prints, or ``error``), frames as JPEG, transcript and screen text.
- Auth: the client's token, as ``Authorization: Bearer TOKEN`` or ``?token=`` (an
  ``<img>`` or ``EventSource`` cannot send headers), goes with its requests to the
  server, which checks it (the shared token or a principal's, ``vstream.auth``). A
  server without tokens gets an API on loopback only. Each client address gets ``rate``
  requests a second (one second's worth at once).
- Errors are JSON ``{"error": {"code", "message"}}``, with the server's codes and an HTTP
  status that fits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vstream.config import JsonConfig, cache_dir, check_int, check_number
from vstream.errors import ConfigError, ServerError, VStreamError
from vstream.server import TokenBuckets

logger = logging.getLogger(__name__)

WEB = Path(__file__).parent / "web"
LATEST = 1e12  # a time after any stream's last frame: the thumbnail of the newest frame
MAX_JSON_BYTES = 64 * 1024
STATUS = {"bad_message": 400, "invalid": 400, "version": 400, "unknown_kind": 400, "auth": 401, "forbidden": 403,
          "unknown_stream": 404, "not_found": 404, "exists": 409, "too_large": 413, "rate": 429, "busy": 503,
          "max_streams": 503, "shutting_down": 503, "moved": 503, "source": 502, "timeout": 504, "internal": 500}


@dataclass
class HttpConfig(JsonConfig):
    """Settings of the HTTP API.

    Attributes:
        bind: ``HOST:PORT`` to listen on (default ``127.0.0.1:8080``; port 0: any free one).
        max_upload_bytes: largest uploaded video (default 2 GiB).
        uploads_dir: where uploads are written while they are fed into their stream;
            None: ``<vstream cache>/uploads`` (default).
        rate: requests a second per client address (default 50.0).
        fps: frames a second taken from an uploaded video (default 1.0).
    """

    bind: str = "127.0.0.1:8080"
    max_upload_bytes: int = 2 * 1024**3
    uploads_dir: str | None = None
    rate: float = 50.0
    fps: float = 1.0

    def __post_init__(self) -> None:
        host, _, port = self.bind.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"HttpConfig.bind must be HOST:PORT, got {self.bind!r}")
        check_int("HttpConfig", "max_upload_bytes", self.max_upload_bytes, 1)
        check_number("HttpConfig", "rate", self.rate, 0.0)
        check_number("HttpConfig", "fps", self.fps, 0.0)

    @property
    def host(self) -> str:
        return self.bind.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.bind.rpartition(":")[2])


class ApiError(VStreamError):
    """A request refused before it reached the stream server."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class HttpGateway:
    """The HTTP API and page for the stream server at ``server_address``; ``authenticated``:
    the server checks tokens (``--token`` or ``--tokens``). ``start()`` serves on a
    thread; ``stop()`` ends the feeding of uploads and the HTTP server."""

    def __init__(self, server_address: str, authenticated: bool = False, config: HttpConfig | None = None):
        import uvicorn

        self.config = config or HttpConfig()
        if not authenticated and not _is_loopback(self.config.host):
            raise ConfigError(f"--http {self.config.bind}: a server without tokens gets an HTTP API on loopback "
                              "only (give it --token or --tokens)")
        self.server_address = server_address
        self.uploads = Path(self.config.uploads_dir or cache_dir() / "uploads")
        self._limits = TokenBuckets()  # client address -> its requests a second
        self._stopping = threading.Event()
        self._feeders: list[threading.Thread] = []
        self.app = self._build_app()
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=self.config.host, port=self.config.port,
                                                     log_level="warning", access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, name="vstream-http", daemon=True)
        self.address: str | None = None

    # -- running --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> str:
        """Serve on a thread; returns ``http://HOST:PORT`` once listening."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the HTTP API could not listen on {self.config.bind}")
            time.sleep(0.02)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.address = f"http://{host}:{port}"
        logger.info("HTTP API and page on %s", self.address)
        return self.address

    def stop(self) -> None:
        """Stop feeding uploads (their streams keep what they got) and stop serving."""
        self._stopping.set()
        for feeder in self._feeders:
            feeder.join(timeout=30.0)
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30.0)

    # -- the app --------------------------------------------------------------------------

    def _build_app(self):
        from starlette.applications import Starlette
        from starlette.responses import FileResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        api = [
            ("GET", "/api/health", self.health, "Server health"),
            ("GET", "/api/streams", self.list_streams, "Open streams with their stats"),
            ("POST", "/api/streams", self.open_stream, "Open a stream (JSON: source, resume; both optional)"),
            ("GET", "/api/streams/{stream}", self.stream_stats, "A stream's stats"),
            ("DELETE", "/api/streams/{stream}", self.close_stream, "Close a stream (its memory is saved)"),
            ("POST", "/api/upload", self.upload, "Upload a video (raw body, ?name=FILE): a new stream is fed from it"),
            ("GET", "/api/streams/{stream}/ask", self.ask_events,
             "Ask (?question=, optional last, start, end): server-sent events token..., then answer or error"),
            ("POST", "/api/streams/{stream}/ask", self.ask_json,
             "Ask (JSON: question, last, start, end): the answer as vstream ask --json prints it"),
            ("GET", "/api/streams/{stream}/frame", self.frame,
             "The JPEG of the kept frame nearest ?t= seconds (none: the newest); X-Frame-Time says its time"),
            ("GET", "/api/streams/{stream}/texts", self.texts, "Transcript and screen-text lines with their times"),
        ]
        self._openapi = _openapi(api)
        routes = [Route(path, self._guarded(handler), methods=[method]) for method, path, handler, _ in api]
        routes += [Route("/openapi.json", self._guarded(self.openapi), methods=["GET"]),
                   Route("/", lambda request: FileResponse(WEB / "index.html"), methods=["GET"]),
                   Mount("/static", StaticFiles(directory=WEB), name="static")]
        return Starlette(routes=routes)

    def _guarded(self, handler):
        """``handler`` behind the token and the rate limit, its faults as JSON errors."""
        from starlette.responses import JSONResponse

        async def endpoint(request):
            try:
                request.state.token = self._admit(request)
                return await handler(request)
            except (ServerError, ApiError) as exc:
                return JSONResponse({"error": {"code": exc.code, "message": str(exc)}},
                                    status_code=STATUS.get(exc.code, 400))
            except (VStreamError, ValueError) as exc:
                return JSONResponse({"error": {"code": "invalid", "message": str(exc)}}, status_code=400)
            except Exception as exc:
                logger.exception("HTTP %s %s failed", request.method, request.url.path)
                return JSONResponse({"error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}},
                                    status_code=500)

        return endpoint

    def _admit(self, request) -> str | None:
        """Apply the rate limit; the token the client gave (checked by the server), if any."""
        peer = request.client.host if request.client else "?"
        if self._limits.take(peer, self.config.rate):
            raise ApiError(f"over {self.config.rate:g} requests a second from {peer}", "rate")
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.query_params.get("token")

    def _client(self, token: str | None, ask_timeout: float = 300.0):
        from vstream.client import Client

        return Client(self.server_address, token=token, ask_timeout=ask_timeout)

    async def _call(self, request, method: str, *args, **kwargs):
        """A ``Client`` method, with the request's token, on a worker thread (each call its
        own client: they are not thread-safe, and a new DEALER socket costs well under a
        millisecond)."""

        def run():
            with self._client(request.state.token) as client:
                return getattr(client, method)(*args, **kwargs)

        return await asyncio.to_thread(run)

    # -- handlers -------------------------------------------------------------------------

    async def openapi(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse(self._openapi)

    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse(await self._call(request, "health"))

    async def list_streams(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"streams": await self._call(request, "list_streams")})

    async def open_stream(self, request):
        from starlette.responses import JSONResponse

        body = await _json(request)
        stream = await self._call(request, "open_stream", source=_field(body, "source", str), resume=_field(body, "resume", str))
        return JSONResponse({"stream": stream}, status_code=201)

    async def stream_stats(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse(await self._call(request, "stats", request.path_params["stream"]))

    async def close_stream(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"saved": await self._call(request, "close_stream", request.path_params["stream"])})

    async def texts(self, request):
        from starlette.responses import JSONResponse

        limit = _number(request.query_params, "limit", 200)
        return JSONResponse(await self._call(request, "texts", request.path_params["stream"], int(limit or 200)))

    async def frame(self, request):
        from starlette.responses import Response

        t = _number(request.query_params, "t", LATEST)
        at, jpeg = await self._call(request, "thumbnail", request.path_params["stream"], t)
        return Response(jpeg, media_type="image/jpeg", headers={"X-Frame-Time": f"{at:.3f}", "Cache-Control": "no-store"})

    async def ask_json(self, request):
        from starlette.responses import JSONResponse

        body = await _json(request)
        question = _field(body, "question", str, required=True)
        window = {name: _field(body, name, (int, float)) for name in ("start", "end", "last")}
        return JSONResponse(await self._call(request, "ask", request.path_params["stream"], question, **window))

    async def ask_events(self, request):
        """Server-sent events: the answer's pieces as they come (``token``), then
        ``answer`` or ``error``. A client that goes away stops receiving; the answer being
        generated ends by itself (it is bounded by the server's token limit)."""
        from starlette.responses import StreamingResponse

        question = request.query_params.get("question", "")
        if not question.strip():
            raise ApiError("query parameter 'question' is missing or empty", "invalid")
        window = {name: _number(request.query_params, name, None) for name in ("start", "end", "last")}
        stream = request.path_params["stream"]
        await self._call(request, "stats", stream)  # an unknown stream is a 404, not an event stream holding an error
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def run() -> None:
            def put(kind: str, data) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (kind, data))

            try:
                with self._client(request.state.token) as client:
                    put("answer", client.ask(stream, question, on_token=lambda text: put("token", {"text": text}),
                                             **window))
            except VStreamError as exc:  # ServerError among them, with the server's code
                put("error", {"code": getattr(exc, "code", "invalid"), "message": str(exc)})
            except Exception as exc:
                logger.exception("HTTP ask on stream %s failed", stream)
                put("error", {"code": "internal", "message": f"{type(exc).__name__}: {exc}"})

        threading.Thread(target=run, name=f"vstream-http-ask-{stream}", daemon=True).start()

        async def body():
            while True:
                kind, data = await events.get()
                yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                if kind != "token":
                    return

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def upload(self, request):
        """Write the body to a file (streamed, at most ``max_upload_bytes``), check that it is
        a video or audio file, open a stream and feed the file into it on a thread."""
        from starlette.responses import JSONResponse

        from vstream.ingest import probe

        name = Path(request.query_params.get("name") or "upload").name
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.config.max_upload_bytes:
            raise ApiError(f"{name}: {int(declared)} bytes, over the upload limit of {self.config.max_upload_bytes}",
                           "too_large")
        self.uploads.mkdir(parents=True, exist_ok=True)
        # no extension of the client's: FFmpeg then goes by the content (a ".txt" would be read as ANSI art video)
        path = self.uploads / f"{time.time_ns()}.upload"
        try:
            size = 0
            out = await asyncio.to_thread(path.open, "wb")  # the disk on a thread: the loop keeps serving
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.config.max_upload_bytes:
                        raise ApiError(f"{name}: over the upload limit of {self.config.max_upload_bytes} bytes",
                                       "too_large")
                    await asyncio.to_thread(out.write, chunk)
            finally:
                out.close()
            if size == 0:
                raise ApiError(f"{name}: the upload is empty", "invalid")
            try:
                info = await asyncio.to_thread(probe, str(path))
            except VStreamError as exc:  # not media, damaged, no streams: named by the upload's name
                raise ApiError(f"{name}: not a video or audio file the server can read: "
                               f"{str(exc).replace(str(path), name)}", "invalid") from None
            stream = await self._call(request, "open_stream")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        feeder = threading.Thread(target=self._feed, args=(path, stream, request.state.token), name=f"vstream-http-feed-{stream}",
                                  daemon=True)
        self._feeders = [t for t in self._feeders if t.is_alive()] + [feeder]
        feeder.start()
        return JSONResponse({"stream": stream, "name": name, "bytes": size,
                             "duration": info.duration}, status_code=201)

    def _feed(self, path: Path, stream: str, token: str | None) -> None:
        """Send the uploaded file into ``stream`` as fast as it takes it, losing nothing;
        then delete the file (the stream's memory holds what it needs)."""
        from vstream.ingest import open_source

        def check(_counts, _t) -> None:
            if self._stopping.is_set():
                raise ApiError("the HTTP API stops", "shutting_down")

        try:
            with open_source(str(path), fps=self.config.fps) as source, self._client(token) as client:
                client.send_source(stream, source, on_progress=check)
        except ApiError:
            logger.info("stream %s: feeding %s stopped with the server", stream, path.name)
        except VStreamError as exc:
            logger.warning("stream %s: feeding %s stopped: %s", stream, path.name, exc)
        finally:
            path.unlink(missing_ok=True)


async def _json(request) -> dict:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise ApiError(f"the JSON body is over {MAX_JSON_BYTES} bytes", "too_large")
    if not body:
        return {}
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ApiError(f"the body is not valid JSON ({exc})", "bad_message") from None
    if not isinstance(data, dict):
        raise ApiError("the body must be a JSON object", "bad_message")
    return data


def _field(body: dict, name: str, kind, required: bool = False):
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(f"field {name!r} is missing", "invalid")
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ApiError(f"field {name!r} has the wrong type ({type(value).__name__})", "invalid")
    return value


def _number(params, name: str, default):
    text = params.get(name)
    if text is None or text == "":
        return default
    try:
        return float(text)
    except ValueError:
        raise ApiError(f"query parameter {name!r} must be a number, got {text[:40]!r}", "invalid") from None


def _openapi(api: list[tuple]) -> dict:
    """An OpenAPI 3.1 description of ``api`` (method, path, handler, summary)."""
    paths: dict = {}
    error = {"description": "an error: {\"error\": {\"code\", \"message\"}}"}
    for method, path, _, summary in api:
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                      for name in ("stream",) if "{" + name + "}" in path]
        paths.setdefault(path, {})[method.lower()] = {
            "summary": summary, "parameters": parameters,
            "responses": {"200": {"description": "success"}, "4XX": error, "5XX": error}}
    return {"openapi": "3.1.0", "info": {"title": "vstream stream server", "version": "1"},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}], "paths": paths}
