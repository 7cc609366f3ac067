"""``SourceConfig``: how a source is decoded, sampled and paced. Importable without torch."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from vstream.errors import ConfigError

DECODERS = ("auto", "decord", "pyav")  # SourceConfig.decoder


@dataclass
class SourceConfig:
    """Settings of one source.

    Attributes:
        fps: frames kept per second of stream time (default 1.0); ``None`` keeps every
            decoded frame. A frame is kept when it is the first at or after an instant
            ``k / fps`` seconds from the start of the source, so variable-rate input
            samples by its presentation times.
        video: decode the video track (default True).
        audio: decode the audio track into ``AudioChunk``s (default True).
        size: output frame size, resized in the decoder: ``None`` keeps the source size
            (default), an int sets the shorter side (aspect kept, rounded to even), a
            ``(width, height)`` pair sets both.
        chunk_seconds: length of each ``AudioChunk`` in seconds (default 1.0).
        realtime: pace a file as if it were live: each item is released when the wall
            clock reaches its time (default False). Live sources are paced by nature.
        drop: when the consumer falls behind, drop the oldest queued frames instead of
            stalling the decoder. ``None`` (default) drops for live sources (streams of
            unknown length, cameras, pipes) and paced files, and makes the decoder of a
            file, or of a URL of known length, wait otherwise.
        queue_size: frames and audio chunks held between decoder and consumer (default 32).
        open_timeout: seconds to wait for a live source to open (default 10.0). None:
            wait as long as it takes, for a receiver started before its sender (a UDP,
            RTP or SRT listener): ``open_source`` returns at once, reading nothing, and
            the source's reader opens it when the first data comes (``info`` is None
            until then); closing the source ends the wait.
        read_timeout: seconds without data before a live source counts as lost (default 5.0).
        reconnect_tries: reopen attempts in a row before a lost live source is given up
            with a ``SourceError`` (default 10: about a minute with the default back-off;
            0 never reconnects). The source's clock keeps running across a reconnect.
        reconnect_backoff: seconds between the first failed reopen attempt and the next,
            doubled after each failure (default 0.5; the first attempt is immediate).
        reconnect_backoff_max: longest wait between reopen attempts, seconds (default 8.0).
        decoder_threads: threads per decoder; 0 lets FFmpeg choose (default 0).
        decoder: what decodes a file's video: ``auto`` (the faster of decord and PyAV on
            its first frames, measured), ``decord`` (wherever it reads the file as the
            demuxer does) or ``pyav``; default ``$VSTREAM_DECODER``, else ``auto``.
    """

    fps: float | None = 1.0
    video: bool = True
    audio: bool = True
    size: int | tuple[int, int] | None = None
    chunk_seconds: float = 1.0
    realtime: bool = False
    drop: bool | None = None
    queue_size: int = 32
    open_timeout: float | None = 10.0
    read_timeout: float = 5.0
    reconnect_tries: int = 10
    reconnect_backoff: float = 0.5
    reconnect_backoff_max: float = 8.0
    decoder_threads: int = 0
    decoder: str = field(default_factory=lambda: os.environ.get("VSTREAM_DECODER", "auto"))

    def __post_init__(self) -> None:
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and self.fps > 0):
            raise ConfigError(f"SourceConfig.fps must be a positive number or None, got {self.fps!r}")
        if not (self.video or self.audio):
            raise ConfigError("SourceConfig: at least one of video and audio must be on")
        if isinstance(self.size, list):
            self.size = tuple(self.size)
        if self.size is not None:
            sides = (self.size,) if isinstance(self.size, int) else self.size
            if len(sides) not in (1, 2) or not all(isinstance(s, int) and s >= 2 for s in sides):
                raise ConfigError(f"SourceConfig.size must be None, an int or (width, height) >= 2, got {self.size!r}")
        positive = {
            "chunk_seconds": self.chunk_seconds,
            "open_timeout": 1.0 if self.open_timeout is None else self.open_timeout,
            "read_timeout": self.read_timeout,
            "reconnect_backoff": self.reconnect_backoff,
            "reconnect_backoff_max": self.reconnect_backoff_max,
        }
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"SourceConfig.{name} must be a positive number of seconds, got {value!r}")
        if not (isinstance(self.queue_size, int) and self.queue_size >= 1):
            raise ConfigError(f"SourceConfig.queue_size must be an int >= 1, got {self.queue_size!r}")
        if not (isinstance(self.reconnect_tries, int) and self.reconnect_tries >= 0):
            raise ConfigError(f"SourceConfig.reconnect_tries must be an int >= 0, got {self.reconnect_tries!r}")
        if not (isinstance(self.decoder_threads, int) and self.decoder_threads >= 0):
            raise ConfigError(f"SourceConfig.decoder_threads must be an int >= 0, got {self.decoder_threads!r}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"SourceConfig.decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The ``(width, height)`` frames of a ``width`` x ``height`` source come out at."""
        if self.size is None:
            return width, height
        if isinstance(self.size, tuple):
            return self.size
        scale = self.size / min(width, height)
        return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SourceConfig:
        return cls(**json.loads(text))
