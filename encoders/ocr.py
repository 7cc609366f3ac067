"""On-screen text: ``ScreenReader`` reads the text in a frame (PP-OCRv4 through RapidOCR
on onnxruntime, offline), and ``OCRWorker`` reads a stream's frames on a thread of its
own, only where the picture changed, into timed text segments.

Models. ``rapidocr-onnxruntime`` ships PP-OCRv4's detection and recognition networks as
ONNX files (Apache-2.0) and runs them on onnxruntime; nothing is fetched at run time.
Install it with ``pip install --no-deps rapidocr-onnxruntime`` (its metadata asks for the
full ``opencv-python``; ``opencv-python-headless`` is enough and is what vstream declares).

Which frames are read. Reading costs about half a second per frame on one core, so a
frame is read only when its picture changed: each frame is shrunk to a 32×32 grey
thumbnail, and a frame whose difference from the last picture is under
``OCRConfig.change`` (default 0.03 of full scale) is taken to show the same text. The
difference is the largest mean absolute difference over a 4×4 grid of blocks
(``picture_change``), not the mean over the whole frame: one slide following another
changes only the few blocks their text covers (0.016 over the frame, 0.08 in the
block that changed most). The
first frame is always read. Footage that changes all the time (a camera, a moving
shot) would still make every frame a new picture, so reads are at least
``min_interval`` seconds of stream apart (default 5): a picture that changes sooner
waits, and the newest picture is read once the interval is over.

Segments. A segment is one text on screen with the time span it stayed there: it opens
at the first frame that shows it and its end follows every later frame while the
picture is unchanged or is read as the same text, so identical text on consecutive
scenes is one segment (the same letters and digits, whatever the spaces, case and
punctuation OCR read). A frame with no legible text (or one the OCR fails on: it is
logged, never raised) closes the open segment. ``collect()`` hands out the segments
opened since the last call and the current end of the newest one (``ScreenText``).

Load. A file waits for the reader (``drop=False``: every scene is read); a live stream
keeps at most ``queue_frames`` changed frames waiting and drops the oldest beyond that,
counting them (``OCRStats.dropped``).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from vstream.config import JsonConfig, check_int, check_number, package_folder
from vstream.encoders.worker import QueueWorker
from vstream.errors import ConfigError, EncoderError
from vstream.types import Frame, TranscriptSegment

logger = logging.getLogger(__name__)

PACKAGE = "rapidocr_onnxruntime"
INSTALL = "pip install --no-deps rapidocr-onnxruntime (with onnxruntime, opencv-python-headless, pyclipper, shapely)"
_LETTERS = re.compile(r"[\W_]+")


def available() -> bool:
    """Whether the OCR package and what it runs on are installed (nothing is imported)."""
    return all(package_folder(name) is not None for name in (PACKAGE, "onnxruntime", "cv2"))


@dataclass
class OCRConfig(JsonConfig):
    """Reading the text on screen.

    Attributes:
        min_score: recognition confidence below which a line is left out (default 0.6);
            a line with fewer than two letters or digits is left out too.
        change: difference (0-1, ``picture_change``) of 32×32 grey thumbnails above
            which a frame counts as a new picture and is read (default 0.03).
        min_interval: seconds of stream between two reads at least (default 5.0).
        max_side: frames larger than this many pixels on their longer side are shrunk
            to it first (default 1280).
        threads: onnxruntime threads (default 1).
        queue_frames: changed frames a live stream keeps waiting (default 8).
    """

    min_score: float = 0.6
    change: float = 0.03
    min_interval: float = 5.0
    max_side: int = 1280
    threads: int = 1
    queue_frames: int = 8

    def __post_init__(self) -> None:
        check_number("OCRConfig", "min_score", self.min_score, 0.0, 1.0, include_low=True)
        check_number("OCRConfig", "change", self.change, 0.0, 1.0, include_low=True)
        check_number("OCRConfig", "min_interval", self.min_interval, 0.0, include_low=True)
        check_int("OCRConfig", "max_side", self.max_side, 32)
        check_int("OCRConfig", "threads", self.threads, 1)
        check_int("OCRConfig", "queue_frames", self.queue_frames, 1)


class ScreenReader:
    """The text in a frame, as one string: its lines top to bottom, left to right,
    joined by ``" / "``; ``""`` when nothing legible is there.

    Raises (on construction):
        EncoderError: ``rapidocr_onnxruntime`` (or what it needs) is not installed.
    """

    def __init__(self, config: OCRConfig | None = None):
        self.config = config if config is not None else OCRConfig()
        if not isinstance(self.config, OCRConfig):
            raise ConfigError(f"ScreenReader: config must be an OCRConfig, got {type(self.config).__name__}")
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise EncoderError(f"reading on-screen text needs {PACKAGE!r}, which cannot be imported ({exc}): "
                               f"{INSTALL}") from None
        threads = self.config.threads
        self._engine = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=threads)
        self._lock = threading.Lock()  # one frame at a time through the sessions

    def read(self, image: np.ndarray) -> str:
        """``image`` ``[H, W, 3]`` uint8 RGB -> its text (``""`` if none, or if the OCR fails)."""
        side = self.config.max_side
        if max(image.shape[:2]) > side:
            scale = side / max(image.shape[:2])
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        try:
            with self._lock:
                found, _ = self._engine(np.ascontiguousarray(image[:, :, ::-1]))  # the engine takes BGR
        except Exception:  # a frame the OCR chokes on has no text; the stream goes on
            logger.warning("OCR failed on a %sx%s frame; it counts as having no text", *image.shape[:2],
                           exc_info=True)
            return ""
        lines = [(box, text.strip()) for box, text, score in found or []
                 if score >= self.config.min_score and sum(c.isalnum() for c in text) >= 2]  # not a lone mark
        # top to bottom by each box's top edge (rows within half a line height), then left to right
        lines.sort(key=lambda line: (round(min(y for _, y in line[0]) / 16), min(x for x, _ in line[0])))
        return " / ".join(text for _, text in lines)


@dataclass
class OCRStats:
    """Frames seen, read (their picture changed) and dropped (a live backlog)."""

    frames: int = 0
    read: int = 0
    dropped: int = 0


@dataclass
class ScreenText:
    """What ``OCRWorker.collect`` hands out: ``previous_end``, the current end (seconds)
    of the newest segment handed out before (None if none: it may have grown since), and
    ``segments``, those opened since, in time order, each with its end as of now."""

    segments: list[TranscriptSegment] = field(default_factory=list)
    previous_end: float | None = None


class _Picture:
    """One changed frame and how long its picture stayed: ``start`` and ``end`` seconds."""

    def __init__(self, t: float):
        self.start = self.end = t


class _Text:
    """A text on screen: from ``start`` to the end of ``picture``, the last picture showing it."""

    def __init__(self, text: str, picture: _Picture):
        self.text, self.start, self.picture = text, picture.start, picture

    def segment(self) -> TranscriptSegment:
        return TranscriptSegment(self.start, self.picture.end, self.text)


def same_text(a: str, b: str) -> bool:
    """Whether two readings are of the same text: OCR may drop or add a space, or change
    case and punctuation, between two pictures of one slide."""
    return _LETTERS.sub("", a).casefold() == _LETTERS.sub("", b).casefold()


def thumbnail(image: np.ndarray) -> np.ndarray:
    """``[32, 32]`` float32 grey levels in [0, 1]: what the change test compares."""
    return np.asarray(Image.fromarray(image).convert("L").resize((32, 32), Image.BOX), np.float32) / 255.0


def picture_change(a: np.ndarray, b: np.ndarray) -> float:
    """How much the picture changed between two ``thumbnail``s: the largest mean absolute
    difference of the 16 blocks of a 4×4 grid (0-1)."""
    difference = np.abs(a - b).reshape(4, 8, 4, 8)
    return float(difference.mean(axis=(1, 3)).max())


class OCRWorker(QueueWorker):
    """Reads the text of a stream's changed frames on a thread (``vstream-ocr-<n>``); see
    the module docstring. ``submit`` is called with every frame in time order; an error
    on the thread is raised by the next call."""

    def __init__(self, reader: ScreenReader, drop: bool = True):
        self.reader = reader
        self._lock = threading.Lock()  # guards the pictures' ends, the texts and the stats
        self._stats = OCRStats()
        self._previous: np.ndarray | None = None  # thumbnail of the newest picture
        self._picture: _Picture | None = None  # the newest picture: unchanged frames extend it
        self._waiting: tuple[np.ndarray, _Picture] | None = None  # a new picture too soon after the last read
        self._last_read = -math.inf  # stream time of the newest picture queued for reading
        self._open: _Text | None = None  # the text of the newest picture read, if any
        self._new: list[_Text] = []  # texts opened since the last collect
        self._handed: _Text | None = None  # the newest text collect handed out
        super().__init__(reader.config.queue_frames, drop, "vstream-ocr")

    def submit(self, frame: Frame) -> None:
        """Note ``frame`` (frames come in time order); queue it for reading if its picture changed."""
        self._raise()
        if self._closed:
            raise EncoderError("OCRWorker.submit after close()")  # before the frame is counted
        small = thumbnail(frame.image)
        changed = self._previous is None or picture_change(small, self._previous) > self.reader.config.change
        with self._lock:
            self._stats.frames += 1
            if changed:
                self._picture = _Picture(frame.t)
                self._waiting = (frame.image, self._picture)
            else:
                self._picture.end = frame.t
        if changed:
            self._previous = small
        if self._waiting is not None and frame.t - self._last_read >= self.reader.config.min_interval:
            self._read_waiting()

    def _read_waiting(self) -> None:
        """Queue the waiting picture for reading."""
        image, picture = self._waiting
        self._waiting, self._last_read = None, picture.start
        evicted = self._put((image, picture))
        if evicted is not None:
            with self._lock:
                self._stats.dropped += 1

    def collect(self) -> ScreenText:
        """What was read since the last call (see ``ScreenText``)."""
        self._raise()
        with self._lock:
            previous_end = self._handed.picture.end if self._handed is not None else None
            segments = [text.segment() for text in self._new]
            if self._new:
                self._handed, self._new = self._new[-1], []
            return ScreenText(segments, previous_end)

    @property
    def stats(self) -> OCRStats:
        with self._lock:
            return replace(self._stats)

    def close(self, flush: bool = True, timeout: float | None = None) -> None:
        """Stop the thread: read the frames waiting (``flush``, the newest picture too
        even when its interval is not over), or drop them."""
        if flush and not self._closed and self._waiting is not None:
            self._read_waiting()
        super().close(flush, timeout)

    def _handle(self, item: tuple[np.ndarray, _Picture]) -> None:
        image, picture = item
        self._take(self.reader.read(image), picture)

    def _take(self, text: str, picture: _Picture) -> None:
        """The text read on a changed ``picture``: the open text goes on, or a new one opens."""
        with self._lock:
            self._stats.read += 1
            if not text:
                self._open = None
            elif self._open is not None and same_text(self._open.text, text):
                self._open.picture = picture
            else:
                self._open = _Text(text, picture)
                self._new.append(self._open)
