"""The ZeroMQ stream server: many live streams, each its own ``Session``, one shared model.

Design (the engine decides, workers execute; the wire format is ``vstream.protocol``):

- One ROUTER socket (tcp or ipc), read and written by the loop thread only (ZeroMQ
  sockets are not thread-safe). ``step()`` is one turn: poll the ROUTER, the results
  socket and, with CURVE, the ZAP socket (100 ms at most); serve the requests; forward
  what the workers produced; close idle streams.
- Frames and audio are pushed into their stream's session on the loop thread (never
  blocking: the session's writer thread encodes them). Backpressure: when the session's
  queue is full it drops its oldest waiting frame for the new one, and the server
  replies ``busy`` (reason ``frames``) instead of ``ok``: the sender is outrunning the
  stream. Busy replies are counted (``busy``), the drops too (``frames_dropped``). An
  item sent ``lossless`` is refused instead (``busy``, reason ``full``): nothing is
  dropped, and the sender sends it again.
- Rate limit: frames over ``max_fps``, and audio over ``max_audio_speed`` seconds of
  audio per second (each a token bucket holding one second's worth), never reach the
  session: counted (``rate_dropped``, frames and audio chunks), answered ``error``
  ``rate`` with ``retry_after`` seconds.
- Questions go into one bounded work queue; one model worker answers them in order,
  streaming tokens when asked; a full queue answers ``busy`` (reason ``queue``). The
  worker, and the threads that open a source the server reads itself (a URL may take
  seconds), hand their replies to the loop through an inproc PUSH -> PULL socket.
- A stream closes (``close``, ``idle_timeout``, SIGTERM / SIGINT) once its questions in
  flight are answered: its pushed frames are written, its memory saved under
  ``state_dir/<stream id>``; ``open`` with ``resume=<id>`` reopens it, here or in a
  restarted server.
- Every fault becomes an ``error`` reply; an unexpected exception is logged with its
  traceback, never stops the loop. Refusals (token, CURVE key) are logged with the
  peer's address and identity.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import zmq
from zmq.utils import z85

import vstream
from vstream.auth import DEFAULT as DEFAULT_PRINCIPAL
from vstream.auth import Principal, Principals
from vstream.cluster import ClusterConfig, ClusterHost
from vstream.config import JsonConfig, cache_dir, check_int, check_number
from vstream.encoders.batching import BatchingConfig, BatchingEncoder
from vstream.errors import ConfigError, ProtocolError, SourceError, VStreamError
from vstream.ingest import SourceConfig
from vstream.ingest.container import source_kind
from vstream.memory.persist import read_json, write_json
from vstream.models import ChatModel
from vstream.protocol import VERSION, Limits, Message, decode, encode
from vstream.session import Session, SessionConfig, SharedModels

logger = logging.getLogger(__name__)

POLL_MS = 100  # longest wait of one step; also how late a stop request is seen
RECEIVE_BATCH = 256  # requests served per step before the worker's replies get their turn
SOURCE_KINDS = ("url", "file", "camera")
TEXT_LINES = 1000  # most transcript / screen lines one ``texts`` reply carries
OWNER_FILE = "owner.json"  # in a stream's state folder: the principal that opened it


@dataclass
class ServerConfig(JsonConfig):
    """Settings of a ``Server``.

    Attributes:
        bind: address of the ROUTER socket, ``tcp://HOST:PORT`` (port ``*``: any free
            one, see ``Server.address``) or ``ipc://PATH`` (default ``tcp://127.0.0.1:5555``).
        token: shared secret every request must carry; None: no token (default).
        tokens: named principals (``vstream.auth``: name -> ``{"sha256": ..., "admin",
            "max_streams", "max_fps", "questions_per_minute", "disk_gb"}``, what a
            ``--tokens`` file holds): each stream belongs to the principal that opened it.
        curve_secret_key: the server's CURVE secret key (z85, 40 characters); None: no
            CURVE (default). Clients then need the matching public key.
        curve_clients: z85 public keys of the clients allowed in with CURVE; empty: any
            client that knows the server's public key (default).
        state_dir: folder of saved stream memories, one sub-folder per stream id;
            None: ``<vstream cache>/streams`` (default).
        max_streams: streams open at once (default 16).
        max_frame_bytes: largest payload, a frame or an audio chunk, in bytes (default
            a 3840x2160 RGB frame, 24,883,200).
        max_header_bytes: largest JSON header, bytes (default 16384).
        max_fps: frames accepted per second and stream; one second's worth may come
            at once (default 30.0).
        max_audio_speed: seconds of audio accepted per second and stream (default
            30.0: thirty times real time); one second's worth may come at once.
        idle_timeout: seconds without a message after which a stream is saved and
            closed (default 300.0); a source the server reads keeps its stream alive
            while it delivers frames.
        queue_size: questions waiting for the model (default 32).
        max_time_jump: seconds a frame or audio time may lie ahead of the stream's
            previous one (default 3600.0); times must also be >= 0. One frame at
            ``t = 1e308`` would otherwise make every later frame "earlier than the previous".
        encoder_batch: most frames, from any streams, in one forward of the shared frame
            encoder (default 32; 1: each stream's frames on their own,
            ``vstream.encoders.batching`` has the policy).
        encoder_wait_ms: how long an idle encoder waits for more streams' frames before
            it runs what it has (default 2.0).
        sources: kinds of source a client may ask the server to read itself: any of
            ``url``, ``file`` (a path on the server), ``camera`` (default ``url`` only).
        session: ``SessionConfig`` of every stream.
        cluster: ``ClusterConfig``: the streams' sessions live on the workers of a Ray
            cluster (``vstream.cluster``); None: in this process (default).
    """

    bind: str = "tcp://127.0.0.1:5555"
    token: str | None = None
    tokens: dict | None = None
    curve_secret_key: str | None = None
    curve_clients: tuple[str, ...] = ()
    state_dir: str | None = None
    max_streams: int = 16
    max_frame_bytes: int = 3840 * 2160 * 3
    max_header_bytes: int = 16384
    max_fps: float = 30.0
    max_audio_speed: float = 30.0
    idle_timeout: float = 300.0
    queue_size: int = 32
    max_time_jump: float = 3600.0
    encoder_batch: int = 32
    encoder_wait_ms: float = 2.0
    sources: tuple[str, ...] = ("url",)
    session: SessionConfig = field(default_factory=SessionConfig)
    cluster: ClusterConfig | None = None

    def __post_init__(self) -> None:
        self.session = SessionConfig.from_dict(self.session)
        if self.cluster is not None:
            self.cluster = ClusterConfig.from_dict(self.cluster)
        self.curve_clients, self.sources = tuple(self.curve_clients), tuple(self.sources)
        for name in ("max_streams", "max_frame_bytes", "max_header_bytes", "queue_size", "encoder_batch"):
            check_int("ServerConfig", name, getattr(self, name), 1)
        check_number("ServerConfig", "max_fps", self.max_fps, 0.0)
        check_number("ServerConfig", "max_audio_speed", self.max_audio_speed, 0.0)
        check_number("ServerConfig", "idle_timeout", self.idle_timeout, 0.0)
        check_number("ServerConfig", "max_time_jump", self.max_time_jump, 0.0)
        check_number("ServerConfig", "encoder_wait_ms", self.encoder_wait_ms, 0.0, include_low=True)
        if not (isinstance(self.bind, str) and self.bind.startswith(("tcp://", "ipc://"))):
            raise ConfigError(f"ServerConfig.bind must be a tcp:// or ipc:// address, got {self.bind!r}")
        if self.token is not None and not (isinstance(self.token, str) and self.token):
            raise ConfigError("ServerConfig.token must be a non-empty string or None")
        if self.tokens is not None:
            if self.token is not None:
                raise ConfigError("ServerConfig: give token (one shared principal) or tokens (named ones), not both")
            Principals(tokens=self.tokens)  # refuses a malformed entry by name
        for key in (self.curve_secret_key, *self.curve_clients):
            if key is not None and not (isinstance(key, str) and len(key) == 40):
                raise ConfigError(f"ServerConfig: CURVE keys are 40 z85 characters, got {len(str(key))}")
        unknown = sorted(set(self.sources) - set(SOURCE_KINDS))
        if unknown:
            raise ConfigError(f"ServerConfig.sources: unknown kind(s) {', '.join(unknown)}; known: "
                              f"{', '.join(SOURCE_KINDS)}")


class TokenBucket:
    """A rate limit: ``rate`` units a second, of which ``capacity`` (default one second's
    worth, at least one unit) may come at once."""

    def __init__(self, rate: float, now: float, capacity: float | None = None):
        self.rate, self.capacity = rate, max(1.0, rate if capacity is None else capacity)
        self.tokens, self.refilled = self.capacity, now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` units at ``now`` (``time.monotonic()``): 0.0 when taken, else
        the seconds to wait until it would be. An amount over the capacity is taken
        when the bucket is full, leaving it in debt."""
        self.tokens = min(self.capacity, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        needed = min(amount, self.capacity)
        if self.tokens < needed:
            return (needed - self.tokens) / self.rate
        self.tokens -= amount
        return 0.0


class TokenBuckets:
    """A ``TokenBucket`` per key (a principal's limit, a client address's), made on first
    use; bounded: past ``MAX_KEYS`` keys all are forgotten and start full again."""

    MAX_KEYS = 10000

    def __init__(self):
        self._buckets: dict = {}

    def take(self, key, rate: float | None, capacity: float | None = None) -> float:
        """Seconds to wait before ``key``'s limit (``rate`` a second, ``capacity`` at once)
        allows one more; 0.0: taken (also when ``rate`` is None: no limit)."""
        if rate is None:
            return 0.0
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.MAX_KEYS:
                self._buckets.clear()
            bucket = self._buckets[key] = TokenBucket(rate, now, capacity)
        return bucket.take(1.0, now)


@dataclass(eq=False)
class Stream:
    """What the loop knows of one stream besides its session."""

    id: str
    session: Session
    owner: str  # the principal that opened it
    source: str | None
    seen: float  # time.monotonic() of the last message naming it
    frame_bucket: TokenBucket  # frames the rate limit lets through
    audio_bucket: TokenBucket  # seconds of audio the rate limit lets through
    frames: int = 0  # frames received (the index of a frame sent without one)
    rate_dropped: int = 0  # frames and audio chunks dropped over their rate limits
    busy: int = 0  # frames and audio chunks answered busy
    pending: int = 0  # questions queued or being answered, and a source being opened
    frames_in: int = -1  # the session's frames_in at the last idle check
    last_time: float | None = None  # the newest frame or audio time taken, seconds
    waiters: list = field(default_factory=list)  # (identity, request id) of close requests
    closer: threading.Thread | None = None  # the thread saving and closing it, once started

    def describe(self) -> dict:
        placement = getattr(self.session, "placement", None)  # a cluster stream: its node, moves and losses
        return {"stream": self.id, "source": self.source, "rate_dropped": self.rate_dropped, "busy": self.busy,
                "pending": self.pending, "idle_seconds": round(time.monotonic() - self.seen, 3),
                **self.session.stats.to_dict(), **(placement() if placement else {})}


@dataclass(frozen=True, eq=False)
class Job:
    """A question for the model worker."""

    identity: bytes
    request_id: int
    stream: str
    session: Session
    question: str
    window: dict
    tokens: bool


class Server:
    """A stream server on ``config.bind`` answering from ``model`` (a loaded
    ``ChatModel``, a hub id or folder, or None for the embedded default; with
    ``config.cluster``, not a loaded model: each worker loads it).

    ``serve()`` runs until SIGTERM or SIGINT; ``run()`` until ``stop()``; ``step()``
    is one turn of the loop. ``close()`` saves every stream and frees everything.
    """

    def __init__(self, config: ServerConfig | None = None, model: ChatModel | str | None = None):
        self.config = config or ServerConfig()
        self.limits = Limits(self.config.max_header_bytes, self.config.max_frame_bytes)
        self.state_dir = Path(self.config.state_dir or cache_dir() / "streams")
        self.cluster = self.shared = None
        if self.config.cluster is not None:  # the sessions live on the cluster's workers, each loads the models
            self.cluster = ClusterHost(self.config.cluster, model, self.config.session, self.state_dir,
                                       self.config.encoder_batch, self.config.encoder_wait_ms)
        else:
            # one frame encoder and one OCR for every stream: each model is loaded once, not per
            # stream, and the frames that streams write at about the same time share one forward
            self.shared = SharedModels.load(model, self.config.session,
                                            BatchingConfig(self.config.encoder_batch, self.config.encoder_wait_ms))
        self.model_name = self.cluster.name if self.cluster else self.model.name or type(self.model).__name__
        self.streams: dict[str, Stream] = {}
        self._closing: dict[str, Stream] = {}  # waiting for their questions before they close
        self.principals = Principals(self.config.token, self.config.tokens, curve=bool(self.config.curve_secret_key))
        self._limits = TokenBuckets()  # (principal, "frames" / "questions") -> its limit
        self.counters = dict.fromkeys(("requests", "errors", "refused", "busy", "answers", "rate_dropped"), 0)
        self.started = time.monotonic()
        self._stopping = False
        self._swept = self.started
        self._refusals: dict[bytes, float] = {}  # identity -> when a refusal was last logged
        self._ctx = zmq.Context()
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.setsockopt(zmq.MAXMSGSIZE, 2 * (self.config.max_frame_bytes + self.config.max_header_bytes))
        self._zap = None
        if self.config.curve_secret_key:  # the ZAP handler is bound before the socket that asks it
            self._zap = self._ctx.socket(zmq.REP)
            self._zap.bind("inproc://zeromq.zap.01")
            self.socket.curve_server = True
            self.socket.curve_secretkey = self.config.curve_secret_key.encode()
        try:
            self.socket.bind(self.config.bind)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            self._close_host()
            raise ConfigError(f"cannot bind {self.config.bind}: {exc}") from None
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._results_address = f"inproc://vstream-results-{id(self)}"
        self._results = self._ctx.socket(zmq.PULL)
        self._results.bind(self._results_address)
        self._poller = zmq.Poller()
        for sock in (self.socket, self._results, self._zap):
            if sock is not None:
                self._poller.register(sock, zmq.POLLIN)
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=self.config.queue_size)
        self._openers: list[threading.Thread] = []  # threads opening sources, draining nodes, closing streams
        # one model worker here; on a cluster one per worker actor, each answering on its own node
        answerers = len(self.cluster.workers) if self.cluster else 1
        self._answerers = [threading.Thread(target=self._work, name=f"vstream-server-model-{i}", daemon=True)
                           for i in range(answerers)]
        for thread in self._answerers:
            thread.start()
        logger.info("serving on %s with model %s%s", self.address, self.model_name,
                    f" on {answerers} Ray worker(s)" if self.cluster else "")

    @property
    def model(self) -> ChatModel | None:
        """The chat model every stream shares (None on a cluster: each worker holds one)."""
        return self.shared.model if self.shared else None

    @property
    def encoder(self) -> BatchingEncoder | None:
        """The frame encoder every stream shares (None on a cluster)."""
        return self.shared.encoder if self.shared else None

    # -- the loop -------------------------------------------------------------------------

    def serve(self) -> None:
        """``run()`` until SIGTERM or SIGINT (a second one kills), then ``close()``:
        every stream is saved. Call from the main thread."""

        def stop(signum, _frame) -> None:
            logger.info("%s: saving the streams and stopping", signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)
            self.stop()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self) -> None:
        """Serve until ``stop()``, then ``close()``."""
        try:
            while not self._stopping:
                self.step()
        finally:
            self.close()

    def stop(self) -> None:
        """Ask the loop to end after the current step (safe from a signal handler)."""
        self._stopping = True

    def step(self, timeout_ms: int = POLL_MS) -> None:
        """One turn: wait up to ``timeout_ms`` for input; authenticate CURVE peers;
        serve the requests that came; forward the workers' replies; close idle streams."""
        events = dict(self._poller.poll(timeout_ms))
        if self._zap is not None and self._zap in events:
            self._authenticate()
        if self.socket in events:
            for _ in range(RECEIVE_BATCH):
                try:
                    parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(parts)
        if self._results in events:
            self._forward()
        now = time.monotonic()
        if now - self._swept >= 1.0:
            self._swept = now
            self._sweep(now)

    def _handle(self, parts: list) -> None:
        """Check one request and serve it; whatever goes wrong becomes an error reply."""
        identity, message = parts[0].bytes, None
        curve_key = parts[0].get("User-Id") if self._zap is not None else None
        try:
            message = decode([p.buffer for p in parts[1:]], self.limits,
                             authenticate=lambda given: self.principals.identify(given, curve_key))
            self.counters["requests"] += 1
            getattr(self, f"_on_{message.kind}")(identity, message)
        except ProtocolError as exc:
            if exc.code in ("auth", "forbidden", "quota"):
                self._refused(identity, parts[0].get("Peer-Address"), f"{exc.code}: {exc}",
                              message.principal.name if message is not None else None,
                              message.kind if message is not None else None)
            request_id = exc.request_id if exc.request_id is not None else message and message.id
            self._error(identity, request_id, exc.code, str(exc))
        except (VStreamError, ValueError) as exc:
            code = "source" if isinstance(exc, SourceError) else "invalid"
            self._error(identity, message and message.id, code, str(exc))
        except Exception as exc:
            logger.exception("a %s request from %s failed", message and message.kind, identity.hex())
            self._error(identity, message and message.id, "internal", f"{type(exc).__name__}: {exc}")

    def _reply(self, identity: bytes, kind: str, request_id, **fields) -> None:
        self.socket.send_multipart([identity, b"", *encode(kind, request_id, **fields)])

    def _error(self, identity: bytes, request_id, code: str, message: str, **fields) -> None:
        self.counters["errors"] += 1
        self._reply(identity, "error", request_id, code=code, message=message, **fields)

    def _refused(self, identity: bytes, peer: str, why: str, principal: str | None = None,
                 kind: str | None = None) -> None:
        """The audit line of a refused request: one structured line per peer per 10 s."""
        self.counters["refused"] += 1
        now = time.monotonic()
        if now - self._refusals.get(identity, -math.inf) >= 10.0:
            if len(self._refusals) > 1000:
                self._refusals.clear()
            self._refusals[identity] = now
            logger.warning("refused principal=%s peer=%s identity=%s kind=%s reason=%s", principal or "-", peer,
                           identity.hex() or "none", kind or "-", json.dumps(why))

    # -- requests -------------------------------------------------------------------------

    def _stream(self, message: Message) -> Stream:
        stream = self.streams.get(message.get("stream"))
        if self.principals.separate and not self._owns(message.principal, stream):
            # the same reply whether the stream is another's or does not exist: it tells nothing
            raise ProtocolError(f"no open stream {message.get('stream')!r} of yours", "forbidden", message.id)
        if stream is None:
            closing = " (it is closing)" if message.get("stream") in self._closing else ""
            raise ProtocolError(f"no open stream {message.get('stream')!r}{closing}", "unknown_stream", message.id)
        stream.seen = time.monotonic()
        return stream

    def _owns(self, principal: Principal, stream: Stream | None) -> bool:
        return stream is not None and (principal.admin or stream.owner == principal.name)

    def _saved_owner(self, stream_id: str) -> str:
        """Who opened the saved stream ``stream_id`` (saves from before principals: ``default``)."""
        try:
            return read_json(self.state_dir / stream_id / OWNER_FILE)["owner"]
        except (OSError, ValueError, KeyError, TypeError, VStreamError):
            return DEFAULT_PRINCIPAL

    def _check_principal_room(self, principal: Principal, request_id: int) -> None:
        """A principal's stream count and disk quota."""
        held = sum(s.owner == principal.name for s in [*self.streams.values(), *self._closing.values()])
        if principal.max_streams is not None and held >= principal.max_streams:
            raise ProtocolError(f"principal {principal.name} holds its maximum of {principal.max_streams} streams; "
                                "close one first", "max_streams", request_id)
        if principal.disk_gb is not None:
            used = sum(_folder_bytes(folder) for folder in self.state_dir.glob("*")
                       if folder.is_dir() and self._saved_owner(folder.name) == principal.name)
            if used > principal.disk_gb * 1e9:
                raise ProtocolError(f"principal {principal.name}: its saved memories take {used / 1e9:.3f} GB, over "
                                    f"its quota of {principal.disk_gb:g} GB", "quota", request_id)

    def _on_open(self, identity: bytes, message: Message) -> None:
        if len(self.streams) + len(self._closing) >= self.config.max_streams:
            raise ProtocolError(f"the server holds its maximum of {self.config.max_streams} streams; "
                                "close one first", "max_streams", message.id)
        principal = message.principal
        self._check_principal_room(principal, message.id)
        source, settings, resume = message.get("source"), message.get("settings") or {}, message.get("resume")
        if source is not None:
            self._check_source(source, settings, message.id)
        elif settings:
            raise ProtocolError("field 'settings' needs a 'source'", "invalid", message.id)
        if resume is not None:
            if self.principals.separate and not (principal.admin or self._saved_owner(resume) == principal.name):
                raise ProtocolError(f"no saved stream {resume!r} of yours", "forbidden", message.id)
            if resume in self.streams or resume in self._closing:
                raise ProtocolError(f"stream {resume!r} is already open", "exists", message.id)
            if not (self.state_dir / resume / "session.json").is_file():
                raise ProtocolError(f"no saved stream {resume!r} in the state folder", "not_found", message.id)
            stream_id = resume
        else:
            stream_id = secrets.token_hex(8)
            while (self.state_dir / stream_id).exists():
                stream_id = secrets.token_hex(8)
        if self.cluster is not None:
            session = self.cluster.open(stream_id, resume is not None)
        else:
            session = self.shared.session(self.state_dir / resume if resume is not None else None)
        owner = self._saved_owner(resume) if resume is not None else principal.name  # an admin resumes for its owner
        if resume is None:
            (self.state_dir / stream_id).mkdir(parents=True, exist_ok=True)
            write_json(self.state_dir / stream_id / OWNER_FILE, {"owner": owner})
        now = time.monotonic()
        stream = Stream(stream_id, session, owner, source, seen=now, frame_bucket=TokenBucket(self.config.max_fps, now),
                        audio_bucket=TokenBucket(self.config.max_audio_speed, now))
        self.streams[stream_id] = stream
        logger.info("opened stream %s%s%s", stream_id, " (resumed)" if resume else "",
                    f" reading {source}" if source else "")
        if source is None:
            self._reply(identity, "ok", message.id, data={"stream": stream_id, "resumed": resume is not None})
            return
        stream.pending += 1  # the reply comes once the source is open
        self._spawn(f"vstream-server-open-{stream_id}", self._open_source, stream, settings, identity, message.id,
                    resume is not None)

    def _check_source(self, source: str, settings: dict, request_id) -> None:
        kind = source_kind(source).value
        if kind not in self.config.sources:
            raise ProtocolError(f"this server does not read {kind} sources (allowed: "
                                f"{', '.join(self.config.sources) or 'none'})", "forbidden", request_id)
        unknown = sorted(set(settings) - {f.name for f in fields(SourceConfig)})
        if unknown:
            raise ProtocolError(f"field 'settings': unknown source setting(s) {', '.join(unknown)}", "invalid",
                                request_id)

    def _on_frame(self, identity: bytes, message: Message) -> None:
        stream = self._stream(message)
        frame = message.frame(stream.frames)
        self._check_time(stream, frame.t, "frame time", message)
        principal = message.principal
        wait = stream.frame_bucket.take(1.0, time.monotonic()) or self._limits.take(
            (principal.name, "frames"), principal.max_fps)
        if wait:
            self._rate_dropped(identity, message, stream, f"over {self.config.max_fps:g} frames/s; the frame at "
                               f"t={frame.t} was dropped", wait)
            return
        lossless = bool(message.get("lossless"))
        # a frame back in time raises: an "invalid" reply
        accepted = stream.session.push_frame(frame, evict=not lossless)
        if accepted or not lossless:  # a refused lossless frame will come again
            stream.frames += 1
            stream.last_time = max(frame.t, stream.last_time or 0.0)
        self._pushed(identity, message, stream, accepted)

    def _on_audio(self, identity: bytes, message: Message) -> None:
        stream = self._stream(message)
        chunk = message.audio()
        self._check_time(stream, chunk.start, "audio start", message)
        wait = stream.audio_bucket.take(chunk.duration, time.monotonic())
        if wait:
            self._rate_dropped(identity, message, stream, f"over {self.config.max_audio_speed:g} s of audio per "
                               f"second; the chunk at {chunk.start:g}-{chunk.end:g} s was dropped", wait)
            return
        accepted = stream.session.push_audio(chunk, evict=not message.get("lossless"))
        if accepted or not message.get("lossless"):
            stream.last_time = max(chunk.start, stream.last_time or 0.0)
        self._pushed(identity, message, stream, accepted)

    def _check_time(self, stream: Stream, t: float, what: str, message: Message) -> None:
        """Refuse (``invalid``, nothing changed) a negative time or one that jumps more than
        ``max_time_jump`` seconds ahead of the stream's newest."""
        if t < 0:
            raise ProtocolError(f"stream {stream.id}: {what} {t} s is negative", "invalid", message.id)
        if stream.last_time is not None and t - stream.last_time > self.config.max_time_jump:
            raise ProtocolError(f"stream {stream.id}: {what} {t} s jumps {t - stream.last_time:.0f} s past the "
                                f"stream's newest ({stream.last_time} s); the limit is {self.config.max_time_jump:g} "
                                "s (--max-time-jump)", "invalid", message.id)

    def _rate_dropped(self, identity: bytes, message: Message, stream: Stream, why: str, wait: float) -> None:
        stream.rate_dropped += 1
        self.counters["rate_dropped"] += 1
        self._error(identity, message.id, "rate", f"stream {stream.id}: {why}", retry_after=round(wait, 4))

    def _pushed(self, identity: bytes, message: Message, stream: Stream, accepted: bool) -> None:
        if accepted:
            self._reply(identity, "ok", message.id)
            return
        stream.busy += 1
        self.counters["busy"] += 1
        self._reply(identity, "busy", message.id, reason="full" if message.get("lossless") else "frames")

    def _on_ask(self, identity: bytes, message: Message) -> None:
        stream = self._stream(message)
        per_minute = message.principal.questions_per_minute
        wait = self._limits.take((message.principal.name, "questions"), None if per_minute is None else per_minute / 60,
                                 per_minute)
        if wait:
            self._error(identity, message.id, "rate", f"principal {message.principal.name}: over {per_minute:g} "
                        "questions a minute", retry_after=round(wait, 4))
            return
        window = {name: message.get(name) for name in ("start", "end", "last") if message.get(name) is not None}
        job = Job(identity, message.id, stream.id, stream.session, message.get("question"), window,
                  message.get("tokens", False))
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.counters["busy"] += 1
            self._reply(identity, "busy", message.id, reason="queue")
            return
        stream.pending += 1

    def _on_close(self, identity: bytes, message: Message) -> None:
        stream = self._stream(message)
        stream.waiters.append((identity, message.id))
        self._close_stream(stream, "closed by a client")

    def _on_list(self, identity: bytes, message: Message) -> None:
        mine = [s for s in self.streams.values() if not self.principals.separate or self._owns(message.principal, s)]
        self._reply(identity, "ok", message.id, data={"streams": [s.describe() for s in mine]})

    def _on_stats(self, identity: bytes, message: Message) -> None:
        if message.get("stream") is not None:
            self._reply(identity, "ok", message.id, data={"stats": self._stream(message).describe()})
            return
        stats = {**self.counters, "streams": len(self.streams), "closing": len(self._closing),
                 "queue": self._jobs.qsize(), "queue_size": self.config.queue_size,
                 "uptime": round(time.monotonic() - self.started, 3),
                 **(self.cluster.stats() if self.cluster else {"encoder_forwards": self.encoder.forwards,
                                                                 "encoder_frames": self.encoder.frames})}
        self._reply(identity, "ok", message.id, data={"stats": stats})

    def _on_drain(self, identity: bytes, message: Message) -> None:
        if self.principals.separate and not message.principal.admin:
            raise ProtocolError("only an admin principal may drain a node", "forbidden", message.id)
        if self.cluster is None:
            raise ProtocolError("this server runs no cluster: there is no node to drain", "invalid", message.id)
        # moving streams takes seconds (each is written, saved and reopened): not on the loop
        self._spawn("vstream-server-drain", self._drain, message.get("node"), identity, message.id)

    def _drain(self, node: str, identity: bytes, request_id: int) -> None:
        try:
            reply = encode("ok", request_id, data=self.cluster.drain(node))
        except Exception as exc:  # noqa: BLE001 - every fault becomes the reply (_fault logs a bug's traceback)
            code, why = _fault(exc, f"draining node {node}")
            reply = encode("error", request_id, code=code, message=why)
        self._push([b"admin", b"", identity, b"", *reply])

    def _on_thumbnail(self, identity: bytes, message: Message) -> None:
        stream = self._stream(message)
        found = stream.session.thumbnail(message.get("t"))
        if found is None:
            raise ProtocolError(f"stream {stream.id} has no frame near t={message.get('t')} yet", "not_found",
                                message.id)
        t, jpeg = found
        self._reply(identity, "image", message.id, array=np.frombuffer(jpeg, np.uint8), t=t)

    def _on_texts(self, identity: bytes, message: Message) -> None:
        stream = self._stream(message)
        self._reply(identity, "ok", message.id, data=stream.session.texts(min(message.get("limit", 200), TEXT_LINES)))

    def _on_health(self, identity: bytes, message: Message) -> None:
        self._reply(identity, "ok", message.id, data={
            "status": "stopping" if self._stopping else "ok", "protocol": VERSION, "version": vstream.__version__,
            "model": self.model_name, "streams": len(self.streams), "queue": self._jobs.qsize(),
            "uptime": round(time.monotonic() - self.started, 3)})

    # -- workers --------------------------------------------------------------------------

    def _work(self) -> None:
        """The model worker: answers the queued questions, one at a time."""
        out = self._ctx.socket(zmq.PUSH)
        out.connect(self._results_address)
        try:
            while (job := self._jobs.get()) is not None:
                self._answer(job, out)
        finally:
            out.close()

    def _answer(self, job: Job, out) -> None:
        def send(tag: bytes, kind: str, **fields) -> None:
            out.send_multipart([tag, job.stream.encode(), job.identity, b"", *encode(kind, job.request_id, **fields)])

        try:
            answer_stream = job.session.stream(job.question, **job.window)
            for piece in answer_stream:
                if job.tokens:
                    send(b"part", "token", text=piece)
            send(b"answer", "answer", **answer_stream.result().to_dict())
        except Exception as exc:  # noqa: BLE001 - every fault becomes the reply (a cluster stream that moved: "moved")
            code, why = _fault(exc, f"answering {job.question!r} on stream {job.stream}")
            send(b"done", "error", code=code, message=why)

    def _open_source(self, stream: Stream, settings: dict, identity: bytes, request_id: int, resumed: bool) -> None:
        """An opener thread: starts the session's source (a URL may take seconds to open)."""
        tag, reply = b"done", encode("ok", request_id, data={"stream": stream.id, "resumed": resumed})
        try:
            stream.session.start_source(stream.source, **settings)
        except (VStreamError, ValueError) as exc:
            logger.warning("stream %s: cannot read %s: %s", stream.id, stream.source, exc)
            code = "invalid" if isinstance(exc, ConfigError) else "source"
            tag, reply = b"failed", encode("error", request_id, code=code, message=str(exc))
        except Exception as exc:
            logger.exception("opening %s for stream %s failed", stream.source, stream.id)
            tag, reply = b"failed", encode("error", request_id, code="internal", message=f"{type(exc).__name__}: {exc}")
        self._push([tag, stream.id.encode(), identity, b"", *reply])

    def _forward(self) -> None:
        """Send the workers' replies on; a finished request may let its stream close."""
        while True:
            try:
                tag, stream_id, *reply = self._results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if reply:
                self.socket.send_multipart(reply)
            if tag in (b"part", b"admin"):  # a piece of an answer; a reply about no stream
                continue
            if tag == b"closed":  # a closer thread saved the stream (its closers are answered next)
                self._closing.pop(stream_id.decode(), None)
                continue
            self.counters["answers"] += tag == b"answer"
            stream_id = stream_id.decode()
            stream = self.streams.get(stream_id) or self._closing.get(stream_id)
            if stream is None:  # cannot happen: a stream with work pending stays in one of the two tables
                logger.error("a reply for stream %s, which is gone", stream_id)
                continue
            stream.pending -= 1
            if tag == b"failed":  # the source did not open: the stream never was
                self.streams.pop(stream_id, None)
                stream.session.close()
                continue
            if stream.pending == 0 and stream_id in self._closing:
                self._start_closer(self._closing[stream_id])

    # -- closing ------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        """Close the streams idle for ``idle_timeout`` seconds."""
        for stream in list(self.streams.values()):
            if stream.pending or now - stream.seen < self.config.idle_timeout:
                continue
            if stream.source is not None:  # a source the server reads keeps its stream alive while it delivers
                frames_in = stream.session.stats.frames_in
                if frames_in != stream.frames_in:
                    stream.frames_in, stream.seen = frames_in, now
                    continue
            self._close_stream(stream, f"idle for {now - stream.seen:.0f} s")

    def _close_stream(self, stream: Stream, why: str) -> None:
        del self.streams[stream.id]
        logger.info("closing stream %s: %s", stream.id, why)
        self._closing[stream.id] = stream  # until it is saved; with questions pending, until they are answered
        if not stream.pending:
            self._start_closer(stream)

    def _start_closer(self, stream: Stream) -> None:
        """Save and close ``stream`` on a thread of its own: writing its backlog and saving
        take seconds, and the loop serves every other stream meanwhile."""
        stream.closer = self._spawn(f"vstream-server-close-{stream.id}", self._close_saved, stream)

    def _close_saved(self, stream: Stream) -> None:
        """Write what was pushed, save the memory, free the session; then tell the loop
        (``closed``) and answer the closers, in that order through the results socket, so
        a closer that resumes the stream on its reply finds it closed."""
        folder = self.state_dir / stream.id
        try:
            if stream.source is None:
                stream.session.wait(timeout=5.0)
            stream.session.save(folder)
            error = None
        except Exception as exc:
            logger.exception("saving stream %s into %s failed", stream.id, folder)
            error = f"saving the stream failed: {type(exc).__name__}: {exc}"
        finally:
            stream.session.close()
        replies = [[b"admin", b"", identity, b"",
                    *(encode("ok", request_id, data={"stream": stream.id, "saved": str(folder)}) if error is None
                      else encode("error", request_id, code="internal", message=error))]
                   for identity, request_id in stream.waiters]
        self._push([b"closed", stream.id.encode()], *replies)

    def _spawn(self, name: str, target, *args) -> threading.Thread:
        """Run ``target(*args)`` on a thread of its own (opening a source, draining a node,
        closing a stream); ``close()`` waits for these. It replies through ``_push``."""
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._openers = [t for t in self._openers if t.is_alive()] + [thread]
        thread.start()
        return thread

    def _push(self, *messages: list) -> None:
        """Hand ``[tag, stream id, reply...]`` messages from a thread to the loop, in order
        (ZeroMQ sockets are not thread-safe: each call its own PUSH socket, and only one
        socket keeps an order)."""
        out = self._ctx.socket(zmq.PUSH)
        out.connect(self._results_address)
        try:
            for parts in messages:
                out.send_multipart(parts)
        finally:
            out.close()

    def close(self) -> None:
        """Refuse the questions still queued, let the one being answered finish, save
        and close every stream, and free the sockets. Idempotent."""
        if self.socket.closed:
            return
        self._stopping = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._error(job.identity, job.request_id, "shutting_down", "the server is stopping")
                stream = self.streams.get(job.stream) or self._closing.get(job.stream)
                stream.pending -= 1
        for _ in self._answerers:
            self._jobs.put(None)
        deadline = time.monotonic() + 30.0
        while self._busy_threads() and time.monotonic() < deadline:
            if self._results.poll(50):
                self._forward()
        for stream in [*self.streams.values(), *self._closing.values()]:
            if stream.closer is None:  # a closer thread has saved the others (waited for above)
                self._close_saved(stream)  # here, one after another: the loop has stopped
        self._forward()  # the closers' replies
        logger.info("saved %d stream(s) into %s", len(self.streams) + len(self._closing), self.state_dir)
        self.streams.clear()
        self._closing.clear()
        self._close_host()
        for sock in (self.socket, self._results, self._zap):
            if sock is not None:
                sock.close(linger=0)
        if not self._busy_threads():
            self._ctx.term()

    def _busy_threads(self) -> bool:
        return any(t.is_alive() for t in [*self._answerers, *self._openers])

    def _close_host(self) -> None:
        """Free the shared frame encoder, or stop the cluster's workers."""
        if self.cluster is not None:
            self.cluster.close()
        else:
            self.shared.close()

    def _authenticate(self) -> None:
        """Answer one ZAP request: a CURVE client is let in if its key is allowed."""
        version, request_id, _domain, address, identity, mechanism, *credentials = self._zap.recv_multipart()
        key = z85.encode(credentials[0]).decode() if mechanism == b"CURVE" and credentials else None
        allowed = key is not None and (not self.config.curve_clients or key in self.config.curve_clients)
        if not allowed:
            self._refused(identity, address.decode(errors="replace"), f"CURVE key {key} is not allowed")
        status = (b"200", b"OK") if allowed else (b"400", b"key not allowed")
        self._zap.send_multipart([version, request_id, *status, key.encode() if allowed else b"", b""])


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _fault(exc: BaseException, doing: str) -> tuple[str, str]:
    """``(code, message)`` of the error reply for a fault met while ``doing`` something on
    a thread: a protocol fault keeps its code (a cluster stream that moved: ``moved``),
    another of ours or a bad value is ``invalid``, anything else a bug, logged with its
    traceback (``internal``)."""
    if isinstance(exc, ProtocolError):
        return exc.code, str(exc)
    if isinstance(exc, (VStreamError, ValueError)):
        return "invalid", str(exc)
    logger.error("%s failed", doing, exc_info=exc)
    return "internal", f"{type(exc).__name__}: {exc}"
