"""Audio frames of any rate and layout to 16 kHz mono float32 ``AudioChunk``s."""

from __future__ import annotations

import av

from vstream.ingest.sampling import AudioChunker
from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk


class AudioConverter:
    """Resamples decoded audio frames to 16 kHz mono and cuts them into chunks.

    ``offset`` maps the container's clock to the source clock: a chunk's start is the
    resampled frame's time plus ``offset`` seconds.
    """

    def __init__(self, chunk_seconds: float, offset: float):
        self.offset = offset
        self.seconds = 0.0  # audio converted so far
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE)
        self._chunker = AudioChunker(chunk_seconds)

    def convert(self, frame: av.AudioFrame) -> list[AudioChunk]:
        """Chunks completed by ``frame``."""
        chunks = []
        for out in self._resampler.resample(frame):
            samples = out.to_ndarray()[0]
            self.seconds += len(samples) / AUDIO_SAMPLE_RATE
            t = out.time + self.offset if out.time is not None else self._chunker.next_start
            chunks.extend(self._chunker.push(samples, t))
        return chunks

    def restart(self, offset: float) -> list[AudioChunk]:
        """Begin a new stretch (after a reconnect) on a new clock offset; returns the
        partial chunk of the old one."""
        chunks = self.flush()
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE)
        self.offset = offset
        return chunks

    def flush(self) -> list[AudioChunk]:
        """The resampler's tail and the partial chunk still held."""
        chunks = []
        for out in self._resampler.resample(None):
            samples = out.to_ndarray()[0]
            self.seconds += len(samples) / AUDIO_SAMPLE_RATE
            chunks.extend(self._chunker.push(samples, self._chunker.next_start))
        return chunks + self._chunker.flush()
