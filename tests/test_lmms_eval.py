"""``lmms-eval --model vstream``: the harness runs a tiny task set written locally in its
task format (a Video-MME-like multiple-choice question answered by generation, an
option-scored multiple-choice task, and an OVO-Bench forward task through lmms-eval's own
OVO-Bench functions and its multi-round interface) with a tiny Flash-VStream checkpoint,
and writes its scores. The model is random: the harness is checked, not its accuracy."""

from __future__ import annotations

import json
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
from lmms_eval.tasks.ovobench.utils import (  # noqa: F401 - lmms-eval's OVO-Bench, as the yaml names it
    ovo_doc_to_visual,
    ovo_forward_acc,
    ovo_forward_doc_to_text,
    ovo_forward_process_results,
)
from lmms_eval.tasks.videomme.utils import (  # noqa: F401 - and its Video-MME (clips in $HF_HOME/videomme/data)
    videomme_aggregate_results,
    videomme_doc_to_text,
    videomme_doc_to_visual,
    videomme_process_results,
)


def doc_to_images(doc):  # an image task: each image is a frame of the stream
    from PIL import Image

    return [Image.new("RGB", (64, 48), tuple(colour)) for colour in doc["colours"]]


def doc_to_choice(doc):  # Video-MME by option likelihood: the options' letters
    return [option[0] for option in doc["options"]]


def doc_to_target(doc):
    return doc_to_choice(doc).index(doc["answer"])


def images_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + " " + " or ".join(doc["options"]) + "?"


def images_results(doc, results):
    return {"accuracy": float(results[0].strip().lower() == doc["answer"].lower())}
'''

COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
metadata:
  version: 0.0
"""
VIDEOMME_PROMPT = """lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "Answer with the option's letter from the given choices directly."
"""

TASKS = {  # Video-MME's functions with a local dataset, an image task, Video-MME by likelihood, OVO-Bench forward
    "vstream_tiny_videomme": """output_type: generate_until
doc_to_visual: !function utils.videomme_doc_to_visual
doc_to_text: !function utils.videomme_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.videomme_process_results
metric_list:
  - metric: videomme_perception_score
    aggregation: !function utils.videomme_aggregate_results
    higher_is_better: true
""" + VIDEOMME_PROMPT,
    "vstream_tiny_images": """output_type: generate_until
doc_to_visual: !function utils.doc_to_images
doc_to_text: !function utils.images_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
process_results: !function utils.images_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
""",
    "vstream_tiny_choice": """output_type: multiple_choice
doc_to_visual: !function utils.videomme_doc_to_visual
doc_to_text: !function utils.videomme_doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""" + VIDEOMME_PROMPT,
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

COLOURS = ["A. Red", "B. Green", "C. Blue", "D. Black"]
VIDEOMME = [  # Video-MME's fields; two questions about one clip (one session, fed once) and one about another
    {"videoID": "scenes", "question_id": "001-1", "question": "What colour is the screen at the start?",
     "options": COLOURS, "answer": "A"},
    {"videoID": "scenes", "question_id": "001-2", "question": "What colour is the screen at the end?",
     "options": COLOURS, "answer": "B"},
    {"videoID": "short", "question_id": "002-1", "question": "What colour is the screen?",
     "options": COLOURS, "answer": "A"},
]
for row in VIDEOMME:
    row.update(duration="short", domain="Knowledge", sub_category="Astronomy", task_type="Attribute Perception")
IMAGES = [{"colours": [[220, 30, 30], [30, 30, 220]], "question": "What colour comes last,",
           "options": ["red", "blue"], "answer": "blue"}]
FORWARD = [{"id": "scenes", "task": "CRR", "video": "scenes.mp4", "answer": "",
            "question": "Is the screen green?",
            "test_info": [{"realtime": t, "type": int(t > 4.5)} for t in ROUND_TIMES]}]
DOCS = {"vstream_tiny_videomme": VIDEOMME, "vstream_tiny_images": IMAGES, "vstream_tiny_choice": VIDEOMME,
        "vstream_tiny_ovo_forward": FORWARD}


@pytest.fixture(scope="module")
def lmms_eval():
    return pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the lmms extra; see docs/evaluation.md)")


@pytest.fixture(scope="module")
def task_folder(lmms_eval, tmp_path_factory) -> Path:
    """The tasks' YAML files, their functions, documents and clips, in lmms-eval's task format;
    Video-MME's clips where its functions look (``$HF_HOME/videomme/data``, ``offline_env``)."""
    folder = tmp_path_factory.mktemp("lmms-tasks")
    videos, chunks = folder / "hf" / "videomme" / "data", folder / "chunks"
    videos.mkdir(parents=True)
    chunks.mkdir()
    synth.write_clip(videos / "scenes.mp4", duration=6.0, fps=10.0, size=(64, 48), audio=False, scenes=SCENES)
    synth.write_clip(videos / "short.mp4", duration=2.0, fps=10.0, size=(64, 48), audio=False, scenes=SCENES[:1])
    for i, t in enumerate(ROUND_TIMES):  # OVO-Bench's chunks: the stream from its start to each round's time
        synth.write_clip(chunks / f"scenes_{i}.mp4", duration=t, fps=10.0, size=(64, 48), audio=False, scenes=SCENES)
    (folder / "utils.py").write_text(TASK_UTILS)
    for name, body in TASKS.items():
        docs = folder / f"{name}.jsonl"
        docs.write_text("".join(json.dumps(row) + "\n" for row in DOCS[name]))
        header = COMMON.format(docs=docs)
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{header}{body.format(chunks=chunks)}")
    return folder


@pytest.fixture(scope="module")
def flash_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmms-model")
    return tiny_flash_vstream(root / "flash", tiny_clip(root / "clip"))[0]


CLI = """import logging, sys
logging.basicConfig(format="%(name)s: %(message)s")
logging.getLogger("vstream.lmms").setLevel(logging.INFO)
from lmms_eval.cli.dispatch import main
sys.exit(main())
"""
"""The ``lmms-eval`` command, showing the plugin's log lines (the rounds asked)."""


def offline_env(task_folder: Path, home: Path) -> dict:
    """The environment of an lmms-eval run that reads nothing from the network."""
    return {**os.environ, "HF_HOME": str(task_folder / "hf"), "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VSTREAM_CACHE": str(home / "vstream"), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


def test_lmms_eval_cli_scores_local_tasks_with_vstream(task_folder, flash_model, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-c", CLI, "--model", "vstream",
               "--model_args", f"pretrained={flash_model},fps={FPS},device=cpu",
               "--tasks", ",".join(TASKS), "--include_path", str(task_folder),
               "--output_path", str(out), "--log_samples", "--batch_size", "1"]
    run = subprocess.run(command, cwd=tmp_path, env=offline_env(task_folder, tmp_path), capture_output=True, text=True,
                         timeout=600, check=False)
    # lmms-eval reports a failed evaluation and exits 0; OVO-Bench's own files go to submissions/
    scores_files = [p for p in out.rglob("*_results.json") if p.parent.name != "submissions"]
    assert run.returncode == 0 and len(scores_files) == 1, run.stdout[-4000:] + run.stderr[-6000:]
    scores = json.loads(scores_files[0].read_text())
    results = scores["results"]
    assert 0.0 <= results["vstream_tiny_videomme"]["videomme_perception_score,none"] <= 100.0
    assert 0.0 <= results["vstream_tiny_choice"]["acc,none"] <= 1.0
    assert 0.0 <= results["vstream_tiny_ovo_forward"]["forward_acc,none"] <= 100.0
    assert 0.0 <= results["vstream_tiny_images"]["accuracy,none"] <= 1.0
    assert scores["n-samples"]["vstream_tiny_videomme"]["effective"] == len(VIDEOMME)
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
    # each round asked once the stream is in memory up to its time (the last frame sampled at
    # 2 fps before 2, 4, 6 s) and nothing later; the rounds share one memory, fed once
    asked = [line.split("asked after ")[1] for line in run.stderr.splitlines() if "asked after" in line]
    assert asked == [f"{t - 1 / FPS:.1f} s of the stream ({int(t * FPS)} frames in memory)" for t in ROUND_TIMES]
    # the option-scored task got a (loss, greedy) pair for each option of each question
    choice = logged["vstream_tiny_choice"]
    assert [len(row["filtered_resps"]) for row in choice] == [len(COLOURS)] * len(VIDEOMME)
    assert all(float(loss) > 0 for row in choice for loss, _ in row["filtered_resps"])


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


def test_clip_stream_places_clips_and_images_in_stream_time(lmms_eval, task_folder, flash_model, monkeypatch):
    """A request's clips and images follow each other in stream time; a later round's media
    (``replay``) is the stream again from its start, and only what it adds is pushed."""
    from PIL import Image

    from vstream.lmms import ClipStream
    from vstream.session import Session, SessionConfig

    config = SessionConfig(fps=FPS, asr=False, ocr=False)
    pushed = []
    push_frame = Session.push_frame
    monkeypatch.setattr(Session, "push_frame", lambda self, frame, **kw: pushed.append(frame.t) or push_frame(
        self, frame, **kw))
    short = str(task_folder / "hf" / "videomme" / "data" / "short.mp4")  # 2 s: frames at 0, 0.5, 1, 1.5
    with Session(str(flash_model), config) as session:
        stream = ClipStream(session, config)
        stream.feed([short, short])
        assert pushed == [i / FPS for i in range(8)]
        assert session.stats.frames_processed == 8
    pushed.clear()
    images = [Image.new("RGB", (64, 48), colour) for colour in ("red", "blue", "green")]
    with Session(str(flash_model), config) as session:
        stream = ClipStream(session, config)
        stream.feed(images[:2])
        stream.feed(images, replay=True)
        assert pushed == [0.0, 0.5, 1.0]
