"""Bad input: each case raises a VStreamError naming the source and the cause, quickly,
after yielding what did decode, and leaves no decoder thread behind."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest

import vstream
from vstream import DecodeError, Frame, SourceError, synth


@pytest.fixture(autouse=True)
def bounded(no_leaked_threads):
    start = time.monotonic()
    yield
    assert time.monotonic() - start < 20.0


def damaged_copy(clip, tmp_path, how: str):
    data = clip.path.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # 4 kB of noise in the middle
        noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
        middle = len(data) // 2
        data = data[:middle] + noise + data[middle + len(noise) :]
    path = tmp_path / f"{how}{clip.path.suffix}"
    path.write_bytes(data)
    return path


def read_until_error(path, **settings):
    """Frames yielded before the error, and the error."""
    frames = []
    with pytest.raises(DecodeError) as raised:
        with vstream.open_source(path, **settings) as source:
            for item in source:
                if isinstance(item, Frame):
                    frames.append(item)
    return frames, raised.value


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.mp4"
    with pytest.raises(SourceError, match="no such file") as raised:
        vstream.open_source(path)
    assert str(path) in str(raised.value)
    assert isinstance(raised.value, OSError)


def test_directory(tmp_path):
    with pytest.raises(SourceError, match="directory"):
        vstream.open_source(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello, this is text and not a video\n" * 100, bytes(range(256)) * 64])
def test_not_media(tmp_path, content):
    path = tmp_path / "fake.mp4"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match="not a media file") as raised:
        vstream.open_source(path)
    assert str(path) in str(raised.value)
    with pytest.raises(DecodeError):
        vstream.probe(str(path))


def test_mp4_truncated_before_its_index(make_clip, tmp_path):
    # PyAV writes the mp4 index (moov) at the end: cut in half, nothing is decodable.
    path = damaged_copy(make_clip("cfr.mp4", duration=6.0, fps=30), tmp_path, "truncated")
    with pytest.raises(DecodeError, match="truncated"):
        vstream.open_source(path)


@pytest.mark.parametrize("ext", [".mkv", ".webm"])
def test_truncated_stream_yields_what_decoded_then_the_error(make_clip, tmp_path, ext):
    path = damaged_copy(make_clip(f"cfr{ext}", duration=6.0, fps=30), tmp_path, "truncated")
    frames, error = read_until_error(path, fps=None)
    assert 30 < len(frames) < 180
    assert all(synth.read_index(f.image) == f.index for f in frames)
    assert "truncated" in str(error) and str(path) in str(error)


def test_corruption_midway_yields_what_decoded_then_the_error(make_clip, tmp_path):
    path = damaged_copy(make_clip("cfr.mp4", duration=6.0, fps=30), tmp_path, "corrupt")
    frames, error = read_until_error(path, fps=None)
    assert len(frames) > 30
    assert [f.index for f in frames[:30]] == list(range(30))
    assert all(synth.read_index(f.image) == f.index for f in frames[:30])
    assert "corrupt" in str(error) and str(path) in str(error)


def test_asking_for_a_missing_track(make_clip):
    clip = make_clip("video_only.mp4", duration=3.0, audio=False)
    with pytest.raises(DecodeError, match="has no audio stream"):
        vstream.open_source(clip.path, video=False)
    with pytest.raises(DecodeError, match="no audio stream"):
        vstream.open_source(clip.path).audio_between(0.0, 1.0)


@pytest.mark.parametrize("camera", ["/dev/video97", "camera:97"])
def test_camera_that_does_not_exist(camera):
    with pytest.raises(SourceError, match="no camera") as raised:
        vstream.open_source(camera)
    assert camera in str(raised.value)
    with pytest.raises(SourceError):
        vstream.probe(camera)


def test_bad_settings_name_the_setting():
    with pytest.raises(vstream.ConfigError, match="fps"):
        vstream.open_source("whatever.mp4", fps=-2)
    with pytest.raises(TypeError):
        vstream.open_source("whatever.mp4", frames_per_second=2)


SPEECH = Path(__file__).parent / "data" / "speech.mp4"


@pytest.mark.parametrize("seed, cause", [
    (242, "video stream has a codec FFmpeg does not know"),  # a flipped codec tag: no codec context
    (346, "audio stream has a codec FFmpeg does not know"),
    (299, "cannot read its packets: Operation not permitted"),  # the demux fails part-way
    (361, "cannot read its packets: Cannot allocate memory"),  # a flipped size field: PyAV's MemoryError
])
def test_byte_flipped_mp4_is_a_decode_error_naming_the_file(tmp_path, seed, cause):
    """Bit flips in the committed speech clip (seeded): each failure PyAV raised raw before
    is a DecodeError that names the file and the cause."""
    data, flips = bytearray(SPEECH.read_bytes()), random.Random(seed)
    for _ in range(flips.choice([1, 4, 16])):
        data[flips.randrange(len(data))] ^= 1 << flips.randrange(8)
    path = tmp_path / f"flipped-{seed}.mp4"
    path.write_bytes(data)
    with pytest.raises(DecodeError, match=cause) as raised:
        vstream.open_source(path)
    assert str(path) in str(raised.value)
