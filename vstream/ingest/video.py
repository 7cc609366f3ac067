"""Decoding chosen frames of a video file, with decord or with PyAV (which of the two
decodes a file is decided in ``decoder_choice.py``).

``FileIndex`` demuxes the file once (no decoding) for the presentation time of every
frame and where the key frames are; both decoders share it, so frame indices and times
are the same whichever decodes. Sparse indices seek to the key frame before them
instead of decoding everything in between.

Decoders yield ``(index, pixels)``: ``pixels`` is an RGB ``[H, W, 3]`` uint8 numpy array
or a decord buffer, which ``as_array`` copies into numpy. The copy is left to the thread
that consumes the frame: an array allocated on the decoder thread and freed on the
consumer's made glibc hand its pages back to the OS and fault them in again for every
frame, which cost 1.3-2.3x the bare decoder's time at full rate (docs/design.md, docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import av
import numpy as np

from vstream.errors import DecodeError
from vstream.ingest.container import open_container, start_time

log = logging.getLogger(__name__)

_TRUNCATION_SLACK = 1.0  # seconds the last packet may end before the declared duration


def as_array(pixels) -> np.ndarray:
    """The ``[H, W, 3]`` uint8 array of a decoder's ``pixels``."""
    return pixels if isinstance(pixels, np.ndarray) else pixels.asnumpy()


@dataclass
class FileIndex:
    """Where the frames of a file's first video stream are.

    Attributes:
        pts: ``[N]`` presentation timestamps in the stream's time base, ascending.
        times: ``[N]`` the same in seconds from the start of the source.
        keyframes: ``[K]`` ascending indices (into ``pts``) of the key frames.
        end: seconds from the start of the source at which the last packet of any
            stream ends.
        declared_duration: what the container says its duration is, seconds, or None.
        video_start: where the video stream's own clock starts, seconds from the start
            of the source (decord counts frame times from there).
        declared_frames: how many frames the container says the stream has (0: it does
            not say); a damaged header may claim billions.
        codec: the video codec's name (``h264``); with ``pixel_format`` and ``coded_size``
            it keys the decoder choice (``decoder_choice.py``).
        pixel_format: the stream's pixel format (``yuv420p``), ``""`` if it does not say.
        coded_size: ``(width, height)`` of the stream's pictures.
    """

    pts: np.ndarray
    times: np.ndarray
    keyframes: np.ndarray
    end: float
    declared_duration: float | None
    video_start: float
    declared_frames: int = 0
    codec: str = ""
    pixel_format: str = ""
    coded_size: tuple[int, int] = (0, 0)

    @classmethod
    def build(cls, container: av.container.InputContainer) -> FileIndex:
        """Demux every packet of ``container`` once; leaves it rewound to the start."""
        stream = container.streams.video[0]
        base = start_time(container)
        pts, keys = [], []
        ends: dict[int, int] = {}  # stream index -> latest packet end, in that stream's time base
        for packet in container.demux():
            if packet.size == 0 or packet.pts is None and packet.dts is None:
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            owner, packet_end = packet.stream_index, ts + (packet.duration or 0)
            if packet_end > ends.get(owner, packet_end - 1):
                ends[owner] = packet_end
            if owner == stream.index:
                pts.append(ts)
                keys.append(packet.is_keyframe)
        container.seek(0)
        # Seconds once per stream, not per packet: Fraction arithmetic dominated the loop.
        end = max([0.0] + [float(e * container.streams[i].time_base) - base for i, e in ends.items()])
        order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
        sorted_pts = np.asarray(pts, dtype=np.int64)[order]
        keyframes = np.flatnonzero(np.asarray(keys, dtype=bool)[order])
        if len(keyframes) == 0 or keyframes[0] != 0:
            keyframes = np.concatenate([[0], keyframes]).astype(np.int64)
        times = sorted_pts * float(stream.time_base) - base
        declared = container.duration / av.time_base if container.duration else None
        video_start = (stream.start_time or 0) * float(stream.time_base) - base
        context = stream.codec_context
        return cls(sorted_pts, times, keyframes, end, declared, video_start, int(stream.frames or 0),
                   context.name if context else "", (context.pix_fmt or "") if context else "",
                   (context.width, context.height) if context else (0, 0))

    def __len__(self) -> int:
        return len(self.pts)

    def keyframe_before(self, index: int) -> int:
        """Index of the last key frame at or before frame ``index``."""
        return int(self.keyframes[np.searchsorted(self.keyframes, index, side="right") - 1])

    def check_complete(self, uri: str) -> None:
        """Raise if the file ends well before the duration its container declares."""
        if self.declared_duration and self.end < self.declared_duration - _TRUNCATION_SLACK:
            raise DecodeError(
                f"source {uri!r}: truncated: its media ends at {self.end:.2f} s but the container "
                f"declares {self.declared_duration:.2f} s"
            )


class PyAVDecoder:
    """Decodes chosen frames with PyAV, seeking over gaps longer than a key-frame interval."""

    name = "pyav"
    decodes_ahead = False  # colour conversion runs on the caller's thread

    def __init__(self, uri: str, index: FileIndex, size: tuple[int, int], threads: int):
        self.uri = uri
        self.container = open_container(uri)
        self.index = index
        self.size = size
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        if threads:
            self.stream.thread_count = threads
        self.decoded = 0
        self._used = False  # an earlier frames() call moved the decoder

    def frames(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(index, image [H, W, 3] uint8)`` for ``indices`` (ascending)."""
        pending = deque(indices)
        position = -1  # index of the last frame decoded
        # A decoder an earlier call used is somewhere in the file, with frames of its own
        # still buffered (or drained at the end): start again from a key frame.
        must_seek, self._used = self._used, True
        exhausted = False
        while pending and not exhausted:
            key = self.index.keyframe_before(pending[0])
            if must_seek or key > position + 1 or position >= pending[0]:
                must_seek = False
                self.container.seek(int(self.index.pts[key]), stream=self.stream, backward=True, any_frame=False)
                position = key - 1
            exhausted = True
            for frame in self._decode():
                position = self._index_of(frame, position)
                while pending and pending[0] < position:
                    pending.popleft()  # a frame the decoder never produced (damaged packet)
                if pending and pending[0] == position:
                    pending.popleft()
                    yield position, frame.to_ndarray(width=self.size[0], height=self.size[1], format="rgb24")
                if not pending or self.index.keyframe_before(pending[0]) > position + 1:
                    exhausted = False
                    break
        if pending:
            raise DecodeError(
                f"source {self.uri!r}: decoding stopped at frame {max(position, 0)} of {len(self.index)}: "
                "the file is truncated or corrupt"
            )

    def _decode(self) -> Iterator[av.VideoFrame]:
        try:
            for frame in self.container.decode(self.stream):
                self.decoded += 1
                yield frame
        except av.error.FFmpegError as e:
            raise DecodeError(f"source {self.uri!r}: corrupt video data ({e.strerror})") from e

    def _index_of(self, frame: av.VideoFrame, previous: int) -> int:
        if frame.pts is None:
            return previous + 1
        i = int(np.searchsorted(self.index.pts, frame.pts))
        return i if i < len(self.index) and self.index.pts[i] == frame.pts else previous + 1

    def close(self) -> None:
        self.container.close()


class DecordDecoder:
    """Decodes chosen frames with decord, one ``next()`` per frame, seeking only over a
    gap; on a decord failure (an error, or a first picture of the wrong shape) it hands
    the rest to PyAV, so a damaged file still yields every frame PyAV can decode.

    ``next()`` rather than ``get_batch``: a batch is decoded into a fresh N-frame buffer
    and copied again into numpy; one frame at a time is one copy, into a buffer the
    allocator reuses: 1.2-1.8x faster at full rate, and no slower when sampling sparsely.
    """

    name = "decord"
    decodes_ahead = True  # decord decodes and converts on threads of its own

    def __init__(self, reader, uri: str, index: FileIndex, size: tuple[int, int], threads: int):
        self.reader = reader
        self.uri = uri
        self._pyav_settings = (index, size, threads)
        self._shape = (size[1], size[0], 3)  # what each picture should be, checked on the first
        self._fallback: PyAVDecoder | None = None  # opened only when decord fails
        self._decoded = 0
        self._next = 0  # the frame ``reader.next()`` returns

    @property
    def decoded(self) -> int:
        return self._decoded + (self._fallback.decoded if self._fallback else 0)

    @property
    def failed(self) -> bool:
        """Whether decord failed and PyAV decodes the rest."""
        return self._fallback is not None

    @property
    def fallback(self) -> PyAVDecoder:
        if self._fallback is None:
            self._fallback = PyAVDecoder(self.uri, *self._pyav_settings)
        return self._fallback

    def frames(self, indices: Sequence[int]) -> Iterator[tuple[int, object]]:
        indices = np.asarray(indices, dtype=np.int64).tolist()
        for n, i in enumerate(indices):
            try:
                if i != self._next:
                    self.reader.seek_accurate(i)
                pixels = self.reader.next()
                if self._decoded == 0 and pixels.shape != self._shape:
                    # decord2 3.4 returns garbage in 4 channels at some sizes (96x64, 48x32)
                    raise ValueError(f"it decoded a {pixels.shape} picture, not {self._shape}")
            except Exception as e:  # decord raises its own error types, RuntimeError, StopIteration
                log.warning("decord failed at frame %d of %s (%s); continuing with PyAV", i, self.uri, e)
                self._next = -1  # unknown: seek before the next read
                yield from self.fallback.frames(indices[n:])
                return
            self._next = i + 1
            self._decoded += 1
            yield i, pixels
            del pixels  # free this buffer before decoding the next, so the allocator reuses it

    def close(self) -> None:
        self.reader = None
        if self._fallback is not None:
            self._fallback.close()
