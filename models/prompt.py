"""The prompt: what the model reads, as a list of pieces, each text or visual tokens,
with the stream time it stands for.

Layout of the user turn (every time is ``h:mm:ss`` on the stream clock)::

    Video memory (<duration>):
    <abstract 0:00:00-0:10:00> [25 visual tokens] <temporal 0:00:12-0:00:40> [16 tokens] ...
    What the video shows:            (text-only models: the visual memory in words)
    [0:00:00-0:00:40] view A, recurs
    Transcript:
    [0:00:03-0:00:05] "the red square moves left"
    Question: ...

Visual tokens are announced by a text marker naming their memory and time span, so a
model that reads them also reads when they are from. Pieces that stand for a part of
the stream carry it as ``evidence``; the answer's evidence is ranked over those.

Several images and videos (``media_pieces``) are each a labelled block in the order
they were added, with the same sections for a video and its tokens (or its notes) for
an image, then the question::

    Video 1:
    Video memory (0:40 of video): <abstract 0:00:00-0:00:40> [tokens] ...
    Image 2: [tokens]
    Question: ...

A question holding ``<image>`` / ``<video>`` placeholders has each one replaced by its
medium's block instead, so a medium is read where the question refers to it. Evidence
of a medium carries its ``source`` (``"video 1"``, ``"image 2"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from vstream.errors import ConfigError
from vstream.memory import MemoryTokens
from vstream.types import clock, evidence_line

SYSTEM_PROMPT = (
    "Answer the question about a video from its transcript and notes. Quote the transcript when it holds "
    "the answer. Be brief."
)
MEDIA_SYSTEM_PROMPT = (
    "Answer the question about the images and videos from what each of them shows and says. Name the image or "
    "video you answer from. Be brief."
)
FRAME, TRANSCRIPT, SCREEN = "frame", "transcript", "screen"
IMAGE, VIDEO = "image", "video"
PLACEHOLDER = re.compile(r"<(image|video)>")  # InternLM-XComposer-style references to the media, in order


@dataclass(frozen=True)
class Evidence:
    """A part of the stream the answer drew on: ``start``/``end`` seconds, ``kind``
    ``"frame"``, ``"transcript"`` or ``"screen"`` (text read on screen), ``score`` (its share of the answer's attention,
    or its retrieval score when attention was not measured), and ``source``: which of
    several media it is from (``"video 1"``, ``"image 2"``), None for a single stream."""

    start: float
    end: float
    kind: str
    score: float
    source: str | None = None

    def line(self) -> str:
        """``m:ss-m:ss  kind  score  [source]`` (``h:mm:ss`` from an hour on): ``evidence_line``,
        the one format of every CLI path; ``evidence_lines`` lines up a whole answer's."""
        return evidence_line(self.start, self.end, self.kind, self.score, self.source)


@dataclass(frozen=True, eq=False)
class Piece:
    """One piece of the user turn: ``text``, or visual ``features`` ``[n, D]``.
    ``evidence`` is ``(start, end, kind)`` when the piece stands for a part of the
    stream, ``prior`` its retrieval score, ``source`` the medium it is from (see
    ``Evidence``)."""

    text: str = ""
    features: torch.Tensor | None = None
    evidence: tuple[float, float, str] | None = None
    prior: float = 0.0
    source: str | None = None


@dataclass
class Context:
    """What the answer stage hands a model.

    Attributes:
        memory: the visual memory's tokens (in the vision tower's feature space), or None.
        scenes: ``(start, end, description)`` lines about the visual memory, for models
            that read words only.
        transcript: ``(segment, score)`` pairs: transcript lines retrieved for the
            question, best first.
        screen: ``(segment, score)`` pairs: texts read on screen retrieved for the
            question, best first.
        shown: ``(segment, score)`` pairs: spans of what the frame encoder recognised
            (its labels) retrieved for the question, best first.
        duration: seconds of stream seen so far.
    """

    memory: MemoryTokens | None = None
    scenes: list[tuple[float, float, str]] | None = None
    transcript: list | None = None
    screen: list | None = None
    shown: list | None = None
    duration: float = 0.0


@dataclass
class Medium:
    """One of several images and videos asked about together.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        number: its place among the media, from 1 (images and videos counted together).
        context: what the model reads of it (an image: its frame's tokens, or its note).
    """

    kind: str
    number: int
    context: Context

    @property
    def label(self) -> str:
        """``"Video 1"``, ``"Image 2"``: how the prompt names it."""
        return media_label(self.kind, self.number)

    @property
    def source(self) -> str:
        """``"video 1"``, ``"image 2"``: how its evidence names it."""
        return self.label.lower()


def span(start: float, end: float) -> str:
    """``[h:mm:ss-h:mm:ss]``: the prompt's times have one width, so a prompt is as long
    after ten hours of stream as after one minute."""
    return f"[{clock(start, hours=True)}-{clock(end, hours=True)}]"


def memory_pieces(memory: MemoryTokens, source: str | None = None, timed: bool = True) -> list[Piece]:
    """The visual memory as marker + tokens pieces, one pair per run of tokens of the
    same kind and span; the tokens' evidence carries ``source``. Without ``timed``, the
    tokens only, in the memory's order: one contiguous block, as a checkpoint trained on
    a block (Flash-VStream-7b) saw it; each run stays its own piece for evidence
    (``context_pieces`` then gives the times in a line after the block, ``memory_times``)."""
    pieces: list[Piece] = []
    start = 0
    for i in range(1, len(memory) + 1):
        if i == len(memory) or (memory.kinds[i], memory.spans[i]) != (memory.kinds[start], memory.spans[start]):
            kind, (t0, t1) = memory.kinds[start], memory.spans[start]
            if timed:
                pieces.append(Piece(text=f" <{kind} {span(t0, t1)[1:-1]}>"))
            pieces.append(Piece(features=memory.tokens[start:i], evidence=(t0, t1, FRAME), source=source))
            start = i
    return pieces


def memory_times(memory: MemoryTokens) -> str:
    """The times of an untimed memory block, as one line outside it: each kind with the
    spans of its runs in the block's order (``Memory times: abstract 0:00:00-0:01:30;
    temporal 0:00:03-0:00:09, 0:00:12-0:00:20; spatial 0:01:35``), a frame's span once."""
    runs: dict[str, list[str]] = {}
    previous = None
    for kind, (t0, t1) in zip(memory.kinds, memory.spans):
        if (kind, t0, t1) != previous:
            runs.setdefault(kind, []).append(clock(t0, hours=True) if t0 == t1 else span(t0, t1)[1:-1])
            previous = (kind, t0, t1)
    return "Memory times: " + "; ".join(f"{kind} {', '.join(spans)}" for kind, spans in runs.items()) + "\n"


def context_pieces(context: Context, visual: bool, source: str | None = None, timed: bool = True) -> list[Piece]:
    """What a stream's ``context`` shows and says: its memory tokens (``visual``: the
    model reads them; ``timed``: with a time marker before each run, see
    ``memory_pieces``), scene notes, texts read on screen and transcript lines, or a line
    saying it is empty.
    Evidence pieces carry ``source``."""
    pieces: list[Piece] = []
    if visual and context.memory is not None and len(context.memory):
        pieces.append(Piece(text=f"Video memory ({clock(context.duration)} of video):"))
        pieces.extend(memory_pieces(context.memory, source, timed))
        pieces.append(Piece(text="\n"))
        if not timed:  # the block holds no text: its times follow it
            pieces.append(Piece(text=memory_times(context.memory)))
    if context.scenes:
        pieces.append(Piece(text="What the video shows:\n"))
        for start, end, description in context.scenes:
            pieces.append(Piece(text=f"{span(start, end)} {description}\n", evidence=(start, end, FRAME),
                                source=source))
    timed_text = (("Seen in the video", context.shown, FRAME), ("On screen", context.screen, SCREEN),
                  ("Transcript", context.transcript, TRANSCRIPT))
    for title, hits, kind in timed_text:
        if hits:
            pieces.append(Piece(text=f"{title}:\n"))
            # best match first: a small model answers from the first line that fits
            for segment, score in sorted(hits, key=lambda hit: (-hit[1], hit[0].start)):
                # Labels are the encoder's words, not a quote; text read or heard is quoted.
                text = segment.text if kind == FRAME else f'"{segment.text}"'
                pieces.append(Piece(text=f"{span(segment.start, segment.end)} {text}\n",
                                    evidence=(segment.start, segment.end, kind), prior=float(score), source=source))
    if not pieces:
        pieces.append(Piece(text="Nothing has been seen or heard yet.\n"))
    return pieces


def user_pieces(context: Context, question: str, visual: bool, timed: bool = True) -> list[Piece]:
    """The user turn for ``question``; ``visual`` says whether the model reads memory
    tokens, ``timed`` whether each run of them comes after its time marker."""
    return [*context_pieces(context, visual, timed=timed), Piece(text=f"Question: {question}")]


def medium_pieces(medium: Medium, visual: bool) -> list[Piece]:
    """One medium's block: its label, then what it shows. An image has no time, so its
    frame's tokens (or its note) follow the label with no time marker."""
    context, source = medium.context, medium.source
    if medium.kind == VIDEO:
        return [Piece(text=f"{medium.label}:\n"), *context_pieces(context, visual, source)]
    if visual and context.memory is not None and len(context.memory):
        return [Piece(text=f"{medium.label}:"), Piece(features=context.memory.tokens, evidence=(0.0, 0.0, FRAME),
                                                      source=source), Piece(text="\n")]
    notes = "; ".join(description for _, _, description in context.scenes or []) or "nothing to read"
    return [Piece(text=f"{medium.label}: {notes}\n", evidence=(0.0, 0.0, FRAME), source=source)]


def media_label(kind: str, number: int) -> str:
    """``"Video 1"``, ``"Image 2"``: the label of the ``number``-th medium, of ``kind``."""
    return f"{kind.capitalize()} {number}"


def label_question(question: str, kinds: list[str]) -> str:
    """``question`` with each ``<image>`` / ``<video>`` placeholder replaced by the label
    of its medium, the media being of ``kinds`` in order. Placeholders, when there are
    any, must match the media one for one and kind for kind (``ConfigError`` otherwise)."""
    said = PLACEHOLDER.findall(question)
    if not said:
        return question
    labels = [media_label(kind, i) for i, kind in enumerate(kinds, 1)]
    if len(said) != len(kinds):
        raise ConfigError(f"the question has {len(said)} placeholder(s) ({', '.join(f'<{k}>' for k in said)}) "
                          f"but {len(kinds)} media were added ({', '.join(labels) or 'none'}); "
                          "use one placeholder per medium, in order, or none")
    for i, (placeholder, kind) in enumerate(zip(said, kinds), 1):
        if placeholder != kind:
            raise ConfigError(f"placeholder {i} of the question is <{placeholder}> but medium {i} is {labels[i - 1]}")
    order = iter(labels)
    return PLACEHOLDER.sub(lambda _: next(order), question)


def media_pieces(media: list[Medium], question: str, visual: bool) -> list[Piece]:
    """The user turn for ``question`` about several ``media`` (see the module docstring).
    The last piece is the question's text after its last placeholder (the whole question
    without placeholders)."""
    label_question(question, [medium.kind for medium in media])  # refuses placeholders that do not match
    if not PLACEHOLDER.search(question):
        blocks = [piece for medium in media for piece in medium_pieces(medium, visual)]
        return [*blocks, Piece(text=f"Question: {question}")]
    *texts, last = PLACEHOLDER.split(question)[::2]  # split keeps the captured kinds at odd places
    pieces = [Piece(text="Question: ")]
    for text, medium in zip(texts, media):
        if text:
            pieces.append(Piece(text=text))
        pieces.extend(medium_pieces(medium, visual))
    return [*pieces, Piece(text=last)]


def rank_evidence(pieces: list[Piece], shares: list[float] | None) -> list[Evidence]:
    """Evidence of the pieces that carry it, best first: by attention share when
    measured (one share per evidence piece, in order), by retrieval score otherwise.
    The same span, kind and source met twice is one piece of evidence with the summed score."""
    scored: dict[tuple[float, float, str, str | None], float] = {}
    carriers = [p for p in pieces if p.evidence is not None]
    for i, piece in enumerate(carriers):
        score = shares[i] if shares is not None else piece.prior
        key = (*piece.evidence, piece.source)
        scored[key] = scored.get(key, 0.0) + score
    ranked = sorted(scored.items(), key=lambda item: (-item[1], item[0][0]))
    return [Evidence(start, end, kind, score, source) for (start, end, kind, source), score in ranked]
