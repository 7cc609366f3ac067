"""Sources: a decoder thread, a bounded queue, and an iterator of frames and audio chunks.

``open_source`` names the entry point for every kind of input. A ``FileSource`` also
indexes (``len``, ``[i]``, ``[a:b]``, ``frame_at``, ``audio_between``); a ``LiveSource``
reconnects with back-off and keeps its clock running across the gap.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace

import av
import numpy as np

from vstream.errors import DecodeError, SourceError, VStreamError
from vstream.ingest.audio import AudioConverter
from vstream.ingest.config import SourceConfig
from vstream.ingest.container import (
    MediaInfo,
    SourceKind,
    describe_container,
    open_container,
    source_kind,
    start_time,
)
from vstream.ingest.queue import Closed, ItemQueue
from vstream.ingest.sampling import FrameSampler
from vstream.ingest.video import FileIndex, as_array, open_video_decoder
from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk, Frame

log = logging.getLogger(__name__)

Item = Frame | AudioChunk


@dataclass
class SourceStats:
    """Counters of a source, readable at any time (``source.stats`` is a snapshot).

    Attributes:
        decoded: video frames the decoder produced.
        sampled: frames kept by the sampler.
        dropped: kept frames dropped because the consumer fell behind.
        audio_seconds: audio decoded, seconds.
        dropped_audio_seconds: audio dropped because the consumer fell behind, seconds.
        reconnects: times a live source was reopened after it was lost.
    """

    decoded: int = 0
    sampled: int = 0
    dropped: int = 0
    audio_seconds: float = 0.0
    dropped_audio_seconds: float = 0.0
    reconnects: int = 0


@dataclass
class _End:
    error: BaseException | None = None


@dataclass
class _PendingFrame:
    """A decoded frame still in its decoder's buffer; ``frame()`` copies it out on the
    consumer's thread (see ``vstream.ingest.video``)."""

    pixels: object
    t: float
    index: int

    def frame(self) -> Frame:
        pixels, self.pixels = self.pixels, None  # the decoder's buffer is freed once copied
        return Frame(as_array(pixels), self.t, self.index)


def release_time(item: Item | _PendingFrame) -> float:
    """When an item exists on the source clock: a frame at its time, a chunk at its end."""
    return item.end if isinstance(item, AudioChunk) else item.t


class Source:
    """Frames and audio chunks of one source, in time order, decoded on a background thread.

    Iterate it (``for item in source``) to start the decoder; leaving the loop, an error
    or ``close()`` stops it and joins its thread. Use it as a context manager to be sure.
    """

    live = False

    def __init__(self, uri: str, config: SourceConfig):
        self.uri = uri
        self.config = config
        self._stats = SourceStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: ItemQueue | None = None

    @property
    def stats(self) -> SourceStats:
        return replace(self._stats)

    @property
    def drops(self) -> bool:
        """Whether a slow consumer makes frames drop (True) or the decoder wait (False)."""
        if self.config.drop is not None:
            return self.config.drop
        return self.live or self.config.realtime

    def __iter__(self) -> Iterator[Item]:
        return self._iterate_threaded(self._produce())

    def close(self) -> None:
        """Stop decoding and wait for the decoder thread (bounded by the read timeout)."""
        self._stop.set()
        thread, queue = self._thread, self._queue
        if thread is None:
            return
        queue.close()
        thread.join(timeout=self.config.read_timeout + 5.0)
        if thread.is_alive():
            log.warning("decoder thread of %s did not stop in time", self.uri)
        self._thread = self._queue = None

    def _iterate_threaded(self, items: Iterator[Item | _PendingFrame]) -> Iterator[Item]:
        """``items`` produced on a decoder thread, handed over through the bounded queue."""
        if self._thread is not None:
            raise SourceError(f"source {self.uri!r}: is already being iterated")
        queue = ItemQueue(self.config.queue_size, drop=self.drops)
        self._stop.clear()
        self._queue = queue
        self._thread = threading.Thread(target=self._run, args=(queue, items), name=f"vstream-decode:{self.uri}", daemon=True)
        self._thread.start()
        try:
            while True:
                try:
                    item = queue.get(timeout=0.5)
                except TimeoutError:
                    continue
                except Closed:  # close() from another thread
                    return
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                yield item.frame() if isinstance(item, _PendingFrame) else item
        finally:
            self.close()

    def _iterate_here(self, items: Iterator[Item | _PendingFrame]) -> Iterator[Item]:
        """``items`` produced on the caller's thread, for decoders that run ahead on
        threads of their own."""
        self._stop.clear()
        try:
            for item in self._checked(items):
                if self._stop.is_set():  # close() from another thread
                    return
                yield item.frame() if isinstance(item, _PendingFrame) else item
        finally:
            items.close()

    def _checked(self, items: Iterator[Item | _PendingFrame]) -> Iterator[Item | _PendingFrame]:
        """``items``, with FFmpeg errors that escaped the decoders as ``DecodeError``."""
        try:
            yield from items
        except av.error.FFmpegError as e:
            raise DecodeError(f"source {self.uri!r}: {e.strerror}") from e

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, queue: ItemQueue, items: Iterator[Item | _PendingFrame]) -> None:
        pace_from = None  # (wall clock, source time) of the first item when pacing
        paced = self.config.realtime and not self.live
        try:
            for item in self._checked(items):
                if self._stop.is_set():
                    break
                if paced:
                    now = time.monotonic()
                    pace_from = pace_from or (now, release_time(item))
                    if self._stop.wait(max(0.0, pace_from[0] + release_time(item) - pace_from[1] - now)):
                        break
                self._count_dropped(queue.put(item))
            else:
                queue.finish(_End())
        except Closed:
            pass
        except BaseException as e:  # handed to the consumer, raised there
            queue.finish(_End(e))
        finally:
            items.close()

    def _count_dropped(self, evicted: Item | _PendingFrame | None) -> None:
        if isinstance(evicted, AudioChunk):
            self._stats.dropped_audio_seconds += evicted.duration
        elif evicted is not None:
            self._stats.dropped += 1

    def _produce(self) -> Iterator[Item]:
        raise NotImplementedError

    def _audio_chunks(self, converter: AudioConverter, frames) -> Iterator[AudioChunk]:
        for frame in frames:
            for chunk in converter.convert(frame):
                self._stats.audio_seconds = converter.seconds
                yield chunk


class FileSource(Source):
    """A media file: iterable, and indexable by sampled frame.

    ``len(source)`` is the number of frames the sampler keeps; ``source[i]`` is the
    i-th of them, ``source[a:b]`` a list; ``frame_at(seconds)`` is the frame on screen
    at a time; ``audio_between(start, end)`` the audio of a stretch.
    """

    def __init__(self, uri: str, config: SourceConfig):
        super().__init__(uri, config)
        self._lock = threading.Lock()  # guards the random-access decoder
        self._decoder = None
        with open_container(uri) as container:
            self.info: MediaInfo = describe_container(uri, container)
            self.has_video = bool(config.video and container.streams.video)
            self.has_audio = bool(config.audio and container.streams.audio)
            if not (self.has_video or self.has_audio):
                wanted = " or ".join(k for k, on in (("video", config.video), ("audio", config.audio)) if on)
                raise DecodeError(f"source {uri!r}: has no {wanted} stream")
            if self.has_video:
                self.index = FileIndex.build(container)
                if len(self.index) == 0:
                    raise DecodeError(f"source {uri!r}: its video stream holds no frames")
                stream = container.streams.video[0]
                self.size = config.output_size(stream.codec_context.width, stream.codec_context.height)
                self.sampled_indices = FrameSampler(config.fps).select(self.index.times)

    @property
    def times(self) -> np.ndarray:
        """``[len(self)]`` times of the sampled frames, seconds."""
        return self.index.times[self.sampled_indices] if self.has_video else np.zeros(0)

    def __len__(self) -> int:
        return len(self.sampled_indices) if self.has_video else 0

    def __getitem__(self, i: int | slice) -> Frame | list[Frame]:
        if isinstance(i, slice):
            return self._decode_indices(self.sampled_indices[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range for {n} sampled frames of {self.uri!r}")
        return self._decode_indices([self.sampled_indices[i]])[0]

    def frame_at(self, seconds: float) -> Frame:
        """The frame on screen at ``seconds`` (the last one at or before it), sampled or not."""
        self._require_video()
        i = max(int(np.searchsorted(self.index.times, seconds, side="right")) - 1, 0)
        return self._decode_indices([i])[0]

    def audio_between(self, start: float, end: float) -> AudioChunk:
        """The audio from ``start`` to ``end`` seconds as one 16 kHz mono chunk."""
        if not self.has_audio:
            raise DecodeError(f"source {self.uri!r}: has no audio stream")
        if not end > start:
            raise ValueError(f"audio_between needs start < end, got {start}..{end}")
        with open_container(self.uri) as container:
            stream = container.streams.audio[0]
            base = start_time(container)
            container.seek(int((max(start - 1.0, 0.0) + base) / stream.time_base), stream=stream, backward=True)
            converter = AudioConverter(chunk_seconds=end - start + 2.0, offset=-base)
            chunks = []
            for frame in container.decode(stream):
                chunks.extend(converter.convert(frame))
                if frame.time is not None and frame.time - base > end:
                    break
            chunks.extend(converter.flush())
        if not chunks:
            raise DecodeError(f"source {self.uri!r}: no audio between {start:.2f} and {end:.2f} s")
        samples = np.concatenate([c.samples for c in chunks])
        first = int(round((start - chunks[0].start) * AUDIO_SAMPLE_RATE))
        samples = samples[max(first, 0) : max(first, 0) + int(round((end - start) * AUDIO_SAMPLE_RATE))]
        begin = max(start, chunks[0].start)
        return AudioChunk(samples=samples, start=begin, end=begin + len(samples) / AUDIO_SAMPLE_RATE)

    def close(self) -> None:
        super().close()
        with self._lock:
            if self._decoder is not None:
                self._decoder.close()
                self._decoder = None

    def __iter__(self) -> Iterator[Item]:
        decoder = self._open_decoder() if self.has_video else None
        items = self._produce(decoder)
        # decord decodes and converts ahead on threads of its own: a second hand-off
        # through a thread of ours only cost time (README, Design). Audio, PyAV and
        # paced or dropping reads keep the decoder thread.
        if decoder is not None and decoder.decodes_ahead and not self.has_audio and not self.drops:
            return self._iterate_here(items)
        return self._iterate_threaded(items)

    def _open_decoder(self):
        return open_video_decoder(self.uri, self.index, self.size, self.config.decoder_threads)

    def _require_video(self) -> None:
        if not self.has_video:
            raise DecodeError(f"source {self.uri!r}: has no video stream")

    def _decode_indices(self, indices) -> list[Frame]:
        self._require_video()
        with self._lock:
            if self._decoder is None:
                self._decoder = self._open_decoder()
            return [Frame(as_array(pixels), float(self.index.times[i]), int(i)) for i, pixels in self._decoder.frames(indices)]

    def _produce(self, decoder) -> Iterator[Item | _PendingFrame]:
        with ExitStack() as stack:
            tracks = []
            if decoder is not None:
                stack.callback(decoder.close)
                tracks.append(self._frames(decoder))
            if self.has_audio:
                container = stack.enter_context(open_container(self.uri))
                converter = AudioConverter(self.config.chunk_seconds, offset=-start_time(container))
                tracks.append(self._file_audio(container, converter))
            yield from heapq.merge(*tracks, key=release_time) if len(tracks) > 1 else tracks[0]
        if self.has_video:
            self.index.check_complete(self.uri)

    def _frames(self, decoder) -> Iterator[_PendingFrame]:
        for i, pixels in decoder.frames(self.sampled_indices):
            self._stats.decoded = decoder.decoded
            self._stats.sampled += 1
            yield _PendingFrame(pixels, float(self.index.times[i]), int(i))
            del pixels  # see DecordDecoder.frames

    def _file_audio(self, container, converter: AudioConverter) -> Iterator[AudioChunk]:
        try:
            yield from self._audio_chunks(converter, container.decode(container.streams.audio[0]))
        except av.error.FFmpegError as e:
            raise DecodeError(f"source {self.uri!r}: corrupt audio data ({e.strerror})") from e
        for chunk in converter.flush():
            self._stats.audio_seconds = converter.seconds
            yield chunk


class LiveSource(Source):
    """A URL, camera or pipe: read as it comes, reopened with back-off when lost."""

    live = True

    def __init__(self, uri: str, config: SourceConfig):
        super().__init__(uri, config)
        # Open now, so an unreachable URL or a missing camera fails here, not later.
        self._opened: av.container.InputContainer | None = open_container(uri, config.open_timeout, config.read_timeout)
        self.info: MediaInfo = describe_container(uri, self._opened)

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
        opened_at = time.monotonic()
        container, self._opened = self._opened or open_container(self.uri, config.open_timeout, config.read_timeout), None
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

    def _reopen(self) -> tuple[av.container.InputContainer | None, float]:
        """Open the source again with back-off: ``(container, wall clock when the open
        began)``, or ``(None, 0)`` if closed meanwhile; ``SourceError`` after
        ``reconnect_tries`` failures."""
        config, backoff = self.config, self.config.reconnect_backoff
        for attempt in range(1, config.reconnect_tries + 1):
            opened_at = time.monotonic()  # a live stream's first packet is about when we connect
            try:
                return open_container(self.uri, config.open_timeout, config.read_timeout), opened_at
            except VStreamError as e:
                if attempt == config.reconnect_tries:
                    raise SourceError(f"source {self.uri!r}: lost, and {attempt} reconnect attempts failed: {e}") from e
                log.info("reopening %s in %.1f s (attempt %d of %d failed): %s", self.uri, backoff, attempt, config.reconnect_tries, e)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, config.reconnect_backoff_max)
        return None, 0.0

    def _read(self, container, sampler: FrameSampler, converter: AudioConverter, clock: "_LiveClock", offset: float) -> Iterator[Item]:
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
                        self._stats.sampled += 1
                        yield Frame(frame.to_ndarray(width=size[0], height=size[1], format="rgb24"), t, index)
                else:
                    yield from self._audio_chunks(converter, [frame])


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


def open_source(uri: str | os.PathLike, config: SourceConfig | None = None, **settings) -> Source:
    """Open any source for reading frames and audio.

    Args:
        uri: a file path (mp4, mkv, webm, mov, avi, ts, ...), a URL (rtsp, rtmp,
            http(s) incl. HLS, udp, srt), a camera (``/dev/video0``, ``camera:0``),
            or ``-`` for stdin.
        config: a ``SourceConfig``; ``settings`` override its fields, e.g.
            ``open_source(path, fps=2.0, audio=False, realtime=True)``.

    Returns:
        A ``FileSource`` for files, a ``LiveSource`` otherwise; both iterate
        ``Frame`` and ``AudioChunk`` items in time order and expose ``stats``.

    Raises:
        SourceError: the file is missing, the URL unreachable, the camera absent.
        DecodeError: the file is not media, is truncated before its index, or has no
            video and no audio stream.
    """
    config = replace(config, **settings) if config is not None else SourceConfig(**settings)
    uri = os.fspath(uri)
    if source_kind(uri) is SourceKind.FILE:
        return FileSource(uri, config)
    return LiveSource(uri, config)
