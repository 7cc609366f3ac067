"""Audio frames of any rate and layout to 16 kHz mono float32 ``AudioChunk``s."""

from __future__ import annotations

import av

from vstream.ingest.sampling import AudioChunker
from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk


def _mono_16k() -> av.AudioResampler:
    return av.AudioResampler(format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE)


class AudioConverter:
    """Resamples decoded audio frames to 16 kHz mono and cuts them into chunks.

    ``offset`` maps the container's clock to the source clock: a chunk's start is the
    resampled frame's time plus ``offset`` seconds.
    """

    def __init__(self, chunk_seconds: float, offset: float):
        self.offset = offset
        self._resampler = _mono_16k()
        self._chunker = AudioChunker(chunk_seconds)

    def convert(self, frame: av.AudioFrame) -> list[AudioChunk]:
        """Chunks completed by ``frame``."""
        return self._push(self._resampler.resample(frame))

    def restart(self, offset: float) -> list[AudioChunk]:
        """Begin a new stretch (after a reconnect) on a new clock offset; returns the
        partial chunk of the old one."""
        chunks = self.flush()
        self._resampler = _mono_16k()
        self.offset = offset
        return chunks

    def flush(self) -> list[AudioChunk]:
        """The resampler's tail and the partial chunk still held."""
        return self._push(self._resampler.resample(None)) + self._chunker.flush()

    def _push(self, resampled: list[av.AudioFrame]) -> list[AudioChunk]:
        chunks = []
        for out in resampled:
            t = out.time + self.offset if out.time is not None else self._chunker.next_start
            chunks.extend(self._chunker.push(out.to_ndarray()[0], t))
        return chunks
