"""Needle benchmarks: synthetic clips whose answers are known by construction.

``make_needle_clip`` writes one clip with ``vstream.synth`` (160x120 at 2 fps, so an
hour writes in minutes) and returns it with its ``NeedleCase``: the question, what a
right answer says, and where in the stream the needle is. Kinds:

- ``spoken``: one fact sentence, spoken once (espeak-ng) at the needle time, among
  unrelated sentences spoken every ``DISTRACTOR_EVERY`` seconds, over a low hum whose
  pitch changes every ``HUM_EVERY`` seconds (``write_clip``'s tone: 0.15 of full scale
  under speech, about as loud as the voice) and low white noise (``NOISE``);
- ``visual``: a magenta scene, on screen once for ``VISUAL_SECONDS`` seconds, among
  muted scenes that change every ``SCENE_EVERY`` seconds; asked "when", scored by the
  time of the answer's best frame evidence;
- ``recurrence``: a red scene that appears ``count`` times; asked how many;
- ``order``: a green and a yellow scene (green first for even seeds); asked which came
  first;
- ``live``: a magenta scene, asked about during the stream (at ``ask_at``, about the
  ``last`` seconds);
- ``photo``: an everyday photo (one of scikit-image's public-domain sample photos,
  chosen and mirrored by the seed), on screen once among muted scenes; asked what was
  shown; ``photo_when``: the same clip, asked when the photo's subject was shown,
  scored by the answer's best frame evidence;
- ``text``: a slide with a number (title, number and template chosen by the seed), on
  screen once among muted scenes and slides without numbers; asked what the slide said;
  ``text_when``: the same clip, asked when the slide was shown, scored by the answer's
  best screen-text evidence.

Photo and text clips are ``PICTURE_SIZE`` so that a classifier and OCR can read them.

``feed`` puts a clip into a ``Session`` up to where its case asks; ``score_answer`` and
``evidence_error`` score the ``Answer`` against the case.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from vstream.errors import ConfigError

KINDS = ("spoken", "visual", "recurrence", "order", "live", "photo", "photo_when", "text", "text_when")
CLIPS = {"photo_when": "photo", "text_when": "text"}
"""Kinds asked of another kind's clip (its file is shared)."""
WHEN = {"visual": "frame", "photo_when": "frame", "text_when": "screen"}
"""Kinds asked "when", scored by the time of the answer's best evidence of this kind."""
POSITIONS = {"start": 0.1, "middle": 0.5, "end": 0.9}
"""Needle time as a fraction of the clip's length."""

SIZE = (160, 120)
PICTURE_SIZE = (480, 270)
"""Frame size of photo and text clips, ``(width, height)``."""
FPS = 2.0
SCENE_EVERY = 20.0
"""Seconds between background scene changes."""
VISUAL_SECONDS = 5.0
"""How long a visual needle stays on screen, seconds."""
DISTRACTOR_EVERY = 30.0
"""Seconds between unrelated spoken sentences in a spoken clip."""
HUM = (100.0, 150.0, 120.0)
"""Pitches of the hum under a spoken clip, Hz, in turn."""
HUM_EVERY = 60.0
"""Seconds between pitch changes of the hum."""
NOISE = 0.003
"""Standard deviation of the white noise under a spoken clip (full scale 1; the voice
peaks near 0.5, so about 40 dB below it)."""
TOLERANCE = 5.0
"""Evidence-time error in seconds under which a "when" answer counts as right."""

BACKGROUND = [(96, 96, 96), (120, 110, 100), (80, 90, 100), (110, 100, 120), (100, 115, 100)]
MAGENTA, RED, GREEN, YELLOW = (255, 0, 255), (230, 20, 20), (20, 200, 40), (240, 220, 20)

FACTS = [
    ("The spare key is hidden under the blue flower pot.", "Where is the spare key hidden?",
     ("flower", "pot")),
    ("The train to the airport leaves from platform nine.",
     "Which platform does the train to the airport leave from?", ("nine", "9")),
    ("The password for the wifi is orange.", "What is the password for the wifi?", ("orange",)),
    ("The doctor's appointment is on Friday.", "When is the doctor's appointment?", ("friday",)),
]
"""``(sentence, question, keywords)``: a right answer holds one of the keywords."""

DISTRACTORS = [
    "The weather is cold and the sky is grey.",
    "Lunch will be served in the garden today.",
    "Please remember to water the plants.",
    "The bus was late again this week.",
    "The library closes early in the evening.",
    "My sister likes to read long novels.",
    "The football match ended in a draw.",
    "We painted the kitchen walls white.",
]
PHOTOS = [
    ("chelsea.png", "cat", ("cat", "kitten", "tabby")),
    ("coffee.png", "cup of coffee", ("coffee", "espresso", "cup")),
    ("motorcycle_left.png", "motorbike", ("motorbike", "motorcycle", "moped", "scooter")),
    ("camera.png", "photographer", ("camera", "tripod", "photographer")),
]
"""``(file in scikit-image's data folder, what a question calls it, keywords)``: the
photos an ImageNet classifier recognises (a cat, an espresso, a moped, a cameraman with
his tripod); a right answer to "what was shown" holds one of the keywords."""
SLIDES = [
    ("Departures", "Gate {}", range(2, 60)),
    ("Meeting", "Room {}", range(100, 500)),
    ("Parking", "Level {}", range(2, 10)),
    ("Invoice", "Total: ${}", range(20, 1000)),
]
"""``(title, line with the number, numbers)``: the needle slide of a text clip."""
PLAIN_SLIDES = ["Welcome", "Agenda", "Coffee break", "Thank you", "Questions?", "Next steps"]
"""Slides without a number, every other background scene of a text clip."""
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass
class NeedleCase:
    """One needle question, known by construction.

    Attributes:
        kind: one of ``KINDS``.
        length: clip length, seconds.
        position: ``"start"``, ``"middle"`` or ``"end"``.
        needle: time the needle begins, seconds.
        span: ``(start, end)`` seconds the needle lasts (spoken: the sentence; visual:
            the scene; recurrence: the first appearance; order: the first scene).
        question: what is asked.
        expected: keywords, one of which a right answer holds (any case).
        count: the right number, for ``recurrence``; else None.
        ask_at: stream time to ask at, seconds (``live``); None: after the stream ends.
        last: window the question is about, seconds back from ``ask_at`` (``live``).
        tolerance: evidence-time error, seconds, under which a "when" answer is right.
        seed: the seed the clip was made with.
    """

    kind: str
    length: float
    position: str
    needle: float
    span: tuple[float, float]
    question: str
    expected: tuple[str, ...] = ()
    count: int | None = None
    ask_at: float | None = None
    last: float | None = None
    tolerance: float = TOLERANCE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"needle kind {self.kind!r} is not one of {KINDS}")
        if self.position not in POSITIONS:
            raise ConfigError(f"needle position {self.position!r} is not one of {tuple(POSITIONS)}")
        self.span = (float(self.span[0]), float(self.span[1]))
        self.expected = tuple(self.expected)
        if not (0 <= self.span[0] <= self.span[1] <= self.length):
            raise ConfigError(f"needle span {self.span} is not inside the clip's {self.length} s")
        if self.kind == "recurrence" and not (self.count and self.count > 0):
            raise ConfigError(f"a recurrence case needs a positive count, got {self.count!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _photo(name: str, mirror: bool):
    """A scikit-image sample photo ``[H, W, 3]`` uint8, read as a file (no import of
    scikit-image), left-right mirrored when ``mirror``."""
    import numpy as np
    from PIL import Image

    from vstream.config import package_folder

    folder = package_folder("skimage")
    if folder is None:
        raise ConfigError("photo needles use scikit-image's sample photos: pip install scikit-image")
    image = np.asarray(Image.open(folder / "data" / name).convert("RGB"))
    return np.ascontiguousarray(image[:, ::-1]) if mirror else image


def speech_available() -> bool:
    """Whether espeak-ng, which spoken needles need, is installed."""
    return shutil.which("espeak-ng") is not None


def needle_time(length: float, position: str, duration: float) -> float:
    """When a needle lasting ``duration`` seconds begins at ``position`` of a clip of
    ``length`` seconds: whole seconds, kept a second inside the clip."""
    if position not in POSITIONS:
        raise ConfigError(f"needle position {position!r} is not one of {tuple(POSITIONS)}")
    if length < duration + 2:
        raise ConfigError(f"a {length} s clip is too short for a {duration} s needle")
    return float(min(max(round(POSITIONS[position] * length), 1), int(length - duration - 1)))


def _background(length: float, seed: int) -> list[tuple[float, tuple[int, int, int]]]:
    return [(t, BACKGROUND[(i + seed) % len(BACKGROUND)])
            for i, t in enumerate(x * SCENE_EVERY for x in range(int(length // SCENE_EVERY) + 1))]


def _plain(scenes, size: tuple[int, int]) -> list:
    """``scenes`` with each colour as a plain picture of ``size``: no bar code and moving
    square, which a classifier takes for a digital clock and OCR for ever-changing text."""
    import numpy as np

    return [(t, np.full((size[1], size[0], 3), colour, np.uint8)) for t, colour in scenes]


def _insert(scenes, start: float, end: float, colour) -> list:
    """``scenes`` with ``colour`` on screen over ``[start, end)``, the background after."""
    resume = [c for s, c in scenes if s <= end][-1]
    before = [s for s in scenes if s[0] < start]
    after = [s for s in scenes if s[0] > end]
    return before + [(start, colour), (end, resume)] + after


def make_needle_clip(folder: str | Path, kind: str, length: float, position: str = "middle",
                     seed: int = 0) -> tuple[Path, NeedleCase]:
    """Write (or reuse, when written before) a needle clip in ``folder``.

    Returns the clip's path and its ``NeedleCase``; the case is saved beside the clip as
    JSON, and a clip whose JSON exists is not written again. Kinds asked of the same clip
    (``CLIPS``: ``photo`` and ``photo_when``) share its file.
    """
    from vstream.synth import text_slide, write_clip

    if kind not in KINDS:
        raise ConfigError(f"needle kind {kind!r} is not one of {KINDS}")
    folder = Path(folder)
    stem = f"{int(length)}s-{position}-seed{seed}"
    path = folder / f"{CLIPS.get(kind, kind)}-{stem}.mp4"
    saved = folder / f"{kind}-{stem}.json"
    if path.exists() and saved.exists():
        return path, NeedleCase(**json.loads(saved.read_text()))
    scenes = _background(length, seed)
    speech = []
    extra = {}
    size = SIZE
    if kind == "spoken":
        sentence, question, keywords = FACTS[seed % len(FACTS)]
        t = needle_time(length, position, 6.0)
        speech = [(t, sentence)] + [
            (float(s), DISTRACTORS[(i + seed) % len(DISTRACTORS)])
            for i, s in enumerate(range(int(DISTRACTOR_EVERY / 2), int(length) - 6, int(DISTRACTOR_EVERY)))
            if abs(s - t) > 8
        ]
        extra = {"question": question, "expected": keywords}
        span = None  # from the spoken length, once written
    elif kind in ("visual", "live"):
        t = needle_time(length, position, VISUAL_SECONDS)
        span = (t, t + VISUAL_SECONDS)
        scenes = _insert(scenes, *span, MAGENTA)
        if kind == "visual":
            extra = {"question": "When did the magenta screen appear?", "expected": ("magenta", "pink", "purple")}
        else:
            ask_at = min(span[1] + 5.0, length)
            extra = {"question": "What colour was the screen in the last 30 seconds?",
                     "expected": ("magenta", "pink", "purple"), "ask_at": ask_at, "last": 30.0}
    elif kind == "recurrence":
        # The red scenes share the third of the clip that ``position`` names, evenly spaced.
        count = 2 + seed % 3
        third = length / 3
        lo = {"start": 0.0, "middle": third, "end": 2 * third}[position]
        step = third / count
        seconds = min(VISUAL_SECONDS, step / 2)
        starts = [round(lo + (i + 0.25) * step, 1) for i in range(count)]
        for s in starts:
            scenes = _insert(scenes, s, s + seconds, RED)
        span = (starts[0], starts[0] + seconds)
        extra = {"question": "How many times did the red screen appear?", "expected": (str(count), NUMBERS[count]),
                 "count": count}
    elif kind == "order":
        # Which colour comes first depends on the seed alone, never on the length or
        # position: a model that always names one colour scores the same everywhere.
        first, second = ((GREEN, "green"), (YELLOW, "yellow")) if seed % 2 == 0 else ((YELLOW, "yellow"), (GREEN, "green"))
        t = needle_time(length, position, VISUAL_SECONDS)
        other = t + max(min(length / 4, length - t - VISUAL_SECONDS - 1), VISUAL_SECONDS)
        if other + VISUAL_SECONDS >= length:
            other = t - max(length / 4, 2 * VISUAL_SECONDS)  # no room after the needle: the other scene goes before
        t, later = sorted((t, other))
        scenes = _insert(_insert(scenes, t, t + VISUAL_SECONDS, first[0]), later, later + VISUAL_SECONDS, second[0])
        span = (t, t + VISUAL_SECONDS)
        extra = {"question": "Which screen came first, the green one or the yellow one?", "expected": (first[1],)}
    elif CLIPS.get(kind, kind) == "photo":
        size = PICTURE_SIZE
        scenes = _plain(scenes, size)
        name, subject, keywords = PHOTOS[seed % len(PHOTOS)]
        t = needle_time(length, position, VISUAL_SECONDS)
        span = (t, t + VISUAL_SECONDS)
        scenes = _insert(scenes, *span, _photo(name, mirror=seed // len(PHOTOS) % 2 == 1))
        extra = ({"question": "What was shown on the screen?", "expected": keywords} if kind == "photo" else
                 {"question": f"When was the {subject} shown?", "expected": (subject,)})
    else:  # text, text_when
        size = PICTURE_SIZE
        rng = random.Random(seed)
        title, template, numbers = SLIDES[seed % len(SLIDES)]
        number = rng.choice(numbers)
        plain = rng.sample(PLAIN_SLIDES, len(PLAIN_SLIDES))
        scenes = [(t, text_slide([plain[i // 2 % len(plain)]], size) if i % 2 else colour)
                  for i, (t, colour) in enumerate(_plain(scenes, size))]
        t = needle_time(length, position, VISUAL_SECONDS)
        span = (t, t + VISUAL_SECONDS)
        scenes = _insert(scenes, *span, text_slide([title, template.format(number)], size))
        extra = ({"question": f"What did the {title.lower()} slide say?", "expected": (str(number),)}
                 if kind == "text" else {"question": f"When was the {title.lower()} slide shown?", "expected": (title,)})
    if not path.exists() or kind == "spoken":
        hum = [(i * HUM_EVERY, HUM[i % len(HUM)]) for i in range(int(length // HUM_EVERY) + 1)]
        partial = path.with_suffix(".partial.mp4")  # renamed when whole: a stopped run leaves no half clip
        info = write_clip(partial, duration=length, fps=FPS, size=size, scenes=sorted(scenes, key=lambda s: s[0]),
                          speech=speech, tones=hum if speech else None, noise=NOISE if speech else 0.0,
                          progress=length >= 600)
        partial.replace(path)
    if span is None:
        span = next((start, min(end, length)) for start, end, text in info.speech if text == FACTS[seed % len(FACTS)][0])
    case = NeedleCase(kind=kind, length=float(length), position=position, needle=span[0], span=span, seed=seed, **extra)
    saved.write_text(json.dumps(case.to_dict()))
    return path, case


def feed(session, path: str | Path, case: NeedleCase) -> None:
    """Feed the clip at ``path`` into ``session`` up to where ``case`` asks its question:
    the whole clip, or, for a live case, its frames and audio up to ``ask_at``, pushed as
    a live caller would. Returns once what was fed is in the memories; then ask
    ``session.ask(case.question, last=case.last)``."""
    from vstream.ingest import open_source
    from vstream.types import Frame

    if case.ask_at is None:
        session.ingest(str(path), progress=False)
        return
    with open_source(str(path), fps=session.config.fps, audio=session.config.asr) as source:
        for item in source:
            if isinstance(item, Frame):
                if item.t > case.ask_at:
                    break
                session.push_frame(item, wait=True)
            elif item.start < case.ask_at:
                session.push_audio(item, wait=True)
    session.wait()


def evidence_error(case: NeedleCase, answer) -> float | None:
    """Seconds between the answer's best evidence of the needle's kind (transcript for
    spoken needles, screen text for text needles, frames otherwise) and the needle's
    span: 0 when they overlap; None when the answer has no such evidence."""
    wanted = WHEN.get(case.kind) or {"spoken": "transcript", "text": "screen"}.get(case.kind, "frame")
    best = next((e for e in answer.evidence if e.kind == wanted), None)
    if best is None:
        return None
    start, end = case.span
    return float(max(0.0, start - best.end, best.start - end))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def score_answer(case: NeedleCase, answer) -> bool:
    """Whether ``answer`` is right: for kinds asked "when" (``WHEN``), its evidence error
    is within the tolerance; for ``recurrence``, the first number it gives is the count; for
    ``order``, it names the first scene before (or without) the other; otherwise it
    holds one of the expected keywords."""
    words = _words(answer.text)
    if case.kind in WHEN:
        error = evidence_error(case, answer)
        return error is not None and error <= case.tolerance
    if case.kind == "recurrence":
        said = next((int(w) if w.isdigit() else NUMBERS.index(w) for w in words if w.isdigit() or w in NUMBERS), None)
        return said == case.count
    if case.kind == "order":
        names = [w for w in words if w in ("green", "yellow")]
        return bool(names) and names[0] == case.expected[0]
    text = " ".join(words)
    return any(re.search(rf"\b{re.escape(' '.join(_words(k)))}\b", text) for k in case.expected)
