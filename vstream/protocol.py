"""The wire protocol of the vstream stream server, in one module.

Transport: ZeroMQ ROUTER (server) and DEALER (clients), over tcp or ipc. A message is
multipart; the server sees ``[identity, b"", header, payload...]``, a client sends and
receives ``[b"", header, payload...]`` (the empty delimiter keeps REQ-style envelopes).

``header`` is one UTF-8 JSON object of at most ``Limits.max_header_bytes``::

    {"v": "vstream/1", "kind": "frame", "id": 7, "token": "...", "stream": "3fa2...",
     "t": 12.0, "index": 12, "dtype": "uint8", "shape": [360, 640, 3]}

``v`` is ``VERSION``; ``id`` a request id (int) chosen by the client and echoed in
every reply to that request; ``token`` the shared secret when the server has one.
Arrays travel as ``dtype`` + ``shape`` in the header and the raw C-order bytes as the
one payload part: ``[H, W, 3]`` uint8 RGB frames, ``[n]`` float32 audio at 16 kHz.
Nothing is ever pickled.

Requests (client -> server) and their fields (``*`` required):

========  =============================================================  ====================
kind      fields                                                         reply
========  =============================================================  ====================
open      source, settings (source settings), resume (saved stream id)   ok {stream, resumed}
frame     stream*, t*, index, lossless (bool), dtype* uint8,             ok / busy
          shape* [H, W, 3]; 1 payload
audio     stream*, start*, lossless (bool), dtype* float32, shape* [n];  ok / busy
          1 payload
ask       stream*, question*, start, end, last (seconds), tokens (bool)  token..., answer
close     stream*                                                        ok {stream, saved}
list      -                                                              ok {streams}
stats     stream (none: the server's own)                                ok {stats}
health    -                                                              ok {status, ...}
drain     node* (a Ray node id or a unique prefix; cluster servers)      ok {node, moved}
thumbnail stream*, t* (seconds)                                          image {t}; 1 payload
texts     stream*, limit (lines, default 200)                            ok {transcript, screen}
========  =============================================================  ====================

Times are seconds on the stream's clock; a stream's frame times never go back.

Replies (server -> client): ``ok`` {data}, ``error`` {code*, message*, retry_after},
``token`` {text*} (a streamed piece of an answer), ``answer`` {answer*, evidence*,
timings*} (the shape ``vstream ask --json`` prints), ``image`` {t*, dtype* uint8,
shape* [n]} with the JPEG file of the kept frame nearest the time asked (``t`` is that
frame's time) as its payload, ``busy`` {reason*: "frames",
"full" or "queue"}. Any request may get ``error``; ``busy`` answers a frame or audio
chunk whose stream was full: reason ``frames``, the session dropped its oldest
waiting item for it; reason ``full`` (the item was sent ``lossless``), the item itself
was not taken and nothing was dropped: send it again later. ``busy`` reason ``queue``
answers a question that found the work queue full (the question was not taken).

``decode`` checks everything before anything is used: the parts, the header size
(before parsing), that it is a JSON object without NaN, the version, the token (with
``hmac.compare_digest``, before the kind is looked at), the kind, each field's type,
the dtype, the shape, and that the shape times the item size is the payload's length.
Every fault raises ``ProtocolError`` with a ``code`` from ``ERROR_CODES`` and a
message naming the field.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from dataclasses import dataclass

import numpy as np

from vstream.errors import ProtocolError
from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk, Frame

VERSION = "vstream/1"

REQUESTS = ("open", "frame", "audio", "ask", "close", "list", "stats", "health", "drain", "thumbnail", "texts")
REPLIES = ("ok", "error", "token", "answer", "busy", "image")
ERROR_CODES = (
    "bad_message",     # malformed: parts, JSON, field types, shape against bytes
    "version",         # another protocol version
    "too_large",       # header or payload over the server's limit
    "auth",            # missing or wrong token
    "unknown_kind",    # a kind this server does not know
    "unknown_stream",  # no open stream with that id
    "max_streams",     # the server holds as many streams as it may
    "rate",            # frames faster than the stream's limit: the frame was dropped
    "invalid",         # well-formed, but the request's values were refused (empty question, bad window, ...)
    "not_found",       # no saved memory for that stream id
    "exists",          # a stream with that id is already open
    "forbidden",       # the server does not read sources of that kind; a stream that is not the sender's
    "quota",           # the sender's saved memories are over its disk quota
    "moved",           # the stream's cluster worker stopped while answering; it moved: ask again
    "source",          # the server could not open the source
    "shutting_down",   # the server stops; the request was not served
    "internal",        # a bug: the server logged it with a traceback
)
DTYPES = {"frame": "uint8", "audio": "float32", "image": "uint8"}  # the one dtype each array kind may have
STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_REQUEST_ID = 2**63 - 1

# field name -> (type, required); types: str, int, number, bool, dict, list, stream (a stream id), shape
_COMMON = {"v": ("str", True), "kind": ("str", True), "id": ("int", True), "token": ("str", False)}
_FIELDS = {
    "open": {"source": ("str", False), "settings": ("dict", False), "resume": ("stream", False)},
    "frame": {"stream": ("stream", True), "t": ("number", True), "index": ("int", False),
              "lossless": ("bool", False), "dtype": ("str", True), "shape": ("shape", True)},
    "audio": {"stream": ("stream", True), "start": ("number", True), "lossless": ("bool", False),
              "dtype": ("str", True), "shape": ("shape", True)},
    "ask": {"stream": ("stream", True), "question": ("str", True), "start": ("number", False),
            "end": ("number", False), "last": ("number", False), "tokens": ("bool", False)},
    "close": {"stream": ("stream", True)},
    "list": {},
    "stats": {"stream": ("stream", False)},
    "health": {},
    "drain": {"node": ("str", True)},
    "thumbnail": {"stream": ("stream", True), "t": ("number", True)},
    "texts": {"stream": ("stream", True), "limit": ("int", False)},
    "ok": {"data": ("dict", False)},
    "error": {"code": ("str", True), "message": ("str", True), "retry_after": ("number", False)},
    "token": {"text": ("str", True)},
    "answer": {"answer": ("str", True), "evidence": ("list", True), "timings": ("dict", True)},
    "busy": {"reason": ("str", True)},
    "image": {"t": ("number", True), "dtype": ("str", True), "shape": ("shape", True)},
}


@dataclass(frozen=True)
class Limits:
    """Sizes ``decode`` refuses (``too_large``).

    Attributes:
        max_header_bytes: longest header, bytes (default 16 KiB).
        max_payload_bytes: longest payload (a frame or an audio chunk), bytes
            (default a 3840x2160 RGB frame).
    """

    max_header_bytes: int = 16 * 1024
    max_payload_bytes: int = 3840 * 2160 * 3


@dataclass(frozen=True, eq=False)
class Message:
    """A decoded message: ``kind``, the whole ``header`` (fields by name) and, for
    ``frame`` and ``audio``, the ``array`` read from the payload (read-only, no copy)."""

    kind: str
    header: dict
    array: np.ndarray | None = None
    principal: object = None  # who sent it, when ``decode`` was given ``authenticate``

    @property
    def id(self) -> int | None:
        return self.header.get("id")

    def get(self, name: str, default=None):
        return self.header.get(name, default)

    def frame(self, index: int) -> Frame:
        """The ``Frame`` of a ``frame`` message (``index`` when the header has none)."""
        return Frame(self.array, float(self.header["t"]), self.header.get("index", index))

    def audio(self) -> AudioChunk:
        """The ``AudioChunk`` of an ``audio`` message."""
        start = float(self.header["start"])
        return AudioChunk(self.array, start, start + len(self.array) / AUDIO_SAMPLE_RATE)


def encode(kind: str, request_id: int | None, array: np.ndarray | None = None, **fields) -> list[bytes]:
    """``[header, payload?]`` of a message (without identity or delimiter). ``fields``
    whose value is None are left out; an ``array`` adds ``dtype``, ``shape`` and the
    payload. The header is checked as ``decode`` would check it."""
    header = {"v": VERSION, "kind": kind, "id": request_id, **{k: v for k, v in fields.items() if v is not None}}
    parts = []
    if array is not None:
        array = np.ascontiguousarray(array)
        header["dtype"], header["shape"] = array.dtype.name, list(array.shape)
        parts.append(array.data.cast("B"))  # the raw bytes, no copy
    _check_fields(header, request_id, reply=kind in REPLIES)
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return [raw, *parts]


def encode_frame(stream: str, frame: Frame, request_id: int, token: str | None = None,
                 lossless: bool = False) -> list[bytes]:
    return encode("frame", request_id, frame.image, token=token, stream=stream, t=frame.t, index=frame.index,
                  lossless=lossless or None)


def encode_audio(stream: str, chunk: AudioChunk, request_id: int, token: str | None = None,
                 lossless: bool = False) -> list[bytes]:
    return encode("audio", request_id, chunk.samples, token=token, stream=stream, start=chunk.start,
                  lossless=lossless or None)


def decode(parts: list, limits: Limits = Limits(), token: str | None = None, reply: bool = False,
           authenticate=None) -> Message:
    """Check and decode ``[b"", header, payload...]`` (the server strips the identity
    first). With ``token``, the header's token must equal it; with ``authenticate``
    (``vstream.auth.Principals.identify`` bound to the peer), it is called with the
    header's token, at the same point, and what it returns is the message's
    ``principal``. ``reply`` decodes a server's reply instead of a request. Raises
    ``ProtocolError``."""
    if len(parts) < 2:
        raise ProtocolError(f"a message has an empty delimiter, a header and its payload; got {len(parts)} part(s)")
    if len(parts[0]) != 0:
        raise ProtocolError("the first part must be the empty delimiter b''")
    raw, payloads = parts[1], parts[2:]
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError(f"header: {len(raw)} bytes, over the limit of {limits.max_header_bytes}", "too_large")
    header = _parse(raw)
    request_id = header.get("id")
    if not (_is_int(request_id) and 0 <= request_id <= MAX_REQUEST_ID) and not (reply and request_id is None):
        raise ProtocolError(f"field 'id' must be an int in [0, 2**63), got {request_id!r}")
    if header.get("v") != VERSION:
        raise ProtocolError(f"field 'v' must be {VERSION!r}, got {header.get('v')!r}", "version", request_id)
    if token is not None:
        given = header.get("token")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
            raise ProtocolError("wrong token" if given is not None else "missing token", "auth", request_id)
    principal = None
    if authenticate is not None:
        try:
            principal = authenticate(header.get("token"))
        except ProtocolError as exc:
            raise ProtocolError(str(exc), exc.code, request_id) from None
    kind = header.get("kind")
    if kind not in (REPLIES if reply else REQUESTS):
        raise ProtocolError(f"field 'kind': unknown kind {kind!r}; known: {', '.join(REPLIES if reply else REQUESTS)}",
                            "unknown_kind", request_id)
    _check_fields(header, request_id, reply)
    array = None
    if kind in DTYPES:
        array = _array(kind, header, payloads, limits, request_id)
    elif payloads:
        raise ProtocolError(f"a {kind!r} message has no payload; got {len(payloads)} extra part(s)",
                            request_id=request_id)
    if kind == "ask" and not header["question"].strip():
        raise ProtocolError("field 'question' must be a non-empty string", "invalid", request_id)
    return Message(kind, header, array, principal)


def _parse(raw) -> dict:
    try:
        header = json.loads(bytes(raw), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError(f"header: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header: must be a JSON object, got a JSON {type(header).__name__}")
    return header


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _check_fields(header: dict, request_id, reply: bool) -> None:
    spec = {**_COMMON, **_FIELDS.get(header.get("kind"), {})}
    if reply:
        spec.pop("token")
    for name in header:
        if name not in spec:
            raise ProtocolError(f"field {name!r} is not part of a {header.get('kind')!r} message; "
                                f"known: {', '.join(spec)}", request_id=request_id)
    for name, (kind, required) in spec.items():
        if name not in header:
            if required:
                raise ProtocolError(f"field {name!r} is missing", request_id=request_id)
            continue
        value = header[name]
        if name == "id" and (reply and value is None or _is_int(value)):
            continue
        if not _CHECKS[kind](value):
            raise ProtocolError(f"field {name!r} must be {_WHAT[kind]}, got {value!r}"[:300], request_id=request_id)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: _is_int(v) and v >= 0,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "stream": lambda v: isinstance(v, str) and STREAM_ID.fullmatch(v) is not None,
    "shape": lambda v: isinstance(v, list) and 1 <= len(v) <= 4 and all(_is_int(n) and n >= 1 for n in v),
}
_WHAT = {
    "str": "a string", "int": "an int >= 0", "number": "a finite number", "bool": "true or false",
    "dict": "a JSON object", "list": "a JSON array", "stream": "a stream id (1-64 of A-Z a-z 0-9 _ -)",
    "shape": "a list of 1 to 4 ints >= 1",
}


def _array(kind: str, header: dict, payloads: list, limits: Limits, request_id) -> np.ndarray:
    if len(payloads) != 1:
        raise ProtocolError(f"a {kind!r} message has exactly one payload part; got {len(payloads)}",
                            request_id=request_id)
    payload = memoryview(payloads[0])
    size = payload.nbytes
    if size > limits.max_payload_bytes:
        raise ProtocolError(f"payload: {size} bytes, over the limit of {limits.max_payload_bytes}", "too_large",
                            request_id)
    dtype, shape = header["dtype"], header["shape"]
    if dtype != DTYPES[kind]:
        raise ProtocolError(f"field 'dtype' of a {kind!r} message must be {DTYPES[kind]!r}, got {dtype!r}",
                            request_id=request_id)
    if kind == "frame" and (len(shape) != 3 or shape[2] != 3):
        raise ProtocolError(f"field 'shape' of a frame must be [H, W, 3], got {shape}", request_id=request_id)
    if kind in ("audio", "image") and len(shape) != 1:
        raise ProtocolError(f"field 'shape' of {kind} must be [n], got {shape}", request_id=request_id)
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if expected != size:
        raise ProtocolError(f"field 'shape' {shape} of {dtype} needs {expected} bytes; the payload has {size}",
                            request_id=request_id)
    return np.frombuffer(payload, dtype=dtype).reshape(shape)
