"""``Dialogue``: questions about several images and videos at once, over several turns
(the interleaved multi-image chat of InternLM-XComposer-2.5; MMIU's questions).

Each medium keeps its own memory: a video is a ``Session`` that read it (or one the
caller feeds, live or not), an image is a session holding that one frame, encoded by
the session's frame encoder. A question reads a snapshot of every medium, labelled in
the order the media were added ("Video 1", "Image 2"), videos with their time markers;
the dialogue's earlier turns go before it as chat turns (the last ``max_turns``). A
question may say where each medium goes with ``<image>`` / ``<video>`` placeholders,
one per medium in order (layout: ``vstream.models.prompt``). The evidence of an answer
names its medium (``Evidence.source``: ``"video 1"``, ``"image 2"``).

One model serves every medium and is loaded once; ``reset()`` drops the media and the
turns and keeps the model, so one dialogue can serve many questions' worth of media.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from vstream.config import check_int
from vstream.errors import ConfigError, DecodeError, SourceError, VStreamError
from vstream.models import Answer, AnswerStream, ChatModel, Context
from vstream.models.prompt import IMAGE, VIDEO, Medium, label_question, media_label
from vstream.session import Session, SessionConfig, model_and_encoder
from vstream.types import Frame


class Dialogue:
    """Several images and videos, each with its own memory, asked about together.

    Args:
        model: a loaded ``ChatModel`` (may be shared), a hub id or folder, or None for
            the embedded default.
        config: ``SessionConfig`` of the media's sessions (images never transcribe).
        max_turns: earlier turns kept and replayed before a question (default 4; 0:
            every question stands alone).
    """

    def __init__(self, model: ChatModel | str | None = None, config: SessionConfig | None = None,
                 max_turns: int = 4):
        check_int("Dialogue", "max_turns", max_turns, 0)
        self.config = config or SessionConfig()
        self.model, self.encoder = model_and_encoder(model, self.config)  # one encoder for every medium
        self.max_turns = max_turns
        self._media: list[tuple[str, Session, bool]] = []  # (kind, session, made here: the dialogue closes it)
        self._turns: list[tuple[str, str]] = []
        self._lock = threading.Lock()  # a turn is recorded when its answer completes, maybe on another thread
        self._closed = False

    # -- media ----------------------------------------------------------------------------

    def add_video(self, video: str | Path | Session, progress: bool = False) -> int:
        """Add a video: a file, read whole into a new session (blocking; with a progress
        bar if ``progress``), or a ``Session`` made with this dialogue's ``model`` (its
        caller feeds and closes it; it may still be live). Returns the video's number
        among the media."""
        self._check_open()
        if isinstance(video, Session):
            if video.model is not self.model:
                raise ConfigError("add_video: the session answers with another model; make it with this "
                                  "dialogue's model, so its memory holds features the model reads")
            return self._add(VIDEO, video, made_here=False)
        session = Session(self.model, self.config, self.encoder)
        try:
            session.ingest(str(video), progress=progress)
        except BaseException:
            session.close()
            raise
        return self._add(VIDEO, session, made_here=True)

    def add_image(self, image) -> int:
        """Add an image: ``np.ndarray [H, W, 3]`` uint8 RGB, a PIL image, or an image
        file's path. Returns its number among the media."""
        self._check_open()
        frame = Frame(_pixels(image), t=0.0, index=0)
        session = Session(self.model, replace(self.config, asr=False), self.encoder)
        try:
            session.push_frame(frame, wait=True)
            session.wait()
        except BaseException:
            session.close()
            raise
        return self._add(IMAGE, session, made_here=True)

    def _add(self, kind: str, session: Session, made_here: bool) -> int:
        self._media.append((kind, session, made_here))
        return len(self._media)

    @property
    def labels(self) -> list[str]:
        """The media's labels in order: ``["Video 1", "Image 2", ...]``."""
        return [media_label(kind, i) for i, (kind, _, _) in enumerate(self._media, 1)]

    def media(self, question: str) -> list[Medium]:
        """A snapshot of what the model reads of each medium for ``question``."""
        return [Medium(kind, i, _image_context(session.context(question)) if kind == IMAGE
                       else session.context(question)) for i, (kind, session, _) in enumerate(self._media, 1)]

    # -- asking ---------------------------------------------------------------------------

    def stream(self, question: str) -> AnswerStream:
        """Answer ``question`` about every medium, token by token (iterate; then
        ``.result()``). The turn joins ``history`` once its answer is complete."""
        self._check_open()
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"the question must be a non-empty string, got {question!r}")
        if not self._media:
            raise ConfigError("add an image or a video to the dialogue before asking")
        question = question.strip()
        # placeholders are checked before any memory is read; the turn is replayed with labels in their place
        labelled = label_question(question, [kind for kind, _, _ in self._media])
        answer_stream = self.model.stream_media(self.media(question), question, self.config.generation,
                                                history=self.history)
        answer_stream.on_answer.append(lambda answer: self._record(labelled, answer))
        return answer_stream

    def ask(self, question: str) -> Answer:
        """The ``Answer`` to ``question`` about every medium (see ``stream``)."""
        return self.stream(question).result()

    def _record(self, question: str, answer: Answer) -> None:
        with self._lock:
            self._turns.append((question, answer.text))
            del self._turns[: max(0, len(self._turns) - self.max_turns)]

    @property
    def history(self) -> list[tuple[str, str]]:
        """The turns kept, ``(question, answer)`` oldest first: at most ``max_turns``."""
        with self._lock:
            return list(self._turns)

    # -- reset, close ---------------------------------------------------------------------

    def reset(self) -> None:
        """Drop every medium (closing the sessions the dialogue made) and every turn."""
        media, self._media = self._media, []
        for _, session, made_here in media:
            if made_here:
                session.close()
        with self._lock:
            self._turns.clear()

    def close(self) -> None:
        """``reset``, and refuse further use. Idempotent."""
        self.reset()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise VStreamError("the dialogue is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pixels(image) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB from an array, a PIL image or an image file's path."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise SourceError(f"{path}: no such image file")
        try:
            with Image.open(path) as opened:
                return np.asarray(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise DecodeError(f"{path}: cannot read it as an image: {exc}") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ConfigError("add_image takes an [H, W, 3] uint8 array, a PIL image or a path; got "
                      f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}".rstrip())


def _image_context(context: Context) -> Context:
    """An image's context: of the memories of its one frame, the spatial one is the
    frame itself at the memory's finest grid; the others would only repeat it. Its
    note says what it shows, not that it was shown "1 time"."""
    memory = context.memory
    if memory is None:
        return replace(context, scenes=[(start, end, line.removesuffix(", 1 time"))
                                        for start, end, line in context.scenes or []])
    frame = memory.select([i for i, kind in enumerate(memory.kinds) if kind == "spatial"])
    return Context(memory=frame, scenes=context.scenes, transcript=context.transcript, duration=context.duration)
