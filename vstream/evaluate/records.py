"""Benchmark questions and the loaders of the annotation formats ``vstream eval`` reads.

Every loader turns a file into a list of ``Question`` and checks each record on the
way: a record that is malformed raises ``ConfigError`` naming the file, the record
(index and id) and the field. Files are JSON (a list of records, or an object whose
``"questions"``/``"data"`` value is that list) or JSON Lines (one record a line).

Fields accepted per format (the first name present is used):

- ``videomme`` (Video-MME; also MVBench-style flat files): ``question_id``,
  ``videoID`` | ``video`` | ``video_id`` (file name; ``.mp4`` added when it has no
  extension), ``question``, ``options`` | ``candidates`` (``["A. text", ...]`` or bare
  texts), ``answer`` (letter, or an option's text as MVBench gives it), ``task_type``
  | ``task`` (default ``"videomme"``). A record may instead hold the video's fields and
  a ``questions`` list (the per-video layout).
- ``egoschema``: ``q_uid``, ``video`` (default ``<q_uid>.mp4``), ``question``,
  ``option 0`` ... ``option 4`` (or ``options``), ``answer`` (index 0-4 or letter;
  merge ``subset_answers.json`` into the records first). Task ``"egoschema"``.
- ``streaming`` (StreamingBench, OVO-Bench backward/real-time): ``question_id`` |
  ``id``, ``video_path`` | ``video``, ``question``, ``options``, ``answer`` (letter)
  or ``gt`` (option index), the time asked: ``time_stamp`` (``"HH:MM:SS"``,
  ``"MM:SS"`` or seconds) | ``realtime`` | ``time``, ``task_type`` | ``task``
  (default ``"streaming"``). A record may hold the video's fields and a
  ``questions`` list (StreamingBench's per-video layout).
- ``vstreamqa`` (VStream-QA / RVS, open-ended): ``id`` | ``question_id``,
  ``video_id`` | ``video``, ``question``, ``answer`` (text), the time asked:
  ``end_time`` | ``time`` (seconds or a clock string), ``type`` | ``task`` (default
  ``"vstreamqa"``).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vstream.errors import ConfigError

LETTERS = string.ascii_uppercase
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])[.):]\s+")


@dataclass
class Question:
    """One benchmark question.

    Attributes:
        qid: the question's id, unique within its file.
        video: path of its video, relative to the video folder.
        question: the question text.
        options: the choices' texts, in letter order (A, B, ...); empty when open-ended.
        answer: the correct letter (multiple choice) or the reference text (open-ended).
        time: seconds into the video at which it is asked; None: after the whole clip.
        task: the benchmark's task or category, for the per-task summary.
    """

    qid: str
    video: str
    question: str
    options: list[str] = field(default_factory=list)
    answer: str = ""
    time: float | None = None
    task: str = "all"

    def __post_init__(self) -> None:
        if len(self.options) > len(LETTERS):
            raise ConfigError(f"question {self.qid}: {len(self.options)} options; at most {len(LETTERS)}")
        if self.options and self.answer not in LETTERS[: len(self.options)]:
            raise ConfigError(f"question {self.qid}: answer {self.answer!r} is not one of the "
                              f"{len(self.options)} option letters")
        if self.time is not None and self.time < 0:
            raise ConfigError(f"question {self.qid}: time {self.time} s is negative")

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)


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
    texts = []
    for i, option in enumerate(options):
        if not isinstance(option, str) or not option.strip():
            raise record.fail(name, f"option {i} must be a non-empty string, got {option!r}")
        match = _OPTION_PREFIX.match(option)
        if match and match.group(1) == LETTERS[i]:
            option = option[match.end():]
        texts.append(option.strip())
    return texts


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
    """Video-MME (and MVBench-style) multiple choice over the whole clip."""
    questions = []
    for r in read_records(path):
        options = _options(r)
        questions.append(_make(r, qid=_qid(r, ("question_id", "qid", "id")),
                               video=_video(r, ("videoID", "video", "video_id")),
                               question=r.get(("question",), str), options=options, answer=_letter(r, options),
                               task=r.get(("task_type", "task"), str, "videomme")))
    return _unique(questions, path)


def load_egoschema(path) -> list[Question]:
    """EgoSchema: five options ``option 0``..``option 4``, answer an index or letter."""
    questions = []
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
        video = _video(r, ("video",)) if "video" in r.data else qid + ".mp4"
        questions.append(_make(r, qid=qid, video=video, question=r.get(("question",), str), options=options,
                               answer=_letter(r, options), task=r.get(("task",), str, "egoschema")))
    return _unique(questions, path)


def load_streaming(path) -> list[Question]:
    """StreamingBench / OVO-Bench: multiple choice asked at a time in the stream."""
    questions = []
    for r in read_records(path):
        options = _options(r)
        video = _video(r, ("video_path", "video"))
        qid = _qid(r, ("question_id", "qid", "id")) if any(k in r.data for k in ("question_id", "qid", "id")) \
            else f"{video}#{r.index}"
        questions.append(_make(r, qid=qid, video=video, question=r.get(("question",), str), options=options,
                               answer=_letter(r, options, index_names=("gt",)),
                               time=_time(r, ("time_stamp", "realtime", "time")),
                               task=r.get(("task_type", "task"), str, "streaming")))
    return _unique(questions, path)


def load_vstreamqa(path) -> list[Question]:
    """VStream-QA / RVS: open-ended, asked at ``end_time`` seconds."""
    questions = []
    for r in read_records(path):
        questions.append(_make(r, qid=_qid(r, ("id", "question_id", "qid")), video=_video(r, ("video_id", "video")),
                               question=r.get(("question",), str), answer=r.get(("answer",), str),
                               time=_time(r, ("end_time", "time")), task=r.get(("type", "task"), str, "vstreamqa")))
    return _unique(questions, path)


def _unique(questions: list[Question], path) -> list[Question]:
    seen = set()
    for i, q in enumerate(questions):
        if q.qid in seen:
            raise ConfigError(f"{path}: record {i}: field 'qid' repeats the id {q.qid!r}")
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


def load_questions(path, format: str) -> list[Question]:
    """The questions of the annotation file ``path`` in ``format`` (see ``list_formats``)."""
    if format not in LOADERS:
        raise ConfigError(f"unknown annotation format {format!r}; known: {', '.join(list_formats())}")
    return LOADERS[format](Path(path))
