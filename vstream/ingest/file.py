"""``FileSource``: a media file, iterable and indexable by sampled frame."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterator
from contextlib import ExitStack

import av
import numpy as np

from vstream.errors import DecodeError
from vstream.ingest.audio import AudioConverter
from vstream.ingest.config import SourceConfig
from vstream.ingest.container import MediaInfo, describe_container, open_container, start_time
from vstream.ingest.decoder_choice import open_video_decoder
from vstream.ingest.sampling import FrameSampler
from vstream.ingest.source import Item, Source, _PendingFrame, release_time
from vstream.ingest.video import FileIndex, as_array
from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk, Frame


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
        self.index: FileIndex | None = None
        self.size: tuple[int, int] | None = None
        self.sampled_indices = np.zeros(0, dtype=np.int64)  # [len(self)] indices of the sampled frames
        with open_container(uri) as container:
            self.info: MediaInfo = describe_container(uri, container)
            self.has_video = bool(config.video and container.streams.video)
            self.has_audio = bool(config.audio and container.streams.audio)
            if not (self.has_video or self.has_audio):
                wanted = " or ".join(k for k, on in (("video", config.video), ("audio", config.audio)) if on)
                raise DecodeError(f"source {uri!r}: has no {wanted} stream")
            if self.has_video:
                try:
                    self.index = FileIndex.build(container)
                except av.error.FFmpegError as e:  # damaged packets can fail the demux in many ways
                    raise DecodeError(f"source {uri!r}: cannot read its packets: {e.strerror or e}") from e
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
        return len(self.sampled_indices)

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
        # through a thread of ours only cost time (docs/design.md). Audio, PyAV and
        # paced or dropping reads keep the decoder thread.
        paced = self.config.realtime
        if decoder is not None and decoder.decodes_ahead and not (self.has_audio or self.drops or paced):
            return self._iterate_here(items)
        return self._iterate_threaded(items)

    def _open_decoder(self):
        decoder, choice = open_video_decoder(self.uri, self.index, self.size, self.config.decoder_threads,
                                             self.sampled_indices, self.config.decoder)
        self._stats.decoder, self._stats.decoder_choice, self._stats.decoder_rates = (
            decoder.name, choice.how, dict(choice.rates))
        return decoder

    def _require_video(self) -> None:
        if not self.has_video:
            raise DecodeError(f"source {self.uri!r}: has no video stream")

    def _decode_indices(self, indices) -> list[Frame]:
        if len(indices) == 0:
            return []
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
            yield _PendingFrame(pixels, float(self.index.times[i]), int(i))
            del pixels  # see DecordDecoder.frames

    def _file_audio(self, container, converter: AudioConverter) -> Iterator[AudioChunk]:
        try:
            for frame in container.decode(container.streams.audio[0]):
                yield from converter.convert(frame)
        except av.error.FFmpegError as e:
            raise DecodeError(f"source {self.uri!r}: corrupt audio data ({e.strerror})") from e
        yield from converter.flush()
