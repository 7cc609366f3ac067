"""Needle clips put their needle where their case says; the scorers; the harness end to end
with a tiny model (checking the harness, not the model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_llama

import vstream
from vstream import synth
from vstream.config import package_folder
from vstream.encoders.ocr import picture_change, thumbnail
from vstream.errors import ConfigError
from vstream.evaluate.needle import (
    HUM,
    MAGENTA,
    NOISE,
    PICTURE_SIZE,
    RED,
    NeedleCase,
    evidence_error,
    feed,
    make_needle_clip,
    score_answer,
    speech_available,
)
from vstream.models import Answer, Evidence, GenerationConfig, load_model
from vstream.session import Session, SessionConfig

torch.set_num_threads(1)


def colour_at(source, t: float) -> np.ndarray:
    """Median RGB of the lower-left corner (below the bar code; the median ignores the
    moving square) of the frame at ``t`` seconds."""
    image = source.frame_at(t).image
    h, w = image.shape[:2]
    return np.median(image[h // 2 :, : w // 8].reshape(-1, 3), axis=0)


def is_colour(rgb: np.ndarray, target) -> bool:
    return bool(np.abs(rgb - np.array(target)).max() < 40)


@pytest.mark.parametrize("position", ["start", "middle", "end"])
def test_visual_needle_is_on_screen_at_its_time_only(tmp_path, position):
    path, case = make_needle_clip(tmp_path, "visual", 30, position)
    start, end = case.span
    assert case.needle == start and end - start == 5.0
    with vstream.open_source(str(path)) as source:
        assert is_colour(colour_at(source, start + 2.5), MAGENTA)
        for t in np.arange(0.0, 30.0, 1.0):
            if not start - 0.5 <= t <= end + 0.5:
                assert not is_colour(colour_at(source, t), MAGENTA), t


def test_recurrence_shows_the_red_scene_count_times(tmp_path):
    path, case = make_needle_clip(tmp_path, "recurrence", 60, "middle", seed=1)
    assert case.count == 3 and "3" in case.expected
    with vstream.open_source(str(path)) as source:
        red = [is_colour(colour_at(source, t), RED) for t in np.arange(0.0, 60.0, 0.5)]
    appearances = sum(1 for a, b in zip([False] + red, red) if b and not a)
    assert appearances == case.count
    assert red[int(case.span[0] * 2) + 1]


@pytest.mark.parametrize("position, seed", [("start", 0), ("end", 0), ("end", 1)])
def test_order_case_names_the_scene_that_comes_first(tmp_path, position, seed):
    """Green comes first for even seeds, yellow for odd ones, wherever the needle is
    (at the end of a clip the other scene goes before it)."""
    path, case = make_needle_clip(tmp_path, "order", 60, position, seed=seed)
    colours = {"green": (20, 200, 40), "yellow": (240, 220, 20)}
    first, = case.expected
    assert first == ("green" if seed % 2 == 0 else "yellow")
    second = next(name for name in colours if name != first)
    with vstream.open_source(str(path)) as source:
        seen = [name for t in np.arange(0.0, 60.0, 1.0) for name, rgb in colours.items()
                if is_colour(colour_at(source, t), rgb)]
    assert seen and seen[0] == first and second in seen


def needle_frames(path, case, reference: np.ndarray) -> list[bool]:
    """For each second of the clip (sampled a quarter second in, away from scene cuts),
    whether the frame shows ``reference`` (its picture barely changed from it)."""
    small = thumbnail(np.asarray(Image.fromarray(reference).resize(PICTURE_SIZE, Image.BILINEAR)))
    with vstream.open_source(str(path)) as source:
        return [picture_change(thumbnail(source.frame_at(t + 0.25).image), small) < 0.02 for t in range(int(case.length))]


@pytest.mark.skipif(package_folder("skimage") is None, reason="photo needles use scikit-image's sample photos")
def test_photo_needle_shows_its_photo_at_its_time_only_and_shares_its_clip(tmp_path):
    path, case = make_needle_clip(tmp_path, "photo", 60, "end", seed=5)
    when_path, when = make_needle_clip(tmp_path, "photo_when", 60, "end", seed=5)
    assert when_path == path and when.span == case.span == (54.0, 59.0)
    assert "coffee" in case.expected and when.question == "When was the cup of coffee shown?"
    coffee = np.asarray(Image.open(package_folder("skimage") / "data" / "coffee.png").convert("RGB"))
    shown = needle_frames(path, case, coffee[:, ::-1])  # seed 5: the second photo, mirrored
    assert [t for t, yes in enumerate(shown) if yes] == [54, 55, 56, 57, 58]
    assert not any(needle_frames(path, case, coffee))


def test_text_needle_shows_its_slide_at_its_time_only_among_slides_without_numbers(tmp_path):
    path, case = make_needle_clip(tmp_path, "text", 60, "start", seed=2)
    when_path, when = make_needle_clip(tmp_path, "text_when", 60, "start", seed=2)
    number, = case.expected
    assert when_path == path and case.question == "What did the parking slide say?" and 2 <= int(number) < 10
    assert when.question == "When was the parking slide shown?" and case.span == (6.0, 11.0)
    shown = needle_frames(path, case, synth.text_slide(["Parking", f"Level {number}"], PICTURE_SIZE))
    assert [t for t, yes in enumerate(shown) if yes] == [6, 7, 8, 9, 10]
    with vstream.open_source(str(path)) as source:  # the scene from 20 s to 40 s is a slide with no number
        plain = source.frame_at(30.0).image
    assert not any(picture_change(thumbnail(plain), thumbnail(synth.text_slide([word], PICTURE_SIZE))) < 0.02
                   for word in ("Parking", f"Level {number}"))
    assert plain.std() > 20  # dark letters on a light slide, not a plain colour


def test_spoken_needle_is_heard_at_its_time_over_a_hum(tmp_path):
    if not speech_available():
        pytest.skip("espeak-ng is not installed: spoken needles cannot be made (apt-get install espeak-ng)")
    path, case = make_needle_clip(tmp_path, "spoken", 60, "middle")
    start, end = case.span
    assert 29 <= start <= 31 and 1.5 < end - start < 6
    with vstream.open_source(str(path)) as source:
        voiced = source.audio_between(start + 0.3, end - 0.3).samples
        hum = source.audio_between(start - 6, start - 1).samples  # nothing said there
    # The hum plays where nothing is said, at the first minute's pitch; speech is louder.
    spectrum = np.abs(np.fft.rfft(hum))
    assert np.fft.rfftfreq(len(hum), 1 / 16_000)[spectrum.argmax()] == pytest.approx(HUM[0], abs=1)
    assert np.sqrt((voiced**2).mean()) > 1.2 * np.sqrt((hum**2).mean()) > 0.05
    # and white noise under it: energy above 1 kHz, where a 100 Hz hum has none
    spectrum = np.fft.rfft(hum)
    spectrum[np.fft.rfftfreq(len(hum), 1 / 16_000) < 1000] = 0
    assert np.fft.irfft(spectrum, len(hum)).std() > NOISE / 4


def test_cases_check_themselves():
    with pytest.raises(ConfigError, match="kind"):
        NeedleCase("smell", 60, "middle", 30, (30, 35), "?")
    with pytest.raises(ConfigError, match="span"):
        NeedleCase("visual", 60, "middle", 58, (58, 63), "?")
    with pytest.raises(ConfigError, match="count"):
        NeedleCase("recurrence", 60, "middle", 30, (30, 35), "?")
    with pytest.raises(ConfigError, match="too short"):
        make_needle_clip("unused", "visual", 5, "middle")


def test_scoring_on_hand_made_answers():
    spoken = NeedleCase("spoken", 60, "middle", 30, (30, 33), "Which platform?", ("nine", "9"))
    assert score_answer(spoken, Answer("It leaves from platform 9."))
    assert score_answer(spoken, Answer("Platform Nine."))
    assert not score_answer(spoken, Answer("Platform ninety."))
    assert not score_answer(spoken, Answer("I do not know."))
    heard = Answer("nine", [Evidence(10, 12, "frame", 0.9), Evidence(36, 38, "transcript", 0.5)])
    assert evidence_error(spoken, heard) == 3.0  # the transcript line, 3 s after the needle ends
    assert evidence_error(spoken, Answer("nine", [Evidence(10, 12, "frame", 0.9)])) is None

    visual = NeedleCase("visual", 600, "end", 540, (540, 545), "When?", ("magenta",))
    near = Answer("At the end.", [Evidence(548, 550, "frame", 0.7), Evidence(100, 101, "frame", 0.2)])
    far = Answer("At the end.", [Evidence(100, 101, "frame", 0.7), Evidence(541, 542, "frame", 0.2)])
    assert evidence_error(visual, near) == 3.0 and score_answer(visual, near)
    assert evidence_error(visual, far) == 439.0 and not score_answer(visual, far)
    assert evidence_error(visual, Answer("?", [Evidence(542, 543, "frame", 1.0)])) == 0.0
    assert not score_answer(visual, Answer("At 9 minutes."))  # no evidence: not right

    count = NeedleCase("recurrence", 60, "start", 5, (5, 7), "How many?", ("3", "three"), count=3)
    assert score_answer(count, Answer("Three times."))
    assert score_answer(count, Answer("It appeared 3 times, at 5, 20 and 40 s."))
    assert not score_answer(count, Answer("2 times, maybe three."))
    slide = NeedleCase("text_when", 60, "middle", 30, (30, 35), "When?", ("Parking",))
    read = Answer("At 0:30.", [Evidence(10, 12, "frame", 0.9), Evidence(30, 34, "screen", 0.3)])
    assert evidence_error(slide, read) == 0.0 and score_answer(slide, read)  # screen text evidence counts
    assert not score_answer(slide, Answer("At 0:30.", [Evidence(30, 34, "frame", 0.9)]))
    said = NeedleCase("text", 60, "middle", 30, (30, 35), "What did it say?", ("7",))
    assert score_answer(said, Answer("Parking, level 7.")) and not score_answer(said, Answer("Level 17."))
    order = NeedleCase("order", 60, "start", 5, (5, 10), "Which first?", ("yellow",))
    assert score_answer(order, Answer("The yellow one, then the green one."))
    assert not score_answer(order, Answer("Green came before yellow."))
    assert not score_answer(order, Answer("The blue one."))


def test_harness_end_to_end_with_a_tiny_model(tmp_path):
    """Ingest a 30 s visual needle clip, ask, score: the harness runs and reports an
    evidence error (whatever the tiny random model answers)."""
    path, case = make_needle_clip(tmp_path, "visual", 30, "middle")
    model = load_model(str(tiny_llama(tmp_path / "llama")))
    config = SessionConfig(asr=False, generation=GenerationConfig(max_new_tokens=4))
    with Session(model, config) as session:
        session.ingest(str(path), progress=False)
        answer = session.ask(case.question)
    error = evidence_error(case, answer)
    assert error is not None and 0.0 <= error <= case.length
    assert score_answer(case, answer) == (error <= case.tolerance)
    again_path, again = make_needle_clip(tmp_path, "visual", 30, "middle")  # cached: same clip, same case
    assert again_path == path and again == case


def test_a_live_case_is_fed_up_to_its_question_only(tmp_path):
    """A live case is asked when the stream reaches ``ask_at``: the session holds the
    clip up to there, no further, and answers about the last seconds."""
    path, case = make_needle_clip(tmp_path, "live", 60, "middle")
    assert case.span == (30.0, 35.0) and case.ask_at == 40.0 and case.last == 30.0
    model = load_model(str(tiny_llama(tmp_path / "llama")))
    with Session(model, SessionConfig(asr=False, generation=GenerationConfig(max_new_tokens=4))) as session:
        feed(session, path, case)
        stats = session.stats
        answer = session.ask(case.question, last=case.last)
    assert stats.last_t == 40.0 and stats.frames_processed == 41  # 1 fps, 0 s to 40 s
    assert evidence_error(case, answer) is not None
