"""``lmms-eval --model vstream``: the harness runs a tiny task set written locally in its
task format (a Video-MME-like multiple-choice question answered by generation, an
option-scored multiple-choice task, and an OVO-Bench forward task through lmms-eval's own
OVO-Bench functions and its multi-round interface) with a tiny Flash-VStream checkpoint,
and writes its scores. The model is random: the harness is checked, not its accuracy."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_clip, tiny_flash_vstream, tiny_llama

from vstream import synth
from vstream.models import GenerationConfig, load_model
from vstream.models.prompt import Context

torch.set_num_threads(1)

FPS = 2.0
ROUND_TIMES = (2.0, 4.0, 6.0)  # the forward question's rounds: the clip up to these seconds
SCENES = [(0.0, (220, 30, 30)), (2.5, (30, 30, 220)), (4.5, (30, 200, 30))]

TASK_UTILS = '''
import os

from lmms_eval.tasks.ovobench.utils import (  # noqa: F401 - lmms-eval's OVO-Bench, as the yaml names it
    ovo_doc_to_visual,
    ovo_forward_acc,
    ovo_forward_doc_to_text,
    ovo_forward_process_results,
)

VIDEOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "videos")


def doc_to_visual(doc):
    return [os.path.join(VIDEOS, doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = "\\n".join(f"{chr(65 + i)}. {option}" for i, option in enumerate(doc["options"]))
    return f"{doc['question']}\\n{options}\\nAnswer with the option's letter."


def doc_to_images(doc):  # an image task: each image is a frame of the stream
    from PIL import Image

    return [Image.new("RGB", (64, 48), tuple(colour)) for colour in doc["colours"]]


def doc_to_choice(doc):
    return doc["options"]


def doc_to_target(doc):
    return "ABCD".index(doc["answer"])


def process_results(doc, results):
    return {"accuracy": float(results[0].strip()[:1].upper() == doc["answer"])}
'''

COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
metadata:
  version: 0.0
"""

TASKS = {
    "vstream_tiny_videoqa": """output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
""",
    "vstream_tiny_images": """output_type: generate_until
doc_to_visual: !function utils.doc_to_images
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
""",
    "vstream_tiny_choice": """output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "vstream_tiny_ovo_forward": """output_type: generate_until_multi_round
doc_to_visual: !function utils.ovo_doc_to_visual
doc_to_text: !function utils.ovo_forward_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.ovo_forward_process_results
metric_list:
  - metric: forward_acc
    aggregation: !function utils.ovo_forward_acc
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    data_dir: {chunks}
""",
}

QUESTIONS = [  # two questions about one clip (one session, fed once) and one about another
    {"video": "scenes.mp4", "question": "What colour is the screen at the start?",
     "options": ["Red", "Green", "Blue", "Black"], "answer": "A"},
    {"video": "scenes.mp4", "question": "What colour is the screen at the end?",
     "options": ["Red", "Green", "Blue", "Black"], "answer": "B"},
    {"video": "short.mp4", "question": "What colour is the screen?",
     "options": ["Red", "Green", "Blue", "Black"], "answer": "A"},
]
IMAGE_QUESTIONS = [{"colours": [[220, 30, 30], [30, 30, 220]], "question": "What colour comes last?",
                    "options": ["Red", "Blue"], "answer": "B"}]
FORWARD = [{"id": "scenes", "task": "CRR", "video": "scenes.mp4", "answer": "",
            "question": "Is the screen green?",
            "test_info": [{"realtime": t, "type": int(t > 4.5)} for t in ROUND_TIMES]}]


@pytest.fixture(scope="module")
def lmms_eval():
    return pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the lmms extra; see the README)")


@pytest.fixture(scope="module")
def task_folder(lmms_eval, tmp_path_factory) -> Path:
    """The tasks' YAML files, their functions, documents and clips, in lmms-eval's task format."""
    folder = tmp_path_factory.mktemp("lmms-tasks")
    videos, chunks = folder / "videos", folder / "chunks"
    videos.mkdir()
    chunks.mkdir()
    synth.write_clip(videos / "scenes.mp4", duration=6.0, fps=10.0, size=(64, 48), audio=False, scenes=SCENES)
    synth.write_clip(videos / "short.mp4", duration=2.0, fps=10.0, size=(64, 48), audio=False, scenes=SCENES[:1])
    for i, t in enumerate(ROUND_TIMES):  # OVO-Bench's chunks: the stream from its start to each round's time
        synth.write_clip(chunks / f"scenes_{i}.mp4", duration=t, fps=10.0, size=(64, 48), audio=False, scenes=SCENES)
    (folder / "utils.py").write_text(TASK_UTILS)
    for name, body in TASKS.items():
        docs = folder / f"{name}.jsonl"
        rows = FORWARD if "ovo" in name else IMAGE_QUESTIONS if "images" in name else QUESTIONS
        docs.write_text("".join(json.dumps(row) + "\n" for row in rows))
        header = COMMON.format(docs=docs)
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{header}{body.format(chunks=chunks)}")
    return folder


@pytest.fixture(scope="module")
def flash_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmms-model")
    return tiny_flash_vstream(root / "flash", tiny_clip(root / "clip"))[0]


def offline_env(home: Path) -> dict:
    """The environment of an lmms-eval run that reads nothing from the network."""
    return {**os.environ, "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VSTREAM_CACHE": str(home / "vstream"), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


def test_lmms_eval_cli_scores_local_tasks_with_vstream(task_folder, flash_model, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lmms_eval", "--model", "vstream",  # the `lmms-eval` command
               "--model_args", f"pretrained={flash_model},fps={FPS},device=cpu",
               "--tasks", ",".join(TASKS), "--include_path", str(task_folder),
               "--output_path", str(out), "--log_samples", "--batch_size", "1"]
    run = subprocess.run(command, cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True,
                         timeout=600, check=False)
    # lmms-eval reports a failed evaluation and exits 0; OVO-Bench's own files go to submissions/
    scores_files = [p for p in out.rglob("*_results.json") if p.parent.name != "submissions"]
    assert run.returncode == 0 and len(scores_files) == 1, run.stdout[-4000:] + run.stderr[-6000:]
    scores = json.loads(scores_files[0].read_text())
    results = scores["results"]
    assert 0.0 <= results["vstream_tiny_videoqa"]["accuracy,none"] <= 1.0
    assert 0.0 <= results["vstream_tiny_choice"]["acc,none"] <= 1.0
    assert 0.0 <= results["vstream_tiny_ovo_forward"]["forward_acc,none"] <= 100.0
    assert 0.0 <= results["vstream_tiny_images"]["accuracy,none"] <= 1.0
    assert scores["n-samples"]["vstream_tiny_videoqa"]["effective"] == len(QUESTIONS)
    assert scores["config"]["model"] == "vstream"

    # every round of the forward question got an answer of its own, scored by OVO-Bench's rules
    forward_scores = json.loads((tmp_path / "out" / "submissions" / "forward_acc_scores.json").read_text())
    assert set(forward_scores) == {"CRR", "average"}
    logged = {path.name.split("_samples_")[1].removesuffix(".jsonl"): [json.loads(line) for line in
              path.read_text().splitlines() if line.strip()] for path in out.rglob("*_samples_*.jsonl")}
    assert set(logged) == set(TASKS)
    rounds = logged["vstream_tiny_ovo_forward"][0]["forward_acc"]["test_info"]
    assert [r["realtime"] for r in rounds] == list(ROUND_TIMES)
    assert all(isinstance(r["response"], str) for r in rounds)
    # the option-scored task got a (loss, greedy) pair for each option of each question
    choice = logged["vstream_tiny_choice"]
    assert [len(row["filtered_resps"]) for row in choice] == [4] * len(QUESTIONS)
    assert all(float(loss) > 0 for row in choice for loss, _ in row["filtered_resps"])


def test_rounds_see_the_stream_up_to_their_time(task_folder, flash_model, tmp_path, monkeypatch, caplog):
    """Each round of a forward question is asked once the stream is in the memory up to
    that round's time and nothing after it (the last frame sampled at 2 fps before 2, 4
    and 6 s), and the rounds share one memory fed once, not a re-read of each clip."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vstream.session import Session

    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    pushed = []
    push_frame = Session.push_frame
    monkeypatch.setattr(Session, "push_frame", lambda self, frame, **kw: pushed.append(frame.t) or push_frame(
        self, frame, **kw))
    with caplog.at_level(logging.INFO, logger="vstream.lmms"):
        results = simple_evaluate(model="vstream", model_args=f"pretrained={flash_model},fps={FPS},device=cpu",
                                  tasks=["vstream_tiny_ovo_forward"],
                                  task_manager=TaskManager(include_path=str(task_folder)))
    assert "vstream_tiny_ovo_forward" in results["results"]
    asked = [r.getMessage() for r in caplog.records if "round" in r.getMessage()]
    assert [float(m.split("after ")[1].split(" s")[0]) for m in asked] == [t - 1 / FPS for t in ROUND_TIMES]
    assert pushed == [i / FPS for i in range(int(ROUND_TIMES[-1] * FPS))]


def test_option_scores_rank_the_models_own_answer_first(tmp_path):
    """How ``loglikelihood`` scores an option: the model's own greedy answer is the one
    option marked greedy, and its first token is the likeliest of the options'."""
    model = load_model(str(tiny_llama(tmp_path / "llama")))
    question = "Which letter comes first?"
    pieces = model.question_pieces(Context(), question)
    own = model.answer(Context(), question, GenerationConfig(max_new_tokens=2)).text
    scored = {option: model.answer_logprobs(pieces, option) for option in (own, "A", "B")}
    assert [option for option, (_, greedy) in scored.items() if greedy] == [own]
    assert all(scored[own][0][0] >= logprobs[0] for logprobs, _ in scored.values())
    assert all(bool((logprobs < 0).all()) and len(logprobs) == len(model.tokenizer(option, add_special_tokens=False).input_ids)
               for option, (logprobs, _) in scored.items())


def test_generation_kwargs_map_to_vstreams_generation(lmms_eval):
    from vstream.errors import ConfigError
    from vstream.lmms import generation_config

    default = GenerationConfig(max_new_tokens=64, temperature=0.0)
    greedy = generation_config({"max_new_tokens": 16, "temperature": 0.7, "do_sample": False}, default)
    assert (greedy.max_new_tokens, greedy.temperature) == (16, 0.0)
    sampled = generation_config({"temperature": 0.7, "do_sample": True, "top_p": 0.9}, default)
    assert (sampled.max_new_tokens, sampled.temperature, sampled.top_p) == (64, 0.7, 0.9)
    with pytest.raises(ConfigError, match="num_beams=4"):
        generation_config({"num_beams": 4}, default)
