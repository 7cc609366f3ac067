"""``vstream extract``: each video of a conversation file through ingestion, the frame
encoder and the memory once; the features read back equal a session's memory of the
same video; runs resume; a broken record stops only itself."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_jsonl
from tiny_models import tiny_clip, tiny_flash_vstream, tiny_llama

from vstream.cli import main
from vstream.data import extracted, feature_path, read_features
from vstream.encoders import create_encoder
from vstream.errors import DataError
from vstream.extract import extract_features
from vstream.memory import replay_abstract
from vstream.models import load_model
from vstream.session import Session, SessionConfig

torch.set_num_threads(1)
CONFIG = SessionConfig(asr=False, ocr=False, encoder="pixels")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(tiny_llama(tmp_path_factory.mktemp("extract-models") / "llama"))


@pytest.fixture
def data(tmp_path, make_clip):
    """Four records: two videos (one id with a slash), a text-only one, a missing video."""
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).symlink_to(make_clip(name, duration=6.0, fps=10.0).path)
    records = [
        {"id": "clip/a", "video": "a.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat moves?"},
                                                              {"from": "gpt", "value": "A square."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "gone", "video": "missing.mp4", "conversations": [{"from": "human", "value": "<video>\nAnd?"},
                                                                  {"from": "gpt", "value": "No."}]},
        {"id": "b", "video": "b.mp4", "conversations": [{"from": "human", "value": "<video>\nColour?"},
                                                         {"from": "gpt", "value": "Red."}]},
    ]
    path = tmp_path / "train.jsonl"
    write_jsonl(path, records)
    return path


def test_features_are_the_sessions_memory_and_a_rerun_resumes(data, llama, tmp_path):
    out = tmp_path / "features"
    report = extract_features(data, out, llama, CONFIG, progress=False)
    assert (report.extracted, report.skipped, report.without_video) == (2, 0, 1)
    assert [record for record, _ in report.failed] == ["gone"] and "missing.mp4" in report.failed[0][1]
    assert json.loads((out / "failed.jsonl").read_text())["id"] == "gone"

    stored = read_features(out, "clip/a")
    with Session(llama, CONFIG) as session:  # the same video through a session of its own
        session.ingest(str(tmp_path / "a.mp4"), progress=False)
        expected, timeline = session.memory.tokens(), session.memory.timeline()
    assert stored.memory.kinds == expected.kinds and stored.memory.spans == expected.spans
    torch.testing.assert_close(stored.memory.tokens, expected.tokens, rtol=0, atol=0)
    assert [scene.runs for scene in stored.timeline] == [scene.runs for scene in timeline]
    assert stored.source.endswith("a.mp4") and len(stored.memory) > 0

    written = feature_path(out, "b").stat().st_mtime_ns
    again = extract_features(data, out, llama, CONFIG, progress=False)
    assert (again.extracted, again.skipped, len(again.failed)) == (0, 2, 1)
    assert feature_path(out, "b").stat().st_mtime_ns == written  # untouched


def test_an_interrupted_run_leaves_no_half_file_and_resumes(data, llama, tmp_path, monkeypatch):
    """The first record's write dies midway: no features file for it (the partial file is
    not taken for one), and the next run extracts both."""
    from vstream.data import features

    out = tmp_path / "features"
    real = features.save_file

    def dying(tensors, path, metadata):
        real(tensors, path, metadata)
        raise KeyboardInterrupt  # the process stopped after writing, before the rename

    monkeypatch.setattr(features, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features(data, out, llama, CONFIG, progress=False)
    assert not extracted(out, "clip/a")
    monkeypatch.setattr(features, "save_file", real)
    report = extract_features(data, out, llama, CONFIG, progress=False)
    assert report.extracted == 2 and extracted(out, "clip/a") and extracted(out, "b")


def test_damaged_or_absent_features_are_named(data, tmp_path):
    out = tmp_path / "features"
    out.mkdir()
    with pytest.raises(DataError, match="no features for record 'b'"):
        read_features(out, "b")
    feature_path(out, "b").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=r"b-[0-9a-f]{8}\.safetensors: damaged features file"):
        read_features(out, "b")


def test_the_cli_extracts_and_reports(data, llama, tmp_path, capsys):
    out = tmp_path / "features"
    code = main(["extract", str(data), "--out", str(out), "--model", llama, "--encoder", "pixels", "--quiet"])
    printed = capsys.readouterr()
    assert code == 1  # one record failed
    assert "extracted 2, already there 0, without video 1, failed 1" in printed.out
    assert "gone: " in printed.err
    assert read_features(out, "b").memory.tokens.shape[1] == create_encoder("pixels").dim  # --encoder pixels


def test_the_stored_frames_rebuild_the_sessions_abstract_memory(data, tmp_path):
    """Features keep every frame at the abstract grid, in order: replaying the abstract
    update over them with the checkpoint's attention gives the stored abstract tokens bit
    for bit (what training the attention starts from)."""
    clip = tiny_clip(tmp_path / "clip")
    flash, _ = tiny_flash_vstream(tmp_path / "flash", clip)  # 5 abstract slots, updated 5 frames at a time
    out = tmp_path / "features"
    extract_features(data, out, str(flash), SessionConfig(asr=False, ocr=False, fps=4.0), progress=False)
    stored = read_features(out, "b")
    inputs = stored.abstract
    assert inputs.frames.shape == (24, 1, 48) and (inputs.length, inputs.chunk, inputs.alpha) == (5, 5, 0.3)
    abstract = stored.memory.tokens[[kind == "abstract" for kind in stored.memory.kinds]]
    with torch.no_grad():
        rebuilt = replay_abstract(load_model(str(flash), device="cpu").memory_attention(), inputs.frames, 5, 5, 0.3)
    torch.testing.assert_close(rebuilt.reshape(-1, 48), abstract, rtol=0, atol=0)
    assert not torch.allclose(abstract, inputs.frames[:5, 0])  # the three whole chunks did update the slots
