"""Speech recognition on the stream's audio: ``ASRConfig``, ``WhisperASR``, ``ASRWorker``.

``WhisperASR`` takes the 16 kHz mono ``AudioChunk``s of ingestion one at a time and
returns ``TranscriptSegment``s with start/end (and per-word times) on the stream clock.

Whisper left to itself fails on long streams in two known ways: conditioned on its
previous text it loops (one sentence repeated through two silent minutes, and the real
speech after the silence lost), and on silence or noise it invents short words ("you").
So:

- **Voice activity gates decoding.** Every 30 ms frame is voiced when it is louder than
  ``vad_min_db`` and ``vad_margin_db`` above the quietest frame of the last
  ``vad_floor_seconds`` (a floor that follows stationary noise and hum), its spectrum is
  not flat (spectral flatness under ``vad_max_flatness``: white noise is ~0.56, voiced
  speech ~0.01) and not one pure tone (under ``vad_max_tonality`` of its energy within
  ±2 bins of the strongest bin: a sine is ~1.0, speech under ~0.7). A frame is voiced
  too when what rises ``vad_margin_db`` above each frequency bin's own floor (the
  quietest value of that bin over the same seconds) holds most of its energy and is not
  one pure tone: speech over a steady hum as loud as the voice raises the frame's total
  by only a few dB, but stands far above the hum's floor in the bins the hum leaves
  empty. Audio with no voiced frame is never decoded; music that passes is left to the
  filters below.
- **Windows are cut at pauses.** Audio collects from ``pad`` seconds before the first
  voiced frame; a window is decoded once ``end_silence`` seconds of unvoiced audio
  follow the last voiced frame (cut ``pad`` after it), or, when ``window_seconds`` fill
  first, at the last pause of at least ``cut_silence`` seconds (a hard cut if there is
  none). So a window never holds a long silence for whisper to fill.
- **Nothing carries over.** Each window is a separate ``whisper.transcribe`` call on a
  numpy array (never whisper's ffmpeg file path) with ``condition_on_previous_text=False``
  and no prompt, so a hallucination cannot seed the next window.
- **Segments are filtered**: dropped when ``no_speech_prob`` is above
  ``no_speech_threshold``, ``avg_logprob`` below ``logprob_threshold``, the text's
  ``compression_ratio`` above ``compression_ratio_threshold`` (a repetition loop), or
  when less than ``min_voiced_fraction`` of the segment's span is voiced. Whisper gives
  the first three per window, so they keep or drop a window's segments together: a
  window whose speech truly repeats itself (a refrain) is dropped too. Word times are
  trimmed to the voiced frames they overlap (whisper tends to start a first word in the
  silence before it).

``ASRWorker`` runs a ``WhisperASR`` on a thread of its own beside the frame path.
CPU cost: whisper's encoder always runs on 30 s of audio, so a window costs about the
same whatever its length: with one torch thread on the build machine (AMD EPYC, 2
cores) tiny.en takes ~0.7 s a window, ~1.4 s with word times (whisper's alignment pass
runs the encoder again). The committed 8-s clip (one window) decodes at ~5.5x real
time, 43 s of continuous speech (two windows) at ~10x; without word times ~11x and
~15x. Silence costs only the VAD (~0.2 ms a second of audio). The torch thread count
is the process's (``torch.set_num_threads``); this module does not change it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from vstream.config import JsonConfig, check_int, check_number
from vstream.encoders.worker import QueueWorker
from vstream.errors import ConfigError, EncoderError
from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk, TranscriptSegment, Word

if TYPE_CHECKING:
    from whisper.model import Whisper

FRAME = 480  # samples per VAD frame: 30 ms at 16 kHz
FRAME_SECONDS = FRAME / AUDIO_SAMPLE_RATE
_JUMP = 0.02  # seconds of disagreement between a chunk's start and the clock treated as a gap
_SNAP_FRAMES = 3  # word times snap to voiced frames widened by this many frames (90 ms)

# One whisper decode at a time in the process, whatever the model: whisper decodes
# through forward hooks it installs on the model (two decodes on one model would mix
# their caches), and its word alignment switches scaled-dot-product attention off and
# back on with a class attribute shared by every model, so a decode beside another
# stream's alignment found the attention weights missing (a TypeError in whisper,
# found by uploading damaged clips to a server: many streams, each its recogniser).
_TRANSCRIBE_LOCK = threading.Lock()


_RANGES = {  # allowed [low, high] of ASRConfig's numbers
    **dict.fromkeys(("vad_max_flatness", "vad_max_tonality", "no_speech_threshold", "min_voiced_fraction"), (0.0, 1.0)),
    "window_seconds": (1.0, 30.0), "pad": (0.0, 2.0), "cut_silence": (FRAME_SECONDS, 10.0), "min_speech": (0.0, 10.0),
    "vad_min_db": (-100.0, 0.0), "vad_margin_db": (0.0, 60.0), "vad_floor_seconds": (FRAME_SECONDS, 60.0),
    "logprob_threshold": (-100.0, 0.0), "compression_ratio_threshold": (0.0, 100.0),
}


@dataclass
class ASRConfig(JsonConfig):
    """Speech recognition settings (importable without torch).

    Attributes:
        model: ``"tiny.en"`` (default: embedded), a CTranslate2 Whisper folder, or a
            cached openai-whisper name; see ``load_whisper``.
        device: torch device (default ``"cpu"``); fp16 is used on CUDA.
        language: spoken language code (default ``"en"``); ``None`` detects it per window
            (multilingual models only).
        window_seconds: longest audio decoded at once, seconds, at most 30 (default 30).
        end_silence: unvoiced seconds after speech that close a window (default 0.8).
        cut_silence: shortest pause, seconds, a full window may be cut at (default 0.3).
        pad: seconds kept before the first and after the last voiced frame (default 0.3).
        min_speech: voiced seconds a window needs to be decoded at all (default 0.2).
        vad_min_db: loudness a voiced frame must exceed, dB full scale (default -45).
        vad_margin_db: dB a voiced frame must exceed the noise floor by (default 6).
        vad_floor_seconds: seconds over which the noise floor is the quietest frame
            (default 2).
        vad_max_flatness: spectral flatness (0..1) above which a frame is noise (default 0.4).
        vad_max_tonality: share of a frame's energy near its strongest frequency above
            which it is a tone (default 0.85).
        no_speech_threshold: segments with a higher no-speech probability are dropped
            (default 0.6).
        logprob_threshold: segments with a lower mean token log-probability are dropped
            (default -1.0).
        compression_ratio_threshold: segments whose text gzips better than this are
            dropped as repetition loops (default 2.4).
        min_voiced_fraction: share of a segment's span that must be voiced (default 0.3).
        temperatures: decoding temperatures, tried in order when a window fails the
            thresholds (default ``(0.0,)``: greedy and deterministic; whisper's own
            default is ``(0.0, 0.2, 0.4, 0.6, 0.8, 1.0)``).
        beam_size: beam width for temperature 0; ``None`` (default) is greedy.
        word_timestamps: per-word times in ``TranscriptSegment.words`` (default True;
            whisper's alignment pass about doubles the cost of a window).
        queue_chunks: chunks ``ASRWorker`` holds before it drops the oldest (default 64:
            64 s of ingest's 1-s chunks).
    """

    model: str = "tiny.en"
    device: str = "cpu"
    language: str | None = "en"
    window_seconds: float = 30.0
    end_silence: float = 0.8
    cut_silence: float = 0.3
    pad: float = 0.3
    min_speech: float = 0.2
    vad_min_db: float = -45.0
    vad_margin_db: float = 6.0
    vad_floor_seconds: float = 2.0
    vad_max_flatness: float = 0.4
    vad_max_tonality: float = 0.85
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    min_voiced_fraction: float = 0.3
    temperatures: tuple[float, ...] = (0.0,)
    beam_size: int | None = None
    word_timestamps: bool = True
    queue_chunks: int = 64

    def __post_init__(self) -> None:
        for name in ("model", "device"):
            if not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise ConfigError(f"ASRConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.language is not None and not (isinstance(self.language, str) and self.language):
            raise ConfigError(f"ASRConfig.language must be a language code or None, got {self.language!r}")
        for name, (low, high) in _RANGES.items():
            check_number("ASRConfig", name, getattr(self, name), low, high, include_low=True)
        check_number("ASRConfig", "end_silence", self.end_silence, max(self.pad, FRAME_SECONDS), 10.0,
                     include_low=True)  # a window ends past its pad
        if isinstance(self.temperatures, list):  # as JSON gives it back
            self.temperatures = tuple(self.temperatures)
        if not (isinstance(self.temperatures, tuple) and self.temperatures):
            raise ConfigError(f"ASRConfig.temperatures must be a non-empty tuple, got {self.temperatures!r}")
        for value in self.temperatures:
            check_number("ASRConfig", "temperatures", value, 0.0, 2.0, include_low=True)
        if self.beam_size is not None:
            check_int("ASRConfig", "beam_size", self.beam_size, 1)
        check_int("ASRConfig", "queue_chunks", self.queue_chunks, 1)
        if not isinstance(self.word_timestamps, bool):
            raise ConfigError(f"ASRConfig.word_timestamps must be a bool, got {self.word_timestamps!r}")


@dataclass
class ASRStats:
    """Counters of one recogniser; seconds are seconds of audio unless said otherwise."""

    audio_seconds: float = 0.0  # pushed
    decoded_seconds: float = 0.0  # sent to whisper
    windows: int = 0  # whisper calls
    decode_wall_seconds: float = 0.0  # wall time spent in whisper
    segments: int = 0  # kept
    dropped_segments: int = 0  # removed by the thresholds or the voiced-fraction check
    dropped_chunks: int = 0  # evicted by ASRWorker's full queue
    dropped_seconds: float = 0.0


class VoiceActivity:
    """Frame-level voice activity over 30 ms frames, with a running noise floor, both
    overall (dB) and per frequency bin (so speech over a steady tone or hum is heard)."""

    def __init__(self, config: ASRConfig):
        self.config = config
        self._floor_frames = max(1, round(config.vad_floor_seconds / FRAME_SECONDS))
        self._recent = np.full(self._floor_frames - 1, config.vad_min_db)  # dB of the frames before
        self._recent_power = np.zeros((self._floor_frames - 1, _BINS))  # their power spectra

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """``[n * FRAME]`` float32 samples -> ``[n]`` bool, voiced per frame."""
        frames = samples.reshape(-1, FRAME).astype(np.float64)
        if not len(frames):
            return np.zeros(0, bool)
        c = self.config
        db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-10)
        history = np.concatenate([self._recent, db])
        floor = np.lib.stride_tricks.sliding_window_view(history, self._floor_frames).min(axis=1)
        self._recent = history[len(history) - len(self._recent) :]
        power = np.abs(np.fft.rfft(frames * np.hanning(FRAME), n=2 * (_BINS - 1), axis=1)) ** 2 + 1e-12
        loud = (db > c.vad_min_db) & (db > floor + c.vad_margin_db)
        not_noise = _flatness(power) < c.vad_max_flatness
        voiced = loud & not_noise & (_tonality(power) < c.vad_max_tonality)
        # Speech over a steady background (a tone, hum): what rises above each bin's own
        # floor by the margin must hold most of the frame's energy and look like speech.
        spectra = np.concatenate([self._recent_power, power])
        background = np.lib.stride_tricks.sliding_window_view(spectra, self._floor_frames, axis=0).min(axis=-1)
        self._recent_power = spectra[len(spectra) - len(self._recent_power) :]
        excess = np.clip(power - background * 10 ** (c.vad_margin_db / 10), 0.0, None) + 1e-12
        share = excess.sum(axis=1) / power.sum(axis=1)
        over_background = (db > c.vad_min_db) & (db + 10 * np.log10(share) > c.vad_min_db) & (share > 0.5)
        # flatness on the whole spectrum (the excess is zero in most bins), tonality on
        # the excess (the steady tone is in the background)
        return voiced | (over_background & not_noise & (_tonality(excess) < c.vad_max_tonality))


_BINS = 257  # rfft bins of a 512-point transform of a 30 ms frame


def _flatness(power: np.ndarray) -> np.ndarray:
    """Spectral flatness (0..1) of each frame's power spectrum ``[n, bins]``: noise ~0.56."""
    return np.exp(np.mean(np.log(power), axis=1)) / np.mean(power, axis=1)


def _tonality(power: np.ndarray) -> np.ndarray:
    """Share of each frame's energy within 2 bins of its strongest one: a sine ~1."""
    peak = np.argmax(power, axis=1)
    rows = np.arange(len(power))
    near_peak = sum(power[rows, np.clip(peak + d, 0, power.shape[1] - 1)] for d in range(-2, 3))
    return near_peak / power.sum(axis=1)


def _widen(flags: np.ndarray, frames: int) -> np.ndarray:
    """``flags`` with every True spread ``frames`` frames both ways."""
    if frames <= 0 or not flags.any():
        return flags.copy()
    return np.convolve(flags.astype(np.int32), np.ones(2 * frames + 1, np.int32), mode="same") > 0


class WhisperASR:
    """Incremental whisper transcription of a stream's ``AudioChunk``s (see module doc).

    Args:
        config: an ``ASRConfig`` (default: all defaults).
        model: an already loaded openai-whisper model; by default ``load_whisper``
            loads ``config.model`` onto ``config.device``.
    """

    def __init__(self, config: ASRConfig | None = None, model: Whisper | None = None):
        self.config = config or ASRConfig()
        if model is None:
            from vstream.encoders.whisper_ct2 import load_whisper

            model = load_whisper(self.config.model, self.config.device)
        self.model = model
        c = self.config
        self._options = {  # for whisper.transcribe: no conditioning, our thresholds
            "verbose": None, "language": c.language, "temperature": c.temperatures, "beam_size": c.beam_size,
            "condition_on_previous_text": False, "word_timestamps": c.word_timestamps,
            "fp16": c.device.startswith("cuda"), "no_speech_threshold": c.no_speech_threshold,
            "logprob_threshold": c.logprob_threshold, "compression_ratio_threshold": c.compression_ratio_threshold,
        }
        self.stats = ASRStats()
        self._pad = round(self.config.pad / FRAME_SECONDS)
        self._reset(None)

    def _reset(self, origin: float | None) -> None:
        self._vad = VoiceActivity(self.config)
        self._origin = origin  # stream time of the first sample of this stretch
        self._dropped = 0  # samples of this stretch already dropped from the buffer's front
        self._audio = np.zeros(0, np.float32)
        self._flags = np.zeros(0, bool)

    @property
    def _clock(self) -> float | None:
        """Stream time just after the last sample pushed."""
        if self._origin is None:
            return None
        return self._origin + (self._dropped + len(self._audio)) / AUDIO_SAMPLE_RATE

    def push(self, chunk: AudioChunk) -> list[TranscriptSegment]:
        """Add one chunk; returns the segments of the windows it completed.

        Raises:
            EncoderError: ``chunk`` is not an ``AudioChunk``, or starts before the end of
                the previous one.
        """
        if not isinstance(chunk, AudioChunk):
            raise EncoderError(f"WhisperASR.push takes an AudioChunk, got {type(chunk).__name__}")
        out: list[TranscriptSegment] = []
        clock = self._clock
        if clock is not None and chunk.start < clock - _JUMP:
            raise EncoderError(
                f"audio time went backwards: chunk starts at {chunk.start:.3f} s, the last ended at {clock:.3f} s"
            )
        if clock is None or chunk.start > clock + _JUMP:  # first chunk, or a gap: a new stretch
            out += self.flush()
            self._reset(chunk.start)
        self.stats.audio_seconds += chunk.duration
        self._audio = np.concatenate([self._audio, chunk.samples])
        whole = len(self._audio) // FRAME
        self._flags = np.concatenate([self._flags, self._vad(self._audio[len(self._flags) * FRAME : whole * FRAME])])
        return out + self._advance(final=False)

    def flush(self) -> list[TranscriptSegment]:
        """Decode whatever is held (end of stream, or before a gap)."""
        out = self._advance(final=True) if self._origin is not None else []
        self._reset(self._clock)
        return out

    def _advance(self, final: bool) -> list[TranscriptSegment]:
        c, out = self.config, []
        window = round(c.window_seconds / FRAME_SECONDS)
        end_silence = round(c.end_silence / FRAME_SECONDS)
        while True:
            voiced = np.flatnonzero(self._flags)
            if not len(voiced):  # only silence: keep the padding a coming onset needs
                self._drop(len(self._audio) if final else (len(self._flags) - self._pad) * FRAME)
                return out
            if voiced[0] > self._pad:
                self._drop((voiced[0] - self._pad) * FRAME)
                continue
            last, held = voiced[-1], len(self._flags)
            if held - 1 - last >= end_silence and last + 1 + self._pad <= window:
                cut = (last + 1 + self._pad) * FRAME
            elif held >= window:
                cut = self._cut_point(self._flags[:window]) * FRAME
            elif final:
                cut = len(self._audio)
            else:
                return out
            out += self._decode(self._audio[:cut], self._flags[: cut // FRAME])
            self._drop(cut)

    def _cut_point(self, flags: np.ndarray) -> int:
        """Frame to end a full window at: the middle of its last long-enough pause."""
        need = round(self.config.cut_silence / FRAME_SECONDS)
        padded = np.concatenate([[True], flags, [True]]).astype(np.int8)
        edges = np.diff(padded)
        starts, ends = np.flatnonzero(edges == -1), np.flatnonzero(edges == 1)  # unvoiced runs [start, end)
        runs = [(s, e) for s, e in zip(starts, ends) if e - s >= need and s > 0 and e < len(flags)]
        return (runs[-1][0] + runs[-1][1]) // 2 if runs else len(flags)

    def _drop(self, samples: int) -> None:
        """Forget the first ``samples`` (a whole number of frames, or everything)."""
        samples = min(max(samples, 0), len(self._audio))
        self._audio = self._audio[samples:]
        self._flags = self._flags[samples // FRAME :]
        self._dropped += samples

    def _decode(self, audio: np.ndarray, flags: np.ndarray) -> list[TranscriptSegment]:
        import whisper

        c = self.config
        if flags.sum() * FRAME_SECONDS < c.min_speech:
            return []
        t0 = self._origin + self._dropped / AUDIO_SAMPLE_RATE
        with _TRANSCRIBE_LOCK:
            began = time.perf_counter()
            result = whisper.transcribe(self.model, audio, **self._options)
            self.stats.decode_wall_seconds += time.perf_counter() - began
        self.stats.windows += 1
        self.stats.decoded_seconds += len(audio) / AUDIO_SAMPLE_RATE
        voiced = _widen(flags, _SNAP_FRAMES)
        duration = len(audio) / AUDIO_SAMPLE_RATE
        out = []
        for seg in result["segments"]:
            segment = self._segment(seg, voiced, t0, duration)
            if segment is None:
                self.stats.dropped_segments += 1
            else:
                out.append(segment)
        self.stats.segments += len(out)
        return out

    def _segment(self, seg: dict, voiced: np.ndarray, t0: float, duration: float) -> TranscriptSegment | None:
        """One whisper segment on the stream clock, or None when a filter drops it."""
        c = self.config
        text = seg["text"].strip()
        if (
            not text
            or seg["no_speech_prob"] > c.no_speech_threshold
            or seg["avg_logprob"] < c.logprob_threshold
            or seg["compression_ratio"] > c.compression_ratio_threshold
        ):
            return None
        words = []
        for w in seg.get("words", []):
            if w["word"].strip():
                start, end = self._snap(w["start"], w["end"], voiced, duration)
                words.append(Word(w["word"].strip(), t0 + start, t0 + end, float(w["probability"])))
        start, end = self._snap(seg["start"], seg["end"], voiced, duration)
        if words:
            start, end = words[0].start - t0, words[-1].end - t0
        first, last = int(start / FRAME_SECONDS), int(np.ceil(end / FRAME_SECONDS))
        if voiced[first:last].sum() < c.min_voiced_fraction * max(last - first, 1):
            return None
        return TranscriptSegment(start=t0 + start, end=t0 + end, text=text, words=tuple(words))

    @staticmethod
    def _snap(start: float, end: float, voiced: np.ndarray, duration: float) -> tuple[float, float]:
        """``(start, end)`` trimmed to the voiced frames inside it, within ``[0, duration]``."""
        start, end = min(max(float(start), 0.0), duration), min(max(float(end), 0.0), duration)
        first, last = int(start / FRAME_SECONDS), int(np.ceil(end / FRAME_SECONDS))
        inside = np.flatnonzero(voiced[first:last])
        if len(inside):
            start = max(start, (first + inside[0]) * FRAME_SECONDS)
            end = min(end, (first + inside[-1] + 1) * FRAME_SECONDS)
        return start, max(start, end)


class ASRWorker(QueueWorker):
    """Runs a ``WhisperASR`` on its own thread (name ``vstream-asr-<n>``).

    ``submit`` never waits longer than a queue put: when ``config.queue_chunks`` chunks
    are waiting, the oldest is dropped and counted in ``stats`` (a live stream must not
    stall). With ``drop=False`` (a file, where every word counts) ``submit`` waits for
    room instead. ``segments()`` returns the segments finished since the last call. An
    error on the thread is raised by the next ``submit``, ``segments`` or ``close``.
    ``close()`` decodes what is held, then joins the thread; ``close(flush=False)``
    drops the backlog instead.
    """

    def __init__(self, asr: WhisperASR, drop: bool = True):
        self.asr = asr
        self._ready: list[TranscriptSegment] = []
        self._lock = threading.Lock()
        self._dropped = (0, 0.0)
        super().__init__(asr.config.queue_chunks, drop, "vstream-asr")

    def submit(self, chunk: AudioChunk) -> None:
        """Queue one chunk for recognition."""
        if not isinstance(chunk, AudioChunk):
            raise EncoderError(f"ASRWorker.submit takes an AudioChunk, got {type(chunk).__name__}")
        evicted = self._put(chunk)
        if evicted is not None:
            with self._lock:
                self._dropped = (self._dropped[0] + 1, self._dropped[1] + evicted.duration)

    def segments(self) -> list[TranscriptSegment]:
        """Segments finished since the last call, in time order."""
        self._raise()
        with self._lock:
            ready, self._ready = self._ready, []
        return ready

    @property
    def stats(self) -> ASRStats:
        """A copy of the recogniser's counters, with the queue's drops."""
        with self._lock:
            return replace(self.asr.stats, dropped_chunks=self._dropped[0], dropped_seconds=self._dropped[1])

    def _handle(self, chunk: AudioChunk) -> None:
        new = self.asr.push(chunk)
        with self._lock:
            self._ready.extend(new)

    def _finish(self) -> None:
        new = self.asr.flush()
        with self._lock:
            self._ready.extend(new)
