"""Benchmark questions and the loaders of the annotation formats ``vstream eval`` reads.

Every loader turns a file into a list of ``Question`` and checks each record on the
way: a record that is malformed raises ``ConfigError`` naming the file, the record
(index and id) and the field. Files are JSON (a list of records, or an object whose
``"questions"``/``"data"`` value is that list) or JSON Lines (one record a line).

Fields accepted per format (the first name present is used), as in the benchmarks'
released files:

- ``videomme`` (Video-MME; MVBench's per-task files): ``question_id`` (default
  ``<file stem>-<index>``: MVBench has none), ``videoID`` | ``video`` | ``video_id``
  (file name; ``.mp4`` added when it has no extension), ``question``, ``options`` |
  ``candidates`` (``["A. text", ...]`` or bare texts), ``answer`` (letter, or an
  option's text as MVBench gives it), ``task_type`` | ``task`` (default: the file's
  stem, e.g. ``action_sequence``). A record may instead hold the video's fields and a
  ``questions`` list (the per-video layout).
- ``egoschema``: ``q_uid``, ``video`` (default ``<q_uid>.mp4``), ``question``,
  ``option 0`` ... ``option 4`` (or ``options``), ``answer`` (index 0-4 or letter).
  The public answers come apart, as ``subset_answers.json`` (``{q_uid: index}``): it is
  merged when given (``answers``) or found beside the questions. Questions left
  without an answer are skipped, with a warning that counts them. Task ``"egoschema"``.
- ``streaming`` (StreamingBench, OVO-Bench): ``question_id`` | ``id`` (default
  ``<video>#<index>``), ``video_path`` | ``video``, ``question``, ``options``,
  ``answer`` (letter) or ``gt`` (option index), the time asked: ``time_stamp``
  (``"HH:MM:SS"``, ``"MM:SS"`` or seconds) | ``realtime`` | ``time``, ``task_type`` |
  ``task`` (default ``"streaming"``). A record may hold the video's fields and a
  ``questions`` list (StreamingBench's per-video layout). OVO-Bench's forward active
  responding records (tasks REC, SSR, CRR) hold ``test_info`` instead: a list of probes
  ``{realtime, count}`` (REC: how many times ``activity`` happened so far),
  ``{realtime, step, type}`` (SSR: is ``step`` being done now; type 1 yes, 0 no) or
  ``{realtime, type}`` (CRR: can ``question`` be answered yet). Each probe becomes a
  ``Question`` ``<id>@<n>`` asked at its ``realtime``, with the record's id as ``parent``.
- ``vstreamqa`` (VStream-QA / RVS, open-ended): ``id`` | ``question_id``,
  ``video_id`` | ``video``, ``question``, ``answer`` (text), the time asked:
  ``end_time`` | ``time`` (seconds or a clock string; none: after the whole clip, as in
  the offline VS-Ego / VS-Movie files), ``type`` | ``answer_type`` | ``task`` (default
  ``"vstreamqa"``).
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vstream.errors import ConfigError

LETTERS = string.ascii_uppercase
KINDS = ("choice", "open", "yesno", "count")
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])[.):]\s*")
log = logging.getLogger(__name__)


@dataclass
class Question:
    """One benchmark question.

    Attributes:
        qid: the question's id, unique within its file.
        video: path of its video, relative to the video folder.
        question: the question text (for OVO-Bench's probes: the whole prompt).
        options: the choices' texts, in letter order (A, B, ...); empty unless ``kind``
            is ``"choice"``.
        answer: the correct letter (``"choice"``), the reference text (``"open"``),
            ``"Yes"``/``"No"`` (``"yesno"``) or a whole number (``"count"``).
        time: seconds into the video at which it is asked; None: after the whole clip.
        task: the benchmark's task or category, for the per-task summary.
        kind: how the answer is scored, one of ``KINDS`` (default: ``"choice"`` with
            options, ``"open"`` without).
        parent: the record a probe came from (OVO-Bench forward responding), else None.
    """

    qid: str
    video: str
    question: str
    options: list[str] = field(default_factory=list)
    answer: str = ""
    time: float | None = None
    task: str = "all"
    kind: str = ""
    parent: str | None = None

    def __post_init__(self) -> None:
        self.kind = self.kind or ("choice" if self.options else "open")
        if self.kind not in KINDS:
            raise ConfigError(f"question {self.qid}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if len(self.options) > len(LETTERS):
            raise ConfigError(f"question {self.qid}: {len(self.options)} options; at most {len(LETTERS)}")
        if (self.kind == "choice") != bool(self.options):
            raise ConfigError(f"question {self.qid}: a {self.kind!r} question has {len(self.options)} options")
        if self.kind == "choice" and self.answer not in LETTERS[: len(self.options)]:
            raise ConfigError(f"question {self.qid}: answer {self.answer!r} is not one of the "
                              f"{len(self.options)} option letters")
        if self.kind == "yesno" and self.answer not in ("Yes", "No"):
            raise ConfigError(f"question {self.qid}: answer {self.answer!r} must be Yes or No")
        if self.kind == "count" and not self.answer.isdigit():
            raise ConfigError(f"question {self.qid}: answer {self.answer!r} must be a whole number")
        if self.time is not None and self.time < 0:
            raise ConfigError(f"question {self.qid}: time {self.time} s is negative")

    @property
    def multiple_choice(self) -> bool:
        return self.kind == "choice"


class _Record:
    """One raw record, with the file and position to name in errors."""

    def __init__(self, path: Path, index: int, data: dict):
        self.path, self.index, self.data = path, index, data

    def where(self) -> str:
        rid = next((self.data[k] for k in ("question_id", "qid", "q_uid", "id") if k in self.data), None)
        return f"{self.path}: record {self.index}" + (f" (id {rid})" if rid is not None else "")

    def fail(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"{self.where()}: field {name!r} {why}")

    def get(self, names: tuple[str, ...], kinds: type | tuple, default=..., label: str | None = None):
        for name in names:
            if name in self.data:
                value = self.data[name]
                if not isinstance(value, kinds) or isinstance(value, bool):
                    raise self.fail(name, f"must be {_kind_name(kinds)}, got {value!r}")
                if isinstance(value, str) and not value.strip():
                    raise self.fail(name, "is empty")
                return value
        if default is ...:
            raise self.fail(label or names[0], "is missing" + (f" (also read as {', '.join(names[1:])})"
                                                               if len(names) > 1 else ""))
        return default


def _kind_name(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def read_records(path) -> list[_Record]:
    """The raw records of a JSON or JSON Lines file, per-video layouts flattened."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such annotation file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: line {n} is not JSON: {e.msg}") from None
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not JSON (line {e.lineno}): {e.msg}") from None
        if isinstance(items, dict):
            items = next((items[k] for k in ("questions", "data") if isinstance(items.get(k), list)), None)
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list of records (or an object with a 'questions' list)")
    records = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("questions"), list):  # per-video layout
            shared = {k: v for k, v in item.items() if k != "questions"}
            for sub in item["questions"]:
                records.append(_Record(path, len(records), {**shared, **sub} if isinstance(sub, dict) else sub))
        else:
            records.append(_Record(path, len(records), item))
    for record in records:
        if not isinstance(record.data, dict):
            raise ConfigError(f"{path}: record {record.index} must be a JSON object, got {record.data!r}")
    return records


def _video(record: _Record, names: tuple[str, ...]) -> str:
    value = record.get(names, (str, int))
    video = str(value)
    return video if Path(video).suffix else video + ".mp4"


def _options(record: _Record, names: tuple[str, ...] = ("options", "candidates")) -> list[str]:
    options = record.get(names, list)
    name = next(n for n in names if n in record.data)
    if len(options) < 2:
        raise record.fail(name, f"needs at least 2 options, got {len(options)}")
    if len(options) > len(LETTERS):
        raise record.fail(name, f"has {len(options)} options; at most {len(LETTERS)}")
    for i, option in enumerate(options):
        if not isinstance(option, str) or not option.strip():
            raise record.fail(name, f"option {i} must be a non-empty string, got {option!r}")
    # "A. text", "(B) text", "C.text" (StreamingBench): dropped when every option carries its own letter
    matches = [_OPTION_PREFIX.match(option) for option in options]
    if all(m and m.group(1) == LETTERS[i] and option[m.end():].strip()
           for i, (m, option) in enumerate(zip(matches, options))):
        options = [option[m.end():] for m, option in zip(matches, options)]
    return [option.strip() for option in options]


def _letter(record: _Record, options: list[str], names: tuple[str, ...] = ("answer",),
            index_names: tuple[str, ...] = ()) -> str:
    """The answer letter, from a letter field or an option-index field."""
    for name in index_names:
        if name in record.data:
            value = record.get((name,), int)
            if not 0 <= value < len(options):
                raise record.fail(name, f"option index {value} is outside 0..{len(options) - 1}")
            return LETTERS[value]
    value = record.get(names, (str, int), label=names[0])
    name = next(n for n in names if n in record.data)
    if isinstance(value, int):
        if not 0 <= value < len(options):
            raise record.fail(name, f"option index {value} is outside 0..{len(options) - 1}")
        return LETTERS[value]
    if value.strip() in options:  # MVBench: the answer is the option's text
        return LETTERS[options.index(value.strip())]
    letter = value.strip().strip("().").upper()
    if letter not in LETTERS[: len(options)]:
        raise record.fail(name, f"must be one of the letters {LETTERS[0]}-{LETTERS[len(options) - 1]}, got {value!r}")
    return letter


def parse_time(value, record: _Record, name: str) -> float:
    """Seconds from a number or a ``"HH:MM:SS(.s)"`` / ``"MM:SS"`` string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = 0.0
            for part in value.strip().split(":"):
                seconds = seconds * 60 + float(part)
        except ValueError:
            raise record.fail(name, f"must be seconds or HH:MM:SS, got {value!r}") from None
        if value.count(":") > 2:
            raise record.fail(name, f"must be seconds or HH:MM:SS, got {value!r}")
    else:
        raise record.fail(name, f"must be seconds or HH:MM:SS, got {value!r}")
    if not seconds >= 0:
        raise record.fail(name, f"must be a non-negative time, got {value!r}")
    return seconds


def _time(record: _Record, names: tuple[str, ...]) -> float:
    for name in names:
        if name in record.data:
            return parse_time(record.data[name], record, name)
    raise record.fail(names[0], "is missing" + (f" (also read as {', '.join(names[1:])})" if len(names) > 1 else ""))


def _qid(record: _Record, names: tuple[str, ...]) -> str:
    return str(record.get(names, (str, int)))


def _make(record: _Record, **fields) -> Question:
    try:
        return Question(**fields)
    except ConfigError as e:
        raise ConfigError(f"{record.where()}: {e}") from None


def load_videomme(path) -> list[Question]:
    """Video-MME and MVBench: multiple choice over the whole clip."""
    path = Path(path)
    questions = []
    for r in read_records(path):
        options = _options(r)
        qid = _qid(r, ("question_id", "qid", "id")) if _has(r, ("question_id", "qid", "id")) else f"{path.stem}-{r.index}"
        questions.append(_make(r, qid=qid, video=_video(r, ("videoID", "video", "video_id")),
                               question=r.get(("question",), str), options=options, answer=_letter(r, options),
                               task=r.get(("task_type", "task"), str, path.stem)))
    return _unique(questions, path)


def load_egoschema(path, answers=None) -> list[Question]:
    """EgoSchema: five options ``option 0``..``option 4``, answer an index or letter,
    from the record or from ``answers`` (default: ``subset_answers.json`` beside ``path``
    when there is one). Questions without an answer are skipped, with a warning."""
    path = Path(path)
    answers_path = Path(answers) if answers is not None else path.with_name("subset_answers.json")
    known = _read_answers(answers_path, required=answers is not None)
    questions, unanswered = [], 0
    for r in read_records(path):
        if "options" in r.data:
            options = _options(r)
        else:
            keys = sorted((k for k in r.data if re.fullmatch(r"option \d+", k)), key=lambda k: int(k.split()[1]))
            if len(keys) < 2:
                raise r.fail("option 0", "is missing: EgoSchema records hold 'option 0' ... 'option 4'")
            r.data["options"] = [r.data[k] for k in keys]
            options = _options(r)
        qid = _qid(r, ("q_uid", "qid", "id"))
        if "answer" not in r.data and qid in known:
            r.data[f"answer in {answers_path}"] = known[qid]
        if not _has(r, ("answer", f"answer in {answers_path}")):
            unanswered += 1
            continue
        video = _video(r, ("video",)) if "video" in r.data else qid + ".mp4"
        questions.append(_make(r, qid=qid, video=video, question=r.get(("question",), str), options=options,
                               answer=_letter(r, options, ("answer", f"answer in {answers_path}")),
                               task=r.get(("task",), str, "egoschema")))
    if unanswered:
        log.warning("%s: %d of %d questions have no answer (none in the record or the answers file): skipped",
                    path, unanswered, unanswered + len(questions))
    return _unique(questions, path)


def _read_answers(path: Path, required: bool) -> dict:
    """``{q_uid: answer}`` from an EgoSchema answers file; {} when an optional one is absent."""
    if not path.is_file():
        if required:
            raise ConfigError(f"{path}: no such answers file")
        return {}
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(answers, dict):
        raise ConfigError(f"{path}: expected an object {{q_uid: answer}}, got {type(answers).__name__}")
    return answers


# OVO-Bench forward active responding: the prompt asked at every probe, and the probe's expected answer
_FORWARD = {
    "REC": ("count", "count", (
        "People in the video may repeat one kind of action: {activity}. How many times has it been done so far, "
        "by anyone? One complete motion counts once. Answer with a single number.")),
    "SSR": ("yesno", "type", (
        "This tutorial video goes through a sequence of steps. One of them is: {step}. Is the person in the video "
        "doing this step right now? Answer only Yes or No.")),
    "CRR": ("yesno", "type", (
        "Question about the latest frames of the video: {question} Does what has been shown so far, the latest "
        "frames especially, give enough information to answer it? Answer only Yes or No.")),
}


def _probes(r: _Record, video: str) -> list[Question]:
    """The probes of an OVO-Bench forward active responding record (see the module docstring)."""
    task = r.get(("task",), str)
    if task not in _FORWARD:
        raise r.fail("task", f"must be one of {', '.join(_FORWARD)} for a record with 'test_info', got {task!r}")
    kind, expected, prompt = _FORWARD[task]
    parent = _qid(r, ("id", "question_id", "qid"))
    probes = r.get(("test_info",), list)
    if not probes:
        raise r.fail("test_info", "is empty")
    questions = []
    for n, probe in enumerate(probes):
        if not isinstance(probe, dict):
            raise r.fail("test_info", f"probe {n} must be an object, got {probe!r}")
        at = f"test_info[{n}]."  # a probe's own fields, named with their place in the record
        p = _Record(r.path, r.index, {"id": parent, **{at + k: v for k, v in probe.items()}})
        value = p.get((at + expected,), int)
        if value < 0 or (kind == "yesno" and value not in (0, 1)):
            raise p.fail(at + expected, f"must be {'0 or 1' if kind == 'yesno' else '>= 0'}, got {value}")
        fields = {"activity": r.get(("activity",), str) if task == "REC" else None,
                  "step": p.get((at + "step",), str) if task == "SSR" else None,
                  "question": r.get(("question",), str) if task == "CRR" else None}
        answer = str(value) if kind == "count" else ("Yes" if value else "No")
        questions.append(_make(r, qid=f"{parent}@{n}", video=video, question=prompt.format(**fields), answer=answer,
                               time=_time(p, (at + "realtime",)), task=task, kind=kind, parent=parent))
    return questions


def load_streaming(path) -> list[Question]:
    """StreamingBench / OVO-Bench: multiple choice asked at a time in the stream, and
    OVO-Bench's forward-responding probes."""
    questions = []
    for r in read_records(path):
        video = _video(r, ("video_path", "video"))
        if "test_info" in r.data:
            questions.extend(_probes(r, video))
            continue
        options = _options(r)
        qid = _qid(r, ("question_id", "qid", "id")) if _has(r, ("question_id", "qid", "id")) else f"{video}#{r.index}"
        questions.append(_make(r, qid=qid, video=video, question=r.get(("question",), str), options=options,
                               answer=_letter(r, options, index_names=("gt",)),
                               time=_time(r, ("time_stamp", "realtime", "time")),
                               task=r.get(("task_type", "task"), str, "streaming")))
    return _unique(questions, path)


def load_vstreamqa(path) -> list[Question]:
    """VStream-QA / RVS: open-ended, asked at ``end_time`` seconds (or after the clip)."""
    questions = []
    for r in read_records(path):
        time = _time(r, ("end_time", "time")) if _has(r, ("end_time", "time")) else None
        questions.append(_make(r, qid=_qid(r, ("id", "question_id", "qid")), video=_video(r, ("video_id", "video")),
                               question=r.get(("question",), str), answer=r.get(("answer",), str), time=time,
                               task=str(r.get(("type", "answer_type", "task"), (str, int), "vstreamqa"))))
    return _unique(questions, path)


def _has(record: _Record, names: tuple[str, ...]) -> bool:
    return any(name in record.data for name in names)


def _unique(questions: list[Question], path) -> list[Question]:
    seen = set()
    for i, q in enumerate(questions):
        if q.qid in seen:
            raise ConfigError(f"{path}: question {i}: field 'qid' repeats the id {q.qid!r}")
        seen.add(q.qid)
    return questions


LOADERS: dict[str, Callable[[Path], list[Question]]] = {
    "videomme": load_videomme,
    "egoschema": load_egoschema,
    "streaming": load_streaming,
    "vstreamqa": load_vstreamqa,
}


def list_formats() -> list[str]:
    return sorted(LOADERS)


def load_questions(path, format: str, answers=None) -> list[Question]:
    """The questions of the annotation file ``path`` in ``format`` (see ``list_formats``);
    ``answers``: an EgoSchema answers file to merge (egoschema only)."""
    if format not in LOADERS:
        raise ConfigError(f"unknown annotation format {format!r}; known: {', '.join(list_formats())}")
    if format == "egoschema":
        return load_egoschema(Path(path), answers)
    if answers is not None:
        raise ConfigError(f"an answers file ({answers}) is merged into egoschema questions only, not {format}")
    return LOADERS[format](Path(path))
