"""The small domain objects that travel along the whole path: ``Frame`` and ``AudioChunk``.

Times are seconds on the source's clock: 0 is the start of the source, and a live
source's clock keeps running across reconnects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

AUDIO_SAMPLE_RATE = 16_000
"""Sample rate of every ``AudioChunk``, in Hz (what speech models expect)."""


@dataclass(frozen=True, eq=False)
class Frame:
    """One sampled video frame.

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB pixels.
        t: presentation time, seconds from the start of the source.
        index: position of the frame among all decoded frames of the source (not
            among the sampled ones), so a caller can tell exactly which frame it got.
    """

    image: np.ndarray
    t: float
    index: int

    def __post_init__(self) -> None:
        image = self.image
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"Frame.image must be a uint8 array of shape [H, W, 3], got "
                f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
            )
        if not math.isfinite(self.t):
            raise ValueError(f"Frame.t must be a finite number of seconds, got {self.t!r}")
        if self.index < 0:
            raise ValueError(f"Frame.index must be >= 0, got {self.index}")

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """A stretch of audio, mono float32 at 16 kHz.

    Attributes:
        samples: ``[n]`` float32 in [-1, 1], ``AUDIO_SAMPLE_RATE`` samples a second.
        start: time of the first sample, seconds from the start of the source.
        end: ``start + n / AUDIO_SAMPLE_RATE``, seconds.
    """

    samples: np.ndarray
    start: float
    end: float

    def __post_init__(self) -> None:
        samples = self.samples
        if not isinstance(samples, np.ndarray) or samples.dtype != np.float32 or samples.ndim != 1:
            raise ValueError(
                f"AudioChunk.samples must be a float32 array of shape [n], got "
                f"{getattr(samples, 'dtype', type(samples).__name__)} {getattr(samples, 'shape', '')}"
            )
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.end < self.start:
            raise ValueError(f"AudioChunk needs finite start <= end, got {self.start!r}..{self.end!r}")
        expected = len(samples) / AUDIO_SAMPLE_RATE
        if abs((self.end - self.start) - expected) > 1e-3:
            raise ValueError(
                f"AudioChunk spans {self.end - self.start:.4f} s but holds {len(samples)} samples "
                f"({expected:.4f} s at {AUDIO_SAMPLE_RATE} Hz)"
            )

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Word:
    """One transcribed word with its times (seconds on the source clock)."""

    text: str
    start: float
    end: float
    probability: float = 1.0


@dataclass(frozen=True)
class TranscriptSegment:
    """A stretch of transcribed speech.

    Attributes:
        start: time the speech starts, seconds on the source clock.
        end: time it ends, seconds (``>= start``).
        text: the words, stripped.
        words: per-word times where the recogniser gives them, else empty.
    """

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.end < self.start:
            raise ValueError(f"TranscriptSegment needs finite start <= end, got {self.start!r}..{self.end!r}")
        if not isinstance(self.text, str):
            raise ValueError(f"TranscriptSegment.text must be a str, got {type(self.text).__name__}")


def clock(seconds: float, hours: bool = False) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on, or always with ``hours``) of a time in seconds."""
    whole = round(max(seconds, 0.0))
    h, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{h}:{minutes:02d}:{secs:02d}" if h or hours else f"{minutes}:{secs:02d}"


def _reaches_an_hour(*seconds: float) -> bool:
    """Whether any of the times shows as ``h:mm:ss`` in ``clock`` (rounded to the second)."""
    return any(round(t) >= 3600 for t in seconds)


def evidence_line(start: float, end: float, kind: str, score: float, source: str | None = None,
                  hours: bool | None = None) -> str:
    """One piece of an answer's evidence as every CLI path prints it: ``m:ss-m:ss  kind
    score  [source]``. Both times are ``h:mm:ss`` once either reaches an hour (``hours``
    None), or as ``hours`` says (``evidence_lines`` decides it for a whole answer)."""
    if hours is None:
        hours = _reaches_an_hour(start, end)
    line = f"{clock(start, hours)}-{clock(end, hours)}  {kind:<10} {score:.2f}"
    return line if source is None else f"{line}  {source}"


def evidence_lines(evidence: list[dict]) -> list[str]:
    """An answer's evidence as the CLI prints it, one ``evidence_line`` per item of its JSON
    form (``{"start", "end", "kind", "score"[, "source"]}``, what ``Answer.to_dict`` gives
    and the server replies): all times ``h:mm:ss`` once any of them reaches an hour, so
    the lines of one answer line up."""
    hours = _reaches_an_hour(*(t for e in evidence for t in (e["start"], e["end"])))
    return [evidence_line(e["start"], e["end"], e["kind"], e["score"], e.get("source"), hours) for e in evidence]
