"""``vstream train``: a Flash-VStream checkpoint's memory projector fine-tuned on stored
features of conversation records: the held-out loss falls, a resumed run ends as an
uninterrupted one bit for bit, and the trained weights load with ``--head`` and change
the answers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import write_jsonl
from safetensors.torch import load_file
from tiny_models import sharpened_flash_vstream, tiny_clip

from vstream.cli import main
from vstream.data import RecordFeatures, read_features, write_features
from vstream.errors import ConfigError, DataError
from vstream.evaluate.scoring import score_open
from vstream.memory import MemoryTokens
from vstream.models import GenerationConfig, load_model
from vstream.models.prompt import Context
from vstream.train import TrainConfig, sample_loss, samples, train

torch.set_num_threads(1)
ANSWERS = ("the red square moves left", "a blue circle appears")


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    """A tiny Flash-VStream checkpoint with a sharpened output layer (``sharpened_flash_vstream``)."""
    root = tmp_path_factory.mktemp("train-models")
    return str(sharpened_flash_vstream(root, tiny_clip(root / "clip")))


def memory_of(kind: int, seed: int) -> MemoryTokens:
    """8 tokens of width 48 (the tiny tower's): one pattern per answer, plus noise."""
    pattern = torch.randn(8, 48, generator=torch.Generator().manual_seed(100 + kind))
    tokens = pattern + 0.3 * torch.randn(8, 48, generator=torch.Generator().manual_seed(seed))
    return MemoryTokens(tokens, ["spatial"] * 8, [(float(seed), float(seed))] * 8)


@pytest.fixture
def data(tmp_path):
    """40 records (answer by the memory's pattern) with their features."""
    features = tmp_path / "features"
    records = []
    for i in range(40):
        record_id = f"clip{i:02d}"
        records.append({"id": record_id, "video": f"{record_id}.mp4",
                        "conversations": [{"from": "human", "value": "<video>\nWhat happens in the video?"},
                                          {"from": "gpt", "value": ANSWERS[i % 2]}]})
        write_features(features, RecordFeatures(record_id, memory_of(i % 2, i), [], f"{record_id}.mp4"))
    path = tmp_path / "train.jsonl"
    write_jsonl(path, records)
    return path, features


def config(flash, data, out, **fields) -> TrainConfig:
    path, features = data
    settings = {"model": flash, "data": str(path), "features": str(features), "out": str(out), "held_out": 0.25,
                "epochs": 3, "learning_rate": 3e-3, "accumulate": 2, "checkpoint_every": 4, "device": "cpu"}
    return TrainConfig(**{**settings, **fields})


def test_the_held_out_loss_falls_for_what_the_memory_shows(flash, data, tmp_path):
    """On records it never trained on, the answer their memory goes with gets cheaper, and
    cheaper than the other answer would be: the projector learned what the memory shows,
    not just the answers' words."""
    cfg = config(flash, data, tmp_path / "run")
    report = train(cfg, progress=False)
    assert report.held_out_samples > 3 and report.train_samples + report.held_out_samples == 40
    assert report.held_out_after < report.held_out_before - 0.05
    _, held = samples(cfg)
    gaps = []
    for heads in ([], [f"projector:weights={tmp_path / 'run'}"]):
        model = load_model(flash, device="cpu", heads=heads)
        with torch.no_grad():
            right = [float(sample_loss(model, s, read_features(cfg.features, s.id))) for s in held]
            wrong = [float(sample_loss(model, replace(s, answer=ANSWERS[s.answer == ANSWERS[0]]),
                                       read_features(cfg.features, s.id))) for s in held]
        gaps.append((sum(wrong) - sum(right)) / len(held))
    assert abs(gaps[0]) < 0.01 and gaps[1] > 0.03  # untrained: no preference; trained: the memory's answer
    # the answer score: vstream eval's open score of the trained model's greedy answers (model is the trained one)
    expected = [score_open(model.answer(Context(memory=read_features(cfg.features, s.id).memory, duration=float(
        read_features(cfg.features, s.id).memory.spans[0][1])), s.question, GenerationConfig(
            max_new_tokens=len(model.tokenizer(s.answer).input_ids) + 8, attribute=False)).text, s.answer).score
        for s in held]
    assert report.held_out_score == pytest.approx(sum(expected) / len(expected))


def test_the_trained_weights_load_as_a_head_and_change_answers(flash, data, tmp_path):
    train(config(flash, data, tmp_path / "run", epochs=1), progress=False)
    base, tuned = load_model(flash, device="cpu"), load_model(flash, device="cpu", heads=[f"projector:weights={tmp_path / 'run'}"])
    saved = load_file(str(tmp_path / "run" / "projector.safetensors"))
    assert all(torch.equal(tuned.memory_projector().state_dict()[k], v) for k, v in saved.items())
    answers = [(model.answer(Context(memory=memory_of(0, 99), duration=99.0), "What happens in the video?")).text
               for model in (base, tuned)]
    assert answers[0] != answers[1]


def test_bfloat16_autocast_trains_too(flash, data, tmp_path):
    """Mixed precision (what ``auto`` picks on CUDA), here on the CPU: the forward in
    bfloat16, the projector and its optimizer in float32; the held-out loss still falls."""
    report = train(config(flash, data, tmp_path / "bf16", precision="bfloat16"), progress=False)
    assert report.held_out_after < report.held_out_before - 0.03
    saved = load_file(str(tmp_path / "bf16" / "projector.safetensors"))
    assert all(tensor.dtype == torch.float32 for tensor in saved.values())


def test_visual_experts_train_and_load_as_their_head(flash, data, tmp_path):
    report = train(config(flash, data, tmp_path / "experts", train=["visual_experts"]), progress=False)
    assert report.held_out_after < report.held_out_before - 0.02
    assert not (tmp_path / "experts" / "projector.safetensors").exists()
    base = load_model(flash, device="cpu")
    tuned = load_model(flash, device="cpu", heads=[f"visual_experts:weights={tmp_path / 'experts'}"])
    context = Context(memory=memory_of(1, 98), duration=98.0)
    assert base.answer(context, "What happens in the video?").text != tuned.answer(context, "What happens in the video?").text


def test_lora_adapters_train_and_load_as_their_head(flash, data, tmp_path):
    report = train(config(flash, data, tmp_path / "lora", train=["lora"], lora_rank=4), progress=False)
    assert report.held_out_after < report.held_out_before - 0.02
    assert json.loads((tmp_path / "lora" / "lora.json").read_text())["targets"] == ["q_proj", "v_proj"]
    base = load_model(flash, device="cpu")
    tuned = load_model(flash, device="cpu", heads=[f"lora:weights={tmp_path / 'lora'}"])
    context = Context(memory=memory_of(0, 97), duration=97.0)
    assert base.answer(context, "What happens in the video?").text != tuned.answer(context, "What happens in the video?").text
    with pytest.raises(ConfigError, match="LoRA targets \\['nothing_proj'\\]"):
        train(config(flash, data, tmp_path / "bad", train=["lora"], lora_targets=["nothing_proj"]), progress=False)


def test_a_resumed_run_ends_as_an_uninterrupted_one(flash, data, tmp_path):
    whole = train(config(flash, data, tmp_path / "whole"), progress=False)
    cut = train(config(flash, data, tmp_path / "cut"), progress=False, stop_after=5)
    assert cut.steps == 5 and cut.held_out_after is None
    resumed = train(config(flash, data, tmp_path / "cut"), progress=False)
    assert resumed.steps == whole.steps and resumed.held_out_after == whole.held_out_after
    a, b = (load_file(str(tmp_path / name / "projector.safetensors")) for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_configs_and_missing_features_are_named(flash, data, tmp_path):
    with pytest.raises(ConfigError, match="TrainConfig.train must list parts among projector, visual_experts, lora"):
        config(flash, data, tmp_path / "x", train=["everything"])
    with pytest.raises(ConfigError, match="TrainConfig.precision must be one of auto, bfloat16, float32"):
        config(flash, data, tmp_path / "x", precision="float16")
    with pytest.raises(ConfigError, match="unknown field"):
        TrainConfig.from_json(json.dumps({"model": flash, "data": "d", "features": "f", "out": "o", "lr": 1}))
    next(data[1].iterdir()).unlink()  # one record's features gone
    with pytest.raises(DataError, match="no features for record .* \\(run vstream extract first\\)"):
        train(config(flash, data, tmp_path / "x"), progress=False)


def test_the_cli_trains_from_a_config_file(flash, data, tmp_path, capsys):
    file = tmp_path / "train.json"
    file.write_text(config(flash, data, tmp_path / "cli", epochs=1).to_json())
    assert main(["train", str(file), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and f"--head projector:weights={tmp_path / 'cli'}" in out
    assert main(["train", str(tmp_path / "absent.json")]) == 1
    assert "cannot read the training config" in capsys.readouterr().err


def test_every_question_of_a_record_is_a_sample_after_the_ones_before(flash, tmp_path):
    """A record with three exchanges gives three samples, each after the earlier ones as
    the dialogue's history; the third's loss depends on that history."""
    features = tmp_path / "features"
    write_features(features, RecordFeatures("talk", memory_of(0, 1), [], "talk.mp4"))
    record = {"id": "talk", "video": "talk.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": ANSWERS[0]},
        {"from": "human", "value": "And then?"}, {"from": "gpt", "value": ANSWERS[1]},
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]}
    path = tmp_path / "talk.jsonl"
    path.write_text(json.dumps(record) + "\n")
    cfg = TrainConfig(model=flash, data=str(path), features=str(features), out=str(tmp_path / "o"), held_out=0.0)
    train_set, held = samples(cfg)
    assert held == [] and [(s.question, s.history) for s in train_set] == [
        ("What happens?", ()), ("And then?", (("What happens?", ANSWERS[0]),)),
        ("What colour?", (("What happens?", ANSWERS[0]), ("And then?", ANSWERS[1])))]
    model = load_model(flash, device="cpu")
    stored = read_features(features, "talk")
    with torch.no_grad():
        with_history = float(sample_loss(model, train_set[2], stored))
        without = float(sample_loss(model, replace(train_set[2], history=()), stored))
    assert with_history != without
