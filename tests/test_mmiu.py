"""MMIU multiple choice: the loader (MMIU's spelling and the alternatives, malformed
records named), the synthetic set (answers checked against its own images), and the
harness end to end with a tiny model (resumable, tallied per task and per relation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import write_jsonl
from PIL import Image
from tiny_models import tiny_llama

from vstream.errors import ConfigError, SourceError
from vstream.evaluate.mmiu import evaluate_mmiu, format_mmiu_summary, load_mmiu, make_mmiu_set, summarize_mmiu
from vstream.evaluate.records import LETTERS
from vstream.models import GenerationConfig, load_model

torch.set_num_threads(1)

MMIU_RECORD = {"task": "temporal_ordering", "visual_input_component": "Video image or Natural image",
               "source": "penn_action", "options": "A: [1, 0]\nB: [0, 1]",
               "question": "Please predict the order of the following pictures.",
               "context": "Select from the following choices.\nA: [1, 0]\nB: [0, 1]",
               "input_image_path": ["./Continuous-temporal/temporal_ordering/t_0_0.jpg",
                                    "./Continuous-temporal/temporal_ordering/t_0_1.jpg"],
               "output": "B"}
OTHER_RECORD = {"id": "q7", "images": ["a.png", "b.png", "c.png"], "question": "Which is <image> like, <image> or <image>?",
                "options": ["A. the second", "B. the third", "C. the first"], "answer": "A", "task": "matching",
                "relation": "Low-level-semantic"}


def write(tmp_path, records, name="mmiu.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        write_jsonl(path, records)
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("name", ["mmiu.json", "mmiu.jsonl"])
def test_loader_reads_mmiu_spelling_and_the_alternatives(tmp_path, name):
    mmiu, other = load_mmiu(write(tmp_path, [MMIU_RECORD, OTHER_RECORD], name))
    assert (mmiu.qid, mmiu.task, mmiu.relation, mmiu.answer) == ("temporal_ordering/0", "temporal_ordering",
                                                                 "Continuous-temporal", "B")
    assert mmiu.options == ["[1, 0]", "[0, 1]"] and mmiu.images == MMIU_RECORD["input_image_path"]
    assert (other.qid, other.relation, other.answer) == ("q7", "Low-level-semantic", "A")
    assert other.options == ["the second", "the third", "the first"] and other.images == ["a.png", "b.png", "c.png"]


def test_options_lines_scenarios_and_relations_by_folder(tmp_path):
    records = [{**MMIU_RECORD, "options": "A: first line\ncontinued\nB: second\nC: third",
                "context": "You judge a contest.\nSelect from the following choices.\nA: first line"},
               {**MMIU_RECORD, "input_image_path": "one.jpg"},
               {**MMIU_RECORD, "input_image_path": ["MMIU/2D-spatial/t/1.jpg", "MMIU/2D-spatial/t/2.jpg"]},
               {**MMIU_RECORD, "input_image_path": ["../MMIU-Benchmark/t/1.jpg", "../MMIU-Benchmark/t/2.jpg"]}]
    first, single, nested, elsewhere = load_mmiu(write(tmp_path, records))
    assert first.options == ["first line\ncontinued", "second", "third"]
    assert (first.scenario, single.scenario) == ("You judge a contest.", "")  # the context's options are not kept
    assert (single.images, single.relation) == (["one.jpg"], "unknown")
    assert (nested.relation, elsewhere.relation) == ("2D-spatial", "unknown")


@pytest.mark.parametrize("change, message", [
    ({"input_image_path": None}, "field 'input_image_path' is missing (also read as images)"),
    ({"input_image_path": []}, "field 'input_image_path' lists no image"),
    ({"input_image_path": ["a.jpg", 3]}, "field 'input_image_path' image 1 must be a non-empty path, got 3"),
    ({"options": "1: [1, 0]\n2: [0, 1]"}, "field 'options' must start with an \"A: ...\" line, got '1: [1, 0]'"),
    ({"options": ["only one"]}, "field 'options' needs at least 2 options, got 1"),
    ({"options": 7}, "field 'options' must be a string or a list, got 7"),
    ({"output": "C"}, "field 'output' must be one of the letters A-B, got 'C'"),
    ({"output": None}, "field 'output' is missing (also read as answer)"),
    ({"question": "is <image> first?"}, "field 'question' has placeholders that do not match its 2 image(s)"),
    ({"question": "  "}, "field 'question' is empty"),
])
def test_malformed_records_are_named(tmp_path, change, message):
    broken = {k: v for k, v in {**MMIU_RECORD, **change}.items() if v is not None}
    path = write(tmp_path, [MMIU_RECORD, broken])
    with pytest.raises(ConfigError) as error:
        load_mmiu(path)
    assert str(error.value).startswith(f"{path}: record 1")
    assert message in str(error.value)


def test_repeated_ids_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="field 'qid' repeats the id 'q7'"):
        load_mmiu(write(tmp_path, [OTHER_RECORD, OTHER_RECORD]))


def read_image(folder, path) -> np.ndarray:
    return np.asarray(Image.open(folder / path).convert("RGB")).astype(int)


def test_synthetic_set_answers_are_right_by_construction(tmp_path):
    path = make_mmiu_set(tmp_path / "set", seed=3)
    questions = load_mmiu(path)
    assert len(questions) == 12
    assert {(q.task, q.relation) for q in questions} == {("frame_ordering", "Continuous-temporal"),
                                                        ("odd_one_out", "Low-level-semantic"),
                                                        ("counting", "High-level-obj-semantic")}
    for q in questions:
        images = [read_image(path.parent, image) for image in q.images]
        if q.task == "frame_ordering":  # the first frame shows one square: one white run across its middle row
            white = [np.all(image[32] == 255, axis=1).astype(int) for image in images]
            squares = [int(np.sum(np.diff(np.concatenate([[0], row])) == 1)) for row in white]
            assert sorted(squares) == [1, 2, 3, 4]
            expected = squares.index(1)
        elif q.task == "odd_one_out":  # the one colour seen once
            colours = [tuple(image[0, 0]) for image in images]
            expected = next(i for i, c in enumerate(colours) if colours.count(c) == 1)
            assert all(np.all(image == image[0, 0]) for image in images)
        else:  # how many images hold red pixels
            red = [bool(np.any((image[..., 0] > 200) & (image[..., 1] < 80) & (image[..., 2] < 80))) for image in images]
            expected = sum(red)
            assert q.options[expected] == str(expected)
        assert q.answer == LETTERS[expected], q.qid
    answers = [q.answer for q in questions]
    assert len(set(answers)) > 1  # not one letter for all


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(tiny_llama(tmp_path_factory.mktemp("mmiu-model") / "llama")))


def test_harness_end_to_end_and_resumable(model, tmp_path):
    path = make_mmiu_set(tmp_path / "set")
    questions = load_mmiu(path)
    out = tmp_path / "results.jsonl"
    generation = GenerationConfig(max_new_tokens=3, attribute=False)
    summary = evaluate_mmiu(questions, path.parent, model, out, tasks=["counting", "odd_one_out"], limit=5,
                            progress=False, generation=generation)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["qid"] for r in rows] == [q.qid for q in questions if q.task != "frame_ordering"][:5]
    assert all(r["images"] == 4 and r["choice"] in (None, *LETTERS[:5]) for r in rows)
    assert all(r["correct"] == (r["choice"] == r["reference"]) for r in rows)
    assert summary["overall"]["n"] == 5 and set(summary["task"]) == {"counting", "odd_one_out"}
    assert summary["overall"]["unparsed"] == sum(r["choice"] is None for r in rows)
    # a second run answers only what is not in the file yet, and sums up every selected question
    out.write_text("\n".join(out.read_text().splitlines()[:3]) + "\n")
    summary = evaluate_mmiu(questions, path.parent, model, out, progress=False, generation=generation)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and len({r["qid"] for r in rows}) == 12
    assert summary["overall"]["n"] == 12
    assert {name: s["n"] for name, s in summary["relation"].items()} == {
        "Continuous-temporal": 4, "Low-level-semantic": 4, "High-level-obj-semantic": 4}
    table = format_mmiu_summary(summary)
    assert table.startswith("task ") and "\nrelation " in table and "Continuous-temporal" in table


def test_missing_images_are_named_before_any_answer(model, tmp_path):
    path = make_mmiu_set(tmp_path / "set", per_task=1)
    questions = load_mmiu(path)
    (path.parent / questions[0].images[2]).unlink()
    with pytest.raises(SourceError, match="1 image\\(s\\) missing, e.g. ./Continuous-temporal/frame_ordering/"):
        evaluate_mmiu(questions, path.parent, model, tmp_path / "out.jsonl", progress=False)
    assert not (tmp_path / "out.jsonl").exists()


def test_tallies_per_task_and_relation():
    def row(task, relation, choice, reference="A"):
        return {"task": task, "relation": relation, "choice": choice, "correct": choice == reference,
                "multiple_choice": True}

    summary = summarize_mmiu([row("t1", "r1", "A"), row("t1", "r2", None), row("t2", "r2", "B"), row("t2", "r2", "A")])
    assert summary["overall"] == {"n": 4, "correct": 2, "accuracy": 0.5, "unparsed": 1}
    assert summary["task"] == {"t1": {"n": 2, "correct": 1, "accuracy": 0.5, "unparsed": 1},
                               "t2": {"n": 2, "correct": 1, "accuracy": 0.5, "unparsed": 0}}
    assert summary["relation"] == {"r1": {"n": 1, "correct": 1, "accuracy": 1.0, "unparsed": 0},
                                   "r2": {"n": 3, "correct": 1, "accuracy": 1 / 3, "unparsed": 1}}


def test_the_prompt_holds_scenario_options_and_instruction(model, tmp_path, monkeypatch):
    from vstream.dialogue import Dialogue
    from vstream.evaluate.scoring import MC_INSTRUCTION

    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / name)
    record = {**MMIU_RECORD, "input_image_path": ["a.png", "b.png"],
              "context": "You sort frames.\nSelect from the following choices.\nA: [1, 0]\nB: [0, 1]"}
    asked = []
    ask = Dialogue.ask
    monkeypatch.setattr(Dialogue, "ask", lambda self, question: asked.append(question) or ask(self, question))
    evaluate_mmiu(load_mmiu(write(tmp_path, [record])), tmp_path, model, tmp_path / "out.jsonl", progress=False,
                  generation=GenerationConfig(max_new_tokens=2, attribute=False))
    assert asked == [f"You sort frames.\n{MMIU_RECORD['question']}\nA. [1, 0]\nB. [0, 1]\n{MC_INSTRUCTION}"]


def test_vstream_eval_format_mmiu(model, tmp_path, capsys):
    from vstream.cli import main

    path = make_mmiu_set(tmp_path / "set", per_task=1)
    argv = ["eval", str(path), str(path.parent), "--format", "mmiu", "--model", model.name, "--quiet",
            "--max-new-tokens", "2", "--out", str(tmp_path / "out.jsonl")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("task ") and "\nrelation " in out and "overall" in out
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    assert main([*argv, "--realtime"]) == 1
    assert "--realtime: not for --format mmiu" in capsys.readouterr().err


def test_a_torn_results_line_is_ended_before_appending(model, tmp_path):
    path = make_mmiu_set(tmp_path / "set", per_task=1)
    out = tmp_path / "out.jsonl"
    out.write_text('{"qid": "torn')  # a run killed mid-write
    summary = evaluate_mmiu(load_mmiu(path), path.parent, model, out, progress=False,
                            generation=GenerationConfig(max_new_tokens=2))
    assert summary["overall"]["n"] == 3
    lines = out.read_text().splitlines()
    assert lines[0] == '{"qid": "torn' and len(lines) == 4  # every answer on a line of its own


def test_vstream_eval_attaches_heads(model, tmp_path, capsys):
    from vstream.cli import main

    path = make_mmiu_set(tmp_path / "set", per_task=1)
    argv = ["eval", str(path), str(path.parent), "--format", "mmiu", "--model", model.name, "--quiet",
            "--max-new-tokens", "2", "--out", str(tmp_path / "out.jsonl")]
    assert main([*argv, "--head", "visual_experts"]) == 0
    assert main([*argv, "--head", "nope"]) == 1
    assert "unknown head 'nope'" in capsys.readouterr().err
