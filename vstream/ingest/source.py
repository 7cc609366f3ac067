"""``Source``: a decoder, an optional decoder thread with a bounded queue, and an
iterator of frames and audio chunks. ``FileSource`` (``file.py``) and ``LiveSource``
(``live.py``) say what is decoded; ``open_source`` (``open.py``) picks one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import av

from vstream.errors import DecodeError, SourceError
from vstream.ingest.config import SourceConfig
from vstream.ingest.queue import Closed, ItemQueue
from vstream.ingest.video import as_array
from vstream.types import AudioChunk, Frame

log = logging.getLogger(__name__)

Item = Frame | AudioChunk


@dataclass
class SourceStats:
    """Counters of a source, readable at any time (``source.stats`` is a snapshot).

    Attributes:
        decoded: video frames the decoder produced.
        sampled: frames kept by the sampler.
        dropped: kept frames dropped because the consumer fell behind.
        audio_seconds: audio delivered in chunks, seconds.
        dropped_audio_seconds: audio dropped because the consumer fell behind, seconds.
        reconnects: times a live source was reopened after it was lost.
        decoder: what decodes the video, ``decord`` or ``pyav`` (for a file, the faster
            on its kind of video, measured: see ``vstream.ingest.decoder_choice``);
            ``pyav`` for live sources; ``""`` until the video is first read.
        decoder_choice: how ``decoder`` was chosen: ``measured`` (timed on this file),
            ``cached`` (timed on video of the same kind earlier in the process),
            ``pinned`` (``SourceConfig.decoder``) or ``only`` (the other cannot read it).
        decoder_rates: frames per second each decoder read the trial frames at, by name;
            empty unless measured or cached.
    """

    decoded: int = 0
    sampled: int = 0
    dropped: int = 0
    audio_seconds: float = 0.0
    dropped_audio_seconds: float = 0.0
    reconnects: int = 0
    decoder: str = ""
    decoder_choice: str = ""
    decoder_rates: dict[str, float] = field(default_factory=dict)


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

    live = False  # True for a source of unknown length that will not wait for its reader

    def __init__(self, uri: str, config: SourceConfig):
        self.uri = uri
        self.config = config
        self._stats = SourceStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: ItemQueue | None = None

    @property
    def stats(self) -> SourceStats:
        return replace(self._stats, decoder_rates=dict(self._stats.decoder_rates))

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
            for item in self._produced(items):
                if self._stop.is_set():  # close() from another thread
                    return
                yield item.frame() if isinstance(item, _PendingFrame) else item
        finally:
            items.close()

    def _produced(self, items: Iterator[Item | _PendingFrame]) -> Iterator[Item | _PendingFrame]:
        """``items`` as the producer makes them, counted into ``stats`` (every frame it
        yields was kept by its sampler), with FFmpeg errors that escaped the decoders
        raised as ``DecodeError``."""
        try:
            for item in items:
                if isinstance(item, AudioChunk):
                    self._stats.audio_seconds += item.duration
                else:
                    self._stats.sampled += 1
                yield item
        except av.error.FFmpegError as e:
            raise DecodeError(f"source {self.uri!r}: {e.strerror}") from e

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, queue: ItemQueue, items: Iterator[Item | _PendingFrame]) -> None:
        pace_from = None  # (wall clock, source time) of the first item when pacing
        paced = self.config.realtime and not self.live
        try:
            for item in self._produced(items):
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
        """Frames (or pending frames) and audio chunks in time order; counts
        ``stats.decoded`` itself, the rest is counted by ``_produced``."""
        raise NotImplementedError
