"""MMIU (Multimodal Multi-image Understanding) multiple choice, answered through a
``Dialogue``: each question's images are its media, listed in order before it.

Fields of a record (MMIU's names first; the first name present is used):

- ``input_image_path`` | ``images``: the image paths, relative to the image folder
  (one path as a string is one image);
- ``question``;
- ``options``: MMIU's string, one ``"A: text"`` a line (a line that starts with no
  next letter continues the option before it), or a list of texts (bare or
  ``"A. text"``); up to 26 options;
- ``output`` | ``answer``: the correct letter (or an option index);
- ``task`` (default ``"mmiu"``);
- ``context`` (optional): MMIU's scenario for the question, then "Select from the
  following choices." and the options again; the scenario goes before the question;
- ``relation`` | ``relationship``: the relation between the images, one of MMIU's
  seven (``RELATIONS``); default: the one of them the image paths are filed under, as
  MMIU's dataset files them (``./Continuous-temporal/temporal_ordering/...``), else
  ``"unknown"``. MMIU's ``visual_input_component`` says what kind of images they are,
  not their relation, and is not read;
- ``id`` | ``question_id`` | ``qid`` (default ``"<task>/<record index>"``).

A question may hold ``<image>`` placeholders, one per image. A malformed record is a
``ConfigError`` naming the file, the record and the field. Results are JSON lines
appended as each question is scored, so a stopped run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vstream.dialogue import Dialogue
from vstream.errors import ConfigError
from vstream.evaluate.records import _OPTION_PREFIX, LETTERS, _letter, _options, _Record, _unique, read_records
from vstream.evaluate.runner import format_summary, run_resumable, select, summarize
from vstream.evaluate.scoring import mc_prompt, parse_choice
from vstream.models import ChatModel, GenerationConfig
from vstream.models.prompt import IMAGE, label_question
from vstream.session import SessionConfig

RELATIONS = ("2D-spatial", "3D-spatial", "Continuous-temporal", "Discrete-temporal", "High-level-obj-semantic",
             "High-level-sub-semantic", "Low-level-semantic")  # MMIU's relation types, as its image folders
_CHOICES = "Select from the following choices."  # where an MMIU context starts repeating the options


@dataclass
class MMIUQuestion:
    """One MMIU question.

    Attributes:
        qid: its id, unique within its file.
        images: paths of its images, in order, relative to the image folder.
        question: the question text.
        options: the choices' texts, in letter order.
        answer: the correct letter.
        task: MMIU's task, for the per-task summary.
        relation: the images' relation type, for the per-relation summary.
        scenario: text that goes before the question (MMIU's ``context`` before its
            options), or empty.
    """

    qid: str
    images: list[str]
    question: str
    options: list[str]
    answer: str
    task: str = "mmiu"
    relation: str = "unknown"
    scenario: str = ""


def load_mmiu(path) -> list[MMIUQuestion]:
    """The questions of an MMIU annotation file (JSON or JSON Lines; fields above)."""
    questions = []
    for r in read_records(path):
        images = _images(r)
        question = r.get(("question",), str)
        try:
            label_question(question, [IMAGE] * len(images))
        except ConfigError as exc:
            raise r.fail("question", f"has placeholders that do not match its {len(images)} image(s): {exc}") from None
        options = _mmiu_options(r)
        task = r.get(("task",), str, "mmiu")
        qid = r.get(("id", "question_id", "qid"), (str, int), f"{task}/{r.index}")
        questions.append(MMIUQuestion(qid=str(qid), images=images, question=question, options=options,
                                      answer=_letter(r, options, ("output", "answer")), task=task,
                                      relation=r.get(("relation", "relationship"), str, None) or _relation(images),
                                      scenario=r.get(("context",), str, "").split(_CHOICES)[0].strip()))
    return _unique(questions, path)


def _images(record: _Record) -> list[str]:
    value = record.get(("input_image_path", "images"), (list, str))
    name = next(n for n in ("input_image_path", "images") if n in record.data)
    images = [value] if isinstance(value, str) else value
    if not images:
        raise record.fail(name, "lists no image")
    for i, image in enumerate(images):
        if not isinstance(image, str) or not image.strip():
            raise record.fail(name, f"image {i} must be a non-empty path, got {image!r}")
    return [image.strip() for image in images]


def _mmiu_options(record: _Record) -> list[str]:
    """The options' texts from MMIU's ``"A: text\\nB: text"`` string or from a list."""
    value = record.get(("options",), (str, list))
    if isinstance(value, list):
        return _options(record, ("options",))
    lines: list[str] = []
    for line in value.strip().splitlines():
        match = _OPTION_PREFIX.match(line)
        if match and len(lines) < len(LETTERS) and match.group(1) == LETTERS[len(lines)]:
            lines.append(line.strip())
        elif lines:
            lines[-1] += "\n" + line
        else:
            raise record.fail("options", f"must start with an \"A: ...\" line, got {line!r}")
    record.data = {**record.data, "options": lines}  # checked and unprefixed as any list of options
    return _options(record, ("options",))


def _relation(images: list[str]) -> str:
    """The relation folder of ``RELATIONS`` the images are filed under, else ``"unknown"``."""
    folders = {part for image in images for part in Path(image).parts if part in RELATIONS}
    return folders.pop() if len(folders) == 1 else "unknown"


def evaluate_mmiu(questions: list[MMIUQuestion], image_folder, model: ChatModel | str | None, out_path,
                  limit: int | None = None, tasks=None, progress: bool = True,
                  generation: GenerationConfig | None = None, device: str = "auto", dtype: str = "auto") -> dict:
    """Answer and score MMIU ``questions``, one ``Dialogue`` turn each with the
    question's images as its media; returns ``summarize_mmiu`` of every selected
    question's result line, including those an earlier run wrote.

    Args:
        questions: from ``load_mmiu``.
        image_folder: the folder their image paths are relative to.
        model: a loaded ``ChatModel``, a hub id or folder, or None for the embedded default.
        out_path: the JSON Lines results file, appended to.
        limit: only the first this many (selected) questions.
        tasks: only questions of these tasks.
        progress: show a progress bar over questions.
        generation: how answers are generated (default ``GenerationConfig()``).
        device, dtype: where the model, encoder and memory run and the model's precision
            (``SessionConfig``).
    """
    folder = Path(image_folder)

    def answer(todo: list[MMIUQuestion]):
        config = SessionConfig(asr=False, device=device, dtype=dtype, generation=generation or GenerationConfig())
        # every question stands alone: no turns are replayed, and reset() drops its images after it
        with Dialogue(model, config, max_turns=0) as dialogue:
            for q in todo:
                yield _ask(dialogue, folder, q)

    selected = select(questions, tasks, limit)
    return summarize_mmiu(run_resumable(selected, out_path, folder, lambda q: q.images, "image", answer, progress))


def _ask(dialogue: Dialogue, folder: Path, q: MMIUQuestion) -> dict:
    dialogue.reset()
    for image in q.images:
        dialogue.add_image(folder / image)
    started = time.perf_counter()
    answer = dialogue.ask(f"{q.scenario}\n{mc_prompt(q)}" if q.scenario else mc_prompt(q))
    latency = time.perf_counter() - started
    choice = parse_choice(answer.text, q.options)
    return {"qid": q.qid, "task": q.task, "relation": q.relation, "images": len(q.images), "answer": answer.text,
            "reference": q.answer, "choice": choice, "correct": choice == q.answer, "score": float(choice == q.answer),
            "multiple_choice": True, "evidence": [[e.start, e.end, e.kind, e.score, e.source] for e in answer.evidence],
            "latency": latency}


def summarize_mmiu(rows: list[dict]) -> dict:
    """``{"overall": {n, correct, accuracy, unparsed}, "task": {task: {...}},
    "relation": {relation: {...}}}``; an answer no letter could be read from is
    counted in ``unparsed`` and scored wrong."""
    by_task = summarize(rows)
    overall = by_task.pop("overall")
    by_relation = summarize([{**row, "task": row["relation"]} for row in rows])  # summarize groups by "task"
    by_relation.pop("overall")
    return {"overall": overall, "task": by_task, "relation": by_relation}


def format_mmiu_summary(summary: dict) -> str:
    """Two tables, per task then per relation, each with the overall line last."""
    overall = {"overall": summary["overall"]}
    return (f"{format_summary({**summary['task'], **overall})}\n\n"
            f"{format_summary({**summary['relation'], **overall}, group='relation')}")


# -- a synthetic set with answers known by construction ------------------------------------

_SIZE = 64  # pixels, square images
_GREY, _WHITE, _RED, _BLUE = (96, 96, 96), (255, 255, 255), (220, 30, 30), (30, 60, 220)
_PALETTE = [(220, 30, 30), (30, 170, 60), (30, 60, 220), (230, 200, 40), (150, 60, 200)]
_IMAGE_OPTIONS = "\n".join(f"{LETTERS[i]}: Image {i + 1}" for i in range(4))


def make_mmiu_set(folder, seed: int = 0, per_task: int = 4) -> Path:
    """Write a small MMIU-format set into ``folder`` (PNG images and ``mmiu.json``, in
    MMIU's spelling) and return the annotation file. Three tasks, ``per_task`` records
    each, four 64x64 images a record, answers known by construction:

    - ``frame_ordering`` (relation ``Continuous-temporal``): the frames of a counting
      sequence (one to four white squares in a row), shuffled; which comes first?
    - ``odd_one_out`` (``Low-level-semantic``): three images of one colour and one of
      another; which differs?
    - ``counting`` (``High-level-obj-semantic``): each image shows a red or a blue
      square; how many show a red one (0-4)?
    """
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    records = []

    def write(relation: str, task: str, index: int, images: list[np.ndarray]) -> list[str]:
        paths = []
        for j, image in enumerate(images):
            path = f"./{relation}/{task}/{task}_{index}_{j}.png"
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / path)
            paths.append(path)
        return paths

    def record(relation: str, task: str, index: int, images, question: str, options: str, answer: int) -> None:
        records.append({"task": task, "visual_input_component": "Synthetic image", "source": "vstream",
                        "question": question, "options": options,
                        "input_image_path": write(relation, task, index, images), "output": LETTERS[answer]})

    for i in range(per_task):
        order = rng.permutation(4)  # order[j]: squares - 1 in image j
        record("Continuous-temporal", "frame_ordering", i, [_squares(int(n) + 1) for n in order],
               "These images are the frames of a counting sequence: one, two, three, then four white squares. "
               "Which image comes first in the sequence?", _IMAGE_OPTIONS, int(np.argmin(order)))
    for i in range(per_task):
        common, odd = rng.choice(len(_PALETTE), size=2, replace=False)
        position = int(rng.integers(4))
        colours = [_PALETTE[odd] if j == position else _PALETTE[common] for j in range(4)]
        record("Low-level-semantic", "odd_one_out", i, [_filled(colour) for colour in colours],
               "Three of these images have the same colour. Which image differs from the others?",
               _IMAGE_OPTIONS, position)
    for i in range(per_task):
        red = rng.random(4) < 0.5
        images = [_square(_RED if is_red else _BLUE, rng) for is_red in red]
        record("High-level-obj-semantic", "counting", i, images, "How many of the images show a red square?",
               "\n".join(f"{LETTERS[n]}: {n}" for n in range(5)), int(red.sum()))
    path = folder / "mmiu.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def _filled(colour) -> np.ndarray:
    image = np.empty((_SIZE, _SIZE, 3), np.uint8)
    image[:] = colour
    return image


def _squares(count: int) -> np.ndarray:
    """``count`` white 10-pixel squares in a row across the middle of a grey image."""
    image = _filled(_GREY)
    for k in range(count):
        image[27:37, 4 + 15 * k: 14 + 15 * k] = _WHITE
    return image


def _square(colour, rng: np.random.Generator) -> np.ndarray:
    """One 16-pixel square of ``colour`` at a random place on a grey image."""
    image = _filled(_GREY)
    y, x = rng.integers(0, _SIZE - 16, size=2)
    image[y: y + 16, x: x + 16] = colour
    return image
