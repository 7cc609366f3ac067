"""``evaluate``: run a model over benchmark questions, one session per video.

The stream protocol: a video's frames (and audio) are pushed in time order; a question
asked at ``time`` T is asked once every item up to T is in the memories and nothing
after it has been pushed, so the model sees only what came before the question.
Questions without a time are asked after the whole clip. With ``realtime`` the clip is
read as if live: items are released at its own pace (wall clock) instead of as fast as
the session takes them, and frames the model falls behind on are dropped (a warning
counts them). A model that keeps up gives the same answers in both modes.

Each answer is scored deterministically (``scoring.score_answer``) and, for open-ended
questions when a judge is given, by the judge too; it is appended to the results file
as one JSON line as soon as it is scored, so a run that stops can be resumed:
questions whose ``qid`` is already in the file are skipped.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from vstream.errors import ConfigError, SourceError
from vstream.evaluate.judges import Judge
from vstream.evaluate.records import Question
from vstream.evaluate.scoring import mc_prompt, score_answer
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


def open_results(out_path: Path):
    """``out_path`` opened for appending result lines; a torn last line (a run killed
    mid-write) is ended first, so the next line is not glued onto it."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out = out_path.open("a+b")
    if out.tell() > 0:
        out.seek(-1, 2)
        if out.read(1) != b"\n":
            out.write(b"\n")
    out.close()
    return out_path.open("a", encoding="utf-8")


def evaluate(questions: list[Question], video_folder, model: ChatModel | str | None, out_path,
             fps: float = 1.0, limit: int | None = None, tasks=None, progress: bool = True, asr: bool = True,
             generation: GenerationConfig | None = None, realtime: bool = False, judge: Judge | None = None,
             device: str = "auto", dtype: str = "auto") -> dict:
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
        realtime: read each clip as if live, at its own pace (frames the model falls
            behind on are dropped) instead of as fast as the session takes them.
        judge: also score open-ended answers with this ``Judge``.
        device, dtype: where the model, encoder and memory run and the model's
            precision (``SessionConfig``); a loaded ``model`` stays where it is.
    """
    folder = Path(video_folder)

    def answer(todo: list[Question]):
        chat = model if isinstance(model, ChatModel) else load_model(model, dtype, device)
        config = SessionConfig(fps=fps, asr=asr, device=device, dtype=dtype, generation=generation or GenerationConfig())
        by_video: dict[str, list[Question]] = defaultdict(list)
        for q in todo:
            by_video[q.video].append(q)
        for video, video_questions in by_video.items():
            with Session(chat, config) as session:
                yield from _run_video(session, folder / video, video_questions, fps, asr, realtime, judge)

    selected = select(questions, tasks, limit)
    return summarize(run_resumable(selected, out_path, folder, lambda q: [q.video], "video", answer, progress))


def run_resumable(selected: list, out_path, folder: Path, files, what: str, answer, progress: bool) -> list[dict]:
    """The result lines of ``selected`` questions, in order: those ``out_path`` already
    holds, and those ``answer(todo)`` yields for the rest, each appended to the file as
    it comes. ``files(q)`` names a question's files under ``folder`` (``what`` they are,
    for the message); any missing is refused before a model loads."""
    out_path = Path(out_path)
    done = read_results(out_path)
    todo = [q for q in selected if q.qid not in done]
    missing = sorted({name for q in todo for name in files(q) if not (folder / name).is_file()})
    if missing:
        raise SourceError(f"{folder}: {len(missing)} {what}(s) missing, e.g. {', '.join(missing[:3])}")
    if todo:
        with open_results(out_path) as out, \
                tqdm(total=len(todo), unit="q", desc="evaluating", disable=not progress) as bar:
            for row in answer(todo):
                out.write(json.dumps(row) + "\n")
                out.flush()
                done[row["qid"]] = row
                bar.update(1)
    return [done[q.qid] for q in selected]


def _run_video(session: Session, path: Path, questions: list[Question], fps: float, asr: bool, realtime: bool,
               judge: Judge | None):
    """Feed ``path`` in time order, yielding each question's result line when asked."""
    timed = sorted((q for q in questions if q.time is not None), key=lambda q: q.time)
    whole = [q for q in questions if q.time is None]
    with open_source(str(path), fps=fps, audio=asr, realtime=realtime) as source:
        for item in source:
            t = item.t if isinstance(item, Frame) else item.end
            while timed and t > timed[0].time:
                session.wait()
                yield _ask(session, timed.pop(0), judge)
            if isinstance(item, Frame):
                session.push_frame(item, wait=True)
            else:
                session.push_audio(item, wait=True)
    if source.stats.dropped:
        log.warning("%s: %d frames dropped: the model fell behind the clip's pace", path, source.stats.dropped)
    session.wait()
    for q in timed + whole:  # asked at or after the end of the clip
        yield _ask(session, q, judge)


def _ask(session: Session, q: Question, judge: Judge | None) -> dict:
    seen = session.stats
    started = time.perf_counter()
    answer = session.ask(mc_prompt(q))
    latency = time.perf_counter() - started
    scored = score_answer(q, answer.text)
    row = {"qid": q.qid, "task": q.task, "video": q.video, "time": q.time, "answer": answer.text,
           "reference": q.answer, "kind": q.kind, "parent": q.parent, "choice": scored.choice,
           "correct": scored.correct, "score": scored.score, "multiple_choice": q.multiple_choice,
           "evidence": [[e.start, e.end, e.kind, e.score] for e in answer.evidence],
           "seen_until": seen.last_t if seen.frames_processed else None,
           "frames_seen": seen.frames_processed, "latency": latency}
    if judge is not None and q.kind == "open":
        verdict = judge.judge(q.question, q.answer, answer.text)
        row.update(judge=judge.name, judge_correct=verdict.correct, judge_score=verdict.score,
                   judge_reason=verdict.reason)
    return row


def summarize(rows: list[dict]) -> dict:
    """``{task: {n, correct, accuracy, unparsed[, judge]}, "overall": {...}}``.

    ``unparsed`` counts answers to multiple-choice, yes/no and count questions that
    nothing could be read from (scored wrong). ``judge``, present when a judge scored
    some of the rows: ``{n, accuracy, mean_score, unparsed}`` over those rows (an
    unreadable verdict counts as wrong; ``mean_score`` is None when no reply gave one).
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["task"]].append(row)
    summary = {task: _tally(group) for task, group in sorted(groups.items())}
    summary["overall"] = _tally(rows)
    return summary


def _tally(rows: list[dict]) -> dict:
    correct = sum(bool(r["correct"]) for r in rows)
    unparsed = sum(1 for r in rows if _kind(r) != "open" and r.get("choice") is None)
    tally = {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else 0.0,
             "unparsed": unparsed}
    judged = [r for r in rows if "judge_correct" in r]
    if judged:
        scores = [r["judge_score"] for r in judged if r["judge_score"] is not None]
        tally["judge"] = {"n": len(judged), "accuracy": sum(r["judge_correct"] is True for r in judged) / len(judged),
                          "mean_score": sum(scores) / len(scores) if scores else None,
                          "unparsed": sum(r["judge_correct"] is None for r in judged)}
    return tally


def _kind(row: dict) -> str:
    """The question kind of a result line (lines written before kinds existed: by ``multiple_choice``)."""
    return row.get("kind") or ("choice" if row.get("multiple_choice") else "open")


def format_summary(summary: dict, benchmark: str | None = None, group: str = "task") -> str:
    """The summary as a table, one ``group`` (task) a line, overall last; with the
    judge's columns when a judge ran, and the published figures of ``benchmark`` (a key
    of ``published.json``) below it."""
    width = max([len(group)] + [len(t) for t in summary])
    judged = any("judge" in s for s in summary.values())
    header = f"{group:<{width}}  {'n':>5}  {'correct':>7}  {'accuracy':>8}  {'unparsed':>8}"
    lines = [header + (f"  {'judged':>6}  {'judge acc':>9}  {'score':>5}" if judged else "")]
    for task, s in summary.items():
        line = f"{task:<{width}}  {s['n']:>5}  {s['correct']:>7}  {100 * s['accuracy']:>7.1f}%  {s['unparsed']:>8}"
        if "judge" in s:
            j = s["judge"]
            score = f"{j['mean_score']:.2f}" if j["mean_score"] is not None else "-"
            line += f"  {j['n']:>6}  {100 * j['accuracy']:>8.1f}%  {score:>5}"
        lines.append(line)
    if benchmark is not None:
        lines += published_lines(benchmark)
    return "\n".join(lines)


def published_figures() -> dict:
    """``published.json``: ``{"benchmarks": {key: {"name", "figures": [{model, value, setting, source, url}]}}}``."""
    return json.loads(resources.files("vstream.evaluate").joinpath("published.json").read_text(encoding="utf-8"))


def published_lines(benchmark: str) -> list[str]:
    """The lines ``format_summary`` prints for ``benchmark``'s published figures."""
    known = published_figures()["benchmarks"]
    if benchmark not in known:
        raise ConfigError(f"no published figures for benchmark {benchmark!r}; known: {', '.join(sorted(known))}")
    entry = known[benchmark]
    lines = [f"published on {entry['name']} (accuracy %, not comparable unless the setting matches):"]
    for f in entry["figures"]:
        lines.append(f"  {f['model']} {f['value']:.1f} ({f['setting']}; {f['source']}, {f['url']})")
    return lines
