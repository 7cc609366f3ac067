"""Choosing frames by presentation time, and cutting audio into fixed-length chunks."""

from __future__ import annotations

import math

import numpy as np

from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk


class FrameSampler:
    """Keeps the first frame at or after each instant ``k / fps`` of the source clock.

    Works frame by frame on presentation times, so a live stream, a file and a
    variable-rate recording sample alike; instants that fall in a gap between frames
    are skipped, never filled with a repeated frame. ``fps=None`` keeps every frame.
    """

    def __init__(self, fps: float | None):
        self.fps = fps
        # Timestamps rounded to milliseconds (Matroska, WebM) must still land on their
        # instant; a tenth of the sampling interval bounds the slack at high rates.
        self._slack = 0.0 if fps is None else min(0.002, 0.1 / fps)
        self._next = -math.inf

    def keep(self, t: float) -> bool:
        """Whether the frame at ``t`` seconds is kept; call in presentation order."""
        if self.fps is None:
            return True
        if t < self._next - self._slack:
            return False
        self._next = (math.floor((t + self._slack) * self.fps) + 1) / self.fps
        return True

    def select(self, times: np.ndarray) -> np.ndarray:
        """Indices of the kept frames among ``times`` ``[N]`` (seconds, ascending)."""
        return np.fromiter((i for i, t in enumerate(times.tolist()) if self.keep(t)), dtype=np.int64)


class AudioChunker:
    """Collects 16 kHz mono samples and cuts them into chunks of ``chunk_seconds``.

    Chunk times count samples from the time of the first one, so they do not drift;
    a jump in the input timestamps (a gap or a reconnect) closes the current chunk
    early and starts the next at the new time.
    """

    _JUMP = 0.05  # seconds of timestamp disagreement treated as a discontinuity

    def __init__(self, chunk_seconds: float):
        self.chunk_samples = max(1, int(round(chunk_seconds * AUDIO_SAMPLE_RATE)))
        self._parts: list[np.ndarray] = []
        self._held = 0
        self._start = 0.0

    def push(self, samples: np.ndarray, t: float) -> list[AudioChunk]:
        """Add ``samples`` ``[n]`` float32 whose first sample is at ``t`` seconds; return
        the chunks completed."""
        chunks = []
        if self._held and abs(t - self.next_start) > self._JUMP:
            chunks.extend(self.flush())
        if not self._held:
            self._start = t
        self._parts.append(samples)
        self._held += len(samples)
        if self._held >= self.chunk_samples:
            held = np.concatenate(self._parts)
            whole = len(held) // self.chunk_samples * self.chunk_samples
            for first in range(0, whole, self.chunk_samples):
                chunks.append(self._chunk(held[first : first + self.chunk_samples], first))
            rest = held[whole:]
            self._start += whole / AUDIO_SAMPLE_RATE
            self._parts, self._held = ([rest], len(rest)) if len(rest) else ([], 0)
        return chunks

    def flush(self) -> list[AudioChunk]:
        """The partial chunk still held, if any."""
        if not self._held:
            return []
        chunk = self._chunk(np.concatenate(self._parts), 0)
        self._parts, self._held = [], 0
        return [chunk]

    @property
    def next_start(self) -> float:
        """Source time of the sample after the last one held, seconds."""
        return self._start + self._held / AUDIO_SAMPLE_RATE

    def _chunk(self, samples: np.ndarray, offset: int) -> AudioChunk:
        start = self._start + offset / AUDIO_SAMPLE_RATE
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        return AudioChunk(samples=samples, start=start, end=start + len(samples) / AUDIO_SAMPLE_RATE)
