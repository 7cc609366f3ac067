"""``LiveSource``: a URL, camera or pipe, read as it comes and reopened when lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import av

from vstream.errors import DecodeError, SourceError, VStreamError
from vstream.ingest.audio import AudioConverter
from vstream.ingest.config import SourceConfig
from vstream.ingest.container import MediaInfo, SourceKind, describe_container, open_container, source_kind, start_time
from vstream.ingest.sampling import FrameSampler
from vstream.ingest.source import Item, Source
from vstream.types import Frame

log = logging.getLogger(__name__)


WAIT_SLICE = 1.0  # seconds of each open attempt while waiting without limit for a sender


class LiveSource(Source):
    """A URL, camera or pipe: read as it comes, reopened with back-off when lost."""

    def __init__(self, uri: str, config: SourceConfig):
        super().__init__(uri, config)
        self._opened: av.container.InputContainer | None = None
        self.info: MediaInfo | None = None
        self.live = True
        if config.open_timeout is None:  # a listener waiting for its sender: the reader opens it
            return
        # Open now, so an unreachable URL or a missing camera fails here, not later.
        self._opened = open_container(uri, config.open_timeout, config.read_timeout)
        self.info = describe_container(uri, self._opened)
        # A resource of known length (a file over HTTP, a VOD playlist) is read like a
        # file: the decoder waits for a slow consumer instead of dropping frames.
        self.live = self.info.duration is None

    def close(self) -> None:
        super().close()
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    def _produce(self) -> Iterator[Item]:
        config = self.config
        can_reopen = source_kind(self.uri) is not SourceKind.STDIN and config.reconnect_tries > 0
        sampler = FrameSampler(config.fps)
        converter = AudioConverter(config.chunk_seconds, offset=0.0)
        clock = _LiveClock()
        self._stats.decoder, self._stats.decoder_choice = "pyav", "only"
        opened_at = time.monotonic()
        container, self._opened = self._opened or self._first_open(), None
        while container is not None:
            offset = clock.offset_for(start_time(container), opened_at)
            yield from converter.restart(offset)
            with container:
                try:
                    yield from self._read(container, sampler, converter, clock, offset)
                    if container.duration:  # a finite resource (a file over HTTP, VOD HLS) is done
                        break
                    lost = None  # a live stream that ended: it may come back
                except SourceError as e:
                    lost = e
            if self._stop.is_set():
                break
            if not can_reopen:
                if lost is None:  # stdin closed, or reconnecting is off: the end is the end
                    break
                raise lost
            log.warning("lost %s (%s); reconnecting", self.uri, lost or "the stream ended")
            container, opened_at = self._reopen()
            if container is not None:
                self._stats.reconnects += 1
                log.warning("reconnected to %s", self.uri)
        yield from converter.flush()

    def _first_open(self) -> av.container.InputContainer | None:
        """Open a source that waits without limit (``open_timeout=None``): attempts of
        ``WAIT_SLICE`` seconds until data comes; None once the source is closed."""
        waited = time.monotonic()
        while not self._stop.is_set():
            try:
                container = open_container(self.uri, WAIT_SLICE, self.config.read_timeout)
            except SourceError as e:  # nothing yet (a timeout, a refused connection): wait on
                log.debug("waiting for %s (%s)", self.uri, e)
                self._stop.wait(0.1)
                continue
            self.info = describe_container(self.uri, container)
            log.info("%s: first data after %.1f s of waiting", self.uri, time.monotonic() - waited)
            return container
        return None

    def _reopen(self) -> tuple[av.container.InputContainer | None, float]:
        """Open the source again with back-off: ``(container, wall clock when the open
        began)``, or ``(None, 0)`` if closed meanwhile; ``SourceError`` after
        ``reconnect_tries`` failures."""
        config, backoff = self.config, self.config.reconnect_backoff
        for attempt in range(1, config.reconnect_tries + 1):
            opened_at = time.monotonic()  # a live stream's first packet is about when we connect
            try:
                return open_container(self.uri, config.open_timeout or WAIT_SLICE, config.read_timeout), opened_at
            except VStreamError as e:
                if attempt == config.reconnect_tries:
                    raise SourceError(f"source {self.uri!r}: lost, and {attempt} reconnect attempts failed: {e}") from e
                log.info("reopening %s in %.1f s (attempt %d of %d failed): %s", self.uri, backoff, attempt, config.reconnect_tries, e)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, config.reconnect_backoff_max)
        return None, 0.0

    def _read(self, container, sampler: FrameSampler, converter: AudioConverter, clock: _LiveClock, offset: float) -> Iterator[Item]:
        config = self.config
        video = container.streams.video[0] if config.video and container.streams.video else None
        audio = container.streams.audio[0] if config.audio and container.streams.audio else None
        if video is None and audio is None:
            raise DecodeError(f"source {self.uri!r}: has no video or audio stream to read")
        if video is not None:
            video.thread_type = "AUTO"
            size = config.output_size(video.codec_context.width, video.codec_context.height)
        packets = container.demux([s for s in (video, audio) if s is not None])
        while not self._stop.is_set():
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError as e:
                raise SourceError(f"source {self.uri!r}: read failed ({e.strerror})") from e
            if packet.pts is not None:  # when data arrives, not when a delaying decoder lets it out
                clock.saw(float(packet.pts * packet.time_base) + offset)
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                log.debug("skipped a damaged packet of %s", self.uri)
                continue
            for frame in frames:
                if frame.time is None:
                    continue
                t = frame.time + offset
                if isinstance(frame, av.VideoFrame):
                    index = self._stats.decoded
                    self._stats.decoded += 1
                    if sampler.keep(t):
                        yield Frame(frame.to_ndarray(width=size[0], height=size[1], format="rgb24"), t, index)
                else:
                    yield from converter.convert(frame)


class _LiveClock:
    """Maps each connection's timestamps onto one source clock that keeps running
    across reconnects: the first connection starts at 0, a later one where the last
    left off plus the wall time of the gap."""

    def __init__(self):
        self._last: tuple[float, float] | None = None  # (source time, wall clock) of the newest item

    def saw(self, t: float) -> None:
        self._last = (t, time.monotonic())

    def offset_for(self, connection_start: float, opened_at: float) -> float:
        """The offset of a connection whose first timestamp is ``connection_start`` and
        that was opened at wall clock ``opened_at`` (before probing read into it)."""
        if self._last is None:
            return -connection_start
        t, wall = self._last
        return t + (opened_at - wall) - connection_start
