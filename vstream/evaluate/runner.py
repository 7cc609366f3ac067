"""``evaluate``: run a model over benchmark questions, one session per video.

The stream protocol: a video's frames (and audio) are pushed in time order; a question
asked at ``time`` T is asked once every item up to T is in the memories and nothing
after it has been pushed, so the model sees only what came before the question.
Questions without a time are asked after the whole clip. Each answer is appended to
the results file as one JSON line as soon as it is scored, so a run that stops can be
resumed: questions whose ``qid`` is already in the file are skipped.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from vstream.errors import ConfigError, SourceError
from vstream.evaluate.records import Question
from vstream.evaluate.scoring import mc_prompt, parse_choice, score_open
from vstream.ingest import open_source
from vstream.models import ChatModel, GenerationConfig, load_model
from vstream.session import Session, SessionConfig
from vstream.types import Frame

log = logging.getLogger(__name__)


def select(questions: list[Question], tasks=None, limit: int | None = None) -> list[Question]:
    """The questions of ``tasks`` (all when None), the first ``limit`` of them."""
    if tasks is not None:
        tasks = set(tasks)
        known = {q.task for q in questions}
        if unknown := tasks - known:
            raise ConfigError(f"no questions of task(s) {', '.join(sorted(unknown))}; "
                              f"tasks: {', '.join(sorted(known))}")
        questions = [q for q in questions if q.task in tasks]
    if limit is not None:
        if not (isinstance(limit, int) and limit > 0):
            raise ConfigError(f"limit must be a positive integer, got {limit!r}")
        questions = questions[:limit]
    return questions


def read_results(out_path) -> dict[str, dict]:
    """The result lines already in ``out_path`` by qid (a torn last line is ignored)."""
    path = Path(out_path)
    done = {}
    if path.is_file():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                done[str(row["qid"])] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s: line %d is not a result line; it is ignored and its question asked again", path, n)
    return done


def evaluate(questions: list[Question], video_folder, model: ChatModel | str | None, out_path,
             fps: float = 1.0, limit: int | None = None, tasks=None, progress: bool = True, asr: bool = True,
             generation: GenerationConfig | None = None) -> dict:
    """Answer and score ``questions`` (see the module docstring); returns ``summarize``
    of every selected question's result line, including those done by an earlier run.

    Args:
        questions: from ``load_questions``.
        video_folder: the folder their ``video`` paths are relative to.
        model: a loaded ``ChatModel`` (shared by every video's session), a hub id or
            folder, or None for the embedded default.
        out_path: the JSON Lines results file, appended to.
        fps: frames sampled per second of video.
        limit: only the first this many (selected) questions.
        tasks: only questions of these tasks.
        progress: show a progress bar over questions.
        asr: transcribe the audio.
        generation: how answers are generated (default ``GenerationConfig()``).
    """
    selected = select(questions, tasks, limit)
    out_path = Path(out_path)
    done = read_results(out_path)
    todo = [q for q in selected if q.qid not in done]
    folder = Path(video_folder)
    missing = sorted({q.video for q in todo if not (folder / q.video).is_file()})
    if missing:
        raise SourceError(f"{folder}: {len(missing)} video(s) missing, e.g. {', '.join(missing[:3])}")
    if todo:
        chat = model if isinstance(model, ChatModel) else load_model(model)
        config = SessionConfig(fps=fps, asr=asr, generation=generation or GenerationConfig())
        by_video: dict[str, list[Question]] = defaultdict(list)
        for q in todo:
            by_video[q.video].append(q)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("a", encoding="utf-8") as out, \
                tqdm(total=len(todo), unit="q", desc="evaluating", disable=not progress) as bar:
            for video, video_questions in by_video.items():
                with Session(chat, config) as session:
                    for row in _run_video(session, folder / video, video_questions, fps, asr):
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        done[row["qid"]] = row
                        bar.update(1)
    return summarize([done[q.qid] for q in selected])


def _run_video(session: Session, path: Path, questions: list[Question], fps: float, asr: bool):
    """Feed ``path`` in time order, yielding each question's result line when asked."""
    timed = sorted((q for q in questions if q.time is not None), key=lambda q: q.time)
    whole = [q for q in questions if q.time is None]
    if not timed:
        session.ingest(str(path), progress=False)
    else:
        with open_source(str(path), fps=fps, audio=asr) as source:
            for item in source:
                t = item.t if isinstance(item, Frame) else item.end
                while timed and t > timed[0].time:
                    session.wait()
                    yield _ask(session, timed.pop(0))
                if isinstance(item, Frame):
                    session.push_frame(item, wait=True)
                else:
                    session.push_audio(item, wait=True)
        session.wait()
    for q in timed + whole:  # asked at or after the end of the clip
        yield _ask(session, q)


def _ask(session: Session, q: Question) -> dict:
    seen = session.stats
    started = time.perf_counter()
    answer = session.ask(mc_prompt(q))
    latency = time.perf_counter() - started
    row = {"qid": q.qid, "task": q.task, "video": q.video, "time": q.time, "answer": answer.text,
           "reference": q.answer}
    if q.options:
        choice = parse_choice(answer.text, q.options)
        row.update(choice=choice, correct=choice == q.answer, score=float(choice == q.answer))
    else:
        scored = score_open(answer.text, q.answer)
        row.update(choice=None, correct=scored.correct, score=scored.score)
    row.update(multiple_choice=bool(q.options),
               evidence=[[e.start, e.end, e.kind, e.score] for e in answer.evidence],
               seen_until=seen.last_t if seen.frames_processed else None,
               frames_seen=seen.frames_processed, latency=latency)
    return row


def summarize(rows: list[dict]) -> dict:
    """``{task: {n, correct, accuracy, unparsed}, "overall": {...}}``; ``unparsed``
    counts multiple-choice answers no letter could be read from (scored wrong)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["task"]].append(row)
    summary = {task: _tally(group) for task, group in sorted(groups.items())}
    summary["overall"] = _tally(rows)
    return summary


def _tally(rows: list[dict]) -> dict:
    correct = sum(bool(r["correct"]) for r in rows)
    unparsed = sum(1 for r in rows if r.get("multiple_choice") and r.get("choice") is None)
    return {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else 0.0,
            "unparsed": unparsed}


def format_summary(summary: dict) -> str:
    """The summary as a table, one task a line, overall last."""
    width = max([len("task")] + [len(t) for t in summary])
    lines = [f"{'task':<{width}}  {'n':>5}  {'correct':>7}  {'accuracy':>8}  {'unparsed':>8}"]
    for task, s in summary.items():
        lines.append(f"{task:<{width}}  {s['n']:>5}  {s['correct']:>7}  {100 * s['accuracy']:>7.1f}%  "
                     f"{s['unparsed']:>8}")
    return "\n".join(lines)
