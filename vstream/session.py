"""``Session``: one stream's memories, fed and asked at the same time.

Frames and audio arrive by ``push_frame`` / ``push_audio`` (from the caller, or from a
source the session reads itself on a thread: ``start_source``, ``ingest``) into one
bounded queue. A writer thread takes them in batches: frames through the frame
encoder into the visual memory (``StarMemory``), audio to the speech recogniser on its
own thread, finished transcript segments through the text embedder into the
transcript memory.

A question never waits for the backlog and never stops the writer: ``ask`` takes a
snapshot under a lock the writer holds only while it writes one batch into the
memories (milliseconds): the memory's tokens (a copy, cached per memory version) and
the transcript lines retrieved for the question. Generation then runs on the snapshot
with no lock of the session held. The model is shared by any number of sessions and
generates one answer at a time.

When the queue is full, a live push evicts the oldest waiting frame (counted in
``stats``); a file read by ``ingest`` waits instead, so no frame of a file is lost.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from vstream.config import JsonConfig, check_choice, check_int, check_number
from vstream.device import DTYPES, check_device
from vstream.encoders import FrameEncoder, create_encoder
from vstream.encoders.batching import BatchingConfig, BatchingEncoder
from vstream.encoders.pixels import main_colour
from vstream.errors import ConfigError, MemoryStateError, VStreamError
from vstream.ingest import FileSource, open_source, probe
from vstream.ingest.queue import Closed, ItemQueue
from vstream.memory import BankConfig, FlashConfig, FlashMemory, MemoryTokens, StarConfig, StarMemory
from vstream.memory.bank import encode_thumbnails
from vstream.memory.persist import read_json, write_json
from vstream.models import (
    Answer,
    AnswerStream,
    ChatModel,
    Context,
    GenerationConfig,
    describe_order,
    describe_scenes,
    load_model,
)
from vstream.models.prompt import FRAME
from vstream.types import AudioChunk, Frame, TranscriptSegment

logger = logging.getLogger(__name__)
RECOGNISERS = {"_asr_worker": "speech recognition", "_ocr_worker": "reading the screen"}  # worker -> what it does
_END = object()  # queued after a source's last item: flush the recogniser


SURE_LABEL = 0.3
"""Probability from which a frame's best label marks a new span of the shown memory."""
TIMED_TEXT = ("transcript", "screen", "shown")
"""The session's timed-text memories (attributes of that name): what was said, written on
screen, and recognised by the frame encoder."""
CAPTION_CACHE = 4096
"""Distinct view captions whose embeddings a session keeps."""
PLAIN_COLOURS = ("black", "grey", "white")
"""Main colours the shown memory does not name: a dark, grey or white frame is most of
what a camera sees, and "mostly grey" lines crowd out what was recognised."""


@dataclass
class SessionConfig(JsonConfig):
    """Settings of a ``Session``.

    Attributes:
        fps: frames sampled per second from a source the session reads (default 1.0).
        asr: transcribe audio (default True).
        encoder: frame encoder when the model brings no vision tower: ``"auto"``
            (default: ``"imagenet"`` when its weights are installed, else ``"pixels"``),
            ``"imagenet"`` (MobileNetV2 with ImageNet labels, whose words go into the
            scene notes), ``"pixels"`` (colours, no weights), a vision model's hub id or
            folder, or a registered encoder
            with its fields in one string (``"biglittle:big=...,little=...,keep_ratio=0.25"``).
        ocr: read the text on screen (PP-OCRv4, offline) where the picture changes, into
            a screen-text memory searched with every question: True, False, or ``"auto"``
            (default: when the OCR package is installed).
        heads: model heads attached when the session loads its model by name, each a
            spec string (``"visual_experts:weights=experts/"``); a loaded ``ChatModel``
            comes with its own.
        scene_lines: views described per question when the model reads the visual
            memory in words (default 12): the views whose words best match the question
            (half of them at most), then the views on screen longest, in time order; the
            notes are read before every first token, so their number is fixed.
        transcript_lines: transcript lines retrieved per question (default 8).
        screen_lines: on-screen texts retrieved per question (default 4).
        shown_lines: spans of what the frame encoder recognised (its labels, such as
            ImageNet classes) retrieved per question (default 4).
        transcript_floor: retrieved lines (transcript, screen text, what was seen) whose
            similarity to the question is under this fraction of the best line's among
            them all are left out (default 0.5; 0 keeps all), so a clear match is not
            drowned among weak ones; a window's own lines still fill in for a question
            about a window.
        device: where the model, the frame encoder and the memory run (``vstream.device``):
            ``"auto"`` (default: CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
            A model or encoder passed in loaded stays where it is.
        dtype: the model's precision: ``"auto"`` (default: float16 on CUDA, float32 on
            the CPU), ``"float32"``, ``"float16"``, ``"bfloat16"``.
        bank_disk_gb: GiB of disk the memory's frame bank may take (``BankConfig.disk_gb``);
            None (default) keeps the memory config's (4); 0: no cap.
        batch_frames: frames encoded and written per batch (default 8).
        queue_frames: frames and audio chunks waiting for the writer (default 64);
            beyond that a live push drops the oldest frame.
        generation: how answers are generated (``GenerationConfig``).
    """

    fps: float = 1.0
    asr: bool = True
    encoder: str = "auto"
    ocr: bool | str = "auto"
    heads: list[str] = field(default_factory=list)
    scene_lines: int = 12
    transcript_lines: int = 8
    screen_lines: int = 4
    shown_lines: int = 4
    transcript_floor: float = 0.5
    device: str = "auto"
    dtype: str = "auto"
    bank_disk_gb: float | None = None
    batch_frames: int = 8
    queue_frames: int = 64
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self) -> None:
        self.generation = GenerationConfig.from_dict(self.generation)
        check_number("SessionConfig", "fps", self.fps, 0.0)
        if not (isinstance(self.heads, (list, tuple)) and all(isinstance(h, str) for h in self.heads)):
            raise ConfigError(f"SessionConfig.heads must be a list of head specs, got {self.heads!r}")
        self.heads = list(self.heads)
        check_number("SessionConfig", "transcript_floor", self.transcript_floor, 0.0, 1.0, include_low=True)
        check_device("SessionConfig.device", self.device)
        check_choice("SessionConfig", "dtype", self.dtype, ("auto", *DTYPES))
        if self.bank_disk_gb is not None:
            check_number("SessionConfig", "bank_disk_gb", self.bank_disk_gb, 0.0, include_low=True)
        if not (isinstance(self.ocr, bool) or self.ocr == "auto"):
            raise ConfigError(f"SessionConfig.ocr must be True, False or 'auto', got {self.ocr!r}")
        for name in ("scene_lines", "transcript_lines", "screen_lines", "shown_lines", "batch_frames", "queue_frames"):
            check_int("SessionConfig", name, getattr(self, name), 1)


@dataclass
class SessionStats:
    """Counters of a session, readable at any time.

    Attributes:
        frames_in: frames pushed (or read from the source).
        frames_dropped: frames dropped because the writer fell behind.
        frames_processed: frames in the visual memory.
        audio_seconds: seconds of audio pushed.
        audio_dropped: seconds of audio dropped (the writer's queue or the recogniser's).
        transcript_segments: lines in the transcript memory.
        screen_segments: texts in the screen-text memory.
        shown_segments: spans of one recognised content (the encoder's labels).
        ocr_frames: frames whose picture changed and were read for text.
        ocr_dropped: changed frames not read because the reader fell behind a live source.
        memory_tokens: tokens the visual memory reads out as.
        lag_seconds: stream seconds between the newest item pushed and the newest
            frame in the memory.
        last_t: time of the newest frame in the memory, seconds.
        questions: questions asked.
        source_error: why the source the session read stopped, if it failed.
        recognition_error: why speech recognition or OCR stopped for this session, if
            one failed (the stream goes on without it).
    """

    frames_in: int = 0
    frames_dropped: int = 0
    frames_processed: int = 0
    audio_seconds: float = 0.0
    audio_dropped: float = 0.0
    transcript_segments: int = 0
    screen_segments: int = 0
    shown_segments: int = 0
    ocr_frames: int = 0
    ocr_dropped: int = 0
    memory_tokens: int = 0
    lag_seconds: float = 0.0
    last_t: float = 0.0
    questions: int = 0
    source_error: str | None = None
    recognition_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def star_config_for(grid: int) -> StarConfig:
    """The default STAR layout, with grids no finer than an encoder's ``grid``."""
    base = min(8, grid)
    return StarConfig(base_grid=base, spatial_grid=base, temporal_grid=min(4, base), retrieved_grid=base,
                      bank=BankConfig(grid=base))


class Session:
    """A stream's memories, fed and asked concurrently (see the module docstring).

    Args:
        model: a loaded ``ChatModel`` (may be shared by many sessions), a hub id or
            folder, or None for the embedded SmolLM2-135M-Instruct.
        config: ``SessionConfig``.
        encoder: a frame encoder to use (and share with other sessions) instead of
            building ``config.encoder``; with a model that brings its own tower, that
            tower (or a wrapper of it, such as a server's ``BatchingEncoder``).
        screen_reader: a ``ScreenReader`` to share with other sessions (it reads one
            frame at a time) instead of loading one when the session first reads text.
    """

    def __init__(self, model: ChatModel | str | None = None, config: SessionConfig | None = None,
                 encoder: FrameEncoder | None = None, screen_reader=None):
        self.config = config or SessionConfig()
        self.model, self.encoder = model_and_encoder(model, self.config, encoder)
        memory_config = self.model.memory_config() or star_config_for(self.encoder.grid)
        memory_config = replace(memory_config, bank=replace(memory_config.bank, **self._bank_settings()))
        # the policy the model reads: STAR (with the checkpoint's abstract attention) or Flash
        self.memory = (FlashMemory(memory_config) if isinstance(memory_config, FlashConfig)
                       else StarMemory(memory_config, attention=self.model.memory_attention()))
        self.transcript = self.screen = self.shown = None  # what was said; text on screen; what was recognised
        self._shown_open: TranscriptSegment | None = None  # the labels of the newest frames, still on screen
        self._shown_key: tuple | None = None  # its best label and main colour: what a run shares
        self._text = self._asr = self._asr_worker = self._ocr_worker = None
        self._failed_workers: set[str] = set()  # "_asr_worker", "_ocr_worker": failed, not started again
        self._caption_vectors: dict[str, torch.Tensor] = {}  # views' words, embedded once
        self._ocr = screen_reader
        self._reading_file = False  # a file read at the writer's pace: the OCR reads every changed frame
        self._reads_screen = reads_screen(self.config)
        self._stats = SessionStats()
        self._newest = 0.0  # time of the newest item pushed
        self._last_frame_t = -math.inf  # time of the newest frame pushed: the memory takes frames in order
        self._queue = ItemQueue(self.config.queue_frames, drop=True)
        self._write_lock = threading.Lock()  # held while one batch is written, and while a snapshot is taken
        self._stats_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._source = self._reader = None
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="vstream-session-writer", daemon=True)
        self._writer.start()

    # -- feeding --------------------------------------------------------------------------

    def push_frame(self, frame: Frame, wait: bool = False, evict: bool = True) -> bool:
        """Queue a frame for the memory; True when it was queued with nothing lost.

        When the queue is full: with ``wait``, wait for room; otherwise the oldest
        waiting frame is dropped (counted) to make room and False returned, or, with
        ``evict=False``, this frame is refused instead (not taken, nothing dropped or
        counted; push it again later) and False returned. A frame earlier than the
        previous one is refused (``MemoryStateError``) here, not when its batch is
        written."""
        if not isinstance(frame, Frame):
            raise ConfigError(f"push_frame takes a vstream.Frame, got {type(frame).__name__}")
        if self._closed:
            raise VStreamError("the session is closed")
        with self._stats_lock:
            check_time_order(frame.t, self._last_frame_t)
            if not (wait or evict or self._offer(frame)):
                return False
            self._last_frame_t = frame.t
            self._stats.frames_in += 1
            self._newest = max(self._newest, frame.t)
        return self._put(frame, wait) if wait or evict else True

    def push_audio(self, chunk: AudioChunk, wait: bool = False, evict: bool = True) -> bool:
        """Queue audio for the recogniser (ignored when the session's ``asr`` is off);
        ``wait`` and ``evict`` as for ``push_frame``."""
        if not isinstance(chunk, AudioChunk):
            raise ConfigError(f"push_audio takes a vstream.AudioChunk, got {type(chunk).__name__}")
        if not self.config.asr:
            return True
        with self._stats_lock:
            if not (wait or evict or self._offer(chunk)):
                return False
            self._stats.audio_seconds += chunk.duration
            self._newest = max(self._newest, chunk.end)
        return self._put(chunk, wait) if wait or evict else True

    def _offer(self, item) -> bool:
        if self._closed:
            raise VStreamError("the session is closed")
        try:
            taken = self._queue.offer(item)
        except Closed:
            raise VStreamError("the session is closed") from None
        if taken:
            self._idle.clear()
        return taken

    def _put(self, item, wait: bool) -> bool:
        if self._closed:
            raise VStreamError("the session is closed")
        try:
            evicted = self._queue.put(item, wait=wait)
        except Closed:
            raise VStreamError("the session is closed") from None
        self._idle.clear()  # after the put: the writer sets it again once the queue is empty
        if evicted is not None:
            self._count_drop(evicted)
        return evicted is None

    def _count_drop(self, item) -> None:
        with self._stats_lock:
            if isinstance(item, Frame):
                self._stats.frames_dropped += 1
            elif isinstance(item, AudioChunk):
                self._stats.audio_dropped += item.duration

    def start_source(self, uri: str, **settings) -> None:
        """Read ``uri`` (file, URL, camera, ``-``) on a thread of its own, at
        ``config.fps``. A file is read as fast as the writer takes it, nothing dropped;
        a live source drops frames when the writer falls behind."""
        if self._reader is not None and self._reader.is_alive():
            raise ConfigError("this session already reads a source; close it first")
        settings.setdefault("fps", self.config.fps)
        settings.setdefault("audio", self.config.asr)
        self._source = open_source(uri, **settings)
        wait = isinstance(self._source, FileSource) and not settings.get("realtime", False)
        self._reading_file = wait
        self._idle.clear()  # the writer sets it once the reader has ended and the queue is empty
        self._reader = threading.Thread(target=self._read_loop, args=(self._source, wait),
                                        name="vstream-session-reader", daemon=True)
        self._reader.start()

    @classmethod
    def from_source(cls, uri: str, model: ChatModel | str | None = None, config: SessionConfig | None = None,
                    encoder: FrameEncoder | None = None, **settings) -> Session:
        """A new session already reading ``uri`` (``start_source(uri, **settings)``); a
        source that cannot be opened closes the session and raises."""
        session = cls(model, config, encoder)
        try:
            session.start_source(uri, **settings)
        except BaseException:
            session.close()
            raise
        return session

    def _read_loop(self, source, wait: bool) -> None:
        try:
            with source:
                for item in source:
                    if self._closed:
                        return
                    (self.push_frame if isinstance(item, Frame) else self.push_audio)(item, wait=wait)
        except VStreamError as exc:
            if not self._closed:
                logger.warning("source stopped: %s", exc)
                with self._stats_lock:
                    self._stats.source_error = str(exc)
        finally:
            if not self._closed:
                self._queue.finish(_END)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the source (if any) has ended and everything queued is in the
        memories, the recogniser flushed. Returns False on timeout."""
        reader = self._reader
        if reader is not None:  # it queues the end marker itself when the source ends
            reader.join(timeout)
            if reader.is_alive():
                return False
        elif not self._idle.is_set() or self._asr_worker is not None:
            self._queue.finish(_END)  # pushed items: the recogniser decodes what it holds
            self._idle.clear()
        return self._idle.wait(timeout)

    def ingest(self, path: str, progress: bool = True) -> SessionStats:
        """Read the whole file at ``path`` into the memories (blocking), with a progress
        bar of stream seconds, frames, audio seconds and speed."""
        info = probe(path)
        started = time.perf_counter()
        self.start_source(path, video=info.video is not None, audio=self.config.asr and info.audio is not None)
        with tqdm(total=round(info.duration or 0.0, 1) or None, unit="s", disable=not progress, desc="ingesting",
                  bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s {postfix}") as bar:
            while not self.wait(timeout=0.2):
                stats = self.stats
                elapsed = time.perf_counter() - started
                bar.update(max(0.0, round(self._newest, 1) - bar.n))
                bar.set_postfix_str(f"{stats.frames_processed} frames, {stats.audio_seconds:.0f} s audio, "
                                    f"{self._newest / max(elapsed, 1e-9):.1f}x real time")
            bar.update(max(0.0, round(self._newest, 1) - bar.n))
        stats = self.stats
        if stats.source_error:
            raise VStreamError(f"{path}: {stats.source_error}")
        return stats

    # -- the writer -----------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=0.1)]
            except TimeoutError:
                self._collect_transcript()
                if len(self._queue) == 0 and (self._reader is None or not self._reader.is_alive()):
                    self._idle.set()
                continue
            except Closed:
                return
            while len(batch) < self.config.batch_frames and len(self._queue):
                try:
                    batch.append(self._queue.get(timeout=0))
                except (TimeoutError, Closed):
                    break
            try:
                self._write(batch)
            except Exception:  # a bad batch must not stop the stream
                logger.exception("writing a batch into the memory failed; the batch is dropped")
                for item in batch:
                    self._count_drop(item)

    def _write(self, batch: list) -> None:
        frames = [item for item in batch if isinstance(item, Frame)]
        for item in batch:
            if isinstance(item, AudioChunk) and not self._submit("_asr_worker", item):
                self._count_drop(item)
        if frames and self._reads_screen:
            for frame in frames:
                self._submit("_ocr_worker", frame)
        if frames:
            features = self.encoder.encode([f.image for f in frames])
            # thumbnails are made here, outside the lock a question waits on
            thumbnails = encode_thumbnails([f.image for f in frames], self.memory.config.bank)
            with self._write_lock:
                self.memory.extend(features, [f.t for f in frames], thumbnails=thumbnails)
            labels = getattr(self.encoder, "labels", None)  # words for what a frame shows, where the encoder has them
            if labels is not None:
                self._add_shown(frames, labels(features))
            with self._stats_lock:
                self._stats.frames_processed += len(frames)
                self._stats.last_t = frames[-1].t
        ended = any(item is _END for item in batch)
        for name in RECOGNISERS:
            if ended and getattr(self, name) is not None:
                try:
                    getattr(self, name).close()  # finish what is held
                except Exception as exc:  # noqa: BLE001 - the recogniser failed: the stream goes on without it
                    self._stop_recognising(name, exc)
        self._collect_transcript()
        if ended:
            self._asr_worker = self._ocr_worker = self._reader = None

    def _recogniser(self):
        if self._asr_worker is None:
            from vstream.encoders.asr import ASRWorker, WhisperASR

            self._asr = self._asr or WhisperASR()
            self._asr_worker = ASRWorker(self._asr, drop=False)  # the session's queue is where drops happen
        return self._asr_worker

    def _screen_reader(self):
        if self._ocr_worker is None:
            from vstream.encoders.ocr import OCRWorker, ScreenReader

            self._ocr = self._ocr or ScreenReader()
            self._ocr_worker = OCRWorker(self._ocr, drop=not self._reading_file)
        return self._ocr_worker

    def _collect_transcript(self) -> None:
        try:
            if self._asr_worker is not None:
                self.add_transcript(self._asr_worker.segments())
        except Exception as exc:  # noqa: BLE001 - the recogniser failed: the stream goes on without speech
            self._stop_recognising("_asr_worker", exc)
        try:
            if self._ocr_worker is not None:
                self.add_screen_text(self._ocr_worker.collect())
                stats = self._ocr_worker.stats
                with self._stats_lock:
                    self._stats.ocr_frames, self._stats.ocr_dropped = stats.read, stats.dropped
        except Exception as exc:  # noqa: BLE001 - as above, without the text on screen
            self._stop_recognising("_ocr_worker", exc)

    def _submit(self, worker: str, item) -> bool:
        """Hand ``item`` to the recogniser ``worker`` (``_asr_worker``: audio, started on
        first use; ``_ocr_worker``: frames); False when that recogniser has failed."""
        if worker in self._failed_workers:
            return False
        try:
            (self._recogniser() if worker == "_asr_worker" else self._screen_reader()).submit(item)
        except Exception as exc:  # noqa: BLE001 - it failed on an earlier item: the stream goes on without it
            self._stop_recognising(worker, exc)
            return False
        return True

    def _stop_recognising(self, worker: str, exc: Exception) -> None:
        """The recogniser ``worker`` failed: log it, say so in the stats, go on without it."""
        what = RECOGNISERS[worker]
        logger.error("%s stopped for this stream: %s: %s", what, type(exc).__name__, exc)
        self._failed_workers.add(worker)
        failed = getattr(self, worker)
        setattr(self, worker, None)
        try:
            failed.close(flush=False)
        except Exception:  # noqa: BLE001, S110 - the error it re-raises is the one being reported
            pass
        with self._stats_lock:
            self._stats.recognition_error = f"{what}: {type(exc).__name__}: {exc}"

    def add_transcript(self, segments) -> None:
        """Add transcript segments (``TranscriptSegment``, in time order)."""
        self._add_timed("transcript", [s for s in segments if s.text])

    def add_screen_text(self, screen) -> None:
        """Add what an ``OCRWorker`` read (``ScreenText``): stretch the newest text to its
        current end, then add the texts opened since."""
        self._add_timed("screen", screen.segments, screen.previous_end)

    def _add_timed(self, name: str, segments: list, previous_end: float | None = None) -> None:
        """Into the timed-text memory ``name`` (``transcript``, ``screen``, ``shown``; made on
        first use): stretch its newest segment to ``previous_end`` when given, then add
        ``segments`` with their embeddings, and count them in ``stats.<name>_segments``."""
        from vstream.memory.transcript import TranscriptMemory

        embeddings = self.text.encode([s.text for s in segments]) if segments else None
        with self._write_lock:
            texts = getattr(self, name)
            if previous_end is not None and texts is not None and len(texts):
                texts.stretch_last(previous_end)
            if embeddings is not None:
                if texts is None:
                    texts = TranscriptMemory(self.text.dim)
                    setattr(self, name, texts)
                texts.extend(segments, embeddings)
        if segments:
            with self._stats_lock:
                setattr(self._stats, f"{name}_segments", len(texts))

    def _add_shown(self, frames: list[Frame], labels: list[list[tuple[str, float]]]) -> None:
        """Keep what the encoder recognised as timed text: one segment per run of frames
        with the same confident best label (probability at least ``SURE_LABEL``) and the
        same main colour, since weak labels flicker between frames of one scene. The
        text is the first frame's labels (``"espresso"``, ``"domestic cat, tabby cat"``),
        and its main colour (``main_colour``) when no label is confident and the colour
        is not a plain one (``PLAIN_COLOURS``): ``"mostly magenta"``, ``"digital clock,
        mostly blue"``. ImageNet has no label for a plain screen, and "when did the
        screen turn red?" is asked; on a recognised photo the colour would only be
        noise to the retrieval."""
        new, stretch = [], None  # segments opened in this batch; the new end of one already kept
        for frame, found in zip(frames, labels):
            colour = main_colour(frame.image)
            colour = None if colour in PLAIN_COLOURS else colour
            sure = found[0][0] if found and found[0][1] >= SURE_LABEL else None
            key = (sure, colour)
            words = [name for name, _ in found] + ([f"mostly {colour}"] if colour and sure is None else [])
            if words and self._shown_open is not None and key == self._shown_key:
                self._shown_open = replace(self._shown_open, end=frame.t)
                if new:
                    new[-1] = self._shown_open
                else:
                    stretch = frame.t
            elif words:
                self._shown_open, self._shown_key = TranscriptSegment(frame.t, frame.t, ", ".join(words)), key
                new.append(self._shown_open)
            else:
                self._shown_open = None
        self._add_timed("shown", new, stretch)

    @property
    def text(self):
        """The text embedder, loaded on first use."""
        if self._text is None:
            from vstream.encoders.text import TextEmbedder

            self._text = TextEmbedder()
        return self._text

    # -- asking ---------------------------------------------------------------------------

    def context(self, question: str, start: float | None = None, end: float | None = None) -> Context:
        """A snapshot of what the model reads for ``question``, within ``[start, end]``
        seconds when given."""
        searched = any(getattr(self, name) is not None for name in TIMED_TEXT)
        query = self.text.encode([question])[0] if searched else None
        with self._write_lock:
            memory = self.memory.tokens() if self.model.reads_memory_tokens else None
            timeline = None if self.model.reads_memory_tokens else self.memory.timeline(means=True)
            transcript, screen, shown = self._relevant([
                self._retrieve(self.transcript, self.config.transcript_lines, query, start, end),
                self._retrieve(self.screen, self.config.screen_lines, query, start, end),
                self._retrieve(self.shown, self.config.shown_lines, query, start, end)])
            duration = self.memory.last_t if len(self.memory) else 0.0
        if memory is not None:
            return Context(memory=_within(memory, start, end), transcript=transcript, screen=screen, shown=shown,
                           duration=duration)
        timeline = [within for scene in timeline if (within := scene.within(start, end)) is not None]
        describe = getattr(self.encoder, "describe", None)  # words for the features, where the encoder has them
        captions = describe(torch.stack([scene.mean for scene in timeline]).numpy()) if describe and timeline else None
        if captions is not None:  # a view the encoder recognised nothing in is noise to a small model
            named = [i for i, caption in enumerate(captions) if caption]
            timeline, captions = [timeline[i] for i in named], [captions[i] for i in named]
        chosen = self._noted(timeline, captions, question, query)
        scenes = describe_scenes([timeline[i] for i in chosen], self.config.fps,
                                 captions=None if captions is None else [captions[i] for i in chosen])
        asked = [i for i in chosen if captions and _names(question, captions[i])]
        order = describe_order([timeline[i] for i in asked], [captions[i] for i in asked]) if asked else None
        scenes += [order] if order else []
        return Context(scenes=scenes, transcript=transcript, screen=screen, shown=shown, duration=duration)

    def _noted(self, timeline: list, captions: list[str] | None, question: str, query) -> list[int]:
        """Which of the ``timeline``'s views the scene notes describe, at most
        ``scene_lines``, in the order given: up to half of them the views whose
        ``captions`` best match the question (a two-second needle is light, but it is
        what "when was the red screen shown?" asks about), the rest the heaviest views."""
        limit = self.config.scene_lines
        if len(timeline) <= limit:
            return list(range(len(timeline)))
        chosen: list[int] = []
        if captions:
            query = self.text.encode([question])[0] if query is None else query
            similarity = (self._embed_captions(captions) @ query).tolist()
            best = max(similarity)
            matching = sorted((i for i, score in enumerate(similarity) if score >= self.config.transcript_floor * best),
                              key=lambda i: -similarity[i])
            chosen = matching[:limit // 2]
        heaviest = sorted((i for i in range(len(timeline)) if i not in chosen), key=lambda i: -timeline[i].frames)
        return sorted(chosen + heaviest[:limit - len(chosen)])

    def _embed_captions(self, captions: list[str]) -> torch.Tensor:
        """``[n, dim]`` embeddings of views' ``captions``, each caption embedded once: a
        stream's views have few distinct words, and embedding 25 of them per question
        costs more than the rest of retrieval."""
        known = self._caption_vectors
        new = [caption for caption in dict.fromkeys(captions) if caption not in known]
        if new:
            if len(known) + len(new) > CAPTION_CACHE:
                known.clear()
            known.update(zip(new, self.text.encode(new)))
        return torch.stack([known[caption] for caption in captions])

    def _retrieve(self, texts, k: int, query, start, end) -> list:
        """The ``k`` lines of the timed-text memory ``texts`` (transcript, screen or shown)
        best matching ``query``, as ``(segment, score)``, best first, one per distinct
        text (a slide shown fifteen times is one line, its best match: repeats would
        outvote a single strong match); within ``[start, end]`` when given, where the
        window's own lines (score None) fill in when too few match."""
        if texts is None or query is None:
            return []
        hits = [(hit.segment, hit.score) for hit in texts.search(query, 4 * k)
                if start is None and end is None or _overlaps(hit.segment.start, hit.segment.end, start, end)]
        hits = _distinct(hits, k)
        if (start is not None or end is not None) and len(hits) < k:  # the window's own lines, newest first
            inside = texts.between(start if start is not None else 0.0, end if end is not None else float("inf"))
            hits = _distinct(hits + [(s, None) for s in reversed(inside)], k)
        return hits

    def _relevant(self, retrieved: list[list]) -> list[list]:
        """Each list of ``retrieved`` lines without those whose similarity is under
        ``transcript_floor`` of the best line's among all of them (transcript, screen
        text and what was seen alike); a window's own lines are kept. A small model
        answers from the line it is shown most of, so seven weak lines can outvote one
        strong match, in another section as well as in the same one."""
        floor = self.config.transcript_floor
        scores = [score for hits in retrieved for _, score in hits if score is not None]
        best = max(scores, default=0.0)
        kept = [[(segment, 0.0 if score is None else score) for segment, score in hits
                 if score is None or floor == 0 or best <= 0 or score >= floor * best] for hits in retrieved]
        return kept

    def stream(self, question: str, start: float | None = None, end: float | None = None,
               last: float | None = None) -> AnswerStream:
        """Answer ``question`` token by token (iterate; then ``.result()``), about the
        whole stream, ``[start, end]`` seconds, or the ``last`` seconds."""
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"the question must be a non-empty string, got {question!r}")
        if last is not None:
            if not (isinstance(last, (int, float)) and last > 0):
                raise ConfigError(f"last must be a positive number of seconds, got {last!r}")
            with self._stats_lock:
                start, end = max(0.0, self._stats.last_t - last), None
        if start is not None and end is not None and end < start:
            raise ConfigError(f"the window ends ({end} s) before it starts ({start} s)")
        with self._stats_lock:
            self._stats.questions += 1
        started = time.perf_counter()
        context = self.context(question.strip(), start, end)
        answer_stream = self.model.stream(context, question.strip(), self.config.generation)
        answer_stream.timings["retrieval"] = time.perf_counter() - started
        return answer_stream

    def ask(self, question: str, start: float | None = None, end: float | None = None,
            last: float | None = None) -> Answer:
        """The ``Answer`` to ``question`` (see ``stream`` for the window)."""
        return self.stream(question, start, end, last).result()

    def frames_for(self, answer: Answer, limit: int = 5) -> list[tuple[float, Image.Image]]:
        """Evidence images of ``answer``: for each of its best ``limit`` frame evidences, the
        stream time (seconds) and thumbnail of the bank frame nearest to the middle of its
        span; frames without a thumbnail are left out."""
        shown: list[tuple[float, Image.Image]] = []
        with self._write_lock:
            for evidence in [e for e in answer.evidence if e.kind == FRAME][:limit]:
                i = self.memory.frame_at((evidence.start + evidence.end) / 2)
                image = None if i is None else self.memory.bank.thumbnails([i])[0]
                if image is not None:
                    shown.append((float(self.memory.bank.times[i]), image))
        return shown

    def thumbnail(self, t: float) -> tuple[float, bytes] | None:
        """The stored JPEG thumbnail of the kept frame nearest to ``t`` seconds, with that
        frame's time; None before the first frame or when it has none (what a page shows
        as evidence and as the latest frame)."""
        with self._write_lock:
            i = self.memory.frame_at(t)
            jpeg = None if i is None else self.memory.bank.thumbnail_jpegs([i])[0]
            return (float(self.memory.bank.times[i]), jpeg) if jpeg else None

    def texts(self, limit: int = 200) -> dict:
        """The newest ``limit`` lines of the transcript and of the text read on screen,
        oldest first: ``{"transcript": [[start, end, text], ...], "screen": [...]}``."""
        return {name: [[s.start, s.end, s.text] for s in memory.recent(limit)] if memory is not None else []
                for name, memory in (("transcript", self.transcript), ("screen", self.screen))}

    def imagine(self, t: float, level: int, head, decoder) -> Image.Image:
        """A picture of the frame at ``t`` seconds as the model sees it: ``head`` (a
        ``MultigranularHead``) generates its features at ``level`` tokens from the request
        "Show the frame at m:ss." after this session's context, and ``decoder`` (an
        ``ImageDecoder``) draws them."""
        from vstream.models.heads.multigranular import request

        prompt = request(t)
        features = head.generate(self.model, self.context(prompt), prompt, level)
        return decoder.decode(features)[0]

    @property
    def stats(self) -> SessionStats:
        """A copy of the session's counters."""
        with self._stats_lock:
            stats = SessionStats(**asdict(self._stats))
            newest = self._newest
        stats.memory_tokens = self.memory.token_count()
        stats.lag_seconds = max(0.0, newest - stats.last_t) if stats.frames_processed else newest
        return stats

    # -- save, load, close ----------------------------------------------------------------

    def save(self, folder) -> None:
        """Save the memories into ``folder`` (each atomically; ``session.json`` last)."""
        folder = Path(folder)
        with self._write_lock:
            self.memory.save(folder / "visual")
            for name in TIMED_TEXT:
                if getattr(self, name) is not None:
                    getattr(self, name).save(folder / name)
            write_json(folder / "session.json", {**{name: getattr(self, name) is not None for name in TIMED_TEXT},
                                                 "encoder_grid": self.encoder.grid, "encoder_dim": self.encoder.dim,
                                                 "stats": self.stats.to_dict()})

    @classmethod
    def load(cls, folder, model: ChatModel | str | None = None, config: SessionConfig | None = None,
             encoder: FrameEncoder | None = None, screen_reader=None) -> Session:
        """A session holding the memories ``save`` wrote into ``folder``."""
        folder = Path(folder)
        meta = read_json(folder / "session.json")
        session = cls(model, config, encoder, screen_reader)
        try:
            session._restore(folder, meta)
        except BaseException:  # a damaged save: nothing left running
            session.close()
            raise
        return session

    def _bank_settings(self) -> dict:
        """The ``BankConfig`` fields this session sets over a memory config's (a new one's or
        a saved one's): the index's device follows the memory's (the CPU's FAISS there,
        faiss-gpu where installed on CUDA), and the disk cap when the config gives one."""
        settings = {"device": "cpu" if self.encoder.device.type == "cpu" else "auto"}
        if self.config.bank_disk_gb is not None:
            settings["disk_gb"] = self.config.bank_disk_gb
        return settings

    def _restore(self, folder: Path, meta: dict) -> None:
        """Take the memories and counters ``save`` wrote into ``folder`` (``meta``: its
        session.json)."""
        grid, dim = self.encoder.grid, self.encoder.dim
        if (meta.get("encoder_grid"), meta.get("encoder_dim")) != (grid, dim):
            raise MemoryStateError(f"{folder}: saved with a {meta.get('encoder_grid')}x{meta.get('encoder_grid')} x "
                                   f"{meta.get('encoder_dim')} frame encoder; this one gives {grid}x{grid} x {dim}")
        memory = type(self.memory).load(folder / "visual", device=self.encoder.device, bank=self._bank_settings())
        with self._write_lock:
            self.memory.close()
            self.memory = memory
            from vstream.memory.transcript import TranscriptMemory

            for name in TIMED_TEXT:
                if meta.get(name):
                    setattr(self, name, TranscriptMemory.load(folder / name))
        saved = meta.get("stats") if isinstance(meta.get("stats"), dict) else {}
        with self._stats_lock:
            for name in ("frames_in", "frames_dropped", "frames_processed", "audio_seconds", "audio_dropped",
                         "last_t", "questions"):
                if isinstance(saved.get(name), (int, float)):
                    setattr(self._stats, name, saved[name])
            for name in TIMED_TEXT:
                texts = getattr(self, name)
                setattr(self._stats, f"{name}_segments", len(texts) if texts is not None else 0)
            self._newest = self._last_frame_t = self._stats.last_t

    def close(self) -> None:
        """Stop reading, writing and recognising; free the memories. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._source is not None:
            self._source.close()
        self._queue.close()
        self._writer.join(10)
        if self._reader is not None:
            self._reader.join(10)
        for worker in (self._asr_worker, self._ocr_worker):
            if worker is not None:
                try:
                    worker.close(flush=False)
                except Exception as exc:  # noqa: BLE001 - closing anyway; the failure was logged when it came
                    logger.debug("a recogniser had failed: %s", exc)
        self.memory.close()
        self._idle.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _names(question: str, caption: str) -> bool:
    """Whether ``question`` names what ``caption`` says (a word of three letters or more
    in both: "the green one" names "green" and "dark green")."""
    words = set(re.findall(r"[a-z]{3,}", question.lower())) - {"the", "and", "one", "was", "what", "when"}
    return bool(words & set(re.findall(r"[a-z]{3,}", caption.lower())))


def _distinct(hits: list, k: int) -> list:
    """The first ``k`` of ``hits`` (``(segment, score)``) with distinct texts."""
    seen, kept = set(), []
    for segment, score in hits:
        if segment.text not in seen and len(kept) < k:
            seen.add(segment.text)
            kept.append((segment, score))
    return kept


def reads_screen(config: SessionConfig) -> bool:
    """Whether a session with ``config`` reads the text on screen (``ocr="auto"``: when installed)."""
    if config.ocr != "auto":
        return config.ocr
    from vstream.encoders import ocr

    return ocr.available()


def check_time_order(t: float, previous: float) -> None:
    """Refuse (``MemoryStateError``) a frame at ``t`` seconds earlier than the ``previous``
    one: frames go into the memory in time order."""
    if t < previous:
        raise MemoryStateError(f"frame time {t} s is earlier than the previous frame's ({previous} s): frames go "
                               "into the memory in time order")


@dataclass(frozen=True, eq=False)
class SharedModels:
    """What the sessions of a server (or of one cluster worker) share, each loaded once:
    the chat model, one frame encoder whose forwards batch every stream's frames, and one
    OCR (None when the sessions read no text)."""

    model: ChatModel
    encoder: BatchingEncoder
    screen_reader: object | None
    config: SessionConfig

    @classmethod
    def load(cls, model: ChatModel | str | None, config: SessionConfig, batching: BatchingConfig) -> SharedModels:
        chat, encoder = model_and_encoder(model, config)
        return cls(chat, BatchingEncoder(encoder, batching), shared_screen_reader(config), config)

    def session(self, saved: Path | None = None) -> Session:
        """A new session, or the one saved in the folder ``saved``."""
        if saved is not None:
            return Session.load(saved, self.model, self.config, self.encoder, self.screen_reader)
        return Session(self.model, self.config, self.encoder, self.screen_reader)

    def close(self) -> None:
        self.encoder.close()


def shared_screen_reader(config: SessionConfig):
    """A ``ScreenReader`` for sessions with ``config`` to share (None when they read no
    text): what a server holds once for all its streams, as it holds one frame encoder."""
    if not reads_screen(config):
        return None
    from vstream.encoders.ocr import ScreenReader

    return ScreenReader()


def model_and_encoder(model: ChatModel | str | None, config: SessionConfig,
                      encoder: FrameEncoder | None = None) -> tuple[ChatModel, FrameEncoder]:
    """The chat model (``model`` loaded by name with ``config.heads`` when it is not one)
    and the frame encoder feeding its memories: ``encoder``, else the model's own tower,
    else ``config.encoder`` built. What a session, a dialogue and a server each need once.

    Raises:
        ConfigError: ``encoder`` gives features of another shape than the model's own
            tower (a server passes the tower itself, wrapped in a ``BatchingEncoder``).
    """
    chat = model if isinstance(model, ChatModel) else load_model(model, config.dtype, config.device, config.heads)
    tower = chat.frame_encoder
    if encoder is not None and tower is not None and (encoder.grid, encoder.dim) != (tower.grid, tower.dim):
        raise ConfigError(f"{chat.name or type(chat).__name__} reads its own tower's {tower.grid}x{tower.grid} x "
                          f"{tower.dim} features; the encoder given makes {encoder.grid}x{encoder.grid} x {encoder.dim}")
    return chat, encoder or tower or create_encoder(config.encoder, device=config.device)


def _overlaps(t0: float, t1: float, start: float | None, end: float | None) -> bool:
    return (start is None or t1 >= start) and (end is None or t0 <= end)


def _within(memory: MemoryTokens, start: float | None, end: float | None) -> MemoryTokens:
    """The tokens whose span overlaps ``[start, end]``."""
    if start is None and end is None:
        return memory
    return memory.select([i for i, (t0, t1) in enumerate(memory.spans) if _overlaps(t0, t1, start, end)])
