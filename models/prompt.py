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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vstream.memory import MemoryTokens

SYSTEM_PROMPT = (
    "Answer the question about a video from its transcript and notes. Quote the transcript when it holds "
    "the answer. Be brief."
)
FRAME, TRANSCRIPT = "frame", "transcript"


@dataclass(frozen=True)
class Evidence:
    """A part of the stream the answer drew on: ``start``/``end`` seconds, ``kind``
    ``"frame"`` or ``"transcript"``, and ``score`` (its share of the answer's attention,
    or its retrieval score when attention was not measured)."""

    start: float
    end: float
    kind: str
    score: float

    def line(self) -> str:
        """``m:ss-m:ss  kind  score``: how the CLI and the examples print it."""
        return f"{clock(self.start)}-{clock(self.end)}  {self.kind:<10} {self.score:.2f}"


@dataclass(frozen=True, eq=False)
class Piece:
    """One piece of the user turn: ``text``, or visual ``features`` ``[n, D]``.
    ``evidence`` is ``(start, end, kind)`` when the piece stands for a part of the
    stream, ``prior`` its retrieval score."""

    text: str = ""
    features: torch.Tensor | None = None
    evidence: tuple[float, float, str] | None = None
    prior: float = 0.0


@dataclass
class Context:
    """What the answer stage hands a model.

    Attributes:
        memory: the visual memory's tokens (in the vision tower's feature space), or None.
        scenes: ``(start, end, description)`` lines about the visual memory, for models
            that read words only.
        transcript: ``(segment, score)`` pairs: transcript lines retrieved for the
            question, best first.
        duration: seconds of stream seen so far.
    """

    memory: MemoryTokens | None = None
    scenes: list[tuple[float, float, str]] | None = None
    transcript: list | None = None
    duration: float = 0.0


def clock(seconds: float, hours: bool = False) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on, or always with ``hours``) of a time in seconds."""
    whole = round(max(seconds, 0.0))
    h, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{h}:{minutes:02d}:{secs:02d}" if h or hours else f"{minutes}:{secs:02d}"


def span(start: float, end: float) -> str:
    """``[h:mm:ss-h:mm:ss]``: the prompt's times have one width, so a prompt is as long
    after ten hours of stream as after one minute."""
    return f"[{clock(start, hours=True)}-{clock(end, hours=True)}]"


def memory_pieces(memory: MemoryTokens) -> list[Piece]:
    """The visual memory as marker + tokens pieces, one pair per run of tokens of the
    same kind and span."""
    pieces: list[Piece] = []
    start = 0
    for i in range(1, len(memory) + 1):
        if i == len(memory) or (memory.kinds[i], memory.spans[i]) != (memory.kinds[start], memory.spans[start]):
            kind, (t0, t1) = memory.kinds[start], memory.spans[start]
            pieces.append(Piece(text=f" <{kind} {span(t0, t1)[1:-1]}>"))
            pieces.append(Piece(features=memory.tokens[start:i], evidence=(t0, t1, FRAME)))
            start = i
    return pieces


def user_pieces(context: Context, question: str, visual: bool) -> list[Piece]:
    """The user turn for ``question``; ``visual`` says whether the model reads memory tokens."""
    pieces: list[Piece] = []
    if visual and context.memory is not None and len(context.memory):
        pieces.append(Piece(text=f"Video memory ({clock(context.duration)} of video):"))
        pieces.extend(memory_pieces(context.memory))
        pieces.append(Piece(text="\n"))
    if context.scenes:
        pieces.append(Piece(text="What the video shows:\n"))
        for start, end, description in context.scenes:
            pieces.append(Piece(text=f"{span(start, end)} {description}\n", evidence=(start, end, FRAME)))
    if context.transcript:
        pieces.append(Piece(text="Transcript:\n"))
        for segment, score in sorted(context.transcript, key=lambda hit: hit[0].start):
            pieces.append(Piece(text=f'{span(segment.start, segment.end)} "{segment.text}"\n',
                                evidence=(segment.start, segment.end, TRANSCRIPT), prior=float(score)))
    if not pieces:
        pieces.append(Piece(text="Nothing has been seen or heard yet.\n"))
    pieces.append(Piece(text=f"Question: {question}"))
    return pieces


def rank_evidence(pieces: list[Piece], shares: list[float] | None) -> list[Evidence]:
    """Evidence of the pieces that carry it, best first: by attention share when
    measured (one share per evidence piece, in order), by retrieval score otherwise.
    The same span and kind met twice is one piece of evidence with the summed score."""
    scored: dict[tuple[float, float, str], float] = {}
    carriers = [p for p in pieces if p.evidence is not None]
    for i, piece in enumerate(carriers):
        score = shares[i] if shares is not None else piece.prior
        scored[piece.evidence] = scored.get(piece.evidence, 0.0) + score
    ranked = sorted(scored.items(), key=lambda item: (-item[1], item[0][0]))
    return [Evidence(start, end, kind, score) for (start, end, kind), score in ranked]
