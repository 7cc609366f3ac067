"""``Client``: talk to a vstream stream server (``vstream.server``) over ZeroMQ.

One DEALER socket; every call sends one request with a fresh request id and waits
for the replies carrying that id, polling with a timeout (``ServerTimeout`` when the
server stays silent). Replies to earlier requests that timed out are skipped. A
``Client`` is not thread-safe: give each thread its own.

    with Client("tcp://127.0.0.1:5555", token="secret") as client:
        stream = client.open_stream()
        for frame in vstream.open_source("clip.mp4", audio=False):
            client.send_frame(stream, frame)     # False: the server is full (busy)
        answer = client.ask(stream, "what happened?", last=60, on_token=print)
        print(answer["answer"], *evidence_lines(answer["evidence"][:3]), sep="\n")  # vstream.types
        client.close_stream(stream)              # saved on the server; open_stream(resume=stream) reopens it

Errors the server sends back raise ``ServerError`` (its ``code`` is one of
``vstream.protocol.ERROR_CODES``), a question the server is too busy to take raises
``ServerBusy``.
"""

from __future__ import annotations

import itertools
import logging
import time

import zmq

from vstream.errors import ServerBusy, ServerError, ServerTimeout, VStreamError
from vstream.protocol import Limits, Message, decode, encode, encode_audio, encode_frame
from vstream.types import AudioChunk, Frame

logger = logging.getLogger(__name__)
REPLY_LIMITS = Limits(max_header_bytes=64 * 1024 * 1024, max_payload_bytes=16 * 1024 * 1024)  # a thumbnail at most


class Client:
    """A connection to a stream server.

    Args:
        address: the server's address, ``tcp://HOST:PORT`` or ``ipc://PATH``.
        token: the server's shared secret, if it has one.
        curve: ``(server_public, client_public, client_secret)`` z85 keys to talk
            CURVE; None: plain.
        timeout: seconds to wait for each reply (an answer waits ``ask_timeout``).
        ask_timeout: seconds to wait for an answer to start and between its tokens.
    """

    def __init__(self, address: str, token: str | None = None, curve: tuple[str, str, str] | None = None,
                 timeout: float = 10.0, ask_timeout: float = 120.0):
        self.address, self.token, self.timeout, self.ask_timeout = address, token, timeout, ask_timeout
        self._ids = itertools.count(1)
        self._ctx = zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.DEALER)
        self.socket.linger = 0
        if curve is not None:
            server_public, public, secret = curve
            self.socket.curve_serverkey = server_public.encode()
            self.socket.curve_publickey = public.encode()
            self.socket.curve_secretkey = secret.encode()
        self.socket.connect(address)

    # -- streams --------------------------------------------------------------------------

    def open_stream(self, source: str | None = None, resume: str | None = None, **settings) -> str:
        """Open a stream and return its id. ``source``: a URL (or path, camera) the
        server reads itself, with source ``settings`` (fps, size, ...); ``resume``: the
        id of a stream the server saved, to go on with its memory."""
        data = self._call("open", source=source, resume=resume, settings=settings or None)
        return data["stream"]

    def send_frame(self, stream: str, frame: Frame, lossless: bool = False) -> bool:
        """Send one frame; True when taken with nothing lost, False when the server said
        ``busy``: the stream is full, so it dropped an older waiting frame for this one,
        or, ``lossless``, it did not take this one (send it again later). A frame over
        the stream's rate raises ``ServerError`` with code ``rate`` and ``retry_after``."""
        request_id = next(self._ids)
        self._send(encode_frame(stream, frame, request_id, self.token, lossless))
        return self._receive(request_id, self.timeout).kind == "ok"

    def send_audio(self, stream: str, chunk: AudioChunk, lossless: bool = False) -> bool:
        """Send one audio chunk (16 kHz float32); True when taken, False when busy (as
        ``send_frame``)."""
        request_id = next(self._ids)
        self._send(encode_audio(stream, chunk, request_id, self.token, lossless))
        return self._receive(request_id, self.timeout).kind == "ok"

    def send_source(self, stream: str, items, realtime: bool = False, offset: float = 0.0, on_progress=None) -> dict:
        """Send the ``Frame``s and ``AudioChunk``s of ``items`` (a source from
        ``vstream.open_source``) to ``stream``, their times shifted by ``offset`` seconds.

        ``realtime``: the items come paced (a live source, a file read in real time);
        what the server does not take is gone: a frame over the rate limit is dropped,
        and when the stream is full the server drops an older waiting frame (``busy``).
        Otherwise nothing is lost: each item is sent ``lossless`` and sent again, after
        a growing pause (up to 0.5 s), while the stream is full or over its rate.
        ``on_progress(counts, t)`` is called after each item. Returns the counts:
        ``frames`` and ``audio_seconds`` taken, ``busy`` replies, ``rate_dropped``.
        """
        counts = {"frames": 0, "audio_seconds": 0.0, "busy": 0, "rate_dropped": 0}
        for item in items:
            is_frame = isinstance(item, Frame)
            if offset:
                item = (Frame(item.image, item.t + offset, item.index) if is_frame
                        else AudioChunk(item.samples, item.start + offset, item.end + offset))
            taken = self._send_paced(stream, item, counts) if realtime else self._send_lossless(stream, item, counts)
            if taken:
                counts["frames" if is_frame else "audio_seconds"] += 1 if is_frame else item.duration
            if on_progress is not None:
                on_progress(counts, item.t if is_frame else item.end)
        return counts

    def _send_item(self, stream: str, item, lossless: bool) -> bool:
        return (self.send_frame(stream, item, lossless) if isinstance(item, Frame)
                else self.send_audio(stream, item, lossless))

    def _send_paced(self, stream: str, item, counts: dict) -> bool:
        """Send once: True when taken (a ``busy`` reply is counted: an older frame went),
        False when over the rate limit (counted, dropped)."""
        try:
            if not self._send_item(stream, item, lossless=False):
                counts["busy"] += 1
            return True
        except ServerError as exc:
            if exc.code != "rate":
                raise
            counts["rate_dropped"] += 1
            return False

    def _send_lossless(self, stream: str, item, counts: dict) -> bool:
        """Send until the server takes the item, pausing while it is full or over rate."""
        backoff = 0.0
        while True:
            try:
                if self._send_item(stream, item, lossless=True):
                    return True
                counts["busy"] += 1
                backoff = min(0.5, max(0.01, 2 * backoff))
                time.sleep(backoff)
            except ServerError as exc:
                if exc.code != "rate":
                    raise
                time.sleep(exc.retry_after or 0.05)

    def ask(self, stream: str, question: str, start: float | None = None, end: float | None = None,
            last: float | None = None, on_token=None) -> dict:
        """Ask ``question`` about the whole stream, ``[start, end]`` seconds, or the
        ``last`` seconds. ``on_token(text)`` is called with each piece as it is
        generated. Returns ``{"answer", "evidence": [{start, end, kind, score}],
        "timings"}`` (what ``vstream ask --json`` prints). Raises ``ServerBusy`` when
        the server's queue is full."""
        request_id = next(self._ids)
        self._send(encode("ask", request_id, token=self.token, stream=stream, question=question, start=start,
                          end=end, last=last, tokens=True if on_token else None))
        while True:
            reply = self._receive(request_id, self.ask_timeout)
            if reply.kind == "token":
                on_token(reply.get("text"))
            elif reply.kind == "answer":
                return {name: reply.get(name) for name in ("answer", "evidence", "timings")}
            else:
                raise ServerBusy("the server's question queue is full; ask again later", "busy")

    def close_stream(self, stream: str) -> str:
        """Close a stream; returns the folder the server saved its memory in."""
        return self._call("close", stream=stream)["saved"]

    def list_streams(self) -> list[dict]:
        """Every open stream with its stats."""
        return self._call("list")["streams"]

    def stats(self, stream: str | None = None) -> dict:
        """A stream's stats (the session's counters and the server's: ``rate_dropped``,
        ``busy``, ``pending``, ``idle_seconds``), or the server's own with no stream."""
        return self._call("stats", stream=stream)["stats"]

    def health(self) -> dict:
        """``{"status", "protocol", "version", "model", "streams", "queue", "uptime"}``."""
        return self._call("health")

    def thumbnail(self, stream: str, t: float) -> tuple[float, bytes]:
        """The JPEG thumbnail of the stream's kept frame nearest to ``t`` seconds, and that
        frame's time (``ServerError`` ``not_found`` before its first frame)."""
        reply = self._request("thumbnail", self.timeout, stream=stream, t=t)
        return float(reply.get("t")), reply.array.tobytes()

    def texts(self, stream: str, limit: int = 200) -> dict:
        """The stream's newest ``limit`` transcript and screen-text lines, oldest first:
        ``{"transcript": [[start, end, text], ...], "screen": [...]}``."""
        return self._call("texts", stream=stream, limit=limit)

    def drain(self, node: str) -> dict:
        """On a cluster server (``vstream serve --cluster``): move every stream off the Ray
        node ``node`` (its id or a unique prefix) with nothing lost, then stop its worker.
        Returns ``{"node", "moved"}``; waits up to ``ask_timeout`` (moving takes seconds)."""
        return self._call("drain", self.ask_timeout, node=node)

    # -- plumbing -------------------------------------------------------------------------

    def _request(self, kind: str, timeout: float, **fields) -> Message:
        """Send one ``kind`` request; its reply (an ``error`` reply raises ``ServerError``)."""
        request_id = next(self._ids)
        self._send(encode(kind, request_id, token=self.token, **fields))
        return self._receive(request_id, timeout)

    def _call(self, kind: str, timeout: float | None = None, **fields) -> dict:
        """The data of the ``ok`` reply to a ``kind`` request (within ``timeout``, default
        the client's)."""
        reply = self._request(kind, self.timeout if timeout is None else timeout, **fields)
        if reply.kind != "ok":
            raise ServerError(f"unexpected {reply.kind!r} reply to {kind!r}", "bad_message")
        return reply.get("data") or {}

    def _send(self, parts: list) -> None:
        if self.socket.closed:
            raise VStreamError("this client is closed")
        self.socket.send_multipart([b"", *parts], copy=False)

    def _receive(self, request_id: int, timeout: float) -> Message:
        """The next reply to ``request_id``; an ``error`` reply raises ``ServerError``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(max(1, int(left * 1000))):
                raise ServerTimeout(f"no reply from {self.address} within {timeout:g} s", "timeout")
            reply = decode(self.socket.recv_multipart(), REPLY_LIMITS, reply=True)
            if reply.id is not None and reply.id != request_id:
                logger.debug("skipped a late %s reply to request %s", reply.kind, reply.id)
                continue
            if reply.kind == "error":
                raise ServerError(f"{self.address}: {reply.get('message')}", reply.get("code"),
                                  reply.get("retry_after"))
            return reply

    def close(self) -> None:
        """Close the socket (open streams stay open on the server). Idempotent."""
        self.socket.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
