"""Naming a source, opening it with PyAV, and describing what it holds.

A source is named by one string: a file path, a URL (rtsp, rtmp, http(s) incl. HLS,
udp, srt, tcp, rtp), a camera (``/dev/video0``, ``camera:0``) or ``-`` for stdin.
Every PyAV failure to open becomes a ``SourceError`` (cannot reach it) or a
``DecodeError`` (reached it, but it is not media), naming the source and the cause.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from enum import Enum

import av

from vstream.errors import DecodeError, SourceError

LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "srt", "tcp", "rtp", "hls")


class SourceKind(str, Enum):
    FILE = "file"
    URL = "url"
    CAMERA = "camera"
    STDIN = "stdin"


def source_kind(uri: str) -> SourceKind:
    """What kind of source ``uri`` names."""
    if uri == "-":
        return SourceKind.STDIN
    if uri.startswith("/dev/video") or uri.startswith("camera:"):
        return SourceKind.CAMERA
    scheme, sep, _ = uri.partition("://")
    if sep and scheme.lower() in LIVE_SCHEMES:
        return SourceKind.URL
    return SourceKind.FILE


def open_container(uri: str, open_timeout: float = 10.0, read_timeout: float = 5.0) -> av.container.InputContainer:
    """Open ``uri`` for reading with PyAV; every failure raises a ``VStreamError``.

    Files open without timeouts (local reads do not hang); URLs, cameras and stdin
    open with ``open_timeout`` and give up a read after ``read_timeout`` seconds.
    """
    kind = source_kind(uri)
    target, fmt, options = uri, None, {}
    if kind is SourceKind.FILE:
        if not os.path.exists(uri):
            raise SourceError(f"source {uri!r}: no such file")
        if os.path.isdir(uri):
            raise SourceError(f"source {uri!r}: is a directory, not a media file")
        if not os.access(uri, os.R_OK):
            raise SourceError(f"source {uri!r}: permission denied")
    elif kind is SourceKind.CAMERA:
        target = uri if uri.startswith("/dev/") else f"/dev/video{uri.partition(':')[2]}"
        if not os.path.exists(target):
            raise SourceError(f"source {uri!r}: no camera at {target}")
        fmt = "v4l2"
    elif kind is SourceKind.STDIN:
        target = sys.stdin.buffer
    else:
        # Network protocols: let FFmpeg resume a finite HTTP resource itself (a Range
        # request gets the same bytes back); a live stream is reopened by LiveSource,
        # which knows its timestamps start afresh.
        if uri.lower().startswith(("http://", "https://")):
            options = {"reconnect": "1", "reconnect_delay_max": "2"}
    timeout = None if kind is SourceKind.FILE else (open_timeout, read_timeout)
    try:
        return av.open(target, "r", format=fmt, options=options, timeout=timeout)
    except av.error.InvalidDataError as e:
        raise DecodeError(f"source {uri!r}: not a media file, or truncated before its index ({e.strerror})") from e
    except av.error.ExitError as e:
        raise SourceError(f"source {uri!r}: no answer within {open_timeout:g} s") from e
    except av.error.FFmpegError as e:
        raise SourceError(f"source {uri!r}: cannot open ({e.strerror})") from e


def start_time(container: av.container.InputContainer) -> float:
    """Seconds on the container's clock that vstream counts as time 0 of the source."""
    return container.start_time / av.time_base if container.start_time is not None else 0.0


@dataclass
class VideoInfo:
    codec: str
    width: int
    height: int
    fps: float | None
    frames: int | None


@dataclass
class AudioInfo:
    codec: str
    sample_rate: int
    channels: int


@dataclass
class MediaInfo:
    """What ``probe`` finds in a source. Times are seconds."""

    uri: str
    format: str
    duration: float | None
    start_time: float
    video: VideoInfo | None
    audio: AudioInfo | None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        """A few human-readable lines."""
        duration = f"{self.duration:.2f} s" if self.duration is not None else "unknown (live)"
        lines = [f"source:   {self.uri}", f"format:   {self.format}", f"duration: {duration}"]
        if self.video:
            v = self.video
            fps = f"{v.fps:.3f} fps" if v.fps else "unknown fps"
            frames = f", {v.frames} frames" if v.frames else ""
            lines.append(f"video:    {v.codec} {v.width}x{v.height} @ {fps}{frames}")
        else:
            lines.append("video:    none")
        if self.audio:
            a = self.audio
            lines.append(f"audio:    {a.codec} {a.sample_rate} Hz, {a.channels} channel(s)")
        else:
            lines.append("audio:    none")
        return "\n".join(lines)


def describe_container(uri: str, container: av.container.InputContainer) -> MediaInfo:
    """A ``MediaInfo`` of an opened container."""
    video = audio = None
    for stream in (*container.streams.video[:1], *container.streams.audio[:1]):
        if stream.codec_context is None:  # a codec id FFmpeg does not know: damaged or foreign
            raise DecodeError(f"source {uri!r}: its {stream.type} stream has a codec FFmpeg does not know")
    if container.streams.video:
        vs = container.streams.video[0]
        rate = vs.average_rate or vs.guessed_rate
        video = VideoInfo(
            codec=vs.codec_context.name,
            width=vs.codec_context.width,
            height=vs.codec_context.height,
            fps=float(rate) if rate else None,
            frames=vs.frames or None,
        )
    if container.streams.audio:
        a = container.streams.audio[0]
        audio = AudioInfo(codec=a.codec_context.name, sample_rate=a.sample_rate, channels=a.channels)
    return MediaInfo(
        uri=uri,
        format=container.format.name,
        duration=container.duration / av.time_base if container.duration else None,
        start_time=start_time(container),
        video=video,
        audio=audio,
    )


def probe(uri: str, open_timeout: float = 10.0, read_timeout: float = 5.0) -> MediaInfo:
    """Streams, duration, frame rate, resolution and audio rate of a source.

    Raises:
        SourceError: the source cannot be reached.
        DecodeError: it is not media, or has neither video nor audio.
    """
    with open_container(uri, open_timeout, read_timeout) as container:
        info = describe_container(uri, container)
    if info.video is None and info.audio is None:
        raise DecodeError(f"source {uri!r}: has neither a video nor an audio stream")
    return info
