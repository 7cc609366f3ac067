"""Which decoder reads a file's video: decord or PyAV, the faster of the two, measured.

decord is a candidate only where it reads the file as the demuxer does (the same frames
at the same times) and the header does not claim absurd frame counts; otherwise PyAV
decodes, whatever was asked (a decord that fails on the trial's frames, or yields a
picture that is not RGB at the asked size, loses to PyAV the same way). Where both can, the first frames to
be read are timed with each, pixels in hand, and the faster decodes the file; the result
is kept for the process, keyed by codec, pixel format, picture size, output size, thread
count and sampling density, so the next file of the same kind is not timed again.

The result is not kept on disk: timing costs about 0.1 s at 720p (at most about
``2 * TRIAL_ROUNDS * TRIAL_SECONDS``: a round stops at its first frame past the cap),
once per kind of video in a process, while a stored answer would outlive what changes
it: the machine's load (on a busy 2-core machine PyAV read 720p H.264 faster, on an idle
one decord), a library upgrade, another host.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from vstream.errors import VStreamError
from vstream.ingest.video import DecordDecoder, FileIndex, PyAVDecoder, as_array

log = logging.getLogger(__name__)

DECORD, PYAV = DecordDecoder.name, PyAVDecoder.name
TRIAL_FRAMES = 16  # frames each decoder reads in a trial round
TRIAL_WARMUP = 4  # of which the first are not counted: a decoder's frame threads fill up on them
TRIAL_ROUNDS = 2  # alternating rounds, each decoder's best counting: one slow spell of a busy machine does not decide
TRIAL_SECONDS = 0.1  # a round stops once past this, so a slow decode (4K, software AV1) still opens quickly
DECORD_MARGIN = 1.05  # decord must be this much faster to be chosen: PyAV never needs a fallback


@dataclass(frozen=True)
class DecoderChoice:
    """Which decoder reads a file's video, and how that was decided.

    Attributes:
        decoder: ``decord`` or ``pyav``.
        how: ``measured`` (both timed on this file's first frames to read), ``cached``
            (timed earlier in this process on video of the same kind), ``pinned``
            (``SourceConfig.decoder`` named it) or ``only`` (the other cannot read this
            file, or failed on it).
        rates: frames per second each decoder read the trial frames at, pixels in hand,
            its best round, not counting a round's first ``TRIAL_WARMUP`` frames (the
            decoder's start-up); empty unless measured or cached.
    """

    decoder: str
    how: str
    rates: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: ``pyav (measured: pyav 940 frames/s, decord 738 frames/s)``."""
        rates = ", ".join(f"{name} {rate:.0f} frames/s" for name, rate in self.rates.items())
        return f"{self.decoder} ({self.how}{': ' + rates if rates else ''})"


_CHOSEN: dict[tuple, DecoderChoice] = {}  # kind of video -> the measured choice, for the process


def open_video_decoder(uri: str, index: FileIndex, size: tuple[int, int], threads: int,
                       indices: Sequence[int] = (), choice: str = "auto"
                       ) -> tuple[DecordDecoder | PyAVDecoder, DecoderChoice]:
    """The decoder of ``uri``'s frames ``indices`` (ascending, the ones to be read) at
    ``size``, and how it was chosen: with ``choice`` ``auto``, the faster of decord and
    PyAV on the first ``TRIAL_FRAMES`` of ``indices`` (or the answer for the same kind
    of video earlier in the process); ``decord`` or ``pyav`` as named. PyAV whenever
    decord does not read the file as ``index`` says it is."""
    if choice == PYAV:
        return PyAVDecoder(uri, index, size, threads), DecoderChoice(PYAV, "pinned")
    trial = [int(i) for i in indices[:TRIAL_FRAMES]]
    dense = len(trial) > 1 and bool(np.all(np.diff(trial) == 1))
    kind = (index.codec, index.pixel_format, index.coded_size, size, threads, dense)
    chosen = _CHOSEN.get(kind) if choice == "auto" else None
    if chosen is not None and chosen.decoder == PYAV:
        # decord is not opened at all: its reader would index the whole file again (0.13 s an hour of video)
        return PyAVDecoder(uri, index, size, threads), chosen
    reader = _decord_reader(uri, index, size, threads)
    if reader is None:
        return PyAVDecoder(uri, index, size, threads), DecoderChoice(PYAV, "only")
    if choice == DECORD:
        return DecordDecoder(reader, uri, index, size, threads), DecoderChoice(DECORD, "pinned")
    if chosen is None:
        chosen = _measure(reader, uri, index, size, threads, trial)
        log.debug("decoder for %s %s %sx%s frames: %s, on %s", index.codec, index.pixel_format, *size,
                  chosen.describe(), uri)
        if chosen.how == "measured" and len(trial) == TRIAL_FRAMES:  # a short file's few frames say little
            _CHOSEN[kind] = replace(chosen, how="cached")
    if chosen.decoder == PYAV:
        return PyAVDecoder(uri, index, size, threads), chosen
    reader.seek(0)  # back from where a trial left it
    return DecordDecoder(reader, uri, index, size, threads), chosen


def _decord_reader(uri: str, index: FileIndex, size: tuple[int, int], threads: int):
    """A ``decord.VideoReader`` of ``uri`` at ``size``, at frame 0, or None where decord
    does not read the file with the frames and times of ``index`` (the reason logged).
    Its pictures are checked as they come (``DecordDecoder``), not decoded here: that
    cost a frame's decoding and a seek back on every open."""
    if index.declared_frames > 2 * len(index) + 16:
        # decord sizes its tables by the header: a damaged one claiming billions of frames
        # aborts the whole process (std::bad_alloc) where Python cannot catch it
        log.warning("%s: the header claims %d video frames, the file holds %d; decoding with PyAV", uri,
                    index.declared_frames, len(index))
        return None
    try:
        import decord

        reader = decord.VideoReader(uri, width=size[0], height=size[1], num_threads=threads)
        theirs = reader.get_frame_timestamp(range(len(reader)))[:, 0] if len(reader) else np.zeros(0)
    except Exception as e:  # decord refuses many containers with a bare RuntimeError
        log.debug("decord cannot read %s (%s); using PyAV", uri, e)
        return None
    if len(theirs) != len(index) or not np.allclose(theirs + index.video_start, index.times, atol=2e-3):
        log.debug("decord disagrees with the demuxer on the frames of %s; using PyAV", uri)
        return None
    return reader


def _measure(reader, uri: str, index: FileIndex, size: tuple[int, int], threads: int,
             trial: list[int]) -> DecoderChoice:
    """Time decord and PyAV on the ``trial`` frames, ``TRIAL_ROUNDS`` alternating rounds,
    and choose the faster: PyAV unless decord is ``DECORD_MARGIN`` times as fast."""
    if not trial:
        return DecoderChoice(DECORD, "only")  # nothing to read: the open reader will do
    decord = DecordDecoder(reader, uri, index, size, threads)
    pyav = PyAVDecoder(uri, index, size, threads)
    rates = {DECORD: 0.0, PYAV: 0.0}
    try:
        for _ in range(TRIAL_ROUNDS):
            for decoder in (decord, pyav):
                rates[decoder.name] = max(rates[decoder.name], _rate(decoder, trial))
                if decord.failed:  # decord's error, logged: PyAV took over the frames
                    return DecoderChoice(PYAV, "only")
    except VStreamError as e:  # PyAV cannot decode what decord can
        log.debug("PyAV failed on the first frames of %s (%s); using decord", uri, e)
        return DecoderChoice(DECORD, "only")
    finally:
        pyav.close()
        decord.close()  # its PyAV fallback, when decord failed; the reader is the caller's
    faster = DECORD if rates[DECORD] > DECORD_MARGIN * rates[PYAV] else PYAV
    return DecoderChoice(faster, "measured", {name: round(rate, 1) for name, rate in rates.items()})


def _rate(decoder: DecordDecoder | PyAVDecoder, trial: list[int]) -> float:
    """Frames per second ``decoder`` reads ``trial`` at, pixels copied out, not counting
    its first ``TRIAL_WARMUP`` frames (its frame threads fill up on them) unless ``trial``
    is shorter or ``TRIAL_SECONDS`` pass first (then all count: a decoder that slow needs
    no precision); it stops once past ``TRIAL_SECONDS``."""
    warmup = min(TRIAL_WARMUP, len(trial) - 1)
    began = now = time.perf_counter()
    counting_from, uncounted, n = began, 0, 0
    for n, (_, pixels) in enumerate(decoder.frames(trial), start=1):
        as_array(pixels)
        now = time.perf_counter()
        if now - began > TRIAL_SECONDS:
            break
        if n == warmup:
            counting_from, uncounted = now, n
    counted = n - uncounted
    return counted / (now - counting_from) if counted else 0.0
