"""The evaluation harness: annotation loaders, the letter parser, open-ended scoring,
the streaming runner (with a tiny random model: the harness is checked, not the model's
accuracy) and ``vstream eval``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

from vstream import synth
from vstream.cli import main
from vstream.errors import ConfigError, SourceError
from vstream.evaluate import (
    JudgeScore,
    ModelJudge,
    evaluate,
    format_summary,
    load_questions,
    mc_prompt,
    parse_choice,
    score_answer,
    score_open,
    summarize,
)
from vstream.evaluate.judges import JUDGE_SYSTEM
from vstream.evaluate.records import Question
from vstream.evaluate.scoring import Scored, parse_count, parse_yes_no
from vstream.models import GenerationConfig, load_model
from vstream.session import Session

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data" / "eval"
FIXTURES = {"videomme": DATA / "videomme.json", "egoschema": DATA / "egoschema.jsonl",
            "streaming": DATA / "streaming.json", "vstreamqa": DATA / "vstreamqa.json", "ovobench": DATA / "ovobench.json"}
FPS = 2.0
SHORT = GenerationConfig(max_new_tokens=4)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """The fixtures' clips, written at test time: red then blue; green then blue."""
    folder = tmp_path_factory.mktemp("eval-videos")
    synth.write_clip(folder / "clip_a.mp4", duration=6.0, fps=10.0, size=(64, 48), audio=False,
                     scenes=[(0.0, (220, 30, 30)), (3.0, (30, 30, 220))])
    synth.write_clip(folder / "clip_b.mp4", duration=6.0, fps=10.0, size=(64, 48), audio=False,
                     scenes=[(0.0, (30, 200, 30)), (2.0, (30, 30, 220))])
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("eval-model") / "llama")


@pytest.fixture(scope="module")
def model(model_folder):
    return load_model(str(model_folder))


# -- loaders ------------------------------------------------------------------------------


def test_videomme_loader_flattens_per_video_records():
    questions = load_questions(FIXTURES["videomme"], "videomme")
    assert [q.qid for q in questions] == ["001-1", "001-2", "002-1"]
    first = questions[0]
    assert first.video == "clip_a.mp4" and first.time is None and first.task == "Color Recognition"
    assert first.options == ["Red", "Green", "Blue", "Black"] and first.answer == "A"
    assert questions[2].video == "clip_b.mp4" and questions[2].answer == "C"


def test_egoschema_loader_reads_numbered_options_and_index_answers():
    questions = load_questions(FIXTURES["egoschema"], "egoschema")
    assert [q.qid for q in questions] == ["ego-1", "clip_b"]
    assert len(questions[0].options) == 5 and questions[0].answer == "C"
    assert questions[1].video == "clip_b.mp4" and questions[1].answer == "B"  # default: <q_uid>.mp4
    assert {q.task for q in questions} == {"egoschema"}


def test_streaming_loader_reads_timestamps_and_ovo_gt():
    questions = {q.qid: q for q in load_questions(FIXTURES["streaming"], "streaming")}
    assert questions["sb-1-q1"].time == 2.0 and questions["sb-1-q2"].time == 4.5
    assert questions["sb-1-q1"].video == "clip_a.mp4" and questions["sb-1-q2"].answer == "C"
    ovo = questions["ovo-1"]
    assert (ovo.time, ovo.answer, ovo.task, ovo.options) == (1.5, "B", "EPM", ["red", "green", "blue"])


def test_vstreamqa_loader_is_open_ended_at_end_time():
    questions = load_questions(FIXTURES["vstreamqa"], "vstreamqa")
    assert [(q.qid, q.time, q.options) for q in questions] == [("vs-1", 2.5, []), ("vs-2", 5.0, []),
                                                                 ("vs-3", 6.0, [])]
    assert questions[0].answer == "red" and questions[0].task == "colour" and questions[0].video == "clip_a.mp4"


def test_videomme_loader_reads_mvbench_candidates_and_text_answers(tmp_path):
    path = tmp_path / "action_sequence.json"
    path.write_text(json.dumps([{"video": "clip_a.mp4", "question": "What did the person do first?",
                                 "candidates": ["Sat down.", "Opened the door."], "answer": "Opened the door.",
                                 "question_id": "mv-1", "task": "Action Sequence"}]))
    (q,) = load_questions(path, "videomme")
    assert (q.options, q.answer, q.task) == (["Sat down.", "Opened the door."], "B", "Action Sequence")


def test_mvbench_records_without_ids_take_the_file_stem(tmp_path):
    path = tmp_path / "action_sequence.json"  # MVBench's layout: no id, no task, the answer as text
    path.write_text(json.dumps([{"video": "a.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "y"},
                                {"video": "b.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "x"}]))
    assert [(q.qid, q.task, q.answer) for q in load_questions(path, "videomme")] == [
        ("action_sequence-0", "action_sequence", "B"), ("action_sequence-1", "action_sequence", "A")]


def test_option_letters_are_dropped_only_when_every_option_has_its_own(tmp_path):
    record = {"question_id": "q", "videoID": "v", "question": "Q?", "answer": "B"}
    cases = [(["A.A man in black.", "B.A woman."], ["A man in black.", "A woman."]),  # StreamingBench, no space
             (["(A) x", "(B) y"], ["x", "y"]),
             (["A.M. shift", "P.M. shift"], ["A.M. shift", "P.M. shift"]),  # not letters: kept
             (["B. x", "A. y"], ["B. x", "A. y"])]
    for options, texts in cases:
        path = tmp_path / "q.json"
        path.write_text(json.dumps([{**record, "options": options}]))
        assert load_questions(path, "videomme")[0].options == texts, options


def test_ovobench_forward_records_become_timed_probes():
    questions = {q.qid: q for q in load_questions(FIXTURES["ovobench"], "streaming")}
    backward = questions["0"]
    assert (backward.kind, backward.answer, backward.time, backward.task) == ("choice", "B", 2.0, "EPM")
    rec = [questions[f"1@{n}"] for n in range(3)]
    assert [(q.kind, q.answer, q.time, q.parent, q.task) for q in rec] == [
        ("count", "0", 1.0, "1", "REC"), ("count", "1", 3.0, "1", "REC"), ("count", "1", 5.5, "1", "REC")]
    assert "changing the background colour" in rec[0].question and rec[0].options == []
    ssr = [questions[f"2@{n}"] for n in range(4)]
    assert [(q.answer, q.time) for q in ssr] == [("Yes", 1.0), ("No", 4.0), ("No", 2.5), ("Yes", 5.0)]
    assert "show a red screen" in ssr[0].question and "show a blue screen" in ssr[2].question
    crr = [questions[f"3@{n}"] for n in range(3)]
    assert [(q.kind, q.answer) for q in crr] == [("yesno", "No"), ("yesno", "No"), ("yesno", "Yes")]
    assert "What colour does the red background turn into?" in crr[0].question and "Blue" not in crr[0].question


@pytest.mark.parametrize(("change", "field"), [
    ({"task": "XYZ"}, "task"),
    ({"test_info": []}, "test_info"),
    ({"test_info": [{"realtime": 1}]}, "test_info[0].type"),
    ({"test_info": [{"realtime": 1, "type": 2}]}, "test_info[0].type"),
    ({"test_info": [{"type": 1}]}, "test_info[0].realtime"),
    ({"test_info": [{"realtime": "soon", "type": 1}]}, "test_info[0].realtime"),
    ({"test_info": [3]}, "test_info"),
])
def test_malformed_ovobench_probes_are_named(tmp_path, change, field):
    good = {"id": 7, "task": "CRR", "video": "v.mp4", "question": "Q?", "test_info": [{"realtime": 1, "type": 0}]}
    path = tmp_path / "ovo.json"
    path.write_text(json.dumps([good, {**good, "id": "bad-one", **change}]))
    with pytest.raises(ConfigError) as info:
        load_questions(path, "streaming")
    message = str(info.value)
    assert "record 1" in message and "bad-one" in message and repr(field) in message


def test_egoschema_merges_the_answers_file(tmp_path, caplog):
    records = [{"q_uid": f"u{i}", "question": "Q?", **{f"option {k}": f"o{k}" for k in range(5)}} for i in range(3)]
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(records))
    (tmp_path / "subset_answers.json").write_text(json.dumps({"u0": 3, "u2": 1}))
    with caplog.at_level("WARNING"):
        questions = load_questions(path, "egoschema")  # found beside the questions
    assert [(q.qid, q.answer) for q in questions] == [("u0", "D"), ("u2", "B")]
    assert "1 of 3 questions have no answer" in caplog.text
    other = tmp_path / "mine.json"
    other.write_text(json.dumps({"u1": 0}))
    assert [(q.qid, q.answer) for q in load_questions(path, "egoschema", answers=other)] == [("u1", "A")]
    with pytest.raises(ConfigError, match="no such answers file"):
        load_questions(path, "egoschema", answers=tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"u1": 9}))
    with pytest.raises(ConfigError, match=r"record 1 \(id u1\): field 'answer in .*bad.json' option index 9 is"):
        load_questions(path, "egoschema", answers=tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="egoschema questions only"):
        load_questions(FIXTURES["videomme"], "videomme", answers=other)


def test_vstreamqa_records_without_a_time_are_asked_after_the_clip(tmp_path):
    path = tmp_path / "test_qa.json"  # Flash-VStream's offline VS-Ego / VS-Movie layout
    path.write_text(json.dumps([{"video_id": "v_1", "question": "what is shown", "id": "v_1_3", "answer": "no",
                                 "answer_type": 3, "duration": 9.88}]))
    (q,) = load_questions(path, "vstreamqa")
    assert (q.qid, q.video, q.time, q.task, q.kind) == ("v_1_3", "v_1.mp4", None, "3", "open")


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(ConfigError, match="egoschema, streaming, videomme, vstreamqa"):
        load_questions(FIXTURES["videomme"], "mvbench")


GOOD = {
    "videomme": {"question_id": "q", "videoID": "v", "question": "Q?", "options": ["A. x", "B. y"], "answer": "A"},
    "egoschema": {"q_uid": "q", "question": "Q?", "option 0": "x", "option 1": "y", "answer": 0},
    "streaming": {"question_id": "q", "video_path": "v.mp4", "question": "Q?", "options": ["x", "y"], "answer": "B",
                  "time_stamp": "00:01:05"},
    "vstreamqa": {"id": "q", "video_id": "v", "question": "Q?", "answer": "x", "end_time": 3.0},
}

MALFORMED = [  # (format, changes to the good record (None deletes), field named in the error)
    ("videomme", {"question": None}, "question"),
    ("videomme", {"options": ["A. only"]}, "options"),
    ("videomme", {"options": "A. x B. y"}, "options"),
    ("videomme", {"answer": "C"}, "answer"),
    ("videomme", {"answer": ""}, "answer"),
    ("videomme", {"videoID": None}, "videoID"),
    ("videomme", {"options": ["A. x", 3]}, "options"),
    ("egoschema", {"answer": 7}, "answer"),
    ("egoschema", {"option 0": None, "option 1": None}, "option 0"),
    ("streaming", {"time_stamp": "soon"}, "time_stamp"),
    ("streaming", {"time_stamp": None}, "time_stamp"),
    ("streaming", {"time_stamp": -2}, "time_stamp"),
    ("streaming", {"answer": None, "gt": 5}, "gt"),
    ("streaming", {"question": 42}, "question"),
    ("vstreamqa", {"answer": None}, "answer"),
    ("vstreamqa", {"end_time": [1]}, "end_time"),
    ("vstreamqa", {"video_id": None}, "video_id"),
]


@pytest.mark.parametrize(("fmt", "change", "field"), MALFORMED)
def test_malformed_record_names_file_record_and_field(tmp_path, fmt, change, field):
    bad = {k: v for k, v in {**GOOD[fmt], **change}.items() if v is not None}
    bad[next(k for k in ("question_id", "q_uid", "id") if k in GOOD[fmt])] = "bad-one"
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps([GOOD[fmt], bad]))
    with pytest.raises(ConfigError) as info:
        load_questions(path, fmt)
    message = str(info.value)
    assert str(path) in message and "record 1" in message and "bad-one" in message and repr(field) in message


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such annotation file"):
        load_questions(tmp_path / "none.json", "videomme")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(GOOD["videomme"]) + "\n{not json\n")
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        load_questions(broken, "videomme")
    scalar = tmp_path / "scalar.json"
    scalar.write_text("[1]")
    with pytest.raises(ConfigError, match="record 0 must be a JSON object"):
        load_questions(scalar, "videomme")
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([GOOD["videomme"], GOOD["videomme"]]))
    with pytest.raises(ConfigError, match="question 1: field 'qid' repeats"):
        load_questions(twice, "videomme")


# -- scoring ------------------------------------------------------------------------------

OPTIONS = ["the red car", "the blue car", "a dog", "at the station"]


@pytest.mark.parametrize(("text", "letter"), [
    ("A", "A"), ("b", "B"), ("(C)", "C"), ("(d)", "D"), ("B.", "B"), ("c)", "C"), ("D:", "D"),
    ("Answer: B", "B"), ("answer: c", "C"), ("The answer is (A).", "A"), ("The correct answer is: d", "D"),
    ("C. a dog", "C"), ("(B) the blue car", "B"), ("b) the blue car", "B"), ("I think it is (D)", "D"),
    ("Option C", "C"), ("B, because it is parked", "B"), ("  A  ", "A"),
    ("It is the blue car.", "B"), ("a dog", "C"), ("AT THE STATION", "D"),
    ("A man walks by", None), ("E", None), ("(F)", None), ("no idea", None), ("", None), ("car", None),
])
def test_parse_choice(text, letter):
    assert parse_choice(text, OPTIONS) == letter


@pytest.mark.parametrize(("text", "said"), [
    ("Yes", "Yes"), ("yes.", "Yes"), ("Y", "Yes"), ("No", "No"), ("n", "No"), ("NO, not yet", "No"),
    ("I think yes", "Yes"), ("The answer is no.", "No"), ("well, yes and no", None), ("maybe", None), ("", None),
])
def test_parse_yes_no(text, said):
    assert parse_yes_no(text) == said


@pytest.mark.parametrize(("text", "count"), [
    ("3", "3"), ("3 times", "3"), ("They did it 12 times.", "12"), ("two", "2"), ("Zero.", "0"), ("007", "7"),
    ("many", None), ("", None),
])
def test_parse_count(text, count):
    assert parse_count(text) == count


def test_score_answer_by_kind():
    choice = Question("q", "v.mp4", "Q?", ["red", "blue"], "B")
    assert score_answer(choice, "(B)") == Scored("B", True, 1.0)
    assert score_answer(choice, "purple") == Scored(None, False, 0.0)
    assert score_answer(Question("q", "v.mp4", "Q?", answer="No", kind="yesno"), "no") == Scored("No", True, 1.0)
    assert score_answer(Question("q", "v.mp4", "Q?", answer="2", kind="count"), "3") == Scored("3", False, 0.0)
    assert score_answer(Question("q", "v.mp4", "Q?", answer="red car"), "a red car") == Scored(None, True, 1.0)
    with pytest.raises(ConfigError, match="Yes or No"):
        Question("q", "v.mp4", "Q?", answer="maybe", kind="yesno")
    with pytest.raises(ConfigError, match="whole number"):
        Question("q", "v.mp4", "Q?", answer="two", kind="count")
    with pytest.raises(ConfigError, match="kind"):
        Question("q", "v.mp4", "Q?", answer="x", kind="essay")


def test_mc_prompt_letters_the_options():
    q = Question("q", "v.mp4", "What is parked?", ["red car", "dog"], "A")
    assert mc_prompt(q) == "What is parked?\nA. red car\nB. dog\nAnswer with the option's letter from the given " \
                           "choices directly."
    assert mc_prompt(Question("q", "v.mp4", "What is parked?", answer="a car")) == "What is parked?"


@pytest.mark.parametrize(("prediction", "reference", "correct"), [
    ("Red.", "red", True),
    ("The screen is RED", "red", True),
    ("It turned blue, the screen.", "the screen turned blue", True),
    ("a green screen", "a green screen that turns blue", True),
    ("green", "a green screen that turns blue", False),
    ("blue", "red", False),
    ("", "red", False),
])
def test_score_open(prediction, reference, correct):
    assert score_open(prediction, reference).correct is correct


def test_score_open_exact_and_partial_scores():
    assert score_open("The red car.", "red car").score == 1.0
    assert score_open("a red bike", "red car").score == 0.5
    assert score_open("anything", "").score == 0.0


def test_summary_counts_tasks_and_unparsed():
    rows = [{"task": "x", "correct": True, "choice": "A", "multiple_choice": True},
            {"task": "x", "correct": False, "choice": None, "multiple_choice": True},
            {"task": "y", "correct": False, "choice": None, "multiple_choice": False}]
    summary = summarize(rows)
    assert summary["x"] == {"n": 2, "correct": 1, "accuracy": 0.5, "unparsed": 1}
    assert summary["y"]["unparsed"] == 0 and summary["overall"]["n"] == 3
    table = format_summary(summary)
    assert table.splitlines()[-1].startswith("overall") and "50.0%" in table


def test_summary_reports_the_judge_beside_the_deterministic_score():
    rows = [{"task": "x", "correct": True, "choice": None, "kind": "open", "judge_correct": True, "judge_score": 4.0},
            {"task": "x", "correct": False, "choice": None, "kind": "open", "judge_correct": None,
             "judge_score": None},
            {"task": "y", "correct": False, "choice": None, "kind": "yesno"}]
    summary = summarize(rows)
    assert summary["x"]["judge"] == {"n": 2, "accuracy": 0.5, "mean_score": 4.0, "unparsed": 1}
    assert "judge" not in summary["y"] and summary["y"]["unparsed"] == 1
    assert summary["overall"]["judge"]["n"] == 2
    table = format_summary(summary).splitlines()
    assert "judge acc" in table[0] and table[1].split()[-3:] == ["2", "50.0%", "4.00"]


def test_format_summary_prints_published_figures_with_their_sources():
    table = format_summary(summarize([{"task": "t", "correct": True, "choice": "A", "kind": "choice"}]), "videomme")
    lines = table.splitlines()
    assert lines[2].startswith("overall") and "published on Video-MME" in lines[3]
    assert any("Flash-VStream" in line and "61.2" in line and "arxiv.org/abs/2506.23825" in line for line in lines)
    with pytest.raises(ConfigError, match="no published figures for benchmark 'nope'; known: .*videomme"):
        format_summary(summarize([]), "nope")


def test_published_figures_name_a_source_for_every_number():
    from vstream.evaluate import published_figures

    for key, entry in published_figures()["benchmarks"].items():
        assert entry["name"] and entry["figures"], key
        for figure in entry["figures"]:
            assert 0 < figure["value"] <= 100 and figure["model"] and figure["setting"], (key, figure)
            assert figure["source"] and figure["url"].startswith("https://"), (key, figure)


# -- the runner ---------------------------------------------------------------------------


@pytest.fixture()
def spy(monkeypatch):
    """Every ``Session.ask``: the question and the session's stats when it was asked."""
    calls = []
    real = Session.ask

    def ask(self, question, *args, **kwargs):
        calls.append((question, self.stats))
        return real(self, question, *args, **kwargs)

    monkeypatch.setattr(Session, "ask", ask)
    return calls


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_streaming(fixture, videos, model, tmp_path):
    """Evaluate a streaming-format fixture: its questions, result rows by qid, summary."""
    questions = load_questions(fixture, "streaming")
    out = tmp_path / "results.jsonl"
    summary = evaluate(questions, videos, model, out, fps=FPS, progress=False, asr=False, generation=SHORT)
    return questions, {row["qid"]: row for row in _lines(out)}, summary


def test_timed_questions_see_only_the_stream_before_them(videos, model, tmp_path, spy):
    questions, rows, summary = run_streaming(FIXTURES["streaming"], videos, model, tmp_path)
    assert set(rows) == {q.qid for q in questions} and len(spy) == len(questions)
    for q in questions:
        row = rows[q.qid]
        stats = next(s for prompt, s in spy if prompt == mc_prompt(q))
        # every frame up to the question's time is in memory, none after it
        assert q.time - 1 / FPS < stats.last_t <= q.time, (q.qid, stats.last_t)
        assert stats.frames_processed == int(q.time * FPS) + 1 and stats.frames_in == stats.frames_processed
        assert row["seen_until"] == stats.last_t and row["time"] == q.time
        assert row["task"] == q.task and row["reference"] == q.answer and row["multiple_choice"]
        assert row["choice"] in (None, "A", "B", "C") and row["correct"] == (row["choice"] == q.answer)
        assert isinstance(row["answer"], str) and row["latency"] > 0
        assert all(len(e) == 4 and e[0] <= e[1] for e in row["evidence"])
    assert summary["overall"]["n"] == 3 and set(summary) == {"Object Recognition", "Attribute Recognition", "EPM",
                                                               "overall"}


def test_whole_clip_questions_see_the_whole_clip_and_resume_skips_done(videos, model, tmp_path, spy):
    questions = load_questions(FIXTURES["videomme"], "videomme")
    out = tmp_path / "results.jsonl"
    first = evaluate(questions, videos, model, out, fps=FPS, limit=2, progress=False, asr=False, generation=SHORT)
    assert [row["qid"] for row in _lines(out)] == ["001-1", "001-2"] and first["overall"]["n"] == 2
    assert all(stats.frames_processed == 12 and stats.last_t == pytest.approx(5.5) for _, stats in spy)

    spy.clear()
    again = evaluate(questions, videos, model, out, fps=FPS, limit=2, progress=False, asr=False, generation=SHORT)
    assert spy == [] and again == first and len(_lines(out)) == 2

    rest = evaluate(questions, videos, model, out, fps=FPS, progress=False, asr=False, generation=SHORT)
    assert len(spy) == 1 and [row["qid"] for row in _lines(out)] == ["001-1", "001-2", "002-1"]
    assert rest["overall"]["n"] == 3

    out.write_text(out.read_text() + '{"qid": "torn')  # a run killed mid-line: asked again
    spy.clear()
    only = evaluate(questions, videos, model, out, fps=FPS, tasks=["Temporal Reasoning"], progress=False,
                    asr=False, generation=SHORT)
    assert spy == [] and only["overall"]["n"] == 1 and set(only) == {"Temporal Reasoning", "overall"}


def test_open_ended_rows_are_scored_against_the_reference(videos, model, tmp_path):
    questions = load_questions(FIXTURES["vstreamqa"], "vstreamqa")
    out = tmp_path / "results.jsonl"
    summary = evaluate(questions, videos, model, out, fps=FPS, progress=False, asr=False, generation=SHORT)
    for row in _lines(out):
        reference = next(q.answer for q in questions if q.qid == row["qid"])
        assert row["choice"] is None and not row["multiple_choice"]
        assert row["correct"] == score_open(row["answer"], reference).correct
    assert summary["overall"]["unparsed"] == 0 and summary["overall"]["n"] == 3


def test_ovobench_probes_are_asked_at_their_times_and_scored_per_probe(videos, model, tmp_path, spy):
    questions, rows, summary = run_streaming(FIXTURES["ovobench"], videos, model, tmp_path)
    assert set(rows) == {q.qid for q in questions} and len(spy) == len(questions)
    for q in questions:
        row = rows[q.qid]
        assert q.time - 1 / FPS < row["seen_until"] <= q.time, (q.qid, row["seen_until"])
        assert (row["kind"], row["parent"], row["reference"]) == (q.kind, q.parent, q.answer)
        assert row["correct"] == (row["choice"] == q.answer) and row["correct"] == score_answer(q, row["answer"]).correct
    probes = [row for row in rows.values() if row["parent"] == "2"]
    assert sorted(row["time"] for row in probes) == [1.0, 2.5, 4.0, 5.0]  # SSR's probes, asked in time order
    assert set(summary) == {"EPM", "REC", "SSR", "CRR", "overall"}
    assert (summary["REC"]["n"], summary["SSR"]["n"], summary["CRR"]["n"]) == (3, 4, 3)


def test_realtime_and_as_fast_as_possible_give_the_same_answers(tmp_path, model):
    synth.write_clip(tmp_path / "short.mp4", duration=4.0, fps=10.0, size=(64, 48), audio=False,
                     scenes=[(0.0, (220, 30, 30)), (2.0, (30, 30, 220))])
    questions = [Question("at-1", "short.mp4", "What colour is it?", ["red", "blue"], "A", time=1.0),
                 Question("at-2.5", "short.mp4", "And now?", ["red", "blue"], "B", time=2.5),
                 Question("end", "short.mp4", "Describe the clip.", answer="red then blue")]
    runs = {}
    for realtime in (False, True):
        out = tmp_path / f"realtime-{realtime}.jsonl"
        started = time.monotonic()
        evaluate(questions, tmp_path, model, out, fps=FPS, progress=False, asr=False, generation=SHORT,
                 realtime=realtime)
        runs[realtime] = (time.monotonic() - started, _lines(out))
    assert runs[True][0] >= 3.0  # paced by the clip's clock: about its 4 s, at the least
    keep = ("qid", "answer", "choice", "correct", "seen_until", "frames_seen", "evidence")
    assert [{k: r[k] for k in keep} for r in runs[True][1]] == [{k: r[k] for k in keep} for r in runs[False][1]]


def test_a_judge_scores_open_ended_rows_beside_the_deterministic_scorer(videos, model, tmp_path):
    class Strict:  # a Judge in all but the model: yes when the reference's words are all in the answer
        name = "strict"

        def judge(self, question, reference, prediction):
            said = reference.lower() in prediction.lower()
            return JudgeScore(said, 5.0 if said else 0.0, "checked")

    questions = load_questions(FIXTURES["vstreamqa"], "vstreamqa") + load_questions(FIXTURES["streaming"],
                                                                                      "streaming")
    out = tmp_path / "results.jsonl"
    summary = evaluate(questions, videos, model, out, fps=FPS, progress=False, asr=False, generation=SHORT,
                       judge=Strict())
    for row in _lines(out):
        if row["kind"] == "open":
            assert row["judge"] == "strict" and row["judge_reason"] == "checked"
            assert row["judge_correct"] == (row["reference"].lower() in row["answer"].lower())
            assert row["correct"] == score_open(row["answer"], row["reference"]).correct
        else:
            assert "judge_correct" not in row
    assert summary["overall"]["judge"]["n"] == 3 and "judge" not in summary["Object Recognition"]


def test_model_judge_runs_on_a_local_model(model, monkeypatch):
    systems = []
    render = type(model).render
    monkeypatch.setattr(type(model), "render", lambda self, system, history=(): (systems.append(system),
                                                                                 render(self, system, history))[1])
    verdict = ModelJudge(model, max_new_tokens=8).judge("What colour?", "red", "It is red.")
    assert systems == [JUDGE_SYSTEM]  # the judge's own instructions, not the video system prompt
    assert isinstance(verdict, JudgeScore) and isinstance(verdict.reason, str)
    assert verdict.correct in (True, False, None) and (verdict.score is None or 0 <= verdict.score <= 5)


def test_runner_refuses_missing_videos_and_unknown_tasks(videos, model, tmp_path):
    questions = load_questions(FIXTURES["egoschema"], "egoschema")
    with pytest.raises(SourceError, match="clip_b.mp4"):
        evaluate(questions, tmp_path, model, tmp_path / "r.jsonl", progress=False, asr=False)
    with pytest.raises(ConfigError, match="no questions of task"):
        evaluate(questions, videos, model, tmp_path / "r.jsonl", tasks=["nope"], progress=False, asr=False)
    with pytest.raises(ConfigError, match="limit"):
        evaluate(questions, videos, model, tmp_path / "r.jsonl", limit=0, progress=False, asr=False)
    assert not (tmp_path / "r.jsonl").exists()


def test_cli_eval_prints_the_summary_table(videos, model_folder, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    argv = ["eval", str(FIXTURES["egoschema"]), str(videos), "--format", "egoschema", "--model", str(model_folder),
            "--no-asr", "--fps", "2", "--out", str(out), "--max-new-tokens", "4", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    overall = next(i for i, line in enumerate(printed) if line.startswith("overall"))
    assert printed[overall + 1].startswith("published on EgoSchema") and printed[-1] == f"results: {out}"
    assert [row["qid"] for row in _lines(out)] == ["ego-1", "clip_b"]
    assert main(argv[:1] + [str(FIXTURES["egoschema"]), str(tmp_path / "none"), "--format", "egoschema",
                            "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "missing" in capsys.readouterr().err
